"""Vocabulary pruning (training/vocab_prune.py): the pruned XLM-R tokenizer against the full one on corpus B
(the Django and Trac translation catalogues, ≥ 1,000 sentences in each of the 10 languages), script
characters never becoming <unk>, the sliced text tower giving the full tower's embeddings, and the
exporter's --prune-vocabulary bundle loading in the runtime with the same ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from rsmclip_geo.errors import RsmclipError
from rsmclip_geo.tokenizer import TextTokenizer
from training.data import LANGUAGES
from training.pretrained import E5_TEXT_PREFIX, prefixed_tokenizer
from training.tokenizer import PAD_ID, SPECIAL_TOKENS, xlmr_tokenizer
from training.vocab_prune import (
    catalogue_sentences,
    corpus_a_texts,
    kept_piece_ids,
    prune_text_tower,
    pruned_tokenizer,
    tokenizer_agreement,
    unknown_characters,
)

#: measured with the default corpus A (50,000 words a language + vocabulary files + UCM captions): 98.5-99.8 %;
#: the sentences that differ hold words no corpus-A word has, e.g. jQuery, MySQL, "größe" in compounds
MIN_AGREEMENT = 0.98


@pytest.fixture(scope="module")
def full() -> Tokenizer:
    return prefixed_tokenizer(xlmr_tokenizer(), E5_TEXT_PREFIX)


@pytest.fixture(scope="module")
def kept(full: Tokenizer, shared_data: Path) -> list[int]:
    return kept_piece_ids(full, corpus_a_texts(text_files=[shared_data / "ucm" / "captions.csv"]))


@pytest.fixture(scope="module")
def pruned(full: Tokenizer, kept: list[int]) -> Tokenizer:
    return pruned_tokenizer(full, kept)


@pytest.fixture(scope="module")
def corpus_b() -> dict[str, list[str]]:
    return {lang: catalogue_sentences(lang) for lang in LANGUAGES}


def test_corpus_b_has_1000_sentences_in_each_language(corpus_b: dict[str, list[str]]) -> None:
    assert sorted(corpus_b) == sorted(LANGUAGES)
    for lang, sentences in corpus_b.items():
        assert len(sentences) >= 1000, lang
    assert any("飞机" in s or "的" in s for s in corpus_b["zh"]) and any("의" in s for s in corpus_b["ko"])
    assert len(set(corpus_b["de"]) & set(corpus_b["en"])) < 30  # translations ("Name", "Version"), not the source


def test_pruning_keeps_a_fraction_of_the_pieces_and_the_specials(full: Tokenizer, kept: list[int],
                                                                 pruned: Tokenizer) -> None:
    assert 50_000 < len(kept) < 110_000 < full.get_vocab_size()
    assert pruned.get_vocab_size() == len(kept)
    for new_id, token in enumerate(SPECIAL_TOKENS[:4]):
        assert pruned.token_to_id(token) == new_id
    assert pruned.token_to_id("<mask>") == len(kept) - 1
    text = "Aviões estacionados perto do terminal"
    assert pruned.encode(text).tokens == full.encode(text).tokens
    assert pruned.encode(text).tokens[:4] == ["<s>", "▁que", "ry", ":"]  # e5's "query: " prefix, renumbered
    assert [kept[i] for i in pruned.encode(text).ids] == full.encode(text).ids


def test_pruned_tokenizer_gives_the_full_pieces_on_corpus_b(full: Tokenizer, kept: list[int], pruned: Tokenizer,
                                                            corpus_b: dict[str, list[str]]) -> None:
    kept_set = set(kept)
    agreement = {}
    for lang, sentences in corpus_b.items():
        differing = tokenizer_agreement(full, pruned, sentences)
        agreement[lang] = 1 - len(differing) / len(sentences)
        for text in differing:  # only where the full segmentation needs a piece that was not kept
            full_ids = full.encode(text).ids
            assert not set(full_ids) <= kept_set, text
            assert (3 in pruned.encode(text).ids) <= (3 in full_ids), text
    assert min(agreement.values()) >= MIN_AGREEMENT, agreement


def test_no_script_character_becomes_unknown(full: Tokenizer, pruned: Tokenizer) -> None:
    assert unknown_characters(full, pruned) == []
    assert "<unk>" not in pruned.encode("Ÿ ÿ œ ß ñ ç Ё ё 龘 갂 ㅎ ᄀ 「」《》").tokens


def test_pruned_tokenizer_json_loads_in_the_runtime_with_the_same_ids(
        tmp_path: Path, full: Tokenizer, kept: list[int], pruned: Tokenizer, corpus_b: dict[str, list[str]]) -> None:
    full.save(str(tmp_path / "full.json"))
    pruned.save(str(tmp_path / "pruned.json"))
    runtime_full = TextTokenizer(tmp_path / "full.json", 77, PAD_ID)
    runtime_pruned = TextTokenizer(tmp_path / "pruned.json", 77, PAD_ID)
    texts = [text for lang in LANGUAGES for text in corpus_b[lang][::40]]
    kept_set = set(kept)
    texts = [text for text, encoding in zip(texts, full.encode_batch(texts)) if set(encoding.ids) <= kept_set]
    assert len(texts) > 400
    old_ids = np.asarray(kept)
    assert np.array_equal(old_ids[runtime_pruned.encode(texts)], runtime_full.encode(texts))


def test_pruned_text_tower_gives_the_full_embeddings(tiny_model) -> None:
    from training.model import create_model

    loaded = create_model(None, checkpoint=tiny_model.checkpoint)
    texts = ["an airport with planes", "um porto com navios", "机场", "Аэропорт с самолётами", "항구"]
    full = Tokenizer.from_str(loaded.tokenizer_json)
    kept = sorted({*range(4), full.token_to_id("<mask>")} | {i for e in full.encode_batch(texts) for i in e.ids})
    assert len(kept) < full.get_vocab_size() // 2
    pruned = pruned_tokenizer(full, kept)
    ids = [full.encode(text).ids for text in texts]
    pruned_ids = [pruned.encode(text).ids for text in texts]
    assert [[kept[i] for i in row] for row in pruned_ids] == ids

    def embed(rows: list[list[int]]) -> torch.Tensor:
        length = max(map(len, rows))
        batch = torch.tensor([row + [PAD_ID] * (length - len(row)) for row in rows])
        with torch.inference_mode():
            return loaded.model.encode_text(batch)

    before = embed(ids)
    prune_text_tower(loaded.model, kept)
    assert loaded.model.text.transformer.embeddings.word_embeddings.num_embeddings == len(kept)
    assert loaded.model.text.transformer.config.vocab_size == len(kept)
    assert torch.allclose(embed(pruned_ids), before, atol=1e-5, rtol=0)


def test_pruned_tokenizer_refuses_kept_ids_without_the_specials(full: Tokenizer) -> None:
    with pytest.raises(RsmclipError, match="special tokens"):
        pruned_tokenizer(full, [0, 1, 2, 10, 20])
    with pytest.raises(RsmclipError, match="sorted"):
        pruned_tokenizer(full, [3, 2, 1, 0])


def test_export_prunes_the_vocabulary_and_keeps_parity(tmp_path: Path, tiny_model) -> None:
    from training.export import export_bundle
    from training.model import create_model

    loaded = create_model(None, checkpoint=tiny_model.checkpoint)
    full_size = Tokenizer.from_str(loaded.tokenizer_json).get_vocab_size()
    bundle = export_bundle(loaded, tmp_path / "pruned", prune_vocabulary=300)
    info = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))
    pruning = info["vocabulary_pruning"]
    assert pruning["full_pieces"] == full_size and pruning["kept_pieces"] < full_size
    assert pruning["corpus"]["wordfreq_words_per_language"] == 300
    assert info["parity"]["tokenizer_mismatches"] == 0 and info["parity"]["text_min_cosine"] >= 0.99999
    assert Tokenizer.from_file(str(bundle / "tokenizer.json")).get_vocab_size() == pruning["kept_pieces"]
    assert f"vocab {pruning['kept_pieces']}" in info["architecture"]


def test_export_refuses_an_unreadable_prune_text_and_writes_nothing(tmp_path: Path, tiny_model) -> None:
    from training.export import export_bundle
    from training.model import create_model

    loaded = create_model(None, checkpoint=tiny_model.checkpoint)
    (tmp_path / "captions.bin").write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(RsmclipError, match=r"^prune_texts=.*captions.bin: cannot read it as UTF-8 text"):
        export_bundle(loaded, tmp_path / "out", prune_vocabulary=10, prune_texts=[tmp_path / "captions.bin"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.bin"]
