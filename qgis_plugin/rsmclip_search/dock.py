"""The search dock: layer and model pickers, tiling settings, indexing, then two tabs: Search (queries, results
and relevance feedback, feedback_panel.py) and Change (change between two layers, change_panel.py)."""

from __future__ import annotations

from pathlib import Path

from qgis.core import Qgis, QgsApplication, QgsMapLayerProxyModel, QgsProject, QgsRasterLayer, QgsTask
from qgis.gui import QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDockWidget,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTabWidget,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from . import deps
from .change_panel import ChangeControls
from .feedback_panel import LABEL_COLUMN, FeedbackControls
from .settings import PanelSettings
from .task_controls import TaskControls

TITLE = "RS-M-CLIP Search"


class SearchDock(QDockWidget):
    """Dock panel; all work is delegated to the rsmclip_geo core through tasks.py / layers.py."""

    def __init__(self, iface, parent=None):
        super().__init__(TITLE, parent)
        self.setObjectName("RsmclipSearchDock")
        self.iface = iface
        self.settings = PanelSettings.load()
        self.index_task: QgsTask | None = None
        self.search_task: QgsTask | None = None
        self.install_task: QgsTask | None = None
        self.models: dict = {}  # (bundle spec, threads) -> loaded Model
        self.model = None  # the model of the current index
        self.index = None  # TileIndex of the indexed layer
        self.indexed_layer: QgsRasterLayer | None = None
        self.current_hits: list = []
        self.result_layer = None
        self.last_search: tuple | None = None  # (name, find) of the last search without labels
        self._build()
        self._restore(self.settings)
        self.check_dependencies()
        QgsProject.instance().layerWillBeRemoved.connect(self._layer_removed)

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        body = QWidget()
        main = QVBoxLayout(body)

        self.deps_box = QGroupBox("Missing dependencies")
        deps_layout = QVBoxLayout(self.deps_box)
        self.deps_label = QLabel()
        self.deps_label.setWordWrap(True)
        self.deps_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.install_button = QPushButton("Install with pip into the plugin folder")
        self.install_button.clicked.connect(self.install_dependencies)
        deps_layout.addWidget(self.deps_label)
        deps_layout.addWidget(self.install_button)
        main.addWidget(self.deps_box)

        index_box = QGroupBox("Index a raster layer")
        form = QFormLayout(index_box)
        self.layer_combo = QgsMapLayerComboBox()
        self.layer_combo.setFilters(QgsMapLayerProxyModel.Filter.RasterLayer)
        form.addRow("Raster layer", self.layer_combo)
        model_row = QHBoxLayout()
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Model bundle: a bundled model, or a bundle directory")
        self.model_browse = QPushButton("…")
        self.model_browse.setToolTip("Choose a bundle directory")
        self.model_browse.setMaximumWidth(32)
        self.model_browse.clicked.connect(self.browse_model)
        model_row.addWidget(self.model_combo, 1)
        model_row.addWidget(self.model_browse)
        form.addRow("Model", model_row)
        tile_row = QHBoxLayout()
        self.tile_size = QDoubleSpinBox()
        self.tile_size.setRange(0, 100000)
        self.tile_size.setDecimals(1)
        self.tile_size.setSpecialValueText("model default")
        self.tile_size.setToolTip("model default: tiles sized to the ground resolution the model was trained at "
                                  "when its bundle records it, else the model's default tile size in pixels")
        self.tile_unit = QComboBox()
        self.tile_unit.addItem("pixels", "px")
        self.tile_unit.addItem("metres", "m")
        tile_row.addWidget(self.tile_size, 1)
        tile_row.addWidget(self.tile_unit)
        form.addRow("Tile size", tile_row)
        self.overlap = QDoubleSpinBox()
        self.overlap.setRange(0.0, 0.9)
        self.overlap.setSingleStep(0.1)
        self.overlap.setDecimals(2)
        self.overlap.setToolTip("Fraction of the tile size shared by neighbouring tiles")
        form.addRow("Overlap", self.overlap)
        self.scales = QLineEdit()
        self.scales.setToolTip("Comma-separated multiples of the tile size, e.g. 1,2")
        form.addRow("Scales", self.scales)
        self.threads = QSpinBox()
        self.threads.setRange(0, 256)
        self.threads.setSpecialValueText("auto")
        self.threads.setToolTip("Threads for ONNX Runtime and the raster readers (auto = all cores)")
        form.addRow("Threads", self.threads)
        self.indexing = TaskControls(form, "Index layer", "Not indexed", self.start_indexing, self.cancel_indexing)
        self.index_button, self.cancel_button = self.indexing.run_button, self.indexing.cancel_button
        self.progress, self.status = self.indexing.progress, self.indexing.status
        main.addWidget(index_box)

        search_box = QWidget()
        search = QVBoxLayout(search_box)
        query_row = QHBoxLayout()
        self.query = QLineEdit()
        self.query.setPlaceholderText("aeroporto, campo de golf, 储油罐 … (Enter searches)")
        self.query.returnPressed.connect(self.start_search)
        self.search_button = QPushButton("Search")
        self.search_button.clicked.connect(self.start_search)
        query_row.addWidget(self.query, 1)
        query_row.addWidget(self.search_button)
        search.addLayout(query_row)
        options = QHBoxLayout()
        self.top_k = QSpinBox()
        self.top_k.setRange(1, 10000)
        self.top_k.setPrefix("top ")
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(-1.0, 1.0)
        self.threshold.setSingleStep(0.01)
        self.threshold.setDecimals(3)
        self.threshold.setPrefix("score ≥ ")
        self.threshold.setSpecialValueText("any score")
        self.heatmap = QCheckBox("Heatmap")
        self.heatmap.setToolTip("Also add a raster of every tile's score for each text query")
        options.addWidget(self.top_k)
        options.addWidget(self.threshold)
        options.addWidget(self.heatmap)
        search.addLayout(options)
        self.results = QTreeWidget()
        self.results.setColumnCount(LABEL_COLUMN + 1)
        self.results.setHeaderLabels(["Rank", "Score", "Tile", "Label"])
        self.results.setRootIsDecorated(False)
        self.results.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.results.itemClicked.connect(self.zoom_to_item)
        search.addWidget(self.results, 1)
        result_buttons = QHBoxLayout()
        self.zoom_best_button = QPushButton("Zoom to best")
        self.zoom_best_button.clicked.connect(self.zoom_to_best)
        self.similar_button = QPushButton("Find similar")
        self.similar_button.setToolTip("Search for tiles like the selected result")
        self.similar_button.clicked.connect(self.start_similar)
        self.export_button = QPushButton("Export GeoJSON…")
        self.export_button.clicked.connect(self.export_geojson)
        for button in (self.zoom_best_button, self.similar_button, self.export_button):
            result_buttons.addWidget(button)
        search.addLayout(result_buttons)
        self.feedback = FeedbackControls(self)
        self.feedback.again_button.clicked.connect(self.search_again)
        search.addWidget(self.feedback)
        self.tabs = QTabWidget()
        self.tabs.addTab(search_box, "Search")
        self.change = ChangeControls(self)
        self.tabs.addTab(self.change, "Change")
        main.addWidget(self.tabs, 1)
        self.setWidget(body)

    # ---------------------------------------------------------------- settings
    def _restore(self, s: PanelSettings) -> None:
        self.tile_size.setValue(s.tile_size)
        self.tile_unit.setCurrentIndex(max(0, self.tile_unit.findData(s.tile_unit)))
        self.overlap.setValue(s.overlap)
        self.scales.setText(s.scales)
        self.threads.setValue(s.threads)
        self.top_k.setValue(s.top_k)
        self.threshold.setValue(s.threshold)
        self.heatmap.setChecked(s.heatmap)
        self.change.top_k.setValue(s.change_top_k)

    def current_settings(self) -> PanelSettings:
        """The panel's widgets as settings (also what indexing and search use)."""
        return PanelSettings(
            model=self.model_combo.currentData() or "",
            tile_size=self.tile_size.value(),
            tile_unit=self.tile_unit.currentData(),
            overlap=self.overlap.value(),
            scales=self.scales.text().strip() or "1",
            threads=self.threads.value(),
            top_k=self.top_k.value(),
            threshold=self.threshold.value(),
            heatmap=self.heatmap.isChecked(),
            change_top_k=self.change.top_k.value(),
            change_direction=self.change.direction.currentData() or self.settings.change_direction,
            export_dir=self.settings.export_dir,
        )

    def save_settings(self) -> None:
        self.settings = self.current_settings()
        self.settings.save()

    # ------------------------------------------------------------ dependencies
    def check_dependencies(self) -> bool:
        """Show the dependency box when something is missing; enable the panel otherwise."""
        missing = deps.missing_dependencies()
        self.deps_box.setVisible(bool(missing))
        for widget in (self.index_button, self.search_button, self.query, self.feedback, self.change):
            widget.setEnabled(not missing)
        if not missing:
            self.refresh_models()
            self.change.fill_directions(self.settings.change_direction)
            return True
        lines = [f"<b>{dep.module}</b>: {dep.hint}" for dep in missing]
        requirements = deps.pip_requirements(missing)
        if requirements:
            lines.append(f"The button runs pip to install {', '.join(requirements)} into {deps.PACKAGES_DIR}.")
        self.deps_label.setText("The panel needs:<br>" + "<br>".join(lines))
        self.install_button.setVisible(bool(requirements))
        return False

    def install_dependencies(self) -> None:
        """Install the missing pip-installable packages in the background."""
        requirements = deps.pip_requirements(deps.missing_dependencies())
        if not requirements or self.install_task is not None:
            return

        def work(progress, is_cancelled):
            return deps.install(requirements)

        self.install_button.setEnabled(False)
        self.deps_label.setText(f"Installing {', '.join(requirements)} with pip …")
        self.install_task = self.run_task("Installing RS-M-CLIP Search dependencies", work, self._install_done)

    def _install_done(self, task) -> None:
        self.install_task = None
        self.install_button.setEnabled(True)
        done = task.result
        if task.error is not None:
            self.message(f"Installing dependencies failed: {task.error}", Qgis.MessageLevel.Critical)
        elif done.returncode != 0:
            lines = (done.stderr or done.stdout or "no output").strip().splitlines()
            self.message(f"pip failed (exit {done.returncode}): {lines[-1]}", Qgis.MessageLevel.Critical)
        if self.check_dependencies():
            self.message("Dependencies installed", Qgis.MessageLevel.Success)

    # ------------------------------------------------------------------ helpers
    def message(self, text: str, level=Qgis.MessageLevel.Info) -> None:
        """Show ``text`` in QGIS's message bar (errors stay until closed)."""
        duration = 0 if level == Qgis.MessageLevel.Critical else 5
        self.iface.messageBar().pushMessage(TITLE, text, level=level, duration=duration)

    def run_task(self, description: str, work, on_done) -> QgsTask:
        from .tasks import CoreTask

        task = CoreTask(description, work, on_done)
        QgsApplication.taskManager().addTask(task)
        return task

    def shutdown(self) -> None:
        """Cancel running work and store the settings (plugin unload)."""
        QgsProject.instance().layerWillBeRemoved.disconnect(self._layer_removed)
        self.feedback.shutdown()
        self.change.shutdown()
        for task in (self.index_task, self.search_task):
            if task is not None:
                task.cancel()
        self.save_settings()

    def _layer_removed(self, layer_id: str) -> None:
        """Forget the index when its raster leaves the project, the result list with its layer."""
        if self.indexed_layer is not None and layer_id == self.indexed_layer.id() and self.index_task is None:
            self.index, self.indexed_layer = None, None
            self.progress.setValue(0)
            self.status.setText("Not indexed")
        if self.result_layer is not None and layer_id == self.result_layer.id():
            self.result_layer, self.current_hits = None, []
            self.results.clear()
        self.change.layer_removed(layer_id)

    # ------------------------------------------------------------------ models
    def refresh_models(self) -> None:
        """Fill the model picker with the bundles the core finds, keeping the stored choice."""
        from rsmclip_geo.api import DEFAULT_MODEL, list_models

        wanted = self.model_combo.currentData() or self.settings.model
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for path in list_models():
            self.model_combo.addItem(f"{path.name} (default)" if path.name == DEFAULT_MODEL else path.name, str(path))
        if wanted and self.model_combo.findData(wanted) < 0:
            self.model_combo.addItem(Path(wanted).name, wanted)
        self.model_combo.setCurrentIndex(max(0, self.model_combo.findData(wanted)))
        self.model_combo.blockSignals(False)

    def browse_model(self) -> None:
        """Pick a bundle directory (image.onnx, text.onnx, tokenizer.json, bundle.json)."""
        folder = QFileDialog.getExistingDirectory(self, "Model bundle directory", self.model_combo.currentData() or "")
        if folder:
            self.select_model(folder)

    def select_model(self, spec: str) -> None:
        """Select a bundle by directory (added to the picker if needed)."""
        if self.model_combo.findData(spec) < 0:
            self.model_combo.addItem(Path(spec).name, spec)
        self.model_combo.setCurrentIndex(self.model_combo.findData(spec))

    def model_for(self, spec: str, threads: int):
        """The loaded model for a bundle spec ("" = default), kept for later queries (worker
        thread; one task runs at a time)."""
        from rsmclip_geo.api import load_model

        key = (spec, threads)
        if key not in self.models:
            self.models[key] = load_model(spec or None, threads=threads or None)
        return self.models[key]

    # ---------------------------------------------------------------- indexing
    def indexing_job(self, layers: list):
        """How the panel indexes raster layers with its model and tiling (the core's cache is reused for a layer
        indexed before with the same model and tiling): ``work(progress, cancel) -> (model, [TileIndex per
        layer])`` for a task, or None once a bad layer or setting is shown in the message bar."""
        from rsmclip_geo.errors import RsmclipError

        from .layers import raster_source

        try:
            sources = [(raster_source(layer), rendered_bands(layer)) for layer in layers]
            settings = self.current_settings()
            tiling = tiling_params(settings)
        except RsmclipError as exc:
            self.message(in_panel_words(exc), Qgis.MessageLevel.Critical)
            return None
        self.save_settings()
        threads = settings.threads or None

        def work(progress, cancel):
            from rsmclip_geo.api import scene_index

            model = self.model_for(settings.model, settings.threads)
            share = len(sources)  # each layer a share of the progress
            return model, [scene_index(path, model=model, tiling=model_tiling(tiling, model.bundle.info), bands=bands,
                                       progress=lambda done, total, n=n: progress(n * total + done, share * total),
                                       cancel=cancel, threads=threads)
                           for n, (path, bands) in enumerate(sources)]

        return work

    def start_indexing(self) -> None:
        """Index the chosen raster layer in a QgsTask."""
        if self.index_task is not None:
            return
        if self.change.task is not None:
            self.message("Wait for Find changes to finish, then Index layer", Qgis.MessageLevel.Warning)
            return
        layer = self.layer_combo.currentLayer()
        index_layers = self.indexing_job([layer])
        if index_layers is None:
            return

        def work(progress, cancel):
            model, (index,) = index_layers(progress, cancel)
            return model, index

        self.index = None
        self.indexed_layer = layer
        name = layer.name()
        self.index_task = self.run_task(f"Indexing {name} (RS-M-CLIP)", work, lambda t: self._indexing_done(t, name))
        self.indexing.started(self.index_task, f"Indexing {name} …")

    def cancel_indexing(self) -> None:
        if self.index_task is not None:
            self.index_task.cancel()
            self.indexing.cancelling()

    def _indexing_done(self, task, name: str) -> None:
        self.index_task = None
        self.indexing.stopped()
        if task.cancelled:
            self.progress.setValue(0)
            self.status.setText("Indexing cancelled; finished batches are kept and resumed next time")
            return
        if task.error is not None:
            self.status.setText("Indexing failed")
            self.report_error(task)
            return
        self.model, self.index = task.result
        self.feedback.use_layer(self.indexed_layer.id())
        self.progress.setValue(100)
        self.status.setText(f"{name}: {len(self.index)} tiles indexed ({self.index.path.name})")

    def report_error(self, task) -> None:
        """The core's one-line message for RsmclipError, the exception otherwise."""
        from rsmclip_geo.errors import RsmclipError

        error = task.error
        text = in_panel_words(error) if isinstance(error, RsmclipError) else f"{type(error).__name__}: {error}"
        self.message(text, Qgis.MessageLevel.Critical)

    # ------------------------------------------------------------------ search
    def start_search(self) -> None:
        """Search the index for the query text (Enter in the query box)."""
        query = self.query.text().strip()
        if not query:
            self.message("Type a query, e.g. 'aeroporto' or 'storage tanks'", Qgis.MessageLevel.Warning)
            return

        def find(index, model, s: PanelSettings, params):
            from rsmclip_geo.api import heatmap_path, search, write_heatmap

            result = search(index, query, model=model, params=params, scores=s.heatmap)
            return result.hits, (write_heatmap(result, heatmap_path(index, [query])) if s.heatmap else None)

        self._search(query, find)

    def start_similar(self) -> None:
        """Search for tiles like the selected result tile."""
        item = self.results.currentItem()
        if item is None:
            self.message("Select a result tile first, then Find similar", Qgis.MessageLevel.Warning)
            return
        tile_id = item.data(0, Qt.ItemDataRole.UserRole)

        def find(index, model, s: PanelSettings, params):
            from rsmclip_geo.api import similar

            return similar(index, tile_id=tile_id, model=model, params=params).hits, None

        self._search(f"similar to #{item.text(0)} of {self.result_layer.name()}", find)

    def search_again(self) -> None:
        """Run the last search again with the labels: the query refined, the judged tiles left out."""
        if self.last_search is None:
            self.message("Search first, mark results right or wrong, then Search again", Qgis.MessageLevel.Warning)
            return
        if not self.feedback.current():
            self.message("Mark results right (+) or wrong (−) first, then Search again", Qgis.MessageLevel.Warning)
            return
        name, find = self.last_search
        self._search(f"{name} (refined)", find, self.feedback.snapshot())

    def _search(self, name: str, find, labels=None) -> None:
        """Run ``find(index, model, settings, params) -> (hits, heatmap path | None)`` in a task and show
        its hits as the layer ``name``; with ``labels``, the search params carry them."""
        if self.index is None:
            self.message("Index a raster layer first (Index layer)", Qgis.MessageLevel.Warning)
            return
        if self.search_task is not None:
            return
        settings = self.current_settings()
        self.save_settings()
        if labels is None:
            self.last_search = (name, find)
        params = search_params(settings, labels)
        index, model = self.index, self.model
        for button in (self.search_button, self.similar_button, self.feedback.again_button):
            button.setEnabled(False)
        self.search_task = self.run_task(
            f"Searching '{name}' (RS-M-CLIP)",
            lambda progress, cancel: find(index, model, settings, params),
            lambda task: self._search_done(task, name, index),
        )

    def _search_done(self, task, name: str, index) -> None:
        self.search_task = None
        for button in (self.search_button, self.similar_button, self.feedback.again_button):
            button.setEnabled(True)
        if task.cancelled:
            return
        if task.error is not None:
            self.report_error(task)
            return
        hits, heatmap = task.result
        self.show_hits(name, hits, heatmap, index)

    def show_hits(self, name: str, hits, heatmap: Path | None, index) -> None:
        """Add the hits (of ``index``) as a layer above the indexed raster and list them."""
        from rsmclip_geo.api import HIT_PROPERTIES

        from .layers import add_above, heatmap_layer, result_layer

        scene = next(iter(index.scenes.values()))
        rings = [index.scene_footprint(index.row_of(hit.tile_id)) for hit in hits]
        layer = result_layer(hits, rings, scene["crs"], name, HIT_PROPERTIES, "score")
        if heatmap is not None:
            add_above(heatmap_layer(heatmap, f"{name} heatmap"), self.indexed_layer)
        add_above(layer, self.indexed_layer)
        self.result_layer = layer
        self.current_hits = list(hits)
        self.results.clear()
        for hit in hits:
            item = QTreeWidgetItem([str(hit.rank), f"{hit.score:.3f}", hit.tile_id])
            item.setData(0, Qt.ItemDataRole.UserRole, hit.tile_id)
            self.results.addTopLevelItem(item)
        self.feedback.show_in_list()
        if not hits:
            self.message(f"No tile reaches the score threshold for '{name}'", Qgis.MessageLevel.Info)

    # ----------------------------------------------------------- results, export
    def zoom_to_item(self, item: QTreeWidgetItem) -> None:
        """Zoom the map to the clicked result tile."""
        from .layers import zoom_to_rank

        zoom_to_rank(self.iface.mapCanvas(), self.result_layer, int(item.text(0)))

    def zoom_to_best(self) -> None:
        if self.results.topLevelItemCount() == 0:
            self.message("No results yet: search first", Qgis.MessageLevel.Warning)
            return
        best = self.results.topLevelItem(0)
        self.results.setCurrentItem(best)
        self.zoom_to_item(best)

    def export_geojson(self) -> None:
        """Write the current results as RFC 7946 GeoJSON (the CLI's format) to a chosen file."""
        from rsmclip_geo.api import write_hits
        from rsmclip_geo.errors import RsmclipError

        if not self.current_hits:
            self.message("No results to export: search first", Qgis.MessageLevel.Warning)
            return
        start = str(Path(self.settings.export_dir or Path.home()) / f"{self.result_layer.name()}.geojson")
        dialog = QFileDialog(self, "Export results as GeoJSON", start, "GeoJSON (*.geojson *.json)")
        dialog.setObjectName("RsmclipExportDialog")
        dialog.setAcceptMode(QFileDialog.AcceptMode.AcceptSave)
        dialog.setDefaultSuffix("geojson")
        dialog.setOption(QFileDialog.Option.DontUseNativeDialog, True)
        if not dialog.exec() or not dialog.selectedFiles():
            return
        target = Path(dialog.selectedFiles()[0])
        try:
            written = write_hits(self.current_hits, target)
        except RsmclipError as exc:
            self.message(in_panel_words(exc), Qgis.MessageLevel.Critical)
            return
        self.settings.export_dir = str(written.parent)
        self.save_settings()
        self.message(f"Exported {len(self.current_hits)} tiles to {written}", Qgis.MessageLevel.Success)


#: The panel's name for a core parameter (its form label), where it has one.
FIELD_NAMES = {"tile_size": "Tile size", "tile_size_m": "Tile size (m)", "overlap": "Overlap", "scales": "Scales",
               "threads": "Threads", "model": "Model", "top_k": "Top", "threshold": "Score ≥",
               "output": "Export file", "cache_dir": "Cache folder", "labels_file": "Labels file",
               "before": "Before", "after": "After", "direction": "Direction"}


def in_panel_words(error) -> str:
    """A core error's message with its parameter named as the panel labels it (`Overlap 0.97: …`)."""
    return error.worded(FIELD_NAMES.get)


def search_params(settings: PanelSettings, labels=None):
    """The core's SearchParams from the panel settings and the labels (None: none); the threshold spin box's
    minimum means any score."""
    from rsmclip_geo.api import SearchParams

    return SearchParams(top_k=settings.top_k, threshold=None if settings.threshold <= -1.0 else settings.threshold,
                        labels=labels)


def rendered_bands(layer) -> tuple[int, int, int] | None:
    """The red, green and blue bands QGIS shows for a multiband layer (None for other renderers)."""
    from qgis.core import QgsMultiBandColorRenderer

    renderer = layer.renderer()
    if isinstance(renderer, QgsMultiBandColorRenderer):
        bands = (renderer.redBand(), renderer.greenBand(), renderer.blueBand())
        if min(bands) >= 1:
            return bands
    return None


def tiling_params(settings: PanelSettings):
    """The core's TilingParams from the panel settings (RsmclipError on bad values)."""
    from rsmclip_geo.api import TilingParams

    if settings.tile_size <= 0:  # the model's default tile size, filled in by the core
        size = {}
    elif settings.tile_unit == "px":
        size = {"tile_size": int(round(settings.tile_size))}
    else:
        size = {"tile_size_m": settings.tile_size}
    return TilingParams(**size, overlap=settings.overlap, scales=settings.scales)


def model_tiling(tiling, info):
    """The panel's tiling for a model (its BundleInfo): without a tile size, tiles sized per scene to the ground
    resolution the model was trained at (tile_size_m=auto) when its bundle records one."""
    from dataclasses import replace

    from rsmclip_geo.api import AUTO_TILE_SIZE

    if tiling.tile_size is None and tiling.tile_size_m is None and info.input_gsd_m is not None:
        return replace(tiling, tile_size_m=AUTO_TILE_SIZE)
    return tiling
