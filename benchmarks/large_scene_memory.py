"""Peak memory of indexing a huge virtual scene: a VRT mosaic repeating a real GeoTIFF.

Builds a SIZE × SIZE px VRT (default 50,000) that tiles the RGB bands of a real scene from
../shared/data/geotiff, indexes it with the project's indexer (shard-directory output) in a child
process, samples the child's RSS from /proc every 50 ms and reads its exact peak (VmHWM) when it
ends, and prints the peak against the 1.5 GB target.

    python benchmarks/large_scene_memory.py --model rsmclip_geo/models/rsmclip-demo-aid \\
        --size 50000 --tile-size 1000 -o /tmp/large_scene

The runtime caps GDAL's block cache (rsmclip_geo.raster.GDAL_CACHE_MB); `--gdal-cachemax 5%`
shows GDAL's own default for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from xml.sax.saxutils import escape

import rasterio

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO / ".." / "shared" / "data" / "geotiff" / "fotomap_4band_2cm.tif"
TARGET_MB = 1536
COLOUR = ("Red", "Green", "Blue")


def write_tiled_vrt(source: Path, output: Path, size: int, bands: tuple[int, int, int] = (1, 2, 3)) -> Path:
    """A size × size px VRT repeating `source`'s bands (as R, G, B) edge to edge, in its CRS and pixel size."""
    source = source.resolve()
    with rasterio.open(source) as src:
        width, height, crs, transform, dtype = src.width, src.height, src.crs.to_wkt(), src.transform, src.dtypes[0]
    geotransform = ", ".join(repr(v) for v in transform.to_gdal())
    bands_xml = []
    for i, band in enumerate(bands, start=1):
        sources = []
        for row in range(0, size, height):
            for col in range(0, size, width):
                w, h = min(width, size - col), min(height, size - row)
                sources.append(
                    f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(str(source))}</SourceFilename>'
                    f"<SourceBand>{band}</SourceBand>"
                    f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
                    f'<DstRect xOff="{col}" yOff="{row}" xSize="{w}" ySize="{h}"/></SimpleSource>')
        bands_xml.append(f'<VRTRasterBand dataType="{"Byte" if dtype == "uint8" else dtype}" band="{i}">'
                         f"<ColorInterp>{COLOUR[i - 1]}</ColorInterp>{''.join(sources)}</VRTRasterBand>")
    xml = (f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}"><SRS>{escape(crs)}</SRS>'
           f"<GeoTransform>{geotransform}</GeoTransform>{''.join(bands_xml)}</VRTDataset>")
    output.write_text(xml)
    return output


def _child(spec: dict) -> None:
    """Index the scene (runs in the measured child process) and print a JSON line of results."""
    from rsmclip_geo.indexer import index_scenes
    from rsmclip_geo.tile_index import IndexHeader
    from rsmclip_geo.tiling import TilingParams

    start = time.perf_counter()
    index_scenes([spec["scene"]], spec["output"], model=spec["model"], batch_size=spec["batch_size"],
                 tiling=TilingParams(tile_size=spec["tile_size"], min_std=0.0), threads=spec["threads"])
    print(json.dumps({
        "tiles": len(IndexHeader.read(spec["output"])),
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": proc_status_mb("self", "VmHWM"),
        "gdal_cachemax": os.environ.get("GDAL_CACHEMAX"),
    }))


def proc_status_mb(pid: int | str, field: str = "VmRSS") -> float:
    """A memory field of /proc/PID/status in MB (VmRSS: now; VmHWM: peak of this process image).

    VmHWM, unlike ru_maxrss, does not inherit the peak of the parent a child was forked from.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure_index_rss(scene: Path, output: Path, model: str, *, tile_size: int, batch_size: int = 32,
                      threads: int | None = None, gdal_cachemax: str | None = None) -> dict:
    """Index `scene` into `output` in a child process; its results plus sampled and exact peak RSS (MB)."""
    spec = {"scene": str(scene), "output": str(output), "model": model, "tile_size": tile_size,
            "batch_size": batch_size, "threads": threads}
    env = dict(os.environ)
    if gdal_cachemax is not None:
        env["GDAL_CACHEMAX"] = gdal_cachemax
    child = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples = []
    while child.poll() is None:
        samples.append(proc_status_mb(child.pid))
        time.sleep(0.05)
    out, err = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"indexing failed ({child.returncode}): {err.strip()[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["sampled_peak_rss_mb"] = max(samples, default=0.0)
    result["rss_samples_mb"] = samples
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help="bundle directory or name (default: the runtime's default model)")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="real GeoTIFF the VRT repeats")
    parser.add_argument("--size", type=int, default=50_000, help="VRT side in pixels (default 50000)")
    parser.add_argument("--tile-size", type=int, default=1000, help="tile side in pixels (default 1000)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--gdal-cachemax", help="GDAL_CACHEMAX for the child (default: the runtime's cap)")
    parser.add_argument("-o", "--output", type=Path, help="work directory (VRT and index); required")
    args = parser.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return 0
    if args.output is None:
        parser.error("-o/--output is required: the work directory for the VRT and the index")
    args.output.mkdir(parents=True, exist_ok=True)
    vrt = write_tiled_vrt(args.source, args.output / f"mosaic_{args.size}.vrt", args.size)
    index = args.output / f"mosaic_{args.size}_t{args.tile_size}"
    result = measure_index_rss(vrt, index, args.model, tile_size=args.tile_size, batch_size=args.batch_size,
                               threads=args.threads, gdal_cachemax=args.gdal_cachemax)
    samples = result.pop("rss_samples_mb")
    quarter = max(1, len(samples) // 4)
    print(f"scene: {args.size} x {args.size} px VRT over {args.source.name}; tiles {args.tile_size} px -> "
          f"{result['tiles']} tiles in {result['seconds']:.0f} s; GDAL_CACHEMAX={result['gdal_cachemax']}")
    print(f"RSS over the run (MB): first quarter max {max(samples[:quarter]):.0f}, "
          f"last quarter max {max(samples[-quarter:]):.0f}")
    peak = result["peak_rss_mb"]
    print(f"peak RSS {peak:.0f} MB (sampled {result['sampled_peak_rss_mb']:.0f} MB); target {TARGET_MB} MB: "
          f"{peak / TARGET_MB:.2f} of target, {'PASS' if peak < TARGET_MB else 'FAIL'}")
    print(json.dumps(result))
    return 0 if peak < TARGET_MB else 1


if __name__ == "__main__":
    sys.exit(main())
