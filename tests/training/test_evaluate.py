"""Evaluation: recall metrics on hand-made similarity matrices, zero-shot on real AID images with a real
tiny checkpoint and its exported bundle (same numbers within export tolerance), output files, errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import data as D
from training.evaluate import (
    BundleEncoder,
    TorchEncoder,
    class_embeddings,
    confusion_matrix,
    evaluate_data,
    retrieval_metrics,
)
from training.model import create_model

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["Beach", "Forest", "Parking", "StorageTanks"]


def test_retrieval_metrics_hand_made():
    # 3 images, 5 texts; text j belongs to image owners[j]
    owners = [0, 0, 1, 2, 2]
    sim = np.array([
        # t0    t1    t2    t3    t4
        [0.90, 0.10, 0.20, 0.30, 0.00],  # image 0: its best text t0 is rank 0
        [0.50, 0.40, 0.30, 0.60, 0.70],  # image 1: its text t2 ranks 4th (index 4) -> found at R@5
        [0.10, 0.20, 0.30, 0.25, 0.05],  # image 2: best own text t3 (0.25) ranks after t2 (0.30) -> index 1
    ])
    m = retrieval_metrics(sim, owners)
    assert m["i2t_R@1"] == pytest.approx(100 / 3)
    assert m["i2t_R@5"] == pytest.approx(100.0) and m["i2t_R@10"] == pytest.approx(100.0)
    # text columns: t0 -> image 0 best (rank 0); t1 -> image 1 (0.4) > image 0 (0.1): rank 2 (image 2 0.2 too)
    # t2 -> image 1 (0.3) ties image 2 (0.3): pessimistic rank 1; t3 -> image 1 0.6 > image 2 0.25: rank 2
    # t4 -> image 1 0.7 > image 2 0.05: rank 1
    ranks = [0, 2, 1, 2, 1]
    for k in (1, 5, 10):
        assert m[f"t2i_R@{k}"] == pytest.approx(100 * np.mean([r < k for r in ranks]))
    assert m["mean_recall"] == pytest.approx(np.mean([m[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]))


def test_retrieval_metrics_perfect_and_reversed():
    perfect = retrieval_metrics(np.eye(12), list(range(12)))
    assert all(v == 100.0 for v in perfect.values())
    reversed_ = retrieval_metrics(-np.eye(12), list(range(12)))  # correct pair scores lowest: rank 11
    assert reversed_["i2t_R@10"] == 0.0 and reversed_["t2i_R@10"] == 0.0
    with pytest.raises(ValueError):
        retrieval_metrics(np.eye(3), [0, 1])


def test_confusion_matrix():
    matrix = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


@pytest.fixture(scope="module")
def small_aid(tmp_path_factory, shared_data) -> Path:
    """Four AID classes, 10 images each (symlinks): the val split holds 2 per class."""
    root = tmp_path_factory.mktemp("aid")
    for name in CLASSES:
        (root / name).mkdir()
        for path in sorted((shared_data / "aid" / name).iterdir())[:10]:
            (root / name / path.name).symlink_to(path.resolve())
    return root


def test_class_embeddings_are_normalised_prompt_means(tiny_model):
    encoder = TorchEncoder(create_model(None, checkpoint=tiny_model.checkpoint))
    prompts = [["airport", "an aerial image of airport"], ["beach"]]
    emb = class_embeddings(encoder, prompts)
    texts = encoder.encode_texts(["airport", "an aerial image of airport", "beach"])
    expected = texts[:2].mean(axis=0)
    np.testing.assert_allclose(emb[0], expected / np.linalg.norm(expected), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb[1], texts[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_checkpoint_and_bundle_give_the_same_zero_shot_numbers(tiny_model, exported_bundle, small_aid):
    vocab = REPO / "training" / "vocab" / "aid_classes.yaml"
    langs = ["en", "pt", "zh"]
    torch_encoder = TorchEncoder(create_model(None, checkpoint=tiny_model.checkpoint))
    bundle_encoder = BundleEncoder(exported_bundle)
    pairs = D.split_class_folder(small_aid)["train"]
    paths = [p for p, _ in pairs]
    # embeddings agree within the export's parity tolerance
    cos_images = np.sum(torch_encoder.encode_image_files(paths) * bundle_encoder.encode_image_files(paths), axis=1)
    assert cos_images.min() > 0.99
    texts = D.load_vocabulary(vocab).prompts("Beach", "pt", "heldout")
    cos_texts = np.sum(torch_encoder.encode_texts(texts) * bundle_encoder.encode_texts(texts), axis=1)
    assert cos_texts.min() > 0.999
    a = evaluate_data(torch_encoder, small_aid, langs, vocabulary=vocab, split="all")
    b = evaluate_data(bundle_encoder, small_aid, langs, vocabulary=vocab, split="all")
    assert a["prompt_part"] == "heldout" and a["classes"] == CLASSES
    for lang in langs:
        assert a["per_language"][lang]["n_images"] == 40
        # at most one of 40 predictions may flip on a near tie between the two runtimes
        assert abs(a["per_language"][lang]["top1"] - b["per_language"][lang]["top1"]) <= 100 / 40 + 1e-9
        assert np.abs(a["confusion"][lang] - b["confusion"][lang]).sum() <= 2


def test_cli_zero_shot_writes_json_and_confusion_files(tiny_model, small_aid, tmp_path):
    out = tmp_path / "res" / "eval.json"
    result = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--model", str(tiny_model.checkpoint), "--data", str(small_aid),
         "--vocabulary", str(REPO / "training" / "vocab" / "aid_classes.yaml"), "--langs", "en,ko", "-o", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["task"] == "zero_shot" and report["split"] == "val"
    assert set(report["per_language"]) == {"en", "ko"}
    assert report["per_language"]["ko"]["n_images"] == 8  # 2 validation images per class
    with open(out.parent / "eval.confusion-ko.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][1:] == CLASSES
    counts = np.array([[int(v) for v in row[1:]] for row in rows[1:]])
    assert counts.sum(axis=1).tolist() == [2, 2, 2, 2]
    assert np.trace(counts) / 8 * 100 == pytest.approx(report["per_language"]["ko"]["top1"])
    with Image.open(out.parent / "eval.confusion-en.png") as png:
        assert png.size[0] > 4 * 18 and png.mode == "RGB"
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "eval.confusion-en.csv", "eval.confusion-en.png", "eval.confusion-ko.csv", "eval.confusion-ko.png",
        "eval.json"]


def test_retrieval_on_caption_file_per_language(tiny_model, exported_bundle, small_aid, tmp_path):
    images, sidecar = [], []
    sentid = 0
    for name in CLASSES:
        for path in sorted((small_aid / name).iterdir())[:3]:
            caps = [f"an aerial image of {name.lower()}", f"{name.lower()} seen from above"]
            images.append({"filename": f"{name}/{path.name}", "split": "test",
                           "sentences": [{"raw": c, "sentid": sentid + i} for i, c in enumerate(caps)]})
            for i, c in enumerate(caps):
                sidecar.append({"image": f"{name}/{path.name}", "sentid": sentid + i, "lang": "pt", "text": f"pt {c}"})
            sentid += len(caps)
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": images}), encoding="utf-8")
    translations = tmp_path / "captions.translations.jsonl"
    translations.write_text("".join(json.dumps(r) + "\n" for r in sidecar), encoding="utf-8")
    results = [
        evaluate_data(encoder, captions, ["en", "pt", "zh"], images=small_aid, translations=[translations])
        for encoder in (TorchEncoder(create_model(None, checkpoint=tiny_model.checkpoint)), BundleEncoder(exported_bundle))
    ]
    for result in results:
        assert result["task"] == "retrieval" and result["split"] == "test"
        assert result["per_language"]["en"]["n_images"] == 12 and result["per_language"]["en"]["n_texts"] == 24
        assert result["per_language"]["pt"]["n_texts"] == 24
        assert "skipped" in result["per_language"]["zh"]
        assert result["per_language"]["en"]["i2t_R@10"] >= result["per_language"]["en"]["i2t_R@1"]
    # 12 images: R@10 of a random model is high but the two runtimes must agree closely
    assert results[0]["mean_recall"] == pytest.approx(results[1]["mean_recall"], abs=100 / 24 + 1e-9)


def test_cli_errors_are_one_line(tmp_path, small_aid):
    (tmp_path / "not_a_bundle").mkdir()
    for model, message in [(tmp_path / "not_a_bundle", "without bundle.json"), (tmp_path / "nope.pt", "does not exist")]:
        result = subprocess.run(
            [sys.executable, "-m", "training.evaluate", "--model", str(model), "--data", str(small_aid),
             "-o", str(tmp_path / "out.json")], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rsmclip-geo: error: --model") and message in lines[0]
    assert not (tmp_path / "out.json").exists()
