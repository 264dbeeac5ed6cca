"""Relevance feedback in real QGIS: hits marked right or wrong in the panel's result list and by clicks on
the map, undo, Search again with the labels, the labels layer, labels files, labels per indexed layer, and
the Processing algorithm rsmclip:feedbacksearch."""

from __future__ import annotations

import pytest
from conftest import add_raster
from qgis.core import (
    QgsApplication,
    QgsCategorizedSymbolRenderer,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsPointXY,
    QgsProcessingException,
    QgsProject,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QPoint, Qt, QTimer
from qgis.PyQt.QtTest import QTest
from qgis.PyQt.QtWidgets import QApplication, QFileDialog, QLineEdit
from qgis_window import process_until
from test_processing import processing  # noqa: F401 (the Processing fixture, provider registered by the plugin)
from test_search_flow import SCENE, index_layer, messages, open_panel, result_features, type_query

QUERY = "telhados de casas"
LABELS_LAYER = "RS-M-CLIP labels"


@pytest.fixture
def searched(plugin, iface, shared_data, test_bundle):
    """The panel with the Colorado scene indexed and QUERY searched (top 8)."""
    raster = add_raster(shared_data / "geotiff" / SCENE)
    dock = open_panel(plugin)
    index_layer(dock, raster, test_bundle)
    assert dock.index is not None, messages(iface)
    dock.top_k.setValue(8)
    type_query(dock, QUERY)
    assert dock.results.topLevelItemCount() == 8, messages(iface)
    return dock, raster


def mark_row(dock, row: int, positive: bool) -> str:
    """Select a result and click Right (+) or Wrong (−); the tile id marked."""
    item = dock.results.topLevelItem(row)
    dock.results.setCurrentItem(item)
    button = dock.feedback.right_button if positive else dock.feedback.wrong_button
    QTest.mouseClick(button, Qt.LeftButton)
    return item.text(2)


def label_column(dock) -> dict[str, str]:
    return {dock.results.topLevelItem(row).text(2): dock.results.topLevelItem(row).text(3)
            for row in range(dock.results.topLevelItemCount())}


def labels_layer() -> QgsVectorLayer | None:
    layers = QgsProject.instance().mapLayersByName(LABELS_LAYER)
    assert len(layers) <= 1
    return layers[0] if layers else None


def judged(dock) -> dict[str, str]:
    return {j.tile_id: j.label for j in dock.feedback.labels.judgements.values()}


def click_tile(canvas, index, tile_id: str, button) -> None:
    """Click the map at the centre of a tile, as a user does."""
    row = index.row_of(tile_id)
    ring = index.scene_footprint(row)
    centre = QgsPointXY(sum(x for x, _ in ring[:4]) / 4, sum(y for _, y in ring[:4]) / 4)
    scene = next(iter(index.scenes.values()))
    to_canvas = QgsCoordinateTransform(QgsCoordinateReferenceSystem.fromWkt(scene["crs"]),
                                       canvas.mapSettings().destinationCrs(), QgsProject.instance())
    pixel = canvas.getCoordinateTransform().transform(to_canvas.transform(centre))
    QTest.mouseClick(canvas.viewport(), button, Qt.NoModifier, QPoint(round(pixel.x()), round(pixel.y())))


def test_mark_from_the_list_undo_and_the_labels_layer(searched, iface):
    dock, raster = searched
    right = mark_row(dock, 0, positive=True)
    wrong = mark_row(dock, 2, positive=False)
    assert judged(dock) == {right: "positive", wrong: "negative"}
    column = label_column(dock)
    assert column[right] == "right" and column[wrong] == "wrong"
    assert [text for tile, text in column.items() if tile not in (right, wrong)] == [""] * 6
    # The judged tiles as their own layer: green right, red wrong, just above the raster.
    layer = labels_layer()
    assert layer is not None and layer.crs().authid() == "EPSG:4326"
    assert {f["tile_id"]: f["label"] for f in layer.getFeatures()} == {right: "positive", wrong: "negative"}
    renderer = layer.renderer()
    assert isinstance(renderer, QgsCategorizedSymbolRenderer) and renderer.classAttribute() == "label"
    colours = {c.value(): c.symbol().symbolLayer(0).strokeColor().name() for c in renderer.categories()}
    assert colours == {"positive": "#1a9641", "negative": "#d7191c"}
    order = [node.layer() for node in QgsProject.instance().layerTreeRoot().findLayers()]
    assert order.index(layer) == order.index(raster) - 1
    # Marking a judged tile again changes its label; Undo takes back the last judgement.
    mark_row(dock, 2, positive=True)
    assert judged(dock) == {right: "positive", wrong: "positive"}
    QTest.mouseClick(dock.feedback.undo_button, Qt.LeftButton)
    assert judged(dock) == {right: "positive"}
    assert label_column(dock)[wrong] == ""
    assert [f["tile_id"] for f in labels_layer().getFeatures()] == [right]
    QTest.mouseClick(dock.feedback.undo_button, Qt.LeftButton)
    assert not dock.feedback.labels and labels_layer() is None
    QTest.mouseClick(dock.feedback.undo_button, Qt.LeftButton)
    assert any("Nothing to undo" in text for text in messages(iface)), messages(iface)


def test_mark_on_map_left_click_right_right_click_wrong(searched, iface):
    from rsmclip_geo.api import tiles_at

    dock, raster = searched
    canvas = iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))  # the map in another CRS than the scene
    canvas.setExtent(canvas.mapSettings().layerExtentToOutputExtent(raster, raster.extent()))
    canvas.refresh()
    QTest.mouseClick(dock.feedback.map_button, Qt.LeftButton)
    assert dock.feedback.map_button.isChecked() and canvas.mapTool() is dock.feedback.tool
    first, second = dock.results.topLevelItem(0).text(2), dock.results.topLevelItem(1).text(2)
    click_tile(canvas, dock.index, first, Qt.LeftButton)
    click_tile(canvas, dock.index, second, Qt.RightButton)
    assert judged(dock) == {first: "positive", second: "negative"}
    assert label_column(dock)[first] == "right" and label_column(dock)[second] == "wrong"
    assert {f["tile_id"] for f in labels_layer().getFeatures()} == {first, second}
    # The tile picked is the core's: api.tiles_at at the click, smallest first.
    ring = dock.index.geometries([dock.index.row_of(first)])[0]
    assert tiles_at(dock.index, ring.centroid.x, ring.centroid.y)[0] == first
    # Releasing the button gives the map tool back.
    QTest.mouseClick(dock.feedback.map_button, Qt.LeftButton)
    assert canvas.mapTool() is not dock.feedback.tool


def test_search_again_refines_the_query_and_leaves_judged_tiles_out(searched, iface):
    from rsmclip_geo.api import SearchParams, search, similar

    dock, raster = searched
    right, wrong = mark_row(dock, 1, positive=True), mark_row(dock, 0, positive=False)
    labels = dock.feedback.snapshot()
    QTest.mouseClick(dock.feedback.again_button, Qt.LeftButton)
    process_until(lambda: dock.search_task is None, timeout=120)
    layers = QgsProject.instance().mapLayersByName(f"{QUERY} (refined)")
    assert len(layers) == 1, messages(iface)
    refined = [f["tile_id"] for f in result_features(layers[0])]
    assert right not in refined and wrong not in refined
    core = search(dock.index, QUERY, model=dock.model, params=SearchParams(top_k=8, labels=labels)).hits
    assert refined == [hit.tile_id for hit in core]
    assert [round(f["score"], 5) for f in result_features(layers[0])] == [round(hit.score, 5) for hit in core]
    # The last search may be a search by example: Search again re-runs it with the labels.
    dock.results.setCurrentItem(dock.results.topLevelItem(0))
    example = dock.results.topLevelItem(0).text(2)
    QTest.mouseClick(dock.similar_button, Qt.LeftButton)
    process_until(lambda: dock.search_task is None, timeout=120)
    name = dock.result_layer.name()
    QTest.mouseClick(dock.feedback.again_button, Qt.LeftButton)
    process_until(lambda: dock.search_task is None, timeout=120)
    assert dock.result_layer.name() == f"{name} (refined)"
    core = similar(dock.index, tile_id=example, model=dock.model, params=SearchParams(top_k=8, labels=labels)).hits
    assert [hit.tile_id for hit in dock.current_hits] == [hit.tile_id for hit in core]


def answer_file_dialog(path) -> None:
    """Type ``path`` into the panel's file dialog once it is open, and accept it."""

    def fill():
        dialog = QApplication.activeModalWidget()
        if not isinstance(dialog, QFileDialog):
            QTimer.singleShot(100, fill)
            return
        dialog.findChild(QLineEdit, "fileNameEdit").setText(str(path))  # typed, as a user does
        dialog.accept()

    QTimer.singleShot(100, fill)


def test_save_and_load_labels_round_trip(searched, iface, tmp_path):
    from rsmclip_geo.api import Labels

    dock, raster = searched
    marked = {mark_row(dock, 0, positive=True): "positive", mark_row(dock, 3, positive=False): "negative"}
    target = tmp_path / "roofs.geojson"
    answer_file_dialog(target)
    QTest.mouseClick(dock.feedback.save_button, Qt.LeftButton)
    assert {j.tile_id: j.label for j in Labels.read(target).judgements.values()} == marked
    as_layer = QgsVectorLayer(str(target), "saved", "ogr")  # the labels file is also a layer
    assert as_layer.isValid() and {f["tile_id"]: f["label"] for f in as_layer.getFeatures()} == marked
    for _ in marked:
        QTest.mouseClick(dock.feedback.undo_button, Qt.LeftButton)
    assert labels_layer() is None
    answer_file_dialog(target)
    QTest.mouseClick(dock.feedback.load_button, Qt.LeftButton)
    assert judged(dock) == marked
    assert {f["tile_id"]: f["label"] for f in labels_layer().getFeatures()} == marked
    assert {tile: label_column(dock)[tile] for tile in marked} == {
        tile: {"positive": "right", "negative": "wrong"}[label] for tile, label in marked.items()}
    # A file that is not a labels file is refused in one line.
    not_labels = tmp_path / "hits.geojson"
    not_labels.write_text('{"type": "FeatureCollection", "features": []}', encoding="utf-8")
    answer_file_dialog(not_labels)
    QTest.mouseClick(dock.feedback.load_button, Qt.LeftButton)
    assert judged(dock) == marked
    assert any(text.startswith(f"Labels file {not_labels}: not a labels file") for text in messages(iface)), \
        messages(iface)


def test_labels_belong_to_the_indexed_layer(searched, shared_data, test_bundle):
    dock, raster = searched
    tile = mark_row(dock, 0, positive=True)
    index_layer(dock, raster, test_bundle)  # the same layer again: the labels stay
    assert judged(dock) == {tile: "positive"} and labels_layer() is not None
    other = add_raster(shared_data / "geotiff" / "colorado_rgb_nodata_15cm.tif")
    index_layer(dock, other, test_bundle)
    assert dock.index is not None and not dock.feedback.labels
    assert labels_layer() is None


def test_processing_feedbacksearch_equals_api_search_with_labels(processing, shared_data,  # noqa: F811
                                                                 test_bundle, tmp_path):
    from rsmclip_geo.api import FEEDBACK_METHODS, Labels, SearchParams, open_index, search

    built = processing.run("rsmclip:index", {"INPUT": [str(shared_data / "geotiff" / SCENE)], "TILE_SIZE": 64,
                                             "MODEL": str(test_bundle), "OUTPUT": str(tmp_path / "index.parquet")})
    index = open_index(built["OUTPUT"], in_memory=True)
    ids = [str(tile_id) for tile_id in index.column("tile_id")]
    common = {"INDEX": built["OUTPUT"], "QUERIES": QUERY, "TOP_K": 6, "MODEL": str(test_bundle),
              "OUTPUT": "TEMPORARY_OUTPUT"}
    definition = QgsApplication.processingRegistry().algorithmById("rsmclip:feedbacksearch") \
        .parameterDefinition("FEEDBACK_METHOD")
    assert definition.options() == list(FEEDBACK_METHODS)
    assert definition.options()[definition.defaultValue()] == SearchParams().feedback_method

    def hit_ids(layer) -> list[str]:
        return [f["tile_id"] for f in sorted(layer.getFeatures(), key=lambda f: f["rank"])]

    by_ids = processing.run("rsmclip:feedbacksearch", {**common, "POSITIVE": f"{ids[3]}, {ids[7]}",
                                                       "NEGATIVE": ids[5]})["OUTPUT"]
    labels = Labels.from_ids(index, [ids[3], ids[7]], [ids[5]])
    core = search(index, QUERY, model=str(test_bundle), params=SearchParams(top_k=6, labels=labels)).hits
    assert hit_ids(by_ids) == [hit.tile_id for hit in core]
    assert not {ids[3], ids[5], ids[7]} & set(hit_ids(by_ids))
    # The same labels from a labels file, refined by the other method.
    labels.write(tmp_path / "labels.geojson")
    rocchio = FEEDBACK_METHODS.index("rocchio")
    by_file = processing.run("rsmclip:feedbacksearch", {**common, "LABELS": str(tmp_path / "labels.geojson"),
                                                        "FEEDBACK_METHOD": rocchio})["OUTPUT"]
    core = search(index, QUERY, model=str(test_bundle),
                  params=SearchParams(top_k=6, labels=labels, feedback_method="rocchio")).hits
    assert hit_ids(by_file) == [hit.tile_id for hit in core]
    with pytest.raises(QgsProcessingException, match=r"^Labels file \(LABELS\): give a labels file"):
        processing.run("rsmclip:feedbacksearch", common)
    with pytest.raises(QgsProcessingException, match=r"^Tiles marked wrong \(ids\) \(NEGATIVE\) .*also marked"):
        processing.run("rsmclip:feedbacksearch", {**common, "POSITIVE": ids[3], "NEGATIVE": ids[3]})
