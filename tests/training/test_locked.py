"""Training on precomputed locked-tower features (training.locked, training.features): real AID and UCM images,
the real pretrained towers; the loss falls, a resumed run continues exactly, stores are never mixed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rsmclip_geo.errors import RsmclipError
from training import features as FT
from training import locked as L
from training.train import merge_config

REPO = Path(__file__).resolve().parents[2]


def tiny_config(features: Path, **optim) -> dict:
    return merge_config(L.DEFAULTS, {
        "seed": 1,
        "model": {"config": "training/configs/models/e5-small-efficientnet-lite0-128.json"},
        "locked": {"image_trunk": True},
        "data": {"datasets": [
            {"name": "aid", "root": "../shared/data/aid", "vocabulary": "training/vocab/aid_classes.yaml",
             "max_per_class": 2, "max_val_per_class": 1},
            {"name": "ucm", "root": "../shared/data/ucm", "vocabulary": "training/vocab/ucm_classes.yaml",
             "captions": "../shared/data/ucm/captions.csv", "max_per_class": 2, "max_val_per_class": 1}],
            "languages": ["en", "zh"], "concepts": {"aid/Parking": "parking", "ucm/parkinglot": "parking"},
            "features": str(features)},
        "optim": {"steps": 40, "batch_size": 48, "warmup_steps": 4, **optim},
        "loss": {"out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 32},
        "checkpoint": {"every_steps": 20},
    })


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def trained(features_dir, tmp_path_factory) -> tuple[L.LockedTrainer, Path]:
    out = tmp_path_factory.mktemp("run")
    trainer = L.LockedTrainer(tiny_config(features_dir), out)
    trainer.fit(resume=False)
    return trainer, out


def test_splits_caption_ucm_images_and_share_concepts() -> None:
    splits, vocabularies, concepts = L.load_splits(tiny_config(Path("unused")))
    train = splits["train"]
    assert len(train.paths) == 2 * 30 + 2 * 16 and set(vocabularies) == {"aid", "ucm"}
    assert all(len(c) == 5 for c, d in zip(train.captions, train.dataset) if d == "ucm")
    assert not any(c for c, d in zip(train.captions, train.dataset) if d == "aid")
    parking = [train.concept[i] for i, label in enumerate(train.label) if label in ("Parking", "parkinglot")]
    assert len(set(parking)) == 1 and concepts[parking[0]] == "parking"
    river = {train.concept[i] for i, label in enumerate(train.label) if label.lower() == "river"}
    assert len(river) == 1  # aid/River and ucm/river by their normalised folder names
    assert all(set(p) == {"en", "zh"} and all(p.values()) for p in train.prompts)


def test_loss_falls_and_the_teacher_stays_sharp(trained) -> None:
    _, out = trained
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 41))
    assert np.mean([m["loss"] for m in metrics[-10:]]) < np.mean([m["loss"] for m in metrics[:10]])
    assert max(m["teacher_entropy"] for m in metrics[5:]) <= 0.8 * np.log(256)


def test_only_the_unlocked_parts_changed(trained) -> None:
    trainer, _ = trained
    from training.pretrained import create_pretrained_model

    fresh = create_pretrained_model(REPO / "training/configs/models/e5-small-efficientnet-lite0-128.json").model
    model = trainer.loaded.model
    torch.testing.assert_close(model.visual.trunk.state_dict(), fresh.visual.trunk.state_dict())
    torch.testing.assert_close(model.text.transformer.state_dict(), fresh.text.transformer.state_dict())
    assert not torch.equal(model.text.proj.weight, fresh.text.proj.weight)


def test_resumed_run_continues_exactly(trained, features_dir, tmp_path) -> None:
    _, full = trained
    L.LockedTrainer(tiny_config(features_dir), tmp_path).fit(resume=False, until_step=20)
    with pytest.raises(RsmclipError, match="holds a run; pass --resume"):
        L.LockedTrainer(tiny_config(features_dir), tmp_path).fit(resume=False)
    L.LockedTrainer(tiny_config(features_dir), tmp_path).fit(resume=True)
    resumed = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    original = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == list(range(1, 41))
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in original], rel=1e-5)


def test_a_store_made_with_other_settings_is_refused(tmp_path) -> None:
    FT.open_store(tmp_path / "s", {"image_stage": 6})
    with pytest.raises(RsmclipError, match="was made with other settings"):
        FT.open_store(tmp_path / "s", {"image_stage": 5})


@pytest.mark.parametrize(("text", "message"), [
    ("- a\n- b\n", "must be a YAML mapping"),
    ("data: {datasets: []}\n", "data.datasets is empty"),
    ("data: {datasets: [{name: aid, root: x}]}\n", "model.config is missing"),
    ("optim: {stepz: 3}\n", "optim.stepz is unknown; see training/configs/e5-lite0.yaml"),
])
def test_a_bad_config_is_one_line(tmp_path, capsys, text, message) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    assert L.main(["--config", str(path), "-o", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_text_features_trim_padding_without_changing_them(trained) -> None:
    trainer, _ = trained
    texts = ["a harbour with ships", "停机坪上的飞机", "x"]
    from training.evaluate import TorchEncoder

    expected = TorchEncoder(trainer.loaded).encode_texts(texts)
    np.testing.assert_allclose(trainer.encode_texts(texts), expected, atol=2e-3)


def test_evaluation_on_stored_features_matches_the_model_on_the_images(trained) -> None:
    trainer, _ = trained
    from training.evaluate import TorchEncoder, zero_shot_class_folder

    results = trainer.evaluate()
    assert set(results) == {"aid", "ucm"} and set(results["aid"]["per_language"]) == {"en", "zh"}
    assert results["ucm"]["retrieval_en"]["n_texts"] == 5 * 16 and "retrieval_en" not in results["aid"]
    val = trainer.splits["val"]
    pairs = [(p, label) for p, label, d in zip(val.paths, val.label, val.dataset) if d == "ucm"]
    direct = zero_shot_class_folder(TorchEncoder(trainer.loaded), pairs, sorted({c for _, c in pairs}),
                                    trainer.vocabularies["ucm"], ["en", "zh"])
    for lang in ("en", "zh"):  # stored float16 features may move a near tie by one image of 16
        assert abs(results["ucm"]["per_language"][lang] - direct["per_language"][lang]["top1"]) <= 100 / 16 + 1e-9


def test_caption_targets_share_a_concept_and_favour_the_own_image_of_a_real_caption() -> None:
    concepts, real = [3, 3, 5, 3], np.array([False, True, False, False])
    plain = L.caption_targets(concepts, real, 0.0)
    torch.testing.assert_close(plain, plain.T)
    torch.testing.assert_close(plain[0], torch.tensor([1 / 3, 1 / 3, 0, 1 / 3]))
    weighted = L.caption_targets(concepts, real, 0.7)
    torch.testing.assert_close(weighted[1], torch.tensor([0.1, 0.8, 0, 0.1]))
    torch.testing.assert_close(weighted[[0, 2, 3]], plain[[0, 2, 3]])
    torch.testing.assert_close(weighted.sum(1), torch.ones(4))


def test_data_set_weights_set_how_often_its_images_are_drawn(trained, features_dir, tmp_path) -> None:
    config = tiny_config(features_dir)
    config["data"]["datasets"][1]["weight"] = 4.0  # ucm: 32 of the 92 training images
    trainer = L.LockedTrainer(config, tmp_path / "run")

    def ucm_share(t: L.LockedTrainer) -> float:
        drawn = np.concatenate([t.batch(step)[0] for step in range(20)])
        return float(np.mean(np.array(t.splits["train"].dataset)[drawn] == "ucm"))
    assert ucm_share(trained[0]) < 0.45 < 0.55 < ucm_share(trainer)
