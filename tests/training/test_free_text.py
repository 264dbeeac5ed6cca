"""The free-text retrieval descriptions (training/vocab/free_text.yaml): one set of meanings in the 10 languages,
relevant classes that exist, and no description that names one of its relevant classes."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import yaml

from rsmclip_geo.errors import RsmclipError
from training import data as D
from training.free_text import FREE_TEXT_PATH, load_free_text

REPO_ROOT = Path(__file__).resolve().parents[2]
LANGUAGES = ["en", "pt", "es", "fr", "de", "nl", "it", "zh", "ko", "ru"]
DATASETS = ["aid", "eurosat", "resisc12", "ucm"]


@cache
def vocabulary(dataset: str) -> D.Vocabulary:
    return D.load_vocabulary(REPO_ROOT / "training" / "vocab" / f"{dataset}_classes.yaml")


def class_names(dataset: str, class_name: str, lang: str) -> list[str]:
    """The train and held-out names of one class in one language."""
    vocab = vocabulary(dataset)
    per_lang = vocab.entries[class_name][lang]
    return per_lang["train"][0] + per_lang["heldout"][0]


def test_every_language_has_every_description_and_enough_of_them() -> None:
    free_text = load_free_text()
    assert free_text.languages == LANGUAGES
    assert len(free_text.queries) >= 24
    assert len({q.id for q in free_text.queries}) == len(free_text.queries)
    for query in free_text.queries:
        assert sorted(query.texts) == sorted(LANGUAGES), query.id
        assert len(set(query.texts.values())) == len(LANGUAGES), f"{query.id}: two languages share a text"


def test_relevant_and_ambiguous_classes_are_class_folders_and_cover_the_four_data_sets(shared_data: Path) -> None:
    free_text = load_free_text()
    folders = {dataset: set(D.list_class_folders(shared_data / dataset)) for dataset in DATASETS}
    covered = set()
    for query in free_text.queries:
        assert not set(query.relevant) & set(query.ambiguous), query.id
        for key in query.relevant + query.ambiguous:
            dataset, class_name = key.split("/")
            assert class_name in folders.get(dataset, set()), f"{query.id}: {key} is no class folder"
        covered.update(query.relevant)
    assert {key.split("/")[0] for key in covered} == set(DATASETS)
    assert len(covered) >= 40


@pytest.mark.parametrize("lang", LANGUAGES)
def test_no_description_contains_a_name_of_its_relevant_classes(lang: str) -> None:
    free_text = load_free_text()
    allowed = {(e.id, e.lang, e.name) for e in free_text.name_exceptions}
    for query in free_text.queries:
        text = query.texts[lang].lower()
        for key in query.relevant:
            dataset, class_name = key.split("/")
            for name in class_names(dataset, class_name, lang):
                if (query.id, lang, name) not in allowed:
                    assert name.lower() not in text, f"{query.id} ({lang}) {query.texts[lang]!r} names {key}: {name!r}"


def test_a_description_without_a_language_is_refused(tmp_path: Path) -> None:
    raw = yaml.safe_load(FREE_TEXT_PATH.read_text(encoding="utf-8"))
    del raw["descriptions"]["jets_at_terminal"]["ko"]
    path = tmp_path / "free_text.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    with pytest.raises(RsmclipError, match=r"descriptions.jets_at_terminal has no text in ko"):
        load_free_text(path)
