"""Benchmark of compositional labels (issue 15, item 6): our beam search against the published loop.

Synthetic data of a realistic shape, generated per image from a seed (so memory never holds the
dataset): a layer of U units at 7x7, N images with 112x112 label maps, about 1000 labels in 5
categories (color, object and part pixel layers, material on half of the images, scene
image-level). Units respond to a few labels each, so formulas matter.

Measured in one run, side by side:
1. our beam search (``compose_layer``, beam 5, 3 leaves) on every unit: time per unit;
2. the naive published loop (Mu & Andreas' ``vision/``: each candidate formula's mask built over
   every image and its IoU computed) on a few units of the same data: time per unit, and the
   formulas and IoUs of both, which must be equal;
3. ``search='exact'`` on a few units;
4. peak RSS of our beam search (in a fresh process) at two dataset sizes.

Usage: ``python scripts/bench_compose.py [--units 64] [--images 120] [--naive-units 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from dissect.compose import compose_layer
from dissect.data.vocab import Vocabulary
from dissect.parallel import compute_thresholds
from dissect.stats import upsample_maps
from dissect.stats.formula import OPS, Formula, sort_key

CATEGORIES = ("color", "object", "part", "material", "scene")
COUNTS = {"color": 11, "object": 580, "part": 230, "material": 30, "scene": 150}
SEG = 112
MAP = 7


def label_ranges() -> dict[str, np.ndarray]:
    out, start = {}, 1
    for category in CATEGORIES:
        out[category] = np.arange(start, start + COUNTS[category])
        start += COUNTS[category]
    return out


@dataclass
class SyntheticDataset:
    """A BrodenDataset look-alike whose label maps are generated per image from a seed."""

    n_images: int
    seed: int = 0
    root: str = "synthetic"
    categories: tuple[str, ...] = CATEGORIES
    seg_size: tuple[int, int] = (SEG, SEG)
    vocab: Vocabulary = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ranges = label_ranges()
        n_labels = 1 + sum(COUNTS.values())
        primary = np.full(n_labels, -1, np.int64)
        names = [""] * n_labels
        for k, category in enumerate(CATEGORIES):
            primary[ranges[category]] = k
            for n in ranges[category]:
                names[n] = f"{category}{n}"
        self.vocab = Vocabulary(CATEGORIES, names, primary)

    def __len__(self) -> int:
        return self.n_images

    def fingerprint(self) -> str:
        return f"synthetic-{self.n_images}-{self.seed}"

    def labeled_images(self) -> np.ndarray:
        return np.arange(self.n_images, dtype=np.int64)

    def load_segmentation(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng((self.seed, int(index)))
        ranges = label_ranges()

        def regions(labels: np.ndarray, cells: int, zipf: bool, empty: float) -> np.ndarray:
            if zipf:
                ranks = np.minimum(rng.zipf(1.3, size=(cells, cells)), len(labels)) - 1
                grid = labels[ranks]
            else:
                grid = rng.choice(labels, size=(cells, cells))
            grid = np.where(rng.random((cells, cells)) < empty, 0, grid)
            return np.kron(grid, np.ones((SEG // cells, SEG // cells), np.int64))

        layers = [regions(ranges["color"], 8, False, 0.0),
                  regions(ranges["object"], 7, True, 0.2),
                  regions(ranges["part"], 14, True, 0.6)]
        if index % 2 == 0:
            layers.append(regions(ranges["material"], 4, True, 0.3))
        scene = ranges["scene"][min(rng.zipf(1.5), COUNTS["scene"]) - 1]
        return np.stack(layers).astype(np.int32), np.array([scene], np.int32)

    def load_segmentations(self, indices) -> tuple[np.ndarray, np.ndarray]:
        items = [self.load_segmentation(int(i)) for i in indices]
        n_layers = max(len(seg) for seg, _ in items)
        seg = np.zeros((len(items), n_layers, SEG, SEG), np.int32)
        for row, (layers, _) in enumerate(items):
            seg[row, :len(layers)] = layers
        return seg, np.stack([labels for _, labels in items])


@dataclass
class SyntheticReader:
    """Activations (N, U, 7, 7): each unit responds to 2-3 labels (downsampled maps) + noise."""

    dataset: SyntheticDataset
    n_units: int
    seed: int = 1

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.dataset), self.n_units, MAP, MAP)

    def _unit_labels(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        ranges = label_ranges()
        common = np.concatenate([ranges["color"], ranges["object"][:40], ranges["part"][:20],
                                 ranges["material"][:10], ranges["scene"][:10]])
        return [rng.choice(common, size=rng.integers(2, 4), replace=False)
                for _ in range(self.n_units)]

    def read_rows(self, rows) -> np.ndarray:
        out = np.zeros((len(rows), self.n_units, MAP, MAP), np.float32)
        unit_labels = self._unit_labels()
        for k, i in enumerate(np.asarray(rows).tolist()):
            seg, level = self.dataset.load_segmentation(i)
            rng = np.random.default_rng((self.seed, i))
            cell = SEG // MAP
            for u, labels in enumerate(unit_labels):
                hit = np.isin(seg, labels).any(axis=0) | np.isin(level, labels).any()
                coarse = hit.reshape(MAP, cell, MAP, cell).mean(axis=(1, 3))
                out[k, u] = coarse * rng.uniform(0.5, 1.5) + rng.gamma(1.0, 0.15, (MAP, MAP))
        return out.astype(np.float16).astype(np.float32)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.read_rows(np.arange(start, stop))


# ----------------------------------------------------------------------------- naive loop
def naive_unit(reader: SyntheticReader, threshold: float, unit: int, *, beam: int = 5,
               max_length: int = 3) -> tuple[list[tuple[float, Formula]], int]:
    """The published loop for one unit: every candidate formula's mask over all images, IoU.

    Leaf masks are kept bit-packed per label (as a whole-dataset boolean array each); returns
    the final beam [(iou, formula)] and the number of candidate masks built.
    """
    dataset = reader.dataset
    n, size = len(dataset), SEG * SEG
    leaf_bits: dict[int, np.ndarray] = {}
    unit_mask = np.zeros(n * size, bool)
    for i in range(n):
        seg, level = dataset.load_segmentation(i)
        acts = reader.read_rows([i])[0, unit]
        if acts.max() > threshold:
            up = upsample_maps(acts[None], (SEG, SEG))[0].astype(np.float64)
            unit_mask[i * size:(i + 1) * size] = (up > threshold).reshape(-1)
        present = set(np.unique(seg[seg > 0]).tolist()) | set(level.tolist())
        for label in present:
            mask = (seg == label).any(axis=0).reshape(-1) if label not in level else \
                np.ones(size, bool)
            full = np.unpackbits(leaf_bits[label], count=n * size).astype(bool) \
                if label in leaf_bits else np.zeros(n * size, bool)
            full[i * size:(i + 1) * size] = mask
            leaf_bits[label] = np.packbits(full)
    labels = sorted(leaf_bits)

    def leaf(label: int) -> np.ndarray:
        return np.unpackbits(leaf_bits[label], count=n * size).astype(bool)

    def iou(mask: np.ndarray) -> float:
        inter = np.count_nonzero(mask & unit_mask)
        union = np.count_nonzero(mask | unit_mask)
        return inter / union if union else 0.0

    built = 0
    scored: dict[tuple, tuple[float, Formula]] = {}
    for label in labels:
        value = iou(leaf(label))
        built += 1
        if value > 0:
            scored[Formula(label).key()] = (value, Formula(label))
    current = sorted(scored.values(), key=lambda e: sort_key(*e))[:beam]
    masks = {f.key(): mask_of(f, leaf) for _, f in current}
    for _ in range(max_length - 1):
        new = {f.key(): (v, f) for v, f in current}
        for _, formula in current:
            if formula.length >= max_length:
                continue
            base = masks[formula.key()]
            for label in labels:
                if label in formula.labels:
                    continue
                other = leaf(label)
                for op in OPS:
                    mask = base | other if op == "or" else base & other if op == "and" \
                        else base & ~other
                    value = iou(mask)
                    built += 1
                    if value > 0:
                        f = formula.extend(op, label).canonical()
                        new.setdefault(f.key(), (value, f))
        current = sorted(new.values(), key=lambda e: sort_key(*e))[:beam]
        masks = {f.key(): mask_of(f, leaf) for _, f in current}
    return current, built


def mask_of(formula: Formula, leaf) -> np.ndarray:
    mask = leaf(formula.first)
    for op, label in formula.steps:
        other = leaf(label)
        mask = mask | other if op == "or" else mask & other if op == "and" else mask & ~other
    return mask


# ----------------------------------------------------------------------------- runs
def thresholds_of(reader: SyntheticReader) -> np.ndarray:
    return compute_thresholds(reader, 0.005, scheduler="threads", chunk_size=16)


def child(args: argparse.Namespace) -> None:
    """One beam search in this (fresh) process; prints wall time and peak RSS as JSON."""
    dataset = SyntheticDataset(args.images)
    reader = SyntheticReader(dataset, args.units)
    thresholds = thresholds_of(reader)
    start = time.perf_counter()
    compose_layer(reader, dataset, thresholds, scheduler="threads", num_workers=2,
                  device="cpu")
    wall = time.perf_counter() - start
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's over fork + exec)
    with open("/proc/self/status") as handle:
        peak = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM")) / 1024
    print(json.dumps({"images": args.images, "units": args.units, "wall_s": wall,
                      "peak_rss_mb": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=64)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--naive-units", type=int, default=2)
    parser.add_argument("--naive-images", type=int, default=60)
    parser.add_argument("--exact-units", type=int, default=4)
    parser.add_argument("--rss-images", type=int, nargs=2, default=(60, 240))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(f"load: {os.getloadavg()}, cpus: {os.cpu_count()}")

    # 1 + 2: ours and naive on the same (smaller) data, same units
    dataset = SyntheticDataset(args.naive_images)
    reader = SyntheticReader(dataset, args.units)
    thresholds = thresholds_of(reader)
    start = time.perf_counter()
    ours = compose_layer(reader, dataset, thresholds, scheduler="threads", num_workers=2,
                         device=args.device)
    ours_wall = time.perf_counter() - start
    print(f"ours, {args.naive_images} images x {args.units} units (7x7 -> 112x112, "
          f"{dataset.vocab.num_labels - 1} labels): {ours_wall:.1f} s, "
          f"{ours_wall / args.units:.3f} s per unit")
    naive_times = []
    for unit in range(args.naive_units):
        start = time.perf_counter()
        beam, built = naive_unit(reader, float(thresholds[unit]), unit)
        naive_times.append(time.perf_counter() - start)
        names = dataset.vocab.names
        ours_beam = [(e.iou, e.formula) for e in ours.units[unit].beam]
        same = [(v, f) for v, f in beam] == ours_beam
        print(f"unit {unit}: naive {naive_times[-1]:.1f} s ({built} masks built); same beam: "
              f"{same}")
        for (v1, f1), (v2, f2) in zip(beam, ours_beam):
            print(f"   naive {v1:.6f} {f1.text(names):45s} ours {v2:.6f} {f2.text(names)}")
        if not same:
            raise SystemExit("naive and ours differ")
    per_unit_naive = float(np.mean(naive_times))
    print(f"per unit: naive {per_unit_naive:.2f} s, ours {ours_wall / args.units:.4f} s, "
          f"ratio {per_unit_naive / (ours_wall / args.units):.0f}x")

    # 3: exact search on a few units
    few = SyntheticReader(dataset, args.exact_units)
    start = time.perf_counter()
    exact = compose_layer(few, dataset, thresholds[:args.exact_units], search="exact",
                          scheduler="threads", num_workers=2, device=args.device)
    exact_wall = time.perf_counter() - start
    print(f"exact search, {args.exact_units} units: {exact_wall:.1f} s; optimal: "
          f"{[u.optimal for u in exact.units]}; beam vs exact IoU: "
          f"{[(round(u.beam[0].iou, 4), round(u.exact.iou, 4)) for u in exact.units if u.exact]}")

    # 4: the full layer at --images, and peak RSS at two sizes (fresh processes)
    for images in (*args.rss_images,):
        out = subprocess.run([sys.executable, __file__, "--child", "--images", str(images),
                              "--units", str(args.units)], check=True, capture_output=True,
                             text=True)
        print("fresh process:", out.stdout.strip().splitlines()[-1])
    print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
    main()
