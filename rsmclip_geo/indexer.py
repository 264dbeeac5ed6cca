"""Indexing jobs: checks and tile plan (`plan_index`), resume shards, assembly into a tile index,
and the engines that embed a job's tiles (this process; Ray in rsmclip_geo.ray_engine).

Finished batches go to `<output>.partial/` shards, so a rerun after an interruption resumes; the
index is assembled atomically at the end; `<output>.lock` refuses a second writer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol
from pathlib import Path

import pyarrow as pa

from rsmclip_geo.encoders import resolve_model
from rsmclip_geo.errors import RsmclipError, TileIndexError, first_line
from rsmclip_geo.files import check_writable, write_errors
from rsmclip_geo.locks import output_lock
from rsmclip_geo.pipeline import CancelCallback, ProgressCallback, default_threads, embed_scene
from rsmclip_geo.raster import FILE_NODATA, Scene, open_scene
from rsmclip_geo.remote import clean_location
from rsmclip_geo.stac import StacScene
from rsmclip_geo.tile_index import (
    FORMAT_VERSION, atomic_write_table, batch_table, index_is_file, index_schema,
    is_index_part, read_parquet, with_metadata, write_shard_directory,
)
from rsmclip_geo.tiling import TilingParams, TileWindow, ground_resolution_warning, tile_windows

log = logging.getLogger(__name__)

#: Tiles buffered before a resume shard is written.
RESUME_SHARD_TILES = 2048

MANIFEST = "manifest.json"
#: Advice after a failed write of the index or its resume shards.
RESUME_ADVICE = "free disk space or make the folder writable, then rerun to resume"


def scene_record(scene: Scene, path: str) -> dict:
    """The per-scene metadata entry from which exact scene-CRS footprints can be rebuilt; `path` is the
    scene's path as the caller gave it (relative stays relative; a remote location without credentials),
    shown in hits and outputs."""
    return {
        "path": path,
        "crs": scene.crs_wkt,
        "transform": list(scene.transform),
        "width": scene.width,
        "height": scene.height,
        "rgb_bands": list(scene.rgb_bands),
        "nodata": None if scene.nodata is None else str(scene.nodata) if math.isnan(scene.nodata) else scene.nodata,
        "nodata_overridden": scene.nodata_overridden,
        **({"stac": scene.stac} if scene.stac else {}),
    }


def check_index_output(output: Path) -> None:
    """Fail early, before any work, when the index cannot be written at `output`."""
    if output.suffix and not index_is_file(output):
        raise RsmclipError(f"output={output}: a tile index is a .parquet file or a directory; give a .parquet name "
                           f"or a directory name without an extension (not {output.suffix})", param="output",
                           value=output)
    directory = not index_is_file(output)
    check_writable(output, directory=directory)
    if directory and output.is_dir() and any(not is_index_part(p) for p in output.iterdir()):
        raise RsmclipError(f"output={output}: directory exists and holds other files (it would be replaced); "
                           "choose a new directory or a .parquet file name", param="output", value=output)


def job_parts(manifest: dict) -> dict:
    """What makes two indexing jobs the same for a resume, besides the bundle: format, tiling, and
    the scenes (by fingerprint) with everything recorded about them but the path they were given by."""
    return {"format": manifest.get("format_version"), "tiling": manifest.get("tiling"),
            "scenes": {fp: {key: value for key, value in record.items() if key != "path"}
                       for fp, record in manifest.get("scenes", {}).items()}}


class ShardWriter:
    """Resume shards of one job in `<output>.partial/`: manifest + one GeoParquet file per flush.

    The directory is created with the first shard, so a run that fails before embedding a tile
    leaves none behind.
    """

    def __init__(self, partial: Path, manifest: dict):
        self.partial = partial
        self.manifest = manifest
        self._buffer: list[pa.Table] = []
        self._rows = 0
        self._count = 0

    def open(self) -> dict[str, set[str]]:
        """The tile ids an earlier run of this job embedded, per scene fingerprint.

        Resume state of another job (other scenes, tiling or format) is dropped with a warning;
        that of another bundle is refused (its embeddings may have cost hours)."""
        if not self.partial.is_dir():
            return {}
        old = self._read_manifest()
        if old is not None and old["bundle"]["fingerprint"] != self.manifest["bundle"]["fingerprint"]:
            raise TileIndexError(
                f"{self.partial}: unfinished index built with model {old['bundle'].get('name')!r} "
                f"(another bundle); rerun with that model or delete the directory to start over")
        if old is None or job_parts(old) != job_parts(self.manifest):
            changed = "unreadable" if old is None else "other " + ", ".join(
                name for name, value in job_parts(old).items() if value != job_parts(self.manifest)[name])
            log.warning("%s: unfinished index of another job (%s); starting over", self.partial, changed)
            with write_errors(self.partial, "delete it or make its folder writable"):
                shutil.rmtree(self.partial)
            return {}
        done: dict[str, set[str]] = {}
        for shard in sorted(self.partial.glob("shard-*.parquet")):
            try:
                table = read_parquet(shard).select(["scene_fingerprint", "tile_id"])  # every page checked
            except (pa.ArrowException, OSError) as exc:
                log.warning("%s: unreadable (%s); its tiles are embedded again", shard, first_line(exc))
                with write_errors(shard, "delete it or make its folder writable"):
                    shard.unlink()
                continue
            for fp, tid in zip(table.column(0).to_pylist(), table.column(1).to_pylist()):
                done.setdefault(fp, set()).add(tid)
            self._count = max(self._count, int(shard.stem.split("-")[1]) + 1)
        if done:
            log.info("resuming: %d tiles already embedded in %s", sum(map(len, done.values())), self.partial)
        return done

    def _read_manifest(self) -> dict | None:
        """The manifest an earlier run wrote, or None when it is missing or damaged."""
        try:
            manifest = json.loads((self.partial / MANIFEST).read_text())
            return manifest if job_parts(manifest) and manifest["bundle"]["fingerprint"] else None
        except (OSError, ValueError, TypeError, AttributeError, KeyError):
            return None

    def add(self, table: pa.Table) -> None:
        self._buffer.append(table)
        self._rows += table.num_rows
        if self._rows >= RESUME_SHARD_TILES:
            self.flush()

    def flush(self) -> None:
        """Write the buffered tiles as the next shard (creating the directory with the first one)."""
        if not self._buffer:
            return
        if not self.partial.is_dir():
            with write_errors(self.partial, RESUME_ADVICE):
                self.partial.mkdir()
                (self.partial / MANIFEST).write_text(json.dumps(self.manifest))
        table = with_metadata(pa.concat_tables(self._buffer), self.manifest)
        self._buffer, self._rows = [], 0
        atomic_write_table(table, self.partial / f"shard-{self._count:05d}.parquet", RESUME_ADVICE)
        self._count += 1

    def keep_for_resume(self) -> None:
        """After a failure: write what is buffered, if the disk still takes it, and drop a directory
        without shards."""
        try:
            self.flush()
        except RsmclipError as exc:
            log.warning("%s", exc)
        if self.partial.is_dir() and not any(self.partial.glob("shard-*.parquet")):
            shutil.rmtree(self.partial, ignore_errors=True)


@dataclass
class IndexJob:
    """A validated indexing job: output checked, scenes opened, model loaded, every scene's tiles planned."""

    output: Path
    model: object
    params: TilingParams
    plans: list[tuple[Scene, list[TileWindow]]]
    metadata: dict

    @property
    def partial(self) -> Path:
        """The resume-shard directory next to the output."""
        return self.output.with_name(self.output.name + ".partial")

    @property
    def schema(self) -> pa.Schema:
        return index_schema(self.metadata["embed_dim"], self.metadata)

    @property
    def total_windows(self) -> int:
        return sum(len(windows) for _, windows in self.plans)

    def locked(self):
        """Context holding `<output>.lock`: taken before the resume shards are touched, refused while
        another run writes the same output."""
        return output_lock(self.output)

    @contextmanager
    def shards(self) -> Iterator[tuple[ShardWriter, dict[str, set[str]]]]:
        """(writer, tile ids already in the resume shards per scene fingerprint); on a clean exit the
        shards are flushed and assembled into the index, on an exception only flushed (a rerun resumes).
        Use it inside `locked()`."""
        writer = ShardWriter(self.partial, self.metadata)
        done_ids = writer.open()
        try:
            yield writer, done_ids
            writer.flush()
        except BaseException:
            writer.keep_for_resume()
            raise
        assemble(self.partial, self.output, self.metadata)


def plan_index(
    scenes: Sequence[str | os.PathLike | Scene | StacScene],
    output: str | os.PathLike,
    *,
    model=None,
    tiling: TilingParams = TilingParams(),
    bands: tuple[int, int, int] | None = None,
    nodata: float | str | None = FILE_NODATA,
    threads: int | None = None,
) -> IndexJob:
    """Every check and the tile plan of an index job, done before any tile is read (RsmclipError on bad input)."""
    output = Path(output)
    if threads is not None:
        default_threads(threads)
    check_index_output(output)
    if not scenes:
        raise RsmclipError("no scenes given: pass one or more raster files")
    given: dict[str, tuple[Scene, str]] = {}  # fingerprint -> (scene, its path as given; a Scene's resolved path)
    for item in scenes:
        if isinstance(item, StacScene):
            item = item.open(bands=bands, nodata=nodata)
        scene = item if isinstance(item, Scene) else open_scene(item, bands=bands, nodata=nodata)
        given[scene.fingerprint] = (scene, str(scene.path) if isinstance(item, Scene) else
                                    os.fspath(clean_location(item)))
    opened = [scene for scene, _ in given.values()]
    model = resolve_model(model, threads)
    info = model.bundle.info
    params = tiling.for_model(info)
    plans = [(scene, tile_windows(scene, params)) for scene in opened]
    for scene in opened:
        warn_ground_resolution(scene, params, info)
    metadata = {
        "format_version": FORMAT_VERSION,
        "bundle": {"name": info.name, "fingerprint": model.bundle.fingerprint},
        "embed_dim": int(info.embed_dim),
        "tiling": params.to_json(),
        "scenes": {fingerprint: scene_record(scene, path) for fingerprint, (scene, path) in given.items()},
    }
    return IndexJob(output, model, params, plans, metadata)


def warn_ground_resolution(scene: Scene, params: TilingParams, info) -> None:
    """Log the scene's ground-resolution warning (tiling.ground_resolution_warning), if it has one."""
    warning = ground_resolution_warning(scene, params, info)
    if warning:
        log.warning("%s", warning)


class IndexEngine(Protocol):
    """What embeds the tiles of an index job: LocalEngine (this process) or ray_engine.RayEngine."""

    def check(self, output: Path, model: object) -> None:
        """RsmclipError for what this engine cannot do, before any scene is opened."""

    def run(self, job: IndexJob, *, batch_size: int, progress: ProgressCallback | None,
            cancel: CancelCallback | None, threads: int | None) -> None:
        """Embed the job's tiles into its resume shards and assemble the index."""


@dataclass(frozen=True)
class LocalEngine:
    """This process: windowed reads in threads, tiles encoded by the model's backend (ONNX Runtime or torch)."""

    def check(self, output: Path, model: object) -> None:
        """The local engine takes every output and model."""

    def run(self, job: IndexJob, *, batch_size: int, progress: ProgressCallback | None,
            cancel: CancelCallback | None, threads: int | None) -> None:
        """Embed the scenes one after another, resuming from the job's shards."""
        schema = job.schema
        grand_total = job.total_windows
        offset = 0
        with job.locked(), job.shards() as (writer, done_ids):
            for scene, windows in job.plans:
                skip = done_ids.get(scene.fingerprint, set())
                already = sum(1 for w in windows if w.tile_id(scene.fingerprint) in skip)
                base = offset + already

                def scene_progress(done: int, total: int, base: int = base) -> None:
                    if progress:
                        progress(base + done, grand_total)

                for batch in embed_scene(scene, job.model, job.params, batch_size=batch_size, threads=threads,
                                         skip=skip, progress=scene_progress, cancel=cancel):
                    writer.add(batch_table(batch, schema))
                offset += len(windows)


def index_scenes(
    scenes: Sequence[str | os.PathLike | Scene | StacScene],
    output: str | os.PathLike,
    *,
    model=None,
    tiling: TilingParams = TilingParams(),
    bands: tuple[int, int, int] | None = None,
    nodata: float | str | None = FILE_NODATA,
    engine: IndexEngine = LocalEngine(),
    batch_size: int = 32,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    threads: int | None = None,
) -> Path:
    """Build one GeoParquet tile index over several scenes (their CRSs may differ) with `engine`.

    An `output` ending in .parquet is one file, anything else a directory of GeoParquet shards.
    """
    if batch_size < 1:
        raise RsmclipError(f"batch_size={batch_size}: give a positive number of tiles per encoder batch",
                           param="batch_size", value=batch_size)
    engine.check(Path(output), model)
    job = plan_index(scenes, output, model=model, tiling=tiling, bands=bands, nodata=nodata, threads=threads)
    engine.run(job, batch_size=batch_size, progress=progress, cancel=cancel, threads=threads)
    return job.output


def assemble(partial: Path, output: Path, metadata: dict) -> None:
    """Turn the resume shards into the final index (file or shard directory) and drop them; the scene
    column takes each scene's path from the scenes table (as given to this run)."""
    shards = sorted(partial.glob("shard-*.parquet"))
    if not shards:
        raise RsmclipError(f"{output}: no tile kept in any scene (all nodata, masked or constant); nothing indexed")
    schema = index_schema(metadata["embed_dim"], metadata)
    tables = []
    for shard in shards:
        try:
            tables.append(read_parquet(shard, schema=schema))
        except (pa.ArrowException, OSError) as exc:
            raise TileIndexError(f"{shard}: resume shard is damaged ({first_line(exc)}); delete it and rerun "
                                 "to embed its tiles again") from None
    table = pa.concat_tables(tables)
    fingerprints = table.column("scene_fingerprint").to_pylist()
    paths = pa.array([metadata["scenes"][fp]["path"] for fp in fingerprints], pa.string())
    table = table.set_column(schema.get_field_index("scene"), schema.field("scene"), paths)
    order = {fp: i for i, fp in enumerate(metadata["scenes"])}
    sort_keys = pa.array([order[fp] for fp in fingerprints], pa.int32())
    table = table.append_column("_scene_order", sort_keys).sort_by(
        [("_scene_order", "ascending"), ("scale", "ascending"), ("win_row", "ascending"), ("win_col", "ascending")]
    ).drop_columns(["_scene_order"])
    if index_is_file(output):
        atomic_write_table(with_metadata(table, metadata), output, RESUME_ADVICE)
    else:
        with write_errors(output, RESUME_ADVICE):
            write_shard_directory(table, output, metadata)
    shutil.rmtree(partial, ignore_errors=True)
    log.info("wrote %s: %d tiles from %d scenes", output, table.num_rows, len(metadata["scenes"]))
