"""Relevance feedback on the map: a map tool that marks the tile under a click right or wrong, and the
layer that draws the judged tiles (green right, red wrong) from the core's labels."""

from __future__ import annotations

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsField,
    QgsFillSymbol,
    QgsGeometry,
    QgsPointXY,
    QgsProject,
    QgsRendererCategory,
    QgsVectorLayer,
)
from qgis.gui import QgsMapTool
from qgis.PyQt.QtCore import QVariant, Qt, pyqtSignal

LABELS_LAYER_NAME = "RS-M-CLIP labels"
#: Outline colour of judged tiles: right, wrong.
LABEL_COLOURS = {"positive": "#1a9641", "negative": "#d7191c"}
#: Marks the plugin's labels layer among the project's layers.
LABELS_PROPERTY = "rsmclip_search/labels"
_WGS84 = QgsCoordinateReferenceSystem("EPSG:4326")


class LabelTool(QgsMapTool):
    """Left click marks the tile under the cursor right, right click marks it wrong: ``clicked(lon, lat,
    positive)`` with the click in EPSG:4326."""

    clicked = pyqtSignal(float, float, bool)

    def __init__(self, canvas):
        super().__init__(canvas)
        self.setCursor(Qt.CursorShape.CrossCursor)

    def canvasReleaseEvent(self, event) -> None:  # noqa: N802 (QGIS API)
        if event.button() not in (Qt.MouseButton.LeftButton, Qt.MouseButton.RightButton):
            return
        point = self.toMapCoordinates(event.pos())
        to_wgs84 = QgsCoordinateTransform(self.canvas().mapSettings().destinationCrs(), _WGS84, QgsProject.instance())
        lonlat = to_wgs84.transform(point)
        self.clicked.emit(lonlat.x(), lonlat.y(), event.button() == Qt.MouseButton.LeftButton)


def labels_layer(labels) -> QgsVectorLayer:
    """A memory layer (EPSG:4326) of the judged tiles of ``labels`` (the core's Labels), outlined by label."""
    layer = QgsVectorLayer("Polygon?crs=EPSG:4326", LABELS_LAYER_NAME, "memory")
    provider = layer.dataProvider()
    provider.addAttributes([QgsField("tile_id", QVariant.String), QgsField("label", QVariant.String),
                            QgsField("scene", QVariant.String)])
    layer.updateFields()
    features = []
    for feature_json in labels.to_geojson()["features"]:
        feature = QgsFeature(layer.fields())
        ring = feature_json["geometry"]["coordinates"][0]
        feature.setGeometry(QgsGeometry.fromPolygonXY([[QgsPointXY(x, y) for x, y in ring]]))
        properties = feature_json["properties"]
        feature.setAttributes([properties["tile_id"], properties["label"], properties["scene"]])
        features.append(feature)
    provider.addFeatures(features)
    layer.updateExtents()
    categories = []
    for label, colour in LABEL_COLOURS.items():
        symbol = QgsFillSymbol.createSimple({"color": "0,0,0,0", "outline_color": colour, "outline_width": "0.8"})
        categories.append(QgsRendererCategory(label, symbol, label))
    layer.setRenderer(QgsCategorizedSymbolRenderer("label", categories))
    return layer


def show_labels_layer(labels, reference) -> QgsVectorLayer | None:
    """Replace the labels layer of the project by one of ``labels`` just above ``reference`` (the indexed
    raster); no layer when nothing is judged. The new layer, or None."""
    from .layers import add_above

    project = QgsProject.instance()
    for old in project.mapLayersByName(LABELS_LAYER_NAME):
        if old.customProperty(LABELS_PROPERTY):
            project.removeMapLayer(old.id())
    if not labels:
        return None
    layer = labels_layer(labels)
    layer.setCustomProperty(LABELS_PROPERTY, True)
    add_above(layer, reference)
    return layer
