"""Tiling: square pixel windows over a scene, in pixels, metres or fitted to the model's ground resolution,
with overlap and scales."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from numbers import Integral, Real
from typing import Any

from rsmclip_geo.bundle import parse_input_gsd_m
from rsmclip_geo.errors import RsmclipError
from rsmclip_geo.raster import Scene

log = logging.getLogger(__name__)

#: Tile size used when neither the parameters nor the model bundle give one.
FALLBACK_TILE_SIZE = 224
#: Smallest and largest tile side in pixels, given in pixels or converted from metres.
MIN_TILE_PX, MAX_TILE_PX = 8, 65536
#: `tile_size_m` value that sizes the tiles of each scene to the model's ground resolution (bundle input_gsd_m).
AUTO_TILE_SIZE = "auto"
#: Tiles putting a scene more than this factor outside the model's ground resolution get a warning.
GSD_TOLERANCE = 2.0


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
    tile_size_m: float | str | None = None  # metres, or AUTO_TILE_SIZE
    overlap: float = 0.0
    scales: tuple[int, ...] | str = field(default=(1,))  # or "1,2,4"
    min_valid: float = 0.5
    min_std: float = 2.0
    # with tile_size_m=auto, filled in by for_model(): the model's ground resolution and input size
    input_gsd_m: tuple[float, float] | None = None
    input_px: int | None = None

    def __post_init__(self) -> None:
        if self.tile_size is not None and self.tile_size_m is not None:
            raise RsmclipError(f"tile_size_m={self.tile_size_m}: tile_size is given too; give one size, in pixels or "
                               "in metres", param="tile_size_m", value=self.tile_size_m)
        if self.tile_size is not None:
            if not _whole(self.tile_size) or not MIN_TILE_PX <= self.tile_size <= MAX_TILE_PX:
                raise RsmclipError(f"tile_size={self.tile_size}: give a whole number of pixels between "
                                   f"{MIN_TILE_PX} and {MAX_TILE_PX}", param="tile_size", value=self.tile_size)
            object.__setattr__(self, "tile_size", int(self.tile_size))
        if isinstance(self.tile_size_m, str) and self.tile_size_m.strip().lower() == AUTO_TILE_SIZE:
            object.__setattr__(self, "tile_size_m", AUTO_TILE_SIZE)
        elif self.tile_size_m is not None and not (
                isinstance(self.tile_size_m, Real) and math.isfinite(self.tile_size_m) and self.tile_size_m > 0):
            raise RsmclipError(f"tile_size_m={self.tile_size_m}: give a finite size in metres above 0 "
                               f"(at least {MIN_TILE_PX} pixels of the scene), or {AUTO_TILE_SIZE}",
                               param="tile_size_m", value=self.tile_size_m)
        self._check_model_resolution()
        if not 0.0 <= self.overlap < 0.95:
            raise RsmclipError(f"overlap={self.overlap}: give a fraction of the tile, 0 <= overlap < 0.95",
                               param="overlap", value=self.overlap)
        if isinstance(self.scales, str):  # "1,2,4", as typed in a shell
            try:
                object.__setattr__(self, "scales", tuple(int(v) for v in self.scales.split(",") if v.strip()))
            except ValueError:
                raise RsmclipError(f"scales={self.scales}: give comma-separated whole numbers, e.g. 1,2,4",
                                   param="scales", value=self.scales) from None
        if not self.scales or not all(_whole(s) and s >= 1 for s in self.scales):
            given = ",".join(map(str, self.scales))
            raise RsmclipError(f"scales={given}: give positive integers, e.g. 1,2,4", param="scales", value=given)
        object.__setattr__(self, "scales", tuple(sorted({int(s) for s in self.scales})))
        if not 0.0 <= self.min_valid <= 1.0:
            raise RsmclipError(f"min_valid={self.min_valid}: give a fraction between 0 and 1", param="min_valid",
                               value=self.min_valid)
        if not 0.0 <= self.min_std < math.inf:
            raise RsmclipError(f"min_std={self.min_std}: give a finite non-negative value", param="min_std",
                               value=self.min_std)

    def _check_model_resolution(self) -> None:
        """input_gsd_m and input_px: both or neither, only with tile_size_m=auto, and valid."""
        if self.input_gsd_m is None and self.input_px is None:
            return
        if self.tile_size_m != AUTO_TILE_SIZE or self.input_gsd_m is None or self.input_px is None:
            raise RsmclipError("input_gsd_m and input_px go together, with tile_size_m=auto only")
        object.__setattr__(self, "input_gsd_m", parse_input_gsd_m(self.input_gsd_m, "input_gsd_m", RsmclipError))
        if not _whole(self.input_px) or self.input_px < 1:
            raise RsmclipError(f"input_px={self.input_px}: give the model's input size in pixels")
        object.__setattr__(self, "input_px", int(self.input_px))

    def resolved(self, default_tile_size: int | None) -> TilingParams:
        """These parameters with the model's default tile size filled in when no size was given."""
        if self.tile_size is None and self.tile_size_m is None:
            return replace(self, tile_size=int(default_tile_size or FALLBACK_TILE_SIZE))
        return self

    def for_model(self, info: Any) -> TilingParams:
        """These parameters for a model (its BundleInfo): its default tile size when no size was given, its
        ground resolution and input size for tile_size_m=auto (RsmclipError when the bundle records none)."""
        if self.tile_size_m != AUTO_TILE_SIZE:
            return self.resolved(getattr(info, "default_tile_size", None))
        if getattr(info, "input_gsd_m", None) is None:
            raise RsmclipError(f"tile_size_m=auto: model {info.name} does not record the ground resolution it was "
                               "trained at (input_gsd_m in bundle.json); give the tile size in metres or pixels",
                               param="tile_size_m", value=AUTO_TILE_SIZE)
        return replace(self, input_gsd_m=tuple(info.input_gsd_m), input_px=int(info.image_size))

    def tile_pixels(self, scene: Scene) -> int:
        """Tile side in pixels at scale 1 for a scene (metres are converted with its pixel size); RsmclipError
        naming the sizes in metres that work when the conversion leaves MIN_TILE_PX..MAX_TILE_PX or the scene."""
        if self.tile_size is not None:
            return int(self.tile_size)
        if self.tile_size_m is None:
            raise RsmclipError("tiling parameters have no tile size; resolve them with the model first")
        resolution = scene_resolution(scene)
        largest = largest_tile_pixels(scene)
        if self.tile_size_m == AUTO_TILE_SIZE:
            if self.input_gsd_m is None or self.input_px is None:
                raise RsmclipError("tile_size_m=auto: the model's ground resolution is not filled in; "
                                   "resolve the parameters with TilingParams.for_model first")
            if largest < MIN_TILE_PX:
                raise RsmclipError(f"{scene.name}: {scene.width}×{scene.height} px is smaller than the "
                                   f"smallest tile ({MIN_TILE_PX} px)")
            return fitting_tile_pixels(resolution, self.input_gsd_m, self.input_px, largest)
        pixels = self.tile_size_m / resolution if resolution > 0 else math.inf
        if not MIN_TILE_PX - 0.5 <= pixels < largest + 0.5:
            raise RsmclipError(
                f"tile_size_m={self.tile_size_m:g} is {pixels:.3g} px on {scene.name} ({resolution:.3g} m "
                f"per pixel, {scene.width}×{scene.height} px); give {_metres(MIN_TILE_PX * resolution)} to "
                f"{_metres(largest * resolution)} m ({MIN_TILE_PX} to {largest} px)",
                param="tile_size_m", value=self.tile_size_m)
        return round(pixels)

    def to_json(self) -> dict:
        data = asdict(self)
        data["scales"] = list(self.scales)
        if self.input_gsd_m is None:  # sizes given in pixels or metres keep the keys (and cache keys) they had
            del data["input_gsd_m"], data["input_px"]
        else:
            data["input_gsd_m"] = list(self.input_gsd_m)
        return data

    @classmethod
    def from_json(cls, data: dict) -> TilingParams:
        gsd = data.get("input_gsd_m")
        return cls(**{**data, "scales": tuple(data.get("scales", (1,))),
                      "input_gsd_m": tuple(gsd) if gsd is not None else None})


def scene_resolution(scene: Scene) -> float:
    """A scene's ground resolution in metres per pixel (mean of its x and y pixel sizes)."""
    px, py = scene.pixel_size_m()
    return (px + py) / 2


def largest_tile_pixels(scene: Scene) -> int:
    """The largest tile side in pixels a scene holds (its short side, at most MAX_TILE_PX)."""
    return min(MAX_TILE_PX, scene.width, scene.height)


def fitting_tile_pixels(resolution: float, input_gsd_m: tuple[float, float], input_px: int, largest: int) -> int:
    """Tile side in pixels that puts a scene of ``resolution`` m per pixel at the geometric centre of the model's
    ground resolution ``input_gsd_m`` (m per input pixel, ``input_px`` input pixels), or at the nearest of
    MIN_TILE_PX and ``largest`` when the centre lies beyond them."""
    centre = math.sqrt(input_gsd_m[0] * input_gsd_m[1])
    ideal = centre * input_px / resolution if resolution > 0 else math.inf
    return round(min(max(ideal, MIN_TILE_PX), largest))


def _mismatch(gsd: float, input_gsd_m: tuple[float, float]) -> float:
    """How many times a ground resolution (m per input pixel) lies outside a range; 1 inside it."""
    low, high = input_gsd_m
    return low / gsd if gsd < low else gsd / high if gsd > high else 1.0


def ground_resolution_warning(scene: Scene, params: TilingParams, info: Any) -> str | None:
    """A one-line warning when every scale's tiles put ``scene`` more than GSD_TOLERANCE× outside the ground
    resolution the model (BundleInfo ``info``) was trained at, naming the tile size in metres that fits;
    None when a scale fits or the bundle records no ground resolution."""
    input_gsd_m = getattr(info, "input_gsd_m", None)
    if input_gsd_m is None:
        return None
    resolution = scene_resolution(scene)
    input_px = int(info.image_size)
    base = params.tile_pixels(scene)
    sizes = [base * s for s in params.scales if base * s <= min(scene.width, scene.height)] or [base]
    gsds = [size * resolution / input_px for size in sizes]
    if min(_mismatch(gsd, input_gsd_m) for gsd in gsds) <= GSD_TOLERANCE:
        return None
    nearest = min(gsds, key=lambda gsd: _mismatch(gsd, input_gsd_m))
    if len(sizes) == 1:
        tiles = f"{sizes[0]} px tiles ({_metres(sizes[0] * resolution)} m) give {gsds[0]:.3g} m"
    else:
        tiles = (f"{sizes[0]}–{sizes[-1]} px tiles ({_metres(sizes[0] * resolution)}–"
                 f"{_metres(sizes[-1] * resolution)} m) give {gsds[0]:.3g}–{gsds[-1]:.3g} m")
    fit = fitting_tile_pixels(resolution, input_gsd_m, input_px, largest_tile_pixels(scene))
    fit_m = fit * resolution
    fit_option = f"tile_size_m={fit_m:.0f}" if fit_m >= 100 else f"tile_size_m={fit_m:.3g}"
    fit_gsd = fit_m / input_px
    if _mismatch(fit_gsd, input_gsd_m) <= GSD_TOLERANCE:
        advice = f"use {fit_option} (or auto)"
    else:
        small = fit_gsd < input_gsd_m[0]
        advice = (f"the scene is too {'small' if small else 'coarse'} for it: even its "
                  f"{'largest' if small else 'smallest'} tile ({fit_option}, {fit} px) gives {fit_gsd:.3g} m")
    finer = nearest < input_gsd_m[0]
    return (f"{scene.name}: {resolution:.3g} m per pixel; its {tiles} per model input pixel, "
            f"{_mismatch(nearest, input_gsd_m):.3g}× {'finer' if finer else 'coarser'} than {info.name} was trained "
            f"at ({input_gsd_m[0]:.3g}–{input_gsd_m[1]:.3g} m); results may be wrong: {advice}")


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
                    f"{scene.name}: tile of {size} px is larger than the scene "
                    f"({scene.width}×{scene.height} px); choose a smaller tile size (tile_size or tile_size_m)")
            log.warning("%s: scale %d tiles (%d px) do not fit in the scene (%d×%d px); skipped",
                        scene.name, scale, size, scene.width, scene.height)
            continue
        stride = max(1, round(size * (1.0 - params.overlap)))
        for row in axis_starts(scene.height, size, stride):
            for col in axis_starts(scene.width, size, stride):
                windows.append(TileWindow(col, row, size, size, scale))
    return windows
