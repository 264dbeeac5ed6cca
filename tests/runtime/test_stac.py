"""STAC: indexes built from a real STAC API (stac-fastapi-pgstac on PostgreSQL + PostGIS) and from a static
catalogue served by nginx, both pointing at real COGs on loopback; equal to indexing the COGs directly, with
each scene's STAC fields kept and searchable by datetime; bad catalogues, assets and links fail in one line."""

from __future__ import annotations

import json
import time

import numpy as np
import pystac
import pytest
import rasterio
import rasterio.warp
from cli_cases import assert_fails_cleanly, leftovers, run_cli
from servers import free_port, make_cog
from stac_servers import PgStacApi, cog_item, collection_of, pgstac_missing, write_catalogue

from rsmclip_geo import api
from rsmclip_geo.errors import RsmclipError
from rsmclip_geo.stac import in_interval, parse_interval
from rsmclip_geo.tile_index import TileIndex
from rsmclip_geo.tiling import TilingParams

PARAMS = TilingParams(tile_size=64)
FARM_TIME, COLORADO_TIME = "2021-06-15T02:30:00Z", "2023-03-10T17:45:00Z"
BANDS = {"red": "B04.tif", "green": "B03.tif", "blue": "B02.tif"}


@pytest.fixture(scope="module")
def cogs(shared_data, tmp_path_factory):
    """Real COGs: the farm scene, the Colorado scene, and the Colorado scene as three single-band COGs."""
    root = tmp_path_factory.mktemp("www")
    make_cog(shared_data / "geotiff" / "pix4d_farm_rgba_35cm.tif", root / "farm.tif")
    make_cog(shared_data / "geotiff" / "colorado_rgb_15cm.tif", root / "colorado.tif")
    with rasterio.open(root / "colorado.tif") as src:
        profile = {k: v for k, v in src.profile.items() if k not in ("blockxsize", "blockysize", "tiled", "interleave")}
        for band, name in enumerate(BANDS.values(), start=1):
            single = root / f"single-{name}"
            with rasterio.open(single, "w", **dict(profile, driver="GTiff", count=1)) as dst:
                dst.write(src.read(band), 1)
            make_cog(single, root / name)
            single.unlink()
    return root


def aerial_items(cogs, href) -> list[pystac.Item]:
    """The farm item (visual) and the Colorado item (visual and red, green, blue), assets at href(name)."""
    return [cog_item("farm", cogs / "farm.tif", {"visual": href("farm.tif")}, collection="aerial",
                     datetime=FARM_TIME, cloud_cover=5),
            cog_item("colorado", cogs / "colorado.tif",
                     {"visual": href("colorado.tif"), **{k: href(v) for k, v in BANDS.items()}},
                     collection="aerial", datetime=COLORADO_TIME, cloud_cover=40)]


@pytest.fixture(scope="module")
def stac_api(cogs, nginx):
    """stac-fastapi-pgstac over PostgreSQL + PostGIS: collection `aerial` (farm, Colorado; assets on nginx)
    and `broken` (an item whose asset is missing on the server)."""
    missing = pgstac_missing()
    if missing:
        pytest.skip(missing)
    server = PgStacApi()
    aerial = aerial_items(cogs, nginx.url)
    broken = [cog_item("gone", cogs / "farm.tif", {"visual": nginx.url("missing.tif")}, collection="broken",
                       datetime="2022-01-01T00:00:00Z")]
    server.load([collection_of("aerial", aerial), collection_of("broken", broken)], aerial + broken)
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def catalogue(cogs, nginx):
    """A static catalogue of the aerial items under nginx's root, asset hrefs relative to the items."""
    write_catalogue(cogs / "catalog", "aerial", aerial_items(cogs, lambda name: str(cogs / name)))
    return nginx.url("catalog/catalog.json")


def bbox_of(path) -> list[float]:
    with rasterio.open(path) as src:
        return list(rasterio.warp.transform_bounds(src.crs, "EPSG:4326", *src.bounds))


def assert_same_tiles(index: TileIndex, direct: TileIndex) -> None:
    """Windows and embeddings equal, row for row in tile order."""
    order, direct_order = np.argsort(index.column("tile_id")), np.argsort(direct.column("tile_id"))
    assert len(order) == len(direct_order) > 0
    np.testing.assert_array_equal(index.windows(order), direct.windows(direct_order))
    np.testing.assert_array_equal(index.embeddings()[order], direct.embeddings()[direct_order])


def test_api_index_equals_direct_index(model, stac_api, nginx, cogs, tmp_path, capsys):
    out = tmp_path / "stac.parquet"
    result = run_cli(capsys, "-q", "index", "--stac", stac_api, "--collection", "aerial", "--bbox",
                     *bbox_of(cogs / "farm.tif"), "--datetime", "2021-01-01/2021-12-31", "-o", out,
                     "--model", model.bundle.path, "--tile-size", 64)
    assert result.code == 0, result.err
    direct = tmp_path / "direct.parquet"
    api.build_index([nginx.url("farm.tif")], direct, model=model, tiling=PARAMS)
    index = TileIndex.open(out)
    assert_same_tiles(index, TileIndex.open(direct))
    assert list(index.column("tile_id")) == list(TileIndex.open(direct).column("tile_id"))
    (record,) = index.scenes.values()
    assert record["path"] == nginx.url("farm.tif")
    assert record["stac"] == {"stac_item_id": "farm", "collection": "aerial", "datetime": FARM_TIME,
                              "asset_href": nginx.url("farm.tif")}


def test_stac_fields_in_hits_and_search_by_datetime(model, stac_api, nginx, cogs, tmp_path, capsys):
    scenes = api.stac_scenes(stac_api, collection="aerial")
    assert sorted(s.item_id for s in scenes) == ["colorado", "farm"]
    out = tmp_path / "aerial.parquet"
    api.build_index(scenes, out, model=model, tiling=PARAMS)
    everything = api.search(out, "farm fields", model=model, params=api.SearchParams(top_k=200, nms_overlap=1.0)).hits
    assert {h.stac_item_id for h in everything} == {"farm", "colorado"}
    for when, item, stamp in (("2023-01-01/..", "colorado", COLORADO_TIME), ("../2021-12-31", "farm", FARM_TIME)):
        hits = api.search(out, "farm fields", model=model, params=api.SearchParams(top_k=200, datetime=when)).hits
        assert hits and {(h.stac_item_id, h.collection, h.datetime) for h in hits} == {(item, "aerial", stamp)}
    geojson = tmp_path / "hits.geojson"
    result = run_cli(capsys, "search", out, "farm fields", "--datetime", "2023-03-10", "-o", geojson,
                     "--model", model.bundle.path)
    assert result.code == 0, result.err
    features = json.loads(geojson.read_text())["features"]
    assert features and {f["properties"]["stac_item_id"] for f in features} == {"colorado"}
    assert features[0]["properties"]["asset_href"] == nginx.url("colorado.tif")
    bad = run_cli(capsys, "search", out, "farm", "--datetime", "last week", "--model", model.bundle.path)
    assert_fails_cleanly(bad, "--datetime last week", "RFC 3339")


def test_indexes_without_stac_fields_still_search(model, nginx, tmp_path):
    out = tmp_path / "plain.parquet"
    api.build_index([nginx.url("farm.tif")], out, model=model, tiling=PARAMS)
    hits = api.search(out, "farm", model=model).hits
    assert hits and all(h.stac_item_id is None and h.datetime is None for h in hits)
    assert api.search(out, "farm", model=model, params=api.SearchParams(datetime="2020-01-01/..")).hits == []


def test_max_cloud_and_max_items(stac_api):
    assert [s.item_id for s in api.stac_scenes(stac_api, collection="aerial", max_cloud=10)] == ["farm"]
    # every collection: the item without eo:cloud_cover is left out
    assert sorted(s.item_id for s in api.stac_scenes(stac_api, max_cloud=50)) == ["colorado", "farm"]
    assert len(api.stac_scenes(stac_api, collection="aerial", max_items=1)) == 1


def test_static_catalogue_filters_here(catalogue):
    assert [s.item_id for s in api.stac_scenes(catalogue, datetime="2023-01-01/..")] == ["colorado"]
    assert [s.item_id for s in api.stac_scenes(catalogue, datetime="2021-06-15")] == ["farm"]
    assert [s.item_id for s in api.stac_scenes(catalogue, max_cloud=10)] == ["farm"]
    with pytest.raises(RsmclipError, match="collection=other: no item"):
        api.stac_scenes(catalogue, collection="other")


def test_datetime_intervals():
    july = parse_interval("2024-07-01/2024-07-31")
    assert in_interval("2024-07-31T23:59:59Z", july) and not in_interval("2024-08-01T00:00:00Z", july)
    assert in_interval("2024-06-20T00:00:00Z/2024-07-02T00:00:00Z", july)  # an item interval that overlaps
    assert in_interval("2024-07-10T12:00:00+02:00", parse_interval("../2024-07-10T10:00:00Z"))
    assert not in_interval(None, july)


def test_band_stack_equals_rgb_cog(model, catalogue, nginx, cogs, tmp_path):
    colorado = bbox_of(cogs / "colorado.tif")
    (stack,) = api.stac_scenes(catalogue, bbox=colorado, asset="red,green,blue")
    (visual,) = api.stac_scenes(catalogue, bbox=colorado)
    assert stack.asset_href == ",".join(nginx.url(name) for name in BANDS.values())
    assert visual.asset_href == nginx.url("colorado.tif")  # relative hrefs resolved against the item
    api.build_index([stack], tmp_path / "stack.parquet", model=model, tiling=PARAMS)
    api.build_index([visual], tmp_path / "visual.parquet", model=model, tiling=PARAMS)
    assert_same_tiles(TileIndex.open(tmp_path / "stack.parquet"), TileIndex.open(tmp_path / "visual.parquet"))
    gets = [r for r in nginx.requests("B04.tif") if r[0] == "GET"]
    assert gets and all(status == 206 for _, status, _, _ in gets)  # range reads, never the whole file


def test_s3_asset_of_an_item(model, s3, nginx, cogs, tmp_path):  # noqa: F811
    item = cog_item("farm-s3", cogs / "farm.tif", {"visual": "s3://scenes/farm.tif"}, collection="aerial",
                    datetime=FARM_TIME)
    (tmp_path / "item.json").write_text(json.dumps(item.to_dict(include_self_link=False)))
    api.build_index(api.stac_scenes(tmp_path / "item.json"), tmp_path / "s3.parquet", model=model, tiling=PARAMS)
    api.build_index([nginx.url("farm.tif")], tmp_path / "http.parquet", model=model, tiling=PARAMS)
    index = TileIndex.open(tmp_path / "s3.parquet")
    assert_same_tiles(index, TileIndex.open(tmp_path / "http.parquet"))
    assert [r["stac"]["asset_href"] for r in index.scenes.values()] == ["s3://scenes/farm.tif"]


def test_catalogue_without_items_in_the_bbox(tiny_bundle, catalogue, tmp_path, capsys):
    result = run_cli(capsys, "index", "--stac", catalogue, "--bbox", 10, 10, 11, 11, "-o", tmp_path / "o.parquet",
                     "--model", tiny_bundle)
    assert_fails_cleanly(result, "--bbox 10,10,11,11", "no item of", "catalog.json")
    assert leftovers(tmp_path, "o.parquet") == []


def test_missing_asset_unknown_key_and_unreachable_api(tiny_bundle, stac_api, tmp_path, capsys):
    out = tmp_path / "o.parquet"
    cases = [(["--stac", stac_api, "--collection", "broken"], ("--asset visual", "item gone", "404")),
             (["--stac", stac_api, "--collection", "aerial", "--asset", "nir"], ("--asset nir", "red, visual")),
             (["--stac", f"http://127.0.0.1:{free_port()}/"], ("--stac http://127.0.0.1:", "cannot be read"))]
    for options, fragments in cases:
        result = run_cli(capsys, "index", *options, "-o", out, "--model", tiny_bundle)
        assert_fails_cleanly(result, *fragments)
        assert leftovers(tmp_path, "o.parquet") == []


def test_signed_links_work_until_they_expire(model, tiny_bundle, nginx, cogs, tmp_path, capsys):
    """nginx's secure_link checks signature and expiry: a fresh link indexes (its signature not stored), an
    expired one fails in one line naming the asset and no output is written."""
    for name, expires in (("fresh", time.time() + 3600), ("stale", time.time() - 60)):
        item = cog_item(name, cogs / "farm.tif", {"visual": nginx.signed_url("farm.tif", expires)},
                        collection="signed", datetime=FARM_TIME)
        (tmp_path / f"{name}.json").write_text(json.dumps(item.to_dict(include_self_link=False)))
    fresh = tmp_path / "fresh.parquet"
    result = run_cli(capsys, "-q", "index", "--stac", tmp_path / "fresh.json", "-o", fresh, "--model", tiny_bundle,
                     "--tile-size", 64)
    assert result.code == 0, result.err
    (record,) = TileIndex.open(fresh).scenes.values()
    assert record["stac"]["asset_href"].startswith(nginx.url("signed/farm.tif") + "?expires=")
    assert "sig=" not in json.dumps(record)
    stale = run_cli(capsys, "index", "--stac", tmp_path / "stale.json", "-o", tmp_path / "stale.parquet",
                    "--model", tiny_bundle)
    assert_fails_cleanly(stale, "--asset visual", "410", "expired")
    assert "sig=" not in stale.err
    assert leftovers(tmp_path, "stale.parquet") == []


def test_bad_filters_are_named():
    for kwargs, param in (({"bbox": [5, 5, 4, 6]}, "bbox"), ({"datetime": "2021-12-01/2021-01-01"}, "datetime"),
                          ({"max_cloud": 120}, "max_cloud"), ({"asset": "red,green"}, "asset")):
        with pytest.raises(RsmclipError) as caught:
            api.stac_scenes("unused.json", **kwargs)
        assert caught.value.param == param and str(caught.value).startswith(f"{param}=")


def test_the_output_is_checked_before_the_catalogue_is_read(tiny_bundle, tmp_path, capsys):
    result = run_cli(capsys, "index", "--stac", f"http://127.0.0.1:{free_port()}/", "-o", tmp_path / "o.gpkg",
                     "--model", tiny_bundle)
    assert_fails_cleanly(result, "-o ", "give a .parquet name")
