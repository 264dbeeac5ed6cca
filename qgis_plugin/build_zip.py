"""Build the installable plugin zip (Plugins > Manage and Install Plugins > Install from ZIP).

The zip holds ``rsmclip_search/`` with the rsmclip_geo core (and its default model, as the wheel does)
vendored under ``rsmclip_search/vendor/``, so a zip install needs no separate install of the core.

    python qgis_plugin/build_zip.py [-o dist/rsmclip_search-<version>.zip]
"""

from __future__ import annotations

import argparse
import configparser
import os
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PLUGIN = HERE / "rsmclip_search"
CORE = REPO / "rsmclip_geo"
SKIP_DIRS = {"__pycache__", "packages", "vendor", ".pytest_cache"}
SKIP_SUFFIXES = {".pyc", ".pyo"}


def plugin_version() -> str:
    """The version in metadata.txt; it must equal the core's ``__version__``."""
    meta = configparser.ConfigParser()
    meta.read(PLUGIN / "metadata.txt", encoding="utf-8")
    version = meta["general"]["version"]
    core_version = core_version_string()
    if version != core_version:
        sys.exit(f"build_zip.py: metadata.txt version {version} differs from rsmclip_geo {core_version}")
    return version


def core_version_string() -> str:
    namespace: dict = {}
    exec((CORE / "__init__.py").read_text(encoding="utf-8"), namespace)
    return namespace["__version__"]


def default_model() -> str:
    """The core's DEFAULT_MODEL, read from rsmclip_geo/bundle.py without importing the core."""
    for line in (CORE / "bundle.py").read_text(encoding="utf-8").splitlines():
        if line.startswith("DEFAULT_MODEL = "):
            return line.split("=", 1)[1].strip().strip('"')
    raise SystemExit("build_zip.py: no DEFAULT_MODEL in rsmclip_geo/bundle.py")


def package_files(root: Path, models: str | None = None):
    """Files under ``root`` that belong in the zip (no caches, no installed packages; of ``models/``, only the
    bundle named ``models`` when given)."""
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if models and relative.parts[0] == "models" and len(relative.parts) > 2 and relative.parts[1] != models:
            continue
        if path.is_file() and not SKIP_DIRS.intersection(relative.parts[:-1]) and path.suffix not in SKIP_SUFFIXES:
            yield path, relative


def build(output: Path) -> Path:
    """Write the zip atomically to ``output``; returns it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".zip", dir=output.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path, relative in package_files(PLUGIN):
                archive.write(path, Path("rsmclip_search") / relative)
            for path, relative in package_files(CORE, default_model()):
                archive.write(path, Path("rsmclip_search", "vendor", "rsmclip_geo") / relative)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, help="zip to write (default dist/rsmclip_search-<version>.zip)")
    args = parser.parse_args(argv)
    version = plugin_version()
    output = args.output or REPO / "dist" / f"rsmclip_search-{version}.zip"
    build(output)
    print(f"{output} ({output.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
