"""Build the tiny test model bundle checked in under tests/data/tiny-bundle.

The model: a 2-layer ViT image tower (64 px input) and a 2-layer XLM-R-style Hugging Face text tower whose
tokenizer is trained here on multilingual text, both projecting to 32 dimensions, with seeded random weights
(so a rebuild gives the same model), exported by training.export as an fp32 ONNX bundle without torch weights.
The runtime suite (tests/runtime, no torch) uses the checked-in bundle; the training suite builds the same model
through torch and checks that the checked-in bundle still matches a rebuild (tests/training/test_tiny_bundle.py).

Rebuild it, and commit the result, when that check fails: after a change to the bundle format, the exporter,
the tokenizer trainer, the probe sentences or the recipe below. It needs the project venv (torch):

    .venv/bin/python scripts/build_test_bundle.py                 # replaces tests/data/tiny-bundle
    .venv/bin/python scripts/build_test_bundle.py -o DIR          # writes DIR instead
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN_BUNDLE = REPO_ROOT / "tests" / "data" / "tiny-bundle"

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
TINY_BUNDLE_VERSION = "0.0.1"
#: score step between the characters the Unigram trainer adds to the pieces it learnt
ADDED_CHARACTER_SCORE_STEP = 1e-4


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


def with_reproducible_ids(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer`` (Unigram) with its pieces in an order that does not change from one training to the next.

    The trainer orders pieces of equal score, and hands the characters it adds to the pieces it learnt their
    scores (steps of 1e-4), in hash order, and its sums differ from run to run around the 12th decimal: here
    scores are rounded to 6 decimals, the added characters take their scores in character order, and pieces go
    by score, then text.
    The special tokens keep their ids.
    """
    from tokenizers import Tokenizer

    from training.tokenizer import SPECIAL_TOKENS

    data = json.loads(tokenizer.to_str())
    vocab = data["model"]["vocab"]
    special = vocab[:len(SPECIAL_TOKENS)]
    pieces = [(piece, round(score, 6)) for piece, score in vocab[len(SPECIAL_TOKENS):]]
    scores = [score for _, score in pieces]
    added = [(piece, score) for piece, score in pieces if len(piece) == 1 and any(
        math.isclose(abs(score - other), ADDED_CHARACTER_SCORE_STEP, abs_tol=2e-6) for other in scores)]
    added_scores = dict(zip(sorted(piece for piece, _ in added), sorted((score for _, score in added), reverse=True)))
    pieces = sorted(((piece, added_scores.get(piece, score)) for piece, score in pieces),
                    key=lambda item: (-item[1], item[0]))
    data["model"]["vocab"] = special + [list(item) for item in pieces]
    return Tokenizer.from_str(json.dumps(data))


def build_tiny_model(root: Path) -> TinyModel:
    """Write the tiny open_clip model (ViT + XLM-R-style HF text tower, seeded random weights) under ``root``."""
    import torch

    from training.model import create_model, save_checkpoint
    from training.tokenizer import train_tokenizer, write_hf_text_dir

    tokenizer = with_reproducible_ids(train_tokenizer(multilingual_corpus(), vocab_size=400))
    hf_dir = write_hf_text_dir(root / "hf_text", tokenizer, context_length=TINY_CONTEXT_LENGTH, **TINY_TEXT_CONFIG)
    config_json = root / "tiny_clip.json"
    config_json.write_text(json.dumps(TINY_MODEL_CONFIG), encoding="utf-8")
    torch.manual_seed(0)
    loaded = create_model(config_json, hf_text_dir=hf_dir)
    checkpoint = save_checkpoint(loaded, root / "tiny.pt")
    return TinyModel(config_json=config_json, hf_text_dir=hf_dir, checkpoint=checkpoint)


def export_tiny_bundle(tiny: TinyModel, out: Path, torch_weights: str | None = None) -> Path:
    """Export the tiny model as an fp32 bundle directory ``out`` named after it; ``torch_weights`` as in
    training.export.export_bundle ("fp32" adds weights.safetensors for the torch backend)."""
    from training.export import export_bundle
    from training.model import create_model

    loaded = create_model(None, checkpoint=tiny.checkpoint)
    return export_bundle(loaded, out, name=out.name, version=TINY_BUNDLE_VERSION, torch_weights=torch_weights)


def build_test_bundle(out: Path) -> Path:
    """Build the tiny model in a temporary folder and export it to ``out`` (ONNX only): the checked-in bundle."""
    with tempfile.TemporaryDirectory(prefix="rsmclip-tiny-model-") as tmp:
        return export_tiny_bundle(build_tiny_model(Path(tmp)), out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=CHECKED_IN_BUNDLE,
                        help=f"bundle directory to write (default {CHECKED_IN_BUNDLE.relative_to(REPO_ROOT)})")
    args = parser.parse_args(argv)
    print(build_test_bundle(args.output))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
