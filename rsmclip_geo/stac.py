"""STAC: the scenes of a STAC API's item search (pystac-client) or of a static catalogue, collection or
item (pystac; a local path or an http URL), and the datetime intervals that filter them.

A scene is one item's asset (`visual`), or three single-band assets stacked as R, G, B (`red,green,blue`,
`B04,B03,B02`) through a GDAL VRT whose bands stay remote and windowed (raster.open_band_stack). Each
scene carries the item's id, collection, datetime and its asset hrefs without credentials (STAC_FIELDS),
which the index keeps per scene and hits carry.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, time, timezone
from datetime import date as Date

from rsmclip_geo.errors import RasterError, RsmclipError, first_line
from rsmclip_geo.raster import FILE_NODATA, Scene, open_band_stack, open_scene
from rsmclip_geo.remote import clean_location, clean_text

log = logging.getLogger(__name__)

#: Per-scene STAC fields of an index's scenes table and of hits, in order.
STAC_FIELDS = ("stac_item_id", "collection", "datetime", "asset_href")
#: The asset indexed when none is named (Earth Search's and most catalogues' true-colour COG).
DEFAULT_ASSET = "visual"
#: Conformance class of a STAC API with item search.
ITEM_SEARCH = re.compile(r"https://api\.stacspec\.org/v1\.\d+\.\d+(-[\w.]+)?/item-search")
#: Items asked for per page of an API search.
PAGE_SIZE = 100
#: GDAL's words for the HTTP codes of a refused or lapsed signed link.
EXPIRED_CODES = re.compile(r"HTTP response code: (401|403|410)\b")


@dataclass(frozen=True)
class StacScene:
    """One item's scene: the locations of its asset(s) (what GDAL opens; they may hold credentials) and
    the STAC fields the index keeps."""

    item_id: str
    collection: str | None
    datetime: str | None  # RFC 3339: the item's datetime, else its start/end interval
    hrefs: tuple[str, ...]  # one RGB asset, or R, G and B single-band assets
    assets: tuple[str, ...]  # the asset keys of `hrefs`

    @property
    def asset_href(self) -> str:
        """The asset location(s) without credentials, comma-separated for a band stack."""
        return ",".join(os.fspath(clean_location(href)) for href in self.hrefs)

    def fields(self) -> dict:
        """The STAC_FIELDS of this scene."""
        return dict(zip(STAC_FIELDS, (self.item_id, self.collection, self.datetime, self.asset_href)))

    def open(self, *, bands: tuple[int, int, int] | None = None, nodata: float | str | None = FILE_NODATA) -> Scene:
        """The scene to index (RsmclipError naming `asset` when an asset cannot be read); `bands` picks the
        R, G, B bands of a single asset (a stack of three assets has its own)."""
        if bands is not None and len(self.hrefs) > 1:
            raise RsmclipError(f"bands={','.join(map(str, bands))}: the assets {','.join(self.assets)} are the R, G, "
                               "B bands already; give no bands", param="bands", value=bands)
        try:
            if len(self.hrefs) == 1:
                scene = open_scene(self.hrefs[0], bands=bands, nodata=nodata)
            else:
                scene = open_band_stack(self.hrefs, nodata=nodata)
        except RasterError as exc:
            if exc.param is not None:  # a choice of the caller's (bands) that this asset cannot meet
                raise
            message = str(exc)
            if EXPIRED_CODES.search(message):
                message += " (a signed link may have expired: search the catalogue again for fresh links)"
            key = ",".join(self.assets)
            raise RsmclipError(f"asset={key}: item {self.item_id}: {message}", param="asset", value=key) from None
        return replace(scene, stac=self.fields())


# --------------------------------------------------------------------------------- datetime intervals

def parse_interval(text: str, *, param: str = "datetime") -> tuple[datetime | None, datetime | None]:
    """(start, end) of an RFC 3339 interval like STAC's: `A/B`, open ends `..` (or empty), or one instant;
    a date alone is its whole day (UTC unless an offset is given). RsmclipError naming `param` when malformed."""
    parts = text.strip().split("/")
    if len(parts) > 2 or not text.strip():
        raise _bad_interval(text, param)
    if len(parts) == 1:
        return _instant(parts[0], False, text, param), _instant(parts[0], True, text, param)
    start, end = (None if p.strip() in ("", "..") else _instant(p, i == 1, text, param) for i, p in enumerate(parts))
    if start is None and end is None:
        raise _bad_interval(text, param)
    if start is not None and end is not None and start > end:
        raise RsmclipError(f"{param}={text}: the interval ends before it starts; give START/END", param=param,
                           value=text)
    return start, end


def _instant(text: str, end: bool, whole: str, param: str) -> datetime:
    text = text.strip()
    try:
        if len(text) == 10:
            moment = datetime.combine(Date.fromisoformat(text), time.max if end else time.min)
        else:
            moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise _bad_interval(whole, param) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _bad_interval(text: str, param: str) -> RsmclipError:
    return RsmclipError(f"{param}={text}: give an RFC 3339 datetime or interval, e.g. 2020-01-01/2021-06-30, "
                        "2022-03-01T10:00:00Z/.. or ../2021-12-31", param=param, value=text)


def item_span(value: str | None) -> tuple[datetime, datetime] | None:
    """(start, end) of a stored item datetime (an instant, or an interval START/END); None when unknown."""
    if not value:
        return None
    try:
        start, end = parse_interval(value)
    except RsmclipError:
        return None
    return (start or datetime.min.replace(tzinfo=timezone.utc)), (end or datetime.max.replace(tzinfo=timezone.utc))


def in_interval(value: str | None, interval: tuple[datetime | None, datetime | None]) -> bool:
    """Whether a stored item datetime meets the interval (an item without one never does)."""
    span = item_span(value)
    if span is None:
        return False
    start, end = interval
    return (start is None or span[1] >= start) and (end is None or span[0] <= end)


# ------------------------------------------------------------------------------------------- scenes

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
    """The scenes of the items of a STAC API (item search) or of a static catalogue / collection / item that
    meet the filters: `collection`, `bbox` (W, S, E, N in EPSG:4326), `datetime` (RFC 3339 interval),
    `max_cloud` (eo:cloud_cover in percent; items without it are left out), at most `max_items`. `asset`:
    one key, or three single-band keys (R, G, B) as a list or "red,green,blue". RsmclipError naming the
    parameter at fault (stac, asset, bbox, datetime, max_items, max_cloud); no asset is read here."""
    keys = tuple(k.strip() for k in (asset.split(",") if isinstance(asset, str) else asset) if k.strip())
    shown = os.fspath(clean_location(os.fspath(source)))
    _check_filters(keys, bbox, datetime, max_items, max_cloud)
    interval = None if datetime is None else parse_interval(datetime)
    scenes: list[StacScene] = []
    for item in _items(os.fspath(source), shown, collection, bbox, datetime, interval):
        cloud = item.properties.get("eo:cloud_cover")
        if max_cloud is not None and (cloud is None or float(cloud) > max_cloud):
            log.debug("%s: eo:cloud_cover %s; left out", item.id, cloud)
            continue
        scenes.append(_scene(item, keys))
        if max_items is not None and len(scenes) >= max_items:
            break
    if not scenes:
        raise _no_items(shown, bbox=bbox, datetime=datetime, collection=collection, max_cloud=max_cloud)
    log.info("%s: %d item(s) to index", shown, len(scenes))
    return scenes


def _no_items(shown: str, **filters) -> RsmclipError:
    """No item left: named by the most specific filter given (bbox, datetime, collection, max_cloud), else stac."""
    given = {name: ",".join(f"{v:g}" for v in value) if name == "bbox" else value
             for name, value in filters.items() if value is not None}
    param, value = next(iter(given.items()), ("stac", shown))
    listed = ", ".join(f"{name} {value}" for name, value in given.items()) or "no filter"
    return RsmclipError(f"{param}={value}: no item of {shown} matches ({listed}); widen the search or check the "
                        "catalogue", param=param, value=value)


def _check_filters(keys: tuple[str, ...], bbox, datetime, max_items, max_cloud) -> None:
    if len(keys) not in (1, 3):
        raise RsmclipError(f"asset={','.join(keys)}: give one asset key (e.g. visual) or three single-band keys "
                           "in R,G,B order (e.g. red,green,blue)", param="asset", value=",".join(keys))
    if bbox is not None:
        box = list(bbox)
        if len(box) != 4 or not (-180 <= box[0] < box[2] <= 180 and -90 <= box[1] < box[3] <= 90):
            shown = ",".join(f"{v:g}" for v in box)
            raise RsmclipError(f"bbox={shown}: give W S E N in degrees (EPSG:4326) with W < E and S < N",
                               param="bbox", value=shown)
    if max_items is not None and max_items < 1:
        raise RsmclipError(f"max_items={max_items}: give a positive number of items", param="max_items",
                           value=max_items)
    if max_cloud is not None and not 0 <= max_cloud <= 100:
        raise RsmclipError(f"max_cloud={max_cloud}: give a cloud cover in percent, 0 to 100", param="max_cloud",
                           value=max_cloud)


def _scene(item, keys: tuple[str, ...]) -> StacScene:
    """The StacScene of an item's assets `keys`; RsmclipError naming `asset` when the item lacks one."""
    hrefs = []
    for key in keys:
        if key not in item.assets:
            raise RsmclipError(f"asset={key}: item {item.id} has no such asset (its assets: "
                               f"{', '.join(sorted(item.assets)) or 'none'}); choose one of them", param="asset",
                               value=key)
        hrefs.append(item.assets[key].get_absolute_href() or item.assets[key].href)
    return StacScene(item.id, item.collection_id, _item_datetime(item), tuple(hrefs), keys)


@contextmanager
def _quiet_retries() -> Iterator[None]:
    """urllib3's retry warnings (one per attempt) held back: a failure is said once, by the error line."""
    logger = logging.getLogger("urllib3.connectionpool")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _items(source: str, shown: str, collection, bbox, datetime, interval) -> Iterator:
    """Items of an API search, or of a static catalogue / collection / item filtered here."""
    with _quiet_retries():
        yield from _read_items(source, shown, collection, bbox, datetime, interval)


def _read_items(source: str, shown: str, collection, bbox, datetime, interval) -> Iterator:
    """_items without the retry warnings held back: an API when the root conforms to item search."""
    import pystac

    try:
        root = pystac.read_file(source)
    except Exception as exc:  # urllib, JSON, pystac and OS errors alike: the address does not give STAC
        raise _unreadable(shown, exc) from None
    conforms = root.extra_fields.get("conformsTo", []) if isinstance(root, pystac.Catalog) else []
    if any(ITEM_SEARCH.fullmatch(c) for c in conforms):
        yield from _search(source, shown, collection, bbox, datetime)
        return
    if isinstance(root, pystac.Item):
        candidates: Iterator = iter([root])
    elif isinstance(root, pystac.Catalog):
        candidates = root.get_items(recursive=True)
    else:
        raise RsmclipError(f"stac={shown}: not a STAC catalogue, collection, item or API; give one of them",
                           param="stac", value=shown)
    try:
        for item in candidates:
            if collection is not None and item.collection_id != collection:
                continue
            if bbox is not None and not (item.bbox and _meets(item.bbox, bbox)):
                continue
            if interval is not None and not in_interval(_item_datetime(item), interval):
                continue
            yield item
    except RsmclipError:
        raise
    except Exception as exc:
        raise _unreadable(shown, exc) from None


def _search(url: str, shown: str, collection, bbox, datetime) -> Iterator:
    """Items of a STAC API item search (pages fetched as they are used)."""
    from pystac_client import Client

    try:
        client = Client.open(url)
        search = client.search(collections=[collection] if collection else None, bbox=bbox, datetime=datetime,
                               limit=PAGE_SIZE)
        yield from search.items()
    except Exception as exc:  # pystac-client's APIError, requests' errors
        raise _unreadable(shown, exc) from None


def _item_datetime(item) -> str | None:
    """The item's datetime, else its START/END interval (open ends `..`); None when it has neither."""
    properties = item.properties
    when = properties.get("datetime")
    if not when and (properties.get("start_datetime") or properties.get("end_datetime")):
        when = f"{properties.get('start_datetime') or '..'}/{properties.get('end_datetime') or '..'}"
    return when


def _meets(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two W, S, E, N boxes overlap (the first two-dimensional part of a STAC bbox)."""
    a = list(a[:2]) + list(a[-3:-1] if len(a) == 6 else a[2:4])
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def _unreadable(shown: str, exc: BaseException) -> RsmclipError:
    reason = clean_text(first_line(exc, root_cause=True)) or type(exc).__name__
    return RsmclipError(f"stac={shown}: cannot be read as STAC ({reason}); check the address and that it is a STAC "
                        "API, catalogue, collection or item", param="stac", value=shown)
