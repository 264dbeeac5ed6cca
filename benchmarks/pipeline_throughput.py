"""End-to-end tiles/s: the rsmclip-geo pipeline vs a naive loop, same model and scene, same run.

Pipeline: `index_scenes` (worker threads: read → preprocess → ONNX Runtime; bounded queue → GeoParquet).
Naive:    the whole scene in memory as a PIL image → crop each tile → open_clip's preprocess →
          `model.encode_image` per batch in torch.
Both embed exactly the same windows (tile filtering is turned off) with the same thread count;
library imports, model loading and one warm-up batch are excluded from both timings. The scene is
the real one repeated --mosaic K×K times into an internally tiled, deflate-compressed GeoTIFF (the
layout of orthophoto deliveries), so that per-scene costs (planning, writing the index) weigh as
little as they do on real scenes; --mosaic 1 times the real scene as it is.

    python benchmarks/pipeline_throughput.py --bundle rsmclip_geo/models/rsmclip-demo-aid
    python benchmarks/pipeline_throughput.py --random tiny                 # tiny ViT + XLM-R, random weights
    python benchmarks/pipeline_throughput.py --random xlmr-vit-b-32 --int8 # ViT-B/32 fp32 + int8 bundles
    python benchmarks/pipeline_throughput.py --bundle rsmclip_geo/models/rsmclip-demo-aid --int8 \
        --calibration-images ../shared/data/aid                            # static int8 (convolutions too)

With --int8 an int8 copy of the fp32 bundle (image tower quantised: dynamically, or statically with
--calibration-images) is timed too, and its retrieval agreement with fp32 is reported (paired
embedding cosine, tile-to-tile neighbour agreement among the tiles of the mosaic's first copy).
Needs the training extra (torch, open_clip) for the naive loop and the exports.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SCENE = REPO / ".." / "shared" / "data" / "geotiff" / "fotomap_4band_2cm.tif"
# Random-weight models (seed 0) with RS-M-CLIP's layout: a ViT image tower and an XLM-R-style HF text
# tower whose tokenizer is trained on the export probe sentences (the hub's xlm-roberta files are offline).
#   tiny:              2-layer ViT/16 at 64 px, 2-layer text tower (like the tests' tiny_bundle)
#   xlmr-vit-b-32:     open_clip's xlm-roberta-base-ViT-B-32 (ViT-B/32 at 224 px, XLM-R base dimensions;
#                      only the vocabulary is smaller), the architecture of RS-M-CLIP
RANDOM_MODELS = {
    "tiny": (
        {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32,
                                         "patch_size": 16}},
        {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96},
    ),
    "xlmr-vit-b-32": (
        {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32}},
        {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    ),
}
CONTEXT_LENGTH = 32


def export_random_bundle(name: str, work: Path) -> Path:
    """Export a RANDOM_MODELS entry (seed 0) as an fp32 bundle with torch weights (reused when `work`
    already holds it)."""
    if (work / "fp32" / "bundle.json").is_file():
        return work / "fp32"
    import torch

    from training.export import export_bundle
    from training.model import create_model
    from training.tokenizer import train_tokenizer, write_hf_text_dir

    model_cfg, text_dims = RANDOM_MODELS[name]
    probes = json.loads((REPO / "training" / "probes" / "texts.json").read_text(encoding="utf-8"))
    texts = [text for sentences in probes.values() for text in sentences] * 3
    hf_text_dir = write_hf_text_dir(work / "hf_text", train_tokenizer(texts, vocab_size=400),
                                    context_length=CONTEXT_LENGTH, **text_dims)
    config = work / f"{name}.json"
    text_cfg = {"hf_model_name": "bench-xlm-roberta", "hf_tokenizer_name": "bench-xlm-roberta",
                "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": CONTEXT_LENGTH}
    config.write_text(json.dumps({**model_cfg, "text_cfg": text_cfg}))
    torch.manual_seed(0)
    loaded = create_model(config, hf_text_dir=hf_text_dir)
    return export_bundle(loaded, work / "fp32", name=f"bench-{name}-fp32", torch_weights="fp32")


def int8_image_bundle(fp32: Path, output: Path, calibration_images: Path | None = None) -> Path:
    """A copy of an fp32 bundle with its image tower quantised to int8 by the exporter's conversion:
    statically from ``calibration_images`` (convolutions included), else dynamically (MatMul/Gemm). The
    export's int8 parity gate is not applied: random weights quantise worse than trained ones and fail
    it, so this benchmark measures and prints the agreement itself."""
    from rsmclip_geo.bundle import BUNDLE_JSON, IMAGE_ONNX
    from rsmclip_geo.files import sha256_file
    from training.export import calibration_pixels, convert_precision, quantization_method

    if (output / BUNDLE_JSON).is_file():
        return output
    shutil.copytree(fp32, output, ignore=shutil.ignore_patterns("weights.safetensors", "open_clip_config.json"))
    info = json.loads((output / BUNDLE_JSON).read_text(encoding="utf-8"))
    calibration = calibration_pixels(calibration_images, info) if calibration_images else None
    convert_precision(output / IMAGE_ONNX, "int8", calibration)
    info["name"] = f"{info['name']}-int8-image"
    info["precision"] = "int8"
    info["quantization"] = {"image": quantization_method("image", calibration), "text": "not quantised"}
    info["files"] = {p.name: sha256_file(p) for p in sorted(output.iterdir()) if p.name != BUNDLE_JSON}
    (output / BUNDLE_JSON).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return output


def tiled_mosaic(scene: Path, repeats: int, work: Path) -> Path:
    """The scene repeated `repeats`×`repeats` times into a tiled (256 px blocks), deflate-compressed
    GeoTIFF with the scene's CRS, pixel size, bands and colour interpretation (reused when present)."""
    import rasterio
    from rasterio.windows import Window

    from rsmclip_geo.files import publish, temp_file

    output = work / f"{scene.stem}-mosaic{repeats}.tif"
    if repeats == 1 or output.is_file():
        return scene if repeats == 1 else output
    with rasterio.open(scene) as src:
        pixels = src.read()
        profile = {**src.profile, "width": src.width * repeats, "height": src.height * repeats, "tiled": True,
                   "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
        profile.pop("photometric", None)  # YCbCr goes with JPEG compression only; the pixels are RGB
        tmp = temp_file(output, suffix=".tif")
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.colorinterp = src.colorinterp
            for i in range(repeats):
                for j in range(repeats):
                    dst.write(pixels, window=Window(j * src.width, i * src.height, src.width, src.height))
    publish(tmp, output)  # a reused mosaic is always a complete one
    return output


def pipeline_runner(bundle: Path, scene: Path, params, threads: int, batch_size: int, work: Path):
    """A callable timing `index_scenes` on one scene: () -> (seconds, tiles, index path)."""
    import pandas  # noqa: F401  (pyarrow.parquet imports it on first use: library imports are not timed)

    from rsmclip_geo.encoders import load_model
    from rsmclip_geo.indexer import index_scenes
    from rsmclip_geo.tile_index import TileIndex

    model = load_model(bundle, threads=threads)
    size = model.bundle.info.image_size
    warm_up = np.zeros((batch_size, 3, size, size), np.float32)
    model.encode_pixels(warm_up)  # session + warm-up
    model.encode_pixels(warm_up, threads=1)  # the single-threaded session that parallel workers share

    def run():
        output = work / f"{bundle.name}-{time.monotonic_ns()}.parquet"
        start = time.perf_counter()
        index_scenes([scene], output, model=model, tiling=params, batch_size=batch_size, threads=threads)
        seconds = time.perf_counter() - start
        return seconds, len(TileIndex.open(output)), output

    return run


def naive_runner(bundle: Path, scene: Path, windows, threads: int, batch_size: int):
    """A callable timing the naive loop: PIL crop → open_clip preprocess → encode_image per batch."""
    import rasterio
    import torch
    from PIL import Image

    from training.model import create_model

    torch.set_num_threads(threads)
    loaded = create_model(bundle / "open_clip_config.json", checkpoint=bundle / "weights.safetensors")
    preprocess = loaded.preprocess  # open_clip's validation transform
    with torch.inference_mode():
        loaded.model.encode_image(torch.zeros(batch_size, 3, *loaded.model.visual.image_size))  # warm-up

    def run():
        start = time.perf_counter()
        with rasterio.open(scene) as src:
            image = Image.fromarray(src.read([1, 2, 3]).transpose(1, 2, 0))
        done = 0
        with torch.inference_mode():
            for first in range(0, len(windows), batch_size):
                chunk = windows[first:first + batch_size]
                batch = torch.stack([preprocess(image.crop((w.col, w.row, w.col + w.width, w.row + w.height)))
                                     for w in chunk])
                torch.nn.functional.normalize(loaded.model.encode_image(batch), dim=-1)
                done += len(chunk)
        return time.perf_counter() - start, done, None

    return run


def neighbour_agreement(reference: np.ndarray, other: np.ndarray, k: int = 5) -> tuple[float, float, float]:
    """(mean cosine between paired embeddings, top-1 and top-k neighbour agreement, tile-to-tile)."""
    reference = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    other = other / np.linalg.norm(other, axis=1, keepdims=True)
    paired = float(np.mean(np.sum(reference * other, axis=1)))
    ref_scores, other_scores = reference @ reference.T, other @ other.T
    np.fill_diagonal(ref_scores, -np.inf)
    np.fill_diagonal(other_scores, -np.inf)
    ref_rank, other_rank = np.argsort(-ref_scores, axis=1), np.argsort(-other_scores, axis=1)
    top1 = float(np.mean(ref_rank[:, 0] == other_rank[:, 0]))
    topk = float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ref_rank, other_rank)]))
    return paired, top1, topk


def first_copy_rows(index, width: int, height: int) -> np.ndarray:
    """Rows of the tiles that lie inside the mosaic's first copy of the scene: tiles of distinct content
    (the copies of a tile are equally near neighbours, in an arbitrary order)."""
    inside = ((index.column("win_col") + index.column("win_width") <= width)
              & (index.column("win_row") + index.column("win_height") <= height))
    return np.flatnonzero(inside)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", type=Path, help="a bundle with weights.safetensors (for the naive loop)")
    source.add_argument("--random", choices=sorted(RANDOM_MODELS), help="export a random-weight model first")
    parser.add_argument("--int8", action="store_true", help="also time an int8 copy (image tower quantised)")
    parser.add_argument("--calibration-images", type=Path, metavar="DIR",
                        help="with --int8: quantise statically, with activation ranges from images of DIR")
    parser.add_argument("--scene", type=Path, default=DEFAULT_SCENE)
    parser.add_argument("--mosaic", type=int, default=3, help="repeat the scene K×K times (1: the scene as is)")
    parser.add_argument("--tile-size", type=int, help="pixels (default: the bundle's tile size)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each side (median reported)")
    parser.add_argument("--work-dir", type=Path, help="keep exported bundles and indexes here")
    args = parser.parse_args(argv)

    from rsmclip_geo.bundle import load_bundle
    from rsmclip_geo.tile_index import TileIndex
    from rsmclip_geo.raster import open_scene
    from rsmclip_geo.tiling import TilingParams, tile_windows

    with tempfile.TemporaryDirectory(prefix="rsmclip-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        reference = args.bundle or export_random_bundle(args.random, work)
        bundles = {"fp32": reference}
        if args.int8:
            bundles["int8"] = int8_image_bundle(reference, work / "int8", args.calibration_images)
        info = load_bundle(reference).info
        params = TilingParams(tile_size=args.tile_size, overlap=args.overlap, min_valid=0.0, min_std=0.0)
        params = params.resolved(info.default_tile_size)
        scene = open_scene(tiled_mosaic(args.scene, args.mosaic, work))
        windows = tile_windows(scene, params)
        print(f"model: {info.architecture}")
        print(f"scene: {scene.path.name} {scene.width}×{scene.height} px, tile {params.tile_size} px, "
              f"overlap {params.overlap}, {len(windows)} tiles, threads {args.threads}, batch {args.batch_size}")

        runners = {"naive": naive_runner(reference, scene.path, windows, args.threads, args.batch_size)}
        for label, bundle in bundles.items():
            runners[label] = pipeline_runner(bundle, scene.path, params, args.threads, args.batch_size, work)
        rates: dict[str, list[float]] = {label: [] for label in runners}
        indexes = {}
        for _ in range(args.repeat):  # interleaved, so that load from other processes hits both sides
            for label, run in runners.items():
                seconds, tiles, output = run()
                assert tiles == len(windows), (label, tiles, len(windows))
                rates[label].append(tiles / seconds)
                if output is not None:
                    indexes[label] = output
        naive_rate = float(np.median(rates["naive"]))
        print(f"{'naive (PIL crop → open_clip preprocess → torch encode_image)':<62} {naive_rate:8.1f} tiles/s"
              f"   (median of {args.repeat})")
        for label in bundles:
            rate = float(np.median(rates[label]))
            print(f"{'pipeline (' + label + ', ONNX Runtime, index written)':<62} {rate:8.1f} tiles/s"
                  f"   ratio {rate / naive_rate:.2f}×")
        if "int8" in indexes:
            fp32_index = TileIndex.open(indexes["fp32"])
            rows = first_copy_rows(fp32_index, scene.width // args.mosaic, scene.height // args.mosaic)
            fp32 = fp32_index.embeddings()[rows].astype(np.float32)
            int8 = TileIndex.open(indexes["int8"]).embeddings()[rows].astype(np.float32)
            cosine, top1, top5 = neighbour_agreement(fp32, int8)
            print(f"int8 vs fp32: mean tile-embedding cosine {cosine:.4f}, tile-to-tile neighbour agreement "
                  f"top-1 {top1:.1%}, top-5 {top5:.1%} ({len(rows)} tiles of the first copy of the scene)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
