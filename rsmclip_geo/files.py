"""Atomic outputs: write a temporary file or directory next to the target, then rename it into place.

`tempfile` creates its files 0600 and directories 0700; `publish` and `replace_directory` give them
the permissions a plain `open()` or `mkdir()` would have (0666 / 0777 less the umask) before the
rename, so outputs stay readable by the other users and services a GIS team shares them with.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rsmclip_geo.errors import RsmclipError


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (other threads may be creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def apply_default_mode(path: Path) -> None:
    """chmod a file to 0666, a directory to 0777, less the umask."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~current_umask())


def temp_file(path: Path, suffix: str = "") -> Path:
    """An empty temporary file in `path`'s directory, named after it (hidden)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def publish(tmp: Path, path: Path) -> None:
    """Rename a finished temporary file over `path`, with default permissions."""
    apply_default_mode(tmp)
    os.replace(tmp, path)


def replace_directory(tmp: Path, output: Path) -> None:
    """Move a finished directory `tmp` to `output`, replacing what is there (by renames only)."""
    apply_default_mode(tmp)
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old")
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def _os_reason(exc: OSError) -> str:
    """The system's short reason for an OSError ("No space left on device"), else its message."""
    return os.strerror(exc.errno) if exc.errno else (str(exc).strip() or type(exc).__name__).splitlines()[0]


@contextmanager
def write_errors(path: Path, advice: str) -> Iterator[None]:
    """Report an OSError raised while writing `path` (disk full, read-only folder) as one RsmclipError line."""
    try:
        yield
    except OSError as exc:
        raise RsmclipError(f"{path}: cannot be written ({_os_reason(exc)}); {advice}") from None
