"""Output locks: `<output>.lock` marks an output that a run is writing, so a second writer is refused.

The lock file holds JSON {pid, host, started, command}; it is created with O_EXCL, so of two
runs starting together only one gets it. A lock whose process is gone on this host is stale and
taken over; a lock written on another host is reported, never broken, since only that host can
tell whether its process still runs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from rsmclip_geo.errors import RsmclipError
from rsmclip_geo.files import write_errors
from rsmclip_geo.remote import clean_text

log = logging.getLogger(__name__)

#: Lock files this process holds (a lock naming this process but not listed here is stale), and the
#: guard that makes taking one and listing it a single step for the threads of this process.
_HELD: set[Path] = set()
_TAKING = threading.Lock()


def lock_path(output: Path) -> Path:
    """The lock file of an output: `<output>.lock` next to it."""
    return output.with_name(output.name + ".lock")


@dataclass(frozen=True)
class LockOwner:
    """The run holding a lock."""

    pid: int
    host: str
    started: str
    command: str

    @classmethod
    def this_process(cls) -> LockOwner:
        return cls(os.getpid(), socket.gethostname(), datetime.now().astimezone().isoformat(timespec="seconds"),
                   clean_text(" ".join(sys.argv))[:300])  # a signed URL's credentials left out

    @classmethod
    def parse(cls, text: str) -> LockOwner | None:
        """The owner written in a lock file, or None when the text is not one."""
        try:
            data = json.loads(text)
            owner = cls(int(data["pid"]), str(data["host"]), str(data["started"]), str(data["command"]))
        except (ValueError, TypeError, KeyError):
            return None
        return owner if owner.pid > 0 else None

    def is_running(self, lock: Path) -> bool:
        """Whether the process still holds `lock` (call only for a lock of this host)."""
        if self.pid == os.getpid():
            return lock.absolute() in _HELD
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process
            return True
        return True

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.started}: {self.command}"


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold `<output>.lock` while writing `output`; RsmclipError naming the other run when another holds it."""
    lock = lock_path(output)
    me = LockOwner.this_process()
    text = json.dumps(asdict(me))
    with _TAKING:
        _take(lock, output, me, text)
        _HELD.add(lock.absolute())
    try:
        yield
    finally:
        _HELD.discard(lock.absolute())
        _release(lock, text)


def _take(lock: Path, output: Path, me: LockOwner, text: str) -> None:
    """Create the lock file, taking over a stale one; RsmclipError when a live run holds it."""
    while not _create(lock, text):
        try:
            seen = lock.read_text(encoding="utf-8")
        except FileNotFoundError:  # released meanwhile
            continue
        except OSError as exc:
            raise RsmclipError(f"{output}: lock file {lock} cannot be read ({exc.strerror}); "
                               f"delete it if no index run is writing {output.name}") from None
        owner = LockOwner.parse(seen)
        if owner is None:
            raise RsmclipError(f"{output}: lock file {lock} holds no run; delete it if no index run is writing "
                               f"{output.name}")
        if owner.host != me.host:
            raise RsmclipError(f"{output}: locked by another host ({owner.describe()}); this machine cannot tell "
                               f"whether that run is still going: delete {lock} if it is not")
        if owner.is_running(lock):
            raise RsmclipError(f"{output}: another run is writing it ({owner.describe()}); wait for it to "
                               f"finish, or stop it")
        log.warning("%s: taking over the lock of pid %d, which is no longer running", output, owner.pid)
        _remove_stale(lock, seen)


def _create(lock: Path, text: str) -> bool:
    """Create the lock file holding `text`; False when it exists."""
    with write_errors(lock, "free disk space or make the folder writable"):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        except BaseException:
            lock.unlink(missing_ok=True)
            raise
    return True


def _remove_stale(lock: Path, seen: str) -> None:
    """Remove a stale lock, unless another run replaced it since it was read (then it is put back)."""
    aside = lock.with_name(f".{lock.name}.{os.getpid()}.stale")
    with write_errors(lock, "make the folder writable, or delete the lock file"):
        try:
            os.replace(lock, aside)
        except FileNotFoundError:  # another run removed it first
            return
        if aside.read_text(encoding="utf-8") != seen:
            os.replace(aside, lock)
        else:
            aside.unlink()


def _release(lock: Path, text: str) -> None:
    """Remove our lock file; a lock that cannot be removed is left for the next run to find stale."""
    try:
        if lock.read_text(encoding="utf-8") == text:
            lock.unlink()
    except OSError as exc:
        log.warning("%s: lock file not removed (%s); the next run takes it over", lock, exc.strerror or exc)
