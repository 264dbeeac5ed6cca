"""Plugin entry object: toolbar action + Raster menu entry toggling the search dock, and the Processing
provider."""

from __future__ import annotations

from pathlib import Path

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

MENU = "&RS-M-CLIP Search"
ICON = str(Path(__file__).resolve().parent / "icon.svg")


class RsmclipSearchPlugin:
    """Created by ``classFactory``; QGIS calls ``initProcessing`` (also qgis_process, without a GUI),
    ``initGui`` and ``unload``."""

    def __init__(self, iface):
        self.iface = iface
        self.action: QAction | None = None
        self.dock = None
        self.provider = None

    def initProcessing(self) -> None:  # noqa: N802 (QGIS API)
        """Register the RS-M-CLIP Processing provider (kept only when the registry took it)."""
        from .processing.provider import RsmclipProvider

        provider = RsmclipProvider()
        if self.provider is None and QgsApplication.processingRegistry().addProvider(provider):
            self.provider = provider

    def initGui(self) -> None:  # noqa: N802 (QGIS API)
        from .dock import SearchDock

        self.initProcessing()
        self.dock = SearchDock(self.iface, self.iface.mainWindow())
        self.dock.hide()
        self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        self.action = QAction(QIcon(ICON), "RS-M-CLIP Search", self.iface.mainWindow())
        self.action.setCheckable(True)
        self.action.setToolTip("Search raster tiles with text in any language (RS-M-CLIP)")
        self.action.toggled.connect(self.dock.setVisible)
        self.dock.visibilityChanged.connect(self.action.setChecked)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToRasterMenu(MENU, self.action)

    def unload(self) -> None:
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        if self.dock is not None:
            self.dock.shutdown()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.action is not None:
            self.iface.removePluginRasterMenu(MENU, self.action)
            self.iface.removeToolBarIcon(self.action)
            self.action.deleteLater()
            self.action = None
