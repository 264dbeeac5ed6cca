"""Model bundles: find them, load and validate bundle.json, compute their fingerprint.

A bundle is a directory with image.onnx, text.onnx, tokenizer.json and bundle.json (see
docs/design.md). Bundles are looked up by path, or by name in the models directories:
``$RSMCLIP_GEO_MODELS`` (os.pathsep-separated), ``~/.local/share/rsmclip-geo/models`` and the
package's own ``rsmclip_geo/models`` folder, in that order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from rsmclip_geo.errors import BundleError
from rsmclip_geo.files import sha256_file

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
DEFAULT_MODEL = "rsmclip-e5-lite0"
BUNDLE_JSON = "bundle.json"
IMAGE_ONNX = "image.onnx"
TEXT_ONNX = "text.onnx"
TOKENIZER_JSON = "tokenizer.json"
REQUIRED_FILES = (IMAGE_ONNX, TEXT_ONNX, TOKENIZER_JSON)
TORCH_WEIGHTS = "weights.safetensors"
TORCH_CONFIG = "open_clip_config.json"
MODELS_ENV = "RSMCLIP_GEO_MODELS"
USER_MODELS_DIR = Path("~/.local/share/rsmclip-geo/models")
PACKAGE_MODELS_DIR = Path(__file__).resolve().parent / "models"
PRECISIONS = ("fp32", "fp16", "int8")
RESIZE_POLICIES = ("shortest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")

# bundle.json field -> accepted Python types (bool is excluded from numbers below)
_REQUIRED_FIELDS: dict[str, tuple[type, ...]] = {
    "format_version": (int,),
    "name": (str,),
    "version": (str,),
    "source": (dict,),
    "architecture": (str,),
    "embed_dim": (int,),
    "image_size": (int,),
    "mean": (list,),
    "std": (list,),
    "resize": (str,),
    "interpolation": (str,),
    "context_length": (int,),
    "pad_id": (int,),
    "languages": (list,),
    "logit_scale": (int, float),
    "precision": (str,),
    "parity": (dict,),
    "files": (dict,),
}
# the fields that define what a bundle computes (part of its fingerprint)
_MODEL_FIELDS = ("embed_dim", "image_size", "mean", "std", "resize", "interpolation", "context_length",
                 "pad_id", "precision")


def parse_input_gsd_m(value: Any, what: str, error: type[Exception] = BundleError) -> tuple[float, float]:
    """A ground resolution range ``[min, max]`` in metres per pixel: two finite numbers, 0 < min <= max;
    ``error`` naming ``what`` otherwise."""
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise error(f"{what} {value!r}: give [min, max] in metres per pixel")
    low, high = (float(v) for v in value)
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        raise error(f"{what} {low:g},{high:g}: give finite metres per pixel, 0 < min <= max")
    return low, high


@dataclass(frozen=True)
class BundleInfo:
    """The validated contents of bundle.json."""

    format_version: int
    name: str
    version: str
    source: dict[str, Any]
    architecture: str
    embed_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str
    interpolation: str
    context_length: int
    pad_id: int
    languages: tuple[str, ...]
    logit_scale: float
    precision: str
    parity: dict[str, Any]
    files: dict[str, str]
    default_tile_size: int = 224
    vocabulary: str | None = None
    input_gsd_m: tuple[float, float] | None = None  # ground metres per input pixel it was trained at (min, max)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Any, where: str = BUNDLE_JSON) -> BundleInfo:
        """Validate a parsed bundle.json; raise BundleError naming the first bad field."""
        if not isinstance(data, dict):
            raise BundleError(f"{where}: expected a JSON object; re-export the bundle")
        missing = [key for key in _REQUIRED_FIELDS if key not in data]
        if missing:
            raise BundleError(f"{where}: missing field(s) {', '.join(missing)}; re-export the bundle with "
                              "python -m training.export")
        for key, types in _REQUIRED_FIELDS.items():
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, types):
                raise BundleError(f"{where}: field {key!r} has the wrong type ({type(value).__name__}); "
                                  "re-export the bundle")
        if data["format_version"] > FORMAT_VERSION:
            raise BundleError(f"{where}: format_version {data['format_version']} is newer than this rsmclip-geo "
                              f"supports ({FORMAT_VERSION}); upgrade rsmclip-geo")
        for key in ("mean", "std"):
            if len(data[key]) != 3 or not all(isinstance(v, (int, float)) for v in data[key]):
                raise BundleError(f"{where}: {key} must be three numbers")
        if any(v <= 0 for v in data["std"]):
            raise BundleError(f"{where}: std values must be positive")
        checks = (
            (data["embed_dim"] > 0, "embed_dim must be positive"),
            (data["image_size"] > 0, "image_size must be positive"),
            (data["context_length"] > 1, "context_length must be at least 2"),
            (data["resize"] in RESIZE_POLICIES, f"resize must be one of {', '.join(RESIZE_POLICIES)}"),
            (data["interpolation"] in INTERPOLATIONS, f"interpolation must be one of {', '.join(INTERPOLATIONS)}"),
            (data["precision"] in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (data["logit_scale"] > 0, "logit_scale must be positive"),
        )
        for ok, message in checks:
            if not ok:
                raise BundleError(f"{where}: {message}")
        tile = data.get("default_tile_size", 224)
        if isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0:
            raise BundleError(f"{where}: default_tile_size must be a positive integer")
        input_gsd_m = data.get("input_gsd_m")
        if input_gsd_m is not None:
            input_gsd_m = parse_input_gsd_m(input_gsd_m, f"{where}: input_gsd_m", BundleError)
        return cls(
            format_version=data["format_version"], name=data["name"], version=data["version"],
            source=dict(data["source"]), architecture=data["architecture"], embed_dim=data["embed_dim"],
            image_size=data["image_size"], mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]), resize=data["resize"], interpolation=data["interpolation"],
            context_length=data["context_length"], pad_id=data["pad_id"],
            languages=tuple(str(v) for v in data["languages"]), logit_scale=float(data["logit_scale"]),
            precision=data["precision"], parity=dict(data["parity"]), files=dict(data["files"]),
            default_tile_size=tile, vocabulary=data.get("vocabulary"), input_gsd_m=input_gsd_m, raw=data,
        )

    def model_fields(self) -> dict[str, Any]:
        """The fields that change what the bundle computes (they enter the fingerprint)."""
        return {key: self.raw.get(key, getattr(self, key)) for key in _MODEL_FIELDS}


@dataclass(frozen=True)
class Bundle:
    """A validated bundle directory."""

    path: Path
    info: BundleInfo
    fingerprint: str

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def has_torch_weights(self) -> bool:
        return (self.path / TORCH_WEIGHTS).is_file() and (self.path / TORCH_CONFIG).is_file()

    def verify(self) -> None:
        """Re-hash every file listed in bundle.json, then run each ONNX tower once on a blank input;
        BundleError naming the first file that is missing, altered, unloadable or of the wrong size."""
        for name, digest in self.info.files.items():
            path = self.path / name
            if not path.is_file():
                raise BundleError(f"{path}: listed in bundle.json but missing; re-export or re-install the bundle")
            if sha256_file(path) != digest:
                raise BundleError(f"{path}: sha256 differs from bundle.json; the file is corrupt or "
                                  "was replaced, re-export or re-install the bundle")
        self._run_towers()

    def _run_towers(self) -> None:
        """Encode a blank image and a short text on the CPU (checks loading and embed_dim)."""
        import numpy as np

        from rsmclip_geo.encoders import load_model  # encoders builds on this module

        model = load_model(self, providers=["cpu"], threads=1)
        size = self.info.image_size
        try:
            model.encode_pixels(np.zeros((1, 3, size, size), np.float32))
            model.encode_texts(["a"])
        except BundleError:
            raise
        except Exception as exc:  # onnxruntime raises its own types when bundle.json and a graph disagree
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BundleError(f"{self.path}: the towers fail on a blank input ({reason[:200]}); bundle.json does "
                              "not match the ONNX graphs, re-export the bundle") from exc

    @property
    def text_fingerprint(self) -> str:
        """sha256 over what turns a text into its vector: text.onnx, tokenizer.json and the vocabulary (its prompt
        templates) digests and the model fields; the key of cached query vectors."""
        names = (TEXT_ONNX, TOKENIZER_JSON, self.info.vocabulary or "")
        payload = {"files": {name: self.info.files.get(name, "") for name in names if name},
                   "model": self.info.model_fields()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()

    def prompt_templates_by_language(self) -> dict[str, tuple[str, ...]]:
        """Caption templates per language from the bundle's vocabulary (empty without)."""
        return prompt_templates(str(self.path), self.info.vocabulary)

    def prompt_templates(self, lang: str) -> tuple[str, ...] | None:
        """The bundle's caption templates of `lang`; None when the bundle has templates but none for `lang`,
        () when it has none at all (queries are then encoded as typed)."""
        templates = self.prompt_templates_by_language()
        if not templates:
            return ()
        return templates.get(lang)

    def outside_vocabulary(self, texts: Sequence[str]) -> list[str]:
        """The texts sharing no term with the vocabulary the model was trained on (none without a vocabulary)."""
        terms = vocabulary_terms(str(self.path), self.info.vocabulary)
        if not terms:
            return []
        unknown = []
        for text in texts:
            lowered = text.lower()
            if not any(term in lowered or lowered in term for term in terms):
                unknown.append(text)
        return unknown


@lru_cache(maxsize=8)
def vocabulary_terms(bundle_path: str, vocabulary: str | None) -> frozenset[str]:
    """Lower-cased terms of a bundle's vocabulary.json (all languages); empty when it has none."""
    if not vocabulary:
        return frozenset()
    try:
        data = json.loads((Path(bundle_path) / vocabulary).read_text(encoding="utf-8"))
        return frozenset(term.lower() for terms in data["terms"].values() for term in terms)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("%s: vocabulary %s is unreadable; no out-of-vocabulary warnings", bundle_path, vocabulary)
        return frozenset()


@lru_cache(maxsize=8)
def prompt_templates(bundle_path: str, vocabulary: str | None) -> dict[str, tuple[str, ...]]:
    """Caption templates ("{}" = the query) per language from a bundle's vocabulary.json; empty when it has none."""
    if not vocabulary:
        return {}
    try:
        data = json.loads((Path(bundle_path) / vocabulary).read_text(encoding="utf-8"))
        return {lang: tuple(str(t) for t in items if "{}" in str(t))
                for lang, items in (data.get("templates") or {}).items()}
    except (OSError, ValueError, TypeError, AttributeError):
        log.warning("%s: vocabulary %s is unreadable; queries are encoded without prompt templates", bundle_path,
                    vocabulary)
        return {}


def bundle_fingerprint(info: BundleInfo) -> str:
    """sha256 over the image.onnx and text.onnx digests and bundle.json's model fields."""
    payload = {
        IMAGE_ONNX: info.files.get(IMAGE_ONNX, ""),
        TEXT_ONNX: info.files.get(TEXT_ONNX, ""),
        "model": info.model_fields(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def models_dirs() -> list[Path]:
    """Directories searched for bundles by name, in priority order."""
    dirs = [Path(p).expanduser() for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p]
    dirs.append(USER_MODELS_DIR.expanduser())
    dirs.append(PACKAGE_MODELS_DIR)
    return dirs


def find_bundles(dirs: list[Path] | None = None) -> list[Path]:
    """Bundle directories (those holding a bundle.json) directly under the models directories."""
    found: list[Path] = []
    seen: set[Path] = set()
    for directory in dirs if dirs is not None else models_dirs():
        if not directory.is_dir():
            continue
        for child in sorted(directory.iterdir()):
            resolved = child.resolve()
            if (child / BUNDLE_JSON).is_file() and resolved not in seen:
                seen.add(resolved)
                found.append(child)
    return found


def resolve_bundle_path(model: str | os.PathLike | None) -> Path:
    """A bundle directory from a path, a bundle name, or None for DEFAULT_MODEL."""
    name = DEFAULT_MODEL if model is None else str(model)
    candidate = Path(name).expanduser()
    if model is not None and (candidate.exists() or os.sep in name or (os.altsep and os.altsep in name)):
        if not candidate.is_dir():
            raise BundleError(f"model={candidate}: not a bundle directory (expected a folder with bundle.json)",
                              param="model", value=candidate)
        return candidate
    for directory in models_dirs():
        if (directory / name / BUNDLE_JSON).is_file():
            return directory / name
    searched = ", ".join(str(d) for d in models_dirs())
    if model is None:
        raise BundleError(f"model: the default model {DEFAULT_MODEL!r} is not installed (searched {searched}); "
                          "give a bundle directory", param="model")
    raise BundleError(f"model={name}: no such bundle directory or bundle name (searched {searched}); "
                      f"give a bundle path or add its folder to ${MODELS_ENV}", param="model", value=name)


def read_bundle_info(path: Path) -> BundleInfo:
    """Parse and validate ``path/bundle.json``."""
    meta = path / BUNDLE_JSON
    if not meta.is_file():
        raise BundleError(f"{meta}: missing; a bundle directory needs bundle.json (export with python -m training.export)")
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{meta}: not valid JSON ({str(exc).splitlines()[0]}); re-export the bundle") from exc
    return BundleInfo.from_dict(data, where=str(meta))


def load_bundle(model: str | os.PathLike | None = None) -> Bundle:
    """Find, read and validate a bundle (path, name, or None for DEFAULT_MODEL); files are checked to exist."""
    path = resolve_bundle_path(model)
    info = read_bundle_info(path)
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise BundleError(f"{path / name}: missing from the bundle; re-export or re-install it")
    return Bundle(path=path, info=info, fingerprint=bundle_fingerprint(info))
