"""What every RS-M-CLIP algorithm shares: the MODEL and THREADS parameters, the index and search
parameters, the bridge from Processing's feedback to the core's progress and cancel callbacks, the
translation of core errors into QgsProcessingException, and the hits output layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsFeatureSink,
    QgsField,
    QgsFields,
    QgsGeometry,
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeatureSource,
    QgsProcessingFeedback,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
    QgsWkbTypes,
)
from qgis.PyQt.QtGui import QIcon

from .. import deps
from ..layers import field_type

ICON = str(Path(__file__).resolve().parent.parent / "icon.svg")
#: Hits and areas of interest are exchanged with the core in lon/lat.
WGS84 = QgsCoordinateReferenceSystem("EPSG:4326")
INDEX_FILTER = "GeoParquet tile index (*.parquet *.PARQUET);;All files (*.*)"

MODEL, THREADS, INDEX, OUTPUT = "MODEL", "THREADS", "INDEX", "OUTPUT"
TOP_K, THRESHOLD, AOI, EXTENT = "TOP_K", "THRESHOLD", "AOI", "EXTENT"

Parameters = dict[str, Any]


class RsmclipAlgorithm(QgsProcessingAlgorithm):
    """Base of the provider's algorithms: a subclass sets NAME, DISPLAY_NAME and HELP, adds its own
    parameters in ``add_parameters`` and does its work in ``process`` through ``rsmclip_geo.api``."""

    NAME = ""
    DISPLAY_NAME = ""
    HELP = ""
    #: What an empty MODEL means for this algorithm.
    MODEL_DEFAULT = "the index's own model"
    #: A core parameter name -> this algorithm's parameter, where it is not the core's name in capitals.
    WORDS: dict[str, str] = {}

    def name(self) -> str:
        return self.NAME

    def displayName(self) -> str:  # noqa: N802 (QGIS API)
        return self.DISPLAY_NAME

    def group(self) -> str:
        return "Tile search"

    def groupId(self) -> str:  # noqa: N802 (QGIS API)
        return "tilesearch"

    def icon(self) -> QIcon:
        return QIcon(ICON)

    def shortHelpString(self) -> str:  # noqa: N802 (QGIS API)
        return (f"{self.HELP}<p>Model bundle: a bundle name or folder; empty: {self.MODEL_DEFAULT}. "
                "Threads: 0 uses all cores.</p>")

    def createInstance(self) -> RsmclipAlgorithm:  # noqa: N802 (QGIS API)
        return type(self)()

    def initAlgorithm(self, config: dict | None = None) -> None:  # noqa: N802 (QGIS API)
        self.add_parameters()
        model = QgsProcessingParameterString(MODEL, "Model bundle",
                                             defaultValue="", optional=True)
        threads = QgsProcessingParameterNumber(THREADS, "Threads", QgsProcessingParameterNumber.Integer,
                                               defaultValue=0)
        for parameter in (model, threads):
            parameter.setFlags(parameter.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(parameter)

    def add_parameters(self) -> None:
        """Add the algorithm's own parameters and outputs."""
        raise NotImplementedError

    def process(self, parameters: Parameters, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> dict:
        """The algorithm's work; core errors are translated by processAlgorithm."""
        raise NotImplementedError

    def processAlgorithm(self, parameters: Parameters, context: QgsProcessingContext,  # noqa: N802 (QGIS API)
                         feedback: QgsProcessingFeedback) -> dict:
        missing = deps.missing_dependencies()
        if missing:
            found = "; ".join(f"{dep.module} ({dep.hint})" for dep in missing)
            raise QgsProcessingException(f"RS-M-CLIP Search cannot run, missing: {found}")
        from rsmclip_geo.errors import RsmclipError

        try:
            return self.process(parameters, context, feedback)
        except RsmclipError as error:
            raise QgsProcessingException(error.worded(self.word_for)) from None

    # ----------------------------------------------------------------- wording
    def named(self, name: str) -> str:
        """A parameter as a user knows it: its description, then the name processing.run and qgis_process take."""
        return f"{self.parameterDefinition(name).description()} ({name})"

    def word_for(self, param: str) -> str | None:
        """This algorithm's words for a core parameter, None when it has no such parameter."""
        name = self.WORDS.get(param, param.upper())
        return self.named(name) if self.parameterDefinition(name) is not None else None

    def fail(self, name: str, problem: str) -> QgsProcessingException:
        """An error about one of this algorithm's parameters, worded like the core's."""
        return QgsProcessingException(f"{self.named(name)}: {problem}")

    # ------------------------------------------------------- common parameters
    def model_spec(self, parameters: Parameters, context: QgsProcessingContext) -> str | None:
        """The MODEL bundle name or folder; None for the default."""
        return self.parameterAsString(parameters, MODEL, context).strip() or None

    def threads(self, parameters: Parameters, context: QgsProcessingContext) -> int | None:
        """THREADS, None for all cores."""
        return self.parameterAsInt(parameters, THREADS, context) or None

    def add_index_parameter(self) -> None:
        self.addParameter(QgsProcessingParameterFile(INDEX, "Tile index", QgsProcessingParameterFile.File,
                                                     fileFilter=INDEX_FILTER))

    def index_path(self, parameters: Parameters, context: QgsProcessingContext) -> str:
        return self.parameterAsFile(parameters, INDEX, context)

    def add_search_parameters(self, top_k: str = "Hits per query", threshold: str = "Minimum score") -> None:
        """TOP_K, THRESHOLD and the area of interest (AOI layer or EXTENT); `top_k` and `threshold` describe the
        first two."""
        self.addParameter(QgsProcessingParameterNumber(TOP_K, top_k, QgsProcessingParameterNumber.Integer,
                                                       defaultValue=10))
        self.addParameter(QgsProcessingParameterNumber(THRESHOLD, threshold,
                                                       QgsProcessingParameterNumber.Double, optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(AOI, "Area of interest layer",
                                                              [QgsProcessing.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterExtent(EXTENT, "Area of interest extent", optional=True))

    def search_params(self, parameters: Parameters, context: QgsProcessingContext):
        """The core's SearchParams from TOP_K, THRESHOLD and AOI or EXTENT."""
        from rsmclip_geo.api import SearchParams

        threshold = None if is_unset(parameters.get(THRESHOLD)) else self.parameterAsDouble(parameters, THRESHOLD,
                                                                                           context)
        return SearchParams(top_k=self.parameterAsInt(parameters, TOP_K, context), threshold=threshold,
                            aoi=self.area_of_interest(parameters, context))

    def area_of_interest(self, parameters: Parameters, context: QgsProcessingContext):
        """The AOI layer's features or the EXTENT as one shapely geometry in EPSG:4326 (None: no AOI)."""
        import shapely

        source = self.parameterAsSource(parameters, AOI, context)
        extent_given = not is_unset(parameters.get(EXTENT))
        if source is not None and extent_given:
            raise self.fail(AOI, f"give an area of interest layer or an extent ({EXTENT}), not both")
        if source is not None:
            geometries = lonlat_geometries(source, context)
            if not geometries:
                raise self.fail(AOI, "the layer has no features; choose a layer with polygons or leave it empty")
            return shapely.union_all(geometries)
        if extent_given:
            box = self.parameterAsExtent(parameters, EXTENT, context, WGS84)
            return shapely.box(box.xMinimum(), box.yMinimum(), box.xMaximum(), box.yMaximum())
        return None

    # --------------------------------------------------------- feedback bridge
    @staticmethod
    def progress(feedback: QgsProcessingFeedback) -> Callable[[int, int], None]:
        """The core's progress(done, total) callback reporting to ``feedback``."""
        return lambda done, total: feedback.setProgress(100.0 * done / total if total else 0.0)

    # ------------------------------------------------------------ hits output
    def add_hits_output(self, description: str = "Hits") -> None:
        self.addParameter(QgsProcessingParameterFeatureSink(OUTPUT, description, QgsProcessing.TypeVectorPolygon))

    def write_hits(self, parameters: Parameters, context: QgsProcessingContext, feedback: QgsProcessingFeedback,
                   hits: Sequence, properties: dict[str, str] | None = None) -> str:
        """The hits (or changes) as polygons in EPSG:4326 with the fields `properties` (name -> Arrow type; default
        the core's HIT_PROPERTIES) in order; the sink's id."""
        import shapely
        from rsmclip_geo.api import HIT_PROPERTIES

        fields = QgsFields()
        for name, kind in (properties or HIT_PROPERTIES).items():
            fields.append(QgsField(name, field_type(kind)))
        sink, dest_id = self.parameterAsSink(parameters, OUTPUT, context, fields, QgsWkbTypes.Polygon, WGS84)
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, OUTPUT))
        for done, hit in enumerate(hits):
            if feedback.isCanceled():
                break
            feature = QgsFeature(fields)
            wkt = shapely.to_wkt(hit.geometry, rounding_precision=-1, output_dimension=2)
            feature.setGeometry(QgsGeometry.fromWkt(wkt))
            feature.setAttributes(list(hit.properties().values()))
            sink.addFeature(feature, QgsFeatureSink.FastInsert)
            feedback.setProgress(100.0 * (done + 1) / len(hits))
        return dest_id


def is_unset(value: object) -> bool:
    """Whether an optional parameter was left empty (absent, None or an empty string)."""
    return value is None or value == ""


def lonlat_geometries(source: QgsProcessingFeatureSource, context: QgsProcessingContext) -> list:
    """The features of a source as shapely geometries in EPSG:4326."""
    import shapely

    transform = QgsCoordinateTransform(source.sourceCrs(), WGS84, context.transformContext())
    geometries = []
    for feature in source.getFeatures():
        geometry = QgsGeometry(feature.geometry())
        if geometry.isEmpty():
            continue
        geometry.transform(transform)
        geometries.append(shapely.from_wkb(bytes(geometry.asWkb())))
    return geometries
