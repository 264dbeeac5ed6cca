"""Approximate nearest-neighbour (ANN) index over a tile index's embeddings, with FAISS.

The ANN index lives next to the tile index, in `<index>.ann/` (`tiles/` → `tiles.ann/`,
`tiles.parquet` → `tiles.parquet.ann/`):

    ann.json      sidecar: format version, kind, parameters, rows, bundle, shard fingerprint, and
                  the size and sha256 of each file below
    vectors.faiss the FAISS index (inner product on the L2-normalised embeddings; id = row number)
    windows.npy   int32 [N, 4] pixel windows (col, row, width, height)   ┐ memory-mapped when
    scenes.npy    int32 [N] scene number (into ann.json "scenes")         │ searching: NMS and
    rings.npy     float64 [N, 5, 2] footprint rings (EPSG:4326 lon/lat)   ┘ AOI need no Parquet read

Up to HNSW_MAX_ROWS rows the index is HNSW (flat vectors), above it IVF with fp16 scalar-quantised
vectors (the tile index stores float16 embeddings, so the codes lose nothing). Building reads the
embedding and tile columns in row-group batches; searching reads Parquet only for the final hits.
faiss is an optional dependency (`pip install rsmclip-geo[ann]`).

Opening checks the sidecar, the file sizes and the row counts; search checks that FAISS returns
row ids of the index and finite cosine scores. `verify_ann` also checks every file's sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely

from rsmclip_geo.files import sha256_file
from rsmclip_geo.errors import RsmclipError, TileIndexError, first_line
from rsmclip_geo.files import replace_directory, write_errors
from rsmclip_geo.tile_index import UNIT_TOLERANCE, WINDOW_COLUMNS, IndexHeader, check_unit_vectors, open_parquet
from rsmclip_geo.locks import output_lock
from rsmclip_geo.pipeline import default_threads

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
SIDECAR = "ann.json"
VECTORS = "vectors.faiss"
ARRAYS = ("windows.npy", "scenes.npy", "rings.npy")
#: Indexes up to this many rows get an HNSW graph, larger ones an IVF index.
HNSW_MAX_ROWS = 500_000
#: HNSW: neighbours per node, construction and search beam widths.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 512  # 128 gave recall@10 0.75-0.78 on 81k real tile embeddings, 512 gave 0.98
#: IVF: inverted lists per sqrt(rows), lists visited per query, k-means training rows per list and iterations.
IVF_LISTS_PER_SQRT = 1
IVF_NPROBE = 32
IVF_TRAIN_PER_LIST = 64
IVF_KMEANS_ITERATIONS = 12
#: An AOI leaving at most this many rows is scored exactly over them: graph and inverted-list
#: search lose recall under tight filters.
EXACT_SUBSET_ROWS = 65536
#: Rows read per batch while building.
BUILD_BATCH_ROWS = 65536
_TILE_COLUMNS = ["scene_fingerprint", *WINDOW_COLUMNS, "geometry"]
_TAIL_BYTES = 64 * 1024


def require_faiss():
    """The faiss module; RsmclipError with the install command when it is missing."""
    try:
        import faiss
    except ImportError:
        raise RsmclipError("the ANN index needs faiss: pip install 'rsmclip-geo[ann]' (faiss-cpu)") from None
    return faiss


def faiss_available() -> bool:
    try:
        require_faiss()
    except RsmclipError:
        return False
    return True


def ann_path(index_path: str | os.PathLike) -> Path:
    """Where the ANN index of a tile index lives: `<index>.ann/` next to it."""
    path = Path(index_path)
    return path.with_name(path.name + ".ann")


def shards_fingerprint(header: IndexHeader) -> str:
    """sha256 of each index file's name, size, row count and last 64 KiB (its Parquet footer).

    Changes when the index is rebuilt, resumed into or extended, so a stale ANN index is detected.
    """
    digest = hashlib.sha256()
    for path, rows in zip(header.files, header.file_rows):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0{int(rows)}\0".encode())
        with path.open("rb") as f:
            f.seek(max(0, size - _TAIL_BYTES))
            digest.update(f.read())
    return digest.hexdigest()


def rebuild_advice(index_path: Path) -> str:
    """What to do about a damaged or stale ANN index of the tile index at `index_path`."""
    return f"rebuild the ANN index of {index_path} or search exactly (exact=True)"


def choose_kind(rows: int) -> str:
    """'hnsw' up to HNSW_MAX_ROWS rows, else 'ivf'."""
    return "hnsw" if rows <= HNSW_MAX_ROWS else "ivf"


def default_params(kind: str, rows: int) -> dict:
    """Build and search parameters of an ANN index of `kind` over `rows` vectors."""
    if kind == "hnsw":
        return {"m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}
    if kind == "ivf":
        nlist = max(1, min(rows // 39, int(IVF_LISTS_PER_SQRT * math.sqrt(rows))))
        return {"nlist": nlist, "nprobe": min(nlist, IVF_NPROBE), "codes": "fp16",
                "kmeans_iterations": IVF_KMEANS_ITERATIONS}
    raise RsmclipError(f"kind={kind}: choose hnsw or ivf", param="kind", value=kind)


def _new_index(faiss, kind: str, dim: int, params: dict):
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
        return index
    quantizer = faiss.IndexFlatIP(dim)
    codes = {"fp16": faiss.ScalarQuantizer.QT_fp16, "sq8": faiss.ScalarQuantizer.QT_8bit}[params["codes"]]
    index = faiss.IndexIVFScalarQuantizer(quantizer, dim, params["nlist"], codes, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = params["kmeans_iterations"]
    return index


def _training_sample(header: IndexHeader, size: int, seed: int = 0) -> np.ndarray:
    """float32 embeddings of `size` rows drawn at random, read in one pass over the embedding column."""
    total = len(header)
    rows = np.sort(np.random.default_rng(seed).choice(total, size=min(size, total), replace=False))
    picked, start = [], 0
    for batch in header.iter_embeddings(BUILD_BATCH_ROWS):
        inside = rows[(rows >= start) & (rows < start + len(batch))] - start
        picked.append(batch[inside].astype(np.float32))
        start += len(batch)
    return np.concatenate(picked)


def build_ann(
    index_path: str | os.PathLike,
    *,
    kind: str | None = None,
    params: dict | None = None,
    threads: int | None = None,
) -> Path:
    """Build the ANN index of a tile index into `<index>.ann/` (atomically); returns that directory.

    `kind` None chooses by row count (choose_kind); `params` override default_params.
    """
    if threads is not None:
        default_threads(threads)
    faiss = require_faiss()
    header = IndexHeader.read(index_path)
    rows = len(header)
    kind = kind or choose_kind(rows)
    params = {**default_params(kind, rows), **(params or {})}
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    output = ann_path(header.path)
    with output_lock(output), write_errors(output, "free disk space or make the folder writable"):
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
        try:
            _build(faiss, header, kind, params, tmp)
            replace_directory(tmp, output)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("wrote %s: %s index of %d tiles", output, kind, rows)
    return output


def _build(faiss, header: IndexHeader, kind: str, params: dict, tmp: Path) -> None:
    """Write the ANN index files and their sidecar into the directory `tmp` (TileIndexError naming the
    file when the tile index is damaged)."""
    rows, dim = len(header), int(header.metadata["embed_dim"])
    index = _new_index(faiss, kind, dim, params)
    if kind == "ivf":
        index.train(_training_sample(header, params["nlist"] * IVF_TRAIN_PER_LIST))
    scene_codes = {fp: i for i, fp in enumerate(header.scenes)}
    windows = _allocated_memmap(tmp / "windows.npy", np.int32, (rows, 4))
    scenes = _allocated_memmap(tmp / "scenes.npy", np.int32, (rows,))
    rings = _allocated_memmap(tmp / "rings.npy", np.float64, (rows, 5, 2))
    start = 0
    for path in header.files:
        with header.reading(path):
            for batch in open_parquet(path).iter_batches(batch_size=BUILD_BATCH_ROWS,
                                                         columns=["embedding", *_TILE_COLUMNS]):
                n = batch.num_rows
                vectors = batch.column("embedding").flatten().to_numpy(zero_copy_only=False).reshape(n, dim)
                index.add(check_unit_vectors(vectors, path, header.path).astype(np.float32))
                end = start + n
                windows[start:end] = np.column_stack(
                    [batch.column(c).to_numpy() for c in WINDOW_COLUMNS])
                scenes[start:end] = [scene_codes[fp] for fp in batch.column("scene_fingerprint").to_pylist()]
                polygons = shapely.from_wkb(batch.column("geometry").to_numpy(zero_copy_only=False))
                rings[start:end] = shapely.get_coordinates(shapely.get_exterior_ring(polygons)).reshape(n, 5, 2)
                start = end
    for array in (windows, scenes, rings):
        array.flush()
    del windows, scenes, rings
    try:
        faiss.write_index(index, str(tmp / VECTORS))
    except RuntimeError as exc:  # how FAISS reports a failed write, e.g. on a full disk
        raise OSError(f"FAISS could not write {VECTORS}: {first_line(exc)}") from None
    sidecar = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "metric": "inner_product",
        "params": params,
        "rows": rows,
        "embed_dim": dim,
        "bundle": header.metadata["bundle"],
        "shards": {"files": [p.name for p in header.files], "fingerprint": shards_fingerprint(header)},
        "scenes": list(header.scenes),
        "files": {name: {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                  for name in (VECTORS, *ARRAYS)},
    }
    (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1))


def read_sidecar(header: IndexHeader) -> dict:
    """The sidecar of a tile index's ANN index, checked (format, parameters, freshness against the tile
    index, each file's size: a truncated or missing file) and with typed values; TileIndexError saying
    to rebuild."""
    path = ann_path(header.path)
    rebuild = rebuild_advice(header.path)
    try:
        text = (path / SIDECAR).read_text()
    except FileNotFoundError:
        raise TileIndexError(f"{header.path}: has no ANN index {path}; build its ANN index or search exactly "
                             "(exact=True)") from None
    except OSError as exc:
        raise TileIndexError(f"{path / SIDECAR}: unreadable ANN sidecar ({exc.strerror}); {rebuild}") from None
    try:
        sidecar = json.loads(text)
        version = sidecar.get("format_version")
    except (ValueError, AttributeError):
        raise TileIndexError(f"{path / SIDECAR}: ANN sidecar is not a JSON object; {rebuild}") from None
    if version != FORMAT_VERSION:
        raise TileIndexError(f"{path}: ANN format {version} is not {FORMAT_VERSION}; {rebuild}")
    try:
        fresh = (sidecar["shards"]["fingerprint"] == shards_fingerprint(header)
                 and sidecar["bundle"]["fingerprint"] == header.bundle_fingerprint)
        files = {name: {"size": int(sidecar["files"][name]["size"]), "sha256": str(sidecar["files"][name]["sha256"])}
                 for name in (VECTORS, *ARRAYS)}
        beam = {"hnsw": "ef_search", "ivf": "nprobe"}[sidecar["kind"]]
        params = {**sidecar["params"], beam: int(sidecar["params"][beam])}
    except (KeyError, TypeError, ValueError) as exc:
        raise TileIndexError(f"{path / SIDECAR}: ANN sidecar is incomplete ({type(exc).__name__}: {exc}); "
                             f"{rebuild}") from None
    if not fresh:
        raise TileIndexError(f"{path}: ANN index is stale (the tile index changed since it was built); {rebuild}")
    for name, recorded in files.items():
        try:
            size = (path / name).stat().st_size
        except OSError as exc:
            raise TileIndexError(f"{path / name}: ANN index file cannot be read ({exc.strerror}); {rebuild}") from None
        if size != recorded["size"]:
            raise TileIndexError(f"{path / name}: ANN index file has {size} bytes, {recorded['size']} when it was "
                                 f"built (truncated or changed); {rebuild}")
    return {**sidecar, "files": files, "params": params}


def verify_ann(index_path: str | os.PathLike) -> str:
    """Check the ANN index of a tile index in full: its sidecar, freshness, every file's size and sha256,
    and (with faiss installed) that FAISS reads it with the index's row count. TileIndexError naming
    the damaged file, else a one-line summary."""
    header = IndexHeader.read(index_path)
    path = ann_path(header.path)
    sidecar = read_sidecar(header)
    for name in (VECTORS, *ARRAYS):
        if sha256_file(path / name) != sidecar["files"][name]["sha256"]:
            raise TileIndexError(f"{path / name}: ANN index file is damaged (its sha256 differs from when it was "
                                 f"built); {rebuild_advice(header.path)}")
    if not faiss_available():
        return f"ANN index {path.name}: files OK (faiss is not installed to open it)"
    return f"ANN index {path.name}: OK ({sidecar['kind']}, {len(AnnIndex.open(header))} rows)"


def _allocated_memmap(path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A new .npy file mapped for writing, its blocks allocated first: a full disk raises OSError here
    rather than killing the process (SIGBUS) when a mapped page is written."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    with path.open("r+b") as f:
        os.posix_fallocate(f.fileno(), 0, path.stat().st_size)
    return array


@dataclass
class AnnIndex:
    """An ANN index opened for search, checked against the tile index it was built from."""

    path: Path
    sidecar: dict
    index: object  # faiss.Index
    windows: np.ndarray  # int32 [N, 4], memory-mapped
    scenes: np.ndarray  # int32 [N], memory-mapped
    rings: np.ndarray  # float64 [N, 5, 2], memory-mapped
    _direct_map: bool = field(default=False, repr=False)

    @classmethod
    def open(cls, header: IndexHeader) -> AnnIndex:
        """The fresh ANN index of a tile index; TileIndexError if it is missing, unreadable, truncated or stale."""
        faiss = require_faiss()
        path = ann_path(header.path)
        sidecar = read_sidecar(header)
        try:
            index = faiss.read_index(str(path / VECTORS), faiss.IO_FLAG_MMAP)
            arrays = [np.load(path / name, mmap_mode="r") for name in ARRAYS]
        except (RuntimeError, OSError, ValueError) as exc:
            raise TileIndexError(f"{path}: ANN index cannot be read ({first_line(exc)}); "
                                 f"{rebuild_advice(header.path)}") from None
        if index.ntotal != len(header) or any(len(a) != len(header) for a in arrays):
            raise TileIndexError(f"{path}: ANN index holds {index.ntotal} rows, the tile index {len(header)}; "
                                 f"{rebuild_advice(header.path)}")
        return cls(path, sidecar, index, *arrays)

    @property
    def index_path(self) -> Path:
        """The tile index this ANN index belongs to."""
        return self.path.with_name(self.path.name.removesuffix(".ann"))

    @property
    def kind(self) -> str:
        return self.sidecar["kind"]

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def aoi_mask(self, aoi: shapely.Geometry) -> np.ndarray:
        """bool [N]: rows whose footprint intersects an EPSG:4326 geometry (read in chunks)."""
        mask = np.zeros(len(self), dtype=bool)
        bounds = aoi.bounds
        shapely.prepare(aoi)
        for start in range(0, len(self), BUILD_BATCH_ROWS):
            rings = np.asarray(self.rings[start:start + BUILD_BATCH_ROWS])
            lo, hi = rings.min(axis=1), rings.max(axis=1)
            near = np.flatnonzero((lo[:, 0] <= bounds[2]) & (hi[:, 0] >= bounds[0])
                                  & (lo[:, 1] <= bounds[3]) & (hi[:, 1] >= bounds[1]))
            if len(near):
                mask[start + near] = shapely.intersects(shapely.polygons(rings[near]), aoi)
        return mask

    def search(self, vectors: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores float32 [Q, k] and rows int64 [Q, k] (-1 = none) of the k best rows per query vector;
        TileIndexError when the ANN index gives rows it does not have or scores that are no cosines."""
        faiss = require_faiss()
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if allowed is not None and allowed.sum() <= EXACT_SUBSET_ROWS:
            return self._checked(*self._search_subset(vectors, k, np.flatnonzero(allowed)))
        params = self.sidecar["params"]
        selector = None
        if allowed is not None:
            selector = faiss.IDSelectorBitmap(np.packbits(allowed, bitorder="little"))
        if self.kind == "hnsw":
            search_params = faiss.SearchParametersHNSW(efSearch=max(params["ef_search"], k), sel=selector)
        else:
            search_params = faiss.SearchParametersIVF(nprobe=params["nprobe"], sel=selector)
        try:
            found = self.index.search(vectors, min(k, len(self)), params=search_params)
        except RuntimeError as exc:
            raise self._damaged(first_line(exc)) from None
        return self._checked(*found)

    def _checked(self, scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of a search, once they are known to be rows of the index and finite cosines."""
        if ((rows < -1) | (rows >= len(self))).any():
            raise self._damaged("it returned rows the tile index does not have")
        if not (np.abs(scores[rows >= 0]) <= 1.0 + UNIT_TOLERANCE).all():
            raise self._damaged("its vectors gave scores that are not finite cosines")
        return scores, rows

    def _damaged(self, reason: str) -> TileIndexError:
        return TileIndexError(f"{self.path / VECTORS}: ANN index is damaged ({reason}); "
                              f"{rebuild_advice(self.index_path)}")

    def _search_subset(self, vectors: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over some rows, with their vectors as stored in the ANN index."""
        if self.kind == "ivf" and not self._direct_map:
            self.index.make_direct_map()
            self._direct_map = True
        scores = vectors @ self.index.reconstruct_batch(rows).T if len(rows) else np.empty((len(vectors), 0), np.float32)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, top, axis=1), rows[top]
