"""Tokenizers made in training: the trained XLM-R-style tokenizer, its HF directory, and the runtime reading the
tokenizer.json an export writes as open_clip's tokenizers do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from build_test_bundle import REPO_ROOT, multilingual_corpus

from rsmclip_geo.tokenizer import TextTokenizer
from training.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, train_tokenizer, write_hf_text_dir


def probe_texts() -> list[str]:
    data = json.loads((REPO_ROOT / "training" / "probes" / "texts.json").read_text(encoding="utf-8"))
    return [text for sentences in data.values() for text in sentences]


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_trained_tokenizer_has_xlmr_special_ids(kind: str) -> None:
    tokenizer = train_tokenizer(multilingual_corpus(), vocab_size=300, kind=kind)
    assert [tokenizer.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [BOS_ID, PAD_ID, EOS_ID, UNK_ID]
    ids = tokenizer.encode("um aeroporto").ids
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and len(ids) > 2
    assert UNK_ID not in tokenizer.encode("储油罐").ids


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_han_characters_are_tokens_of_their_own_in_any_context(kind: str) -> None:
    corpus = ["机场", "有飞机的机场", "机场跑道", "港口", "一个港口的卫星图像", "airport seen from above"] * 20
    tokenizer = train_tokenizer(corpus, vocab_size=120, kind=kind)
    alone = tokenizer.encode("机场").tokens[1:-1]
    assert alone[-2:] == ["机", "场"]
    assert tokenizer.encode("卫星图像中的机场").tokens[-3:-1] == ["机", "场"]  # the same tokens inside a phrase
    merged = train_tokenizer(corpus, vocab_size=120, kind=kind, isolate_han=False)
    assert merged.encode("卫星图像中的机场").tokens[-3:-1] != merged.encode("机场").tokens[-3:-1]


def test_hf_text_dir_loads_offline_with_transformers(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tokenizer = train_tokenizer(multilingual_corpus(), vocab_size=300)
    directory = write_hf_text_dir(tmp_path / "hf", tokenizer, context_length=16, hidden_size=32,
                                  num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config = AutoConfig.from_pretrained(directory)
    assert (config.model_type, config.pad_token_id, config.bos_token_id, config.eos_token_id) == ("xlm-roberta", 1, 0, 2)
    hf = AutoTokenizer.from_pretrained(directory)
    batch = hf(["campo de golf", "机场"], padding="max_length", max_length=16, truncation=True)
    ids = tokenizer.encode("campo de golf").ids
    assert batch.input_ids[0] == ids + [PAD_ID] * (16 - len(ids))
    assert batch.input_ids[1][-1] == PAD_ID
    AutoModel.from_config(config)  # the text tower builds from the directory


def test_runtime_tokenizer_matches_open_clip_hf_tokenizer(tiny_model, exported_bundle: Path) -> None:
    import open_clip.tokenizer

    info = json.loads((exported_bundle / "bundle.json").read_text())
    reference = open_clip.tokenizer.HFTokenizer(str(tiny_model.hf_text_dir), context_length=info["context_length"])
    texts = probe_texts() + ["  spaces   and\ttabs ", "&amp; entities &lt;b&gt;", "word " * 100]
    expected = reference(texts).numpy()
    got = TextTokenizer(exported_bundle / "tokenizer.json", info["context_length"], info["pad_id"]).encode(texts)
    assert got.dtype == np.int64 and got.shape[1] <= info["context_length"]
    padded = np.full_like(expected, info["pad_id"])
    padded[:, : got.shape[1]] = got
    np.testing.assert_array_equal(padded, expected)
    assert got[-1, -1] == EOS_ID  # truncated text keeps its end token


def test_clip_bpe_conversion_matches_open_clip_tokenizer(tmp_path: Path) -> None:
    import open_clip

    from training.export import clip_bpe_tokenizer_json

    reference = open_clip.get_tokenizer("ViT-B-32")
    path = tmp_path / "tokenizer.json"
    path.write_text(clip_bpe_tokenizer_json(reference), encoding="utf-8")
    texts = probe_texts() + ["Hello   World!!", "it's a DOG's life", "café naïve 123 4567", "rocket 🚀",
                             "&amp; html &lt;b&gt;", "tab\tnew\nline", "long " * 120]
    expected = reference(texts).numpy()
    got = TextTokenizer(path, 77, 0).encode(texts)
    padded = np.zeros_like(expected)
    padded[:, : got.shape[1]] = got
    np.testing.assert_array_equal(padded, expected)
