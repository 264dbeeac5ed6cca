"""Tile index: GeoParquet read/write, resumable shards, multi-scene jobs, cache keys.

Written with pyarrow directly (WKB geometry + GeoParquet 1.1 `geo` metadata), so building an
index needs no geopandas; geopandas, DuckDB and GDAL ≥ 3.8 read it as ordinary GeoParquet.
"""

from __future__ import annotations

import hashlib
import json
import logging
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

from rsmclip_geo.errors import RsmclipError, TileIndexError
from rsmclip_geo.files import publish, replace_directory, temp_file
from rsmclip_geo.pipeline import CancelCallback, EmbeddedBatch, ProgressCallback, embed_scene
from rsmclip_geo.raster import Scene, open_scene, window_ring, window_rings
from rsmclip_geo.tiling import TilingParams, TileWindow, tile_windows

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_KEY = b"rsmclip_geo"
MANIFEST = "manifest.json"
#: Tiles buffered before a resume shard is written.
SHARD_TILES = 2048
_WGS84 = CRS.from_epsg(4326)


def default_cache_dir() -> Path:
    """The tile-search cache: $RSMCLIP_GEO_CACHE, else ~/.cache/rsmclip-geo."""
    env = os.environ.get("RSMCLIP_GEO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rsmclip-geo"


def cache_key(scene: Scene, bundle_fingerprint: str, tiling: TilingParams) -> str:
    """Cache key of a scene's index: scene fingerprint + mtime + bundle fingerprint + tiling params."""
    parts = {
        "scene": scene.fingerprint,
        "mtime_ns": scene.path.stat().st_mtime_ns,
        "bands": list(scene.rgb_bands),
        "bundle": bundle_fingerprint,
        "tiling": tiling.to_json(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def scene_record(scene: Scene) -> dict:
    """The per-scene metadata entry from which exact scene-CRS footprints can be rebuilt."""
    return {
        "path": str(scene.path),
        "crs": scene.crs_wkt,
        "transform": list(scene.transform),
        "width": scene.width,
        "height": scene.height,
        "rgb_bands": list(scene.rgb_bands),
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


def atomic_write_table(table: pa.Table, path: Path) -> None:
    """Write a Parquet file through a temporary file in the target directory."""
    tmp = temp_file(path, suffix=".tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _with_metadata(table: pa.Table, metadata: dict) -> pa.Table:
    """A table with the rsmclip_geo metadata and GeoParquet metadata (bbox of its rows)."""
    bbox = None
    if table.num_rows:
        bounds = shapely.total_bounds(shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False)))
        bbox = [float(v) for v in bounds]
    meta = {METADATA_KEY: json.dumps(metadata).encode(), b"geo": json.dumps(geo_metadata(bbox)).encode()}
    return table.replace_schema_metadata(meta)


def _check_output(output: Path) -> None:
    """Fail early, before any work, when the index cannot be written at `output`."""
    from rsmclip_geo.export import check_writable  # export builds on this module

    directory = output.suffix != ".parquet"
    check_writable(output, directory=directory)
    if directory and output.is_dir() and any(not _is_index_part(p) for p in output.iterdir()):
        raise RsmclipError(f"-o {output}: directory exists and holds other files (it would be replaced); "
                           "choose a new directory or a .parquet file name")


def _is_index_part(path: Path) -> bool:
    return path.name.startswith("part-") and path.suffix == ".parquet"


class ShardWriter:
    """Resume shards of one job in `<output>.partial/`: manifest + one GeoParquet file per flush."""

    def __init__(self, partial: Path, manifest: dict):
        self.partial = partial
        self.manifest = manifest
        self._buffer: list[pa.Table] = []
        self._rows = 0
        self._count = 0

    def open(self) -> dict[str, set[str]]:
        """Create or reuse the partial directory; the tile ids already embedded, per scene."""
        done: dict[str, set[str]] = {}
        path = self.partial / MANIFEST
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("bundle", {}).get("fingerprint") != self.manifest["bundle"]["fingerprint"]:
                raise TileIndexError(
                    f"{self.partial}: unfinished index built with model {old.get('bundle', {}).get('name')!r} "
                    f"(another bundle); rerun with that model or delete the directory to start over")
            if old.get("tiling") != self.manifest["tiling"] or old.get("format_version") != FORMAT_VERSION:
                log.warning("%s: unfinished index has other tiling parameters; starting over", self.partial)
                shutil.rmtree(self.partial)
        if self.partial.is_dir():
            shards = sorted(self.partial.glob("shard-*.parquet"))
            for shard in shards:
                table = pq.read_table(shard, columns=["scene_fingerprint", "tile_id"])
                for fp, tid in zip(table.column(0).to_pylist(), table.column(1).to_pylist()):
                    done.setdefault(fp, set()).add(tid)
            self._count = len(shards)
            if done:
                log.info("resuming: %d tiles already embedded in %s", sum(map(len, done.values())), self.partial)
        else:
            self.partial.mkdir()
        (self.partial / MANIFEST).write_text(json.dumps(self.manifest))
        return done

    def add(self, table: pa.Table) -> None:
        self._buffer.append(table)
        self._rows += table.num_rows
        if self._rows >= SHARD_TILES:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        table = _with_metadata(pa.concat_tables(self._buffer), self.manifest)
        atomic_write_table(table, self.partial / f"shard-{self._count:05d}.parquet")
        self._count += 1
        self._buffer, self._rows = [], 0


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

    @contextmanager
    def shards(self) -> Iterator[tuple[ShardWriter, dict[str, set[str]]]]:
        """(writer, tile ids already in the resume shards per scene fingerprint); on a clean exit the
        shards are flushed and assembled into the index, on an exception only flushed (a rerun resumes)."""
        writer = ShardWriter(self.partial, self.metadata)
        done_ids = writer.open()
        try:
            yield writer, done_ids
        finally:
            writer.flush()
        assemble(self.partial, self.output, self.metadata)


def plan_index(
    scenes: Sequence[str | os.PathLike | Scene],
    output: str | os.PathLike,
    *,
    model=None,
    tiling: TilingParams = TilingParams(),
    bands: tuple[int, int, int] | None = None,
    threads: int | None = None,
) -> IndexJob:
    """Every check and the tile plan of an index job, done before any tile is read (RsmclipError on bad input)."""
    output = Path(output)
    _check_output(output)
    if not scenes:
        raise RsmclipError("no scenes given: pass one or more raster files")
    opened = list({scene.fingerprint: scene for scene in (
        s if isinstance(s, Scene) else open_scene(s, bands=bands) for s in scenes)}.values())
    model = resolve_model(model, threads)
    info = model.bundle.info
    params = tiling.resolved(getattr(info, "default_tile_size", None))
    plans = [(scene, tile_windows(scene, params)) for scene in opened]
    metadata = {
        "format_version": FORMAT_VERSION,
        "bundle": {"name": info.name, "fingerprint": model.bundle.fingerprint},
        "embed_dim": int(info.embed_dim),
        "tiling": params.to_json(),
        "scenes": {scene.fingerprint: scene_record(scene) for scene in opened},
    }
    return IndexJob(output, model, params, plans, metadata)


def index_scenes(
    scenes: Sequence[str | os.PathLike | Scene],
    output: str | os.PathLike,
    *,
    model=None,
    tiling: TilingParams = TilingParams(),
    bands: tuple[int, int, int] | None = None,
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
    job = plan_index(scenes, output, model=model, tiling=tiling, bands=bands, threads=threads)
    schema = job.schema
    grand_total = job.total_windows
    offset = 0
    with job.shards() as (writer, done_ids):
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
    """Turn the resume shards into the final index (file or shard directory) and drop them."""
    shards = sorted(partial.glob("shard-*.parquet"))
    if not shards:
        raise RsmclipError(f"{output}: no tile kept in any scene (all nodata, masked or constant); nothing indexed")
    schema = index_schema(metadata["embed_dim"], metadata)
    table = pa.concat_tables([pq.read_table(s, schema=schema) for s in shards])
    order = {fp: i for i, fp in enumerate(metadata["scenes"])}
    sort_keys = pa.array([order[fp] for fp in table.column("scene_fingerprint").to_pylist()], pa.int32())
    table = table.append_column("_scene_order", sort_keys).sort_by(
        [("_scene_order", "ascending"), ("scale", "ascending"), ("win_row", "ascending"), ("win_col", "ascending")]
    ).drop_columns(["_scene_order"])
    if output.suffix == ".parquet":
        atomic_write_table(_with_metadata(table, metadata), output)
    else:
        _write_shard_directory(table, output, metadata)
    shutil.rmtree(partial)
    log.info("wrote %s: %d tiles from %d scenes", output, table.num_rows, len(metadata["scenes"]))


def _write_shard_directory(table: pa.Table, output: Path, metadata: dict) -> None:
    """A directory of GeoParquet files (one per SHARD_TILES rows), swapped in atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for i, start in enumerate(range(0, table.num_rows, SHARD_TILES)):
            part = _with_metadata(table.slice(start, SHARD_TILES), metadata)
            pq.write_table(part, tmp / f"part-{i:05d}.parquet", compression="zstd")
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
            from rsmclip_geo.encoders import load_model

            try:
                model = load_model(self.bundle_name, threads=threads)
            except RsmclipError:
                raise TileIndexError(
                    f"{self.path}: built with model {self.bundle_name!r}, which is not installed; "
                    "pass its bundle directory with --model") from None
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
        try:
            schema = pq.read_schema(files[0])
            raw = (schema.metadata or {}).get(METADATA_KEY)
            if raw is None:
                raise TileIndexError(f"{path}: not an rsmclip-geo tile index (no rsmclip_geo metadata)")
            metadata = json.loads(raw)
            rows = np.array([pq.ParquetFile(f).metadata.num_rows for f in files], dtype=np.int64)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise TileIndexError(f"{path}: cannot be read as a tile index ({exc}); rebuild it") from None
        if metadata.get("format_version") != FORMAT_VERSION:
            raise TileIndexError(
                f"{path}: index format {metadata.get('format_version')} is not {FORMAT_VERSION}; rebuild it")
        return cls(path, metadata, files, rows, schema)

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
            parquet = pq.ParquetFile(self.files[f])
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
        """float16 [n, D] embedding batches in row order, reading only the embedding column."""
        for f in self.files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=["embedding"]):
                values = batch.column(0).flatten().to_numpy(zero_copy_only=False)
                yield values.reshape(batch.num_rows, -1)


@dataclass
class TileIndex(IndexMetadata):
    """A tile index opened for search: its metadata, tile columns and embeddings."""

    path: Path
    metadata: dict
    table: pa.Table

    @classmethod
    def open(cls, path: str | os.PathLike) -> TileIndex:
        """Open a .parquet index file or a directory of index shards; TileIndexError if unusable."""
        return cls.load(IndexHeader.read(path))

    @classmethod
    def load(cls, header: IndexHeader) -> TileIndex:
        """The whole index behind an already read header, in memory."""
        try:
            table = pa.concat_tables([pq.read_table(f, schema=header.schema) for f in header.files])
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise TileIndexError(f"{header.path}: cannot be read as a tile index ({exc}); rebuild it") from None
        return cls(header.path, header.metadata, table)

    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> np.ndarray:
        """One tile column as a numpy array."""
        return self.table.column(name).to_numpy()

    def embeddings(self) -> np.ndarray:
        """float16 [N, D] stored (L2-normalised) tile embeddings."""
        values = self.table.column("embedding").combine_chunks().values
        return values.to_numpy(zero_copy_only=False).reshape(len(self), -1)

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
