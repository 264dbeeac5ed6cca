"""The shipped default model rsmclip-e5-lite0 at run time: the bundle as packaged, and free multilingual text
on the demo scene (30 AID validation images the model never trained on, one class per 150 px cell)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from cli_cases import run_cli

from rsmclip_geo import api
from rsmclip_geo.bundle import DEFAULT_MODEL, load_bundle

REPO_ROOT = Path(__file__).resolve().parents[2]
MOSAIC = REPO_ROOT / "rsmclip_geo" / "data" / "demo_aid_mosaic.tif"
CELLS_CSV = REPO_ROOT / "rsmclip_geo" / "data" / "demo_aid_mosaic_cells.csv"
FREE_TEXT = REPO_ROOT / "training" / "vocab" / "free_text.yaml"
CELL = 150
LANGUAGES = ["en", "pt", "es", "fr", "de", "nl", "it", "zh", "ko", "ru"]
MAX_BUNDLE_BYTES = 90 * 10**6  # so that a wheel with the default model stays under package-index limits

# (query, class of the mosaic cell it must rank within the first `rank` cells): class names and descriptions
ANALYST_QUERIES = [
    ("aeroporto", "Airport", 1),
    ("공항", "Airport", 1),
    ("storage tanks", "StorageTanks", 1),
    ("储油罐", "StorageTanks", 1),
    ("стадион", "Stadium", 1),
    ("navios atracados no cais", "Port", 1),
    ("ships docked at the quay", "Port", 1),
    ("圆形油罐", "StorageTanks", 1),
    ("viele Autos in Reihen geparkt", "Parking", 1),
    ("aviões estacionados perto do terminal", "Airport", 3),
]


@pytest.fixture(scope="module")
def cells(default_model) -> tuple[list[str], np.ndarray]:
    """The mosaic's classes in row-major cell order and the default model's embedding of each cell."""
    with open(CELLS_CSV, newline="", encoding="utf-8") as handle:
        where = {row["class"]: (int(row["col"]), int(row["row"])) for row in csv.DictReader(handle)}
    classes = sorted(where, key=lambda name: (where[name][1], where[name][0]))
    with rasterio.open(MOSAIC) as src:
        pixels = src.read().transpose(1, 2, 0)
    tiles = np.stack([pixels[where[c][1] * CELL:(where[c][1] + 1) * CELL, where[c][0] * CELL:(where[c][0] + 1) * CELL]
                      for c in classes])
    return classes, default_model.encode_images(tiles)


def test_default_model_is_the_shipped_int8_free_text_bundle() -> None:
    bundle = load_bundle(None)
    assert bundle.info.name == DEFAULT_MODEL == "rsmclip-e5-lite0"
    bundle.verify()  # every file listed in bundle.json has its recorded sha256
    info = bundle.info
    assert info.precision == "int8" and list(info.languages) == LANGUAGES and info.vocabulary is None
    assert "weight-only" in info.raw["quantization"]["text"]
    assert info.raw["parity"]["text_min_cosine"] >= 0.99 and info.raw["parity"]["image_min_cosine"] >= 0.99
    assert info.default_tile_size == CELL and info.input_gsd_m == (0.4, 60.0)
    assert (bundle.path / "MODEL_CARD.md").is_file()
    size = sum(path.stat().st_size for path in bundle.path.iterdir())
    assert size <= MAX_BUNDLE_BYTES, f"the default bundle is {size:,} bytes"


@pytest.mark.parametrize("query,class_name,rank", ANALYST_QUERIES)
def test_analyst_queries_find_their_cell(query: str, class_name: str, rank: int, default_model, tmp_path: Path) -> None:
    result = api.tile_search(MOSAIC, query, model=default_model, params=api.SearchParams(top_k=rank),
                             cache_dir=tmp_path / "cache")
    assert len(result.index) == 30  # default tile size 150 px: one tile per cell
    with open(CELLS_CSV, newline="", encoding="utf-8") as handle:
        where = {row["class"]: (int(row["col"]), int(row["row"])) for row in csv.DictReader(handle)}
    found = [(hit.win_col // CELL, hit.win_row // CELL) for hit in result.hits]
    assert where[class_name] in found, (query, found)


def test_free_text_descriptions_find_their_cells_in_every_language(default_model, cells) -> None:
    """training/vocab/free_text.yaml's descriptions of AID classes (no class names in them, none used in training):
    in every language, at least half of them rank a cell of theirs among the first three of the 30 (60-84 % when
    written; rsmclip-demo-aid, which knows class names only: 16-36 %)."""
    classes, image_emb = cells
    descriptions = yaml.safe_load(FREE_TEXT.read_text(encoding="utf-8"))["descriptions"]
    relevant = {key: [classes.index(c.split("/")[1]) for c in d["relevant"] if c.startswith("aid/")]
                for key, d in descriptions.items()}
    relevant = {key: cells_of for key, cells_of in relevant.items() if cells_of}
    assert len(relevant) >= 20
    for lang in LANGUAGES:
        scores = default_model.encode_texts([descriptions[key][lang] for key in relevant]) @ image_emb.T
        top3 = np.argsort(-scores, axis=1)[:, :3]
        hit = [bool(set(top3[i]) & set(cells_of)) for i, cells_of in enumerate(relevant.values())]
        assert np.mean(hit) >= 0.5, f"{lang}: {np.mean(hit):.0%} of {len(hit)} descriptions"


def test_warns_only_about_labels_it_has_no_tokens_for(shared_data, tmp_path, capsys, caplog) -> None:
    """A free-text model has no term vocabulary: any wording in its languages is fine, a label in a script its
    pruned tokenizer does not cover is not."""
    images = sorted((shared_data / "figs").glob("*.jpg"))[:2]
    with caplog.at_level(logging.WARNING):
        result = run_cli(capsys, "classify", *images, "--labels", "airport", "储油罐", "xyzzy plugh", "ᚠᚢᚦᚨᚱᚲ",
                         "--json", "-o", tmp_path / "labels.jsonl")
    assert result.code == 0, result.err
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "no tokens" in r.getMessage()]
    assert warned == ["label 'ᚠᚢᚦᚨᚱᚲ' is mostly characters model 'rsmclip-e5-lite0' has no tokens for; its "
                      "probability may be unreliable"], warned
