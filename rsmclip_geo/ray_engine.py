"""Many scenes on Ray Data: the indexer behind `RayEngine` (the CLI's index with the ray engine).

The same job as `rsmclip_geo.indexer.LocalEngine`, spread over a Ray cluster (a local one by default):

  driver   plan_index(): every check, band mapping, per-scene stretch and the tile plan
  tasks    read_chunks(): windowed reads, skip rules and model-size uint8 tiles of one chunk of windows
  actors   TileEncoder: the model loaded once per actor (one per GPU or CPU slot), one encoder batch a call
  driver   result batches stream back into the resume shards (ShardWriter), then assemble()

Ray Data streams the stages with backpressure, so only a bounded number of batches is in flight.
The index is the one the single-process indexer writes: same tile ids, schema and metadata, and
an interrupted job resumes with either engine. `ray` is imported only when this engine runs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsmclip_geo.errors import BundleError, RsmclipError, first_line
from rsmclip_geo.indexer import IndexJob
from rsmclip_geo.pipeline import (CancelCallback, Cancelled, EmbeddedBatch, ProgressCallback, default_threads,
                                  read_chunk)
from rsmclip_geo.raster import Scene, SceneReader
from rsmclip_geo.tile_index import batch_table, index_is_file
from rsmclip_geo.tiling import TilingParams, TileWindow

log = logging.getLogger(__name__)

#: Object store of a local Ray instance started by this engine (bytes; batches in flight live there).
LOCAL_OBJECT_STORE_BYTES = 1 << 30
#: CPUs a window-reading task asks for.
READER_CPUS = 1.0
_WINDOW_COLUMNS = ("col", "row", "width", "height", "scale")


def check_ray_available() -> None:
    """RsmclipError when Ray Data is not installed."""
    if importlib.util.find_spec("ray") is None:
        raise RsmclipError("engine=ray: needs Ray Data; pip install 'rsmclip-geo[ray]' (or 'ray[data]'), "
                           "or use the local engine", param="engine", value="ray")


def check_ray_options(output: str | os.PathLike, workers: int | None, cpus_per_worker: float,
                      gpus_per_worker: float | None) -> None:
    """The options only the Ray engine has, checked before anything starts."""
    if index_is_file(Path(output)):
        raise RsmclipError(f"output={output}: the ray engine writes a directory of GeoParquet shards; "
                           "give a directory name (no .parquet suffix)", param="output", value=output)
    if workers is not None and workers < 1:
        raise RsmclipError(f"workers={workers}: give a positive number of encoder actors", param="workers",
                           value=workers)
    if not cpus_per_worker > 0:
        raise RsmclipError(f"cpus_per_worker={cpus_per_worker}: give a positive number of CPUs",
                           param="cpus_per_worker", value=cpus_per_worker)
    if gpus_per_worker is not None and gpus_per_worker < 0:
        raise RsmclipError(f"gpus_per_worker={gpus_per_worker}: give 0 (CPU only) or a positive number of GPUs",
                           param="gpus_per_worker", value=gpus_per_worker)


def connect_ray(address: str | None, workers: int | None, cpus_per_worker: float) -> bool:
    """Join the cluster at `address`, or start a local Ray sized for the encoders and a reader.

    Returns True when this call started Ray (and so must shut it down); an already initialised
    Ray in this process is used as it is.
    """
    import ray

    if ray.is_initialized():
        return False
    options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        if address:
            ray.init(address=address, **options)
        else:
            cores = os.cpu_count() or 1
            wanted = (workers or max(1, cores - 1)) * cpus_per_worker + READER_CPUS
            ray.init(num_cpus=max(cores, int(np.ceil(wanted))), object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                     **options)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        where = f"address={address}: cannot join the Ray cluster" if address else "a local Ray instance did not start"
        raise RsmclipError(f"{where} ({first_line(exc)}); check `ray status` on the head node, "
                           "or use the local engine", param="address" if address else None, value=address) from None
    except Exception as exc:  # Ray raises a bare Exception when a local node times out during startup
        if address:
            raise
        raise RsmclipError(f"a local Ray instance did not start ({first_line(exc)}); "
                           "retry on a less busy machine or use the local engine") from None
    return True


def encoder_layout(workers: int | None, cpus_per_worker: float, gpus_per_worker: float | None) -> tuple[int, float]:
    """(actor count, GPUs per actor) for the connected cluster; RsmclipError if they cannot all run.

    Default: one actor per GPU when the cluster has GPUs, else one per CPU slot left after a reader.
    """
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus >= 1 else 0.0
    if workers is None:
        if gpus_per_worker:
            workers = max(1, int(gpus // gpus_per_worker))
        else:
            workers = max(1, int((cpus - READER_CPUS) // cpus_per_worker))
    if workers * cpus_per_worker + READER_CPUS > cpus or workers * gpus_per_worker > gpus:
        raise RsmclipError(
            f"workers={workers}: the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs, too few for {workers} "
            f"encoders of {cpus_per_worker:g} CPU and {gpus_per_worker:g} GPU plus one window reader; "
            "give fewer workers, or fewer CPUs or GPUs per worker", param="workers", value=workers)
    return workers, gpus_per_worker


def chunk_rows(job: IndexJob, done_ids: dict[str, set[str]], batch_size: int) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Dataset rows (scene, start, stop), one per chunk of at most `batch_size` windows, and each
    scene's windows still to embed as an int64 [n, 5] array (col, row, width, height, scale)."""
    rows: list[dict] = []
    windows: dict[str, np.ndarray] = {}
    for scene, planned in job.plans:
        skip = done_ids.get(scene.fingerprint, set())
        todo = [(w.col, w.row, w.width, w.height, w.scale) for w in planned if w.tile_id(scene.fingerprint) not in skip]
        windows[scene.fingerprint] = np.array(todo, dtype=np.int64).reshape(-1, 5)
        rows += [{"scene": scene.fingerprint, "start": start, "stop": min(start + batch_size, len(todo))}
                 for start in range(0, len(todo), batch_size)]
    return rows, windows


def read_chunks(batch: dict[str, np.ndarray], scenes: dict[str, Scene], windows: dict[str, np.ndarray],
                params: TilingParams, info) -> dict[str, np.ndarray]:
    """Ray task: read, filter and prepare chunks of windows (the single-process worker's `read_chunk`).

    One output row per kept tile; `windows` counts the windows each row accounts for (kept or
    skipped, for progress), and a chunk with no kept tile gives one row with keep=False.
    """
    out: dict[str, list] = {name: [] for name in ("scene", "keep", "windows", "tiles", *_WINDOW_COLUMNS)}
    for fingerprint, start, stop in zip(batch["scene"], batch["start"], batch["stop"]):
        scene = scenes[fingerprint]
        planned = [TileWindow(*map(int, w)) for w in windows[fingerprint][start:stop]]
        with SceneReader(scene) as reader:
            kept, tiles = read_chunk(reader, planned, params, info)
        keep = bool(kept)
        kept = kept or [planned[0]]
        counts = [1] * len(kept)
        counts[0] += len(planned) - len(kept)
        tiles = tiles if keep else np.zeros((1, info.image_size, info.image_size, 3), np.uint8)
        out["scene"] += [fingerprint] * len(kept)
        out["keep"] += [keep] * len(kept)
        out["windows"] += counts
        out["tiles"].append(tiles)
        for name in _WINDOW_COLUMNS:
            out[name] += [getattr(w, name) for w in kept]
    result = {name: np.asarray(values) for name, values in out.items() if name != "tiles"}
    result["tiles"] = np.concatenate(out["tiles"])
    return result


class TileEncoder:
    """Ray actor: the bundle's image tower, loaded once; embeds one batch of model-size uint8 tiles a call."""

    def __init__(self, bundle: str, fingerprint: str, providers: list[str] | None, threads: int):
        from rsmclip_geo.encoders import load_model

        self.model = load_model(bundle, providers=providers, threads=threads)
        if self.model.bundle.fingerprint != fingerprint:
            raise BundleError(f"{bundle}: this worker sees another bundle at that path than the driver; "
                              "put the same bundle on every node (shared storage)")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = batch["keep"].astype(bool)
        embedding = np.zeros((len(keep), self.model.bundle.info.embed_dim), dtype=np.float32)
        if keep.any():
            embedding[keep] = self.model.encode_tiles(batch["tiles"][keep])
        result = {name: values for name, values in batch.items() if name != "tiles"}
        result["embedding"] = embedding
        return result


@dataclass(frozen=True)
class RayEngine:
    """Ray Data over a cluster (a local one by default): writes a directory of GeoParquet shards.

    Scenes, the bundle and the output's parent are read by path on every node, so on a cluster they
    must sit on shared storage (the shards are written by the driver). `address` joins a running
    cluster (None: this process's Ray if initialised, else a new local one); `workers` encoder actors
    with `cpus_per_worker` CPUs and `gpus_per_worker` GPUs each (None: 1 when the cluster has GPUs);
    the job's `threads`: ONNX Runtime threads per actor (default: its CPUs). Every check runs before
    Ray starts.
    """

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None

    def check(self, output: Path, model: object) -> None:
        """Ray installed, a directory output, sensible actor sizes, and a model on ONNX Runtime."""
        check_ray_available()
        check_ray_options(output, self.workers, self.cpus_per_worker, self.gpus_per_worker)
        if getattr(model, "backend", "onnx") == "torch":
            raise RsmclipError("engine=ray: its encoder actors run ONNX Runtime; load the model with "
                               "backend='onnx' or index with the local engine", param="engine", value="ray")

    def run(self, job: IndexJob, *, batch_size: int, progress: ProgressCallback | None,
            cancel: CancelCallback | None, threads: int | None) -> None:
        """Stream the job through Ray Data (started or joined here) into its shards, then assemble it."""
        actor_threads = default_threads(threads) if threads is not None else max(1, round(self.cpus_per_worker))
        with job.locked():  # before Ray starts: a second writer of the output is refused at once
            started = connect_ray(self.address, self.workers, self.cpus_per_worker)
            try:
                workers, gpus_per_worker = encoder_layout(self.workers, self.cpus_per_worker, self.gpus_per_worker)
                _run(job, batch_size, workers, self.cpus_per_worker, gpus_per_worker, actor_threads, progress,
                     cancel)
            finally:
                if started:
                    import ray

                    ray.shutdown()


def _run(job: IndexJob, batch_size: int, workers: int, cpus_per_worker: float, gpus_per_worker: float,
         threads: int, progress: ProgressCallback | None, cancel: CancelCallback | None) -> None:
    """Stream the job through Ray Data into resume shards, then assemble the index."""
    import ray.data

    scenes = {scene.fingerprint: scene for scene, _ in job.plans}
    schema = job.schema
    total = job.total_windows
    info = job.model.bundle.info
    with job.shards() as (writer, done_ids):
        rows, windows = chunk_rows(job, done_ids, batch_size)
        done = total - sum(len(w) for w in windows.values())
        log.info("ray: %d windows in %d chunks, %d encoder actors (%g CPU, %g GPU each)",
                 total - done, len(rows), workers, cpus_per_worker, gpus_per_worker)
        if progress:
            progress(done, total)
        if rows:
            with _quiet_ray_data():
                dataset = (
                    ray.data.from_items(rows, override_num_blocks=len(rows))
                    .map_batches(read_chunks, batch_size=1, batch_format="numpy", num_cpus=READER_CPUS,
                                 fn_kwargs=dict(scenes=scenes, windows=windows, params=job.params, info=info))
                    .map_batches(TileEncoder, batch_size=batch_size, batch_format="numpy",
                                 compute=ray.data.ActorPoolStrategy(size=workers),
                                 num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                                 fn_constructor_kwargs=dict(
                                     bundle=str(job.model.bundle.path), fingerprint=job.model.bundle.fingerprint,
                                     providers=None if gpus_per_worker else ["cpu"], threads=threads))
                )
                results = _user_errors(dataset.iter_batches(batch_size=batch_size, batch_format="numpy"))
                try:
                    for result in results:
                        if cancel is not None and cancel():
                            raise Cancelled(f"{job.output}: indexing cancelled; rerun to resume")
                        for batch in embedded_batches(result, scenes):
                            writer.add(batch_table(batch, schema))
                        done += int(result["windows"].sum())
                        if progress:
                            progress(done, total)
                finally:
                    results.close()  # stops the Dataset's executor and frees its actors at once


def embedded_batches(result: dict[str, np.ndarray], scenes: dict[str, Scene]) -> Iterator[EmbeddedBatch]:
    """The kept tiles of one result batch of the encoder actors, one EmbeddedBatch per scene."""
    keep = result["keep"].astype(bool)
    for fingerprint in np.unique(result["scene"][keep]):
        rows = np.flatnonzero(keep & (result["scene"] == fingerprint))
        boxes = np.column_stack([result[name][rows] for name in _WINDOW_COLUMNS])
        windows = [TileWindow(*map(int, box)) for box in boxes]
        yield EmbeddedBatch(scenes[str(fingerprint)], windows, result["embedding"][rows], len(windows))


def _user_errors(batches: Iterator[dict]) -> Iterator[dict]:
    """Re-raise a worker's RsmclipError as itself (its one line), not wrapped in Ray's task errors."""
    from ray.exceptions import RayError

    try:
        yield from batches
    except Exception as exc:
        cause: BaseException | None = exc
        seen: set[int] = set()
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, RsmclipError) and not isinstance(cause, RayError):
                raise cause.with_traceback(None) from None
            seen.add(id(cause))
            cause = getattr(cause, "cause", None) or cause.__cause__
        raise


@contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """No Ray Data progress bars or start banners (the caller's progress callback reports)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = context.enable_progress_bars, context.print_on_execution_start
    context.enable_progress_bars, context.print_on_execution_start = False, False
    try:
        yield
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved
