"""Scenes: band mapping, stretch, masks, fingerprints and unusable rasters, on real GeoTIFFs."""

from __future__ import annotations

import dataclasses
import logging
import shutil

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp
from PIL import Image
from rasterio.transform import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window
from rasters import textured_float_scene, truncated_copy, write_geotiff

from rsmclip_geo.errors import RasterError
from rsmclip_geo.raster import (SceneReader, open_scene, read_image, resample_masked, scene_fingerprint,
                                window_runs)
from rsmclip_geo.tiling import TilingParams, tile_windows


@pytest.fixture
def geotiff(shared_data):
    return shared_data / "geotiff"


@pytest.mark.parametrize(
    "name, rgb, alpha, epsg",
    [
        ("colorado_rgb_15cm.tif", (1, 2, 3), None, 26913),
        ("colorado_rgba_alpha_15cm.tif", (1, 2, 3), 4, 26913),
        ("colorado_rgb_nodata_15cm.tif", (1, 2, 3), None, 26913),
        ("pix4d_farm_rgba_35cm.tif", (1, 2, 3), 4, 32750),
        ("fotomap_4band_2cm.tif", (1, 2, 3), 4, 32633),
    ],
)
def test_rgb_bands_from_colour_interpretation(geotiff, name, rgb, alpha, epsg):
    scene = open_scene(geotiff / name)
    assert scene.rgb_bands == rgb
    assert scene.alpha_band == alpha
    assert scene.crs.to_epsg() == epsg
    assert scene.stretch is None  # uint8 is used as is


def test_untagged_four_band_float_needs_bands(geotiff):
    # rotterdam: colour interpretation gray/undefined×3; bands are B, G, R, NIR (inspected by rendering)
    with pytest.raises(RasterError, match=r"^bands: .*rotterdam_tanks_4band_1m\.tif has 4 bands") as info:
        open_scene(geotiff / "rotterdam_tanks_4band_1m.tif")
    assert "\n" not in str(info.value) and info.value.param == "bands"
    scene = open_scene(geotiff / "rotterdam_tanks_4band_1m.tif", bands=(3, 2, 1))
    assert scene.rgb_bands == (3, 2, 1) and scene.dtype == "float64"
    with rasterio.open(scene.path) as src:
        red = src.read(3)
    filled = red[red > 0]
    low, high = scene.stretch[0]
    assert low == pytest.approx(np.percentile(filled, 2), rel=0.05, abs=2)
    assert high == pytest.approx(np.percentile(filled, 98), rel=0.05)


def test_float_stretch_is_per_scene_not_per_tile(geotiff):
    scene = open_scene(geotiff / "rotterdam_harbor_4band_1m.tif", bands=(3, 2, 1))
    with rasterio.open(scene.path) as src:
        raw = src.read([3, 2, 1], window=rasterio.windows.Window(150, 200, 64, 64))
    with SceneReader(scene) as reader:
        rgb, valid = reader.read_rgb(150, 200, 64, 64)
    for band in range(3):
        low, high = scene.stretch[band]
        expected = np.clip((raw[band] - low) * 255.0 / (high - low), 0, 255).astype(np.uint8)
        assert np.abs(rgb[..., band].astype(int) - expected.astype(int)).max() <= 1
    assert valid.all()


def test_bad_band_choice(geotiff):
    with pytest.raises(RasterError, match=r"bands=1,2,7: not three band numbers in 1\.\.3 of .*colorado"):
        open_scene(geotiff / "colorado_rgb_15cm.tif", bands=(1, 2, 7))


def test_grey_band_replicated_and_uint16_stretched(tmp_path):
    data = np.linspace(1000, 5000, 64 * 80, dtype=np.float64).reshape(1, 64, 80).astype(np.uint16)
    path = write_geotiff(tmp_path / "grey16.tif", data)
    scene = open_scene(path)
    assert scene.rgb_bands == (1, 1, 1)
    assert scene.stretch is not None and scene.stretch[0][0] > 1000
    with SceneReader(scene) as reader:
        rgb, valid = reader.read_rgb(0, 0, 80, 64)
    assert rgb.shape == (64, 80, 3) and valid.all()
    assert (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255


def test_grey_plus_alpha(tmp_path):
    grey = np.full((1, 40, 40), 120, np.uint8)
    grey[0, :, :20] = 60
    alpha = np.zeros((1, 40, 40), np.uint8)
    alpha[0, 20:] = 255
    path = write_geotiff(tmp_path / "ga.tif", np.concatenate([grey, alpha]),
                         colorinterp=[ColorInterp.gray, ColorInterp.alpha])
    scene = open_scene(path)
    assert scene.rgb_bands == (1, 1, 1) and scene.alpha_band == 2
    with SceneReader(scene) as reader:
        rgb, valid = reader.read_rgb(0, 0, 40, 40)
    assert not valid[:20].any() and valid[20:].all()
    assert (rgb[:20] == 0).all() and rgb[30, 5, 1] == 60


def test_two_unrelated_bands_have_no_rgb_mapping(tmp_path):
    path = write_geotiff(tmp_path / "two.tif", np.ones((2, 16, 16), np.uint8),
                         colorinterp=[ColorInterp.undefined, ColorInterp.undefined])
    with pytest.raises(RasterError, match=r"^bands: .*two\.tif has 2 bands .*choose its R,G,B bands"):
        open_scene(path)


def test_alpha_and_nodata_masks(geotiff):
    alpha = open_scene(geotiff / "colorado_rgba_alpha_15cm.tif")
    with rasterio.open(alpha.path) as src:
        expected = src.read(4, window=rasterio.windows.Window(0, 0, 120, 100)) > 0
    with SceneReader(alpha) as reader:
        rgb, valid = reader.read_rgb(0, 0, 120, 100)
    assert (valid == expected).all() and not expected.all()
    assert (rgb[~valid] == 0).all()

    nodata = open_scene(geotiff / "colorado_rgb_nodata_15cm.tif")
    with rasterio.open(nodata.path) as src:
        pixels = src.read(window=rasterio.windows.Window(0, 0, 383, 232))
    with SceneReader(nodata) as reader:
        _, valid = reader.read_rgb(0, 0, 383, 232)
    assert (valid == (pixels != 0).any(axis=0)).all() and not valid.all()


def test_decimated_window_read(geotiff):
    scene = open_scene(geotiff / "fotomap_4band_2cm.tif")
    with SceneReader(scene) as reader:
        rgb, valid = reader.read_rgb(100, 50, 600, 400, max_size=150)
        full, _ = reader.read_rgb(100, 50, 600, 400)
    assert rgb.shape == (100, 150, 3) and valid.shape == (100, 150)
    assert abs(rgb.mean() - full.mean()) < 1.5


def test_decimated_reads_match_the_bicubic_resize_models_are_trained_with(shared_data, tmp_path):
    """A 150 px AID image read at 64 px equals Pillow's bicubic resize (training crops, open_clip preprocess)."""
    image = Image.open(sorted((shared_data / "aid" / "Airport").iterdir())[0]).convert("RGB")
    path = write_geotiff(tmp_path / "airport.tif", np.asarray(image).transpose(2, 0, 1))
    with SceneReader(open_scene(path)) as reader:
        rgb, _ = reader.read_rgb(0, 0, 150, 150, max_size=64)
    expected = np.asarray(image.resize((64, 64), Image.BICUBIC)).astype(int)
    diff = np.abs(rgb.astype(int) - expected)
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4


@pytest.mark.parametrize("name, bands", [("fotomap_4band_2cm.tif", None), ("pix4d_farm_rgba_35cm.tif", None),
                                         ("colorado_rgb_nodata_15cm.tif", None),
                                         ("rotterdam_tanks_4band_1m.tif", (1, 2, 3))])
@pytest.mark.parametrize("tile_size, overlap, scales, max_size", [
    (150, 0.5, (1,), 64),  # the demo model's tiling: 75 px steps are 32 output pixels
    (64, 0.75, (1, 2), 64),  # no decimation at scale 1, 2× at scale 2
    (96, 0.3, (1,), 40),  # steps that are not whole output pixels: one read per window
])
def test_reading_runs_of_windows_gives_each_windows_own_pixels(geotiff, name, bands, tile_size, overlap, scales,
                                                                max_size):
    scene = open_scene(geotiff / name, bands=bands)
    windows = [(w.col, w.row, w.width, w.height)
               for w in tile_windows(scene, TilingParams(tile_size=tile_size, overlap=overlap, scales=scales))]
    runs = window_runs(windows, max_size)
    assert [w for run in runs for w in run] == windows
    if (tile_size, overlap) == (150, 0.5):
        assert len(runs) < len(windows) / 2
    with SceneReader(scene) as reader:
        tiles = reader.read_windows(windows, max_size)
        for window, (rgb, valid) in zip(windows, tiles, strict=True):
            own_rgb, own_valid = reader.read_rgb(*window, max_size=max_size)
            np.testing.assert_array_equal(rgb, own_rgb)
            np.testing.assert_array_equal(valid, own_valid)


def test_runs_of_big_windows_are_bounded():
    windows = [(col, 0, 1000, 1000) for col in range(0, 10_000, 1000)]
    assert [len(run) for run in window_runs(windows, 64)] == [4, 4, 2]  # ≤ 4 Mpx of source per read
    assert [len(run) for run in window_runs([(0, 0, 64, 64), (64, 0, 64, 64), (200, 0, 64, 64)], 64)] == [2, 1]


def test_fingerprint_is_content_based(geotiff, tmp_path):
    source = geotiff / "colorado_rgb_15cm.tif"
    copy = shutil.copy(source, tmp_path / "renamed.tif")
    assert scene_fingerprint(copy) == scene_fingerprint(source)
    raw = bytearray(copy.read_bytes())
    raw[-10] ^= 0xFF
    copy.write_bytes(bytes(raw))
    assert scene_fingerprint(copy) != scene_fingerprint(source)


def test_pixel_size_in_metres(geotiff, tmp_path):
    assert open_scene(geotiff / "colorado_rgb_15cm.tif").pixel_size_m() == pytest.approx((0.15, 0.15), rel=0.01)
    # geographic CRS at 60° N: a degree of longitude is half as long as at the equator
    path = write_geotiff(tmp_path / "geo.tif", np.full((3, 32, 32), 90, np.uint8), crs="EPSG:4326",
                         transform=Affine(1e-5, 0.0, 10.0, 0.0, -1e-5, 60.0))
    px, py = open_scene(path).pixel_size_m()
    assert px == pytest.approx(111_320 * 1e-5 * 0.5, rel=0.01)
    assert py == pytest.approx(1.1057, rel=0.01)


def test_not_a_raster(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("these are field notes, not pixels\n")
    with pytest.raises(RasterError, match=r"notes\.tif: cannot be opened as a raster"):
        open_scene(path)


def test_missing_file(tmp_path):
    with pytest.raises(RasterError, match=r"nowhere\.tif: no such file"):
        open_scene(tmp_path / "nowhere.tif")


@pytest.mark.parametrize("tiled", [False, True])
def test_truncated_tiff(geotiff, tmp_path, tiled):
    path = truncated_copy(geotiff / "colorado_rgb_15cm.tif", tmp_path / "cut.tif", 0.6, tiled=tiled)
    with pytest.raises(RasterError, match=r"cut\.tif: .*(truncated or corrupt)") as info:
        open_scene(path)
    assert "\n" not in str(info.value)


def test_raster_without_georeferencing(tmp_path):
    path = write_geotiff(tmp_path / "plain.tif", np.full((3, 32, 32), 7, np.uint8), crs=None)
    with pytest.raises(RasterError, match=r"plain\.tif: raster has no CRS or geotransform.*not supported"):
        open_scene(path)


def test_all_nodata_scene(tmp_path):
    path = write_geotiff(tmp_path / "empty.tif", np.zeros((3, 32, 32), np.uint8), nodata=0)
    with pytest.raises(RasterError, match=r"empty\.tif: every pixel is nodata"):
        open_scene(path)


def test_untiled_big_scene_warns(tmp_path, caplog):
    path = write_geotiff(tmp_path / "strip.tif", np.full((3, 4, 4200), 50, np.uint8))
    with caplog.at_level(logging.WARNING, logger="rsmclip_geo"):
        open_scene(path)
    assert "not internally tiled" in caplog.text
    caplog.clear()
    tiled = write_geotiff(tmp_path / "tiled.tif", np.full((3, 16, 4200), 50, np.uint8), tiled=True,
                          blockxsize=16, blockysize=16)
    with caplog.at_level(logging.WARNING, logger="rsmclip_geo"):
        open_scene(tiled)
    assert "not internally tiled" not in caplog.text


def test_directory_given_as_scene(tmp_path):
    with pytest.raises(RasterError, match=r"is a directory; give raster files"):
        open_scene(tmp_path)


def test_scattered_nan_is_judged_on_nearest_validity_and_kept_out_of_resampling(tmp_path):
    """1 % NaN per band of a 5-band float32 scene: a cubic decimated read would spread it over most of
    each tile; validity follows the source pixels and the RGB of valid pixels matches the NaN-free scene."""
    clean = open_scene(textured_float_scene(tmp_path / "clean.tif"), bands=(3, 2, 1))
    dirty = open_scene(textured_float_scene(tmp_path / "dirty.tif", nan_fraction=0.01), bands=(3, 2, 1))
    dirty = dataclasses.replace(dirty, stretch=clean.stretch)  # compare pixels under one stretch
    windows = [(w.col, w.row, w.width, w.height) for w in tile_windows(dirty, TilingParams(tile_size=224))]
    with rasterio.open(dirty.path) as src:
        source_valid = np.isfinite(src.read((3, 2, 1))).all(axis=0)
    with SceneReader(clean) as clean_reader, SceneReader(dirty) as reader:
        for (col, row, width, height), (rgb, valid) in zip(windows, reader.read_windows(windows, 64), strict=True):
            assert abs(valid.mean() - source_valid[row:row + height, col:col + width].mean()) < 0.02
            expected, _ = clean_reader.read_rgb(col, row, width, height, max_size=64)
            diff = np.abs(rgb.astype(int) - expected)[valid]
            assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 12 and diff.max() < 64  # noise: 13 levels
            own_rgb, own_valid = reader.read_rgb(col, row, width, height, max_size=64)
            np.testing.assert_array_equal(rgb, own_rgb)
            np.testing.assert_array_equal(valid, own_valid)
        rgb, valid = reader.read_rgb(0, 0, 224, 224)  # full resolution: the source pixels themselves
    np.testing.assert_array_equal(valid, source_valid[:224, :224])
    assert (rgb[~valid] == 0).all()


def test_masked_resampling_of_valid_pixels_is_gdals(tmp_path):
    path = textured_float_scene(tmp_path / "clean.tif", bands=3, height=300, width=400)
    with rasterio.open(path) as src:
        data = src.read()
        expected = src.read(out_shape=(3, 60, 80), resampling=Resampling.cubic)
        inner = src.read(window=Window(100, 50, 200, 150), out_shape=(3, 40, 50), resampling=Resampling.cubic)
    valid = np.ones(data.shape[1:], bool)
    np.testing.assert_array_equal(resample_masked(data, valid, Window(0, 0, 400, 300), (60, 80)), expected)
    np.testing.assert_array_equal(resample_masked(data, valid, Window(100, 50, 200, 150), (40, 50)), inner)


def collar_scene(tmp_path, name, **profile):
    """A uint8 texture inside a zero-filled collar (a reprojection's black corners)."""
    rng = np.random.default_rng(3)
    data = rng.integers(40, 220, (3, 256, 320)).astype(np.uint8)
    yy, xx = np.mgrid[0:256, 0:320]
    data[:, (xx + yy < 90) | (xx - yy > 250)] = 0
    return write_geotiff(tmp_path / name, data, **profile)


def test_nodata_override_matches_a_declared_nodata_value(tmp_path):
    declared = open_scene(collar_scene(tmp_path, "declared.tif", nodata=0))
    override = open_scene(collar_scene(tmp_path, "undeclared.tif"), nodata=0)
    assert override.nodata == 0 and override.nodata_overridden and not declared.nodata_overridden
    with SceneReader(declared) as a, SceneReader(override) as b:
        for window in [(0, 0, 160, 160), (160, 0, 160, 160), (0, 0, 320, 256)]:  # each with some collar
            for max_size in (None, 64):
                rgb_a, valid_a = a.read_rgb(*window, max_size=max_size)
                rgb_b, valid_b = b.read_rgb(*window, max_size=max_size)
                np.testing.assert_array_equal(valid_a, valid_b)
                assert not valid_b.all() and np.abs(rgb_a.astype(int) - rgb_b).max() <= 1


def test_nodata_none_ignores_the_files_value(geotiff):
    scene = open_scene(geotiff / "colorado_rgb_nodata_15cm.tif", nodata=None)
    assert scene.nodata is None and scene.nodata_overridden
    with SceneReader(scene) as reader:
        _, valid = reader.read_rgb(0, 0, 383, 232)
    assert valid.all()


def test_bad_nodata_value(geotiff):
    with pytest.raises(RasterError, match=r"nodata='none': give a number, None"):
        open_scene(geotiff / "colorado_rgb_15cm.tif", nodata="none")


def test_zero_filled_edge_without_nodata_warns(geotiff, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="rsmclip_geo"):
        open_scene(geotiff / "rotterdam_harbor_4band_1m.tif", bands=(3, 2, 1))
    assert "rotterdam_harbor_4band_1m.tif" in caplog.text and "nodata=0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rsmclip_geo"):
        harbour = open_scene(geotiff / "rotterdam_harbor_4band_1m.tif", bands=(3, 2, 1), nodata=0)
        open_scene(collar_scene(tmp_path, "declared.tif", nodata=0))
        open_scene(geotiff / "colorado_rgb_15cm.tif")
    assert "nodata=0" not in caplog.text
    with SceneReader(harbour) as reader:
        _, valid = reader.read_rgb(0, 0, 300, 300)
    assert not valid[0].any() and valid[-1].all()  # the harbour scene's empty top rows


def test_image_chips_of_any_band_count_read_like_scenes(tmp_path):
    path = textured_float_scene(tmp_path / "chip.tif", height=120, width=150, nan_fraction=0.01)
    with SceneReader(open_scene(path, bands=(3, 2, 1))) as reader:
        expected, _ = reader.read_rgb(0, 0, 150, 120)
    np.testing.assert_array_equal(read_image(path, bands=(3, 2, 1)), expected)
    with pytest.raises(RasterError, match=r"chip\.tif has 5 bands .*choose its R,G,B bands"):
        read_image(path)
    grey16 = write_geotiff(tmp_path / "grey16.tif", np.arange(64 * 48, dtype=np.uint16).reshape(1, 48, 64) * 9,
                           crs=None)  # no georeferencing needed for a chip
    image = read_image(grey16)
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8 and image.min() == 0 and image.max() == 255
