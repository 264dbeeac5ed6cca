"""Create open_clip models from a name, an hf-hub id, a model-config JSON, a local HF text dir or a checkpoint.

Every model this project trains or exports goes through :func:`create_model`. Checkpoints are
self-contained: :func:`save_checkpoint` stores :func:`architecture_payload` (model config,
preprocess config, HF text config and tokenizer.json text) next to the state dict, so
``create_model(None, checkpoint=PATH)`` rebuilds the model offline from the file alone.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rsmclip_geo.errors import RsmclipError
from rsmclip_geo.files import publish, sha256_file, temp_file

log = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
ARCHITECTURE_KEY = "architecture"
ARCHITECTURE_FORMAT = "rsmclip-architecture/1"


@dataclass
class LoadedModel:
    """An open_clip model with everything needed to run, export or re-save it."""

    name: str
    model: torch.nn.Module
    preprocess: Callable  # open_clip's validation transform (PIL image -> float tensor [3,S,S])
    tokenizer: Callable  # list[str] -> int64 tensor [B, context_length]
    config: dict[str, Any]  # the full open_clip model config (embed_dim, vision_cfg, text_cfg, ...)
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)
    hf_text_config: dict[str, Any] | None = None  # HF config dict of an HF text tower
    tokenizer_json: str | None = None  # tokenizer.json text of an HF text tower
    tokenizer_special_tokens: dict[str, str] | None = None
    source: dict[str, Any] = field(default_factory=dict)  # model id, checkpoint path + sha256, pretrained

    @property
    def is_hf_text(self) -> bool:
        return bool(self.config.get("text_cfg", {}).get("hf_model_name"))

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", None) or self.config["text_cfg"].get("context_length", 77))


class _DropLibraryNotices(logging.Filter):
    """Drop below-error records that a library logs on the root logger from files under ``fragment``."""

    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or self.fragment not in record.pathname


@contextmanager
def quiet_library_warnings(fragment: str) -> Iterator[None]:
    """Silence a library's root-logger warnings, e.g. open_clip reporting our temporary build directory as
    having no weights (create_model logs its own, accurate warning)."""
    root = logging.getLogger()
    notice_filter = _DropLibraryNotices(fragment)
    root.addFilter(notice_filter)
    try:
        yield
    finally:
        root.removeFilter(notice_filter)


def architecture_payload(loaded: LoadedModel) -> dict[str, Any]:
    """Everything needed to rebuild ``loaded``'s architecture offline (stored inside each checkpoint)."""
    return {
        "format": ARCHITECTURE_FORMAT,
        "name": loaded.name,
        "model_cfg": copy.deepcopy(loaded.config),
        "preprocess_cfg": copy.deepcopy(loaded.preprocess_cfg),
        "hf_text_config": copy.deepcopy(loaded.hf_text_config),
        "tokenizer_json": loaded.tokenizer_json,
        "tokenizer_special_tokens": copy.deepcopy(loaded.tokenizer_special_tokens),
    }


def save_checkpoint(loaded: LoadedModel, path: str | Path, **extra: Any) -> Path:
    """Save ``{"state_dict", "architecture", **extra}`` atomically (temp file in the same dir, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"state_dict": loaded.model.state_dict(), ARCHITECTURE_KEY: architecture_payload(loaded), **extra}
    tmp = temp_file(path)
    try:
        torch.save(payload, tmp)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def create_model(
    model: str | os.PathLike | None,
    *,
    checkpoint: str | os.PathLike | None = None,
    hf_text_dir: str | os.PathLike | None = None,
    pretrained: str | None = None,
    device: str = "cpu",
    initialise: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
) -> LoadedModel:
    """Build an open_clip model in eval mode.

    ``model``: an open_clip model name (``ViT-B-32``, ``xlm-roberta-base-ViT-B-32``), ``hf-hub:ORG/REPO``
    (downloads config and weights), or a path to a model-config JSON (an open_clip model config, or an
    ``open_clip_config.json`` with ``model_cfg`` and optionally the architecture payload keys). It may be
    None when ``checkpoint`` carries its architecture. ``hf_text_dir``: local HF config + tokenizer that
    replace the HF text tower's hub names (offline, random init unless weights follow). ``pretrained``:
    an open_clip pretrained tag or weights file. ``checkpoint``: a state dict, an open_clip training
    checkpoint (``state_dict`` key, ``module.`` prefixes) or a checkpoint saved by :func:`save_checkpoint`.
    ``initialise``: without checkpoint or pretrained weights, called with the built model to load weights
    itself (e.g. ``training.pretrained`` towers); returns fields for ``LoadedModel.source``.
    """
    import open_clip

    checkpoint_path = Path(checkpoint) if checkpoint is not None else None
    payload = _read_checkpoint_architecture(checkpoint_path) if checkpoint_path else None
    if model is None and payload is None:
        raise RsmclipError(
            f"{checkpoint_path or 'model'}: no architecture stored in the checkpoint; pass the model name or config"
        )

    if payload is None and str(model).startswith(HF_HUB_PREFIX):
        loaded = _create_from_hub(str(model), device)
        if checkpoint_path is not None:
            _load_weights(loaded.model, checkpoint_path)
            loaded.source.update(checkpoint=str(checkpoint_path), checkpoint_sha256=sha256_file(checkpoint_path))
        return loaded

    if payload is not None:
        name = str(model) if model is not None and not _is_json_path(model) else payload.get("name", "checkpoint")
    else:
        name = str(model)
        payload = _architecture_from_model_arg(model)

    model_cfg = copy.deepcopy(payload["model_cfg"])
    preprocess_cfg = copy.deepcopy(payload.get("preprocess_cfg") or {})
    text_cfg = model_cfg.setdefault("text_cfg", {})
    hf_config, tokenizer_json, special_tokens = (
        payload.get("hf_text_config"), payload.get("tokenizer_json"), payload.get("tokenizer_special_tokens"))
    if hf_text_dir is not None:
        hf_config, tokenizer_json, special_tokens = read_hf_text_dir(hf_text_dir)
    if text_cfg.get("hf_model_name") and hf_config is None:
        return _create_with_hub_text(name, model_cfg, preprocess_cfg, pretrained, checkpoint_path, device, initialise)

    with tempfile.TemporaryDirectory(prefix="rsmclip-model-") as workdir:
        if hf_config is not None:
            if not text_cfg.get("hf_model_name"):
                raise RsmclipError(f"{name}: --hf-text-dir given but the model's text tower is not a Hugging Face model")
            _materialise_hf_text_dir(Path(workdir), hf_config, tokenizer_json, special_tokens,
                                     int(text_cfg.get("context_length", 77)))
            text_cfg["hf_model_name"] = workdir
            text_cfg["hf_tokenizer_name"] = workdir
            text_cfg["hf_model_pretrained"] = False
        (Path(workdir) / "open_clip_config.json").write_text(
            json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}), encoding="utf-8")
        with quiet_library_warnings("open_clip"):
            clip = open_clip.create_model(f"local-dir:{workdir}", pretrained_text=False, device=device)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{workdir}")
    weights = checkpoint_path or _resolve_pretrained(name, pretrained)
    initialised = _load_or_initialise(clip, name, weights, initialise)
    if hf_config is not None:  # keep the original names, not the deleted build directory
        for key in ("hf_model_name", "hf_tokenizer_name"):
            text_cfg[key] = payload["model_cfg"]["text_cfg"].get(key) or "local"
        text_cfg["hf_model_pretrained"] = False
    return _finish(name, clip, tokenizer, model_cfg, hf_config, tokenizer_json, special_tokens, weights,
                   checkpoint_path, pretrained, initialised=initialised)


def read_hf_text_dir(directory: str | os.PathLike) -> tuple[dict[str, Any], str, dict[str, str]]:
    """(HF config dict, tokenizer.json text, special tokens) of a local HF text-model directory."""
    from transformers import AutoConfig, AutoTokenizer

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise RsmclipError(f"{directory}: no config.json; pass a directory written by training.tokenizer.write_hf_text_dir "
                           "or a Hugging Face model snapshot")
    config = AutoConfig.from_pretrained(str(directory)).to_dict()
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise RsmclipError(f"{directory}: no fast tokenizer (tokenizer.json); convert the tokenizer to tokenizer.json")
    return config, backend.to_str(), _special_tokens(tokenizer)


def _special_tokens(tokenizer: Any) -> dict[str, str]:
    names = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token")
    return {name: str(getattr(tokenizer, name)) for name in names if getattr(tokenizer, name, None) is not None}


def _materialise_hf_text_dir(directory: Path, hf_config: dict[str, Any], tokenizer_json: str | None,
                             special_tokens: dict[str, str] | None, context_length: int) -> None:
    """Write an HF config + fast tokenizer into ``directory`` for open_clip's HF text tower to load."""
    from tokenizers import Tokenizer

    from training.tokenizer import save_tokenizer

    if tokenizer_json is None:
        raise RsmclipError("architecture has an HF text config but no tokenizer.json; re-save the checkpoint")
    (directory / "config.json").write_text(json.dumps(hf_config), encoding="utf-8")
    save_tokenizer(directory, Tokenizer.from_str(tokenizer_json), model_max_length=context_length,
                   special_tokens=special_tokens)


def _is_json_path(model: str | os.PathLike) -> bool:
    return str(model).endswith(".json") or Path(model).is_file()


def _architecture_from_model_arg(model: str | os.PathLike) -> dict[str, Any]:
    """The architecture payload for a model name or a model-config JSON path."""
    import open_clip

    if _is_json_path(model):
        path = Path(model)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RsmclipError(f"{path}: cannot read model config JSON ({exc})") from exc
        if "model_cfg" in data:
            return {**data, "model_cfg": data["model_cfg"], "preprocess_cfg": data.get("preprocess_cfg") or {}}
        if not all(key in data for key in ("embed_dim", "vision_cfg", "text_cfg")):
            raise RsmclipError(f"{path}: not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
        return {"model_cfg": data, "preprocess_cfg": {}}
    model_cfg = open_clip.get_model_config(str(model))
    if model_cfg is None:
        raise RsmclipError(f"model {model!r} is not an open_clip model name, hf-hub: id or model-config JSON path; "
                           f"see open_clip.list_models()")
    return {"model_cfg": model_cfg, "preprocess_cfg": {}}


def _read_checkpoint_architecture(path: Path) -> dict[str, Any] | None:
    """The architecture payload stored in a checkpoint, or None for plain state dicts."""
    if not path.is_file():
        raise RsmclipError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise RsmclipError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    payload = data.get(ARCHITECTURE_KEY) if isinstance(data, dict) else None
    return payload if isinstance(payload, dict) and "model_cfg" in payload else None


def _resolve_pretrained(name: str, pretrained: str | None) -> Path | None:
    """A weights file for an open_clip pretrained tag or path (tags download; needs network)."""
    import open_clip

    if pretrained is None:
        return None
    if os.path.isfile(pretrained):
        return Path(pretrained)
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        raise RsmclipError(f"--pretrained {pretrained!r}: not a file or a known tag of {name} "
                           f"({', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'})")
    try:
        return Path(open_clip.download_pretrained(cfg))
    except Exception as exc:
        raise RsmclipError(f"--pretrained {pretrained!r}: download failed ({type(exc).__name__}); "
                           "pass a local weights file with --checkpoint") from exc


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a state dict / open_clip checkpoint (``state_dict``, ``module.``) strictly into ``model``."""
    import open_clip

    try:
        open_clip.load_checkpoint(model, str(path), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise RsmclipError(f"{path}: weights do not fit the model ({first}); pass the model it was trained as") from exc
    except Exception as exc:
        raise RsmclipError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})".splitlines()[0]) from exc


def _create_from_hub(model_id: str, device: str) -> LoadedModel:
    """Load an ``hf-hub:`` model with its released weights (needs network or a warm HF cache)."""
    import open_clip

    try:
        clip = open_clip.create_model(model_id, device=device)
        tokenizer = open_clip.get_tokenizer(model_id)
        model_cfg = open_clip.get_model_config(model_id)
    except Exception as exc:
        raise RsmclipError(f"{model_id}: cannot load from the Hugging Face hub ({type(exc).__name__}); without "
                           "network pass a model config JSON, --hf-text-dir and --checkpoint") from exc
    hf_config = tokenizer_json = special = None
    if getattr(clip, "text", None) is not None and hasattr(clip.text, "config"):
        hf_config = clip.text.config.to_dict()
        tokenizer_json = tokenizer.tokenizer.backend_tokenizer.to_str()
        special = _special_tokens(tokenizer.tokenizer)
    return _finish(model_id, clip, tokenizer, model_cfg, hf_config, tokenizer_json, special, None, None, None,
                   hub=True)


def _create_with_hub_text(name: str, model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any],
                          pretrained: str | None, checkpoint_path: Path | None, device: str,
                          initialise: Callable[[torch.nn.Module], dict[str, Any]] | None) -> LoadedModel:
    """A model whose HF text tower is named by hub id (needs network or a warm HF cache)."""
    import open_clip
    import open_clip.tokenizer

    try:
        with tempfile.TemporaryDirectory(prefix="rsmclip-model-") as workdir:
            text_cfg = model_cfg["text_cfg"]
            text_cfg["hf_model_pretrained"] = False
            (Path(workdir) / "open_clip_config.json").write_text(
                json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}), encoding="utf-8")
            with quiet_library_warnings("open_clip"):
                clip = open_clip.create_model(f"local-dir:{workdir}", pretrained_text=False, device=device)
            tokenizer = open_clip.tokenizer.HFTokenizer(text_cfg.get("hf_tokenizer_name") or text_cfg["hf_model_name"],
                                              context_length=text_cfg.get("context_length", 77))
    except OSError as exc:
        raise RsmclipError(f"{name}: the HF text tower {model_cfg['text_cfg']['hf_model_name']!r} is not available "
                           "offline; pass --hf-text-dir DIR with its config.json and tokenizer") from exc
    weights = checkpoint_path or _resolve_pretrained(name, pretrained)
    initialised = _load_or_initialise(clip, name, weights, initialise)
    special = _special_tokens(tokenizer.tokenizer)
    return _finish(name, clip, tokenizer, model_cfg, clip.text.config.to_dict(),
                   tokenizer.tokenizer.backend_tokenizer.to_str(), special, weights, checkpoint_path, pretrained,
                   initialised=initialised)


def _load_or_initialise(clip: torch.nn.Module, name: str, weights: Path | None,
                        initialise: Callable[[torch.nn.Module], dict[str, Any]] | None) -> dict[str, Any]:
    """Load ``weights``; else let ``initialise`` load its own (its source fields); else warn: random weights."""
    if weights is not None:
        _load_weights(clip, weights)
        return {}
    if initialise is not None:
        return {**initialise(clip), "random_init": False}
    log.warning("%s: no checkpoint or pretrained weights given: the model has RANDOM weights", name)
    return {}


def _finish(name: str, clip: torch.nn.Module, tokenizer: Callable, model_cfg: dict[str, Any],
            hf_config: dict[str, Any] | None, tokenizer_json: str | None, special: dict[str, str] | None,
            weights: Path | None, checkpoint_path: Path | None, pretrained: str | None,
            hub: bool = False, initialised: dict[str, Any] | None = None) -> LoadedModel:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    clip.eval()
    preprocess_cfg = dict(clip.visual.preprocess_cfg)
    preprocess = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
    source: dict[str, Any] = {"model": name, "pretrained": pretrained, "random_init": weights is None and not hub}
    source.update(initialised or {})
    if checkpoint_path is not None:
        source.update(checkpoint=str(checkpoint_path), checkpoint_sha256=sha256_file(checkpoint_path))
    elif weights is not None:
        source.update(checkpoint=str(weights), checkpoint_sha256=sha256_file(weights))
    return LoadedModel(
        name=name, model=clip, preprocess=preprocess, tokenizer=tokenizer, config=model_cfg,
        preprocess_cfg=_jsonable(preprocess_cfg), hf_text_config=hf_config, tokenizer_json=tokenizer_json,
        tokenizer_special_tokens=special, source=source,
    )


def _jsonable(value: Any) -> Any:
    """Tuples to lists, recursively (configs go into JSON and checkpoints)."""
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value
