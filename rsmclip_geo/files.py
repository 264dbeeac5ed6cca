"""Atomic outputs: write a temporary file or directory next to the target, then rename it into place.

`tempfile` creates its files 0600 and directories 0700; `publish` and `replace_directory` give them
the permissions a plain `open()` or `mkdir()` would have (0666 / 0777 less the umask) before the
rename, so outputs stay readable by the other users and services a GIS team shares them with.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
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
    """Move a finished directory `tmp` to `output`, replacing what is there (by renames only; what was
    there is put back when the last rename fails)."""
    apply_default_mode(tmp)
    if not output.exists():
        os.replace(tmp, output)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
    old = aside / output.name
    os.replace(output, old)
    try:
        os.replace(tmp, output)
    except OSError:
        os.replace(old, output)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


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


def check_writable(path: Path, formats: Sequence[str] | None = None, param: str = "output",
                   directory: bool = False) -> None:
    """RsmclipError naming the parameter when a file (or, with `directory`, a directory) cannot be
    written at `path`; checked before any work."""
    def fail(problem: str) -> RsmclipError:
        return RsmclipError(f"{param}={path}: {problem}", param=param, value=path)

    if formats is not None and path.suffix.lower() not in formats:
        raise fail(f"unknown output format; use one of {', '.join(formats)}")
    if not directory and path.is_dir():
        raise fail("is a directory; give a file name")
    if directory and path.is_file():
        raise fail("is a file; give a directory name (or a .parquet file name)")
    if not path.parent.is_dir():
        raise fail(f"directory {path.parent} does not exist; create it or choose another path")
    if not os.access(path.parent, os.W_OK):
        raise fail(f"directory {path.parent} is not writable; choose another output path")


def write_text_atomic(path: str | os.PathLike, text: str, param: str = "output") -> Path:
    """Write UTF-8 `text` to a temporary file next to `path` and rename it into place."""
    path = Path(path)
    check_writable(path, param=param)
    tmp = temp_file(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
