"""A raster layer read over HTTP (/vsicurl/, as Layer > Add Raster Layer > Protocol adds it) is indexed and
searched by the panel like a local file, reading the COG from a real nginx on loopback."""

from __future__ import annotations

import pytest
from qgis.core import QgsProject, QgsRasterLayer
from servers import Nginx, make_cog
from test_search_flow import SCENE, index_layer, messages, open_panel, type_query


@pytest.fixture
def nginx(shared_data, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    make_cog(shared_data / "geotiff" / SCENE, root / "scene.tif")
    (tmp_path / "nginx").mkdir()
    server = Nginx(root, tmp_path / "nginx")
    yield server
    server.stop()


def test_panel_indexes_and_searches_a_remote_layer(plugin, iface, nginx, test_bundle):
    url = nginx.url("scene.tif")
    layer = QgsRasterLayer(f"/vsicurl/{url}", "remote scene", "gdal")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    dock = open_panel(plugin)
    index_layer(dock, layer, test_bundle)
    assert dock.index is not None, messages(iface)
    assert len(dock.index) > 0
    type_query(dock, "estrada")
    assert dock.result_layer is not None and dock.result_layer.featureCount() > 0
    gets = [status for method, status, _, _ in nginx.requests("scene.tif") if method == "GET"]
    assert gets and all(status == 206 for status in gets)  # range requests only, never the whole file
