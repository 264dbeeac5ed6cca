"""Tiling: square pixel windows over a scene, in pixels or metres, with overlap and scales."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from numbers import Integral, Real

from rsmclip_geo.errors import RsmclipError
from rsmclip_geo.raster import Scene

log = logging.getLogger(__name__)

#: Tile size used when neither the parameters nor the model bundle give one.
FALLBACK_TILE_SIZE = 224
#: Smallest and largest tile side in pixels, given in pixels or converted from metres.
MIN_TILE_PX, MAX_TILE_PX = 8, 65536


def _whole(value: object) -> bool:
    """Whether a value is a whole number (an integer, or a float without fraction; not a bool)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, Integral) or isinstance(value, float) and value.is_integer()


def _metres(value: float) -> str:
    """A length in metres to three significant digits, without exponent."""
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


@dataclass(frozen=True)
class TilingParams:
    """How a scene is cut into tiles; stored in index metadata and part of the cache key."""

    tile_size: int | None = None
    tile_size_m: float | None = None
    overlap: float = 0.0
    scales: tuple[int, ...] = field(default=(1,))
    min_valid: float = 0.5
    min_std: float = 2.0

    def __post_init__(self) -> None:
        if self.tile_size is not None and self.tile_size_m is not None:
            raise RsmclipError("--tile-size and --tile-size-m exclude each other: give one")
        if self.tile_size is not None:
            if not _whole(self.tile_size) or not MIN_TILE_PX <= self.tile_size <= MAX_TILE_PX:
                raise RsmclipError(f"--tile-size {self.tile_size}: give a whole number of pixels between "
                                   f"{MIN_TILE_PX} and {MAX_TILE_PX}")
            object.__setattr__(self, "tile_size", int(self.tile_size))
        if self.tile_size_m is not None and not (
                isinstance(self.tile_size_m, Real) and math.isfinite(self.tile_size_m) and self.tile_size_m > 0):
            raise RsmclipError(f"--tile-size-m {self.tile_size_m}: give a finite size in metres above 0 "
                               f"(at least {MIN_TILE_PX} pixels of the scene)")
        if not 0.0 <= self.overlap < 0.95:
            raise RsmclipError(f"--overlap {self.overlap}: give a fraction of the tile, 0 <= overlap < 0.95")
        if not self.scales or not all(_whole(s) and s >= 1 for s in self.scales):
            raise RsmclipError(f"--scales {','.join(map(str, self.scales))}: give positive integers, e.g. 1,2,4")
        object.__setattr__(self, "scales", tuple(sorted({int(s) for s in self.scales})))
        if not 0.0 <= self.min_valid <= 1.0:
            raise RsmclipError(f"--min-valid {self.min_valid}: give a fraction between 0 and 1")
        if not 0.0 <= self.min_std < math.inf:
            raise RsmclipError(f"--min-std {self.min_std}: give a finite non-negative value")

    def resolved(self, default_tile_size: int | None) -> TilingParams:
        """These parameters with the model's default tile size filled in when no size was given."""
        if self.tile_size is None and self.tile_size_m is None:
            return replace(self, tile_size=int(default_tile_size or FALLBACK_TILE_SIZE))
        return self

    def tile_pixels(self, scene: Scene) -> int:
        """Tile side in pixels at scale 1 for a scene (metres are converted with its pixel size); RsmclipError
        naming the sizes in metres that work when the conversion leaves MIN_TILE_PX..MAX_TILE_PX or the scene."""
        if self.tile_size is not None:
            return int(self.tile_size)
        if self.tile_size_m is None:
            raise RsmclipError("tiling parameters have no tile size; resolve them with the model first")
        px, py = scene.pixel_size_m()
        resolution = (px + py) / 2
        pixels = self.tile_size_m / resolution if resolution > 0 else math.inf
        largest = min(MAX_TILE_PX, scene.width, scene.height)
        if not MIN_TILE_PX - 0.5 <= pixels < largest + 0.5:
            raise RsmclipError(
                f"tile_size_m={self.tile_size_m:g} is {pixels:.3g} px on {scene.path.name} ({resolution:.3g} m "
                f"per pixel, {scene.width}×{scene.height} px); give {_metres(MIN_TILE_PX * resolution)} to "
                f"{_metres(largest * resolution)} m ({MIN_TILE_PX} to {largest} px)")
        return round(pixels)

    def to_json(self) -> dict:
        data = asdict(self)
        data["scales"] = list(self.scales)
        return data

    @classmethod
    def from_json(cls, data: dict) -> TilingParams:
        return cls(**{**data, "scales": tuple(data.get("scales", (1,)))})


@dataclass(frozen=True)
class TileWindow:
    """A window in full-resolution pixels of a scene, and the scale it was cut at."""

    col: int
    row: int
    width: int
    height: int
    scale: int

    def tile_id(self, scene_fingerprint: str) -> str:
        """Stable id: scene fingerprint prefix + scale + col + row."""
        return f"{scene_fingerprint[:12]}-s{self.scale}-c{self.col}-r{self.row}"


def axis_starts(length: int, size: int, stride: int) -> list[int]:
    """Window starts along one axis; the last window is clamped to end at the raster edge."""
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def tile_windows(scene: Scene, params: TilingParams) -> list[TileWindow]:
    """All windows of a scene at every scale; RsmclipError if the scale-1 tile exceeds the scene."""
    base = params.tile_pixels(scene)
    windows: list[TileWindow] = []
    for scale in params.scales:
        size = base * scale
        if size > scene.width or size > scene.height:
            if scale == params.scales[0]:
                raise RsmclipError(
                    f"{scene.path.name}: tile of {size} px is larger than the scene "
                    f"({scene.width}×{scene.height} px); choose a smaller --tile-size or --tile-size-m")
            log.warning("%s: scale %d tiles (%d px) do not fit in the scene (%d×%d px); skipped",
                        scene.path.name, scale, size, scene.width, scene.height)
            continue
        stride = max(1, round(size * (1.0 - params.overlap)))
        for row in axis_starts(scene.height, size, stride):
            for col in axis_starts(scene.width, size, stride):
                windows.append(TileWindow(col, row, size, size, scale))
    return windows
