"""Tile index: GeoParquet layout, multi-CRS scenes, resume, model checks, shards, atomic writes, page
checksums, verification and the output lock."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading

import duckdb
import geopandas
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely
from rasterio.warp import transform_bounds
from rasters import truncated_copy, write_geotiff

from rsmclip_geo import tile_index
from rsmclip_geo.encoders import load_model
from rsmclip_geo.errors import RsmclipError, TileIndexError
from rsmclip_geo.caches import cache_key
from rsmclip_geo.indexer import index_scenes, job_parts, plan_index
from rsmclip_geo.tile_index import IndexHeader, TileIndex, index_is_file, verify_index
from rsmclip_geo.locks import output_lock
from rsmclip_geo.pipeline import Cancelled
from rsmclip_geo.raster import open_scene
from rsmclip_geo.tiling import TilingParams, tile_windows

PARAMS = TilingParams(tile_size=64)
SCENES = ("colorado_rgb_15cm.tif", "pix4d_farm_rgba_35cm.tif", "fotomap_4band_2cm.tif")


class CountingModel:
    """The real model, counting the tiles it encodes (called from several worker threads)."""

    def __init__(self, model):
        self.model, self.bundle, self.encoded = model, model.bundle, 0
        self._lock = threading.Lock()

    def encode_tiles(self, tiles, **options):
        with self._lock:
            self.encoded += len(tiles)
        return self.model.encode_tiles(tiles, **options)


@pytest.fixture(scope="module")
def other_model(tiny_bundle, tmp_path_factory):
    """The same network under another bundle identity (different normalisation: another model)."""
    copy = shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("other") / "other-bundle")
    info = json.loads((copy / "bundle.json").read_text())
    info["name"], info["mean"] = "other-bundle", [0.5, 0.5, 0.5]
    (copy / "bundle.json").write_text(json.dumps(info))
    return load_model(copy, threads=2)


@pytest.fixture(scope="module")
def multi_index(shared_data, model, tmp_path_factory):
    output = tmp_path_factory.mktemp("index") / "city.parquet"
    index_scenes([shared_data / "geotiff" / name for name in SCENES], output, model=model, tiling=PARAMS)
    return output


def test_geoparquet_layout(multi_index):
    table = pq.read_table(multi_index)
    assert table.column_names == ["tile_id", "scene", "scene_fingerprint", "win_col", "win_row", "win_width",
                                  "win_height", "scale", "embedding", "geometry"]
    embedding = table.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(embedding) and embedding.list_size == 32
    assert embedding.value_type == pa.float16()
    meta = table.schema.metadata
    geo = json.loads(meta[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    assert geo["columns"]["geometry"]["encoding"] == "WKB"
    assert geo["columns"]["geometry"]["crs"]["id"] == {"authority": "EPSG", "code": 4326}
    info = json.loads(meta[b"rsmclip_geo"])
    assert info["format_version"] == 1
    assert info["bundle"]["name"] == "tiny-bundle" and len(info["bundle"]["fingerprint"]) == 64
    assert info["tiling"]["tile_size"] == 64
    assert {r["width"] for r in info["scenes"].values()} == {383, 686, 1243}
    assert len(set(table.column("tile_id").to_pylist())) == table.num_rows


def test_readable_by_geopandas_and_duckdb(multi_index):
    frame = geopandas.read_parquet(multi_index)
    assert frame.crs.to_epsg() == 4326
    assert frame.geometry.geom_type.unique().tolist() == ["Polygon"]
    rows = duckdb.sql(f"select scene, count(*) from '{multi_index}' group by scene order by scene").fetchall()
    assert [r[0].rsplit("/", 1)[1] for r in rows] == sorted(SCENES)
    assert sum(r[1] for r in rows) == len(frame)


def test_footprints_in_each_scene_crs(multi_index, shared_data):
    index = TileIndex.open(multi_index)
    geometries = index.geometries()
    fingerprints = index.column("scene_fingerprint")
    for name in SCENES:
        scene = open_scene(shared_data / "geotiff" / name)
        west, south, east, north = transform_bounds(scene.crs, "EPSG:4326",
                                                    *_scene_bounds(scene), densify_pts=21)
        rows = np.flatnonzero(fingerprints == scene.fingerprint)
        assert len(rows)
        minx, miny, maxx, maxy = shapely.total_bounds(geometries[rows])
        tol = 1e-7
        assert west - tol <= minx and maxx <= east + tol and south - tol <= miny and maxy <= north + tol
        # exact scene-CRS footprints rebuilt from the metadata's scene table
        row = int(rows[-1])
        col, r, w, h = (int(index.column(c)[row]) for c in ("win_col", "win_row", "win_width", "win_height"))
        np.testing.assert_allclose(index.scene_footprint(row), scene.footprint(col, r, w, h))
        assert shapely.is_ccw(geometries[row].exterior)


def _scene_bounds(scene):
    ring = scene.footprint(0, 0, scene.width, scene.height)
    xs, ys = zip(*ring)
    return min(xs), min(ys), max(xs), max(ys)


def test_embeddings_match_the_model(multi_index, shared_data, model):
    index = TileIndex.open(multi_index)
    scene = open_scene(shared_data / "geotiff" / SCENES[0])
    from rsmclip_geo.raster import SceneReader

    row = int(np.flatnonzero(index.column("scene_fingerprint") == scene.fingerprint)[3])
    col, r, w, h = (int(index.column(c)[row]) for c in ("win_col", "win_row", "win_width", "win_height"))
    with SceneReader(scene) as reader:
        tile = reader.read_rgb(col, r, w, h)[0]
    expected = model.encode_images(tile[None])[0]
    np.testing.assert_allclose(index.embeddings()[row].astype(np.float32), expected, atol=2e-3)


def test_interrupted_run_resumes(shared_data, model, tmp_path):
    scenes = [shared_data / "geotiff" / name for name in SCENES[:2]]
    output = tmp_path / "resume.parquet"
    counting = CountingModel(model)
    polls = []
    with pytest.raises(Cancelled):
        index_scenes(scenes, output, model=counting, tiling=PARAMS, batch_size=8,
                     cancel=lambda: polls.append(1) or len(polls) > 5)
    partial = tmp_path / "resume.parquet.partial"
    assert not output.exists() and (partial / "manifest.json").is_file()
    shards = list(partial.glob("shard-*.parquet"))
    kept = sum(pq.ParquetFile(shard).metadata.num_rows for shard in shards)
    assert kept > 0 and counting.encoded >= kept  # batches still in flight at the cancel are dropped

    counting.encoded = 0
    progress = []
    index_scenes(scenes, output, model=counting, tiling=PARAMS, batch_size=8,
                 progress=lambda d, t: progress.append((d, t)))
    assert not partial.exists()
    fresh = tmp_path / "fresh.parquet"
    reference = CountingModel(model)
    index_scenes(scenes, fresh, model=reference, tiling=PARAMS, batch_size=8)
    assert counting.encoded == reference.encoded - kept  # finished tiles were not embedded again
    assert progress[-1][0] == progress[-1][1]
    resumed, full = TileIndex.open(output), TileIndex.open(fresh)
    assert resumed.column("tile_id").tolist() == full.column("tile_id").tolist()
    np.testing.assert_allclose(resumed.embeddings().astype(np.float32), full.embeddings().astype(np.float32),
                               atol=2e-3)


def test_resume_refuses_another_model(shared_data, model, other_model, tmp_path):
    scene = shared_data / "geotiff" / SCENES[0]
    output = tmp_path / "a.parquet"
    polls = []
    with pytest.raises(Cancelled):
        index_scenes([scene], output, model=model, tiling=PARAMS, batch_size=4,
                     cancel=lambda: polls.append(1) or len(polls) > 2)
    with pytest.raises(TileIndexError, match=r"a\.parquet\.partial: unfinished index built with model "
                                             r"'tiny-bundle' .*delete the directory"):
        index_scenes([scene], output, model=other_model, tiling=PARAMS)
    assert not output.exists() and (tmp_path / "a.parquet.partial" / "manifest.json").is_file()


def test_resume_with_other_tiling_starts_over(shared_data, model, tmp_path, caplog):
    scene = shared_data / "geotiff" / SCENES[0]
    output = tmp_path / "t.parquet"
    polls = []
    with pytest.raises(Cancelled):
        index_scenes([scene], output, model=model, tiling=PARAMS, batch_size=4,
                     cancel=lambda: polls.append(1) or len(polls) > 2)
    with caplog.at_level(logging.WARNING, logger="rsmclip_geo"):
        index_scenes([scene], output, model=model, tiling=TilingParams(tile_size=96))
    assert "unfinished index of another job (other tiling); starting over" in caplog.text
    assert set(TileIndex.open(output).column("win_width").tolist()) == {96}


def test_index_refuses_another_model(multi_index, other_model, model, tiny_bundle, monkeypatch):
    index = TileIndex.open(multi_index)
    index.check_model(model)
    with pytest.raises(TileIndexError, match=r"built with model 'tiny-bundle' .* not 'other-bundle'"):
        index.load_model(other_model)
    monkeypatch.setenv("RSMCLIP_GEO_MODELS", str(tiny_bundle.parent / "nothing-here"))
    with pytest.raises(TileIndexError,
                       match=r"^model: .* model 'tiny-bundle', which is not installed; give its bundle") as info:
        index.load_model(None)
    assert info.value.param == "model"
    monkeypatch.setenv("RSMCLIP_GEO_MODELS", str(tiny_bundle.parent))
    assert index.load_model(None).bundle.fingerprint == index.bundle_fingerprint


def test_directory_of_shards(shared_data, model, tmp_path, monkeypatch):
    monkeypatch.setattr(tile_index, "SHARD_TILES", 100)
    output = tmp_path / "big_index"
    index_scenes([shared_data / "geotiff" / SCENES[2]], output, model=model, tiling=PARAMS)
    parts = sorted(output.glob("part-*.parquet"))
    index = TileIndex.open(output)
    assert len(parts) == -(-len(index) // 100) and len(parts) > 1
    assert len(geopandas.read_parquet(output)) == len(index)
    assert duckdb.sql(f"select count(*) from '{output}/*.parquet'").fetchall()[0][0] == len(index)
    assert not list(tmp_path.glob(".big_index*"))


def test_failed_run_leaves_no_index(shared_data, model, tmp_path):
    whole = truncated_copy(shared_data / "geotiff" / SCENES[0], tmp_path / "cut.tif", 1.0, tiled=True)
    scene = open_scene(whole)
    truncated_copy(whole, whole, 0.6)
    output = tmp_path / "broken.parquet"
    with pytest.raises(RsmclipError, match="truncated or corrupt"):
        index_scenes([scene], output, model=model, tiling=PARAMS, batch_size=2)
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".broken")]


def test_scene_with_no_usable_tile(tmp_path, model):
    path = write_geotiff(tmp_path / "flat.tif", np.full((3, 128, 128), 77, np.uint8))
    output = tmp_path / "flat.parquet"
    with pytest.raises(RsmclipError, match=r"no tile kept"):
        index_scenes([path], output, model=model, tiling=PARAMS)
    assert not output.exists()


def test_unwritable_output_is_refused_before_work(shared_data, model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RsmclipError, match=r"output=.*file/i\.parquet: directory .* does not exist") as info:
        index_scenes([shared_data / "geotiff" / SCENES[0]], blocker / "i.parquet", model=model, tiling=PARAMS)
    assert info.value.param == "output"


def test_not_an_index(tmp_path, shared_data):
    with pytest.raises(TileIndexError, match="no such tile index"):
        TileIndex.open(tmp_path / "missing.parquet")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 not really")
    with pytest.raises(TileIndexError, match=r"garbage\.parquet: cannot be read as a tile index"):
        TileIndex.open(garbage)
    plain = tmp_path / "plain.parquet"
    geopandas.GeoDataFrame({"a": [1]}, geometry=[shapely.Point(0, 0)], crs=4326).to_parquet(plain)
    with pytest.raises(TileIndexError, match="not an rsmclip-geo tile index"):
        TileIndex.open(plain)


def test_cache_key(shared_data, tmp_path):
    scene = open_scene(shared_data / "geotiff" / SCENES[0])
    key = cache_key(scene, "a" * 64, PARAMS)
    assert key == cache_key(scene, "a" * 64, TilingParams(tile_size=64))
    assert key != cache_key(scene, "b" * 64, PARAMS)
    assert key != cache_key(scene, "a" * 64, TilingParams(tile_size=64, overlap=0.5))
    other = open_scene(shared_data / "geotiff" / SCENES[1])
    assert key != cache_key(other, "a" * 64, PARAMS)
    assert len(tile_windows(scene, PARAMS)) > 0


def test_existing_directory_with_other_files_is_never_replaced(shared_data, model, tmp_path):
    keep = tmp_path / "my_data"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    with pytest.raises(RsmclipError, match=r"my_data: directory exists and holds other files"):
        index_scenes([shared_data / "geotiff" / SCENES[0]], keep, model=model, tiling=PARAMS)
    assert (keep / "notes.txt").read_text() == "precious"
    # an index directory is rebuilt in place
    output = tmp_path / "parts"
    index_scenes([shared_data / "geotiff" / SCENES[0]], output, model=model, tiling=PARAMS)
    index_scenes([shared_data / "geotiff" / SCENES[0]], output, model=model, tiling=TilingParams(tile_size=96))
    assert set(TileIndex.open(output).column("win_width").tolist()) == {96}


def test_pages_carry_checksums_and_a_damaged_part_is_named(shared_data, model, tmp_path, monkeypatch):
    monkeypatch.setattr(tile_index, "SHARD_TILES", 100)
    output = index_scenes([shared_data / "geotiff" / SCENES[2]], tmp_path / "parts", model=model, tiling=PARAMS)
    assert verify_index(output).startswith(f"{output}: OK: ")
    part = output / "part-00001.parquet"
    raw = bytearray(part.read_bytes())
    footer = len(raw) - 8 - int.from_bytes(raw[-8:-4], "little")
    for i in range(footer // 2 - 200, footer // 2 + 200):  # the middle of the data pages
        raw[i] ^= 0xFF
    part.write_bytes(bytes(raw))
    header = IndexHeader.read(output)  # footers are intact
    damaged = rf"{part}: tile index is damaged \(.*CRC checksum verification failed.*\); rebuild it"
    for read in (lambda: TileIndex.load(header), lambda: header.read_rows([150], ["embedding", "geometry"]),
                 lambda: list(header.iter_embeddings()), lambda: verify_index(output)):
        with pytest.raises(TileIndexError, match=damaged):
            read()
    assert header.read_rows([5], ["tile_id"]).num_rows == 1  # the other parts still read


def test_verify_finds_foreign_duplicate_and_inconsistent_parts(shared_data, model, tmp_path, monkeypatch):
    monkeypatch.setattr(tile_index, "SHARD_TILES", 100)
    scene = shared_data / "geotiff" / SCENES[0]
    output = index_scenes([scene], tmp_path / "parts", model=model, tiling=PARAMS)
    other = index_scenes([scene], tmp_path / "other.parquet", model=model, tiling=TilingParams(tile_size=96))
    cases = {
        "foreign": (lambda d: shutil.copy(other, d / "part-00099.parquet"), "its metadata differs from that of"),
        "duplicate": (lambda d: shutil.copy(d / "part-00000.parquet", d / "part-00099.parquet"), "duplicate tile ids"),
        "two copies": (lambda d: _edit_footer(d / "part-00000.parquet", b'"embed_dim": 32', b'"embed_dim": 33'),
                       "the two copies of its rsmclip_geo metadata differ"),
    }
    for name, (damage, message) in cases.items():
        copy = shutil.copytree(output, tmp_path / name)
        damage(copy)
        with pytest.raises(TileIndexError, match=message):
            verify_index(copy)


def _edit_footer(path, old: bytes, new: bytes) -> None:
    """Replace bytes in the raw key-value metadata of a Parquet footer (not in its ARROW:schema copy)."""
    raw = path.read_bytes()
    at = raw.rindex(old)
    path.write_bytes(raw[:at] + new + raw[at + len(old):])


def test_output_lock_refuses_a_second_writer_in_process(tmp_path):
    output = tmp_path / "city.parquet"
    with output_lock(output):
        owner = json.loads((tmp_path / "city.parquet.lock").read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RsmclipError, match=rf"another run is writing it \(pid {os.getpid()} on "):
            with output_lock(output):
                pass
    assert not (tmp_path / "city.parquet.lock").exists()
    # a lock of this process that it no longer holds (its removal failed) is stale
    (tmp_path / "city.parquet.lock").write_text(json.dumps({**owner, "started": "earlier"}))
    with output_lock(output):
        assert json.loads((tmp_path / "city.parquet.lock").read_text())["started"] != "earlier"
    assert not (tmp_path / "city.parquet.lock").exists()


def test_job_parts_key_the_resume_state(shared_data, model, tmp_path):
    scenes = [shared_data / "geotiff" / name for name in SCENES[:2]]
    job = plan_index(scenes, tmp_path / "a.parquet", model=model, tiling=PARAMS)
    same = plan_index(scenes[::-1], tmp_path / "b.parquet", model=model, tiling=PARAMS)
    assert job_parts(job.metadata) == job_parts(same.metadata)  # scene order does not matter
    for other in (plan_index(scenes[:1], tmp_path / "c.parquet", model=model, tiling=PARAMS),
                  plan_index(scenes, tmp_path / "d.parquet", model=model, tiling=TilingParams(tile_size=96)),
                  plan_index(scenes, tmp_path / "e.parquet", model=model, tiling=PARAMS, bands=(3, 2, 1))):
        assert job_parts(other.metadata) != job_parts(job.metadata)


def test_index_output_names(shared_data, tmp_path):
    scene = shared_data / "geotiff" / SCENES[0]
    assert index_is_file(tmp_path / "a.parquet") and index_is_file(tmp_path / "A.PARQUET")
    assert not index_is_file(tmp_path / "tiles")
    with pytest.raises(RsmclipError, match=r"output=.*a\.gpkg: a tile index is a \.parquet file or a directory"):
        plan_index([scene], tmp_path / "a.gpkg")
    with pytest.raises(RsmclipError, match=r"threads=0: give a positive number"):
        plan_index([scene], tmp_path / "a.parquet", threads=0)
    assert not list(tmp_path.iterdir())
