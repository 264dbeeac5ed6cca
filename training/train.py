"""Fine-tune an open_clip model with the RS-M-CLIP recipe: CLIP loss + lambda * self-distillation.

    python -m training.train --config training/configs/smoke.yaml -o runs/smoke
    torchrun --nproc_per_node 8 -m training.train --config training/configs/rs-m-clip.yaml -o runs/rsm
    python -m training.train --config ... -o runs/smoke --resume runs/smoke/checkpoints/step-000020.pt

Writes ``OUT/config.yaml`` (the resolved config), ``OUT/metrics.jsonl`` (one line per optimizer
step), ``OUT/checkpoints/step-NNNNNN.pt`` (full training state: model, DINO head, EMA teacher,
centre, optimizer, scheduler, grad scaler, RNG states, data position), ``OUT/model.pt`` (the final
model; ``training.model.create_model(None, checkpoint=...)`` rebuilds it) and ``OUT/eval.json``.

The student is the CLIP image tower plus a DINO head; the teacher is an EMA copy of both (no
gradients). Each sample gives 2 global crops (both aligned with the caption by the CLIP loss and
both used as teacher targets) and N local crops (student only).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from rsmclip_geo.errors import RsmclipError
from training import data as D
from training.losses import (
    DinoHead,
    SelfDistillationLoss,
    clip_contrastive_loss,
    cosine_schedule,
    ema_update_,
    teacher_temperature,
    warmup_cosine_factor,
)
from training.evaluate import write_atomic
from training.model import LoadedModel, create_model, save_checkpoint
from training.tokenizer import train_tokenizer, write_hf_text_dir

log = logging.getLogger("training.train")
MAX_LOGIT_SCALE = math.log(100.0)

DEFAULT_CONFIG: dict[str, Any] = {
    "seed": 0,
    "device": "auto",  # auto | cpu | cuda
    "model": {
        "name": None,  # open_clip name, hf-hub id or model-config JSON path
        "config": None,  # inline open_clip model config (instead of name)
        "pretrained": None,
        "checkpoint": None,
        "hf_text_dir": None,
        "build_text_tower": None,  # {vocab_size, kind, hidden_size, num_hidden_layers, ...}
    },
    "data": {
        "datasets": [],
        "languages": list(D.LANGUAGES),
        "batch_size": 32,
        "workers": 2,
        "cache_images": False,  # keep decoded images in memory (per data-loader worker): for small datasets
        "samples_per_epoch": None,
        "distinct_labels": False,  # class folders: batches hold each class at most once (no same-class negatives)
        "local_crops": 6,
        "local_crop_size": None,  # default: the model's image size
        "global_crop_scale": [0.4, 1.0],
        "local_crop_scale": [0.05, 0.4],
        "flips": True,
        "rot90": True,
        "color_jitter": [0.4, 0.4, 0.2, 0.05],
    },
    "optim": {
        "epochs": 1,
        "max_steps": None,
        "lr": 1e-5,
        "head_lr": None,
        "min_lr_factor": 0.0,
        "weight_decay": 0.2,
        "betas": [0.9, 0.98],
        "eps": 1e-6,
        "warmup_steps": 0,
        "grad_accum": 1,
        "grad_clip": 1.0,
        "precision": "auto",  # auto | fp32 | bf16 | fp16
        "text_warmup_steps": 0,  # class folders: text-tower warm-up on class captions before CLIP training
        "text_warmup_lr": 5e-4,
        "text_lock_steps": 0,  # after the warm-up: text tower frozen (lr 0) for this many steps, image tower learns
    },
    "loss": {
        "clip_views": 2,
        "distill_weight": 1.0,
        "out_dim": 65536,
        "hidden_dim": 2048,
        "bottleneck_dim": 256,
        "head_layers": 3,
        "student_temp": 0.1,
        "teacher_temp": 0.04,
        "warmup_teacher_temp": 0.04,
        "teacher_temp_warmup_steps": 0,
        "center_momentum": 0.9,
        "teacher_momentum": 0.996,
        "teacher_momentum_final": 1.0,
    },
    "checkpoint": {"every_steps": 500, "keep": 2},
    "eval": {"enabled": True, "prompt_part": "heldout", "max_images_per_class": None, "batch_size": 64},
}


# --------------------------------------------------------------------------- config


def merge_config(defaults: dict, overrides: dict, where: str = "", example: str = "training/configs/rs-m-clip.yaml") -> dict:
    """Deep-merge ``overrides`` into a copy of ``defaults``; unknown keys are an error naming ``example``."""
    merged = copy.deepcopy(defaults)
    for key, value in overrides.items():
        if key not in defaults:
            raise RsmclipError(f"config key {where}{key} is unknown; see {example} for the keys")
        if isinstance(defaults[key], dict) and isinstance(value, dict):
            merged[key] = merge_config(defaults[key], value, f"{where}{key}.", example)
        else:
            merged[key] = value
    return merged


def read_config(path: Path, defaults: dict, example: str) -> dict:
    """A training config YAML merged over ``defaults``; one-line errors for unreadable or non-mapping files."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RsmclipError(f"--config {path} cannot be read ({D.one_line(exc)})") from exc
    if not isinstance(raw, dict):
        raise RsmclipError(f"--config {path} must be a YAML mapping")
    config = merge_config(defaults, raw, example=example)
    if not config["data"]["datasets"]:
        raise RsmclipError(f"--config {path}: data.datasets is empty; list at least one dataset")
    return config


def load_config(path: Path) -> dict:
    config = read_config(path, DEFAULT_CONFIG, "training/configs/rs-m-clip.yaml")
    if bool(config["model"]["name"]) == bool(config["model"]["config"]):
        raise RsmclipError(f"--config {path}: give exactly one of model.name and model.config")
    return config


# --------------------------------------------------------------------------- data


def training_items(config: dict) -> tuple[list[list[D.CaptionedImage]], list[float]]:
    """Captioned training images per dataset and the datasets' sampling weights."""
    languages = config["data"]["languages"]
    groups, weights = [], []
    for i, spec in enumerate(config["data"]["datasets"]):
        kind = spec.get("type")
        if kind == "class_folder":
            root = D.resolve_path(spec["root"])
            pairs = D.split_class_folder(root)[spec.get("split", "train")]
            if spec.get("max_per_class"):
                pairs = D.first_per_class(pairs, int(spec["max_per_class"]))
            vocabulary = (D.load_vocabulary(D.resolve_path(spec["vocabulary"])) if spec.get("vocabulary")
                          else D.default_vocabulary(D.list_class_folders(root)))
            items = D.class_folder_items(pairs, vocabulary, languages, "train")
        elif kind == "captions":
            items = D.caption_items(
                D.resolve_path(spec["captions"]), D.resolve_path(spec["images"]),
                splits=spec.get("splits", ["train"]), languages=languages,
                translations=[D.resolve_path(p) for p in spec.get("translations", [])],
            )
        else:
            raise RsmclipError(f"data.datasets[{i}].type {kind!r} is unknown; use class_folder or captions")
        groups.append(items)
        weights.append(float(spec.get("weight", 1.0)))
    return groups, weights


# --------------------------------------------------------------------------- model


def view_major_batch(views: torch.Tensor) -> torch.Tensor:
    """[B,V,3,H,W] -> [V*B,3,H,W] (view-major) in channels-last layout, the fast one for conv towers."""
    return views.transpose(0, 1).flatten(0, 1).contiguous(memory_format=torch.channels_last)


class TowerWithHead(nn.Module):
    """An image tower and its DINO head; the student shares modules with the CLIP model."""

    def __init__(self, visual: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.head = head

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.visual(views)
        return embedding, self.head(embedding)


class RsmClipStudent(nn.Module):
    """CLIP model + DINO head in one module (one DDP wrapper, one optimizer)."""

    def __init__(self, clip: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.clip = clip
        self.head = head

    def image_tower(self) -> TowerWithHead:
        return TowerWithHead(self.clip.visual, self.head)

    def forward(self, global_views: torch.Tensor, local_views: torch.Tensor, text: torch.Tensor) -> dict:
        """global_views [B,2,3,G,G], local_views [B,N,3,L,L] -> embeddings and head outputs, view-major."""
        batch, n_global = global_views.shape[:2]
        embedding = self.clip.visual(view_major_batch(global_views))
        out = {
            "image": F.normalize(embedding, dim=-1).view(n_global, batch, -1),
            "text": self.clip.encode_text(text, normalize=True),
            "logit_scale": self.clip.logit_scale.exp(),
        }
        if self.head is not None:
            student = list(self.head(embedding).chunk(n_global))
            if local_views.shape[1]:
                local_emb = self.clip.visual(view_major_batch(local_views))
                student += list(self.head(local_emb).chunk(local_views.shape[1]))
            out["student"] = student
        return out


def open_clip_config(config: dict) -> dict:
    """The open_clip model config of ``model.config`` or of a model-config JSON named by ``model.name``."""
    mcfg = config["model"]
    if mcfg["config"]:
        return mcfg["config"]
    path = D.resolve_path(mcfg["name"])
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RsmclipError(f"model.name {path} is not a readable model-config JSON ({D.one_line(exc)})") from exc
    return data.get("model_cfg", data)


def build_text_tower(config: dict, groups: list[list[D.CaptionedImage]], out_dir: Path) -> Path:
    """Train a tokenizer on the training captions and write a small random XLM-R text tower config."""
    spec = dict(config["model"]["build_text_tower"])
    vocab_size = int(spec.pop("vocab_size", 2000))
    kind = spec.pop("kind", "unigram")
    context_length = int(open_clip_config(config).get("text_cfg", {}).get("context_length", 77))
    texts = [c for items in groups for item in items for caps in item.captions.values() for c in caps]
    tokenizer = train_tokenizer(list(dict.fromkeys(texts)), vocab_size, kind=kind)
    return write_hf_text_dir(out_dir / "text_tower", tokenizer, context_length=context_length, **spec)


def create_training_model(config: dict, groups: list[list[D.CaptionedImage]], out_dir: Path,
                          device: torch.device) -> LoadedModel:
    mcfg = config["model"]
    model_arg: str | Path = mcfg["name"]
    if mcfg["config"]:
        model_arg = out_dir / "model_config.json"
        if is_main_process():
            write_text_atomic(model_arg, json.dumps(mcfg["config"], indent=2))
        barrier()
    elif not str(model_arg).startswith("hf-hub:") and D.resolve_path(model_arg).is_file():
        model_arg = D.resolve_path(model_arg)
    hf_text_dir = D.resolve_path(mcfg["hf_text_dir"]) if mcfg["hf_text_dir"] else None
    if mcfg["build_text_tower"]:
        if is_main_process():
            build_text_tower(config, groups, out_dir)
        barrier()
        hf_text_dir = out_dir / "text_tower"
    checkpoint = D.resolve_path(mcfg["checkpoint"]) if mcfg["checkpoint"] else None
    return create_model(model_arg, checkpoint=checkpoint, hf_text_dir=hf_text_dir,
                        pretrained=mcfg["pretrained"], device=str(device))


def is_text_parameter(name: str) -> bool:
    """Whether the CLIP model's parameter ``name`` belongs to the text tower (not the image tower or logit scale)."""
    return not name.startswith("visual.") and name != "logit_scale"


def warm_up_text_tower(model: nn.Module, tokenizer: Any, items: Sequence[D.CaptionedImage], *, steps: int,
                       lr: float, batch_size: int, seed: int, device: torch.device) -> list[float]:
    """Pull every class's captions (all languages, names and templates) towards a learned class prototype.

    Both towers of a from-scratch model start random, and the contrastive loss then collapses the text
    embeddings onto the images' mean direction for hundreds of steps. A short warm-up of the text tower
    on class-folder captions gives the image tower distinct targets from the first CLIP step. Returns
    the per-step losses.
    """
    captions: dict[str, list[str]] = {}
    for item in items:
        if item.label is not None and item.label not in captions:
            captions[item.label] = sorted({c for caps in item.captions.values() for c in caps})
    if len(captions) < 2:
        raise RsmclipError("optim.text_warmup_steps needs class-folder data with at least 2 classes; set it to 0")
    classes = sorted(captions)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    text_params = [p for name, p in model.named_parameters() if is_text_parameter(name)]
    with torch.no_grad():
        dim = model.encode_text(tokenizer(classes[:1]).to(device)).shape[-1]
    prototypes = nn.Parameter((0.02 * torch.randn(len(classes), dim, generator=gen)).to(device))
    optimizer = torch.optim.AdamW(text_params + [prototypes], lr=lr, weight_decay=0.05)
    scale = float(model.logit_scale.detach().exp())
    losses = []
    for _ in range(steps):
        picked = rng.sample(range(len(classes)), min(batch_size, len(classes)))
        text = model.encode_text(tokenizer([rng.choice(captions[classes[i]]) for i in picked]).to(device),
                                 normalize=True)
        logits = scale * text @ F.normalize(prototypes, dim=-1).T
        loss = F.cross_entropy(logits, torch.tensor(picked, device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def check_view_size(visual: nn.Module, size: int, image_size: int, device: torch.device) -> None:
    """Fail early when the image tower cannot take local crops of ``size`` (e.g. fixed ViT position tables)."""
    was_training = visual.training
    visual.eval()  # no batch-norm statistics from the probe
    try:
        with torch.no_grad():
            visual(torch.zeros(1, 3, size, size, device=device))
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise RsmclipError(f"data.local_crop_size {size} does not fit this image tower ({D.one_line(exc, 80)});"
                           f" set it to the model image size {image_size}") from exc
    finally:
        visual.train(was_training)


def parameter_groups(student: RsmClipStudent, config: dict) -> list[dict]:
    """AdamW groups: no weight decay on gains, biases, embeddings' scalars and the logit scale.

    Each group records whether it holds text-tower parameters (``is_text``, for ``optim.text_lock_steps``).
    """
    ocfg = config["optim"]
    groups: dict[tuple[bool, bool, bool], list[nn.Parameter]] = {}
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or "bias" in name or "logit_scale" in name or ".ln" in name or "norm" in name
        is_head = name.startswith("head.")
        is_text = name.startswith("clip.") and is_text_parameter(name.removeprefix("clip."))
        groups.setdefault((is_head, is_text, no_decay), []).append(param)
    head_lr = ocfg["head_lr"] if ocfg["head_lr"] is not None else ocfg["lr"]
    return [
        {"params": params, "lr": head_lr if is_head else ocfg["lr"],
         "weight_decay": 0.0 if no_decay else ocfg["weight_decay"], "is_text": is_text}
        for (is_head, is_text, no_decay), params in sorted(groups.items())
    ]


def lr_factors(groups: Sequence[dict], ocfg: dict, total_steps: int) -> list[Any]:
    """Per-group LR factor: warm-up + cosine; text groups at 0 for the first ``text_lock_steps``."""
    lock = int(ocfg["text_lock_steps"])

    def factor(step: int) -> float:
        return warmup_cosine_factor(step, int(ocfg["warmup_steps"]), total_steps, ocfg["min_lr_factor"])

    def text_factor(step: int) -> float:
        return 0.0 if step < lock else factor(step)

    return [text_factor if group["is_text"] else factor for group in groups]


# --------------------------------------------------------------------------- distributed + io


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def init_distributed(config: dict) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); initialises the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    want = config["device"]
    use_cuda = torch.cuda.is_available() if want == "auto" else want == "cuda"
    if want == "cuda" and not torch.cuda.is_available():
        raise RsmclipError("device: cuda was requested but no CUDA device is available; set device: cpu")
    if world_size > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        return dist.get_rank(), world_size, device
    return 0, 1, torch.device("cuda" if use_cuda else "cpu")


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    numpy_state = list(state["numpy"])
    numpy_state[1] = np.asarray(numpy_state[1], dtype=np.uint32)
    np.random.set_state(tuple(numpy_state))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_training_state(checkpoint: Path) -> dict:
    """The ``training`` section of a checkpoints/step-*.pt file."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True).get("training")
    except Exception as exc:  # torch raises many types for corrupt files
        raise RsmclipError(f"--resume {checkpoint} cannot be read ({type(exc).__name__})") from exc
    if not isinstance(state, dict):
        raise RsmclipError(f"--resume {checkpoint} has no training state; pass a checkpoints/step-*.pt file")
    return state


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None for fp32; bf16/fp16 on CUDA only ("auto": bf16 where supported, else fp16)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision in ("bf16", "fp16"):
        return torch.bfloat16 if precision == "bf16" else torch.float16
    raise RsmclipError(f"optim.precision {precision!r} is unknown; use auto, fp32, bf16 or fp16")


# --------------------------------------------------------------------------- training


class Trainer:
    """Owns the student, teacher, losses, optimizer and data position of one run."""

    def __init__(self, config: dict, out_dir: Path, resume: Path | None = None) -> None:
        self.config = config
        self.out_dir = out_dir
        self.rank, self.world_size, self.device = init_distributed(config)
        torch.manual_seed(config["seed"])
        random.seed(config["seed"])
        np.random.seed(config["seed"] % 2**32)
        groups, weights = training_items(config)
        resume_state = read_training_state(resume) if resume else None
        if resume is not None:
            self.loaded = create_model(None, checkpoint=resume, device=str(self.device))
        else:
            self.loaded = create_training_model(config, groups, out_dir, self.device)
        self.loaded.model.train()
        self.loaded.model.visual.to(memory_format=torch.channels_last)
        self.tokenizer = self.loaded.tokenizer
        lcfg, dcfg, ocfg = config["loss"], config["data"], config["optim"]
        items = [item for group in groups for item in group]
        if resume is None and int(ocfg["text_warmup_steps"]) > 0:
            losses = warm_up_text_tower(self.loaded.model, self.tokenizer, items,
                                        steps=int(ocfg["text_warmup_steps"]), lr=float(ocfg["text_warmup_lr"]),
                                        batch_size=int(dcfg["batch_size"]), seed=int(config["seed"]),
                                        device=self.device)
            log.info("text warm-up: %d steps, class loss %.3f -> %.3f", len(losses), losses[0], losses[-1])
        size = self.loaded.preprocess_cfg.get("size", 224)
        image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.distill = float(lcfg["distill_weight"]) > 0
        head = None
        if self.distill:
            head = DinoHead(self.loaded.config["embed_dim"], lcfg["out_dim"], hidden_dim=lcfg["hidden_dim"],
                            bottleneck_dim=lcfg["bottleneck_dim"], n_layers=lcfg["head_layers"]).to(self.device)
        self.student = RsmClipStudent(self.loaded.model, head)
        self.teacher: TowerWithHead | None = None
        self.distill_loss: SelfDistillationLoss | None = None
        if self.distill:
            self.teacher = copy.deepcopy(self.student.image_tower()).eval()
            for param in self.teacher.parameters():
                param.requires_grad_(False)
            self.distill_loss = SelfDistillationLoss(lcfg["out_dim"], student_temp=lcfg["student_temp"],
                                                     center_momentum=lcfg["center_momentum"]).to(self.device)

        # data
        probabilities = D.mixture_weights([len(g) for g in groups], weights) if len(groups) > 1 else None
        self.augment = D.MultiCropAugment(D.MultiCropConfig(
            global_size=image_size,
            local_size=int(dcfg["local_crop_size"] or image_size),
            n_local=int(dcfg["local_crops"]) if self.distill else 0,
            global_scale=tuple(dcfg["global_crop_scale"]), local_scale=tuple(dcfg["local_crop_scale"]),
            flips=bool(dcfg["flips"]), rot90=bool(dcfg["rot90"]), color_jitter=tuple(dcfg["color_jitter"]),
            mean=tuple(self.loaded.preprocess_cfg.get("mean", D.MultiCropConfig.mean)),
            std=tuple(self.loaded.preprocess_cfg.get("std", D.MultiCropConfig.std)),
        ))
        if self.distill and self.augment.config.n_local and self.augment.config.local_size != image_size:
            check_view_size(self.loaded.model.visual, self.augment.config.local_size, image_size, self.device)
        self.dataset = D.MultiCropCaptionDataset(items, self.augment, cache_images=bool(dcfg["cache_images"]))
        self.sampler = D.ResumableWeightedSampler(
            len(items), batch_size=int(dcfg["batch_size"]), seed=int(config["seed"]),
            probabilities=probabilities, samples_per_epoch=dcfg["samples_per_epoch"],
            rank=self.rank, world_size=self.world_size,
            distinct_labels=[item.label for item in items] if dcfg["distinct_labels"] else None,
        )
        self.accum = int(ocfg["grad_accum"])
        steps_per_epoch = self.sampler.batches_per_epoch // self.accum
        if steps_per_epoch < 1:
            raise RsmclipError("optim.grad_accum is larger than the batches of one epoch; lower it")
        self.total_steps = steps_per_epoch * int(ocfg["epochs"])
        if ocfg["max_steps"]:
            self.total_steps = min(self.total_steps, int(ocfg["max_steps"]))

        # optimisation
        self.model = (DistributedDataParallel(self.student, device_ids=[self.device.index] if self.device.type == "cuda"
                                              else None)
                      if self.world_size > 1 else self.student)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.student, config), betas=tuple(ocfg["betas"]),
                                           eps=ocfg["eps"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factors(self.optimizer.param_groups, ocfg, self.total_steps))
        self.amp_dtype = autocast_dtype(ocfg["precision"], self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        if resume_state is not None:
            self.load_training_state(resume_state)

    # ---- state

    def training_state(self) -> dict:
        state = {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng_state(), "config": self.config,
            "world_size": self.world_size,
        }
        if self.distill:
            state.update(head=self.student.head.state_dict(), teacher=self.teacher.state_dict(),
                         center=self.distill_loss.center.clone())
        return state

    def load_training_state(self, state: dict) -> None:
        if state.get("world_size", 1) != self.world_size:
            raise RsmclipError(f"checkpoint was written by {state.get('world_size')} processes; resume with the same"
                               f" number (now {self.world_size}) for an exact continuation")
        if self.distill:
            if "teacher" not in state:
                raise RsmclipError("checkpoint has no self-distillation state; resume with loss.distill_weight: 0")
            self.student.head.load_state_dict(state["head"])
            self.teacher.load_state_dict(state["teacher"])
            self.distill_loss.center.copy_(state["center"])
            self.distill_loss.center_ready.fill_(True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        restore_rng_state(state["rng"])

    def save(self, path: Path, **extra: Any) -> None:
        if is_main_process():
            save_checkpoint(self.loaded, path, **extra)

    def save_training_checkpoint(self) -> None:
        if not is_main_process():
            return
        ckpt_dir = self.out_dir / "checkpoints"
        self.save(ckpt_dir / f"step-{self.step:06d}.pt", training=self.training_state())
        keep = int(self.config["checkpoint"]["keep"])
        if keep > 0:
            for old in sorted(ckpt_dir.glob("step-*.pt"))[:-keep]:
                old.unlink()

    # ---- one optimizer step

    def schedules(self) -> dict:
        lcfg = self.config["loss"]
        return {
            "teacher_temp": teacher_temperature(self.step, int(lcfg["teacher_temp_warmup_steps"]),
                                                lcfg["warmup_teacher_temp"], lcfg["teacher_temp"]),
            "teacher_momentum": cosine_schedule(self.step, self.total_steps, lcfg["teacher_momentum"],
                                                lcfg["teacher_momentum_final"]),
        }

    def micro_batch_losses(self, batch: dict, teacher_temp: float) -> dict[str, torch.Tensor]:
        global_views = batch["global"].to(self.device, non_blocking=True)
        local_views = batch["local"].to(self.device, non_blocking=True)
        text = self.tokenizer(batch["caption"]).to(self.device, non_blocking=True)
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else nullcontext())
        with autocast:
            out = self.model(global_views, local_views, text)
            n_views = int(self.config["loss"]["clip_views"])
            clip_loss = sum(
                clip_contrastive_loss(out["image"][v].float(), out["text"].float(), out["logit_scale"].float(),
                                      rank=self.rank, world_size=self.world_size)
                for v in range(n_views)
            ) / n_views
            losses = {"clip_loss": clip_loss}
            if self.distill:
                with torch.no_grad():
                    _, teacher_out = self.teacher(view_major_batch(global_views))
                teacher_views = list(teacher_out.float().chunk(global_views.shape[1]))
                losses["distill_loss"] = self.distill_loss(out["student"], teacher_views, teacher_temp)
                # log K = uniform targets (collapse to uniform), 0 = one-hot targets (collapse to one prototype)
                targets = torch.cat(self.distill_loss.teacher_targets(teacher_views, teacher_temp))
                losses["teacher_entropy"] = -(targets * targets.clamp_min(1e-12).log()).sum(-1).mean()
                losses["teacher_out"] = teacher_out.float()
        losses["loss"] = clip_loss + float(self.config["loss"]["distill_weight"]) * losses.get("distill_loss", 0.0)
        return losses

    def optimizer_step(self, batches: list[dict]) -> dict:
        sched = self.schedules()
        totals = {"loss": 0.0, "clip_loss": 0.0, "distill_loss": 0.0, "teacher_entropy": 0.0}
        teacher_outputs = []
        for i, batch in enumerate(batches):
            sync = (self.model.no_sync() if self.world_size > 1 and i < len(batches) - 1 else nullcontext())
            with sync:
                losses = self.micro_batch_losses(batch, sched["teacher_temp"])
                self.scaler.scale(losses["loss"] / len(batches)).backward()
            for key in totals:
                if key in losses:
                    totals[key] += float(losses[key].detach()) / len(batches)
            if "teacher_out" in losses:
                teacher_outputs.append(losses["teacher_out"])
        if self.world_size > 1:  # log the mean over ranks
            values = torch.tensor(list(totals.values()), device=self.device)
            dist.all_reduce(values)
            totals = dict(zip(totals, (values / self.world_size).tolist()))
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.student.parameters() if p.requires_grad],
            float(self.config["optim"]["grad_clip"]) if self.config["optim"]["grad_clip"] else float("inf"),
        )
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.student.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            if self.distill:
                ema_update_(self.teacher, self.student.image_tower(), sched["teacher_momentum"])
                self.distill_loss.update_center(torch.cat(teacher_outputs))
        self.step += 1
        record = {"step": self.step, "epoch": self.epoch, **totals, "lr": lr,
                  "logit_scale": float(self.student.clip.logit_scale.detach().exp()), "grad_norm": float(grad_norm)}
        if self.distill:
            record.update(sched)
        else:
            record.pop("distill_loss")
            record.pop("teacher_entropy")
        return record

    # ---- loop

    def fit(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out_dir / "metrics.jsonl"
        every = int(self.config["checkpoint"]["every_steps"])
        workers = int(self.config["data"]["workers"])
        metrics = None
        if is_main_process():
            if metrics_path.exists():  # a resumed run continues the log from its checkpoint's step
                kept = [r for r in D.read_jsonl_records(metrics_path) if r.get("step", 0) <= self.step]
                write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
            metrics = metrics_path.open("a", encoding="utf-8")
        try:
            while self.step < self.total_steps:
                self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
                loader = DataLoader(self.dataset, batch_size=self.sampler.batch_size, sampler=self.sampler,
                                    num_workers=workers, collate_fn=D.collate_views, drop_last=True,
                                    pin_memory=self.device.type == "cuda", persistent_workers=False,
                                    # its own generator: creating a loader must not draw from the global
                                    # RNG that dropout uses, or a resumed run would diverge
                                    generator=torch.Generator().manual_seed(int(self.config["seed"]) + self.epoch))
                pending: list[dict] = []
                started = time.perf_counter()
                for batch in loader:
                    pending.append(batch)
                    if len(pending) < self.accum:
                        continue
                    record = self.optimizer_step(pending)
                    self.batch_in_epoch += len(pending)
                    pending = []
                    samples = self.accum * self.sampler.batch_size * self.world_size
                    record["samples_per_s"] = samples / max(time.perf_counter() - started, 1e-9)
                    started = time.perf_counter()
                    if metrics is not None:
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                        log.info("step %d/%d loss %.4f clip %.4f distill %.4f lr %.2e", self.step, self.total_steps,
                                 record["loss"], record["clip_loss"], record.get("distill_loss", 0.0), record["lr"])
                    if every and self.step % every == 0 and self.step < self.total_steps:
                        self.save_training_checkpoint()
                    if self.step >= self.total_steps:
                        break
                else:
                    self.epoch += 1
                    self.batch_in_epoch = 0
            self.save_training_checkpoint()
        finally:
            if metrics is not None:
                metrics.close()

    def finish(self) -> dict:
        """Save the final model and write eval.json (main process); returns the evaluation."""
        results: dict = {}
        if is_main_process():
            self.loaded.model.eval()
            if self.config["eval"]["enabled"]:
                from training.evaluate import evaluate_training_datasets

                results = evaluate_training_datasets(self.loaded, self.config, device=str(self.device))
                write_text_atomic(self.out_dir / "eval.json", json.dumps(results, indent=2, ensure_ascii=False))
            self.save(self.out_dir / "model.pt", eval=json.loads(json.dumps(results)), config=self.config)
        barrier()
        return results


def train(config: dict, out_dir: Path, resume: Path | None = None) -> dict:
    """Run (or resume) training and the final evaluation; returns the evaluation results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, out_dir, resume)
    if is_main_process():
        write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    try:
        trainer.fit()
        return trainer.finish()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="training YAML (training/configs/*.yaml)")
    parser.add_argument("-o", "--output", required=True, type=Path, help="run directory")
    parser.add_argument("--resume", type=Path, default=None, help="training checkpoint to continue from")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = load_config(args.config)
        if args.resume is not None and not args.resume.is_file():
            raise RsmclipError(f"--resume {args.resume} does not exist; pass a checkpoints/step-*.pt file")
        results = train(config, args.output, args.resume)
    except RsmclipError as exc:
        print(f"rsmclip-geo: error: {exc}", file=sys.stderr)
        return 2
    if results:
        print(json.dumps(results.get("summary", results), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
