"""Change between dates: tiles of two tile indexes matched by footprint, ranked by the rise (or fall) of a
query's score from the earlier date to the later one, or, without a query, by how far their embeddings moved."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import shapely

from rsmclip_geo.errors import QueryError, RsmclipError
from rsmclip_geo.queries import clean_queries, query_vectors, warn_long_queries, warn_unknown_queries
from rsmclip_geo.search import SearchParams, nms_select, parse_aoi, score_tiles, warn_aoi_misses
from rsmclip_geo.tile_index import WINDOW_COLUMNS, TileIndex, check_unit_vectors

#: `appeared`: rank by score after − before (what the query finds now); `disappeared`: before − after.
CHANGE_DIRECTIONS = ("appeared", "disappeared")
#: Tiles of differing grids match when their footprints overlap by at least this intersection over union.
MIN_IOU = 0.5
#: Decimal places of lon/lat (about 1 cm) at which two footprints count as the same tile of a shared grid.
FOOTPRINT_DECIMALS = 7
#: The query label of a ranking by embedding distance (no query).
ANY_CHANGE = "any change"
#: Flat properties of a change in every output, in order, with their Arrow type.
CHANGE_PROPERTIES = {
    "rank": "int32", "rise": "float32", "score_before": "float32", "score_after": "float32", "query": "string",
    "scene_before": "string", "tile_before": "string", "scene": "string", "tile_id": "string", "scale": "int16",
    "win_col": "int32", "win_row": "int32", "win_width": "int32", "win_height": "int32", "iou": "float32",
}


@dataclass(frozen=True)
class ChangeHit:
    """One ranked pair of matched tiles for one query: the after tile (its scene, window and footprint) and
    the before tile it covers. `rise`: score after − before (`appeared`) or before − after (`disappeared`);
    without a query, the embedding distance 1 − cosine, and no scores."""

    rank: int
    rise: float
    score_before: float | None
    score_after: float | None
    query: str
    scene_before: str
    tile_before: str
    scene: str
    tile_id: str
    scale: int
    win_col: int
    win_row: int
    win_width: int
    win_height: int
    iou: float
    geometry: shapely.Polygon  # the after tile's footprint, EPSG:4326

    def properties(self) -> dict:
        """Flat properties for GeoJSON / GeoPackage / Parquet output."""
        values = {name: getattr(self, name) for name in CHANGE_PROPERTIES}
        for name in ("rise", "score_before", "score_after", "iou"):
            if values[name] is not None:
                values[name] = round(values[name], 6)
        return values


@dataclass(frozen=True)
class TilePairs:
    """Matched rows of a before and an after index, one-to-one, with their footprints' intersection over union."""

    before: np.ndarray  # int64 [P]
    after: np.ndarray  # int64 [P]
    iou: np.ndarray  # float64 [P]

    def __len__(self) -> int:
        return len(self.before)


def match_tiles(before: TileIndex, after: TileIndex, min_iou: float = MIN_IOU) -> TilePairs:
    """Pairs of tiles covering the same ground: the same footprint first (a shared tiling grid), then, for
    the tiles left, the largest overlap of at least `min_iou` intersection over union. Overlaps are measured
    in lon/lat, which keeps a tile-sized intersection over union (the map is nearly affine over a tile)."""
    shapes_before, shapes_after = before.geometries(), after.geometries()
    same_before, same_after = _same_footprints(shapes_before, shapes_after)
    rest_before = np.setdiff1d(np.arange(len(before)), same_before)
    rest_after = np.setdiff1d(np.arange(len(after)), same_after)
    near_before, near_after, near_iou = _overlapping(shapes_before, shapes_after, rest_before, rest_after, min_iou)
    return TilePairs(np.concatenate([same_before, near_before]).astype(np.int64),
                     np.concatenate([same_after, near_after]).astype(np.int64),
                     np.concatenate([np.ones(len(same_before)), near_iou]))


def _same_footprints(shapes_before: np.ndarray, shapes_after: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of equal footprints (lon/lat bounds to FOOTPRINT_DECIMALS), each row used once."""
    keys_after: dict[tuple, list[int]] = {}
    for row, bounds in enumerate(np.round(shapely.bounds(shapes_after), FOOTPRINT_DECIMALS).tolist()):
        keys_after.setdefault(tuple(bounds), []).append(row)
    rows_before, rows_after = [], []
    for row, bounds in enumerate(np.round(shapely.bounds(shapes_before), FOOTPRINT_DECIMALS).tolist()):
        free = keys_after.get(tuple(bounds))
        if free:
            rows_before.append(row)
            rows_after.append(free.pop(0))
    return np.array(rows_before, dtype=np.int64), np.array(rows_after, dtype=np.int64)


def _overlapping(shapes_before: np.ndarray, shapes_after: np.ndarray, rows_before: np.ndarray,
                 rows_after: np.ndarray, min_iou: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy one-to-one pairs of the given rows by decreasing intersection over union, at least `min_iou`."""
    empty = np.array([], dtype=np.int64)
    if not len(rows_before) or not len(rows_after):
        return empty, empty, np.array([])
    tree = shapely.STRtree(shapes_after[rows_after])
    i, j = tree.query(shapes_before[rows_before], predicate="intersects")
    a, b = shapes_before[rows_before[i]], shapes_after[rows_after[j]]
    common = shapely.area(shapely.intersection(a, b))
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = common / (shapely.area(a) + shapely.area(b) - common)
    order = np.flatnonzero(iou >= min_iou)
    order = order[np.argsort(-iou[order], kind="stable")]
    used_before, used_after, pairs = set(), set(), []
    for k in order:
        if i[k] not in used_before and j[k] not in used_after:
            used_before.add(i[k])
            used_after.add(j[k])
            pairs.append(k)
    pairs = np.array(pairs, dtype=np.int64)
    return rows_before[i[pairs]], rows_after[j[pairs]], iou[pairs]


def check_comparable(before: TileIndex, after: TileIndex) -> TilePairs:
    """The matched tiles of two indexes; RsmclipError (param `after`) when they were built with different
    models or no tile of one covers a tile of the other."""
    if before.bundle_fingerprint != after.bundle_fingerprint:
        raise RsmclipError(
            f"after={after.path}: built with model {after.bundle_name!r} (bundle {after.bundle_fingerprint[:12]}), "
            f"the before index {before.path} with {before.bundle_name!r} ({before.bundle_fingerprint[:12]}); "
            "index both dates with the same model", param="after", value=after.path)
    pairs = match_tiles(before, after)
    if not len(pairs):
        raise RsmclipError(
            f"after={after.path}: no tile matches a tile of {before.path} (a different tiling, or no overlapping "
            "footprints); index both dates over the same ground with the same tile size", param="after",
            value=after.path)
    return pairs


def check_change_params(params: SearchParams, direction: str, queried: bool) -> None:
    """QueryError naming the first parameter a change search cannot use."""
    replace(params, threshold=None).check()
    if direction not in CHANGE_DIRECTIONS:
        raise QueryError(f"direction={direction}: choose one of {', '.join(CHANGE_DIRECTIONS)}", param="direction",
                         value=direction)
    if direction != "appeared" and not queried:
        raise QueryError(f"direction={direction}: without a query, change is ranked by embedding distance, which "
                         "has no direction; give a query", param="direction", value=direction)
    if params.threshold is not None and not -2.0 <= params.threshold <= 2.0:
        raise QueryError(f"threshold={params.threshold}: a change of cosine score lies between -2 and 2",
                         param="threshold", value=params.threshold)
    if params.judged:
        raise QueryError("labels: change search takes no judged tiles; search each date to refine a query",
                         param="labels")


def change_search(
    before: TileIndex,
    after: TileIndex,
    queries: str | Sequence[str] | None = None,
    *,
    model=None,
    params: SearchParams = SearchParams(),
    direction: str = "appeared",
    threads: int | None = None,
) -> tuple[list[ChangeHit], TilePairs]:
    """Ranked changes (1..top_k per query, or for the one ranking by embedding distance without queries)
    between two indexes of the same model, and the matched tiles. `params`: top_k, threshold (on the rise),
    aoi (on the after footprints), nms_overlap (within each after scene) and lang apply."""
    queries = None if queries is None else clean_queries(queries)
    check_change_params(params, direction, queries is not None)
    pairs = check_comparable(before, after)
    allowed = _aoi_mask(after, pairs, params.aoi)
    if queries is None:
        embeddings_before = check_unit_vectors(before.embeddings()[pairs.before], before.path, before.path)
        embeddings_after = check_unit_vectors(after.embeddings()[pairs.after], after.path, after.path)
        cosine = np.einsum("ij,ij->i", embeddings_before.astype(np.float32), embeddings_after.astype(np.float32))
        distance = np.clip(1.0 - cosine, 0.0, 2.0)
        return _rank(before, after, pairs, distance, None, None, ANY_CHANGE, params, allowed), pairs
    model = after.load_model(before.load_model(model, threads=threads))
    warn_long_queries(model, queries)
    warn_unknown_queries(model, queries)
    vectors = query_vectors(model, queries, params.lang)
    scores_before = score_tiles(before, vectors)[:, pairs.before]
    scores_after = score_tiles(after, vectors)[:, pairs.after]
    sign = 1.0 if direction == "appeared" else -1.0
    hits: list[ChangeHit] = []
    for query, old, new in zip(queries, scores_before, scores_after):
        hits += _rank(before, after, pairs, sign * (new - old), old, new, query, params, allowed)
    return hits, pairs


def _aoi_mask(after: TileIndex, pairs: TilePairs, aoi) -> np.ndarray | None:
    """Pairs whose after footprint meets the AOI (None without one); warns when it covers none."""
    geometry = parse_aoi(aoi)
    if geometry is None:
        return None
    shapes = after.geometries(pairs.after)
    mask = shapely.intersects(shapes, geometry)
    if not mask.any():
        warn_aoi_misses(aoi, geometry, shapely.total_bounds(after.geometries()), after.path)
    return mask


def _rank(before: TileIndex, after: TileIndex, pairs: TilePairs, rise: np.ndarray, old: np.ndarray | None,
          new: np.ndarray | None, query: str, params: SearchParams, allowed: np.ndarray | None) -> list[ChangeHit]:
    """Top-k pairs by `rise` for one query: threshold, AOI mask, greedy NMS within each after scene."""
    candidates = np.ones(len(pairs), dtype=bool) if allowed is None else allowed.copy()
    if params.threshold is not None:
        candidates &= rise >= params.threshold
    order = np.flatnonzero(candidates)
    order = order[np.argsort(-rise[order], kind="stable")]
    windows = after.windows(pairs.after[order])
    kept = order[nms_select(windows, after.column("scene_fingerprint")[pairs.after[order]], params.top_k,
                            params.nms_overlap)]
    rows_before, rows_after = pairs.before[kept], pairs.after[kept]
    column_before = {name: before.column(name)[rows_before] for name in ("scene", "tile_id")}
    column_after = {name: after.column(name)[rows_after] for name in ("scene", "tile_id", "scale", *WINDOW_COLUMNS)}
    shapes = after.geometries(rows_after)
    return [
        ChangeHit(rank=n + 1, rise=float(rise[k]), score_before=None if old is None else float(old[k]),
                  score_after=None if new is None else float(new[k]), query=query,
                  scene_before=str(column_before["scene"][n]), tile_before=str(column_before["tile_id"][n]),
                  scene=str(column_after["scene"][n]), tile_id=str(column_after["tile_id"][n]),
                  scale=int(column_after["scale"][n]), win_col=int(column_after["win_col"][n]),
                  win_row=int(column_after["win_row"][n]), win_width=int(column_after["win_width"][n]),
                  win_height=int(column_after["win_height"][n]), iou=float(pairs.iou[k]), geometry=shapes[n])
        for n, k in enumerate(kept)
    ]
