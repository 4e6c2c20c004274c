"""Benchmark: images/s of explain_prediction against the bare forward + backward (issue 17).

The same model (torchvision resnet18, weights=None, fixed seed), batch and layer; timed side by side
in one run, interleaved, median of ``--repeats``:

- ``bare``: ``model(x)``, then ``logits[target].sum().backward()`` (every parameter's gradient);
- ``to_layer``: ``model(x)``, then ``torch.autograd.grad`` of the target logits to the layer's
  output only (the least any gradient x activation method must do);
- ``explain``: :func:`dissect.explain.explain_prediction` (forward, backward to the layer,
  contributions, concept grouping, Grad-CAM and top-k concept maps upsampled to the image).

Usage: ``python scripts/bench_explain.py [--size 112 224] [--batch 8] [--repeats 5] [--device cpu]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from dissect.explain import explain_prediction
from dissect.tally import DissectionResult


def hand_dissection(layer: str, n_units: int, n_labels: int = 60, seed: int = 0
                    ) -> DissectionResult:
    """A dissection with random labels and IoUs (the benchmark does not run a tally)."""
    rng = np.random.default_rng(seed)
    categories = ("object", "part", "material", "color")
    names = [""] + [f"concept{i}" for i in range(1, n_labels)]
    primary = np.array([-1] + [i % len(categories) for i in range(1, n_labels)], dtype=np.int64)
    unit_label = rng.integers(0, n_labels, n_units)
    unit_iou = rng.uniform(0, 0.2, n_units)
    iou = np.zeros((n_units, n_labels))
    iou[np.arange(n_units), unit_label] = unit_iou
    cat_label = np.zeros((n_units, len(categories)), dtype=np.int64)
    cat_iou = np.zeros((n_units, len(categories)))
    unit_category = np.array([categories[max(primary[n], 0)] for n in unit_label], dtype=object)
    zeros = np.zeros
    return DissectionResult(layer, categories, zeros(n_units), zeros(n_labels, np.int64),
                            zeros((n_units, n_labels), np.int64),
                            zeros((n_units, len(categories)), np.int64), iou, cat_label,
                            cat_iou, unit_label, unit_iou, unit_category, 0.04, names, primary)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", default=[112, 224])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    from torchvision.models import resnet18
    torch.manual_seed(0)
    model = resnet18(weights=None).eval().to(device)
    module = dict(model.named_modules())[args.layer]
    probe: dict[str, int] = {}

    def count_units(m: torch.nn.Module, i: object, o: torch.Tensor) -> None:
        probe["units"] = int(o.shape[1])
    handle = module.register_forward_hook(count_units)
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64, device=device))
    handle.remove()
    units = probe["units"]
    dissection = hand_dissection(args.layer, units)
    print(f"device={device} threads={torch.get_num_threads()} layer={args.layer} units={units} "
          f"batch={args.batch} repeats={args.repeats} torch={torch.__version__}")

    for size in args.size:
        x = torch.randn(args.batch, 3, size, size,
                        generator=torch.Generator().manual_seed(size)).to(device)

        def bare(x: torch.Tensor = x) -> None:
            model.zero_grad(set_to_none=True)
            logits = model(x)
            logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()

        def to_layer(x: torch.Tensor = x) -> None:
            stored = {}
            handle = module.register_forward_hook(lambda m, i, o: stored.setdefault("a", o))
            try:
                logits = model(x)
                torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(),
                                    stored["a"])
            finally:
                handle.remove()

        def explain(x: torch.Tensor = x) -> None:
            explain_prediction(model, args.layer, x, dissection)

        runs = {"bare": bare, "to_layer": to_layer, "explain": explain}
        for run in runs.values():   # warm-up
            run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                sync(device)
                start = time.perf_counter()
                run()
                sync(device)
                times[name].append(time.perf_counter() - start)
        median = {name: statistics.median(values) for name, values in times.items()}
        rate = {name: args.batch / value for name, value in median.items()}
        print(f"size={size}: bare fwd+bwd {rate['bare']:.1f} img/s, fwd+grad to layer "
              f"{rate['to_layer']:.1f} img/s, explain_prediction {rate['explain']:.1f} img/s; "
              f"explain time / bare = {median['explain'] / median['bare']:.2f}x, "
              f"explain / to_layer = {median['explain'] / median['to_layer']:.2f}x "
              f"(goal <= 1.5x)")
    model.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
