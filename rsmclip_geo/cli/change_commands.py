"""`rsmclip-geo change`: what appeared or disappeared between two dates, a thin shell over rsmclip_geo.api."""

from __future__ import annotations

import argparse
from pathlib import Path

from rsmclip_geo.cli.display import fit
from rsmclip_geo.cli.search_commands import add_model_options, search_params


def print_changes(changes) -> None:
    """A plain table of changes on stdout; query and scene columns by display width (CJK takes two columns)."""
    print(f"{'rank':>4}  {'rise':>6}  {'before':>6}  {'after':>6}  {'query':<24}  {'scene (after)':<28}  "
          f"{'window (col,row,w,h)':<24}  centre lon,lat")
    for change in changes:
        centre = change.geometry.centroid
        window = f"{change.win_col},{change.win_row},{change.win_width},{change.win_height}"
        scores = "  ".join("     -" if score is None else f"{score:6.3f}"
                           for score in (change.score_before, change.score_after))
        print(f"{change.rank:>4}  {change.rise:6.3f}  {scores}  {fit(change.query, 24)}  "
              f"{fit(Path(change.scene).name, 28)}  {window:<24}  {centre.x:.6f},{centre.y:.6f}")


def cmd_change(args: argparse.Namespace) -> int:
    from rsmclip_geo.api import change, check_outputs, write_changes

    if args.output is None:
        args.output = f"{Path(args.after).stem}_changes.geojson"
    check_outputs(hits=args.output, inputs=(args.before, args.after))
    result = change(args.before, args.after, args.query or None, model=args.model, params=search_params(args),
                    direction=args.direction, threads=args.threads)
    write_changes(result.changes, args.output)
    print_changes(result.changes)
    print(f"wrote {len(result.changes)} changes ({result.matched} tile pairs matched) to {args.output}")
    return 0


def register(subparsers) -> None:
    """Add the change command."""
    p = subparsers.add_parser(
        "change", help="rank what appeared or disappeared between two dates",
        description="Match the tiles of two tile indexes of the same model by footprint (the same grid, else "
                    "the largest overlap) and rank them by the rise of a query's score from BEFORE to AFTER; "
                    "without a query, by how much their embeddings differ.")
    p.add_argument("before", metavar="INDEX_BEFORE", help="tile index of the earlier date")
    p.add_argument("after", metavar="INDEX_AFTER", help="tile index of the later date (same model)")
    p.add_argument("query", nargs="*", metavar="QUERY", help='what appeared or disappeared, e.g. "storage tanks"')
    p.add_argument("-o", "--output",
                   help="changes file: .geojson (default INDEX_AFTER_changes.geojson), .gpkg or .parquet")
    direction = p.add_mutually_exclusive_group()
    direction.add_argument("--appeared", dest="direction", action="store_const", const="appeared",
                           help="rank by score after minus before (default)")
    direction.add_argument("--disappeared", dest="direction", action="store_const", const="disappeared",
                           help="rank by score before minus after")
    p.set_defaults(direction="appeared")
    p.add_argument("--top-k", type=int, default=10, help="changes per query (default 10)")
    p.add_argument("--threshold", type=float, help="minimum rise of the score (or embedding distance)")
    p.add_argument("--aoi", help="area of interest: minlon,minlat,maxlon,maxlat (EPSG:4326) or a vector file")
    p.add_argument("--nms", type=float, default=0.5,
                   help="drop changes overlapping a better one by more than this fraction of the smaller tile "
                        "(default 0.5; 1 keeps all)")
    p.add_argument("--lang", help="add prompt templates of this language (en pt es fr de nl it zh ko ru)")
    add_model_options(p)
    p.set_defaults(func=cmd_change)
