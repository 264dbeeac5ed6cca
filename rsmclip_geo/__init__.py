"""rsmclip-geo: multilingual text search over aerial and satellite imagery."""

__version__ = "0.1.0"
