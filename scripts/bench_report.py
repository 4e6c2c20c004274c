#!/usr/bin/env python
"""Benchmark of the report on a synthetic run: one 512-unit layer with 7x7 maps over a few hundred
generated toy images.

The run is made by the real producers (toy dataset generator, ``record_activations`` of a strided
convolution, ``dissect_layer``). Printed: seconds per 100 units for the data model (top images
through ``amax``), for the strips (masks, thumbnails, JPEG) and for the pages, the number of image
decodes against the number of distinct images shown, and the ratio to a naive strip writer that
decodes an image and reads a whole activation row for every (unit, image) pair.

With ``--study`` the run also gets generated later results for every unit (ablation.csv with the
single, top-N, keep, random and concept studies over 10 classes, importance.csv,
compositional.csv, significance.csv and significance.h5 with 100 permutations), so the data model
and the pages include every section of the report.

Usage: ``python scripts/bench_report.py [--units 512] [--images 300] [--size 112] [--study]
[--out DIR]``
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dissect.data import IMAGENET_MEAN, IMAGENET_STD, BrodenDataset
from dissect.record import CacheReader, cache_path, record_activations
from dissect.report import build_report_data
from dissect.report import images as rimages
from dissect.report.render import THUMBNAIL_HEIGHT, render_pages, write_layer_strips
from dissect.run import RunConfig, write_run_json
from dissect.tally import dissect_layer, load_dissection
from dissect.toy import generate_toy_dataset

LAYER = "conv"


class StridedNet(torch.nn.Module):
    """A single conv with kernel = stride = size // 7, so maps are 7x7; seeded weights."""

    def __init__(self, units: int, stride: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, units, stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).amax(dim=(2, 3))


class CountingDataset:
    """Wraps a BrodenDataset and counts ``load_image`` calls."""

    def __init__(self, dataset: BrodenDataset) -> None:
        self.dataset = dataset
        self.loads = 0

    def __getattr__(self, name: str):
        return getattr(self.dataset, name)

    def load_image(self, index: int) -> np.ndarray:
        self.loads += 1
        return self.dataset.load_image(index)


def naive_strips(run_dir: Path, layer: dict, thresholds: np.ndarray, dataset: BrodenDataset,
                 out_dir: Path, n_units: int) -> None:
    """Reference writer: one image decode and one full cache row read per (unit, image) pair."""
    reader = CacheReader(cache_path(run_dir, LAYER))
    shape = rimages.thumbnail_shape(dataset.image_size, THUMBNAIL_HEIGHT)
    for unit in layer["units"][:n_units]:
        u = unit["unit"]
        tiles = []
        for top in unit["top_images"]:
            row = reader.read_rows([top["index"]])[0]
            mask = rimages.threshold_masks(row[u][None], thresholds[[u]], dataset.seg_size)[0]
            thumb = rimages.make_thumbnail(dataset.load_image(top["index"]), shape)
            tiles.append(rimages.draw_mask(thumb, rimages.resize_mask(mask, shape)))
        strip = rimages.compose_strip(tiles, len(unit["top_images"]), shape)
        (out_dir / f"naive_{u:04d}.jpg").write_bytes(rimages.encode_jpeg(strip))


def write_study_results(layer_dir: Path, n_units: int, n_classes: int = 10,
                        permutations: int = 100) -> None:
    """Generated (seeded) later results of every unit: ablation.csv (single, topn, keep, random,
    concept), importance.csv, compositional.csv, significance.csv and significance.h5."""
    import csv

    import h5py

    from dissect.report.data import ABLATION_COLUMNS

    rng = np.random.default_rng(0)
    classes = [f"class{c}" for c in range(n_classes)]
    base = rng.uniform(0.5, 1.0, n_classes)
    rows = []

    def add(study: str, name: str, units: list[int], values: np.ndarray) -> None:
        text = ";".join(map(str, units))
        for c, cls in enumerate(classes):
            v = float(values[c])
            rows.append([study, name, text, cls, 20, v, v, v, v, v])

    for study in ("single", "topn", "random", "concept"):
        add(study, "baseline", [], base)
    for u in range(n_units):
        add("single", f"unit{u}", [u], base - rng.exponential(0.01, n_classes))
    sizes = [n for n in (1, 2, 4, 8, 16) if n <= n_units // 2]
    for cls in classes:
        for n in sizes:
            units = sorted(rng.choice(n_units, n, replace=False).tolist())
            add("topn", f"{cls}:top{n}", units, base - 0.04 * n)
            add("keep", f"{cls}:keep{n}", sorted(set(range(n_units)) - set(units)),
                base * 0.1 * np.log2(n + 1))
    for n in sizes:
        for r in range(5):
            add("random", f"random{n}#{r}", sorted(rng.choice(n_units, n, replace=False).tolist()),
                base - rng.uniform(0, 0.01 * n, n_classes))
    add("concept", "sky", list(range(0, n_units, 50)), base - 0.1)
    with (layer_dir / "ablation.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(ABLATION_COLUMNS)
        writer.writerows(rows)
    with (layer_dir / "importance.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["unit", "n_classes", "classes", "label", "category", "iou"])
        for u in range(n_units):
            chosen = classes[: u % 3]
            writer.writerow([u, len(chosen), ";".join(chosen), "", "", ""])
    with (layer_dir / "compositional.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["unit", "formula", "formula_ids", "leaves", "iou", "label", "label_iou",
                         "categories", "optimal"])
        for u in range(n_units):
            writer.writerow([u, "(a OR b) AND NOT c", "[1, 2, 3]", 3, 0.2, "a", 0.1, "object",
                             "unknown"])
    observed = rng.uniform(0, 0.2, n_units)
    null = rng.uniform(0, 0.1, (permutations, n_units))
    with (layer_dir / "significance.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["unit", "label", "category", "iou", "iou0", "fisher_or", "fisher_p",
                         "perm_p", "null_mean", "null_sd", "z", "q", "ci_low", "ci_high",
                         "significant"])
        for u in range(n_units):
            p = float((1 + (null[:, u] >= observed[u]).sum()) / (permutations + 1))
            writer.writerow([u, "a", "object", observed[u], 0.01, 1.0, 0.5, p, 0.05, 0.02, 1.0,
                             p, "", "", "yes" if p <= 0.05 else "no"])
    with h5py.File(layer_dir / "significance.h5", "w") as f:
        f["observed"] = observed
        f["null"] = null


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=512)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=112, help="toy image size (maps are 7x7)")
    parser.add_argument("--naive-units", type=int, default=64,
                        help="units written by the naive reference writer")
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: temp)")
    parser.add_argument("--study", action="store_true",
                        help="add generated ablation, importance, compositional and significance "
                             "results of every unit (every report section)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        t0 = time.perf_counter()
        dataset_dir = generate_toy_dataset(root / "toy", n_images=args.images, size=args.size,
                                           seed=0)
        dataset = BrodenDataset(dataset_dir)
        run_dir = root / "run"
        config = RunConfig(model="bench:StridedNet", layers=(LAYER,), dataset=str(dataset_dir),
                           out=str(run_dir))
        write_run_json(config)
        model = StridedNet(args.units, args.size // 7).eval()
        caches = record_activations(model, dataset, [LAYER], run_dir, mean=IMAGENET_MEAN,
                                    std=IMAGENET_STD, batch_size=50, progress=False)
        dissect_layer(caches[LAYER], dataset, layer=LAYER, out_dir=run_dir / LAYER)
        if args.study:
            write_study_results(run_dir / LAYER, args.units)
        setup = time.perf_counter() - t0

        counting = CountingDataset(dataset)
        t0 = time.perf_counter()
        data = build_report_data(run_dir, dataset=counting)
        t_data = time.perf_counter() - t0
        layer = data["layers"][0]
        thresholds = np.asarray(load_dissection(run_dir / LAYER).thresholds)
        out = run_dir / "report"
        t0 = time.perf_counter()
        write_layer_strips(run_dir, layer, thresholds, counting, out)
        t_strips = time.perf_counter() - t0
        t0 = time.perf_counter()
        render_pages(data, out, rimages.thumbnail_shape(dataset.image_size, THUMBNAIL_HEIGHT))
        t_pages = time.perf_counter() - t0

        shown = {t["index"] for u in layer["units"] for t in u["top_images"]}
        naive_dir = root / "naive"
        naive_dir.mkdir(parents=True, exist_ok=True)
        n_naive = min(args.naive_units, args.units)
        t0 = time.perf_counter()
        naive_strips(run_dir, layer, thresholds, dataset, naive_dir, n_naive)
        t_naive = time.perf_counter() - t0

        per100 = 100.0 / args.units
        strip_bytes = sum(p.stat().st_size for p in (out / "img").rglob("*.jpg"))
        print(f"synthetic run: {args.images} images {args.size}x{args.size}, layer {LAYER!r} "
              f"{args.units} units, 7x7 maps, top {data['top_k']} (setup {setup:.1f} s)"
              f"{'; with every study section' if args.study else ''}")
        total = t_data + t_strips + t_pages
        for name, seconds in [("data model (top images via amax)", t_data),
                              ("strips (masks, thumbnails, JPEG)", t_strips),
                              ("pages + report.json", t_pages), ("total", total)]:
            print(f"{name + ':':34s}{seconds:7.3f} s = {seconds * per100:.3f} s / 100 units")
        print(f"image decodes: {counting.loads} for {len(shown)} distinct images shown "
              f"({args.units * data['top_k']} unit-image pairs)")
        naive_per100 = t_naive * 100.0 / n_naive
        print(f"naive strips ({n_naive} units, decode + full row per pair): "
              f"{naive_per100:.3f} s / 100 units; ratio naive / ours = "
              f"{naive_per100 / (t_strips * per100):.1f}x")
        print(f"strip JPEG bytes: {strip_bytes / 2**20:.1f} MiB; peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
