"""Helpers for tests that need GeoTIFFs the shared data lacks (written with rasterio, real files)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine

UTM33 = "EPSG:32633"


def write_geotiff(
    path: Path,
    data: np.ndarray,
    *,
    crs: str | None = UTM33,
    transform=None,
    nodata: float | None = None,
    colorinterp: list[ColorInterp] | None = None,
    **profile,
) -> Path:
    """Write a [bands, h, w] array as a GeoTIFF (default: 1 m pixels in UTM 33N)."""
    count, height, width = data.shape
    if transform is None and crs is not None:
        transform = Affine(1.0, 0.0, 500_000.0, 0.0, -1.0, 5_800_000.0)
    options = dict(driver="GTiff", width=width, height=height, count=count, dtype=data.dtype.name,
                   crs=crs, transform=transform, nodata=nodata)
    options.update(profile)
    if crs is None and transform is None:
        options.pop("crs")
        options.pop("transform")
    with warnings.catch_warnings():  # an ungeoreferenced file is what some tests want
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        dst = rasterio.open(path, "w", **options)
    with dst:
        if colorinterp is not None:  # before the pixels, or GTiff drops the alpha flag
            dst.colorinterp = colorinterp
        dst.write(data)
    return path


def truncated_copy(source: Path, target: Path, fraction: float = 0.6, tiled: bool = False) -> Path:
    """A copy of a real GeoTIFF cut at `fraction` of its bytes (re-written tiled first if asked,
    so that its header survives the cut and only the pixel reads fail)."""
    if tiled:
        with rasterio.open(source) as src:
            profile, data = src.profile, src.read()
        profile.update(tiled=True, blockxsize=64, blockysize=64, compress="deflate")
        whole = target.with_name(target.stem + "_whole.tif")
        with rasterio.open(whole, "w", **profile) as dst:
            dst.write(data)
        source = whole
    raw = Path(source).read_bytes()
    target.write_bytes(raw[: int(len(raw) * fraction)])
    return target


def textured_float_scene(path: Path, *, bands: int = 5, height: int = 448, width: int = 672,
                         nan_fraction: float = 0.0, seed: int = 0) -> Path:
    """A float32 GeoTIFF of `bands` untagged bands of texture (about 500..1500) without a nodata value,
    with `nan_fraction` of each band's pixels NaN, scattered independently; same texture for a seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    data = np.stack([np.sin(xx / (7 + b)) * np.cos(yy / (5 + b)) * 400 + 1000 + rng.normal(0, 40, (height, width))
                     for b in range(bands)]).astype(np.float32)
    data[np.random.default_rng(seed + 1).random(data.shape) < nan_fraction] = np.nan
    return write_geotiff(path, data)
