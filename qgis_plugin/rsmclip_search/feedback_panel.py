"""The dock's relevance feedback: hits marked right or wrong from the result list or on the map, undo, the
labels layer, and labels files. One set of labels per indexed layer: indexing another layer starts a new
set, re-indexing the same layer keeps it (the core finds judged tiles again by footprint)."""

from __future__ import annotations

import weakref
from dataclasses import replace
from pathlib import Path

from qgis.core import Qgis
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QColor
from qgis.PyQt.QtWidgets import QFileDialog, QGridLayout, QPushButton, QWidget

from .labelling import LABEL_COLOURS, LabelTool, show_labels_layer

#: The result list's column showing each hit's label.
LABEL_COLUMN = 3
#: How the result list shows a label.
LABEL_WORDS = {"positive": "right", "negative": "wrong"}
LABELS_FILTER = "Labels (*.geojson *.json)"


class FeedbackControls(QWidget):
    """The feedback buttons of ``dock`` (a SearchDock) and the labels they make; "Search again" is the
    dock's, as it runs searches."""

    def __init__(self, dock):
        super().__init__()
        self.dock = weakref.proxy(dock)  # the dock owns this widget
        self.labels = None  # the core's Labels, made on first use (the core may not be importable yet)
        self.layer_id: str | None = None  # the indexed layer the labels belong to
        self.tool = LabelTool(dock.iface.mapCanvas())  # owned by the canvas: connected to methods, not lambdas
        self.tool.clicked.connect(self.mark_at)
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        self.right_button = QPushButton("Right (+)")
        self.right_button.setToolTip("Mark the selected result right")
        self.right_button.clicked.connect(lambda: self.mark_selected(True))
        self.wrong_button = QPushButton("Wrong (−)")
        self.wrong_button.setToolTip("Mark the selected result wrong")
        self.wrong_button.clicked.connect(lambda: self.mark_selected(False))
        self.map_button = QPushButton("Mark on map")
        self.map_button.setCheckable(True)
        self.map_button.setToolTip("Left click marks the tile under the cursor right, right click wrong")
        self.map_button.toggled.connect(self.use_map_tool)
        self.tool.deactivated.connect(self.map_tool_released)
        self.undo_button = QPushButton("Undo")
        self.undo_button.setToolTip("Take back the last judgement")
        self.undo_button.clicked.connect(self.undo)
        self.again_button = QPushButton("Search again")
        self.again_button.setToolTip("Run the last search again, refined by the labels; judged tiles are left out")
        self.save_button = QPushButton("Save labels…")
        self.save_button.clicked.connect(self.save)
        self.load_button = QPushButton("Load labels…")
        self.load_button.clicked.connect(self.load)
        for i, button in enumerate((self.right_button, self.wrong_button, self.map_button, self.undo_button,
                                    self.again_button, self.save_button, self.load_button)):
            grid.addWidget(button, i // 4, i % 4)

    # ------------------------------------------------------------------ labels
    def current(self):
        """The labels (made empty on first use)."""
        from rsmclip_geo.api import Labels

        if self.labels is None:
            self.labels = Labels()
        return self.labels

    def snapshot(self):
        """A copy of the labels for a search running in a task."""
        return replace(self.current(), judgements=dict(self.current().judgements))

    def use_layer(self, layer_id: str) -> None:
        """The layer just indexed: the labels of another layer are dropped, those of the same one kept."""
        if self.layer_id not in (None, layer_id):
            self.labels = None
            self.changed()
        self.layer_id = layer_id

    def label_of(self, tile_id: str) -> str | None:
        judgement = self.labels.judgements.get(tile_id) if self.labels is not None else None
        return judgement.label if judgement is not None else None

    # ---------------------------------------------------------------- marking
    def mark_selected(self, positive: bool) -> None:
        """Mark the tile of the selected result."""
        item = self.dock.results.currentItem()
        if item is None:
            self.dock.message("Select a result first, then Right (+) or Wrong (−)", Qgis.MessageLevel.Warning)
            return
        self.mark(item.data(0, Qt.ItemDataRole.UserRole), positive)

    def mark_at(self, lon: float, lat: float, positive: bool) -> None:
        """Mark the tile under a map click (EPSG:4326): of the tiles there, the smallest."""
        from rsmclip_geo.api import tiles_at

        if self.dock.index is None:
            self.dock.message("Index a raster layer first (Index layer)", Qgis.MessageLevel.Warning)
            return
        tile_ids = tiles_at(self.dock.index, lon, lat)
        if not tile_ids:
            self.dock.message("No indexed tile under the click: click on the indexed raster",
                              Qgis.MessageLevel.Warning)
            return
        self.mark(tile_ids[0], positive)

    def mark(self, tile_id: str, positive: bool) -> None:
        from rsmclip_geo.errors import RsmclipError

        from .dock import in_panel_words

        if self.dock.index is None:
            self.dock.message("Index a raster layer first (Index layer)", Qgis.MessageLevel.Warning)
            return
        try:
            self.current().mark(self.dock.index, tile_id, positive)
        except RsmclipError as exc:
            self.dock.message(in_panel_words(exc), Qgis.MessageLevel.Critical)
            return
        self.changed()

    def undo(self) -> None:
        """Take back the last judgement."""
        if self.current().undo() is None:
            self.dock.message("Nothing to undo: no tile is marked", Qgis.MessageLevel.Warning)
            return
        self.changed()

    def use_map_tool(self, on: bool) -> None:
        """Mark on map: the label tool is the canvas's map tool while the button is down."""
        canvas = self.dock.iface.mapCanvas()
        if on:
            canvas.setMapTool(self.tool)
        elif canvas.mapTool() is self.tool:
            canvas.unsetMapTool(self.tool)

    def map_tool_released(self) -> None:
        """Another map tool took over: Mark on map is off."""
        self.map_button.setChecked(False)

    def changed(self) -> None:
        """Show the labels: the result list's label column and the labels layer."""
        self.show_in_list()
        show_labels_layer(self.labels, self.dock.indexed_layer)

    def show_in_list(self) -> None:
        """Each listed hit's label, coloured like the labels layer."""
        results = self.dock.results
        for row in range(results.topLevelItemCount()):
            item = results.topLevelItem(row)
            label = self.label_of(item.data(0, Qt.ItemDataRole.UserRole))
            item.setText(LABEL_COLUMN, LABEL_WORDS.get(label, ""))
            if label is not None:
                item.setForeground(LABEL_COLUMN, QColor(LABEL_COLOURS[label]))

    # ------------------------------------------------------------------ files
    def file_dialog(self, title: str, save: bool) -> Path | None:
        """A path picked in a (Qt, not native) file dialog starting in the export folder."""
        start = str(Path(self.dock.settings.export_dir or Path.home()))
        dialog = QFileDialog(self, title, start, LABELS_FILTER)
        dialog.setObjectName("RsmclipLabelsDialog")
        if save:
            dialog.setAcceptMode(QFileDialog.AcceptMode.AcceptSave)
        else:
            dialog.setFileMode(QFileDialog.FileMode.ExistingFile)
        dialog.setDefaultSuffix("geojson")
        dialog.setOption(QFileDialog.Option.DontUseNativeDialog, True)
        if not dialog.exec() or not dialog.selectedFiles():
            return None
        path = Path(dialog.selectedFiles()[0])
        self.dock.settings.export_dir = str(path.parent)
        self.dock.save_settings()
        return path

    def save(self) -> None:
        """Write the labels as a GeoJSON labels file (also a layer QGIS opens)."""
        from rsmclip_geo.errors import RsmclipError

        from .dock import in_panel_words

        if not self.current():
            self.dock.message("No labels to save: mark results right or wrong first", Qgis.MessageLevel.Warning)
            return
        path = self.file_dialog("Save labels", save=True)
        if path is None:
            return
        try:
            written = self.current().write(path)
        except RsmclipError as exc:
            self.dock.message(in_panel_words(exc), Qgis.MessageLevel.Critical)
            return
        self.dock.message(f"Saved {len(self.current())} labels to {written}", Qgis.MessageLevel.Success)

    def load(self) -> None:
        """Replace the labels by those of a labels file and draw them."""
        from rsmclip_geo.api import Labels
        from rsmclip_geo.errors import RsmclipError

        from .dock import in_panel_words

        path = self.file_dialog("Load labels", save=False)
        if path is None:
            return
        try:
            self.labels = Labels.read(path)
        except RsmclipError as exc:
            self.dock.message(in_panel_words(exc), Qgis.MessageLevel.Critical)
            return
        self.changed()
        self.dock.message(f"Loaded {len(self.labels)} labels from {path}", Qgis.MessageLevel.Success)

    def shutdown(self) -> None:
        """Give the map tool back (plugin unload)."""
        self.map_button.setChecked(False)
