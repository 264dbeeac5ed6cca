"""`rsmclip-geo classify | models`: zero-shot classification of image files, and the installed bundles."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rsmclip_geo.cli.display import display_width, fit
from rsmclip_geo.errors import BundleError, RsmclipError


def register(subparsers: Any) -> None:
    """Add the classify and models commands."""
    classify = subparsers.add_parser(
        "classify", help="zero-shot classify image files against text labels",
        description="Zero-shot classification: softmax over logit_scale × cosine between each image and the labels.")
    classify.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, RGB TIFF)")
    classify.add_argument("--labels", nargs="+", metavar="LABEL", help="candidate labels, in any supported language")
    classify.add_argument("--labels-file", help="text file with one label per line")
    classify.add_argument("--model", help="bundle name or directory (default: the bundled default model)")
    classify.add_argument("--json", action="store_true",
                          help='one JSON line per image: {"image", "label", "score", "probabilities"}')
    classify.add_argument("--top", type=int, default=3, help="labels shown per image in the table (default 3)")
    classify.add_argument("-o", "--output", help="write the results to this file instead of stdout")
    add_runtime_options(classify)
    classify.set_defaults(func=run_classify)

    models = subparsers.add_parser("models", help="list the model bundles that can be found",
                                   description="List bundles in $RSMCLIP_GEO_MODELS, "
                                               "~/.local/share/rsmclip-geo/models and the package's models folder.")
    models.add_argument("--json", action="store_true", help="one JSON line per bundle")
    models.add_argument("--verify", action="store_true",
                        help="re-hash every bundle file against bundle.json and run each tower once; "
                             "exit 2 naming the bundles that fail")
    models.add_argument("-o", "--output", help="write the list to this file instead of stdout")
    models.set_defaults(func=run_models)


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument("--provider", help="force an ONNX Runtime provider: cpu, cuda or a full provider name "
                                          "(default: CUDA when it loads, else CPU)")
    group.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    group.add_argument("--backend", choices=("onnx", "torch"), default="onnx",
                       help="torch runs the bundle's weights.safetensors (needs torch + open_clip)")
    group.add_argument("--batch-size", type=int, default=32, help="images per encoder batch (default 32)")


def run_classify(args: argparse.Namespace) -> int:
    from rsmclip_geo.api import check_outputs, classify, load_model, read_labels, write_text_atomic

    labels = read_labels(args.labels, args.labels_file)
    if args.top < 1:
        raise RsmclipError(f"--top {args.top}: give a positive number")
    if args.output:
        check_outputs(text=args.output)
    model = load_model(args.model, providers=args.provider, threads=args.threads, backend=args.backend,
                       batch_size=args.batch_size)
    results = classify(args.images, labels, model=model)
    text = "".join(r.to_json() + "\n" for r in results) if args.json else format_table(results, args.top)
    if args.output:
        write_text_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


def format_table(results: list, top: int = 3) -> str:
    """A human-readable table: image, then its ``top`` labels with percentages (names aligned by display width)."""
    width = max(display_width(Path(r.image).name) for r in results)
    lines = []
    for result in results:
        ranked = sorted(result.probabilities.items(), key=lambda item: -item[1])[:top]
        cells = "  ".join(f"{label} {100 * p:5.1f} %" for label, p in ranked)
        lines.append(f"{fit(Path(result.image).name, width)}  {cells}")
    return "\n".join(lines) + "\n"


def bundle_summary(bundle) -> dict[str, Any]:
    """The fields `models` shows for one bundle."""
    from rsmclip_geo.api import DEFAULT_MODEL

    info = bundle.info
    return {
        "name": info.name, "version": info.version, "path": str(bundle.path), "precision": info.precision,
        "embed_dim": info.embed_dim, "image_size": info.image_size, "languages": list(info.languages),
        "architecture": info.architecture, "source": info.source.get("model"),
        "parity_min_cosine": min(info.parity.get("image_min_cosine", float("nan")),
                                 info.parity.get("text_min_cosine", float("nan"))),
        "torch_weights": bundle.has_torch_weights, "default": info.name == DEFAULT_MODEL,
        "fingerprint": bundle.fingerprint,
    }


def run_models(args: argparse.Namespace) -> int:
    """List the bundles; with --verify, fail (after the list is out) naming every bundle that does not verify."""
    from rsmclip_geo.api import check_outputs, list_models, load_bundle, models_dirs, write_text_atomic

    if args.output:
        check_outputs(text=args.output)
    lines, broken = [], []
    paths = list_models()
    for path in paths:
        try:
            bundle = load_bundle(path)
            if args.verify:
                bundle.verify()
        except RsmclipError as exc:
            broken.append(f"{path.name} ({exc})")
            lines.append(json.dumps({"path": str(path), "error": str(exc)}, ensure_ascii=False) if args.json
                         else f"{path.name}  BROKEN: {exc}")
            continue
        summary = bundle_summary(bundle)
        if args.json:
            lines.append(json.dumps(summary, ensure_ascii=False))
        else:
            lines.append(
                f"{summary['name']}{' (default)' if summary['default'] else ''}  v{summary['version']}  "
                f"{summary['precision']}  {summary['embed_dim']}-d  {summary['image_size']} px  "
                f"languages {','.join(summary['languages'])}  parity {summary['parity_min_cosine']:.6f}\n"
                f"    {summary['path']}\n    {summary['architecture']}")
    if not lines and not args.json:
        searched = ", ".join(str(d) for d in models_dirs())
        lines.append(f"no model bundles found (searched {searched})")
    text = "".join(line + "\n" for line in lines)
    if args.output:
        write_text_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    if args.verify and broken:
        raise BundleError(f"--verify: {len(broken)} of {len(paths)} bundles do not verify: {'; '.join(broken)}")
    return 0
