"""Shared fixtures: the real data folder and a tiny exported model bundle.

``tiny_model`` describes a small open_clip model (a 2-layer ViT image tower and a 2-layer
XLM-R-style HF text tower whose tokenizer is trained here on multilingual text) saved as a
self-contained checkpoint; ``tiny_bundle`` is that model exported with ``training.export``.
Both are built once per test session, in seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT / ".." / "shared" / "data"

TINY_EMBED_DIM = 32
TINY_IMAGE_SIZE = 64
TINY_CONTEXT_LENGTH = 32
TINY_MODEL_CONFIG = {
    "embed_dim": TINY_EMBED_DIM,
    "vision_cfg": {"image_size": TINY_IMAGE_SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {
        "hf_model_name": "tiny-xlm-roberta",
        "hf_tokenizer_name": "tiny-xlm-roberta",
        "hf_pooler_type": "mean_pooler",
        "hf_proj_type": "linear",
        "context_length": TINY_CONTEXT_LENGTH,
    },
}
TINY_TEXT_CONFIG = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96}


@dataclass(frozen=True)
class TinyModel:
    """Files describing the tiny test model."""

    config_json: Path  # open_clip model config (architecture only)
    hf_text_dir: Path  # HF config.json + tokenizer.json for the text tower
    checkpoint: Path  # self-contained checkpoint (state dict + architecture payload)


def multilingual_corpus() -> list[str]:
    """Text to train the tiny tokenizer on: the packaged probe sentences and AID class names in ten languages."""
    probes = json.loads((REPO_ROOT / "training" / "probes" / "texts.json").read_text(encoding="utf-8"))
    texts = [text for sentences in probes.values() for text in sentences]
    texts += [
        "airport", "aeroporto", "aeropuerto", "aéroport", "Flughafen", "luchthaven", "机场", "공항", "аэропорт",
        "golf course", "campo de golfe", "campo de golf", "terrain de golf", "Golfplatz", "golfbaan", "高尔夫球场",
        "storage tanks", "tanques de armazenamento", "réservoirs", "Tanklager", "opslagtanks", "储油罐", "저장 탱크",
        "beach", "praia", "playa", "plage", "Strand", "spiaggia", "海滩", "해변", "пляж",
        "forest", "floresta", "bosque", "forêt", "Wald", "bos", "foresta", "森林", "숲", "лес",
        "river", "rio", "río", "rivière", "Fluss", "rivier", "fiume", "河流", "강", "река",
    ]
    return texts * 3


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real data folder (../shared/data from the repository root)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data folder missing: {SHARED_DATA}")
    return SHARED_DATA


def build_tiny_model(root: Path) -> TinyModel:
    """Write the tiny open_clip model (ViT + XLM-R-style HF text tower, seeded random weights) under ``root``."""
    import torch

    from training.model import create_model, save_checkpoint
    from training.tokenizer import train_tokenizer, write_hf_text_dir

    tokenizer = train_tokenizer(multilingual_corpus(), vocab_size=400)
    hf_dir = write_hf_text_dir(root / "hf_text", tokenizer, context_length=TINY_CONTEXT_LENGTH, **TINY_TEXT_CONFIG)
    config_json = root / "tiny_clip.json"
    config_json.write_text(json.dumps(TINY_MODEL_CONFIG), encoding="utf-8")
    torch.manual_seed(0)
    loaded = create_model(config_json, hf_text_dir=hf_dir)
    checkpoint = save_checkpoint(loaded, root / "tiny.pt")
    return TinyModel(config_json=config_json, hf_text_dir=hf_dir, checkpoint=checkpoint)


def build_tiny_bundle(tiny: TinyModel, out: Path) -> Path:
    """Export the tiny model as an fp32 bundle directory ``out`` (with torch weights)."""
    from training.export import export_bundle
    from training.model import create_model

    loaded = create_model(None, checkpoint=tiny.checkpoint)
    return export_bundle(loaded, out, name=out.name, version="0.0.1", torch_weights="fp32")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A tiny open_clip model (ViT + XLM-R-style HF text tower) with seeded random weights."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel) -> Path:
    """The tiny model exported as an fp32 bundle directory (with torch weights); returns its Path."""
    return build_tiny_bundle(tiny_model, tmp_path_factory.mktemp("bundles") / "tiny-bundle")


@pytest.fixture(scope="session")
def rs_m_clip_hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF_HOME whose hub cache holds joaodaniel/RS-M-CLIP (open_clip's xlm-roberta-base-ViT-B-32, seeded
    RANDOM weights, 1.5 GB) and xlm-roberta-base (config + the real XLM-R tokenizer): training/hub_cache.py.
    Built in a child process, so the 366 M-parameter model never stays in the test process."""
    import subprocess
    import sys

    hf_home = tmp_path_factory.mktemp("hf_home")
    result = subprocess.run([sys.executable, "-m", "training.hub_cache", str(hf_home)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        pytest.fail(f"python -m training.hub_cache failed:\n{result.stderr[-3000:]}")
    return hf_home


@pytest.fixture
def package_models_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Resolve bundle names in the package's models folder only (no user or $RSMCLIP_GEO_MODELS bundles)."""
    monkeypatch.delenv("RSMCLIP_GEO_MODELS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture(scope="session")
def demo_model():
    """The shipped default bundle (rsmclip_geo/models/DEFAULT_MODEL) loaded on the CPU."""
    from rsmclip_geo.bundle import DEFAULT_MODEL
    from rsmclip_geo.encoders import load_model

    return load_model(REPO_ROOT / "rsmclip_geo" / "models" / DEFAULT_MODEL, providers=["cpu"])
