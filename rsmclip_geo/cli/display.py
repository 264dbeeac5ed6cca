"""Text columns for terminals: East Asian wide and fullwidth characters take two columns, combining marks none."""

from __future__ import annotations

import unicodedata

ELLIPSIS = "…"


def char_width(char: str) -> int:
    """Terminal columns of one character."""
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def display_width(text: str) -> int:
    """Terminal columns of a string."""
    return sum(char_width(char) for char in text)


def fit(text: str, width: int, align: str = "<") -> str:
    """`text` in exactly `width` columns: cut with an ellipsis when longer, padded (left- or right-aligned)
    when shorter; control characters are shown as U+FFFD."""
    text = "".join("\ufffd" if unicodedata.category(char) == "Cc" else char for char in text)
    if display_width(text) > width:
        kept, used = [], 0
        for char in text:
            used += char_width(char)
            if used > width - 1:
                break
            kept.append(char)
        text = "".join(kept) + ELLIPSIS
    padding = " " * (width - display_width(text))
    return padding + text if align == ">" else text + padding
