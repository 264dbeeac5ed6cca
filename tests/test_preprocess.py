"""The runtime's numpy preprocessing against open_clip's validation transform on real images.

Measured tolerance: bit-identical (max abs difference 0.0) on the AID, UC Merced and GeoTIFF images
below, for bicubic and bilinear, shortest-side and squash resizing, up- and downscaling.
"""

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


def real_images(shared_data: Path) -> list[np.ndarray]:
    files = sorted((shared_data / "figs").glob("*.jpg"))
    files += [sorted((shared_data / "aid" / c).glob("*.jpg"))[3] for c in ("Airport", "Port", "Forest", "Stadium")]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    with Image.open(shared_data / "geotiff" / "colorado_rgb_15cm.tif") as tif:
        images.append(np.asarray(tif.convert("RGB")))  # 383x232, non-square
    images.append(images[2][10:107, 3:140].copy())  # odd-sized crop
    return images


@pytest.mark.parametrize("size, interpolation, resize", [
    (224, "bicubic", "shortest"), (64, "bicubic", "shortest"), (97, "bilinear", "squash"), (300, "bicubic", "squash"),
])
def test_matches_open_clip_transform(shared_data: Path, size: int, interpolation: str, resize: str) -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    transform = image_transform_v2(PreprocessCfg(size=size, mean=MEAN, std=STD, interpolation=interpolation,
                                                 resize_mode=resize), is_train=False)
    images = real_images(shared_data)
    expected = np.stack([transform(Image.fromarray(image)).numpy() for image in images])
    info = SimpleNamespace(image_size=size, mean=MEAN, std=STD, interpolation=interpolation, resize=resize)
    got = preprocess_images(images, info)
    assert got.shape == (len(images), 3, size, size) and got.dtype == np.float32
    assert np.abs(got - expected).max() == 0.0


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
