"""Runtime dependencies of the plugin: detect what is missing, install it with pip into a
plugin-local folder.

This module imports neither QGIS nor the core, so it works before anything else is importable and
can be run as a script (``python deps.py --constraints``) by the test-environment setup.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parent
# The core (rsmclip_geo) is vendored here by the packaging script.
VENDOR_DIR = PLUGIN_DIR / "vendor"
# Packages installed from the panel land here (one folder per Python minor version).
PACKAGES_DIR = PLUGIN_DIR / "packages" / f"py{sys.version_info[0]}{sys.version_info[1]}"


@dataclass(frozen=True)
class Dependency:
    """One importable module the core needs and how to obtain it."""

    module: str
    requirement: str | None  # pip requirement, or None when pip must not install it
    hint: str  # what to do when it is missing and pip cannot help


DEPENDENCIES = (
    Dependency("numpy", None, "numpy ships with QGIS; reinstall QGIS"),
    Dependency(
        "rasterio",
        None,
        "install your system's rasterio built on QGIS's GDAL (Debian/Ubuntu: python3-rasterio, "
        "OSGeo4W: python3-rasterio); a pip wheel would load a second GDAL into QGIS",
    ),
    Dependency("onnxruntime", "onnxruntime", "pip install onnxruntime"),
    Dependency("tokenizers", "tokenizers", "pip install tokenizers"),
    Dependency("pyarrow", "pyarrow", "pip install pyarrow"),
    Dependency("shapely", "shapely", "pip install shapely"),
    Dependency("pystac", "pystac", "pip install pystac"),
    Dependency("pystac_client", "pystac-client", "pip install pystac-client"),
)


def add_plugin_paths(packages_dir: Path | None = None) -> None:
    """Make the vendored core and the plugin-local packages importable (after QGIS's own
    packages, so they never shadow numpy or GDAL bindings)."""
    for folder in (VENDOR_DIR, PACKAGES_DIR if packages_dir is None else packages_dir):
        path = str(folder)
        if folder.is_dir() and path not in sys.path:
            sys.path.append(path)
    importlib.invalidate_caches()


def is_importable(module: str) -> bool:
    """True when ``module`` can be found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_dependencies() -> list[Dependency]:
    """The DEPENDENCIES that cannot be found, or else the core if it fails to import (e.g. a
    package built for another numpy)."""
    missing = [dep for dep in DEPENDENCIES if not is_importable(dep.module)]
    if not is_importable("rsmclip_geo"):
        missing.append(Dependency("rsmclip_geo", None, "reinstall the plugin zip (it vendors the rsmclip_geo core)"))
    if missing:
        return missing
    try:
        importlib.import_module("rsmclip_geo.api")
    except ImportError as exc:
        return [Dependency("rsmclip_geo", None, f"the core fails to import ({exc}); fix or remove the package named")]
    return []


def pip_constraints() -> list[str]:
    """Pins that keep pip from replacing what QGIS's Python already links against.

    numpy stays at the running version; pyarrow 22+ requires numpy 2, so with numpy 1 it stays
    below 22 (onnxruntime, tokenizers and shapely wheels accept numpy >= 1.22). affine stays at
    the system's version: rasterio 1.3's compiled code fails with affine 3.
    """
    from importlib.metadata import PackageNotFoundError, version

    import numpy

    pins = [f"numpy=={numpy.__version__}"]
    if int(numpy.__version__.split(".")[0]) < 2:
        pins.append("pyarrow<22")
    try:
        pins.append(f"affine=={version('affine')}")
    except PackageNotFoundError:
        pass
    return pins


def python_executable() -> str:
    """The Python interpreter that runs QGIS's Python (inside QGIS, sys.executable is often the
    QGIS binary itself)."""
    name = Path(sys.executable).name.lower()
    if name.startswith("python"):
        return sys.executable
    major, minor = sys.version_info[:2]
    candidates = [
        Path(sys.exec_prefix) / "python.exe",  # Windows (OSGeo4W, standalone installer)
        Path(sys.exec_prefix) / "bin" / f"python{major}.{minor}",  # macOS bundle, Linux
        Path(sys.exec_prefix) / "bin" / "python3",
    ]
    for path in candidates:
        if path.is_file():
            return str(path)
    found = shutil.which(f"python{major}.{minor}") or shutil.which("python3")
    if found is None:
        raise FileNotFoundError(f"no python{major}.{minor} executable found next to QGIS to run pip")
    return found


def pip_install_command(requirements: list[str], target: Path, constraints_file: Path) -> list[str]:
    """The pip command line that installs ``requirements`` into ``target``."""
    cmd = [python_executable(), "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    cmd += ["--target", str(target), "--upgrade", "--constraint", str(constraints_file)]
    return cmd + requirements


def install(requirements: list[str], target: Path | None = None) -> subprocess.CompletedProcess:
    """Run pip into ``target`` (default PACKAGES_DIR) with the numpy/pyarrow pins, then drop any
    numpy pip copied there (QGIS's own numpy must stay the only one on sys.path). Returns the
    finished process; the caller reports ``stderr`` when ``returncode`` is not 0."""
    target = PACKAGES_DIR if target is None else target
    target.mkdir(parents=True, exist_ok=True)
    constraints = target / "constraints.txt"
    constraints.write_text("\n".join(pip_constraints()) + "\n", encoding="utf-8")
    cmd = pip_install_command(requirements, target, constraints)
    env = dict(os.environ, PYTHONNOUSERSITE="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for shadow in target.glob("numpy*"):
        shutil.rmtree(shadow, ignore_errors=True)
    add_plugin_paths(target)
    return done


def pip_requirements(missing: list[Dependency]) -> list[str]:
    """The pip requirements for the missing dependencies pip can provide."""
    return [dep.requirement for dep in missing if dep.requirement]


if __name__ == "__main__":
    if sys.argv[1:] == ["--constraints"]:
        print("\n".join(pip_constraints()))
    else:
        sys.exit("usage: python deps.py --constraints")
