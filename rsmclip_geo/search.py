"""Search a tile index: text or example → cosine scores → filters (threshold, area of interest) →
NMS → ranked hits; exact over the tiles in memory, or through the index's ANN index when large."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import shapely

from rsmclip_geo.errors import QueryError, RasterError, RsmclipError
from rsmclip_geo.feedback import DEFAULT_FEEDBACK_METHOD, FEEDBACK_METHODS, Labels, refine
from rsmclip_geo.hits import HIT_COLUMNS, Hit, hits_from_table
from rsmclip_geo.queries import clean_queries, query_vectors, warn_long_queries, warn_unknown_queries
from rsmclip_geo.caches import QueryCache
from rsmclip_geo.raster import read_image
from rsmclip_geo.stac import in_interval, parse_interval
from rsmclip_geo.tile_index import IndexHeader, TileIndex

log = logging.getLogger(__name__)

#: Rows scored per matrix product (bounds the float32 copy of the float16 embeddings).
SCORE_CHUNK = 65536
#: `search` uses the index's ANN index (rsmclip_geo.ann) above this many tiles, exact search up to it.
ANN_MIN_ROWS = 100_000
#: ANN candidates fetched per wanted hit (NMS, thresholds and AOI drop some); doubled until enough.
ANN_CANDIDATES_PER_HIT = 8


@dataclass(frozen=True)
class SearchParams:
    """Which tiles become hits: per query, the `top_k` best scoring at least `threshold` whose footprint
    meets `aoi`, none overlapping a better one of its scene by more than `nms_overlap` of the smaller tile.

    `aoi`: a (minlon, minlat, maxlon, maxlat) bbox or "a,b,c,d" string, a shapely geometry (EPSG:4326) or
    a vector file. `datetime`: an RFC 3339 interval (open ends `..`) that the STAC datetime of a tile's scene
    must meet (scenes without one are left out). `lang`: also average the query over that language's prompt
    templates. `exact`: score every tile even when the index is large enough for its ANN index. `labels`:
    tiles marked right or wrong (feedback.Labels): the query is refined with them by `feedback_method` and
    the judged tiles are left out of the ranking (a search with labels is exact).
    """

    top_k: int = 10
    threshold: float | None = None
    aoi: object = None
    datetime: str | None = None
    nms_overlap: float = 0.5
    lang: str | None = None
    exact: bool = False
    labels: Labels | None = None
    feedback_method: str = DEFAULT_FEEDBACK_METHOD

    def check(self) -> None:
        """QueryError naming the first parameter out of range."""
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise QueryError(f"top_k={self.top_k}: give a positive number of hits", param="top_k", value=self.top_k)
        if not 0.0 <= self.nms_overlap <= 1.0:
            raise QueryError(f"nms_overlap={self.nms_overlap}: give an overlap fraction between 0 and 1 (1 = keep "
                             "overlapping tiles)", param="nms_overlap", value=self.nms_overlap)
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise QueryError(f"threshold={self.threshold}: cosine scores lie between -1 and 1", param="threshold",
                             value=self.threshold)
        if self.datetime is not None:
            parse_interval(self.datetime)
        if self.feedback_method not in FEEDBACK_METHODS:
            raise QueryError(f"feedback_method={self.feedback_method}: choose one of {', '.join(FEEDBACK_METHODS)}",
                             param="feedback_method", value=self.feedback_method)

    @property
    def judged(self) -> bool:
        """Whether the search has tiles marked right or wrong."""
        return bool(self.labels)


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
            raise QueryError(f"aoi={aoi}: give minlon,minlat,maxlon,maxlat or a vector file", param="aoi",
                             value=aoi) from None
    if isinstance(aoi, (tuple, list)):
        if len(aoi) != 4 or not (aoi[0] < aoi[2] and aoi[1] < aoi[3]):
            raise QueryError(f"aoi={aoi}: a bbox is minlon,minlat,maxlon,maxlat with min < max", param="aoi",
                             value=aoi)
        return shapely.box(*aoi)
    path = Path(aoi)
    if not path.exists():
        raise QueryError(f"aoi={aoi}: no such file; give minlon,minlat,maxlon,maxlat or a vector file", param="aoi",
                         value=aoi)
    import geopandas

    try:
        frame = geopandas.read_file(path)
    except Exception as exc:  # pyogrio raises several types for unreadable files
        raise QueryError(f"aoi={path}: not a readable vector file ({exc})", param="aoi", value=path) from None
    if frame.empty:
        raise QueryError(f"aoi={path}: holds no features", param="aoi", value=path)
    if frame.crs is not None:
        frame = frame.to_crs(4326)
    return shapely.union_all(frame.geometry.values)


def window_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over the smaller area of window a [4] (col,row,w,h) against windows b [n,4]."""
    ix = np.clip(np.minimum(a[0] + a[2], b[:, 0] + b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[1] + a[3], b[:, 1] + b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    smaller = np.minimum(a[2] * a[3], b[:, 2] * b[:, 3])
    return (ix * iy) / smaller


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
    windows = index.windows()
    kept = order[nms_select(windows[order], index.column("scene_fingerprint")[order], top_k, nms_overlap)]
    table = index.table.select(HIT_COLUMNS).take(pa.array(kept, pa.int64()))
    return hits_from_table(table, scores[kept], query, index.scenes)


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
    return hits_from_table(table, scores[kept], query, header.scenes)


def warn_aoi_misses(aoi, geometry: shapely.Geometry, bounds: Sequence[float], where: Path) -> None:
    """Warn that an AOI covers no tile of an index with these lon/lat bounds, and when it looks like
    lat,lon order (swapped, it would cover the index)."""
    given = os.fspath(aoi) if isinstance(aoi, (str, os.PathLike)) else ",".join(f"{v:g}" for v in geometry.bounds)
    swapped = shapely.transform(geometry, lambda coords: coords[:, ::-1])
    hint = ""
    if swapped.intersects(shapely.box(*bounds)):
        hint = "; it looks like lat,lon order: swapped, it covers the index (give minlon,minlat,maxlon,maxlat)"
    log.warning("aoi=%s covers no tile of %s (index bounds lon,lat %s)%s", given, where,
                ",".join(f"{v:.6f}" for v in bounds), hint)


def dated_scenes(scenes: dict[str, dict], datetime: str, where: Path) -> list[str]:
    """Fingerprints of the scenes whose STAC datetime meets the interval; warns when none does."""
    interval = parse_interval(datetime)
    kept = [fp for fp, record in scenes.items() if in_interval(record.get("stac", {}).get("datetime"), interval)]
    if not kept:
        log.warning("datetime=%s meets no scene of %s (scenes without a STAC datetime never do)", datetime, where)
    return kept


def _both(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    return b if a is None else a if b is None else a & b


def _candidate_mask(index: TileIndex, params: SearchParams) -> np.ndarray | None:
    """Tiles intersecting the AOI and of scenes meeting the datetime interval (None without either); warns
    when the AOI covers none."""
    dated = None
    if params.datetime is not None:
        dated = np.isin(index.column("scene_fingerprint"), dated_scenes(index.scenes, params.datetime, index.path))
    geometry = parse_aoi(params.aoi)
    if geometry is None:
        return dated
    tiles = index.geometries()
    mask = shapely.intersects(tiles, geometry)
    if not mask.any():
        warn_aoi_misses(params.aoi, geometry, shapely.total_bounds(tiles), index.path)
    return _both(mask, dated)


def _ann_candidate_mask(header: IndexHeader, ann, params: SearchParams) -> np.ndarray | None:
    """_candidate_mask over the footprint rings and scene numbers of the index's ANN index."""
    dated = None
    if params.datetime is not None:
        kept = set(dated_scenes(header.scenes, params.datetime, header.path))
        dated = np.isin(ann.scenes, [i for i, fp in enumerate(header.scenes) if fp in kept])
    geometry = parse_aoi(params.aoi)
    if geometry is None:
        return dated
    mask = ann.aoi_mask(geometry)
    if not mask.any():
        bounds = [*ann.rings.min(axis=(0, 1)), *ann.rings.max(axis=(0, 1))]
        warn_aoi_misses(params.aoi, geometry, bounds, header.path)
    return _both(mask, dated)


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
        log.warning("%s: %d tiles and no ANN index; exact search (build its ANN index to search faster)",
                    header.path, len(header))
        return None
    return AnnIndex.open(header)


def search_index(
    index: TileIndex | IndexHeader | str | os.PathLike,
    queries: str | Sequence[str],
    *,
    model=None,
    params: SearchParams = SearchParams(),
    threads: int | None = None,
    ann_min_rows: int = ANN_MIN_ROWS,
    query_cache: QueryCache | None = None,
) -> tuple[list[Hit], np.ndarray | None]:
    """Ranked hits (1..top_k per query) of text queries in any language over a tile index, and every
    tile's score per query (float32 [Q, N]) when the search was exact (None through an ANN index).

    An index given by path or as an IndexHeader with more than `ann_min_rows` tiles is searched
    through its ANN index (rsmclip_geo.ann) without loading it, unless `params.exact`. Query
    embeddings come from `query_cache` when given.
    """
    queries = clean_queries(queries)
    params.check()
    if isinstance(index, TileIndex):
        header = None
    else:
        header = index if isinstance(index, IndexHeader) else IndexHeader.read(index)
    ann = None if header is None else open_ann(header, params.exact or params.judged, ann_min_rows)
    if ann is None and header is not None:
        index = TileIndex.load(header)
    searched = header if ann is not None else index
    model = searched.load_model(model, threads=threads)
    warn_long_queries(model, queries)
    warn_unknown_queries(model, queries)
    vectors = query_vectors(model, queries, params.lang, cache=query_cache)
    options = dict(top_k=params.top_k, threshold=params.threshold, nms_overlap=params.nms_overlap)
    hits: list[Hit] = []
    if ann is not None:
        log.info("%s: searching %d tiles with its %s ANN index", header.path, len(header), ann.kind)
        allowed = _ann_candidate_mask(header, ann, params)
        for query, vector in zip(queries, vectors):
            hits += ann_rank_hits(header, ann, vector, query, allowed=allowed, **options)
        return hits, None
    log.info("%s: exact search over %d tiles", index.path, len(index))
    allowed = _candidate_mask(index, params)
    if params.judged:
        vectors, allowed = apply_feedback(index, vectors, params, allowed)
    scores = score_tiles(index, vectors)
    for query, row in zip(queries, scores):
        hits += rank_hits(index, row, query, allowed=allowed, **options)
    return hits, scores


def apply_feedback(index: TileIndex, vectors: np.ndarray, params: SearchParams,
                   allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Query vectors refined by the judged tiles of `params.labels`, and the candidate mask without them."""
    positive, negative = params.labels.rows(index)
    embeddings = index.embeddings()
    refined = np.stack([refine(v, embeddings[positive], embeddings[negative], params.feedback_method)
                        for v in vectors])
    allowed = np.ones(len(index), dtype=bool) if allowed is None else allowed.copy()
    allowed[np.concatenate([positive, negative])] = False
    return refined, allowed


def similar(
    index: TileIndex | str | os.PathLike,
    *,
    tile_id: str | None = None,
    image: str | os.PathLike | np.ndarray | None = None,
    bands: tuple[int, int, int] | None = None,
    model=None,
    params: SearchParams = SearchParams(),
    threads: int | None = None,
) -> tuple[list[Hit], np.ndarray]:
    """Search by example: tiles most similar to an indexed tile (itself excluded) or to an image chip
    (`bands`: its 1-based R,G,B bands, see raster.read_image); the hits and every tile's score [1, N]."""
    index = index if isinstance(index, TileIndex) else TileIndex.open(index)
    if (tile_id is None) == (image is None):
        raise QueryError("give exactly one example: a tile id (tile_id) or an image chip (image)", param="tile_id")
    params.check()
    allowed = _candidate_mask(index, params)
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
        if isinstance(image, np.ndarray):
            pixels, label = image, "image"
        else:
            try:
                pixels = read_image(image, bands=bands)
            except RasterError as exc:
                if exc.param is not None:  # the chip's bands: the error names that parameter and the file
                    raise QueryError(str(exc), param=exc.param, value=exc.value) from None
                raise QueryError(f"image={exc}", param="image", value=image) from None
            label = f"image:{Path(image).name}"
        vector = model.encode_images([pixels])[0]
    vectors = vector[None]
    if params.judged:
        vectors, allowed = apply_feedback(index, vectors, params, allowed)
    scores = score_tiles(index, vectors)
    hits = rank_hits(index, scores[0], label, top_k=params.top_k, threshold=params.threshold, allowed=allowed,
                     nms_overlap=params.nms_overlap)
    return hits, scores
