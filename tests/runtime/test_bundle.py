"""Bundle loading, validation, lookup by name, and the runtime encoders on the checked-in tiny bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from build_test_bundle import TINY_EMBED_DIM
from PIL import Image

from rsmclip_geo.bundle import BUNDLE_JSON, DEFAULT_MODEL, MODELS_ENV, find_bundles, load_bundle, resolve_bundle_path
from rsmclip_geo.cli import option_name
from rsmclip_geo.encoders import load_model, resolve_providers
from rsmclip_geo.errors import BundleError, RsmclipError


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_bundle_json(bundle: Path, **changes: object) -> None:
    path = bundle / BUNDLE_JSON
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_bundle_loads_and_reports_its_export_parity(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    info = bundle.info
    assert info.name == "tiny-bundle"
    assert info.embed_dim == TINY_EMBED_DIM
    assert info.parity["image_min_cosine"] >= 0.99999
    assert info.parity["text_min_cosine"] >= 0.99999
    assert info.parity["tokenizer_mismatches"] == 0
    assert info.parity["preprocess_max_abs_diff"] == 0.0
    assert len(bundle.fingerprint) == 64
    bundle.verify()  # every recorded sha256 matches


def test_encoders_return_normalised_embeddings(tiny_bundle: Path, shared_data: Path) -> None:
    model = load_model(tiny_bundle, providers=["cpu"], threads=1)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((shared_data / "figs").glob("*.jpg"))]
    image_emb = model.encode_images(images)
    text_emb = model.encode_texts(["aeroporto", "campo de golf", "储油罐"])
    assert image_emb.shape == (2, TINY_EMBED_DIM) and image_emb.dtype == np.float32
    assert text_emb.shape == (3, TINY_EMBED_DIM) and text_emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(image_emb[0], image_emb[1])


def test_batching_does_not_change_embeddings(tiny_bundle: Path, shared_data: Path) -> None:
    files = sorted((shared_data / "aid" / "Airport").glob("*.jpg"))[:5]
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    texts = ["an airport", "um aeroporto com muitos aviões e pistas", "机场", "x", "Flughafen"]
    whole = load_model(tiny_bundle, providers=["cpu"])
    small = load_model(tiny_bundle, providers=["cpu"], batch_size=2)
    np.testing.assert_allclose(whole.encode_images(images), small.encode_images(images), atol=1e-5)
    np.testing.assert_allclose(whole.encode_texts(texts), small.encode_texts(texts), atol=1e-5)
    single = np.concatenate([whole.encode_texts([t]) for t in texts])
    np.testing.assert_allclose(whole.encode_texts(texts), single, atol=1e-5)


def test_find_bundles_by_name_through_the_environment(tiny_bundle: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    copy_bundle(tiny_bundle, models / "my-model")
    (models / "not-a-bundle").mkdir()
    monkeypatch.setenv(MODELS_ENV, str(models))
    assert find_bundles() [0] == models / "my-model"
    assert load_bundle("my-model").path == models / "my-model"
    with pytest.raises(BundleError, match="no such bundle"):
        load_bundle("other-model")


def test_missing_default_model_says_to_pass_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    monkeypatch.setattr("rsmclip_geo.bundle.PACKAGE_MODELS_DIR", tmp_path / "none")
    monkeypatch.setattr("rsmclip_geo.bundle.USER_MODELS_DIR", tmp_path / "none2")
    with pytest.raises(BundleError, match=f"^model: the default model '{DEFAULT_MODEL}' is not installed.*give a "
                                          "bundle directory") as info:
        resolve_bundle_path(None)
    assert info.value.param == "model"


@pytest.mark.parametrize("field", ["embed_dim", "pad_id", "mean", "parity", "logit_scale"])
def test_missing_field_is_named(tiny_bundle: Path, tmp_path: Path, field: str) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    edit_bundle_json(bundle, **{field: None})
    with pytest.raises(BundleError, match=field) as err:
        load_bundle(bundle)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("changes, message", [
    ({"embed_dim": "32"}, "embed_dim"),
    ({"resize": "longest"}, "resize"),
    ({"precision": "fp8"}, "precision"),
    ({"std": [0.2, 0.0, 0.2]}, "std"),
    ({"format_version": 99}, "upgrade"),
])
def test_bad_field_values_are_rejected(tiny_bundle: Path, tmp_path: Path, changes: dict, message: str) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    edit_bundle_json(bundle, **changes)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_bundle_json_that_is_not_json(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    (bundle / BUNDLE_JSON).write_text("{ not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle)


def test_missing_onnx_file(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    (bundle / "text.onnx").unlink()
    with pytest.raises(BundleError, match="text.onnx.*missing"):
        load_bundle(bundle)


def test_corrupt_onnx_file_fails_on_first_use_with_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    data = (bundle / "image.onnx").read_bytes()
    (bundle / "image.onnx").write_bytes(data[: len(data) // 3])
    model = load_model(bundle, providers=["cpu"])
    model.encode_texts(["the text tower is intact"])
    with pytest.raises(BundleError, match="image.onnx.*corrupt") as err:
        model.encode_pixels(np.zeros((1, 3, 64, 64), np.float32))
    assert "\n" not in str(err.value)
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(bundle).verify()


def test_towers_with_mismatched_embedding_sizes(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    edit_bundle_json(bundle, embed_dim=TINY_EMBED_DIM * 2)
    model = load_model(bundle, providers=["cpu"])
    with pytest.raises(BundleError, match="embed_dim"):
        model.encode_texts(["x"])


def test_provider_choice() -> None:
    providers, forced = resolve_providers(["cpu"])
    assert providers == ["CPUExecutionProvider"] and forced
    auto, forced = resolve_providers(None)
    assert auto[-1] == "CPUExecutionProvider" and not forced
    with pytest.raises(RsmclipError, match="^providers=NoSuchExecutionProvider: not available") as info:
        resolve_providers(["NoSuchExecutionProvider"])
    assert info.value.worded(option_name).startswith("--provider NoSuchExecutionProvider: ")


def test_verify_names_a_listed_file_that_is_missing(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    files = json.loads((bundle / BUNDLE_JSON).read_text())["files"]
    edit_bundle_json(bundle, files={**files, "MODEL_CARD.md": "0" * 64})  # optional for loading, but listed
    loaded = load_bundle(bundle)
    with pytest.raises(BundleError, match=r"MODEL_CARD\.md: listed in bundle.json but missing"):
        loaded.verify()


def test_verify_runs_the_towers(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    edit_bundle_json(bundle, image_size=48)  # every file intact, but the image tower takes 64 px
    with pytest.raises(BundleError, match=r"the towers fail on a blank input .*re-export the bundle") as err:
        load_bundle(bundle).verify()
    assert "\n" not in str(err.value)


def test_outside_vocabulary(tiny_bundle: Path, tmp_path: Path) -> None:
    assert load_bundle(tiny_bundle).outside_vocabulary(["xyzzy"]) == []  # no vocabulary: nothing is outside
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    (bundle / "vocabulary.json").write_text(json.dumps({"terms": {"en": ["Airport"], "zh": ["储油罐"]}}))
    edit_bundle_json(bundle, vocabulary="vocabulary.json")
    texts = ["International AIRPORT", "储油罐", "储油", "xyzzy"]
    assert load_bundle(bundle).outside_vocabulary(texts) == ["xyzzy"]


def test_free_text_model_warns_only_for_text_it_has_no_tokens_for(tiny_bundle: Path, tmp_path: Path, caplog) -> None:
    """A bundle without a term vocabulary (a free-text model) warns when most of a query's tokens are unknown."""
    from rsmclip_geo import api

    model = load_model(tiny_bundle)
    assert model.tokenizer.unknown_share("𓀀𓀁𓀂 𓀃") == 1.0 and model.tokenizer.unknown_share("airport") == 0.0
    image = tmp_path / "chip.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(image)
    with caplog.at_level("WARNING"):
        api.classify([image], ["𓀀𓀁𓀂 𓀃", "airport", "аэропорт"], model=model)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("label '𓀀𓀁𓀂 𓀃' is mostly characters model")
