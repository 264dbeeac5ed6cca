"""Text queries: cleaning, warnings about what the model cannot read well, and query vectors
(averaged over the prompt templates of a language, through the query cache)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from rsmclip_geo.caches import QueryCache
from rsmclip_geo.errors import QueryError

log = logging.getLogger(__name__)

#: share of unknown tokens from which a free-text model is warned to have no basis for a text
UNKNOWN_SHARE = 0.5


def clean_queries(queries: str | Sequence[str]) -> list[str]:
    """Stripped queries; QueryError if none is left or one is empty."""
    items = [queries] if isinstance(queries, str) else list(queries)
    if not items:
        raise QueryError("no query given: type what to look for, e.g. \"airport\" or \"aeroporto\"")
    cleaned = [" ".join(str(q).split()) for q in items]
    if any(not q for q in cleaned):
        raise QueryError("empty query: type what to look for, e.g. \"airport\" or \"aeroporto\"")
    return cleaned


def warn_long_queries(model, queries: Sequence[str]) -> None:
    """Warn about queries longer than the text tower's context (the tokenizer truncates them)."""
    limit = int(model.bundle.info.context_length)
    for query in queries:
        if len(model.tokenizer.tokens(query)) + 2 > limit:  # + start and end tokens
            log.warning("query %r… is longer than the model's %d tokens; it is truncated", query[:40], limit)


def warn_unknown_queries(model, queries: Sequence[str], what: str = "query", outcome: str = "ranking") -> None:
    """Warn about texts the model has no basis for: with a term vocabulary (a model trained on class names),
    texts sharing no term with it; without one (a free-text model), texts whose tokens are mostly unknown."""
    name = model.bundle.info.name
    if model.bundle.info.vocabulary:
        for text in model.bundle.outside_vocabulary(queries):
            log.warning("%s %r contains no term model %r was trained on; its %s may be unreliable",
                        what, text[:60], name, outcome)
        return
    for text in queries:
        if model.tokenizer.unknown_share(text) >= UNKNOWN_SHARE:
            log.warning("%s %r is mostly characters model %r has no tokens for; its %s may be unreliable",
                        what, text[:60], name, outcome)


def query_templates(model, lang: str | None) -> tuple[str, ...]:
    """The bundle's prompt templates of `lang` (none without `lang`, or for a bundle without templates);
    QueryError when the bundle has templates but none for `lang`."""
    if lang is None:
        return ()
    templates = model.bundle.prompt_templates(lang)
    if templates is None:
        known = ", ".join(sorted(model.bundle.prompt_templates_by_language()))
        raise QueryError(f"lang={lang}: model {model.bundle.info.name!r} has no prompt templates in it; choose one "
                         f"of {known}", param="lang", value=lang)
    if not templates:
        log.info("model %r has no prompt templates; queries are encoded as typed", model.bundle.info.name)
    return templates


def _encode_queries(model, queries: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """float32 [Q, D] L2-normalised query embeddings: each the mean over the query and its templated forms."""
    if not templates:
        return model.encode_texts(list(queries))
    variants = [[q] + [t.replace("{}", q) for t in templates] for q in queries]
    flat = model.encode_texts([v for group in variants for v in group])
    vectors = flat.reshape(len(queries), len(variants[0]), -1).mean(axis=1)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def query_vectors(model, queries: Sequence[str], lang: str | None = None,
                  cache: QueryCache | None = None) -> np.ndarray:
    """float32 [Q, D] L2-normalised query embeddings, averaged over the bundle's prompt templates of `lang`;
    with a cache, only the queries it lacks run the text tower."""
    templates = query_templates(model, lang)
    if cache is None:
        return _encode_queries(model, queries, templates)
    key = model.bundle.text_fingerprint
    known = cache.get(key, lang, queries)
    missing = list(dict.fromkeys(q for q in queries if q not in known))
    if missing:
        fresh = dict(zip(missing, _encode_queries(model, missing, templates)))
        cache.put(key, lang, fresh)
        known.update(fresh)
    return np.stack([known[q] for q in queries]).astype(np.float32)
