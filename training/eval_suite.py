"""The evaluation suite of a default-model candidate (training/configs/eval-suite.yaml): zero-shot top-1 per
data set and language, caption retrieval from caption CSVs and free-text P@10, all on the validation split,
with every image encoded once however many tasks use it.

    python -m training.evaluate --suite training/configs/eval-suite.yaml --model (CHECKPOINT.pt | BUNDLE_DIR) \\
        -o OUT.json
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rsmclip_geo.errors import RsmclipError
from training import data as D
from training.evaluate import Encoder, evaluate_caption_csv, evaluate_data, evaluate_free_text

SUITE_KEYS = {"languages", "data_root", "split", "prompts", "zero_shot", "captions", "free_text"}


class CachingEncoder:
    """An :class:`~training.evaluate.Encoder` that encodes each image file once and answers repeats from memory."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.images: dict[str, np.ndarray] = {}

    def encode_image_files(self, paths: Sequence[Path]) -> np.ndarray:
        keys = [os.path.abspath(p) for p in paths]
        new = list(dict.fromkeys(k for k in keys if k not in self.images))
        if new:
            self.images.update(zip(new, self.encoder.encode_image_files([Path(k) for k in new])))
        return np.stack([self.images[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode_texts(texts)


def load_suite(path: Path) -> dict[str, Any]:
    """Read a suite YAML (schema in training/configs/eval-suite.yaml) with its defaults filled in."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RsmclipError(f"--suite {path} cannot be read ({D.one_line(exc)}); pass a suite YAML") from exc
    if not isinstance(raw, dict) or not raw.keys() & {"zero_shot", "captions", "free_text"}:
        raise RsmclipError(f"--suite {path} names no zero_shot, captions or free_text task; "
                           "see training/configs/eval-suite.yaml")
    unknown = sorted(set(raw) - SUITE_KEYS)
    if unknown:
        raise RsmclipError(f"--suite {path} has unknown key {unknown[0]!r}; use {', '.join(sorted(SUITE_KEYS))}")
    for key in ("zero_shot", "captions"):
        if not isinstance(raw.get(key) or {}, dict):
            raise RsmclipError(f"--suite {path}: {key} must map data set folders to files (a zero-shot data set "
                               "without a vocabulary: null, its English class names)")
    return {"languages": list(raw.get("languages") or D.LANGUAGES), "data_root": raw.get("data_root", "../shared/data"),
            "split": raw.get("split", "val"), "prompts": raw.get("prompts", "heldout"),
            "zero_shot": raw.get("zero_shot") or {}, "captions": raw.get("captions") or {},
            "free_text": raw.get("free_text")}


def run_suite(encoder: Encoder, suite: dict[str, Any], data_root: Path,
              languages: Sequence[str] | None = None) -> dict[str, Any]:
    """Every task of ``suite`` (from :func:`load_suite`) on the data sets under ``data_root``."""
    cached = CachingEncoder(encoder)
    languages = list(languages or suite["languages"])
    split = suite["split"]
    zero_shot = {}
    for name, vocabulary in suite["zero_shot"].items():
        result = evaluate_data(cached, data_root / name, languages, split=split, prompt_part=suite["prompts"],
                               vocabulary=D.resolve_path(vocabulary) if vocabulary else None)
        result.pop("confusion")
        zero_shot[name] = result
    captions = {name: evaluate_caption_csv(cached, data_root / name / csv_name, data_root / name, split=split)
                for name, csv_name in suite["captions"].items()}
    free_text = (evaluate_free_text(cached, D.resolve_path(suite["free_text"]), data_root, languages, split=split)
                 if suite["free_text"] else None)
    summary = {
        "zero_shot_mean_top1": {name: r["mean_top1"] for name, r in zero_shot.items()},
        "caption_mean_recall": {name: r["mean_recall"] for name, r in captions.items()},
        "free_text_P@10": {lang: v["P@10"] for lang, v in free_text["per_language"].items()} if free_text else {},
    }
    return {"task": "suite", "data_root": str(data_root), "split": split, "languages": languages,
            "n_images_encoded": len(cached.images), "summary": summary, "zero_shot": zero_shot,
            "caption_retrieval": captions, "free_text": free_text}


def summary_table(result: dict[str, Any]) -> str:
    """The suite's headline figures as a short plain-text table."""
    lines = [f"zero-shot top-1 %, mean over {len(result['languages'])} languages ({result['split']} split)"]
    for name, r in result["zero_shot"].items():
        scored = [v for v in r["per_language"].values() if "top1" in v]
        mean = "-" if r["mean_top1"] is None else f"{r['mean_top1']:6.2f}"
        lines.append(f"  {name:<10} {mean}  ({scored[0]['n_images'] if scored else 0} images, {len(scored)} languages)")
    for name, r in result["caption_retrieval"].items():
        lines.append(f"{name} caption retrieval ({r['n_images']} images, {r['n_captions']} captions): "
                     f"mean recall {r['mean_recall']:.2f}, t2i R@1/5/10 {r['t2i_R@1']:.1f}/{r['t2i_R@5']:.1f}/"
                     f"{r['t2i_R@10']:.1f}, i2t R@1/5/10 {r['i2t_R@1']:.1f}/{r['i2t_R@5']:.1f}/{r['i2t_R@10']:.1f}")
    free_text = result["free_text"]
    if free_text:
        n_desc = len(free_text["per_description"])
        lines.append(f"free-text P@10 ({n_desc} descriptions, pool of {sum(free_text['pool'].values())} images)")
        lines.append("  " + "  ".join(f"{lang} {v['P@10']:.3f}" for lang, v in free_text["per_language"].items()))
    return "\n".join(lines)
