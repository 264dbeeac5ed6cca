"""Hit export (GeoJSON per RFC 7946, GeoPackage, GeoParquet) and the heatmap GeoTIFF."""

from __future__ import annotations

import json

import duckdb
import geopandas
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from rasterio.warp import transform as transform_coords
from rasterio.warp import transform_bounds

from rsmclip_geo.api import SearchParams, search
from rsmclip_geo.errors import RsmclipError
from rsmclip_geo.export import write_heatmap, write_hits
from rsmclip_geo.hits import hits_to_geojson
from rsmclip_geo.indexer import index_scenes
from rsmclip_geo.tile_index import TileIndex
from rsmclip_geo.raster import open_scene
from rsmclip_geo.hits import HIT_PROPERTIES
from rsmclip_geo.search import score_tiles

PARAMS_TILE = 64


@pytest.fixture(scope="module")
def scene(shared_data):
    return open_scene(shared_data / "geotiff" / "pix4d_farm_rgba_35cm.tif")


@pytest.fixture(scope="module")
def index(scene, model, tmp_path_factory):
    from rsmclip_geo.tiling import TilingParams

    output = tmp_path_factory.mktemp("export") / "farm.parquet"
    return TileIndex.open(index_scenes([scene], output, model=model, tiling=TilingParams(tile_size=PARAMS_TILE)))


@pytest.fixture(scope="module")
def hits(index, model):
    return search(index, ["campo agrícola", "farmland"], model=model, params=SearchParams(top_k=4)).hits


def test_geojson_rfc7946(hits, scene, tmp_path):
    path = write_hits(hits, tmp_path / "hits.geojson")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["type"] == "FeatureCollection" and "crs" not in data
    assert len(data["features"]) == 8
    west, south, east, north = transform_bounds(scene.crs, "EPSG:4326", *_bounds(scene), densify_pts=21)
    for feature, hit in zip(data["features"], hits):
        assert list(feature["properties"]) == list(HIT_PROPERTIES)
        assert all(not isinstance(v, (dict, list)) for v in feature["properties"].values())
        assert feature["properties"]["query"] == hit.query and feature["properties"]["rank"] == hit.rank
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
        assert shapely.is_ccw(shapely.LinearRing(ring))  # right-hand rule for exterior rings
        for lon, lat in ring:  # lon/lat order, inside the scene's bounds (Bali: lon ≈ 115, lat ≈ -8.6)
            assert west - 1e-9 <= lon <= east + 1e-9 and south - 1e-9 <= lat <= north + 1e-9
        # the corners are the window's corners in the scene CRS, transformed to EPSG:4326
        corners = scene.footprint(hit.win_col, hit.win_row, hit.win_width, hit.win_height)[:4]
        lons, lats = transform_coords(scene.crs, "EPSG:4326", *zip(*corners))
        np.testing.assert_allclose(sorted(zip(lons, lats)), sorted(tuple(p) for p in ring[:4]), atol=1e-9)
    info = pyogrio.read_info(path)  # GDAL (as QGIS uses it) reads it as EPSG:4326 polygons
    assert info["crs"] == "EPSG:4326" and info["geometry_type"] == "Polygon" and info["features"] == 8


def _bounds(scene):
    xs, ys = zip(*scene.footprint(0, 0, scene.width, scene.height))
    return min(xs), min(ys), max(xs), max(ys)


def test_hits_to_geojson_matches_file(hits, tmp_path):
    path = write_hits(hits, tmp_path / "hits.json")
    assert json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(hits_to_geojson(hits)))


def test_geopackage_and_geoparquet(hits, tmp_path):
    gpkg = geopandas.read_file(write_hits(hits, tmp_path / "hits.gpkg"))
    parquet = geopandas.read_parquet(write_hits(hits, tmp_path / "hits.parquet"))
    for frame in (gpkg, parquet):
        assert frame.crs.to_epsg() == 4326
        assert list(frame.columns) == [*HIT_PROPERTIES, "geometry"]
        assert frame["tile_id"].tolist() == [h.tile_id for h in hits]
        assert frame.geometry.iloc[0].equals_exact(hits[0].geometry, 1e-9)
    assert duckdb.sql(f"select count(*), max(rank) from '{tmp_path / 'hits.parquet'}'").fetchall() == [(8, 4)]


def test_empty_hit_list(tmp_path):
    data = json.loads(write_hits([], tmp_path / "none.geojson").read_text())
    assert data == {"type": "FeatureCollection", "features": []}
    assert len(geopandas.read_parquet(write_hits([], tmp_path / "none.parquet"))) == 0


def test_bad_output_paths(hits, tmp_path):
    with pytest.raises(RsmclipError, match=r"output=.*hits\.csv: unknown output format") as info:
        write_hits(hits, tmp_path / "hits.csv")
    assert info.value.param == "output"
    blocker = tmp_path / "plainfile"
    blocker.write_text("x")
    with pytest.raises(RsmclipError, match=r"output=.*plainfile/hits\.geojson: directory .* does not exist"):
        write_hits(hits, blocker / "hits.geojson")
    (tmp_path / "folder.geojson").mkdir()
    with pytest.raises(RsmclipError, match="is a directory"):
        write_hits(hits, tmp_path / "folder.geojson")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.geojson", "plainfile"]


def test_failed_write_keeps_the_previous_file(hits, tmp_path):
    path = write_hits(hits, tmp_path / "hits.geojson")
    before = path.read_bytes()
    with pytest.raises(AttributeError):
        write_hits([*hits, "not a hit"], path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["hits.geojson"]


def test_heatmap_is_aligned_with_the_scene(index, model, scene, tmp_path):
    queries = ["farmland", "river"]
    from rsmclip_geo.queries import query_vectors

    cell = PARAMS_TILE // 4  # the default: a quarter of the tile stride
    scores = score_tiles(index, query_vectors(model, queries))
    path = write_heatmap(index, scores, tmp_path / "heat.tif", queries=queries)
    with rasterio.open(path) as heat:
        assert heat.crs == scene.crs and heat.count == 2 and heat.descriptions == tuple(queries)
        assert heat.transform.c == scene.transform[2] and heat.transform.f == scene.transform[5]
        assert heat.transform.a == pytest.approx(scene.transform[0] * cell)
        assert heat.width == -(-scene.width // cell) and heat.height == -(-scene.height // cell)
        grid = heat.read()
    cols, rows = index.column("win_col"), index.column("win_row")
    for i in range(len(index)):
        if cols[i] % PARAMS_TILE == 0 and rows[i] % PARAMS_TILE == 0:  # tiles on the grid (not edge-clamped)
            pixel = grid[:, rows[i] // cell, cols[i] // cell]  # covered by this tile only
            np.testing.assert_allclose(pixel, scores[:, i], atol=1e-6)
    kept = {(r // cell, c // cell) for c, r in zip(cols, rows) if c % 64 == 0 and r % 64 == 0}
    empty = [(y, x) for y in range(grid.shape[1]) for x in range(grid.shape[2]) if np.isnan(grid[0, y, x])]
    assert not set(empty) & kept  # NaN only where no tile was kept (the farm's masked corners)
    assert empty


def test_heatmap_needs_one_scene(shared_data, model, tmp_path):
    from rsmclip_geo.tiling import TilingParams

    scenes = [shared_data / "geotiff" / n for n in ("colorado_rgb_15cm.tif", "colorado_rgba_alpha_15cm.tif")]
    index = TileIndex.open(index_scenes(scenes, tmp_path / "two.parquet", model=model,
                                        tiling=TilingParams(tile_size=128)))
    scores = np.zeros(len(index), np.float32)
    with pytest.raises(RsmclipError, match=r"^scene: .*two\.parquet holds 2 scenes .*pick the heatmap's scene") as info:
        write_heatmap(index, scores, tmp_path / "heat.tif")
    assert info.value.param == "scene"
    path = write_heatmap(index, scores, tmp_path / "heat.tif", scene="colorado_rgba_alpha_15cm.tif")
    with rasterio.open(path) as heat:
        assert heat.crs.to_epsg() == 26913
    with pytest.raises(RsmclipError, match="scene=nope: not a scene of"):
        write_heatmap(index, scores, tmp_path / "heat2.tif", scene="nope")


def test_heatmap_checks_need_only_the_index_header(shared_data, model, tmp_path):
    from rsmclip_geo.export import check_heatmap
    from rsmclip_geo.tile_index import IndexHeader
    from rsmclip_geo.tiling import TilingParams

    scene = shared_data / "geotiff" / "colorado_rgb_15cm.tif"
    copy = tmp_path / "copy.tif"
    copy.write_bytes(scene.read_bytes())
    index_scenes([scene, shared_data / "geotiff" / "pix4d_farm_rgba_35cm.tif"], tmp_path / "two.parquet",
                 model=model, tiling=TilingParams(tile_size=128))
    header = IndexHeader.read(tmp_path / "two.parquet")
    assert check_heatmap(header, tmp_path / "heat.tif", scene="colorado_rgb_15cm.tif") == open_scene(scene).fingerprint
    for path, scene_name, message in [
        (tmp_path / "heat.tif", None, r"^scene: .*two\.parquet holds 2 scenes .*pick the heatmap's scene"),
        (tmp_path / "heat.png", "colorado_rgb_15cm.tif", "unknown output format"),
        (copy, "colorado_rgb_15cm.tif", r"copy\.tif: is a scene of .*two\.parquet and would be overwritten"),
    ]:
        with pytest.raises(RsmclipError, match=message):
            check_heatmap(header, path, scene=scene_name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.tif", "two.parquet"]


def test_heatmap_averages_overlapping_tiles_at_a_quarter_of_the_stride(shared_data, model, tmp_path):
    from rsmclip_geo.tiling import TilingParams

    scene = open_scene(shared_data / "geotiff" / "colorado_rgb_15cm.tif")  # 383 × 232 px
    index = TileIndex.open(index_scenes([scene], tmp_path / "c.parquet", model=model,
                                        tiling=TilingParams(tile_size=64, overlap=0.5, scales=(1, 2))))
    scores = np.random.default_rng(0).uniform(-1, 1, (2, len(index))).astype(np.float32)
    with rasterio.open(write_heatmap(index, scores, tmp_path / "heat.tif")) as heat:
        grid = heat.read()
        assert heat.transform.a == pytest.approx(scene.transform[0] * 8)  # stride 32 px / 4
    windows = np.column_stack([index.column(c) for c in ("win_col", "win_row", "win_width", "win_height")])
    for y in range(grid.shape[1]):
        for x in range(grid.shape[2]):
            cx, cy = min((x + 0.5) * 8, scene.width - 0.5), min((y + 0.5) * 8, scene.height - 0.5)
            covering = ((windows[:, 0] <= cx) & (cx < windows[:, 0] + windows[:, 2])
                        & (windows[:, 1] <= cy) & (cy < windows[:, 1] + windows[:, 3]))
            np.testing.assert_allclose(grid[:, y, x], scores[:, covering].mean(axis=1), atol=1e-5)
    with rasterio.open(write_heatmap(index, scores, tmp_path / "coarse.tif", cell=32)) as heat:
        assert heat.width == -(-scene.width // 32)
    with pytest.raises(RsmclipError, match=r"cell=0: give the heatmap's pixel size"):
        write_heatmap(index, scores, tmp_path / "bad.tif", cell=0)
