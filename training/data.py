"""Training and evaluation data: caption datasets, class folders, vocabularies, multi-crop views.

Sources
* Karpathy-style caption JSON (RSICD, UCM-captions, Sydney-captions, RSITMD): ``images`` list with
  ``filename``, ``split`` and ``sentences[].raw`` (``sentid`` optional).
* NWPU-Captions JSON: ``{category: [{filename, split, raw, raw_1, ..., raw_4}]}``, images under
  ``images_dir/category/filename``.
* Caption CSV (UCM-Captions as in ../shared/data/ucm/captions.csv): rows ``image,caption`` with
  ``image`` relative to a class-folder root, several English captions per image.
* Translation sidecars: JSONL lines ``{"image", "sentid", "lang", "text"}`` (what
  ``training.translate`` writes), merged into the captions of the matching image.
* Class folders (``root/<Class>/*.jpg``), captioned from a vocabulary file (names x templates per
  class and language) or, without one, from the English class name split from CamelCase.

Every random choice made for one sample (language, caption, crops, flips, colour) comes from a
``random.Random`` seeded by the sampler, so a run is reproducible and resumable with any number
of data-loader workers.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
import yaml
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import InterpolationMode

from rsmclip_geo.errors import RsmclipError

REPO_ROOT = Path(__file__).resolve().parents[1]
LANGUAGES: tuple[str, ...] = ("en", "pt", "es", "fr", "de", "nl", "it", "zh", "ko", "ru")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
DEFAULT_EN_TEMPLATES = ("an aerial image of {}", "a satellite photo of {}", "{} seen from above")
VOCABULARY_PARTS = ("train", "heldout", "unseen")
PROMPT_PARTS = (*VOCABULARY_PARTS, "all")


@dataclass
class CaptionedImage:
    """One image with its captions per language and, for class folders, its class name."""

    image: Path
    captions: dict[str, list[str]] = field(default_factory=dict)
    label: str | None = None


# --------------------------------------------------------------------------- class folders


def one_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's message squeezed onto one line (error messages are single lines)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def class_name_words(folder_name: str) -> str:
    """'StorageTanks' -> 'storage tanks', 'river_bank' -> 'river bank'."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", folder_name)
    return re.sub(r"[_\-\s]+", " ", spaced).strip().lower()


def list_class_folders(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise RsmclipError(f"class folder dataset {root} is not a directory; pass a folder with one sub-folder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise RsmclipError(f"class folder dataset {root} has no class sub-folders")
    return classes


def split_class_folder(root: Path) -> dict[str, list[tuple[Path, str]]]:
    """Deterministic split: per class, sorted file names; index % 5 == 4 -> "val", else "train"."""
    splits: dict[str, list[tuple[Path, str]]] = {"train": [], "val": []}
    for class_name in list_class_folders(root):
        files = sorted(
            (p for p in (Path(root) / class_name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda p: p.name,
        )
        for i, path in enumerate(files):
            splits["val" if i % 5 == 4 else "train"].append((path, class_name))
    return splits


def first_per_class(pairs: Sequence[tuple[Path, str]], limit: int) -> list[tuple[Path, str]]:
    """The first ``limit`` (image, class) pairs of every class, order kept."""
    counts: dict[str, int] = {}
    kept = []
    for path, label in pairs:
        if counts.get(label, 0) < limit:
            kept.append((path, label))
            counts[label] = counts.get(label, 0) + 1
    return kept


def resolve_path(value: str | Path) -> Path:
    """Config paths: relative to the current directory if they exist there, else to the repository root."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


# --------------------------------------------------------------------------- vocabulary


@dataclass
class Vocabulary:
    """Class names and caption templates per class, language and part ("train" / "heldout" / "unseen").

    ``entries[class][lang][part] = (names, templates)``; the prompt part "all" joins the three.
    """

    languages: list[str]
    entries: dict[str, dict[str, dict[str, tuple[list[str], list[str]]]]]

    def prompts(self, class_name: str, lang: str, part: str = "train") -> list[str]:
        """All template x name combinations for a class in one language (empty if none)."""
        if part not in PROMPT_PARTS:
            raise RsmclipError(f"prompt part {part!r} is unknown; use one of {', '.join(PROMPT_PARTS)}")
        parts = VOCABULARY_PARTS if part == "all" else (part,)
        per_lang = self.entries.get(class_name, {}).get(lang, {})
        out: list[str] = []
        for p in parts:
            names, templates = per_lang.get(p, ([], []))
            out.extend(t.replace("{}", n) for t in templates for n in names)
        return list(dict.fromkeys(out))

    def class_languages(self, class_name: str) -> list[str]:
        return [lang for lang in self.languages if self.prompts(class_name, lang, "train")]


def default_vocabulary(class_names: Iterable[str]) -> Vocabulary:
    """English-only vocabulary: the class name split from CamelCase with generic aerial templates."""
    entries = {
        c: {"en": {"train": ([class_name_words(c)], list(DEFAULT_EN_TEMPLATES)),
                   "heldout": ([class_name_words(c)], list(DEFAULT_EN_TEMPLATES))}}
        for c in class_names
    }
    return Vocabulary(languages=["en"], entries=entries)


def _as_list(value: object, where: str, path: Path) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise RsmclipError(f"vocabulary {path}: {where} must be a string or a list of strings")


def load_vocabulary(path: Path) -> Vocabulary:
    """Read a vocabulary YAML/JSON file (schema in docs/training.md).

    Templates may be given per class and language (``classes.C.lang.part.templates``) or per
    language at top level (``templates.lang.part``); class-level templates win. A held-out part
    without names reuses the train names; an unseen part without templates uses the held-out ones.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RsmclipError(f"vocabulary {path} cannot be read ({one_line(exc)}); pass a YAML file with 'classes'") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("classes"), dict):
        raise RsmclipError(f"vocabulary {path} has no 'classes' mapping; see docs/training.md for the schema")
    languages = [str(x) for x in raw.get("languages") or LANGUAGES]
    top_templates = raw.get("templates") or {}
    entries: dict[str, dict[str, dict[str, tuple[list[str], list[str]]]]] = {}
    for class_name, per_lang in raw["classes"].items():
        if not isinstance(per_lang, dict):
            raise RsmclipError(f"vocabulary {path}: classes.{class_name} must map languages to train/heldout/unseen parts")
        entries[str(class_name)] = {}
        for lang, parts in per_lang.items():
            if isinstance(parts, list):  # shorthand: a bare list of train names
                parts = {"train": {"names": parts}}
            if not isinstance(parts, dict):
                raise RsmclipError(f"vocabulary {path}: classes.{class_name}.{lang} must have train/heldout/unseen parts")
            lang_entry: dict[str, tuple[list[str], list[str]]] = {}
            train_names: list[str] = []
            for part in VOCABULARY_PARTS:
                spec = parts.get(part) or {}
                if isinstance(spec, list):
                    spec = {"names": spec}
                where = f"classes.{class_name}.{lang}.{part}"
                names = _as_list(spec.get("names"), f"{where}.names", path)
                templates = _as_list(spec.get("templates"), f"{where}.templates", path)
                lang_templates = top_templates.get(lang) or {}
                template_part = "heldout" if part == "unseen" and not lang_templates.get("unseen") else part
                if not templates:
                    templates = _as_list(lang_templates.get(template_part), f"templates.{lang}.{template_part}", path)
                if part == "train":
                    train_names = names
                elif part == "heldout" and not names:
                    names = train_names
                if not templates and names:
                    templates = ["{}"]
                lang_entry[part] = (names, templates)
            entries[str(class_name)][str(lang)] = lang_entry
    return Vocabulary(languages=languages, entries=entries)


def class_folder_items(
    pairs: Sequence[tuple[Path, str]], vocabulary: Vocabulary, languages: Sequence[str], part: str = "train"
) -> list[CaptionedImage]:
    """Caption each (image, class) pair with the vocabulary prompts of every requested language."""
    prompt_cache = {
        (c, lang): vocabulary.prompts(c, lang, part) for c in {c for _, c in pairs} for lang in languages
    }
    items = []
    for path, class_name in pairs:
        captions = {lang: prompt_cache[(class_name, lang)] for lang in languages if prompt_cache[(class_name, lang)]}
        if not captions:
            raise RsmclipError(
                f"class {class_name!r} has no captions in languages {','.join(languages)}; add it to the vocabulary file"
            )
        items.append(CaptionedImage(image=path, captions=captions, label=class_name))
    return items


# --------------------------------------------------------------------------- caption JSON


@dataclass(frozen=True)
class CaptionSentence:
    """One English caption of a caption dataset, keyed by (image, sentid)."""

    image: str
    sentid: int
    text: str
    split: str
    image_path: str


def iter_caption_sentences(captions_json: Path) -> Iterator[CaptionSentence]:
    """Sentences of a Karpathy-style or NWPU-Captions JSON file."""
    captions_json = Path(captions_json)
    try:
        raw = json.loads(captions_json.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RsmclipError(f"caption file {captions_json} cannot be read ({one_line(exc)}); pass a Karpathy-style JSON") from exc
    if isinstance(raw, dict) and isinstance(raw.get("images"), list):
        for image in raw["images"]:
            filename = str(image["filename"])
            rel = str(Path(image.get("filepath", "")) / filename)
            for i, sentence in enumerate(image.get("sentences", [])):
                text = sentence.get("raw") or " ".join(sentence.get("tokens", []))
                yield CaptionSentence(filename, int(sentence.get("sentid", i)), text.strip(),
                                      str(image.get("split", "train")), rel)
    elif isinstance(raw, dict) and raw and all(isinstance(v, list) for v in raw.values()):
        for category, images in raw.items():
            for image in images:
                filename = str(image["filename"])
                keys = sorted((k for k in image if k == "raw" or re.fullmatch(r"raw_\d+", k)),
                              key=lambda k: 0 if k == "raw" else int(k[4:]))
                for i, key in enumerate(keys):
                    yield CaptionSentence(filename, i, str(image[key]).strip(), str(image.get("split", "train")),
                                          str(Path(category) / filename))
    else:
        raise RsmclipError(
            f"caption file {captions_json} is neither Karpathy-style ('images' list) nor NWPU-Captions layout"
        )


def read_translations(paths: Iterable[Path]) -> dict[tuple[str, int, str], str]:
    """Translation sidecars (JSONL) -> {(image, sentid, lang): text}. A torn last line is skipped."""
    out: dict[tuple[str, int, str], str] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise RsmclipError(f"translation file {path} does not exist; run python -m training.translate first")
        for record in read_jsonl_records(path):
            out[(str(record["image"]), int(record["sentid"]), str(record["lang"]))] = str(record["text"])
    return out


def read_jsonl_records(path: Path) -> list[dict]:
    """Complete JSON lines of a file; an unterminated or unparsable final line is ignored."""
    records = []
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break
            raise RsmclipError(f"{path} line {i + 1} is not JSON ({exc.msg}); fix or delete that line") from exc
    return records


def caption_items(
    captions_json: Path,
    images_dir: Path,
    *,
    splits: Sequence[str],
    languages: Sequence[str],
    translations: Sequence[Path] = (),
) -> list[CaptionedImage]:
    """Images of the given splits with English captions plus translated ones from sidecars."""
    translated = read_translations(translations)
    by_image: dict[str, CaptionedImage] = {}
    for sentence in iter_caption_sentences(captions_json):
        if sentence.split not in splits:
            continue
        item = by_image.get(sentence.image)
        if item is None:
            item = by_image[sentence.image] = CaptionedImage(image=Path(images_dir) / sentence.image_path)
        for lang in languages:
            text = sentence.text if lang == "en" else translated.get((sentence.image, sentence.sentid, lang))
            if text:
                item.captions.setdefault(lang, []).append(text)
    items = [item for item in by_image.values() if item.captions]
    if not items:
        raise RsmclipError(
            f"caption file {captions_json} has no captions for splits {','.join(splits)} in {','.join(languages)}"
        )
    return items


def read_caption_csv(path: Path) -> dict[str, list[str]]:
    """Captions of a CSV with an ``image,caption`` header: {image path as written: [captions in file order]}."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RsmclipError(f"--captions {path} cannot be read ({one_line(exc)}); "
                           "pass a CSV with an image,caption header") from exc
    if not rows or [c.strip() for c in rows[0]] != ["image", "caption"]:
        raise RsmclipError(f"--captions {path} does not start with an image,caption header; pass a caption CSV")
    captions: dict[str, list[str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise RsmclipError(f"--captions {path} line {line} is not an image,caption row; fix or delete that line")
        captions.setdefault(row[0].strip(), []).append(row[1].strip())
    return captions


def caption_csv_items(captions_csv: Path, root: Path, pairs: Sequence[tuple[Path, str]]) -> list[CaptionedImage]:
    """The (image, class) pairs of a class folder ``root`` that have captions in ``captions_csv`` (English),
    in the order of ``pairs``; a caption of an image that is not in ``root`` is refused."""
    captions = read_caption_csv(captions_csv)
    root = Path(root)
    unknown = [image for image in captions if not (root / image).is_file()]
    if unknown:
        raise RsmclipError(f"--captions {captions_csv} names {len(unknown)} images that are not in {root} "
                           f"(e.g. {unknown[0]}); pass the class-folder root of the captions with --data")
    items = []
    for path, label in pairs:
        texts = captions.get(path.relative_to(root).as_posix())
        if texts:
            items.append(CaptionedImage(image=path, captions={"en": texts}, label=label))
    return items


# --------------------------------------------------------------------------- augmentation


@dataclass
class MultiCropConfig:
    """Crop geometry and aerial augmentations for the student/teacher views."""

    global_size: int
    local_size: int
    n_local: int = 6
    n_global: int = 2
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    flips: bool = True
    rot90: bool = True
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.05)
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], rng: random.Random, ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering ``scale`` of the area with aspect ratio in ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    side = min(width, height)
    return (height - side) // 2, (width - side) // 2, side, side


class MultiCropAugment:
    """PIL image -> ``n_global`` global views [G,3,S,S] and ``n_local`` local views [N,3,L,L], normalised."""

    def __init__(self, config: MultiCropConfig) -> None:
        self.config = config

    def _view(self, image: Image.Image, size: int, scale: tuple[float, float], rng: random.Random) -> torch.Tensor:
        cfg = self.config
        top, left, h, w = random_resized_crop_box(image.width, image.height, scale, rng)
        view = TF.resized_crop(image, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC)
        if cfg.flips and rng.random() < 0.5:
            view = TF.hflip(view)
        if cfg.flips and rng.random() < 0.5:
            view = TF.vflip(view)
        if cfg.rot90:
            view = view.rotate(90 * rng.randrange(4))
        brightness, contrast, saturation, hue = cfg.color_jitter
        if brightness:
            view = TF.adjust_brightness(view, rng.uniform(1 - brightness, 1 + brightness))
        if contrast:
            view = TF.adjust_contrast(view, rng.uniform(1 - contrast, 1 + contrast))
        if saturation:
            view = TF.adjust_saturation(view, rng.uniform(1 - saturation, 1 + saturation))
        if hue:
            view = TF.adjust_hue(view, rng.uniform(-hue, hue))
        return TF.normalize(TF.to_tensor(view), cfg.mean, cfg.std)

    def __call__(self, image: Image.Image, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        global_views = torch.stack([self._view(image, cfg.global_size, cfg.global_scale, rng)
                                    for _ in range(cfg.n_global)])
        if cfg.n_local:
            local_views = torch.stack(
                [self._view(image, cfg.local_size, cfg.local_scale, rng) for _ in range(cfg.n_local)]
            )
        else:
            local_views = torch.empty(0, 3, cfg.local_size, cfg.local_size)
        return global_views, local_views


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as exc:
        raise RsmclipError(f"image {path} cannot be read ({one_line(exc)}); remove it or fix the dataset") from exc


# --------------------------------------------------------------------------- dataset + sampler


class MultiCropCaptionDataset(Dataset):
    """Indexed by ``(item_index, draw_seed)`` from :class:`ResumableWeightedSampler`.

    Returns ``{"global": [2,3,G,G], "local": [N,3,L,L], "caption": str, "lang": str, "index": int}``;
    the language is drawn uniformly among the item's languages, then one caption of it.
    """

    def __init__(self, items: Sequence[CaptionedImage], augment: MultiCropAugment, *,
                 cache_images: bool = False) -> None:
        self.items = list(items)
        self.augment = augment
        self.cache: dict[int, Image.Image] | None = {} if cache_images else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, draw_seed = key
        item = self.items[index]
        rng = random.Random(draw_seed)
        lang = rng.choice(sorted(item.captions))
        caption = rng.choice(item.captions[lang])
        global_views, local_views = self.augment(self.image(index), rng)
        return {"global": global_views, "local": local_views, "caption": caption, "lang": lang, "index": index}

    def image(self, index: int) -> Image.Image:
        """The decoded image of item ``index``; kept in memory after the first read when caching (small datasets
        such as AID at 150 px: ~0.07 MB per image, and JPEG decoding then no longer costs a share of each step)."""
        if self.cache is None:
            return load_rgb(self.items[index].image)
        image = self.cache.get(index)
        if image is None:
            image = self.cache[index] = load_rgb(self.items[index].image)
        return image


def collate_views(samples: list[dict]) -> dict:
    return {
        "global": torch.stack([s["global"] for s in samples]),
        "local": torch.stack([s["local"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "lang": [s["lang"] for s in samples],
        "index": torch.tensor([s["index"] for s in samples]),
    }


def mixture_weights(sizes: Sequence[int], weights: Sequence[float]) -> np.ndarray:
    """Per-item sampling probabilities: dataset ``d`` gets ``weights[d]`` of the draws, split evenly."""
    per_item = np.concatenate([np.full(n, w / n, dtype=np.float64) for n, w in zip(sizes, weights) if n])
    return per_item / per_item.sum()


def interleave_labels(order: torch.Tensor, labels: Sequence[str | None], gen: torch.Generator) -> torch.Tensor:
    """``len(order)`` items in rounds that hold every label once, in a random label order per round.

    A batch of consecutive items then holds distinct labels (all of them when the batch size is the
    number of labels), so the contrastive loss sees no same-class pairs as negatives. Labels take
    their items from ``order`` in turn; a label that runs out starts over on its items in a new random
    order. Sampling is therefore class-balanced: without the refill, the end of every epoch would be
    batches of the few largest classes only, whose false negatives and skewed batch-norm statistics
    undo what the epoch learned.
    """
    queues: dict[str | None, list[int]] = {}
    for index in order.tolist():
        queues.setdefault(labels[index], []).append(index)
    pools = {key: list(items) for key, items in queues.items()}
    keys = list(queues)
    out: list[int] = []
    while len(out) < len(order):
        for k in torch.randperm(len(keys), generator=gen).tolist():
            queue = queues[keys[k]]
            if not queue:
                pool = pools[keys[k]]
                queue.extend(pool[i] for i in torch.randperm(len(pool), generator=gen).tolist())
            out.append(queue.pop(0))
    return torch.tensor(out[: len(order)], dtype=order.dtype)


class ResumableWeightedSampler(Sampler):
    """Deterministic epoch order over (possibly weighted) items, sharded across DDP ranks.

    Yields ``(item_index, draw_seed)``. With ``probabilities=None`` an epoch is a permutation;
    otherwise ``samples_per_epoch`` draws with replacement. ``set_epoch(epoch, start_batch)``
    positions the sampler so a resumed run continues with the exact next batch.
    """

    def __init__(
        self,
        n_items: int,
        *,
        batch_size: int,
        seed: int,
        probabilities: np.ndarray | None = None,
        samples_per_epoch: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        distinct_labels: Sequence[str | None] | None = None,
    ) -> None:
        self.n_items = n_items
        self.distinct_labels = None if distinct_labels is None else list(distinct_labels)
        self.batch_size = batch_size
        self.seed = seed
        self.probabilities = None if probabilities is None else torch.as_tensor(probabilities, dtype=torch.float64)
        total = samples_per_epoch or n_items
        self.batches_per_epoch = total // (batch_size * world_size)
        if self.batches_per_epoch < 1:
            raise RsmclipError(
                f"batch_size {batch_size} x {world_size} ranks is larger than the {total} samples of an epoch;"
                " lower data.batch_size or add images"
            )
        self.samples_per_epoch = total
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' (indices, draw seeds) of one epoch, before sharding."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.probabilities is None:
            order = torch.randperm(self.n_items, generator=gen)[: self.samples_per_epoch]
        else:
            order = torch.multinomial(self.probabilities, self.samples_per_epoch, replacement=True, generator=gen)
        if self.distinct_labels is not None:
            order = interleave_labels(order, self.distinct_labels, gen)
        seeds = torch.randint(0, 2**62, (len(order),), generator=gen)
        return order, seeds

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = self.epoch_order(self.epoch)
        used = self.batches_per_epoch * self.batch_size * self.world_size
        order, seeds = order[:used][self.rank :: self.world_size], seeds[:used][self.rank :: self.world_size]
        start = self.start_batch * self.batch_size
        for index, seed in zip(order[start:].tolist(), seeds[start:].tolist()):
            yield index, seed
