"""The exporter records a bundle's input_gsd_m (ground metres per input pixel) from --input-gsd-m or from the
ground resolution the training config's datasets state, and refuses bad values with one line."""

from __future__ import annotations

import json

import pytest

from rsmclip_geo.bundle import load_bundle
from rsmclip_geo.errors import RsmclipError
from training.export import export_bundle
from training.export import main as export_main
from training.model import create_model, save_checkpoint


@pytest.mark.parametrize("value, fragment", [
    ("75,4.6875", "--input-gsd-m 75,4.6875: give finite metres per pixel, 0 < min <= max"),
    ("0,5", "--input-gsd-m 0,5"),
    ("-1,5", "--input-gsd-m -1,5"),
    ("inf,5", "--input-gsd-m inf,5"),
    ("nan,5", "--input-gsd-m nan,5"),
    ("4.6875", "--input-gsd-m 4.6875: give MIN,MAX in metres per input pixel"),
    ("a,b", "--input-gsd-m a,b: give MIN,MAX"),
])
def test_export_refuses_a_bad_input_gsd_m(tiny_model, tmp_path, capsys, value, fragment) -> None:
    out = tmp_path / "models" / "bad"
    assert export_main(["--checkpoint", str(tiny_model.checkpoint), "-o", str(out), f"--input-gsd-m={value}"]) == 2
    err = capsys.readouterr().err
    assert f"training.export: error: {fragment}" in err and "Traceback" not in err
    assert not (tmp_path / "models").exists()


def test_export_records_input_gsd_m_from_the_option_or_the_training_config(tiny_model, tmp_path) -> None:
    given = tmp_path / "given"
    assert export_main(["--checkpoint", str(tiny_model.checkpoint), "-o", str(given),
                        "--input-gsd-m", "4.6875,75"]) == 0
    assert json.loads((given / "bundle.json").read_text(encoding="utf-8"))["input_gsd_m"] == [4.6875, 75.0]
    assert load_bundle(given).info.input_gsd_m == (4.6875, 75.0)

    loaded = create_model(None, checkpoint=tiny_model.checkpoint)
    datasets = [{"type": "class_folder", "root": "aid", "ground_resolution": {"gsd_m": [0.5, 8.0], "image_px": 600}},
                {"type": "captions", "captions": "c.csv", "images": "ucm",
                 "ground_resolution": {"gsd_m": [0.3, 0.3], "image_px": 256}}]
    stated = save_checkpoint(loaded, tmp_path / "stated.pt", config={"data": {"datasets": datasets}})
    from_config = export_bundle(create_model(None, checkpoint=stated), tmp_path / "from-config")
    # the tiny model's input is 64 px: AID 0.5–8 m × 600 / 64, UCM 0.3 m × 256 / 64
    assert load_bundle(from_config).info.input_gsd_m == (0.3 * 256 / 64, 8.0 * 600 / 64)

    unstated = save_checkpoint(loaded, tmp_path / "unstated.pt",
                               config={"data": {"datasets": [datasets[0], {"type": "captions"}]}})
    unstated_bundle = export_bundle(create_model(None, checkpoint=unstated), tmp_path / "unstated")
    assert load_bundle(unstated_bundle).info.input_gsd_m is None

    broken = save_checkpoint(loaded, tmp_path / "broken.pt", config={"data": {"datasets": [
        {"type": "class_folder", "ground_resolution": {"gsd_m": [8.0, 0.5], "image_px": 600}}]}})
    with pytest.raises(RsmclipError, match=r"broken\.pt: data\.datasets\[0\]\.ground_resolution\.gsd_m 8,0\.5"):
        export_bundle(create_model(None, checkpoint=broken), tmp_path / "broken")
    assert not (tmp_path / "broken").exists()
