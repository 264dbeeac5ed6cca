"""The runtime's numpy preprocessing: resizing against Pillow, fixed-point weights, batches and bad images
(against open_clip's own transform: tests/training/test_preprocess_open_clip.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from rsmclip_geo.errors import RsmclipError
from rsmclip_geo.preprocess import preprocess_images, resize_batch, resize_weights

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def test_resize_matches_pillow_both_ways(shared_data: Path) -> None:
    image = np.asarray(Image.open(shared_data / "figs" / "airplane_004.jpg").convert("RGB"))
    for height, width in ((50, 71), (300, 257), (256, 100)):
        expected = np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))
        np.testing.assert_array_equal(resize_batch(image[None], height, width)[0], expected)


def test_weights_sum_to_one_in_fixed_point() -> None:
    weights = resize_weights(600, 224, "bicubic")
    assert weights.shape == (224, 600)
    assert np.all(np.abs(weights.sum(axis=1) - (1 << 22)) <= 8)


def test_batch_array_and_list_agree(shared_data: Path) -> None:
    files = sorted((shared_data / "aid" / "Beach").glob("*.jpg"))[:4]
    batch = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    info = SimpleNamespace(image_size=64, mean=MEAN, std=STD, interpolation="bicubic", resize="shortest")
    np.testing.assert_array_equal(preprocess_images(batch, info), preprocess_images(list(batch), info))


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
                                 np.zeros((4, 4), np.uint8), np.zeros((0, 4, 3), np.uint8)])
def test_bad_images_raise_one_line(bad: np.ndarray) -> None:
    info = SimpleNamespace(image_size=64, mean=MEAN, std=STD, interpolation="bicubic", resize="shortest")
    with pytest.raises(RsmclipError) as err:
        preprocess_images([bad], info)
    assert "\n" not in str(err.value)
