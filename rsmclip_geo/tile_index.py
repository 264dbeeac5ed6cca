"""The tile index format: a GeoParquet file (or a directory of them) of tiles, footprints and embeddings.

Written with pyarrow directly (WKB geometry + GeoParquet 1.1 `geo` metadata), so building an index
needs no geopandas; geopandas, DuckDB and GDAL ≥ 3.8 read it as ordinary GeoParquet. Here: the
schema, the writers of finished files, the readers (IndexHeader: footers only; TileIndex: in
memory) and `verify_index`.
"""

from __future__ import annotations

import json
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

from rsmclip_geo.errors import RsmclipError, TileIndexError, first_line
from rsmclip_geo.files import publish, replace_directory, temp_file, write_errors
from rsmclip_geo.pipeline import EmbeddedBatch
from rsmclip_geo.raster import window_ring, window_rings
from rsmclip_geo.tiling import TilingParams

FORMAT_VERSION = 1
METADATA_KEY = b"rsmclip_geo"
#: The columns of a tile's window in its scene (full-resolution pixels).
WINDOW_COLUMNS = ("win_col", "win_row", "win_width", "win_height")
#: Rows per file of an index written as a directory of GeoParquet parts.
SHARD_TILES = 2048
#: How far stored embedding norms and cosine scores may stray above 1 (float16 rounding); more means damage.
UNIT_TOLERANCE = 0.01
#: Every Parquet file is written with a CRC32 per page, verified whenever it is read.
WRITE_OPTIONS = dict(compression="zstd", write_page_checksum=True)
_WGS84 = CRS.from_epsg(4326)


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
    return TileIndexError(f"{file}: tile index is damaged ({reason}); rebuild it (verifying {index} checks "
                          "every file)")


def check_unit_vectors(embeddings: np.ndarray, file: Path, index: Path) -> np.ndarray:
    """`embeddings` [n, D], or damaged_index naming `file` when one is not a finite unit vector."""
    with np.errstate(invalid="ignore", over="ignore"):  # damaged values are reported below, not warned about
        norms = np.linalg.norm(embeddings.astype(np.float32), axis=1)
    if not (np.abs(norms - 1.0) <= UNIT_TOLERANCE).all():
        raise damaged_index(file, index, "embeddings that are not finite unit vectors")
    return embeddings


def with_metadata(table: pa.Table, metadata: dict) -> pa.Table:
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


def is_index_part(path: Path) -> bool:
    return path.name.startswith("part-") and path.suffix == ".parquet"


def write_shard_directory(table: pa.Table, output: Path, metadata: dict) -> None:
    """A directory of GeoParquet files (one per SHARD_TILES rows), swapped in atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for i, start in enumerate(range(0, table.num_rows, SHARD_TILES)):
            part = with_metadata(table.slice(start, SHARD_TILES), metadata)
            pq.write_table(part, tmp / f"part-{i:05d}.parquet", **WRITE_OPTIONS)
        replace_directory(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def index_files(path: str | os.PathLike) -> list[Path]:
    """The GeoParquet files of a tile index (a .parquet file or a shard directory), in row order."""
    path = Path(path)
    if not path.exists():
        raise TileIndexError(f"{path}: no such tile index; check the path or build the index first")
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
        from rsmclip_geo.bundle import resolve_bundle_path
        from rsmclip_geo.encoders import load_model, resolve_model

        if model is None:
            try:
                bundle_path = resolve_bundle_path(self.bundle_name)
            except RsmclipError:
                raise TileIndexError(
                    f"model: {self.path} was built with model {self.bundle_name!r}, which is not installed; "
                    "give its bundle directory", param="model") from None
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

    def rows_at(self, lon: float, lat: float) -> np.ndarray:
        """Rows whose footprint contains the point (EPSG:4326): the smallest scale first, then by the
        distance of their centre to the point."""
        point = shapely.Point(lon, lat)
        tiles = self.geometries()
        rows = np.flatnonzero(shapely.contains(tiles, point) | shapely.touches(tiles, point))
        distance = shapely.distance(shapely.centroid(tiles[rows]), point)
        return rows[np.lexsort((distance, self.column("scale")[rows]))]

    def row_of(self, tile_id: str) -> int:
        """Row number of a tile id; TileIndexError if the index has no such tile."""
        matches = np.flatnonzero(self.column("tile_id") == tile_id)
        if not len(matches):
            raise TileIndexError(f"{self.path}: no tile with id {tile_id!r}; ids are listed in the index's tile_id column")
        return int(matches[0])

    def windows(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """int64 [n, 4] windows (col, row, width, height) of some rows, or all."""
        windows = np.column_stack([self.column(c) for c in WINDOW_COLUMNS]).astype(np.int64)
        return windows if rows is None else windows[np.asarray(rows, dtype=np.int64)]

    def scene_footprint(self, row: int) -> list[tuple[float, float]]:
        """Exact footprint ring of a tile in its scene's CRS, rebuilt from the scene table."""
        record = self.scenes[self.table.column("scene_fingerprint")[row].as_py()]
        col, r, w, h = (int(v) for v in self.windows([row])[0])
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
