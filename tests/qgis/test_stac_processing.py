"""rsmclip:stacindex in real QGIS: a static STAC catalogue served by nginx on loopback, items picked by an extent
given in a projected CRS (as the map canvas gives it) and transformed to EPSG:4326; the index keeps each scene's
STAC fields; an extent without items fails naming the parameter."""

from __future__ import annotations

import pytest
import rasterio
from qgis.core import QgsProcessingException
from servers import Nginx, make_cog
from stac_servers import cog_item, write_catalogue
from test_processing import COLORADO, FARM, TILE_PX, processing  # noqa: F401 (the processing fixture)


@pytest.fixture(scope="module")
def catalogue(shared_data, tmp_path_factory):
    """The farm and Colorado scenes as COGs with a static catalogue of them, served by nginx."""
    root = tmp_path_factory.mktemp("www")
    items = []
    for name, item_id, when in ((FARM, "farm", "2021-06-15T02:30:00Z"), (COLORADO, "colorado", "2023-03-10T17:45:00Z")):
        make_cog(shared_data / "geotiff" / name, root / f"{item_id}.tif")
        items.append(cog_item(item_id, root / f"{item_id}.tif", {"visual": str(root / f"{item_id}.tif")},
                              collection="aerial", datetime=when, cloud_cover=10))
    write_catalogue(root / "catalog", "aerial", items)
    server = Nginx(root, tmp_path_factory.mktemp("nginx"))
    yield server, root
    server.stop()


def test_stacindex_takes_an_extent_in_any_crs(processing, catalogue, test_bundle, tmp_path):  # noqa: F811
    server, root = catalogue
    with rasterio.open(root / "farm.tif") as src:  # the farm scene's own CRS, EPSG:32750
        west, south, east, north = src.bounds
        extent = f"{west},{east},{south},{north} [{src.crs.to_string()}]"
    output = tmp_path / "stac.parquet"
    result = processing.run("rsmclip:stacindex", {
        "STAC": server.url("catalog/catalog.json"), "EXTENT": extent, "DATETIME": "2021-01-01/..",
        "TILE_SIZE": TILE_PX, "TILE_UNIT": 0, "MODEL": str(test_bundle), "OUTPUT": str(output)})
    assert result["TILES"] > 0
    from rsmclip_geo.api import open_index

    (record,) = open_index(output).scenes.values()
    assert record["stac"] == {"stac_item_id": "farm", "collection": "aerial", "datetime": "2021-06-15T02:30:00Z",
                              "asset_href": server.url("farm.tif")}


def test_stacindex_without_items_names_the_extent(processing, catalogue, test_bundle, tmp_path):  # noqa: F811
    server, _ = catalogue
    with pytest.raises(QgsProcessingException, match=r"Extent \(EXTENT\).*no item of"):
        processing.run("rsmclip:stacindex", {
            "STAC": server.url("catalog/catalog.json"), "EXTENT": "10,11,10,11 [EPSG:4326]",
            "MODEL": str(test_bundle), "OUTPUT": str(tmp_path / "none.parquet")})
    assert not (tmp_path / "none.parquet").exists()
