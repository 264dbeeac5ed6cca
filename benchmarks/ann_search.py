"""ANN search over ≥ 1M real tile embeddings against exact search, in the same run.

1. Mosaic: every AID image (../shared/data/aid, sorted) placed in 150 px cells of one georeferenced
   GeoTIFF (UTM 29N, 4 m/px, JPEG-compressed, 256 px blocks), sized so that its tiles number ≥ --rows.
2. Tile index: 64 px tiles at 75 % overlap and scales 1-5 (64…320 px windows, decimated to the
   model's input with GDAL cubic resampling) built by the project's indexer (`index_scenes`: the
   runtime's reads, preprocessing, image encoder and sharded GeoParquet writer); an interrupted run
   resumes from its shards, and a finished index in --work-dir is reused.
3. ANN index: `build_ann` in a child process (build time and peak RSS), index size on disk.
4. Queries: the AID class names of training/vocab/aid_classes.yaml in all ten languages, encoded by
   the text tower (time per query reported separately, uncached and from the query cache).
5. Latency (median / p95 over the queries): ANN search as `search` runs it (candidates → NMS → hit
   rows read from Parquet) against exact search over the index loaded in memory (score every tile →
   NMS), and the raw top-10 vector search of both; recall@10 of the ANN top-10 against the exact top-10.

    python benchmarks/ann_search.py --model rsmclip_geo/models/rsmclip-demo-aid --work-dir /tmp/ann_bench
    python benchmarks/ann_search.py --random tiny-256 --rows 50000 --work-dir /tmp/ann_dev
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
AID = REPO / ".." / "shared" / "data" / "aid"
VOCABULARY = REPO / "training" / "vocab" / "aid_classes.yaml"
CELL = 150
#: Mosaic sides are multiples of this, so every scale's windows fall on its decimated grid.
SIDE_STEP = 960
TILE, OVERLAP, SCALES = 64, 0.75, (1, 2, 3, 4, 5)
CRS, PIXEL_M, ORIGIN = "EPSG:32629", 4.0, (300_000.0, 4_500_000.0)
ENCODE_BATCH = 512


def windows_per_side(side: int) -> int:
    """Tiles of a side × side mosaic with TILE px windows at OVERLAP and SCALES."""
    return sum(((side - TILE * s) // round(TILE * s * (1 - OVERLAP)) + 1) ** 2 for s in SCALES)


def mosaic_side(rows: int) -> int:
    side = SIDE_STEP
    while windows_per_side(side) < rows:
        side += SIDE_STEP
    return side


def write_mosaic(images: list[Path], output: Path, side: int) -> Path:
    """A side × side px RGB GeoTIFF of AID images in CELL px cells, row-major (images repeat if needed)."""
    import rasterio
    from PIL import Image
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from rsmclip_geo.files import publish, temp_file

    if output.is_file():
        return output
    cells = -(-side // CELL)
    profile = {"driver": "GTiff", "width": side, "height": side, "count": 3, "dtype": "uint8", "crs": CRS,
               "transform": from_origin(*ORIGIN, PIXEL_M, PIXEL_M), "tiled": True, "blockxsize": 256,
               "blockysize": 256, "compress": "jpeg", "photometric": "ycbcr", "jpeg_quality": 90}
    tmp = temp_file(output, suffix=".tif")
    strip_rows = 1536
    band_cache: dict[int, np.ndarray] = {}

    def cell_row(r: int) -> np.ndarray:
        if r not in band_cache:
            band_cache.clear()
            row = np.zeros((CELL, cells * CELL, 3), np.uint8)
            for c in range(cells):
                with Image.open(images[(r * cells + c) % len(images)]) as image:
                    row[:, c * CELL:(c + 1) * CELL] = np.asarray(image.convert("RGB").resize((CELL, CELL)))
            band_cache[r] = row
        return band_cache[r]

    with rasterio.open(tmp, "w", **profile) as dst:
        for y0 in range(0, side, strip_rows):
            y1 = min(side, y0 + strip_rows)
            strip = np.concatenate([cell_row(y // CELL)[y % CELL:y % CELL + 1] for y in range(y0, y1)])
            dst.write(strip[:, :side].transpose(2, 0, 1), window=Window(0, y0, side, y1 - y0))
    publish(tmp, output)
    return output


def build_index(mosaic: Path, output: Path, model) -> Path:
    """Embed every window of the mosaic with the project's indexer (resumable); returns the index path."""
    from rsmclip_geo.indexer import index_scenes
    from rsmclip_geo.tiling import TilingParams

    if output.is_dir():
        return output
    start = reported = time.perf_counter()

    def progress(done: int, total: int) -> None:
        nonlocal reported
        if time.perf_counter() - reported > 60:
            reported = time.perf_counter()
            print(f"  embedded {done} / {total} tiles ({done / (reported - start):.0f} tiles/s)", flush=True)

    return index_scenes([mosaic], output, model=model, batch_size=ENCODE_BATCH, progress=progress,
                        tiling=TilingParams(tile_size=TILE, overlap=OVERLAP, scales=SCALES))


def child_build_ann(index: Path, kind: str | None) -> dict:
    """build_ann in a child process: seconds and the child's peak RSS (MB, VmHWM: ru_maxrss would
    include the peak of this parent process)."""
    code = ("import json, re, sys, time; from pathlib import Path; from rsmclip_geo.ann import build_ann; "
            "t = time.perf_counter(); build_ann(sys.argv[1], kind=sys.argv[2] or None); seconds = time.perf_counter() - t; "
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text()).group(1); "
            "print(json.dumps({'seconds': seconds, 'peak_rss_mb': int(hwm) / 1024}))")
    out = subprocess.run([sys.executable, "-c", code, str(index), kind or ""], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def vocabulary_queries() -> list[str]:
    """The first training name of every AID class in every language (300 queries, 10 languages)."""
    import yaml

    data = yaml.safe_load(VOCABULARY.read_text(encoding="utf-8"))
    return [names[lang]["train"][0] for lang in data["languages"] for names in data["classes"].values()]


def percentiles(values: list[float]) -> tuple[float, float]:
    return float(np.median(values)), float(np.percentile(values, 95))


def export_random(name: str, work: Path) -> Path:
    """A random-weight bundle from benchmarks/pipeline_throughput.py (tiny-256: its tiny layout, 256-d)."""
    spec = importlib.util.spec_from_file_location("pipeline_throughput", REPO / "benchmarks" / "pipeline_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tiny_cfg, tiny_text = module.RANDOM_MODELS["tiny"]
    module.RANDOM_MODELS["tiny-256"] = ({**tiny_cfg, "embed_dim": 256}, tiny_text)
    return module.export_random_bundle(name, work / f"bundle-{name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="bundle directory or name (default: the bundled demo model)")
    source.add_argument("--random", choices=("tiny", "tiny-256"), help="export a random-weight bundle first")
    parser.add_argument("--rows", type=int, default=1_000_000, help="at least this many tiles (default 1,000,000)")
    parser.add_argument("--queries", type=int, default=300, help="queries timed (default 300: all of the vocabulary)")
    parser.add_argument("--kind", choices=("hnsw", "ivf"), help="ANN kind (default: by row count)")
    parser.add_argument("--work-dir", type=Path, required=True, help="mosaic, index and ANN index (reused)")
    parser.add_argument("-o", "--output", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    from rsmclip_geo.ann import AnnIndex, ann_path
    from rsmclip_geo.encoders import load_model
    from rsmclip_geo.tile_index import IndexHeader, TileIndex
    from rsmclip_geo.caches import QueryCache
    from rsmclip_geo.queries import query_vectors
    from rsmclip_geo.search import ann_rank_hits, rank_hits, score_tiles

    args.work_dir.mkdir(parents=True, exist_ok=True)
    bundle = export_random(args.random, args.work_dir) if args.random else args.model
    model = load_model(bundle)
    name = model.bundle.info.name
    side = mosaic_side(args.rows)
    images = sorted(AID.resolve().glob("*/*.jpg"))
    t = time.perf_counter()
    mosaic = write_mosaic(images, args.work_dir / f"aid_mosaic_{side}.tif", side)
    print(f"mosaic {mosaic.name}: {side} x {side} px, {len(images)} AID images ({time.perf_counter() - t:.0f} s)")
    t = time.perf_counter()
    index_path = build_index(mosaic, args.work_dir / f"index_{name}_{side}", model)
    header = IndexHeader.read(index_path)
    print(f"tile index {index_path.name}: {len(header)} tiles in {len(header.files)} shards, "
          f"dim {header.metadata['embed_dim']} ({time.perf_counter() - t:.0f} s)")

    if ann_path(index_path).is_dir():
        shutil.rmtree(ann_path(index_path))
    build = child_build_ann(index_path, args.kind)
    ann = AnnIndex.open(header)
    ann_bytes = sum(p.stat().st_size for p in ann_path(index_path).iterdir())
    vectors_bytes = (ann_path(index_path) / "vectors.faiss").stat().st_size
    print(f"ANN {ann.kind} {ann.sidecar['params']}: build {build['seconds']:.1f} s, peak RSS {build['peak_rss_mb']:.0f} MB, "
          f"on disk {ann_bytes / 2**20:.0f} MB (vectors {vectors_bytes / 2**20:.0f} MB)")

    queries = vocabulary_queries()
    queries = queries[::max(1, len(queries) // args.queries)][:args.queries]
    distinct = list(dict.fromkeys(queries))
    text_s = []
    for q in distinct:
        t = time.perf_counter()
        model.encode_texts([q])
        text_s.append(time.perf_counter() - t)
    cache = QueryCache(args.work_dir / "query-cache.sqlite")
    query_vectors(model, distinct, cache=cache)
    cached_s = []
    for q in distinct:
        t = time.perf_counter()
        query_vectors(model, [q], cache=cache)
        cached_s.append(time.perf_counter() - t)
    vectors = np.stack([query_vectors(model, [q], cache=cache)[0] for q in queries])

    t = time.perf_counter()
    exact = TileIndex.open(index_path)
    embeddings = exact.embeddings().astype(np.float32)
    load_s = time.perf_counter() - t
    options = dict(top_k=10, threshold=None, allowed=None, nms_overlap=0.5)
    ann_search_s, exact_search_s, ann_raw_s, exact_raw_s, recalls, same_hits = [], [], [], [], [], []
    for query, vector in zip(queries, vectors):  # the sides are interleaved query by query
        t = time.perf_counter()
        fast = ann_rank_hits(header, ann, vector, query, **options)
        ann_search_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        slow = rank_hits(exact, score_tiles(exact, vector[None])[0], query, **options)
        exact_search_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        _, found = ann.search(vector[None], 10)
        ann_raw_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        scores = embeddings @ vector
        truth = np.argpartition(-scores, 10)[:10]
        exact_raw_s.append(time.perf_counter() - t)
        recalls.append(len(set(found[0]) & set(truth)) / 10)
        same_hits.append(len({h.tile_id for h in fast} & {h.tile_id for h in slow}) / max(1, len(slow)))

    figures = {
        "model": name, "embed_dim": int(header.metadata["embed_dim"]), "rows": len(header), "mosaic_side": side,
        "ann_kind": ann.kind, "ann_params": ann.sidecar["params"], "build_s": build["seconds"],
        "build_peak_rss_mb": build["peak_rss_mb"], "ann_disk_mb": ann_bytes / 2**20,
        "queries": len(queries), "distinct_queries": len(distinct),
        "text_encode_ms": [1000 * v for v in percentiles(text_s)],
        "text_cached_ms": [1000 * v for v in percentiles(cached_s)],
        "exact_index_load_s": load_s,
        "ann_search_ms": [1000 * v for v in percentiles(ann_search_s)],
        "exact_search_ms": [1000 * v for v in percentiles(exact_search_s)],
        "ann_top10_ms": [1000 * v for v in percentiles(ann_raw_s)],
        "exact_top10_ms": [1000 * v for v in percentiles(exact_raw_s)],
        "recall_at_10": float(np.mean(recalls)), "search_hits_agreement": float(np.mean(same_hits)),
    }
    ratio = figures["exact_search_ms"][0] / figures["ann_search_ms"][0]
    print(f"queries: {len(queries)} ({len(distinct)} distinct, 10 languages); text tower "
          f"{figures['text_encode_ms'][0]:.1f} ms/query median (p95 {figures['text_encode_ms'][1]:.1f}), "
          f"from the query cache {figures['text_cached_ms'][0]:.2f} ms")
    print(f"search (top 10, NMS 0.5, hit rows read): ANN median {figures['ann_search_ms'][0]:.1f} ms "
          f"(p95 {figures['ann_search_ms'][1]:.1f}) vs exact {figures['exact_search_ms'][0]:.1f} ms "
          f"(p95 {figures['exact_search_ms'][1]:.1f}): {ratio:.1f}x faster; target < 50 ms: "
          f"{'PASS' if figures['ann_search_ms'][0] < 50 else 'FAIL'}")
    print(f"raw top-10: ANN {figures['ann_top10_ms'][0]:.2f} ms vs exact matrix product "
          f"{figures['exact_top10_ms'][0]:.1f} ms (index loaded in {load_s:.1f} s)")
    print(f"recall@10 vs exact: {figures['recall_at_10']:.3f} (target 0.95: "
          f"{'PASS' if figures['recall_at_10'] >= 0.95 else 'FAIL'}); same search hits: "
          f"{figures['search_hits_agreement']:.3f}")
    if args.output:
        args.output.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
