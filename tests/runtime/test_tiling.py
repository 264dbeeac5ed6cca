"""Tile windows: pixel and metre sizes, overlap, scales, edge clamping, parameter checks."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from rasterio.transform import Affine
from rasters import write_geotiff

from rsmclip_geo.cli import option_name
from rsmclip_geo.errors import RsmclipError
from rsmclip_geo.raster import open_scene
from rsmclip_geo.tiling import TilingParams, axis_starts, tile_windows


@pytest.fixture
def colorado(shared_data):
    return open_scene(shared_data / "geotiff" / "colorado_rgb_15cm.tif")  # 383 × 232 px, 0.15 m


def coverage(windows, width, height):
    covered = np.zeros((height, width), dtype=int)
    for w in windows:
        covered[w.row:w.row + w.height, w.col:w.col + w.width] += 1
    return covered


def test_windows_cover_scene_with_clamped_edges(colorado):
    windows = tile_windows(colorado, TilingParams(tile_size=100))
    assert all(w.width == w.height == 100 and w.scale == 1 for w in windows)
    assert {w.col for w in windows} == {0, 100, 200, 283}  # last column clamped to 383 - 100
    assert {w.row for w in windows} == {0, 100, 132}
    covered = coverage(windows, colorado.width, colorado.height)
    assert covered.min() >= 1  # no missed strip at the right or bottom edge
    assert all(w.col + w.width <= colorado.width and w.row + w.height <= colorado.height for w in windows)


def test_overlap_sets_the_stride(colorado):
    windows = tile_windows(colorado, TilingParams(tile_size=100, overlap=0.5))
    assert sorted({w.col for w in windows}) == [0, 50, 100, 150, 200, 250, 283]
    assert sorted({w.row for w in windows}) == [0, 50, 100, 132]


def test_scales_are_multiples_of_the_tile(colorado):
    windows = tile_windows(colorado, TilingParams(tile_size=64, scales=(2, 1)))
    by_scale = {s: [w for w in windows if w.scale == s] for s in (1, 2)}
    assert {w.width for w in by_scale[2]} == {128}
    assert coverage(by_scale[2], colorado.width, colorado.height).min() >= 1
    assert len(by_scale[1]) > len(by_scale[2])


def test_scale_that_does_not_fit_is_dropped(colorado, caplog):
    with caplog.at_level(logging.WARNING, logger="rsmclip_geo"):
        windows = tile_windows(colorado, TilingParams(tile_size=100, scales=(1, 4)))
    assert {w.scale for w in windows} == {1}
    assert "scale 4" in caplog.text


def test_tile_bigger_than_scene(colorado):
    with pytest.raises(RsmclipError, match=r"tile of 300 px is larger than the scene \(383×232 px\)"):
        tile_windows(colorado, TilingParams(tile_size=300))


def test_tile_ids_are_stable_and_unique(colorado):
    params = TilingParams(tile_size=64, overlap=0.25, scales=(1, 2))
    ids = [w.tile_id(colorado.fingerprint) for w in tile_windows(colorado, params)]
    assert len(ids) == len(set(ids))
    assert ids == [w.tile_id(colorado.fingerprint) for w in tile_windows(colorado, params)]
    assert ids[0] == f"{colorado.fingerprint[:12]}-s1-c0-r0"


def test_tile_size_in_metres_projected(colorado):
    params = TilingParams(tile_size_m=30.0)
    assert params.tile_pixels(colorado) == 200  # 30 m / 0.15 m
    assert {w.width for w in tile_windows(colorado, params)} == {200}


def test_tile_size_in_metres_geographic(tmp_path):
    # 1e-5° pixels at 45° N: about 0.787 m east-west and 1.106 m north-south
    path = write_geotiff(tmp_path / "wgs84.tif", np.full((3, 300, 300), 80, np.uint8), crs="EPSG:4326",
                         transform=Affine(1e-5, 0.0, 2.0, 0.0, -1e-5, 45.0))
    scene = open_scene(path)
    px, py = scene.pixel_size_m()
    assert TilingParams(tile_size_m=100.0).tile_pixels(scene) == round(100.0 / ((px + py) / 2))
    assert 100 < TilingParams(tile_size_m=100.0).tile_pixels(scene) < 110


def test_default_tile_size_from_model():
    assert TilingParams().resolved(150).tile_size == 150
    assert TilingParams().resolved(None).tile_size == 224
    assert TilingParams(tile_size=96).resolved(150).tile_size == 96
    assert TilingParams(tile_size_m=50.0).resolved(150).tile_size is None


def test_params_round_trip_through_json():
    params = TilingParams(tile_size=128, overlap=0.25, scales=(4, 1, 2), min_valid=0.3, min_std=1.0)
    assert params.scales == (1, 2, 4)
    assert TilingParams.from_json(params.to_json()) == params


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tile_size=64, tile_size_m=10.0), "--tile-size-m 10.0: tile_size is given too; give one size"),
        (dict(tile_size=2), "--tile-size 2"),
        (dict(tile_size=7), "--tile-size 7: give a whole number of pixels between 8 and 65536"),
        (dict(tile_size=65537), "--tile-size 65537"),
        (dict(tile_size=64.5), "--tile-size 64.5"),
        (dict(tile_size=float("inf")), "--tile-size inf"),
        (dict(tile_size=float("nan")), "--tile-size nan"),
        (dict(tile_size=True), "--tile-size True"),
        (dict(tile_size_m=-5.0), "--tile-size-m -5.0: give a finite size in metres above 0"),
        (dict(tile_size_m=0.0), "--tile-size-m 0.0"),
        (dict(tile_size_m=float("inf")), "--tile-size-m inf"),
        (dict(tile_size_m=float("nan")), "--tile-size-m nan"),
        (dict(overlap=1.0), "--overlap 1.0"),
        (dict(overlap=float("nan")), "--overlap nan"),
        (dict(scales=(0, 1)), "--scales 0,1"),
        (dict(scales=(1, 1.5)), "--scales 1,1.5"),
        (dict(scales=(1, float("inf"))), "--scales 1,inf"),
        (dict(min_valid=1.5), "--min-valid 1.5"),
        (dict(min_std=float("nan")), "--min-std nan"),
    ],
)
def test_bad_params(kwargs, message):
    """The library names the parameter (`overlap=1.0`); the command line words it as its flag (`--overlap 1.0`)."""
    with pytest.raises(RsmclipError) as info:
        TilingParams(**kwargs)
    assert info.value.param in kwargs and "--" not in str(info.value)
    assert re.match(message, info.value.worded(option_name)), info.value.worded(option_name)


def test_axis_starts_exact_fit():
    assert axis_starts(300, 100, 100) == [0, 100, 200]
    assert axis_starts(100, 100, 50) == [0]


def test_pixel_size_bounds_are_inclusive():
    assert TilingParams(tile_size=8).tile_size == 8
    assert TilingParams(tile_size=65536).tile_size == 65536
    assert TilingParams(tile_size=64.0).tile_size == 64 and isinstance(TilingParams(tile_size=64.0).tile_size, int)


@pytest.mark.parametrize("metres, pixels", [(0.001, "0.00667 px"), (1.0, "6.67 px"), (100.0, "667 px")])
def test_metre_sizes_outside_the_pixel_bounds_name_the_sizes_that_work(colorado, metres, pixels):
    """0.15 m pixels, 383×232 px: 8 px is 1.2 m, the scene's short side 34.8 m."""
    with pytest.raises(RsmclipError) as info:
        tile_windows(colorado, TilingParams(tile_size_m=metres))
    message = str(info.value)
    assert message.startswith(f"tile_size_m={metres:g} is {pixels} on colorado_rgb_15cm.tif (0.15 m per pixel")
    assert message.endswith("give 1.2 to 34.8 m (8 to 232 px)")
    assert len(tile_windows(colorado, TilingParams(tile_size_m=1.2))) == 48 * 29
    assert {w.width for w in tile_windows(colorado, TilingParams(tile_size_m=34.8))} == {232}


def test_metre_size_of_a_few_pixels_on_a_coarse_scene(tmp_path):
    """5 m on a 4 m/px scene would be 675,000 one-pixel windows; it is refused with the sizes that work."""
    path = write_geotiff(tmp_path / "coarse.tif", np.full((3, 750, 900), 80, np.uint8),
                         transform=Affine(4.0, 0.0, 500_000.0, 0.0, -4.0, 5_800_000.0))
    scene = open_scene(path)
    with pytest.raises(RsmclipError, match=r"tile_size_m=5 is 1\.25 px .*\(4 m per pixel.*give 32 to 3,000 m "
                                           r"\(8 to 750 px\)"):
        TilingParams(tile_size_m=5.0).tile_pixels(scene)
    assert TilingParams(tile_size_m=32.0).tile_pixels(scene) == 8
