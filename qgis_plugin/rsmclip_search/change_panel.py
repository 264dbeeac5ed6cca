"""The dock's Change tab: what appeared or disappeared between two raster layers of the same ground. Both layers
are indexed with the panel's model and tiling (the core's cache makes an indexed layer free), compared with
``api.change``, and the changes drawn as a layer styled by rise and listed; a click zooms to the change."""

from __future__ import annotations

import weakref

from qgis.core import Qgis, QgsMapLayerProxyModel
from qgis.gui import QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QSpinBox,
    QTreeWidget,
    QTreeWidgetItem,
    QWidget,
)

from .task_controls import TaskControls

#: How the direction picker words the core's directions.
DIRECTION_WORDS = {"appeared": "appeared (after − before)", "disappeared": "disappeared (before − after)"}


class ChangeControls(QWidget):
    """The Change tab of ``dock`` (a SearchDock): before and after layers, an optional query, the direction,
    Find changes / Cancel, and the changes' list."""

    def __init__(self, dock):
        super().__init__()
        self.dock = weakref.proxy(dock)  # the dock owns this widget
        self.task = None
        self.layer = None  # the layer of the listed changes
        form = QFormLayout(self)
        self.before_combo, self.after_combo = QgsMapLayerComboBox(), QgsMapLayerComboBox()
        for combo, label in ((self.before_combo, "Before"), (self.after_combo, "After")):
            combo.setFilters(QgsMapLayerProxyModel.Filter.RasterLayer)
            combo.setToolTip(f"The raster layer of the {'earlier' if label == 'Before' else 'later'} date; it is "
                             "indexed with the model and tiling above (once: the index is cached)")
            form.addRow(label, combo)
        self.query = QLineEdit()
        self.query.setPlaceholderText("storage tanks, campo de golf … (empty: any change; Enter runs)")
        self.query.returnPressed.connect(self.start)
        form.addRow("Query", self.query)
        options = QHBoxLayout()
        self.direction = QComboBox()
        self.direction.setToolTip("appeared: the query's score rose from before to after; disappeared: it fell. "
                                  "Without a query the tiles whose content moved most are listed")
        self.top_k = QSpinBox()
        self.top_k.setRange(1, 10000)
        self.top_k.setPrefix("top ")
        options.addWidget(self.direction, 1)
        options.addWidget(self.top_k)
        form.addRow("Direction", options)
        self.controls = TaskControls(form, "Find changes", "Pick the layers of two dates of the same ground",
                                     self.start, self.cancel)
        self.results = QTreeWidget()
        self.results.setHeaderLabels(["Rank", "Rise", "Before", "After", "Tile"])
        self.results.setRootIsDecorated(False)
        self.results.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.results.itemClicked.connect(self.zoom_to_item)
        form.addRow(self.results)

    # ---------------------------------------------------------------- settings
    def fill_directions(self, wanted: str) -> None:
        """The core's directions in the picker (once the core is importable), ``wanted`` selected."""
        from rsmclip_geo.api import CHANGE_DIRECTIONS

        if self.direction.count() == 0:
            for direction in CHANGE_DIRECTIONS:
                self.direction.addItem(DIRECTION_WORDS.get(direction, direction), direction)
        self.direction.setCurrentIndex(max(0, self.direction.findData(wanted)))

    # --------------------------------------------------------------------- run
    def start(self) -> None:
        """Index both layers (cached) and rank their changes in a QgsTask."""
        if self.task is not None:
            return
        dock = self.dock
        if dock.index_task is not None:
            dock.message("Wait for the indexing to finish, then Find changes", Qgis.MessageLevel.Warning)
            return
        before, after = self.before_combo.currentLayer(), self.after_combo.currentLayer()
        if before is None or after is None:
            dock.message("Choose the Before and After raster layers", Qgis.MessageLevel.Warning)
            return
        if before.id() == after.id():
            dock.message("Before and After are the same layer: choose the layers of two dates",
                         Qgis.MessageLevel.Warning)
            return
        index_layers = dock.indexing_job([before, after])
        if index_layers is None:
            return
        settings = dock.settings
        query = self.query.text().strip() or None
        direction = settings.change_direction

        def work(progress, cancel):
            from rsmclip_geo.api import SearchParams, change
            from rsmclip_geo.errors import RsmclipError

            model, indexes = index_layers(progress, cancel)
            try:
                return change(*indexes, query, model=model, params=SearchParams(top_k=settings.change_top_k),
                              direction=direction, threads=settings.threads or None)
            except RsmclipError as exc:  # the core names the cached index files: name the layers instead
                if exc.param not in ("before", "after"):
                    raise
                raise RsmclipError(named_by_layers(str(exc), indexes, (before, after)), param=exc.param,
                                   value=exc.value) from exc

        name = (f"{query} {direction}" if query else "changes") + f", {before.name()} → {after.name()}"
        self.task = dock.run_task(f"Changes {before.name()} → {after.name()} (RS-M-CLIP)", work,
                                   lambda task: self._done(task, name, after))
        self.controls.started(self.task, f"Comparing {before.name()} and {after.name()} …")

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.controls.cancelling()

    def _done(self, task, name: str, after_layer) -> None:
        self.task = None
        self.controls.stopped()
        if task.cancelled:
            self.controls.progress.setValue(0)
            self.controls.status.setText("Cancelled; finished batches of the indexes are kept and resumed next time")
            return
        if task.error is not None:
            self.controls.status.setText("Finding changes failed")
            self.dock.report_error(task)
            return
        self.controls.progress.setValue(100)
        self.show_changes(name, task.result, after_layer)

    def show_changes(self, name: str, result, after_layer) -> None:
        """The changes of ``result`` (a ChangeResult) as a layer above the after layer, and in the list."""
        from rsmclip_geo.api import CHANGE_PROPERTIES

        from .layers import add_above, result_layer

        after = result.after
        rings = [after.scene_footprint(after.row_of(change.tile_id)) for change in result.changes]
        crs = next(iter(after.scenes.values()))["crs"]
        self.layer = result_layer(result.changes, rings, crs, name, CHANGE_PROPERTIES, "rise")
        add_above(self.layer, after_layer)
        self.results.clear()
        for change in result.changes:
            scores = ["" if score is None else f"{score:.3f}" for score in (change.score_before, change.score_after)]
            item = QTreeWidgetItem([str(change.rank), f"{change.rise:.3f}", *scores, change.tile_id])
            item.setData(0, Qt.ItemDataRole.UserRole, change.tile_id)
            self.results.addTopLevelItem(item)
        self.controls.status.setText(f"{len(result.changes)} changes of {result.matched} tile pairs matched by footprint")

    def zoom_to_item(self, item: QTreeWidgetItem) -> None:
        """Zoom the map to the clicked change."""
        from .layers import zoom_to_rank

        zoom_to_rank(self.dock.iface.mapCanvas(), self.layer, int(item.text(0)))

    def layer_removed(self, layer_id: str) -> None:
        """The changes' layer left the project: clear the list."""
        if self.layer is not None and layer_id == self.layer.id():
            self.layer = None
            self.results.clear()

    def shutdown(self) -> None:
        """Cancel running work (plugin unload)."""
        if self.task is not None:
            self.task.cancel()


def named_by_layers(message: str, indexes, layers) -> str:
    """``message`` with each cached index path replaced by the name of the layer it indexes."""
    for index, layer in zip(indexes, layers):
        message = message.replace(str(index.path), f"layer {layer.name()!r}")
    return message
