"""training.model and training.export: self-contained checkpoints, ONNX graphs, precisions, parity, torch backend."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rsmclip_geo.bundle import load_bundle
from rsmclip_geo.encoders import load_model
from rsmclip_geo.errors import RsmclipError
from training.export import (
    INT8_TOP1_GAP,
    PROBES_DIR,
    calibration_pixels,
    check_parity,
    convert_precision,
    export_bundle,
    main as export_main,
    quantization_method,
)
from training.model import create_model


def probe_ids(bundle: Path, texts: list[str]) -> np.ndarray:
    return load_model(bundle, providers=["cpu"]).tokenizer.encode(texts)


def test_checkpoint_rebuilds_the_model_alone(tiny_model) -> None:
    first = create_model(None, checkpoint=tiny_model.checkpoint)
    second = create_model(None, checkpoint=tiny_model.checkpoint)
    ids = first.tokenizer(["um aeroporto", "储油罐"])
    with torch.inference_mode():
        torch.testing.assert_close(first.model.encode_text(ids), second.model.encode_text(ids), rtol=0, atol=0)
    assert first.source["checkpoint_sha256"] and not first.source["random_init"]
    assert first.config["text_cfg"]["hf_model_name"] == "tiny-xlm-roberta"


def test_plain_and_prefixed_state_dicts_need_the_model(tiny_model, tmp_path: Path) -> None:
    reference = create_model(None, checkpoint=tiny_model.checkpoint)
    state = {f"module.{k}": v for k, v in reference.model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "train.pt")
    with pytest.raises(RsmclipError, match="no architecture"):
        create_model(None, checkpoint=tmp_path / "train.pt")
    loaded = create_model(tiny_model.config_json, hf_text_dir=tiny_model.hf_text_dir, checkpoint=tmp_path / "train.pt")
    pixels = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model.encode_image(pixels), reference.model.encode_image(pixels))


def test_weights_for_another_architecture_are_refused(tiny_model, tmp_path: Path) -> None:
    config = json.loads(tiny_model.config_json.read_text())
    config["vision_cfg"]["width"] = 96
    other = tmp_path / "other.json"
    other.write_text(json.dumps(config))
    plain = tmp_path / "plain.pt"
    torch.save(create_model(None, checkpoint=tiny_model.checkpoint).model.state_dict(), plain)
    with pytest.raises(RsmclipError, match="do not fit"):
        create_model(other, hf_text_dir=tiny_model.hf_text_dir, checkpoint=plain)


def test_unknown_model_name() -> None:
    with pytest.raises(RsmclipError, match="not an open_clip model name"):
        create_model("ViT-Q-99")


def test_onnx_files_have_symbolic_batch_dynamic_length_and_metadata(exported_bundle: Path) -> None:
    info = json.loads((exported_bundle / "bundle.json").read_text())
    for name, input_name in (("image.onnx", "pixels"), ("text.onnx", "input_ids")):
        proto = onnx.load(str(exported_bundle / name), load_external_data=False)
        assert proto.ir_version <= 10
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
        assert [i.name for i in proto.graph.input] == [input_name]
        assert [o.name for o in proto.graph.output] == ["embedding"]
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param
        if input_name == "input_ids":
            assert dims[1].dim_param
        props = {p.key: p.value for p in proto.metadata_props}
        assert props["rsmclip_geo.tower"] == name.split(".")[0]
        assert json.loads(props["rsmclip_geo.embed_dim"]) == info["embed_dim"]
        assert json.loads(props["rsmclip_geo.pad_id"]) == info["pad_id"]


def test_text_graph_runs_any_batch_and_length(exported_bundle: Path, tiny_model) -> None:
    loaded = create_model(None, checkpoint=tiny_model.checkpoint)
    session = ort.InferenceSession(str(exported_bundle / "text.onnx"), providers=["CPUExecutionProvider"])
    texts = ["a", "Serbatoi di stoccaggio in un'area industriale.", "机场", "Un campo de golf con bunkers.", "x y"]
    ids = probe_ids(exported_bundle, texts)
    assert ids.shape[1] < 32
    with torch.inference_mode():
        expected = loaded.model.encode_text(loaded.tokenizer(texts)).numpy()
    for batch in (1, 3, 5):
        got = session.run(None, {"input_ids": ids[:batch]})[0]
        np.testing.assert_allclose(got, expected[:batch], atol=2e-5)


def test_export_cli_from_checkpoint_replaces_a_bundle_atomically(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "models" / "from-ckpt"
    assert export_main(["--checkpoint", str(tiny_model.checkpoint), "-o", str(out), "--name", "ck",
                        "--languages", "en", "pt", "--default-tile-size", "256"]) == 0
    info = load_bundle(out).info
    assert (info.name, info.languages, info.default_tile_size) == ("ck", ("en", "pt"), 256)
    assert info.source["checkpoint_sha256"] and info.parity["n_images"] == 16 and info.parity["n_texts"] == 31
    first = load_bundle(out).fingerprint
    card = tmp_path / "card.md"
    card.write_text("# ck2\n", encoding="utf-8")
    assert export_main(["--checkpoint", str(tiny_model.checkpoint), "-o", str(out), "--name", "ck2",
                        "--model-card", str(card)]) == 0
    assert load_bundle(out).info.name == "ck2" and load_bundle(out).fingerprint != first
    assert (out / "MODEL_CARD.md").read_text(encoding="utf-8") == "# ck2\n"
    assert "MODEL_CARD.md" in json.loads((out / "bundle.json").read_text(encoding="utf-8"))["files"]
    assert export_main(["--checkpoint", str(tiny_model.checkpoint), "-o", str(out),
                        "--model-card", str(tmp_path / "missing.md")]) == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["from-ckpt"]  # no temp dirs left behind


def test_export_refuses_an_output_that_is_not_a_bundle(tiny_model, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "docs"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    assert export_main(["--checkpoint", str(tiny_model.checkpoint), "-o", str(target)]) == 2
    assert "not a bundle directory" in capsys.readouterr().err
    assert (target / "notes.txt").read_text() == "keep me"


def test_fp16_bundle_meets_its_threshold(tiny_model, tmp_path: Path) -> None:
    loaded = create_model(None, checkpoint=tiny_model.checkpoint)
    out = export_bundle(loaded, tmp_path / "fp16", precision="fp16")
    info = load_bundle(out).info
    assert info.precision == "fp16"
    assert info.parity["image_min_cosine"] >= 0.999 and info.parity["text_min_cosine"] >= 0.999
    proto = onnx.load(str(out / "image.onnx"))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in proto.graph.initializer)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 I/O kept


def test_fp16_torch_weights_hold_the_values_the_onnx_towers_use(tiny_model, exported_bundle: Path, tmp_path: Path,
                                                                shared_data: Path) -> None:
    from PIL import Image
    from safetensors import safe_open

    loaded = create_model(None, checkpoint=tiny_model.checkpoint)
    out = export_bundle(loaded, tmp_path / "half", torch_weights="fp16")
    with safe_open(str(out / "weights.safetensors"), "pt") as weights:
        dtypes = {weights.get_tensor(key).dtype for key in weights.keys()}
    assert torch.float16 in dtypes and torch.float32 not in dtypes
    assert (out / "weights.safetensors").stat().st_size < 0.6 * (exported_bundle / "weights.safetensors").stat().st_size
    assert load_bundle(out).info.parity["top1_agreement"] == 1.0
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((shared_data / "figs").glob("*.jpg"))]
    onnx_model = load_model(out, providers=["cpu"])
    torch_model = load_model(out, backend="torch", device="cpu")
    for encode, data in (("encode_images", images), ("encode_texts", ["aeroporto", "储油罐", "campo de golf"])):
        a, b = getattr(onnx_model, encode)(data), getattr(torch_model, encode)(data)
        assert np.sum(a * b, axis=1).min() >= 0.99999, encode
    with pytest.raises(RsmclipError, match="--torch-weights 'bf16'"):
        export_bundle(loaded, tmp_path / "bf16", torch_weights="bf16")


def test_int8_quantises_matmuls_and_stays_close(exported_bundle: Path, tmp_path: Path) -> None:
    path = tmp_path / "image.onnx"
    path.write_bytes((exported_bundle / "image.onnx").read_bytes())
    convert_precision(path, "int8")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    pixels = np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32)
    fp32 = ort.InferenceSession(str(exported_bundle / "image.onnx"), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    a, b = fp32.run(None, {"pixels": pixels})[0], int8.run(None, {"pixels": pixels})[0]
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.99 and not np.array_equal(a, b)


def test_weight_only_int8_text_tower_keeps_float_activations(exported_bundle: Path, tmp_path: Path) -> None:
    """A text tower's MatMul weights become 8-bit blocks (MatMulNBits) and its embedding table int8; no
    activation is quantised, so the embeddings stay within rounding of the weights."""
    path = tmp_path / "text.onnx"
    path.write_bytes((exported_bundle / "text.onnx").read_bytes())
    convert_precision(path, "int8", weight_only=True)
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert "MatMulNBits" in ops and not ops & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}
    assert all(attr.i == 8 for node in graph.node if node.op_type == "MatMulNBits"
               for attr in node.attribute if attr.name == "bits")
    quantized = {init.name for init in graph.initializer if init.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    assert any(node.input[0] in quantized for node in graph.node if node.op_type == "Gather")
    ids = np.array([[0, 17, 250, 9, 2, 1, 1], [0, 33, 2, 1, 1, 1, 1]], dtype=np.int64)
    fp32 = ort.InferenceSession(str(exported_bundle / "text.onnx"), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = fp32.get_inputs()[0].name
    a, b = fp32.run(None, {name: ids})[0], int8.run(None, {name: ids})[0]
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.999 and not np.array_equal(a, b)


def test_static_int8_quantises_the_demo_models_convolutions_and_stays_close(shared_data: Path, tmp_path: Path) -> None:
    """Calibrated on AID images, the demo model's image tower gets int8 convolutions (QDQ) and embeds the
    probe images like fp32."""
    demo = load_bundle("rsmclip-demo-aid")
    info = demo.info.raw
    path = tmp_path / "image.onnx"
    path.write_bytes((demo.path / "image.onnx").read_bytes())
    convert_precision(path, "int8", calibration_pixels(shared_data / "aid", info, count=64))
    graph = onnx.load(str(path)).graph
    dequantized = {node.input[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    int8_weights = {init.name for init in graph.initializer if init.data_type == onnx.TensorProto.INT8}
    conv_weights = {node.input[1] for node in graph.node if node.op_type == "Conv"}
    assert conv_weights and all(
        any(w in dequantized and w in int8_weights for w in _producers(graph, name)) for name in conv_weights)
    pixels = calibration_pixels(PROBES_DIR / "images", info)
    fp32 = ort.InferenceSession(str(demo.path / "image.onnx"), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    a, b = fp32.run(None, {"pixels": pixels})[0], int8.run(None, {"pixels": pixels})[0]
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.mean() >= 0.99 and cos.min() >= 0.97, cos


def _producers(graph, name: str) -> set[str]:
    """The inputs of the node producing ``name`` (a Conv weight comes out of a DequantizeLinear)."""
    return {i for node in graph.node if name in node.output for i in node.input}


def test_int8_export_with_calibration_images_passes_the_parity_gate(shared_data: Path, tmp_path: Path) -> None:
    demo = load_bundle("rsmclip-demo-aid").path
    loaded = create_model(demo / "open_clip_config.json", checkpoint=demo / "weights.safetensors")
    out = export_bundle(loaded, tmp_path / "int8", precision="int8", calibration_images=shared_data / "aid")
    info = load_bundle(out).info
    assert info.raw["quantization"] == {"image": "static, 256 calibration images",
                                        "text": quantization_method("text", None)}
    assert "weight-only" in info.raw["quantization"]["text"]
    assert info.parity["top1_score_gap"] <= INT8_TOP1_GAP and info.parity["image_min_cosine"] >= 0.99
    with pytest.raises(RsmclipError, match="--calibration-images applies to --precision int8 only"):
        export_bundle(loaded, tmp_path / "fp32", calibration_images=shared_data / "aid")
    with pytest.raises(RsmclipError, match=r"--calibration-images .*empty: no \.jpg/\.jpeg/\.png images found"):
        export_bundle(loaded, tmp_path / "new" / "int8b", precision="int8", calibration_images=tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]


def test_int8_gate_allows_near_ties_and_refuses_a_changed_top1() -> None:
    """The probes say the same thing in several languages: int8 may swap near-tied sentences, not others."""
    parity = {"image_min_cosine": 0.995, "text_min_cosine": 0.999, "top1_agreement": 0.9375,
              "top1_score_gap": 4e-5, "tokenizer_mismatches": 0, "preprocess_max_abs_diff": 0.0}
    check_parity(parity, "int8")
    with pytest.raises(RsmclipError, match="top-1 sentence changed to one torch scores 0.0300 below its best"):
        check_parity({**parity, "top1_score_gap": 0.03}, "int8")


def break_int8(tower: torch.nn.Module) -> None:
    """Make per-tensor int8 wipe out every MLP of a transformer tower while float stays unchanged: one hidden
    unit is always exactly 0 (zero weights, bias -100 before GELU) and its output weights are 10,000 times the
    largest, so the int8 scale rounds every other weight of the layer to zero, on any machine and version."""
    with torch.no_grad():
        for block in tower.transformer.resblocks:
            block.mlp.c_fc.weight[0] = 0.0
            block.mlp.c_fc.bias[0] = -100.0
            block.mlp.c_proj.weight[:, 0] = 1e4 * block.mlp.c_proj.weight.abs().max()


def test_low_parity_is_refused_and_nothing_is_written(tiny_model, tmp_path: Path) -> None:
    """An image tower built to break under int8: the export must refuse, leaving no files."""
    loaded = create_model(None, checkpoint=tiny_model.checkpoint)
    break_int8(loaded.model.visual)
    with pytest.raises(RsmclipError, match="int8 parity check failed.*bundle not written"):
        export_bundle(loaded, tmp_path / "int8", precision="int8")
    assert list(tmp_path.iterdir()) == []


def test_torch_backend_agrees_with_onnx(exported_bundle: Path, shared_data: Path) -> None:
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((shared_data / "figs").glob("*.jpg"))]
    texts = ["aeroporto", "Un campo de golf con bunkers.", "储油罐"]
    onnx_model = load_model(exported_bundle, providers=["cpu"])
    torch_model = load_model(exported_bundle, backend="torch", device="cpu")
    assert torch_model.providers == ["torch:cpu"]
    for encode in ("encode_images", "encode_texts"):
        data = images if encode == "encode_images" else texts
        a, b = getattr(onnx_model, encode)(data), getattr(torch_model, encode)(data)
        assert np.sum(a * b, axis=1).min() >= 0.99999


def test_pipeline_on_the_torch_backend_matches_onnx(exported_bundle: Path, shared_data: Path) -> None:
    """Worker threads sending uint8 tiles to the torch towers (normalised there) embed like ONNX Runtime."""
    from rsmclip_geo.pipeline import embed_scene
    from rsmclip_geo.raster import open_scene
    from rsmclip_geo.tiling import TilingParams

    scene = open_scene(shared_data / "geotiff" / "pix4d_farm_rgba_35cm.tif")
    params = TilingParams(tile_size=96, overlap=0.5, scales=(1, 2))
    embedded = {}
    for model in (load_model(exported_bundle, providers=["cpu"]), load_model(exported_bundle, backend="torch", device="cpu")):
        embedded[model.backend] = {w.tile_id(scene.fingerprint): v for batch in embed_scene(scene, model, params,
                                                                                         batch_size=16, threads=3)
                                   for w, v in zip(batch.windows, batch.embeddings)}
    assert embedded["onnx"].keys() == embedded["torch"].keys() and len(embedded["onnx"]) > 50
    cosines = [float(embedded["onnx"][k] @ embedded["torch"][k]) for k in embedded["onnx"]]
    assert min(cosines) >= 0.99999


def test_cli_index_on_the_torch_backend(exported_bundle: Path, shared_data: Path, tmp_path: Path, capsys) -> None:
    from rsmclip_geo.cli import main
    from rsmclip_geo.tile_index import TileIndex

    scene = shared_data / "geotiff" / "colorado_rgb_15cm.tif"
    common = [str(scene), "--model", str(exported_bundle), "--tile-size", "64"]
    assert main(["-q", "index", *common, "--backend", "torch", "--device", "cpu", "-o", str(tmp_path / "t.parquet")]) == 0
    assert main(["-q", "index", *common, "-o", str(tmp_path / "o.parquet")]) == 0
    torch_index, onnx_index = TileIndex.open(tmp_path / "t.parquet"), TileIndex.open(tmp_path / "o.parquet")
    assert torch_index.column("tile_id").tolist() == onnx_index.column("tile_id").tolist()
    np.testing.assert_allclose(torch_index.embeddings().astype(np.float32), onnx_index.embeddings().astype(np.float32),
                               atol=2e-3)
    capsys.readouterr()
    assert main(["index", *common, "--backend", "torch", "--engine", "ray", "-o", str(tmp_path / "r")]) == 2
    assert main(["index", *common, "--device", "cpu", "-o", str(tmp_path / "d.parquet")]) == 2
    errors = capsys.readouterr().err.splitlines()
    refusal = ("its encoder actors run ONNX Runtime; load the model with backend='onnx' or index with the local engine"
               if importlib.util.find_spec("ray") else "needs Ray Data; pip install 'rsmclip-geo[ray]'")
    assert len(errors) == 2 and errors[0].startswith(f"rsmclip-geo: error: --engine ray: {refusal}"), errors
    assert errors[1] == ("rsmclip-geo: error: --device cpu: a device is for the torch backend; choose that backend or "
                         "give no device")


def test_parity_on_real_aid_images(exported_bundle: Path, tiny_model, shared_data: Path) -> None:
    """Beyond the packaged probes: torch + open_clip transform vs runtime preprocessing + ONNX, 30 AID classes."""
    from PIL import Image

    loaded = create_model(None, checkpoint=tiny_model.checkpoint)
    files = [sorted(d.glob("*.jpg"))[7] for d in sorted((shared_data / "aid").iterdir())]
    images = [Image.open(p).convert("RGB") for p in files]
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(
            loaded.model.encode_image(torch.stack([loaded.preprocess(im) for im in images])), dim=-1).numpy()
    got = load_model(exported_bundle, providers=["cpu"]).encode_images([np.asarray(im) for im in images])
    assert len(files) == 30
    assert np.sum(expected * got, axis=1).min() >= 0.99999


@pytest.mark.slow
def test_vit_b32_random_weights_export(tmp_path: Path, shared_data: Path) -> None:
    """The real ViT-B-32 architecture (CLIP BPE text tower, converted tokenizer.json), random weights."""
    torch.manual_seed(0)
    loaded = create_model("ViT-B-32")
    out = export_bundle(loaded, tmp_path / "vit-b-32")
    info = load_bundle(out).info
    assert info.embed_dim == 512 and info.image_size == 224 and info.context_length == 77 and info.pad_id == 0
    assert info.parity["image_min_cosine"] >= 0.99999 and info.parity["text_min_cosine"] >= 0.99999
    assert info.parity["tokenizer_mismatches"] == 0 and info.parity["top1_agreement"] == 1.0
    text = onnx.load(str(out / "text.onnx"), load_external_data=False)
    assert all(d.dim_param for d in text.graph.input[0].type.tensor_type.shape.dim)
