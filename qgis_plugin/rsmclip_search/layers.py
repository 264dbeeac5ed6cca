"""QGIS layers from the core's results: hit and change polygons in the raster's CRS styled by score or rise,
the score heatmap raster, placement in the layer tree and zooming."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsField,
    QgsFillSymbol,
    QgsGeometry,
    QgsGraduatedSymbolRenderer,
    QgsMapLayer,
    QgsPalLayerSettings,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsRendererRange,
    QgsSingleBandPseudoColorRenderer,
    QgsStyle,
    QgsTextBufferSettings,
    QgsTextFormat,
    QgsVectorLayer,
    QgsVectorLayerSimpleLabeling,
)
from qgis.PyQt.QtCore import QVariant
from qgis.PyQt.QtGui import QColor

COLOUR_CLASSES = 5  # graduated classes of a result layer
COLOR_RAMP = "Viridis"
FILL_ALPHA = 50  # of 255: the scene stays visible through the tiles


def field_type(kind: str) -> QVariant.Type:
    """The QGIS field type of a hit or change property's Arrow type (the core's HIT_PROPERTIES, CHANGE_PROPERTIES)."""
    if kind.startswith("int"):
        return QVariant.Int
    return QVariant.Double if kind.startswith("float") else QVariant.String


def result_layer(items: Sequence, rings: Sequence[Sequence[tuple[float, float]]], crs_wkt: str, name: str,
                 properties: dict[str, str], value: str) -> QgsVectorLayer:
    """A memory polygon layer (CRS ``crs_wkt``) with one feature per hit or change (``items``, in rank order),
    its fields ``properties`` (the core's name -> Arrow type), coloured by the field ``value`` (``score`` of a
    hit, ``rise`` of a change) and labelled by rank; ``rings`` are the items' footprints in that CRS
    (``TileIndex.scene_footprint``)."""
    crs = QgsCoordinateReferenceSystem.fromWkt(crs_wkt)
    layer = QgsVectorLayer("Polygon", name, "memory")
    layer.setCrs(crs)
    provider = layer.dataProvider()
    provider.addAttributes([QgsField(field, field_type(kind)) for field, kind in properties.items()])
    layer.updateFields()
    features = []
    for item, ring in zip(items, rings):
        feature = QgsFeature(layer.fields())
        feature.setGeometry(QgsGeometry.fromPolygonXY([[QgsPointXY(x, y) for x, y in ring]]))
        feature.setAttributes(list(item.properties().values()))
        features.append(feature)
    provider.addFeatures(features)
    layer.updateExtents()
    style_graduated(layer, value, [float(getattr(item, value)) for item in items])
    label_by_rank(layer)
    return layer


def style_graduated(layer: QgsVectorLayer, field: str, values: Sequence[float]) -> None:
    """Graduated colours on ``field`` (equal intervals between the lowest and highest of ``values``),
    coloured outlines over a mostly transparent fill."""
    ramp = QgsStyle.defaultStyle().colorRamp(COLOR_RAMP)
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    classes = COLOUR_CLASSES if high > low else 1
    step = (high - low) / classes
    ranges = []
    for i in range(classes):
        lower = low + i * step
        upper = high if i == classes - 1 else low + (i + 1) * step
        color = ramp.color((i + 1) / classes if classes > 1 else 1.0)
        fill = QColor(color)
        fill.setAlpha(FILL_ALPHA)
        symbol = QgsFillSymbol.createSimple(
            {
                "color": fill.name(QColor.NameFormat.HexArgb),
                "outline_color": color.name(),
                "outline_width": "0.7",
            }
        )
        ranges.append(QgsRendererRange(lower, upper, symbol, f"{lower:.3f} – {upper:.3f}"))
    renderer = QgsGraduatedSymbolRenderer(field, ranges)
    renderer.setSourceColorRamp(ramp)
    layer.setRenderer(renderer)


def label_by_rank(layer: QgsVectorLayer) -> None:
    """Rank numbers at the tile centres, with a white buffer."""
    settings = QgsPalLayerSettings()
    settings.fieldName = "rank"
    settings.placement = QgsPalLayerSettings.Placement.OverPoint
    text = QgsTextFormat()
    text.setSize(10)
    buffer = QgsTextBufferSettings()
    buffer.setEnabled(True)
    buffer.setSize(1.0)
    text.setBuffer(buffer)
    settings.setFormat(text)
    layer.setLabeling(QgsVectorLayerSimpleLabeling(settings))
    layer.setLabelsEnabled(True)


def heatmap_layer(path: Path, name: str) -> QgsRasterLayer:
    """The core's float32 score GeoTIFF as a semi-transparent pseudocolour layer."""
    layer = QgsRasterLayer(str(path), name, "gdal")
    stats = layer.dataProvider().bandStatistics(1)
    renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), 1)
    renderer.setClassificationMin(stats.minimumValue)
    renderer.setClassificationMax(stats.maximumValue)
    renderer.createShader(QgsStyle.defaultStyle().colorRamp(COLOR_RAMP))
    layer.setRenderer(renderer)
    layer.renderer().setOpacity(0.6)
    return layer


def add_above(layer: QgsMapLayer, reference: QgsMapLayer | None) -> None:
    """Add ``layer`` to the project just above ``reference`` in the layer tree (at the top when
    there is none). A result layer of this plugin with the same name (the same query run again)
    is replaced: each query keeps one layer."""
    project = QgsProject.instance()
    for old in project.mapLayersByName(layer.name()):
        if old.customProperty("rsmclip_search/result"):
            project.removeMapLayer(old.id())
    layer.setCustomProperty("rsmclip_search/result", True)
    project.addMapLayer(layer, False)
    root = project.layerTreeRoot()
    node = root.findLayer(reference.id()) if reference is not None else None
    if node is None:
        root.insertLayer(0, layer)
        return
    parent = node.parent()
    parent.insertLayer(parent.children().index(node), layer)


def zoom_to(canvas, extent: QgsRectangle, crs: QgsCoordinateReferenceSystem, margin: float = 0.5) -> None:
    """Zoom the canvas to ``extent`` (in ``crs``) grown by ``margin`` of its size."""
    transform = QgsCoordinateTransform(crs, canvas.mapSettings().destinationCrs(), QgsProject.instance())
    rect = transform.transformBoundingBox(extent)
    rect.scale(1.0 + margin)
    canvas.setExtent(rect)
    canvas.refresh()


def zoom_to_rank(canvas, layer: QgsVectorLayer, rank: int) -> None:
    """Zoom the canvas to the feature of a result layer with this rank, and select it."""
    for feature in layer.getFeatures():
        if feature["rank"] == rank:
            zoom_to(canvas, feature.geometry().boundingBox(), layer.crs())
            layer.selectByIds([feature.id()])
            return


def raster_source(layer) -> str:
    """What the core reads for a GDAL raster layer: its file, or its remote location (a /vsicurl/, /vsis3/…
    source or a URL); RsmclipError for other layers."""
    from qgis.core import QgsProviderRegistry
    from rsmclip_geo.api import is_remote
    from rsmclip_geo.errors import RsmclipError

    if not isinstance(layer, QgsRasterLayer):
        raise RsmclipError("Raster layer: choose a raster layer of the project to index")
    if layer.providerType() != "gdal":
        raise RsmclipError(f"Raster layer '{layer.name()}' is a {layer.providerType()} layer: index a GDAL raster")
    path = QgsProviderRegistry.instance().decodeUri("gdal", layer.source()).get("path") or ""
    if is_remote(path):
        return path
    if not Path(path).is_file():
        raise RsmclipError(f"Raster layer '{layer.name()}': its source {path or layer.source()} is neither a file "
                           "nor a remote raster")
    return path
