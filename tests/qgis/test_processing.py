"""The plugin's Processing provider in real QGIS: each algorithm through processing.run on real GeoTIFFs,
a two-step model (index -> text search), errors and cancel through Processing, and `qgis_process run`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from qgis.core import (
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsGeometry,
    QgsPointXY,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingModelAlgorithm,
    QgsProcessingModelChildAlgorithm,
    QgsProcessingModelChildParameterSource,
    QgsProcessingModelOutput,
    QgsProcessingModelParameter,
    QgsProcessingParameterMultipleLayers,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis_window import PLUGIN_PARENT, REPO

COLORADO = "colorado_rgb_15cm.tif"  # 383 x 232 px, EPSG:26913
FARM = "pix4d_farm_rgba_35cm.tif"  # 686 x 758 px, EPSG:32750
TILE_PX = 64
WGS84 = QgsCoordinateReferenceSystem("EPSG:4326")


@pytest.fixture(scope="module")
def processing(qgis_app, cache_dir):
    """Processing initialised, with the provider registered by the plugin as QGIS does (initProcessing)."""
    plugins = str(Path(QgsApplication.pkgDataPath()) / "python" / "plugins")
    if plugins not in sys.path:
        sys.path.append(plugins)
    import processing as qgis_processing
    import rsmclip_search
    from processing.core.Processing import Processing

    Processing.initialize()
    plugin = rsmclip_search.classFactory(None)
    plugin.initProcessing()
    yield qgis_processing
    plugin.unload()


@pytest.fixture(scope="module")
def geotiffs(shared_data) -> Path:
    return shared_data / "geotiff"


@pytest.fixture(scope="module")
def two_scene_index(processing, geotiffs, test_bundle, tmp_path_factory) -> dict:
    """Two scenes in different CRSs indexed by rsmclip:index; its results."""
    output = tmp_path_factory.mktemp("processing-index") / "two-scenes.parquet"
    return processing.run("rsmclip:index", {
        "INPUT": [str(geotiffs / COLORADO), str(geotiffs / FARM)], "TILE_SIZE": TILE_PX, "TILE_UNIT": 0,
        "MODEL": str(test_bundle), "OUTPUT": str(output),
    })


class ProgressLog(QgsProcessingFeedback):
    """Feedback keeping every progress value."""

    def __init__(self):
        super().__init__()
        self.values: list[float] = []

    def setProgress(self, progress: float) -> None:  # noqa: N802 (QGIS API)
        super().setProgress(progress)
        self.values.append(progress)


class CancelAfterFirstBatch(QgsProcessingFeedback):
    """Feedback whose isCanceled() turns true once the job reports progress."""

    def setProgress(self, progress: float) -> None:  # noqa: N802 (QGIS API)
        super().setProgress(progress)
        if progress > 0:
            self.cancel()


def hit_features(path) -> tuple[QgsVectorLayer, list[QgsFeature]]:
    layer = QgsVectorLayer(str(path), "hits", "ogr")
    assert layer.isValid(), path
    return layer, list(layer.getFeatures())


def extent_text(extent: QgsRectangle, authid: str) -> str:
    """An extent as Processing takes it: xmin,xmax,ymin,ymax [CRS]."""
    return f"{extent.xMinimum()},{extent.xMaximum()},{extent.yMinimum()},{extent.yMaximum()} [{authid}]"


def lonlat_extent(raster_path: Path) -> QgsRectangle:
    raster = QgsRasterLayer(str(raster_path), "scene", "gdal")
    transform = QgsCoordinateTransform(raster.crs(), WGS84, QgsProject.instance())
    return transform.transformBoundingBox(raster.extent())


def test_plugin_registers_and_removes_the_provider(qgis_app):
    import rsmclip_search

    registry = QgsApplication.processingRegistry()
    plugin = rsmclip_search.classFactory(None)
    plugin.initProcessing()
    provider = registry.providerById("rsmclip")
    assert provider is not None and not provider.icon().isNull()
    assert sorted(a.id() for a in provider.algorithms()) == [
        "rsmclip:change", "rsmclip:feedbacksearch", "rsmclip:heatmap", "rsmclip:index", "rsmclip:similar",
        "rsmclip:stacindex",
        "rsmclip:textsearch"]
    assert {a.group() for a in provider.algorithms()} == {"Tile search"}
    plugin.unload()
    assert registry.providerById("rsmclip") is None


def test_index_two_scenes_in_different_crs(processing, geotiffs, test_bundle, tmp_path):
    from rsmclip_geo.api import open_index

    feedback = ProgressLog()
    output = tmp_path / "index.parquet"
    result = processing.run("rsmclip:index", {
        "INPUT": [str(geotiffs / COLORADO), str(geotiffs / FARM)], "TILE_SIZE": TILE_PX, "MODEL": str(test_bundle),
        "OUTPUT": str(output),
    }, feedback=feedback)
    assert result["OUTPUT"] == str(output)
    index = open_index(output, in_memory=True)
    assert result["TILES"] == len(index) > 0
    crss = {QgsCoordinateReferenceSystem.fromWkt(scene["crs"]).authid() for scene in index.scenes.values()}
    assert crss == {"EPSG:26913", "EPSG:32750"}
    assert set(index.column("win_width")) == set(index.column("win_height")) == {TILE_PX}
    assert feedback.values and feedback.values[-1] == pytest.approx(100.0)
    assert feedback.values == sorted(feedback.values)


def test_textsearch_hits_are_polygons_in_wgs84_with_hit_fields(processing, two_scene_index, test_bundle, geotiffs,
                                                               tmp_path):
    from rsmclip_geo.api import HIT_PROPERTIES, SearchParams, search

    queries = ["aeroporto", "储油罐"]
    result = processing.run("rsmclip:textsearch", {
        "INDEX": two_scene_index["OUTPUT"], "QUERIES": "\n".join(queries) + "\n", "TOP_K": 3,
        "MODEL": str(test_bundle), "OUTPUT": str(tmp_path / "hits.gpkg"),
    })
    layer, features = hit_features(result["OUTPUT"])
    assert layer.crs().authid() == "EPSG:4326"
    assert [field.name() for field in layer.fields() if field.name() != "fid"] == list(HIT_PROPERTIES)
    core = search(two_scene_index["OUTPUT"], queries, model=str(test_bundle), params=SearchParams(top_k=3)).hits
    assert [(f["query"], f["rank"], f["tile_id"]) for f in features] == [(h.query, h.rank, h.tile_id) for h in core]
    assert [f["score"] for f in features] == pytest.approx([h.score for h in core], abs=1e-6)
    scenes = {COLORADO: lonlat_extent(geotiffs / COLORADO), FARM: lonlat_extent(geotiffs / FARM)}
    for feature in features:
        box = feature.geometry().boundingBox()
        scene = scenes[Path(feature["scene"]).name]
        assert scene.contains(box.center()), (feature["tile_id"], box.toString())


def test_textsearch_area_of_interest_from_a_vector_layer_or_an_extent(processing, two_scene_index, test_bundle,
                                                                      geotiffs):
    colorado = QgsRasterLayer(str(geotiffs / COLORADO), "colorado", "gdal")
    left = QgsRectangle(colorado.extent())
    left.setXMaximum(left.center().x())
    aoi = QgsVectorLayer(f"Polygon?crs={colorado.crs().authid()}", "aoi", "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromRect(left))
    aoi.dataProvider().addFeatures([feature])
    common = {"INDEX": two_scene_index["OUTPUT"], "QUERIES": "telhados", "TOP_K": 50, "MODEL": str(test_bundle),
              "OUTPUT": "TEMPORARY_OUTPUT"}
    by_layer = processing.run("rsmclip:textsearch", {**common, "AOI": aoi})["OUTPUT"]
    extent = extent_text(left, "EPSG:26913")
    by_extent = processing.run("rsmclip:textsearch", {**common, "EXTENT": extent})["OUTPUT"]
    everywhere = processing.run("rsmclip:textsearch", common)["OUTPUT"]
    area = QgsGeometry.fromRect(left)
    area.transform(QgsCoordinateTransform(colorado.crs(), WGS84, QgsProject.instance()))
    tiles = [f["tile_id"] for f in by_layer.getFeatures()]
    # The extent becomes its lon/lat bounding box, which holds the reprojected polygon.
    assert tiles and set(tiles) <= {f["tile_id"] for f in by_extent.getFeatures()}
    assert len(tiles) < by_extent.featureCount() < everywhere.featureCount()
    for hit in by_layer.getFeatures():
        assert Path(hit["scene"]).name == COLORADO
        assert hit.geometry().intersects(area)
    with pytest.raises(QgsProcessingException, match=r"^Area of interest layer \(AOI\): .*not both"):
        processing.run("rsmclip:textsearch", {**common, "AOI": aoi, "EXTENT": extent})


def test_similar_by_tile_ids_and_by_points(processing, two_scene_index, test_bundle, geotiffs):
    from rsmclip_geo.api import open_index

    index = open_index(two_scene_index["OUTPUT"], in_memory=True)
    row = next(i for i, scene in enumerate(index.column("scene")) if Path(scene).name == FARM)
    tile_id = str(index.column("tile_id")[row])
    common = {"INDEX": two_scene_index["OUTPUT"], "TOP_K": 5, "MODEL": str(test_bundle), "OUTPUT": "TEMPORARY_OUTPUT"}
    by_id = processing.run("rsmclip:similar", {**common, "TILE_IDS": tile_id})["OUTPUT"]
    hits = list(by_id.getFeatures())
    assert by_id.crs().authid() == "EPSG:4326"
    assert [f["rank"] for f in hits] == [1, 2, 3, 4, 5]
    assert {f["query"] for f in hits} == {f"tile:{tile_id}"}
    assert tile_id not in [f["tile_id"] for f in hits]
    # A point (in the scene's CRS) at the centre of that tile picks it.
    ring = index.scene_footprint(row)
    centre = QgsPointXY(sum(x for x, _ in ring[:4]) / 4, sum(y for _, y in ring[:4]) / 4)
    points = QgsVectorLayer("Point?crs=EPSG:32750", "examples", "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromPointXY(centre))
    points.dataProvider().addFeatures([feature])
    by_point = processing.run("rsmclip:similar", {**common, "POINTS": points})["OUTPUT"]
    assert [f["tile_id"] for f in by_point.getFeatures()] == [f["tile_id"] for f in hits]
    outside = QgsVectorLayer("Point?crs=EPSG:4326", "nowhere", "memory")
    feature.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(0.0, 0.0)))
    outside.dataProvider().addFeatures([feature])
    with pytest.raises(QgsProcessingException, match=r"^Example points \(POINTS\): .*lies on no tile"):
        processing.run("rsmclip:similar", {**common, "POINTS": outside})


def test_heatmap_raster_in_scene_crs(processing, two_scene_index, test_bundle, geotiffs, tmp_path):
    common = {"INDEX": two_scene_index["OUTPUT"], "QUERY": "árvores", "MODEL": str(test_bundle)}
    result = processing.run("rsmclip:heatmap", {**common, "SCENE": COLORADO, "OUTPUT": str(tmp_path / "heat.tif")})
    heat = QgsRasterLayer(result["OUTPUT"], "heat", "gdal")
    scene = QgsRasterLayer(str(geotiffs / COLORADO), "scene", "gdal")
    assert heat.isValid() and heat.crs().authid() == "EPSG:26913"
    assert heat.extent().intersects(scene.extent())
    stats = heat.dataProvider().bandStatistics(1)
    best = processing.run("rsmclip:textsearch", {
        "INDEX": two_scene_index["OUTPUT"], "QUERIES": "árvores", "TOP_K": 1, "MODEL": str(test_bundle),
        "EXTENT": extent_text(scene.extent(), "EPSG:26913"), "OUTPUT": "TEMPORARY_OUTPUT"})["OUTPUT"]
    assert stats.maximumValue == pytest.approx(next(best.getFeatures())["score"], abs=1e-4)
    with pytest.raises(QgsProcessingException, match=r"^Scene \(SCENE\): .*holds 2 scenes"):
        processing.run("rsmclip:heatmap", {**common, "OUTPUT": str(tmp_path / "both.tif")})
    assert not (tmp_path / "both.tif").exists()


@pytest.mark.parametrize(("algorithm", "parameters", "start"), [
    ("rsmclip:index", {"OVERLAP": 0.97}, "Overlap (OVERLAP) 0.97: "),
    ("rsmclip:index", {"SCALES": "1,x"}, "Scales (SCALES) 1,x: "),
    ("rsmclip:index", {"BANDS": "3,2"}, "RGB bands (BANDS): 3,2 "),
    ("rsmclip:textsearch", {"TOP_K": 0}, "Hits per query (TOP_K) 0: "),
    ("rsmclip:textsearch", {"THRESHOLD": 1.5}, "Minimum score (THRESHOLD) 1.5: "),
    ("rsmclip:textsearch", {"QUERIES": " \n"}, "Queries (QUERIES): "),
])
def test_bad_parameter_is_one_line_naming_the_processing_parameter(processing, two_scene_index, test_bundle, geotiffs,
                                                                   tmp_path, algorithm, parameters, start):
    base = {
        "rsmclip:index": {"INPUT": [str(geotiffs / COLORADO)], "TILE_SIZE": TILE_PX,
                          "OUTPUT": str(tmp_path / "i.parquet")},
        "rsmclip:textsearch": {"INDEX": two_scene_index["OUTPUT"], "QUERIES": "estrada", "OUTPUT": "TEMPORARY_OUTPUT"},
    }[algorithm]
    with pytest.raises(QgsProcessingException) as raised:
        processing.run(algorithm, {**base, "MODEL": str(test_bundle), **parameters})
    message = str(raised.value)
    assert message.startswith(start), message
    assert "\n" not in message.strip()
    assert not list(tmp_path.iterdir())


def test_cancel_through_feedback_stops_indexing(processing, geotiffs, test_bundle, tmp_path):
    output = tmp_path / "cancelled.parquet"
    feedback = CancelAfterFirstBatch()
    with pytest.raises(QgsProcessingException, match=r"^\S+: indexing cancelled; rerun to resume$"):
        processing.run("rsmclip:index", {"INPUT": [str(geotiffs / "fotomap_4band_2cm.tif")], "TILE_SIZE": 24,
                                         "BANDS": "1,2,3", "MODEL": str(test_bundle), "OUTPUT": str(output)},
                       feedback=feedback)
    assert feedback.isCanceled()
    assert not output.exists()


def test_model_index_then_textsearch(processing, geotiffs, test_bundle, tmp_path):
    model = QgsProcessingModelAlgorithm("index then search", "rsmclip tests")
    scenes = QgsProcessingModelParameter("scenes")
    model.addModelParameter(QgsProcessingParameterMultipleLayers("scenes", "Scenes", QgsProcessing.TypeRaster), scenes)
    index = QgsProcessingModelChildAlgorithm("rsmclip:index")
    index.setChildId("index")
    index.addParameterSources("INPUT", [QgsProcessingModelChildParameterSource.fromModelParameter("scenes")])
    for name, value in {"TILE_SIZE": TILE_PX, "MODEL": str(test_bundle)}.items():
        index.addParameterSources(name, [QgsProcessingModelChildParameterSource.fromStaticValue(value)])
    model.addChildAlgorithm(index)
    search = QgsProcessingModelChildAlgorithm("rsmclip:textsearch")
    search.setChildId("search")
    search.addParameterSources("INDEX", [QgsProcessingModelChildParameterSource.fromChildOutput("index", "OUTPUT")])
    for name, value in {"QUERIES": "casas\nárvores", "TOP_K": 2, "MODEL": str(test_bundle)}.items():
        search.addParameterSources(name, [QgsProcessingModelChildParameterSource.fromStaticValue(value)])
    hits = QgsProcessingModelOutput("hits", "Hits")
    hits.setChildOutputName("OUTPUT")
    search.setModelOutputs({"hits": hits})
    model.addChildAlgorithm(search)
    assert model.dependsOnChildAlgorithms("search") == {"index"}
    output = tmp_path / "model-hits.gpkg"
    result = processing.run(model, {"scenes": [str(geotiffs / COLORADO), str(geotiffs / FARM)],
                                    "search:hits": str(output)})
    layer, features = hit_features(result["search:hits"])
    assert layer.crs().authid() == "EPSG:4326"
    assert [(f["query"], f["rank"]) for f in features] == [("casas", 1), ("casas", 2), ("árvores", 1), ("árvores", 2)]


def qgis_process_profile(root: Path) -> Path:
    """A QGIS settings folder whose default profile has the plugin installed and enabled."""
    profile = root / "profiles" / "default"
    (profile / "python" / "plugins").mkdir(parents=True)
    (profile / "python" / "plugins" / "rsmclip_search").symlink_to(PLUGIN_PARENT / "rsmclip_search")
    (profile / "QGIS").mkdir()
    (profile / "QGIS" / "QGIS3.ini").write_text("[PythonPlugins]\nrsmclip_search=true\n", encoding="utf-8")
    return root


def qgis_process(tmp_path: Path, algorithm: str, **parameters) -> subprocess.CompletedProcess:
    """`qgis_process.bin run ALGORITHM -- NAME=VALUE …` with the plugin enabled in a profile under `tmp_path`."""
    binary = shutil.which("qgis_process.bin") or "/usr/bin/qgis_process.bin"
    if not Path(binary).is_file():
        pytest.fail("qgis_process.bin not found: apt-get install qgis (scripts/setup.sh does)")
    profile = tmp_path / "qgis"
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen",
               QGIS_CUSTOM_CONFIG_PATH=str(profile if profile.is_dir() else qgis_process_profile(profile)),
               PYTHONPATH=os.pathsep.join([str(REPO), sysconfig.get_paths()["purelib"]]))
    return subprocess.run([binary, "run", algorithm, "--", *(f"{name}={value}" for name, value in parameters.items())],
                          capture_output=True, text=True, env=env, timeout=300)


def test_qgis_process_runs_textsearch(processing, two_scene_index, test_bundle, tmp_path):
    output = tmp_path / "hits.gpkg"
    done = qgis_process(tmp_path, "rsmclip:textsearch", INDEX=two_scene_index["OUTPUT"], QUERIES="aeroporto", TOP_K=4,
                        MODEL=test_bundle, OUTPUT=output)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    layer, features = hit_features(output)
    assert layer.crs().authid() == "EPSG:4326"
    assert [f["rank"] for f in features] == [1, 2, 3, 4]
    assert {f["query"] for f in features} == {"aeroporto"}
    bad = qgis_process(tmp_path, "rsmclip:textsearch", INDEX=two_scene_index["OUTPUT"], QUERIES="aeroporto", TOP_K=0,
                       MODEL=test_bundle, OUTPUT=tmp_path / "bad.gpkg")
    assert bad.returncode == 1
    assert "ERROR:\tHits per query (TOP_K) 0: give a positive number of hits\n" in bad.stderr, bad.stderr[-2000:]
