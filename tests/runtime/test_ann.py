"""ANN index: recall against exact search, same hits through `search`, stale detection, the size
threshold, the CLI, damaged files, and the query-embedding cache."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from rsmclip_geo.api import SearchParams, search
from rsmclip_geo.ann import AnnIndex, ann_path, build_ann, choose_kind, verify_ann
from rsmclip_geo.cli import main
from rsmclip_geo.errors import TileIndexError
from rsmclip_geo.indexer import index_scenes
from rsmclip_geo.tile_index import IndexHeader, TileIndex
from rsmclip_geo.caches import QueryCache
from rsmclip_geo.queries import query_vectors
from rsmclip_geo.search import search_index
from rsmclip_geo.tiling import TilingParams

pytest.importorskip("faiss")

QUERIES = ["airport", "aeroporto", "campo de golf", "储油罐", "forest", "Fluss", "пляж", "farmland"]


@pytest.fixture(scope="module")
def shard_index(shared_data, model, tmp_path_factory):
    """A shard-directory index of a few thousand real tiles (two real GeoTIFFs, dense overlap, two scales)."""
    scenes = [shared_data / "geotiff" / n for n in ("pix4d_farm_rgba_35cm.tif", "colorado_rgb_15cm.tif")]
    output = tmp_path_factory.mktemp("ann") / "tiles"
    params = TilingParams(tile_size=64, overlap=0.75, scales=(1, 2))
    return index_scenes(scenes, output, model=model, tiling=params, batch_size=64, threads=2)


@pytest.fixture(scope="module")
def exact(shard_index):
    return TileIndex.open(shard_index)


def exact_top(embeddings: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    scores = vectors @ embeddings.astype(np.float32).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_recall_at_10_against_exact(kind, shard_index, exact, model):
    assert len(exact) > 2000
    build_ann(shard_index, kind=kind)
    ann = AnnIndex.open(IndexHeader.read(shard_index))
    assert ann.kind == kind
    embeddings = exact.embeddings()
    rng = np.random.default_rng(0)
    tile_queries = embeddings[rng.choice(len(embeddings), 40, replace=False)].astype(np.float32)
    vectors = np.concatenate([model.encode_texts(QUERIES), tile_queries])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    truth = exact_top(embeddings, vectors, 10)
    _, found = ann.search(vectors, 10)
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)])
    assert recall >= 0.95, recall


@pytest.mark.parametrize("subset_rows", [0, 65536], ids=["aoi-filtered-graph", "aoi-exact-subset"])
def test_search_gives_the_exact_hits(subset_rows, shard_index, model, monkeypatch):
    """Candidates, thresholds, AOI and NMS on the ANN path give the exact path's hits.

    The graph is searched with a beam as wide as the index, so it misses no neighbour: recall is
    measured above, and here a difference can only come from the ANN search path itself.
    """
    monkeypatch.setattr("rsmclip_geo.ann.EXACT_SUBSET_ROWS", subset_rows)
    build_ann(shard_index, kind="hnsw", params={"ef_search": len(IndexHeader.read(shard_index))})
    for options in ({"threshold": -1.0, "nms_overlap": 1.0}, {"nms_overlap": 0.3},
                    {"aoi": exact_aoi(shard_index), "nms_overlap": 0.5}):
        fast = search_index(shard_index, QUERIES[:4], model=model, ann_min_rows=0,
                            params=SearchParams(top_k=10, **options))[0]
        slow = search(shard_index, QUERIES[:4], model=model, params=SearchParams(top_k=10, exact=True, **options)).hits
        assert len(fast) == len(slow) == 40
        assert [h.tile_id for h in fast] == [h.tile_id for h in slow]
        np.testing.assert_allclose([h.score for h in fast], [h.score for h in slow], atol=1e-5)
        assert [h.geometry.equals(g.geometry) for h, g in zip(fast, slow)] == [True] * 40


def exact_aoi(shard_index) -> tuple[float, float, float, float]:
    """The western half of the first scene's tiles, as a lon/lat bbox."""
    index = TileIndex.open(shard_index)
    first = index.column("scene_fingerprint") == index.column("scene_fingerprint")[0]
    minx, miny, maxx, maxy = np.array([g.bounds for g in index.geometries(np.flatnonzero(first))]).T
    return float(minx.min()), float(miny.min()), float((minx.min() + maxx.max()) / 2), float(maxy.max())


def test_size_threshold_switches_exact_and_ann(shard_index, model, caplog):
    build_ann(shard_index, kind="hnsw")
    rows = len(IndexHeader.read(shard_index))
    with caplog.at_level(logging.INFO, logger="rsmclip_geo"):
        search_index(shard_index, "forest", model=model, ann_min_rows=rows - 1)[0]
        assert "with its hnsw ANN index" in caplog.text
        caplog.clear()
        search_index(shard_index, "forest", model=model, ann_min_rows=rows)[0]
        assert "exact search over" in caplog.text
        caplog.clear()
        search_index(shard_index, "forest", model=model, ann_min_rows=0, params=SearchParams(exact=True))[0]
        assert "exact search over" in caplog.text


def test_missing_ann_index_falls_back_to_exact_with_a_warning(shard_index, model, tmp_path, caplog):
    copy = tmp_path / "copy"
    shutil.copytree(shard_index, copy)
    with caplog.at_level(logging.INFO, logger="rsmclip_geo"):
        hits = search_index(copy, "forest", model=model, ann_min_rows=0, params=SearchParams(top_k=3))[0]
    assert len(hits) == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no ANN index" in warnings[0].getMessage()
    assert "build its ANN index to search faster" in warnings[0].getMessage()


def test_stale_ann_index_is_refused_then_rebuilt(shard_index, model, tmp_path):
    copy = tmp_path / "grown"
    shutil.copytree(shard_index, copy)
    build_ann(copy)
    sidecar = json.loads((ann_path(copy) / "ann.json").read_text())
    assert sidecar["rows"] == len(IndexHeader.read(copy)) and sidecar["kind"] == choose_kind(sidecar["rows"])
    assert sidecar["bundle"]["fingerprint"] == model.bundle.fingerprint
    shutil.copy(copy / "part-00000.parquet", copy / "part-00099.parquet")  # the index grew
    with pytest.raises(TileIndexError, match=r"stale.*rebuild the ANN index of .*grown or search exactly"):
        search_index(copy, "forest", model=model, ann_min_rows=0)[0]
    hits = search_index(copy, "forest", model=model, ann_min_rows=0, params=SearchParams(exact=True, top_k=2))[0]
    assert len(hits) == 2
    build_ann(copy)
    assert len(AnnIndex.open(IndexHeader.read(copy))) == json.loads((ann_path(copy) / "ann.json").read_text())["rows"]
    assert not [p for p in copy.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_read_rows_matches_the_loaded_index(shard_index, exact):
    header = IndexHeader.read(shard_index)
    assert len(header.files) > 1
    rows = np.array([len(exact) - 1, 0, len(exact) // 2, 7, 2049, 2048])
    columns = ["tile_id", "win_col", "geometry"]
    assert header.read_rows(rows, columns).to_pylist() == exact.table.select(columns).take(rows).to_pylist()


def test_cli_ann_index_and_exact_search(shard_index, tiny_bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RSMCLIP_GEO_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "cli"
    shutil.copytree(shard_index, copy)
    assert main(["-q", "ann-index", str(copy), "--kind", "ivf"]) == 0
    assert str(ann_path(copy)) in capsys.readouterr().out
    assert json.loads((ann_path(copy) / "ann.json").read_text())["kind"] == "ivf"
    assert main(["-q", "search", str(copy), "golf", "--exact", "--model", str(tiny_bundle), "--top-k", "2"]) == 0
    assert (tmp_path / "cache" / "query-embeddings.sqlite").is_file()
    assert main(["ann-index", str(tmp_path / "none")]) == 2
    assert "rsmclip-geo: error: " in capsys.readouterr().err


def test_query_cache_skips_the_text_tower(model, tmp_path):
    cache = QueryCache(tmp_path / "q.sqlite")
    calls = []
    encode = model.encode_texts

    def counting(texts):
        calls.append(list(texts))
        return encode(texts)

    model.encode_texts = counting
    try:
        first = query_vectors(model, ["aeroporto", "forest"], cache=cache)
        again = query_vectors(model, ["forest", "aeroporto", "praia"], cache=QueryCache(tmp_path / "q.sqlite"))
        templated = query_vectors(model, ["forest"], lang="en", cache=cache)
    finally:
        del model.encode_texts
    assert calls[0] == ["aeroporto", "forest"] and calls[1] == ["praia"]
    assert calls[2] == ["forest"]  # another prompt language is another cache entry (no templates: as typed)
    np.testing.assert_array_equal(again[0], first[1])
    np.testing.assert_array_equal(again[1], first[0])
    np.testing.assert_allclose(again[2], encode(["praia"])[0], atol=1e-6)
    np.testing.assert_allclose(templated[0], first[1], atol=1e-6)


@pytest.fixture
def ann_copy(shard_index, tmp_path):
    """A copy of the shard index with a fresh HNSW index whose beam covers every row."""
    copy = shutil.copytree(shard_index, tmp_path / "tiles")
    build_ann(copy, kind="hnsw", params={"ef_search": len(IndexHeader.read(copy))})
    return copy


def flip(path, middle: int, count: int = 400) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(middle - count // 2, middle + count // 2):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_damaged_vectors_give_an_error_not_scores(ann_copy, exact):
    header = IndexHeader.read(ann_copy)
    vectors = ann_path(ann_copy) / "vectors.faiss"
    stored = len(header) * header.metadata["embed_dim"] * 4  # flat float32 vectors, last in an HNSW file
    flip(vectors, vectors.stat().st_size - stored // 2)
    sidecar = json.loads((ann_path(ann_copy) / "ann.json").read_text())
    assert sidecar["files"]["vectors.faiss"]["size"] == vectors.stat().st_size  # same size: open cannot tell
    ann = AnnIndex.open(header)
    v = exact.embeddings()[0].astype(np.float32)
    v /= np.linalg.norm(v)
    with pytest.raises(TileIndexError, match=r"vectors\.faiss: ANN index is damaged \(its vectors gave scores that "
                                             r"are not finite cosines\); rebuild the ANN index of .* or search "
                                             r"exactly"):
        ann.search(np.stack([v, -v]), 10)


@pytest.mark.parametrize("case, message", [
    ("graph", r"ANN index cannot be read \(.*HNSW neighbors.*out of range"),
    ("truncated", r"scenes\.npy: ANN index file has \d+ bytes, \d+ when it was built \(truncated or changed\)"),
    ("format", r"ANN format 1 is not 2"),
    ("not an object", r"ann\.json: ANN sidecar is not a JSON object"),
])
def test_damaged_ann_index_is_refused_by_search(case, message, ann_copy, model):
    ann = ann_path(ann_copy)
    if case == "graph":  # the middle of an HNSW file is its neighbour lists
        flip(ann / "vectors.faiss", (ann / "vectors.faiss").stat().st_size // 2)
    elif case == "truncated":
        (ann / "scenes.npy").write_bytes((ann / "scenes.npy").read_bytes()[:-64])
    elif case == "format":
        sidecar = json.loads((ann / "ann.json").read_text())
        (ann / "ann.json").write_text(json.dumps({**sidecar, "format_version": 1}))
    else:
        (ann / "ann.json").write_text("[]")
    with pytest.raises(TileIndexError, match=message):
        search_index(ann_copy, "forest", model=model, ann_min_rows=0)[0]
    assert len(search_index(ann_copy, "forest", model=model, ann_min_rows=0, params=SearchParams(exact=True, top_k=3))[0]) == 3


def test_verify_ann_checks_every_file(ann_copy):
    assert verify_ann(ann_copy).startswith("ANN index tiles.ann: OK (hnsw, ")
    rings = ann_path(ann_copy) / "rings.npy"
    flip(rings, rings.stat().st_size // 2, count=16)  # same size, other footprints
    with pytest.raises(TileIndexError, match=r"rings\.npy: ANN index file is damaged \(its sha256 differs"):
        verify_ann(ann_copy)
