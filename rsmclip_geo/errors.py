"""User-facing errors: one line that names the file or parameter and says what to do."""

from __future__ import annotations

from collections.abc import Callable


class RsmclipError(Exception):
    """An error caused by the user's input or environment, reported without a traceback.

    When a parameter is at fault, `param` names it as the library does (`overlap`) and `value` is what
    was given; the message then starts with `param=value` (or `param:` when no value was given), which
    `worded` lets each shell say in its own words (a CLI flag, a panel field, a Processing parameter).
    """

    def __init__(self, message: str, *, param: str | None = None, value: object = None):
        super().__init__(message)
        self.param = param
        self.value = value

    def worded(self, name: Callable[[str], str | None]) -> str:
        """The message with its leading `param=` replaced by `name(param)` and a space, or `param:` by
        `name(param)` and a colon (unchanged when `name` returns None or the message does not start so)."""
        text = str(self)
        word = name(self.param) if self.param else None
        if word is not None and text.startswith(f"{self.param}="):
            return f"{word} {text[len(self.param) + 1:]}"
        if word is not None and text.startswith(f"{self.param}:"):
            return f"{word}{text[len(self.param):]}"
        return text


class BundleError(RsmclipError):
    """A model bundle is missing, incomplete or inconsistent."""


class RasterError(RsmclipError):
    """A raster cannot be read or has no usable band layout."""


class TileIndexError(RsmclipError):
    """A tile index is missing, corrupt or was built with another model."""


class QueryError(RsmclipError):
    """A search query or its parameters are unusable."""


def first_line(exc: BaseException, *, root_cause: bool = False) -> str:
    """The first line of an exception's message (at most 200 characters; its type when it has none);
    with `root_cause`, of the exception at the end of its __cause__ chain (GDAL's own reason)."""
    while root_cause and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
