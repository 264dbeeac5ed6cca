"""Train small XLM-R-style tokenizers and write local Hugging Face text-model directories.

The special tokens follow XLM-RoBERTa: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3 (then
``<mask>``), and the post-processor wraps every text in ``<s> … </s>``. A directory written by
:func:`write_hf_text_dir` loads offline with ``transformers.AutoTokenizer`` / ``AutoConfig`` and
with open_clip's HF text tower (``hf_model_name`` = the directory).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


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
