"""Fixtures of the runtime suite (no torch): the tiny bundle and the shipped default bundle loaded on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from rsmclip_geo.bundle import DEFAULT_MODEL
from rsmclip_geo.encoders import load_model

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(tiny_bundle: Path):
    """The checked-in tiny bundle loaded with two threads."""
    return load_model(tiny_bundle, threads=2)


@pytest.fixture(scope="session")
def demo_model():
    """The shipped default bundle (rsmclip_geo/models/DEFAULT_MODEL) loaded on the CPU."""
    return load_model(REPO_ROOT / "rsmclip_geo" / "models" / DEFAULT_MODEL, providers=["cpu"])
