"""Scenes: open a raster, choose its RGB bands, stretch its dtype to 8 bits, read windows.

Only windowed or decimated reads are used; a whole scene is never held in memory at full resolution.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import MemoryFile
from rasterio.transform import Affine
from rasterio.windows import Window

from rsmclip_geo.errors import RasterError, first_line
from rsmclip_geo.remote import (
    clean_location, clean_text, forget_cached, gdal_path, is_remote, remote_env, remote_fingerprint, scene_file_name,
)

log = logging.getLogger(__name__)

#: Long side (pixels) of the decimated read used for the stretch and the all-nodata check.
SAMPLE_SIZE = 1024
#: Percentiles of the per-scene stretch for non-uint8 scenes.
STRETCH_PERCENTILES = (2.0, 98.0)
#: Scenes larger than this on a side should be internally tiled for fast windowed reads.
UNTILED_WARN_SIZE = 4096
#: Resampling of windows read smaller than full resolution (tiles decimated to the model input). GDAL's
#: cubic filter widens with the downscale factor, as Pillow's bicubic resize does, so tiles match the
#: resize that models are trained and exported with (tests/runtime/test_raster.py checks the agreement).
DECIMATION = Resampling.cubic
#: GDAL block cache cap in MB, applied unless GDAL_CACHEMAX is set. GDAL's own default, 5 % of RAM,
#: lets the decoded blocks of a big scene (or VRT mosaic) grow the process by gigabytes; tiles are
#: read once, so a small cache costs no speed. Takes effect when set before GDAL's first read.
GDAL_CACHE_MB = 256
os.environ.setdefault("GDAL_CACHEMAX", str(GDAL_CACHE_MB))
#: Most source pixels one read of a run of windows may span (SceneReader.read_windows): bounds GDAL's
#: buffers when big tiles (a large tile_size or scales) are read in runs.
RUN_MAX_PIXELS = 4 * 1024 * 1024
#: `open_scene(nodata=...)` default: the nodata value the file declares (if any).
FILE_NODATA = "file"
#: Share of a scene's outermost pixels that, zero in every band of a file declaring no nodata value or
#: mask, makes open_scene suggest nodata=0 (the black collar of a reprojected scene).
COLLAR_WARN_FRACTION = 0.05
#: Stand-in value of invalid pixels in masked resampling (GDAL leaves nodata pixels out of its kernels).
_MASKED = float(np.finfo(np.float32).min)
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

    path: Path | str  # a local file (resolved), a remote scene's location without credentials, or a band
    #                   stack's locations, comma-separated
    fingerprint: str
    width: int
    height: int
    crs_wkt: str
    transform: tuple[float, ...]
    rgb_bands: tuple[int, int, int]
    alpha_band: int | None
    nodata: float | None  # the value that marks invalid pixels: the file's, or the override
    dtype: str
    stretch: tuple[tuple[float, float], ...] | None
    nodata_overridden: bool = False  # `nodata` replaces the file's nodata value (None: ignores it)
    source: str | None = field(default=None, repr=False)  # what GDAL opens for a remote scene or a band stack's
    #                                                         VRT XML (may hold credentials)
    revision: str | None = None  # a remote scene's ETag (else Last-Modified) and size
    stac: dict | None = None  # a STAC item's scene: its stac.STAC_FIELDS

    @property
    def name(self) -> str:
        """The scene's file name."""
        return scene_file_name(self.path)

    def gdal_env(self) -> AbstractContextManager[None]:
        """Context of the GDAL settings its reads need (remote_env for a remote scene)."""
        return remote_env() if self.source else nullcontext()

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


def open_scene(path: str | os.PathLike, *, bands: tuple[int, int, int] | None = None,
               nodata: float | str | None = FILE_NODATA) -> Scene:
    """Open a raster, choose its RGB bands and dtype stretch; RasterError on unusable input.

    `nodata`: FILE_NODATA (the file's own nodata value), a number that replaces it, or None to ignore it.
    Alpha bands and mask bands of the file always count. `path` may be an https://, s3:// or /vsi…
    location of a cloud-optimised GeoTIFF (rsmclip_geo.remote), read with range requests.
    """
    if is_remote(path):
        source = gdal_path(path)  # may hold credentials: never shown
        shown = clean_location(path)
        return _scene(lambda: _open_remote(source, shown), shown, shown, source, lambda: remote_fingerprint(source),
                      bands=bands, nodata=nodata)
    path = Path(path)
    return _scene(lambda: _open_dataset(path), path, path.resolve(), None, lambda: (scene_fingerprint(path), None),
                  bands=bands, nodata=nodata)


def open_band_stack(locations: Sequence[str | os.PathLike], *, nodata: float | str | None = FILE_NODATA) -> Scene:
    """One RGB scene of three single-band rasters on one grid, R, G, B in order (a STAC item's `red`, `green`,
    `blue` assets): a GDAL VRT of their first bands, which stays windowed and remote (its XML is the scene's
    source; no file is written). Its path is the locations without credentials, comma-separated; its
    fingerprint covers the three files'. RasterError naming the band file that cannot be read or is off grid."""
    bands, grid = [], None
    for location in locations:
        remote = is_remote(location)
        source = gdal_path(location) if remote else os.fspath(Path(location).resolve())
        shown = clean_location(location) if remote else Path(location)
        with ExitStack() as stack:
            stack.enter_context(remote_env() if remote else nullcontext())
            src = stack.enter_context(_open_remote(source, shown) if remote else _open_dataset(Path(location)))
            this = (src.width, src.height, src.crs, tuple(src.transform)[:6])
            if grid is not None and this != grid:
                raise RasterError(f"{shown}: not on the grid of the first band (size, CRS or transform differ); "
                                  "stack bands of one scene")
            grid = this
            fingerprint = remote_fingerprint(source) if remote else (scene_fingerprint(source), None)
            bands.append((source, shown, src.dtypes[0], src.nodata, src.block_shapes[0], fingerprint))
    width, height, crs, transform = grid
    xml = band_stack_vrt(width, height, crs, transform, [(b[0], b[2], b[3], b[4]) for b in bands])
    digest = hashlib.sha256("".join(b[5][0] for b in bands).encode()).hexdigest()
    revisions = [b[5][1] for b in bands]
    revision = " ".join(revisions) if all(revisions) else None
    shown = ",".join(os.fspath(b[1]) for b in bands)
    return _scene(lambda: _open_raster(xml, shown, "check the band files"), shown, shown, xml,
                  lambda: (digest, revision), bands=None, nodata=nodata)


def band_stack_vrt(width: int, height: int, crs: CRS, transform: Sequence[float],
                   bands: Sequence[tuple[str, str, float | None, tuple[int, int]]]) -> str:
    """VRT XML of R, G, B bands taken from band 1 of each (GDAL path, dtype, nodata, block shape)."""
    from xml.sax.saxutils import escape

    a, b, c, d, e, f = transform
    rows = []
    for number, ((source, dtype, nodata, (block_h, block_w)), colour) in enumerate(
            zip(bands, ("Red", "Green", "Blue")), start=1):
        gdal_type = _GDAL_TYPES[dtype]
        rows.append(
            f'<VRTRasterBand dataType="{gdal_type}" band="{number}" blockXSize="{block_w}" blockYSize="{block_h}">'
            f"<ColorInterp>{colour}</ColorInterp>"
            + ("" if nodata is None else f"<NoDataValue>{nodata!r}</NoDataValue>")
            + f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(source)}</SourceFilename>'
            f"<SourceBand>1</SourceBand>"
            f'<SrcRect xOff="0" yOff="0" xSize="{width}" ySize="{height}"/>'
            f'<DstRect xOff="0" yOff="0" xSize="{width}" ySize="{height}"/></SimpleSource></VRTRasterBand>')
    return (f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{escape(crs.to_wkt())}</SRS>'
            f"<GeoTransform>{c!r}, {a!r}, {b!r}, {f!r}, {d!r}, {e!r}</GeoTransform>{''.join(rows)}</VRTDataset>")


#: GDAL data type names of numpy dtypes (VRT bands).
_GDAL_TYPES = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
               "int32": "Int32", "float32": "Float32", "float64": "Float64"}


def _scene(opener: Callable[[], rasterio.DatasetReader], shown: Path | str, path: Path | str, source: str | None,
           fingerprint: Callable[[], tuple[str, str | None]], *, bands: tuple[int, int, int] | None, nodata: float | str | None) -> Scene:
    """The Scene of the raster `opener()` opens: `shown` in messages, `path` stored, `source` what GDAL opens
    for a remote or stacked scene, `fingerprint()` its (fingerprint, revision)."""
    if not (nodata is None or nodata == FILE_NODATA or isinstance(nodata, (int, float, np.number))):
        raise RasterError(f"nodata={nodata!r}: give a number, None (ignore the file's nodata value) "
                          f"or {FILE_NODATA!r}")
    with ExitStack() as stack:
        stack.enter_context(remote_env() if source else nullcontext())
        src = stack.enter_context(opener())
        if src.crs is None or src.transform == Affine.identity():
            raise RasterError(
                f"{shown}: raster has no CRS or geotransform, so tiles cannot be placed on the map; "
                "georeference it first (e.g. gdal_edit.py -a_srs EPSG:XXXX -a_ullr ...) — "
                "pixel-space search is not supported"
            )
        rgb, alpha = choose_bands(src, bands, shown)
        if src.block_shapes[0][1] == src.width and max(src.width, src.height) > UNTILED_WARN_SIZE:
            log.warning(
                "%s is not internally tiled: windowed reads will be slow; convert it with "
                "gdal_translate -co TILED=YES -co COMPRESS=DEFLATE", shown)
        overridden = nodata != FILE_NODATA
        value = src.nodata if not overridden else None if nodata is None else float(nodata)
        masks = uses_file_masks(src, rgb, overridden)
        sample, valid = _decimated_sample(src, rgb, shown, value, masks)
        if not valid.any():
            raise RasterError(f"{shown}: every pixel is nodata or masked; nothing to index")
        if not overridden and not masks:
            warn_zero_collar(shown, sample, valid)
        scene_fp, revision = fingerprint()
        return Scene(
            path=path,
            fingerprint=scene_fp,
            width=src.width,
            height=src.height,
            crs_wkt=src.crs.to_wkt(),
            transform=tuple(src.transform)[:6],
            rgb_bands=rgb,
            alpha_band=alpha,
            nodata=value,
            dtype=src.dtypes[rgb[0] - 1],
            stretch=scene_stretch(src, rgb, sample, valid),
            nodata_overridden=overridden,
            source=source,
            revision=revision,
        )


def read_image(path: str | os.PathLike, *, bands: tuple[int, int, int] | None = None) -> np.ndarray:
    """uint8 [h,w,3] RGB of an image chip. JPEG, PNG and other photos through Pillow, as they are; TIFFs of
    any band count and dtype (georeferencing not needed), and any image when `bands` is given, like a scene:
    open_scene's band choice and stretch, invalid pixels black, at most SAMPLE_SIZE on its long side.
    RasterError naming the file when it is missing or not a readable image."""
    path = Path(path)
    if bands is None and path.suffix.lower() not in (".tif", ".tiff"):
        return _read_photo(path)
    src = _open_dataset(path)
    with src:
        rgb, _ = choose_bands(src, bands, path)
        sample, valid = _decimated_sample(src, rgb, path, src.nodata, uses_file_masks(src, rgb, False))
        image = to_uint8(sample, scene_stretch(src, rgb, sample, valid))
    image[:, ~valid] = 0
    return np.ascontiguousarray(image.transpose(1, 2, 0))


def _read_photo(path: Path) -> np.ndarray:
    """uint8 [h,w,3] RGB of an ordinary image file through Pillow; RasterError naming it when unreadable."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise RasterError(f"{path}: image not found")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise RasterError(f"{path}: not a readable image ({first_line(exc, root_cause=True)}); give a JPEG, PNG or TIFF") from None


def _open_dataset(path: Path) -> rasterio.DatasetReader:
    """A raster opened for reading; RasterError for a directory, a missing file or a file GDAL cannot read."""
    if path.is_dir():
        raise RasterError(f"{path}: is a directory; give raster files (e.g. {path / '*.tif'})")
    if not path.is_file():
        raise RasterError(f"{path}: no such file")
    return _open_raster(path, path, "it is not a raster or it is truncated or corrupt; give a GeoTIFF")


def _open_remote(source: str, shown: str) -> rasterio.DatasetReader:
    """A remote raster opened for reading (inside remote_env), as it is now; RasterError naming its clean
    location."""
    forget_cached(source)
    return _open_raster(source, shown, "check the address, the credentials (AWS_* variables or a signed URL) "
                                       "and that it is a GeoTIFF")


def _open_raster(source: Path | str, shown: Path | str, advice: str) -> rasterio.DatasetReader:
    """rasterio.open of `source`; RasterError naming `shown` with GDAL's reason and `advice` when it fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(source)
    except RasterioError as exc:
        raise RasterError(f"{shown}: cannot be opened as a raster ({clean_text(first_line(exc, root_cause=True))}); "
                          f"{advice}") from None


def unreadable_advice(path: Path | str) -> str:
    """What to do when pixels of a scene cannot be read: a local file is damaged; a remote one may be too,
    or its connection failed."""
    if is_remote(path):
        return "the connection failed or the file is truncated; check the network and rerun (an index resumes)"
    return "the file is truncated or corrupt"


def uses_file_masks(src: rasterio.DatasetReader, bands: Sequence[int], nodata_overridden: bool) -> bool:
    """Whether the file's masks (nodata value, alpha band, mask band) tell which pixels of `bands` are valid:
    not when it has none, nor when an overridden nodata value replaces the file's."""
    flags = [src.mask_flag_enums[b - 1] for b in bands]
    if nodata_overridden and any(MaskFlags.nodata in f for f in flags):
        return False
    return any(MaskFlags.all_valid not in f for f in flags)


def value_validity(data: np.ndarray, nodata: float | None) -> np.ndarray:
    """bool [h,w]: pixels of [bands,h,w] data that are finite in every band and differ from `nodata` in one."""
    valid = np.ones(data.shape[1:], dtype=bool)
    if np.issubdtype(data.dtype, np.floating):
        valid &= np.isfinite(data).all(axis=0)
    if nodata is not None and not math.isnan(nodata):
        valid &= (data != nodata).any(axis=0)
    return valid


def warn_zero_collar(path: Path | str, sample: np.ndarray, valid: np.ndarray) -> None:
    """Warn when the edge of a scene without nodata value or mask is zero-filled, e.g. a reprojection's collar."""
    zero = valid & (sample == 0).all(axis=0)
    edge = np.concatenate([zero[0], zero[-1], zero[1:-1, 0], zero[1:-1, -1]])
    if edge.mean() >= COLLAR_WARN_FRACTION:
        log.warning("%s: %.0f %% of the scene's edge is zero in every band but the file declares no nodata "
                    "value; if that is fill (e.g. a black collar), rerun with nodata=0", path, 100 * edge.mean())


def choose_bands(
    src: rasterio.DatasetReader, bands: tuple[int, int, int] | None, path: Path | str
) -> tuple[tuple[int, int, int], int | None]:
    """The 1-based (R, G, B) bands and the alpha band of a dataset, by colour interpretation."""
    interp = list(src.colorinterp)
    alpha = interp.index(ColorInterp.alpha) + 1 if ColorInterp.alpha in interp else None
    if bands is not None:
        if len(bands) != 3 or any(not 1 <= b <= src.count for b in bands):
            given = ",".join(map(str, bands))
            raise RasterError(f"bands={given}: not three band numbers in 1..{src.count} of {path}", param="bands",
                              value=given)
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
        f"bands: {path} has {src.count} bands ({', '.join(c.name for c in interp)}) and no red/green/blue "
        "colour interpretation; choose its R,G,B bands, e.g. 3,2,1", param="bands"
    )


def _decimated_sample(
    src: rasterio.DatasetReader, rgb: tuple[int, int, int], path: Path | str, nodata: float | None, masks: bool
) -> tuple[np.ndarray, np.ndarray]:
    """RGB bands and validity of the whole scene at most SAMPLE_SIZE on a side (nearest neighbour, uses
    overviews); `masks`: whether the file's masks count (uses_file_masks)."""
    factor = max(1.0, max(src.width, src.height) / SAMPLE_SIZE)
    shape = (max(1, round(src.height / factor)), max(1, round(src.width / factor)))
    unique = sorted(set(rgb))
    try:
        data = src.read(unique, out_shape=(len(unique), *shape), resampling=Resampling.nearest)
        valid = np.ones(shape, dtype=bool)
        if masks:
            valid = (src.read_masks(unique, out_shape=(len(unique), *shape), resampling=Resampling.nearest) > 0
                     ).any(axis=0)
    except RasterioError as exc:
        raise RasterError(f"{path}: pixels cannot be read ({clean_text(first_line(exc, root_cause=True))}); "
                          f"{unreadable_advice(path)}") from None
    data = data[[unique.index(b) for b in rgb]]
    return data, valid & value_validity(data, nodata)


def scene_stretch(src: rasterio.DatasetReader, rgb: tuple[int, int, int], sample: np.ndarray,
                  valid: np.ndarray) -> tuple[tuple[float, float], ...] | None:
    """The 8-bit stretch of a scene from its decimated sample: None for uint8 bands, else percentiles."""
    if all(src.dtypes[b - 1] == "uint8" for b in rgb):
        return None
    # All-zero pixels are the usual fill of undeclared nodata; keep them out of the stretch.
    filled = valid & (sample != 0).any(axis=0)
    return percentile_stretch(sample, filled if filled.any() else valid)


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
    """Windowed RGB reads of one scene; use one reader per thread (rasterio handles are not shared).

    Validity is read by nearest neighbour at the resolution of the pixels returned: the file's masks
    (unless an overridden nodata value replaces them), NaN and the overridden nodata value. Where
    invalid pixels that GDAL's resampling does not know of (NaN, an overridden value) reach a decimated
    read, the window is read again at full resolution and resampled with them left out.
    """

    def __init__(self, scene: Scene):
        self.scene = scene
        self._unique = sorted(set(scene.rgb_bands))
        self._order = [self._unique.index(b) for b in scene.rgb_bands]
        self._env = ExitStack()
        self._env.enter_context(scene.gdal_env())
        try:
            self._src = rasterio.open(scene.source or scene.path)
        except RasterioError as exc:
            self._env.close()
            raise RasterError(f"{scene.path}: cannot be opened ({clean_text(first_line(exc, root_cause=True))})"
                              ) from None
        self._masks = uses_file_masks(self._src, self._unique, scene.nodata_overridden)
        self._floating = any(np.issubdtype(np.dtype(self._src.dtypes[b - 1]), np.floating) for b in self._unique)
        self._override = scene.nodata_overridden and scene.nodata is not None
        self._values = self._floating or self._override

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
        window = Window(col, row, width, height)
        shape = (out_h, out_w)
        decimated = shape != (height, width)
        try:
            data = self._src.read(self._unique, window=window, out_shape=(len(self._unique), *shape),
                                  resampling=DECIMATION if decimated else Resampling.nearest)
            values = self._nearest(window, shape) if decimated and self._values else data
            valid = self._validity(window, shape, values)
            if decimated and self._leaked(data, valid):
                data = self._masked_read(window, shape, values, valid)
        except RasterioError as exc:
            raise RasterError(
                f"{self.scene.path}: pixels of window col={col} row={row} cannot be read "
                f"({clean_text(first_line(exc, root_cause=True))}); {unreadable_advice(self.scene.path)}") from None
        rgb = to_uint8(data[self._order], self.scene.stretch)
        rgb[:, ~valid] = 0
        return np.ascontiguousarray(rgb.transpose(1, 2, 0)), valid

    def _nearest(self, window: Window, shape: tuple[int, int]) -> np.ndarray:
        """The bands of a window read at `shape` by nearest neighbour."""
        return self._src.read(self._unique, window=window, out_shape=(len(self._unique), *shape),
                              resampling=Resampling.nearest)

    def _validity(self, window: Window, shape: tuple[int, int], values: np.ndarray) -> np.ndarray:
        """bool validity of a window at `shape` from nearest-neighbour reads (`values`: its bands so read)."""
        valid = np.ones(shape, dtype=bool)
        if self._masks:
            masks = self._src.read_masks(self._unique, window=window, out_shape=(len(self._unique), *shape),
                                         resampling=Resampling.nearest)
            valid = (masks > 0).any(axis=0)
        if self._values:
            valid &= value_validity(values, self.scene.nodata)
        return valid

    def _leaked(self, data: np.ndarray, valid: np.ndarray) -> bool:
        """Whether invalid pixels GDAL's resampling does not know of may have reached a decimated read:
        NaN in valid pixels, or any invalid pixel under an overridden nodata value."""
        if self._floating and not np.isfinite(data[:, valid]).all():
            return True
        return self._override and not valid.all()

    def _masked_read(self, window: Window, shape: tuple[int, int], values: np.ndarray, valid: np.ndarray
                     ) -> np.ndarray:
        """A window resampled to `shape` from a nearest read at full resolution (at most RUN_MAX_PIXELS)
        of it and the margin its resampling reaches into, invalid pixels left out of the resampling.
        Valid pixels whose kernel holds too few valid pixels keep their nearest-neighbour `values`."""
        pad = math.ceil(2 * window.width / shape[1]) + 1  # reach of the cubic kernel, in source pixels
        left, top = max(0, window.col_off - pad), max(0, window.row_off - pad)
        right = min(self._src.width, window.col_off + window.width + pad)
        bottom = min(self._src.height, window.row_off + window.height + pad)
        scale = min(1.0, math.sqrt(RUN_MAX_PIXELS / ((right - left) * (bottom - top))))
        fine = (max(1, round((bottom - top) * scale)), max(1, round((right - left) * scale)))
        outer = Window(left, top, right - left, bottom - top)
        data = self._nearest(outer, fine)
        sx, sy = fine[1] / outer.width, fine[0] / outer.height
        inner = Window((window.col_off - left) * sx, (window.row_off - top) * sy, window.width * sx, window.height * sy)
        out = resample_masked(data, self._validity(outer, fine, data), inner, shape)
        holes = valid & ~np.isfinite(out).all(axis=0)
        out[:, holes] = values[:, holes]
        if np.issubdtype(data.dtype, np.floating):
            return out
        limits = np.iinfo(data.dtype)
        return np.clip(np.rint(np.nan_to_num(out)), limits.min, limits.max).astype(data.dtype)

    def close(self) -> None:
        self._src.close()
        self._env.close()

    def __enter__(self) -> SceneReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resample_masked(data: np.ndarray, valid: np.ndarray, window: Window, shape: tuple[int, int]) -> np.ndarray:
    """float32 [bands, *shape]: a window of [bands,h,w] data resampled with DECIMATION, pixels outside
    `valid` left out of every kernel (GDAL's resampling of nodata); NaN where GDAL finds too few valid."""
    bands, height, width = data.shape
    profile = dict(driver="GTiff", width=width, height=height, count=bands, dtype="float32", nodata=_MASKED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile() as memory, memory.open(**profile) as dataset:
            dataset.write(np.where(valid, data, _MASKED).astype(np.float32))
            out = dataset.read(window=window, out_shape=(bands, *shape), resampling=DECIMATION)
    out[out == _MASKED] = np.nan
    return out
