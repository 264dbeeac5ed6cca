"""Tile index: GeoParquet read/write, resumable shards, multi-scene jobs, cache keys.

Written with pyarrow directly (WKB geometry + GeoParquet 1.1 `geo` metadata), so building an
index needs no geopandas; geopandas, DuckDB and GDAL ≥ 3.8 read it as ordinary GeoParquet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.warp import transform as transform_coords
from shapely.errors import ShapelyError

from rsmclip_geo.errors import RsmclipError, TileIndexError
from rsmclip_geo.files import publish, replace_directory, temp_file, write_errors
from rsmclip_geo.locks import output_lock
from rsmclip_geo.pipeline import CancelCallback, EmbeddedBatch, ProgressCallback, default_threads, embed_scene
from rsmclip_geo.raster import FILE_NODATA, Scene, open_scene, window_ring, window_rings
from rsmclip_geo.tiling import TilingParams, TileWindow, ground_resolution_warning, tile_windows

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_KEY = b"rsmclip_geo"
MANIFEST = "manifest.json"
#: Tiles buffered before a resume shard is written.
SHARD_TILES = 2048
#: How far stored embedding norms and cosine scores may stray above 1 (float16 rounding); more means damage.
UNIT_TOLERANCE = 0.01
#: Every Parquet file is written with a CRC32 per page, verified whenever it is read.
WRITE_OPTIONS = dict(compression="zstd", write_page_checksum=True)
#: Advice after a failed write of the index or its resume shards.
RESUME_ADVICE = "free disk space or make the folder writable, then rerun to resume"
_WGS84 = CRS.from_epsg(4326)


def default_cache_dir() -> Path:
    """The tile-search cache: $RSMCLIP_GEO_CACHE, else ~/.cache/rsmclip-geo; RsmclipError without a home."""
    env = os.environ.get("RSMCLIP_GEO_CACHE")
    if env:
        return Path(env).expanduser()
    try:
        home = Path.home()
    except RuntimeError:  # no HOME and no user database entry
        home = Path()
    if not home.is_absolute() or home.parent == home:  # HOME empty, relative or /: never /.cache
        raise RsmclipError(f"no home directory for the cache (HOME={os.environ.get('HOME', '')!r}); "
                           "set RSMCLIP_GEO_CACHE to a folder or pass --cache-dir")
    return home / ".cache" / "rsmclip-geo"


def cache_key(scene: Scene, bundle_fingerprint: str, tiling: TilingParams) -> str:
    """Cache key of a scene's index: scene fingerprint + mtime + bundle fingerprint + tiling params."""
    parts = {
        "scene": scene.fingerprint,
        "mtime_ns": scene.path.stat().st_mtime_ns,
        "bands": list(scene.rgb_bands),
        "nodata": scene.nodata,
        "bundle": bundle_fingerprint,
        "tiling": tiling.to_json(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def scene_record(scene: Scene, path: str) -> dict:
    """The per-scene metadata entry from which exact scene-CRS footprints can be rebuilt; `path` is the
    scene's path as the caller gave it (relative stays relative), shown in hits and outputs."""
    return {
        "path": path,
        "crs": scene.crs_wkt,
        "transform": list(scene.transform),
        "width": scene.width,
        "height": scene.height,
        "rgb_bands": list(scene.rgb_bands),
        "nodata": None if scene.nodata is None else str(scene.nodata) if math.isnan(scene.nodata) else scene.nodata,
        "nodata_overridden": scene.nodata_overridden,
    }


def index_schema(dim: int, metadata: dict) -> pa.Schema:
    """Arrow schema of a tile index with its GeoParquet and rsmclip_geo metadata."""
    fields = [
        pa.field("tile_id", pa.string(), nullable=False),
        pa.field("scene", pa.string(), nullable=False),
        pa.field("scene_fingerprint", pa.string(), nullable=False),
        pa.field("win_col", pa.int32(), nullable=False),
        pa.field("win_row", pa.int32(), nullable=False),
        pa.field("win_width", pa.int32(), nullable=False),
        pa.field("win_height", pa.int32(), nullable=False),
        pa.field("scale", pa.int16(), nullable=False),
        pa.field("embedding", pa.list_(pa.float16(), dim), nullable=False),
        pa.field("geometry", pa.binary(), nullable=False),
    ]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata).encode()})


def geo_metadata(bbox: list[float] | None) -> dict:
    """GeoParquet 1.1 `geo` metadata for the WKB polygon column in EPSG:4326 (lon/lat)."""
    column = {
        "encoding": "WKB",
        "geometry_types": ["Polygon"],
        "crs": _WGS84.to_dict(projjson=True),
        "edges": "planar",
    }
    if bbox is not None:
        column["bbox"] = bbox
    return {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}


def float16_array(values: np.ndarray) -> pa.Array:
    """A flat Arrow float16 array from numpy, built on its buffer (no per-element conversion)."""
    half = np.ascontiguousarray(values, dtype=np.float16).ravel()
    return pa.Array.from_buffers(pa.float16(), len(half), [None, pa.py_buffer(half)])


def batch_table(batch: EmbeddedBatch, schema: pa.Schema) -> pa.Table:
    """Rows of one embedded batch, with footprints transformed to EPSG:4326."""
    scene, windows = batch.scene, batch.windows
    boxes = np.array([(w.col, w.row, w.width, w.height) for w in windows], dtype=np.int64)
    rings = window_rings(scene.affine, boxes).reshape(-1, 2)
    lon, lat = transform_coords(scene.crs, _WGS84, rings[:, 0], rings[:, 1])
    coords = np.column_stack([lon, lat]).reshape(len(windows), 5, 2)
    polygons = shapely.orient_polygons(shapely.polygons(coords))  # RFC 7946: counter-clockwise exteriors
    dim = batch.embeddings.shape[1]
    flat = float16_array(batch.embeddings)
    columns = {
        "tile_id": [w.tile_id(scene.fingerprint) for w in windows],
        "scene": [str(scene.path)] * len(windows),
        "scene_fingerprint": [scene.fingerprint] * len(windows),
        "win_col": boxes[:, 0],
        "win_row": boxes[:, 1],
        "win_width": boxes[:, 2],
        "win_height": boxes[:, 3],
        "scale": [w.scale for w in windows],
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        "geometry": shapely.to_wkb(polygons, output_dimension=2),
    }
    return pa.Table.from_pydict(columns, schema=schema)


def atomic_write_table(table: pa.Table, path: Path,
                       advice: str = "free disk space or make the folder writable") -> None:
    """Write a Parquet file (with page checksums) through a temporary file in the target directory;
    RsmclipError naming `path` when the disk is full or the folder not writable."""
    with write_errors(path, advice):
        tmp = temp_file(path, suffix=".tmp")
        try:
            pq.write_table(table, tmp, **WRITE_OPTIONS)
            publish(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def read_parquet(path: Path, **options) -> pa.Table:
    """A Parquet file's table, every page checked against its checksum."""
    return pq.read_table(path, page_checksum_verification=True, **options)


def open_parquet(path: Path) -> pq.ParquetFile:
    """A Parquet file whose pages are checked against their checksums as they are read."""
    return pq.ParquetFile(path, page_checksum_verification=True)


def damaged_index(file: Path, index: Path, reason: str) -> TileIndexError:
    """The error for a damaged file of a tile index: which file, why, and what to do."""
    return TileIndexError(f"{file}: tile index is damaged ({reason}); rebuild it with `rsmclip-geo index` "
                          f"(`rsmclip-geo index --verify {index}` checks every file)")


def check_unit_vectors(embeddings: np.ndarray, file: Path, index: Path) -> np.ndarray:
    """`embeddings` [n, D], or damaged_index naming `file` when one is not a finite unit vector."""
    with np.errstate(invalid="ignore", over="ignore"):  # damaged values are reported below, not warned about
        norms = np.linalg.norm(embeddings.astype(np.float32), axis=1)
    if not (np.abs(norms - 1.0) <= UNIT_TOLERANCE).all():
        raise damaged_index(file, index, "embeddings that are not finite unit vectors")
    return embeddings


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _with_metadata(table: pa.Table, metadata: dict) -> pa.Table:
    """A table with the rsmclip_geo metadata and GeoParquet metadata (bbox of its rows)."""
    bbox = None
    if table.num_rows:
        bounds = shapely.total_bounds(shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False)))
        bbox = [float(v) for v in bounds]
    meta = {METADATA_KEY: json.dumps(metadata).encode(), b"geo": json.dumps(geo_metadata(bbox)).encode()}
    return table.replace_schema_metadata(meta)


def index_is_file(output: Path) -> bool:
    """Whether an index output is one file (a .parquet name, any case) rather than a directory of parts."""
    return output.suffix.lower() == ".parquet"


def _check_output(output: Path) -> None:
    """Fail early, before any work, when the index cannot be written at `output`."""
    from rsmclip_geo.export import check_writable  # export builds on this module

    if output.suffix and not index_is_file(output):
        raise RsmclipError(f"-o {output}: a tile index is a .parquet file or a directory; give a .parquet name "
                           f"or a directory name without an extension (not {output.suffix})")
    directory = not index_is_file(output)
    check_writable(output, directory=directory)
    if directory and output.is_dir() and any(not _is_index_part(p) for p in output.iterdir()):
        raise RsmclipError(f"-o {output}: directory exists and holds other files (it would be replaced); "
                           "choose a new directory or a .parquet file name")


def _is_index_part(path: Path) -> bool:
    return path.name.startswith("part-") and path.suffix == ".parquet"


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
        if self._rows >= SHARD_TILES:
            self.flush()

    def flush(self) -> None:
        """Write the buffered tiles as the next shard (creating the directory with the first one)."""
        if not self._buffer:
            return
        if not self.partial.is_dir():
            with write_errors(self.partial, RESUME_ADVICE):
                self.partial.mkdir()
                (self.partial / MANIFEST).write_text(json.dumps(self.manifest))
        table = _with_metadata(pa.concat_tables(self._buffer), self.manifest)
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
    scenes: Sequence[str | os.PathLike | Scene],
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
    _check_output(output)
    if not scenes:
        raise RsmclipError("no scenes given: pass one or more raster files")
    given: dict[str, tuple[Scene, str]] = {}  # fingerprint -> (scene, its path as given; a Scene's resolved path)
    for item in scenes:
        scene = item if isinstance(item, Scene) else open_scene(item, bands=bands, nodata=nodata)
        given[scene.fingerprint] = (scene, str(scene.path) if isinstance(item, Scene) else os.fspath(item))
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


def index_scenes(
    scenes: Sequence[str | os.PathLike | Scene],
    output: str | os.PathLike,
    *,
    model=None,
    tiling: TilingParams = TilingParams(),
    bands: tuple[int, int, int] | None = None,
    nodata: float | str | None = FILE_NODATA,
    batch_size: int = 32,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    threads: int | None = None,
) -> Path:
    """Build one GeoParquet tile index over several scenes (their CRSs may differ).

    Finished batches go to `<output>.partial/` shards, so a rerun after an interruption resumes;
    the index is assembled atomically at the end. An `output` ending in .parquet is one file,
    anything else a directory of GeoParquet shards.
    """
    job = plan_index(scenes, output, model=model, tiling=tiling, bands=bands, nodata=nodata, threads=threads)
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
    return job.output


def resolve_model(model, threads: int | None = None):
    """A loaded model from None (the default bundle), a name or path, or a Model instance."""
    if model is None or isinstance(model, (str, os.PathLike)):
        from rsmclip_geo.encoders import load_model

        return load_model(None if model is None else str(model), threads=threads)
    return model


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
        atomic_write_table(_with_metadata(table, metadata), output, RESUME_ADVICE)
    else:
        with write_errors(output, RESUME_ADVICE):
            _write_shard_directory(table, output, metadata)
    shutil.rmtree(partial, ignore_errors=True)
    log.info("wrote %s: %d tiles from %d scenes", output, table.num_rows, len(metadata["scenes"]))


def _write_shard_directory(table: pa.Table, output: Path, metadata: dict) -> None:
    """A directory of GeoParquet files (one per SHARD_TILES rows), swapped in atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for i, start in enumerate(range(0, table.num_rows, SHARD_TILES)):
            part = _with_metadata(table.slice(start, SHARD_TILES), metadata)
            pq.write_table(part, tmp / f"part-{i:05d}.parquet", **WRITE_OPTIONS)
        replace_directory(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def index_files(path: str | os.PathLike) -> list[Path]:
    """The GeoParquet files of a tile index (a .parquet file or a shard directory), in row order."""
    path = Path(path)
    if not path.exists():
        raise TileIndexError(f"{path}: no such tile index; build one with `rsmclip-geo index`")
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise TileIndexError(f"{path}: directory holds no .parquet files; give a tile index")
    return files


class IndexMetadata:
    """Bundle and scene accessors shared by the header of an index and the index opened in memory."""

    path: Path
    metadata: dict

    @property
    def bundle_name(self) -> str:
        return self.metadata["bundle"]["name"]

    @property
    def bundle_fingerprint(self) -> str:
        return self.metadata["bundle"]["fingerprint"]

    @property
    def tiling(self) -> TilingParams:
        return TilingParams.from_json(self.metadata["tiling"])

    @property
    def scenes(self) -> dict[str, dict]:
        return self.metadata["scenes"]

    def check_model(self, model) -> None:
        """TileIndexError when the model is not the bundle this index was built with."""
        if model.bundle.fingerprint != self.bundle_fingerprint:
            raise TileIndexError(
                f"{self.path}: index was built with model {self.bundle_name!r} "
                f"(bundle {self.bundle_fingerprint[:12]}), not {model.bundle.info.name!r} "
                f"({model.bundle.fingerprint[:12]}); search it with that model or rebuild the index")

    def load_model(self, model=None, threads: int | None = None):
        """The index's model: `model` if given (checked), else its bundle by name (checked)."""
        if model is None:
            from rsmclip_geo.bundle import resolve_bundle_path
            from rsmclip_geo.encoders import load_model

            try:
                bundle_path = resolve_bundle_path(self.bundle_name)
            except RsmclipError:
                raise TileIndexError(
                    f"{self.path}: built with model {self.bundle_name!r}, which is not installed; "
                    "pass its bundle directory with --model") from None
            model = load_model(bundle_path, threads=threads)
        else:
            model = resolve_model(model, threads)
        self.check_model(model)
        return model


@dataclass
class IndexHeader(IndexMetadata):
    """A tile index's files, metadata and per-file row counts, read from Parquet footers only."""

    path: Path
    metadata: dict
    files: list[Path]
    file_rows: np.ndarray  # int64 [n_files]
    schema: pa.Schema

    @classmethod
    def read(cls, path: str | os.PathLike) -> IndexHeader:
        """Footers of a .parquet index file or shard directory; TileIndexError if it is no usable index."""
        path = Path(path)
        files = index_files(path)
        rows = []
        for file in files:
            try:
                if file == files[0]:
                    schema = pq.read_schema(file)
                    raw = (schema.metadata or {}).get(METADATA_KEY)
                    if raw is None:
                        raise TileIndexError(f"{path}: not an rsmclip-geo tile index (no rsmclip_geo metadata)")
                    metadata = json.loads(raw)
                rows.append(pq.ParquetFile(file).metadata.num_rows)
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise TileIndexError(f"{file}: cannot be read as a tile index ({first_line(exc)}); "
                                     "rebuild it") from None
        if not isinstance(metadata, dict) or not {"bundle", "embed_dim", "tiling", "scenes"} <= metadata.keys():
            raise damaged_index(files[0], path, "incomplete rsmclip_geo metadata")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise TileIndexError(
                f"{path}: index format {metadata.get('format_version')} is not {FORMAT_VERSION}; rebuild it")
        return cls(path, metadata, files, np.array(rows, dtype=np.int64), schema)

    def __len__(self) -> int:
        return int(self.file_rows.sum())

    def read_rows(self, rows: Sequence[int] | np.ndarray, columns: Sequence[str]) -> pa.Table:
        """Some columns of some rows (global row numbers, any order), reading only the row groups holding them."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(self.file_rows)])
        file_of = np.searchsorted(starts, rows, side="right") - 1
        pieces, positions = [], []
        for f in np.unique(file_of):
            wanted = rows[file_of == f] - starts[f]
            with self.reading(self.files[f]):
                parquet = open_parquet(self.files[f])
                group_starts = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows
                                                for g in range(parquet.metadata.num_row_groups)])
                group_of = np.searchsorted(group_starts, wanted, side="right") - 1
                for g in np.unique(group_of):
                    table = parquet.read_row_group(int(g), columns=list(columns))
                    pieces.append(table.take(pa.array(wanted[group_of == g] - group_starts[g])))
            positions.append(np.flatnonzero(file_of == f))
        if not pieces:
            return self.schema.empty_table().select(list(columns))
        table = pa.concat_tables(pieces)
        order = np.empty(len(rows), dtype=np.int64)
        order[np.concatenate(positions)] = np.arange(len(rows))
        return table.take(pa.array(order))

    def iter_embeddings(self, batch_rows: int = 65536):
        """float16 [n, D] embedding batches in row order, reading only the embedding column
        (TileIndexError naming the file when one is not finite unit vectors)."""
        for f in self.files:
            with self.reading(f):
                for batch in open_parquet(f).iter_batches(batch_size=batch_rows, columns=["embedding"]):
                    values = batch.column(0).flatten().to_numpy(zero_copy_only=False)
                    yield check_unit_vectors(values.reshape(batch.num_rows, -1), f, self.path)

    @contextmanager
    def reading(self, file: Path) -> Iterator[None]:
        """Report a Parquet read failure of one index file (bad page checksum, truncation) as damage to it."""
        try:
            yield
        except (pa.ArrowException, OSError) as exc:
            raise damaged_index(file, self.path, first_line(exc)) from None


@dataclass
class TileIndex(IndexMetadata):
    """A tile index opened for search: its metadata, tile columns and embeddings."""

    path: Path
    metadata: dict
    table: pa.Table
    files: list[Path]
    file_rows: np.ndarray  # int64 [n_files]

    @classmethod
    def open(cls, path: str | os.PathLike) -> TileIndex:
        """Open a .parquet index file or a directory of index shards; TileIndexError if unusable."""
        return cls.load(IndexHeader.read(path))

    @classmethod
    def load(cls, header: IndexHeader) -> TileIndex:
        """The whole index behind an already read header, in memory, every page checked against its checksum."""
        tables = []
        for file in header.files:
            try:
                tables.append(read_parquet(file, schema=header.schema))
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise damaged_index(file, header.path, first_line(exc)) from None
        return cls(header.path, header.metadata, pa.concat_tables(tables), header.files, header.file_rows)

    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> np.ndarray:
        """One tile column as a numpy array."""
        return self.table.column(name).to_numpy()

    def embeddings(self) -> np.ndarray:
        """float16 [N, D] stored (L2-normalised) tile embeddings."""
        values = self.table.column("embedding").combine_chunks().values
        return values.to_numpy(zero_copy_only=False).reshape(len(self), -1)

    def embedding(self, row: int) -> np.ndarray:
        """float32 [D] stored embedding of one tile, checked to be a finite unit vector."""
        vector = check_unit_vectors(self.embeddings()[row:row + 1], self.file_of(row), self.path)
        return vector[0].astype(np.float32)

    def file_of(self, row: int) -> Path:
        """The index file holding a row."""
        return self.files[int(np.searchsorted(np.cumsum(self.file_rows), row, side="right"))]

    def check_scores(self, scores: np.ndarray, start: int = 0) -> None:
        """TileIndexError naming the file when cosine scores [Q, n] of rows start.. lie outside [-1, 1]
        or are not finite: their embeddings are damaged (a cheap check on scores already computed)."""
        valid = np.abs(scores) <= 1.0 + UNIT_TOLERANCE
        if not valid.all():
            row = start + int(np.flatnonzero(~valid.all(axis=0))[0])
            raise damaged_index(self.file_of(row), self.path, f"tile {self.table.column('tile_id')[row].as_py()} "
                                                              "has an embedding that is not a finite unit vector")

    def geometries(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Shapely polygons (EPSG:4326) of some rows, or all."""
        column = self.table.column("geometry")
        if rows is not None:
            column = column.take(pa.array(np.asarray(rows, dtype=np.int64)))
        return shapely.from_wkb(column.to_numpy(zero_copy_only=False))

    def row_of(self, tile_id: str) -> int:
        """Row number of a tile id; TileIndexError if the index has no such tile."""
        matches = np.flatnonzero(self.column("tile_id") == tile_id)
        if not len(matches):
            raise TileIndexError(f"{self.path}: no tile with id {tile_id!r}; ids are listed in the index's tile_id column")
        return int(matches[0])

    def scene_footprint(self, row: int) -> list[tuple[float, float]]:
        """Exact footprint ring of a tile in its scene's CRS, rebuilt from the scene table."""
        record = self.scenes[self.table.column("scene_fingerprint")[row].as_py()]
        col, r, w, h = (self.table.column(c)[row].as_py() for c in ("win_col", "win_row", "win_width", "win_height"))
        return window_ring(Affine(*record["transform"][:6]), col, r, w, h)


#: Rows read per batch when an index is verified.
VERIFY_BATCH_ROWS = 65536


def verify_index(path: str | os.PathLike) -> str:
    """Read every page of a tile index and check every row: page checksums, metadata, columns, row
    counts, embeddings (finite, unit norm), footprints, tile ids and scenes. TileIndexError naming
    the damaged file and what is wrong, else a one-line summary."""
    header = IndexHeader.read(path)
    expected = index_schema(int(header.metadata["embed_dim"]), header.metadata).remove_metadata()
    tile_ids: set[str] = set()
    for file, footer_rows in zip(header.files, header.file_rows):
        rows = 0
        with header.reading(file):
            parquet = open_parquet(file)
            _check_file_metadata(parquet, file, header, expected)
            for batch in parquet.iter_batches(batch_size=VERIFY_BATCH_ROWS):
                _check_rows(batch, file, header, tile_ids)
                rows += batch.num_rows
        if rows != footer_rows:
            raise damaged_index(file, header.path, f"{rows} rows read, its footer says {footer_rows}")
    return (f"{header.path}: OK: {len(header)} tiles, {len(header.scenes)} scene(s), {len(header.files)} file(s); "
            "every page checksum, embedding and footprint verified")


def _check_file_metadata(parquet: pq.ParquetFile, file: Path, header: IndexHeader, expected: pa.Schema) -> None:
    """The file's columns are an index's, its footer's two copies of the metadata agree, and it belongs
    to the same index as the first file."""
    if not parquet.schema_arrow.remove_metadata().equals(expected):
        raise damaged_index(file, header.path, "its columns are not those of a tile index")
    stored, arrow = parquet.metadata.metadata or {}, parquet.schema_arrow.metadata or {}
    for key in (METADATA_KEY, b"geo"):
        if stored.get(key) != arrow.get(key):
            raise damaged_index(file, header.path, f"the two copies of its {key.decode()} metadata differ")
    if arrow.get(METADATA_KEY) != header.schema.metadata[METADATA_KEY]:
        raise damaged_index(file, header.path, f"its metadata differs from that of {header.files[0].name}")


def _check_rows(batch: pa.RecordBatch, file: Path, header: IndexHeader, tile_ids: set[str]) -> None:
    """Embeddings, footprints, tile ids and scene references of one batch of rows."""
    values = batch.column("embedding").flatten().to_numpy(zero_copy_only=False)
    check_unit_vectors(values.reshape(batch.num_rows, -1), file, header.path)
    try:
        polygons = shapely.from_wkb(batch.column("geometry").to_numpy(zero_copy_only=False))
    except ShapelyError as exc:
        raise damaged_index(file, header.path, f"unreadable footprint ({first_line(exc)})") from None
    lon, lat = shapely.get_coordinates(polygons).T
    if not ((np.abs(lon) <= 180) & (np.abs(lat) <= 90)).all():
        raise damaged_index(file, header.path, "footprints outside longitude/latitude range")
    if not set(batch.column("scene_fingerprint").to_pylist()) <= header.scenes.keys():
        raise damaged_index(file, header.path, "tiles of a scene missing from its metadata")
    ids = batch.column("tile_id").to_pylist()
    if len(set(ids)) != len(ids) or not tile_ids.isdisjoint(ids):
        raise damaged_index(file, header.path, "duplicate tile ids")
    tile_ids.update(ids)
