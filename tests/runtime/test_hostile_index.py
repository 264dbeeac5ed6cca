"""Hostile conditions for the tile index, through the CLI: damaged index and ANN files, resume state
of another job, concurrent, stopped and killed writers, a disk that fills up or turns read-only
mid-run, failures before the first tile, and index output names.

Every case checks the exit code, the one `rsmclip-geo: error:` line and what is left next to the
output (warnings of in-process runs go to pytest's log capture, `caplog`). Concurrency runs real
child processes; the full and read-only disks are a real tmpfs mounted for the test (root only;
skipped with the reason otherwise).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cli_cases import CliResult, assert_fails_cleanly, leftovers, run_cli, run_cli_process, start_cli_process
from rasters import write_geotiff

from rsmclip_geo import indexer
from rsmclip_geo import ray_engine
from rsmclip_geo.cli import main
from rsmclip_geo.indexer import index_scenes
from rsmclip_geo.tile_index import TileIndex
from rsmclip_geo.pipeline import Cancelled
from rsmclip_geo.tiling import TilingParams

SCENE_A = "colorado_rgb_15cm.tif"  # 24 tiles of 64 px
SCENE_B = "pix4d_farm_rgba_35cm.tif"  # about 1,700 tiles of 64 px at 75 % overlap
DENSE = ("--tile-size", "64", "--overlap", "0.75")
SUMMARY = re.compile(r"^wrote (.+): (\d+) scenes?, (\d+) tiles kept, (\d+) skipped, [\d.]+ s$")


@pytest.fixture(scope="module")
def geotiff(shared_data):
    return shared_data / "geotiff"


def index_args(bundle, output, *scenes, tiling=("--tile-size", "64")) -> list:
    return ["index", *scenes, "-o", output, "--model", bundle, *tiling]


@pytest.fixture(scope="module")
def dense_index(geotiff, tiny_bundle, tmp_path_factory) -> Path:
    """A one-file index of about 1,700 real tiles: data pages, not the footer, fill the middle of the file."""
    output = tmp_path_factory.mktemp("dense") / "dense.parquet"
    assert main(["-q", *index_args(tiny_bundle, output, geotiff / SCENE_B, tiling=DENSE)]) == 0
    return output


def flipped_copy(source: Path, target: Path, middle: int, count: int = 400) -> Path:
    """A copy of `source` with `count` bytes around offset `middle` inverted."""
    data = bytearray(source.read_bytes())
    for i in range(middle - count // 2, middle + count // 2):
        data[i] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def embedding_chunk(path: Path):
    """Metadata of the embedding column chunk of a one-row-group Parquet file."""
    group = pq.ParquetFile(path).metadata.row_group(0)
    return next(group.column(i) for i in range(group.num_columns)
                if group.column(i).path_in_schema.startswith("embedding"))


def footer_start(path: Path) -> int:
    raw = path.read_bytes()
    return len(raw) - 8 - int.from_bytes(raw[-8:-4], "little")


# --- damaged index files -------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["middle of the file", "embedding column"])
def test_flipped_bytes_are_refused_by_search_and_verify(where, dense_index, tiny_bundle, tmp_path, capsys):
    if where == "middle of the file":
        middle = dense_index.stat().st_size // 2
        assert middle + 200 < footer_start(dense_index)  # in the data pages
    else:
        chunk = embedding_chunk(dense_index)
        start = chunk.dictionary_page_offset or chunk.data_page_offset
        middle = start + chunk.total_compressed_size // 2
    damaged = flipped_copy(dense_index, tmp_path / "damaged.parquet", middle)
    hits = tmp_path / "hits.geojson"
    for command in (["search", damaged, "forest", "--model", tiny_bundle, "-o", hits],
                    ["similar", damaged, "--image", tmp_path / "none.png", "-o", hits],
                    ["index", "--verify", damaged]):
        assert_fails_cleanly(run_cli(capsys, *command), f"{damaged}: tile index is damaged", "rebuild it")
    assert not hits.exists()
    ok = run_cli(capsys, "index", "--verify", dense_index)
    assert ok.code == 0 and len(ok.out.strip().splitlines()) == 1
    assert ok.out.startswith(f"{dense_index}: OK: ") and "every page checksum, embedding and footprint" in ok.out


def test_damaged_embeddings_of_an_index_without_page_checksums(dense_index, tiny_bundle, tmp_path, capsys):
    """An index written before page checksums: damaged embedding values decode, and the scores catch them
    (a score of -67.6 and `"score": NaN` in GeoJSON before)."""
    old = tmp_path / "old.parquet"
    pq.write_table(pq.read_table(dense_index), old, compression="none", use_dictionary=False)
    chunk = embedding_chunk(old)
    damaged = flipped_copy(old, tmp_path / "damaged.parquet", chunk.data_page_offset + chunk.total_compressed_size // 2)
    tile = pq.read_table(old, columns=["tile_id"]).column(0)[0].as_py()
    hits = tmp_path / "hits.geojson"
    for command in (["search", damaged, "forest", "--model", tiny_bundle, "-o", hits],
                    ["search", damaged, "forest", "--model", tiny_bundle, "--heatmap", tmp_path / "heat.tif"],
                    ["similar", damaged, "--tile", tile, "-o", hits]):
        assert_fails_cleanly(run_cli(capsys, *command), f"{damaged}: tile index is damaged",
                             "embedding that is not a finite unit vector", f"verifying {damaged} checks every file")
    assert_fails_cleanly(run_cli(capsys, "index", "--verify", damaged), "embeddings that are not finite unit vectors")
    assert not hits.exists() and not (tmp_path / "heat.tif").exists()


@pytest.fixture(scope="module")
def dense_ann(dense_index, tmp_path_factory) -> Path:
    """A copy of the dense index with its ANN index built by `ann-index`."""
    pytest.importorskip("faiss")
    copy = shutil.copy(dense_index, tmp_path_factory.mktemp("ann") / "dense.parquet")
    assert main(["-q", "ann-index", str(copy)]) == 0
    return Path(copy)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


ANN_DAMAGE = {
    "truncated windows.npy": (lambda ann: _truncate(ann / "windows.npy"), ("windows.npy", "truncated or changed")),
    "missing rings.npy": (lambda ann: (ann / "rings.npy").unlink(), ("rings.npy", "cannot be read")),
    "bad ann.json": (lambda ann: (ann / "ann.json").write_text('{"format_version": 2, "kind": '),
                     ("ann.json", "not a JSON object")),
    "ann.json without files": (lambda ann: (ann / "ann.json").write_text(json.dumps(
        {k: v for k, v in json.loads((ann / "ann.json").read_text()).items() if k != "files"})),
        ("ann.json: ANN sidecar is incomplete",)),
    "flipped bytes in vectors.faiss": (lambda ann: flipped_copy(ann / "vectors.faiss", ann / "vectors.faiss",
                                                                (ann / "vectors.faiss").stat().st_size // 2),
                                       ("vectors.faiss", "sha256 differs")),
}


@pytest.mark.parametrize("case", list(ANN_DAMAGE))
def test_damaged_ann_index_is_reported_by_verify(case, dense_ann, tmp_path, capsys):
    index = Path(shutil.copy(dense_ann, tmp_path / "dense.parquet"))
    ann = shutil.copytree(dense_ann.with_name("dense.parquet.ann"), tmp_path / "dense.parquet.ann")
    ok = run_cli(capsys, "index", "--verify", index)
    assert ok.code == 0 and "; ANN index dense.parquet.ann: OK (hnsw, " in ok.out
    damage, fragments = ANN_DAMAGE[case]
    damage(ann)
    assert_fails_cleanly(run_cli(capsys, "index", "--verify", index), *fragments,
                         f"rebuild the ANN index of {index} or search exactly")


def test_ann_index_refuses_zero_threads(dense_index, tmp_path, capsys):
    pytest.importorskip("faiss")
    index = Path(shutil.copy(dense_index, tmp_path / "dense.parquet"))
    assert_fails_cleanly(run_cli(capsys, "ann-index", index, "--threads", "0"), "--threads 0: give a positive number")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.parquet"]


def test_ann_index_is_refused_while_another_run_writes_it(dense_index, tmp_path, capsys):
    pytest.importorskip("faiss")
    index = Path(shutil.copy(dense_index, tmp_path / "dense.parquet"))
    holder = subprocess.Popen(["sleep", "120"])
    try:
        write_lock(tmp_path / "dense.parquet.ann", holder.pid, socket.gethostname())
        result = run_cli(capsys, "ann-index", index)
    finally:
        holder.kill()
        holder.wait()
    assert_fails_cleanly(result, "dense.parquet.ann: another run is writing it", f"pid {holder.pid}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.parquet", "dense.parquet.ann.lock"]


def test_search_refuses_zero_threads(dense_index, tiny_bundle, capsys, monkeypatch):
    assert_fails_cleanly(run_cli(capsys, "search", dense_index, "forest", "--model", tiny_bundle, "--threads", "0"),
                         "--threads 0: give a positive number")
    monkeypatch.setenv("RSMCLIP_GEO_MODELS", str(tiny_bundle.parent))  # the index's model found by name
    assert_fails_cleanly(run_cli(capsys, "search", dense_index, "forest", "--threads", "0"),
                         "--threads 0: give a positive number")


# --- resume state ----------------------------------------------------------------------------------

def interrupted(scenes, output: Path, bundle, polls: int = 3) -> Path:
    """Start indexing `scenes` into `output` and cancel it after a few batches; the resume directory."""
    seen = []
    with pytest.raises(Cancelled):
        index_scenes(scenes, output, model=str(bundle), tiling=TilingParams(tile_size=64), batch_size=8,
                     cancel=lambda: seen.append(1) or len(seen) > polls)
    partial = output.with_name(output.name + ".partial")
    assert list(partial.glob("shard-*.parquet"))
    return partial


def test_resume_state_of_another_job_is_dropped_with_a_warning(geotiff, tiny_bundle, tmp_path, capsys, caplog):
    """Indexing scene B into the output of an interrupted scene-A job (a KeyError on every run before)."""
    output = tmp_path / "city.parquet"
    interrupted([geotiff / SCENE_B], output, tiny_bundle)
    result = run_cli(capsys, *index_args(tiny_bundle, output, geotiff / SCENE_A))
    assert result.code == 0, result.err
    assert "unfinished index of another job (other scenes); starting over" in caplog.text
    assert {Path(p).name for p in TileIndex.open(output).column("scene")} == {SCENE_A}
    assert leftovers(tmp_path, "city.parquet") == ["city.parquet"]
    caplog.clear()
    assert run_cli(capsys, *index_args(tiny_bundle, output, geotiff / SCENE_A)).code == 0
    assert "unfinished" not in caplog.text


def test_resume_state_with_another_nodata_is_dropped(geotiff, tiny_bundle, tmp_path, capsys, caplog):
    """An interrupted run with the file's nodata, resumed with --nodata 0: other pixels are valid, so start over."""
    output = tmp_path / "city.parquet"
    interrupted([geotiff / SCENE_A], output, tiny_bundle)
    result = run_cli(capsys, *index_args(tiny_bundle, output, geotiff / SCENE_A), "--nodata", "0")
    assert result.code == 0, result.err
    assert "unfinished index of another job (other scenes); starting over" in caplog.text
    assert TileIndex.open(output).scenes[next(iter(TileIndex.open(output).scenes))]["nodata"] == 0


def test_unreadable_resume_state_starts_over(geotiff, tiny_bundle, tmp_path, capsys, caplog):
    output = tmp_path / "city.parquet"
    partial = tmp_path / "city.parquet.partial"
    partial.mkdir()
    (partial / "manifest.json").write_text("{ half a manifest")
    (partial / "shard-00000.parquet").write_bytes(b"PAR1 not a shard")
    result = run_cli(capsys, *index_args(tiny_bundle, output, geotiff / SCENE_A))
    assert result.code == 0 and "unfinished index of another job (unreadable); starting over" in caplog.text
    assert leftovers(tmp_path, "city.parquet") == ["city.parquet"]


def test_damaged_resume_shard_is_embedded_again(geotiff, tiny_bundle, tmp_path, capsys, caplog):
    output = tmp_path / "city.parquet"
    partial = interrupted([geotiff / SCENE_A], output, tiny_bundle, polls=1)
    shard = sorted(partial.glob("shard-*.parquet"))[0]
    flipped_copy(shard, shard, footer_start(shard) // 2, count=64)
    result = run_cli(capsys, *index_args(tiny_bundle, output, geotiff / SCENE_A))
    assert result.code == 0 and f"{shard}: unreadable" in caplog.text and "embedded again" in caplog.text
    reference = tmp_path / "reference.parquet"
    assert run_cli(capsys, *index_args(tiny_bundle, reference, geotiff / SCENE_A)).code == 0
    assert TileIndex.open(output).column("tile_id").tolist() == TileIndex.open(reference).column("tile_id").tolist()


# --- concurrent, stopped and killed writers -------------------------------------------------------

def wait_for_lock(lock: Path, proc: subprocess.Popen, timeout: float = 300) -> dict:
    """The owner written in `lock` once the child process `proc` has taken it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the index run ended before it was seen holding its lock:\n{proc.communicate()}")
        try:
            return json.loads(lock.read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(0.005)
    pytest.fail(f"no lock {lock} after {timeout} s")


def write_lock(output: Path, pid: int, host: str) -> Path:
    lock = output.with_name(output.name + ".lock")
    lock.write_text(json.dumps({"pid": pid, "host": host, "started": "2025-05-01T10:00:00+00:00",
                                "command": f"rsmclip-geo index a.tif -o {output.name}"}))
    return lock


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_second_writer_is_refused_while_the_first_runs(geotiff, tiny_bundle, tmp_path):
    output = tmp_path / "city.parquet"
    args = index_args(tiny_bundle, output, geotiff / SCENE_A, geotiff / SCENE_B, tiling=DENSE)
    first = start_cli_process(*args, "--threads", "1")
    try:
        owner = wait_for_lock(tmp_path / "city.parquet.lock", first)
        os.kill(first.pid, signal.SIGSTOP)  # held mid-way
        second = run_cli_process(*args)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    host = socket.gethostname()
    assert owner["pid"] == first.pid and owner["host"] == host and "index" in owner["command"]
    assert_fails_cleanly(second, f"{output}: another run is writing it", f"pid {first.pid} on {host}")
    assert first.returncode == 0, err
    assert SUMMARY.match(out.strip().splitlines()[-1]), out
    assert leftovers(tmp_path, "city.parquet") == ["city.parquet"]
    assert len(TileIndex.open(output)) == int(SUMMARY.match(out.strip().splitlines()[-1])[3])


def test_killed_run_leaves_a_stale_lock_that_the_next_run_takes_over(geotiff, tiny_bundle, tmp_path):
    output = tmp_path / "city.parquet"
    args = index_args(tiny_bundle, output, geotiff / SCENE_A, geotiff / SCENE_B, tiling=DENSE)
    first = start_cli_process(*args, "--threads", "1")
    wait_for_lock(tmp_path / "city.parquet.lock", first)
    first.kill()
    first.communicate(timeout=60)
    assert (tmp_path / "city.parquet.lock").exists()
    result = run_cli_process(*args)
    assert result.code == 0, result.err
    assert f"taking over the lock of pid {first.pid}, which is no longer running" in result.err
    assert leftovers(tmp_path, "city.parquet") == ["city.parquet"]


def test_lock_of_a_dead_process_is_taken_over(geotiff, tiny_bundle, tmp_path, capsys, caplog):
    output = tmp_path / "city.parquet"
    pid = dead_pid()
    write_lock(output, pid, socket.gethostname())
    result = run_cli(capsys, *index_args(tiny_bundle, output, geotiff / SCENE_A))
    assert result.code == 0 and f"taking over the lock of pid {pid}" in caplog.text
    assert leftovers(tmp_path, "city.parquet") == ["city.parquet"]


def test_lock_from_another_host_is_reported_not_broken(geotiff, tiny_bundle, tmp_path, capsys):
    output = tmp_path / "city.parquet"
    lock = write_lock(output, dead_pid(), "gis-node-7.example")
    before = lock.read_text()
    result = run_cli(capsys, *index_args(tiny_bundle, output, geotiff / SCENE_A))
    assert_fails_cleanly(result, f"{output}: locked by another host", "on gis-node-7.example",
                         "cannot tell whether that run is still going", f"delete {lock}")
    assert lock.read_text() == before and leftovers(tmp_path, "city.parquet") == ["city.parquet.lock"]


def test_lock_that_names_no_run_is_reported(geotiff, tiny_bundle, tmp_path, capsys):
    output = tmp_path / "city.parquet"
    output.with_name("city.parquet.lock").write_text("")
    result = run_cli(capsys, *index_args(tiny_bundle, output, geotiff / SCENE_A))
    assert_fails_cleanly(result, "city.parquet.lock holds no run", "delete it")
    assert leftovers(tmp_path, "city.parquet") == ["city.parquet.lock"]


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_live_lock_refuses_both_engines(engine, geotiff, tiny_bundle, tmp_path, capsys, monkeypatch):
    if engine == "ray":
        pytest.importorskip("ray", reason="Ray is not installed: pip install 'rsmclip-geo[ray]'")

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started although another run holds the output")

    monkeypatch.setattr(ray_engine, "connect_ray", refuse)
    output = tmp_path / "city"
    holder = subprocess.Popen(["sleep", "120"])
    try:
        write_lock(output, holder.pid, socket.gethostname())
        result = run_cli(capsys, *index_args(tiny_bundle, output, geotiff / SCENE_A), "--engine", engine)
    finally:
        holder.kill()
        holder.wait()
    assert_fails_cleanly(result, f"{output}: another run is writing it", f"pid {holder.pid}")
    assert leftovers(tmp_path, "city") == ["city.lock"]


# --- a disk that fills up or turns read-only mid-run ----------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs mounted for the test: (its directory, remount(options))."""
    if os.geteuid() != 0:
        pytest.skip("a full or read-only disk is a tmpfs mounted for the test, which needs root")
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "rsmclip-test", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")

    def remount(options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True, capture_output=True)

    yield mount, remount
    if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
        subprocess.run(["umount", "--lazy", str(mount)], capture_output=True)  # still busy: detach it


def used_bytes(directory: Path) -> int:
    stats = os.statvfs(directory)
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


def test_disk_full_mid_run_keeps_the_previous_index_and_resumes(small_fs, geotiff, tiny_bundle, tmp_path, capsys,
                                                                caplog, monkeypatch):
    mount, remount = small_fs
    output = mount / "city.parquet"
    assert run_cli(capsys, *index_args(tiny_bundle, output, geotiff / SCENE_A)).code == 0
    previous = output.read_bytes()
    monkeypatch.setattr(indexer, "RESUME_SHARD_TILES", 128)
    remount(f"size={used_bytes(mount) + 160 * 1024}")  # room for a few resume shards, not for the index
    args = index_args(tiny_bundle, output, geotiff / SCENE_A, geotiff / SCENE_B, tiling=DENSE)
    line = assert_fails_cleanly(run_cli(capsys, *args), "cannot be written (No space left on device)",
                                "rerun to resume")
    assert str(mount) in line and output.read_bytes() == previous
    partial = mount / "city.parquet.partial"
    assert list(partial.glob("shard-*.parquet"))
    assert leftovers(mount, "city.parquet") == ["city.parquet", "city.parquet.partial"]
    remount("size=64m")
    result = run_cli(capsys, "-v", *args)
    assert result.code == 0, result.err
    assert re.search(r"resuming: [1-9]\d* tiles already embedded", caplog.text)
    reference = tmp_path / "reference.parquet"
    assert run_cli(capsys, *index_args(tiny_bundle, reference, geotiff / SCENE_A, geotiff / SCENE_B,
                                       tiling=DENSE)).code == 0
    assert TileIndex.open(output).column("tile_id").tolist() == TileIndex.open(reference).column("tile_id").tolist()
    assert leftovers(mount, "city.parquet") == ["city.parquet"]


def test_folder_turning_read_only_mid_run(small_fs, geotiff, tiny_bundle):
    mount, remount = small_fs
    output = mount / "city.parquet"
    assert run_cli_process(*index_args(tiny_bundle, output, geotiff / SCENE_A)).code == 0
    previous = output.read_bytes()
    args = index_args(tiny_bundle, output, geotiff / SCENE_A, geotiff / SCENE_B, tiling=DENSE)
    run = start_cli_process(*args, "--threads", "1")
    try:
        wait_for_lock(mount / "city.parquet.lock", run)
        time.sleep(0.2)  # the lock file is closed
        os.kill(run.pid, signal.SIGSTOP)
        remount("ro")
    finally:
        os.kill(run.pid, signal.SIGCONT)
    out, err = run.communicate(timeout=300)
    assert_fails_cleanly(CliResult(run.returncode, out, err), f"{mount}/city.parquet",
                         "cannot be written (Read-only file system)", "rerun to resume")
    assert output.read_bytes() == previous
    remount("rw")
    result = run_cli_process(*args)  # takes over the lock the read-only folder kept
    assert result.code == 0, result.err
    assert leftovers(mount, "city.parquet") == ["city.parquet"]


# --- failures before the first tile ----------------------------------------------------------------

@pytest.mark.parametrize("case, fragments", [
    ("constant scene", ("no tile kept in any scene",)),
    ("--threads 0", ("--threads 0: give a positive number of threads",)),
    ("--threads -2", ("--threads -2: give a positive number of threads",)),
    ("corrupt image.onnx", ("image.onnx: cannot be loaded by ONNX Runtime",)),
    ("wrong embedding size", ("image.onnx", "embed_dim is 64")),
])
def test_failure_before_the_first_tile_leaves_nothing(case, fragments, geotiff, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    bundle, scene, extra = tiny_bundle, geotiff / SCENE_A, []
    if case == "constant scene":
        scene = write_geotiff(tmp_path / "flat.tif", np.full((3, 128, 128), 77, np.uint8))
    elif case.startswith("--threads"):
        extra = case.split()
    else:
        bundle = shutil.copytree(tiny_bundle, tmp_path / "bad-bundle")
        if case == "corrupt image.onnx":
            (bundle / "image.onnx").write_bytes(b"not an ONNX graph\n" * 64)
        else:
            info = json.loads((bundle / "bundle.json").read_text())
            info["embed_dim"] = 64
            (bundle / "bundle.json").write_text(json.dumps(info))
    output = out / "city.parquet"
    assert_fails_cleanly(run_cli(capsys, *index_args(bundle, output, scene), *extra), *fragments)
    assert leftovers(out, "city.parquet") == []
    # nothing blocks the next run
    assert run_cli(capsys, *index_args(tiny_bundle, output, geotiff / SCENE_A)).code == 0


# --- output names, usage, summary -------------------------------------------------------------------

def test_upper_case_parquet_is_a_file_and_the_summary_line(geotiff, tiny_bundle, tmp_path, capsys):
    output = tmp_path / "IDX.PARQUET"
    result = run_cli(capsys, *index_args(tiny_bundle, output, geotiff / SCENE_A, geotiff / SCENE_B))
    assert result.code == 0 and output.is_file()
    summary = SUMMARY.match(result.out.strip())
    assert summary and summary[1] == str(output) and summary[2] == "2"
    kept, skipped = int(summary[3]), int(summary[4])
    assert kept == len(TileIndex.open(output)) and skipped > 0  # the drone scene has nodata margins
    assert run_cli(capsys, "search", output, "forest", "--model", tiny_bundle).code == 0


@pytest.mark.parametrize("name, engine", [("index.gpkg", "local"), ("tiles.v2", "local"), ("hits.GeoJSON", "local"),
                                          ("IDX.PARQUET", "ray")])
def test_index_output_names_that_are_refused(name, engine, geotiff, tiny_bundle, tmp_path, capsys):
    if engine == "ray":
        pytest.importorskip("ray", reason="Ray is not installed: pip install 'rsmclip-geo[ray]'")
    output = tmp_path / name
    result = run_cli(capsys, *index_args(tiny_bundle, output, geotiff / SCENE_A), "--engine", engine)
    if engine == "ray":
        assert_fails_cleanly(result, f"-o {output}: the ray engine writes a directory")
    else:
        assert_fails_cleanly(result, f"-o {output}: a tile index is a .parquet file or a directory",
                             "give a .parquet name or a directory name without an extension")
    assert leftovers(tmp_path, name) == []


@pytest.mark.parametrize("args, fragment", [
    (["index", "-o", "city.parquet"], "give one or more scenes and -o OUTPUT"),
    (["index", "scene.tif"], "give one or more scenes and -o OUTPUT"),
    (["index", "--verify", "city.parquet", "scene.tif"], "--verify INDEX checks an existing index"),
    (["index", "--verify", "missing.parquet"], "missing.parquet: no such tile index"),
])
def test_index_usage_errors(args, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_fails_cleanly(run_cli(capsys, *args), fragment)
    assert not list(tmp_path.iterdir())
