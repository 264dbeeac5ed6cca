"""Scenes: open a raster, choose its RGB bands, stretch its dtype to 8 bits, read windows.

Only windowed or decimated reads are used; a whole scene is never held in memory at full resolution.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.transform import Affine
from rasterio.windows import Window

from rsmclip_geo.errors import RasterError

log = logging.getLogger(__name__)

#: Long side (pixels) of the decimated read used for the stretch and the all-nodata check.
SAMPLE_SIZE = 1024
#: Percentiles of the per-scene stretch for non-uint8 scenes.
STRETCH_PERCENTILES = (2.0, 98.0)
#: Scenes larger than this on a side should be internally tiled for fast windowed reads.
UNTILED_WARN_SIZE = 4096
#: Resampling of windows read smaller than full resolution (tiles decimated to the model input). GDAL's
#: cubic filter widens with the downscale factor, as Pillow's bicubic resize does, so tiles match the
#: resize that models are trained and exported with (tests/test_raster.py checks the agreement).
DECIMATION = Resampling.cubic
#: GDAL block cache cap in MB, applied unless GDAL_CACHEMAX is set. GDAL's own default, 5 % of RAM,
#: lets the decoded blocks of a big scene (or VRT mosaic) grow the process by gigabytes; tiles are
#: read once, so a small cache costs no speed. Takes effect when set before GDAL's first read.
GDAL_CACHE_MB = 256
os.environ.setdefault("GDAL_CACHEMAX", str(GDAL_CACHE_MB))
#: Most source pixels one read of a run of windows may span (SceneReader.read_windows): bounds GDAL's
#: buffers when big tiles (large --tile-size or scales) are read in runs.
RUN_MAX_PIXELS = 4 * 1024 * 1024
_FINGERPRINT_CHUNK = 64 * 1024
_FINGERPRINT_SAMPLES = 16


def scene_fingerprint(path: str | os.PathLike) -> str:
    """sha256 hex of the file size, its first and last 64 KiB and 16 evenly spaced 4 KiB samples.

    Content based (a copied or renamed scene keeps its fingerprint) and cheap on big files.
    """
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(_FINGERPRINT_CHUNK))
        for i in range(1, _FINGERPRINT_SAMPLES + 1):
            f.seek(size * i // (_FINGERPRINT_SAMPLES + 1))
            digest.update(f.read(4096))
        f.seek(max(0, size - _FINGERPRINT_CHUNK))
        digest.update(f.read(_FINGERPRINT_CHUNK))
    return digest.hexdigest()


@dataclass(frozen=True)
class Scene:
    """A georeferenced raster with its RGB band mapping and 8-bit stretch."""

    path: Path
    fingerprint: str
    width: int
    height: int
    crs_wkt: str
    transform: tuple[float, ...]
    rgb_bands: tuple[int, int, int]
    alpha_band: int | None
    nodata: float | None
    dtype: str
    stretch: tuple[tuple[float, float], ...] | None

    @property
    def crs(self) -> CRS:
        return CRS.from_wkt(self.crs_wkt)

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform[:6])

    def pixel_size_m(self) -> tuple[float, float]:
        """Ground size of one pixel in metres (x, y); geographic CRSs use the scene centre latitude."""
        a, b, _, d, e, _ = self.transform[:6]
        px, py = math.hypot(a, d), math.hypot(b, e)
        crs = self.crs
        if crs.is_geographic:
            _, lat = apply_affine(self.affine, self.width / 2, self.height / 2)
            metres_per_degree = 111_320.0
            return px * metres_per_degree * math.cos(math.radians(lat)), py * 110_574.0
        _, factor = crs.linear_units_factor
        return px * factor, py * factor

    def footprint(self, col: float, row: float, width: float, height: float) -> list[tuple[float, float]]:
        """Corner coordinates of a pixel window in the scene CRS, as a closed ring."""
        return window_ring(self.affine, col, row, width, height)


def apply_affine(affine: Affine, x: float, y: float) -> tuple[float, float]:
    """A point mapped through a geotransform, written out: affine 2.x (QGIS's Python, whose
    rasterio 1.3 needs it) has no `@`, affine 3.x deprecates `*`."""
    a, b, c, d, e, f = tuple(affine)[:6]
    return a * x + b * y + c, d * x + e * y + f


def window_ring(affine: Affine, col: float, row: float, width: float, height: float) -> list[tuple[float, float]]:
    """Closed ring of a pixel window's corners mapped through a geotransform."""
    return [tuple(p) for p in window_rings(affine, np.array([[col, row, width, height]], dtype=np.float64))[0]]


def window_rings(affine: Affine, windows: np.ndarray) -> np.ndarray:
    """Closed corner rings [n, 5, 2] of pixel windows [n, 4] (col, row, width, height) in map coordinates."""
    col, row, width, height = np.asarray(windows, dtype=np.float64).T
    px = np.stack([col, col + width, col + width, col, col], axis=1)
    py = np.stack([row, row, row + height, row + height, row], axis=1)
    a, b, c, d, e, f = tuple(affine)[:6]
    return np.stack([a * px + b * py + c, d * px + e * py + f], axis=-1)


def open_scene(path: str | os.PathLike, *, bands: tuple[int, int, int] | None = None) -> Scene:
    """Open a raster, choose its RGB bands and dtype stretch; RasterError on unusable input."""
    path = Path(path)
    if not path.is_file():
        raise RasterError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(path)
    except RasterioError as exc:
        raise RasterError(
            f"{path}: cannot be opened as a raster ({_first_line(exc)}); it is not a raster or it is "
            "truncated or corrupt; give a GeoTIFF") from None
    with src:
        if src.crs is None or src.transform == Affine.identity():
            raise RasterError(
                f"{path}: raster has no CRS or geotransform, so tiles cannot be placed on the map; "
                "georeference it first (e.g. gdal_edit.py -a_srs EPSG:XXXX -a_ullr ...) — "
                "pixel-space search is not supported"
            )
        rgb, alpha = choose_bands(src, bands, path)
        if src.block_shapes[0][1] == src.width and max(src.width, src.height) > UNTILED_WARN_SIZE:
            log.warning(
                "%s is not internally tiled: windowed reads will be slow; convert it with "
                "gdal_translate -co TILED=YES -co COMPRESS=DEFLATE", path)
        sample, valid = _decimated_sample(src, rgb, path)
        if not valid.any():
            raise RasterError(f"{path}: every pixel is nodata or masked; nothing to index")
        stretch = None
        if any(src.dtypes[b - 1] != "uint8" for b in rgb):
            # All-zero pixels are the usual fill of undeclared nodata; keep them out of the stretch.
            filled = valid & (sample != 0).any(axis=0)
            stretch = percentile_stretch(sample, filled if filled.any() else valid)
        return Scene(
            path=path.resolve(),
            fingerprint=scene_fingerprint(path),
            width=src.width,
            height=src.height,
            crs_wkt=src.crs.to_wkt(),
            transform=tuple(src.transform)[:6],
            rgb_bands=rgb,
            alpha_band=alpha,
            nodata=src.nodata,
            dtype=src.dtypes[rgb[0] - 1],
            stretch=stretch,
        )


def choose_bands(
    src: rasterio.DatasetReader, bands: tuple[int, int, int] | None, path: Path
) -> tuple[tuple[int, int, int], int | None]:
    """The 1-based (R, G, B) bands and the alpha band of a dataset, by colour interpretation."""
    interp = list(src.colorinterp)
    alpha = interp.index(ColorInterp.alpha) + 1 if ColorInterp.alpha in interp else None
    if bands is not None:
        if len(bands) != 3 or any(not 1 <= b <= src.count for b in bands):
            raise RasterError(
                f"{path}: --bands {','.join(map(str, bands))} is not three band numbers in 1..{src.count}")
        return (int(bands[0]), int(bands[1]), int(bands[2])), alpha
    colour = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
    if all(c in interp for c in colour):
        return tuple(interp.index(c) + 1 for c in colour), alpha  # type: ignore[return-value]
    data_bands = [i + 1 for i, c in enumerate(interp) if c != ColorInterp.alpha]
    if len(data_bands) == 1:
        return (data_bands[0],) * 3, alpha
    if src.count == 3 and alpha is None:
        return (1, 2, 3), None
    raise RasterError(
        f"{path}: {src.count} bands ({', '.join(c.name for c in interp)}) have no red/green/blue "
        "colour interpretation; choose the RGB bands with --bands R,G,B (e.g. --bands 3,2,1)"
    )


def _decimated_sample(
    src: rasterio.DatasetReader, rgb: tuple[int, int, int], path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """RGB bands and validity of the whole scene at most SAMPLE_SIZE on a side (uses overviews)."""
    factor = max(1.0, max(src.width, src.height) / SAMPLE_SIZE)
    shape = (max(1, round(src.height / factor)), max(1, round(src.width / factor)))
    unique = sorted(set(rgb))
    try:
        data = src.read(unique, out_shape=(len(unique), *shape), resampling=Resampling.nearest)
        masks = src.read_masks(unique, out_shape=(len(unique), *shape), resampling=Resampling.nearest)
    except RasterioError as exc:
        raise RasterError(f"{path}: pixels cannot be read ({_first_line(exc)}); the file is truncated or corrupt") from None
    order = [unique.index(b) for b in rgb]
    data, valid = data[order], (masks > 0).any(axis=0)
    if np.issubdtype(data.dtype, np.floating):
        valid &= np.isfinite(data).all(axis=0)
    return data, valid


def percentile_stretch(sample: np.ndarray, valid: np.ndarray) -> tuple[tuple[float, float], ...]:
    """Per-band (low, high) of the 2–98 % percentiles over valid pixels of a [3,h,w] sample."""
    result = []
    for band in sample:
        values = band[valid].astype(np.float64)
        low, high = np.percentile(values, STRETCH_PERCENTILES)
        if high <= low:
            high = low + 1.0
        result.append((float(low), float(high)))
    return tuple(result)


def to_uint8(data: np.ndarray, stretch: tuple[tuple[float, float], ...] | None) -> np.ndarray:
    """[3,h,w] band data to uint8 with the scene's stretch (uint8 data passes through)."""
    if stretch is None:
        return data.astype(np.uint8, copy=False)
    out = np.empty(data.shape, dtype=np.uint8)
    for i, (low, high) in enumerate(stretch):
        scaled = (np.nan_to_num(data[i].astype(np.float32), nan=low) - low) * (255.0 / (high - low))
        out[i] = np.clip(scaled, 0, 255)
    return out


def decimated_shape(width: int, height: int, max_size: int | None) -> tuple[int, int]:
    """(height, width) of a window read at most `max_size` pixels on its long side (as is when smaller)."""
    if max_size is None or max(width, height) <= max_size:
        return height, width
    factor = max(width, height) / max_size
    return max(1, round(height / factor)), max(1, round(width / factor))


def window_runs(windows: Sequence[tuple[int, int, int, int]], max_size: int | None
                ) -> list[list[tuple[int, int, int, int]]]:
    """Consecutive (col, row, width, height) windows grouped into runs that one read can serve
    (SceneReader.read_windows): same row and size, each starting after the previous one by at most
    one window width, at a whole number of output pixels from the run's first window, and spanning
    at most RUN_MAX_PIXELS source pixels."""
    runs: list[list[tuple[int, int, int, int]]] = []
    for window in windows:
        col, row, width, height = window
        if runs:
            first, last = runs[-1][0], runs[-1][-1]
            out_w = decimated_shape(width, height, max_size)[1]
            if ((row, width, height) == first[1:] and 0 < col - last[0] <= width
                    and (col - first[0]) * out_w % width == 0
                    and (col + width - first[0]) * height <= RUN_MAX_PIXELS):
                runs[-1].append(window)
                continue
        runs.append([window])
    return runs


class SceneReader:
    """Windowed RGB reads of one scene; use one reader per thread (rasterio handles are not shared)."""

    def __init__(self, scene: Scene):
        self.scene = scene
        self._unique = sorted(set(scene.rgb_bands))
        self._order = [self._unique.index(b) for b in scene.rgb_bands]
        try:
            self._src = rasterio.open(scene.path)
        except RasterioError as exc:
            raise RasterError(f"{scene.path}: cannot be opened ({_first_line(exc)})") from None

    def read_rgb(
        self, col: int, row: int, width: int, height: int, max_size: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [h,w,3] RGB and bool [h,w] validity of a window, decimated to ≤ max_size on its long side
        (``DECIMATION`` resampling)."""
        out_h, out_w = decimated_shape(width, height, max_size)
        return self._read(col, row, width, height, out_h, out_w)

    def read_windows(
        self, windows: Sequence[tuple[int, int, int, int]], max_size: int | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """`read_rgb` of each (col, row, width, height) window, with one read per run of windows.

        A run is a sequence of same-size windows on one row, each starting at most one window width
        after the previous one, at a whole output pixel from the first: GDAL resamples every window
        on the same source grid, so slicing one decimated read of the run's span gives the pixels
        each window's own read gives, with the overlap between neighbours resampled only once.
        """
        tiles = []
        for run in window_runs(windows, max_size):
            col, row, width, height = run[0]
            out_h, out_w = decimated_shape(width, height, max_size)
            span = run[-1][0] + width - col
            rgb, valid = self._read(col, row, span, height, out_h, span * out_w // width)
            for start in ((c - col) * out_w // width for c, *_ in run):
                tiles.append((rgb[:, start:start + out_w], valid[:, start:start + out_w]))
        return tiles

    def _read(self, col: int, row: int, width: int, height: int, out_h: int, out_w: int
              ) -> tuple[np.ndarray, np.ndarray]:
        resampling = DECIMATION if (out_h, out_w) != (height, width) else Resampling.nearest
        window = Window(col, row, width, height)
        shape = (len(self._unique), out_h, out_w)
        try:
            data = self._src.read(self._unique, window=window, out_shape=shape, resampling=resampling)
            masks = self._src.read_masks(self._unique, window=window, out_shape=shape, resampling=Resampling.nearest)
        except RasterioError as exc:
            raise RasterError(
                f"{self.scene.path}: pixels of window col={col} row={row} cannot be read "
                f"({_first_line(exc)}); the file is truncated or corrupt") from None
        data = data[self._order]
        valid = (masks > 0).any(axis=0)
        if np.issubdtype(data.dtype, np.floating):
            valid &= np.isfinite(data).all(axis=0)
        rgb = to_uint8(data, self.scene.stretch)
        rgb[:, ~valid] = 0
        return np.ascontiguousarray(rgb.transpose(1, 2, 0)), valid

    def close(self) -> None:
        self._src.close()

    def __enter__(self) -> SceneReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _first_line(exc: BaseException) -> str:
    """First line of an error message, preferring GDAL's underlying cause."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
