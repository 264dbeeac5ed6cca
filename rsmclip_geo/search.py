"""Search a tile index: text or example → cosine scores → filters → NMS → ranked hits."""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import shapely

from rsmclip_geo.errors import QueryError, RasterError, RsmclipError
from rsmclip_geo.index import IndexHeader, TileIndex, default_cache_dir
from rsmclip_geo.raster import read_image

log = logging.getLogger(__name__)

#: Rows scored per matrix product (bounds the float32 copy of the float16 embeddings).
SCORE_CHUNK = 65536
#: `search` uses the index's ANN index (rsmclip_geo.ann) above this many tiles, exact search up to it.
ANN_MIN_ROWS = 100_000
#: ANN candidates fetched per wanted hit (NMS, thresholds and AOI drop some); doubled until enough.
ANN_CANDIDATES_PER_HIT = 8
#: File of the query-embedding cache, under the cache directory ($RSMCLIP_GEO_CACHE).
QUERY_CACHE_FILE = "query-embeddings.sqlite"

#: Prompt templates per language ({} = the query); the query embedding is their mean with the bare query.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": ("a satellite image of {}.", "an aerial photograph of {}."),
    "pt": ("uma imagem de satélite de {}.", "uma fotografia aérea de {}."),
    "es": ("una imagen de satélite de {}.", "una fotografía aérea de {}."),
    "fr": ("une image satellite de {}.", "une photographie aérienne de {}."),
    "de": ("ein Satellitenbild von {}.", "ein Luftbild von {}."),
    "nl": ("een satellietbeeld van {}.", "een luchtfoto van {}."),
    "it": ("un'immagine satellitare di {}.", "una fotografia aerea di {}."),
    "zh": ("{}的卫星图像。", "{}的航拍照片。"),
    "ko": ("{}의 위성 사진.", "{}의 항공 사진."),
    "ru": ("спутниковый снимок: {}.", "аэрофотоснимок: {}."),
}


#: Flat properties of a hit in every output format, in order.
HIT_PROPERTIES = ("rank", "score", "query", "scene", "tile_id", "scale", "win_col", "win_row", "win_width", "win_height")


@dataclass(frozen=True)
class Hit:
    """One ranked tile for one query."""

    rank: int
    score: float
    query: str
    scene: str
    scene_fingerprint: str
    tile_id: str
    scale: int
    win_col: int
    win_row: int
    win_width: int
    win_height: int
    geometry: shapely.Polygon  # EPSG:4326, lon/lat

    def properties(self) -> dict:
        """Flat properties for GeoJSON / GeoPackage / Parquet output."""
        values = {name: getattr(self, name) for name in HIT_PROPERTIES}
        values["score"] = round(self.score, 6)
        return values


def clean_queries(queries: str | Sequence[str]) -> list[str]:
    """Stripped queries; QueryError if none is left or one is empty."""
    items = [queries] if isinstance(queries, str) else list(queries)
    if not items:
        raise QueryError("no query given: type what to look for, e.g. \"airport\" or \"aeroporto\"")
    cleaned = [" ".join(str(q).split()) for q in items]
    if any(not q for q in cleaned):
        raise QueryError("empty query: type what to look for, e.g. \"airport\" or \"aeroporto\"")
    return cleaned


def warn_long_queries(model, queries: Sequence[str]) -> None:
    """Warn about queries longer than the text tower's context (the tokenizer truncates them)."""
    limit = int(model.bundle.info.context_length)
    for query in queries:
        if len(model.tokenizer.tokens(query)) + 2 > limit:  # + start and end tokens
            log.warning("query %r… is longer than the model's %d tokens; it is truncated", query[:40], limit)


def warn_unknown_queries(model, queries: Sequence[str]) -> None:
    """Warn about queries sharing no term with the vocabulary the model was trained on."""
    for query in model.bundle.outside_vocabulary(queries):
        log.warning("query %r contains no term model %r was trained on; its ranking may be unreliable",
                    query[:60], model.bundle.info.name)


class QueryCache:
    """On-disk text embeddings keyed by bundle fingerprint, prompt language and exact query string.

    A SQLite file under the cache directory, so a repeated query does not run the text tower again.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        if path is None:
            try:
                path = default_cache_dir() / QUERY_CACHE_FILE
            except RsmclipError as exc:  # no cache directory: queries are encoded every time
                log.warning("%s; queries are not cached", exc)
        self.path = Path(path) if path is not None else None
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection | None:
        if self._db is None and self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self._db = self._open()
                except sqlite3.OperationalError:  # locked, read-only, I/O: the file itself may be fine
                    raise
                except sqlite3.DatabaseError as exc:  # not SQLite, damaged, or another schema: start afresh
                    log.warning("query cache %s is corrupt (%s); rebuilding it", self.path, exc)
                    self.path.unlink()
                    self._db = self._open()
            except (OSError, sqlite3.Error) as exc:
                log.warning("query cache %s unusable (%s); queries are not cached", self.path, exc)
                self._db = None
        return self._db

    def _open(self) -> sqlite3.Connection:
        """A connection to the cache file, its table created; sqlite3.DatabaseError when the file is unusable."""
        db = sqlite3.connect(self.path, timeout=10)
        try:
            db.execute("CREATE TABLE IF NOT EXISTS query (bundle TEXT, lang TEXT, text TEXT, "
                       "vector BLOB, PRIMARY KEY (bundle, lang, text))")
            columns = [row[1] for row in db.execute("PRAGMA table_info(query)")]
            if columns != ["bundle", "lang", "text", "vector"]:
                raise sqlite3.DatabaseError(f"table query has columns {', '.join(columns)}")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("integrity check failed")
        except BaseException:
            db.close()
            raise
        return db

    def get(self, bundle: str, lang: str | None, queries: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached float32 vectors of those queries that are cached."""
        db = self._connect()
        if db is None:
            return {}
        found = {}
        try:
            for text in set(queries):
                row = db.execute("SELECT vector FROM query WHERE bundle=? AND lang=? AND text=?",
                                 (bundle, lang or "", text)).fetchone()
                if row is not None:
                    found[text] = np.frombuffer(row[0], dtype=np.float32).copy()
        except sqlite3.Error as exc:
            log.warning("query cache %s unreadable (%s); encoding the queries", self.path, exc)
            return {}
        return found

    def put(self, bundle: str, lang: str | None, vectors: dict[str, np.ndarray]) -> None:
        db = self._connect()
        if db is None or not vectors:
            return
        try:
            with db:
                db.executemany("INSERT OR REPLACE INTO query VALUES (?, ?, ?, ?)",
                               [(bundle, lang or "", text, np.asarray(v, np.float32).tobytes())
                                for text, v in vectors.items()])
        except sqlite3.Error as exc:
            log.warning("query cache %s not writable (%s); queries are not cached", self.path, exc)


def _encode_queries(model, queries: Sequence[str], lang: str | None) -> np.ndarray:
    """float32 [Q, D] L2-normalised query embeddings, averaged over `lang`'s prompt templates."""
    if lang is None:
        return model.encode_texts(list(queries))
    variants = [[q] + [t.format(q) for t in TEMPLATES[lang]] for q in queries]
    flat = model.encode_texts([v for group in variants for v in group])
    vectors = flat.reshape(len(queries), len(variants[0]), -1).mean(axis=1)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def query_vectors(model, queries: Sequence[str], lang: str | None = None,
                  cache: QueryCache | None = None) -> np.ndarray:
    """float32 [Q, D] L2-normalised query embeddings, averaged over `lang`'s prompt templates;
    with a cache, only the queries it lacks run the text tower."""
    if lang is not None and lang not in TEMPLATES:
        raise QueryError(f"--lang {lang}: no prompt templates; choose one of {', '.join(TEMPLATES)}")
    if cache is None:
        return _encode_queries(model, queries, lang)
    bundle = model.bundle.fingerprint
    known = cache.get(bundle, lang, queries)
    missing = list(dict.fromkeys(q for q in queries if q not in known))
    if missing:
        fresh = dict(zip(missing, _encode_queries(model, missing, lang)))
        cache.put(bundle, lang, fresh)
        known.update(fresh)
    return np.stack([known[q] for q in queries]).astype(np.float32)


def score_tiles(index: TileIndex, vectors: np.ndarray) -> np.ndarray:
    """float32 [Q, N] cosine scores of every tile against L2-normalised query vectors [Q, D];
    TileIndexError naming the file when a score shows a damaged tile embedding (not finite, not in [-1, 1])."""
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    if not np.isfinite(vectors).all():
        raise QueryError("query embeddings are not finite numbers: the model bundle is damaged; re-install it")
    embeddings = index.embeddings()
    if embeddings.shape[1] != vectors.shape[1]:
        raise RsmclipError(
            f"{index.path}: tile embeddings have {embeddings.shape[1]} dimensions, the query {vectors.shape[1]}; "
            "use the index's model")
    scores = np.empty((vectors.shape[0], len(embeddings)), dtype=np.float32)
    for start in range(0, len(embeddings), SCORE_CHUNK):
        chunk = embeddings[start:start + SCORE_CHUNK].astype(np.float32)
        with np.errstate(invalid="ignore", over="ignore"):  # damaged embeddings are reported just below
            scores[:, start:start + SCORE_CHUNK] = vectors @ chunk.T
        index.check_scores(scores[:, start:start + SCORE_CHUNK], start)
    return scores


def parse_aoi(aoi) -> shapely.Geometry | None:
    """An AOI in EPSG:4326: None, a (minlon, minlat, maxlon, maxlat) bbox or "a,b,c,d" string,
    a shapely geometry, or a vector file path (all its features, reprojected)."""
    if aoi is None or isinstance(aoi, shapely.Geometry):
        return aoi
    if isinstance(aoi, str) and not Path(aoi).exists() and aoi.count(",") == 3:
        try:
            aoi = tuple(float(v) for v in aoi.split(","))
        except ValueError:
            raise QueryError(f"--aoi {aoi}: give minlon,minlat,maxlon,maxlat or a vector file") from None
    if isinstance(aoi, (tuple, list)):
        if len(aoi) != 4 or not (aoi[0] < aoi[2] and aoi[1] < aoi[3]):
            raise QueryError(f"--aoi {aoi}: a bbox is minlon,minlat,maxlon,maxlat with min < max")
        return shapely.box(*aoi)
    path = Path(aoi)
    if not path.exists():
        raise QueryError(f"--aoi {aoi}: no such file; give minlon,minlat,maxlon,maxlat or a vector file")
    import geopandas

    try:
        frame = geopandas.read_file(path)
    except Exception as exc:  # pyogrio raises several types for unreadable files
        raise QueryError(f"--aoi {path}: not a readable vector file ({exc})") from None
    if frame.empty:
        raise QueryError(f"--aoi {path}: holds no features")
    if frame.crs is not None:
        frame = frame.to_crs(4326)
    return shapely.union_all(frame.geometry.values)


def window_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over the smaller area of window a [4] (col,row,w,h) against windows b [n,4]."""
    ix = np.clip(np.minimum(a[0] + a[2], b[:, 0] + b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[1] + a[3], b[:, 1] + b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    smaller = np.minimum(a[2] * a[3], b[:, 2] * b[:, 3])
    return (ix * iy) / smaller


#: Tile columns a hit is built from.
HIT_COLUMNS = ["tile_id", "scene", "scene_fingerprint", "scale", "win_col", "win_row", "win_width", "win_height",
               "geometry"]


def nms_select(windows: np.ndarray, scenes: np.ndarray, top_k: int, nms_overlap: float) -> list[int]:
    """Greedy NMS within each scene over candidates already sorted best first: positions of ≤ top_k kept."""
    kept: list[int] = []
    for i in range(len(windows)):
        if len(kept) == top_k:
            break
        same = [k for k in kept if scenes[k] == scenes[i]]
        if same and (window_overlap(windows[i], windows[same]) > nms_overlap).any():
            continue
        kept.append(i)
    return kept


def hits_from_table(table, scores: Sequence[float], query: str) -> list[Hit]:
    """Hits from the HIT_COLUMNS of the kept rows (best first) and their scores."""
    columns = {name: table.column(name).to_pylist() for name in HIT_COLUMNS if name != "geometry"}
    geometries = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    return [
        Hit(rank=i + 1, score=float(score), query=query, scene=columns["scene"][i],
            scene_fingerprint=columns["scene_fingerprint"][i], tile_id=columns["tile_id"][i],
            scale=int(columns["scale"][i]), win_col=int(columns["win_col"][i]), win_row=int(columns["win_row"][i]),
            win_width=int(columns["win_width"][i]), win_height=int(columns["win_height"][i]), geometry=geometries[i])
        for i, score in enumerate(scores)
    ]


def rank_hits(
    index: TileIndex,
    scores: np.ndarray,
    query: str,
    *,
    top_k: int,
    threshold: float | None,
    allowed: np.ndarray | None,
    nms_overlap: float,
) -> list[Hit]:
    """Top-k distinct tiles for one query: threshold, AOI mask, greedy NMS within each scene."""
    candidates = np.ones(len(scores), dtype=bool) if allowed is None else allowed.copy()
    if threshold is not None:
        candidates &= scores >= threshold
    order = np.flatnonzero(candidates)
    order = order[np.argsort(-scores[order], kind="stable")]
    windows = np.column_stack([index.column(c) for c in ("win_col", "win_row", "win_width", "win_height")])
    kept = order[nms_select(windows[order], index.column("scene_fingerprint")[order], top_k, nms_overlap)]
    table = index.table.select(HIT_COLUMNS).take(pa.array(kept, pa.int64()))
    return hits_from_table(table, scores[kept], query)


def ann_rank_hits(
    header: IndexHeader,
    ann,
    vector: np.ndarray,
    query: str,
    *,
    top_k: int,
    threshold: float | None,
    allowed: np.ndarray | None,
    nms_overlap: float,
) -> list[Hit]:
    """rank_hits over ANN candidates: fetch more candidates until NMS and filters leave top_k hits
    (or the index has no more); only the hits' rows are read from the tile index."""
    k = min(len(ann), max(64, ANN_CANDIDATES_PER_HIT * top_k))
    while True:
        scores, rows = (a[0] for a in ann.search(vector[None], k, allowed))
        found = rows >= 0
        if threshold is not None:
            found &= scores >= threshold
        scores, rows = scores[found], rows[found]
        kept = nms_select(ann.windows[rows], ann.scenes[rows], top_k, nms_overlap)
        exhausted = found.sum() < k or k >= len(ann)  # threshold reached, or no more candidates
        if len(kept) == top_k or exhausted:
            break
        k = min(len(ann), 2 * k)
    table = header.read_rows(rows[kept], HIT_COLUMNS)
    return hits_from_table(table, scores[kept], query)


def _check_search_params(top_k: int, nms_overlap: float, threshold: float | None) -> None:
    if top_k < 1:
        raise QueryError(f"--top-k {top_k}: give a positive number of hits")
    if not 0.0 <= nms_overlap <= 1.0:
        raise QueryError(f"--nms {nms_overlap}: give an overlap fraction between 0 and 1 (1 = keep overlapping tiles)")
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise QueryError(f"--threshold {threshold}: cosine scores lie between -1 and 1")


def warn_aoi_misses(aoi, geometry: shapely.Geometry, bounds: Sequence[float], where: Path) -> None:
    """Warn that an AOI covers no tile of an index with these lon/lat bounds, and when it looks like
    lat,lon order (swapped, it would cover the index)."""
    given = os.fspath(aoi) if isinstance(aoi, (str, os.PathLike)) else ",".join(f"{v:g}" for v in geometry.bounds)
    swapped = shapely.transform(geometry, lambda coords: coords[:, ::-1])
    hint = ""
    if swapped.intersects(shapely.box(*bounds)):
        hint = "; it looks like lat,lon order: swapped, it covers the index (give minlon,minlat,maxlon,maxlat)"
    log.warning("--aoi %s covers no tile of %s (index bounds lon,lat %s)%s", given, where,
                ",".join(f"{v:.6f}" for v in bounds), hint)


def _aoi_mask(index: TileIndex, aoi) -> np.ndarray | None:
    """Tiles intersecting the AOI (None without one); warns when it covers none."""
    geometry = parse_aoi(aoi)
    if geometry is None:
        return None
    tiles = index.geometries()
    mask = shapely.intersects(tiles, geometry)
    if not mask.any():
        warn_aoi_misses(aoi, geometry, shapely.total_bounds(tiles), index.path)
    return mask


def _ann_aoi_mask(header: IndexHeader, ann, aoi) -> np.ndarray | None:
    """_aoi_mask over the footprint rings of the index's ANN index."""
    geometry = parse_aoi(aoi)
    if geometry is None:
        return None
    mask = ann.aoi_mask(geometry)
    if not mask.any():
        bounds = [*ann.rings.min(axis=(0, 1)), *ann.rings.max(axis=(0, 1))]
        warn_aoi_misses(aoi, geometry, bounds, header.path)
    return mask


def open_ann(header: IndexHeader, exact: bool, ann_min_rows: int):
    """The ANN index to search `header` with, or None for exact search (see ANN_MIN_ROWS)."""
    if exact or len(header) <= ann_min_rows:
        return None
    from rsmclip_geo.ann import AnnIndex, ann_path, faiss_available

    if not faiss_available():
        log.warning("%s: %d tiles but faiss is not installed; exact search (pip install 'rsmclip-geo[ann]')",
                    header.path, len(header))
        return None
    if not ann_path(header.path).is_dir():
        log.warning("%s: %d tiles and no ANN index; exact search (build one with `rsmclip-geo ann-index %s`)",
                    header.path, len(header), header.path)
        return None
    return AnnIndex.open(header)


def search_index(
    index: TileIndex | IndexHeader | str | os.PathLike,
    queries: str | Sequence[str],
    *,
    model=None,
    top_k: int = 10,
    threshold: float | None = None,
    aoi=None,
    nms_overlap: float = 0.5,
    lang: str | None = None,
    threads: int | None = None,
    exact: bool = False,
    ann_min_rows: int = ANN_MIN_ROWS,
    query_cache: QueryCache | None = None,
) -> list[Hit]:
    """Ranked hits (1..top_k per query) of text queries in any language over a tile index.

    An index given by path or as an IndexHeader with more than `ann_min_rows` tiles is searched
    through its ANN index (rsmclip_geo.ann) without loading it; `exact` forces exact search over all
    tiles. Query embeddings come from `query_cache` when given.
    """
    queries = clean_queries(queries)
    _check_search_params(top_k, nms_overlap, threshold)
    if isinstance(index, TileIndex):
        header = None
    else:
        header = index if isinstance(index, IndexHeader) else IndexHeader.read(index)
    ann = None if header is None else open_ann(header, exact, ann_min_rows)
    if ann is None and header is not None:
        index = TileIndex.load(header)
    searched = header if ann is not None else index
    model = searched.load_model(model, threads=threads)
    warn_long_queries(model, queries)
    warn_unknown_queries(model, queries)
    vectors = query_vectors(model, queries, lang, cache=query_cache)
    options = dict(top_k=top_k, threshold=threshold, nms_overlap=nms_overlap)
    hits: list[Hit] = []
    if ann is not None:
        log.info("%s: searching %d tiles with its %s ANN index", header.path, len(header), ann.kind)
        allowed = _ann_aoi_mask(header, ann, aoi)
        for query, vector in zip(queries, vectors):
            hits += ann_rank_hits(header, ann, vector, query, allowed=allowed, **options)
        return hits
    log.info("%s: exact search over %d tiles", index.path, len(index))
    allowed = _aoi_mask(index, aoi)
    for query, row in zip(queries, score_tiles(index, vectors)):
        hits += rank_hits(index, row, query, allowed=allowed, **options)
    return hits


def load_image(path: str | os.PathLike, bands: tuple[int, int, int] | None = None) -> np.ndarray:
    """uint8 HxWx3 RGB pixels of an image file; QueryError if it is not an image. TIFFs (any band count
    and dtype), and any image when `bands` is given, are read like scenes (raster.read_image)."""
    from PIL import Image, UnidentifiedImageError

    if bands is not None or Path(path).suffix.lower() in (".tif", ".tiff"):
        try:
            return read_image(path, bands=bands)
        except RasterError as exc:
            raise QueryError(f"--image {exc}") from None
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise QueryError(f"--image {path}: not a readable image ({exc}); give a JPEG/PNG/TIFF chip") from None


def similar(
    index: TileIndex | str | os.PathLike,
    *,
    tile_id: str | None = None,
    image: str | os.PathLike | np.ndarray | None = None,
    bands: tuple[int, int, int] | None = None,
    model=None,
    top_k: int = 10,
    threshold: float | None = None,
    aoi=None,
    nms_overlap: float = 0.5,
    threads: int | None = None,
) -> list[Hit]:
    """Search by example: tiles most similar to an indexed tile (itself excluded) or to an image
    (`bands`: its 1-based R,G,B bands, see load_image)."""
    index = index if isinstance(index, TileIndex) else TileIndex.open(index)
    if (tile_id is None) == (image is None):
        raise QueryError("similar: give exactly one example, --tile ID or --image FILE")
    _check_search_params(top_k, nms_overlap, threshold)
    allowed = _aoi_mask(index, aoi)
    if allowed is None:
        allowed = np.ones(len(index), dtype=bool)
    if tile_id is not None:
        row = index.row_of(tile_id)
        vector = index.embedding(row)
        vector /= np.linalg.norm(vector)
        allowed[row] = False
        label = f"tile:{tile_id}"
    else:
        model = index.load_model(model, threads=threads)
        pixels = load_image(image, bands) if not isinstance(image, np.ndarray) else image
        vector = model.encode_images([pixels])[0]
        label = f"image:{Path(image).name}" if not isinstance(image, np.ndarray) else "image"
    scores = score_tiles(index, vector[None])[0]
    return rank_hits(index, scores, label, top_k=top_k, threshold=threshold, allowed=allowed, nms_overlap=nms_overlap)
