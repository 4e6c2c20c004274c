"""Benchmark the whole pipeline (record, thresholds, tally, report) on a synthetic Broden dataset.

Issue 19: the dataset is the toy dataset scaled up (``dissect.toy``: N images of S px, S/2 px
label maps), written by several processes at once; the pipeline runs through the project's own
stage functions (``dissect.run.record_stage``, ``tally_stage``, ``report_stage`` with a
``RunConfig``). Printed per stage: wall time, images/s, GPU utilisation (NVML through
``torch.cuda.utilization`` or ``nvidia-smi``, sampled every 0.2 s; "n/a" without a GPU), peak
RSS (this process, and with its child processes: DataLoader workers) and peak GPU memory
(``torch.cuda.max_memory_allocated``). Three reference passes over the same images say where
the time goes:

- ``loader``: the recorder's DataLoader alone (decoding + normalisation, same batch size and
  workers, pinned on CUDA) -- the data path's ceiling;
- ``gpu-only``: the model's forward on one batch resident on the device, repeated for N images
  -- the model's ceiling;
- ``forward``: the bare model forward over that loader (what recording adds to is this).

Usage::

    python scripts/bench_pipeline.py                       # CPU default: 200 images at 112 px
    python scripts/bench_pipeline.py --n-images 63305 --size 224 --device cuda \
        --batch-size 256 --workers 15 --out /tmp/bench     # the GPU run of issue 19

``--workers`` sets the DataLoader workers of every pass; the recorder takes them from
``dissect.data.loader.default_workers`` (RunConfig has no workers option), which this script
replaces for the run. Results go to ``OUT/bench.json`` and ``OUT/bench.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BRODEN_IMAGES = 63305
"""Images in Broden (NetDissect-Lite's broden1_224): the size the issue's goal is stated for."""


# --- the dataset, written by several processes ---------------------------------------------------

def _write_shard(partial: str, n_images: int, size: int, seed: int, start: int, stop: int
                 ) -> tuple[list[list[object]], Any]:
    """Draw and write images [start, stop) of the toy dataset (n_images, size, seed).

    Image i is exactly ``dissect.toy.toy_images(n_images, size, seed)``'s image i (its own
    generator seeded by (seed, i), scene and split from the plan), written as
    ``generate_toy_dataset`` writes it. Returns the index.csv rows and the shard's label tally.
    """
    from dissect.toy.dataset import (
        CATEGORIES,
        IMAGE_FOLDER,
        PART_LAYERS,
        ToyImage,
        _save_png,
        _Tally,
        draw_scene,
        encode_labels,
        plan_toy_dataset,
    )

    plan = plan_toy_dataset(n_images, seed)
    images_dir = Path(partial) / "images"
    grid = size // 2
    tally = _Tally()
    rows: list[list[object]] = []
    for index in range(start, stop):
        scene, split, annotated = plan[index]
        drawn = draw_scene(scene, grid, np.random.default_rng([seed, index]),
                           material_annotated=annotated)
        image = ToyImage(index, f"{IMAGE_FOLDER}/{index:06d}.png", split, size, drawn)
        _save_png(images_dir / image.name, image.pixels())
        _save_png(images_dir / f"{image.stem}_color.png", encode_labels(drawn.color))
        _save_png(images_dir / f"{image.stem}_object.png", encode_labels(drawn.object))
        if drawn.material_annotated:
            _save_png(images_dir / f"{image.stem}_material.png", encode_labels(drawn.material))
        for k in range(PART_LAYERS):
            if drawn.part[k].any():
                _save_png(images_dir / f"{image.stem}_part_{k + 1}.png",
                          encode_labels(drawn.part[k]))
        tally.add(image)
        cells = image.cells()
        rows.append([image.name, image.split, size, size, grid, grid]
                    + [cells[c] for c in CATEGORIES])
    return rows, tally


def _merge_tallies(tallies: list[Any]) -> Any:
    """One label tally of the whole dataset from the shards' (frequency, coverage, images)."""
    total = tallies[0]
    for part in tallies[1:]:
        for category in total.frequency:
            total.frequency[category] += part.frequency[category]
            total.coverage[category] += part.coverage[category]
            total.images[category] += part.images[category]
    return total


def generate_parallel(out_dir: str | os.PathLike[str], n_images: int, size: int, seed: int = 0,
                      workers: int | None = None, shard_size: int = 500) -> Path:
    """Write the toy dataset ``generate_toy_dataset(out_dir, n_images, size, seed)`` would
    write, with the images drawn by ``workers`` processes in shards of ``shard_size`` images.

    index.csv rows are in image order, PNGs are byte-identical, the label statistics are the
    shards' sums (coverage sums may differ from the serial order in the last bits of a float64,
    far below the 6 decimals written). Written to ``<out_dir>.partial`` and renamed when done.
    """
    from dissect.toy.dataset import (
        CATEGORIES,
        GENERATOR_VERSION,
        IMAGE_FOLDER,
        _check_arguments,
        _write_vocabulary,
    )

    _check_arguments(n_images, size, seed)
    final = Path(out_dir).resolve()
    if final.exists():
        raise FileExistsError(f"{final} exists; remove it or use it as it is")
    partial = final.with_name(final.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "images" / IMAGE_FOLDER).mkdir(parents=True)
    workers = workers or os.cpu_count() or 1
    bounds = [(start, min(start + shard_size, n_images))
              for start in range(0, n_images, shard_size)]
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(_write_shard, str(partial), n_images, size, seed, start, stop)
                   for start, stop in bounds]
        results = [future.result() for future in futures]
    with open(partial / "index.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image", "split", "ih", "iw", "sh", "sw", *CATEGORIES])
        for rows, _ in results:
            writer.writerows(rows)
    _write_vocabulary(partial, _merge_tallies([tally for _, tally in results]))
    with open(partial / "toy.json", "w", encoding="utf-8") as handle:
        json.dump({"generator": "dissect.toy", "version": GENERATOR_VERSION,
                   "n_images": int(n_images), "size": int(size), "seed": int(seed)},
                  handle, indent=1, sort_keys=True)
        handle.write("\n")
    os.replace(partial, final)
    return final


def compare_directories(first: Path, second: Path) -> list[str]:
    """Relative paths whose bytes differ (or that exist on one side only)."""
    names = {p.relative_to(first) for p in first.rglob("*") if p.is_file()}
    names |= {p.relative_to(second) for p in second.rglob("*") if p.is_file()}
    return sorted(str(name) for name in names
                  if not (first / name).is_file() or not (second / name).is_file()
                  or (first / name).read_bytes() != (second / name).read_bytes())


def check_generation(work: Path, n_images: int = 60, size: int = 64, workers: int = 3) -> None:
    """Self-check: the parallel writer (small shards) equals ``generate_toy_dataset`` byte for
    byte. Raises RuntimeError naming the differing files."""
    from dissect.toy import generate_toy_dataset

    serial = generate_toy_dataset(work / "serial", n_images=n_images, size=size, seed=3)
    parallel = generate_parallel(work / "parallel", n_images, size, seed=3, workers=workers,
                                 shard_size=7)
    differ = compare_directories(serial, parallel)
    if differ:
        raise RuntimeError(f"parallel generation differs from generate_toy_dataset in "
                           f"{len(differ)} files: {differ[:5]}")
    print(f"check: parallel generation ({workers} processes, shards of 7) == "
          f"generate_toy_dataset for {n_images} images of {size} px "
          f"({sum(1 for p in serial.rglob('*') if p.is_file())} files, byte-identical)")


def ensure_dataset(path: Path, n_images: int, size: int, seed: int, workers: int | None
                   ) -> tuple[Path, float | None]:
    """The dataset at ``path``, generated when missing; (path, generation seconds or None when
    an existing dataset with the same parameters was reused)."""
    stamp = path / "toy.json"
    if stamp.is_file():
        meta = json.loads(stamp.read_text())
        if (meta.get("n_images"), meta.get("size"), meta.get("seed")) == (n_images, size, seed):
            return path, None
        raise FileExistsError(f"{path} holds a toy dataset of {meta.get('n_images')} images of "
                              f"{meta.get('size')} px (seed {meta.get('seed')}); remove it or "
                              f"choose another --dataset")
    start = time.perf_counter()
    generate_parallel(path, n_images, size, seed, workers)
    return path, time.perf_counter() - start


# --- measuring ----------------------------------------------------------------------------------

def _gpu_reader(device: Any) -> Any:
    """A function returning (utilisation %, memory used MiB) of the GPU, or None."""
    import torch

    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        torch.cuda.utilization(index)

        def read_nvml() -> tuple[float, float | None]:
            return float(torch.cuda.utilization(index)), None
        return read_nvml
    except Exception:  # noqa: BLE001 - no pynvml: try nvidia-smi
        pass
    if shutil.which("nvidia-smi") is None:
        return None

    def read_smi() -> tuple[float, float | None] | None:
        done = subprocess.run(["nvidia-smi", f"--id={index}",
                               "--query-gpu=utilization.gpu,memory.used",
                               "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=5)
        if done.returncode != 0:
            return None
        util, used = done.stdout.strip().split(",")[:2]
        return float(util), float(used)
    return read_smi


def _rss_bytes() -> tuple[int, int]:
    """(RSS of this process, RSS of this process plus its children) in bytes (0 when unknown)."""
    try:
        import psutil
    except ImportError:
        return 0, 0
    me = psutil.Process()
    own = me.memory_info().rss
    total = own
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return own, total


@dataclass
class Stage:
    """What one measured stage took."""

    name: str
    images: int
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_rss_children_mb: float = 0.0
    peak_gpu_mb: float | None = None
    gpu_util_mean: float | None = None
    gpu_util_max: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else math.nan


@contextmanager
def measure(name: str, images: int, device: Any, stages: list[Stage],
            interval: float = 0.2) -> Iterator[Stage]:
    """Time a stage; sample RSS and GPU utilisation every ``interval`` s on a thread."""
    import torch

    stage = Stage(name, images)
    reader = _gpu_reader(device)
    samples: list[float] = []
    peaks = list(_rss_bytes())
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            own, total = _rss_bytes()
            peaks[0], peaks[1] = max(peaks[0], own), max(peaks[1], total)
            if reader is not None:
                try:
                    value = reader()
                except Exception:  # noqa: BLE001 - a failed reading is skipped
                    value = None
                if value is not None:
                    samples.append(value[0])

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        yield stage
    finally:
        if cuda:
            torch.cuda.synchronize(device)
        stage.wall_s = time.perf_counter() - start
        stop.set()
        thread.join()
        own, total = _rss_bytes()
        stage.peak_rss_mb = max(peaks[0], own) / 2**20
        stage.peak_rss_children_mb = max(peaks[1], total) / 2**20
        if cuda:
            stage.peak_gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20
        if samples:
            stage.gpu_util_mean = float(np.mean(samples))
            stage.gpu_util_max = float(np.max(samples))
        stages.append(stage)
        print(f"  {format_stage(stage)}", flush=True)


def format_stage(stage: Stage) -> str:
    util = "n/a" if stage.gpu_util_mean is None else \
        f"{stage.gpu_util_mean:.0f}% (max {stage.gpu_util_max:.0f}%)"
    gpu = "n/a" if stage.peak_gpu_mb is None else f"{stage.peak_gpu_mb:,.0f} MB"
    return (f"{stage.name:<12} {stage.wall_s:8.2f} s  {stage.images_per_s:9.1f} img/s  "
            f"GPU util {util:<16} peak RSS {stage.peak_rss_mb:,.0f} MB "
            f"(+children {stage.peak_rss_children_mb:,.0f} MB)  peak GPU mem {gpu}"
            + (f"  [{stage.note}]" if stage.note else ""))


# --- reference passes ---------------------------------------------------------------------------

def _prepared(model: Any, device: Any, channels_last: bool) -> Any:
    import torch

    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _autocast(device: Any, autocast: str | None) -> Any:
    import contextlib

    import torch

    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, autocast))


def loader_pass(loader: Any, device: Any) -> int:
    """Iterate the loader, copying each batch to the device (no model); returns images seen."""
    seen = 0
    for images, index in loader:
        images.to(device, non_blocking=True)
        seen += len(index)
    return seen


def forward_pass(model: Any, loader: Any, device: Any, channels_last: bool,
                 autocast: str | None) -> int:
    """The bare model forward over the loader (as the recorder feeds it); returns images."""
    import torch

    seen = 0
    with torch.inference_mode():
        for images, index in loader:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, autocast):
                model(images)
            seen += len(index)
    return seen


def gpu_only_pass(model: Any, shape: tuple[int, ...], n_images: int, device: Any,
                  channels_last: bool, autocast: str | None) -> int:
    """The forward on one resident batch of ``shape``, repeated for ``n_images`` images."""
    import torch

    batch = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    seen = 0
    with torch.inference_mode():
        while seen < n_images:
            with _autocast(device, autocast):
                model(batch)
            seen += shape[0]
    return seen


# --- the benchmark ------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=200, help="images (default 200)")
    parser.add_argument("--size", type=int, default=112, help="image side in px (default 112; "
                        "label maps are half of it)")
    parser.add_argument("--model", default="resnet18", help="torchvision name (weights=None) or "
                        "module:callable (default resnet18)")
    parser.add_argument("--layers", nargs="+", default=["layer4"], help="layers (default layer4)")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers (default: dissect's default_workers())")
    parser.add_argument("--gen-workers", type=int, default=None,
                        help="processes writing the dataset (default: one per core)")
    parser.add_argument("--out", default="reports/bench_pipeline", help="output directory")
    parser.add_argument("--dataset", default=None,
                        help="dataset directory (default OUT/data/toy-N-S; reused when it holds "
                             "the same N and size)")
    parser.add_argument("--seed", type=int, default=0, help="toy dataset seed")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--autocast", default=None, choices=["bfloat16", "float16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--scheduler", default="threads", help="tally scheduler (default threads)")
    parser.add_argument("--loader-images", type=int, default=None,
                        help="images of the loader-only pass (default all N)")
    parser.add_argument("--skip-report", action="store_true", help="do not render the report")
    parser.add_argument("--check-generation", action="store_true",
                        help="first check that the parallel writer equals generate_toy_dataset")
    parser.add_argument("--generate-only", action="store_true",
                        help="write (or reuse) the dataset, print its time, and stop")
    parser.add_argument("--label", default="", help="a name for this run in bench.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    import dissect.data.loader as loader_module
    from dissect.config import RunConfig
    from dissect.data import BrodenDataset, make_loader
    from dissect.dissection import load_dissection
    from dissect.parallel import compute_thresholds, scheduler_context
    from dissect.record import CacheReader, load_model, resolve_device
    from dissect.run import record_stage, report_stage, tally_stage
    from dissect.rundir import RunDir

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.check_generation:
        work = out / "generation-check"
        shutil.rmtree(work, ignore_errors=True)
        check_generation(work)
        shutil.rmtree(work)
    device = resolve_device(args.device)
    if args.workers is not None:
        workers = int(args.workers)
        loader_module.default_workers = lambda: workers  # the recorder's loader uses it
    workers = loader_module.default_workers()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"bench_pipeline: {args.model} {' '.join(args.layers)}, {args.n_images} images of "
          f"{args.size} px, batch {args.batch_size}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", {workers} loader workers, {os.cpu_count()} cores, dtype {args.dtype}, "
          f"autocast {args.autocast}, channels_last {args.channels_last}, torch "
          f"{torch.__version__}, load {os.getloadavg()[0]:.1f}", flush=True)

    stages: list[Stage] = []
    dataset_dir = Path(args.dataset).resolve() if args.dataset else \
        out / "data" / f"toy-{args.n_images}-{args.size}"
    start = time.perf_counter()
    dataset_dir, generated = ensure_dataset(dataset_dir, args.n_images, args.size, args.seed,
                                            args.gen_workers)
    data_bytes = sum(p.stat().st_size for p in (dataset_dir / "images").rglob("*.png"))
    gen_note = (f"generated by {args.gen_workers or os.cpu_count()} processes"
                if generated is not None else "reused")
    stages.append(Stage("dataset", args.n_images, time.perf_counter() - start, note=(
        f"{gen_note}, {data_bytes / 2**20:,.1f} MB of PNG")))
    print(f"  {format_stage(stages[-1])}", flush=True)
    if args.generate_only:
        return 0

    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = RunConfig(model=args.model, layers=tuple(args.layers), dataset=str(dataset_dir),
                       out=str(run_dir), batch_size=args.batch_size, device=str(device),
                       dtype=args.dtype, autocast=args.autocast,
                       channels_last=args.channels_last, scheduler=args.scheduler)
    n = args.n_images
    with measure("record", n, device, stages) as stage:
        paths = record_stage(config, force=True, progress=False)
    stage.note = "cache " + ", ".join(f"{layer} {path.stat().st_size / 2**20:,.0f} MB"
                                      for layer, path in paths.items())
    config = RunDir(run_dir).config()

    dataset = BrodenDataset(dataset_dir)
    rows = dataset.labeled_images()
    thresholds = {}
    with measure("thresholds", n * len(config.layers), device, stages):
        with scheduler_context(config.scheduler) as setup:
            for layer in config.layers:
                thresholds[layer] = compute_thresholds(
                    CacheReader(paths[layer], "acts"), config.quantile, scheduler=setup,
                    images=None if len(rows) == len(dataset) else rows)
    with measure("tally", n * len(config.layers), device, stages) as stage:
        results = tally_stage(config, progress=False)
    stage.note = "thresholds + counts + files"
    for layer in config.layers:
        stored = load_dissection(RunDir(run_dir).layer_dir(layer)).thresholds
        if not np.array_equal(stored, thresholds[layer]):
            raise RuntimeError(f"{layer}: the thresholds pass differs from the tally's")
    detectors = {layer: int((result.unit_iou >= result.iou_threshold).sum())
                 for layer, result in results.items()}
    if not args.skip_report:
        with measure("report", n, device, stages):
            report_stage(run_dir)

    model = _prepared(load_model(args.model), device, args.channels_last)
    mean, std = config.mean, config.std
    pin = device.type == "cuda"
    loader_n = min(n, args.loader_images or n)
    with measure("loader", loader_n, device, stages):
        loader_pass(make_loader(dataset, mean=mean, std=std, batch_size=args.batch_size,
                                num_workers=workers, pin_memory=pin,
                                indices=np.arange(loader_n)), device)
    with measure("forward", n, device, stages):
        forward_pass(model, make_loader(dataset, mean=mean, std=std, batch_size=args.batch_size,
                                        num_workers=workers, pin_memory=pin),
                     device, args.channels_last, args.autocast)
    shape = (args.batch_size, 3, args.size, args.size)
    gpu_only_pass(model, shape, 2 * args.batch_size, device, args.channels_last,
                  args.autocast)  # warm-up (cudnn.benchmark picks its kernels)
    with measure("gpu-only", n, device, stages) as stage:
        gpu_only_pass(model, shape, n, device, args.channels_last, args.autocast)
    stage.note = "one resident batch, no data path"

    summary = summarize(args, stages, device, workers, detectors, out)
    print(summary, flush=True)
    return 0


def summarize(args: argparse.Namespace, stages: list[Stage], device: Any, workers: int,
              detectors: dict[str, int], out: Path) -> str:
    """The closing lines (ratios, pipeline total, scaling); writes bench.json and bench.md."""
    import torch

    by = {stage.name: stage for stage in stages}
    pipeline = sum(by[name].wall_s for name in ("record", "tally", "report") if name in by)
    lines = [f"pipeline (record + tally + report): {pipeline:.2f} s for {args.n_images} images "
             f"({args.n_images / pipeline:.1f} img/s)"]
    if args.n_images != BRODEN_IMAGES:
        scale = BRODEN_IMAGES / args.n_images
        lines.append(f"scaled linearly to Broden's {BRODEN_IMAGES:,} images (x{scale:.2f}): "
                     f"{pipeline * scale:.1f} s (an estimate, not a measurement)")
    record, forward = by["record"], by["forward"]
    loader, gpu = by["loader"], by["gpu-only"]
    lines.append(f"record / bare forward: {record.wall_s / forward.wall_s:.2f}x "
                 f"({record.images_per_s:.0f} vs {forward.images_per_s:.0f} img/s)")
    lines.append(f"loader alone {loader.images_per_s:.0f} img/s, model alone "
                 f"{gpu.images_per_s:.0f} img/s: the "
                 + ("data path (decoding)" if loader.images_per_s < gpu.images_per_s
                    else "model") + " is the limit of the forward")
    lines.append("detectors (IoU >= cut-off): "
                 + ", ".join(f"{layer} {count}" for layer, count in detectors.items()))
    info = {"args": vars(args), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cores": os.cpu_count(), "loader_workers": workers, "load": os.getloadavg(),
            "torch": torch.__version__, "python": platform.python_version(),
            "stages": [{**{k: v for k, v in vars(stage).items()},
                        "images_per_s": stage.images_per_s} for stage in stages],
            "pipeline_s": pipeline, "detectors": detectors, "summary": lines}
    (out / "bench.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    table = ["| stage | wall s | img/s | GPU util % | peak RSS MB (+children) | peak GPU MB "
             "| note |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for stage in stages:
        util = "" if stage.gpu_util_mean is None else \
            f"{stage.gpu_util_mean:.0f} (max {stage.gpu_util_max:.0f})"
        gpu_mb = "" if stage.peak_gpu_mb is None else f"{stage.peak_gpu_mb:,.0f}"
        table.append(f"| {stage.name} | {stage.wall_s:.2f} | {stage.images_per_s:,.1f} | {util} "
                     f"| {stage.peak_rss_mb:,.0f} ({stage.peak_rss_children_mb:,.0f}) "
                     f"| {gpu_mb} | {stage.note} |")
    head = (f"## {args.label or 'bench_pipeline'}: {args.model} {' '.join(args.layers)}, "
            f"{args.n_images} images of {args.size} px, batch {args.batch_size}, "
            f"{info['gpu'] or device}, "
            f"{workers} loader workers, {os.cpu_count()} cores")
    (out / "bench.md").write_text("\n".join([head, "", *table, "", *lines]) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
