"""Change between dates on real imagery: two georeferenced 3 × 3-cell mosaics of AID validation images (one
tile per cell with the default model) where known cells change class and the others hold the same image.
A query ranks the cells where its class appeared (or disappeared) first, no query ranks the changed cells
first, a shifted grid over the same ground matches by overlap, and what cannot be compared is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from change_scenes import CELL, CHANGED, LOST_TANKS, NEW_TANKS, SHIFT_PX, cell_of, date_scenes
from cli_cases import assert_fails_cleanly, run_cli

from rsmclip_geo.api import (CHANGE_PROPERTIES, RsmclipError, SearchParams, TilingParams, build_index, change,
                             load_model, write_changes)

pytestmark = pytest.mark.usefixtures("package_models_only")


@pytest.fixture(scope="module")
def indexes(shared_data, tmp_path_factory, demo_model, tiny_bundle):
    """Tile indexes by name: before, after (same grid), shifted (after on a grid SHIFT_PX east), far (after
    100 km north), tiny (after with the tiny bundle)."""
    root = tmp_path_factory.mktemp("change")
    scenes = date_scenes(shared_data / "aid", root)
    tiling = TilingParams(tile_size=CELL)
    built = {name: build_index([path], root / f"{name}.parquet", model=demo_model, tiling=tiling).path
             for name, path in scenes.items()}
    built["tiny"] = build_index([scenes["after"]], root / "tiny.parquet", model=load_model(tiny_bundle, threads=2),
                                tiling=tiling).path
    return built


def cell(change_hit) -> tuple[int, int]:
    """(col, row) of the cell under a change's after tile."""
    return cell_of(change_hit.win_col, change_hit.win_row)


def test_same_grid_matches_every_cell(indexes, demo_model):
    result = change(indexes["before"], indexes["after"], model=demo_model, params=SearchParams(top_k=9))
    assert result.matched == 9
    assert [c.iou for c in result.changes] == [1.0] * 9


def test_appeared_ranks_the_cell_that_gained_storage_tanks_first(indexes, demo_model):
    result = change(indexes["before"], indexes["after"], "storage tanks", model=demo_model,
                    params=SearchParams(top_k=3))
    first = result.changes[0]
    assert cell(first) == NEW_TANKS, [(cell(c), round(c.rise, 3)) for c in result.changes]
    assert first.rise == pytest.approx(first.score_after - first.score_before, abs=1e-6)
    assert first.rise > 0 and [c.rank for c in result.changes] == [1, 2, 3]
    assert first.tile_before != first.tile_id and Path(first.scene_before).name == "before.tif"


def test_disappeared_ranks_the_cell_that_lost_storage_tanks_first(indexes, demo_model):
    result = change(indexes["before"], indexes["after"], "storage tanks", model=demo_model,
                    params=SearchParams(top_k=3), direction="disappeared")
    first = result.changes[0]
    assert cell(first) == LOST_TANKS, [(cell(c), round(c.rise, 3)) for c in result.changes]
    assert first.rise == pytest.approx(first.score_before - first.score_after, abs=1e-6)


def test_without_a_query_changed_cells_rank_above_unchanged_ones(indexes, demo_model):
    result = change(indexes["before"], indexes["after"], model=demo_model, params=SearchParams(top_k=9))
    assert result.queries == ["any change"]
    assert {cell(c) for c in result.changes[:3]} == set(CHANGED)
    unchanged = result.changes[3:]
    assert len(unchanged) == 6 and max(c.rise for c in unchanged) < 1e-3 < result.changes[2].rise
    assert all(c.score_before is None and c.score_after is None for c in result.changes)
    kept = change(indexes["before"], indexes["after"], model=demo_model, params=SearchParams(threshold=1e-3))
    assert {cell(c) for c in kept.changes} == set(CHANGED)


def test_aoi_keeps_the_changes_of_its_cells(indexes, demo_model):
    result = change(indexes["before"], indexes["after"], model=demo_model, params=SearchParams(top_k=9))
    lost = next(c for c in result.changes if cell(c) == LOST_TANKS)
    inside = lost.geometry.buffer(-1e-5)  # within the cell, touching no neighbour
    kept = change(indexes["before"], indexes["after"], model=demo_model, params=SearchParams(aoi=inside))
    assert [cell(c) for c in kept.changes] == [LOST_TANKS]


def test_shifted_grid_matches_by_overlap(indexes, demo_model):
    result = change(indexes["before"], indexes["shifted"], "storage tanks", model=demo_model,
                    params=SearchParams(top_k=9))
    assert result.matched == 9
    overlap = (CELL - SHIFT_PX) / (CELL + SHIFT_PX)
    assert all(math.isclose(c.iou, overlap, rel_tol=0.02) for c in result.changes), [c.iou for c in result.changes]
    assert cell(result.changes[0]) == NEW_TANKS, [(cell(c), round(c.rise, 3)) for c in result.changes]
    before_tiles = {cell(c): c.tile_before for c in
                    change(indexes["before"], indexes["after"], model=demo_model, params=SearchParams(top_k=9)).changes}
    assert all(c.tile_before == before_tiles[cell(c)] for c in result.changes)
    distance = change(indexes["before"], indexes["shifted"], model=demo_model, params=SearchParams(top_k=9))
    assert {cell(c) for c in distance.changes[:3]} == set(CHANGED)


def test_indexes_of_another_bundle_are_refused(indexes, demo_model):
    with pytest.raises(RsmclipError, match="same model") as error:
        change(indexes["before"], indexes["tiny"], "storage tanks", model=demo_model)
    assert error.value.param == "after" and str(error.value).startswith(f"after={indexes['tiny']}: ")


def test_indexes_without_overlapping_tiles_are_refused(indexes, demo_model):
    with pytest.raises(RsmclipError, match="no overlapping footprints") as error:
        change(indexes["before"], indexes["far"], model=demo_model)
    assert error.value.param == "after"


@pytest.mark.parametrize("options, param", [
    (dict(direction="sideways"), "direction"),
    (dict(direction="disappeared", queries=None), "direction"),
    (dict(params=SearchParams(threshold=2.5)), "threshold"),
    (dict(params=SearchParams(top_k=0)), "top_k"),
])
def test_bad_parameters_are_named(indexes, demo_model, options, param):
    options = {"queries": "storage tanks", **options}
    with pytest.raises(RsmclipError) as error:
        change(indexes["before"], indexes["after"], model=demo_model, **options)
    assert error.value.param == param and str(error.value).startswith(f"{param}=")


@pytest.mark.parametrize("suffix", [".geojson", ".gpkg", ".parquet"])
def test_cli_writes_the_changes_then_prints_them(indexes, capsys, tmp_path, suffix):
    output = tmp_path / f"changes{suffix}"
    result = run_cli(capsys, "change", indexes["before"], indexes["after"], "storage tanks", "-o", output,
                     "--top-k", "3")
    assert result.code == 0, result.err
    assert f"wrote 3 changes (9 tile pairs matched) to {output}" in result.out
    assert "storage tanks" in result.out.splitlines()[1]
    assert [p.name for p in tmp_path.iterdir()] == [output.name]  # no temporary file left
    if suffix == ".geojson":
        features = json.loads(output.read_text(encoding="utf-8"))["features"]
        properties = [f["properties"] for f in features]
    elif suffix == ".parquet":
        table = pq.read_table(output)
        assert table.column_names == [*CHANGE_PROPERTIES, "geometry"]
        properties = table.drop(["geometry"]).to_pylist()
    else:
        import geopandas

        properties = geopandas.read_file(output, layer="changes").drop(columns="geometry").to_dict("records")
    assert list(properties[0]) == list(CHANGE_PROPERTIES)
    assert (properties[0]["win_col"] // CELL, properties[0]["win_row"] // CELL) == NEW_TANKS
    assert properties[0]["rise"] == pytest.approx(properties[0]["score_after"] - properties[0]["score_before"],
                                                  abs=1e-5)


def test_cli_disappeared_and_default_output_name(indexes, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli(capsys, "change", indexes["before"], indexes["after"], "storage tanks", "--disappeared")
    assert result.code == 0, result.err
    features = json.loads((tmp_path / "after_changes.geojson").read_text(encoding="utf-8"))["features"]
    first = features[0]["properties"]
    assert (first["win_col"] // CELL, first["win_row"] // CELL) == LOST_TANKS


@pytest.mark.parametrize("case, fragments", [
    ("tiny", ["after=", "same model"]),
    ("far", ["after=", "no overlapping footprints"]),
    ("bad suffix", ["-o "]),
    ("input", ["-o ", "input"]),
    ("no query", ["direction=disappeared", "give a query"]),
    ("threshold", ["--threshold 3.0"]),
])
def test_cli_errors_are_one_line_and_write_nothing(indexes, capsys, tmp_path, case, fragments):
    output = tmp_path / "changes.geojson"
    args = {"tiny": [indexes["tiny"], "storage tanks"], "far": [indexes["far"]],
            "bad suffix": [indexes["after"], "storage tanks"], "input": [indexes["after"], "storage tanks"],
            "no query": [indexes["after"], "--disappeared"], "threshold": [indexes["after"], "--threshold", "3"]}[case]
    if case == "bad suffix":
        output = tmp_path / "changes.txt"
    if case == "input":
        output = indexes["after"]
    before_bytes = Path(indexes["after"]).read_bytes()
    result = run_cli(capsys, "change", indexes["before"], *args, "-o", output)
    assert_fails_cleanly(result, *fragments)
    assert result.code == 2
    assert list(tmp_path.iterdir()) == []
    assert Path(indexes["after"]).read_bytes() == before_bytes


def test_a_failed_write_keeps_the_previous_output(indexes, demo_model, tmp_path):
    result = change(indexes["before"], indexes["after"], "storage tanks", model=demo_model)
    output = write_changes(result.changes, tmp_path / "changes.geojson")
    previous = output.read_bytes()
    damaged = [result.changes[0].__class__(**{**result.changes[0].__dict__, "rise": float("nan")})]
    with pytest.raises(RsmclipError, match="a rise is not a finite number") as error:
        write_changes(damaged + result.changes[1:], output)
    assert error.value.param == "output"
    assert output.read_bytes() == previous and [p.name for p in tmp_path.iterdir()] == ["changes.geojson"]
