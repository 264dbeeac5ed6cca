"""Export an open_clip model to a model bundle (ONNX towers + tokenizer.json + bundle.json) with a parity check.

    python -m training.export --model NAME [--checkpoint PATH] [--hf-text-dir DIR] -o DIR
                              [--precision fp32|fp16|int8 [--calibration-images DIR]] [--torch-weights]
                              [--prune-vocabulary [WORDS] [--prune-texts FILE ...]]

The towers are exported with torch.onnx's dynamo exporter (symbolic batch, dynamic text length,
opset 18). Before the bundle is moved into place, the probe images and multilingual sentences
shipped in ``training/probes`` run through torch and through the bundle on ONNX Runtime (the
runtime's own numpy preprocessing and tokenizer.json tokeniser); the bundle is refused when the
minimum cosine falls below the precision's threshold or, for int8, when a probe image's top-1
sentence changes to one that torch scores clearly below its best.

RS-M-CLIP with Hugging Face hub access (joaodaniel/RS-M-CLIP and xlm-roberta-base go to the HF cache):

    python -m training.export --model hf-hub:joaodaniel/RS-M-CLIP -o models/rs-m-clip [--precision int8]

Without it, with the files of both hub repositories copied to folders RS-M-CLIP/ (open_clip_config.json
and the weights file) and xlm-roberta-base/ (config.json, tokenizer.json):

    python -m training.export --model RS-M-CLIP/open_clip_config.json \\
        --checkpoint RS-M-CLIP/open_clip_model.safetensors --hf-text-dir xlm-roberta-base/ -o models/rs-m-clip
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsmclip_geo import bundle as bundle_format
from rsmclip_geo.errors import RsmclipError
from rsmclip_geo.files import replace_directory, sha256_file
from training.model import LoadedModel, architecture_payload, create_model, quiet_library_warnings
from training.vocab_prune import DEFAULT_WORDS_PER_LANGUAGE, prune_loaded_model

log = logging.getLogger("training.export")

OPSET = 18
MAX_IR_VERSION = 10  # readable by onnxruntime >= 1.17
PARITY_THRESHOLDS = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.99}
#: int8 may rank another probe sentence first only where torch scored it within this cosine of its best
#: (near ties: the probes say the same thing in several languages)
INT8_TOP1_GAP = 0.005
TORCH_WEIGHT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
PROBES_DIR = Path(__file__).resolve().parent / "probes"
INT8_WEIGHT_BLOCK = 32  # input rows sharing one scale in a text tower's int8 MatMul weights
CALIBRATION_IMAGES = 256  # images whose activations set the static int8 ranges
CALIBRATION_BATCH = 32
CALIBRATION_SUFFIXES = (".jpg", ".jpeg", ".png")
RSMCLIP_LANGUAGES = ("en", "pt", "es", "fr", "de", "nl", "it", "zh", "ko", "ru")
VOCABULARY_JSON = "vocabulary.json"
MODEL_CARD = "MODEL_CARD.md"
_TEMP_OUTPUT = "embedding_out"  # the dynamo exporter may already use "embedding" for an internal value


class _ImageTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


class _TextTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids)


class _ClipTextTower(torch.nn.Module):
    """open_clip's own CLIP text transformer at any length up to the context length.

    ``CLIP.encode_text`` adds the full positional table, so it only traces at the context length.
    With a causal mask and end-of-text pooling, slicing the positional table and the mask to the
    input length gives the same embedding (the parity check confirms it on every export).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        model = self.model
        length = input_ids.shape[1]
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(input_ids).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
        x = text_global_pool(x, input_ids, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        if model.text_projection is None:
            return x
        if isinstance(model.text_projection, torch.nn.Linear):
            return model.text_projection(x)
        return x @ model.text_projection


def text_tower(model: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    """(module to export, dynamic length?) for a model's text tower."""
    if hasattr(model, "text"):  # CustomTextCLIP: HF towers and open_clip's TextTransformer slice by length
        return _TextTower(model), True
    if getattr(model, "text_pool_type", None) in ("argmax", "eos") and getattr(model, "attn_mask", None) is not None:
        return _ClipTextTower(model), True
    return _TextTower(model), False  # fixed length: the runtime pads to it


# ---------------------------------------------------------------- ONNX export


def export_tower(module: torch.nn.Module, example: torch.Tensor, input_name: str, path: Path,
                 max_length: int | None = None) -> None:
    """Export one tower with a symbolic batch axis (and text length up to ``max_length``)."""
    import onnx

    if example.shape[0] < 2:
        raise ValueError("trace with a batch of at least 2, or the batch axis is specialised to 1")
    axes: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=65536)}
    if max_length is not None:
        axes[1] = torch.export.Dim("length", min=2, max=max_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (example,), None, input_names=[input_name], output_names=[_TEMP_OUTPUT],
            opset_version=OPSET, dynamo=True, dynamic_shapes={input_name: axes}, verbose=False,
        )
    proto = program.model_proto
    _rename_value(proto.graph, "embedding", "embedding_internal")
    _rename_value(proto.graph, _TEMP_OUTPUT, "embedding")
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch_dim.dim_param:
        raise RuntimeError(f"{path.name}: the exported batch axis is fixed ({batch_dim.dim_value}), not symbolic")
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    onnx.save(proto, str(path))


def _rename_value(graph: Any, old: str, new: str) -> None:
    """Rename a value everywhere in a graph (node inputs/outputs, graph inputs/outputs, value_info)."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.name == old:
            value.name = new


def set_onnx_metadata(path: Path, tower: str, info: dict[str, Any]) -> None:
    """Repeat the key bundle.json fields in the ONNX file's metadata_props."""
    import onnx

    proto = onnx.load(str(path))
    keys = ("format_version", "name", "version", "architecture", "embed_dim", "image_size", "mean", "std",
            "resize", "interpolation", "context_length", "pad_id", "logit_scale", "precision")
    props = {"rsmclip_geo.tower": tower, **{f"rsmclip_geo.{key}": json.dumps(info[key]) for key in keys}}
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))


def convert_precision(path: Path, precision: str, calibration: np.ndarray | None = None, *,
                      weight_only: bool = False) -> None:
    """Rewrite an fp32 tower as fp16 (float32 inputs/outputs kept) or int8.

    int8 with ``calibration`` (float32 model inputs): static QDQ quantisation of every op ONNX Runtime
    quantises, convolutions included; activation ranges come from the calibration inputs, weights are
    per channel, in the reduced 7-bit range that keeps CPUs without VNNI from saturating. int8 with
    ``weight_only`` (text towers): MatMul weights int8 in blocks of INT8_WEIGHT_BLOCK input rows
    (MatMulNBits; activations stay float32, so attention's outliers are not rounded: dynamic quantisation
    took multilingual-e5-small's text tower to cosine 0.971) and the embedding tables int8 per row. int8
    otherwise: dynamic quantisation of the MatMul/Gemm weights, per channel (activations scaled per batch at
    run time), and of the embedding tables (Gather).
    """
    import onnx

    if precision == "fp32":
        return
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        proto = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
        _topological_sort(proto.graph)  # the converter appends the input casts at the end of the graph
        onnx.save(proto, str(path))
    elif precision == "int8":
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        proto = onnx.load(str(path))
        del proto.graph.value_info[:]  # the exporter's stored shapes trip the quantiser's shape inference
        onnx.save(proto, str(path))
        quantized = path.with_name(path.stem + ".int8.onnx")
        with quiet_library_warnings("onnxruntime"):  # advice to run its pre-processing script
            if calibration is not None:
                quantize_static(str(path), str(quantized), _calibration_reader(proto.graph.input[0].name, calibration),
                                quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            elif weight_only:
                matmuls = MatMulNBitsQuantizer(proto, bits=8, block_size=INT8_WEIGHT_BLOCK, is_symmetric=True,
                                               op_types_to_quantize=("MatMul",))
                matmuls.process()
                matmuls.model.save_model_to_file(str(path), use_external_data_format=False)
                quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8, per_channel=True,
                                 op_types_to_quantize=["Gather"])
            else:
                quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8, per_channel=True,
                                 op_types_to_quantize=["MatMul", "Gemm", "Gather"])
        os.replace(quantized, path)
    else:
        raise RsmclipError(f"--precision {precision!r}: choose fp32, fp16 or int8")
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    onnx.save(proto, str(path))


def _calibration_reader(input_name: str, inputs: np.ndarray) -> Any:
    """ONNX Runtime's calibration reader over ``inputs`` in batches of CALIBRATION_BATCH."""
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter({input_name: inputs[start:start + CALIBRATION_BATCH]}
                               for start in range(0, len(inputs), CALIBRATION_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    return Batches()


def quantization_method(tower: str, calibration: np.ndarray | None) -> str:
    """How `convert_precision` quantises ``tower`` to int8 with these calibration inputs (bundle.json's quantization)."""
    if tower == "text":
        return f"weight-only: MatMul weights int8 in blocks of {INT8_WEIGHT_BLOCK}, embedding tables int8 per row"
    return "dynamic" if calibration is None else f"static, {len(calibration)} calibration images"


def calibration_pixels(directory: str | os.PathLike, info: dict[str, Any], count: int = CALIBRATION_IMAGES) -> np.ndarray:
    """Image-tower inputs for static int8 calibration: ``count`` images spread evenly over the sorted image
    files under ``directory``, through the runtime's preprocessing for the bundle.json fields ``info``."""
    from PIL import Image

    from rsmclip_geo.preprocess import preprocess_images

    files = sorted(path for path in Path(directory).rglob("*") if path.suffix.lower() in CALIBRATION_SUFFIXES)
    if not files:
        raise RsmclipError(f"--calibration-images {directory}: no {'/'.join(CALIBRATION_SUFFIXES)} images found; "
                           "pass a folder of scenes like the ones the model will index")
    picks = sorted(set(np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int).tolist()))
    images = []
    for i in picks:
        with Image.open(files[i]) as image:
            images.append(np.asarray(image.convert("RGB")))
    return preprocess_images(images, bundle_format.BundleInfo.from_dict(info))


def _topological_sort(graph: Any) -> None:
    """Reorder graph nodes so every node comes after the producers of its inputs."""
    available = {value.name for value in graph.input} | {init.name for init in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [node for node in pending if all(name in available for name in node.input)]
        if not ready:
            raise RuntimeError("ONNX graph has a cycle or an input that no node produces")
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
        ready_ids = {id(node) for node in ready}
        pending = [node for node in pending if id(node) not in ready_ids]
    copies = [type(node)() for node in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


# ---------------------------------------------------------------- tokenizer.json


def bundle_tokenizer_json(loaded: LoadedModel) -> str:
    """tokenizer.json text for the bundle: the HF tower's own, or converted from open_clip's CLIP BPE."""
    if loaded.is_hf_text:
        if not loaded.tokenizer_json:
            raise RsmclipError(f"{loaded.name}: the HF text tower has no fast tokenizer (tokenizer.json)")
        return loaded.tokenizer_json
    return clip_bpe_tokenizer_json(loaded.tokenizer)


def clip_bpe_tokenizer_json(simple_tokenizer: Any) -> str:
    """Convert open_clip's SimpleTokenizer (CLIP byte-level BPE) to a `tokenizers` tokenizer.json.

    Lower-case, NFC, collapsed whitespace; CLIP's word regex; byte-level BPE with ``</w>`` word
    ends; ``<start_of_text> … <end_of_text>`` added by the post-processor.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if not hasattr(simple_tokenizer, "bpe_ranks"):
        raise RsmclipError(f"text tokenizer {type(simple_tokenizer).__name__} is neither an HF tokenizer nor "
                           "open_clip's CLIP BPE; it cannot be exported")
    merges = [pair for pair, _ in sorted(simple_tokenizer.bpe_ranks.items(), key=lambda item: item[1])]
    sot, eot = simple_tokenizer.all_special_ids[:2]
    sot_token, eot_token = simple_tokenizer.decoder[sot], simple_tokenizer.decoder[eot]
    tokenizer = Tokenizer(models.BPE(vocab=dict(simple_tokenizer.encoder), merges=merges, end_of_word_suffix="</w>",
                                     continuing_subword_prefix="", fuse_unk=False, unk_token=eot_token))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{sot_token} $A {eot_token}", special_tokens=[(sot_token, sot), (eot_token, eot)])
    tokenizer.add_special_tokens([sot_token, eot_token])
    return tokenizer.to_str()


# ---------------------------------------------------------------- bundle.json


def describe_architecture(loaded: LoadedModel) -> str:
    """One line naming the towers, e.g. 'ViT-B/32 (224 px, width 768, 12 layers) + xlm-roberta (768, 12 layers)'."""
    vision = loaded.config.get("vision_cfg", {})
    if "timm_model_name" in vision:
        image = f"timm {vision['timm_model_name']}"
    else:
        image = (f"ViT/{vision.get('patch_size', '?')} ({vision.get('image_size', '?')} px, width "
                 f"{vision.get('width', '?')}, {vision.get('layers', '?')} layers)")
    if loaded.is_hf_text and loaded.hf_text_config:
        hf = loaded.hf_text_config
        text = (f"{hf.get('model_type', 'hf')} ({hf.get('hidden_size', '?')}, {hf.get('num_hidden_layers', '?')} "
                f"layers, vocab {hf.get('vocab_size', '?')})")
    else:
        text_cfg = loaded.config.get("text_cfg", {})
        text = (f"CLIP text transformer (width {text_cfg.get('width', '?')}, {text_cfg.get('layers', '?')} layers, "
                f"vocab {text_cfg.get('vocab_size', '?')})")
    return f"open_clip {type(loaded.model).__name__}: {image} + {text}"


def bundle_info(loaded: LoadedModel, *, name: str, version: str, precision: str,
                languages: Sequence[str] | None, default_tile_size: int | None) -> dict[str, Any]:
    """bundle.json fields known before export (parity and files are added after measuring)."""
    pp = loaded.preprocess_cfg
    size = pp["size"][0] if isinstance(pp["size"], list) else pp["size"]
    if isinstance(pp["size"], list) and pp["size"][0] != pp["size"][1]:
        raise RsmclipError(f"{loaded.name}: non-square image size {pp['size']} is not supported by bundles")
    if pp.get("resize_mode", "shortest") not in bundle_format.RESIZE_POLICIES:
        raise RsmclipError(f"{loaded.name}: resize mode {pp.get('resize_mode')!r} is not supported by the runtime "
                           f"({', '.join(bundle_format.RESIZE_POLICIES)})")
    if loaded.is_hf_text:
        pad_id = int(loaded.hf_text_config["pad_token_id"])
        default_languages = RSMCLIP_LANGUAGES
    else:
        pad_id = int(loaded.config.get("text_cfg", {}).get("pad_id", 0))
        default_languages = ("en",)
    source = {"model": loaded.source.get("model"), "checkpoint_sha256": loaded.source.get("checkpoint_sha256"),
              "pretrained": loaded.source.get("pretrained")}
    info: dict[str, Any] = {
        "format_version": bundle_format.FORMAT_VERSION,
        "name": name,
        "version": version,
        "source": source,
        "architecture": describe_architecture(loaded),
        "embed_dim": int(loaded.config["embed_dim"]),
        "image_size": int(size),
        "mean": [float(v) for v in pp["mean"]],
        "std": [float(v) for v in pp["std"]],
        "resize": pp.get("resize_mode", "shortest"),
        "interpolation": pp.get("interpolation", "bicubic"),
        "context_length": int(loaded.context_length),
        "pad_id": pad_id,
        "languages": list(languages or default_languages),
        "logit_scale": float(loaded.model.logit_scale.detach().exp().item()),
        "precision": precision,
        "parity": {},
        "files": {},
    }
    if default_tile_size is not None:
        info["default_tile_size"] = int(default_tile_size)
    return info


def parse_input_gsd_option(text: str) -> tuple[float, float]:
    """--input-gsd-m MIN,MAX -> (min, max) metres per input pixel; RsmclipError when malformed or out of range."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 2:
        raise RsmclipError(f"--input-gsd-m {text}: give MIN,MAX in metres per input pixel, e.g. 4.6875,75")
    return bundle_format.parse_input_gsd_m(values, "--input-gsd-m", RsmclipError)


def checkpoint_training_config(loaded: LoadedModel) -> dict[str, Any] | None:
    """The training config stored in the checkpoint ``loaded`` was built from (training.train's model.pt), if any."""
    path = loaded.source.get("checkpoint")
    if not path or Path(path).suffix == ".safetensors":
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a training.train checkpoint (e.g. a legacy-format state dict): no config to read
        return None
    config = data.get("config") if isinstance(data, dict) else None
    return config if isinstance(config, dict) else None


def config_input_gsd_m(config: dict[str, Any], input_px: int, where: str) -> tuple[float, float] | None:
    """The model's input ground resolution (metres per input pixel) from a training config whose every dataset
    states ``ground_resolution: {gsd_m: [min, max], image_px: N}`` (metres per pixel of its images at N px):
    gsd × N / input px, over all datasets; None when a dataset does not state it."""
    data = config.get("data")
    datasets = data.get("datasets") if isinstance(data, dict) else None
    if not isinstance(datasets, list) or not datasets:
        return None
    stated = [spec.get("ground_resolution") if isinstance(spec, dict) else None for spec in datasets]
    if any(entry is None for entry in stated):
        return None
    lows, highs = [], []
    for i, entry in enumerate(stated):
        key = f"{where}: data.datasets[{i}].ground_resolution"
        if not isinstance(entry, dict):
            raise RsmclipError(f"{key}: give {{gsd_m: [min, max], image_px: N}}")
        low, high = bundle_format.parse_input_gsd_m(entry.get("gsd_m"), f"{key}.gsd_m", RsmclipError)
        image_px = entry.get("image_px")
        if isinstance(image_px, bool) or not isinstance(image_px, int) or image_px < 1:
            raise RsmclipError(f"{key}.image_px {image_px!r}: give the image size in pixels gsd_m is stated at")
        lows.append(low * image_px / input_px)
        highs.append(high * image_px / input_px)
    return min(lows), max(highs)


def vocabulary_json(path: Path) -> dict[str, Any]:
    """vocabulary.json content (train part): ``terms`` {lang: [names]}, ``classes`` {class: {lang: [names]}} and
    ``templates`` {lang: [caption templates with "{}"]}, the prompts the runtime averages a query over."""
    from training.data import load_vocabulary

    vocab = load_vocabulary(path)
    classes = {name: {lang: parts["train"][0] for lang, parts in per_lang.items() if parts["train"][0]}
               for name, per_lang in vocab.entries.items()}
    terms = {lang: list(dict.fromkeys(term for per_lang in classes.values() for term in per_lang.get(lang, [])))
             for lang in vocab.languages}
    templates = {lang: list(dict.fromkeys(t for per_lang in vocab.entries.values()
                                          for t in per_lang.get(lang, {}).get("train", ([], []))[1] if t != "{}"))
                 for lang in vocab.languages}
    return {"format_version": 1, "languages": list(vocab.languages), "terms": terms, "classes": classes,
            "templates": {lang: items for lang, items in templates.items() if items}}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- parity


def load_probes(probes_dir: Path | None = None) -> tuple[list[Any], list[str]]:
    """(PIL RGB images, sentences) from a probes directory (images/*.jpg|png, texts.json {lang: [...]})."""
    from PIL import Image

    directory = Path(probes_dir) if probes_dir else PROBES_DIR
    files = sorted(p for p in (directory / "images").glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    texts_file = directory / "texts.json"
    if not files or not texts_file.is_file():
        raise RsmclipError(f"{directory}: probes need images/*.jpg and texts.json")
    images = [Image.open(path).convert("RGB") for path in files]
    texts = [text for sentences in json.loads(texts_file.read_text(encoding="utf-8")).values() for text in sentences]
    return images, texts


def _strip_pad(row: np.ndarray, pad_id: int) -> list[int]:
    ids = list(int(v) for v in row)
    while ids and ids[-1] == pad_id:
        ids.pop()
    return ids


def _normalize(tensor: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(tensor.float(), dim=-1).cpu().numpy()


def measure_parity(loaded: LoadedModel, bundle_dir: Path, images: list[Any], texts: list[str]) -> dict[str, Any]:
    """Torch (open_clip transform + tokenizer) against the bundle on ONNX Runtime (runtime preprocessing + tokenizer)."""
    from rsmclip_geo.encoders import load_model
    from rsmclip_geo.preprocess import preprocess_images

    runtime = load_model(bundle_dir, providers=["cpu"])
    pixels = torch.stack([loaded.preprocess(image) for image in images])
    runtime_pixels = preprocess_images([np.asarray(image) for image in images], runtime.info)
    with torch.inference_mode():
        torch_images = _normalize(loaded.model.encode_image(pixels))
        torch_ids = loaded.tokenizer(texts)
        torch_texts = _normalize(loaded.model.encode_text(torch_ids))
    onnx_images = runtime.encode_pixels(pixels.numpy())
    onnx_texts = runtime.encode_texts(texts)
    runtime_ids = runtime.tokenizer.encode(texts)
    pad_id = runtime.info.pad_id
    mismatches = sum(_strip_pad(a, pad_id) != _strip_pad(b, pad_id) for a, b in zip(torch_ids.numpy(), runtime_ids))
    sims_torch = torch_images @ torch_texts.T
    sims_onnx = onnx_images @ onnx_texts.T
    k = min(5, len(texts))
    top_torch = np.argsort(-sims_torch, axis=1)[:, :k]
    top_onnx = np.argsort(-sims_onnx, axis=1)[:, :k]
    rows = np.arange(len(images))
    return {
        "image_min_cosine": float(np.min(np.sum(torch_images * onnx_images, axis=1))),
        "text_min_cosine": float(np.min(np.sum(torch_texts * onnx_texts, axis=1))),
        "top1_agreement": float(np.mean(top_torch[:, 0] == top_onnx[:, 0])),
        "top1_score_gap": float(np.max(sims_torch[rows, top_torch[:, 0]] - sims_torch[rows, top_onnx[:, 0]])),
        "top5_agreement": float(np.mean([set(a) == set(b) for a, b in zip(top_torch, top_onnx)])),
        "n_images": len(images),
        "n_texts": len(texts),
        "preprocess_max_abs_diff": float(np.max(np.abs(pixels.numpy() - runtime_pixels))),
        "tokenizer_mismatches": int(mismatches),
    }


def check_parity(parity: dict[str, Any], precision: str) -> None:
    """Raise RsmclipError when the measured parity is below the precision's threshold."""
    threshold = PARITY_THRESHOLDS[precision]
    problems = []
    for key in ("image_min_cosine", "text_min_cosine"):
        if not parity[key] >= threshold:
            problems.append(f"{key} {parity[key]:.6f} < {threshold}")
    if precision == "int8" and parity["top1_score_gap"] > INT8_TOP1_GAP:
        problems.append(f"a probe image's top-1 sentence changed to one torch scores {parity['top1_score_gap']:.4f} "
                        f"below its best (> {INT8_TOP1_GAP})")
    if parity["tokenizer_mismatches"]:
        problems.append(f"tokenizer.json differs from the model's tokenizer on {parity['tokenizer_mismatches']} probe texts")
    if parity["preprocess_max_abs_diff"] > 1e-5:
        problems.append(f"runtime preprocessing differs by {parity['preprocess_max_abs_diff']:.3g}")
    if problems:
        raise RsmclipError(f"{precision} parity check failed ({'; '.join(problems)}); bundle not written")


# ---------------------------------------------------------------- bundle


def export_bundle(
    loaded: LoadedModel,
    output: str | os.PathLike,
    *,
    precision: str = "fp32",
    name: str | None = None,
    version: str = "1.0",
    languages: Sequence[str] | None = None,
    torch_weights: str | None = None,
    default_tile_size: int | None = None,
    probes_dir: str | os.PathLike | None = None,
    vocabulary: str | os.PathLike | None = None,
    model_card: str | os.PathLike | None = None,
    calibration_images: str | os.PathLike | None = None,
    input_gsd_m: Sequence[float] | None = None,
    prune_vocabulary: int | None = None,
    prune_texts: Sequence[str | os.PathLike] = (),
) -> Path:
    """Export ``loaded`` to a bundle directory at ``output`` (atomically: temp dir, then rename).

    ``vocabulary``: the training vocabulary YAML; its train-part class names go into the bundle's
    vocabulary.json (known terms per language, for the runtime's out-of-vocabulary warnings).
    ``model_card``: a Markdown file copied into the bundle as MODEL_CARD.md.
    ``calibration_images``: with precision "int8", a folder of typical images; the image tower is then
    quantised statically (convolutions included, `convert_precision`) instead of dynamically.
    ``input_gsd_m``: (min, max) ground metres per input pixel the model was trained at; without it, taken from
    the training config stored in the checkpoint when its datasets state their ground resolution.
    ``torch_weights``: "fp32" or "fp16" also writes weights.safetensors for the torch backend; with "fp16" the
    weights of ``loaded`` itself are rounded to fp16 before the ONNX export, so both backends hold the same
    values (and the parity figures hold for either) at half the size.
    ``prune_vocabulary``: keep only the XLM-R pieces the 10 languages use (``training.vocab_prune``: the top
    ``prune_vocabulary`` wordfreq words of each language, the vocabulary files and the lines of ``prune_texts``);
    ``loaded`` itself is pruned first, so the parity checks compare the pruned torch model with the bundle.
    """
    if torch_weights not in (None, *TORCH_WEIGHT_DTYPES):
        raise RsmclipError(f"--torch-weights {torch_weights!r}: choose {' or '.join(TORCH_WEIGHT_DTYPES)}")
    if precision not in PARITY_THRESHOLDS:
        raise RsmclipError(f"--precision {precision!r}: choose fp32, fp16 or int8")
    if calibration_images is not None and precision != "int8":
        raise RsmclipError(f"--calibration-images applies to --precision int8 only (got --precision {precision})")
    output = Path(output)
    if output.exists() and not (output.is_dir() and (not any(output.iterdir()) or (output / "bundle.json").is_file())):
        raise RsmclipError(f"-o {output}: exists and is not a bundle directory; choose a new output path")
    if prune_vocabulary is not None and prune_vocabulary < 0:
        raise RsmclipError(f"prune_vocabulary={prune_vocabulary}: give the number of words per language (≥ 0)")
    images, texts = load_probes(Path(probes_dir) if probes_dir else None)
    pruning = prune_loaded_model(loaded, prune_vocabulary, prune_texts) if prune_vocabulary is not None else None
    loaded.model.eval()
    if torch_weights == "fp16":
        with torch.no_grad():
            for tensor in loaded.model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.half())
    info = bundle_info(loaded, name=name or output.name, version=version, precision=precision,
                       languages=languages, default_tile_size=default_tile_size)
    if input_gsd_m is not None:
        input_gsd_m = bundle_format.parse_input_gsd_m(input_gsd_m, "input_gsd_m", RsmclipError)
    else:
        config = checkpoint_training_config(loaded)
        input_gsd_m = config_input_gsd_m(config, info["image_size"], loaded.source["checkpoint"]) if config else None
    if input_gsd_m is not None:
        info["input_gsd_m"] = list(input_gsd_m)
    if pruning is not None:
        info["vocabulary_pruning"] = pruning.as_dict()
    known_terms = vocabulary_json(Path(vocabulary)) if vocabulary is not None else None
    if known_terms is not None:
        info["vocabulary"] = VOCABULARY_JSON
    if model_card is not None and not Path(model_card).is_file():
        raise RsmclipError(f"--model-card {model_card}: no such file; pass the Markdown model card to ship")
    calibration = calibration_pixels(calibration_images, info) if calibration_images is not None else None
    if precision == "int8":
        info["quantization"] = {tower: quantization_method(tower, calibration) for tower in ("image", "text")}
    output.parent.mkdir(parents=True, exist_ok=True)  # after every input check: bad input leaves nothing behind
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        (work / bundle_format.TOKENIZER_JSON).write_text(bundle_tokenizer_json(loaded), encoding="utf-8")
        write_json(work / bundle_format.BUNDLE_JSON, info)
        _export_towers(loaded, work, info)
        for filename, tower in ((bundle_format.IMAGE_ONNX, "image"), (bundle_format.TEXT_ONNX, "text")):
            convert_precision(work / filename, precision, calibration if tower == "image" else None,
                              weight_only=tower == "text")
            set_onnx_metadata(work / filename, tower, info)
        parity = measure_parity(loaded, work, images, texts)
        log.info("parity: %s", parity)
        check_parity(parity, precision)
        info["parity"] = parity
        if torch_weights:
            _write_torch_weights(loaded, work, TORCH_WEIGHT_DTYPES[torch_weights])
        if known_terms is not None:
            write_json(work / VOCABULARY_JSON, known_terms)
        if model_card is not None:
            shutil.copyfile(model_card, work / MODEL_CARD)
        info["files"] = {path.name: sha256_file(path) for path in sorted(work.iterdir())
                         if path.name != bundle_format.BUNDLE_JSON}
        write_json(work / bundle_format.BUNDLE_JSON, info)
        replace_directory(work, output)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return output


def _export_towers(loaded: LoadedModel, directory: Path, info: dict[str, Any]) -> None:
    """Trace both towers with a batch of 2 probe-sized inputs and save them as ONNX."""
    from rsmclip_geo.tokenizer import TextTokenizer

    size = info["image_size"]
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, size, size, generator=generator)
    tokenizer = TextTokenizer(directory / bundle_format.TOKENIZER_JSON, info["context_length"], info["pad_id"])
    ids = torch.from_numpy(tokenizer.encode(["an airport with several planes parked", "un campo de golf"]))
    module, dynamic_length = text_tower(loaded.model)
    length = max(ids.shape[1], 3) if dynamic_length else info["context_length"]
    ids = torch.nn.functional.pad(ids, (0, length - ids.shape[1]), value=info["pad_id"])
    export_tower(_ImageTower(loaded.model), pixels, "pixels", directory / bundle_format.IMAGE_ONNX)
    export_tower(module, ids, "input_ids", directory / bundle_format.TEXT_ONNX,
                 max_length=info["context_length"] if dynamic_length else None)


def _write_torch_weights(loaded: LoadedModel, directory: Path, dtype: torch.dtype) -> None:
    """weights.safetensors (floating-point tensors in ``dtype``) + open_clip_config.json (the architecture payload)
    for the torch backend."""
    from safetensors.torch import save_file

    state = {key: (value.to(dtype) if value.is_floating_point() else value).detach().cpu().clone().contiguous()
             for key, value in loaded.model.state_dict().items()}
    save_file(state, str(directory / bundle_format.TORCH_WEIGHTS))
    write_json(directory / bundle_format.TORCH_CONFIG, architecture_payload(loaded))


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__[__doc__.index("RS-M-CLIP with"):],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="open_clip model name, hf-hub:ORG/REPO or model-config JSON path "
                                        "(optional when --checkpoint stores its architecture)")
    parser.add_argument("--checkpoint", help="local state dict / open_clip checkpoint")
    parser.add_argument("--pretrained", help="open_clip pretrained tag or weights file")
    parser.add_argument("--hf-text-dir", help="local HF config + tokenizer folder for an HF text tower (offline)")
    parser.add_argument("-o", "--output", required=True, help="bundle directory to write")
    parser.add_argument("--precision", choices=tuple(PARITY_THRESHOLDS), default="fp32")
    parser.add_argument("--name", help="bundle name (default: the output folder name)")
    parser.add_argument("--version", default="1.0", help="bundle version string")
    parser.add_argument("--languages", nargs="+", help="languages the text tower was trained on")
    parser.add_argument("--default-tile-size", type=int, help="default tile size in pixels for this model")
    parser.add_argument("--torch-weights", nargs="?", const="fp32", choices=tuple(TORCH_WEIGHT_DTYPES),
                        help="also write weights.safetensors + open_clip_config.json for the torch backend, in fp32"
                             " (the default) or fp16 (half the size; the ONNX towers then use the same rounded"
                             " weights)")
    parser.add_argument("--probes", help="probe folder (images/, texts.json) instead of the packaged probes")
    parser.add_argument("--vocabulary", help="training vocabulary YAML; writes vocabulary.json (known terms)")
    parser.add_argument("--model-card", help="Markdown model card to ship in the bundle as MODEL_CARD.md")
    parser.add_argument("--calibration-images", metavar="DIR",
                        help="with --precision int8: quantise the image tower statically, convolutions included, "
                             f"with activation ranges from {CALIBRATION_IMAGES} images of DIR (typical scenes)")
    parser.add_argument("--input-gsd-m", metavar="MIN,MAX",
                        help="ground metres per input pixel the model was trained at (source metres per pixel × "
                             "source px / input px); default: from the checkpoint's training config when its "
                             "datasets state ground_resolution")
    parser.add_argument("--prune-vocabulary", metavar="WORDS", nargs="?", type=int, const=DEFAULT_WORDS_PER_LANGUAGE,
                        help="keep only the XLM-R pieces the 10 languages use: those of the WORDS most frequent "
                             f"wordfreq words of each language (default {DEFAULT_WORDS_PER_LANGUAGE}), the vocabulary "
                             "files and --prune-texts, plus Han, Hangul, punctuation and single-character pieces")
    parser.add_argument("--prune-texts", metavar="FILE", nargs="+", default=[],
                        help="with --prune-vocabulary: text files (one text a line, e.g. caption CSVs) whose pieces "
                             "are kept too")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the parity figures")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        if args.model is None and args.checkpoint is None:
            raise RsmclipError("--model: required unless --checkpoint stores its architecture")
        if args.prune_texts and args.prune_vocabulary is None:
            raise RsmclipError("--prune-texts applies with --prune-vocabulary only")
        input_gsd_m = parse_input_gsd_option(args.input_gsd_m) if args.input_gsd_m is not None else None
        loaded = create_model(args.model, checkpoint=args.checkpoint, hf_text_dir=args.hf_text_dir,
                              pretrained=args.pretrained)
        if loaded.source.get("random_init"):
            log.warning("=" * 72)
            log.warning("EXPORTING RANDOM WEIGHTS: no --checkpoint, --pretrained or hub weights were given")
            log.warning("=" * 72)
        out = export_bundle(loaded, args.output, precision=args.precision, name=args.name, version=args.version,
                            languages=args.languages, torch_weights=args.torch_weights,
                            default_tile_size=args.default_tile_size, probes_dir=args.probes,
                            vocabulary=args.vocabulary, model_card=args.model_card,
                            calibration_images=args.calibration_images, input_gsd_m=input_gsd_m,
                            prune_vocabulary=args.prune_vocabulary, prune_texts=args.prune_texts)
    except RsmclipError as exc:
        print(f"training.export: error: {exc}", file=sys.stderr)
        return 2
    info = json.loads((out / bundle_format.BUNDLE_JSON).read_text(encoding="utf-8"))
    parity = info["parity"]
    print(f"wrote {out} ({info['precision']}): image min cosine {parity['image_min_cosine']:.7f}, "
          f"text min cosine {parity['text_min_cosine']:.7f}, top-1 agreement {parity['top1_agreement']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
