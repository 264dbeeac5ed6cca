"""`index --engine ray`: a local Ray with 2 encoder actors builds the single-process indexer's index.

Ray starts once for the module (a local instance sized for 2 encoders and a reader); every test
compares against `index_scenes` on the same real scenes in three UTM zones. The stage functions
the Ray tasks and actors run are also chained in-process (no Ray needed).
"""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from rasters import truncated_copy, write_geotiff

from rsmclip_geo import ray_engine
from rsmclip_geo.api import RayEngine, SearchParams, search
from rsmclip_geo.cli import main
from rsmclip_geo.errors import RsmclipError
from rsmclip_geo.indexer import index_scenes, plan_index
from rsmclip_geo.tile_index import TileIndex, batch_table
from rsmclip_geo.pipeline import Cancelled

from rsmclip_geo.tiling import TilingParams

requires_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                  reason="Ray is not installed: pip install 'rsmclip-geo[ray]' to test --engine ray")

PARAMS = TilingParams(tile_size=64)
#: EPSG:26913 uint8 RGB, EPSG:32750 RGBA drone ortho with nodata, EPSG:32633 4-band orthophoto.
SCENES = ("colorado_rgb_15cm.tif", "pix4d_farm_rgba_35cm.tif", "fotomap_4band_2cm.tif")
WINDOW_COLUMNS = ["tile_id", "scene", "scene_fingerprint", "win_col", "win_row", "win_width", "win_height", "scale"]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module, with room for 2 encoder actors and a window reader."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'rsmclip-geo[ray]' to test --engine ray")
    started = ray_engine.connect_ray(None, workers=2, cpus_per_worker=1.0)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def scenes(shared_data):
    return [shared_data / "geotiff" / name for name in SCENES]


@pytest.fixture(scope="module")
def built(local_ray, scenes, model, tmp_path_factory):
    """The single-process index, the Ray index of the same scenes, and the Ray run's progress calls."""
    root = tmp_path_factory.mktemp("ray_engine")
    local = index_scenes(scenes, root / "local", model=model, tiling=PARAMS)
    calls: list[tuple[int, int]] = []
    ray_dir = index_scenes(scenes, root / "ray", model=model, tiling=PARAMS, engine=RayEngine(workers=2),
                           batch_size=16, progress=lambda done, total: calls.append((done, total)))
    return TileIndex.open(local), TileIndex.open(ray_dir), calls


def test_same_tiles_windows_and_geometry(built):
    local, remote, _ = built
    assert len(remote) == len(local) > 400
    assert len(set(remote.column("scene_fingerprint"))) == 3
    for name in WINDOW_COLUMNS:
        assert remote.table.column(name).equals(local.table.column(name)), name
    assert remote.table.column("geometry").equals(local.table.column("geometry"))


def test_embeddings_equal_within_fp16_tolerance(built):
    local, remote, _ = built
    a, b = local.embeddings().astype(np.float32), remote.embeddings().astype(np.float32)
    assert a.shape == b.shape and np.abs(a).max() > 0.05
    assert np.abs(a - b).max() <= 1e-3


def test_same_files_schema_and_metadata(built):
    local, remote, _ = built
    local_parts, remote_parts = sorted(local.path.iterdir()), sorted(remote.path.iterdir())
    assert [p.name for p in remote_parts] == [p.name for p in local_parts] == ["part-00000.parquet"]
    local_schema, remote_schema = pq.read_schema(local_parts[0]), pq.read_schema(remote_parts[0])
    assert remote_schema.equals(local_schema, check_metadata=True)
    assert remote.metadata == local.metadata
    info = json.loads(remote_schema.metadata[b"rsmclip_geo"])
    assert info["tiling"]["tile_size"] == 64 and len(info["scenes"]) == 3
    assert not remote.path.with_name(remote.path.name + ".partial").exists()


def test_search_returns_the_same_hits(built, model):
    local, remote, _ = built
    queries = ["aeroporto", "campo de golf", "储油罐"]
    expected = search(local, queries, model=model, params=SearchParams(top_k=8, nms_overlap=1.0)).hits
    hits = search(remote, queries, model=model, params=SearchParams(top_k=8, nms_overlap=1.0)).hits
    assert [(h.query, h.tile_id) for h in hits] == [(h.query, h.tile_id) for h in expected]
    assert np.allclose([h.score for h in hits], [h.score for h in expected], atol=1e-3)


def test_progress_counts_every_window(built):
    local, _, calls = built
    total = calls[-1][1]
    assert calls[-1] == (total, total) and total >= len(local)  # skipped nodata windows count too
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_cancelled_job_resumes_to_the_same_index(local_ray, scenes, model, built, tmp_path):
    local, _, _ = built
    output = tmp_path / "resumed"
    polls = iter(range(10**6))
    with pytest.raises(Cancelled, match="rerun to resume"):
        index_scenes(scenes, output, model=model, tiling=PARAMS, engine=RayEngine(workers=2), batch_size=16,
                     cancel=lambda: next(polls) >= 2)
    partial = tmp_path / "resumed.partial"
    assert not output.exists() and len(list(partial.glob("shard-*.parquet"))) == 1
    index_scenes(scenes, output, model=model, tiling=PARAMS, engine=RayEngine(workers=2), batch_size=16)
    resumed = TileIndex.open(output)
    assert resumed.table.column("tile_id").equals(local.table.column("tile_id"))
    assert np.abs(resumed.embeddings().astype(np.float32) - local.embeddings().astype(np.float32)).max() <= 1e-3


def test_cli_engine_ray(local_ray, scenes, tiny_bundle, built, tmp_path, capsys):
    local, _, _ = built
    output = tmp_path / "cli_index"
    code = main(["-q", "index", "--engine", "ray", "--workers", "2", "--model", str(tiny_bundle),
                 "--tile-size", "64", str(scenes[0]), "-o", str(output)])
    assert code == 0 and capsys.readouterr().out.startswith(f"wrote {output}: 1 scene, ")
    index = TileIndex.open(output)
    first_scene = local.column("scene") == str(scenes[0])  # the path as given
    assert list(index.column("tile_id")) == list(local.column("tile_id")[first_scene])


@pytest.fixture
def no_ray_start(monkeypatch):
    """Fail the test if the engine tries to start or join Ray."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the input was checked")

    monkeypatch.setattr(ray_engine, "connect_ray", refuse)


@pytest.mark.parametrize(
    "case, message",
    [
        ("not a raster", r"notes\.tif: cannot be opened as a raster"),
        ("truncated TIFF", r"cut\.tif: .*truncated or corrupt"),
        ("no CRS", r"plain\.tif: raster has no CRS or geotransform"),
        ("parquet output", r"-o .*index\.parquet: the ray engine writes a directory of GeoParquet shards"),
        ("zero workers", r"--workers 0: give a positive number"),
        ("ray option without ray", r"--workers.* need --engine ray"),
    ],
)
@requires_ray
def test_bad_input_fails_with_one_line_before_ray_starts(case, message, no_ray_start, scenes, tiny_bundle,
                                                         tmp_path, capsys):
    notes = tmp_path / "notes.tif"
    notes.write_text("field notes, not pixels\n")
    bad = {
        "not a raster": notes,
        "truncated TIFF": truncated_copy(scenes[0], tmp_path / "cut.tif", 0.5),
        "no CRS": write_geotiff(tmp_path / "plain.tif", np.full((3, 64, 64), 9, np.uint8), crs=None),
    }
    output = tmp_path / ("index.parquet" if case == "parquet output" else "index")
    extra = {"zero workers": ["--workers", "0"], "ray option without ray": ["--engine", "local", "--workers", "2"]}
    args = ["index", "--engine", "ray", "--model", str(tiny_bundle), "--tile-size", "64", str(scenes[0]),
            str(bad.get(case, scenes[1])), "-o", str(output), *extra.get(case, [])]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rsmclip-geo: error: ") and re.search(message, err[0]), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_too_many_workers_for_the_cluster(local_ray, scenes, model, tmp_path):
    cpus = int(local_ray.cluster_resources()["CPU"])
    with pytest.raises(RsmclipError, match=rf"workers={cpus}: the Ray cluster has {cpus} CPUs") as info:
        index_scenes(scenes[:1], tmp_path / "index", model=model, tiling=PARAMS, engine=RayEngine(workers=cpus))
    assert info.value.param == "workers"
    assert not (tmp_path / "index").exists()


def test_stages_chained_in_process_give_the_local_index(scenes, model, tmp_path):
    """chunk_rows → read_chunks → TileEncoder → embedded_batches, as Ray runs them, without Ray."""
    local = TileIndex.open(index_scenes(scenes[:2], tmp_path / "local", model=model, tiling=PARAMS))
    job = plan_index(scenes[:2], tmp_path / "chained", model=model, tiling=PARAMS)
    with job.shards() as (writer, done_ids):
        rows, windows = ray_engine.chunk_rows(job, done_ids, 16)
        assert len(rows) == sum(-(-len(w) // 16) for _, w in job.plans)
        scene_table = {scene.fingerprint: scene for scene, _ in job.plans}
        read = [ray_engine.read_chunks({name: np.array([row[name]]) for name in row}, scene_table, windows,
                                       job.params, model.bundle.info) for row in rows]
        tiles = {name: np.concatenate([r[name] for r in read]) for name in read[0]}
        assert int(tiles["windows"].sum()) == job.total_windows
        encoder = ray_engine.TileEncoder(str(model.bundle.path), model.bundle.fingerprint, ["cpu"], 1)
        for start in range(0, len(tiles["keep"]), 16):
            result = encoder({name: values[start:start + 16] for name, values in tiles.items()})
            assert "tiles" not in result
            for batch in ray_engine.embedded_batches(result, scene_table):
                writer.add(batch_table(batch, job.schema))
    chained = TileIndex.open(job.output)
    for name in [*WINDOW_COLUMNS, "geometry"]:
        assert chained.table.column(name).equals(local.table.column(name)), name
    assert np.abs(chained.embeddings().astype(np.float32) - local.embeddings().astype(np.float32)).max() <= 1e-3
    assert chained.metadata == local.metadata


def test_chunk_without_kept_tiles_still_counts_its_windows(scenes, model, tmp_path):
    job = plan_index(scenes[:1], tmp_path / "index", model=model, tiling=TilingParams(tile_size=64, min_std=1e6))
    rows, windows = ray_engine.chunk_rows(job, {}, 8)
    scene_table = {scene.fingerprint: scene for scene, _ in job.plans}
    read = ray_engine.read_chunks({name: np.array([rows[0][name]]) for name in rows[0]}, scene_table, windows,
                                  job.params, model.bundle.info)
    assert read["keep"].tolist() == [False] and read["windows"].tolist() == [8]
    encoder = ray_engine.TileEncoder(str(model.bundle.path), model.bundle.fingerprint, ["cpu"], 1)
    result = encoder(read)
    assert not result["embedding"].any() and list(ray_engine.embedded_batches(result, scene_table)) == []


def test_encoder_refuses_another_bundle_at_the_path(model):
    with pytest.raises(RsmclipError, match="another bundle at that path"):
        ray_engine.TileEncoder(str(model.bundle.path), "0" * 64, ["cpu"], 1)
