"""Benchmark of the exact thresholds (DESIGN.md §3 step 1) on a large dataset.

``scripts/bench_tally.py`` measures the tally on 1000 images, where a chunk's own top K is most
of the work. On a large dataset the merge tree of the per-task states takes over: K = q N h w
values a unit grows with N while a task's chunk does not, and a merge of f states partitions
f K values down to K. This script writes a float16 activation cache of ``--n-images`` images per
layer shape (``--shapes``) and kind of values (``--values``: gamma-distributed, or the same cut
at 0 as after a ReLU, whose ties slowed NumPy's selection 5-60x before 2026-12-06), in the
DESIGN §4a layout ((32, U, h, w) chunks; reused from ``--workdir`` when it matches), and
measures, each in a fresh subprocess, fastest of ``--repeat`` rounds:

- ``read``: reading the cache once as stored (``CacheReader.read(..., stored=True)`` over the
  chunks of ``compute_thresholds``), the floor of any exact quantile;
- ``thresholds``: ``compute_thresholds`` with the threads scheduler, 1 and 2 workers, with the
  merge fan-in it chooses (``dissect.parallel.merge_fan_in``) and with fan-in 2 (its merge
  budget set to 0), the fan-in before 2026-12-06.

It prints per shape and kind: K, tasks, the chosen fan-in, ms/image, the ratios to the read and the
ratio of the two fan-ins, and checks that every run gives the same thresholds. It prints
figures and never judges them.

Usage::

    python scripts/bench_thresholds.py             # 16000 images, 512x7 and 256x14, gamma and relu
    python scripts/bench_thresholds.py --n-images 4000 --shapes 64x56 --values relu --repeat 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BATCH = 32          # images per HDF5 chunk, as the recorder writes them


def write_cache(path: Path, n_images: int, n_units: int, side: int, relu: bool = False,
                seed: int = 0) -> None:
    """A float16 cache of (n_images, n_units, side, side) gamma-distributed activations;
    ``relu``: each unit's values lowered by its own offset and cut at 0, as after a ReLU
    (20% to 90% of a unit's values are exactly 0)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_tally import new_cache  # the module beside this script

    rng = np.random.default_rng([seed, n_units, side])
    with new_cache(path, (n_images, n_units, side, side), BATCH,
                   {"layer": f"layer_{n_units}x{side}", "n_images": n_images}) as (acts, amax):
        gain = rng.uniform(0.5, 2.0, size=(1, n_units, 1, 1))
        # gamma(1.5, 0.4) quantiles 0.2 to 0.9: the fraction of each unit's values cut to 0
        offset = rng.uniform(0.20, 1.25, size=(1, n_units, 1, 1)) if relu else 0.0
        for start in range(0, n_images, 1024):
            stop = min(start + 1024, n_images)
            block = (np.maximum(rng.gamma(1.5, 0.4, size=(stop - start, n_units, side, side))
                                - offset, 0.0) * gain).astype(np.float16)
            acts[start:stop] = block
            amax[start:stop] = block.reshape(stop - start, n_units, -1).max(-1)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process (run by the parent in a fresh subprocess)."""
    import dissect.parallel as parallel
    from dissect.parallel import compute_thresholds, default_chunk_size, scheduler_context
    from dissect.record import CacheReader
    from dissect.stats import TopKQuantile

    reader = CacheReader(args.cache)
    n, units = reader.shape[:2]
    chunk = default_chunk_size(reader.shape, (112, 112))
    n_values = n * int(np.prod(reader.shape[2:]))
    if args.fan_in == "2":
        parallel._MERGE_BYTES = 0                   # merge_fan_in then gives 2
    k = TopKQuantile(units, args.quantile, n_values).k
    out: dict[str, Any] = {"n": n, "k": k, "tasks": -(-n // chunk),
                           "fan_in": parallel.merge_fan_in(k * units * 4)}
    if args.measure == "read":
        start = time.perf_counter()
        for first in range(0, n, chunk):
            reader.read(first, min(first + chunk, n), stored=True)
        out["seconds"] = time.perf_counter() - start
        return out
    with scheduler_context("threads", args.workers) as setup:
        start = time.perf_counter()
        values = compute_thresholds(reader, args.quantile, chunk_size=chunk, scheduler=setup)
        out["seconds"] = time.perf_counter() - start
    out["check"] = float(np.nansum(values))
    return out


def run_once(script: Path, cache: Path, what: str, workers: int, fan_in: str,
             quantile: float) -> dict[str, Any]:
    command = [sys.executable, str(script), "--measure", what, "--cache", str(cache),
               "--workers", str(workers), "--fan-in", fan_in, "--quantile", str(quantile)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-images", type=int, default=16000)
    parser.add_argument("--shapes", default="512x7,256x14",
                        help="units x map side, comma-separated")
    parser.add_argument("--values", default="gamma,relu",
                        help="value kinds, comma-separated: gamma (no ties) and relu (20%%-90%% "
                             "of each unit's values exactly 0, as after a ReLU)")
    parser.add_argument("--quantile", type=float, default=0.005)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the caches here and reuse them (default: a temporary dir)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the fastest run counts")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--fan-in", default="auto", choices=["auto", "2"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        script = Path(__file__).resolve()
        plan = [("read", "read", 1, "auto")] + [
            (f"thresholds x{k} fan-in {f}", "thresholds", k, f)
            for f in ("auto", "2") for k in (1, 2)]
        rows: dict[str, list[str]] = {}
        names = []
        if not set(args.values.split(",")) <= {"gamma", "relu"}:
            parser.error(f"--values: expected gamma and/or relu, got {args.values!r}")
        cases = [(part, kind) for kind in args.values.split(",")
                 for part in args.shapes.split(",")]
        for part, kind in cases:
            units, side = (int(x) for x in part.strip().split("x"))
            relu = kind == "relu"
            suffix = "_relu" if relu else ""
            cache = workdir / f"thresholds_{args.n_images}_{units}x{side}{suffix}.h5"
            if not cache.exists():
                start = time.perf_counter()
                write_cache(cache, args.n_images, units, side, relu=relu)
                print(f"  wrote {cache.name} in {time.perf_counter() - start:.0f} s",
                      file=sys.stderr)
            runs: dict[str, list[dict[str, Any]]] = {label: [] for label, *_ in plan}
            for _ in range(args.repeat):                  # rounds: every measurement once
                for label, what, workers, fan_in in plan:
                    runs[label].append(run_once(script, cache, what, workers, fan_in,
                                                args.quantile))
            best = {label: min(r["seconds"] for r in group) for label, group in runs.items()}
            checks = {r["check"] for label, group in runs.items() if label != "read"
                      for r in group}
            info = runs["read"][0]
            names.append(f"{units}x{side}x{side}{' relu' if relu else ''}")
            ms = {label: 1e3 * seconds / info["n"] for label, seconds in best.items()}
            table = [("K (values kept per unit)", f"{info['k']}"),
                     ("tasks (chunks of compute_thresholds)", f"{info['tasks']}"),
                     ("merge fan-in chosen", f"{info['fan_in']}"),
                     ("read the cache once, ms/img", f"{ms['read']:.3f}")]
            for f in ("auto", "2"):
                for k in (1, 2):
                    label = f"thresholds x{k} fan-in {f}"
                    table.append((f"{label}, ms/img", f"{ms[label]:.3f}"))
            for f in ("auto", "2"):
                for k in (1, 2):
                    label = f"thresholds x{k} fan-in {f}"
                    table.append((f"{label} / read", f"{best[label] / best['read']:.2f}"))
            for k in (1, 2):
                chosen = best[f"thresholds x{k} fan-in auto"]
                two = best[f"thresholds x{k} fan-in 2"]
                table.append((f"x{k}: fan-in chosen / fan-in 2", f"{chosen / two:.2f}"))
            table.append(("identical thresholds in every run", "yes" if len(checks) == 1 else "NO"))
            for label, value in table:
                rows.setdefault(label, []).append(value)
        print(f"{args.n_images} images, float16 cache, q = {args.quantile}, threads scheduler, "
              f"fastest of {args.repeat} round(s); xK = K workers")
        width = max(len(label) for label in rows) + 2
        print(" " * width + "".join(f"{name:>16}" for name in names))
        for label, values in rows.items():
            print(f"{label:<{width}}" + "".join(f"{v:>16}" for v in values))


if __name__ == "__main__":
    main()
