"""Embedding pipeline: reader threads → bounded queue → batches → image encoder.

Reader threads each hold their own rasterio handle; they read a chunk of tile windows (one batch),
drop masked or constant tiles, preprocess the rest to model input and put the batch in a bounded
queue. The calling thread runs the encoder on whatever batch is ready, so reading and inference
overlap, and polls the cancel callback between batches.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from rsmclip_geo.errors import RsmclipError
from rsmclip_geo.preprocess import preprocess_images
from rsmclip_geo.raster import Scene, SceneReader
from rsmclip_geo.tiling import TilingParams, TileWindow, tile_windows

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
CancelCallback = Callable[[], bool]


class Cancelled(RsmclipError):
    """The cancel callback asked the job to stop; finished batches are kept for a resume."""


@dataclass
class EmbeddedBatch:
    """Embeddings of the kept tiles of one chunk of windows."""

    scene: Scene
    windows: list[TileWindow]
    embeddings: np.ndarray  # float32 [B, D], L2-normalised
    n_windows: int  # windows of the chunk, kept or skipped


@dataclass
class _ReadChunk:
    windows: list[TileWindow]
    pixels: np.ndarray | None
    n_windows: int


def default_threads(threads: int | None) -> int:
    """The `threads` setting: a positive count, or the number of CPU cores when None."""
    if threads is None:
        return max(1, os.cpu_count() or 1)
    if threads < 1:
        raise RsmclipError(f"--threads {threads}: give a positive number of threads")
    return threads


def keep_tile(valid: np.ndarray, rgb: np.ndarray, params: TilingParams) -> bool:
    """Whether a tile has enough valid area and is not near-constant."""
    if valid.mean() < params.min_valid or not valid.any():
        return False
    return float(rgb[valid].std()) >= params.min_std


def read_chunk(reader: SceneReader, windows: Sequence[TileWindow], params: TilingParams, info) -> _ReadChunk:
    """Read, filter and preprocess one chunk of windows (runs in a reader thread)."""
    kept, images = [], []
    for w in windows:
        rgb, valid = reader.read_rgb(w.col, w.row, w.width, w.height, max_size=info.image_size)
        if keep_tile(valid, rgb, params):
            kept.append(w)
            images.append(rgb)
    pixels = preprocess_images(images, info) if images else None
    return _ReadChunk(kept, pixels, len(windows))


def embed_scene(
    scene: Scene,
    model,
    params: TilingParams,
    *,
    batch_size: int = 32,
    threads: int | None = None,
    skip: frozenset[str] | set[str] = frozenset(),
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
) -> Iterator[EmbeddedBatch]:
    """Embed every kept tile of a scene, batch by batch, in no particular order.

    `params` must be resolved (a tile size set). Tiles whose id is in `skip` are not read.
    `progress(done, total)` counts windows of this scene; `cancel()` is polled between batches
    and raises Cancelled when it returns True.
    """
    if batch_size < 1:
        raise RsmclipError(f"--batch-size {batch_size}: give a positive batch size")
    windows = [w for w in tile_windows(scene, params) if w.tile_id(scene.fingerprint) not in skip]
    total = len(windows)
    chunks = [windows[i:i + batch_size] for i in range(0, total, batch_size)]
    n_readers = min(default_threads(threads), max(1, len(chunks)))
    info = model.bundle.info
    done = 0
    if progress:
        progress(0, total)
    if not chunks:
        return

    results: queue.Queue = queue.Queue(maxsize=2 * n_readers)
    stop = threading.Event()
    next_chunk = iter(range(len(chunks)))
    lock = threading.Lock()

    def put(item: object) -> None:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def reader_loop() -> None:
        try:
            with SceneReader(scene) as reader:
                while not stop.is_set():
                    with lock:
                        index = next(next_chunk, None)
                    if index is None:
                        break
                    put(read_chunk(reader, chunks[index], params, info))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)
        finally:
            put(None)

    workers = [threading.Thread(target=reader_loop, name=f"rsmclip-reader-{i}", daemon=True)
               for i in range(n_readers)]
    for t in workers:
        t.start()
    finished_readers = kept = 0
    try:
        while finished_readers < n_readers:
            if cancel is not None and cancel():
                raise Cancelled(f"{scene.path.name}: indexing cancelled; rerun to resume")
            item = results.get()
            if item is None:
                finished_readers += 1
                continue
            if isinstance(item, BaseException):
                raise item
            if item.pixels is not None:
                embeddings = model.encode_pixels(item.pixels)
                kept += len(item.windows)
                yield EmbeddedBatch(scene, item.windows, embeddings, item.n_windows)
            done += item.n_windows
            if progress:
                progress(done, total)
    finally:
        stop.set()
        for t in workers:
            t.join()
    log.info("%s: %d tiles embedded, %d skipped (nodata, masked or constant)",
             scene.path.name, kept, total - kept)
