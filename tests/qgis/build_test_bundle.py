"""Build the tiny test model bundle for the plugin suite with the project's main venv (torch).

QGIS's Python has no torch, so the plugin suite runs this once with $RSMCLIP_VENV's Python; it is
the core suite's ``tiny_bundle`` recipe (tests/conftest.py), exported by training.export.

    .venv/bin/python tests/qgis/build_test_bundle.py -o /tmp/bundles/tiny-bundle
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from conftest import build_tiny_bundle, build_tiny_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, required=True, help="bundle directory to write")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rsmclip-tiny-model-") as tmp:
        print(build_tiny_bundle(build_tiny_model(Path(tmp)), args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
