"""The controls of one kind of background task in the dock: a run button and Cancel, a progress bar and a status
line (indexing a layer, finding changes)."""

from __future__ import annotations

from collections.abc import Callable

from qgis.PyQt.QtWidgets import QFormLayout, QHBoxLayout, QLabel, QProgressBar, QPushButton


class TaskControls:
    """Rows added to ``form``: ``run_button`` (calls ``run``) and ``cancel_button`` (calls ``cancel``, enabled
    while the task runs), ``progress`` (0-100) and ``status`` (starting with ``status``)."""

    def __init__(self, form: QFormLayout, run_text: str, status: str, run: Callable[[], None],
                 cancel: Callable[[], None]):
        buttons = QHBoxLayout()
        self.run_button = QPushButton(run_text)
        self.run_button.clicked.connect(run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(cancel)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        form.addRow(buttons)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        form.addRow(self.progress)
        self.status = QLabel(status)
        self.status.setWordWrap(True)
        form.addRow(self.status)

    def started(self, task, text: str) -> None:
        """``task`` (a QgsTask) runs: its progress in the bar, ``text`` in the status line, only Cancel enabled."""
        self.progress.setValue(0)
        self.status.setText(text)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        task.progressChanged.connect(self.show_progress)

    def show_progress(self, percent: float) -> None:
        """Task progress (emitted from the worker thread, delivered here on the GUI thread)."""
        self.progress.setValue(round(percent))

    def cancelling(self) -> None:
        self.status.setText("Cancelling …")

    def stopped(self) -> None:
        """The task ended: run enabled, Cancel not."""
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
