"""The user's cache: tile indexes of scenes searched with `tile-search` (keyed by scene, bands,
nodata, bundle and tiling) and text embeddings of queries (SQLite), under $RSMCLIP_GEO_CACHE or
~/.cache/rsmclip-geo."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rsmclip_geo.encoders import Model
from rsmclip_geo.errors import RsmclipError, TileIndexError
from rsmclip_geo.indexer import index_scenes, warn_ground_resolution
from rsmclip_geo.pipeline import CancelCallback, ProgressCallback
from rsmclip_geo.raster import Scene
from rsmclip_geo.tile_index import TileIndex
from rsmclip_geo.tiling import TilingParams

log = logging.getLogger(__name__)

#: File of the query-embedding cache, under the cache directory ($RSMCLIP_GEO_CACHE).
QUERY_CACHE_FILE = "query-embeddings.sqlite"


def default_cache_dir() -> Path:
    """The tile-search cache: $RSMCLIP_GEO_CACHE, else ~/.cache/rsmclip-geo; RsmclipError without a home."""
    env = os.environ.get("RSMCLIP_GEO_CACHE")
    if env:
        return Path(env).expanduser()
    try:
        home = Path.home()
    except RuntimeError:  # no HOME and no user database entry
        home = Path()
    if not home.is_absolute() or home.parent == home:  # HOME empty, relative or /: never /.cache
        raise RsmclipError(f"cache_dir: not given and no home directory for the cache "
                           f"(HOME={os.environ.get('HOME', '')!r}); give a cache folder or set RSMCLIP_GEO_CACHE",
                           param="cache_dir")
    return home / ".cache" / "rsmclip-geo"


def cache_directory(cache_dir: str | os.PathLike | None) -> Path:
    """`cache_dir` (default: default_cache_dir()) created if needed; RsmclipError naming it when it cannot
    be created or written."""
    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RsmclipError(f"cache_dir={directory}: cannot be created ({exc.strerror}); choose another "
                           "cache folder or search without the cache", param="cache_dir", value=directory) from None
    if not os.access(directory, os.W_OK):
        raise RsmclipError(f"cache_dir={directory}: not writable; choose another cache folder or search without "
                           "the cache", param="cache_dir", value=directory)
    return directory


def cache_key(scene: Scene, bundle_fingerprint: str, tiling: TilingParams) -> str:
    """Cache key of a scene's index: scene fingerprint + mtime (a remote scene: its clean location + ETag
    and size) + bundle fingerprint + tiling params."""
    version = {"location": scene.path, "revision": scene.revision} if scene.source else {
        "mtime_ns": scene.path.stat().st_mtime_ns}
    parts = {
        "scene": scene.fingerprint,
        **version,
        "bands": list(scene.rgb_bands),
        "nodata": scene.nodata,
        "bundle": bundle_fingerprint,
        "tiling": tiling.to_json(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


class QueryCache:
    """On-disk text embeddings keyed by the bundle's text fingerprint, prompt language and exact query string.

    A SQLite file under the cache directory, so a repeated query does not run the text tower again.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        if path is None:
            try:
                path = default_cache_dir() / QUERY_CACHE_FILE
            except RsmclipError as exc:  # no cache directory: queries are encoded every time
                log.warning("%s; queries are not cached", exc)
        self.path = Path(path) if path is not None else None
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection | None:
        if self._db is None and self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self._db = self._open()
                except sqlite3.OperationalError:  # locked, read-only, I/O: the file itself may be fine
                    raise
                except sqlite3.DatabaseError as exc:  # not SQLite, damaged, or another schema: start afresh
                    log.warning("query cache %s is corrupt (%s); rebuilding it", self.path, exc)
                    self.path.unlink()
                    self._db = self._open()
            except (OSError, sqlite3.Error) as exc:
                log.warning("query cache %s unusable (%s); queries are not cached", self.path, exc)
                self._db = None
        return self._db

    def _open(self) -> sqlite3.Connection:
        """A connection to the cache file, its table created; sqlite3.DatabaseError when the file is unusable."""
        db = sqlite3.connect(self.path, timeout=10)
        try:
            db.execute("CREATE TABLE IF NOT EXISTS query (bundle TEXT, lang TEXT, text TEXT, "
                       "vector BLOB, PRIMARY KEY (bundle, lang, text))")
            columns = [row[1] for row in db.execute("PRAGMA table_info(query)")]
            if columns != ["bundle", "lang", "text", "vector"]:
                raise sqlite3.DatabaseError(f"table query has columns {', '.join(columns)}")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("integrity check failed")
        except BaseException:
            db.close()
            raise
        return db

    def get(self, bundle: str, lang: str | None, queries: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached float32 vectors of those queries that are cached."""
        db = self._connect()
        if db is None:
            return {}
        found = {}
        try:
            for text in set(queries):
                row = db.execute("SELECT vector FROM query WHERE bundle=? AND lang=? AND text=?",
                                 (bundle, lang or "", text)).fetchone()
                if row is not None:
                    found[text] = np.frombuffer(row[0], dtype=np.float32).copy()
        except sqlite3.Error as exc:
            log.warning("query cache %s unreadable (%s); encoding the queries", self.path, exc)
            return {}
        return found

    def put(self, bundle: str, lang: str | None, vectors: dict[str, np.ndarray]) -> None:
        db = self._connect()
        if db is None or not vectors:
            return
        try:
            with db:
                db.executemany("INSERT OR REPLACE INTO query VALUES (?, ?, ?, ?)",
                               [(bundle, lang or "", text, np.asarray(v, np.float32).tobytes())
                                for text, v in vectors.items()])
        except sqlite3.Error as exc:
            log.warning("query cache %s not writable (%s); queries are not cached", self.path, exc)


def cached_scene_index(
    scene: Scene,
    model: Model,
    tiling: TilingParams,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    batch_size: int = 32,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    threads: int | None = None,
) -> TileIndex:
    """The tile index of one opened scene from the cache, built (and cached) when missing; without
    `use_cache`, built in a temporary folder and kept in memory only. A damaged entry is rebuilt."""
    params = tiling.for_model(model.bundle.info)
    options = dict(model=model, tiling=params, batch_size=batch_size, progress=progress, cancel=cancel,
                   threads=threads)
    if not use_cache:
        with tempfile.TemporaryDirectory(prefix="rsmclip-geo-") as tmp:
            return TileIndex.open(index_scenes([scene], Path(tmp) / "scene.parquet", **options))
    path = cache_directory(cache_dir) / f"{cache_key(scene, model.bundle.fingerprint, params)}.parquet"
    if path.is_file():
        try:
            index = TileIndex.open(path)
            index.check_model(model)
            log.info("%s: using the cached tile index %s", scene.name, path)
            warn_ground_resolution(scene, params, model.bundle.info)
            if progress:
                progress(len(index), len(index))
            return index
        except TileIndexError:
            path.unlink()  # a damaged cache entry is rebuilt
    return TileIndex.open(index_scenes([scene], path, **options))


def heatmap_path(index: TileIndex, queries: Sequence[str]) -> Path:
    """Where a heatmap of `queries` over `index` is kept in the cache (the QGIS panel's heatmaps)."""
    digest = hashlib.sha256("\n".join(queries).encode("utf-8")).hexdigest()[:12]
    folder = cache_directory(None) / "heatmaps"
    folder.mkdir(exist_ok=True)
    return folder / f"{index.path.stem}-{digest}.tif"
