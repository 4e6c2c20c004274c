"""Benchmark the activation recorder against the bare model forward pass.

For each model, the same images go through the same DataLoader (``dissect.data.make_loader``:
same batch size, decoding workers, device) twice: once with a plain ``model(images)`` loop, once
through ``record_activations`` (hooks, float16 conversion, per-layer amax, HDF5 writes with a
flush per block). It prints images/s of both (best of the repeats) and the recorder's overhead
(goal: <= 10 %), and the CPU time per image of both (this process and the loader's workers), which
shows the recorder's own cost even on a busy machine where wall times are noisy. The last column,
"writes alone", is the time to write the same cache (same shapes, chunks, flushes and done flags,
random float16 values) with no model running: the part of the overhead that is the data volume
itself, which on a CPU with every core busy cannot be hidden behind the forward pass.
Then it records datasets of two sizes in fresh subprocesses and prints their peak RSS: the
recorder streams, so memory must not grow with the number of images.

A third table ("stop after the last layer") records one middle block of resnet18 (``layer2``)
and of vit_b_16 (``encoder.layers.encoder_layer_5``, 12 blocks) at 224 px, a few images, with
the recorder's default ``stop_early=True`` (the forward is cut after the last recorded layer)
and with ``stop_early=False`` (the whole model runs), interleaved, and prints both wall times and
their ratio (``--stop-only`` runs just this table).

Usage::

    python scripts/bench_record.py [--n-images 1024] [--size 112] [--batch-size 32]
                                   [--device cpu|cuda] [--repeats 3] [--rss-sizes 128,1024]
                                   [--stop-images 8] [--stop-only]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dissect.data import IMAGENET_MEAN, IMAGENET_STD, BrodenDataset, make_loader  # noqa: E402
from dissect.record import load_model, record_activations, resolve_device  # noqa: E402
from dissect.record.cache import (  # noqa: E402
    CacheState,
    CacheWriter,
    block_range,
    layer_datasets,
    n_blocks,
)

MODELS = {
    "toy": ("dissect.toy:toy_model", ["conv1", "conv2", "conv3", "conv4"]),
    "resnet18": ("resnet18", ["layer1", "layer2", "layer3", "layer4"]),
}


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the loader's workers), in seconds."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(function, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``function(*args)``."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    function(*args)
    return time.perf_counter() - wall, cpu_seconds() - cpu


def bare_forward(model: torch.nn.Module, dataset: BrodenDataset, batch_size: int,
                 device: torch.device, num_workers: int | None) -> None:
    """One plain pass of ``model`` over ``dataset`` (data loading included)."""
    model.eval().to(device)
    loader = make_loader(dataset, mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size=batch_size,
                         num_workers=num_workers, pin_memory=device.type == "cuda")
    with torch.inference_mode():
        for images, _ in loader:
            model(images.to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize()


def recorder_pass(model: torch.nn.Module, dataset: BrodenDataset, layers: list[str],
                  run_dir: Path, batch_size: int, device: torch.device,
                  num_workers: int | None) -> None:
    """One ``record_activations`` pass (force: every block written again)."""
    record_activations(model, dataset, layers, run_dir, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       batch_size=batch_size, device=device, force=True, progress=False,
                       num_workers=num_workers)
    if device.type == "cuda":
        torch.cuda.synchronize()


def writes_alone(run_dir: Path, work: Path, batch_size: int) -> float:
    """Seconds to write caches shaped like those in ``run_dir`` with no model running.

    Same datasets, chunks, per-block flushes and done flags as the recorder (``CacheWriter``), on
    fresh files; the values are random float16 (cached per block shape, generated before timing).
    """
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    shapes = []
    for path in sorted((run_dir / "cache").glob("*.h5")):
        with h5py.File(path, "r") as file:
            shapes.append((path.stem, file["acts"].shape, str(file["acts"].dtype)))
    target = work / "writes_alone"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    jobs = []
    for name, shape, dtype in shapes:
        n_images, maps = shape[0], shape[1:]
        specs = layer_datasets(n_images, maps, dtype, batch_size)
        block = {"acts": rng.standard_normal((batch_size, *maps)).astype(dtype),
                 "amax": rng.standard_normal((batch_size, maps[0])).astype(np.float32)}
        state = CacheState(target / f"{name}.h5", {"layer": name}, n_images, batch_size, True)
        jobs.append((specs, state, block, n_images))
    start = time.perf_counter()
    for specs, state, block, n_images in jobs:
        writer = CacheWriter(state, specs, batch_size)
        try:
            for b in range(n_blocks(n_images, batch_size)):
                lo, hi = block_range(b, batch_size, n_images)
                writer.write_block(b, {k: v[:hi - lo] for k, v in block.items()})
            writer.finish()
        finally:
            writer.close()
    elapsed = time.perf_counter() - start
    shutil.rmtree(target, ignore_errors=True)
    return elapsed


def child_rss(spec: str, layers: list[str], dataset: str, run_dir: str, batch_size: int,
              device: str) -> None:
    """Subprocess entry: record and print a JSON line with the peak RSS of this process (MB)."""
    model = load_model(spec)
    start = time.perf_counter()
    record_activations(model, dataset, layers, run_dir, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       batch_size=batch_size, device=device, force=True, progress=False)
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": peak_mb, "wall_s": wall}))


def measure_rss(name: str, dataset: Path, run_dir: Path, batch_size: int, device: str) -> dict:
    spec, layers = MODELS[name]
    command = [sys.executable, __file__, "--child", spec, ",".join(layers), str(dataset),
               str(run_dir), str(batch_size), device]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


#: Middle blocks recorded by the stop-vs-full table: (model spec, layer).
STOP_CASES = (("resnet18", "layer2"), ("vit_b_16", "encoder.layers.encoder_layer_5"))


def stop_vs_full(work: Path, n_images: int, repeats: int, batch_size: int,
                 device: torch.device, num_workers: int | None) -> None:
    """Print the wall time of recording one middle block with and without the early stop."""
    from dissect.toy import generate_toy_dataset

    root = work / f"toy_stop{n_images}"
    if not root.exists():
        generate_toy_dataset(root, n_images=n_images, size=112, seed=0)
    dataset = BrodenDataset(root)
    print(f"\nstop after the last recorded layer: {n_images} toy images resized to 224 px, "
          f"batch {batch_size}, best of {repeats} (interleaved)")
    print(f"{'model':<9} {'layer':<32} {'stopped s':>9} {'full s':>8} {'stopped/full':>12}")
    for spec, layer in STOP_CASES:
        model = load_model(spec)
        times: dict[bool, list[float]] = {True: [], False: []}
        for repeat in range(repeats + 1):          # the first round warms up, not counted
            for stop in (True, False):
                start = time.perf_counter()
                record_activations(model, dataset, [layer], work / f"stop_{spec}_{stop}",
                                   mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=224,
                                   batch_size=batch_size, device=device, force=True,
                                   progress=False, num_workers=num_workers, stop_early=stop)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if repeat:
                    times[stop].append(time.perf_counter() - start)
        stopped, full = min(times[True]), min(times[False])
        print(f"{spec:<9} {layer:<32} {stopped:>9.2f} {full:>8.2f} {stopped / full:>12.2f}")
    print("(each time: one record_activations call with force=True, model probe and writes "
          "included)")


def cache_megabytes(run_dir: Path) -> float:
    return sum(p.stat().st_size for p in (run_dir / "cache").glob("*.h5")) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=1024)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--models", default="toy,resnet18")
    parser.add_argument("--rss-sizes", default="128,1024")
    parser.add_argument("--work", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--stop-images", type=int, default=8,
                        help="images of the stop-vs-full table (default 8)")
    parser.add_argument("--stop-only", action="store_true",
                        help="run only the stop-vs-full table")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec, layers, dataset, run_dir, batch, device = args.child
        child_rss(spec, layers.split(","), dataset, run_dir, int(batch), device)
        return

    from dissect.toy import generate_toy_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_record_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.stop_only:
            print(f"device {device}, torch {torch.__version__}, threads "
                  f"{torch.get_num_threads()}")
            stop_vs_full(work, args.stop_images, args.repeats, args.batch_size, device,
                         args.num_workers)
            return
        print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
              f"batch {args.batch_size}, {args.n_images} toy images of {args.size} px, "
              f"{args.repeats} repeats")
        root = work / f"toy{args.n_images}"
        if not root.exists():
            generate_toy_dataset(root, n_images=args.n_images, size=args.size, seed=0)
        dataset = BrodenDataset(root)
        print(f"{'model':<9} {'layers':<24} {'bare img/s':>10} {'record img/s':>12} "
              f"{'overhead':>8} {'paired':>8} {'bare CPU ms/img':>15} {'record CPU ms/img':>17} "
              f"{'CPU overhead':>12} {'cache MB':>8} {'writes alone ms/img':>19}")
        for name in args.models.split(","):
            spec, layers = MODELS[name]
            model = load_model(spec)
            run_dir = work / f"run_{name}"
            bare, recorded = [], []
            bare_forward(model, dataset, args.batch_size, device, args.num_workers)  # warm-up
            for _ in range(args.repeats):  # interleaved, so load changes hit both alike
                bare.append(timed(bare_forward, model, dataset, args.batch_size, device,
                                  args.num_workers))
                recorded.append(timed(recorder_pass, model, dataset, layers, run_dir,
                                      args.batch_size, device, args.num_workers))
            n = len(dataset)
            bare_wall = min(w for w, _ in bare)
            record_wall = min(w for w, _ in recorded)
            paired = statistics.median(r / b for (b, _), (r, _) in zip(bare, recorded)) - 1
            bare_cpu = statistics.median(c for _, c in bare)
            record_cpu = statistics.median(c for _, c in recorded)
            alone = min(writes_alone(run_dir, work, args.batch_size) for _ in range(args.repeats))
            print(f"{name:<9} {','.join(layers):<24} {n / bare_wall:>10.1f} "
                  f"{n / record_wall:>12.1f} {record_wall / bare_wall - 1:>+8.1%} {paired:>+8.1%} "
                  f"{1e3 * bare_cpu / n:>15.2f} {1e3 * record_cpu / n:>17.2f} "
                  f"{record_cpu / bare_cpu - 1:>+12.1%} {cache_megabytes(run_dir):>8.1f} "
                  f"{1e3 * alone / n:>19.3f}")
        print("(img/s and overhead: best of the repeats; paired: median over the repeats of the "
              "wall-time ratio of back-to-back runs; CPU: median, this process + loader workers; "
              "writes alone: best of the repeats, bare forward ms/img for comparison: 1000 / bare "
              "img/s)")

        sizes = [int(v) for v in args.rss_sizes.split(",")]
        print(f"\npeak RSS of a recording subprocess (resnet18 layer1..4, {args.size} px)")
        print(f"{'images':>7} {'peak RSS MB':>12} {'wall s':>8} {'cache MB':>9}")
        for n_images in sizes:
            root = work / f"toy{n_images}"
            if not root.exists():
                generate_toy_dataset(root, n_images=n_images, size=args.size, seed=0)
            run_dir = work / f"rss_{n_images}"
            result = measure_rss("resnet18", root, run_dir, args.batch_size, str(device))
            print(f"{n_images:>7} {result['peak_rss_mb']:>12.1f} {result['wall_s']:>8.1f} "
                  f"{cache_megabytes(run_dir):>9.1f}")
            shutil.rmtree(run_dir)
        stop_vs_full(work, args.stop_images, args.repeats, args.batch_size, device,
                     args.num_workers)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
