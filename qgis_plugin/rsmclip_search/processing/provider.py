"""The Processing provider registered by the plugin (id ``rsmclip``)."""

from __future__ import annotations

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .algorithms import ALGORITHMS
from .base import ICON


class RsmclipProvider(QgsProcessingProvider):
    """Holds one instance of each algorithm of ``algorithms.ALGORITHMS``."""

    def id(self) -> str:
        return "rsmclip"

    def name(self) -> str:
        return "RS-M-CLIP Search"

    def longName(self) -> str:  # noqa: N802 (QGIS API)
        return "RS-M-CLIP Search: multilingual text search over raster tiles"

    def icon(self) -> QIcon:
        return QIcon(ICON)

    def supportedOutputRasterLayerExtensions(self) -> list[str]:  # noqa: N802 (QGIS API)
        return ["tif", "tiff"]

    def loadAlgorithms(self) -> None:  # noqa: N802 (QGIS API)
        for algorithm in ALGORITHMS:
            self.addAlgorithm(algorithm())
