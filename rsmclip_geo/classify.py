"""Zero-shot classification: softmax over logit_scale × cosine between image and label embeddings."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsmclip_geo.encoders import Model
from rsmclip_geo.errors import QueryError
from rsmclip_geo.queries import warn_unknown_queries
from rsmclip_geo.raster import read_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Classification:
    """The result for one image: top-1 label, its probability, and every label's probability."""

    image: str
    label: str
    score: float
    probabilities: dict[str, float]

    def to_json(self) -> str:
        return json.dumps({"image": self.image, "label": self.label, "score": self.score,
                           "probabilities": self.probabilities}, ensure_ascii=False)


def softmax_probabilities(image_embeddings: np.ndarray, text_embeddings: np.ndarray, logit_scale: float) -> np.ndarray:
    """softmax(logit_scale × cosine) over the labels, one row per image (float64 for stable sums)."""
    logits = logit_scale * (image_embeddings.astype(np.float64) @ text_embeddings.astype(np.float64).T)
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def read_labels(labels: Sequence[str] | None, labels_file: str | os.PathLike | None) -> list[str]:
    """Labels from `labels` and `labels_file` (one per line, blank lines and #-comments skipped)."""
    result = [label.strip() for label in labels or []]
    if labels_file is not None:
        path = Path(labels_file)
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: drops a byte order mark
        except (OSError, UnicodeDecodeError) as exc:
            raise QueryError(f"labels_file={path}: cannot be read ({type(exc).__name__}); give a UTF-8 text "
                             "file with one label per line", param="labels_file", value=path) from exc
        result += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if any(not label for label in result):
        raise QueryError("labels: empty label; give non-empty texts", param="labels")
    if len(result) < 2:
        raise QueryError("labels: give at least two labels (or a labels file) to classify against", param="labels")
    duplicates = sorted({label for label in result if result.count(label) > 1})
    if duplicates:
        raise QueryError(f"labels: duplicate label(s) {', '.join(duplicates)}; give each label once", param="labels")
    return result


def classify_images(model: Model, images: Sequence[str | os.PathLike], labels: Sequence[str],
                    batch_size: int | None = None) -> Iterator[Classification]:
    """Classify image files against labels, reading and encoding ``batch_size`` images at a time."""
    if not images:
        raise QueryError("IMAGE: give at least one image file")
    warn_unknown_queries(model, labels, what="label", outcome="probability")
    text_embeddings = model.encode_texts(list(labels))
    step = batch_size or model.batch_size
    for start in range(0, len(images), step):
        paths = images[start:start + step]
        probabilities = softmax_probabilities(model.encode_images([read_image(p) for p in paths]), text_embeddings,
                                              model.logit_scale)
        for path, row in zip(paths, probabilities):
            best = int(np.argmax(row))
            yield Classification(image=str(path), label=labels[best], score=float(row[best]),
                                 probabilities={label: float(p) for label, p in zip(labels, row)})
