"""Screenshot of QGIS with the RS-M-CLIP Search panel and a result layer over a scene.

Runs the plugin in a real main window under Xvfb, indexes a GeoTIFF, types a query and grabs the
window into a PNG:

    xvfb-run -a -s "-screen 0 1600x1000x24" .qgis-venv/bin/python tests/qgis/make_screenshot.py \
        --scene ../shared/data/geotiff/rotterdam_tanks_4band_1m.tif --query 储油罐 -o docs/img/qgis_panel.png
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qgis_window import DesktopIface, process_until, start_qgis, type_text  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scene", type=Path, required=True, help="GeoTIFF to index")
    parser.add_argument("--query", required=True, help="query to type in the panel")
    parser.add_argument("--model", help="bundle directory (default: the bundled default model)")
    parser.add_argument("--tile-size", type=int, default=0, help="tile size in pixels (0 = keep the panel's)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)

    settings = Path(tempfile.mkdtemp(prefix="rsmclip-qgis-settings-"))
    app = start_qgis(settings)
    from qgis.core import QgsProject, QgsRasterLayer
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest

    import rsmclip_search

    iface = DesktopIface()
    iface.window.resize(1500, 900)
    iface.window.show()
    plugin = rsmclip_search.classFactory(iface)
    plugin.initGui()
    layer = QgsRasterLayer(str(args.scene), args.scene.stem, "gdal")
    if not layer.isValid():
        sys.exit(f"make_screenshot.py: QGIS cannot open {args.scene}")
    QgsProject.instance().addMapLayer(layer)
    plugin.action.trigger()
    dock = plugin.dock
    dock.layer_combo.setLayer(layer)
    if args.model:
        dock.select_model(args.model)
    if args.tile_size:
        dock.tile_unit.setCurrentIndex(dock.tile_unit.findData("px"))
        dock.tile_size.setValue(args.tile_size)
    dock.top_k.setValue(args.top_k)
    QTest.mouseClick(dock.index_button, Qt.LeftButton)
    process_until(lambda: dock.index_task is None, timeout=600)
    if dock.index is None:
        sys.exit("make_screenshot.py: indexing failed: " + "; ".join(i.text() for i in iface.bar.items()))
    type_text(dock.query, args.query)
    QTest.keyClick(dock.query, Qt.Key_Return)
    process_until(lambda: dock.search_task is None, timeout=300)
    iface.bar.clearWidgets()
    dock.results.setCurrentItem(dock.results.topLevelItem(0))
    rendered = []
    iface.canvas.mapCanvasRefreshed.connect(lambda: rendered.append(True))
    iface.canvas.setExtent(layer.extent())
    iface.canvas.refresh()
    process_until(lambda: rendered and not iface.canvas.isDrawing(), timeout=60)
    for _ in range(20):
        app.processEvents()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(f".{args.output.name}.tmp.png")
    if not iface.window.grab().save(str(tmp), "PNG"):
        sys.exit(f"make_screenshot.py: cannot write {args.output}")
    os.replace(tmp, args.output)
    print(args.output)
    plugin.unload()
    QgsProject.instance().removeAllMapLayers()
    iface.window.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
