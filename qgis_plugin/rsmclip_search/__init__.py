"""RS-M-CLIP Search: a QGIS dock panel for multilingual text search over raster layers."""


def classFactory(iface):  # noqa: N802 (QGIS entry point name)
    """QGIS calls this to create the plugin; ``iface`` is the QgisInterface."""
    from .deps import add_plugin_paths

    add_plugin_paths()
    from .plugin import RsmclipSearchPlugin

    return RsmclipSearchPlugin(iface)
