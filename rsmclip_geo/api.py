"""Public Python API: the functions the CLI and the QGIS plugin call (see docs/api.md)."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from rsmclip_geo.errors import RsmclipError, TileIndexError
from rsmclip_geo.export import hits_to_geojson, write_heatmap, write_hits
from rsmclip_geo.ann import build_ann
from rsmclip_geo.index import (
    IndexHeader, TileIndex, cache_key, default_cache_dir, index_scenes, resolve_model, warn_ground_resolution,
)
from rsmclip_geo.pipeline import CancelCallback, Cancelled, EmbeddedBatch, ProgressCallback, embed_scene
from rsmclip_geo.raster import FILE_NODATA, Scene, open_scene
from rsmclip_geo.ray_engine import index_scenes_ray
from rsmclip_geo.search import QUERY_CACHE_FILE, Hit, QueryCache, clean_queries, score_tiles, search_index, similar
from rsmclip_geo.tiling import AUTO_TILE_SIZE, TilingParams, TileWindow, tile_windows

log = logging.getLogger(__name__)

__all__ = [
    "AUTO_TILE_SIZE", "Cancelled", "EmbeddedBatch", "Hit", "IndexHeader", "QueryCache", "Scene", "TileIndex",
    "TileWindow", "TilingParams", "build_ann", "cached_scene_index", "default_cache_dir", "embed_scene",
    "hits_to_geojson", "index_scenes", "index_scenes_ray", "open_scene",
    "score_tiles", "search_index", "similar", "tile_search", "tile_windows", "write_heatmap", "write_hits",
]


def cached_scene_index(
    scene: str | os.PathLike | Scene,
    *,
    model=None,
    tiling: TilingParams = TilingParams(),
    bands: tuple[int, int, int] | None = None,
    nodata: float | str | None = FILE_NODATA,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    batch_size: int = 32,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    threads: int | None = None,
) -> TileIndex:
    """The tile index of one scene from the cache, built (and cached) when missing.

    Cache entries are keyed by scene fingerprint + mtime + bands + nodata + bundle fingerprint + tiling
    parameters. `nodata`: see open_scene (FILE_NODATA, a number, or None to ignore the file's value).
    """
    scene = scene if isinstance(scene, Scene) else open_scene(scene, bands=bands, nodata=nodata)
    model = resolve_model(model, threads)
    params = tiling.for_model(model.bundle.info)
    options = dict(model=model, tiling=params, batch_size=batch_size, progress=progress, cancel=cancel,
                   threads=threads)
    if not use_cache:
        with tempfile.TemporaryDirectory(prefix="rsmclip-geo-") as tmp:
            return TileIndex.open(index_scenes([scene], Path(tmp) / "scene.parquet", **options))
    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RsmclipError(f"--cache-dir {directory}: cannot be created ({exc.strerror}); "
                           "choose another with --cache-dir or use --no-cache") from None
    if not os.access(directory, os.W_OK):
        raise RsmclipError(f"--cache-dir {directory}: not writable; choose another with --cache-dir or use --no-cache")
    path = directory / f"{cache_key(scene, model.bundle.fingerprint, params)}.parquet"
    if path.is_file():
        try:
            index = TileIndex.open(path)
            index.check_model(model)
            log.info("%s: using the cached tile index %s", scene.path.name, path)
            warn_ground_resolution(scene, params, model.bundle.info)
            if progress:
                progress(len(index), len(index))
            return index
        except TileIndexError:
            path.unlink()  # a damaged cache entry is rebuilt
    return TileIndex.open(index_scenes([scene], path, **options))


def tile_search(
    scene: str | os.PathLike | Scene,
    queries: str | Sequence[str],
    *,
    model=None,
    tiling: TilingParams = TilingParams(),
    bands: tuple[int, int, int] | None = None,
    nodata: float | str | None = FILE_NODATA,
    top_k: int = 10,
    threshold: float | None = None,
    aoi=None,
    nms_overlap: float = 0.5,
    lang: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    batch_size: int = 32,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    threads: int | None = None,
) -> tuple[list[Hit], TileIndex]:
    """Index one scene (cached) and search it: the hits and the scene's tile index. The hits name the
    scene by the path given (a Scene by its resolved path), whichever path the cached index recorded."""
    queries = clean_queries(queries)
    shown = str(scene.path) if isinstance(scene, Scene) else os.fspath(scene)
    scene = scene if isinstance(scene, Scene) else open_scene(scene, bands=bands, nodata=nodata)
    model = resolve_model(model, threads)
    index = cached_scene_index(scene, model=model, tiling=tiling, bands=bands, cache_dir=cache_dir,
                               use_cache=use_cache, batch_size=batch_size, progress=progress, cancel=cancel,
                               threads=threads)
    query_cache = None
    if use_cache:
        query_cache = QueryCache(Path(cache_dir).expanduser() / QUERY_CACHE_FILE if cache_dir else None)
    hits = search_index(index, queries, model=model, top_k=top_k, threshold=threshold, aoi=aoi,
                        nms_overlap=nms_overlap, lang=lang, query_cache=query_cache)
    return [replace(hit, scene=shown) for hit in hits], index
