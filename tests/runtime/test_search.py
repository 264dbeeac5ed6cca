"""Search: cosine scores, ranking, NMS, thresholds, AOI, prompt templates, search by example."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image
from rasterio.warp import transform_geom

from rsmclip_geo.api import SearchParams, search, similar
from rsmclip_geo.encoders import load_model
from rsmclip_geo.errors import QueryError, TileIndexError
from rsmclip_geo.feedback import Labels, refine
from rsmclip_geo.files import sha256_file
from rsmclip_geo.indexer import index_scenes
from rsmclip_geo.tile_index import TileIndex
from rsmclip_geo.raster import SceneReader, open_scene
from rsmclip_geo.search import search_index, window_overlap
from rsmclip_geo.tiling import TilingParams

PARAMS = TilingParams(tile_size=64, overlap=0.5, scales=(1, 2))


@pytest.fixture(scope="module")
def index(shared_data, model, tmp_path_factory):
    scenes = [shared_data / "geotiff" / n for n in ("colorado_rgb_15cm.tif", "pix4d_farm_rgba_35cm.tif")]
    output = tmp_path_factory.mktemp("search") / "two.parquet"
    return TileIndex.open(index_scenes(scenes, output, model=model, tiling=PARAMS))


def windows_of(hits):
    return np.array([[h.win_col, h.win_row, h.win_width, h.win_height] for h in hits], dtype=float)


def test_scores_are_cosines_and_ranked(index, model):
    hits = search(index, "airport", model=model, params=SearchParams(top_k=5, nms_overlap=1.0)).hits
    vector = model.encode_texts(["airport"])[0]
    scores = index.embeddings().astype(np.float32) @ vector
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    expected = np.sort(scores)[::-1][:5]
    np.testing.assert_allclose([h.score for h in hits], expected, atol=1e-5)
    best = index.row_of(hits[0].tile_id)
    assert best == int(np.argmax(scores))


def test_nms_keeps_distinct_places(index, model):
    overlapping = search(index, "storage tanks", model=model, params=SearchParams(top_k=10, nms_overlap=1.0)).hits
    distinct = search(index, "storage tanks", model=model, params=SearchParams(top_k=10, nms_overlap=0.5)).hits
    assert len(distinct) == 10

    def max_pair_overlap(hits):
        worst = 0.0
        for i, hit in enumerate(hits):
            same = [h for h in hits[:i] if h.scene == hit.scene]
            if same:
                worst = max(worst, window_overlap(windows_of([hit])[0], windows_of(same)).max())
        return worst

    assert max_pair_overlap(overlapping) > 0.5  # half-overlapping and multi-scale tiles of one place
    assert max_pair_overlap(distinct) <= 0.5
    assert distinct[0].tile_id == overlapping[0].tile_id


def test_several_queries_rank_separately(index, model):
    hits = search(index, ["airport", "praia", "机场"], model=model, params=SearchParams(top_k=3)).hits
    assert [(h.query, h.rank) for h in hits] == [(q, r) for q in ("airport", "praia", "机场") for r in (1, 2, 3)]


def test_threshold(index, model):
    hits = search(index, "beach", model=model, params=SearchParams(top_k=50, threshold=0.0)).hits
    assert all(h.score >= 0.0 for h in hits)
    top = search(index, "beach", model=model, params=SearchParams(top_k=1)).hits[0].score
    assert search(index, "beach", model=model, params=SearchParams(threshold=min(top + 1e-3, 1.0))).hits == []


def test_aoi_bbox_and_vector_file(index, model, shared_data, tmp_path):
    colorado = open_scene(shared_data / "geotiff" / "colorado_rgb_15cm.tif")
    left_half = shapely.Polygon(colorado.footprint(0, 0, 190, 232))
    lonlat = shapely.geometry.shape(transform_geom(colorado.crs, "EPSG:4326", shapely.geometry.mapping(left_half)))
    hits = search(index, "river", model=model, params=SearchParams(top_k=5, aoi=lonlat.bounds)).hits
    assert hits and all(h.scene.endswith("colorado_rgb_15cm.tif") for h in hits)
    assert all(h.geometry.intersects(shapely.box(*lonlat.bounds)) for h in hits)
    text_bbox = ",".join(str(v) for v in lonlat.bounds)
    assert [h.tile_id for h in search(index, "river", model=model, params=SearchParams(top_k=5, aoi=text_bbox)).hits] == \
        [h.tile_id for h in hits]
    # a vector file in the scene's own CRS is reprojected to lon/lat
    vector = tmp_path / "aoi.geojson"
    import geopandas

    geopandas.GeoDataFrame(geometry=[left_half], crs=colorado.crs.to_wkt()).to_file(vector, driver="GeoJSON")
    from_file = search(index, "river", model=model, params=SearchParams(top_k=5, aoi=str(vector))).hits
    assert from_file and all(h.geometry.intersects(lonlat.buffer(1e-9)) for h in from_file)
    assert all(h.win_col < 190 for h in from_file)


@pytest.mark.parametrize("aoi, message", [("1,2,3", "no such file"), ("4,3,2,1", "min < max"),
                                          ("a,b,c,d", "minlon,minlat,maxlon,maxlat")])
def test_bad_aoi(index, model, aoi, message):
    with pytest.raises(QueryError, match=message):
        search(index, "river", model=model, params=SearchParams(aoi=aoi)).hits


@pytest.mark.parametrize("queries", ["", "   \t ", ["forest", " "], []])
def test_empty_queries(index, model, queries):
    with pytest.raises(QueryError, match=r"(empty|no) query"):
        search(index, queries, model=model).hits


def test_long_query_is_truncated_with_a_warning(index, model, caplog):
    long = " ".join(["aeroporto com muitos aviões"] * 200)
    with caplog.at_level(logging.WARNING, logger="rsmclip_geo"):
        hits = search(index, long, model=model, params=SearchParams(top_k=2)).hits
    assert len(hits) == 2 and "truncated" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rsmclip_geo"):
        search(index, "aeroporto", model=model, params=SearchParams(top_k=2)).hits
    assert "truncated" not in caplog.text


def with_templates(bundle: Path, folder: Path, templates: dict) -> Path:
    """A copy of `bundle` whose vocabulary.json holds prompt templates (listed in its bundle.json)."""
    copy = shutil.copytree(bundle, folder / bundle.name)
    (copy / "vocabulary.json").write_text(json.dumps({"format_version": 1, "languages": list(templates),
                                                      "terms": {}, "classes": {}, "templates": templates}))
    info = json.loads((copy / "bundle.json").read_text())
    info["vocabulary"] = "vocabulary.json"
    info["files"]["vocabulary.json"] = sha256_file(copy / "vocabulary.json")
    (copy / "bundle.json").write_text(json.dumps(info))
    return copy


def test_prompt_templates_come_from_the_bundle(index, model, tiny_bundle, tmp_path):
    plain = search(index, "praia", model=model, params=SearchParams(top_k=3, nms_overlap=1.0)).hits
    untemplated = search(index, "praia", model=model, params=SearchParams(top_k=3, nms_overlap=1.0, lang="pt")).hits
    assert [h.score for h in plain] == [h.score for h in untemplated]  # no templates in the bundle: as typed
    templated_model = load_model(with_templates(tiny_bundle, tmp_path, {"pt": ["imagem aérea de {}", "{} vista de cima"]}))
    assert templated_model.bundle.fingerprint == model.bundle.fingerprint  # the same index serves it
    assert templated_model.bundle.text_fingerprint != model.bundle.text_fingerprint  # not the same cached vectors
    templated = search(index, "praia", model=templated_model,
                       params=SearchParams(top_k=3, nms_overlap=1.0, lang="pt")).hits
    assert [h.score for h in plain] != [h.score for h in templated]
    with pytest.raises(QueryError, match=r"lang=xx: model .* has no prompt templates in it; choose one of pt"):
        search(index, "praia", model=templated_model, params=SearchParams(lang="xx"))


def test_similar_to_a_tile(index):
    target = index.column("tile_id")[7]
    hits = similar(index, tile_id=target, params=SearchParams(top_k=5, nms_overlap=1.0)).hits
    assert target not in [h.tile_id for h in hits]
    embeddings = index.embeddings().astype(np.float32)
    scores = embeddings @ (embeddings[7] / np.linalg.norm(embeddings[7]))
    scores[7] = -np.inf
    assert hits[0].tile_id == index.column("tile_id")[int(np.argmax(scores))]
    assert hits[0].query == f"tile:{target}"
    with pytest.raises(TileIndexError, match="no tile with id 'nope'"):
        similar(index, tile_id="nope").hits


def test_similar_to_an_image_chip(index, model, shared_data, tmp_path):
    scene = open_scene(shared_data / "geotiff" / "pix4d_farm_rgba_35cm.tif")
    row = int(np.flatnonzero(index.column("scene_fingerprint") == scene.fingerprint)[20])
    col, r, w, h = (int(index.column(c)[row]) for c in ("win_col", "win_row", "win_width", "win_height"))
    with SceneReader(scene) as reader:
        chip = reader.read_rgb(col, r, w, h, max_size=model.bundle.info.image_size)[0]
    Image.fromarray(chip).save(tmp_path / "chip.png")
    hits = similar(index, image=tmp_path / "chip.png", model=model, params=SearchParams(top_k=3)).hits
    assert hits[0].tile_id == index.column("tile_id")[row] and hits[0].score > 0.99
    assert hits[0].query == "image:chip.png"
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(QueryError, match=r"image=.*notes\.jpg: not a readable image") as info:
        similar(index, image=tmp_path / "notes.jpg", model=model).hits
    assert info.value.param == "image"
    with pytest.raises(QueryError, match="exactly one example"):
        similar(index, model=model).hits


def test_search_with_another_model_is_refused(index, tiny_bundle, tmp_path):
    copy = shutil.copytree(tiny_bundle, tmp_path / "other-bundle")
    info = json.loads((copy / "bundle.json").read_text())
    info["name"], info["std"] = "other-bundle", [0.3, 0.3, 0.3]
    (copy / "bundle.json").write_text(json.dumps(info))
    with pytest.raises(TileIndexError, match="built with model 'tiny-bundle'"):
        search(index, "forest", model=str(copy)).hits


@pytest.mark.parametrize("kwargs, message", [(dict(top_k=0), "top_k=0: "), (dict(nms_overlap=1.5), "nms_overlap=1.5: "),
                                             (dict(threshold=2.0), "threshold=2.0: ")])
def test_bad_search_params(index, model, kwargs, message):
    with pytest.raises(QueryError, match=message) as info:
        search_index(index, "forest", model=model, params=SearchParams(**kwargs))[0]
    assert info.value.param == next(iter(kwargs))


def test_out_of_vocabulary_warning(index, tiny_bundle, tmp_path, caplog):
    copy = shutil.copytree(tiny_bundle, tmp_path / "with-vocabulary")
    (copy / "vocabulary.json").write_text(json.dumps({"terms": {"en": ["airport"], "pt": ["aeroporto"]}}))
    info = json.loads((copy / "bundle.json").read_text())
    info["vocabulary"] = "vocabulary.json"
    (copy / "bundle.json").write_text(json.dumps(info))
    model = load_model(copy)
    assert model.bundle.fingerprint == index.bundle_fingerprint  # the same model, with a vocabulary
    with caplog.at_level(logging.WARNING, logger="rsmclip_geo"):
        search(index, ["Aeroporto internacional", "airport"], model=model, params=SearchParams(top_k=1)).hits
    assert "no term" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="rsmclip_geo"):
        search(index, "xyzzy", model=model, params=SearchParams(top_k=1)).hits
    assert "'xyzzy' contains no term model 'tiny-bundle' was trained on" in caplog.text


def test_aoi_missing_every_tile_warns(index, model, caplog):
    west, south, east, north = shapely.total_bounds(index.geometries())
    with caplog.at_level(logging.WARNING, logger="rsmclip_geo"):
        assert search(index, "river", model=model, params=SearchParams(aoi=(west - 2, south - 2, west - 1, south - 1))).hits == []
    [message] = [r.getMessage() for r in caplog.records if "aoi=" in r.getMessage()]
    assert message.startswith(f"aoi={west - 2:g},{south - 2:g},{west - 1:g},{south - 1:g} covers no tile of")
    assert "lat,lon" not in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rsmclip_geo"):
        assert search(index, "river", model=model, params=SearchParams(aoi=(south, west, north, east))).hits == []
        assert search(index, "river", model=model, params=SearchParams(top_k=1, aoi=(west, south, east, north))).hits
    [message] = [r.getMessage() for r in caplog.records if "aoi=" in r.getMessage()]
    assert "it looks like lat,lon order" in message


def test_aoi_missing_every_tile_warns_on_the_ann_path(index, model, tmp_path, caplog):
    from rsmclip_geo.ann import build_ann

    path = shutil.copy(index.path, tmp_path / "copy.parquet")
    build_ann(path, kind="hnsw")
    west, south, east, north = shapely.total_bounds(index.geometries())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rsmclip_geo"):
        assert search_index(path, "river", model=model, ann_min_rows=0, params=SearchParams(aoi=(south, west, north, east)))[0] == []
    assert "ANN index" in caplog.text
    [message] = [r.getMessage() for r in caplog.records if "aoi=" in r.getMessage()]
    assert message.startswith(f"aoi={south:g},{west:g},{north:g},{east:g} covers no tile of {path} (index bounds")
    assert "it looks like lat,lon order" in message


# relevance feedback ---------------------------------------------------------------------------------

def test_feedback_leaves_judged_tiles_out_and_moves_the_ranking(index, model):
    first = search(index, "forest", model=model, params=SearchParams(top_k=10, nms_overlap=1.0)).hits
    right, wrong = [h.tile_id for h in first[:2]], [h.tile_id for h in first[2:4]]
    labels = Labels.from_ids(index, positive=right, negative=wrong)
    refined = search(index, "forest", model=model,
                     params=SearchParams(top_k=10, nms_overlap=1.0, labels=labels)).hits
    assert not {h.tile_id for h in refined} & set(right + wrong)
    # the tiles most like the ones marked right rank higher than they did
    embeddings = index.embeddings().astype(np.float32)
    mean_right = embeddings[[index.row_of(t) for t in right]].mean(axis=0)
    closeness = lambda hits: np.mean([embeddings[index.row_of(h.tile_id)] @ mean_right for h in hits[:5]])
    assert closeness(refined) > closeness([h for h in first if h.tile_id not in right + wrong])
    for method in ("rocchio", "linear"):
        vector = refine(np.eye(32, dtype=np.float32)[0], embeddings[:2], embeddings[2:4], method)
        assert vector.shape == (32,) and abs(np.linalg.norm(vector) - 1) < 1e-5


def test_labels_file_round_trip_undo_and_a_rebuilt_index(index, model, shared_data, tmp_path):
    ids = index.column("tile_id")
    labels = Labels.from_ids(index, positive=[ids[3], ids[5]], negative=[ids[9]])
    assert labels.undo().tile_id == ids[9] and labels.undo("nope") is None
    labels.mark(index, ids[9], positive=False)
    path = labels.write(tmp_path / "labels.geojson")
    again = Labels.read(path)
    assert [(j.tile_id, j.label) for j in again.judgements.values()] == [(ids[3], "positive"), (ids[5], "positive"),
                                                                         (ids[9], "negative")]
    layer = json.loads(path.read_text())  # a GeoJSON layer: footprints in lon/lat with their label
    assert layer["type"] == "FeatureCollection" and layer["features"][0]["properties"]["label"] == "positive"
    # the same scenes indexed again with other tile ids (overlap): judged tiles are found by footprint
    rebuilt = TileIndex.open(index_scenes([shared_data / "geotiff" / n for n in
                                           ("colorado_rgb_15cm.tif", "pix4d_farm_rgba_35cm.tif")],
                                          tmp_path / "rebuilt.parquet", model=model,
                                          tiling=TilingParams(tile_size=PARAMS.tile_size, overlap=0.5)))
    positive, negative = again.rows(rebuilt)
    assert len(positive) == 2 and len(negative) == 1
    assert rebuilt.geometries(positive)[0].equals_exact(index.geometries([index.row_of(ids[3])])[0], 1e-9)


def test_bad_labels(index, tmp_path):
    ids = index.column("tile_id")
    with pytest.raises(QueryError, match=r"negative=.*: also marked positive"):
        Labels.from_ids(index, positive=[ids[1]], negative=[ids[1]])
    with pytest.raises(TileIndexError, match="no tile with id 'nope'"):
        Labels.from_ids(index, positive=["nope"])
    (tmp_path / "bad.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(QueryError, match=r"labels_file=.*bad.geojson: not a labels file"):
        Labels.read(tmp_path / "bad.geojson")
    with pytest.raises(QueryError, match=r"labels_file=.*missing.geojson: no such file"):
        Labels.read(tmp_path / "missing.geojson")
    with pytest.raises(QueryError, match="feedback_method=svm: choose one of linear, rocchio"):
        SearchParams(feedback_method="svm").check()


def test_tiles_at_a_point(index):
    from rsmclip_geo.api import tiles_at

    row = 11
    centre = index.geometries([row])[0].centroid
    found = tiles_at(index, centre.x, centre.y)
    assert found[0] == index.column("tile_id")[row]
    assert tiles_at(index, 0.0, 0.0) == []
