"""`rsmclip-geo classify` and `rsmclip-geo models` through the real CLI entry point on an exported bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rsmclip_geo.classify import softmax_probabilities
from rsmclip_geo.cli import main
from rsmclip_geo.cli.display import display_width
from rsmclip_geo.encoders import load_model


def figs(shared_data: Path) -> list[str]:
    return [str(p) for p in sorted((shared_data / "figs").glob("*.jpg"))]


LABELS = ["Many airplanes in the open area.", "Un campo de golf con bunkers.", "储油罐"]


def test_json_lines_match_the_encoders(tiny_bundle: Path, shared_data: Path, capsys: pytest.CaptureFixture) -> None:
    images = figs(shared_data) + [str(sorted((shared_data / "aid" / "Port").glob("*.jpg"))[0])]
    assert main(["classify", *images, "--labels", *LABELS, "--model", str(tiny_bundle), "--json",
                 "--provider", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == images
    model = load_model(tiny_bundle, providers=["cpu"])
    from rsmclip_geo.raster import read_image

    expected = softmax_probabilities(model.encode_images([read_image(p) for p in images]),
                                     model.encode_texts(LABELS), model.logit_scale)
    for line, row in zip(lines, expected):
        assert list(line["probabilities"]) == LABELS
        np.testing.assert_allclose(list(line["probabilities"].values()), row, atol=1e-6)
        assert line["label"] == LABELS[int(np.argmax(row))]
        assert line["score"] == pytest.approx(float(row.max()), abs=1e-6)
        assert sum(line["probabilities"].values()) == pytest.approx(1.0)


def test_table_output_and_labels_file(tiny_bundle: Path, shared_data: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("# classes\naeroporto\n\ncampo de golfe\n", encoding="utf-8")
    assert main(["classify", *figs(shared_data), "--labels", "储油罐", "--labels-file", str(labels_file),
                 "--model", str(tiny_bundle), "--top", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("airplane_004.jpg") and out[0].count("%") == 2


def test_output_file_is_written_whole(tiny_bundle: Path, shared_data: Path, tmp_path: Path) -> None:
    target = tmp_path / "result.jsonl"
    assert main(["classify", *figs(shared_data), "--labels", "a", "b", "--model", str(tiny_bundle), "--json",
                 "-o", str(target)]) == 0
    assert len(target.read_text().splitlines()) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["result.jsonl"]


def test_default_model_missing_is_one_error_line(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("RSMCLIP_GEO_MODELS", str(tmp_path))
    monkeypatch.setattr("rsmclip_geo.bundle.PACKAGE_MODELS_DIR", tmp_path / "none")
    monkeypatch.setattr("rsmclip_geo.bundle.USER_MODELS_DIR", tmp_path / "none2")
    assert main(["classify", *figs(shared_data), "--labels", "a", "b"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rsmclip-geo: error: ") and "--model" in err


@pytest.mark.parametrize("make_args, message", [
    (lambda d, b, t: [str(t / "notes.txt"), "--labels", "a", "b"], "notes.txt: not a readable image"),
    (lambda d, b, t: [str(t / "missing.jpg"), "--labels", "a", "b"], "missing.jpg: image not found"),
    (lambda d, b, t: [d, "--labels", "only-one"], "at least two labels"),
    (lambda d, b, t: [d, "--labels", "a", "a"], "duplicate"),
    (lambda d, b, t: [d, "--labels", "a", "b", "--labels-file", str(t / "nope.txt")], "--labels-file"),
    (lambda d, b, t: [d, "--labels", "a", "b", "--provider", "NoSuchExecutionProvider"], "--provider"),
    (lambda d, b, t: [d, "--labels", "a", "b", "-o", str(t / "no" / "dir.jsonl")], "-o"),
])
def test_bad_input_is_one_error_line(tiny_bundle: Path, shared_data: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture, make_args, message: str) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    args = ["classify", *make_args(figs(shared_data)[0], tiny_bundle, tmp_path)]
    if "--model" not in args:
        args += ["--model", str(tiny_bundle)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rsmclip-geo: error: ")
    assert message in err


def test_broken_bundle_through_the_cli(tiny_bundle: Path, shared_data: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    bundle = shutil.copytree(tiny_bundle, tmp_path / "broken")
    (bundle / "image.onnx").write_bytes(b"\x00garbage")
    assert main(["classify", figs(shared_data)[0], "--labels", "a", "b", "--model", str(bundle)]) == 2
    assert "image.onnx" in capsys.readouterr().err


def test_models_lists_bundles(tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_bundle, models / "tiny-bundle")
    broken = shutil.copytree(tiny_bundle, models / "broken")
    (broken / "bundle.json").write_text("{}")
    monkeypatch.setenv("RSMCLIP_GEO_MODELS", str(models))
    assert main(["models", "--json", "--verify"]) == 2  # the list, then one error line naming the broken bundle
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("rsmclip-geo: error: --verify: 1 of ")
    assert "bundles do not verify: broken (" in err
    lines = [json.loads(line) for line in out.splitlines()]
    good = [line for line in lines if "error" not in line and line["path"].startswith(str(models))]
    bad = [line for line in lines if "error" in line]
    assert [line["name"] for line in good] == ["tiny-bundle"]
    assert good[0]["embed_dim"] == 32 and good[0]["torch_weights"] is False  # ONNX only
    assert good[0]["parity_min_cosine"] >= 0.99999
    assert len(bad) == 1 and "missing field" in bad[0]["error"]
    assert main(["models"]) == 0
    assert "tiny-bundle" in capsys.readouterr().out


def test_shipped_bundle_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("RSMCLIP_GEO_MODELS", raising=False)
    monkeypatch.setattr("rsmclip_geo.bundle.USER_MODELS_DIR", tmp_path / "none")
    assert main(["models", "--verify", "--json"]) == 0
    lines = {line["name"]: line for line in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(lines) == {"rsmclip-e5-lite0", "rsmclip-demo-aid"} and not any("error" in line for line in lines.values())
    assert lines["rsmclip-e5-lite0"]["default"] is True and lines["rsmclip-e5-lite0"]["torch_weights"] is False
    assert lines["rsmclip-demo-aid"]["default"] is False and lines["rsmclip-demo-aid"]["torch_weights"] is True


def test_labels_file_with_a_byte_order_mark(tiny_bundle: Path, shared_data: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\ufeff# classes\naeroporto\ncampo de golfe\n", encoding="utf-8")
    assert main(["classify", figs(shared_data)[0], "--labels-file", str(labels_file), "--model", str(tiny_bundle),
                 "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["probabilities"]) == ["aeroporto", "campo de golfe"]


def test_table_aligns_wide_image_names(tiny_bundle: Path, shared_data: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    wide = shutil.copy(figs(shared_data)[0], tmp_path / "储油罐.jpg")
    plain = shutil.copy(figs(shared_data)[1], tmp_path / "tanks_01.jpg")
    assert main(["classify", wide, plain, "--labels", "alpha", "beta", "--model", str(tiny_bundle), "--top", "1"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("储油罐.jpg") and rows[1].startswith("tanks_01.jpg")
    label_columns = [display_width(row[:max(row.find("alpha"), row.find("beta"))]) for row in rows]
    assert label_columns == [14, 14]  # 12 columns of names (储油罐 takes 6) and two spaces


def test_automatic_provider_choice_prints_nothing(tiny_bundle: Path, shared_data: Path,
                                                  capfd: pytest.CaptureFixture) -> None:
    """With no --provider, a CUDA provider that is listed but cannot load must not spam stderr."""
    assert main(["classify", *figs(shared_data), "--labels", "a", "b", "--model", str(tiny_bundle), "--json"]) == 0
    captured = capfd.readouterr()
    assert captured.err == ""
    assert len(captured.out.splitlines()) == 2
