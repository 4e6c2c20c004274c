"""Benchmark of the significance stage (B permutations) against the tally on the same data.

The data are the tally benchmark's (``scripts/bench_tally.py``'s ``generate``: a Broden-format
dataset of PNG label maps and a float16 activation cache whose units respond to a preferred
label plus noise), written to a temporary directory (or ``--workdir``).

Each measurement runs in a fresh subprocess (so peak RSS is its own), one worker of the threads
scheduler unless ``--workers`` says otherwise:

- ``tally``: ``dissect.parallel.compute_counts`` with the layer's thresholds (the tally's own
  counting pass: read the cache, decode label maps, upsample, threshold, count);
- ``significance``: ``dissect.significance.significance_layer`` with ``--permutations`` (100)
  and the same thresholds;
- with ``--half``: the significance again on the first half of the images (a second dataset
  written with ``--n-images / 2``), to show that peak memory does not grow with the dataset.

It prints seconds and ms/image of each, the ratio significance / tally (goal: at most 10 for
B = 100 on CPU), peak RSS, and the load average. ``--repeat`` runs rounds of both, interleaved,
and prints the per-round ratios.

Usage::

    python scripts/bench_significance.py                      # 400 images, 512 units, B = 100
    python scripts/bench_significance.py --n-images 200 --repeat 3
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process (the parent runs it in a fresh subprocess)."""
    from dissect.data import BrodenDataset
    from dissect.parallel import compute_counts, compute_thresholds
    from dissect.record import CacheReader

    reader = CacheReader(args.cache)
    dataset = BrodenDataset(args.data)
    n = reader.shape[0]
    check: list[float] = []
    if args.measure == "thresholds":
        np.save(args.thresholds, compute_thresholds(reader, 0.005, scheduler="threads",
                                                    num_workers=args.workers))
        seconds = 0.0
    elif args.measure == "tally":
        thresholds = np.load(args.thresholds)
        start = time.perf_counter()
        counts = compute_counts(reader, dataset, thresholds, scheduler="threads",
                                num_workers=args.workers)
        seconds = time.perf_counter() - start
        check = [float(counts.intersection.sum())]
    else:
        from dissect.significance import significance_layer

        thresholds = np.load(args.thresholds)
        start = time.perf_counter()
        result = significance_layer(reader, dataset, thresholds,
                                    permutations=args.permutations, scheduler="threads",
                                    num_workers=args.workers, chunk_size=args.chunk_size)
        seconds = time.perf_counter() - start
        check = [float(result.intersection.sum()), float(result.significant.sum()),
                 float(np.median(result.perm_p)), float(((result.iou >= 0.04)
                                                         & result.significant).sum()),
                 float((result.iou >= 0.04).sum())]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "n": n, "rss_mb": rss, "check": check}


def run_once(script: Path, what: str, cache: Path, data: Path, thresholds: Path,
             args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, str(script), "--measure", what, "--cache", str(cache),
               "--data", str(data), "--thresholds", str(thresholds), "--workers",
               str(args.workers), "--permutations", str(args.permutations)]
    if args.chunk_size:
        command += ["--chunk-size", str(args.chunk_size)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def prepare(workdir: Path, n_images: int, args: argparse.Namespace) -> tuple[Path, Path, str]:
    import numpy as np
    from bench_tally import generate_dataset, write_cache

    cache, data = workdir / "cache" / "layer.h5", workdir / "dataset"
    if cache.exists() and (data / "index.csv").exists():
        return data, cache, "reused"
    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    data = generate_dataset(workdir, n_images, args.seg_size, args.labels)
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_cache(cache, np.load(workdir / "layers.npy"), args.units, args.size, args.seg_size,
                args.labels)
    return data, cache, f"generated in {time.perf_counter() - start:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=400)
    parser.add_argument("--units", type=int, default=512)
    parser.add_argument("--size", type=int, default=7)
    parser.add_argument("--seg-size", type=int, default=112)
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--permutations", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--half", action="store_true",
                        help="also measure significance on a dataset of half the images")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--measure", default=None, choices=["thresholds", "tally",
                                                            "significance"])
    parser.add_argument("--cache", default=None)
    parser.add_argument("--data", default=None)
    parser.add_argument("--thresholds", default=None)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return
    script = Path(__file__).resolve()
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        sizes = [args.n_images] + ([args.n_images // 2] if args.half else [])
        runs: dict[str, list[dict[str, Any]]] = {}
        load_before = os.getloadavg()
        for n_images in sizes:
            data, cache, made = prepare(workdir / f"n{n_images}", n_images, args)
            print(f"{n_images} images, {args.units} units at {args.size}x{args.size}, "
                  f"{args.seg_size}x{args.seg_size} PNG label maps, ~{args.labels} labels: "
                  f"{made}")
            thresholds = workdir / f"n{n_images}" / "thresholds.npy"
            run_once(script, "thresholds", cache, data, thresholds, args)
            rounds = args.repeat if n_images == args.n_images else 1
            for _ in range(rounds):
                for what in ("tally", "significance"):
                    runs.setdefault(f"{what} n={n_images}", []).append(
                        run_once(script, what, cache, data, thresholds, args))
        load_after = os.getloadavg()
        print(f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/"
              f"{load_before[2]:.2f}, after {load_after[0]:.2f}/{load_after[1]:.2f}/"
              f"{load_after[2]:.2f} on {os.cpu_count()} cores; {args.workers} worker(s), "
              f"threads scheduler, B = {args.permutations}")
        print(f"{'measurement':24s} {'seconds':>8s} {'ms/image':>9s} {'peak RSS MB':>12s}")
        for name, done in runs.items():
            best = min(done, key=lambda r: r["seconds"])
            print(f"{name:24s} {best['seconds']:8.2f} {1000 * best['seconds'] / best['n']:9.2f} "
                  f"{max(r['rss_mb'] for r in done):12.0f}")
        tally, sig = runs[f"tally n={args.n_images}"], runs[f"significance n={args.n_images}"]
        ratios = [s["seconds"] / t["seconds"] for t, s in zip(tally, sig)]
        fastest = min(r["seconds"] for r in sig) / min(r["seconds"] for r in tally)
        print(f"significance / tally: fastest {fastest:.2f}; per round "
              + ", ".join(f"{r:.2f}" for r in ratios) + " (goal <= 10 for B = 100)")
        check = sig[0]["check"]
        print(f"significant units {check[1]:.0f}, significant detectors {check[3]:.0f} of "
              f"{check[4]:.0f} detectors (IoU >= 0.04), median p {check[2]:.3f}; observed "
              f"intersection equals the tally's: {check[0] == tally[0]['check'][0]}")
        if args.half:
            half = runs[f"significance n={args.n_images // 2}"][0]
            print(f"peak RSS of significance: {half['rss_mb']:.0f} MB at {args.n_images // 2} "
                  f"images, {max(r['rss_mb'] for r in sig):.0f} MB at {args.n_images}")


if __name__ == "__main__":
    main()
