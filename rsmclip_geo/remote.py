"""Remote scenes: https://, s3:// and GDAL /vsi… locations of cloud-optimised GeoTIFFs.

A location is read through GDAL's network file systems (/vsicurl/, /vsis3/) with windowed range
requests; authentication follows GDAL's conventions (AWS_* variables, signed URLs). What is stored
or logged is the location with its credentials removed (`clean_location`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import rasterio

from rsmclip_geo.errors import RasterError

#: URL schemes read as remote scenes, with the GDAL file system that reads each.
SCHEMES = {"http": "/vsicurl/", "https": "/vsicurl/", "s3": "/vsis3/"}
#: Query parameters that carry credentials (signed URLs of S3, Google Cloud, Azure; tokens).
SECRET_QUERY = re.compile(r"x-amz-.*|x-goog-.*|sig|signature|.*token|.*key|password|credential", re.IGNORECASE)
#: Bytes of GDAL's per-file read cache (VSI_CACHE) for a remote scene.
VSI_CACHE_BYTES = 64 * 1024 * 1024
#: GDAL settings for remote reads; a variable the user has set in the environment wins.
GDAL_REMOTE_OPTIONS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no directory listing, no sidecar probes
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "GDAL_HTTP_MAX_RETRY": "4",
    "GDAL_HTTP_RETRY_DELAY": "0.5",
    "GDAL_HTTP_TIMEOUT": "60",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": str(VSI_CACHE_BYTES),
}
_SAMPLE_CHUNK = 64 * 1024
_SAMPLES = 16


def is_remote(location: str | os.PathLike) -> bool:
    """Whether a scene location is read over the network or through a GDAL virtual file system."""
    if not isinstance(location, str):
        return False
    return location.startswith("/vsi") or urlsplit(location).scheme.lower() in SCHEMES


def gdal_path(location: str) -> str:
    """The path GDAL opens for a remote location: https://… → /vsicurl/https://…, s3://b/k → /vsis3/b/k."""
    scheme = urlsplit(location).scheme.lower()
    if scheme == "s3":
        return SCHEMES[scheme] + location[len("s3://"):]
    if scheme in SCHEMES:
        return SCHEMES[scheme] + location
    return location


def clean_location(location: str | os.PathLike) -> str | os.PathLike:
    """A location without credentials (user:password@, signed-URL and token query parameters); local
    paths as given."""
    if not is_remote(location):
        return location
    prefix, url = "", location
    if location.startswith("/vsi"):
        start = location.find("http")
        if start < 0:
            return location
        prefix, url = location[:start], location[start:]
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                       if not SECRET_QUERY.fullmatch(k)])
    return prefix + urlunsplit((parts.scheme, host, parts.path, query, parts.fragment))


def clean_text(text: str) -> str:
    """A message (e.g. GDAL's) with the credentials of every URL in it removed."""
    return re.sub(r"(?:https?|s3)://[^\s'\"]+", lambda match: str(clean_location(match.group())), text)


def scene_file_name(location: str | os.PathLike) -> str:
    """The file name of a scene: a local path's name, a remote location's last path segment."""
    if not is_remote(location):
        return Path(location).name
    return urlsplit(location).path.rstrip("/").rpartition("/")[2] or str(clean_location(location))


@contextmanager
def remote_env() -> Iterator[None]:
    """GDAL settings for remote reads (GDAL_REMOTE_OPTIONS, unless set in the environment)."""
    with rasterio.Env(**{key: os.environ.get(key, value) for key, value in GDAL_REMOTE_OPTIONS.items()}):
        yield


@functools.cache
def _gdal() -> ctypes.CDLL:
    """The GDAL library rasterio has loaded (its VSI file functions read remote bytes)."""
    import rasterio._base  # noqa: F401  (loads GDAL)

    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if "libgdal" in line:
                    return _bind(ctypes.CDLL(line.split()[-1]))
    except OSError:
        pass
    found = ctypes.util.find_library("gdal")
    if not found:
        raise RasterError("scene: GDAL's library cannot be found to read a remote scene; read it from a local copy")
    return _bind(ctypes.CDLL(found))


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.VSIFOpenL.restype = ctypes.c_void_p
    lib.VSIFOpenL.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    lib.VSIFSeekL.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
    lib.VSIFTellL.restype = ctypes.c_uint64
    lib.VSIFTellL.argtypes = [ctypes.c_void_p]
    lib.VSIFReadL.restype = ctypes.c_size_t
    lib.VSIFReadL.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p]
    lib.VSIFCloseL.argtypes = [ctypes.c_void_p]
    lib.VSIGetFileMetadata.restype = ctypes.POINTER(ctypes.c_char_p)
    lib.VSIGetFileMetadata.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
    lib.CSLDestroy.argtypes = [ctypes.POINTER(ctypes.c_char_p)]
    lib.VSICurlPartialClearCache.argtypes = [ctypes.c_char_p]
    return lib


def forget_cached(location: str) -> None:
    """Drop what GDAL keeps of a remote file (size, headers, blocks), so an object replaced since an
    earlier read is seen as it is now."""
    _gdal().VSICurlPartialClearCache(gdal_path(location).encode())


def remote_fingerprint(location: str) -> tuple[str, str | None]:
    """(fingerprint, revision) of a remote scene from range reads, never a whole download.

    The fingerprint is raster.scene_fingerprint's content sample (the file size, its first and last
    64 KiB and 16 evenly spaced 4 KiB samples), so a scene has the same tile ids local and remote;
    the revision is the server's ETag (else Last-Modified), None when it sends neither.
    """
    lib, path = _gdal(), gdal_path(location).encode()
    shown = clean_location(location)
    with remote_env():
        handle = lib.VSIFOpenL(path, b"rb")
        if not handle:
            raise RasterError(f"{shown}: cannot be read; check the address and the credentials (AWS_* variables or "
                              "a signed URL)")
        try:
            lib.VSIFSeekL(handle, 0, os.SEEK_END)
            size = lib.VSIFTellL(handle)
            digest = hashlib.sha256(str(size).encode())
            offsets = [(0, _SAMPLE_CHUNK)]
            offsets += [(size * i // (_SAMPLES + 1), 4096) for i in range(1, _SAMPLES + 1)]
            offsets.append((max(0, size - _SAMPLE_CHUNK), _SAMPLE_CHUNK))
            for offset, length in offsets:
                digest.update(_read_at(lib, handle, offset, min(length, max(0, size - offset)), shown))
        finally:
            lib.VSIFCloseL(handle)
        headers = lib.VSIGetFileMetadata(path, b"HEADERS", None)
    fields = {}
    if headers:
        i = 0
        while headers[i]:
            key, _, value = headers[i].decode("utf-8", "replace").partition("=")
            fields[key.lower()] = value
            i += 1
        lib.CSLDestroy(headers)
    revision = fields.get("etag") or fields.get("last-modified")
    return digest.hexdigest(), revision and f"{revision} {size}"


def _read_at(lib: ctypes.CDLL, handle: int, offset: int, length: int, shown: str | os.PathLike) -> bytes:
    """`length` bytes at `offset` of an open VSI file; RasterError when fewer arrive."""
    buffer = ctypes.create_string_buffer(length)
    lib.VSIFSeekL(handle, offset, os.SEEK_SET)
    if lib.VSIFReadL(buffer, 1, length, handle) != length:
        raise RasterError(f"{shown}: the connection failed while reading bytes {offset}..{offset + length}; "
                          "check the network and rerun (an index resumes)")
    return buffer.raw
