"""Background work as QgsTasks: the core's functions run off the GUI thread, report progress to
the panel and QGIS's task bar, and stop between batches when cancelled."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any

from qgis.core import QgsTask

log = logging.getLogger("rsmclip_search")

# work(progress, is_cancelled) -> result; progress(done, total) and is_cancelled() -> bool are the
# core's callback signatures.
Work = Callable[[Callable[[int, int], None], Callable[[], bool]], Any]


class CoreTask(QgsTask):
    """Runs ``work`` in QGIS's task manager and calls ``on_done(task)`` on the GUI thread.

    After it finishes: ``cancelled`` is true if the user cancelled (whatever the core did then);
    otherwise ``error`` is the exception the core raised, or ``result`` what ``work`` returned.
    """

    def __init__(self, description: str, work: Work, on_done: Callable[["CoreTask"], None]):
        super().__init__(description, QgsTask.Flag.CanCancel)
        self.work = work
        self.on_done = on_done
        self.result: Any = None
        self.error: BaseException | None = None
        self.details = ""

    @property
    def cancelled(self) -> bool:
        return self.isCanceled()

    def report(self, done: int, total: int) -> None:
        """Progress callback for the core (called from the worker thread)."""
        self.setProgress(100.0 * done / total if total else 0.0)

    def run(self) -> bool:
        try:
            self.result = self.work(self.report, self.isCanceled)
        except Exception as exc:  # reported on the GUI thread by on_done
            self.error = exc
            self.details = traceback.format_exc()
            log.debug("task %r failed:\n%s", self.description(), self.details)
            return False
        return not self.isCanceled()

    def finished(self, ok: bool) -> None:  # GUI thread
        self.on_done(self)
