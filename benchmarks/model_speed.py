"""Indexing tiles/s and query-encoding latency of model bundles against a baseline bundle, same scene, same run.

Each bundle indexes the same scene (rsmclip_geo.api.build_index into a fresh output, tile filtering off,
so every bundle embeds the same windows) and encodes the same queries one at a time; rounds alternate
the bundles so that drifting machine load weighs on all of them alike. Figures are ratios to the first
bundle (the baseline), measured in this run: CPUs differ between machines, absolute times do not carry.

    python benchmarks/model_speed.py rsmclip_geo/models/rsmclip-demo-aid runs/bundles/rsmclip-e5-lite0 \
        [runs/bundles/rsmclip-e5-lite0-fp32] --rounds 3 -o speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rsmclip_geo import api  # noqa: E402

DEFAULT_SCENE = REPO / "rsmclip_geo" / "data" / "demo_aid_mosaic.tif"
QUERIES = ["aeroporto", "ships docked at the quay", "储油罐", "viele Autos in Reihen geparkt",
           "aviões estacionados perto do terminal", "зелёный лес", "운동장", "zone industrielle"]


def index_seconds(model, scene: Path, work: Path, tile_size: int) -> tuple[float, int]:
    """Seconds to index ``scene`` into a new tile index (half-overlapping tiles, none filtered out) and the
    number of tiles."""
    output = work / f"index-{time.monotonic_ns()}.parquet"
    started = time.perf_counter()
    api.build_index([scene], output, model=model,
                    tiling=api.TilingParams(tile_size=tile_size, overlap=0.5, min_valid=0.0, min_std=0.0))
    seconds = time.perf_counter() - started
    return seconds, len(api.open_index(output))


def query_seconds(model) -> float:
    """Median seconds to encode one query (each query alone, as a user types it)."""
    times = []
    for query in QUERIES:
        started = time.perf_counter()
        model.encode_texts([query])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", help="bundle directories; the first is the baseline")
    parser.add_argument("--scene", default=str(DEFAULT_SCENE))
    parser.add_argument("--tile-size", type=int, default=75, help="tile size in scene pixels")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-o", "--output", help="JSON file for the figures")
    args = parser.parse_args(argv)
    models = [api.load_model(b) for b in args.bundles]
    for model in models:  # warm-up: first session run, tokenizer load
        model.encode_texts(QUERIES[:1])
    index_times: list[list[float]] = [[] for _ in models]
    query_times: list[list[float]] = [[] for _ in models]
    tiles = 0
    with tempfile.TemporaryDirectory(prefix="rsmclip-speed-") as work:
        for _ in range(args.rounds):
            for i, model in enumerate(models):
                seconds, tiles = index_seconds(model, Path(args.scene), Path(work), args.tile_size)
                index_times[i].append(seconds)
                query_times[i].append(query_seconds(model))
    result = {"scene": args.scene, "tiles": tiles, "rounds": args.rounds, "bundles": []}
    base_index, base_query = statistics.median(index_times[0]), statistics.median(query_times[0])
    for bundle, model, it, qt in zip(args.bundles, models, index_times, query_times):
        index_s, query_s = statistics.median(it), statistics.median(qt)
        result["bundles"].append({
            "bundle": bundle, "name": model.bundle.info.name, "precision": model.bundle.info.precision,
            "indexing_speed_vs_baseline": base_index / index_s, "query_latency_vs_baseline": query_s / base_query})
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
