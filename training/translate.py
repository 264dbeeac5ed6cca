"""Machine-translate the English captions of a caption dataset into more languages.

    python -m training.translate --captions dataset_rsicd.json --langs pt,es,fr \\
        --model facebook/nllb-200-distilled-600M -o rsicd.translations.jsonl

Output is a JSONL sidecar, one line per (image, sentid, lang): ``{"image", "sentid", "lang",
"text", "source"}``; ``training.data`` merges it into the dataset. The file is the resume state:
a second run skips every key already written and appends the rest (a torn last line from an
interrupted run is dropped first). Identical source captions are translated once per language.

Target language selection, in order: a model id containing ``{lang}`` loads one model per
language (e.g. ``Helsinki-NLP/opus-mt-en-{lang}``); NLLB / M2M100 tokenizers get the language's
forced BOS token; ``--prefix`` adds a text prefix (T5: ``"translate English to {language}: "``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rsmclip_geo.errors import RsmclipError
from training.data import LANGUAGES, iter_caption_sentences, one_line, read_jsonl_records
from training.evaluate import write_atomic

LANGUAGE_NAMES = {
    "en": "English", "pt": "Portuguese", "es": "Spanish", "fr": "French", "de": "German",
    "nl": "Dutch", "it": "Italian", "zh": "Chinese", "ko": "Korean", "ru": "Russian",
}
NLLB_CODES = {
    "en": "eng_Latn", "pt": "por_Latn", "es": "spa_Latn", "fr": "fra_Latn", "de": "deu_Latn",
    "nl": "nld_Latn", "it": "ita_Latn", "zh": "zho_Hans", "ko": "kor_Hang", "ru": "rus_Cyrl",
}

Key = tuple[str, int, str]


def load_seq2seq(model_id: str, device: str = "cpu"):
    """(tokenizer, model) from a Hugging Face id or a local directory, model in eval mode."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForSeq2SeqLM.from_pretrained(model_id)
    except (OSError, ValueError) as exc:
        raise RsmclipError(
            f"translation model {model_id} cannot be loaded ({one_line(exc)}); "
            "pass a seq2seq model id or a local directory with config.json and tokenizer files"
        ) from exc
    return tokenizer, model.to(device).eval()


def language_generation_kwargs(tokenizer, source: str, target: str) -> dict:
    """Set the tokenizer's source language and return ``forced_bos_token_id`` for the target.

    Empty for models whose target is fixed (Marian) or given by a text prefix (T5).
    """
    get_lang_id = getattr(tokenizer, "get_lang_id", None)
    if callable(get_lang_id):  # M2M100
        tokenizer.src_lang = source
        return {"forced_bos_token_id": get_lang_id(target)}
    vocab = tokenizer.get_vocab()
    if NLLB_CODES.get(target) in vocab:
        if hasattr(tokenizer, "src_lang"):
            tokenizer.src_lang = NLLB_CODES[source]
        return {"forced_bos_token_id": vocab[NLLB_CODES[target]]}
    return {}


def translate_texts(
    tokenizer,
    model,
    texts: Sequence[str],
    *,
    generation_kwargs: dict,
    prefix: str = "",
    max_length: int = 128,
    num_beams: int = 1,
) -> list[str]:
    """Translate one batch (padded, with attention mask) and decode without special tokens."""
    import torch

    inputs = tokenizer([prefix + t for t in texts], return_tensors="pt", padding=True, truncation=True,
                       max_length=max_length)
    inputs = {k: v.to(model.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_length, num_beams=num_beams, **generation_kwargs)
    return [t.strip() for t in tokenizer.batch_decode(output, skip_special_tokens=True)]


def completed_keys(output: Path) -> set[Key]:
    """Keys already in the output file; a torn final line is removed (atomically) first."""
    if not output.exists():
        return set()
    records = read_jsonl_records(output)
    text = output.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        rewrite_jsonl(output, records)
    return {(str(r["image"]), int(r["sentid"]), str(r["lang"])) for r in records}


def rewrite_jsonl(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def translate_captions(
    captions: Path,
    langs: Sequence[str],
    model_id: str,
    output: Path,
    *,
    source_lang: str = "en",
    splits: Sequence[str] | None = None,
    batch_size: int = 32,
    prefix: str = "",
    max_length: int = 128,
    num_beams: int = 1,
    device: str = "cpu",
) -> int:
    """Translate every missing (image, sentid, lang) into ``output``; returns the lines written."""
    unknown = [lang for lang in langs if lang not in LANGUAGE_NAMES]
    if unknown:
        raise RsmclipError(f"--langs has unknown language(s) {','.join(unknown)}; use codes from {','.join(LANGUAGES)}")
    if batch_size < 1:
        raise RsmclipError("--batch-size must be at least 1")
    sentences = [s for s in iter_caption_sentences(captions) if splits is None or s.split in splits]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = completed_keys(output)
    written = 0
    loaded: tuple[str, object, object] | None = None
    with output.open("a", encoding="utf-8") as fh:
        for lang in langs:
            pending: dict[str, list[Key]] = {}
            for s in sentences:
                key = (s.image, s.sentid, lang)
                if key not in done and s.text:
                    pending.setdefault(s.text, []).append(key)
            if not pending:
                continue
            lang_model_id = model_id.replace("{lang}", lang)
            if loaded is None or loaded[0] != lang_model_id:
                loaded = (lang_model_id, *load_seq2seq(lang_model_id, device))
            _, tokenizer, model = loaded
            generation_kwargs = language_generation_kwargs(tokenizer, source_lang, lang)
            lang_prefix = prefix.format(lang=lang, language=LANGUAGE_NAMES[lang])
            sources = list(pending)
            for start in range(0, len(sources), batch_size):
                batch = sources[start : start + batch_size]
                outputs = translate_texts(tokenizer, model, batch, generation_kwargs=generation_kwargs,
                                          prefix=lang_prefix, max_length=max_length, num_beams=num_beams)
                for source, text in zip(batch, outputs):
                    for image, sentid, key_lang in pending[source]:
                        record = {"image": image, "sentid": sentid, "lang": key_lang, "text": text, "source": source}
                        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                        written += 1
                fh.flush()
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.translate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", required=True, type=Path, help="Karpathy-style or NWPU-Captions JSON")
    parser.add_argument("--langs", required=True, help="target languages, comma-separated (e.g. pt,es,fr)")
    parser.add_argument("--model", required=True,
                        help="seq2seq model id or local dir; '{lang}' is replaced by the target language")
    parser.add_argument("-o", "--output", required=True, type=Path, help="JSONL sidecar (appended, resumable)")
    parser.add_argument("--source-lang", default="en")
    parser.add_argument("--splits", default=None, help="only these splits (comma-separated); default all")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prefix", default="", help="text prefix, may use {lang} and {language}")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = translate_captions(
            args.captions, [x.strip() for x in args.langs.split(",") if x.strip()], args.model, args.output,
            source_lang=args.source_lang, splits=args.splits.split(",") if args.splits else None,
            batch_size=args.batch_size, prefix=args.prefix, max_length=args.max_length,
            num_beams=args.num_beams, device=args.device,
        )
    except RsmclipError as exc:
        print(f"rsmclip-geo: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written} translations to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
