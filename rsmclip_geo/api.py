"""The one entry of rsmclip-geo: what the CLI, the QGIS panel and the Processing algorithms call, and
every type they use (docs/api.md).

Models are resolved once (`load_model`) and passed on; searches return a `SearchResult` that carries
what a shell shows (hits, every tile's score for a heatmap). Long calls take `progress(done, total)`
and `cancel() -> bool` callbacks. Errors are `RsmclipError`s whose `param` names the parameter at
fault, for each shell to say in its own words.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from rsmclip_geo.ann import ann_path, build_ann, verify_ann
from rsmclip_geo.bundle import DEFAULT_MODEL, Bundle, BundleInfo, find_bundles, load_bundle, models_dirs
from rsmclip_geo.caches import QUERY_CACHE_FILE, QueryCache, cached_scene_index, heatmap_path
from rsmclip_geo.change import ANY_CHANGE, CHANGE_DIRECTIONS, CHANGE_PROPERTIES, ChangeHit, change_search
from rsmclip_geo.classify import Classification, classify_images, read_labels
from rsmclip_geo.encoders import Model, load_model as _load_model, resolve_model
from rsmclip_geo.errors import QueryError, RsmclipError
from rsmclip_geo.export import HEATMAP_FORMATS, HIT_FORMATS, check_heatmap, write_changes, write_hits
from rsmclip_geo.export import write_heatmap as _write_heatmap
from rsmclip_geo.feedback import FEEDBACK_METHODS, LABELS_FORMATS, Judgement, Labels
from rsmclip_geo.files import check_writable, write_text_atomic
from rsmclip_geo.hits import HIT_PROPERTIES, Hit, hits_to_geojson
from rsmclip_geo.indexer import IndexEngine, LocalEngine, check_index_output, index_scenes
from rsmclip_geo.pipeline import CancelCallback, Cancelled, ProgressCallback
from rsmclip_geo.queries import clean_queries
from rsmclip_geo.ray_engine import RayEngine
from rsmclip_geo.raster import FILE_NODATA, Scene, open_scene
from rsmclip_geo.remote import clean_location, is_remote, scene_file_name
from rsmclip_geo.search import SearchParams, search_index
from rsmclip_geo.search import similar as _similar
from rsmclip_geo.stac import DEFAULT_ASSET, STAC_FIELDS, StacScene
from rsmclip_geo.stac import stac_scenes as _stac_scenes
from rsmclip_geo.tile_index import IndexHeader, TileIndex
from rsmclip_geo.tile_index import verify_index as _verify_index
from rsmclip_geo.tiling import AUTO_TILE_SIZE, TilingParams

__all__ = [
    "ANY_CHANGE", "AUTO_TILE_SIZE", "CHANGE_DIRECTIONS", "CHANGE_PROPERTIES", "DEFAULT_ASSET", "DEFAULT_MODEL",
    "FEEDBACK_METHODS", "FILE_NODATA", "HEATMAP_FORMATS", "HIT_FORMATS", "HIT_PROPERTIES", "Bundle", "BundleInfo",
    "CancelCallback", "Cancelled", "ChangeHit", "ChangeResult", "Classification", "Hit", "IndexEngine", "IndexHeader",
    "Judgement", "Labels", "LocalEngine", "Model", "ProgressCallback", "RayEngine", "RsmclipError", "STAC_FIELDS",
    "Scene", "SearchParams", "SearchResult", "StacScene", "TileIndex", "TilingParams", "build_ann", "build_index",
    "change", "check_outputs", "classify", "heatmap_path", "hits_to_geojson", "is_remote", "list_models",
    "load_bundle", "load_model", "models_dirs", "open_index", "read_labels", "scene_file_name", "scene_index",
    "search", "similar", "stac_scenes", "tile_search", "tiles_at", "verify_index", "write_changes", "write_heatmap",
    "write_hits", "write_text_atomic",
]


@dataclass(frozen=True)
class SearchResult:
    """What a search found: the hits (best first per query) and, where it scored every tile, those scores."""

    hits: list[Hit]
    index: TileIndex | IndexHeader
    queries: list[str]  # the query labels, one per row of `scores`
    scores: np.ndarray | None  # float32 [Q, N]: every tile's score per query (None after an ANN search)


@dataclass(frozen=True)
class ChangeResult:
    """What changed between two dates: the ranked changes (best first per query) and the matched tiles."""

    changes: list[ChangeHit]
    before: TileIndex
    after: TileIndex
    queries: list[str]  # the query labels (ANY_CHANGE for a ranking by embedding distance)
    matched: int  # tile pairs matched by footprint


# ------------------------------------------------------------------------------------------ models

def load_model(model: str | os.PathLike | Bundle | Model | None = None, *, backend: str = "onnx",
               device: str | None = None, providers: Sequence[str] | str | None = None, threads: int | None = None,
               batch_size: int = 32) -> Model:
    """A model from a bundle name or directory (None: DEFAULT_MODEL); a loaded Model is returned as is.
    `backend="torch"` runs the bundle's weights.safetensors on `device` (default: CUDA when available)."""
    if not (model is None or isinstance(model, (str, os.PathLike, Bundle))):
        return model
    if device is not None and backend != "torch":
        raise RsmclipError(f"device={device}: a device is for the torch backend; choose that backend or give no "
                           "device", param="device", value=device)
    return _load_model(model, providers=providers, threads=threads, backend=backend, batch_size=batch_size,
                       device=device)


def list_models() -> list[Path]:
    """Directories of the bundles that can be found (models_dirs(), in order; names are unique)."""
    return find_bundles()


def classify(images: Sequence[str | os.PathLike], labels: Sequence[str], *, model=None) -> list[Classification]:
    """Zero-shot classification of image files against text labels (softmax over the labels)."""
    return list(classify_images(resolve_model(model), images, labels))


# ---------------------------------------------------------------------------------------- indexing

def build_index(
    scenes: Sequence[str | os.PathLike | Scene | StacScene],
    output: str | os.PathLike,
    *,
    model=None,
    tiling: TilingParams = TilingParams(),
    bands: tuple[int, int, int] | None = None,
    nodata: float | str | None = FILE_NODATA,
    engine: IndexEngine = LocalEngine(),
    batch_size: int = 32,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    threads: int | None = None,
) -> IndexHeader:
    """Tile and embed scenes (any CRSs) into one GeoParquet tile index at `output` (a .parquet file, or a
    directory of shards); an interrupted build resumes when run again. Returns the index's header."""
    return IndexHeader.read(index_scenes(scenes, output, model=model, tiling=tiling, bands=bands, nodata=nodata,
                                         engine=engine, batch_size=batch_size, progress=progress, cancel=cancel,
                                         threads=threads))


def stac_scenes(
    source: str | os.PathLike,
    *,
    collection: str | None = None,
    bbox: Sequence[float] | None = None,
    datetime: str | None = None,
    asset: str | Sequence[str] = DEFAULT_ASSET,
    max_items: int | None = None,
    max_cloud: float | None = None,
) -> list[StacScene]:
    """The scenes to index (`build_index(api.stac_scenes(...), ...)`) of a STAC API's item search or a static
    catalogue, collection or item (a local path or an http URL): items in the `collection`, meeting `bbox`
    (W, S, E, N, EPSG:4326) and `datetime` (RFC 3339 interval, open ends `..`), with eo:cloud_cover at most
    `max_cloud`, at most `max_items`; each scene is the item's `asset`, or three single-band assets stacked
    as R, G, B ("red,green,blue"). The index keeps each scene's STAC_FIELDS. No asset is read here: build_index
    opens them before any output is written."""
    return _stac_scenes(source, collection=collection, bbox=bbox, datetime=datetime, asset=asset,
                        max_items=max_items, max_cloud=max_cloud)


def scene_index(
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
    """The tile index of one scene, from the cache (`cache_dir`, default $RSMCLIP_GEO_CACHE or
    ~/.cache/rsmclip-geo) or built into it; keyed by scene, bands, nodata, bundle and tiling."""
    scene = scene if isinstance(scene, Scene) else open_scene(scene, bands=bands, nodata=nodata)
    return cached_scene_index(scene, resolve_model(model, threads), tiling, cache_dir=cache_dir, use_cache=use_cache,
                              batch_size=batch_size, progress=progress, cancel=cancel, threads=threads)


def open_index(path: str | os.PathLike, *, in_memory: bool = False) -> IndexHeader | TileIndex:
    """A tile index: its header (footers only; search then reads what it needs, through the ANN index
    when large) or, `in_memory`, every tile loaded."""
    return TileIndex.open(path) if in_memory else IndexHeader.read(path)


def verify_index(path: str | os.PathLike) -> str:
    """Read every page and row of a tile index, and its ANN index when it has one: one summary line, or a
    TileIndexError naming the damaged file."""
    summary = _verify_index(path)
    if ann_path(path).is_dir():
        summary += f"; {verify_ann(path)}"
    return summary


# ------------------------------------------------------------------------------------------ search

def search(
    index: str | os.PathLike | IndexHeader | TileIndex,
    queries: str | Sequence[str],
    *,
    model=None,
    params: SearchParams = SearchParams(),
    scores: bool = False,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    threads: int | None = None,
) -> SearchResult:
    """Text search in any of the model's languages over a tile index (model: the index's own by default,
    checked against it). `scores`: score every tile (exact search over the index in memory), for a
    heatmap. Query embeddings are cached under `cache_dir` unless `use_cache` is false."""
    queries = clean_queries(queries)
    if not isinstance(index, (TileIndex, IndexHeader)):
        index = IndexHeader.read(index)
    if scores and isinstance(index, IndexHeader):
        index = TileIndex.load(index)
    query_cache = None
    if use_cache:
        query_cache = QueryCache(Path(cache_dir).expanduser() / QUERY_CACHE_FILE if cache_dir else None)
    hits, all_scores = search_index(index, queries, model=model, params=params, threads=threads,
                                    query_cache=query_cache)
    return SearchResult(hits, index, queries, all_scores)


def tile_search(
    scene: str | os.PathLike | Scene,
    queries: str | Sequence[str],
    *,
    model=None,
    tiling: TilingParams = TilingParams(),
    bands: tuple[int, int, int] | None = None,
    nodata: float | str | None = FILE_NODATA,
    params: SearchParams = SearchParams(),
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    batch_size: int = 32,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    threads: int | None = None,
) -> SearchResult:
    """Index one scene (cached, see scene_index) and search it; every tile's score comes with the hits.
    The hits name the scene by the path given (a Scene by its resolved path)."""
    queries = clean_queries(queries)
    params.check()
    shown = str(scene.path) if isinstance(scene, Scene) else os.fspath(clean_location(scene))
    model = resolve_model(model, threads)
    index = scene_index(scene, model=model, tiling=tiling, bands=bands, nodata=nodata, cache_dir=cache_dir,
                        use_cache=use_cache, batch_size=batch_size, progress=progress, cancel=cancel, threads=threads)
    result = search(index, queries, model=model, params=params, cache_dir=cache_dir, use_cache=use_cache)
    return replace(result, hits=[replace(hit, scene=shown) for hit in result.hits])


def similar(
    index: str | os.PathLike | TileIndex,
    *,
    tile_id: str | None = None,
    image: str | os.PathLike | np.ndarray | None = None,
    bands: tuple[int, int, int] | None = None,
    model=None,
    params: SearchParams = SearchParams(),
    threads: int | None = None,
) -> SearchResult:
    """Search by example: the tiles most like one indexed tile (`tile_id`, itself left out) or an image
    chip (`image`: JPEG, PNG, or a TIFF of any band layout, `bands` its 1-based R,G,B)."""
    index = index if isinstance(index, TileIndex) else TileIndex.open(index)
    hits, scores = _similar(index, tile_id=tile_id, image=image, bands=bands, model=model, params=params,
                            threads=threads)
    label = hits[0].query if hits else (f"tile:{tile_id}" if tile_id is not None else "image")
    return SearchResult(hits, index, [label], scores)


def change(
    before: str | os.PathLike | IndexHeader | TileIndex,
    after: str | os.PathLike | IndexHeader | TileIndex,
    queries: str | Sequence[str] | None = None,
    *,
    model=None,
    params: SearchParams = SearchParams(),
    direction: str = "appeared",
    threads: int | None = None,
) -> ChangeResult:
    """Change between the dates of two indexes of the same model: tiles matched by footprint (a shared grid,
    else the largest overlap), ranked per query by the rise of its score (`direction="appeared"`) or its fall
    (`"disappeared"`), or without queries by embedding distance. `params.threshold` applies to the rise,
    `aoi` to the after tiles. RsmclipError (param `after`) for indexes of different models or no matching tiles."""
    queries = None if queries is None else clean_queries(queries)
    before, after = (index if isinstance(index, TileIndex) else TileIndex.open(
        index.path if isinstance(index, IndexHeader) else index) for index in (before, after))
    changes, pairs = change_search(before, after, queries, model=model, params=params, direction=direction,
                                   threads=threads)
    return ChangeResult(changes, before, after, queries or [ANY_CHANGE], len(pairs))


def tiles_at(index: TileIndex, lon: float, lat: float) -> list[str]:
    """Ids of the tiles of `index` under a point (EPSG:4326): the smallest scale first, then the nearest
    centre (a click on the map, a point of a layer)."""
    return [str(index.table.column("tile_id")[int(row)]) for row in index.rows_at(lon, lat)]


# ----------------------------------------------------------------------------------------- outputs

def check_outputs(*, hits: str | os.PathLike | None = None, heatmap: str | os.PathLike | None = None,
                  text: str | os.PathLike | None = None, labels: str | os.PathLike | None = None,
                  tile_index: str | os.PathLike | None = None, index: IndexHeader | TileIndex | None = None,
                  scene: str | None = None, inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Before any work: RsmclipError (param `output`, `heatmap` or `labels_file`) when a hits file, heatmap,
    text output, labels file or tile index (`tile_index`, as build_index checks it) cannot be written, or would
    replace or land inside one of `inputs`; with `index`, also that the heatmap's scene is known (`scene` picks
    one of a multi-scene index)."""
    if tile_index is not None:
        check_index_output(Path(tile_index))
    resolved = [Path(path).resolve() for path in inputs]
    for param, value, formats in (("output", hits, HIT_FORMATS), ("heatmap", heatmap, HEATMAP_FORMATS),
                                  ("output", text, None), ("labels_file", labels, LABELS_FORMATS)):
        if not value:
            continue
        check_writable(Path(value), formats, param=param)
        target = Path(value).resolve()
        if any(target == path or path in target.parents for path in resolved):
            raise RsmclipError(f"{param}={value}: would overwrite or write into an input of this job; choose "
                               "another path", param=param, value=value)
    if scene is not None and not heatmap:
        raise RsmclipError(f"scene={scene}: picks the scene of a heatmap; ask for a heatmap too", param="scene",
                           value=scene)
    if heatmap and index is not None:
        check_heatmap(index, heatmap, scene=scene)


def write_heatmap(result: SearchResult, path: str | os.PathLike, *, scene: str | None = None,
                  cell: int | None = None) -> Path:
    """A float32 GeoTIFF in the scene's CRS, one band per query of `result`: each pixel the mean score of
    the tiles covering it. `scene` picks one scene of a multi-scene index; `cell`: pixel size in scene
    pixels (default: a quarter of the tile stride)."""
    if result.scores is None or not isinstance(result.index, TileIndex):
        raise QueryError("a heatmap needs every tile's score: search with scores=True", param="scores",
                         value=False)
    return _write_heatmap(result.index, result.scores, path, scene=scene, queries=result.queries, cell=cell)
