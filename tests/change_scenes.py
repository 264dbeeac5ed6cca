"""Two dates of the same ground for change tests (every suite): georeferenced 3 × 3-cell mosaics of AID validation
images (one tile per cell at tile size CELL) where known cells change class and the others hold the same image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from rasterio.transform import Affine
from rasters import write_geotiff

CELL = 150  # AID images here are 150 × 150: one tile per cell at tile size 150
PIXEL_M = 2.0
ORIGIN = (400_000.0, 5_700_000.0)
CRS = "EPSG:32633"
SHIFT_PX = 15  # the shifted date's grid starts this far east: tiles overlap their cells by 135 / 165
#: Classes per cell (row-major) of each date, and which validation image of the class fills the cell.
#: Column 3 lies outside the 3 × 3 scenes; only the shifted scene shows its first SHIFT_PX pixels.
BEFORE = [[("Forest", 0), ("BareLand", 0), ("StorageTanks", 0), ("Park", 0)],
          [("Beach", 0), ("Meadow", 0), ("Airport", 0), ("River", 0)],
          [("Pond", 0), ("Farmland", 0), ("Stadium", 0), ("Church", 0)]]
CHANGED = {(0, 0): ("Industrial", 0), (1, 0): ("StorageTanks", 1), (2, 0): ("Farmland", 1)}  # (col, row)
AFTER = [[CHANGED.get((col, row), cell) for col, cell in enumerate(cells)] for row, cells in enumerate(BEFORE)]
NEW_TANKS, LOST_TANKS = (1, 0), (2, 0)


def validation_image(aid: Path, class_name: str, n: int) -> np.ndarray:
    """The n-th image of the project's validation split of a class (sorted file names, index % 5 == 4), [3, H, W]."""
    files = sorted(p for p in (aid / class_name).iterdir() if p.suffix.lower() == ".jpg")
    image = np.asarray(Image.open([p for i, p in enumerate(files) if i % 5 == 4][n]).convert("RGB"))
    assert image.shape == (CELL, CELL, 3)
    return image.transpose(2, 0, 1)


def world(aid: Path, layout) -> np.ndarray:
    """The pixels of a date: 3 rows × 4 columns of cells."""
    return np.concatenate([np.concatenate([validation_image(aid, *cell) for cell in cells], axis=2)
                           for cells in layout], axis=1)


def scene(path: Path, pixels: np.ndarray, east_px: int = 0, north_m: float = 0.0) -> Path:
    """A 3 × 3-cell GeoTIFF of `pixels` from column `east_px`, its transform shifted to the same ground."""
    transform = Affine(PIXEL_M, 0.0, ORIGIN[0] + east_px * PIXEL_M, 0.0, -PIXEL_M, ORIGIN[1] + north_m)
    return write_geotiff(path, np.ascontiguousarray(pixels[:, :, east_px:east_px + 3 * CELL]), crs=CRS,
                         transform=transform, compress="deflate")


def date_scenes(aid: Path, folder: Path) -> dict[str, Path]:
    """The GeoTIFFs by name: before, after (same grid), shifted (after on a grid SHIFT_PX east), far (after
    100 km north)."""
    before, after = world(aid, BEFORE), world(aid, AFTER)
    return {"before": scene(folder / "before.tif", before), "after": scene(folder / "after.tif", after),
            "shifted": scene(folder / "shifted.tif", after, east_px=SHIFT_PX),
            "far": scene(folder / "far.tif", after, north_m=100_000.0)}


def cell_of(win_col: int, win_row: int) -> tuple[int, int]:
    """(col, row) of the cell under a tile window's corner."""
    return round(win_col / CELL), round(win_row / CELL)
