"""Relevance feedback on a mosaic of validation images: P@10 of the first ranking against one and two
rounds of marking hits right or wrong, for class names the model knows and for concepts it has no
word for, with Rocchio and with the linear classifier (the same run, the same model).

1. Mosaic: validation images (per class, sorted file names, index % 5 == 4: the project's split) of
   AID classes the default model was trained on and of UC Merced / RESISC-12 classes it was not, each
   resized to a 150 px cell of one georeferenced GeoTIFF; tiles of 150 px, one per cell.
2. Per query: the text query's top 10 (P@10); a round marks up to 3 right and 3 wrong among the top
   10 not yet judged (right = a cell of the query's class) and searches again with all labels so far;
   P@10 is counted over tiles not yet judged. Two rounds.
3. "No word" concepts are those whose text query reaches P@10 ≤ 0.2 in step 2's first ranking.

    python benchmarks/relevance_feedback.py --work-dir /tmp/feedback_bench [--model NAME_OR_DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"
CELL = 150
#: Cells per class: enough that 10 relevant tiles remain after two rounds of 3 marked right.
PER_CLASS = 20
#: (data set folder, class folder, English query): AID classes the default model knows by name ...
KNOWN = [("aid", "Airport", "airport"), ("aid", "Beach", "beach"), ("aid", "StorageTanks", "storage tanks"),
         ("aid", "Forest", "forest"), ("aid", "Farmland", "farmland"), ("aid", "Parking", "parking lot"),
         ("aid", "Port", "port"), ("aid", "DenseResidential", "dense residential area")]
#: ... and classes of the other data sets that its vocabulary has no word for.
UNKNOWN = [("ucm", "tenniscourt", "tennis court"), ("ucm", "mobilehomepark", "mobile home park"),
           ("ucm", "intersection", "road intersection"), ("ucm", "runway", "runway"),
           ("resisc12", "island", "island"), ("resisc12", "wetland", "wetland"), ("ucm", "airplane", "airplanes")]
ROUNDS = 2
MARKS = 3


def validation_images(folder: Path, count: int) -> list[Path]:
    """Per class, sorted image files, index % 5 == 4."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png", ".tif"))
    return [p for i, p in enumerate(files) if i % 5 == 4][:count]


def build_mosaic(path: Path) -> dict[tuple[int, int], str]:
    """Write the mosaic GeoTIFF; {(col, row) of a cell: its query}."""
    from rasterio.transform import Affine

    import rasterio

    cells = [(query, image) for dataset, name, query in KNOWN + UNKNOWN
             for image in validation_images(DATA / dataset / name, PER_CLASS)]
    order = np.random.default_rng(11).permutation(len(cells))
    columns = 20
    rows = -(-len(cells) // columns)
    pixels = np.zeros((3, rows * CELL, columns * CELL), np.uint8)
    layout = {}
    for k, i in enumerate(order):
        query, image = cells[i]
        row, col = divmod(k, columns)
        rgb = np.asarray(Image.open(image).convert("RGB").resize((CELL, CELL), Image.Resampling.BICUBIC))
        pixels[:, row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = rgb.transpose(2, 0, 1)
        layout[(col, row)] = query
    profile = dict(driver="GTiff", width=columns * CELL, height=rows * CELL, count=3, dtype="uint8",
                   crs="EPSG:32633", transform=Affine(2.0, 0.0, 400_000.0, 0.0, -2.0, 5_700_000.0))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
    return layout


def precision(hits, layout, query: str) -> float:
    return sum(layout[(h.win_col // CELL, h.win_row // CELL)] == query for h in hits[:10]) / 10


def feedback_rounds(api, index, model, layout, query: str, method: str) -> list[float]:
    """P@10 of the text ranking, then after each round of marking (over tiles not yet judged)."""
    labels = api.Labels()
    params = api.SearchParams(top_k=10, nms_overlap=1.0, feedback_method=method)
    hits = api.search(index, query, model=model, params=params, use_cache=False).hits
    scores = [precision(hits, layout, query)]
    for _ in range(ROUNDS):
        right = [h for h in hits if layout[(h.win_col // CELL, h.win_row // CELL)] == query][:MARKS]
        wrong = [h for h in hits if layout[(h.win_col // CELL, h.win_row // CELL)] != query][:MARKS]
        for hit in right + wrong:
            labels.mark(index, hit.tile_id, positive=hit in right)
        params = api.SearchParams(top_k=10, nms_overlap=1.0, labels=labels, feedback_method=method)
        hits = api.search(index, query, model=model, params=params, use_cache=False).hits
        scores.append(precision(hits, layout, query))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--model", help="bundle name or directory (default: the bundled default model)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the demo model's vocabulary warnings, once per search
    from rsmclip_geo import api

    args.work_dir.mkdir(parents=True, exist_ok=True)
    model = api.load_model(args.model)
    layout = build_mosaic(args.work_dir / "mosaic.tif")
    index = api.open_index(api.build_index([args.work_dir / "mosaic.tif"], args.work_dir / "mosaic.parquet",
                                           model=model, tiling=api.TilingParams(tile_size=CELL)).path,
                           in_memory=True)
    results: dict[str, dict[str, list[float]]] = {}
    for method in ("rocchio", "linear"):
        results[method] = {query: feedback_rounds(api, index, model, layout, query, method)
                           for _, _, query in KNOWN + UNKNOWN}
    first = {query: p[0] for query, p in results["rocchio"].items()}
    groups = {"class names the model knows": [q for _, _, q in KNOWN],
              "no word for it (text P@10 <= 0.2)": [q for q, p in first.items() if p <= 0.2]}
    print(f"mosaic: {len(layout)} cells of {CELL} px, {PER_CLASS} validation images per class; model "
          f"{model.bundle.info.name}")
    print(f"{'group':<36} {'method':<8} {'queries':>7} {'P@10 text':>9} {'round 1':>8} {'round 2':>8}")
    for group, queries in groups.items():
        for method in results:
            rows = np.array([results[method][q] for q in queries]) if queries else np.zeros((0, 3))
            means = rows.mean(axis=0) if len(rows) else [float("nan")] * 3
            print(f"{group:<36} {method:<8} {len(queries):>7} {means[0]:>9.3f} {means[1]:>8.3f} {means[2]:>8.3f}")
    (args.work_dir / "results.json").write_text(json.dumps(results, indent=1))
    print("per query (text, round 1, round 2):",
          {q: [round(v, 2) for v in p] for q, p in results["rocchio"].items()},
          f"median text P@10 {statistics.median(first.values()):.2f}")


if __name__ == "__main__":
    main()
