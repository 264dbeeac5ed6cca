"""`rsmclip-geo index | tile-search | search | similar` end to end, and every bad input of the issue."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rasters import truncated_copy, write_geotiff

from rsmclip_geo.cli import main


@pytest.fixture(scope="module")
def geotiff(shared_data):
    return shared_data / "geotiff"


@pytest.fixture
def run(capsys):
    """Run the CLI in-process: (exit code, stdout, stderr)."""

    def invoke(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


@pytest.fixture(scope="module")
def city_index(geotiff, tiny_bundle, tmp_path_factory):
    output = tmp_path_factory.mktemp("cli") / "city.parquet"
    code = main(["-q", "index", str(geotiff / "colorado_rgb_15cm.tif"), str(geotiff / "pix4d_farm_rgba_35cm.tif"),
                 "-o", str(output), "--model", str(tiny_bundle), "--tile-size", "64", "--scales", "1,2"])
    assert code == 0
    return output


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("rsmclip-geo: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_index_then_search_with_the_index_model(city_index, tiny_bundle, tmp_path, run, monkeypatch):
    monkeypatch.setenv("RSMCLIP_GEO_MODELS", str(tiny_bundle.parent))  # found by the name in the index
    out = tmp_path / "hits.geojson"
    code, stdout, _ = run("search", city_index, "aeroporto", "机场", "--top-k", "3", "-o", out,
                          "--heatmap", tmp_path / "heat.tif", "--scene", "colorado_rgb_15cm.tif")
    assert code == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert [f["properties"]["query"] for f in data["features"]] == ["aeroporto"] * 3 + ["机场"] * 3
    assert "aeroporto" in stdout and "wrote 6 hits" in stdout
    import rasterio

    with rasterio.open(tmp_path / "heat.tif") as heat:
        assert heat.count == 2 and heat.crs.to_epsg() == 26913


def test_queries_file_and_formats(city_index, tiny_bundle, tmp_path, run):
    queries = tmp_path / "queries.txt"
    queries.write_text("# one query per line\nstorage tanks\n\nplage\n", encoding="utf-8")
    code, _, _ = run("search", city_index, "--queries-file", queries, "--model", tiny_bundle, "--top-k", "2",
                     "-o", tmp_path / "hits.gpkg", "--aoi", "-180,-90,180,90")
    assert code == 0
    import geopandas

    frame = geopandas.read_file(tmp_path / "hits.gpkg")
    assert frame["query"].tolist() == ["storage tanks", "storage tanks", "plage", "plage"]


def test_similar_by_tile(city_index, tiny_bundle, tmp_path, run):
    import pyarrow.parquet as pq

    tile = pq.read_table(city_index, columns=["tile_id"]).column(0)[5].as_py()
    code, stdout, _ = run("similar", city_index, "--tile", tile, "--top-k", "4", "-o", tmp_path / "s.parquet")
    assert code == 0 and "wrote 4 hits" in stdout
    hits = pq.read_table(tmp_path / "s.parquet")
    assert hits.num_rows == 4 and tile not in hits.column("tile_id").to_pylist()
    assert set(hits.column("query").to_pylist()) == {f"tile:{tile}"}


def test_tile_search_uses_the_cache(geotiff, tiny_bundle, tmp_path, run, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("RSMCLIP_GEO_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    args = ("tile-search", geotiff / "colorado_rgb_15cm.tif", "airport", "--model", tiny_bundle, "--tile-size", "64")
    code, stdout, _ = run(*args)
    assert code == 0 and "wrote 10 hits to colorado_rgb_15cm_hits.geojson" in stdout
    entries = list(cache.glob("*.parquet"))
    assert len(entries) == 1
    stamp = entries[0].stat().st_mtime_ns
    first = json.loads((tmp_path / "colorado_rgb_15cm_hits.geojson").read_text())
    code, _, _ = run(*args, "-o", tmp_path / "again.geojson")
    assert code == 0 and entries[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert json.loads((tmp_path / "again.geojson").read_text()) == first
    # other tiling parameters are another cache entry; --no-cache keeps nothing
    assert run(*args[:-1], "96", "-o", tmp_path / "b.geojson")[0] == 0
    assert len(list(cache.glob("*.parquet"))) == 2
    other_cache = tmp_path / "other"
    assert run(*args, "--no-cache", "--cache-dir", other_cache, "-o", tmp_path / "c.geojson")[0] == 0
    assert not other_cache.exists()


def test_version_and_quiet(run):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0


def outputs_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def bad_inputs(geotiff, tmp_path):
    """Real broken inputs made from real files."""
    notes = tmp_path / "notes.tif"
    notes.write_text("field notes, not pixels\n")
    truncated = truncated_copy(geotiff / "colorado_rgb_15cm.tif", tmp_path / "cut.tif", 0.5)
    plain = write_geotiff(tmp_path / "plain.tif", np.full((3, 64, 64), 9, np.uint8), crs=None)
    empty = write_geotiff(tmp_path / "empty.tif", np.zeros((3, 64, 64), np.uint8), nodata=0)
    return {"notes": notes, "truncated": truncated, "plain": plain, "empty": empty}


@pytest.mark.parametrize(
    "case, scene, extra, message",
    [
        ("not a raster", "notes", [], r"notes\.tif: cannot be opened as a raster"),
        ("truncated TIFF", "truncated", [], r"cut\.tif: .*truncated or corrupt"),
        ("no CRS", "plain", [], r"plain\.tif: raster has no CRS or geotransform.*pixel-space search is not supported"),
        ("no RGB mapping", "rotterdam", [],
         r"--bands: .*rotterdam_tanks_4band_1m\.tif has 4 bands .*choose its R,G,B bands"),
        ("all nodata", "empty", [], r"empty\.tif: every pixel is nodata or masked"),
        ("tile bigger than scene", "colorado", ["--tile-size", "500"], r"tile of 500 px is larger than the scene"),
        ("bad bands", "colorado", ["--bands", "3,2"], r"--bands 3,2: give 3 comma-separated integers"),
        ("bad scales", "colorado", ["--scales", "1,x"], r"--scales 1,x"),
    ],
)
def test_bad_scenes(case, scene, extra, message, bad_inputs, geotiff, tiny_bundle, tmp_path, run):
    path = bad_inputs.get(scene) or geotiff / {"rotterdam": "rotterdam_tanks_4band_1m.tif",
                                               "colorado": "colorado_rgb_15cm.tif"}[scene]
    before = outputs_in(tmp_path)
    for command in (["index", path, "-o", tmp_path / "out.parquet"],
                    ["tile-search", path, "airport", "--cache-dir", tmp_path / "cache", "-o", tmp_path / "h.geojson"]):
        code, _, err = run(*command, "--model", tiny_bundle, *extra)
        assert code == 2, case
        assert re.search(message, error_line(err)), err
        assert outputs_in(tmp_path) == before or outputs_in(tmp_path) == sorted([*before, "cache"])
        if (tmp_path / "cache").exists():
            assert not list((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("query", ["", "   "])
def test_empty_query(query, city_index, tiny_bundle, geotiff, tmp_path, run):
    for command in (["search", city_index, query], ["tile-search", geotiff / "colorado_rgb_15cm.tif", query]):
        code, _, err = run(*command, "--model", tiny_bundle, "-o", tmp_path / "h.geojson")
        assert code == 2 and "empty query" in error_line(err)
    assert not (tmp_path / "h.geojson").exists()


def test_extremely_long_query_is_truncated_with_a_warning(city_index, tiny_bundle, tmp_path, run, caplog):
    long = " ".join(["campo de golfe com bunkers e lagos"] * 300)
    code, _, _ = run("search", city_index, long, "--model", tiny_bundle, "-o", tmp_path / "h.geojson")
    assert code == 0 and "truncated" in caplog.text
    assert len(json.loads((tmp_path / "h.geojson").read_text())["features"]) == 10


def test_unwritable_output_path(city_index, tiny_bundle, geotiff, tmp_path, run):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for option, command in (
        ("-o", ["index", geotiff / "colorado_rgb_15cm.tif", "-o", blocker / "i.parquet"]),
        ("-o", ["search", city_index, "beach", "-o", blocker / "h.geojson"]),
        ("--heatmap", ["search", city_index, "beach", "--heatmap", blocker / "h.tif"]),
        ("-o", ["tile-search", geotiff / "colorado_rgb_15cm.tif", "beach", "-o", blocker / "h.geojson"]),
        ("-o", ["search", city_index, "beach", "-o", tmp_path / "h.shp"]),
    ):
        code, _, err = run(*command, "--model", tiny_bundle)
        assert code == 2
        assert error_line(err).startswith(f"rsmclip-geo: error: {option} "), err
    assert outputs_in(tmp_path) == ["file"]


def test_outputs_get_the_usual_permissions(city_index, tiny_bundle, geotiff, tmp_path, run):
    """Atomic writes go through 0600/0700 temporary files; the outputs end up 0666/0777 less the umask."""
    previous = os.umask(0o027)
    try:
        commands = [
            ["index", geotiff / "colorado_rgb_15cm.tif", "--tile-size", "64", "-o", tmp_path / "shards"],
            ["search", city_index, "beach", "-o", tmp_path / "h.geojson", "--heatmap", tmp_path / "h.tif",
             "--scene", "colorado_rgb_15cm.tif"],
            ["search", city_index, "beach", "-o", tmp_path / "h.gpkg"],
            ["search", city_index, "beach", "-o", tmp_path / "h.parquet"],
        ]
        for command in commands:
            assert run(*command, "--model", tiny_bundle)[0] == 0
    finally:
        os.umask(previous)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes.pop("shards") == 0o750
    assert set(modes.values()) == {0o640}, modes
    assert {"h.geojson", "h.tif", "h.gpkg", "h.parquet"} <= modes.keys() and any(k.startswith("shards/") for k in modes)


def test_index_from_another_model(city_index, tiny_bundle, tmp_path, run):
    other = shutil.copytree(tiny_bundle, tmp_path / "other-bundle")
    info = json.loads((other / "bundle.json").read_text())
    info["name"], info["mean"] = "other-bundle", [0.5, 0.5, 0.5]
    (other / "bundle.json").write_text(json.dumps(info))
    code, _, err = run("search", city_index, "forest", "--model", other, "-o", tmp_path / "h.geojson")
    assert code == 2
    assert "index was built with model 'tiny-bundle'" in error_line(err)
    assert not (tmp_path / "h.geojson").exists()


def test_console_script_error_line(tmp_path):
    notes = tmp_path / "notes.tif"
    notes.write_text("not a raster")
    script = Path(sys.executable).with_name("rsmclip-geo")
    result = subprocess.run([str(script), "tile-search", str(notes), "airport", "--no-cache"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"rsmclip-geo: error: {notes}: cannot be opened")
    assert outputs_in(tmp_path) == ["notes.tif"]


def test_closed_stdout_still_gets_the_hits_file_written(city_index, tiny_bundle, tmp_path):
    """`rsmclip-geo search … | head -1`: the hits file is complete, no traceback, SIGPIPE's exit status."""
    out = tmp_path / "hits.geojson"
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to stdout fails, as after `head` has exited
    try:
        result = subprocess.run([sys.executable, "-m", "rsmclip_geo", "search", str(city_index), "forest",
                                 "--model", str(tiny_bundle), "--top-k", "4", "-o", str(out)],
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 141 and "Traceback" not in result.stderr, result.stderr
    assert len(json.loads(out.read_text(encoding="utf-8"))["features"]) == 4


def test_index_and_search_run_without_torch(geotiff, tiny_bundle, tmp_path):
    """The whole runtime path (tiling, pipeline, index, search, export) in a process where torch cannot load."""
    code = f"""
import importlib.abc, sys
class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "open_clip", "torchvision"):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, BlockTorch())
from rsmclip_geo.cli import main
args = ["--model", {str(tiny_bundle)!r}]
assert main(["index", {str(geotiff / "pix4d_farm_rgba_35cm.tif")!r}, "-o", "farm.parquet", "--tile-size", "64", *args]) == 0
assert main(["search", "farm.parquet", "aeroporto", "-o", "hits.geojson", "--heatmap", "heat.tif", *args]) == 0
assert main(["tile-search", {str(geotiff / "colorado_rgb_15cm.tif")!r}, "praia", "--no-cache", "--tile-size", "64",
             "-o", "t.gpkg", *args]) == 0
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip")]
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {"farm.parquet", "hits.geojson", "heat.tif", "t.gpkg"} <= set(outputs_in(tmp_path))


def test_outputs_keep_the_scene_path_as_given(geotiff, tiny_bundle, tmp_path, run, monkeypatch):
    """A relative scene path stays relative in the index and in every hits format; tile-search shows the
    path given on this run, also when its cached index was built from another one."""
    import geopandas

    from rsmclip_geo.tile_index import TileIndex

    (tmp_path / "scenes").mkdir()
    shutil.copy(geotiff / "colorado_rgb_15cm.tif", tmp_path / "scenes" / "colorado.tif")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSMCLIP_GEO_CACHE", str(tmp_path / "cache"))
    model, tiling, top = ["--model", tiny_bundle], ["--tile-size", "64"], ["--top-k", "2"]
    assert run("index", "scenes/colorado.tif", "-o", "idx.parquet", *model, *tiling)[0] == 0
    assert [r["path"] for r in TileIndex.open("idx.parquet").scenes.values()] == ["scenes/colorado.tif"]
    for name in ("h.geojson", "h.gpkg", "h.parquet"):
        assert run("search", "idx.parquet", "beach", *model, *top, "-o", name)[0] == 0
        frame = geopandas.read_parquet(name) if name.endswith(".parquet") else geopandas.read_file(name)
        assert frame["scene"].tolist() == ["scenes/colorado.tif"] * 2, name
    assert run("tile-search", "scenes/colorado.tif", "beach", *model, *tiling, *top, "-o", "t.geojson")[0] == 0
    assert {f["properties"]["scene"] for f in json.loads(Path("t.geojson").read_text())["features"]} == \
        {"scenes/colorado.tif"}
    [entry] = (tmp_path / "cache").glob("*.parquet")
    stamp = entry.stat().st_mtime_ns
    monkeypatch.chdir(tmp_path / "scenes")
    assert run("tile-search", "colorado.tif", "beach", *model, *tiling, *top, "-o", "t.geojson")[0] == 0
    assert {f["properties"]["scene"] for f in json.loads(Path("t.geojson").read_text())["features"]} == {"colorado.tif"}
    assert list((tmp_path / "cache").glob("*.parquet")) == [entry] and entry.stat().st_mtime_ns == stamp


def test_hit_table_keeps_wide_names_readable_and_aligned(geotiff, tiny_bundle, tmp_path, run):
    scene = shutil.copy(geotiff / "colorado_rgb_15cm.tif", tmp_path / "机场场景.tif")
    queries = ["储油罐", "aeroporto", "campo de golfe com lagos e bunkers"]
    code, stdout, _ = run("tile-search", scene, *queries, "--model", tiny_bundle, "--tile-size", "64", "--top-k", "1",
                          "--no-cache", "-o", tmp_path / "h.geojson")
    assert code == 0
    header, *rows = stdout.splitlines()[:4]
    assert "储油罐" in rows[0] and "机场场景.tif" in rows[0] and "campo de golfe com lago…" in rows[2]
    from rsmclip_geo.cli.display import display_width

    scale_column = display_width(header[:header.index("scale")]) + len("scale")  # right-aligned under its title
    for row in rows:
        window = row.split()[-2]
        assert display_width(row[:row.index(window)]) == display_width(header[:header.index("window")]), row
        assert display_width(row[:row.index(window)].rstrip()) == scale_column, row


def test_fit_counts_display_columns():
    from rsmclip_geo.cli.display import display_width, fit

    assert fit("储油罐", 8) == "储油罐  " and fit("储油罐", 8, ">") == "  储油罐"
    assert fit("储油罐储油罐", 8) == "储油罐… " and display_width(fit("储油罐储油罐", 8)) == 8
    assert fit("cafe\u0301s", 5) == "cafe\u0301s" and fit("cafe\u0301 au lait", 5) == "cafe\u0301…"
    assert fit("a\nb\tc", 6) == "a\ufffdb\ufffdc "
