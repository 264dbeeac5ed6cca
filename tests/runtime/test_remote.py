"""Remote scenes: cloud-optimised GeoTIFFs over HTTP (nginx) and S3 (moto's server) on loopback, read with
range requests, indexed and searched like the same file read locally; credentials never stored or shown."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from cli_cases import run_cli_process
from servers import PRIVATE_PASSWORD, PRIVATE_USER, S3_BUCKET, DroppingProxy, make_cog

from rsmclip_geo import api
from rsmclip_geo.caches import cache_key
from rsmclip_geo.cli import main
from rsmclip_geo.errors import RsmclipError
from rsmclip_geo.locks import output_lock
from rsmclip_geo.raster import open_scene
from rsmclip_geo.remote import clean_location, gdal_path
from rsmclip_geo.tile_index import TileIndex
from rsmclip_geo.tiling import TilingParams

PARAMS = TilingParams(tile_size=64)
SIGNATURE = "X-Amz-Signature=deadbeefsecret&X-Amz-Credential=AKIDSECRET%2F20260101&X-Amz-Expires=600"
SECRETS = ("deadbeefsecret", "AKIDSECRET", PRIVATE_PASSWORD)


@pytest.fixture(scope="module")
def cogs(shared_data, tmp_path_factory):
    """A folder of real COGs: the farm scene (RGBA, 128 px blocks, overviews), also under private/."""
    root = tmp_path_factory.mktemp("www")
    make_cog(shared_data / "geotiff" / "pix4d_farm_rgba_35cm.tif", root / "farm.tif")
    make_cog(shared_data / "geotiff" / "colorado_rgb_15cm.tif", root / "colorado.tif")
    make_cog(shared_data / "geotiff" / "colorado_rgb_15cm.tif", root / "colorado_x8.tif", scale=8,
             compress="DEFLATE", blocksize=256)
    (root / "private").mkdir()
    shutil.copy(root / "farm.tif", root / "private" / "farm.tif")
    return root


@pytest.fixture(scope="module")
def local_index(model, cogs, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "farm.parquet"
    api.build_index([cogs / "farm.tif"], out, model=model, tiling=PARAMS)
    return TileIndex.open(out)


def assert_same_tiles(index: TileIndex, local: TileIndex, location: str) -> None:
    """Tile ids, windows and footprints equal, embeddings within 1e-3; the scene column is `location`."""
    order, local_order = np.argsort(index.column("tile_id")), np.argsort(local.column("tile_id"))
    assert list(index.column("tile_id")[order]) == list(local.column("tile_id")[local_order])
    assert set(index.column("scene")) == {location}
    np.testing.assert_array_equal(index.windows(order), local.windows(local_order))
    np.testing.assert_allclose(index.embeddings()[order], local.embeddings()[local_order], atol=1e-3)


def test_lock_records_the_command_without_credentials(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["rsmclip-geo", "index", f"https://u:{PRIVATE_PASSWORD}@h/a.tif?{SIGNATURE}"])
    with output_lock(tmp_path / "idx.parquet"):
        held = (tmp_path / "idx.parquet.lock").read_text()
    assert "https://h/a.tif" in held and not any(secret in held for secret in SECRETS)


def test_locations_map_to_gdal_and_lose_credentials():
    assert gdal_path("https://h/a.tif") == "/vsicurl/https://h/a.tif"
    assert gdal_path("s3://bucket/dir/a.tif") == "/vsis3/bucket/dir/a.tif"
    assert gdal_path("/vsigs/b/a.tif") == "/vsigs/b/a.tif"
    assert clean_location(f"https://u:pw@h:8/a.tif?v=2&{SIGNATURE}&sig=x&token=t") == "https://h:8/a.tif?v=2"
    assert clean_location(f"/vsicurl/https://u:pw@h/a.tif?{SIGNATURE}") == "/vsicurl/https://h/a.tif"
    assert clean_location("dir/a?b#c.tif") == "dir/a?b#c.tif"  # a local path stays as given


def test_http_index_equals_local_with_range_requests(model, nginx, local_index, cogs, tmp_path):
    out = tmp_path / "remote.parquet"
    api.build_index([nginx.url("farm.tif")], out, model=model, tiling=PARAMS)
    assert_same_tiles(TileIndex.open(out), local_index, nginx.url("farm.tif"))
    gets = [r for r in nginx.requests("farm.tif") if r[0] == "GET"]
    assert gets and all(status == 206 and ranges.startswith("bytes=") for _, status, _, ranges in gets)
    assert max(sent for _, _, sent, _ in gets) < (cogs / "farm.tif").stat().st_size


def test_coarse_tiles_read_the_overviews(model, nginx, cogs, tmp_path):
    """Tiles decimated to the model input are read from the COG's overviews: most bytes stay on the server."""
    shutil.copy(cogs / "colorado_x8.tif", cogs / "coarse.tif")  # a name no earlier read has cached
    scene = open_scene(nginx.url("coarse.tif"))  # header, fingerprint samples, the stretch's sample
    opened = len(nginx.requests("coarse.tif"))
    api.build_index([scene], tmp_path / "coarse.parquet", model=model, tiling=TilingParams(tile_size=512))
    sent = sum(sent for method, _, sent, _ in nginx.requests("coarse.tif")[opened:] if method == "GET")
    # full-resolution reads would fetch about the whole file; GDAL's read-ahead varies with its caches
    assert 0 < sent < (cogs / "coarse.tif").stat().st_size / 3


def test_s3_index_equals_local(model, s3, local_index, tmp_path):
    out = tmp_path / "s3.parquet"
    api.build_index(["s3://scenes/farm.tif"], out, model=model, tiling=PARAMS)
    assert_same_tiles(TileIndex.open(out), local_index, "s3://scenes/farm.tif")


def test_tile_search_over_http_equals_local(model, nginx, cogs, tmp_path):
    remote = api.tile_search(nginx.url("colorado.tif"), "farmland", model=model, tiling=PARAMS,
                             cache_dir=tmp_path / "cache")
    local = api.tile_search(cogs / "colorado.tif", "farmland", model=model, tiling=PARAMS,
                            cache_dir=tmp_path / "cache")
    assert [h.tile_id for h in remote.hits] == [h.tile_id for h in local.hits]
    assert {h.scene for h in remote.hits} == {nginx.url("colorado.tif")}
    np.testing.assert_allclose([h.score for h in remote.hits], [h.score for h in local.hits], atol=1e-3)


def test_credentials_are_never_stored_or_shown(tiny_bundle, nginx, tmp_path, capsys, caplog):
    host = nginx.url("private/farm.tif").removeprefix("http://")
    url = f"http://{PRIVATE_USER}:{PRIVATE_PASSWORD}@{host}?{SIGNATURE}"
    caplog.set_level(logging.DEBUG, logger="rsmclip_geo")
    assert main(["index", url, "-o", str(tmp_path / "idx.parquet"), "--model", str(tiny_bundle),
                 "--tile-size", "64"]) == 0
    hits = tmp_path / "hits.geojson"
    assert main(["tile-search", url, "farmland", "-o", str(hits), "--model", str(tiny_bundle), "--tile-size", "64",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    shown = capsys.readouterr()
    written = [(tmp_path / "idx.parquet").read_bytes(), hits.read_bytes(),
               *(p.read_bytes() for p in (tmp_path / "cache").glob("*.parquet"))]
    for secret in SECRETS:
        assert secret not in shown.out + shown.err + caplog.text
        assert not any(secret.encode() in data for data in written)
    scenes = pq.read_table(tmp_path / "idx.parquet", columns=["scene"]).column(0).unique().to_pylist()
    assert scenes == [f"http://{host}"]


def test_cache_key_follows_the_object(s3, cogs):
    first = open_scene("s3://scenes/farm.tif")
    key = cache_key(first, "bundle", PARAMS)
    assert first.revision and cache_key(open_scene("s3://scenes/farm.tif"), "bundle", PARAMS) == key
    s3.upload_file(str(cogs / "colorado.tif"), S3_BUCKET, "farm.tif")
    changed = open_scene("s3://scenes/farm.tif")
    assert changed.revision != first.revision and cache_key(changed, "bundle", PARAMS) != key


def test_missing_asset_is_one_line(tiny_bundle, nginx, tmp_path, capsys):
    out = tmp_path / "idx.parquet"
    assert main(["index", nginx.url("missing.tif"), "-o", str(out), "--model", str(tiny_bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and nginx.url("missing.tif") in err and "404" in err
    assert not out.exists()


def test_dropped_connection_fails_clearly_and_resumes(model, nginx, cogs, tmp_path):
    local = api.build_index([cogs / "colorado_x8.tif"], tmp_path / "local.parquet", model=model, tiling=PARAMS)
    proxy = DroppingProxy(nginx.port)
    url = f"http://127.0.0.1:{proxy.port}/colorado_x8.tif"
    out = tmp_path / "idx.parquet"
    try:
        scene = open_scene(url)
        proxy.budget = proxy.sent + 64 * 1024  # the connection is cut while tiles are read
        with pytest.raises(RsmclipError) as failed:
            api.build_index([scene], out, model=model, tiling=PARAMS, batch_size=4)
        message = str(failed.value)
        assert len(message.splitlines()) == 1 and "rerun" in message and url in message
        assert any(out.with_name(out.name + ".partial").glob("shard-*.parquet"))
        proxy.budget = None
        # the rerun is a new process, as an analyst's would be (no GDAL state of the failed run)
        rerun = run_cli_process("-v", "index", url, "-o", out, "--model", model.bundle.path, "--tile-size", "64",
                                "--batch-size", "4")
    finally:
        proxy.close()
    assert rerun.code == 0, rerun.err
    assert "resuming" in rerun.err
    assert_same_tiles(TileIndex.open(out), TileIndex.open(local.path), url)
