"""The panel in a real QGIS window: opening over a GeoTIFF layer, settings, dependency check."""

from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

from conftest import add_raster
from qgis_window import process_until


def test_toolbar_action_opens_panel_over_geotiff(plugin, iface, shared_data):
    layer = add_raster(shared_data / "geotiff" / "colorado_rgb_15cm.tif")
    assert not plugin.dock.isVisible()
    plugin.action.trigger()
    process_until(lambda: plugin.dock.isVisible(), timeout=10)
    assert plugin.action.isChecked()
    assert plugin.dock.layer_combo.currentLayer() is layer
    assert layer.crs().authid() == "EPSG:26913"
    assert plugin.action in iface.plugin_menus["&RS-M-CLIP Search"].actions()
    assert not plugin.dock.deps_box.isVisible()
    assert plugin.dock.index_button.isEnabled()
    plugin.dock.close()
    process_until(lambda: not plugin.action.isChecked(), timeout=10)


def test_unload_removes_panel_and_menu(iface):
    import rsmclip_search

    instance = rsmclip_search.classFactory(iface)
    instance.initGui()
    action = instance.action
    assert action in iface.toolbar.actions()
    instance.unload()
    assert action not in iface.toolbar.actions()
    assert "&RS-M-CLIP Search" not in iface.plugin_menus
    assert instance.dock is None


def test_settings_persist_between_sessions(iface):
    import rsmclip_search

    first = rsmclip_search.classFactory(iface)
    first.initGui()
    dock = first.dock
    dock.tile_size.setValue(40)
    dock.tile_unit.setCurrentIndex(dock.tile_unit.findData("m"))
    dock.overlap.setValue(0.25)
    dock.scales.setText("1,2")
    dock.threads.setValue(2)
    dock.top_k.setValue(7)
    dock.threshold.setValue(0.123)
    dock.heatmap.setChecked(True)
    dock.change.top_k.setValue(4)
    dock.change.direction.setCurrentIndex(dock.change.direction.findData("disappeared"))
    first.unload()

    second = rsmclip_search.classFactory(iface)
    second.initGui()
    dock = second.dock
    try:
        assert dock.tile_size.value() == 40
        assert dock.tile_unit.currentData() == "m"
        assert dock.overlap.value() == 0.25
        assert dock.scales.text() == "1,2"
        assert dock.threads.value() == 2
        assert dock.top_k.value() == 7
        assert abs(dock.threshold.value() - 0.123) < 1e-9
        assert dock.heatmap.isChecked()
        assert dock.change.top_k.value() == 4
        assert dock.change.direction.currentData() == "disappeared"
    finally:
        dock.tile_unit.setCurrentIndex(dock.tile_unit.findData("px"))
        dock.tile_size.setValue(0)
        dock.scales.setText("1")
        dock.heatmap.setChecked(False)
        dock.threads.setValue(0)
        dock.overlap.setValue(0)
        dock.threshold.setValue(-1)
        dock.top_k.setValue(10)
        dock.change.top_k.setValue(10)
        dock.change.direction.setCurrentIndex(dock.change.direction.findData("appeared"))
        second.unload()


def build_wheel(folder: Path, name: str, version: str = "1.0") -> Path:
    """A minimal pure-Python wheel holding module ``name`` (a real installable archive)."""
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = f"{name}-{version}.dist-info/RECORD"
    lines = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        lines.append(f"{path},sha256={digest},{len(text.encode())}")
    files[record] = "\n".join(lines + [f"{record},,"]) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def test_tile_size_defaults_to_the_models(plugin):
    from rsmclip_search.dock import tiling_params
    from rsmclip_search.settings import PanelSettings

    assert plugin.dock.tile_size.value() == 0 and plugin.dock.tile_size.text() == "model default"
    params = tiling_params(PanelSettings())
    assert params.tile_size is None and params.tile_size_m is None
    assert params.resolved(150).tile_size == 150  # e.g. the bundled demo model's default_tile_size
    assert tiling_params(PanelSettings(tile_size=40, tile_unit="m")).tile_size_m == 40


def test_model_default_sizes_tiles_to_the_models_ground_resolution(plugin, shared_data, test_bundle, cache_dir):
    """"model default" indexes with tile_size_m=auto when the bundle records input_gsd_m (the demo model: the
    0.35 m farm scene gets its short side, 686 px = 242 m), else with the bundle's default tile size."""
    from rsmclip_geo.bundle import find_bundles
    from test_search_flow import index_layer, open_panel

    layer = add_raster(shared_data / "geotiff" / "pix4d_farm_rgba_35cm.tif")
    dock = open_panel(plugin)
    demo = next(path for path in find_bundles() if path.name == "rsmclip-demo-aid")
    index_layer(dock, layer, demo, tile_px=0)
    assert dock.index.tiling.tile_size_m == "auto" and dock.index.tiling.input_gsd_m == (4.6875, 75.0)
    assert set(dock.index.column("win_width").tolist()) == {686}
    index_layer(dock, layer, test_bundle, tile_px=0)
    assert dock.index.tiling.tile_size_m is None and dock.index.tiling.tile_size == 224
    assert set(dock.index.column("win_width").tolist()) == {224}


def test_missing_dependency_is_explained_and_installed_with_pip(iface, tmp_path, monkeypatch):
    """A dependency that is not importable disables the panel and offers pip; the button installs
    it into the plugin-local folder in a task, after which the panel is enabled."""
    import rsmclip_search
    from rsmclip_search import deps

    module = "rsmclip_probe_dependency"
    wheel = build_wheel(tmp_path, module)
    target = tmp_path / "packages"
    monkeypatch.setattr(deps, "DEPENDENCIES", deps.DEPENDENCIES + (deps.Dependency(module, str(wheel), "pip install it"),))
    monkeypatch.setattr(deps, "PACKAGES_DIR", target)
    monkeypatch.setattr(sys, "path", list(sys.path))

    instance = rsmclip_search.classFactory(iface)
    instance.initGui()
    dock = instance.dock
    try:
        assert not dock.deps_box.isHidden()
        assert module in dock.deps_label.text()
        assert not dock.index_button.isEnabled()
        dock.install_button.click()
        process_until(lambda: dock.install_task is None, timeout=300)
        assert (target / module / "__init__.py").is_file()
        assert dock.deps_box.isHidden()
        assert dock.index_button.isEnabled()
        assert not list(target.glob("numpy*"))
    finally:
        instance.unload()


def test_pip_constraints_keep_qgis_numpy():
    import numpy
    from rsmclip_search import deps

    pins = deps.pip_constraints()
    assert f"numpy=={numpy.__version__}" in pins
    assert ("pyarrow<22" in pins) == numpy.__version__.startswith("1.")
    assert Path(deps.python_executable()).is_file()


def test_failed_pip_install_is_reported_and_panel_survives(iface, tmp_path, monkeypatch):
    import rsmclip_search
    from rsmclip_search import deps

    missing_wheel = tmp_path / "rsmclip_absent_dependency-1.0-py3-none-any.whl"
    monkeypatch.setattr(
        deps, "DEPENDENCIES",
        deps.DEPENDENCIES + (deps.Dependency("rsmclip_absent_dependency", str(missing_wheel), "pip install it"),),
    )
    monkeypatch.setattr(deps, "PACKAGES_DIR", tmp_path / "packages")
    monkeypatch.setattr(sys, "path", list(sys.path))
    instance = rsmclip_search.classFactory(iface)
    instance.initGui()
    dock = instance.dock
    try:
        dock.install_button.click()
        process_until(lambda: dock.install_task is None, timeout=300)
        texts = [item.text() for item in iface.messageBar().items()]
        assert any(text.startswith("pip failed (exit 1)") for text in texts), texts
        assert not dock.deps_box.isHidden() and dock.install_button.isEnabled()
        assert not dock.index_button.isEnabled()
    finally:
        instance.unload()
