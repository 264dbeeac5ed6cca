"""Training loop on real AID images with a tiny model: loss falls, exact resume, EMA-only teacher, outputs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rsmclip_geo.errors import RsmclipError
from training import data as D
from training import train as T
from training.model import create_model

REPO = Path(__file__).resolve().parents[2]
AID = REPO / ".." / "shared" / "data" / "aid"
CLASSES = ["Airport", "Beach", "Farmland", "Forest", "Parking", "StorageTanks"]


@pytest.fixture(scope="module")
def tiny_aid(tmp_path_factory) -> Path:
    """Six AID classes, ten images each (symlinks to the real files)."""
    if not AID.is_dir():
        pytest.fail(f"shared AID data missing at {AID}")
    root = tmp_path_factory.mktemp("aid")
    for name in CLASSES:
        (root / name).mkdir()
        for path in sorted((AID / name).iterdir())[:10]:
            (root / name / path.name).symlink_to(path.resolve())
    return root


def tiny_config(root: Path, **sections) -> dict:
    config = {
        "seed": 3,
        "device": "cpu",
        "model": {
            "config": {
                "embed_dim": 32,
                "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
                "text_cfg": {"hf_model_name": "tiny-xlm-roberta", "hf_tokenizer_name": "tiny-xlm-roberta",
                             "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": 24},
            },
            "build_text_tower": {"vocab_size": 200, "kind": "bpe", "hidden_size": 32, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "intermediate_size": 64},
        },
        "data": {"datasets": [{"type": "class_folder", "root": str(root)}], "batch_size": 12, "workers": 0,
                 "local_crops": 2, "local_crop_size": 32, "global_crop_scale": [0.7, 1.0],
                 "color_jitter": [0.0, 0.0, 0.0, 0.0]},
        "optim": {"epochs": 1, "lr": 2e-3, "warmup_steps": 2, "weight_decay": 0.0, "precision": "fp32"},
        "loss": {"distill_weight": 0.5, "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16,
                 "teacher_temp": 0.04, "warmup_teacher_temp": 0.03, "teacher_temp_warmup_steps": 3,
                 "teacher_momentum": 0.996},
        "checkpoint": {"every_steps": 1, "keep": 0},
        "eval": {"enabled": False},
    }
    for section, values in sections.items():
        config[section].update(values)
    return T.merge_config(T.DEFAULT_CONFIG, config)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_real_images(tiny_aid, tmp_path):
    config = tiny_config(tiny_aid, optim={"epochs": 8})
    T.train(config, tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 8 * 4  # 48 training images / batch 12, 8 epochs
    assert all({"loss", "clip_loss", "distill_loss", "teacher_entropy", "lr"} <= set(m) for m in metrics)
    first = sum(m["clip_loss"] for m in metrics[:4]) / 4
    last = sum(m["clip_loss"] for m in metrics[-4:]) / 4
    assert last < first - 0.15, (first, last)
    for m in metrics:
        assert m["loss"] == pytest.approx(m["clip_loss"] + 0.5 * m["distill_loss"], rel=1e-5)
        assert 0.0 <= m["teacher_entropy"] <= math.log(64) + 1e-4
    assert len({round(m["distill_loss"], 4) for m in metrics}) > 10  # the distillation term is live


def test_resume_gives_the_same_next_steps(tiny_aid, tmp_path):
    config = tiny_config(tiny_aid, optim={"epochs": 2})  # 8 steps, an epoch boundary at step 4
    T.train(config, tmp_path / "full")
    full = read_metrics(tmp_path / "full")
    for resume_step in (3, 4):
        out = tmp_path / f"resumed-{resume_step}"
        T.train(config, out, resume=tmp_path / "full" / "checkpoints" / f"step-{resume_step:06d}.pt")
        resumed = read_metrics(out)
        assert [m["step"] for m in resumed] == list(range(resume_step + 1, 9))
        for a, b in zip(full[resume_step:], resumed):
            for key in ("loss", "clip_loss", "distill_loss", "lr", "teacher_temp", "teacher_momentum"):
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (resume_step, a["step"], key)
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "resumed-3" / "model.pt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_teacher_moves_by_ema_only(tiny_aid, tmp_path):
    trainer = T.Trainer(tiny_config(tiny_aid), tmp_path)
    before_teacher = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    before_student = {k: v.clone() for k, v in trainer.student.image_tower().state_dict().items()}
    torch.testing.assert_close(before_teacher, before_student)  # teacher starts as a copy
    momentum = trainer.schedules()["teacher_momentum"]
    trainer.sampler.set_epoch(0)
    loader = torch.utils.data.DataLoader(trainer.dataset, batch_size=12, sampler=trainer.sampler,
                                         collate_fn=T.D.collate_views)
    trainer.optimizer_step([next(iter(loader))])
    assert all(p.grad is None and not p.requires_grad for p in trainer.teacher.parameters())
    after_student = trainer.student.image_tower().state_dict()
    moved = 0
    for key, value in trainer.teacher.state_dict().items():
        expected = momentum * before_teacher[key] + (1 - momentum) * after_student[key]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
        moved += int(not torch.equal(value, before_teacher[key]))
    assert moved > 0
    # the centre moved towards the teacher outputs
    assert trainer.distill_loss.center.abs().sum() > 0


def test_cli_writes_run_outputs_and_checkpoint_rebuilds_model(tiny_aid, tmp_path):
    config = tiny_config(tiny_aid, optim={"epochs": 1},
                         eval={"enabled": True, "max_images_per_class": 2, "prompt_part": "heldout"})
    config_path = tmp_path / "cfg.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "training.train", "--config", str(config_path), "-o", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(read_metrics(out)) == 4
    evaluation = json.loads((out / "eval.json").read_text())
    zero_shot = evaluation["datasets"][0]
    assert zero_shot["task"] == "zero_shot" and zero_shot["per_language"]["en"]["n_images"] == 12
    assert 0.0 <= zero_shot["per_language"]["en"]["top1"] <= 100.0
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*.pt")) == [f"step-00000{i}.pt" for i in range(1, 5)]
    # the final model rebuilds from the checkpoint alone and matches the last training checkpoint
    loaded = create_model(None, checkpoint=out / "model.pt")
    last = torch.load(out / "checkpoints" / "step-000004.pt", weights_only=True)["state_dict"]
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, last[key])
    tokens = loaded.tokenizer(["an aerial image of forest"])
    assert tokens.shape == (1, 24) and tokens[0, 0].item() == 0  # XLM-R <s>


def test_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {learning_rate: 0.1}\n")
    with pytest.raises(RsmclipError, match="optim.learning_rate is unknown"):
        T.load_config(bad)
    result = subprocess.run([sys.executable, "-m", "training.train", "--config", str(bad), "-o", str(tmp_path / "o")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("rsmclip-geo: error: config key optim.learning_rate is unknown")
    assert len(result.stderr.strip().splitlines()) == 1


def test_torchrun_ddp_matches_single_process(tiny_aid, tmp_path):
    """2 gloo ranks x batch 6 see the same 12 samples per step as 1 process x batch 12: same losses."""
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    runs = {}
    for world_size, batch in ((1, 12), (2, 6)):
        config = tiny_config(tiny_aid, data={"batch_size": batch}, checkpoint={"every_steps": 0})
        config["model"]["build_text_tower"].update(no_dropout)
        config_path = tmp_path / f"ddp{world_size}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        out = tmp_path / f"run{world_size}"
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                    if world_size == 2 else [sys.executable])
        result = subprocess.run([*launcher, "-m", "training.train", "--config", str(config_path), "-o", str(out)],
                                cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[world_size] = read_metrics(out)
    assert len(runs[1]) == len(runs[2]) == 4
    for single, ddp in zip(runs[1], runs[2]):
        for key in ("loss", "clip_loss", "distill_loss"):
            assert ddp[key] == pytest.approx(single[key], rel=1e-4, abs=1e-5), (single["step"], key)


def test_local_crop_size_the_tower_cannot_take_is_reported(tiny_aid, tmp_path):
    config = tiny_config(tiny_aid, data={"local_crop_size": 16})  # the ViT's position table is for 32 px
    with pytest.raises(RsmclipError, match="data.local_crop_size 16 does not fit this image tower"):
        T.Trainer(config, tmp_path)


@pytest.mark.parametrize("name", ["smoke.yaml", "rs-m-clip.yaml"])
def test_shipped_configs_load(name):
    config = T.load_config(REPO / "training" / "configs" / name)
    assert config["data"]["languages"] == ["en", "pt", "es", "fr", "de", "nl", "it", "zh", "ko", "ru"]
    assert config["loss"]["distill_weight"] > 0 and config["data"]["local_crops"] >= 2


def test_smoke_config_data_resolves():
    config = T.load_config(REPO / "training" / "configs" / "smoke.yaml")
    groups, weights = T.training_items(config)
    assert len(groups[0]) == 30 * 16 and weights == [1.0]
    assert all(len(item.captions) == 10 for item in groups[0])


def test_distinct_label_batches_hold_each_class_once_to_the_end_of_the_epoch():
    labels = [c for c, n in zip("abcdef", (9, 7, 5, 5, 4, 3)) for _ in range(n)]
    order = D.interleave_labels(torch.randperm(len(labels)), labels, torch.Generator().manual_seed(1))
    assert len(order) == len(labels)
    rounds = [[labels[i] for i in order[r:r + 6].tolist()] for r in range(0, len(order) - 5, 6)]
    assert all(sorted(r) == list("abcdef") for r in rounds)  # the last round too: class-balanced
    assert len(set(order[:18].tolist())) == 18  # the smallest class (3 items) repeats only after 3 rounds
    per_class = {c: [i for i in order.tolist() if labels[i] == c] for c in "abcdef"}
    assert sorted(set(per_class["f"])) == [i for i, c in enumerate(labels) if c == "f"]
    assert len(set(per_class["a"])) == len(per_class["a"])  # large classes: no item twice in an epoch
    sampler = D.ResumableWeightedSampler(len(labels), batch_size=6, seed=0, distinct_labels=labels)
    batches = [[labels[i] for i, _ in list(sampler)[b:b + 6]] for b in range(0, 30, 6)]
    assert all(len(set(batch)) == 6 for batch in batches)


def test_text_warmup_learns_the_class_captions(tiny_aid, tiny_model):
    from training.model import create_model

    loaded = create_model(None, checkpoint=tiny_model.checkpoint)
    vocabulary = D.load_vocabulary(REPO / "training" / "vocab" / "aid_classes.yaml")
    items = D.class_folder_items(D.split_class_folder(tiny_aid)["train"], vocabulary, list(D.LANGUAGES), "train")
    losses = T.warm_up_text_tower(loaded.model, loaded.tokenizer, items, steps=120, lr=3e-3, batch_size=6,
                                  seed=0, device=torch.device("cpu"))
    assert len(losses) == 120
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > 1.5 and last < 0.5 * first, (first, last)
    with pytest.raises(RsmclipError, match="text_warmup_steps"):
        T.warm_up_text_tower(loaded.model, loaded.tokenizer, items[:1], steps=1, lr=1e-3, batch_size=6, seed=0,
                             device=torch.device("cpu"))


def test_text_lock_freezes_the_text_tower_then_releases_it(tiny_aid, tmp_path):
    trainer = T.Trainer(tiny_config(tiny_aid, optim={"text_lock_steps": 2, "warmup_steps": 0}), tmp_path)
    clip = trainer.student.clip
    text = {n: p.detach().clone() for n, p in clip.named_parameters() if not n.startswith("visual.")
            and n != "logit_scale"}
    image = {n: p.detach().clone() for n, p in clip.visual.named_parameters()}
    trainer.sampler.set_epoch(0)
    loader = torch.utils.data.DataLoader(trainer.dataset, batch_size=12, sampler=trainer.sampler,
                                         collate_fn=T.D.collate_views)
    batches = iter(loader)

    def changed(before: dict, module: torch.nn.Module) -> int:
        params = dict(module.named_parameters())
        return sum(int(not torch.equal(params[n], value)) for n, value in before.items())

    for _ in range(2):
        trainer.optimizer_step([next(batches)])
    assert changed(text, clip) == 0  # locked: the text tower keeps its warm-up weights
    assert changed(image, clip.visual) > 0
    trainer.optimizer_step([next(batches)])
    assert changed(text, clip) > 0  # released after text_lock_steps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_smoke_run_loss_falls_and_the_teacher_stays_sharp(seed, tmp_path):
    """The smoke recipe's total loss falls (mean of the last 10 steps below the first 10) and, after the teacher
    temperature's warm-up, the teacher's targets stay far from uniform (entropy <= 0.8 ln K)."""
    config = T.load_config(REPO / "training" / "configs" / "smoke.yaml")
    config["seed"], config["eval"]["enabled"] = seed, False
    trainer = T.Trainer(config, tmp_path)
    trainer.fit()
    metrics = D.read_jsonl_records(tmp_path / "metrics.jsonl")
    first, last = metrics[:10], metrics[-10:]
    assert sum(m["loss"] for m in last) < sum(m["loss"] for m in first)
    warm = int(config["loss"]["teacher_temp_warmup_steps"])
    assert max(m["teacher_entropy"] for m in metrics[warm:]) <= 0.8 * math.log(config["loss"]["out_dim"])
