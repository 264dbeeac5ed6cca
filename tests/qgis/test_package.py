"""The installable zip: built by qgis_plugin/build_zip.py, extracted into a plugins folder and
loaded by QGIS's own plugin machinery (qgis.utils) in a Python where the core is not installed,
so the vendored copy is what runs."""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
import zipfile

from qgis_window import REPO

LOAD_PLUGIN = r"""
import json, sys
from pathlib import Path
plugins_dir, harness_dir, repo = sys.argv[1:4]
# Hide the project's editable install: only the zip's vendored core may be importable.
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path = [p for p in sys.path if p not in ("", repo) and "__editable__" not in p]
sys.path.insert(0, harness_dir)
import importlib.util
assert importlib.util.find_spec("rsmclip_geo") is None, "the core must not be importable before the plugin loads"
from qgis_window import DesktopIface, start_qgis
app = start_qgis(Path(plugins_dir).parent / "settings")
import qgis.utils
qgis.utils.iface = DesktopIface()
qgis.utils.plugin_paths = [plugins_dir]
sys.path.insert(0, plugins_dir)
qgis.utils.updateAvailablePlugins()
ok = qgis.utils.loadPlugin("rsmclip_search") and qgis.utils.startPlugin("rsmclip_search")
plugin = qgis.utils.plugins.get("rsmclip_search")
import rsmclip_geo
report = {
    "available": qgis.utils.available_plugins,
    "started": bool(ok),
    "core": rsmclip_geo.__file__,
    "deps_hidden": plugin.dock.deps_box.isHidden(),
    "actions": [a.text() for a in qgis.utils.iface.toolbar.actions()],
}
unloaded = qgis.utils.unloadPlugin("rsmclip_search")
report["unloaded"] = unloaded
print("REPORT " + json.dumps(report))
app.exitQgis()
"""


def test_zip_installs_with_vendored_core_and_loads_in_qgis(tmp_path):
    archive = tmp_path / "rsmclip_search.zip"
    subprocess.run([sys.executable, str(REPO / "qgis_plugin" / "build_zip.py"), "-o", str(archive)], check=True)
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        meta = configparser.ConfigParser()
        meta.read_string(zf.read("rsmclip_search/metadata.txt").decode("utf-8"))
    assert "rsmclip_search/__init__.py" in names
    assert "rsmclip_search/vendor/rsmclip_geo/search.py" in names
    assert not [n for n in names if "__pycache__" in n or "/packages/" in n]
    models = {n.split("/")[4] for n in names if n.startswith("rsmclip_search/vendor/rsmclip_geo/models/")
              and n.count("/") > 4}
    assert models == {"rsmclip-e5-lite0"}  # the default model only, as in the wheel
    assert meta["general"]["qgisMinimumVersion"] == "3.22"
    assert f"rsmclip_search/{meta['general']['icon']}" in names

    plugins = tmp_path / "profile" / "python" / "plugins"
    plugins.mkdir(parents=True)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(plugins)
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", PYTHONNOUSERSITE="1")
    done = subprocess.run(
        [sys.executable, "-c", LOAD_PLUGIN, str(plugins), str(REPO / "tests" / "qgis"), str(REPO)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, f"plugin load script failed:\n{done.stdout}\n{done.stderr}"
    report = json.loads(lines[-1][len("REPORT "):])
    assert "rsmclip_search" in report["available"]
    assert report["started"]
    assert report["core"].startswith(str(plugins / "rsmclip_search" / "vendor" / "rsmclip_geo"))
    assert report["deps_hidden"], "all runtime dependencies are present in the QGIS venv"
    assert "RS-M-CLIP Search" in report["actions"]
    assert report["unloaded"]
