"""Relevance feedback through the CLI: `search` and `similar` with --positive / --negative, a labels file
kept between runs (a GeoJSON layer), --undo, and one-line errors for judgements that make no sense."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_cases import assert_fails_cleanly, leftovers, run_cli

from rsmclip_geo.api import Labels, SearchParams, open_index, search


@pytest.fixture(scope="module")
def index_path(shared_data, tiny_bundle, tmp_path_factory) -> Path:
    from rsmclip_geo.cli import main

    root = tmp_path_factory.mktemp("feedback")
    scene = Path(shutil.copy(shared_data / "geotiff" / "colorado_rgb_15cm.tif", root / "scene.tif"))
    assert main(["index", str(scene), "-o", str(root / "tiles.parquet"), "--model", str(tiny_bundle),
                 "--tile-size", "64", "-q"]) == 0
    return root / "tiles.parquet"


def hit_ids(path: Path) -> list[str]:
    return [f["properties"]["tile_id"] for f in json.loads(path.read_text())["features"]]


def test_marked_tiles_steer_the_next_search_and_are_kept(capsys, index_path, tiny_bundle, tmp_path):
    first = tmp_path / "first.geojson"
    assert run_cli(capsys, "search", index_path, "trees", "--top-k", "8", "--nms", "1", "-o", first,
                   "--model", tiny_bundle).code == 0
    ids = hit_ids(first)
    labels_file = tmp_path / "labels.geojson"
    again = tmp_path / "again.geojson"
    result = run_cli(capsys, "search", index_path, "trees", "--top-k", "8", "--nms", "1", "-o", again,
                     "--positive", ids[0], ids[1], "--negative", ids[2], "--labels-file", labels_file,
                     "--model", tiny_bundle)
    assert result.code == 0, result.err
    assert not set(hit_ids(again)) & set(ids[:3])  # judged tiles are not ranked again
    index = open_index(index_path, in_memory=True)
    expected = search(index, "trees", model=tiny_bundle, params=SearchParams(top_k=8, nms_overlap=1.0,
                                                          labels=Labels.from_ids(index, ids[:2], ids[2:3])))
    assert hit_ids(again) == [h.tile_id for h in expected.hits]
    layer = json.loads(labels_file.read_text())
    assert [(f["properties"]["tile_id"], f["properties"]["label"]) for f in layer["features"]] == [
        (ids[0], "positive"), (ids[1], "positive"), (ids[2], "negative")]
    # a later run picks the work up: one judgement taken back, one added, the file updated
    result = run_cli(capsys, "search", index_path, "trees", "--labels-file", labels_file, "--undo", ids[1],
                     "--negative", ids[3], "-o", tmp_path / "third.geojson", "--model", tiny_bundle)
    assert result.code == 0, result.err
    kept = [(f["properties"]["tile_id"], f["properties"]["label"])
            for f in json.loads(labels_file.read_text())["features"]]
    assert kept == [(ids[0], "positive"), (ids[2], "negative"), (ids[3], "negative")]
    assert not set(hit_ids(tmp_path / "third.geojson")) & {ids[0], ids[2], ids[3]}


def test_similar_takes_judgements_too(capsys, index_path, tiny_bundle, tmp_path):
    index = open_index(index_path, in_memory=True)
    example, right = index.column("tile_id")[4], index.column("tile_id")[9]
    out = tmp_path / "similar.geojson"
    result = run_cli(capsys, "similar", index_path, "--tile", example, "--positive", right, "--nms", "1", "-o", out,
                     "--model", tiny_bundle)
    assert result.code == 0, result.err
    assert example not in hit_ids(out) and right not in hit_ids(out)


@pytest.mark.parametrize("args, fragment", [
    (["--positive", "T", "--negative", "T"], "--negative T: also marked positive; mark each tile once"),
    (["--positive", "nope"], "no tile with id 'nope'"),
    (["--undo", "nope"], "--undo nope: no judgement of that tile to take back"),
    (["--positive", "FIRST", "--feedback-method", "svm"], "--feedback-method svm: choose one of linear, rocchio"),
    (["--labels-file", "LABELS.txt"], "--labels-file"),
])
def test_bad_judgements_fail_in_one_line(capsys, index_path, tiny_bundle, tmp_path, args, fragment):
    first = open_index(index_path, in_memory=True).column("tile_id")[0]
    args = [a.replace("FIRST", first).replace("LABELS", str(tmp_path / "labels")) for a in args]
    if args[:2] == ["--positive", "T"]:
        args = ["--positive", first, "--negative", first]
        fragment = f"--negative {first}: also marked positive"
    out = tmp_path / "hits.geojson"
    assert_fails_cleanly(run_cli(capsys, "search", index_path, "trees", "-o", out, "--model", tiny_bundle, *args),
                         fragment)
    assert leftovers(tmp_path, "hits.geojson") == []


def test_a_damaged_labels_file_is_named(capsys, index_path, tiny_bundle, tmp_path):
    labels_file = tmp_path / "labels.geojson"
    labels_file.write_text("{not json")
    result = run_cli(capsys, "search", index_path, "trees", "--labels-file", labels_file, "-o", tmp_path / "h.geojson",
                     "--model", tiny_bundle)
    assert_fails_cleanly(result, f"--labels-file {labels_file}: not a labels file")
    assert labels_file.read_text() == "{not json"  # left as it was
