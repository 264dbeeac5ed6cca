"""Evaluation: recall and P@k on hand-made score matrices, zero-shot on real AID images with a real tiny
checkpoint and its exported bundle (same numbers within export tolerance), caption-CSV retrieval, free-text P@10
and the suite on real AID / UCM images through the checked-in tiny bundle, output files, errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from training import data as D
from rsmclip_geo.errors import RsmclipError
from training.eval_suite import CachingEncoder, load_suite, run_suite
from training.evaluate import (
    BundleEncoder,
    TorchEncoder,
    class_embeddings,
    confusion_matrix,
    evaluate_caption_csv,
    evaluate_data,
    evaluate_free_text,
    precision_at_k,
    retrieval_metrics,
)
from training.model import create_model

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["Beach", "Forest", "Parking", "StorageTanks"]


def test_retrieval_metrics_hand_made():
    # 3 images, 5 texts; text j belongs to image owners[j]
    owners = [0, 0, 1, 2, 2]
    sim = np.array([
        # t0    t1    t2    t3    t4
        [0.90, 0.10, 0.20, 0.30, 0.00],  # image 0: its best text t0 is rank 0
        [0.50, 0.40, 0.30, 0.60, 0.70],  # image 1: its text t2 ranks 4th (index 4) -> found at R@5
        [0.10, 0.20, 0.30, 0.25, 0.05],  # image 2: best own text t3 (0.25) ranks after t2 (0.30) -> index 1
    ])
    m = retrieval_metrics(sim, owners)
    assert m["i2t_R@1"] == pytest.approx(100 / 3)
    assert m["i2t_R@5"] == pytest.approx(100.0) and m["i2t_R@10"] == pytest.approx(100.0)
    # text columns: t0 -> image 0 best (rank 0); t1 -> image 1 (0.4) > image 0 (0.1): rank 2 (image 2 0.2 too)
    # t2 -> image 1 (0.3) ties image 2 (0.3): pessimistic rank 1; t3 -> image 1 0.6 > image 2 0.25: rank 2
    # t4 -> image 1 0.7 > image 2 0.05: rank 1
    ranks = [0, 2, 1, 2, 1]
    for k in (1, 5, 10):
        assert m[f"t2i_R@{k}"] == pytest.approx(100 * np.mean([r < k for r in ranks]))
    assert m["mean_recall"] == pytest.approx(np.mean([m[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]))


def test_retrieval_metrics_perfect_and_reversed():
    perfect = retrieval_metrics(np.eye(12), list(range(12)))
    assert all(v == 100.0 for v in perfect.values())
    reversed_ = retrieval_metrics(-np.eye(12), list(range(12)))  # correct pair scores lowest: rank 11
    assert reversed_["i2t_R@10"] == 0.0 and reversed_["t2i_R@10"] == 0.0
    with pytest.raises(ValueError):
        retrieval_metrics(np.eye(3), [0, 1])


def test_confusion_matrix():
    matrix = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


@pytest.fixture(scope="module")
def small_aid(tmp_path_factory, shared_data) -> Path:
    """Four AID classes, 10 images each (symlinks): the val split holds 2 per class."""
    root = tmp_path_factory.mktemp("aid")
    for name in CLASSES:
        (root / name).mkdir()
        for path in sorted((shared_data / "aid" / name).iterdir())[:10]:
            (root / name / path.name).symlink_to(path.resolve())
    return root


def test_class_embeddings_are_normalised_prompt_means(tiny_model):
    encoder = TorchEncoder(create_model(None, checkpoint=tiny_model.checkpoint))
    prompts = [["airport", "an aerial image of airport"], ["beach"]]
    emb = class_embeddings(encoder, prompts)
    texts = encoder.encode_texts(["airport", "an aerial image of airport", "beach"])
    expected = texts[:2].mean(axis=0)
    np.testing.assert_allclose(emb[0], expected / np.linalg.norm(expected), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb[1], texts[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_checkpoint_and_bundle_give_the_same_zero_shot_numbers(tiny_model, exported_bundle, small_aid):
    vocab = REPO / "training" / "vocab" / "aid_classes.yaml"
    langs = ["en", "pt", "zh"]
    torch_encoder = TorchEncoder(create_model(None, checkpoint=tiny_model.checkpoint))
    bundle_encoder = BundleEncoder(exported_bundle)
    pairs = D.split_class_folder(small_aid)["train"]
    paths = [p for p, _ in pairs]
    # embeddings agree within the export's parity tolerance
    cos_images = np.sum(torch_encoder.encode_image_files(paths) * bundle_encoder.encode_image_files(paths), axis=1)
    assert cos_images.min() > 0.99
    texts = D.load_vocabulary(vocab).prompts("Beach", "pt", "heldout")
    cos_texts = np.sum(torch_encoder.encode_texts(texts) * bundle_encoder.encode_texts(texts), axis=1)
    assert cos_texts.min() > 0.999
    a = evaluate_data(torch_encoder, small_aid, langs, vocabulary=vocab, split="all")
    b = evaluate_data(bundle_encoder, small_aid, langs, vocabulary=vocab, split="all")
    assert a["prompt_part"] == "heldout" and a["classes"] == CLASSES
    for lang in langs:
        assert a["per_language"][lang]["n_images"] == 40
        # at most one of 40 predictions may flip on a near tie between the two runtimes
        assert abs(a["per_language"][lang]["top1"] - b["per_language"][lang]["top1"]) <= 100 / 40 + 1e-9
        assert np.abs(a["confusion"][lang] - b["confusion"][lang]).sum() <= 2


def test_cli_zero_shot_writes_json_and_confusion_files(tiny_model, small_aid, tmp_path):
    out = tmp_path / "res" / "eval.json"
    result = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--model", str(tiny_model.checkpoint), "--data", str(small_aid),
         "--vocabulary", str(REPO / "training" / "vocab" / "aid_classes.yaml"), "--langs", "en,ko", "-o", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["task"] == "zero_shot" and report["split"] == "val"
    assert set(report["per_language"]) == {"en", "ko"}
    assert report["per_language"]["ko"]["n_images"] == 8  # 2 validation images per class
    with open(out.parent / "eval.confusion-ko.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][1:] == CLASSES
    counts = np.array([[int(v) for v in row[1:]] for row in rows[1:]])
    assert counts.sum(axis=1).tolist() == [2, 2, 2, 2]
    assert np.trace(counts) / 8 * 100 == pytest.approx(report["per_language"]["ko"]["top1"])
    with Image.open(out.parent / "eval.confusion-en.png") as png:
        assert png.size[0] > 4 * 18 and png.mode == "RGB"
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "eval.confusion-en.csv", "eval.confusion-en.png", "eval.confusion-ko.csv", "eval.confusion-ko.png",
        "eval.json"]


def test_retrieval_on_caption_file_per_language(tiny_model, exported_bundle, small_aid, tmp_path):
    images, sidecar = [], []
    sentid = 0
    for name in CLASSES:
        for path in sorted((small_aid / name).iterdir())[:3]:
            caps = [f"an aerial image of {name.lower()}", f"{name.lower()} seen from above"]
            images.append({"filename": f"{name}/{path.name}", "split": "test",
                           "sentences": [{"raw": c, "sentid": sentid + i} for i, c in enumerate(caps)]})
            for i, c in enumerate(caps):
                sidecar.append({"image": f"{name}/{path.name}", "sentid": sentid + i, "lang": "pt", "text": f"pt {c}"})
            sentid += len(caps)
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": images}), encoding="utf-8")
    translations = tmp_path / "captions.translations.jsonl"
    translations.write_text("".join(json.dumps(r) + "\n" for r in sidecar), encoding="utf-8")
    results = [
        evaluate_data(encoder, captions, ["en", "pt", "zh"], images=small_aid, translations=[translations])
        for encoder in (TorchEncoder(create_model(None, checkpoint=tiny_model.checkpoint)), BundleEncoder(exported_bundle))
    ]
    for result in results:
        assert result["task"] == "retrieval" and result["split"] == "test"
        assert result["per_language"]["en"]["n_images"] == 12 and result["per_language"]["en"]["n_texts"] == 24
        assert result["per_language"]["pt"]["n_texts"] == 24
        assert "skipped" in result["per_language"]["zh"]
        assert result["per_language"]["en"]["i2t_R@10"] >= result["per_language"]["en"]["i2t_R@1"]
    # 12 images: R@10 of a random model is high but the two runtimes must agree closely
    assert results[0]["mean_recall"] == pytest.approx(results[1]["mean_recall"], abs=100 / 24 + 1e-9)


def test_cli_errors_are_one_line(tmp_path, small_aid):
    (tmp_path / "not_a_bundle").mkdir()
    for model, message in [(tmp_path / "not_a_bundle", "without bundle.json"), (tmp_path / "nope.pt", "does not exist")]:
        result = subprocess.run(
            [sys.executable, "-m", "training.evaluate", "--model", str(model), "--data", str(small_aid),
             "-o", str(tmp_path / "out.json")], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rsmclip-geo: error: --model") and message in lines[0]
    assert not (tmp_path / "out.json").exists()


def test_precision_at_k_hand_made():
    scores = np.array([
        [0.9, 0.8, 0.7, 0.6, 0.5],
        [0.9, 0.8, 0.7, 0.6, 0.5],
        [0.5, 0.5, 0.5, 0.1, 0.0],  # a three-way tie at the top
    ])
    relevant = np.array([
        [1, 0, 1, 1, 0],
        [1, 0, 1, 1, 0],
        [1, 1, 0, 0, 0],
    ], dtype=bool)
    left_out = np.zeros_like(relevant)
    left_out[1, 1] = True  # query 1 drops its second-best item: its top 3 are then all relevant
    assert precision_at_k(scores, relevant, 3).tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3])
    assert precision_at_k(scores, relevant, 3, left_out).tolist() == pytest.approx([2 / 3, 1.0, 2 / 3])
    # ties rank the irrelevant item first: in query 2's tie the one irrelevant item takes the top place
    assert precision_at_k(scores, relevant, 1).tolist() == pytest.approx([1.0, 1.0, 0.0])
    # k beyond the pool counts the missing places as misses
    assert precision_at_k(scores, relevant, 10).tolist() == pytest.approx([0.3, 0.3, 0.2])
    with pytest.raises(ValueError):
        precision_at_k(scores, relevant[:2], 3)


def link_classes(root: Path, source: Path, classes: dict[str, int]) -> None:
    """``root/<class>`` with symlinks to the first ``n`` images of ``source/<class>``."""
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for path in sorted((source / name).iterdir())[:n]:
            (root / name / path.name).symlink_to(path.resolve())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, shared_data) -> Path:
    """aid/{Beach,Forest} with 50 images each (10 val each) and ucm/{airplane,beach} with 25 each (5 val each),
    plus ucm/captions.csv: the real captions of those UCM images, and a caption of one image of another class."""
    root = tmp_path_factory.mktemp("data")
    link_classes(root / "aid", shared_data / "aid", {"Beach": 50, "Forest": 50})
    link_classes(root / "ucm", shared_data / "ucm", {"airplane": 25, "beach": 25})
    with open(shared_data / "ucm" / "captions.csv", newline="", encoding="utf-8") as fh:
        rows = [row for row in csv.reader(fh)][1:]
    kept = [row for row in rows if (root / "ucm" / row[0]).exists()]
    (root / "ucm" / "captions.csv").write_text(
        "image,caption\n" + "".join(f"{image},{caption}\n" for image, caption in kept), encoding="utf-8")
    return root


def test_caption_csv_retrieval_on_the_captioned_val_images(tiny_bundle, data_root):
    encoder = BundleEncoder(tiny_bundle)
    root = data_root / "ucm"
    result = evaluate_caption_csv(encoder, root / "captions.csv", root)
    val = [path for path, _ in D.split_class_folder(root)["val"]]
    captions = D.read_caption_csv(root / "captions.csv")
    captioned = [path for path in val if path.relative_to(root).as_posix() in captions]
    assert len(captioned) >= 8 and all(len(captions[p.relative_to(root).as_posix()]) == 5 for p in captioned)
    assert result["task"] == "caption_retrieval" and result["split"] == "val"
    assert (result["n_images"], result["n_captions"]) == (len(captioned), 5 * len(captioned))
    # the same numbers as retrieval_metrics on the encoder's own similarity matrix
    texts = [c for path in captioned for c in captions[path.relative_to(root).as_posix()]]
    owners = [i for i, path in enumerate(captioned) for _ in captions[path.relative_to(root).as_posix()]]
    expected = retrieval_metrics(encoder.encode_image_files(captioned) @ encoder.encode_texts(texts).T, owners)
    assert {k: result[k] for k in expected} == pytest.approx(expected)
    # 10 images: every caption finds its image within the top 10 (an image among 50 captions need not)
    assert len(captioned) == 10 and result["t2i_R@10"] == 100.0
    train = evaluate_caption_csv(encoder, root / "captions.csv", root, split="train")
    assert train["n_images"] == 40 and train["n_captions"] == 200


def test_caption_csv_refusals(tiny_bundle, data_root, tmp_path):
    encoder = BundleEncoder(tiny_bundle)
    root = data_root / "ucm"
    stray = tmp_path / "stray.csv"
    stray.write_text("image,caption\nairplane/airplane00.jpg,a plane .\nharbor/harbor00.jpg,boats .\n", encoding="utf-8")
    with pytest.raises(RsmclipError, match=r"names 1 images that are not in .*harbor/harbor00.jpg"):
        evaluate_caption_csv(encoder, stray, root)
    headless = tmp_path / "headless.csv"
    headless.write_text("airplane/airplane00.jpg,a plane .\n", encoding="utf-8")
    with pytest.raises(RsmclipError, match="image,caption header"):
        evaluate_caption_csv(encoder, headless, root)
    none_val = tmp_path / "train_only.csv"
    none_val.write_text("image,caption\nairplane/airplane00.jpg,a plane .\n", encoding="utf-8")
    with pytest.raises(RsmclipError, match="has no caption of a val image"):
        evaluate_caption_csv(encoder, none_val, root)


def write_free_text(path: Path, descriptions: dict[str, dict]) -> Path:
    path.write_text(yaml.safe_dump({"languages": ["en", "zh"], "descriptions": descriptions}, allow_unicode=True),
                    encoding="utf-8")
    return path


FREE_TEXT = {
    "sand_and_sea": {"relevant": ["aid/Beach", "ucm/beach"], "en": "waves on sand by the sea",
                     "zh": "海边沙滩上的海浪"},
    "trees_only": {"relevant": ["aid/Forest"], "ambiguous": ["aid/Beach", "ucm/airplane", "ucm/beach"],
                   "en": "tree crowns close together", "zh": "紧挨在一起的树冠"},
    "anything": {"relevant": ["aid/Beach", "aid/Forest", "ucm/airplane", "ucm/beach"],
                 "en": "a tile seen from above", "zh": "从上方看到的图块"},
}


def test_free_text_precision_at_10(tiny_bundle, data_root, tmp_path):
    encoder = CachingEncoder(BundleEncoder(tiny_bundle))
    result = evaluate_free_text(encoder, write_free_text(tmp_path / "free.yaml", FREE_TEXT), data_root, ["en", "zh"])
    assert result["pool"] == {"aid": 20, "ucm": 10} and len(encoder.images) == 30  # each pool image encoded once
    described = result["per_description"]
    assert {k: (v["n_relevant"], v["n_left_out"]) for k, v in described.items()} == {
        "sand_and_sea": (15, 0), "trees_only": (10, 20), "anything": (30, 0)}
    # known answers: every image relevant, or every image but the relevant ones left out
    assert described["anything"]["P@10"] == {"en": 1.0, "zh": 1.0}
    assert described["trees_only"]["P@10"] == {"en": 1.0, "zh": 1.0}
    # sand_and_sea: the encoder's own ranking, counted here
    pool = D.split_class_folder(data_root / "aid")["val"] + D.split_class_folder(data_root / "ucm")["val"]
    image_emb = encoder.encode_image_files([p for p, _ in pool])
    is_sand = np.array([label in ("Beach", "beach") for _, label in pool])
    for lang in ("en", "zh"):
        top = np.argsort(-(image_emb @ encoder.encode_texts([FREE_TEXT["sand_and_sea"][lang]])[0]))[:10]
        assert described["sand_and_sea"]["P@10"][lang] == pytest.approx(is_sand[top].mean())
        assert result["per_language"][lang]["P@10"] == pytest.approx(
            np.mean([v["P@10"][lang] for v in described.values()]))
    assert len(encoder.images) == 30


@pytest.mark.parametrize("description, message", [
    ({"relevant": ["aid/Beach", "aid/Nowhere"]}, "description 'few' names 'aid/Nowhere', which is not a class folder"),
    ({"relevant": ["aid/Beach"], "ambiguous": ["ucm/Airplane"]}, "names 'ucm/Airplane', which is not a class folder"),
    ({"relevant": ["mars/Crater"]}, "has no data set 'mars'"),
])
def test_free_text_refuses_unknown_classes(description, message, tiny_bundle, data_root, tmp_path):
    free = write_free_text(tmp_path / "free.yaml", {**FREE_TEXT, "few": {**description, "en": "x", "zh": "y"}})
    with pytest.raises(RsmclipError, match=message) as info:
        evaluate_free_text(BundleEncoder(tiny_bundle), free, data_root, ["en"])
    assert "\n" not in str(info.value)


def test_free_text_refuses_a_description_with_fewer_than_10_relevant_images(tiny_bundle, data_root, tmp_path):
    few = {"relevant": ["ucm/beach"], "en": "x", "zh": "y"}
    free = write_free_text(tmp_path / "free.yaml", {**FREE_TEXT, "few": few})
    out = tmp_path / "out.json"
    result = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--model", str(tiny_bundle), "--free-text", str(free),
         "--data-root", str(data_root), "-o", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"rsmclip-geo: error: --free-text: description 'few' has 5 relevant val images under {data_root}, fewer "
        "than 10; list more classes or drop it"]
    assert not out.exists()


def test_suite_encodes_each_image_once_and_writes_one_json(tiny_bundle, data_root, tmp_path):
    suite_path = tmp_path / "suite.yaml"
    suite_path.write_text(yaml.safe_dump({
        "languages": ["en", "zh"], "data_root": str(data_root),
        "zero_shot": {"aid": str(REPO / "training" / "vocab" / "aid_classes.yaml"), "ucm": None},
        "captions": {"ucm": "captions.csv"}, "free_text": str(write_free_text(tmp_path / "free.yaml", FREE_TEXT)),
    }), encoding="utf-8")
    direct = run_suite(BundleEncoder(tiny_bundle), load_suite(suite_path), data_root)
    assert direct["n_images_encoded"] == 30  # 20 AID + 10 UCM val images, used by zero-shot, captions and free text
    assert direct["zero_shot"]["ucm"]["prompt_part"] == "heldout" and direct["zero_shot"]["aid"]["classes"] == [
        "Beach", "Forest"]
    out = tmp_path / "suite.json"
    result = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--model", str(tiny_bundle), "--suite", str(suite_path),
         "-o", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    for part, figures in direct["summary"].items():
        assert report["summary"][part] == pytest.approx(figures)
    assert report["caption_retrieval"]["ucm"]["n_images"] == direct["caption_retrieval"]["ucm"]["n_images"]
    assert set(report["free_text"]["per_language"]) == {"en", "zh"} and report["model"] == str(tiny_bundle)
    assert "aid " in result.stdout and "mean recall" in result.stdout and "zh " in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["free.yaml", "suite.json", "suite.yaml"]


def test_suite_gives_the_same_numbers_for_a_checkpoint_and_its_bundle(tiny_model, exported_bundle, data_root,
                                                                      tmp_path):
    suite_path = tmp_path / "suite.yaml"
    suite_path.write_text(yaml.safe_dump({
        "languages": ["en", "zh"], "zero_shot": {"aid": str(REPO / "training" / "vocab" / "aid_classes.yaml")},
        "captions": {"ucm": "captions.csv"}, "free_text": str(write_free_text(tmp_path / "free.yaml", FREE_TEXT)),
    }), encoding="utf-8")
    suite = load_suite(suite_path)
    a = run_suite(TorchEncoder(create_model(None, checkpoint=tiny_model.checkpoint)), suite, data_root)
    b = run_suite(BundleEncoder(exported_bundle), suite, data_root)
    assert a["n_images_encoded"] == b["n_images_encoded"] == 30
    # one of 20 zero-shot predictions, one of 10 tiles of one description may flip on a near tie
    for name, top1 in a["summary"]["zero_shot_mean_top1"].items():
        assert abs(top1 - b["summary"]["zero_shot_mean_top1"][name]) <= 100 / 20 + 1e-9
    for lang, value in a["summary"]["free_text_P@10"].items():
        assert abs(value - b["summary"]["free_text_P@10"][lang]) <= 0.1 / 3 + 1e-9
    assert a["caption_retrieval"]["ucm"]["n_captions"] == b["caption_retrieval"]["ucm"]["n_captions"] == 50
    # one caption ranked on the other side of a near tie moves one of the six recalls by 100 / 50
    recall_a, recall_b = a["summary"]["caption_mean_recall"]["ucm"], b["summary"]["caption_mean_recall"]["ucm"]
    assert abs(recall_a - recall_b) <= 100 / 50 / 6 + 1e-9
