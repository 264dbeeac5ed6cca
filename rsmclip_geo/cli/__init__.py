"""`rsmclip-geo` command line: argument parsing, logging flags and clear one-line errors.

Each group of commands lives in its own module with ``register(subparsers)``; every command
sets ``func`` to a callable taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence

from rsmclip_geo import __version__
from rsmclip_geo.errors import RsmclipError

log = logging.getLogger("rsmclip_geo")

COMMAND_MODULES = ("rsmclip_geo.cli.model_commands", "rsmclip_geo.cli.search_commands",
                   "rsmclip_geo.cli.change_commands")
NUMBER_LIST_OPTIONS = ("--aoi",)  # options whose value may be a comma-separated list starting with a minus
NUMBER_LIST = re.compile(r"^-[\d.]+(,\s*-?[\d.]+)+$")
#: Library parameters whose option is not `--` + the name with dashes (None: a positional argument, named as is).
OPTION_NAMES = {"output": "-o", "nms_overlap": "--nms", "tile_id": "--tile", "providers": "--provider",
                "scenes": None, "index": None, "images": None, "before": None, "after": None, "direction": None}


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every registered command."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="rsmclip-geo",
        description="Multilingual text search over aerial and satellite imagery (RS-M-CLIP).",
    )
    parser.add_argument("--version", action="version", version=f"rsmclip-geo {__version__}")
    add_verbosity_flags(parser, default=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for command in sub.choices.values():  # the flags also work after the command name
        add_verbosity_flags(command, default=False)
    return parser


def add_verbosity_flags(parser: argparse.ArgumentParser, *, default: bool) -> None:
    """-v/--verbose and -q/--quiet; a command's copies leave the top-level values alone unless given."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="count", default=0 if default else argparse.SUPPRESS,
                       help="more log output (-vv for debug)")
    group.add_argument("-q", "--quiet", action="store_true", default=False if default else argparse.SUPPRESS,
                       help="only errors")


def join_number_lists(argv: Sequence[str]) -> list[str]:
    """``--aoi -9.2,38.6,-9.0,38.8`` -> ``--aoi=-9.2,38.6,-9.0,38.8``: argparse would read the value as an option."""
    out: list[str] = []
    for arg in argv:
        arg = str(arg)
        if out and out[-1] in NUMBER_LIST_OPTIONS and NUMBER_LIST.match(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def configure_logging(verbose: int, quiet: bool) -> None:
    """Log to stderr: warnings by default, info with -v, debug with -vv, errors only with -q."""
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    log.setLevel(level)


def option_name(param: str) -> str | None:
    """The command-line option of a library parameter (`overlap` -> `--overlap`)."""
    return OPTION_NAMES.get(param, "--" + param.replace("_", "-"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rsmclip-geo` console script."""
    parser = build_parser()
    args = parser.parse_args(join_number_lists(sys.argv[1:] if argv is None else argv))
    configure_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except RsmclipError as exc:
        print(f"rsmclip-geo: error: {exc.worded(option_name)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rsmclip-geo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): outputs are written before anything is printed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141


if __name__ == "__main__":
    sys.exit(main())
