"""Ground-resolution awareness: a bundle's input_gsd_m (outside its fingerprint), the per-scene warning at
indexing and `--tile-size-m auto`, on the real GeoTIFFs of ../shared/data/geotiff (the exporter that records
input_gsd_m: tests/training/test_export_input_gsd.py)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from cli_cases import assert_fails_cleanly, leftovers, run_cli
from rasterio.transform import Affine
from rasters import write_geotiff

from rsmclip_geo.bundle import BundleInfo, load_bundle, read_bundle_info
from rsmclip_geo.errors import BundleError, RsmclipError
from rsmclip_geo.indexer import plan_index
from rsmclip_geo.tile_index import IndexHeader
from rsmclip_geo.raster import open_scene
from rsmclip_geo.tiling import AUTO_TILE_SIZE, MIN_TILE_PX, TilingParams, tile_windows

pytestmark = pytest.mark.usefixtures("package_models_only")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_BUNDLE = REPO_ROOT / "rsmclip_geo" / "models" / "rsmclip-demo-aid"
MOSAIC = REPO_ROOT / "rsmclip_geo" / "data" / "demo_aid_mosaic.tif"  # 900 × 750 px, 4 m
# AID: 0.5–8 m per pixel at 600 px, seen by the demo model at 64 px
DEMO_INPUT_GSD_M = (0.5 * 600 / 64, 8 * 600 / 64)
# scene -> (bands, auto tile side in px, warned with the model's default 150 px tiles, warned with auto tiles)
SCENES = {
    "colorado_rgb_15cm.tif": (None, 232, True, True),  # 1,200 m tiles would be 8,000 px: the short side is 232
    "fotomap_4band_2cm.tif": (None, 841, True, True),  # 2 cm: even the whole scene is 17 m of ground
    "pix4d_farm_rgba_35cm.tif": (None, 686, True, False),  # 242 m: 3.8 m per input pixel, within 2× of 4.69
    "rotterdam_tanks_4band_1m.tif": ((3, 2, 1), 300, False, False),  # 300 m: the range's lower bound
}


def scene_path(shared_data: Path, name: str) -> Path:
    return shared_data / "geotiff" / name


def resolution_warnings(caplog, fragment: str = "") -> list[str]:
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return [m for m in messages if "per model input pixel" in m and fragment in m]


def bundle_copy(tmp_path: Path, name: str, **changes) -> Path:
    """The demo bundle's bundle.json with ``changes`` (None drops a key), its graphs linked: a bundle directory."""
    target = tmp_path / name
    target.mkdir()
    data = json.loads((DEMO_BUNDLE / "bundle.json").read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    (target / "bundle.json").write_text(json.dumps(data), encoding="utf-8")
    for file in ("image.onnx", "text.onnx", "tokenizer.json"):
        (target / file).symlink_to(DEMO_BUNDLE / file)
    return target


# --------------------------------------------------------------------------- bundle.json


def test_demo_bundle_records_the_ground_resolution_of_its_model_card() -> None:
    bundle = load_bundle(DEMO_BUNDLE)
    assert bundle.info.input_gsd_m == DEMO_INPUT_GSD_M == (4.6875, 75.0)
    card = (DEMO_BUNDLE / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "0.5 m × 600 px / 64 px = 4.6875 m" in card and "8 m × 600 px / 64 px   = 75 m" in card
    assert "--input-gsd-m 4.6875,75" in card
    bundle.verify()  # MODEL_CARD.md and the other listed files keep their recorded sha256


def test_input_gsd_m_stays_out_of_the_fingerprint(tmp_path: Path) -> None:
    """Existing indexes name the bundle by fingerprint: recording the ground resolution must not change it."""
    shipped = load_bundle(DEMO_BUNDLE).fingerprint
    without = load_bundle(bundle_copy(tmp_path, "without", input_gsd_m=None))
    other = load_bundle(bundle_copy(tmp_path, "other", input_gsd_m=[0.3, 0.6]))
    assert without.info.input_gsd_m is None and other.info.input_gsd_m == (0.3, 0.6)
    assert without.fingerprint == other.fingerprint == shipped
    changed = load_bundle(bundle_copy(tmp_path, "changed", image_size=96))
    assert changed.fingerprint != shipped  # a model field does enter it


@pytest.mark.parametrize("value", [[75.0, 4.6875], [0, 1], [-1, 5], [1], [1, 2, 3], ["1", 2], [True, 2], "4,75",
                                   [1, float("inf")], [float("nan"), 5]])
def test_bad_input_gsd_m_in_bundle_json_is_named(value) -> None:
    data = dict(read_bundle_info(DEMO_BUNDLE).raw, input_gsd_m=value)
    with pytest.raises(BundleError, match=r"bundle\.json: input_gsd_m .*metres per pixel"):
        BundleInfo.from_dict(data)


# --------------------------------------------------------------------------- per-scene warning and auto size


@pytest.mark.parametrize("name", list(SCENES))
def test_warning_and_auto_size_per_real_scene(shared_data, demo_model, tmp_path, caplog, name) -> None:
    bands, auto_px, warned_default, warned_auto = SCENES[name]
    path = scene_path(shared_data, name)
    with caplog.at_level(logging.WARNING):
        default = plan_index([path], tmp_path / "default.parquet", model=demo_model, bands=bands)
    assert default.params.tile_size == 150
    assert bool(resolution_warnings(caplog, name)) == warned_default, resolution_warnings(caplog)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        auto = plan_index([path], tmp_path / "auto.parquet", model=demo_model, bands=bands,
                          tiling=TilingParams(tile_size_m=AUTO_TILE_SIZE))
    assert (auto.params.input_gsd_m, auto.params.input_px) == (DEMO_INPUT_GSD_M, 64)
    scene, windows = auto.plans[0]
    assert {w.width for w in windows} == {auto_px}
    assert bool(resolution_warnings(caplog, name)) == warned_auto, resolution_warnings(caplog)


def test_warning_names_scene_resolution_and_the_tile_size_that_fits(shared_data, demo_model, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        plan_index([scene_path(shared_data, "pix4d_farm_rgba_35cm.tif")], tmp_path / "out.parquet", model=demo_model)
    (message,) = resolution_warnings(caplog)
    assert message.startswith("pix4d_farm_rgba_35cm.tif: 0.353 m per pixel; its 150 px tiles (52.9 m) give 0.827 m")
    assert "5.67× finer than rsmclip-demo-aid was trained at (4.69–75 m)" in message
    assert message.endswith("use tile_size_m=242 (or auto)")  # 686 px, the scene's short side
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        plan_index([scene_path(shared_data, "fotomap_4band_2cm.tif")], tmp_path / "out.parquet", model=demo_model,
                   tiling=TilingParams(tile_size_m=AUTO_TILE_SIZE))
    (message,) = resolution_warnings(caplog)
    assert "0.02 m per pixel; its 841 px tiles (16.8 m)" in message
    assert message.endswith("the scene is too small for it: even its largest tile (tile_size_m=16.8, 841 px) "
                            "gives 0.263 m")


def test_a_scale_that_fits_silences_the_warning(shared_data, demo_model, tmp_path, caplog):
    """Rotterdam at 1 m: 30 px tiles give 0.47 m per input pixel (10× finer), their ×8 copies 3.75 m (within 2×)."""
    path = scene_path(shared_data, "rotterdam_tanks_4band_1m.tif")
    with caplog.at_level(logging.WARNING):
        plan_index([path], tmp_path / "a.parquet", model=demo_model, bands=(3, 2, 1), tiling=TilingParams(tile_size=30))
    assert len(resolution_warnings(caplog, "30 px tiles (30 m) give 0.469 m")) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        plan_index([path], tmp_path / "b.parquet", model=demo_model, bands=(3, 2, 1),
                   tiling=TilingParams(tile_size=30, scales=(1, 8)))
    assert resolution_warnings(caplog) == []


def test_auto_puts_a_scene_at_the_centre_of_the_range_within_the_pixel_bounds(tmp_path) -> None:
    info = load_bundle(DEMO_BUNDLE).info
    auto = TilingParams(tile_size_m=AUTO_TILE_SIZE, scales=(1, 2)).for_model(info)
    centre = math.sqrt(DEMO_INPUT_GSD_M[0] * DEMO_INPUT_GSD_M[1])  # 18.75 m per input pixel: 1,200 m tiles
    mosaic = open_scene(MOSAIC)
    assert auto.tile_pixels(mosaic) == round(centre * 64 / 4.0) == 300
    assert {(w.width, w.scale) for w in tile_windows(mosaic, auto)} == {(300, 1), (600, 2)}  # scales stay on top
    data = np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8)
    coarse = write_geotiff(tmp_path / "coarse.tif", data, transform=Affine(500.0, 0, 500_000, 0, -500.0, 5_800_000))
    assert auto.tile_pixels(open_scene(coarse)) == MIN_TILE_PX  # 1,200 m is 2.4 px of 500 m: the smallest tile
    tiny = write_geotiff(tmp_path / "tiny.tif", data[:, :6, :6])
    with pytest.raises(RsmclipError, match=r"tiny\.tif: 6×6 px is smaller than the smallest tile \(8 px\)"):
        auto.tile_pixels(open_scene(tiny))


def test_auto_tiling_round_trips_through_json_and_keeps_other_cache_keys() -> None:
    auto = TilingParams(tile_size_m="AUTO", overlap=0.25).for_model(load_bundle(DEMO_BUNDLE).info)
    assert auto.tile_size_m == AUTO_TILE_SIZE
    assert TilingParams.from_json(json.loads(json.dumps(auto.to_json()))) == auto
    assert set(TilingParams(tile_size_m=50.0).to_json()) == {"tile_size", "tile_size_m", "overlap", "scales",
                                                               "min_valid", "min_std"}
    with pytest.raises(RsmclipError, match="tile_size_m=auto only"):
        TilingParams(tile_size_m=50.0, input_gsd_m=(1.0, 2.0), input_px=64)
    with pytest.raises(RsmclipError, match=r"tile_size_m=big: give a finite size in metres above 0 .*or auto") as info:
        TilingParams(tile_size_m="big")
    assert (info.value.param, info.value.value) == ("tile_size_m", "big")


def test_auto_without_input_gsd_m_is_a_clear_error(tiny_bundle) -> None:
    info = load_bundle(tiny_bundle).info
    assert info.input_gsd_m is None
    assert TilingParams().for_model(info).tile_size == info.default_tile_size  # older bundles keep working
    with pytest.raises(RsmclipError, match=r"^tile_size_m=auto: model tiny-bundle does not record the ground "
                                           r"resolution it was trained at \(input_gsd_m in bundle\.json\)"):
        TilingParams(tile_size_m=AUTO_TILE_SIZE).for_model(info)


# --------------------------------------------------------------------------- command line


def test_cli_index_auto_sizes_each_scene_and_warns_once_per_scene(capsys, caplog, shared_data, tmp_path):
    out = tmp_path / "city.parquet"
    colorado = scene_path(shared_data, "colorado_rgb_15cm.tif")
    pix4d = scene_path(shared_data, "pix4d_farm_rgba_35cm.tif")
    with caplog.at_level(logging.WARNING):
        result = run_cli(capsys, "index", MOSAIC, pix4d, colorado, "-o", out, "--tile-size-m", "auto",
                         "--scales", "1,2,4", "--no-progress", "--model", DEMO_BUNDLE)
    assert result.code == 0, result.err
    assert result.out.startswith(f"wrote {out}: 3 scenes")
    warned = resolution_warnings(caplog)
    assert len(warned) == 1 and warned[0].startswith("colorado_rgb_15cm.tif: 0.15 m per pixel; its 232 px tiles")
    header = IndexHeader.read(out)
    assert header.tiling.tile_size_m == AUTO_TILE_SIZE and header.tiling.input_gsd_m == DEMO_INPUT_GSD_M
    from rsmclip_geo.tile_index import TileIndex

    index = TileIndex.open(out)
    scenes, widths, scales = index.column("scene"), index.column("win_width"), index.column("scale")
    sizes = {(Path(scene).name, int(width), int(scale)) for scene, width, scale in zip(scenes, widths, scales)}
    assert {(n, w) for n, w, s in sizes if s == 1} == {(MOSAIC.name, 300), (pix4d.name, 686),
                                                       (colorado.name, 232)}
    assert (MOSAIC.name, 600, 2) in sizes  # multi-scale on top of the auto size


def test_cli_tile_search_warns_on_every_run_even_from_the_cache(capsys, caplog, shared_data, tmp_path):
    args = ("tile-search", scene_path(shared_data, "colorado_rgb_15cm.tif"), "parking lot", "-o",
            tmp_path / "hits.geojson", "--cache-dir", tmp_path / "cache", "--no-progress")
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            result = run_cli(capsys, *args)
        assert result.code == 0, result.err
        assert len(resolution_warnings(caplog, "colorado_rgb_15cm.tif: 0.15 m per pixel; its 150 px tiles")) == 1
    assert len(list((tmp_path / "cache").glob("*.parquet"))) == 1


@pytest.mark.parametrize("command", ["index", "tile-search"])
def test_cli_auto_without_input_gsd_m_fails_cleanly(capsys, shared_data, tiny_bundle, tmp_path, command):
    scene = scene_path(shared_data, "colorado_rgb_15cm.tif")
    if command == "index":
        args = ["index", scene, "-o", tmp_path / "out.parquet"]
    else:
        args = ["tile-search", scene, "airport", "-o", tmp_path / "out.parquet", "--cache-dir", tmp_path / "cache"]
    result = run_cli(capsys, *args, "--model", tiny_bundle, "--tile-size-m", "auto", "--no-progress")
    assert_fails_cleanly(result, "--tile-size-m auto: model tiny-bundle does not record the ground resolution",
                         "give the tile size in metres or pixels")
    assert leftovers(tmp_path, "out.parquet") == []
    assert not list(tmp_path.glob("cache/*.parquet"))
