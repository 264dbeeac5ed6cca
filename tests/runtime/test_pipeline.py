"""Embedding pipeline on real GeoTIFFs with the tiny exported bundle (ONNX Runtime)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from rasterio.enums import ColorInterp
from rasters import textured_float_scene, truncated_copy, write_geotiff

from rsmclip_geo.encoders import load_model
from rsmclip_geo.errors import RasterError, RsmclipError
from rsmclip_geo.pipeline import Cancelled, embed_scene, keep_tile, plan_chunks
from rsmclip_geo.raster import SceneReader, open_scene
from rsmclip_geo.tiling import TilingParams, tile_windows

PARAMS = TilingParams(tile_size=64)


@pytest.fixture
def colorado(shared_data):
    return open_scene(shared_data / "geotiff" / "colorado_rgb_15cm.tif")


def collect(scene, model, **kwargs):
    out = {}
    for batch in embed_scene(scene, model, kwargs.pop("params", PARAMS), **kwargs):
        for window, vector in zip(batch.windows, batch.embeddings):
            out[window.tile_id(scene.fingerprint)] = (window, vector)
    return out


def worker_threads():
    return [t for t in threading.enumerate() if t.name.startswith("rsmclip-worker")]


def test_embeddings_equal_direct_encoding(colorado, model):
    got = collect(colorado, model, batch_size=5, threads=2)
    windows = tile_windows(colorado, PARAMS)
    assert len(got) == len(windows) == 24
    with SceneReader(colorado) as reader:
        tiles = [reader.read_rgb(w.col, w.row, w.width, w.height)[0] for w in windows]
    expected = model.encode_images(np.stack(tiles))
    for window, vector in zip(windows, expected):
        _, embedded = got[window.tile_id(colorado.fingerprint)]
        np.testing.assert_allclose(embedded, vector, atol=1e-5)
        assert np.linalg.norm(embedded) == pytest.approx(1.0, abs=1e-5)


def test_thread_count_does_not_change_results(colorado, model):
    params = TilingParams(tile_size=64, overlap=0.5, scales=(1, 2))
    one = collect(colorado, model, params=params, batch_size=7, threads=1)
    three = collect(colorado, model, params=params, batch_size=3, threads=3)
    assert one.keys() == three.keys()
    for key in one:
        np.testing.assert_allclose(one[key][1], three[key][1], atol=1e-5)
    assert not worker_threads()


class RecordingModel:
    """The real model, recording which thread encoded each batch and with how many ORT threads."""

    def __init__(self, model):
        self.model, self.bundle, self.calls, self.sizes = model, model.bundle, [], []

    def encode_tiles(self, tiles, threads=None):
        self.calls.append((threading.current_thread().name, threads))
        self.sizes.append(len(tiles))
        return self.model.encode_tiles(tiles, threads=threads)


@pytest.mark.parametrize("threads, session_threads", [(2, 1), (1, None)])
def test_workers_encode_on_single_threaded_sessions(threads, session_threads, colorado, model):
    recording = RecordingModel(model)
    got = collect(colorado, recording, batch_size=4, threads=threads)
    assert len(recording.calls) >= 6 and len(got) == 24
    assert all(name.startswith("rsmclip-worker-") and used == session_threads for name, used in recording.calls)
    pixels = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(model.encode_pixels(pixels, threads=1), model.encode_pixels(pixels), atol=1e-5)


def test_one_encoder_batch_per_chunk_whatever_the_models_batch_size(colorado, tiny_bundle):
    recording = RecordingModel(load_model(tiny_bundle, threads=2, batch_size=1))
    got = collect(colorado, recording, batch_size=12, threads=1)
    assert recording.sizes == [12, 12] and len(got) == 24


def test_chunks_shrink_towards_the_end_so_workers_finish_together():
    windows = list(range(77))
    chunks = plan_chunks(windows, 32, 2)
    assert [w for chunk in chunks for w in chunk] == windows
    assert [len(c) for c in chunks] == [20, 15, 11, 8, 8, 8, 7]
    assert [len(c) for c in plan_chunks(list(range(1000)), 32, 2)][:27] == [32] * 27
    assert plan_chunks([], 32, 2) == []
    assert [len(c) for c in plan_chunks(windows, 32, 1)] == [32, 32, 13]


def test_keep_tile_decides_on_the_valid_pixels_only():
    rng = np.random.default_rng(0)
    for _ in range(50):
        valid = rng.random((48, 48)) < rng.uniform(0.2, 1.0)
        rgb = (200 + rng.normal(scale=rng.uniform(0.5, 5.0), size=(48, 48, 3))).clip(0, 255).astype(np.uint8)
        rgb[~valid] = 0
        std = float(rgb[valid].std())
        for min_std in (std * 0.999, std * 1.001):
            params = TilingParams(tile_size=48, min_valid=0.5, min_std=min_std)
            expected = valid.mean() >= 0.5 and std >= min_std
            assert keep_tile(valid, rgb, params) == expected
    assert not keep_tile(np.zeros((4, 4), bool), np.zeros((4, 4, 3), np.uint8), TilingParams(min_valid=0.0))


def test_nodata_and_constant_tiles_are_skipped(tmp_path, model):
    rng = np.random.default_rng(0)
    data = np.zeros((3, 128, 192), np.uint8)
    data[:, :, 64:128] = 90  # constant, valid
    data[:, :, 128:] = rng.integers(1, 255, (3, 128, 64))  # texture
    alpha = np.zeros((1, 128, 192), np.uint8)
    alpha[:, :, 64:] = 255  # left third masked
    path = write_geotiff(tmp_path / "thirds.tif", np.concatenate([data, alpha]),
                         colorinterp=[ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha])
    got = collect(open_scene(path), model, batch_size=2)
    assert sorted((w.col, w.row) for w, _ in got.values()) == [(128, 0), (128, 64)]
    # min_std 0 keeps the constant tiles; a tile without any valid pixel is never kept
    loose = collect(open_scene(path), model, params=TilingParams(tile_size=64, min_std=0.0, min_valid=0.0))
    assert sorted(w.col for w, _ in loose.values()) == [64, 64, 128, 128]


def test_zero_filled_border_of_real_scene_is_skipped(shared_data, model):
    scene = open_scene(shared_data / "geotiff" / "rotterdam_harbor_4band_1m.tif", bands=(3, 2, 1))
    got = collect(scene, model)
    windows = tile_windows(scene, PARAMS)
    skipped = [w for w in windows if w.tile_id(scene.fingerprint) not in got]
    assert got and skipped
    with SceneReader(scene) as reader:
        for w in skipped:
            rgb, valid = reader.read_rgb(w.col, w.row, w.width, w.height)
            assert rgb[valid].std() < PARAMS.min_std  # the harbour scene's empty top rows


def test_float_scene_with_scattered_nan_keeps_its_tiles(tmp_path, model):
    """5 float32 bands, 1 % NaN in each, --bands 3,2,1: every tile is 97 % valid and kept, embeddings finite."""
    scene = open_scene(textured_float_scene(tmp_path / "five.tif", nan_fraction=0.01), bands=(3, 2, 1))
    params = TilingParams(tile_size=224)
    got = collect(scene, model, params=params)
    assert len(got) == len(tile_windows(scene, params)) == 6
    vectors = np.stack([vector for _, vector in got.values()])
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_nodata_override_drops_the_zero_filled_border(shared_data, model):
    path = shared_data / "geotiff" / "rotterdam_harbor_4band_1m.tif"
    loose = collect(open_scene(path, bands=(3, 2, 1)), model, params=TilingParams(tile_size=64, min_std=0.0))
    strict = collect(open_scene(path, bands=(3, 2, 1), nodata=0), model, params=TilingParams(tile_size=64, min_std=0.0))
    assert set(strict) < set(loose)  # the empty top rows count as nodata only with --nodata 0
    assert all(w.row > 0 for w, _ in strict.values())


def test_progress_and_skip(colorado, model):
    calls = []
    windows = tile_windows(colorado, PARAMS)
    skip = {w.tile_id(colorado.fingerprint) for w in windows[:10]}
    got = collect(colorado, model, batch_size=4, skip=skip, progress=lambda d, t: calls.append((d, t)))
    assert not skip & got.keys() and len(got) == 14
    assert calls[0] == (0, 14) and calls[-1] == (14, 14)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_cancel_stops_between_batches(colorado, model):
    polls = []

    def cancel():
        polls.append(1)
        return len(polls) > 2

    seen = []
    with pytest.raises(Cancelled, match="cancelled"):
        for batch in embed_scene(colorado, model, PARAMS, batch_size=2, cancel=cancel):
            seen.append(batch)
    assert 1 <= len(seen) <= 2
    assert not worker_threads()


def test_read_error_reaches_the_caller(shared_data, tmp_path, model):
    whole = truncated_copy(shared_data / "geotiff" / "colorado_rgb_15cm.tif", tmp_path / "cut.tif", 1.0, tiled=True)
    scene = open_scene(whole)
    truncated_copy(whole, whole, 0.5)  # the file is cut after the scene was opened
    with pytest.raises(RasterError, match=r"cut\.tif: pixels of window .* truncated or corrupt"):
        collect(scene, model, batch_size=2)
    assert not worker_threads()


def test_bad_batch_size(colorado, model):
    with pytest.raises(RsmclipError, match="batch_size=0: give a positive batch size") as info:
        collect(colorado, model, batch_size=0)
    assert info.value.param == "batch_size"
