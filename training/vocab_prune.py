"""Vocabulary pruning: an XLM-R text tower cut down to the pieces the 10 RS-M-CLIP languages use.

XLM-R's 250,002-piece vocabulary makes the word-embedding matrix the largest tensor of a small text
tower (250,002 × 384 = 96 MB even in int8). Pruning keeps:

* the special tokens and the pieces of the tokenizer's post-processor (e5's "query: " prefix);
* every piece the full tokenizer produces on corpus A (:func:`corpus_a_texts`): the ``wordfreq``
  word lists of the 10 languages (top N words each, lower case, capitalised and, when short, in capitals;
  each alone and inside a word, after a bracket), the project's vocabulary files
  (``training/vocab/*.yaml``: names and templates) and any caption files given;
* every piece written only in Han or Hangul: Chinese has no spaces and Korean glues particles to
  words, so a sentence's pieces depend on their neighbours and no word list reproduces them; and every
  piece of digits, punctuation and symbols only (numbers, markup, "...", "://");
* every piece of one script character (with or without the word mark ``▁``): Latin with the accented
  letters of en pt es fr de nl it, Cyrillic, the CJK ideographs and Hangul syllables and jamo XLM-R
  has, digits and punctuation (:data:`SCRIPT_RANGES`), so text outside the corpus falls back to
  characters rather than ``<unk>``.

A Unigram tokenizer over a subset of the pieces, with the same scores, segments a text exactly as the
full one wherever the full segmentation uses kept pieces only (a subset cannot offer a better path);
elsewhere it picks another segmentation. Corpus B (:func:`catalogue_sentences`, the translation
catalogues Django and Trac ship in their wheels, independent of corpus A) measures how often that
happens (:func:`tokenizer_agreement`), and :func:`unknown_characters` that no script character the
full tokenizer knows becomes ``<unk>``.

:func:`pruned_tokenizer` renumbers the kept pieces (new id = position among the sorted kept ids, so
``<s>``, ``<pad>``, ``</s>``, ``<unk>`` stay 0-3) and :func:`prune_text_tower` slices the HF text
tower's word embeddings to match: the pruned model gives the full model's embedding for every text
whose pieces are kept. :func:`prune_loaded_model` does both for the exporter
(``training.export --prune-vocabulary N``).
"""

from __future__ import annotations

import copy
import gettext
import json
import logging
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex
from tokenizers import Tokenizer

from rsmclip_geo.errors import RsmclipError
from training.data import LANGUAGES
from training.tokenizer import SPECIAL_TOKENS, UNK_ID

log = logging.getLogger("training.vocab_prune")

DEFAULT_WORDS_PER_LANGUAGE = 50_000
ACRONYM_LETTERS = 4
VOCAB_DIR = Path(__file__).resolve().parent / "vocab"
WORD_MARK = "▁"
#: pieces kept whole: scripts written without spaces between words, or with particles glued on
WHOLE_SCRIPTS = ("Han", "Hangul")
#: the characters of the 10 languages' scripts (inclusive code point ranges)
SCRIPT_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "latin": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x17F)),
    "cyrillic": ((0x400, 0x4FF),),
    "han": ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF)),
    "hangul": ((0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7A3)),
    "digits": ((0x30, 0x39),),
    "punctuation": ((0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E), (0xA1, 0xBF), (0x2010, 0x2027),
                    (0x2030, 0x205E), (0x20AC, 0x20AC), (0x3000, 0x303F), (0xFF01, 0xFF65)),
}
#: corpus B: gettext catalogue folders of each language in the Django and Trac wheels ("en": the source texts)
CATALOGUE_LOCALES = {"pt": ("pt", "pt_BR"), "zh": ("zh_Hans", "zh_Hant", "zh_CN", "zh_TW")}
CATALOGUE_PACKAGES = ("django", "trac")


@dataclass
class PruningReport:
    """What pruning kept (bundle.json's ``vocabulary_pruning``)."""

    kept_pieces: int
    full_pieces: int
    words_per_language: int
    languages: list[str]
    texts: list[str] = field(default_factory=list)
    whole_scripts: list[str] = field(default_factory=lambda: list(WHOLE_SCRIPTS))

    def as_dict(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {"kept_pieces": self.kept_pieces, "full_pieces": self.full_pieces,
                "corpus": {"wordfreq_words_per_language": self.words_per_language, "wordfreq": version("wordfreq"),
                           "languages": self.languages,
                           "vocabulary_files": sorted(path.name for path in VOCAB_DIR.glob("*.yaml")),
                           "texts": self.texts, "whole_scripts": self.whole_scripts,
                           "script_characters": sorted(SCRIPT_RANGES)}}


# ---------------------------------------------------------------- corpus A


def script_characters(scripts: Iterable[str] = SCRIPT_RANGES) -> list[str]:
    """Every character of the named :data:`SCRIPT_RANGES`."""
    return [chr(code) for name in scripts for low, high in SCRIPT_RANGES[name] for code in range(low, high + 1)]


def wordfreq_words(languages: Sequence[str] = LANGUAGES, per_language: int = DEFAULT_WORDS_PER_LANGUAGE) -> list[str]:
    """The ``per_language`` most frequent words of each language in ``wordfreq``'s "best" lists, as written in
    text (:func:`word_forms`), sorted."""
    try:
        import wordfreq
    except ModuleNotFoundError as exc:
        raise RsmclipError("wordfreq: not installed; pip install wordfreq (the train extra)") from exc
    return sorted({form for lang in languages for word in wordfreq.top_n_list(lang, per_language, wordlist="best")
                   for form in word_forms(word, lang)})


def word_forms(word: str, language: str) -> set[str]:
    """The forms of a wordfreq word (lower case, ß folded to "ss") found in text: as listed, capitalised,
    in capitals when at most 4 letters long (acronyms), and for German with "ß" for "ss"."""
    forms = {word, word[:1].upper() + word[1:]}
    if len(word) <= ACRONYM_LETTERS:
        forms.add(word.upper())
    if language == "de" and "ss" in word:
        forms |= {form.replace("ss", "ß") for form in forms}
    return forms


def word_lines(words: Sequence[str], per_line: int = 500) -> list[str]:
    """Each word alone and after an opening bracket (so its pieces inside a word are kept too), joined by
    spaces into lines: the tokenizer splits at spaces, and long lines tokenise much faster than single words."""
    forms = [form for word in words for form in (word, f"({word}")]
    return [" ".join(forms[start:start + per_line]) for start in range(0, len(forms), per_line)]


def vocabulary_texts(directory: Path = VOCAB_DIR) -> list[str]:
    """Every string (class names, caption templates with ``{}`` removed) of the vocabulary YAML files."""
    import yaml

    def strings(node: Any) -> Iterable[str]:
        if isinstance(node, str):
            yield node.replace("{}", " ").strip()
        elif isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)

    return [text for path in sorted(directory.glob("*.yaml"))
            for text in strings(yaml.safe_load(path.read_text(encoding="utf-8"))) if text]


def text_file_lines(paths: Iterable[str | Path]) -> list[str]:
    """The non-empty lines of text files (e.g. caption CSVs: whole lines are tokenised)."""
    lines = []
    for path in paths:
        try:
            lines.extend(line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())
        except (OSError, UnicodeDecodeError) as exc:
            raise RsmclipError(f"prune_texts={path}: cannot read it as UTF-8 text ({exc}); "
                               "pass caption files with one text a line") from exc
    return lines


def corpus_a_texts(words_per_language: int = DEFAULT_WORDS_PER_LANGUAGE, text_files: Sequence[str | Path] = (),
                   languages: Sequence[str] = LANGUAGES) -> list[str]:
    """Corpus A: wordfreq's top words of each language, the vocabulary files' names and templates, and
    the lines of ``text_files``."""
    return word_lines(wordfreq_words(languages, words_per_language)) + vocabulary_texts() + text_file_lines(text_files)


# ---------------------------------------------------------------- the kept pieces


def _pieces(tokenizer: Tokenizer) -> list[str]:
    model = json.loads(tokenizer.to_str())["model"]
    if model.get("type") != "Unigram":
        raise RsmclipError(f"tokenizer: a {model.get('type')} model; vocabulary pruning needs a Unigram (XLM-R) one")
    return [piece for piece, _ in model["vocab"]]


def script_piece_ids(tokenizer: Tokenizer) -> set[int]:
    """Ids of the pieces written only in :data:`WHOLE_SCRIPTS` or only in digits, punctuation and symbols, of
    the one-character pieces of :data:`SCRIPT_RANGES` and of the characters they normalise to (each with or
    without the word mark), and of the word mark alone."""
    characters = set(script_characters())
    if tokenizer.normalizer is not None:  # and what they normalise to ("ŉ" -> "ʼn", "¸" -> " " + U+0327)
        characters |= {c for text in characters for c in tokenizer.normalizer.normalize_str(text)}
    whole = regex.compile("|".join([rf"\p{{{script}}}+" for script in WHOLE_SCRIPTS] + [r"[\p{N}\p{P}\p{S}]+"]))
    kept = set()
    for piece_id, piece in enumerate(_pieces(tokenizer)):
        text = piece[1:] if piece.startswith(WORD_MARK) else piece
        if not text or text in characters or whole.fullmatch(text):
            kept.add(piece_id)
    return kept


def kept_piece_ids(tokenizer: Tokenizer, texts: Iterable[str]) -> list[int]:
    """Sorted ids of the pieces to keep: the special tokens, every id the full ``tokenizer`` gives ``texts``
    (its post-processor's own ids included), and :func:`script_piece_ids`."""
    kept = {tokenizer.token_to_id(token) for token in SPECIAL_TOKENS} | script_piece_ids(tokenizer)
    if None in kept:
        raise RsmclipError(f"tokenizer: lacks one of the special tokens {', '.join(SPECIAL_TOKENS)}")
    for encoding in tokenizer.encode_batch(list(texts)):
        kept.update(encoding.ids)
    return sorted(kept)


# ---------------------------------------------------------------- the pruned tokenizer and tower


def _remap_post_processor(processor: dict[str, Any] | None, new_id: dict[int, int]) -> None:
    """Renumber the ids a TemplateProcessing (or a Sequence of them) writes, in place."""
    if processor is None:
        return
    if processor["type"] == "Sequence":
        for item in processor["processors"]:
            _remap_post_processor(item, new_id)
    elif processor["type"] == "TemplateProcessing":
        for special in processor["special_tokens"].values():
            special["ids"] = [new_id[i] for i in special["ids"]]
    elif processor["type"] not in ("ByteLevel",):
        raise RsmclipError(f"tokenizer: post-processor {processor['type']} cannot be renumbered for pruning")


def pruned_tokenizer(tokenizer: Tokenizer, kept: Sequence[int]) -> Tokenizer:
    """``tokenizer`` over the ``kept`` pieces only (same scores, normaliser, pre-tokeniser, decoder and
    post-processor), piece ``kept[i]`` renumbered ``i``."""
    data = json.loads(tokenizer.to_str())
    vocab = data["model"]["vocab"]
    if list(kept) != sorted(set(kept)) or not kept or kept[-1] >= len(vocab):
        raise RsmclipError(f"kept: {len(kept)} ids; give sorted, distinct ids below {len(vocab)}")
    new_id = {old: new for new, old in enumerate(kept)}
    missing = [token for token in SPECIAL_TOKENS if tokenizer.token_to_id(token) not in new_id]
    if missing or new_id.get(UNK_ID) != UNK_ID:
        raise RsmclipError(f"kept: must hold the special tokens 0-3 and {', '.join(missing) or '<mask>'}")
    data["model"]["vocab"] = [vocab[i] for i in kept]
    data["model"]["unk_id"] = new_id[data["model"]["unk_id"]]
    for token in data["added_tokens"]:
        token["id"] = new_id[token["id"]]
    _remap_post_processor(data["post_processor"], new_id)
    for key in ("padding",):
        if data.get(key) and "pad_id" in data[key]:
            data[key]["pad_id"] = new_id[data[key]["pad_id"]]
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def prune_text_tower(clip_model: Any, kept: Sequence[int]) -> None:
    """Slice the HF text tower's word embeddings of an open_clip model to the ``kept`` rows (in place) and set
    its config's vocab_size; the padding row keeps its new id."""
    import torch

    transformer = getattr(getattr(clip_model, "text", None), "transformer", None)
    embeddings = getattr(getattr(transformer, "embeddings", None), "word_embeddings", None)
    if embeddings is None:
        raise RsmclipError("model: vocabulary pruning needs an HF text tower (text.transformer.embeddings)")
    if kept[-1] >= embeddings.num_embeddings:
        raise RsmclipError(f"kept: id {kept[-1]} beyond the {embeddings.num_embeddings} word embeddings")
    padding_idx = embeddings.padding_idx
    new_padding = list(kept).index(padding_idx) if padding_idx is not None else None
    rows = torch.as_tensor(list(kept), dtype=torch.long)
    sliced = torch.nn.Embedding(len(kept), embeddings.embedding_dim, padding_idx=new_padding,
                                dtype=embeddings.weight.dtype, device=embeddings.weight.device)
    with torch.no_grad():
        sliced.weight.copy_(embeddings.weight[rows])
    transformer.embeddings.word_embeddings = sliced
    transformer.config.vocab_size = len(kept)


def prune_loaded_model(loaded: Any, words_per_language: int = DEFAULT_WORDS_PER_LANGUAGE,
                       text_files: Sequence[str | Path] = ()) -> PruningReport:
    """Prune a ``training.model.LoadedModel`` with an XLM-R HF text tower in place: its word embeddings, HF
    config, tokenizer.json and torch tokenizer, so the exporter's parity checks compare the pruned model."""
    import open_clip.tokenizer

    from training.model import _materialise_hf_text_dir

    if not loaded.is_hf_text or not loaded.tokenizer_json:
        raise RsmclipError(f"{loaded.name}: vocabulary pruning needs an HF text tower with a tokenizer.json")
    full = Tokenizer.from_str(loaded.tokenizer_json)
    full_pieces = full.get_vocab_size(with_added_tokens=True)
    kept = kept_piece_ids(full, corpus_a_texts(words_per_language, text_files))
    prune_text_tower(loaded.model, kept)
    loaded.tokenizer_json = pruned_tokenizer(full, kept).to_str()
    loaded.hf_text_config = {**copy.deepcopy(loaded.hf_text_config), "vocab_size": len(kept)}
    with tempfile.TemporaryDirectory(prefix="rsmclip-pruned-") as directory:
        _materialise_hf_text_dir(Path(directory), loaded.hf_text_config, loaded.tokenizer_json,
                                 loaded.tokenizer_special_tokens, loaded.context_length)
        loaded.tokenizer = open_clip.tokenizer.HFTokenizer(directory, context_length=loaded.context_length)
    report = PruningReport(len(kept), full_pieces, words_per_language, list(LANGUAGES),
                           [Path(path).name for path in text_files])
    log.info("vocabulary pruned to %d of %d pieces", len(kept), full_pieces)
    return report


# ---------------------------------------------------------------- corpus B and the checks


def catalogue_sentences(language: str) -> list[str]:
    """Corpus B: the distinct translated messages of the gettext catalogues (.mo) that the Django and Trac
    wheels ship for ``language`` (for "en", their English source messages; messages left in English are
    not counted as translations), sorted."""
    import importlib.util

    texts: set[str] = set()
    for package in CATALOGUE_PACKAGES:
        spec = importlib.util.find_spec(package)  # found, not imported: only its data files are read
        if spec is None or not spec.submodule_search_locations:
            raise RsmclipError(f"{package}: not installed; pip install Django Trac (the dev extra)")
        for path in sorted(Path(spec.submodule_search_locations[0]).rglob("*.mo")):
            locale = path.parts[-3]
            if language != "en" and locale not in CATALOGUE_LOCALES.get(language, (language,)):
                continue
            with path.open("rb") as handle:
                catalogue = gettext.GNUTranslations(handle)._catalog
            for key, message in catalogue.items():
                source = (key[0] if isinstance(key, tuple) else key).split("\x04")[-1]  # without the context
                if language == "en":
                    message = source
                elif message == source:  # left in English
                    continue
                if key != "" and message.strip():
                    texts.add(message)
    return sorted(texts)


def tokenizer_agreement(full: Tokenizer, pruned: Tokenizer, texts: Sequence[str]) -> list[str]:
    """The texts whose pieces (as strings) differ between the full and the pruned tokenizer."""
    full_encodings = full.encode_batch(list(texts))
    pruned_encodings = pruned.encode_batch(list(texts))
    return [text for text, a, b in zip(texts, full_encodings, pruned_encodings) if a.tokens != b.tokens]


def unknown_characters(full: Tokenizer, pruned: Tokenizer, characters: Iterable[str] | None = None) -> list[str]:
    """Script characters (default: all of :data:`SCRIPT_RANGES`) the full tokenizer has pieces for but the
    pruned one writes as ``<unk>``, alone or inside a word (the character twice)."""
    characters = list(characters if characters is not None else script_characters())
    texts = characters + [character * 2 for character in characters]  # alone, and inside a word
    unk_full, unk_pruned = full.token_to_id("<unk>"), pruned.token_to_id("<unk>")
    full_encodings = full.encode_batch(texts, add_special_tokens=False)
    pruned_encodings = pruned.encode_batch(texts, add_special_tokens=False)
    return sorted({text[0] for text, a, b in zip(texts, full_encodings, pruned_encodings)
                   if unk_full not in a.ids and unk_pruned in b.ids})
