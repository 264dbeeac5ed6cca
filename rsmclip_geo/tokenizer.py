"""Text tokenisation from a bundle's tokenizer.json (Hugging Face `tokenizers`), without transformers.

Texts are cleaned like open_clip's tokenizers (HTML entities unescaped, runs of whitespace collapsed),
encoded with the tokenizer's own normaliser and post-processor (start/end tokens), truncated to the
context length (keeping the end token) and padded with pad_id to the longest text of the batch.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rsmclip_geo.errors import BundleError, QueryError


def clean_text(text: str) -> str:
    """HTML-unescape twice and collapse whitespace (open_clip's cleaning, minus ftfy's mojibake repair)."""
    return " ".join(html.unescape(html.unescape(text)).split())


class TextTokenizer:
    """tokenizer.json -> int64 ids [B, L], L <= context_length."""

    def __init__(self, path: str | Path, context_length: int, pad_id: int) -> None:
        from tokenizers import Tokenizer

        self.path = Path(path)
        self.context_length = int(context_length)
        self.pad_id = int(pad_id)
        try:
            self._tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises a bare Exception for bad files
            raise BundleError(f"{self.path}: not a valid tokenizer.json ({str(exc).splitlines()[0]}); "
                              "re-export the bundle") from exc
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.context_length)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids for each text, padded with pad_id to the longest one."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise QueryError("texts: no text given")
        for text in texts:
            if not isinstance(text, str):
                raise QueryError(f"texts: expected strings, got {type(text).__name__}")
        encodings = self._tokenizer.encode_batch([clean_text(text) for text in texts])
        length = max(len(encoding.ids) for encoding in encodings)
        ids = np.full((len(encodings), length), self.pad_id, dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
        return ids

    def unknown_share(self, text: str) -> float:
        """Share of a text's tokens that are the unknown token (characters the tokenizer has no piece for);
        bare word-start markers do not count."""
        unknown = self._tokenizer.token_to_id("<unk>")
        encoding = self._tokenizer.encode(clean_text(text), add_special_tokens=False)
        ids = [i for i, token in zip(encoding.ids, encoding.tokens) if token != "▁"]
        return ids.count(unknown) / len(ids) if unknown is not None and ids else 0.0

    def tokens(self, text: str) -> list[str]:
        """The token strings of one text (without start/end tokens), for vocabulary checks."""
        return self._tokenizer.encode(clean_text(text), add_special_tokens=False).tokens
