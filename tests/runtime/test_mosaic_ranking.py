"""Ranking on real imagery: a georeferenced mosaic of AID validation images of known classes, split
over two scenes in different CRSs (UTM and geographic), indexed with tiles aligned to the cells and
searched in several languages with the default (bundled demo) model. A class query must rank a cell of
that class first and find most of its cells, and the GeoJSON must place them inside their scenes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image
from rasterio.transform import Affine
from rasterio.warp import transform_bounds
from rasters import write_geotiff

from rsmclip_geo.api import SearchParams, search
from rsmclip_geo.encoders import load_model
from rsmclip_geo.export import write_hits
from rsmclip_geo.indexer import index_scenes
from rsmclip_geo.tile_index import TileIndex
from rsmclip_geo.raster import open_scene

from rsmclip_geo.tiling import TilingParams

pytestmark = pytest.mark.usefixtures("package_models_only")

CELL = 150  # AID images here are 150 × 150
PER_CLASS = 3
QUERIES = {
    "Airport": ["airport", "aeroporto", "机场"],
    "Beach": ["beach", "praia", "plage"],
    "StorageTanks": ["storage tanks", "储油罐", "резервуары"],
    "Forest": ["forest", "Wald", "floresta"],
    "Stadium": ["stadium", "estadio", "стадион"],
    "Farmland": ["farmland", "terres agricoles", "农田"],
}
SCENE_CRS = {"mosaic_utm.tif": ("EPSG:32633", Affine(2.0, 0.0, 400_000.0, 0.0, -2.0, 5_700_000.0)),
             "mosaic_wgs84.tif": ("EPSG:4326", Affine(2e-5, 0.0, 13.4, 0.0, -2e-5, 52.5))}


def validation_images(aid: Path, class_name: str, count: int) -> list[Path]:
    """The project's validation split: per class, sorted file names, index % 5 == 4."""
    files = sorted(p for p in (aid / class_name).iterdir() if p.suffix.lower() == ".jpg")
    return [p for i, p in enumerate(files) if i % 5 == 4][:count]


@pytest.fixture(scope="module")
def mosaic(shared_data, tmp_path_factory):
    """Two 3 × 3-cell scenes; returns (scene paths, {(scene name, col, row): class})."""
    root = tmp_path_factory.mktemp("mosaic")
    cells = [(name, path) for name in QUERIES for path in validation_images(shared_data / "aid", name, PER_CLASS)]
    order = np.random.default_rng(7).permutation(len(cells))
    layout, paths = {}, []
    for s, (scene_name, (crs, transform)) in enumerate(SCENE_CRS.items()):
        pixels = np.zeros((3, 3 * CELL, 3 * CELL), np.uint8)
        for k in range(9):
            class_name, image_path = cells[order[s * 9 + k]]
            row, col = divmod(k, 3)
            image = np.asarray(Image.open(image_path).convert("RGB"))
            assert image.shape == (CELL, CELL, 3)
            pixels[:, row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = image.transpose(2, 0, 1)
            layout[(scene_name, col, row)] = class_name
        paths.append(write_geotiff(root / scene_name, pixels, crs=crs, transform=transform, compress="deflate"))
    return paths, layout


@pytest.fixture(scope="module")
def demo_index(mosaic, tmp_path_factory):
    model = load_model(None)
    paths, _ = mosaic
    output = tmp_path_factory.mktemp("mosaic_index") / "mosaic.parquet"
    index_scenes(paths, output, model=model, tiling=TilingParams(tile_size=CELL))
    return TileIndex.open(output), model


def hit_class(hit, layout) -> str:
    return layout[(Path(hit.scene).name, hit.win_col // CELL, hit.win_row // CELL)]


def test_tiles_are_the_cells(demo_index):
    index, _ = demo_index
    assert len(index) == 2 * 9
    assert set(index.column("win_width").tolist()) == {CELL}
    assert all(c % CELL == 0 for c in index.column("win_col")) and all(r % CELL == 0 for r in index.column("win_row"))


@pytest.mark.parametrize("class_name, query", [(c, q) for c, qs in QUERIES.items() for q in qs])
def test_class_query_ranks_a_cell_of_its_class_first(demo_index, mosaic, class_name, query):
    index, model = demo_index
    _, layout = mosaic
    hits = search(index, query, model=model, params=SearchParams(top_k=PER_CLASS)).hits
    ranked = [hit_class(hit, layout) for hit in hits]
    assert ranked[0] == class_name, (query, ranked, [round(h.score, 3) for h in hits])


def test_class_queries_find_most_cells_of_their_class(demo_index, mosaic):
    """Precision at 3 over all 18 queries meets the model's acceptance bar (80 %): a few validation images
    of a class may rank below another class's cell (MODEL_CARD.md lists the known misses)."""
    index, model = demo_index
    _, layout = mosaic
    found = {}
    for class_name, queries in QUERIES.items():
        for query in queries:
            hits = search(index, query, model=model, params=SearchParams(top_k=PER_CLASS)).hits
            found[query] = sum(hit_class(hit, layout) == class_name for hit in hits)
    assert sum(found.values()) / (PER_CLASS * len(found)) >= 0.8, found


def test_geojson_places_hits_in_their_scenes(demo_index, mosaic, tmp_path):
    index, model = demo_index
    paths, layout = mosaic
    hits = search(index, ["aeroporto", "储油罐"], model=model, params=SearchParams(top_k=PER_CLASS)).hits
    data = json.loads(write_hits(hits, tmp_path / "hits.geojson").read_text(encoding="utf-8"))
    bounds = {}
    for path in paths:
        scene = open_scene(path)
        xs, ys = zip(*scene.footprint(0, 0, scene.width, scene.height))
        bounds[path.name] = transform_bounds(scene.crs, "EPSG:4326", min(xs), min(ys), max(xs), max(ys))
    for feature in data["features"]:
        props = feature["properties"]
        west, south, east, north = bounds[Path(props["scene"]).name]
        polygon = shapely.geometry.shape(feature["geometry"])
        minx, miny, maxx, maxy = polygon.bounds
        assert west - 1e-9 <= minx and maxx <= east + 1e-9 and south - 1e-9 <= miny and maxy <= north + 1e-9
        if Path(props["scene"]).name == "mosaic_wgs84.tif":  # scene CRS is lon/lat: the exact cell corners
            _, transform = SCENE_CRS["mosaic_wgs84.tif"]
            cell = shapely.box(*(transform @ (props["win_col"], props["win_row"] + CELL)),
                               *(transform @ (props["win_col"] + CELL, props["win_row"])))
            assert shapely.normalize(polygon).equals_exact(shapely.normalize(cell), 1e-9)
    expected = {"aeroporto": "Airport", "储油罐": "StorageTanks"}
    assert all(hit_class(h, layout) == expected[h.query] for h in hits)
