"""The panel driven like a user in real QGIS: index a GeoTIFF layer through the task manager, type
queries, check the result layers, cancel, find similar, heatmap, export GeoJSON."""

from __future__ import annotations

import json
import math

import pytest
from conftest import add_raster
from qgis.core import QgsApplication, QgsGraduatedSymbolRenderer, QgsProject, QgsRasterLayer, QgsVectorLayer
from qgis.PyQt.QtCore import Qt, QTimer
from qgis.PyQt.QtTest import QTest
from qgis.PyQt.QtWidgets import QApplication, QFileDialog
from qgis_window import process_until, type_text

SCENE = "colorado_rgb_15cm.tif"  # 383 x 232 px, EPSG:26913


def open_panel(plugin):
    plugin.action.trigger()
    process_until(plugin.dock.isVisible, timeout=10)
    return plugin.dock


def index_layer(dock, layer, bundle, tile_px: int = 64, scales: str = "1", timeout: float = 300):
    """Choose layer, model and tiling in the panel, click Index layer, wait for the task."""
    dock.layer_combo.setLayer(layer)
    dock.select_model(str(bundle))
    dock.tile_unit.setCurrentIndex(dock.tile_unit.findData("px"))
    dock.tile_size.setValue(tile_px)
    dock.overlap.setValue(0.0)
    dock.scales.setText(scales)
    QTest.mouseClick(dock.index_button, Qt.LeftButton)
    assert dock.index_task is not None
    process_until(lambda: dock.index_task is None, timeout=timeout)


def type_query(dock, text: str, timeout: float = 120):
    """Type the query and press Enter; wait for the search task."""
    dock.query.clear()
    type_text(dock.query, text)
    assert dock.query.text() == text
    QTest.keyClick(dock.query, Qt.Key_Return)
    process_until(lambda: dock.search_task is None, timeout=timeout)


def result_features(layer: QgsVectorLayer) -> list:
    return sorted(layer.getFeatures(), key=lambda f: f["rank"])


def messages(iface) -> list[str]:
    return [item.text() for item in iface.messageBar().items()]


@pytest.fixture
def indexed(plugin, iface, shared_data, test_bundle):
    raster = add_raster(shared_data / "geotiff" / SCENE)
    dock = open_panel(plugin)
    index_layer(dock, raster, test_bundle)
    assert dock.index is not None, messages(iface)
    return dock, raster


def test_index_then_query_makes_scored_layer_in_raster_crs(indexed, iface):
    from rsmclip_geo.api import SearchParams, search

    dock, raster = indexed
    assert dock.progress.value() == 100
    assert f"{len(dock.index)} tiles" in dock.status.text()
    dock.top_k.setValue(5)
    type_query(dock, "carros estacionados na rua")
    layers = QgsProject.instance().mapLayersByName("carros estacionados na rua")
    assert len(layers) == 1, messages(iface)
    layer = layers[0]
    assert layer.crs() == raster.crs()
    assert layer.crs().authid() == "EPSG:26913"
    features = result_features(layer)
    assert [f["rank"] for f in features] == list(range(1, len(features) + 1))
    assert 1 <= len(features) <= 5
    scores = [f["score"] for f in features]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 <= s <= 1.0 for s in scores)
    for feature in features:
        assert raster.extent().contains(feature.geometry().boundingBox())
        assert math.isclose(feature.geometry().area(), (64 * 0.15) ** 2, rel_tol=0.05)
    # The panel shows the core's answer, nothing else.
    core = search(dock.index, "carros estacionados na rua", model=dock.model, params=SearchParams(top_k=5)).hits
    assert [f["tile_id"] for f in features] == [h.tile_id for h in core]
    assert [round(f["score"], 5) for f in features] == [round(h.score, 5) for h in core]
    # Styled by score, labelled by rank, placed just above the raster.
    assert isinstance(layer.renderer(), QgsGraduatedSymbolRenderer)
    assert layer.renderer().classAttribute() == "score"
    assert layer.labelsEnabled() and layer.labeling().settings().fieldName == "rank"
    order = [node.layer() for node in QgsProject.instance().layerTreeRoot().findLayers()]
    assert order.index(layer) == order.index(raster) - 1
    # The result list mirrors the layer; a click zooms to the tile.
    assert dock.results.topLevelItemCount() == len(features)
    last = dock.results.topLevelItem(len(features) - 1)
    dock.results.itemClicked.emit(last, 0)
    centre = features[-1].geometry().centroid().asPoint()
    assert iface.mapCanvas().extent().contains(centre)
    assert iface.mapCanvas().extent().width() < raster.extent().width()
    QTest.mouseClick(dock.zoom_best_button, Qt.LeftButton)
    assert iface.mapCanvas().extent().contains(features[0].geometry().centroid().asPoint())


def test_each_query_keeps_its_own_layer(indexed):
    dock, raster = indexed
    type_query(dock, "campo de golf")
    type_query(dock, "储油罐")
    type_query(dock, "campo de golf")
    project = QgsProject.instance()
    assert len(project.mapLayersByName("campo de golf")) == 1
    assert len(project.mapLayersByName("储油罐")) == 1
    assert len(project.mapLayers()) == 3


def test_reindexing_same_settings_reuses_cache(indexed, test_bundle):
    dock, raster = indexed
    path = dock.index.path
    stamp = path.stat().st_mtime_ns
    index_layer(dock, raster, test_bundle)
    assert dock.index.path == path
    assert path.stat().st_mtime_ns == stamp
    index_layer(dock, raster, test_bundle, tile_px=96)
    assert dock.index.path != path


def test_find_similar_from_selected_result(indexed):
    dock, raster = indexed
    type_query(dock, "telhados de casas")
    source = dock.results.topLevelItem(0)
    source_tile = source.text(2)
    dock.results.setCurrentItem(source)
    QTest.mouseClick(dock.similar_button, Qt.LeftButton)
    process_until(lambda: dock.search_task is None, timeout=60)
    name = "similar to #1 of telhados de casas"
    layers = QgsProject.instance().mapLayersByName(name)
    assert len(layers) == 1
    tile_ids = [f["tile_id"] for f in result_features(layers[0])]
    assert tile_ids and source_tile not in tile_ids
    assert layers[0].crs() == raster.crs()


def test_heatmap_raster_in_scene_crs(indexed):
    dock, raster = indexed
    dock.heatmap.setChecked(True)
    type_query(dock, "árvores")
    heat = QgsProject.instance().mapLayersByName("árvores heatmap")
    assert len(heat) == 1
    heat = heat[0]
    assert isinstance(heat, QgsRasterLayer) and heat.isValid()
    assert heat.crs() == raster.crs()
    assert heat.extent().intersects(raster.extent())
    stats = heat.dataProvider().bandStatistics(1)
    assert -1.0 <= stats.minimumValue <= stats.maximumValue <= 1.0
    best = max(f["score"] for f in QgsProject.instance().mapLayersByName("árvores")[0].getFeatures())
    assert math.isclose(stats.maximumValue, best, abs_tol=1e-4)


def test_export_geojson_reads_back(indexed, tmp_path):
    from rsmclip_geo.api import hits_to_geojson

    dock, raster = indexed
    type_query(dock, "estrada")
    target = tmp_path / "estrada.geojson"

    def fill_dialog():
        dialog = QApplication.activeModalWidget()
        assert isinstance(dialog, QFileDialog), dialog
        dialog.selectFile(str(target))
        dialog.accept()

    QTimer.singleShot(200, fill_dialog)
    QTest.mouseClick(dock.export_button, Qt.LeftButton)
    assert target.is_file()
    data = json.loads(target.read_text(encoding="utf-8"))
    assert data["type"] == "FeatureCollection"
    assert data == json.loads(json.dumps(hits_to_geojson(dock.current_hits)))
    ranks = [f["properties"]["rank"] for f in data["features"]]
    assert ranks == list(range(1, len(ranks) + 1))
    for feature in data["features"]:
        assert feature["properties"]["query"] == "estrada"
        for lon, lat in feature["geometry"]["coordinates"][0]:
            assert -109.1 < lon < -102 and 37 < lat < 41.1  # inside Colorado: lon/lat order (RFC 7946)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cancel_stops_indexing_between_batches(plugin, iface, shared_data, test_bundle):
    raster = add_raster(shared_data / "geotiff" / "fotomap_4band_2cm.tif")
    dock = open_panel(plugin)
    dock.layer_combo.setLayer(raster)
    dock.select_model(str(test_bundle))
    dock.tile_size.setValue(16)
    dock.scales.setText("1")
    QTest.mouseClick(dock.index_button, Qt.LeftButton)
    task = dock.index_task
    assert task in QgsApplication.taskManager().activeTasks()  # shown in QGIS's task bar
    process_until(lambda: dock.progress.value() > 0, timeout=120)  # the panel follows the task
    QTest.mouseClick(dock.cancel_button, Qt.LeftButton)
    process_until(lambda: dock.index_task is None, timeout=120)
    assert dock.index is None
    assert "cancelled" in dock.status.text()
    assert task.progress() < 100
    assert dock.index_button.isEnabled() and not dock.cancel_button.isEnabled()


def test_bad_model_directory_error_in_message_bar(plugin, iface, shared_data, tmp_path):
    raster = add_raster(shared_data / "geotiff" / SCENE)
    dock = open_panel(plugin)
    dock.layer_combo.setLayer(raster)
    dock.select_model(str(tmp_path))
    QTest.mouseClick(dock.index_button, Qt.LeftButton)
    process_until(lambda: dock.index_task is None, timeout=60)
    assert dock.index is None
    texts = messages(iface)
    assert any(str(tmp_path) in text for text in texts), texts
    assert all("Traceback" not in text for text in texts)


def test_query_before_indexing_is_explained(plugin, iface, shared_data):
    add_raster(shared_data / "geotiff" / SCENE)
    dock = open_panel(plugin)
    type_query(dock, "aeroporto")
    assert dock.search_task is None
    assert any("Index a raster layer first" in text for text in messages(iface))
    assert not QgsProject.instance().mapLayersByName("aeroporto")


def test_removing_the_raster_forgets_its_index_and_results(indexed):
    dock, raster = indexed
    type_query(dock, "piscina")
    assert dock.results.topLevelItemCount() > 0
    QgsProject.instance().removeMapLayer(dock.result_layer.id())
    assert dock.results.topLevelItemCount() == 0 and not dock.current_hits
    QgsProject.instance().removeMapLayer(raster.id())
    assert dock.index is None and dock.status.text() == "Not indexed"


def test_bad_scales_are_explained(plugin, iface, shared_data, test_bundle):
    raster = add_raster(shared_data / "geotiff" / SCENE)
    dock = open_panel(plugin)
    dock.layer_combo.setLayer(raster)
    dock.select_model(str(test_bundle))
    dock.scales.setText("1,x")
    QTest.mouseClick(dock.index_button, Qt.LeftButton)
    assert dock.index_task is None
    assert any(text.startswith("Scales 1,x") for text in messages(iface)), messages(iface)
