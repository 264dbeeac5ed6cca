"""Fixtures for the plugin suite: a real QgsApplication and main window, the plugin loaded through
its classFactory, GeoTIFF layers from ../shared/data and model bundles."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qgis_window import REPO, DesktopIface, process_until, start_qgis  # noqa: E402

SHARED_DATA = REPO / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def qgis_app(tmp_path_factory):
    app = start_qgis(tmp_path_factory.mktemp("qgis-settings"))
    yield app


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = SHARED_DATA.resolve()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """The core's index cache for this test session (RSMCLIP_GEO_CACHE)."""
    path = tmp_path_factory.mktemp("rsmclip-cache")
    os.environ["RSMCLIP_GEO_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def test_bundle() -> Path:
    """The core suites' checked-in tiny model bundle tests/data/tiny-bundle (random weights: structure checks,
    not rankings)."""
    return REPO / "tests" / "data" / "tiny-bundle"


@pytest.fixture(scope="session")
def demo_bundle() -> Path:
    """The demo bundle rsmclip_geo/models/rsmclip-demo-aid (trained: rankings)."""
    from rsmclip_geo.bundle import find_bundles

    found = [path for path in find_bundles() if path.name == "rsmclip-demo-aid"]
    assert found, "the demo model rsmclip-demo-aid is missing from rsmclip_geo/models/"
    return found[0]


@pytest.fixture
def iface(qgis_app, cache_dir):
    """A fresh main window and default plugin settings; the project is emptied afterwards."""
    from qgis.core import QgsApplication, QgsProject, QgsSettings

    QgsSettings().remove("rsmclip_search")
    desktop = DesktopIface()
    desktop.window.show()
    yield desktop
    tasks = QgsApplication.taskManager()
    tasks.cancelAll()
    process_until(lambda: tasks.countActiveTasks() == 0, timeout=60)
    QgsProject.instance().removeAllMapLayers()
    desktop.window.close()
    desktop.window.deleteLater()


@pytest.fixture
def plugin(iface):
    """The plugin created by its classFactory, as QGIS does, with initGui run."""
    import rsmclip_search

    instance = rsmclip_search.classFactory(iface)
    instance.initGui()
    yield instance
    instance.unload()


def add_raster(path: Path, name: str | None = None):
    """Load a GeoTIFF as a raster layer of the project (as Layer > Add Raster Layer does)."""
    from qgis.core import QgsProject, QgsRasterLayer

    layer = QgsRasterLayer(str(path), name or path.stem, "gdal")
    assert layer.isValid(), f"QGIS could not load {path}"
    QgsProject.instance().addMapLayer(layer)
    return layer
