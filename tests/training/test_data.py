"""Training data: deterministic class-folder split, vocabularies, caption files, multi-crop views, sampler."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rsmclip_geo.errors import RsmclipError
from training import data as D

REPO = Path(__file__).resolve().parents[2]


def test_split_class_folder_on_aid(shared_data):
    aid = shared_data / "aid"
    splits = D.split_class_folder(aid)
    assert len(splits["train"]) + len(splits["val"]) == 8000
    train_paths = {p for p, _ in splits["train"]}
    assert not train_paths & {p for p, _ in splits["val"]}
    for class_name in ("Airport", "StorageTanks"):
        names = sorted(p.name for p in (aid / class_name).iterdir())
        val = [p.name for p, c in splits["val"] if c == class_name]
        assert val == [n for i, n in enumerate(names) if i % 5 == 4]
    assert D.split_class_folder(aid) == splits  # deterministic


def test_split_uses_sorted_file_names(tmp_path):
    for name in ("b_2.jpg", "a_10.jpg", "a_1.jpg", "c.png", "a_3.jpg", "notes.txt"):
        (tmp_path / "Pond").mkdir(exist_ok=True)
        (tmp_path / "Pond" / name).write_bytes(b"")
    splits = D.split_class_folder(tmp_path)
    # sorted: a_1 a_10 a_3 b_2 c -> the fifth (index 4) is validation; non-images are ignored
    assert [p.name for p, _ in splits["val"]] == ["c.png"]
    assert [p.name for p, _ in splits["train"]] == ["a_1.jpg", "a_10.jpg", "a_3.jpg", "b_2.jpg"]
    with pytest.raises(RsmclipError, match="not a directory"):
        D.split_class_folder(tmp_path / "missing")


def test_class_name_words():
    assert D.class_name_words("StorageTanks") == "storage tanks"
    assert D.class_name_words("SparseResidential") == "sparse residential"
    assert D.class_name_words("river_bank") == "river bank"
    assert D.class_name_words("Airport") == "airport"


VOCAB_YAML = """
languages: [en, pt]
templates:
  en: {train: ["an aerial image of {}", "{}"], heldout: ["top-down picture of {}"]}
  pt: {train: ["imagem aérea de {}"]}
classes:
  Airport:
    en: {train: [airport, airfield], heldout: [aerodrome]}
    pt: {train: {names: [aeroporto], templates: ["{} visto de cima"]}}
  Beach:
    en: [beach]
"""


def test_vocabulary_parts_and_template_sources(tmp_path):
    path = tmp_path / "vocab.yaml"
    path.write_text(VOCAB_YAML, encoding="utf-8")
    vocab = D.load_vocabulary(path)
    assert vocab.prompts("Airport", "en", "train") == [
        "an aerial image of airport", "an aerial image of airfield", "airport", "airfield"]
    assert vocab.prompts("Airport", "en", "heldout") == ["top-down picture of aerodrome"]
    assert len(vocab.prompts("Airport", "en", "all")) == 5
    # class-level templates win over the top-level ones
    assert vocab.prompts("Airport", "pt", "train") == ["aeroporto visto de cima"]
    # a held-out part without names reuses the train names (with the held-out templates)
    assert vocab.prompts("Beach", "en", "heldout") == ["top-down picture of beach"]
    assert vocab.prompts("Beach", "pt", "train") == []
    with pytest.raises(RsmclipError, match="prompt part"):
        vocab.prompts("Beach", "en", "test")


def test_repository_vocabulary_loads(tmp_path):
    vocab = D.load_vocabulary(REPO / "training" / "vocab" / "aid_classes.yaml")
    assert len(vocab.entries) == 30 and len(vocab.languages) == 10
    for lang in vocab.languages:
        train, heldout = vocab.prompts("StorageTanks", lang, "train"), vocab.prompts("StorageTanks", lang, "heldout")
        assert train and heldout and not set(train) & set(heldout)


@pytest.mark.parametrize("text, message", [
    ("classes: [a, b]\n", "no 'classes' mapping"),
    ("classes: {Airport: {en: {train: {names: 3}}}}\n", "classes.Airport.en.train.names must be"),
    ("classes: {Airport: {en: {train: [a]}\n", "cannot be read"),
])
def test_vocabulary_errors_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RsmclipError, match=message) as info:
        D.load_vocabulary(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_class_folder_items_fallback_and_missing_language(tmp_path):
    pairs = [(tmp_path / "x.jpg", "StorageTanks")]
    items = D.class_folder_items(pairs, D.default_vocabulary(["StorageTanks"]), ["en", "pt"])
    assert items[0].label == "StorageTanks"
    assert set(items[0].captions) == {"en"}
    assert "an aerial image of storage tanks" in items[0].captions["en"]
    with pytest.raises(RsmclipError, match="StorageTanks"):
        D.class_folder_items(pairs, D.default_vocabulary(["StorageTanks"]), ["zh"])


def write_karpathy(path: Path) -> None:
    path.write_text(json.dumps({"dataset": "rsicd", "images": [
        {"filename": "airport_1.jpg", "split": "train", "sentences": [
            {"raw": "many planes are parked near the terminal .", "sentid": 10},
            {"raw": "an airport with a long runway .", "sentid": 11}]},
        {"filename": "beach_3.jpg", "split": "test", "sentences": [
            {"tokens": ["waves", "on", "a", "sandy", "beach"], "sentid": 12}]},
    ]}), encoding="utf-8")


def test_caption_items_merge_translations_and_tolerate_torn_line(tmp_path):
    captions = tmp_path / "dataset_rsicd.json"
    write_karpathy(captions)
    sidecar = tmp_path / "rsicd.translations.jsonl"
    lines = [
        {"image": "airport_1.jpg", "sentid": 10, "lang": "pt", "text": "muitos aviões estacionados"},
        {"image": "airport_1.jpg", "sentid": 11, "lang": "zh", "text": "有长跑道的机场"},
        {"image": "beach_3.jpg", "sentid": 12, "lang": "pt", "text": "ondas numa praia"},
    ]
    sidecar.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + '\n{"image": "airp',
                       encoding="utf-8")
    train = D.caption_items(captions, tmp_path / "imgs", splits=["train"], languages=["en", "pt", "zh"],
                            translations=[sidecar])
    assert len(train) == 1 and train[0].image == tmp_path / "imgs" / "airport_1.jpg"
    assert train[0].captions == {
        "en": ["many planes are parked near the terminal .", "an airport with a long runway ."],
        "pt": ["muitos aviões estacionados"], "zh": ["有长跑道的机场"]}
    test = D.caption_items(captions, tmp_path / "imgs", splits=["test"], languages=["en", "pt"],
                           translations=[sidecar])
    assert test[0].captions == {"en": ["waves on a sandy beach"], "pt": ["ondas numa praia"]}
    with pytest.raises(RsmclipError, match="no captions"):
        D.caption_items(captions, tmp_path, splits=["val"], languages=["en"])


def test_nwpu_layout(tmp_path):
    path = tmp_path / "dataset_nwpu.json"
    path.write_text(json.dumps({"airport": [{"filename": "airport_001.jpg", "split": "train", "raw": "a",
                                             "raw_1": "b", "raw_2": "c"}]}), encoding="utf-8")
    sentences = list(D.iter_caption_sentences(path))
    assert [(s.sentid, s.text, s.image_path) for s in sentences] == [
        (0, "a", "airport/airport_001.jpg"), (1, "b", "airport/airport_001.jpg"), (2, "c", "airport/airport_001.jpg")]
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(RsmclipError, match="neither Karpathy"):
        list(D.iter_caption_sentences(tmp_path / "bad.json"))


def test_multicrop_shapes_and_determinism(shared_data):
    image = D.load_rgb(sorted((shared_data / "aid" / "Port").iterdir())[0])
    augment = D.MultiCropAugment(D.MultiCropConfig(global_size=48, local_size=24, n_local=5))
    global_views, local_views = augment(image, random.Random(7))
    assert global_views.shape == (2, 3, 48, 48) and local_views.shape == (5, 3, 24, 24)
    again_global, again_local = augment(image, random.Random(7))
    assert torch.equal(global_views, again_global) and torch.equal(local_views, again_local)
    other_global, _ = augment(image, random.Random(8))
    assert not torch.equal(global_views, other_global)
    assert not torch.equal(global_views[0], global_views[1])  # two different global crops


def test_random_resized_crop_box_respects_scale():
    rng = random.Random(0)
    for _ in range(200):
        top, left, h, w = D.random_resized_crop_box(150, 150, (0.05, 0.4), rng)
        assert 0 <= top <= 150 - h and 0 <= left <= 150 - w
        assert 0.04 * 150 * 150 <= h * w <= 0.42 * 150 * 150


def test_rot90_and_flip_keep_content(tmp_path):
    """Aerial augmentations only move pixels: a geometric-only view keeps the crop's pixel multiset."""
    array = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    image = Image.fromarray(array)
    cfg = D.MultiCropConfig(global_size=16, local_size=16, n_local=0, global_scale=(1.0, 1.0),
                            color_jitter=(0, 0, 0, 0), mean=(0, 0, 0), std=(1, 1, 1))
    views, _ = D.MultiCropAugment(cfg)(image, random.Random(3))
    for view in views:
        values = np.sort((view.numpy() * 255).round().astype(np.uint8).ravel())
        assert np.array_equal(values, np.sort(array.ravel()))


def test_sampler_is_deterministic_resumable_and_sharded():
    sampler = D.ResumableWeightedSampler(50, batch_size=4, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    assert len(full) == 48 and len({i for i, _ in full}) == 48  # an epoch is a permutation (drop last)
    sampler.set_epoch(2, start_batch=5)
    assert list(sampler) == full[20:]
    sampler.set_epoch(3)
    assert list(sampler) != full
    ranks = []
    for rank in range(2):
        shard = D.ResumableWeightedSampler(50, batch_size=4, seed=1, rank=rank, world_size=2)
        shard.set_epoch(2)
        ranks.append([i for i, _ in shard])
    assert len(ranks[0]) == len(ranks[1]) == 24 and not set(ranks[0]) & set(ranks[1])
    with pytest.raises(RsmclipError, match="batch_size"):
        D.ResumableWeightedSampler(3, batch_size=4, seed=0)


def test_sampler_mixture_weights():
    probabilities = D.mixture_weights([10, 990], [0.5, 0.5])
    sampler = D.ResumableWeightedSampler(1000, batch_size=100, seed=0, probabilities=probabilities,
                                         samples_per_epoch=4000)
    drawn = [i for i, _ in sampler]
    small_share = sum(i < 10 for i in drawn) / len(drawn)
    assert 0.45 < small_share < 0.55  # the small dataset gets half of the draws


def test_dataset_draws_languages_per_sample(shared_data):
    path = sorted((shared_data / "aid" / "Beach").iterdir())[0]
    item = D.CaptionedImage(image=path, captions={"en": ["beach"], "pt": ["praia"], "zh": ["海滩"]}, label="Beach")
    dataset = D.MultiCropCaptionDataset([item], D.MultiCropAugment(D.MultiCropConfig(32, 16, n_local=1)))
    samples = [dataset[(0, seed)] for seed in range(30)]
    languages = Counter(s["lang"] for s in samples)
    assert set(languages) == {"en", "pt", "zh"}
    assert all(s["caption"] == item.captions[s["lang"]][0] for s in samples)
    batch = D.collate_views(samples[:4])
    assert batch["global"].shape == (4, 2, 3, 32, 32) and batch["local"].shape == (4, 1, 3, 16, 16)
    assert dataset[(0, 5)]["caption"] == dataset[(0, 5)]["caption"]


def test_cached_images_give_the_same_views(shared_data, tmp_path):
    source = sorted((shared_data / "aid" / "Beach").iterdir())[0]
    copy = tmp_path / source.name
    copy.write_bytes(source.read_bytes())
    item = D.CaptionedImage(image=copy, captions={"en": ["beach"]}, label="Beach")
    augment = D.MultiCropAugment(D.MultiCropConfig(32, 16, n_local=1))
    plain = D.MultiCropCaptionDataset([item], augment)
    cached = D.MultiCropCaptionDataset([item], augment, cache_images=True)
    expected = {seed: plain[(0, seed)] for seed in (3, 4)}
    cached[(0, 0)]
    copy.unlink()  # from now on only the cache has the image
    for seed, views in expected.items():
        sample = cached[(0, seed)]
        assert torch.equal(sample["global"], views["global"]) and torch.equal(sample["local"], views["local"])
    with pytest.raises(RsmclipError, match="cannot be read"):
        plain[(0, 3)]
