"""Hits and changes between dates → GeoJSON (RFC 7946), GeoPackage or GeoParquet; scores → heatmap GeoTIFF in
the scene CRS."""

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

from rsmclip_geo.change import CHANGE_PROPERTIES, ChangeHit
from rsmclip_geo.errors import RsmclipError
from rsmclip_geo.files import check_writable, publish, temp_file
from rsmclip_geo.hits import HIT_PROPERTIES, Hit, hits_to_geojson
from rsmclip_geo.raster import scene_fingerprint
from rsmclip_geo.tile_index import IndexMetadata, TileIndex, atomic_write_table, geo_metadata

log = logging.getLogger(__name__)

HIT_FORMATS = (".geojson", ".json", ".gpkg", ".parquet")
HEATMAP_FORMATS = (".tif", ".tiff")
#: Heatmap pixels along each tile stride by default, so that overlapping tiles blend.
HEATMAP_PIXELS_PER_STRIDE = 4


def write_hits(hits: Sequence[Hit], path: str | os.PathLike) -> Path:
    """Write hits as .geojson/.json, .gpkg or .parquet (by suffix), atomically; refused when a score is
    not a finite number (GeoJSON has no NaN)."""
    return write_features(hits, HIT_PROPERTIES, path, layer="hits", ranked_by="score")


def write_changes(changes: Sequence[ChangeHit], path: str | os.PathLike) -> Path:
    """Write ranked changes between dates (CHANGE_PROPERTIES, the after tiles' footprints) like write_hits."""
    return write_features(changes, CHANGE_PROPERTIES, path, layer="changes", ranked_by="rise")


def write_features(features: Sequence, properties: dict[str, str], path: str | os.PathLike, *, layer: str,
                   ranked_by: str) -> Path:
    """Write features (each with `properties()` and a lon/lat `geometry`) as .geojson/.json, .gpkg (layer
    `layer`) or .parquet (by suffix, any case) through a temporary file renamed into place; `properties`
    names the flat columns in order with their Arrow types. Refused when the `ranked_by` value of a
    feature is not a finite number (GeoJSON has no NaN)."""
    path = Path(path)
    check_writable(path, HIT_FORMATS)
    if not np.isfinite([getattr(feature, ranked_by) for feature in features]).all():
        raise RsmclipError(f"output={path}: a {ranked_by} is not a finite number (a damaged index or model); "
                           "nothing written; verify the index", param="output", value=path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        atomic_write_table(_features_table(features, properties), path)
        return path
    tmp = temp_file(path, suffix=path.suffix)
    try:
        if suffix in (".geojson", ".json"):
            tmp.write_text(json.dumps(hits_to_geojson(features), ensure_ascii=False))
        else:
            _write_gpkg(features, properties, tmp, layer)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _features_table(features: Sequence, properties: dict[str, str]) -> pa.Table:
    """GeoParquet table of features (WKB geometry in EPSG:4326)."""
    rows = [feature.properties() for feature in features]
    schema = pa.schema([(name, pa.type_for_alias(kind)) for name, kind in properties.items()]
                       + [("geometry", pa.binary())])
    columns = {name: [r[name] for r in rows] for name in schema.names if name != "geometry"}
    columns["geometry"] = [shapely.to_wkb(f.geometry) for f in features]
    table = pa.Table.from_pydict(columns, schema=schema)
    bbox = [float(v) for v in shapely.total_bounds([f.geometry for f in features])] if features else None
    return table.replace_schema_metadata({b"geo": json.dumps(geo_metadata(bbox)).encode()})


def _write_gpkg(features: Sequence, properties: dict[str, str], path: Path, layer: str) -> None:
    import geopandas

    frame = geopandas.GeoDataFrame(
        [feature.properties() for feature in features],
        columns=list(properties), geometry=[feature.geometry for feature in features], crs="EPSG:4326")
    path.unlink(missing_ok=True)
    frame.to_file(path, driver="GPKG", layer=layer)


def heatmap_grid(index: TileIndex, fingerprint: str, cell: int | None = None) -> tuple[int, int, int]:
    """Pixel size (scene pixels) and grid shape (width, height) of a scene's heatmap: `cell`, else
    1/HEATMAP_PIXELS_PER_STRIDE of the scale-1 tile stride."""
    record = index.scenes[fingerprint]
    if cell is None:
        rows = index.column("scene_fingerprint") == fingerprint
        widths = index.column("win_width")[rows]
        smallest = int(widths.min()) if len(widths) else int(record["width"])
        stride = max(1, round(smallest * (1.0 - index.tiling.overlap)))
        cell = max(1, round(stride / HEATMAP_PIXELS_PER_STRIDE))
    elif isinstance(cell, bool) or not isinstance(cell, int) or cell < 1:
        raise RsmclipError(f"cell={cell!r}: give the heatmap's pixel size as a whole number of scene pixels, 1 or more")
    return cell, -(-int(record["width"]) // cell), -(-int(record["height"]) // cell)


def write_heatmap(
    index: TileIndex,
    scores: np.ndarray,
    path: str | os.PathLike,
    *,
    scene: str | None = None,
    queries: Sequence[str] | None = None,
    cell: int | None = None,
) -> Path:
    """Float32 GeoTIFF in the scene CRS, one band per query: each pixel holds the mean score of the
    tiles covering its centre (NaN where no tile was kept). `scene` (fingerprint or path) picks one
    scene of a multi-scene index; `cell` is the pixel size in scene pixels (default: heatmap_grid)."""
    path = Path(path)
    fingerprint = check_heatmap(index, path, scene=scene)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float32))
    record = index.scenes[fingerprint]
    cell, width, height = heatmap_grid(index, fingerprint, cell)
    rows = np.flatnonzero(index.column("scene_fingerprint") == fingerprint)
    col, row, w, h = index.windows(rows).T
    centres_x = np.minimum((np.arange(width) + 0.5) * cell, record["width"] - 0.5)
    centres_y = np.minimum((np.arange(height) + 0.5) * cell, record["height"] - 0.5)
    # Each tile adds its scores (and a count) to the pixels whose centres it covers, [y0:y1, x0:x1]:
    # +/- at the corners of a difference grid, summed up along both axes.
    x0, x1 = np.searchsorted(centres_x, col), np.searchsorted(centres_x, col + w)
    y0, y1 = np.searchsorted(centres_y, row), np.searchsorted(centres_y, row + h)
    total = np.zeros((len(scores), height + 1, width + 1))
    count = np.zeros((height + 1, width + 1))
    tile_scores = scores[:, rows]
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        np.add.at(total, (slice(None), ys, xs), sign * tile_scores)
        np.add.at(count, (ys, xs), sign)
    total = total.cumsum(axis=1).cumsum(axis=2)[:, :height, :width]
    count = count.cumsum(axis=0).cumsum(axis=1)[:height, :width]
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = np.where(count > 0.5, total / count, np.nan).astype(np.float32)
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


def check_heatmap(index: IndexMetadata, path: str | os.PathLike, *, scene: str | None = None) -> str:
    """The fingerprint of the scene a heatmap of `index` at `path` shows; RsmclipError, before any work,
    when it cannot be written there (see check_writable), `path` holds one of the index's scenes, or
    `scene` does not pick one scene."""
    path = Path(path)
    check_writable(path, HEATMAP_FORMATS, param="heatmap")
    if path.is_file() and os.access(path, os.R_OK) and scene_fingerprint(path) in index.scenes:
        raise RsmclipError(f"heatmap={path}: is a scene of {index.path} and would be overwritten; "
                           "choose another path", param="heatmap", value=path)
    return _pick_scene(index, scene)


def _pick_scene(index: IndexMetadata, scene: str | None) -> str:
    """Fingerprint of the requested scene (fingerprint, path or file name), or the only scene."""
    if scene is None:
        if len(index.scenes) != 1:
            names = ", ".join(Path(r["path"]).name for r in index.scenes.values())
            raise RsmclipError(f"scene: {index.path} holds {len(index.scenes)} scenes ({names}); pick the "
                               "heatmap's scene", param="scene")
        return next(iter(index.scenes))
    for fingerprint, record in index.scenes.items():
        if scene in (fingerprint, record["path"], Path(record["path"]).name):
            return fingerprint
    raise RsmclipError(f"scene={scene}: not a scene of {index.path}; give a file name, path or fingerprint",
                       param="scene", value=scene)
