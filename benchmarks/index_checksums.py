"""What Parquet page checksums cost a search: exact search over the same tile index with and without them.

1. Tile index: the demo model (or --model) indexes the real GeoTIFFs of ../shared/data/geotiff with
   the project's indexer (64 px tiles, 75 % overlap); its rows are repeated to --rows tiles and
   written twice with the project's writer options: with page checksums (as `index` writes them) and
   without (as indexes written before checksums were).
2. Search: `search_index(..., params=SearchParams(exact=True))` on each file, alternating, --repeats times, queries from
   the query cache (no text tower in the timings): reading every page (verified where checksummed),
   scoring every tile with the finite-cosine check, NMS, hits. Median seconds of each, their ratio.
3. Read only: `pyarrow.parquet.read_table` of the checksummed file with verification on and off.

    python benchmarks/index_checksums.py --work-dir /tmp/checksum_bench
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
GEOTIFF = REPO / ".." / "shared" / "data" / "geotiff"
SCENES = ("colorado_rgb_15cm.tif", "pix4d_farm_rgba_35cm.tif", "fotomap_4band_2cm.tif")
QUERIES = ["airport", "aeroporto", "forest", "Wald", "farmland"]


def timings(calls: dict[object, Callable[[], object]], repeats: int) -> dict[object, tuple[float, float]]:
    """(median, fastest) wall time of each call, the calls alternating within each repeat."""
    times: dict[object, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}


def report(what: str, on: tuple[float, float], off: tuple[float, float], labels: tuple[str, str]) -> None:
    print(f"{what}: median {on[0]:.3f} s {labels[0]}, {off[0]:.3f} s {labels[1]} (ratio {on[0] / off[0]:.3f}); "
          f"fastest {on[1]:.3f} s vs {off[1]:.3f} s (ratio {on[1] / off[1]:.3f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="bundle directory or name (default: the bundled demo model)")
    parser.add_argument("--rows", type=int, default=500_000, help="tiles in the index (default 500,000)")
    parser.add_argument("--repeats", type=int, default=11, help="timed searches of each file (default 11)")
    parser.add_argument("--work-dir", type=Path, required=True, help="index files (the real-tile index is reused)")
    args = parser.parse_args(argv)

    from rsmclip_geo.encoders import load_model
    from rsmclip_geo.indexer import index_scenes
    from rsmclip_geo.tile_index import WRITE_OPTIONS
    from rsmclip_geo.caches import QueryCache
    from rsmclip_geo.search import SearchParams, search_index
    from rsmclip_geo.tiling import TilingParams

    args.work_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    real = args.work_dir / f"real_{model.bundle.info.name}.parquet"
    if not real.is_file():
        index_scenes([GEOTIFF / name for name in SCENES], real, model=model,
                     tiling=TilingParams(tile_size=64, overlap=0.75), batch_size=128)
    table = pq.read_table(real)
    table = pa.concat_tables([table] * -(-args.rows // table.num_rows)).slice(0, args.rows)
    files = {"with checksums": args.work_dir / "checksummed.parquet", "without": args.work_dir / "plain.parquet"}
    pq.write_table(table, files["with checksums"], **WRITE_OPTIONS)
    pq.write_table(table, files["without"], **{**WRITE_OPTIONS, "write_page_checksum": False})
    sizes = {name: path.stat().st_size / 1e6 for name, path in files.items()}
    print(f"index: {table.num_rows} tiles of {model.bundle.info.name} ({model.bundle.info.embed_dim}-d), "
          f"{sizes['with checksums']:.1f} MB with page checksums, {sizes['without']:.1f} MB without")

    cache = QueryCache(args.work_dir / "queries.sqlite")
    exact = SearchParams(exact=True)
    search_index(files["without"], QUERIES, model=model, params=exact, query_cache=cache)  # fills the query cache
    search = timings({name: (lambda path=path: search_index(path, QUERIES, model=model, params=exact,
                                                            query_cache=cache))
                      for name, path in files.items()}, args.repeats)
    read = timings({verified: (lambda verified=verified: pq.read_table(
        files["with checksums"], page_checksum_verification=verified)) for verified in (True, False)}, args.repeats)
    print(f"{args.repeats} runs of each, alternating:")
    report(f"exact search, {len(QUERIES)} queries", search["with checksums"], search["without"],
           ("verified", "without checksums"))
    report("read_table of the checksummed file", read[True], read[False], ("verified", "unverified"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
