"""Build the demo scene: a georeferenced GeoTIFF mosaic of AID validation images, one class per cell.

    python -m training.demo_scene --data ../shared/data/aid -o rsmclip_geo/data/demo_aid_mosaic.tif

Each of the 30 AID classes fills one 150 x 150 px cell of a 6 x 5 grid (900 x 750 px). The cell
image is the first validation image of its class (``training.data.split_class_folder``: per class,
sorted file names, index % 5 == 4), so the bundled demo model never trained on any pixel of the
scene. Classes are placed in a fixed shuffled order (seed 0) so that neighbours are unrelated.

The georeference is nominal: a north-up grid in UTM zone 29N (EPSG:32629) at 4 m per pixel, the
middle of the 2-32 m/px range of the downsampled AID images; the cells were not photographed there.
The GeoTIFF is RGB, 256 x 256 internally tiled, JPEG-compressed (YCbCr); a sidecar CSV
(``<output stem>_cells.csv``) lists ``col,row,class,source`` for every cell, ``source`` being the
image path relative to the AID folder's parent.
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from rsmclip_geo.errors import RsmclipError
from training import data as D
from training.evaluate import write_atomic

CELL = 150
COLUMNS, ROWS = 6, 5
CRS = "EPSG:32629"
PIXEL_SIZE_M = 4.0
ORIGIN = (480_000.0, 4_290_000.0)  # upper-left corner (easting, northing)
LAYOUT_SEED = 0


@dataclass(frozen=True)
class MosaicCell:
    """One cell of the mosaic: its grid position, class and source image."""

    col: int
    row: int
    label: str
    source: Path


def choose_cells(aid_root: Path) -> list[MosaicCell]:
    """The first validation image of every class, placed row-major in a seeded shuffled class order."""
    first_val: dict[str, Path] = {}
    for path, label in D.split_class_folder(aid_root)["val"]:
        first_val.setdefault(label, path)
    if len(first_val) != COLUMNS * ROWS:
        raise RsmclipError(f"--data {aid_root}: has {len(first_val)} classes with validation images; the "
                           f"{COLUMNS}x{ROWS} mosaic needs exactly {COLUMNS * ROWS} (the AID classes)")
    labels = sorted(first_val)
    random.Random(LAYOUT_SEED).shuffle(labels)
    return [MosaicCell(i % COLUMNS, i // COLUMNS, label, first_val[label]) for i, label in enumerate(labels)]


def mosaic_pixels(cells: Sequence[MosaicCell]) -> np.ndarray:
    """uint8 [3, ROWS*CELL, COLUMNS*CELL] band-major pixels of the mosaic."""
    pixels = np.zeros((3, ROWS * CELL, COLUMNS * CELL), dtype=np.uint8)
    for cell in cells:
        image = D.load_rgb(cell.source)
        if image.size != (CELL, CELL):
            image = image.resize((CELL, CELL), Image.Resampling.BICUBIC)
        y, x = cell.row * CELL, cell.col * CELL
        pixels[:, y : y + CELL, x : x + CELL] = np.asarray(image).transpose(2, 0, 1)
    return pixels


def write_mosaic(pixels: np.ndarray, output: Path, *, quality: int = 90) -> None:
    """Write the georeferenced, tiled, JPEG-compressed RGB GeoTIFF atomically."""
    import rasterio
    from rasterio.enums import ColorInterp
    from rasterio.transform import from_origin

    profile = {
        "driver": "GTiff", "width": pixels.shape[2], "height": pixels.shape[1], "count": 3, "dtype": "uint8",
        "crs": CRS, "transform": from_origin(ORIGIN[0], ORIGIN[1], PIXEL_SIZE_M, PIXEL_SIZE_M),
        "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "JPEG", "photometric": "YCBCR",
        "jpeg_quality": quality, "interleave": "pixel",
    }

    def writer(tmp: Path) -> None:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(pixels)
            dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
            dst.update_tags(SOURCE="AID validation images (Xia et al., TGRS 2017), academic use; "
                                   "nominal georeference, see the cells CSV")

    write_atomic(output, writer)


def cells_csv_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}_cells.csv")


def write_cells_csv(cells: Sequence[MosaicCell], path: Path, aid_root: Path) -> None:
    """col,row,class,source (source relative to the AID folder's parent, e.g. aid/Airport/airport_13.jpg)."""
    buffer = io.StringIO()
    out = csv.writer(buffer, lineterminator="\n")
    out.writerow(["col", "row", "class", "source"])
    for cell in sorted(cells, key=lambda c: (c.row, c.col)):
        out.writerow([cell.col, cell.row, cell.label, cell.source.relative_to(aid_root.parent).as_posix()])
    write_atomic(path, lambda tmp: tmp.write_text(buffer.getvalue(), encoding="utf-8"))


def read_cells_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a cells CSV as dicts (col, row, class, source)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def build_demo_scene(aid_root: Path, output: Path) -> list[MosaicCell]:
    """Write the mosaic GeoTIFF and its cells CSV; returns the cells."""
    aid_root = Path(aid_root).resolve()
    cells = choose_cells(aid_root)
    write_mosaic(mosaic_pixels(cells), Path(output))
    write_cells_csv(cells, cells_csv_path(Path(output)), aid_root)
    return cells


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.demo_scene", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/aid"), help="AID class folder")
    parser.add_argument("-o", "--output", type=Path, required=True, help="mosaic GeoTIFF to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cells = build_demo_scene(D.resolve_path(args.data), args.output)
    except RsmclipError as exc:
        print(f"rsmclip-geo: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(cells)} cells -> {args.output} + {cells_csv_path(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
