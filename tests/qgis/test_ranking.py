"""Rankings with the bundled demo model, through the panel: a GeoTIFF mosaic of AID validation
images (one class per tile, never trained on) is indexed, and multilingual queries must put
their class's tile first, drawn at that tile's place on the map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import add_raster
from qgis.core import QgsPointXY, QgsProject
from test_search_flow import index_layer, messages, open_panel, type_query

TILE = 150  # AID images are 150 x 150: one image per tile
PIXEL_M = 2.0
ORIGIN = (500_000.0, 5_760_000.0)  # EPSG:32631
# grid position (col, row) -> AID class
GRID = {(0, 0): "Airport", (1, 0): "Beach", (2, 0): "Forest", (0, 1): "StorageTanks", (1, 1): "Farmland",
        (2, 1): "Stadium"}
QUERIES = {  # query -> class whose tile must rank first: the beach in seven languages, the forest in four
    **{q: "Beach" for q in ("beach", "praia", "playa", "plage", "Strand", "spiaggia", "海滩")},
    **{q: "Forest" for q in ("forest", "forêt", "Wald", "лес")},
}


def validation_image(shared_data: Path, aid_class: str) -> Path:
    """The first image of the class's validation split (sorted names, index % 5 == 4)."""
    return sorted((shared_data / "aid" / aid_class).glob("*.jpg"))[4]


@pytest.fixture(scope="module")
def mosaic(shared_data, tmp_path_factory) -> Path:
    import rasterio
    from PIL import Image
    from rasterio.transform import from_origin

    cols, rows = max(c for c, _ in GRID) + 1, max(r for _, r in GRID) + 1
    pixels = np.zeros((3, rows * TILE, cols * TILE), dtype=np.uint8)
    for (col, row), aid_class in GRID.items():
        with Image.open(validation_image(shared_data, aid_class)) as image:
            rgb = np.asarray(image.convert("RGB"))
        assert rgb.shape == (TILE, TILE, 3)
        pixels[:, row * TILE:(row + 1) * TILE, col * TILE:(col + 1) * TILE] = rgb.transpose(2, 0, 1)
    path = tmp_path_factory.mktemp("mosaic") / "aid_mosaic.tif"
    profile = {"driver": "GTiff", "width": cols * TILE, "height": rows * TILE, "count": 3, "dtype": "uint8",
               "crs": "EPSG:32631", "transform": from_origin(*ORIGIN, PIXEL_M, PIXEL_M), "photometric": "RGB"}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
    return path


def tile_centre(col: int, row: int) -> QgsPointXY:
    x0, y0 = ORIGIN
    return QgsPointXY(x0 + (col + 0.5) * TILE * PIXEL_M, y0 - (row + 0.5) * TILE * PIXEL_M)


def test_multilingual_queries_put_their_tile_first(plugin, iface, mosaic, demo_bundle):
    raster = add_raster(mosaic)
    dock = open_panel(plugin)
    index_layer(dock, raster, demo_bundle, tile_px=TILE)
    assert dock.index is not None, messages(iface)
    assert len(dock.index) == len(GRID)
    places = {aid_class: tile_centre(*cell) for cell, aid_class in GRID.items()}
    for query, expected in QUERIES.items():
        type_query(dock, query)
        layer = QgsProject.instance().mapLayersByName(query)[0]
        best = min(layer.getFeatures(), key=lambda f: f["rank"])
        assert best.geometry().contains(places[expected]), (query, expected, best["tile_id"], best["score"])
