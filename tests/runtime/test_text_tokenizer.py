"""The runtime's text tokenizer on the checked-in tiny bundle's tokenizer.json: cleaning and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from rsmclip_geo.errors import BundleError, QueryError
from rsmclip_geo.tokenizer import TextTokenizer, clean_text


def test_clean_text() -> None:
    assert clean_text("  a \n b&amp;amp;c ") == "a b&c"


def test_bad_inputs(tiny_bundle: Path, tmp_path: Path) -> None:
    tokenizer = TextTokenizer(tiny_bundle / "tokenizer.json", 32, 1)
    with pytest.raises(QueryError, match="no text"):
        tokenizer.encode([])
    with pytest.raises(QueryError, match="strings"):
        tokenizer.encode([b"bytes"])  # type: ignore[list-item]
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{}")
    with pytest.raises(BundleError, match="tokenizer.json"):
        TextTokenizer(broken, 32, 1)
