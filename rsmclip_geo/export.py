"""Hits → GeoJSON (RFC 7946), GeoPackage or GeoParquet; scores → heatmap GeoTIFF in the scene CRS."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import rasterio
import shapely
from rasterio.transform import Affine

from rsmclip_geo.errors import RsmclipError
from rsmclip_geo.files import publish, temp_file
from rsmclip_geo.index import TileIndex, atomic_write_table, geo_metadata
from rsmclip_geo.search import HIT_PROPERTIES, Hit

log = logging.getLogger(__name__)

HIT_FORMATS = (".geojson", ".json", ".gpkg", ".parquet")


def hits_to_geojson(hits: Sequence[Hit]) -> dict:
    """A GeoJSON FeatureCollection (EPSG:4326, lon/lat, flat properties) of ranked hits."""
    return {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": shapely.geometry.mapping(hit.geometry), "properties": hit.properties()}
            for hit in hits
        ],
    }


def check_writable(path: Path, formats: Sequence[str] | None = None, option: str = "-o",
                   directory: bool = False) -> None:
    """RsmclipError naming the option when a file (or, with `directory`, a directory) cannot be
    written at `path`; checked before any work."""
    if formats is not None and path.suffix.lower() not in formats:
        raise RsmclipError(f"{option} {path}: unknown output format; use one of {', '.join(formats)}")
    if not directory and path.is_dir():
        raise RsmclipError(f"{option} {path}: is a directory; give a file name")
    if directory and path.is_file():
        raise RsmclipError(f"{option} {path}: is a file; give a directory name (or a .parquet file name)")
    if not path.parent.is_dir():
        raise RsmclipError(f"{option} {path}: directory {path.parent} does not exist; create it or choose another path")
    if not os.access(path.parent, os.W_OK):
        raise RsmclipError(f"{option} {path}: directory {path.parent} is not writable; choose another output path")


def write_hits(hits: Sequence[Hit], path: str | os.PathLike) -> Path:
    """Write hits as .geojson/.json, .gpkg or .parquet (by suffix), atomically."""
    path = Path(path)
    check_writable(path, HIT_FORMATS)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        atomic_write_table(_hits_table(hits), path)
        return path
    tmp = temp_file(path, suffix=path.suffix)
    try:
        if suffix in (".geojson", ".json"):
            tmp.write_text(json.dumps(hits_to_geojson(hits), ensure_ascii=False))
        else:
            _write_gpkg(hits, tmp)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _hits_table(hits: Sequence[Hit]) -> pa.Table:
    """GeoParquet table of hits (WKB geometry in EPSG:4326)."""
    rows = [hit.properties() for hit in hits]
    schema = pa.schema([
        ("rank", pa.int32()), ("score", pa.float32()), ("query", pa.string()), ("scene", pa.string()),
        ("tile_id", pa.string()), ("scale", pa.int16()), ("win_col", pa.int32()), ("win_row", pa.int32()),
        ("win_width", pa.int32()), ("win_height", pa.int32()), ("geometry", pa.binary()),
    ])
    columns = {name: [r[name] for r in rows] for name in schema.names if name != "geometry"}
    columns["geometry"] = [shapely.to_wkb(h.geometry) for h in hits]
    table = pa.Table.from_pydict(columns, schema=schema)
    bbox = [float(v) for v in shapely.total_bounds([h.geometry for h in hits])] if hits else None
    return table.replace_schema_metadata({b"geo": json.dumps(geo_metadata(bbox)).encode()})


def _write_gpkg(hits: Sequence[Hit], path: Path) -> None:
    import geopandas

    frame = geopandas.GeoDataFrame(
        [hit.properties() for hit in hits],
        columns=list(HIT_PROPERTIES), geometry=[hit.geometry for hit in hits], crs="EPSG:4326")
    path.unlink(missing_ok=True)
    frame.to_file(path, driver="GPKG", layer="hits")


def heatmap_grid(index: TileIndex, fingerprint: str) -> tuple[int, int, int]:
    """Cell size (pixels) and grid shape (width, height) of a scene's heatmap: the scale-1 tile stride."""
    record = index.scenes[fingerprint]
    rows = index.column("scene_fingerprint") == fingerprint
    widths = index.column("win_width")[rows]
    smallest = int(widths.min()) if len(widths) else int(record["width"])
    cell = max(1, round(smallest * (1.0 - index.tiling.overlap)))
    return cell, -(-int(record["width"]) // cell), -(-int(record["height"]) // cell)


def write_heatmap(
    index: TileIndex,
    scores: np.ndarray,
    path: str | os.PathLike,
    *,
    scene: str | None = None,
    queries: Sequence[str] | None = None,
) -> Path:
    """Float32 GeoTIFF in the scene CRS, one band per query: each cell holds the best score of the
    tiles covering its centre (NaN where no tile was kept). `scene` (fingerprint or path) picks one
    scene of a multi-scene index."""
    path = Path(path)
    check_writable(path, (".tif", ".tiff"), option="--heatmap")
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float32))
    fingerprint = _pick_scene(index, scene)
    record = index.scenes[fingerprint]
    cell, width, height = heatmap_grid(index, fingerprint)
    rows = np.flatnonzero(index.column("scene_fingerprint") == fingerprint)
    windows = np.column_stack([index.column(c)[rows] for c in ("win_col", "win_row", "win_width", "win_height")])
    centres_x = np.minimum((np.arange(width) + 0.5) * cell, record["width"] - 0.5)
    centres_y = np.minimum((np.arange(height) + 0.5) * cell, record["height"] - 0.5)
    grid = np.full((len(scores), height, width), np.nan, dtype=np.float32)
    for (col, row, w, h), tile_scores in zip(windows, scores[:, rows].T):
        xs = np.flatnonzero((centres_x >= col) & (centres_x < col + w))
        ys = np.flatnonzero((centres_y >= row) & (centres_y < row + h))
        if len(xs) and len(ys):
            block = grid[:, ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1]
            np.fmax(block, tile_scores[:, None, None], out=block)
    a, b, c, d, e, f = record["transform"][:6]
    transform = Affine(a * cell, b * cell, c, d * cell, e * cell, f)  # scene transform × scale(cell)
    profile = {
        "driver": "GTiff", "width": width, "height": height, "count": len(scores), "dtype": "float32",
        "crs": rasterio.crs.CRS.from_wkt(record["crs"]), "transform": transform, "nodata": float("nan"),
        "compress": "deflate",
    }
    tmp = temp_file(path, suffix=path.suffix)
    try:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(grid)
            for band, query in enumerate(queries or [], start=1):
                dst.set_band_description(band, query)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _pick_scene(index: TileIndex, scene: str | None) -> str:
    """Fingerprint of the requested scene (fingerprint, path or file name), or the only scene."""
    if scene is None:
        if len(index.scenes) != 1:
            names = ", ".join(Path(r["path"]).name for r in index.scenes.values())
            raise RsmclipError(f"--heatmap: index holds {len(index.scenes)} scenes ({names}); pick one with --scene")
        return next(iter(index.scenes))
    for fingerprint, record in index.scenes.items():
        if scene in (fingerprint, record["path"], Path(record["path"]).name):
            return fingerprint
    raise RsmclipError(f"--scene {scene}: not a scene of {index.path}; give a file name, path or fingerprint")
