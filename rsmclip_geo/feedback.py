"""Relevance feedback: tiles an analyst marked right (+) or wrong (−) turn a query into a better one.

`Labels` holds the judgements (tile id, scene, footprint), is saved as a GeoJSON layer that QGIS and
GeoPandas open, and finds its tiles again in a re-built index by footprint. `refine` moves the query
towards the tiles marked right and away from those marked wrong: Rocchio (α·q + β·mean(+) − γ·mean(−))
or a linear classifier over the tile embeddings, kept close to the query; both give a unit vector,
so scores stay cosines. A search with labels leaves the judged tiles out of the ranking.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from shapely.errors import ShapelyError

from rsmclip_geo.errors import QueryError
from rsmclip_geo.files import write_text_atomic

log = logging.getLogger(__name__)

#: Format marker of a labels file (a GeoJSON FeatureCollection with this member).
LABELS_FORMAT = "rsmclip_geo_labels"
LABELS_VERSION = 1
#: File name extensions of a labels file.
LABELS_FORMATS = (".geojson", ".json")
POSITIVE, NEGATIVE = "positive", "negative"
#: Methods of `refine`, and the one searches use unless told (benchmarks/relevance_feedback.py).
FEEDBACK_METHODS = ("linear", "rocchio")
DEFAULT_FEEDBACK_METHOD = "linear"
#: Rocchio weights of the query, the mean of the tiles marked right, and of those marked wrong.
ROCCHIO_WEIGHTS = (1.0, 1.0, 0.5)
#: A re-built index's tile stands for a judged tile when their footprints overlap this much (IoU).
FOOTPRINT_MATCH_IOU = 0.5


@dataclass(frozen=True)
class Judgement:
    """One tile marked right or wrong: what identifies it in this index and in a re-built one."""

    tile_id: str
    label: str  # POSITIVE | NEGATIVE
    scene: str
    scene_fingerprint: str
    footprint: shapely.Polygon  # EPSG:4326, lon/lat


@dataclass
class Labels:
    """Judged tiles by tile id, in the order they were judged; the last judgement of a tile counts."""

    judgements: dict[str, Judgement] = field(default_factory=dict)

    def mark(self, index, tile_id: str, positive: bool) -> Judgement:
        """Mark a tile of `index` (a TileIndex) right or wrong (TileIndexError for an unknown id)."""
        row = index.row_of(tile_id)
        judgement = Judgement(
            tile_id=tile_id, label=POSITIVE if positive else NEGATIVE,
            scene=index.table.column("scene")[row].as_py(),
            scene_fingerprint=index.table.column("scene_fingerprint")[row].as_py(),
            footprint=index.geometries([row])[0])
        self.judgements.pop(tile_id, None)
        self.judgements[tile_id] = judgement
        return judgement

    def undo(self, tile_id: str | None = None) -> Judgement | None:
        """Take back the judgement of `tile_id`, or the last one; the judgement, or None when there was none."""
        if tile_id is None:
            return self.judgements.pop(next(reversed(self.judgements))) if self.judgements else None
        return self.judgements.pop(tile_id, None)

    def __len__(self) -> int:
        return len(self.judgements)

    def ids(self, label: str) -> list[str]:
        return [j.tile_id for j in self.judgements.values() if j.label == label]

    def rows(self, index) -> tuple[np.ndarray, np.ndarray]:
        """Rows of `index` (a TileIndex) judged right and wrong: by tile id, else, for an index built with
        other tiles, the tile of the same scene whose footprint overlaps the judged one most (IoU ≥ 0.5)."""
        ids = index.column("tile_id")
        row_of = {tile_id: row for row, tile_id in enumerate(ids)}
        fingerprints = index.column("scene_fingerprint")
        found: dict[str, list[int]] = {POSITIVE: [], NEGATIVE: []}
        lost = 0
        for judgement in self.judgements.values():
            row = row_of.get(judgement.tile_id)
            if row is None:
                row = _row_by_footprint(index, fingerprints, judgement)
            if row is None:
                lost += 1
                continue
            found[judgement.label].append(row)
        if lost:
            log.warning("%d judged tile(s) are not in %s (other scenes or footprints); left out", lost, index.path)
        return (np.array(found[POSITIVE], dtype=np.int64), np.array(found[NEGATIVE], dtype=np.int64))

    def to_geojson(self) -> dict:
        """A GeoJSON FeatureCollection (EPSG:4326) of the judged tiles: a layer and the labels file."""
        return {
            "type": "FeatureCollection", LABELS_FORMAT: LABELS_VERSION,
            "features": [
                {"type": "Feature", "geometry": shapely.geometry.mapping(j.footprint),
                 "properties": {"tile_id": j.tile_id, "label": j.label, "scene": j.scene,
                                "scene_fingerprint": j.scene_fingerprint}}
                for j in self.judgements.values()
            ],
        }

    def write(self, path: str | os.PathLike) -> Path:
        """Save as a GeoJSON labels file (atomically)."""
        return write_text_atomic(path, json.dumps(self.to_geojson(), ensure_ascii=False), param="labels_file")

    @classmethod
    def read(cls, path: str | os.PathLike) -> Labels:
        """A labels file written by `write`; QueryError naming it when it is not one."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            if data.get(LABELS_FORMAT) != LABELS_VERSION:
                raise ValueError("not an rsmclip-geo labels file")
            labels = cls()
            for feature in data["features"]:
                p = feature["properties"]
                if p["label"] not in (POSITIVE, NEGATIVE):
                    raise ValueError(f"label {p['label']!r} is neither {POSITIVE} nor {NEGATIVE}")
                labels.judgements[p["tile_id"]] = Judgement(
                    tile_id=str(p["tile_id"]), label=p["label"], scene=str(p["scene"]),
                    scene_fingerprint=str(p["scene_fingerprint"]),
                    footprint=shapely.geometry.shape(feature["geometry"]))
        except FileNotFoundError:
            raise QueryError(f"labels_file={path}: no such file", param="labels_file", value=path) from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ShapelyError) as exc:
            raise QueryError(f"labels_file={path}: not a labels file ({exc}); give a file written by this tool",
                             param="labels_file", value=path) from None
        return labels

    def mark_ids(self, index, positive: Iterable[str] = (), negative: Iterable[str] = ()) -> Labels:
        """Mark tiles of `index` by id, right and wrong (later judgements of a tile replace earlier ones);
        QueryError for a tile in both lists, TileIndexError for an id the index lacks. Returns self."""
        positive, negative = list(dict.fromkeys(positive)), list(dict.fromkeys(negative))
        both = sorted(set(positive) & set(negative))
        if both:
            raise QueryError(f"negative={both[0]}: also marked positive; mark each tile once", param="negative",
                             value=both[0])
        for tile_id in positive:
            self.mark(index, tile_id, positive=True)
        for tile_id in negative:
            self.mark(index, tile_id, positive=False)
        return self

    @classmethod
    def from_ids(cls, index, positive: Iterable[str] = (), negative: Iterable[str] = ()) -> Labels:
        """New labels marking tiles of `index` by id (see mark_ids)."""
        return cls().mark_ids(index, positive, negative)


def _row_by_footprint(index, fingerprints: np.ndarray, judgement: Judgement) -> int | None:
    """The tile of the judged tile's scene whose footprint overlaps it most, if by IoU ≥ FOOTPRINT_MATCH_IOU."""
    rows = np.flatnonzero(fingerprints == judgement.scene_fingerprint)
    if not len(rows):
        return None
    tiles = index.geometries(rows)
    inter = shapely.area(shapely.intersection(tiles, judgement.footprint))
    iou = inter / np.maximum(shapely.area(shapely.union(tiles, judgement.footprint)), 1e-30)
    best = int(np.argmax(iou))
    return int(rows[best]) if iou[best] >= FOOTPRINT_MATCH_IOU else None


def refine(query: np.ndarray | None, positives: np.ndarray, negatives: np.ndarray,
           method: str = "rocchio") -> np.ndarray:
    """A unit query vector [D] from a query vector (None for none: search by the marked tiles only) and
    the embeddings of tiles marked right [P, D] and wrong [N, D]."""
    if method not in FEEDBACK_METHODS:
        raise QueryError(f"feedback_method={method}: choose one of {', '.join(FEEDBACK_METHODS)}",
                         param="feedback_method", value=method)
    if query is None and not len(positives):
        raise QueryError("positive: mark at least one tile right to search without a query", param="positive")
    dim = len(query) if query is not None else np.shape(positives)[-1]
    positives = np.asarray(positives, dtype=np.float32).reshape(-1, dim)
    negatives = np.asarray(negatives, dtype=np.float32).reshape(-1, dim)
    base = np.zeros(dim, np.float32) if query is None else np.asarray(query, dtype=np.float32)
    if method == "linear" and len(positives) and len(negatives):
        vector = _linear_direction(base, positives, negatives)
    else:
        alpha, beta, gamma = ROCCHIO_WEIGHTS
        vector = alpha * base
        if len(positives):
            vector = vector + beta * positives.mean(axis=0)
        if len(negatives):
            vector = vector - gamma * negatives.mean(axis=0)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        return base / max(float(np.linalg.norm(base)), 1e-12)
    return (vector / norm).astype(np.float32)


def _linear_direction(query: np.ndarray, positives: np.ndarray, negatives: np.ndarray,
                      prior: float = 1.0, steps: int = 200, rate: float = 0.5) -> np.ndarray:
    """The weights of a logistic regression separating the marked tiles (+1 / −1) on their cosines,
    pulled towards the query (L2 penalty prior·|w − q|²); its direction ranks tiles like the classifier."""
    x = np.concatenate([positives, negatives]).astype(np.float64)
    y = np.concatenate([np.ones(len(positives)), -np.ones(len(negatives))])
    q = query.astype(np.float64)
    w, bias = q.copy(), 0.0
    scale = 10.0  # cosines are small numbers: logits of scale × cosine
    for _ in range(steps):
        margin = y * (scale * (x @ w) + bias)
        grad_logit = -y / (1.0 + np.exp(margin))  # d/d(logit) of log(1 + exp(-margin))
        grad_w = scale * (x.T @ grad_logit) / len(y) + prior * (w - q)
        w -= rate * grad_w
        bias -= rate * float(grad_logit.mean())
    return w.astype(np.float32)
