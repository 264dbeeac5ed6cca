"""Evaluate a torch checkpoint or an exported bundle: retrieval recall and zero-shot accuracy per language.

    python -m training.evaluate --model runs/smoke/model.pt --data ../shared/data/aid \\
        --vocabulary training/vocab/aid_classes.yaml --langs en,pt,zh -o eval.json
    python -m training.evaluate --model path/to/bundle --data dataset_rsicd.json --images RSICD_images \\
        --translations rsicd.translations.jsonl --langs en,pt -o eval.json
    python -m training.evaluate --model path/to/bundle --data ../shared/data/ucm \
        --captions ../shared/data/ucm/captions.csv -o ucm.json
    python -m training.evaluate --model path/to/bundle --free-text training/vocab/free_text.yaml \
        --data-root ../shared/data --langs en,zh -o free_text.json
    python -m training.evaluate --model path/to/bundle --suite training/configs/eval-suite.yaml -o suite.json

Caption data gives image->text and text->image R@1/5/10 and mean recall per language; a class
folder gives zero-shot top-1 per language (class embedding = mean over its prompts, i.e. a
template x name ensemble) plus a confusion matrix per language (``OUT.confusion-LANG.csv`` /
``.png``). A torch checkpoint and the bundle exported from it give the same numbers within the
export's tolerance: both score the same images and texts, only the encoders differ. A caption CSV
(``image,caption``, image relative to the class folder) gives English retrieval recall over the captioned
images of the split; free-text descriptions give P@10 per language and description over the split of
every data set they name; a suite (training/eval_suite.py) runs all of these at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageDraw

from rsmclip_geo.errors import RsmclipError
from rsmclip_geo.files import publish, temp_file
from training import data as D
from training.free_text import FreeTextSet, load_free_text

RECALL_KS = (1, 5, 10)
FREE_TEXT_K = 10


class Encoder(Protocol):
    """What evaluation needs from a model: L2-normalised float32 embeddings."""

    def encode_image_files(self, paths: Sequence[Path]) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


class TorchEncoder:
    """Encoder over an open_clip model from :func:`training.model.create_model`."""

    def __init__(self, loaded: Any, *, device: str = "cpu", batch_size: int = 64) -> None:
        self.loaded = loaded
        self.device = device
        self.batch_size = batch_size

    def encode_image_files(self, paths: Sequence[Path]) -> np.ndarray:
        import torch

        chunks = []
        for start in range(0, len(paths), self.batch_size):
            pixels = torch.stack([self.loaded.preprocess(D.load_rgb(p)) for p in paths[start : start + self.batch_size]])
            with torch.inference_mode():
                emb = self.loaded.model.encode_image(pixels.to(self.device), normalize=True)
            chunks.append(emb.float().cpu().numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.loaded.tokenizer(list(texts[start : start + self.batch_size])).to(self.device)
            with torch.inference_mode():
                emb = self.loaded.model.encode_text(tokens, normalize=True)
            chunks.append(emb.float().cpu().numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


class BundleEncoder:
    """Encoder over an exported bundle (ONNX Runtime, no torch)."""

    def __init__(self, bundle_dir: Path, *, batch_size: int = 64) -> None:
        from rsmclip_geo.encoders import load_model

        self.model = load_model(str(bundle_dir))
        self.batch_size = batch_size

    def encode_image_files(self, paths: Sequence[Path]) -> np.ndarray:
        chunks = []
        for start in range(0, len(paths), self.batch_size):
            images = [np.asarray(D.load_rgb(p)) for p in paths[start : start + self.batch_size]]
            chunks.append(np.asarray(self.model.encode_images(images), dtype=np.float32))
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        chunks = [np.asarray(self.model.encode_texts(list(texts[s : s + self.batch_size])), dtype=np.float32)
                  for s in range(0, len(texts), self.batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def open_encoder(model: Path, *, device: str = "cpu", batch_size: int = 64) -> Encoder:
    """A bundle directory (with bundle.json) or a torch checkpoint carrying its architecture."""
    model = Path(model)
    if model.is_dir():
        if not (model / "bundle.json").is_file():
            raise RsmclipError(f"--model {model} is a directory without bundle.json; pass a bundle or a checkpoint file")
        return BundleEncoder(model, batch_size=batch_size)
    if not model.is_file():
        raise RsmclipError(f"--model {model} does not exist; pass a checkpoint file or a bundle directory")
    from training.model import create_model

    return TorchEncoder(create_model(None, checkpoint=model, device=device), device=device, batch_size=batch_size)


# --------------------------------------------------------------------------- metrics


def retrieval_metrics(similarity: np.ndarray, text_image: Sequence[int]) -> dict[str, float]:
    """Recall@K (in %) from a [n_images, n_texts] similarity matrix.

    ``text_image[j]`` is the image of text ``j``. Image->text: an image counts as found at K when
    any of its texts is among its top K; text->image: when its image is among the text's top K.
    Ties are broken pessimistically (a tie with a wrong item ranks the correct one after it).
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    text_image = np.asarray(text_image)
    n_images, n_texts = similarity.shape
    if len(text_image) != n_texts:
        raise ValueError("text_image must have one entry per similarity column")
    # rank of the best correct text per image
    correct = text_image[None, :] == np.arange(n_images)[:, None]
    best_correct = np.where(correct, similarity, -np.inf).max(axis=1)
    i2t_rank = (np.where(correct, -np.inf, similarity) >= best_correct[:, None]).sum(axis=1)
    # rank of the correct image per text
    target = similarity[text_image, np.arange(n_texts)]
    others = similarity.copy()
    others[text_image, np.arange(n_texts)] = -np.inf
    t2i_rank = (others >= target[None, :]).sum(axis=0)
    out: dict[str, float] = {}
    for k in RECALL_KS:
        out[f"i2t_R@{k}"] = float(100.0 * np.mean(i2t_rank < k))
    for k in RECALL_KS:
        out[f"t2i_R@{k}"] = float(100.0 * np.mean(t2i_rank < k))
    out["mean_recall"] = float(np.mean([out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in RECALL_KS]))
    return out


def confusion_matrix(true: Sequence[int], pred: Sequence[int], n_classes: int) -> np.ndarray:
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(true), np.asarray(pred)), 1)
    return matrix


def class_embeddings(encoder: Encoder, prompts: Sequence[Sequence[str]]) -> np.ndarray:
    """One L2-normalised embedding per class: the mean of its normalised prompt embeddings."""
    flat = [p for class_prompts in prompts for p in class_prompts]
    emb = encoder.encode_texts(flat)
    out, start = [], 0
    for class_prompts in prompts:
        mean = emb[start : start + len(class_prompts)].mean(axis=0)
        out.append(mean / max(np.linalg.norm(mean), 1e-12))
        start += len(class_prompts)
    return np.stack(out).astype(np.float32)


# --------------------------------------------------------------------------- datasets


def zero_shot_class_folder(
    encoder: Encoder,
    pairs: Sequence[tuple[Path, str]],
    classes: Sequence[str],
    vocabulary: D.Vocabulary,
    languages: Sequence[str],
    *,
    prompt_part: str = "heldout",
) -> dict[str, Any]:
    """Zero-shot top-1 per language over (image, class) pairs; returns metrics and confusion matrices."""
    if not pairs:
        raise RsmclipError("no images to evaluate; check --data and --split")
    image_emb = encoder.encode_image_files([p for p, _ in pairs])
    index = {c: i for i, c in enumerate(classes)}
    true = np.array([index[c] for _, c in pairs])
    per_lang: dict[str, Any] = {}
    matrices: dict[str, np.ndarray] = {}
    for lang in languages:
        prompts = [vocabulary.prompts(c, lang, prompt_part) for c in classes]
        missing = [c for c, p in zip(classes, prompts) if not p]
        if missing:
            per_lang[lang] = {"skipped": f"no {prompt_part} prompts for {len(missing)} classes (e.g. {missing[0]})"}
            continue
        pred = np.argmax(image_emb @ class_embeddings(encoder, prompts).T, axis=1)
        matrices[lang] = confusion_matrix(true, pred, len(classes))
        per_lang[lang] = {"top1": float(100.0 * np.mean(pred == true)), "n_images": int(len(pairs)),
                          "n_prompts": int(sum(len(p) for p in prompts))}
    scored = [v["top1"] for v in per_lang.values() if "top1" in v]
    return {"classes": list(classes), "per_language": per_lang,
            "mean_top1": float(np.mean(scored)) if scored else None, "confusion": matrices}


def precision_at_k(scores: np.ndarray, relevant: np.ndarray, k: int, left_out: np.ndarray | None = None) -> np.ndarray:
    """P@k per query from [n_queries, n_pool] scores and a boolean ``relevant`` mask of the same shape:
    the share of relevant items among a query's ``k`` best, after dropping its ``left_out`` items.
    Ties are broken pessimistically (a relevant item tied with an irrelevant one ranks after it)."""
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    if scores.shape != relevant.shape or (left_out is not None and np.shape(left_out) != scores.shape):
        raise ValueError("scores, relevant and left_out must have the same shape")
    out = np.empty(len(scores))
    for q in range(len(scores)):
        kept = np.ones(scores.shape[1], bool) if left_out is None else ~np.asarray(left_out[q], bool)
        order = np.lexsort((relevant[q][kept], -scores[q][kept]))  # by score, irrelevant first on ties
        out[q] = relevant[q][kept][order[:k]].sum() / k
    return out


def retrieval_captions(encoder: Encoder, items: Sequence[D.CaptionedImage], languages: Sequence[str]) -> dict:
    """Retrieval metrics per language over captioned images (each language scored on its own texts)."""
    image_emb = encoder.encode_image_files([item.image for item in items])
    per_lang = {}
    for lang in languages:
        texts, owners = [], []
        for i, item in enumerate(items):
            for text in item.captions.get(lang, []):
                texts.append(text)
                owners.append(i)
        if not texts:
            per_lang[lang] = {"skipped": "no captions in this language"}
            continue
        metrics = retrieval_metrics(image_emb @ encoder.encode_texts(texts).T, owners)
        per_lang[lang] = {**metrics, "n_images": len(items), "n_texts": len(texts)}
    scored = [v["mean_recall"] for v in per_lang.values() if "mean_recall" in v]
    return {"per_language": per_lang, "mean_recall": float(np.mean(scored)) if scored else None}


def evaluate_caption_csv(encoder: Encoder, captions_csv: Path, root: Path, *, split: str = "val") -> dict[str, Any]:
    """Text->image and image->text recall over the captioned images of one split of a class folder."""
    if split not in ("train", "val"):
        raise RsmclipError(f"--split {split!r} is not a class-folder split; use val or train")
    items = D.caption_csv_items(captions_csv, root, D.split_class_folder(root)[split])
    if not items:
        raise RsmclipError(f"--captions {captions_csv} has no caption of a {split} image of {root}; "
                           "pass the class-folder root of the captions with --data")
    result = retrieval_captions(encoder, items, ["en"])["per_language"]["en"]
    return {"task": "caption_retrieval", "data": str(root), "captions": str(captions_csv), "split": split,
            "n_images": result.pop("n_images"), "n_captions": result.pop("n_texts"), **result}


def free_text_pool(free_text: FreeTextSet, data_root: Path, split: str) -> list[tuple[Path, str]]:
    """(image, "dataset/Class") of the ``split`` of every data set a description names; unknown keys are refused."""
    keys = {key for query in free_text.queries for key in query.relevant + query.ambiguous}
    pool: list[tuple[Path, str]] = []
    for dataset in sorted({key.split("/")[0] for key in keys}):
        folder = Path(data_root) / dataset
        if not folder.is_dir():
            raise RsmclipError(f"--data-root {data_root} has no data set {dataset!r} (named by the free-text "
                               f"descriptions); pass the folder that holds {dataset}/")
        pool += [(path, f"{dataset}/{label}") for path, label in D.split_class_folder(folder)[split]]
    classes = {label for _, label in pool}
    for query in free_text.queries:
        unknown = [key for key in query.relevant + query.ambiguous if key not in classes]
        if unknown:
            raise RsmclipError(f"--free-text: description {query.id!r} names {unknown[0]!r}, which is not a class "
                               f"folder under {data_root}; fix the dataset/Class key")
    return pool


def evaluate_free_text(
    encoder: Encoder, free_text_path: Path, data_root: Path, languages: Sequence[str], *, split: str = "val",
) -> dict[str, Any]:
    """P@10 of each free-text description per language, ranking the ``split`` images of the named data sets."""
    free_text = load_free_text(free_text_path)
    missing = [lang for lang in languages if lang not in free_text.languages]
    if missing:
        raise RsmclipError(f"--free-text {free_text_path} has no descriptions in {', '.join(missing)}; "
                           f"use languages of {', '.join(free_text.languages)}")
    pool = free_text_pool(free_text, data_root, split)
    labels = np.array([label for _, label in pool])
    relevant = np.stack([np.isin(labels, query.relevant) for query in free_text.queries])
    left_out = np.stack([np.isin(labels, query.ambiguous) for query in free_text.queries])
    for query, n in zip(free_text.queries, relevant.sum(axis=1)):
        if n < FREE_TEXT_K:
            raise RsmclipError(f"--free-text: description {query.id!r} has {n} relevant {split} images under "
                               f"{data_root}, fewer than {FREE_TEXT_K}; list more classes or drop it")
    image_emb = encoder.encode_image_files([path for path, _ in pool])
    per_description: dict[str, Any] = {
        query.id: {"relevant": list(query.relevant), "n_relevant": int(n), "n_left_out": int(m), "P@10": {}}
        for query, n, m in zip(free_text.queries, relevant.sum(axis=1), left_out.sum(axis=1))
    }
    per_lang = {}
    for lang in languages:
        text_emb = encoder.encode_texts([query.texts[lang] for query in free_text.queries])
        precision = precision_at_k(text_emb @ image_emb.T, relevant, FREE_TEXT_K, left_out)
        for query, value in zip(free_text.queries, precision):
            per_description[query.id]["P@10"][lang] = float(value)
        per_lang[lang] = {"P@10": float(precision.mean()), "n_descriptions": len(free_text.queries)}
    datasets = sorted({label.split("/")[0] for label in labels})
    return {"task": "free_text", "free_text": str(free_text_path), "data_root": str(data_root), "split": split,
            "pool": {d: int(sum(label.startswith(f"{d}/") for label in labels)) for d in datasets},
            "per_language": per_lang, "mean_P@10": float(np.mean([v["P@10"] for v in per_lang.values()])),
            "per_description": per_description}


def evaluate_data(
    encoder: Encoder,
    data: Path,
    languages: Sequence[str],
    *,
    images: Path | None = None,
    translations: Sequence[Path] = (),
    vocabulary: Path | None = None,
    split: str | None = None,
    prompt_part: str = "heldout",
    max_images_per_class: int | None = None,
) -> dict[str, Any]:
    """Evaluate on a caption JSON (needs ``images``) or a class folder; see the module docstring."""
    data = Path(data)
    if data.is_dir():
        classes = D.list_class_folders(data)
        split = split or "val"
        if split == "all":
            splits = D.split_class_folder(data)
            pairs = sorted(splits["train"] + splits["val"], key=lambda pair: (pair[1], pair[0].name))
        elif split in ("train", "val"):
            pairs = D.split_class_folder(data)[split]
        else:
            raise RsmclipError(f"--split {split!r} is not a class-folder split; use val, train or all")
        if max_images_per_class:
            pairs = D.first_per_class(pairs, max_images_per_class)
        vocab = D.load_vocabulary(vocabulary) if vocabulary else D.default_vocabulary(classes)
        part = prompt_part
        if part == "heldout" and not any(vocab.prompts(c, languages[0], "heldout") for c in classes):
            part = "train"
        result = zero_shot_class_folder(encoder, pairs, classes, vocab, languages, prompt_part=part)
        return {"task": "zero_shot", "data": str(data), "split": split, "prompt_part": part, **result}
    if images is None:
        raise RsmclipError(f"--data {data} is a caption file; also pass --images DIR with its images")
    items = D.caption_items(data, images, splits=[split or "test"], languages=languages, translations=translations)
    return {"task": "retrieval", "data": str(data), "split": split or "test", **retrieval_captions(encoder, items, languages)}


def evaluate_training_datasets(loaded: Any, config: dict, *, device: str = "cpu") -> dict[str, Any]:
    """Final evaluation of a training run on the held-out part of every configured dataset."""
    ecfg = config["eval"]
    encoder = TorchEncoder(loaded, device=device, batch_size=int(ecfg["batch_size"]))
    languages = config["data"]["languages"]
    results = []
    for spec in config["data"]["datasets"]:
        if spec["type"] == "class_folder":
            result = evaluate_data(
                encoder, D.resolve_path(spec["root"]), languages,
                vocabulary=D.resolve_path(spec["vocabulary"]) if spec.get("vocabulary") else None,
                split="val", prompt_part=ecfg["prompt_part"], max_images_per_class=ecfg["max_images_per_class"],
            )
        else:
            result = evaluate_data(
                encoder, D.resolve_path(spec["captions"]), languages, images=D.resolve_path(spec["images"]),
                translations=[D.resolve_path(p) for p in spec.get("translations", [])],
                split=spec.get("eval_split", "test"),
            )
        result.pop("confusion", None)
        results.append(result)
    return {"datasets": results, "summary": summarize(results)}


def summarize(results: Sequence[dict]) -> dict[str, Any]:
    return {
        Path(r["data"]).name: (r.get("mean_top1") if r["task"] == "zero_shot" else r.get("mean_recall"))
        for r in results
    }


# --------------------------------------------------------------------------- outputs


def write_atomic(path: Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp)`` on a temp file in ``path``'s directory, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path, suffix=path.suffix)
    try:
        writer(tmp)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_confusion_csv(path: Path, matrix: np.ndarray, classes: Sequence[str]) -> None:
    def writer(tmp: Path) -> None:
        lines = ["true\\predicted," + ",".join(classes)]
        lines += [f"{c}," + ",".join(str(int(v)) for v in row) for c, row in zip(classes, matrix)]
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")

    write_atomic(path, writer)


def write_confusion_png(path: Path, matrix: np.ndarray, classes: Sequence[str], title: str) -> None:
    """Row-normalised confusion matrix as a heat map with class labels."""
    cell, label_w, top = 18, 8 * max(len(c) for c in classes) + 8, 28
    n = len(classes)
    image = Image.new("RGB", (label_w + n * cell + 4, top + n * cell + 4), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 6), title, fill="black")
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    for i, name in enumerate(classes):
        draw.text((4, top + i * cell + 3), name, fill="black")
        for j in range(n):
            shade = int(255 * (1.0 - rows[i, j]))
            x, y = label_w + j * cell, top + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255), outline=(220, 220, 220))
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def write_results(output: Path, result: dict[str, Any]) -> None:
    """OUT.json plus, for zero-shot results, OUT.confusion-LANG.csv/.png per language."""
    matrices = result.pop("confusion", {})
    for lang, matrix in matrices.items():
        stem = output.with_suffix("")
        write_confusion_csv(Path(f"{stem}.confusion-{lang}.csv"), matrix, result["classes"])
        write_confusion_png(Path(f"{stem}.confusion-{lang}.png"), matrix, result["classes"],
                            f"{lang}: top-1 {result['per_language'][lang]['top1']:.1f}%")
    write_atomic(output, lambda tmp: tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="torch checkpoint (.pt) or bundle directory")
    parser.add_argument("--data", type=Path, default=None, help="caption JSON (with --images) or class folder")
    parser.add_argument("--images", type=Path, default=None, help="image directory of a caption JSON")
    parser.add_argument("--translations", type=Path, action="append", default=[],
                        help="translation sidecar JSONL (repeatable)")
    parser.add_argument("--captions", type=Path, default=None,
                        help="caption CSV (image,caption; image relative to the class folder --data): retrieval "
                             "over the captioned images of the split")
    parser.add_argument("--free-text", type=Path, default=None,
                        help="free-text descriptions YAML: P@10 per language over the split of its data sets")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="folder with one folder per data set, for --free-text and --suite (default ../shared/data)")
    parser.add_argument("--suite", type=Path, default=None,
                        help="suite YAML (training/configs/eval-suite.yaml): every task of it in one JSON")
    parser.add_argument("--vocabulary", type=Path, default=None, help="class vocabulary YAML for class folders")
    parser.add_argument("--langs", default=None, help="comma-separated languages (default en; a suite: its own)")
    parser.add_argument("--split", default=None,
                        help="caption split (default test) or class-folder split val|train|all (default val)")
    parser.add_argument("--prompts", default="heldout", choices=D.PROMPT_PARTS,
                        help="vocabulary part for zero-shot prompts: heldout (default; train if the vocabulary has "
                             "none), unseen (synonyms in words no training caption uses), train, or all")
    parser.add_argument("--max-images-per-class", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-o", "--output", required=True, type=Path, help="results JSON")
    return parser


def run_task(args: argparse.Namespace, encoder: Encoder, languages: list[str] | None) -> dict[str, Any]:
    """The one task the command line asks for."""
    from training.eval_suite import load_suite, run_suite

    data_root = D.resolve_path(args.data_root or "../shared/data")
    if args.suite:
        suite = load_suite(args.suite)
        return {**run_suite(encoder, suite, D.resolve_path(args.data_root or suite["data_root"]), languages),
                "suite": str(args.suite)}
    languages = languages or ["en"]
    if args.free_text:
        return evaluate_free_text(encoder, args.free_text, data_root, languages, split=args.split or "val")
    if args.data is None:
        raise RsmclipError("--data is missing; pass a class folder or caption file, or use --free-text or --suite")
    if args.captions:
        return evaluate_caption_csv(encoder, args.captions, args.data, split=args.split or "val")
    return evaluate_data(
        encoder, args.data, languages, images=args.images, translations=args.translations,
        vocabulary=args.vocabulary, split=args.split, prompt_part=args.prompts,
        max_images_per_class=args.max_images_per_class,
    )


def headline(result: dict[str, Any]) -> str:
    """What the command prints once the results are written."""
    from training.eval_suite import summary_table

    if result["task"] == "suite":
        return summary_table(result)
    key = {"zero_shot": "mean_top1", "free_text": "mean_P@10"}.get(result["task"], "mean_recall")
    value = result.get(key)
    return f"{result['task']}: {key} {value if value is None else round(value, 4)}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        languages = [x.strip() for x in args.langs.split(",") if x.strip()] if args.langs is not None else None
        if languages == []:
            raise RsmclipError("--langs is empty; pass e.g. en,pt")
        if args.output.is_dir():
            raise RsmclipError(f"-o {args.output} is a directory; give a .json file name")
        encoder = open_encoder(args.model, device=args.device, batch_size=args.batch_size)
        result = {**run_task(args, encoder, languages), "model": str(args.model)}
        write_results(args.output, result)
    except RsmclipError as exc:
        print(f"rsmclip-geo: error: {exc}", file=sys.stderr)
        return 2
    print(f"{headline(result)}\n-> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
