"""Indexing a large virtual scene (a VRT mosaic over a real GeoTIFF) keeps memory bounded."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import rasterio

from rsmclip_geo.tile_index import IndexHeader

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("large_scene_memory", REPO / "benchmarks" / "large_scene_memory.py")
large_scene_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(large_scene_memory)

#: Generous: the child imports numpy, rasterio, pyarrow, shapely and ONNX Runtime and holds GDAL's
#: block cache; an indexer reading whole scenes or keeping pixels per tile exceeds it.
RSS_BOUND_MB = 1200
#: Allowed RSS growth from a 2,000 px to a 6,000 px scene (9 × the pixels, +96 MB of RGB) with
#: GDAL's block cache capped at 16 MB: anything kept per tile or per pixel shows up here.
GROWTH_BOUND_MB = 48


def test_vrt_mosaic_repeats_the_real_scene(shared_data, tmp_path):
    source = shared_data / "geotiff" / "fotomap_4band_2cm.tif"
    vrt = large_scene_memory.write_tiled_vrt(source, tmp_path / "mosaic.vrt", 3000)
    with rasterio.open(vrt) as mosaic, rasterio.open(source) as src:
        assert (mosaic.width, mosaic.height, mosaic.count) == (3000, 3000, 3)
        assert mosaic.crs == src.crs and mosaic.transform == src.transform
        window = rasterio.windows.Window(src.width, src.height, 100, 80)  # the second copy, one down and right
        assert (mosaic.read(window=window) == src.read([1, 2, 3], window=rasterio.windows.Window(0, 0, 100, 80))).all()


def test_indexing_rss_does_not_grow_with_the_scene(shared_data, tiny_bundle, tmp_path):
    source = shared_data / "geotiff" / "fotomap_4band_2cm.tif"
    peaks = []
    for size in (2000, 6000):
        vrt = large_scene_memory.write_tiled_vrt(source, tmp_path / f"mosaic_{size}.vrt", size)
        output = tmp_path / f"tiles_{size}"
        result = large_scene_memory.measure_index_rss(vrt, output, str(tiny_bundle), tile_size=500, threads=2,
                                                      gdal_cachemax="16")
        assert result["tiles"] == (size // 500) ** 2
        assert result["gdal_cachemax"] == "16"
        assert 0 < result["peak_rss_mb"] < RSS_BOUND_MB, result
        peaks.append(result["peak_rss_mb"])
    assert peaks[1] - peaks[0] < GROWTH_BOUND_MB, peaks
    header = IndexHeader.read(tmp_path / "tiles_6000")
    assert sum(pq.read_metadata(f).num_rows for f in header.files) == 144


def gdal_cache_mb(env: dict) -> float:
    """GDAL's block cache setting in a fresh process that imported the runtime (MB)."""
    code = ("import rsmclip_geo.raster, rasterio; from rasterio.env import get_gdal_config; "
            "print(get_gdal_config('GDAL_CACHEMAX'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    value = int(out.stdout.strip())
    return value / 2**20 if value > 100_000 else value  # GDAL reports bytes once its cache is set up


def test_runtime_caps_the_gdal_block_cache():
    env = {k: v for k, v in os.environ.items() if k != "GDAL_CACHEMAX"}
    assert gdal_cache_mb(env) == 256
    assert gdal_cache_mb({**env, "GDAL_CACHEMAX": "64"}) == 64  # a user's own setting wins
