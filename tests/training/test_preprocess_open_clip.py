"""The runtime's numpy preprocessing against open_clip's validation transform on real images.

Measured tolerance: bit-identical (max abs difference 0.0) on the AID, UC Merced and GeoTIFF images
below, for bicubic and bilinear, shortest-side and squash resizing, up- and downscaling.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from open_clip.constants import OPENAI_DATASET_MEAN as MEAN
from open_clip.constants import OPENAI_DATASET_STD as STD
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from rsmclip_geo.preprocess import preprocess_images


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
    transform = image_transform_v2(PreprocessCfg(size=size, mean=MEAN, std=STD, interpolation=interpolation,
                                                 resize_mode=resize), is_train=False)
    images = real_images(shared_data)
    expected = np.stack([transform(Image.fromarray(image)).numpy() for image in images])
    info = SimpleNamespace(image_size=size, mean=MEAN, std=STD, interpolation=interpolation, resize=resize)
    got = preprocess_images(images, info)
    assert got.shape == (len(images), 3, size, size) and got.dtype == np.float32
    assert np.abs(got - expected).max() == 0.0
