"""Fixtures of the training suite (torch): the tiny model built through torch, its export with torch weights,
and a Hugging Face cache holding RS-M-CLIP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from build_test_bundle import TinyModel, build_tiny_model, export_tiny_bundle

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """The tiny open_clip model of scripts/build_test_bundle.py (ViT + XLM-R-style HF text tower, seeded weights)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def exported_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel) -> Path:
    """``tiny_model`` exported in this session as an fp32 bundle with torch weights (weights.safetensors)."""
    return export_tiny_bundle(tiny_model, tmp_path_factory.mktemp("bundles") / "tiny-bundle", torch_weights="fp32")


@pytest.fixture(scope="session")
def rs_m_clip_hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF_HOME whose hub cache holds joaodaniel/RS-M-CLIP (open_clip's xlm-roberta-base-ViT-B-32, seeded
    RANDOM weights, 1.5 GB) and xlm-roberta-base (config + the real XLM-R tokenizer): training/hub_cache.py.
    Built in a child process, so the 366 M-parameter model never stays in the test process."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    result = subprocess.run([sys.executable, "-m", "training.hub_cache", str(hf_home)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        pytest.fail(f"python -m training.hub_cache failed:\n{result.stderr[-3000:]}")
    return hf_home
