"""Change between dates in real QGIS: two GeoTIFF mosaics of AID validation images where known cells change
class (tests/change_scenes.py), compared through `processing.run("rsmclip:change")` and through the panel's
Change section; the cell that gained (or lost) storage tanks ranks first, and a pair that cannot be compared
is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from change_scenes import CELL, CHANGED, CRS, LOST_TANKS, NEW_TANKS, ORIGIN, PIXEL_M, cell_of, date_scenes
from conftest import add_raster
from qgis.core import (
    NULL,
    QgsCoordinateReferenceSystem,
    QgsGraduatedSymbolRenderer,
    QgsPointXY,
    QgsProcessingException,
    QgsProject,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtTest import QTest
from qgis_window import process_until, type_text
from test_processing import ProgressLog, processing, qgis_process  # noqa: F401 (the Processing fixture)
from test_search_flow import messages, open_panel

QUERY = "storage tanks"


@pytest.fixture(scope="module")
def scenes(shared_data, tmp_path_factory) -> dict[str, Path]:
    """The GeoTIFFs of change_scenes.date_scenes: before, after, shifted, far."""
    return date_scenes(shared_data / "aid", tmp_path_factory.mktemp("change-scenes"))


@pytest.fixture(scope="module")
def indexes(processing, scenes, demo_bundle, test_bundle, tmp_path_factory) -> dict[str, str]:  # noqa: F811
    """Tile indexes made by rsmclip:index, one tile per cell: before, after, far with the demo model, tiny (the
    after scene with the tiny bundle)."""
    root = tmp_path_factory.mktemp("change-indexes")
    built = {}
    for name, scene, bundle in (("before", "before", demo_bundle), ("after", "after", demo_bundle),
                                ("far", "far", demo_bundle), ("tiny", "after", test_bundle)):
        built[name] = processing.run("rsmclip:index", {"INPUT": [str(scenes[scene])], "TILE_SIZE": CELL,
                                                       "MODEL": str(bundle), "OUTPUT": str(root / f"{name}.parquet")
                                                       })["OUTPUT"]
    return built


def cell_centre(cell: tuple[int, int]) -> QgsPointXY:
    """The centre of a mosaic cell in the scenes' CRS."""
    col, row = cell
    return QgsPointXY(ORIGIN[0] + (col + 0.5) * CELL * PIXEL_M, ORIGIN[1] - (row + 0.5) * CELL * PIXEL_M)


def run_change(processing, indexes, tmp_path, **parameters) -> list:  # noqa: F811
    """rsmclip:change of before -> after written to a GeoPackage; its features by rank."""
    output = tmp_path / "changes.gpkg"
    result = processing.run("rsmclip:change", {"BEFORE": indexes["before"], "AFTER": indexes["after"],
                                               "OUTPUT": str(output), **parameters})
    layer = QgsVectorLayer(result["OUTPUT"], "changes", "ogr")
    assert layer.isValid(), result
    assert layer.crs().authid() == "EPSG:4326"
    return sorted(layer.getFeatures(), key=lambda f: (f["query"], f["rank"]))


@pytest.mark.parametrize("direction, expected", [(0, NEW_TANKS), (1, LOST_TANKS)])
def test_processing_change_puts_the_changed_cell_first(processing, indexes, tmp_path, direction,  # noqa: F811
                                                       expected):
    from rsmclip_geo.api import CHANGE_DIRECTIONS, CHANGE_PROPERTIES, SearchParams, change

    features = run_change(processing, indexes, tmp_path, QUERIES=QUERY, DIRECTION=direction, TOP_K=4)
    assert [f["rank"] for f in features] == [1, 2, 3, 4]
    assert features[0].fields().names()[1:] == list(CHANGE_PROPERTIES)  # after the GeoPackage's fid
    first = features[0]
    assert cell_of(first["win_col"], first["win_row"]) == expected
    sign = 1 if CHANGE_DIRECTIONS[direction] == "appeared" else -1
    assert first["rise"] == pytest.approx(sign * (first["score_after"] - first["score_before"]), abs=1e-5)
    assert Path(first["scene_before"]).name == "before.tif" and Path(first["scene"]).name == "after.tif"
    assert first["iou"] == pytest.approx(1.0)
    core = change(indexes["before"], indexes["after"], QUERY, params=SearchParams(top_k=4),
                  direction=CHANGE_DIRECTIONS[direction]).changes
    assert [f["tile_id"] for f in features] == [c.tile_id for c in core]
    assert [f["rise"] for f in features] == pytest.approx([c.rise for c in core], abs=1e-5)
    lonlat = first.geometry().boundingBox()
    assert lonlat.xMinimum() == pytest.approx(core[0].geometry.bounds[0], abs=1e-7)


def test_processing_change_without_query_ranks_the_changed_cells_first(processing, indexes, tmp_path):  # noqa: F811
    feedback = ProgressLog()
    output = tmp_path / "any.geojson"
    result = processing.run("rsmclip:change", {"BEFORE": indexes["before"], "AFTER": indexes["after"], "TOP_K": 9,
                                               "THRESHOLD": 1e-3, "OUTPUT": str(output)}, feedback=feedback)
    features = list(QgsVectorLayer(result["OUTPUT"], "changes", "ogr").getFeatures())
    assert {cell_of(f["win_col"], f["win_row"]) for f in features} == set(CHANGED)
    assert {f["query"] for f in features} == {"any change"}
    assert all(f["score_before"] == NULL and f["score_after"] == NULL for f in features)
    assert feedback.values and feedback.values[-1] == pytest.approx(100.0)


def test_processing_change_in_an_area_of_interest(processing, indexes, tmp_path):  # noqa: F811
    centre = cell_centre(NEW_TANKS)
    half = CELL * PIXEL_M / 4
    extent = f"{centre.x() - half},{centre.x() + half},{centre.y() - half},{centre.y() + half} [{CRS}]"
    features = run_change(processing, indexes, tmp_path, QUERIES=QUERY, EXTENT=extent)
    assert [cell_of(f["win_col"], f["win_row"]) for f in features] == [NEW_TANKS]


@pytest.mark.parametrize("case, parameters, start, fragment", [
    ("no overlap", {"AFTER": "far"}, "Tile index after (AFTER) ", "no overlapping footprints"),
    ("other model", {"AFTER": "tiny", "QUERIES": QUERY}, "Tile index after (AFTER) ", "same model"),
    ("no query", {"DIRECTION": 1}, "Direction (DIRECTION) disappeared: ", "give a query"),
    ("threshold", {"THRESHOLD": 3.0, "QUERIES": QUERY}, "Minimum rise (THRESHOLD) 3.0: ", "between -2 and 2"),
])
def test_processing_change_refusals_are_one_line(processing, indexes, tmp_path, case, parameters,  # noqa: F811
                                                 start, fragment):
    parameters = {name: indexes.get(value, value) if name == "AFTER" else value for name, value in parameters.items()}
    with pytest.raises(QgsProcessingException) as error:
        processing.run("rsmclip:change", {"BEFORE": indexes["before"], "AFTER": indexes["after"],
                                          "OUTPUT": str(tmp_path / "changes.geojson"), **parameters})
    text = str(error.value)
    assert text.startswith(start) and fragment in text and "\n" not in text, text
    assert not (tmp_path / "changes.geojson").exists()


def test_qgis_process_runs_change(processing, indexes, tmp_path):  # noqa: F811
    output = tmp_path / "lost.gpkg"
    done = qgis_process(tmp_path, "rsmclip:change", BEFORE=indexes["before"], AFTER=indexes["after"], QUERIES=QUERY,
                        DIRECTION=1, TOP_K=3, OUTPUT=output)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    features = sorted(QgsVectorLayer(str(output), "lost", "ogr").getFeatures(), key=lambda f: f["rank"])
    assert len(features) == 3 and cell_of(features[0]["win_col"], features[0]["win_row"]) == LOST_TANKS
    far = qgis_process(tmp_path, "rsmclip:change", BEFORE=indexes["before"], AFTER=indexes["far"],
                       OUTPUT=tmp_path / "far.gpkg")
    assert far.returncode == 1
    error = [line for line in far.stderr.splitlines() if line.startswith("ERROR:")]
    assert error == [f"ERROR:\tTile index after (AFTER) {indexes['far']}: no tile matches a tile of "
                     f"{indexes['before']} (a different tiling, or no overlapping footprints); index both dates over "
                     "the same ground with the same tile size"], far.stderr[-2000:]


# ----------------------------------------------------------------------------------------------- the panel

@pytest.fixture
def panel(plugin, iface, scenes, demo_bundle):
    """The panel with the dates' GeoTIFFs as layers, the demo model and one tile per cell, on its Change tab."""
    layers = {name: add_raster(scenes[name]) for name in ("before", "after", "far")}
    dock = open_panel(plugin)
    dock.select_model(str(demo_bundle))
    dock.tile_unit.setCurrentIndex(dock.tile_unit.findData("px"))
    dock.tile_size.setValue(CELL)
    dock.tabs.setCurrentWidget(dock.change)
    return dock, layers


def find_changes(dock, before, after, query: str = "", direction: str = "appeared", top_k: int = 9,
                 timeout: float = 300) -> None:
    """Pick the layers, type the query, choose the direction and top k, click Find changes, wait for the task."""
    controls = dock.change
    controls.before_combo.setLayer(before)
    controls.after_combo.setLayer(after)
    controls.query.clear()
    if query:
        type_text(controls.query, query)
    controls.direction.setCurrentIndex(controls.direction.findData(direction))
    controls.top_k.setValue(top_k)
    QTest.mouseClick(controls.controls.run_button, Qt.LeftButton)
    assert controls.task is not None
    process_until(lambda: controls.task is None, timeout=timeout)


def listed(dock) -> list[list[str]]:
    results = dock.change.results
    return [[results.topLevelItem(row).text(col) for col in range(5)] for row in range(results.topLevelItemCount())]


def test_panel_change_draws_and_lists_the_changes(panel, iface, scenes, demo_bundle):
    from rsmclip_geo.api import SearchParams, TilingParams, change, load_model, scene_index

    dock, layers = panel
    find_changes(dock, layers["before"], layers["after"], QUERY, top_k=4)
    name = f"{QUERY} appeared, before → after"
    found = QgsProject.instance().mapLayersByName(name)
    assert len(found) == 1, messages(iface)
    layer = found[0]
    assert layer.crs() == layers["after"].crs() == QgsCoordinateReferenceSystem(CRS)
    features = sorted(layer.getFeatures(), key=lambda f: f["rank"])
    assert [f["rank"] for f in features] == [1, 2, 3, 4]
    assert features[0].geometry().contains(cell_centre(NEW_TANKS)), [f["tile_id"] for f in features]
    assert [f["rise"] for f in features] == sorted((f["rise"] for f in features), reverse=True)
    assert features[0].geometry().area() == pytest.approx((CELL * PIXEL_M) ** 2, rel=1e-6)
    # The panel shows the core's answer: the same cached indexes compared by api.change.
    model = load_model(demo_bundle)
    before, after = (scene_index(scenes[date], model=model, tiling=TilingParams(tile_size=CELL))
                     for date in ("before", "after"))
    core = change(before, after, QUERY, model=model, params=SearchParams(top_k=4)).changes
    assert [f["tile_id"] for f in features] == [c.tile_id for c in core]
    # Styled by rise, labelled by rank, just above the after layer.
    assert isinstance(layer.renderer(), QgsGraduatedSymbolRenderer)
    assert layer.renderer().classAttribute() == "rise"
    assert layer.labelsEnabled() and layer.labeling().settings().fieldName == "rank"
    order = [node.layer() for node in QgsProject.instance().layerTreeRoot().findLayers()]
    assert order.index(layer) == order.index(layers["after"]) - 1
    # The list mirrors the layer; a click zooms to the change.
    rows = listed(dock)
    assert [row[0] for row in rows] == ["1", "2", "3", "4"]
    assert [row[4] for row in rows] == [f["tile_id"] for f in features]
    assert rows[0][1:4] == [f"{features[0][field]:.3f}" for field in ("rise", "score_before", "score_after")]
    assert "4 changes of 9 tile pairs matched" in dock.change.controls.status.text()
    assert dock.change.controls.progress.value() == 100 and dock.change.controls.run_button.isEnabled()
    dock.change.results.itemClicked.emit(dock.change.results.topLevelItem(3), 0)
    canvas = iface.mapCanvas()
    assert canvas.extent().contains(features[3].geometry().centroid().asPoint())
    assert canvas.extent().width() < layers["after"].extent().width()


def test_panel_change_disappeared_and_any_change(panel):
    dock, layers = panel
    find_changes(dock, layers["before"], layers["after"], QUERY, direction="disappeared", top_k=3)
    lost = QgsProject.instance().mapLayersByName(f"{QUERY} disappeared, before → after")[0]
    best = min(lost.getFeatures(), key=lambda f: f["rank"])
    assert best.geometry().contains(cell_centre(LOST_TANKS))
    find_changes(dock, layers["before"], layers["after"], top_k=3)
    layer = QgsProject.instance().mapLayersByName("changes, before → after")[0]
    assert {cell_of(f["win_col"], f["win_row"]) for f in layer.getFeatures()} == set(CHANGED)
    assert all(row[2] == row[3] == "" for row in listed(dock))


@pytest.mark.parametrize("case, fragments", [
    ("far", ["After layer 'far': no tile matches a tile of layer 'before' (", "no overlapping footprints"]),
    ("no query", ["Direction disappeared: ", "give a query"]),
    ("same layer", ["Before and After are the same layer"]),
])
def test_panel_refusals_are_one_line(panel, iface, case, fragments):
    dock, layers = panel
    before, after, query, direction = {
        "far": (layers["before"], layers["far"], QUERY, "appeared"),
        "no query": (layers["before"], layers["after"], "", "disappeared"),
        "same layer": (layers["after"], layers["after"], QUERY, "appeared"),
    }[case]
    count = len(QgsProject.instance().mapLayers())
    controls = dock.change
    controls.before_combo.setLayer(before)
    controls.after_combo.setLayer(after)
    controls.query.setText(query)
    controls.direction.setCurrentIndex(controls.direction.findData(direction))
    QTest.mouseClick(controls.controls.run_button, Qt.LeftButton)
    process_until(lambda: controls.task is None, timeout=300)
    shown = messages(iface)
    assert len(shown) == 1 and all(fragment in shown[0] for fragment in fragments), shown
    assert "\n" not in shown[0] and "Traceback" not in shown[0] and ".parquet" not in shown[0]
    assert len(QgsProject.instance().mapLayers()) == count
    assert controls.controls.run_button.isEnabled()


def test_panel_change_cancel_stops_indexing_between_batches(panel, test_bundle):
    dock, layers = panel
    dock.select_model(str(test_bundle))
    dock.tile_size.setValue(16)  # hundreds of batches per layer with the tiny model
    controls = dock.change
    controls.before_combo.setLayer(layers["before"])
    controls.after_combo.setLayer(layers["far"])
    QTest.mouseClick(controls.controls.run_button, Qt.LeftButton)
    task = controls.task
    process_until(lambda: controls.controls.progress.value() > 0, timeout=120)
    QTest.mouseClick(controls.controls.cancel_button, Qt.LeftButton)
    process_until(lambda: controls.task is None, timeout=120)
    assert "Cancelled" in controls.controls.status.text()
    assert task.progress() < 100  # stopped while indexing
    assert controls.controls.run_button.isEnabled() and not controls.controls.cancel_button.isEnabled()
    assert not QgsProject.instance().mapLayersByName("changes, before → far")
