"""Caption translation with a tiny random T5 model and tokenizer built here (meaningless output, real plumbing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from training.data import read_jsonl_records
from training.tokenizer import save_tokenizer
from training.translate import language_generation_kwargs, translate_captions

REPO = Path(__file__).resolve().parents[2]
WORDS = ("many planes are parked near the terminal an airport with a long runway waves on sandy beach "
         "green trees forest dense river bridge over por_Latn spa_Latn").split()


def build_tiny_t5(directory: Path) -> Path:
    """A 1-layer T5 with random weights and a word-level tokenizer (<pad>=0, </s>=1, <unk>=2)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    directory.mkdir(parents=True)
    save_tokenizer(directory, tokenizer, model_max_length=32,
                   special_tokens={"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"})
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                      num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("t5") / "model")


@pytest.fixture()
def captions(tmp_path) -> Path:
    path = tmp_path / "dataset_tiny.json"
    path.write_text(json.dumps({"images": [
        {"filename": "a.jpg", "split": "train", "sentences": [
            {"raw": "many planes are parked near the terminal", "sentid": 0},
            {"raw": "an airport with a long runway", "sentid": 1}]},
        {"filename": "b.jpg", "split": "train", "sentences": [
            {"raw": "waves on sandy beach", "sentid": 2},
            {"raw": "an airport with a long runway", "sentid": 3}]},
        {"filename": "c.jpg", "split": "test", "sentences": [{"raw": "dense green forest", "sentid": 4}]},
    ]}), encoding="utf-8")
    return path


def keyed(path: Path) -> dict[tuple[str, int, str], dict]:
    return {(r["image"], r["sentid"], r["lang"]): r for r in read_jsonl_records(path)}


def test_translates_every_key_and_resumes(tiny_t5, captions, tmp_path):
    out = tmp_path / "out" / "tiny.translations.jsonl"
    assert translate_captions(captions, ["pt", "es"], str(tiny_t5), out, batch_size=2, max_length=8) == 10
    records = keyed(out)
    assert set(records) == {(img, sid, lang) for img, sid in
                            [("a.jpg", 0), ("a.jpg", 1), ("b.jpg", 2), ("b.jpg", 3), ("c.jpg", 4)]
                            for lang in ("pt", "es")}
    assert records[("a.jpg", 1, "pt")]["source"] == "an airport with a long runway"
    # identical sources are translated once and share the text
    assert records[("a.jpg", 1, "pt")]["text"] == records[("b.jpg", 3, "pt")]["text"]
    before = out.read_text(encoding="utf-8")
    assert translate_captions(captions, ["pt", "es"], str(tiny_t5), out) == 0  # all done: nothing to do
    assert out.read_text(encoding="utf-8") == before
    # an interrupted run leaves a torn last line: it is dropped, finished lines are kept, new language added
    out.write_text(before + '{"image": "a.jpg", "sent', encoding="utf-8")
    assert translate_captions(captions, ["pt", "es", "fr"], str(tiny_t5), out, splits=["train"]) == 4
    assert out.read_text(encoding="utf-8").startswith(before)
    records = keyed(out)
    assert len(records) == 14 and ("c.jpg", 4, "fr") not in records


def test_batched_equals_one_by_one(tiny_t5, captions, tmp_path):
    one = tmp_path / "one.jsonl"
    many = tmp_path / "many.jsonl"
    translate_captions(captions, ["de"], str(tiny_t5), one, batch_size=1, max_length=8)
    translate_captions(captions, ["de"], str(tiny_t5), many, batch_size=4, max_length=8)
    assert {k: r["text"] for k, r in keyed(one).items()} == {k: r["text"] for k, r in keyed(many).items()}


def test_nllb_style_language_tokens_force_the_first_token(tiny_t5, captions, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_t5))
    assert language_generation_kwargs(tokenizer, "en", "pt") == {"forced_bos_token_id": tokenizer.convert_tokens_to_ids("por_Latn")}
    assert language_generation_kwargs(tokenizer, "en", "ko") == {}  # no kor_Hang token: target given otherwise
    out = tmp_path / "nllb.jsonl"
    translate_captions(captions, ["pt", "es"], str(tiny_t5), out, max_length=6)
    for (_, _, lang), record in keyed(out).items():
        assert record["text"].split()[0] == {"pt": "por_Latn", "es": "spa_Latn"}[lang]


def test_cli_and_errors(tiny_t5, captions, tmp_path):
    out = tmp_path / "cli.jsonl"
    ok = subprocess.run([sys.executable, "-m", "training.translate", "--captions", str(captions), "--langs", "it",
                         "--model", str(tiny_t5), "-o", str(out), "--max-length", "6"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert len(read_jsonl_records(out)) == 5
    for args, message in [
        (["--langs", "xx", "--model", str(tiny_t5)], "--langs has unknown language(s) xx"),
        (["--langs", "pt", "--model", str(tmp_path / "no-model")], "translation model"),
    ]:
        bad = subprocess.run([sys.executable, "-m", "training.translate", "--captions", str(captions), *args,
                              "-o", str(tmp_path / "bad.jsonl")], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rsmclip-geo: error: ") and message in lines[0]
