"""GPU throughput of the torch backend: model-only and end to end, against open_clip's fp32 eager loop.

Model-only: batches of random model inputs already on the device, timed with device synchronisation.
  baseline  open_clip fp32 eager `encode_image` (the weights as loaded)
  backend   the runtime's torch backend (`load_model(..., backend="torch")`): fp16 towers on CUDA,
            optionally `--compile` (torch.compile of the image tower)
End to end: `index_scenes` over a large internally tiled GeoTIFF (the real scene repeated --mosaic
K×K times), one worker thread per CPU core: windowed reads and uint8 model-size tiles on the CPU,
pinned-memory copies on one CUDA stream per worker, normalisation and fp16 inference on the GPU,
the GeoParquet index written. Its rate is reported against the backend's model-only rate (target
≥ 50 %). Parity: the same tiles embedded by the torch backend and by ONNX Runtime on the CPU.

    python benchmarks/gpu.py --work-dir /tmp/bench_gpu                       # ViT-B/32 layout, random weights
    python benchmarks/gpu.py --bundle DIR --work-dir /tmp/bench_gpu          # a bundle with weights.safetensors
    python benchmarks/gpu.py --device cpu --random tiny --batch-size 32 --mosaic 2 --seconds 2 \\
        --work-dir /tmp/bench_gpu_cpu                                         # the same code on a CPU

Needs the training extra (torch, open_clip).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from pipeline_throughput import DEFAULT_SCENE, RANDOM_MODELS, REPO, export_random_bundle, tiled_mosaic


def model_only_rate(encode, batch, synchronize, seconds: float) -> float:
    """Images/s of `encode(batch)` over at least `seconds` (after two warm-up calls)."""
    for _ in range(2):
        encode(batch)
    synchronize()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        encode(batch)
        done += len(batch)
    synchronize()
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--bundle", type=Path, help="a bundle with weights.safetensors")
    source.add_argument("--random", choices=sorted(RANDOM_MODELS), default="xlmr-vit-b-32",
                        help="export a random-weight model first (default: xlmr-vit-b-32)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per model-only variant")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the image tower")
    parser.add_argument("--scene", type=Path, default=DEFAULT_SCENE)
    parser.add_argument("--mosaic", type=int, default=30, help="repeat the scene K×K times (default 30)")
    parser.add_argument("--gdal-cachemax", default="2048",
                        help="GDAL block cache in MB (default 2048: the workers' rows of tiles share blocks)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="worker threads (default: CPU cores)")
    parser.add_argument("--work-dir", type=Path, required=True, help="exported bundle, mosaic and index (reused)")
    args = parser.parse_args(argv)
    os.environ["GDAL_CACHEMAX"] = args.gdal_cachemax  # before rsmclip_geo.raster sets its own cap

    import torch

    from rsmclip_geo.encoders import load_model
    from rsmclip_geo.indexer import index_scenes
    from rsmclip_geo.tile_index import TileIndex
    from rsmclip_geo.raster import SceneReader, open_scene
    from rsmclip_geo.tiling import TilingParams, tile_windows
    from training.model import create_model

    args.work_dir.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or export_random_bundle(args.random, args.work_dir)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    model = load_model(bundle, backend="torch", device=str(device), batch_size=args.batch_size)
    towers, info = model.torch_towers, model.bundle.info
    print(f"device: {name}; model: {info.architecture}; batch {args.batch_size}; "
          f"torch {torch.__version__}; {args.threads} worker threads; GDAL_CACHEMAX {args.gdal_cachemax} MB")

    shape = (args.batch_size, 3, info.image_size, info.image_size)
    baseline = create_model(bundle / "open_clip_config.json", checkpoint=bundle / "weights.safetensors",
                            device=str(device)).model.eval()
    with torch.inference_mode():
        fp32_batch = torch.randn(shape, device=device)
        rates = {"open_clip fp32 eager (baseline)": model_only_rate(baseline.encode_image, fp32_batch, synchronize,
                                                                    args.seconds)}
        del baseline
        batch = fp32_batch.to(towers.dtype)
        label = f"torch backend, {str(towers.dtype).removeprefix('torch.')}"
        rates[label] = model_only_rate(towers.model.encode_image, batch, synchronize, args.seconds)
        backend_rate = rates[label]
        if args.compile:
            compiled = torch.compile(towers.model.visual)
            rates[label + " + torch.compile"] = model_only_rate(compiled, batch, synchronize, args.seconds)
            backend_rate = max(backend_rate, rates[label + " + torch.compile"])
    base = rates["open_clip fp32 eager (baseline)"]
    print("model-only (random inputs on the device):")
    for label, rate in rates.items():
        print(f"  {label:<44} {rate:10.1f} tiles/s   {rate / base:6.2f}× baseline")

    scene_path = tiled_mosaic(args.scene, args.mosaic, args.work_dir)
    scene = open_scene(scene_path)
    params = TilingParams(tile_size=info.image_size, min_valid=0.0, min_std=0.0)
    windows = tile_windows(scene, params)
    model.encode_tiles(np.zeros((args.batch_size, info.image_size, info.image_size, 3), np.uint8))  # warm-up
    output = args.work_dir / f"index-{time.monotonic_ns()}"
    start = time.perf_counter()
    index_scenes([scene], output, model=model, tiling=params, batch_size=args.batch_size, threads=args.threads)
    seconds = time.perf_counter() - start
    tiles = len(TileIndex.open(output))
    assert tiles == len(windows), (tiles, len(windows))
    rate = tiles / seconds
    print(f"end to end: {scene_path.name} {scene.width}×{scene.height} px, {tiles} tiles of {info.image_size} px "
          f"in {seconds:.1f} s: {rate:.1f} tiles/s = {rate / backend_rate:.2f} of the backend's model-only rate, "
          f"{rate / base:.2f}× the baseline's model-only rate")

    sample = windows[:256]
    with SceneReader(scene) as reader:
        images = np.stack([reader.read_rgb(w.col, w.row, w.width, w.height, max_size=info.image_size)[0]
                           for w in sample])
    onnx = load_model(bundle, providers=["cpu"]).encode_images(images)
    cosine = np.sum(onnx * model.encode_images(images), axis=1)
    print(f"parity, torch backend on {device.type} vs ONNX Runtime on the CPU ({len(sample)} tiles): "
          f"min cosine {cosine.min():.5f}, mean {cosine.mean():.5f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
