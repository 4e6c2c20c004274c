"""Benchmark of the dissection stage (thresholds and IoU tally) on a synthetic Broden-like layer.

The script writes, into a temporary directory (or ``--workdir``):

- a Broden-format dataset (DESIGN.md §2) read by the real ``BrodenDataset``: segmentation PNGs
  (R + 256 * G) of ``--seg-size`` pixels, six categories with about ``--labels`` labels in all:
  color (1 layer), object (most images), part (0-2 layers), material (half the images), scene and
  texture (image-level labels); a few labels belong to two categories. Label maps are blocky
  regions, like Broden's. Image files are tiny placeholders (the tally never opens them).
- an activation cache ``cache/layer.h5`` in the DESIGN §4a layout (float16 ``acts`` (N, U, h, w)
  in (32, U, h, w) chunks, ``amax``, ``done``, ``complete``), whose units respond to a preferred
  label plus noise, so masks and IoUs look like a real layer's.

It then measures, each in a fresh subprocess (so peak RSS is per measurement):

- ``floor``: reading the cache once and the label maps once (``CacheReader.read`` +
  ``BrodenDataset.load_segmentations`` over the chunks, one worker), the I/O and decoding that
  any tally must do;
- ``thresholds``: ``compute_thresholds`` (exact top-K quantile), 1 and 2 workers;
- ``tally``: ``compute_counts`` with 1 and 2 workers, threads and processes schedulers;

and prints ms/image, the ratios tally/floor and 1-worker/2-worker, and peak RSS (MB).

Usage::

    python scripts/bench_tally.py                 # 2000 images, 512 units at 7x7, 112x112 segs
    python scripts/bench_tally.py --n-images 300  # quicker
    python scripts/bench_tally.py --repeat 3      # 3 rounds: fastest runs and per-round ratios

A last diagnostic line times, with a plain 1- and 2-thread pool on the first 800 images, the
label-map loading alone (``load_segmentations``) and ``count_iou`` alone on preloaded arrays, to
show which part of the threads scheduler's 2-worker speedup the GIL limits.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CATEGORY_SHARES = [("color", 0.012), ("object", 0.58), ("part", 0.235), ("material", 0.033),
                   ("scene", 0.1), ("texture", 0.04)]
IMAGE_LEVEL = {"scene", "texture"}
BLOCK = 8          # label regions are drawn at seg_size / BLOCK and enlarged (blocky regions)


# ----------------------------------------------------------------------------- data generation
def category_labels(n_labels: int) -> dict[str, np.ndarray]:
    """Label numbers of each category (consecutive blocks starting at 1)."""
    labels, start = {}, 1
    for name, share in CATEGORY_SHARES:
        count = max(2, int(round(share * n_labels)))
        labels[name] = np.arange(start, start + count)
        start += count
    return labels


def region_map(rng: np.random.Generator, low: int, labels: np.ndarray, n_regions: int,
               empty: float) -> np.ndarray:
    """(low, low) label map of Voronoi regions with random labels (0 with probability empty)."""
    seeds = rng.integers(0, low, size=(n_regions, 2))
    yy, xx = np.mgrid[0:low, 0:low]
    distance = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
    region = distance.argmin(0)
    values = rng.choice(labels, size=n_regions)
    values[rng.random(n_regions) < empty] = 0
    return values[region]


def smooth(maps: np.ndarray) -> np.ndarray:
    """3x3 box blur of (U, h, w) maps (edge-replicated): CNN maps are spatially correlated."""
    padded = np.pad(maps, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = maps.shape[1:]
    return sum(padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0


def write_png(path: Path, labels: np.ndarray) -> None:
    rgb = np.zeros(labels.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    Image.fromarray(rgb, "RGB").save(path, compress_level=1)


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def generate(workdir: Path, n_images: int, n_units: int, size: int, seg_size: int,
             n_labels: int, seed: int = 0) -> tuple[Path, Path]:
    """Write the dataset and the cache; returns (dataset dir, cache path)."""
    rng = np.random.default_rng(seed)
    data = workdir / "dataset"
    (data / "images" / "seg").mkdir(parents=True, exist_ok=True)
    cats = category_labels(n_labels)
    top = max(int(v.max()) for v in cats.values())
    # a few part labels also belong to object (with a smaller coverage there)
    shared = cats["part"][:5]
    names = {n: f"label{n}" for n in range(1, top + 1)}
    write_csv(data / "category.csv", ["name", "first", "last", "count", "frequency"],
              [[c, int(v[0]), int(v[-1]), len(v), n_images] for c, v in cats.items()])
    label_rows = []
    for category, numbers in cats.items():
        for n in numbers:
            extra = ";object(0)" if category == "part" and n in shared else ""
            label_rows.append([int(n), names[n], f"{category}({n - numbers[0] + 1}){extra}", 1,
                               1.0, ""])
    write_csv(data / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
              [[0, "-", "", 0, 0, ""]] + label_rows)
    for category, numbers in cats.items():
        rows = [[i + 1, int(n), names[n], 1, 1.0] for i, n in enumerate(numbers)]
        if category == "object":
            rows += [[len(numbers) + i + 1, int(n), names[n], 1, 0.5]
                     for i, n in enumerate(shared)]
        write_csv(data / f"c_{category}.csv", ["code", "number", "name", "frequency", "coverage"],
                  rows)
    placeholder = data / "images" / "placeholder.jpg"
    Image.new("RGB", (8, 8)).save(placeholder)

    low = seg_size // BLOCK
    scale = seg_size // size                  # seg pixels per activation cell (16 for 112 / 7)
    preferred = rng.choice(np.concatenate([cats["object"], cats["part"], cats["color"],
                                           cats["material"]]), size=n_units)
    gain = rng.uniform(2.0, 6.0, size=n_units)
    cache = workdir / "cache" / "layer.h5"
    cache.parent.mkdir(exist_ok=True)
    batch = 32
    index_rows = []
    with h5py.File(cache, "w") as file:
        acts_d = file.create_dataset("acts", (n_images, n_units, size, size), np.float16,
                                     chunks=(batch, n_units, size, size))
        amax_d = file.create_dataset("amax", (n_images, n_units), np.float32)
        file.create_dataset("done", data=np.ones(-(-n_images // batch), dtype=bool))
        for start in range(0, n_images, batch):
            stop = min(start + batch, n_images)
            block = np.empty((stop - start, n_units, size, size), np.float32)
            for i in range(start, stop):
                row = [f"img{i}.jpg", "train", 224, 224, seg_size, seg_size]
                os.link(placeholder, data / "images" / f"img{i}.jpg") \
                    if not (data / "images" / f"img{i}.jpg").exists() else None
                layers = []
                for category in ("color", "object", "part", "material"):
                    count = {"color": 1, "object": int(rng.random() < 0.9),
                             "part": int(rng.choice([0, 0, 0, 1, 2])),
                             "material": int(rng.random() < 0.5)}[category]
                    files = []
                    for k in range(count):
                        low_map = region_map(rng, low, cats[category], int(rng.integers(3, 12)),
                                             empty=0.3 if category != "color" else 0.0)
                        name = f"seg/img{i}_{category}{k}.png"
                        write_png(data / "images" / name,
                                  np.kron(low_map, np.ones((BLOCK, BLOCK), np.int64)))
                        files.append(name)
                        layers.append(low_map)
                    row.append(";".join(files))
                row.append(str(int(rng.choice(cats["scene"]))) if rng.random() < 0.95 else "")
                row.append(str(int(rng.choice(cats["texture"]))) if rng.random() < 0.1 else "")
                index_rows.append(row)
                # unit response: fraction of each activation cell covered by the preferred label
                cover = np.zeros((n_units, size, size))
                for low_map in layers:
                    if scale % BLOCK == 0:               # cells are whole blocks: work at low res
                        cells, per = low_map[: size * scale // BLOCK, : size * scale // BLOCK], \
                            scale // BLOCK
                    else:
                        cells, per = np.kron(low_map, np.ones((BLOCK, BLOCK), np.int64))[
                            : size * scale, : size * scale], scale
                    hit = cells[None] == preferred[:, None, None]
                    cover += hit.reshape(n_units, size, per, size, per).mean(axis=(2, 4))
                noise = smooth(rng.gamma(1.5, 0.4, size=(n_units, size, size)))
                block[i - start] = gain[:, None, None] * cover + noise
            acts_d[start:stop] = block.astype(np.float16)
            amax_d[start:stop] = block.astype(np.float16).reshape(stop - start, n_units, -1).max(-1)
        file.attrs["fingerprint"] = json.dumps({"layer": "layer"})
        file.attrs["schema_version"] = 1
        file.attrs["n_written"] = n_images
        file.attrs["complete"] = True
    write_csv(data / "index.csv",
              ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "part", "material",
               "scene", "texture"], index_rows)
    return data, cache


# ----------------------------------------------------------------------------- measurements
def peak_rss_mb() -> tuple[float, float]:
    """(peak RSS of this process, largest peak RSS of a finished child) in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def warm_worker(_: int) -> None:
    """Import what the tasks need and wait a little, so every pool process gets started."""
    import torch

    import dissect.data  # noqa: F401
    import dissect.parallel  # noqa: F401
    import dissect.record  # noqa: F401

    torch.cuda.is_available()
    time.sleep(0.5)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process (run by the parent in a fresh subprocess).

    Returns wall seconds, CPU seconds of this process (all its threads; pool processes of the
    processes scheduler are not included), N and peak RSS.
    """
    import torch

    from dissect.data import BrodenDataset
    from dissect.parallel import (
        compute_counts,
        compute_thresholds,
        default_chunk_size,
        scheduler_context,
    )
    from dissect.record import CacheReader

    reader = CacheReader(args.cache)
    dataset = BrodenDataset(args.data)
    n = reader.shape[0]
    chunk = args.chunk_size or default_chunk_size(reader.shape, dataset.seg_size)
    check: list[int] = []
    if args.measure == "scaling":
        return thread_scaling(reader, dataset, chunk, args.thresholds)
    if args.measure == "imports":
        seconds = cpu = 0.0
    elif args.measure == "floor":
        torch.set_num_threads(1)
        cpu, start = time.process_time(), time.perf_counter()
        for a in range(0, n, chunk):
            reader.read(a, min(a + chunk, n))
            dataset.load_segmentations(range(a, min(a + chunk, n)))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    else:
        with scheduler_context(args.scheduler, args.workers) as setup:
            pool = setup.compute_kwargs.get("pool")
            if pool is not None:                     # start the workers outside the timing
                list(pool.map(warm_worker, range(args.workers)))
            cpu, start = time.process_time(), time.perf_counter()
            if args.measure == "thresholds":
                values = compute_thresholds(reader, 0.005, chunk_size=chunk, scheduler=setup)
                seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
                np.save(args.thresholds, values)
            else:
                counts = compute_counts(reader, dataset, np.load(args.thresholds),
                                        chunk_size=chunk, scheduler=setup)
                seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
                check = [int(counts.intersection.sum()), int(counts.act_area.sum()),
                         int(counts.label_area.sum())]
    own, children = peak_rss_mb()
    return {"seconds": seconds, "cpu": cpu, "n": n, "rss_mb": own, "child_rss_mb": children,
            "check": check}


def thread_scaling(reader: Any, dataset: Any, chunk: int, thresholds_path: str
                   ) -> dict[str, Any]:
    """ms/image of load_segmentations and of count_iou (preloaded) with 1 and 2 threads."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from dissect.stats import count_iou

    n = min(800, reader.shape[0])
    size = max(1, min(chunk, n // 8))
    chunks = [(a, min(a + size, n)) for a in range(0, n, size)]
    thresholds = np.load(thresholds_path)
    loaded = {c: (reader.read(*c), *dataset.load_segmentations(range(*c))) for c in chunks}

    def load(c: tuple[int, int]) -> None:
        dataset.load_segmentations(range(*c))

    def count(c: tuple[int, int]) -> None:
        torch.set_num_threads(1)
        acts, seg, labels = loaded[c]
        count_iou(acts, seg, labels, thresholds, dataset.vocab.primary, len(dataset.categories))

    out: dict[str, Any] = {"n": n}
    for name, function in (("segs", load), ("count", count)):
        for workers in (1, 2):
            with ThreadPoolExecutor(workers) as pool:
                start = time.perf_counter()
                list(pool.map(function, chunks))
                out[f"{name} x{workers}"] = time.perf_counter() - start
    return out


def run_once(script: Path, common: list[str], what: str, scheduler: str = "threads",
             workers: int = 1) -> dict[str, Any]:
    """One measurement in a fresh subprocess."""
    command = [sys.executable, str(script), "--measure", what, "--scheduler", scheduler,
               "--workers", str(workers), *common]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest run, with the largest peak RSS of all runs."""
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["rss_mb"] = max(r["rss_mb"] for r in runs)
    best["child_rss_mb"] = max(r["child_rss_mb"] for r in runs)
    return best


def paired(runs: dict[str, list[dict[str, Any]]], top: str, bottom: str) -> str:
    """Ratio of the fastest runs, and the median and range of the per-round ratios."""
    best = fastest(runs[top])["seconds"] / fastest(runs[bottom])["seconds"]
    rounds = [a["seconds"] / b["seconds"] for a, b in zip(runs[top], runs[bottom])]
    if len(rounds) == 1:
        return f"{best:.2f}"
    return (f"{best:.2f} (per round: median {np.median(rounds):.2f}, "
            f"{min(rounds):.2f}-{max(rounds):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=2000)
    parser.add_argument("--units", type=int, default=512)
    parser.add_argument("--size", type=int, default=7)
    parser.add_argument("--seg-size", type=int, default=112)
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="images per Dask task (default: dissect.parallel's default)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the generated data here (default: a temporary directory)")
    parser.add_argument("--schedulers", default="threads,processes")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every measurement: prints the fastest run of each and "
                             "the per-round ratios (for shared, noisy machines)")
    # internal: one measurement in a subprocess
    parser.add_argument("--measure", default=None,
                        choices=["imports", "floor", "thresholds", "tally", "scaling"])
    parser.add_argument("--scheduler", default="threads")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cache", default=None)
    parser.add_argument("--data", default=None)
    parser.add_argument("--thresholds", default=None)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat: {args.repeat} must be >= 1")
    if args.measure:
        print(json.dumps(measure(args)))
        return

    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        cache = workdir / "cache" / "layer.h5"
        data = workdir / "dataset"
        made = "reused"
        if not (cache.exists() and (data / "index.csv").exists()):
            data, cache = generate(workdir, args.n_images, args.units, args.size, args.seg_size,
                                   args.labels)
            made = f"generated in {time.perf_counter() - start:.1f} s"
        with h5py.File(cache, "r") as file:
            amax, shape = file["amax"][()], file["acts"].shape
        print(f"{shape[0]} images, {shape[1]} units at {shape[2]}x{shape[3]}, "
              f"{args.seg_size}x{args.seg_size} PNG label maps, ~{args.labels} labels: {made} "
              f"({workdir})")
        thresholds = workdir / "thresholds.npy"
        common = ["--cache", str(cache), "--data", str(data), "--thresholds", str(thresholds)]
        if args.chunk_size:
            common += ["--chunk-size", str(args.chunk_size)]
        script = Path(__file__).resolve()
        load_before = f"{os.getloadavg()[0]:.2f}"
        plan = [("floor", "floor", "threads", 1)]
        plan += [(f"thresholds threads x{k}", "thresholds", "threads", k) for k in (1, 2)]
        plan += [(f"tally {scheduler} x{k}", "tally", scheduler, k)
                 for scheduler in args.schedulers.split(",") for k in (1, 2)]
        # Rounds run every measurement once, in order: a slow spell of a shared machine then
        # affects one round's measurements together, and per-round ratios stay comparable.
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in plan}
        imports = run_once(script, common, "imports")
        for _ in range(args.repeat):
            for name, what, scheduler, workers in plan:
                runs[name].append(run_once(script, common, what, scheduler, workers))
        results = {name: fastest(done) for name, done in runs.items()}
        n = results["floor"]["n"]
        active = amax > np.load(thresholds)[None, :]
        print(f"active (image, unit) pairs (max > threshold): {100 * active.mean():.1f}%, "
              f"{active.sum() / n:.1f} maps of {shape[1]} upsampled per image")
        print(f"load average before/after: {load_before} / {os.getloadavg()[0]:.2f} "
              f"on {os.cpu_count()} cores; fastest of {args.repeat} round(s)")
        print(f"{'measurement':26s} {'ms/image':>9s} {'cpu ms/image':>13s} {'peak RSS MB':>12s} "
              f"{'pool RSS MB':>12s}")
        for name, r in results.items():
            cpu = f"{1000 * r['cpu'] / n:13.2f}" if "processes" not in name else f"{'-':>13s}"
            pool = f"{r['child_rss_mb']:12.0f}" if "processes" in name else f"{'-':>12s}"
            print(f"{name:26s} {1000 * r['seconds'] / n:9.2f} {cpu} {r['rss_mb']:12.0f} {pool}")
        if args.repeat > 1:
            print("every round, ms/image: " + "; ".join(
                f"{name} " + " ".join(f"{1000 * r['seconds'] / n:.2f}" for r in done)
                for name, done in runs.items()))
        checks = {tuple(r["check"]) for name, done in runs.items() if name.startswith("tally")
                  for r in done}
        print(f"identical counts in every tally run: {len(checks) == 1}")
        print(f"thresholds: thresholds/floor "
              f"{paired(runs, 'thresholds threads x1', 'floor')}; 1-worker/2-worker "
              f"{paired(runs, 'thresholds threads x1', 'thresholds threads x2')}")
        for scheduler in args.schedulers.split(","):
            one, two = f"tally {scheduler} x1", f"tally {scheduler} x2"
            cpu_ratio = (f", cpu tally/floor {results[one]['cpu'] / results['floor']['cpu']:.2f}"
                         if scheduler == "threads" else "")
            print(f"tally {scheduler}: tally/floor (1 worker) {paired(runs, one, 'floor')}"
                  f"{cpu_ratio}; 1-worker/2-worker {paired(runs, one, two)}")
        peak = max(max(r["rss_mb"], r["child_rss_mb"] if "processes" in name else 0)
                   for name, r in results.items())
        print(f"largest peak RSS of any process: {peak:.0f} MB (a process that only imports "
              f"dissect, torch and dask: {imports['rss_mb']:.0f} MB)")
        command = [sys.executable, str(script), "--measure", "scaling", *common]
        scaling = json.loads(subprocess.run(command, check=True, capture_output=True,
                                            text=True).stdout.strip().splitlines()[-1])
        parts = []
        for name, what in (("segs", "load_segmentations"), ("count", "count_iou")):
            one, two = scaling[f"{name} x1"], scaling[f"{name} x2"]
            parts.append(f"{what} {1000 * one / scaling['n']:.2f} ms/image, 1-thread/2-thread "
                         f"{one / two:.2f}")
        print("thread pool diagnostics: " + "; ".join(parts))


if __name__ == "__main__":
    main()
