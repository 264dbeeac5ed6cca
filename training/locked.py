"""Train the unlocked parts of a pretrained model from precomputed features (``training.features``).

The recipe of the default model (``training/configs/e5-lite0.yaml``): the text tower (multilingual-e5-small)
stays locked but for its projection, so wording and languages never seen in training keep e5's
meaning; the image tower (EfficientNet-Lite, ImageNet) is locked up to ``locked.image_stage`` and
its last stages, head convolution and projection are trained. Losses are the RS-M-CLIP ones:

* contrastive, image views against captions, where every caption of the same *concept* is a positive
  (several images of one class share class-name captions, and the data sets share classes such as
  forest or river: treating those as negatives would teach the model to tell synonyms apart);
* DINO-style self-distillation (``training.losses``): an EMA teacher of the trained image parts on
  the global views, the student on the global and local views.

Every batch is drawn from ``numpy.random.default_rng([seed, step])`` and checkpoints hold the
optimiser, teacher and centre, so a resumed run continues exactly.

    python -m training.locked --config training/configs/e5-lite0.yaml -o runs/e5-lite0 [--resume]
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rsmclip_geo.errors import RsmclipError
from training import data as D
from training import evaluate as E
from training import features as FT
from training.losses import DinoHead, SelfDistillationLoss, cosine_schedule, ema_update_, warmup_cosine_factor
from training.model import save_checkpoint
from training.pretrained import create_pretrained_model
from training.train import read_config

log = logging.getLogger("training.locked")

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "model": {"config": None},
    "locked": {"image_stage": 6, "image_trunk": False, "text_projection": False},
    "data": {
        "datasets": [],
        "languages": list(D.LANGUAGES),
        "concepts": None,  # {"dataset/Class": concept}: classes of different names that are one thing
        "real_caption_rate": 0.5,
        "global_views": 1,
        "local_views": 2,
        "local_size": 64,
        "global_crop_scale": [0.5, 1.0],
        "local_crop_scale": [0.1, 0.4],
        "color_jitter": [0.2, 0.2, 0.1, 0.0],
        "features": "features",
    },
    "optim": {"steps": 2000, "batch_size": 256, "lr": 1e-3, "trunk_lr": 3e-4, "weight_decay": 0.05,
              "warmup_steps": 100, "min_lr_factor": 0.02},
    "loss": {"distill_weight": 0.5, "caption_instance_weight": 0.0, "out_dim": 4096, "hidden_dim": 512, "bottleneck_dim": 128, "head_layers": 3,
             "student_temp": 0.1, "teacher_temp": 0.04, "center_momentum": 0.9,
             "teacher_momentum": 0.99, "teacher_momentum_final": 1.0},
    "checkpoint": {"every_steps": 500},
}


@dataclass
class Split:
    """The images of one split over all data sets, with what training and evaluation need of each."""

    paths: list[Path] = field(default_factory=list)
    dataset: list[str] = field(default_factory=list)
    label: list[str] = field(default_factory=list)
    concept: list[int] = field(default_factory=list)
    prompts: list[dict[str, list[str]]] = field(default_factory=list)  # train-part class prompts per language
    captions: list[list[str]] = field(default_factory=list)  # real captions (English)
    weight: list[float] = field(default_factory=list)  # sampling weight (the data set's `weight`, default 1)


def concept_name(dataset: str, label: str, aliases: dict[str, str]) -> str:
    """The concept a class stands for: an alias from the config, else its folder name normalised."""
    alias = aliases.get(f"{dataset}/{label}")
    if alias:
        return alias
    return re.sub(r"(_?area)$|[^a-z]", "", label.lower())


def read_caption_csv(path: Path) -> dict[str, list[str]]:
    """``image,caption`` rows -> captions per image path relative to the CSV's folder."""
    out: dict[str, list[str]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            out.setdefault(row["image"], []).append(" ".join(row["caption"].split()))
    return out


def load_splits(config: dict) -> tuple[dict[str, Split], dict[str, D.Vocabulary], list[str]]:
    """Train and val splits of every configured data set, their vocabularies and the concept names."""
    dcfg = config["data"]
    splits = {"train": Split(), "val": Split()}
    vocabularies: dict[str, D.Vocabulary] = {}
    concepts: list[str] = []
    for spec in dcfg["datasets"]:
        name, root = spec["name"], D.resolve_path(spec["root"])
        vocabularies[name] = vocab = (D.load_vocabulary(D.resolve_path(spec["vocabulary"])) if spec.get("vocabulary")
                                      else D.default_vocabulary(D.list_class_folders(root)))
        captions = read_caption_csv(D.resolve_path(spec["captions"])) if spec.get("captions") else {}
        for part, pairs in D.split_class_folder(root).items():
            limit = spec.get("max_per_class" if part == "train" else "max_val_per_class")
            if limit:
                pairs = D.first_per_class(pairs, int(limit))
            split = splits[part]
            for path, label in pairs:
                concept = concept_name(name, label, dcfg["concepts"] or {})
                if concept not in concepts:
                    concepts.append(concept)
                split.paths.append(path)
                split.dataset.append(name)
                split.label.append(label)
                split.concept.append(concepts.index(concept))
                split.prompts.append({lang: vocab.prompts(label, lang, "train") for lang in dcfg["languages"]})
                split.captions.append(captions.get(path.relative_to(root).as_posix(), []))
                split.weight.append(float(spec.get("weight", 1.0)))
    return splits, vocabularies, concepts


class LockedTrainer:
    """Trains the unlocked parts of a pretrained model on precomputed features."""

    def __init__(self, config: dict, out_dir: Path) -> None:
        self.config, self.out_dir = config, out_dir
        torch.manual_seed(config["seed"])
        self.loaded = create_pretrained_model(D.resolve_path(config["model"]["config"]))
        clip = self.loaded.model
        clip.eval()  # batch-norm statistics stay ImageNet's; the model has no dropout
        for param in clip.parameters():
            param.requires_grad_(False)
        stage = int(config["locked"]["image_stage"])
        self.suffix = FT.TrunkSuffix(clip.visual, stage, pooled=bool(config["locked"]["image_trunk"]))
        self.text_proj = clip.text.proj
        trained = [self.suffix] if config["locked"]["text_projection"] else [self.suffix, self.text_proj]
        for module in trained:
            for param in module.parameters():
                param.requires_grad_(True)
        clip.logit_scale.requires_grad_(True)
        self.splits, self.vocabularies, self.concepts = load_splits(config)
        weights = np.array(self.splits["train"].weight)
        self.sampling = None if np.all(weights == weights[0]) else weights / weights.sum()
        self._compute_features(stage)

        lcfg, ocfg = config["loss"], config["optim"]
        self.distill = float(lcfg["distill_weight"]) > 0
        self.head = DinoHead(int(self.loaded.config["embed_dim"]), lcfg["out_dim"], hidden_dim=lcfg["hidden_dim"],
                             bottleneck_dim=lcfg["bottleneck_dim"], n_layers=lcfg["head_layers"])
        self.teacher = nn.ModuleDict({"suffix": copy.deepcopy(self.suffix), "head": copy.deepcopy(self.head)})
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.distill_loss = SelfDistillationLoss(lcfg["out_dim"], student_temp=lcfg["student_temp"],
                                                 center_momentum=lcfg["center_momentum"])
        if self.suffix.pooled:
            for param in self.suffix.parameters():
                param.requires_grad_(False)
            for param in self.suffix.head.parameters():
                param.requires_grad_(True)
        trunk_params = [p for n, p in self.suffix.named_parameters() if not n.startswith("head.") and p.requires_grad]
        head_params = [p for p in [*self.suffix.head.parameters(), *self.text_proj.parameters(), clip.logit_scale]
                       if p.requires_grad]
        groups = [{"params": head_params, "lr": ocfg["lr"]}]
        if trunk_params:
            groups.append({"params": trunk_params, "lr": ocfg["trunk_lr"]})
        if self.distill:
            groups.append({"params": list(self.head.parameters()), "lr": ocfg["lr"]})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=ocfg["weight_decay"])
        self.base_lrs = [g["lr"] for g in groups]
        self.step = 0

    # ---- features

    def _compute_features(self, stage: int) -> None:
        dcfg, seed = self.config["data"], int(self.config["seed"])
        size = int(self.loaded.preprocess_cfg["size"][0] if isinstance(self.loaded.preprocess_cfg.get("size"), list)
                   else self.loaded.preprocess_cfg.get("size", 224))
        augment = D.MultiCropAugment(D.MultiCropConfig(
            global_size=size, local_size=int(dcfg["local_size"]), n_local=int(dcfg["local_views"]),
            n_global=int(dcfg["global_views"]),
            global_scale=tuple(dcfg["global_crop_scale"]), local_scale=tuple(dcfg["local_crop_scale"]),
            color_jitter=tuple(dcfg["color_jitter"]),
            mean=tuple(self.loaded.preprocess_cfg["mean"]), std=tuple(self.loaded.preprocess_cfg["std"])))
        settings = {"model": self.loaded.source.get("pretrained"), "image_stage": stage, "size": size,
                    "augment": {k: dcfg[k] for k in ("global_views", "local_views", "local_size", "global_crop_scale",
                                                     "local_crop_scale", "color_jitter")},
                    "seed": seed, "train": [str(p) for p in self.splits["train"].paths],
                    "val": [str(p) for p in self.splits["val"].paths]}
        root = D.resolve_path(dcfg["features"])
        store = FT.open_store(root / FT.store_key(settings), settings)
        prefix = FT.trunk_prefix(self.loaded.model.visual.trunk, stage)
        torch.set_num_threads(max(torch.get_num_threads(), 1))
        started = time.perf_counter()
        views = FT.image_view_features(prefix, self.splits["train"].paths, augment, store, seed=seed)
        self.train_global = torch.from_numpy(views["global"])
        self.train_local = torch.from_numpy(views["local"]) if "local" in views else None
        self.val_plain = torch.from_numpy(FT.image_plain_features(prefix, self.splits["val"].paths,
                                                                  self.loaded.preprocess, store))
        if self.suffix.pooled:
            self.train_global, self.val_plain = self.suffix.pool(self.train_global), self.suffix.pool(self.val_plain)
            if self.train_local is not None:
                self.train_local = self.suffix.pool(self.train_local)
        train = self.splits["train"]
        texts = sorted({t for prompts in train.prompts for ts in prompts.values() for t in ts}
                       | {t for caps in train.captions for t in caps})
        self.text_index = {t: i for i, t in enumerate(texts)}
        self.text_features = torch.from_numpy(FT.pooled_text_features(
            self.loaded.model.text, self.loaded.tokenizer, texts, cache=store / "train-texts.npz")).float()
        self.store = store
        log.info("features ready in %.0f s: %d train images, %d val images, %d captions (%s)",
                 time.perf_counter() - started, len(train.paths), len(self.splits["val"].paths), len(texts), store)

    # ---- one step

    def batch(self, step: int) -> tuple[np.ndarray, list[int], np.ndarray]:
        """The images of step ``step`` (drawn by data-set weight), a caption (index into the text features)
        for each, and whether that caption is the image's own real caption."""
        train, dcfg, ocfg = self.splits["train"], self.config["data"], self.config["optim"]
        rng = np.random.default_rng([int(self.config["seed"]), step])
        images = rng.choice(len(train.paths), size=int(ocfg["batch_size"]), replace=False, p=self.sampling)
        captions, real_caption = [], np.zeros(len(images), dtype=bool)
        for k, i in enumerate(images):
            real = train.captions[i]
            if real and rng.random() < float(dcfg["real_caption_rate"]):
                captions.append(self.text_index[real[rng.integers(len(real))]])
                real_caption[k] = True
                continue
            langs = [lang for lang in dcfg["languages"] if train.prompts[i][lang]]
            prompts = train.prompts[i][langs[rng.integers(len(langs))]]
            captions.append(self.text_index[prompts[rng.integers(len(prompts))]])
        return images, captions, real_caption

    def losses(self, step: int) -> dict[str, torch.Tensor]:
        images, captions, real_caption = self.batch(step)
        text_targets = caption_targets([self.splits["train"].concept[i] for i in images], real_caption,
                                       float(self.config["loss"]["caption_instance_weight"]))  # [caption, image]
        image_targets = text_targets.T / text_targets.T.sum(dim=1, keepdim=True)
        text = F.normalize(self.text_proj(self.text_features[captions]), dim=-1)
        globals_ = self.train_global[images].float()  # [B, G, C, H, W]
        n_global = globals_.shape[1]
        embedding = self.suffix(globals_.transpose(0, 1).flatten(0, 1))  # view-major [G*B, embed]
        image = F.normalize(embedding, dim=-1).view(n_global, len(images), -1)
        scale = self.loaded.model.logit_scale.exp()
        clip_loss = 0.0
        for v in range(n_global):
            logits = scale * image[v] @ text.T
            clip_loss = clip_loss + 0.5 * (-(image_targets * F.log_softmax(logits, dim=1)).sum(1).mean()
                                           - (text_targets * F.log_softmax(logits.T, dim=1)).sum(1).mean())
        out = {"clip_loss": clip_loss / n_global}
        if self.distill:
            student = list(self.head(embedding).chunk(n_global))
            if self.train_local is not None:
                local = self.train_local[images].float().transpose(0, 1).flatten(0, 1)
                student += list(self.head(self.suffix(local)).chunk(self.train_local.shape[1]))
            with torch.no_grad():
                teacher_out = self.teacher["head"](self.teacher["suffix"](globals_.transpose(0, 1).flatten(0, 1)))
            teacher_views = list(teacher_out.chunk(n_global))
            temp = float(self.config["loss"]["teacher_temp"])
            out["distill_loss"] = self.distill_loss(student, teacher_views, temp)
            with torch.no_grad():
                probs = torch.cat(self.distill_loss.teacher_targets(teacher_views, temp))
                out["teacher_entropy"] = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
            out["teacher_out"] = teacher_out
        out["loss"] = out["clip_loss"] + float(self.config["loss"]["distill_weight"]) * out.get("distill_loss", 0.0)
        return out

    def train_step(self) -> dict[str, float]:
        ocfg, lcfg = self.config["optim"], self.config["loss"]
        factor = warmup_cosine_factor(self.step, int(ocfg["warmup_steps"]), int(ocfg["steps"]),
                                      float(ocfg["min_lr_factor"]))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        losses = self.losses(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        with torch.no_grad():
            self.loaded.model.logit_scale.clamp_(0, math.log(100))
            if self.distill:
                momentum = cosine_schedule(self.step, int(ocfg["steps"]), lcfg["teacher_momentum"],
                                           lcfg["teacher_momentum_final"])
                ema_update_(self.teacher, nn.ModuleDict({"suffix": self.suffix, "head": self.head}), momentum)
                self.distill_loss.update_center(losses["teacher_out"])
        self.step += 1
        return {"step": self.step, **{k: float(v.detach()) for k, v in losses.items() if k != "teacher_out"},
                "logit_scale": float(self.loaded.model.logit_scale.detach().exp())}

    # ---- state

    def trained_state(self) -> dict[str, Any]:
        return {"suffix": self.suffix.state_dict(), "text_proj": self.text_proj.state_dict(),
                "logit_scale": self.loaded.model.logit_scale.detach().clone(), "head": self.head.state_dict(),
                "teacher": self.teacher.state_dict(), "center": self.distill_loss.center.clone(),
                "optimizer": self.optimizer.state_dict(), "step": self.step, "config": self.config}

    def load_trained_state(self, state: dict[str, Any]) -> None:
        if state["config"] != self.config:
            raise RsmclipError(f"{self.out_dir}: the checkpoint was written with another config; "
                               "resume with the same config or start in a new output directory")
        self.suffix.load_state_dict(state["suffix"])
        self.text_proj.load_state_dict(state["text_proj"])
        with torch.no_grad():
            self.loaded.model.logit_scale.copy_(state["logit_scale"])
        self.head.load_state_dict(state["head"])
        self.teacher.load_state_dict(state["teacher"])
        self.distill_loss.center.copy_(state["center"])
        self.distill_loss.center_ready.fill_(True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    def fit(self, resume: bool, until_step: int | None = None) -> None:
        """Train to ``optim.steps`` (or stop after ``until_step`` with a checkpoint, to continue with ``resume``)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state_path = self.out_dir / "state.pt"
        metrics_path = self.out_dir / "metrics.jsonl"
        if resume and state_path.exists():
            self.load_trained_state(torch.load(state_path, weights_only=False))
            kept = [r for r in D.read_jsonl_records(metrics_path) if r["step"] <= self.step] if metrics_path.exists() else []
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            log.info("resumed at step %d", self.step)
        elif state_path.exists():
            raise RsmclipError(f"-o {self.out_dir} holds a run; pass --resume to continue it or choose a new directory")
        every, total = int(self.config["checkpoint"]["every_steps"]), int(self.config["optim"]["steps"])
        stop = min(total, until_step) if until_step else total
        with metrics_path.open("a", encoding="utf-8") as metrics:
            while self.step < stop:
                record = self.train_step()
                metrics.write(json.dumps(record) + "\n")
                if self.step % 50 == 0 or self.step == total:
                    metrics.flush()
                    log.info("step %d/%d loss %.4f clip %.4f distill %.4f", self.step, total, record["loss"],
                             record["clip_loss"], record.get("distill_loss", 0.0))
                if (every and self.step % every == 0) or self.step == stop:
                    tmp = state_path.with_suffix(".pt.tmp")
                    torch.save(self.trained_state(), tmp)
                    tmp.replace(state_path)

    # ---- evaluation on the precomputed validation features

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Zero-shot top-1 per data set and language with the held-out wording; caption retrieval (UCM).

        The figures of ``training.evaluate`` (same functions), computed on the stored validation features."""
        val, langs = self.splits["val"], self.config["data"]["languages"]
        encoder = StoredFeatureEncoder(self)
        results: dict[str, Any] = {}
        for name, vocab in self.vocabularies.items():
            rows = [i for i, d in enumerate(val.dataset) if d == name]
            pairs = [(val.paths[i], val.label[i]) for i in rows]
            zero_shot = E.zero_shot_class_folder(encoder, pairs, sorted({label for _, label in pairs}), vocab, langs)
            results[name] = {"per_language": {lang: v["top1"] for lang, v in zero_shot["per_language"].items()
                                              if "top1" in v},
                             "mean_top1": zero_shot["mean_top1"]}
            items = [D.CaptionedImage(val.paths[i], {"en": val.captions[i]}) for i in rows if val.captions[i]]
            if items:
                results[name]["retrieval_en"] = E.retrieval_captions(encoder, items, ["en"])["per_language"]["en"]
        return results

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Text embeddings through the locked tower and the trained projection."""
        pooled = FT.pooled_text_features(self.loaded.model.text, self.loaded.tokenizer, texts)
        return F.normalize(self.text_proj(torch.from_numpy(pooled).float()), dim=-1).numpy()


class StoredFeatureEncoder:
    """``training.evaluate.Encoder`` over a trainer's stored validation features (no image is read again)."""

    def __init__(self, trainer: LockedTrainer) -> None:
        self.trainer = trainer
        self.row = {path: i for i, path in enumerate(trainer.splits["val"].paths)}
        self._images: np.ndarray | None = None

    def encode_image_files(self, paths: Sequence[Path]) -> np.ndarray:
        if self._images is None:
            features, suffix = self.trainer.val_plain, self.trainer.suffix
            with torch.no_grad():
                self._images = F.normalize(torch.cat([suffix(features[i:i + 256].float())
                                                      for i in range(0, len(features), 256)]), dim=-1).numpy()
        return self._images[[self.row[Path(p)] for p in paths]]

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.trainer.encode_texts(texts)


def caption_targets(concepts: Sequence[int], real_caption: np.ndarray, instance_weight: float) -> torch.Tensor:
    """Caption -> image targets [caption, image] of a batch (caption k belongs to image k), rows summing to 1:
    a class caption's positives are the images of its concept; a real caption gives ``instance_weight`` to its
    own image and the rest to its concept."""
    concept = torch.tensor(list(concepts))
    same = (concept[:, None] == concept[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    own = instance_weight * torch.from_numpy(np.asarray(real_caption)).float()[:, None]
    return (1 - own) * targets + own * torch.eye(len(concept))


def load_config(path: Path) -> dict:
    config = read_config(path, DEFAULTS, "training/configs/e5-lite0.yaml")
    if not config["model"]["config"]:
        raise RsmclipError(f"--config {path}: model.config is missing; name a model config JSON")
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.locked", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="training config YAML")
    parser.add_argument("-o", "--output", required=True, type=Path, help="run directory (model.pt, metrics, eval)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    parser.add_argument("--until-step", type=int, help="stop after this step with a checkpoint (continue with --resume)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = load_config(args.config)
        trainer = LockedTrainer(config, args.output)
        trainer.fit(args.resume, args.until_step)
        if trainer.step < int(config["optim"]["steps"]):
            log.info("stopped at step %d; continue with --resume", trainer.step)
            return 0
        results = trainer.evaluate()
        (args.output / "eval-features.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
        save_checkpoint(trainer.loaded, args.output / "model.pt", eval=results, config=config)
        log.info("%s", json.dumps({k: v["mean_top1"] for k, v in results.items()}))
    except RsmclipError as exc:
        print(f"training.locked: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
