"""Fixtures of both suites (tests/runtime without torch, tests/training with it): the real data folder, the
checked-in tiny model bundle, and bundle lookup confined to the package's models folder."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT / ".." / "shared" / "data"
TINY_BUNDLE = REPO_ROOT / "tests" / "data" / "tiny-bundle"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real data folder (../shared/data from the repository root)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data folder missing: {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_bundle() -> Path:
    """The checked-in tiny bundle tests/data/tiny-bundle (scripts/build_test_bundle.py): a 2-layer ViT (64 px) and
    a 2-layer XLM-R-style text tower, 32-d, seeded random weights, fp32 ONNX without torch weights.
    Tests copy it before changing anything in it."""
    if not (TINY_BUNDLE / "bundle.json").is_file():
        pytest.fail(f"{TINY_BUNDLE} missing: build it with `.venv/bin/python scripts/build_test_bundle.py`")
    return TINY_BUNDLE


@pytest.fixture
def package_models_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Resolve bundle names in the package's models folder only (no user or $RSMCLIP_GEO_MODELS bundles)."""
    monkeypatch.delenv("RSMCLIP_GEO_MODELS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
