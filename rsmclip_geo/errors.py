"""User-facing errors: one line that names the file or parameter and says what to do."""


class RsmclipError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""


class BundleError(RsmclipError):
    """A model bundle is missing, incomplete or inconsistent."""


class RasterError(RsmclipError):
    """A raster cannot be read or has no usable band layout."""


class TileIndexError(RsmclipError):
    """A tile index is missing, corrupt or was built with another model."""


class QueryError(RsmclipError):
    """A search query or its parameters are unusable."""
