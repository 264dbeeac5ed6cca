"""`rsmclip-geo index | tile-search | search | similar | ann-index`: thin shells over rsmclip_geo.api."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from rsmclip_geo.cli.display import fit
from rsmclip_geo.errors import QueryError, RsmclipError

log = logging.getLogger("rsmclip_geo")


class ProgressBar:
    """`progress(done, total)` callback drawing tiles done and tiles/s on a terminal's stderr."""

    def __init__(self, label: str, enabled: bool):
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.done = self.total = 0
        self._drawn = 0.0

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        now = time.perf_counter()
        if not self.enabled or (now - self._drawn < 0.2 and done < total):
            return
        self._drawn = now
        rate = done / max(now - self.start, 1e-9)
        percent = 100.0 * done / total if total else 100.0
        sys.stderr.write(f"\r{self.label}: {done}/{total} tiles ({percent:.0f} %) {rate:.1f} tiles/s ")
        sys.stderr.flush()

    def finish(self) -> None:
        elapsed = time.perf_counter() - self.start
        if self.enabled:
            sys.stderr.write("\n")
        log.info("%s: %d tiles in %.1f s (%.1f tiles/s)", self.label, self.done, elapsed,
                 self.done / max(elapsed, 1e-9))


def parse_ints(text: str, what: str, count: int | None = None) -> tuple[int, ...]:
    """'3,2,1' -> (3, 2, 1); RsmclipError naming the option when malformed."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise RsmclipError(f"{what} {text}: give comma-separated integers, e.g. {what} 1,2,4") from None
    if not values or (count is not None and len(values) != count):
        raise RsmclipError(f"{what} {text}: give {count or 'one or more'} comma-separated integers")
    return values


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="bundle name or directory (default: the index's model / the bundled demo model)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime and reader threads (default: CPU cores)")


def tile_size_m_option(text: str) -> float | str:
    """--tile-size-m: metres, or auto."""
    from rsmclip_geo.api import AUTO_TILE_SIZE

    if text.strip().lower() == AUTO_TILE_SIZE:
        return AUTO_TILE_SIZE
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give metres (e.g. 600) or {AUTO_TILE_SIZE}") from None


def add_tiling_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tiling")
    size = group.add_mutually_exclusive_group()
    size.add_argument("--tile-size", type=int, help="tile side in pixels (default: the model's tile size)")
    size.add_argument("--tile-size-m", type=tile_size_m_option,
                      help="tile side in metres on the ground, or auto: per scene, the size that puts it at the "
                           "ground resolution the model was trained at (bundles that record it)")
    group.add_argument("--overlap", type=float, default=0.0, help="overlap between tiles, fraction (default 0)")
    group.add_argument("--scales", default="1", help="tile scales, e.g. 1,2,4 (tiles of k × size)")
    group.add_argument("--bands", help="1-based R,G,B bands, e.g. 3,2,1 (default: by colour interpretation)")
    group.add_argument("--nodata", help="value of invalid pixels, replacing the file's (e.g. 0 for black "
                                        "collars); none ignores the file's value")
    group.add_argument("--min-valid", type=float, default=0.5, help="skip tiles with less valid area (default 0.5)")
    group.add_argument("--min-std", type=float, default=2.0, help="skip near-constant tiles (default 2.0)")
    group.add_argument("--batch-size", type=int, default=32, help="tiles per encoder batch (default 32)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


#: Values of the Ray-only options when not given.
RAY_DEFAULTS = dict(address=None, workers=None, cpus_per_worker=1.0, gpus_per_worker=None)


def add_backend_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backend")
    group.add_argument("--backend", choices=("onnx", "torch"), default="onnx",
                       help="torch runs the bundle's weights.safetensors, in fp16 on a GPU (needs torch + open_clip)")
    group.add_argument("--device", help="torch device, e.g. cuda or cuda:1 (default: cuda when available, else cpu)")


def indexing_model(args: argparse.Namespace):
    """The model to index with, loaded once (--model, --backend, --device, --threads)."""
    from rsmclip_geo.api import load_model

    return load_model(args.model, backend=args.backend, device=args.device, threads=args.threads,
                      batch_size=args.batch_size)


def indexing_engine(args: argparse.Namespace):
    """The engine of --engine with its options (the Ray options need --engine ray)."""
    from rsmclip_geo.api import LocalEngine, RayEngine

    options = dict(address=args.address, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                   gpus_per_worker=args.gpus_per_worker)
    if args.engine == "ray":
        return RayEngine(**options)
    if options != RAY_DEFAULTS:
        raise RsmclipError("--address, --workers, --cpus-per-worker and --gpus-per-worker need --engine ray")
    return LocalEngine()


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine (see docs/scale.md)")
    group.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local: this process (default); ray: Ray Data actors, output must be a directory")
    group.add_argument("--address", help="Ray cluster to join, e.g. auto or 10.0.0.1:6379 (default: a local Ray)")
    group.add_argument("--workers", type=int,
                       help="encoder actors (default: one per GPU, else one per CPU left after a reader)")
    group.add_argument("--cpus-per-worker", type=float, default=RAY_DEFAULTS["cpus_per_worker"],
                       help="CPUs per encoder actor (default 1; also its ONNX Runtime threads unless --threads)")
    group.add_argument("--gpus-per-worker", type=float,
                       help="GPUs per encoder actor (default 1 when the cluster has GPUs, else 0)")


def add_stac_options(parser: argparse.ArgumentParser) -> None:
    from rsmclip_geo.api import DEFAULT_ASSET

    group = parser.add_argument_group("STAC (instead of scenes)")
    group.add_argument("--stac", metavar="URL",
                       help="index the items of a STAC API (item search) or of a static catalogue, collection or "
                            "item JSON (a path or an http URL)")
    group.add_argument("--collection", help="only items of this collection")
    group.add_argument("--bbox", nargs=4, type=float, metavar=("W", "S", "E", "N"),
                       help="only items meeting this box (degrees, EPSG:4326)")
    group.add_argument("--datetime", help="only items of this RFC 3339 interval, e.g. 2023-01-01/2023-06-30 "
                                          "(open ends ..)")
    group.add_argument("--asset", default=DEFAULT_ASSET,
                       help=f"asset to index (default {DEFAULT_ASSET}), or three single-band assets as R,G,B, "
                            "e.g. red,green,blue or B04,B03,B02")
    group.add_argument("--max-items", type=int, help="index at most this many items")
    group.add_argument("--max-cloud", type=float, help="only items with eo:cloud_cover at most this (percent)")


#: Values of the STAC filter options when not given.
STAC_DEFAULTS = dict(collection=None, bbox=None, datetime=None, max_items=None, max_cloud=None)


def index_inputs(args: argparse.Namespace) -> list:
    """What `index` embeds: the scenes given, or the scenes of --stac's items (checked before any work)."""
    from rsmclip_geo.api import DEFAULT_ASSET, check_outputs, stac_scenes

    filters = {name: getattr(args, name) for name in STAC_DEFAULTS}
    if not args.stac:
        if filters != STAC_DEFAULTS or args.asset != DEFAULT_ASSET:
            raise RsmclipError("--collection, --bbox, --datetime, --asset, --max-items and --max-cloud filter the "
                               "items of --stac URL; give --stac too")
        return args.scenes
    if args.scenes:
        raise RsmclipError("--stac URL indexes the items of a catalogue: give no scenes with it")
    check_outputs(tile_index=args.output)  # before the catalogue is searched
    return stac_scenes(args.stac, asset=args.asset, **filters)


def add_search_options(parser: argparse.ArgumentParser, heatmap: bool = True) -> None:
    group = parser.add_argument_group("search")
    group.add_argument("--top-k", type=int, default=10, help="hits per query (default 10)")
    group.add_argument("--threshold", type=float, help="minimum cosine score")
    group.add_argument("--aoi", help="area of interest: minlon,minlat,maxlon,maxlat (EPSG:4326) or a vector file")
    group.add_argument("--datetime", help="only tiles of scenes whose STAC datetime meets this RFC 3339 interval, "
                                          "e.g. 2023-01-01/2023-06-30 (open ends ..)")
    group.add_argument("--nms", type=float, default=0.5,
                       help="drop hits overlapping a better one by more than this fraction of the smaller tile "
                            "(default 0.5; 1 keeps all)")
    if heatmap:
        group.add_argument("--lang", help="also average each query over the model's prompt templates of this "
                                          "language (bundles that have them, e.g. pt)")
        group.add_argument("--queries-file", help="more queries, one per line (UTF-8)")
        group.add_argument("--heatmap", help="also write a score GeoTIFF aligned with the scene")


def add_feedback_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("relevance feedback")
    group.add_argument("--positive", nargs="+", default=[], metavar="TILE_ID",
                       help="tiles marked right: the query moves towards them (judged tiles are not ranked again)")
    group.add_argument("--negative", nargs="+", default=[], metavar="TILE_ID", help="tiles marked wrong")
    group.add_argument("--labels-file", help="judgements kept between runs, a GeoJSON layer: read when it exists, "
                                             "updated with --positive, --negative and --undo, written back")
    group.add_argument("--undo", nargs="+", default=[], metavar="TILE_ID",
                       help="take back the judgements of these tiles (of --labels-file)")
    group.add_argument("--feedback-method", default=None,
                       help="linear (a classifier over the tiles, kept close to the query; default) or rocchio")


def feedback_labels(args: argparse.Namespace, index):
    """This run's judgements (None without feedback options): --labels-file, less --undo, plus --positive and
    --negative, on the tiles of `index` (in memory)."""
    from rsmclip_geo.api import Labels

    if not (args.positive or args.negative or args.undo or args.labels_file):
        return None
    labels = Labels.read(args.labels_file) if args.labels_file and Path(args.labels_file).exists() else Labels()
    for tile_id in args.undo:
        if labels.undo(tile_id) is None:
            raise QueryError(f"--undo {tile_id}: no judgement of that tile to take back")
    return labels.mark_ids(index, args.positive, args.negative)


def tiling_params(args: argparse.Namespace):
    from rsmclip_geo.api import TilingParams

    return TilingParams(tile_size=args.tile_size, tile_size_m=args.tile_size_m, overlap=args.overlap,
                        scales=args.scales, min_valid=args.min_valid, min_std=args.min_std)


def bands_option(args: argparse.Namespace) -> tuple[int, int, int] | None:
    return parse_ints(args.bands, "--bands", 3) if args.bands else None  # type: ignore[return-value]


def nodata_option(args: argparse.Namespace) -> float | str | None:
    """--nodata: the file's value when not given, None for `none`, else a number."""
    from rsmclip_geo.api import FILE_NODATA

    if args.nodata is None:
        return FILE_NODATA
    if args.nodata.strip().lower() == "none":
        return None
    try:
        return float(args.nodata)
    except ValueError:
        raise RsmclipError(f"--nodata {args.nodata}: give a number (e.g. 0) or none") from None


def read_queries(args: argparse.Namespace) -> list[str]:
    """Queries from the command line plus --queries-file."""
    queries = list(args.query)
    if getattr(args, "queries_file", None):
        path = Path(args.queries_file)
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: drops a byte order mark
        except (OSError, UnicodeDecodeError) as exc:
            raise QueryError(f"--queries-file {path}: cannot be read ({exc}); give a UTF-8 text file") from None
        queries += [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not queries:
        raise QueryError("no query given: type what to look for, e.g. \"airport\", or pass --queries-file")
    return queries


def search_params(args: argparse.Namespace, labels=None):
    """The search options as the library's SearchParams (with this run's judgements, if any)."""
    from rsmclip_geo.api import SearchParams

    feedback = {"feedback_method": args.feedback_method} if getattr(args, "feedback_method", None) else {}
    return SearchParams(top_k=args.top_k, threshold=args.threshold, aoi=args.aoi,
                        datetime=getattr(args, "datetime", None), nms_overlap=args.nms,
                        lang=getattr(args, "lang", None), exact=getattr(args, "exact", False), labels=labels,
                        **feedback)


def check_outputs(args: argparse.Namespace, *inputs: str, index=None) -> None:
    """Refuse unwritable -o / --heatmap paths, and outputs that would replace or land in an input (a scene,
    an index file or directory), before any work is done."""
    from rsmclip_geo.api import check_outputs as check

    check(hits=getattr(args, "output", None), heatmap=getattr(args, "heatmap", None), index=index,
          scene=getattr(args, "heatmap_scene", None), labels=getattr(args, "labels_file", None), inputs=inputs)


def print_hits(hits) -> None:
    """A plain table of hits on stdout; query and scene columns by display width (CJK takes two columns)."""
    print(f"{'rank':>4}  {'score':>6}  {'query':<24}  {'scene':<28}  {'scale':>5}  {'window (col,row,w,h)':<24}  centre lon,lat")
    for hit in hits:
        centre = hit.geometry.centroid
        window = f"{hit.win_col},{hit.win_row},{hit.win_width},{hit.win_height}"
        print(f"{hit.rank:>4}  {hit.score:6.3f}  {fit(hit.query, 24)}  {fit(Path(hit.scene).name, 28)}  "
              f"{hit.scale:>5}  {window:<24}  {centre.x:.6f},{centre.y:.6f}")


def write_outputs(args: argparse.Namespace, result) -> None:
    """Write the hits file and the heatmap (before anything goes to stdout, which may be closed early);
    a heatmap that cannot be written fails before the hits file is written."""
    from rsmclip_geo.api import check_outputs as check, write_heatmap, write_hits

    scene = getattr(args, "heatmap_scene", None)
    if args.heatmap:
        check(heatmap=args.heatmap, index=result.index, scene=scene)
    if args.output:
        write_hits(result.hits, args.output)
    if args.heatmap:
        write_heatmap(result, args.heatmap, scene=scene)


def report(args: argparse.Namespace, hits) -> None:
    """The hits table, then where the hits file went."""
    print_hits(hits)
    if args.output:
        print(f"wrote {len(hits)} hits to {args.output}")


def cmd_index(args: argparse.Namespace) -> int:
    from rsmclip_geo.api import build_index

    if args.verify:
        return verify(args)
    if not (args.scenes or args.stac) or not args.output:
        raise RsmclipError("index: give one or more scenes and -o OUTPUT (a .parquet file or a directory name), "
                           "--stac URL and -o OUTPUT, or --verify INDEX")
    engine = indexing_engine(args)
    params = tiling_params(args)
    scenes = index_inputs(args)
    progress = ProgressBar("index", not (args.no_progress or args.quiet))
    header = build_index(scenes, args.output, model=indexing_model(args), tiling=params,
                         bands=bands_option(args), nodata=nodata_option(args), engine=engine,
                         batch_size=args.batch_size, progress=progress, threads=args.threads)
    progress.finish()
    scenes = len(header.scenes)
    print(f"wrote {header.path}: {scenes} scene{'s' * (scenes != 1)}, {len(header)} tiles kept, "
          f"{progress.total - len(header)} skipped, {time.perf_counter() - progress.start:.1f} s")
    return 0


def verify(args: argparse.Namespace) -> int:
    """`index --verify INDEX`: check every page and row of an index (and its ANN index); one line either way."""
    from rsmclip_geo.api import verify_index

    if args.scenes or args.output:
        raise RsmclipError("--verify INDEX checks an existing index: give no scenes and no -o")
    print(verify_index(args.verify))
    return 0


def cmd_tile_search(args: argparse.Namespace) -> int:
    from rsmclip_geo.api import scene_file_name, tile_search

    queries = read_queries(args)
    if args.output is None:
        args.output = f"{Path(scene_file_name(args.scene)).stem}_hits.geojson"
    check_outputs(args, args.scene)
    params = tiling_params(args)
    search = search_params(args)
    model = indexing_model(args)
    progress = ProgressBar("index", not (args.no_progress or args.quiet))
    result = tile_search(args.scene, queries, model=model, tiling=params, bands=bands_option(args),
                         nodata=nodata_option(args), params=search, cache_dir=args.cache_dir,
                         use_cache=not args.no_cache, batch_size=args.batch_size, progress=progress,
                         threads=args.threads)
    progress.finish()
    write_outputs(args, result)
    report(args, result.hits)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from rsmclip_geo.api import open_index, search

    queries = read_queries(args)
    check_outputs(args, args.index)
    # A heatmap needs every tile's score and judgements need the tiles: the whole index in memory.
    # Otherwise the search picks exact or ANN search by size and reads only what it needs.
    judged = bool(args.positive or args.negative or args.undo or args.labels_file)
    index = open_index(args.index, in_memory=bool(args.heatmap) or judged)
    labels = feedback_labels(args, index)
    result = search(index, queries, model=args.model, params=search_params(args, labels),
                    scores=bool(args.heatmap), threads=args.threads)
    write_outputs(args, result)
    save_labels(args, labels)
    report(args, result.hits)
    return 0


def save_labels(args: argparse.Namespace, labels) -> None:
    """Write the judgements back to --labels-file."""
    if args.labels_file and labels is not None:
        labels.write(args.labels_file)


def cmd_ann_index(args: argparse.Namespace) -> int:
    from rsmclip_geo.api import build_ann

    print(build_ann(args.index, kind=args.kind, threads=args.threads))
    return 0


def cmd_similar(args: argparse.Namespace) -> int:
    from rsmclip_geo.api import open_index, similar, write_hits

    check_outputs(args, args.index)
    index = open_index(args.index, in_memory=True)
    labels = feedback_labels(args, index)
    result = similar(index, tile_id=args.tile, image=args.image, bands=bands_option(args), model=args.model,
                     params=search_params(args, labels), threads=args.threads)
    if args.output:
        write_hits(result.hits, args.output)
    save_labels(args, labels)
    report(args, result.hits)
    return 0


def register(subparsers) -> None:
    """Add the index, tile-search, search, similar and ann-index commands."""
    p = subparsers.add_parser("index", help="build a GeoParquet tile index over one or more scenes",
                              description="Tile scenes, embed every tile and write one GeoParquet tile index. "
                                          "An interrupted run resumes when started again.")
    p.add_argument("scenes", nargs="*", metavar="SCENE", help="GeoTIFF scenes (CRSs may differ)")
    p.add_argument("-o", "--output", help="index file (.parquet) or directory of shards")
    p.add_argument("--verify", metavar="INDEX",
                   help="instead of indexing: read every page of INDEX (and INDEX.ann/) and check its checksums, "
                        "embeddings and metadata")
    add_stac_options(p)
    add_model_options(p)
    add_backend_options(p)
    add_tiling_options(p)
    add_engine_options(p)
    p.set_defaults(func=cmd_index)

    p = subparsers.add_parser("tile-search", help="index a scene (cached) and search it",
                              description="Index one scene (kept in a cache) and search it in any language.")
    p.add_argument("scene", metavar="SCENE", help="GeoTIFF scene")
    p.add_argument("query", nargs="*", metavar="QUERY", help='what to look for, e.g. "aeroporto"')
    p.add_argument("-o", "--output", help="hits file: .geojson (default SCENE_hits.geojson), .gpkg or .parquet")
    p.add_argument("--cache-dir", help="index cache (default $RSMCLIP_GEO_CACHE or ~/.cache/rsmclip-geo)")
    p.add_argument("--no-cache", action="store_true", help="index in a temporary directory, keep nothing")
    add_model_options(p)
    add_backend_options(p)
    add_tiling_options(p)
    add_search_options(p)
    p.set_defaults(func=cmd_tile_search)

    p = subparsers.add_parser("search", help="search a tile index with text in any of the model's languages",
                              description="Rank the tiles of an index against text queries; the model comes "
                                          "from the index metadata.")
    p.add_argument("index", metavar="INDEX", help="tile index (.parquet file or shard directory)")
    p.add_argument("query", nargs="*", metavar="QUERY", help='what to look for, e.g. "campo de golf"')
    p.add_argument("-o", "--output", help="hits file: .geojson, .gpkg or .parquet")
    p.add_argument("--exact", action="store_true",
                   help="score every tile even when the index is large enough for its ANN index")
    add_model_options(p)
    add_search_options(p)
    p.add_argument("--scene", dest="heatmap_scene",
                   help="scene of a multi-scene index for --heatmap (file name, path or fingerprint)")
    add_feedback_options(p)
    p.set_defaults(func=cmd_search)

    p = subparsers.add_parser("ann-index", help="build the ANN index that `search` uses on large tile indexes",
                              description="Build an approximate nearest-neighbour index (FAISS; needs "
                                          "rsmclip-geo[ann]) next to a tile index, in INDEX.ann/. `search` uses "
                                          "it when the index has more than 100,000 tiles; rebuild it after the "
                                          "tile index changes.")
    p.add_argument("index", metavar="INDEX", help="tile index (.parquet file or shard directory)")
    p.add_argument("--kind", choices=("hnsw", "ivf"),
                   help="index type (default: HNSW up to 500,000 tiles, IVF above)")
    p.add_argument("--threads", type=int, help="FAISS threads (default: CPU cores)")
    p.set_defaults(func=cmd_ann_index)

    p = subparsers.add_parser("similar", help="search a tile index by example (a tile or an image)",
                              description="Rank the tiles of an index by similarity to one tile or image chip.")
    p.add_argument("index", metavar="INDEX", help="tile index (.parquet file or shard directory)")
    example = p.add_mutually_exclusive_group(required=True)
    example.add_argument("--tile", help="tile id from the index")
    example.add_argument("--image", help="image chip (JPEG, PNG, or a GeoTIFF of any band count and dtype)")
    p.add_argument("-o", "--output", help="hits file: .geojson, .gpkg or .parquet")
    p.add_argument("--bands", help="1-based R,G,B bands of --image, e.g. 3,2,1 (default: by colour interpretation)")
    add_model_options(p)
    add_search_options(p, heatmap=False)
    add_feedback_options(p)
    p.set_defaults(func=cmd_similar)
