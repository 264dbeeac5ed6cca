"""Hostile inputs of `search`, `tile-search`, `similar`, `classify` and `models --verify`, each through the CLI:
the exit code, the one-line message or warning, and that no partial output is left."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sqlite3
from pathlib import Path

import pytest
import shapely
from cli_cases import assert_fails_cleanly, leftovers, run_cli

from rsmclip_geo.tile_index import TileIndex

COLORADO = "colorado_rgb_15cm.tif"
FARM = "pix4d_farm_rgba_35cm.tif"


@pytest.fixture(scope="module")
def work(shared_data, tiny_bundle, tmp_path_factory) -> dict[str, Path]:
    """A copy of a real scene, a one-scene index over it (a shard directory) and a two-scene index file."""
    from rsmclip_geo.cli import main

    root = tmp_path_factory.mktemp("hostile_search")
    scene = Path(shutil.copy(shared_data / "geotiff" / COLORADO, root / "scene.tif"))
    options = ["--model", str(tiny_bundle), "--tile-size", "64", "-q"]
    assert main(["index", str(scene), "-o", str(root / "tiles"), *options]) == 0
    assert main(["index", str(scene), str(shared_data / "geotiff" / FARM), "-o", str(root / "two.parquet"),
                 *options]) == 0
    return {"scene": scene, "tiles": root / "tiles", "two": root / "two.parquet"}


def warnings_about(caplog, fragment: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and fragment in r.getMessage()]


def features(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["features"]


# models --verify ------------------------------------------------------------------------------------

def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def corrupt_with_matching_digest(bundle: Path) -> None:
    (bundle / "image.onnx").write_bytes(b"\x08\x07garbage, not a model")
    info = json.loads((bundle / "bundle.json").read_text())
    edit_json(bundle / "bundle.json", files={**info["files"], "image.onnx": sha256(bundle / "image.onnx")})


BREAKAGES = {
    "corrupt image.onnx": (lambda b: (b / "image.onnx").write_bytes(b"\x00garbage"),
                           "image.onnx: sha256 differs from bundle.json"),
    "missing image.onnx": (lambda b: (b / "image.onnx").unlink(), "image.onnx: missing from the bundle"),
    "altered tokenizer.json": (lambda b: (b / "tokenizer.json").write_text((b / "tokenizer.json").read_text() + " "),
                               "tokenizer.json: sha256 differs"),
    "corrupt image.onnx, digest updated": (corrupt_with_matching_digest, "image.onnx: cannot be loaded by ONNX Runtime"),
    "wrong embedding size": (lambda b: edit_json(b / "bundle.json", embed_dim=64), "embed_dim is 64"),
    "bundle.json not JSON": (lambda b: (b / "bundle.json").write_text("{ not json"), "bundle.json: not valid JSON"),
    "bundle.json field of the wrong type": (lambda b: edit_json(b / "bundle.json", image_size="64"),
                                            "field 'image_size' has the wrong type"),
}


@pytest.fixture
def models_dir(tiny_bundle, tmp_path, monkeypatch) -> Path:
    """A models folder holding the tiny bundle, the only one `models` finds."""
    models = tmp_path / "models"
    shutil.copytree(tiny_bundle, models / "tiny-bundle")
    monkeypatch.setenv("RSMCLIP_GEO_MODELS", str(models))
    monkeypatch.setattr("rsmclip_geo.bundle.PACKAGE_MODELS_DIR", tmp_path / "no-package-models")
    monkeypatch.setattr("rsmclip_geo.bundle.USER_MODELS_DIR", tmp_path / "no-user-models")
    return models


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_models_verify_names_the_broken_bundle(case, models_dir, tiny_bundle, tmp_path, capsys):
    breakage, fragment = BREAKAGES[case]
    breakage(shutil.copytree(tiny_bundle, models_dir / "broken"))
    listing = tmp_path / "models.txt"
    line = assert_fails_cleanly(run_cli(capsys, "models", "--verify", "-o", listing),
                                "--verify: 1 of 2 bundles do not verify: broken (", fragment)
    assert "tiny-bundle" not in line
    text = listing.read_text()
    assert "broken  BROKEN: " in text and "tiny-bundle  v0.0.1" in text  # the whole list, then the failure
    assert leftovers(tmp_path, "models.txt") == ["models.txt"]


def test_models_verify_passes_when_every_bundle_verifies(models_dir, capsys):
    result = run_cli(capsys, "models", "--verify", "--json")
    assert result.code == 0 and result.err == ""
    assert [json.loads(line)["name"] for line in result.out.splitlines()] == ["tiny-bundle"]


# --aoi that misses the index -----------------------------------------------------------------------

def index_bounds(index: Path) -> tuple[float, float, float, float]:
    return tuple(shapely.total_bounds(TileIndex.open(index).geometries()))


def test_aoi_missing_the_index_warns_once(work, tiny_bundle, tmp_path, capsys, caplog):
    out = tmp_path / "hits.geojson"
    result = run_cli(capsys, "search", work["tiles"], "forest", "--model", tiny_bundle, "--aoi", "10,10,11,11",
                     "-o", out)
    assert result.code == 0 and features(out) == []
    [warning] = warnings_about(caplog, "aoi=")
    west, south, east, north = index_bounds(work["tiles"])
    assert warning.startswith(f"aoi=10,10,11,11 covers no tile of {work['tiles']} (index bounds lon,lat ")
    assert f"{west:.6f},{south:.6f},{east:.6f},{north:.6f}" in warning and "lat,lon" not in warning


def test_aoi_with_swapped_lat_lon_says_so(work, tiny_bundle, tmp_path, capsys, caplog):
    west, south, east, north = index_bounds(work["two"])
    swapped = f"{south - 0.01},{west - 0.01},{north + 0.01},{east + 0.01}"  # lat,lon order
    for command in (["search", work["two"], "forest", "--model", tiny_bundle],
                    ["similar", work["two"], "--tile", TileIndex.open(work["two"]).column("tile_id")[0]]):
        caplog.clear()
        out = tmp_path / "hits.geojson"
        assert run_cli(capsys, *command, "--aoi", swapped, "-o", out).code == 0
        assert features(out) == []
        [warning] = warnings_about(caplog, "aoi=")
        assert warning.startswith(f"aoi={swapped} covers no tile") and "it looks like lat,lon order" in warning


# --queries-file with a byte order mark --------------------------------------------------------------

def test_queries_file_with_a_byte_order_mark(work, tiny_bundle, tmp_path, capsys):
    queries = tmp_path / "queries.txt"
    queries.write_text("\ufeff# saved by Notepad\nstorage tanks\n\n  # indented comment\nplage\n", encoding="utf-8")
    out = tmp_path / "hits.geojson"
    result = run_cli(capsys, "search", work["tiles"], "--queries-file", queries, "--model", tiny_bundle,
                     "--top-k", "1", "-o", out)
    assert result.code == 0
    assert [f["properties"]["query"] for f in features(out)] == ["storage tanks", "plage"]


# a damaged query cache -------------------------------------------------------------------------------

def damage_garbage(path: Path) -> None:
    path.write_bytes(b"this is not an SQLite file\x00\xff" * 300)


def damage_schema(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE query (text TEXT, embedding BLOB)")
    db.close()


@pytest.mark.parametrize("damage", [damage_garbage, damage_schema], ids=["garbage bytes", "another schema"])
def test_damaged_query_cache_is_rebuilt_once(damage, work, tiny_bundle, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setenv("RSMCLIP_GEO_CACHE", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "query-embeddings.sqlite"
    cache.parent.mkdir()
    damage(cache)
    for expected in (1, 0):
        caplog.clear()
        result = run_cli(capsys, "search", work["tiles"], "beach", "--model", tiny_bundle, "-o", tmp_path / "h.geojson")
        assert result.code == 0
        warnings = warnings_about(caplog, "query cache")
        assert len(warnings) == expected, warnings
        assert all("is corrupt" in w and w.endswith("rebuilding it") for w in warnings)
    with sqlite3.connect(cache) as db:
        assert db.execute("SELECT text FROM query").fetchall() == [("beach",)]
    db.close()


# --heatmap problems are found before anything is written -------------------------------------------

HEATMAP_CASES = {
    "several scenes, no --scene": (lambda w, t: ["search", w["two"], "beach", "--heatmap", t / "heat.tif"],
                                   ["--scene: ", "two.parquet holds 2 scenes", "pick the heatmap's scene"]),
    "--scene not in the index": (lambda w, t: ["search", w["two"], "beach", "--heatmap", t / "heat.tif",
                                               "--scene", "nope.tif"], ["--scene nope.tif: not a scene of"]),
    "--scene without --heatmap": (lambda w, t: ["search", w["two"], "beach", "--scene", "scene.tif"],
                                  ["--scene scene.tif: picks the scene of a heatmap; ask for a heatmap too"]),
    "bad extension": (lambda w, t: ["search", w["tiles"], "beach", "--heatmap", t / "heat.png"],
                      ["--heatmap ", "heat.png: unknown output format; use one of .tif, .tiff"]),
    "missing directory": (lambda w, t: ["search", w["tiles"], "beach", "--heatmap", t / "no" / "heat.tif"],
                          ["--heatmap ", "does not exist"]),
    "a directory": (lambda w, t: ["search", w["tiles"], "beach", "--heatmap", t / "made.tif"],
                    ["--heatmap ", "made.tif: is a directory"]),
    "a scene of the index": (lambda w, t: ["search", w["tiles"], "beach", "--heatmap", w["scene"]],
                             ["--heatmap ", "scene.tif: is a scene of", "would be overwritten"]),
    "the scene of tile-search": (lambda w, t: ["tile-search", w["scene"], "beach", "--heatmap", w["scene"],
                                               "--cache-dir", t / "cache", "--tile-size", "64"],
                                 ["--heatmap ", "would overwrite or write into an input"]),
}


@pytest.mark.parametrize("case", list(HEATMAP_CASES))
def test_heatmap_problems_leave_nothing_written(case, work, tiny_bundle, tmp_path, capsys):
    make_args, fragments = HEATMAP_CASES[case]
    (tmp_path / "made.tif").mkdir()
    scene_before = work["scene"].read_bytes()
    result = run_cli(capsys, *make_args(work, tmp_path), "--model", tiny_bundle, "-o", tmp_path / "hits.geojson")
    assert_fails_cleanly(result, *fragments)
    assert leftovers(tmp_path, "hits.geojson") == [] and leftovers(tmp_path, "heat.tif") == []
    assert not list((tmp_path / "made.tif").iterdir())
    assert work["scene"].read_bytes() == scene_before
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.parquet"))


@pytest.mark.parametrize("target", ["index file", "inside the index directory"])
def test_hits_file_never_replaces_the_index(target, work, tiny_bundle, capsys):
    index = work["two"] if target == "index file" else work["tiles"]
    out = index if target == "index file" else index / "hits.parquet"
    before = {p.name: p.read_bytes() for p in ([index] if index.is_file() else index.iterdir())}
    for command in (["search", index, "beach", "--model", tiny_bundle],
                    ["similar", index, "--tile", TileIndex.open(index).column("tile_id")[0]]):
        assert_fails_cleanly(run_cli(capsys, *command, "-o", out), f"-o {out}: would overwrite or write into an input")
    assert {p.name: p.read_bytes() for p in ([index] if index.is_file() else index.iterdir())} == before


# classify labels outside the model's vocabulary ------------------------------------------------------

def test_classify_warns_about_labels_outside_the_vocabulary(shared_data, tmp_path, capsys, caplog):
    images = sorted((shared_data / "figs").glob("*.jpg"))
    out = tmp_path / "labels.jsonl"
    result = run_cli(capsys, "classify", *images, "--labels", "airport", "储油罐", "xyzzy plugh", "--json", "-o", out,
                     "--model", "rsmclip-demo-aid")
    assert result.code == 0 and len(out.read_text().splitlines()) == len(images)
    [warning] = warnings_about(caplog, "no term")
    assert warning.startswith("label 'xyzzy plugh' contains no term model 'rsmclip-demo-aid' was trained on")
