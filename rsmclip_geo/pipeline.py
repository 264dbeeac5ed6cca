"""Embedding pipeline: worker threads (read → filter → preprocess → encode) → bounded queue → caller.

Each worker thread holds its own rasterio handle and takes one chunk of tile windows (one batch) at
a time: it reads the windows, drops masked or constant tiles, preprocesses the rest to model input,
encodes them and puts the embeddings in a bounded queue. With several workers each encodes on a
single-threaded ONNX Runtime session, so one worker's reads overlap another's inference and no
core waits at an intra-op barrier. The calling thread yields the batches as they come and polls
the cancel callback between them.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from rsmclip_geo.errors import RsmclipError
from rsmclip_geo.preprocess import prepare_tiles
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


def default_threads(threads: int | None) -> int:
    """The `threads` setting: a positive count, or the number of CPU cores when None."""
    if threads is None:
        return max(1, os.cpu_count() or 1)
    if threads < 1:
        raise RsmclipError(f"threads={threads}: give a positive number of threads", param="threads", value=threads)
    return threads


def keep_tile(valid: np.ndarray, rgb: np.ndarray, params: TilingParams) -> bool:
    """Whether a tile has enough valid area and is not near-constant.

    `rgb` is zero outside `valid` (SceneReader.read_rgb), so the standard deviation of the valid
    values comes from sums over the whole tile, without copying them out.
    """
    n_valid = np.count_nonzero(valid)
    if n_valid == 0 or n_valid < params.min_valid * valid.size:
        return False
    values = rgb.reshape(-1).astype(np.float64)
    n = n_valid * rgb.shape[-1]
    mean = values.sum() / n
    # einsum, not a BLAS dot: BLAS threads would spin on the cores that inference uses
    variance = max(float(np.einsum("i,i->", values, values)) / n - mean * mean, 0.0)
    return math.sqrt(variance) >= params.min_std


def read_chunk(reader: SceneReader, windows: Sequence[TileWindow], params: TilingParams,
               info) -> tuple[list[TileWindow], np.ndarray | None]:
    """Read, filter and prepare one chunk of windows: (kept windows, uint8 [B,S,S,3] model-size tiles or None)."""
    kept, images = [], []
    tiles = reader.read_windows([(w.col, w.row, w.width, w.height) for w in windows], max_size=info.image_size)
    for w, (rgb, valid) in zip(windows, tiles):
        if keep_tile(valid, rgb, params):
            kept.append(w)
            images.append(rgb)
    return kept, (prepare_tiles(images, info) if images else None)


def plan_chunks(windows: Sequence[TileWindow], batch_size: int, workers: int) -> list[list[TileWindow]]:
    """Consecutive chunks of at most `batch_size` windows, one encoder batch each. With several
    workers they shrink towards the end (to a quarter of a batch at least) so that the workers finish
    together, instead of one of them encoding a last full batch alone on a single-threaded session."""
    chunks, start = [], 0
    smallest = batch_size if workers == 1 else max(1, batch_size // 4)
    while start < len(windows):
        size = min(batch_size, max(smallest, math.ceil((len(windows) - start) / (2 * workers))))
        chunks.append(list(windows[start:start + size]))
        start += size
    return chunks


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
        raise RsmclipError(f"batch_size={batch_size}: give a positive batch size", param="batch_size",
                           value=batch_size)
    windows = [w for w in tile_windows(scene, params) if w.tile_id(scene.fingerprint) not in skip]
    total = len(windows)
    threads = default_threads(threads)
    chunks = plan_chunks(windows, batch_size, threads)
    n_workers = min(threads, max(1, len(chunks)))
    info = model.bundle.info
    done = 0
    if progress:
        progress(0, total)
    if not chunks:
        return

    results: queue.Queue = queue.Queue(maxsize=2 * n_workers)
    stop = threading.Event()
    next_chunk = iter(chunks)
    lock = threading.Lock()
    encode_threads = 1 if n_workers > 1 else None  # None: the model's own thread setting

    def put(item: object) -> None:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def worker_loop() -> None:
        try:
            with SceneReader(scene) as reader:
                while not stop.is_set():
                    with lock:
                        chunk = next(next_chunk, None)
                    if chunk is None:
                        break
                    kept, tiles = read_chunk(reader, chunk, params, info)
                    embeddings = None if tiles is None else model.encode_tiles(tiles, threads=encode_threads)
                    put(EmbeddedBatch(scene, kept, embeddings, len(chunk)))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)
        finally:
            put(None)

    workers = [threading.Thread(target=worker_loop, name=f"rsmclip-worker-{i}", daemon=True)
               for i in range(n_workers)]
    for t in workers:
        t.start()
    finished_workers = kept = 0
    try:
        while finished_workers < n_workers:
            if cancel is not None and cancel():
                raise Cancelled(f"{scene.name}: indexing cancelled; rerun to resume")
            item = results.get()
            if item is None:
                finished_workers += 1
                continue
            if isinstance(item, BaseException):
                raise item
            if item.embeddings is not None:
                kept += len(item.windows)
                yield item
            done += item.n_windows
            if progress:
                progress(done, total)
    finally:
        stop.set()
        for t in workers:
            t.join()
    log.info("%s: %d tiles embedded, %d skipped (nodata, masked or constant)",
             scene.name, kept, total - kept)
