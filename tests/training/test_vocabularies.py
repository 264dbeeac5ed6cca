"""The class vocabularies of the four data sets the multilingual default model trains on (training/vocab/):
every class folder named in the 10 languages, and held-out wording that no training caption uses."""

from __future__ import annotations

from pathlib import Path

import csv

import pytest
import yaml

from training import data as D

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB_DIR = REPO_ROOT / "training" / "vocab"
DATASETS = ["aid", "eurosat", "resisc12", "ucm"]
LANGUAGES = ["en", "pt", "es", "fr", "de", "nl", "it", "zh", "ko", "ru"]
TEMPLATE_PUNCTUATION = " :：,，'\""
#: AID's unseen names predate the UCM captions the default model also trains on; this one occurs in them
UCM_CAPTION_EXCEPTIONS = {("aid", "Parking", "parking spaces")}


def vocabulary_path(dataset: str) -> Path:
    return VOCAB_DIR / f"{dataset}_classes.yaml"


def raw_vocabulary(dataset: str) -> dict:
    return yaml.safe_load(vocabulary_path(dataset).read_text(encoding="utf-8"))


def training_captions(lang: str) -> list[str]:
    """Every training caption (template x name) of one language over the four vocabularies, lower-cased."""
    captions = []
    for dataset in DATASETS:
        vocab = D.load_vocabulary(vocabulary_path(dataset))
        captions += [p.lower() for c in vocab.entries for p in vocab.prompts(c, lang, "train")]
    return captions


def ucm_captions(shared_data: Path) -> list[str]:
    """The real English UCM-Captions, lower-cased (the default model trains on them too)."""
    with (shared_data / "ucm" / "captions.csv").open(encoding="utf-8", newline="") as f:
        return [row["caption"].lower() for row in csv.DictReader(f)]


def template_text(template: str) -> list[str]:
    """The literal pieces of a template around "{}", without surrounding spaces and punctuation."""
    return [piece.strip(TEMPLATE_PUNCTUATION) for piece in template.split("{}") if piece.strip(TEMPLATE_PUNCTUATION)]


@pytest.mark.parametrize("dataset", DATASETS)
def test_vocabulary_names_every_class_folder_in_every_language(shared_data: Path, dataset: str) -> None:
    vocab = D.load_vocabulary(vocabulary_path(dataset))
    raw = raw_vocabulary(dataset)
    assert vocab.languages == LANGUAGES
    assert sorted(vocab.entries) == D.list_class_folders(shared_data / dataset)
    for lang in LANGUAGES:
        assert len(raw["templates"][lang]["train"]) >= 5 and len(raw["templates"][lang]["heldout"]) >= 3, lang
    for class_name, per_lang in raw["classes"].items():
        assert sorted(per_lang) == sorted(LANGUAGES), class_name
        for lang, parts in per_lang.items():
            assert 2 <= len(parts["train"]) <= 4 and 1 <= len(parts["heldout"]) <= 3, (class_name, lang)
            assert not set(parts["heldout"]) & set(parts["train"]), (class_name, lang)
            for part in ("train", "heldout"):
                assert vocab.prompts(class_name, lang, part), (class_name, lang, part)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_heldout_names_and_templates_never_occur_in_any_training_caption_of_their_language(
        shared_data: Path, lang: str) -> None:
    """Held-out (and AID's unseen) wording must be new to the model: no training caption of the four
    vocabularies in that language (nor, in English, a UCM caption) contains a held-out name or a held-out
    template's text."""
    captions = training_captions(lang)
    real_captions = ucm_captions(shared_data) if lang == "en" else []
    for dataset in DATASETS:
        raw = raw_vocabulary(dataset)
        for class_name, per_lang in raw["classes"].items():
            for part in ("heldout", "unseen"):
                for name in per_lang[lang].get(part, []):
                    seen = [caption for caption in captions if name.lower() in caption]
                    if (dataset, class_name, name) not in UCM_CAPTION_EXCEPTIONS:
                        seen += [caption for caption in real_captions if name.lower() in caption]
                    assert not seen, f"{dataset} {part} {lang} name {name!r} of {class_name} is in training caption {seen[0]!r}"
        for template in raw["templates"][lang]["heldout"]:
            for piece in template_text(template):
                seen = [caption for caption in captions + real_captions if piece.lower() in caption]
                assert not seen, f"{dataset} held-out {lang} template {template!r} is in training caption {seen[0]!r}"
