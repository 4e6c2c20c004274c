"""Benchmark: time per ablated unit set, full forward with a hook vs. the suffix from the cache.

For a middle layer of the toy CNN and of torchvision's resnet18 (weights=None, 112 px input), the
layer is recorded once into an activation cache (float16, as by default), then the same S
single-unit sets are evaluated on the same labeled images two ways:

- hooks: the full model runs on the dataset's images (decoded and normalised each time, as
  ``run_ablation`` does without a cache) with a batched ablation hook at the layer;
- suffix: only the part of the model after the layer runs, from the cached activations.

Prints seconds per unit set for both and the ratio (goal: suffix >= 3x faster).

    python scripts/bench_ablation.py [--n-images 120] [--sets 32] [--size 112] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dissect.ablation import AblationStudy, DatasetImages, load_class_labels  # noqa: E402
from dissect.data import IMAGENET_MEAN, IMAGENET_STD, BrodenDataset  # noqa: E402
from dissect.record import CacheReader, cache_path, load_model, record_activations  # noqa: E402

CASES = (("dissect.toy:toy_model", ("conv2", "conv3")), ("resnet18", ("layer2", "layer3")))


def time_study(study: AblationStudy, sets: list[list[int]], rows: np.ndarray,
               repeats: int) -> float:
    """Best wall time (s) of evaluating ``sets`` on ``rows`` over ``repeats`` runs."""
    study.evaluate_counts(sets[:1], rows[:2])  # warm-up (first forward, FX, file handles)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        study.evaluate_counts(sets, rows)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-images", type=int, default=120, help="toy images (all evaluated)")
    parser.add_argument("--sets", type=int, default=32, help="single-unit sets evaluated")
    parser.add_argument("--size", type=int, default=112, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sets-per-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs (best is kept)")
    parser.add_argument("--scheduler", default="threads")
    parser.add_argument("--out", help="work directory (default: a temporary one)")
    parser.add_argument("--models", default=",".join(spec for spec, _ in CASES),
                        help="comma-separated model specs among the cases")
    args = parser.parse_args(argv)

    from dissect.toy import generate_toy_dataset

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_ablation_"))
    dataset_dir = work / "toybroden"
    if not (dataset_dir / "index.csv").is_file():
        generate_toy_dataset(dataset_dir, n_images=args.n_images, size=args.size, seed=0)
    dataset = BrodenDataset(dataset_dir)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
          f"{len(dataset)} images of {args.size} px; {args.sets} single-unit sets; "
          f"batch {args.batch_size} images x {args.sets_per_batch} sets; scheduler "
          f"{args.scheduler}")
    print(f"{'model':<22} {'layer':<7} {'units':>5} {'hooks s/set':>12} {'suffix s/set':>13} "
          f"{'ratio':>6}")
    for spec, layers in [case for case in CASES if case[0] in args.models.split(",")]:
        names, y = load_class_labels("scene", dataset)
        model = load_model(spec, num_classes=len(names))
        run_dir = work / spec.replace(":", "_").replace(".", "_")
        record_activations(model, dataset, list(layers), run_dir, mean=IMAGENET_MEAN,
                           std=IMAGENET_STD, batch_size=args.batch_size, device="cpu",
                           progress=False)
        images = DatasetImages(dataset, IMAGENET_MEAN, IMAGENET_STD)
        rows = np.arange(len(dataset))
        for layer in layers:
            common = dict(batch_size=args.batch_size, sets_per_batch=args.sets_per_batch,
                          scheduler=args.scheduler)
            hooks = AblationStudy(model, layer, y, names, images=images, use_suffix=False,
                                  **common)
            suffix = AblationStudy(model, layer, y, names, images=images,
                                   activations=CacheReader(cache_path(run_dir, layer)),
                                   use_suffix=True, **common)
            sets = [[u] for u in range(min(args.sets, suffix.n_units))]
            hook_time = time_study(hooks, sets, rows, args.repeats) / len(sets)
            suffix_time = time_study(suffix, sets, rows, args.repeats) / len(sets)
            print(f"{spec:<22} {layer:<7} {suffix.n_units:>5} {hook_time:>12.4f} "
                  f"{suffix_time:>13.4f} {hook_time / suffix_time:>5.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
