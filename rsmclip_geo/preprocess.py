"""Resize, centre-crop and normalise uint8 HWC images exactly like open_clip's validation transform.

open_clip (torchvision on PIL images) resizes with Pillow: a separable filter whose support grows with
the downscale factor (antialiasing), fixed-point coefficients with 22 fractional bits, horizontal pass
first, and the intermediate image rounded to uint8. This module builds the same integer weight
matrices in numpy and applies them to whole batches (one matrix product per pass), so the runtime
reproduces the export's preprocessing without torch or PIL.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from rsmclip_geo.errors import RsmclipError

if TYPE_CHECKING:
    from rsmclip_geo.bundle import BundleInfo

_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit images
_BICUBIC_A = -0.5


def _bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    a = _BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}


@lru_cache(maxsize=64)
def resize_weights(in_size: int, out_size: int, interpolation: str) -> np.ndarray:
    """Pillow's fixed-point resampling weights as an int64 matrix [out_size, in_size]."""
    if interpolation not in _FILTERS:
        raise RsmclipError(f"interpolation {interpolation!r} is not supported; use 'bicubic' or 'bilinear'")
    kernel, kernel_support = _FILTERS[interpolation]
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = kernel_support * filter_scale
    centers = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    x = np.arange(in_size, dtype=np.float64)[None, :]
    inside = (x >= xmin[:, None]) & (x < xmax[:, None])
    weights = np.where(inside, kernel((x - centers[:, None] + 0.5) / filter_scale), 0.0)
    totals = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, totals, out=np.zeros_like(weights), where=totals != 0.0)
    fixed = weights * (1 << _PRECISION_BITS)
    return np.trunc(np.where(fixed < 0, fixed - 0.5, fixed + 0.5)).astype(np.int64)


@lru_cache(maxsize=64)
def resize_taps(in_size: int, out_size: int, interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """The non-zero band of :func:`resize_weights`: input indices [out_size, K] and their weights [out_size, K]
    (K = the widest filter; zero weights pad the narrower ones). int32 weights where every sum of 255 × weights
    fits int32 (Pillow's filters do), int64 otherwise."""
    weights = resize_weights(in_size, out_size, interpolation)
    nonzero = weights != 0
    first = nonzero.argmax(axis=1)
    last = in_size - 1 - nonzero[:, ::-1].argmax(axis=1)
    width = int((last - first + 1).max())
    indices = np.clip(first, 0, in_size - width)[:, None] + np.arange(width)
    taps = np.take_along_axis(weights, indices, axis=1)
    bound = 255 * max(np.clip(taps, 0, None).sum(axis=1).max(), -np.clip(taps, None, 0).sum(axis=1).min())
    fits = bound + (1 << (_PRECISION_BITS - 1)) < np.iinfo(np.int32).max
    return indices, taps.astype(np.int32 if fits else np.int64)


def _resample(batch: np.ndarray, in_size: int, out_size: int, interpolation: str, axis: int) -> np.ndarray:
    """Resample uint8 [B,H,W,C] along ``axis`` (1 = rows/height, 2 = columns/width) with Pillow's fixed-point
    filter: a sum over the filter's taps, in integers, so the result is Pillow's to the bit."""
    indices, taps = resize_taps(in_size, out_size, interpolation)
    shape = [1, 1, 1, 1]
    shape[axis] = out_size
    source = batch.astype(taps.dtype)
    acc = np.full(1, 1 << (_PRECISION_BITS - 1), dtype=taps.dtype)
    for k in range(indices.shape[1]):
        acc = acc + np.take(source, indices[:, k], axis=axis) * taps[:, k].reshape(shape)
    return np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)


def resize_batch(batch: np.ndarray, height: int, width: int, interpolation: str = "bicubic") -> np.ndarray:
    """Resize uint8 [B,H,W,C] to [B,height,width,C] like Pillow (horizontal pass first, uint8 in between)."""
    _, in_h, in_w, _ = batch.shape
    if in_w != width:
        batch = _resample(batch, in_w, width, interpolation, axis=2)
    if in_h != height:
        batch = _resample(batch, in_h, height, interpolation, axis=1)
    return batch


def resized_size(height: int, width: int, size: int, resize: str) -> tuple[int, int]:
    """Output (height, width) of the resize step: torchvision's shortest-side rule, or a square squash."""
    if resize == "squash":
        return size, size
    if resize != "shortest":
        raise RsmclipError(f"bundle resize policy {resize!r} is not supported; use 'shortest' or 'squash'")
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_crop(batch: np.ndarray, size: int) -> np.ndarray:
    """Centre crop [B,H,W,C] to [B,size,size,C] with torchvision's offsets (images are never smaller here)."""
    _, height, width, _ = batch.shape
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return batch[:, top:top + size, left:left + size, :]


def preprocess_images(images: np.ndarray | Sequence[np.ndarray], info: BundleInfo | Any) -> np.ndarray:
    """uint8 images (array [B,H,W,3] or list of HxWx3 arrays, any sizes) -> float32 [B,3,S,S] model input."""
    return normalize_tiles(prepare_tiles(images, info), info)


def prepare_tiles(images: np.ndarray | Sequence[np.ndarray], info: BundleInfo | Any) -> np.ndarray:
    """uint8 images (array [B,H,W,3] or list of HxWx3 arrays, any sizes) -> uint8 [B,S,S,3] at the model's
    input size: resized and centre-cropped, not yet normalised."""
    size = int(info.image_size)
    groups = _group_by_shape(images)
    out = np.empty((sum(len(idx) for idx, _ in groups.values()), size, size, 3), dtype=np.uint8)
    for (height, width), (indices, batch) in groups.items():
        new_h, new_w = resized_size(height, width, size, info.resize)
        out[indices] = center_crop(resize_batch(batch, new_h, new_w, info.interpolation), size)
    return out


def normalize_tiles(tiles: np.ndarray, info: BundleInfo | Any) -> np.ndarray:
    """uint8 [B,S,S,3] tiles -> float32 [B,3,S,S]: scaled to [0, 1], minus the mean, over the std."""
    mean = np.asarray(info.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(info.std, dtype=np.float32).reshape(1, 3, 1, 1)
    pixels = tiles.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    return (pixels - mean) / std


def _group_by_shape(images: np.ndarray | Sequence[np.ndarray]) -> dict[tuple[int, int], tuple[list[int], np.ndarray]]:
    """Validate the input and group images of equal size into uint8 [n,H,W,3] batches."""
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise RsmclipError(f"images: expected a uint8 array [B,H,W,3], got shape {images.shape}")
        batches = [images]
        indices_per_batch = [list(range(images.shape[0]))]
    else:
        batches = [np.asarray(image)[None] for image in images]
        indices_per_batch = [[i] for i in range(len(batches))]
    if not batches or sum(len(idx) for idx in indices_per_batch) == 0:
        raise RsmclipError("images: no images given")
    groups: dict[tuple[int, int], tuple[list[int], list[np.ndarray]]] = {}
    for indices, batch in zip(indices_per_batch, batches):
        if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
            raise RsmclipError(
                f"images: expected uint8 HxWx3 RGB arrays, got dtype {batch.dtype} shape {batch.shape[1:]}; "
                "convert to 8-bit RGB first")
        if batch.shape[1] < 1 or batch.shape[2] < 1:
            raise RsmclipError(f"images: empty image of shape {batch.shape[1:]}")
        key = (int(batch.shape[1]), int(batch.shape[2]))
        entry = groups.setdefault(key, ([], []))
        entry[0].extend(indices)
        entry[1].append(batch)
    return {key: (idx, np.concatenate(parts) if len(parts) > 1 else parts[0]) for key, (idx, parts) in groups.items()}
