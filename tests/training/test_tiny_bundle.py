"""The checked-in tiny bundle (tests/data/tiny-bundle) is what scripts/build_test_bundle.py builds today."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from build_test_bundle import build_test_bundle
from PIL import Image

from rsmclip_geo.bundle import BUNDLE_JSON
from rsmclip_geo.encoders import load_model

TEXTS = ["aeroporto", "campo de golf", "储油罐", "Flughafen mit Flugzeugen", "공항", "пляж", "xyzzy plugh"]
REBUILD = ".venv/bin/python scripts/build_test_bundle.py"


def bundle_fields(bundle: Path) -> dict:
    """bundle.json without ``source`` (the temporary model folder and the digest of a checkpoint that names it)
    and without the ONNX files' digests (the exporter's bytes vary between torch builds; what the graphs compute
    is compared below); the tokenizer's digest stays."""
    info = json.loads((bundle / BUNDLE_JSON).read_text(encoding="utf-8"))
    del info["source"]
    info["files"] = {name: digest for name, digest in info["files"].items() if not name.endswith(".onnx")}
    return info


def fixed_images(shared_data: Path) -> list[np.ndarray]:
    """Two real photos, a non-square GeoTIFF and a seeded noise image."""
    images = [np.asarray(Image.open(path).convert("RGB")) for path in sorted((shared_data / "figs").glob("*.jpg"))]
    with Image.open(shared_data / "geotiff" / "colorado_rgb_15cm.tif") as scene:
        images.append(np.asarray(scene.convert("RGB")))
    images.append(np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8))
    return images


def test_checked_in_tiny_bundle_matches_a_rebuild(tiny_bundle: Path, shared_data: Path, tmp_path: Path) -> None:
    rebuilt = build_test_bundle(tmp_path / tiny_bundle.name)
    checked_in, fresh = bundle_fields(tiny_bundle), bundle_fields(rebuilt)
    assert fresh.pop("parity") == pytest.approx(checked_in.pop("parity"), abs=1e-6), f"rebuild it: {REBUILD}"
    assert fresh == checked_in, f"the checked-in bundle differs from a rebuild; rebuild it: {REBUILD}"
    images = fixed_images(shared_data)
    old, new = load_model(tiny_bundle, providers=["cpu"]), load_model(rebuilt, providers=["cpu"])
    np.testing.assert_allclose(new.encode_images(images), old.encode_images(images), atol=1e-5, rtol=0)
    np.testing.assert_allclose(new.encode_texts(TEXTS), old.encode_texts(TEXTS), atol=1e-5, rtol=0)
