"""A real QGIS desktop window for tests and screenshots: QgsApplication, QMainWindow, QgsMapCanvas
bound to the project's layer tree, a Layers panel, a message bar, a toolbar and a Raster menu.

``DesktopIface`` offers the QgisInterface methods the plugin calls, implemented on those real
widgets, so the plugin runs exactly as it does inside QGIS.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLUGIN_PARENT = REPO / "qgis_plugin"

from qgis.core import QgsApplication, QgsLayerTreeModel, QgsProject  # noqa: E402
from qgis.gui import QgsLayerTreeMapCanvasBridge, QgsLayerTreeView, QgsMapCanvas, QgsMessageBar  # noqa: E402
from qgis.PyQt.QtCore import QCoreApplication, Qt  # noqa: E402
from qgis.PyQt.QtGui import QInputMethodEvent  # noqa: E402
from qgis.PyQt.QtTest import QTest  # noqa: E402
from qgis.PyQt.QtWidgets import (  # noqa: E402
    QApplication,
    QDockWidget,
    QMainWindow,
    QMenu,
    QToolBar,
    QVBoxLayout,
    QWidget,
)


def start_qgis(settings_dir: Path) -> QgsApplication:
    """Start a GUI QgsApplication (offscreen unless a display is set) whose profile, settings and
    Qt state all live in ``settings_dir`` (nothing is written to the user's home)."""
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    for variable, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "data"), ("XDG_CACHE_HOME", "cache")):
        os.environ[variable] = str(settings_dir / sub)
    QCoreApplication.setOrganizationName("rsmclip-geo-tests")
    QCoreApplication.setApplicationName("QGIS3")
    app = QgsApplication([], True, str(settings_dir / "profiles"))
    app.setPrefixPath(sys.prefix if Path(sys.prefix, "share", "qgis").is_dir() else "/usr", True)
    app.initQgis()
    if str(PLUGIN_PARENT) not in sys.path:
        sys.path.insert(0, str(PLUGIN_PARENT))
    return app


class DesktopIface:
    """The QgisInterface surface used by the plugin, on a real main window."""

    def __init__(self) -> None:
        self.window = QMainWindow()
        self.window.setWindowTitle("QGIS")
        self.window.resize(1400, 860)
        central = QWidget()
        layout = QVBoxLayout(central)
        layout.setContentsMargins(0, 0, 0, 0)
        self.bar = QgsMessageBar()
        self.canvas = QgsMapCanvas()
        self.canvas.setCanvasColor(Qt.white)
        layout.addWidget(self.bar)
        layout.addWidget(self.canvas)
        self.window.setCentralWidget(central)
        self.toolbar = QToolBar("Plugins")
        self.window.addToolBar(self.toolbar)
        self.raster_menu = QMenu("&Raster")
        self.window.menuBar().addMenu(self.raster_menu)
        self.plugin_menus: dict[str, QMenu] = {}
        root = QgsProject.instance().layerTreeRoot()
        self.bridge = QgsLayerTreeMapCanvasBridge(root, self.canvas, self.canvas)  # dies with its canvas
        self.layer_tree = QgsLayerTreeView()
        self.layer_model = QgsLayerTreeModel(root, self.layer_tree)  # owned by its view
        self.layer_model.setFlag(QgsLayerTreeModel.AllowNodeChangeVisibility)
        self.layer_model.setFlag(QgsLayerTreeModel.ShowLegendAsTree)
        self.layer_tree.setModel(self.layer_model)
        layers_dock = QDockWidget("Layers")
        layers_dock.setObjectName("Layers")
        layers_dock.setWidget(self.layer_tree)
        self.window.addDockWidget(Qt.LeftDockWidgetArea, layers_dock)

    # --- QgisInterface methods the plugin calls ---
    def mainWindow(self) -> QMainWindow:  # noqa: N802
        return self.window

    def mapCanvas(self) -> QgsMapCanvas:  # noqa: N802
        return self.canvas

    def messageBar(self) -> QgsMessageBar:  # noqa: N802
        return self.bar

    def addDockWidget(self, area, dock) -> None:  # noqa: N802
        self.window.addDockWidget(area, dock)

    def removeDockWidget(self, dock) -> None:  # noqa: N802
        self.window.removeDockWidget(dock)

    def addToolBarIcon(self, action) -> None:  # noqa: N802
        self.toolbar.addAction(action)

    def removeToolBarIcon(self, action) -> None:  # noqa: N802
        self.toolbar.removeAction(action)

    def addPluginToRasterMenu(self, name: str, action) -> None:  # noqa: N802
        menu = self.plugin_menus.get(name)
        if menu is None:
            menu = self.plugin_menus[name] = self.raster_menu.addMenu(name)
        menu.addAction(action)

    def removePluginRasterMenu(self, name: str, action) -> None:  # noqa: N802
        menu = self.plugin_menus.get(name)
        if menu is not None:
            menu.removeAction(action)
            if menu.isEmpty():
                self.raster_menu.removeAction(menu.menuAction())
                del self.plugin_menus[name]


def process_until(done: Callable[[], bool], timeout: float = 120.0) -> None:
    """Run the Qt event loop until ``done()`` is true; raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout:.0f} s")
        QCoreApplication.processEvents()
        time.sleep(0.01)


def type_text(widget, text: str) -> None:
    """Type into a widget: key presses for ASCII, an input-method commit (how CJK and other
    composed text arrives from an IME) for anything else."""
    if text.isascii():
        QTest.keyClicks(widget, text)
        return
    event = QInputMethodEvent()
    event.setCommitString(text)
    QApplication.sendEvent(widget, event)
