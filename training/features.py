"""What locked towers produce, computed once: the inputs of the trainable parts of a model.

A model trained with locked parts (``training.locked``) never back-propagates through them, so their
outputs are computed here once and read back for every epoch:

* image: the EfficientNet trunk up to ``image_stage`` (stem + ``blocks[:image_stage]``), for the
  augmented views of every training image (``global_views`` crops at the model's input size and
  ``local_views`` smaller crops for self-distillation) and for the plain preprocessed validation images;
* text: the text tower's pooled output before its projection, for every caption.

Features are stored in float16, image features in shards of :data:`SHARD_ITEMS` images written
atomically, so an interrupted run resumes at the first missing shard; a store made with other
settings is refused instead of being mixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rsmclip_geo.errors import RsmclipError
from training import data as D

log = logging.getLogger("training.features")

SHARD_ITEMS = 512
BATCH = 64


def trunk_prefix(trunk: nn.Module, stage: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The locked front of a timm EfficientNet trunk: stem and the first ``stage`` block stages."""
    blocks = trunk.blocks
    if not 0 <= stage <= len(blocks):
        raise RsmclipError(f"image_stage={stage}: the trunk has {len(blocks)} block stages; use 0..{len(blocks)}")

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        x = trunk.bn1(trunk.conv_stem(pixels))
        for block in blocks[:stage]:
            x = block(x)
        return x

    return forward


class TrunkSuffix(nn.Module):
    """The back of the trunk after ``stage`` (``blocks[stage:]``, head conv, pooling) and the image projection.

    With ``pooled`` the back of the trunk is locked as well: :meth:`pool` turns stored features into the
    trunk's pooled output once, and :meth:`forward` takes those and applies only the projection.
    """

    def __init__(self, visual: nn.Module, stage: int, *, pooled: bool = False) -> None:
        super().__init__()
        trunk = visual.trunk
        self.blocks = nn.Sequential(*list(trunk.blocks)[stage:])
        self.conv_head, self.bn2, self.global_pool = trunk.conv_head, trunk.bn2, trunk.global_pool
        self.head = visual.head
        self.pooled = pooled

    def back(self, features: torch.Tensor) -> torch.Tensor:
        return self.global_pool(self.bn2(self.conv_head(self.blocks(features))))

    @torch.inference_mode()
    def pool(self, features: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Pooled trunk output [N, ..., width] of stored features [N, ..., C, H, W] (float16 kept)."""
        flat = features.flatten(0, features.dim() - 4)
        out = torch.cat([self.back(flat[i:i + batch].float()) for i in range(0, len(flat), batch)])
        return out.half().unflatten(0, features.shape[:-3])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features if self.pooled else self.back(features))


def store_key(settings: dict[str, Any]) -> str:
    """Short hash of everything that decides a store's content."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def open_store(directory: Path, settings: dict[str, Any]) -> Path:
    """Create ``directory`` for ``settings`` or check that an existing store was made with the same ones."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = directory / "store.json"
    if meta.exists():
        stored = json.loads(meta.read_text(encoding="utf-8"))
        if stored != settings:
            raise RsmclipError(f"feature store {directory} was made with other settings; "
                               "remove it or choose another features directory")
    else:
        tmp = meta.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(settings, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, meta)
    return directory


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


@torch.inference_mode()
def image_view_features(
    prefix: Callable[[torch.Tensor], torch.Tensor],
    paths: Sequence[Path],
    augment: D.MultiCropAugment,
    directory: Path,
    *,
    seed: int,
) -> dict[str, np.ndarray]:
    """Locked-trunk features of each image's augmented views: ``global`` [N,G,C,H,W], ``local`` [N,L,C,h,w].

    View ``v`` of image ``i`` comes from ``random.Random(seed * 10**7 + i)``, so a resumed run makes
    the same views.
    """
    n_shards = (len(paths) + SHARD_ITEMS - 1) // SHARD_ITEMS
    for shard in range(n_shards):
        path = directory / f"views-{shard:05d}.npz"
        if path.exists():
            continue
        start = shard * SHARD_ITEMS
        globals_, locals_ = [], []
        for batch_start in range(start, min(start + SHARD_ITEMS, len(paths)), BATCH):
            views = [augment(D.load_rgb(paths[i]), random.Random(seed * 10**7 + i))
                     for i in range(batch_start, min(batch_start + BATCH, len(paths), start + SHARD_ITEMS))]
            g = torch.stack([v[0] for v in views])
            globals_.append(prefix(g.flatten(0, 1)).unflatten(0, g.shape[:2]).half().numpy())
            if views[0][1].shape[0]:
                lo = torch.stack([v[1] for v in views])
                locals_.append(prefix(lo.flatten(0, 1)).unflatten(0, lo.shape[:2]).half().numpy())
        arrays = {"global": np.concatenate(globals_)}
        if locals_:
            arrays["local"] = np.concatenate(locals_)
        _save_npz(path, **arrays)
        log.info("image views: shard %d/%d (%d images)", shard + 1, n_shards, min(len(paths), start + SHARD_ITEMS))
    return _concatenate(directory, "views", n_shards)


@torch.inference_mode()
def image_plain_features(
    prefix: Callable[[torch.Tensor], torch.Tensor],
    paths: Sequence[Path],
    preprocess: Callable[[Any], torch.Tensor],
    directory: Path,
) -> np.ndarray:
    """Locked-trunk features of the images preprocessed as at run time (no augmentation), [N,C,H,W]."""
    n_shards = (len(paths) + SHARD_ITEMS - 1) // SHARD_ITEMS
    for shard in range(n_shards):
        path = directory / f"plain-{shard:05d}.npz"
        if path.exists():
            continue
        chunk = paths[shard * SHARD_ITEMS:(shard + 1) * SHARD_ITEMS]
        out = [prefix(torch.stack([preprocess(D.load_rgb(p)) for p in chunk[i:i + BATCH]])).half().numpy()
               for i in range(0, len(chunk), BATCH)]
        _save_npz(path, plain=np.concatenate(out))
        log.info("plain images: shard %d/%d", shard + 1, n_shards)
    return _concatenate(directory, "plain", n_shards)["plain"]


def _concatenate(directory: Path, stem: str, n_shards: int) -> dict[str, np.ndarray]:
    parts = [np.load(directory / f"{stem}-{shard:05d}.npz") for shard in range(n_shards)]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0].files}


@torch.inference_mode()
def pooled_text_features(text_tower: nn.Module, tokenizer: Callable, texts: Sequence[str], *,
                         cache: Path | None = None, batch_size: int = 128) -> np.ndarray:
    """The text tower's pooled output before its projection for each text, [N, width] (kept in ``cache``)."""
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    if cache is not None and cache.exists():
        cached = np.load(cache)
        if str(cached["key"]) == key:
            return cached["features"]
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size]))
        mask = (tokens != text_tower.config.pad_token_id).long()
        length = int(mask.sum(1).max())  # padding beyond the longest text changes nothing under mean pooling
        tokens, mask = tokens[:, :length], mask[:, :length]
        hidden = text_tower.transformer(input_ids=tokens, attention_mask=mask)
        out.append(text_tower.pooler(hidden, mask).float().numpy())
    features = np.concatenate(out).astype(np.float16)
    if cache is not None:
        _save_npz(cache, features=features, key=np.array(key))
    return features
