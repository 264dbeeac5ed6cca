"""Free-text retrieval queries (training/vocab/free_text.yaml): analyst descriptions in the 10 languages, each
with the ``dataset/Class`` keys of the classes whose tiles it should retrieve (schema in the file's header)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from rsmclip_geo.errors import RsmclipError
from training.data import REPO_ROOT, one_line

FREE_TEXT_PATH = REPO_ROOT / "training" / "vocab" / "free_text.yaml"


@dataclass(frozen=True)
class FreeTextQuery:
    """One meaning: its id, the relevant ``dataset/Class`` keys, the ambiguous ones (tiles left out of its
    ranking) and its text per language."""

    id: str
    relevant: tuple[str, ...]
    texts: dict[str, str]
    ambiguous: tuple[str, ...] = ()


@dataclass(frozen=True)
class NameException:
    """A relevant class name that one description may contain, and why."""

    id: str
    lang: str
    name: str
    why: str


@dataclass(frozen=True)
class FreeTextSet:
    """The whole file: its languages, the queries in file order and the allowed class-name exceptions."""

    languages: list[str]
    queries: list[FreeTextQuery]
    name_exceptions: list[NameException]


def load_free_text(path: Path = FREE_TEXT_PATH) -> FreeTextSet:
    """Read the free-text descriptions; every description needs relevant classes and a text in every language."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RsmclipError(f"free-text file {path} cannot be read ({one_line(exc)}); "
                           "pass a YAML file with 'descriptions'") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("descriptions"), dict):
        raise RsmclipError(f"free-text file {path} has no 'descriptions' mapping; see its header for the schema")
    languages = [str(lang) for lang in raw.get("languages") or []]
    queries = []
    for query_id, spec in raw["descriptions"].items():
        relevant = spec.get("relevant") if isinstance(spec, dict) else None
        ambiguous = (spec.get("ambiguous") or []) if isinstance(spec, dict) else []
        if not relevant or not all(isinstance(key, str) and key.count("/") == 1 for key in relevant + ambiguous):
            raise RsmclipError(f"free-text file {path}: descriptions.{query_id}.relevant and .ambiguous must list "
                               "dataset/Class keys")
        missing = [lang for lang in languages if not isinstance(spec.get(lang), str) or not spec[lang].strip()]
        if missing:
            raise RsmclipError(f"free-text file {path}: descriptions.{query_id} has no text in {', '.join(missing)}")
        queries.append(FreeTextQuery(str(query_id), tuple(relevant), {lang: spec[lang] for lang in languages},
                                     tuple(ambiguous)))
    exceptions = [NameException(str(e["id"]), str(e["lang"]), str(e["name"]), str(e["why"]))
                  for e in raw.get("name_exceptions") or []]
    return FreeTextSet(languages=languages, queries=queries, name_exceptions=exceptions)
