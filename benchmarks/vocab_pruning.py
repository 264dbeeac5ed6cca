"""Vocabulary pruning of an XLM-R text tower: bundle sizes, embedding agreement and text latency, same run.

    python -m training.pretrained -o /tmp/e5lite0.pt
    python benchmarks/vocab_pruning.py --checkpoint /tmp/e5lite0.pt -o /tmp/prune-bench

Exports the checkpoint with ``--prune-vocabulary`` (training.vocab_prune, default corpus A) as fp32 and
as int8 bundles under -o, then reports every file's size, how often the pruned tokenizer's pieces
differ from the full one's on corpus B (Django and Trac catalogues, all sentences), the cosine between
the full torch text tower (fp32), the fp32 pruned bundle and the int8 pruned bundle on a sample of
corpus B (--per-language sentences of each language, plus every sentence whose pieces differ), and the
median single-query text-encoding latency of both bundles (int8 / fp32). Needs the train and dev extras.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CAPTIONS = REPO / ".." / "shared" / "data" / "ucm" / "captions.csv"


def cosine_figures(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cosines = np.sum(a * b, axis=1)
    return {"min": round(float(cosines.min()), 6), "mean": round(float(cosines.mean()), 6)}


def median_latency_ms(model, queries: list[str]) -> float:
    model.encode_texts(queries[:2])  # warm-up
    times = []
    for query in queries:
        start = time.perf_counter()
        model.encode_texts([query])
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> int:
    import torch
    from tokenizers import Tokenizer

    from rsmclip_geo.encoders import load_model
    from training.data import LANGUAGES
    from training.export import export_bundle
    from training.model import create_model
    from training.vocab_prune import (DEFAULT_WORDS_PER_LANGUAGE, catalogue_sentences, corpus_a_texts,
                                      kept_piece_ids, pruned_tokenizer, tokenizer_agreement)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("-o", "--output", required=True, help="folder for the two bundles and results.json")
    parser.add_argument("--per-language", type=int, default=150, help="corpus-B sentences per language to embed")
    parser.add_argument("--latency-queries", type=int, default=60)
    parser.add_argument("--words", type=int, default=DEFAULT_WORDS_PER_LANGUAGE, help="wordfreq words per language")
    parser.add_argument("--prune-texts", nargs="*", default=[str(CAPTIONS)] if CAPTIONS.is_file() else [])
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)

    sentences = {lang: catalogue_sentences(lang) for lang in LANGUAGES}
    full = create_model(None, checkpoint=args.checkpoint)
    full_tokenizer = Tokenizer.from_str(full.tokenizer_json)
    kept = kept_piece_ids(full_tokenizer, corpus_a_texts(args.words, args.prune_texts))
    pruned = pruned_tokenizer(full_tokenizer, kept)
    differing = {lang: tokenizer_agreement(full_tokenizer, pruned, sentences[lang]) for lang in LANGUAGES}
    rng = random.Random(0)
    sample = [text for lang in LANGUAGES for text in rng.sample(sentences[lang], args.per_language)]
    extra = sorted({text for lang in LANGUAGES for text in differing[lang]} - set(sample))
    texts = sample + extra
    with torch.inference_mode():  # the full tower's embeddings first: the export prunes its model in place
        reference = torch.nn.functional.normalize(torch.cat(
            [full.model.encode_text(full.tokenizer(texts[i:i + 64])) for i in range(0, len(texts), 64)]), dim=-1).numpy()
    bundles = {}
    for precision in ("fp32", "int8"):
        loaded = full if precision == "fp32" else create_model(None, checkpoint=args.checkpoint)
        start = time.perf_counter()
        bundles[precision] = export_bundle(loaded, out / f"pruned-{precision}", precision=precision,
                                           prune_vocabulary=args.words, prune_texts=args.prune_texts)
        print(f"exported {precision} in {time.perf_counter() - start:.0f} s", flush=True)
    models = {precision: load_model(path, providers=["cpu"]) for precision, path in bundles.items()}
    vectors = {precision: model.encode_texts(texts) for precision, model in models.items()}
    n_sample = len(sample)
    differing_rows = slice(n_sample, None)
    results = {
        "sizes": {precision: {**{p.name: p.stat().st_size for p in sorted(path.iterdir())},
                              "total": sum(p.stat().st_size for p in path.iterdir())}
                  for precision, path in bundles.items()},
        "kept_pieces": json.loads((bundles["fp32"] / "bundle.json").read_text())["vocabulary_pruning"]["kept_pieces"],
        "corpus_b": {lang: {"sentences": len(sentences[lang]), "differing": len(differing[lang]),
                            "agreement": round(1 - len(differing[lang]) / len(sentences[lang]), 5)}
                     for lang in LANGUAGES},
        "cosine_sample": {"n": n_sample,
                          "fp32_full vs fp32_pruned": cosine_figures(reference[:n_sample], vectors["fp32"][:n_sample]),
                          "fp32_full vs int8_pruned": cosine_figures(reference[:n_sample], vectors["int8"][:n_sample]),
                          "fp32_pruned vs int8_pruned": cosine_figures(vectors["fp32"][:n_sample],
                                                                       vectors["int8"][:n_sample])},
        "cosine_differing": ({"n": len(extra),
                              "fp32_full vs fp32_pruned": cosine_figures(reference[differing_rows],
                                                                         vectors["fp32"][differing_rows]),
                              "fp32_full vs int8_pruned": cosine_figures(reference[differing_rows],
                                                                         vectors["int8"][differing_rows])}
                             if extra else {"n": 0}),
        "differing_examples": {lang: differing[lang][:5] for lang in LANGUAGES},
    }
    queries = [text for text in sample if len(text) < 120][:args.latency_queries]
    latency = {precision: median_latency_ms(model, queries) for precision, model in models.items()}
    results["latency_ms"] = {**{k: round(v, 2) for k, v in latency.items()},
                             "int8/fp32": round(latency["int8"] / latency["fp32"], 3)}
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in results.items() if k != "differing_examples"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
