"""Hostile scenes and tiling parameters of `index`, `tile-search` and `similar --image`, each through the CLI:
the exit code, the one-line message or warning, and that no partial output is left."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_cases import assert_fails_cleanly, leftovers, run_cli, run_cli_process
from rasterio.transform import Affine
from rasters import textured_float_scene, write_geotiff

COLORADO = "colorado_rgb_15cm.tif"  # 383 × 232 px, 0.15 m
HARBOUR = "rotterdam_harbor_4band_1m.tif"  # float64, zero-filled top rows, no nodata value


@pytest.fixture(scope="module")
def work(shared_data, tiny_bundle, tmp_path_factory) -> dict[str, Path]:
    """A copy of a real scene, a one-scene index over it and a 5-band float32 chip with scattered NaN."""
    from rsmclip_geo.cli import main

    root = tmp_path_factory.mktemp("hostile_raster")
    scene = Path(shutil.copy(shared_data / "geotiff" / COLORADO, root / "scene.tif"))
    assert main(["index", str(scene), "-o", str(root / "tiles.parquet"), "--model", str(tiny_bundle),
                 "--tile-size", "64", "-q"]) == 0
    chip = textured_float_scene(root / "chip.tif", height=96, width=128, nan_fraction=0.01)
    return {"scene": scene, "index": root / "tiles.parquet", "chip": chip}


def index_args(tiny_bundle, tmp_path, *args) -> list:
    return ["index", *args, "-o", tmp_path / "out.parquet", "--model", tiny_bundle, "--no-progress"]


def warnings_about(caplog, fragment: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and fragment in r.getMessage()]


# tile sizes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, fragment", [
    ("--tile-size-m", "inf", "--tile-size-m inf: give a finite size in metres above 0"),
    ("--tile-size-m", "nan", "--tile-size-m nan"),
    ("--tile-size-m", "0", "--tile-size-m 0.0"),
    ("--tile-size-m", "-5", "--tile-size-m -5.0"),
    ("--tile-size-m", "0.001", "--tile-size-m 0.001 is 0.00667 px on scene.tif (0.15 m per pixel, 383×232 px); "
                               "give 1.2 to 34.8 m (8 to 232 px)"),
    ("--tile-size-m", "1", "--tile-size-m 1 is 6.67 px"),
    ("--tile-size-m", "100", "--tile-size-m 100 is 667 px"),
    ("--tile-size", "4", "--tile-size 4: give a whole number of pixels between 8 and 65536"),
    ("--tile-size", "70000", "--tile-size 70000"),
])
def test_tile_sizes_out_of_bounds(capsys, work, tiny_bundle, tmp_path, flag, value, fragment):
    result = run_cli(capsys, *index_args(tiny_bundle, tmp_path, work["scene"]), flag, value)
    assert_fails_cleanly(result, fragment)
    assert leftovers(tmp_path, "out.parquet") == []


def test_metre_tile_size_of_a_pixel_on_a_coarse_scene(capsys, tiny_bundle, tmp_path):
    scene = write_geotiff(tmp_path / "coarse.tif", np.full((3, 750, 900), 80, np.uint8),
                          transform=Affine(4.0, 0.0, 500_000.0, 0.0, -4.0, 5_800_000.0))
    result = run_cli(capsys, "tile-search", scene, "airport", "--tile-size-m", "5", "--no-cache",
                     "-o", tmp_path / "hits.geojson", "--model", tiny_bundle)
    assert_fails_cleanly(result, "--tile-size-m 5 is 1.25 px on coarse.tif (4 m per pixel", "give 32 to 3,000 m")
    assert leftovers(tmp_path, "hits.geojson") == []


# scenes ---------------------------------------------------------------------------------------------

def test_directory_as_scene(capsys, work, tiny_bundle, tmp_path):
    folder = tmp_path / "scenes"
    folder.mkdir()
    result = run_cli(capsys, *index_args(tiny_bundle, tmp_path, work["scene"], folder))
    assert_fails_cleanly(result, f"{folder}: is a directory; give raster files")
    assert leftovers(tmp_path, "out.parquet") == []
    result = run_cli(capsys, "tile-search", folder, "airport", "--no-cache", "-o", tmp_path / "hits.geojson",
                     "--model", tiny_bundle)
    assert_fails_cleanly(result, "is a directory; give raster files")
    assert leftovers(tmp_path, "hits.geojson") == []


@pytest.mark.parametrize("value", ["abc", "", "0,1"])
def test_bad_nodata_value(capsys, work, tiny_bundle, tmp_path, value):
    result = run_cli(capsys, *index_args(tiny_bundle, tmp_path, work["scene"]), f"--nodata={value}")
    assert_fails_cleanly(result, f"--nodata {value}: give a number (e.g. 0) or none")
    assert leftovers(tmp_path, "out.parquet") == []


def test_zero_filled_border_warns_and_nodata_0_masks_it(capsys, caplog, shared_data, tiny_bundle, tmp_path):
    scene = shared_data / "geotiff" / HARBOUR
    common = [scene, "--bands", "3,2,1", "--tile-size", "64", "--min-std", "0"]
    with caplog.at_level(logging.WARNING, logger="rsmclip_geo"):
        assert run_cli(capsys, *index_args(tiny_bundle, tmp_path, *common)).code == 0
    assert warnings_about(caplog, f"{HARBOUR}: ") and warnings_about(caplog, "rerun with nodata=0")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rsmclip_geo"):
        result = run_cli(capsys, *index_args(tiny_bundle, tmp_path, *common), "--nodata", "0",
                         "-o", tmp_path / "masked.parquet")
    assert result.code == 0 and not warnings_about(caplog, "nodata=0")
    from rsmclip_geo.tile_index import TileIndex

    assert len(TileIndex.open(tmp_path / "masked.parquet")) < len(TileIndex.open(tmp_path / "out.parquet"))


def test_tile_search_cache_follows_the_nodata_option(capsys, shared_data, tiny_bundle, tmp_path):
    common = ["tile-search", shared_data / "geotiff" / HARBOUR, "port", "--bands", "3,2,1", "--tile-size", "64",
              "--min-std", "0", "--cache-dir", tmp_path / "cache", "--model", tiny_bundle, "--top-k", "100",
              "--nms", "1"]
    counts = []
    for nodata in ([], ["--nodata", "0"], ["--nodata", "none"]):
        assert run_cli(capsys, *common, *nodata, "-o", tmp_path / "hits.geojson").code == 0
        counts.append(len(json.loads((tmp_path / "hits.geojson").read_text())["features"]))
    assert counts[1] < counts[0] == counts[2]  # --nodata 0 is not served from the first run's cache
    assert len(list((tmp_path / "cache").glob("*.parquet"))) == 2  # none = the file's (no) nodata value


# the cache without a home ---------------------------------------------------------------------------

def test_empty_home_does_not_put_the_cache_in_the_root(work, tiny_bundle, tmp_path):
    root_cache = Path("/.cache/rsmclip-geo")
    existed = root_cache.exists()
    env = {"HOME": "", "RSMCLIP_GEO_CACHE": ""}
    result = run_cli_process("tile-search", work["scene"], "airport", "--tile-size", "64", "--model", tiny_bundle,
                             "-o", tmp_path / "hits.geojson", env=env, cwd=tmp_path)
    assert_fails_cleanly(result, "--cache-dir: not given and no home directory for the cache (HOME='')",
                         "RSMCLIP_GEO_CACHE")
    assert leftovers(tmp_path, "hits.geojson") == []
    assert root_cache.exists() == existed
    result = run_cli_process("search", work["index"], "airport", "--model", tiny_bundle,
                             "-o", tmp_path / "hits.geojson", env=env, cwd=tmp_path)
    assert result.code == 0 and "queries are not cached" in result.err  # the query cache is optional
    assert root_cache.exists() == existed


# similar --image ------------------------------------------------------------------------------------

def similar_args(work, tiny_bundle, *args) -> list:
    return ["similar", work["index"], "--model", tiny_bundle, *args]


def test_image_chip_of_five_float_bands(capsys, work, tiny_bundle, tmp_path):
    result = run_cli(capsys, *similar_args(work, tiny_bundle, "--image", work["chip"], "-o", tmp_path / "hits.geojson"))
    assert_fails_cleanly(result, "--bands: ", "chip.tif has 5 bands", "choose its R,G,B bands")
    assert leftovers(tmp_path, "hits.geojson") == []
    result = run_cli(capsys, *similar_args(work, tiny_bundle, "--image", work["chip"], "--bands", "3,2,1",
                                           "-o", tmp_path / "hits.geojson"))
    assert result.code == 0
    assert len(json.loads((tmp_path / "hits.geojson").read_text())["features"]) == 10


def test_image_chip_of_uint16_bands_without_georeferencing(capsys, work, tiny_bundle, tmp_path):
    rng = np.random.default_rng(0)
    chip = write_geotiff(tmp_path / "chip16.tif", rng.integers(0, 4000, (4, 80, 80)).astype(np.uint16), crs=None)
    result = run_cli(capsys, *similar_args(work, tiny_bundle, "--image", chip, "--bands", "1,2,3", "--top-k", "3"))
    assert result.code == 0 and "image:chip16.tif" in result.out


@pytest.mark.parametrize("case", ["directory", "bad bands"])
def test_bad_image_chips(capsys, work, tiny_bundle, tmp_path, case):
    image, extra, fragment = {
        "directory": (tmp_path, [], f"--image {tmp_path}: not a readable image ([Errno 21] Is a directory"),
        "bad bands": (work["chip"], ["--bands", "1,2,9"],
                      f"--bands 1,2,9: not three band numbers in 1..5 of {work['chip']}"),
    }[case]
    result = run_cli(capsys, *similar_args(work, tiny_bundle, "--image", image, *extra,
                                           "-o", tmp_path / "hits.geojson"))
    assert_fails_cleanly(result, fragment)
    assert leftovers(tmp_path, "hits.geojson") == []
