"""Indexing throughput of a COG over HTTP on loopback against the same COG read locally, in the same run.

1. COG: a real scene of ../shared/data/geotiff made a cloud-optimised GeoTIFF (GDAL's COG driver,
   DEFLATE, 256 px blocks, overviews), its pixels --scale times finer so that it is a realistic size.
2. Server: nginx on 127.0.0.1 (tests/servers.py), serving it with range requests.
3. Index: `api.build_index` of the local file and of its http:// URL, alternately, --repeat times
   each (fresh output each time; GDAL's caches dropped by open_scene), tiles/s of each (median), the
   ratio remote / local, and the requests and bytes nginx served per remote run.

    python benchmarks/remote_read.py --model tests/data/tiny-bundle --tile-size 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from servers import Nginx, make_cog  # noqa: E402

from rsmclip_geo import api  # noqa: E402

GEOTIFF = REPO / ".." / "shared" / "data" / "geotiff"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scene", default="colorado_rgb_15cm.tif", help="a file of ../shared/data/geotiff")
    parser.add_argument("--scale", type=int, default=8)
    parser.add_argument("--model", default=str(REPO / "tests" / "data" / "tiny-bundle"))
    parser.add_argument("--tile-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    model = api.load_model(args.model, threads=args.threads)
    tiling = api.TilingParams(tile_size=args.tile_size)
    with tempfile.TemporaryDirectory(prefix="remote-read-") as tmp:
        work = Path(tmp)
        (work / "www").mkdir()
        (work / "nginx").mkdir()
        cog = make_cog(GEOTIFF / args.scene, work / "www" / "scene.tif", blocksize=256, compress="DEFLATE",
                       scale=args.scale)
        server = Nginx(work / "www", work / "nginx")
        try:
            rates: dict[str, list[float]] = {"local": [], "http": []}
            served = []
            for run in range(args.repeat):
                for name, scene in (("local", cog), ("http", server.url("scene.tif"))):
                    before = len(server.requests("scene.tif"))
                    start = time.perf_counter()
                    header = api.build_index([scene], work / f"{name}-{run}.parquet", model=model, tiling=tiling,
                                             threads=args.threads)
                    rates[name].append(len(header) / (time.perf_counter() - start))
                    if name == "http":
                        requests = server.requests("scene.tif")[before:]
                        served.append((len(requests), sum(sent for _, _, sent, _ in requests)))
        finally:
            server.stop()
        local, remote = statistics.median(rates["local"]), statistics.median(rates["http"])
        print(f"scene {args.scene} ×{args.scale}: {cog.stat().st_size / 1e6:.1f} MB, {len(header)} tiles of "
              f"{args.tile_size} px, model {model.bundle.info.name}, {args.threads} threads")
        print(f"local: {local:.0f} tiles/s   http (loopback): {remote:.0f} tiles/s   ratio http/local: "
              f"{remote / local:.2f}")
        print(f"per http run: {served[-1][0]} requests, {served[-1][1] / 1e6:.2f} MB served")


if __name__ == "__main__":
    main()
