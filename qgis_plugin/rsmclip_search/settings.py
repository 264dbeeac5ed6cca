"""Panel settings persisted with QgsSettings under ``rsmclip_search/``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from qgis.core import QgsSettings

PREFIX = "rsmclip_search/"


@dataclass
class PanelSettings:
    """Everything the panel remembers between QGIS sessions."""

    model: str = ""  # bundle name or directory; "" = the default bundle
    tile_size: float = 0.0  # 0 = the model's default tile size (bundle.json default_tile_size)
    tile_unit: str = "px"  # "px" or "m"
    overlap: float = 0.0  # fraction of the tile size, 0 <= overlap < 1
    scales: str = "1"  # comma-separated multiples of the tile size
    threads: int = 0  # 0 = let ONNX Runtime and the readers choose
    top_k: int = 10
    threshold: float = -1.0  # -1 = any score
    heatmap: bool = False
    change_top_k: int = 10  # changes listed by the Change tab
    change_direction: str = "appeared"  # or "disappeared" (the core's CHANGE_DIRECTIONS)
    export_dir: str = ""

    @classmethod
    def load(cls) -> "PanelSettings":
        """Read the stored values; missing or unreadable ones keep their defaults."""
        store = QgsSettings()
        values = {}
        for field in fields(cls):
            default = getattr(cls, field.name)
            raw = store.value(PREFIX + field.name, default)
            try:
                if field.type in ("bool", bool):
                    values[field.name] = raw if isinstance(raw, bool) else str(raw).lower() == "true"
                else:
                    values[field.name] = type(default)(raw)
            except (TypeError, ValueError):
                values[field.name] = default
        return cls(**values)

    def save(self) -> None:
        """Write every value."""
        store = QgsSettings()
        for name, value in asdict(self).items():
            store.setValue(PREFIX + name, value)
