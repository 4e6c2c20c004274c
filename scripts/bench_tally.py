"""Benchmark of the dissection stage (thresholds and IoU tally) at four layer shapes.

The script writes, into a temporary directory (or ``--workdir``, reused when it matches):

- one Broden-format dataset (DESIGN.md §2) read by the real ``BrodenDataset``: segmentation PNGs
  (R + 256 * G) of ``--seg-size`` pixels, six categories with about ``--labels`` labels in all:
  color (1 layer), object (most images), part (0-2 layers), material (half the images), scene and
  texture (image-level labels); a few labels belong to two categories. Label maps are blocky
  regions, like Broden's. Image files are tiny placeholders (the tally never opens them).
- per layer shape (``--shapes``, default 512 units at 7x7, 256 at 14x14, 128 at 28x28 and 64 at
  56x56), an activation cache ``cache/layer_<U>x<h>.h5`` in the DESIGN §4a layout (float16
  ``acts`` (N, U, h, w) in (32, U, h, w) chunks, ``amax``, ``done``, ``complete``), whose units
  respond to a preferred label plus noise, so masks and IoUs look like a real layer's.

Per shape it then measures, each in a fresh subprocess (so peak RSS is per measurement):

- ``floor``: reading the cache once as stored and the label maps once (``CacheReader.read(...,
  stored=True)``, float16 without conversion, +
  ``BrodenDataset.load_segmentations`` over the chunks, one worker), the I/O and decoding that
  any tally must do;
- ``thresholds``: ``compute_thresholds`` (exact top-K quantile), 1 and 2 workers;
- ``counting``: ``compute_counts`` with 1 and 2 workers of the threads scheduler, with the cell
  prefilter of ``count_iou`` off and on (``--schedulers threads,processes`` adds the processes
  scheduler, at count_iou's default);

and prints the shapes side by side: ms/image, the ratios to the floor, prefilter on/off, 1/2
workers, which path ``count_iou``'s default takes, and, on the 128 x 28 x 28 shape, the ratio to
NetDissect-Lite's figures quoted in issue 14 (2.8 s quantile + 15.0 s tally per 1000 images on a
2-core machine; quoted, not measured here). ``--netdissect-lite CHECKOUT`` instead measures
NetDissect-Lite's own quantile and tally on the same data at every shape, in this run
(``scripts/bench_netdissect_lite.py``; a checkout of it is the user's to supply), and prints
the ratios side by side.

Usage::

    python scripts/bench_tally.py                     # 1000 images, the four shapes
    python scripts/bench_tally.py --n-images 200      # quick
    python scripts/bench_tally.py --shapes 128x28     # one shape
    python scripts/bench_tally.py --repeat 3          # 3 rounds: fastest run of each

``--breakdown`` (default ``on``; ``only`` measures nothing else; ``off``) times, per shape in one
more subprocess (one torch thread, the chunks in turn), the parts of the counting, each next to
its own floor on the same inputs: label PNG decoding (``load_segmentations`` / PIL decoding of
the same files), label bookkeeping (``_used_layers``, ``_label_counts``, ``_compact_labels``,
``_map_histograms`` / one bincount of the label maps plus the gather of the labels under the
mask pixels), upsampling + thresholding (``_upsample_threshold``, or ``_hot_tile_maps`` and
``_tiled_mask_pixels`` where ``count_iou``'s default takes the cell prefilter / a bare
``F.interpolate`` of the same maps, the faster of the planar and channels-last layouts) and the
reductions (``_chunk_totals`` + ``dissect.parallel._sum_counts`` / an in-place add of the dense
counts).
The library's functions are wrapped with timers, not reimplemented.

``--diagnostics`` adds, per shape, a line timing with a plain 1- and 2-thread pool the label-map
loading alone (``load_segmentations``) and ``count_iou`` alone on preloaded arrays, to show which
part of the threads scheduler's 2-worker speedup the GIL limits. The script prints figures and
never judges them.
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
from collections.abc import Iterator
from contextlib import contextmanager
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
BLOCK = 8          # label regions are drawn at seg_size / BLOCK and enlarged (blocky regions)
MAX_LAYERS = 5     # pixel label layers of an image: color, object, 2 part, material
SHAPES = "512x7,256x14,128x28,64x56"
#: NetDissect-Lite on the 128 x 28 x 28 layer of issue 14 (1000 images, 112x112 label maps,
#: about 40 labels, 2 cores), seconds per 1000 images: quoted from the issue, not measured here.
NETDISSECT_LITE = {"shape": (128, 28), "quantile": 2.8, "tally": 15.0}


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


def generate_dataset(workdir: Path, n_images: int, seg_size: int, n_labels: int,
                     seed: int = 0) -> Path:
    """Write the Broden-format dataset, and ``layers.npy``: every image's pixel label layers at
    seg_size / BLOCK (int16 (N, MAX_LAYERS, low, low), zero-padded) for :func:`write_cache`."""
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
    layers = np.zeros((n_images, MAX_LAYERS, low, low), np.int16)
    index_rows = []
    for i in range(n_images):
        row: list[object] = [f"img{i}.jpg", "train", 224, 224, seg_size, seg_size]
        if not (data / "images" / f"img{i}.jpg").exists():
            os.link(placeholder, data / "images" / f"img{i}.jpg")
        used = 0
        for category in ("color", "object", "part", "material"):
            count = {"color": 1, "object": int(rng.random() < 0.9),
                     "part": int(rng.choice([0, 0, 0, 1, 2])),
                     "material": int(rng.random() < 0.5)}[category]
            files = []
            for k in range(count):
                low_map = region_map(rng, low, cats[category], int(rng.integers(3, 12)),
                                     empty=0.3 if category != "color" else 0.0)
                name = f"seg/img{i}_{category}{k}.png"
                write_png(data / "images" / name, np.kron(low_map, np.ones((BLOCK, BLOCK),
                                                                          np.int64)))
                files.append(name)
                layers[i, used] = low_map
                used += 1
            row.append(";".join(files))
        row.append(str(int(rng.choice(cats["scene"]))) if rng.random() < 0.95 else "")
        row.append(str(int(rng.choice(cats["texture"]))) if rng.random() < 0.1 else "")
        index_rows.append(row)
    write_csv(data / "index.csv",
              ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "part", "material",
               "scene", "texture"], index_rows)
    np.save(workdir / "layers.npy", layers)
    return data


def write_cache(path: Path, layers: np.ndarray, n_units: int, size: int, seg_size: int,
                n_labels: int, seed: int = 0) -> None:
    """The activation cache of a (n_units, size, size) layer over the images of ``layers``."""
    rng = np.random.default_rng([seed, n_units, size])
    cats = category_labels(n_labels)
    n_images = len(layers)
    scale = seg_size // size                  # seg pixels per activation cell (16 for 112 / 7)
    preferred = rng.choice(np.concatenate([cats["object"], cats["part"], cats["color"],
                                           cats["material"]]), size=n_units)
    gain = rng.uniform(2.0, 6.0, size=n_units)
    batch = 32
    path.parent.mkdir(parents=True, exist_ok=True)
    with new_cache(path, (n_images, n_units, size, size), batch,
                   {"layer": f"layer_{n_units}x{size}"}) as (acts_d, amax_d):
        for start in range(0, n_images, batch):
            stop = min(start + batch, n_images)
            block = np.empty((stop - start, n_units, size, size), np.float32)
            for i in range(start, stop):
                # unit response: fraction of each activation cell covered by the preferred label
                cover = np.zeros((n_units, size, size))
                for low_map in layers[i]:
                    if not low_map.any():
                        continue
                    if scale % BLOCK == 0:               # cells are whole blocks: work at low res
                        cells, per = low_map[: size * scale // BLOCK, : size * scale // BLOCK], \
                            scale // BLOCK
                    else:                                # cells are 1/k of a block
                        cells, per = low_map.repeat(BLOCK // scale, 0).repeat(BLOCK // scale, 1), 1
                    hit = cells[None] == preferred[:, None, None]
                    cover += hit.reshape(n_units, size, per, size, per).mean(axis=(2, 4))
                noise = smooth(rng.gamma(1.5, 0.4, size=(n_units, size, size)))
                block[i - start] = gain[:, None, None] * cover + noise
            acts_d[start:stop] = block.astype(np.float16)
            amax_d[start:stop] = block.astype(np.float16).reshape(stop - start, n_units, -1).max(-1)


@contextmanager
def new_cache(path: Path, shape: tuple[int, int, int, int], batch: int,
              fingerprint: dict[str, Any]) -> Iterator[tuple[h5py.Dataset, h5py.Dataset]]:
    """A float16 activation cache of (N, U, h, w) in the DESIGN §4a layout ((batch, U, h, w)
    chunks, ``amax``, ``done``, complete): yields its ``acts`` and ``amax`` datasets to fill,
    written as ``<path>.partial`` and renamed to ``path`` when the block ends."""
    partial = path.with_suffix(".partial")
    with h5py.File(partial, "w") as file:
        acts = file.create_dataset("acts", shape, np.float16, chunks=(batch, *shape[1:]))
        amax = file.create_dataset("amax", shape[:2], np.float32)
        file.create_dataset("done", data=np.ones(-(-shape[0] // batch), dtype=bool))
        yield acts, amax
        file.attrs["fingerprint"] = json.dumps(fingerprint)
        file.attrs["schema_version"] = 1
        file.attrs["n_written"] = shape[0]
        file.attrs["complete"] = True
    partial.rename(path)


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


def set_prefilter(choice: str) -> None:
    """Make ``count_iou``'s default ``prefilter`` ``choice`` ('on', 'off' or 'auto') in this
    process (the threads and synchronous schedulers run its tasks here)."""
    from dissect.stats import iou

    iou.count_iou.__kwdefaults__["prefilter"] = {"on": True, "off": False, "auto": None}[choice]


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
    if args.measure == "breakdown":
        return breakdown(reader, dataset, chunk, args.thresholds, Path(args.data))
    if args.measure == "imports":
        seconds = cpu = 0.0
    elif args.measure == "floor":
        torch.set_num_threads(1)
        cpu, start = time.process_time(), time.perf_counter()
        for a in range(0, n, chunk):
            reader.read(a, min(a + chunk, n), stored=True)
            dataset.load_segmentations(range(a, min(a + chunk, n)))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    else:
        set_prefilter(args.prefilter)
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
                         int(counts.label_area.sum()),
                         int((counts.intersection * np.arange(1, counts.intersection.size + 1)
                              .reshape(counts.intersection.shape)).sum() % (2 ** 61 - 1))]
    own, children = peak_rss_mb()
    return {"seconds": seconds, "cpu": cpu, "n": n, "rss_mb": own, "child_rss_mb": children,
            "check": check}


#: The parts of the counting that :func:`breakdown` times, with the floor each is compared with.
BREAKDOWN = [
    ("read", "reading the cache as stored (CacheReader.read; its own floor)", None),
    ("png", "label PNG decoding (load_segmentations)",
     "PIL decode of the same PNGs (Image.open + np.asarray)"),
    ("bookkeeping", "label bookkeeping (_used_layers, _label_counts, per-batch histograms)",
     "one np.bincount of the chunk's label maps + gathering the labels under the mask pixels"),
    ("upsample", "upsampling + thresholding (_upsample_threshold; prefilter: _hot_tile_maps, "
                 "_tiled_mask_pixels)",
     "bare F.interpolate of the same active maps (planar or channels-last, the faster)"),
    ("reduce", "per-chunk reductions + merge (_chunk_totals, _sum_counts)",
     "adding the chunk's dense int64 counts into a total in place"),
    ("other", "rest of count_iou (inputs, active pairs, batching)", None),
]


def png_files(data: Path) -> list[list[Path]]:
    """Per image of the generated dataset, its segmentation PNGs (from index.csv)."""
    import csv

    with open(data / "index.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [[data / "images" / name for category in ("color", "object", "part", "material")
             for name in row[category].split(";") if name] for row in rows]


def breakdown(reader: Any, dataset: Any, chunk: int, thresholds_path: str, data: Path
              ) -> dict[str, Any]:
    """Seconds of each part of the counting over every chunk, and of each part's floor.

    One torch thread, the chunks one after the other (what one worker does). The parts are timed
    by wrapping, for the duration of this process, the very functions of dissect.stats.iou that
    ``count_iou`` calls (looked up at call time) and by timing ``CacheReader.read``,
    ``load_segmentations`` and ``dissect.parallel._sum_counts`` around their calls; the floors
    run on the same inputs right after each part.
    """
    import torch
    import torch.nn.functional as F

    from dissect import parallel
    from dissect.stats import iou

    torch.set_num_threads(1)
    n = reader.shape[0]
    thresholds = np.load(thresholds_path)
    files = png_files(data)
    part = {key: 0.0 for key, *_ in BREAKDOWN}
    floor = {key: 0.0 for key, *_ in BREAKDOWN}
    clock = time.perf_counter
    nested = [0.0]            # floors run inside count_iou (by the wrappers): not its time

    def timed(name: str, key: str, after: Any = None) -> None:
        original = getattr(iou, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            out = original(*args, **kwargs)
            part[key] += clock() - start
            if after is not None:
                start = clock()
                after(*args)
                floor[key] += clock() - start
                nested[0] += clock() - start
            return out

        setattr(iou, name, wrapper)

    def interpolate_floor(maps: Any, below: Any, size: tuple[int, int]) -> None:
        # the faster of the two layouts: planar (B, 1, h, w), or the maps as the channels of one
        # channels-last image (what _upsample_padded does, without its padding)
        # (in groups of at most 128 maps, about one image's: the prefilter's call has every
        # active map of the chunk, which torch resizes more slowly at once)
        planar = channels_last = 0.0
        for group in maps.split(128):
            start = clock()
            F.interpolate(group[:, None], size=size, mode="bilinear", align_corners=False)
            planar += clock() - start
            start = clock()
            F.interpolate(group.permute(1, 2, 0).contiguous()[None].permute(0, 3, 1, 2),
                          size=size, mode="bilinear", align_corners=False)
            channels_last += clock() - start
        # the wrapper adds both: take out the slower one
        floor["upsample"] -= max(planar, channels_last)

    def gather_floor(compact_seg: np.ndarray, present: np.ndarray, which: np.ndarray,
                     pixel: np.ndarray, *rest: Any) -> None:
        np.take(compact_seg, pixel, axis=1)

    timed("_upsample_threshold", "upsample", interpolate_floor)
    timed("_tiled_mask_pixels", "upsample", interpolate_floor)     # the prefilter's path
    timed("_hot_tile_maps", "upsample")                  # its hot tiles, once per chunk
    timed("_used_layers", "bookkeeping")
    timed("_label_counts", "bookkeeping")
    timed("_compact_labels", "bookkeeping")
    timed("_map_histograms", "bookkeeping", gather_floor)
    timed("_chunk_totals", "reduce")
    total = None
    dense = None
    count_seconds = merge = 0.0
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        start = clock()
        acts = reader.read(a, b, stored=True)         # as compute_counts reads it
        part["read"] += clock() - start
        start = clock()
        seg, image_labels = dataset.load_segmentations(range(a, b))
        part["png"] += clock() - start
        start = clock()
        for paths in files[a:b]:
            for path in paths:
                with Image.open(path) as image:
                    np.asarray(image)
        floor["png"] += clock() - start
        start = clock()
        np.bincount(seg.reshape(-1))
        floor["bookkeeping"] += clock() - start
        start = clock()
        counts = iou.count_iou(acts, seg, image_labels, thresholds, dataset.vocab.primary,
                               len(dataset.categories))
        count_seconds += clock() - start
        start = clock()
        total = counts if total is None else parallel._sum_counts(total, counts)
        merge += clock() - start
        start = clock()
        if dense is None:
            dense = [np.zeros_like(x) for x in (counts.label_area, counts.intersection,
                                                counts.act_area)]
        for into, x in zip(dense, (counts.label_area, counts.intersection, counts.act_area)):
            np.add(into, x, out=into)
        floor["reduce"] += clock() - start
    floor["read"] = part["read"]      # reading is its own floor
    count_seconds -= nested[0]
    part["reduce"] += merge
    # every wrapped part runs inside count_iou, except the merge
    part["other"] = count_seconds - (part["upsample"] + part["bookkeeping"]
                                     + part["reduce"] - merge)
    return {"n": n, "part": part, "floor": floor, "count_iou": count_seconds, "merge": merge}


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
    loaded = {c: (reader.read(*c, stored=True), *dataset.load_segmentations(range(*c)))
              for c in chunks}

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
             workers: int = 1, prefilter: str = "auto") -> dict[str, Any]:
    """One measurement in a fresh subprocess."""
    command = [sys.executable, str(script), "--measure", what, "--scheduler", scheduler,
               "--workers", str(workers), "--prefilter", prefilter, *common]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest run, with the largest peak RSS of all runs."""
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["rss_mb"] = max(r["rss_mb"] for r in runs)
    best["child_rss_mb"] = max(r["child_rss_mb"] for r in runs)
    return best


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'512x7,128x28' -> [(512, 7), (128, 28)] (units x map side)."""
    shapes = []
    for part in text.split(","):
        units, _, side = part.strip().partition("x")
        shapes.append((int(units), int(side)))
    return shapes


def measure_shape(script: Path, workdir: Path, data: Path, units: int, size: int,
                  args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of one layer shape; returns ms/image per measurement and more."""
    from dissect.stats.iou import prefilter_applies, prefilter_default

    cache = workdir / "cache" / f"layer_{units}x{size}.h5"
    thresholds = workdir / f"thresholds_{units}x{size}.npy"
    common = ["--cache", str(cache), "--data", str(data), "--thresholds", str(thresholds)]
    if args.chunk_size:
        common += ["--chunk-size", str(args.chunk_size)]
    parts = None
    if args.breakdown != "off":
        if not thresholds.exists():    # the breakdown counts with the layer's thresholds
            run_once(script, common, "thresholds")
        command = [sys.executable, str(script), "--measure", "breakdown", *common]
        rounds = [json.loads(subprocess.run(command, check=True, capture_output=True, text=True)
                             .stdout.strip().splitlines()[-1]) for _ in range(args.repeat)]
        # the fastest round of each part and of each floor
        parts = {"n": rounds[0]["n"], **{
            kind: {key: min(r[kind][key] for r in rounds) for key in rounds[0][kind]}
            for kind in ("part", "floor")},
            "count_iou": min(r["count_iou"] for r in rounds)}
        if args.breakdown == "only":
            return {"breakdown": parts}
    plan = [("floor", "floor", "threads", 1, "auto")]
    plan += [(f"thresholds x{k}", "thresholds", "threads", k, "auto") for k in (1, 2)]
    plan += [(f"counting x{k} prefilter {p}", "tally", "threads", k, p)
             for p in ("off", "on") for k in (1, 2)]
    plan += [(f"counting {s} x{k}", "tally", s, k, "auto")
             for s in args.schedulers.split(",") if s != "threads" for k in (1, 2)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in plan}
    # Rounds run every measurement once, in order: a slow spell of a shared machine then
    # affects one round's measurements together.
    for _ in range(args.repeat):
        for name, what, scheduler, workers, prefilter in plan:
            runs[name].append(run_once(script, common, what, scheduler, workers, prefilter))
    best = {name: fastest(done) for name, done in runs.items()}
    n = best["floor"]["n"]
    with h5py.File(cache, "r") as file:
        amax = file["amax"][()]
    active = amax > np.load(thresholds)[None, :]
    checks = {tuple(r["check"]) for name, done in runs.items() if name.startswith("counting")
              for r in done}
    uses = prefilter_applies((size, size), (args.seg_size, args.seg_size))
    auto = prefilter_default((size, size), (args.seg_size, args.seg_size))
    out: dict[str, Any] = {
        "n": n, "ms": {name: 1000 * r["seconds"] / n for name, r in best.items()},
        "cpu_ms": {name: 1000 * r["cpu"] / n for name, r in best.items()},
        "rss_mb": max(max(r["rss_mb"], r["child_rss_mb"]) for r in best.values()),
        "rounds": {name: [1000 * r["seconds"] / n for r in done] for name, done in runs.items()},
        "active": float(active.mean()), "identical": len(checks) == 1,
        "tiles": uses, "auto": "on" if (auto and uses) else "off", "breakdown": parts,
    }
    if args.diagnostics:
        command = [sys.executable, str(script), "--measure", "scaling", *common]
        out["scaling"] = json.loads(subprocess.run(command, check=True, capture_output=True,
                                                   text=True).stdout.strip().splitlines()[-1])
    return out


def print_table(rows: list[tuple[str, list[str]]], names: list[str], width: int) -> None:
    """Rows of (label, one value per shape) under a header of the shapes' names."""
    label_width = max(len(label) for label, _ in rows) + 2
    print(f"{'':{label_width}s}" + "".join(f"{name:>{width}s}" for name in names))
    for label, values in rows:
        print(f"{label:{label_width}s}" + "".join(f"{v:>{width}s}" for v in values))


def report(shapes: list[tuple[int, int]], results: dict[tuple[int, int], dict[str, Any]],
           args: argparse.Namespace) -> None:
    """Print the shapes side by side."""
    names = [f"{u}x{s}x{s}" for u, s in shapes]
    width = max(11, *(len(name) + 1 for name in names))
    if args.breakdown == "only":
        report_breakdown(shapes, results, names, width)
        return
    rows: list[tuple[str, list[str]]] = []
    others = [s for s in args.schedulers.split(",") if s != "threads"]   # threads is always run

    def row(label: str, values: list[str]) -> None:
        rows.append((label, values))

    def ms(key: str) -> list[float]:
        return [results[s]["ms"][key] for s in shapes]

    def chosen(k: int) -> list[float]:
        return [results[s]["ms"][f"counting x{k} prefilter {results[s]['auto']}"]
                for s in shapes]

    floor = ms("floor")
    fmt = [f"{v:.2f}" for v in floor]
    row("floor (read cache + label maps once), ms/img", fmt)
    for k in (1, 2):
        row(f"thresholds x{k}, ms/img", [f"{v:.2f}" for v in ms(f"thresholds x{k}")])
    for p in ("off", "on"):
        for k in (1, 2):
            row(f"counting x{k} prefilter {p}, ms/img",
                [f"{v:.2f}" for v in ms(f"counting x{k} prefilter {p}")])
    for scheduler in others:
        for k in (1, 2):
            row(f"counting {scheduler} x{k} (default), ms/img",
                [f"{v:.2f}" for v in ms(f"counting {scheduler} x{k}")])
    for p in ("off", "on"):
        row(f"counting x1 prefilter {p}, CPU ms/img",
            [f"{results[s]['cpu_ms'][f'counting x1 prefilter {p}']:.2f}" for s in shapes])
    row("prefilter applies (dyadic, >= one tile window)",
        ["yes" if results[s]["tiles"] else "no" for s in shapes])
    row("count_iou default (prefilter=None) takes", [results[s]["auto"] for s in shapes])
    for k in (1, 2):
        row(f"counting x{k}: prefilter on / off",
            [f"{a / b:.2f}" for a, b in zip(ms(f"counting x{k} prefilter on"),
                                            ms(f"counting x{k} prefilter off"))])
    cpu_on, cpu_off = ([results[s]["cpu_ms"][f"counting x1 prefilter {p}"] for s in shapes]
                       for p in ("on", "off"))
    row("counting x1: prefilter on / off, CPU time",
        [f"{a / b:.2f}" for a, b in zip(cpu_on, cpu_off)])
    for k in (1, 2):
        row(f"thresholds x{k} / floor",
            [f"{a / b:.2f}" for a, b in zip(ms(f"thresholds x{k}"), floor)])
        row(f"counting x{k} (default) / floor",
            [f"{a / b:.2f}" for a, b in zip(chosen(k), floor)])
        row(f"thresholds + counting x{k} (default) / floor",
            [f"{(a + c) / b:.2f}" for a, c, b in zip(ms(f"thresholds x{k}"), chosen(k), floor)])
    for scheduler in others:             # thresholds keep the threads scheduler's figures
        for k in (1, 2):
            row(f"thresholds x{k} + counting {scheduler} x{k} / floor",
                [f"{(a + c) / b:.2f}" for a, c, b in zip(
                    ms(f"thresholds x{k}"), ms(f"counting {scheduler} x{k}"), floor)])
    row("1 worker / 2 workers: thresholds",
        [f"{a / b:.2f}" for a, b in zip(ms("thresholds x1"), ms("thresholds x2"))])
    row("1 worker / 2 workers: counting (default)",
        [f"{a / b:.2f}" for a, b in zip(chosen(1), chosen(2))])
    for scheduler in others:
        row(f"1 worker / 2 workers: counting {scheduler}",
            [f"{a / b:.2f}" for a, b in zip(ms(f"counting {scheduler} x1"),
                                            ms(f"counting {scheduler} x2"))])
    row("active (image, unit) pairs, %", [f"{100 * results[s]['active']:.1f}" for s in shapes])
    row("identical counts in every counting run",
        ["yes" if results[s]["identical"] else "NO" for s in shapes])
    row("peak RSS of any measurement, MB", [f"{results[s]['rss_mb']:.0f}" for s in shapes])
    print_table(rows, names, width)
    if args.repeat > 1:
        for s, name in zip(shapes, names):
            print(f"every round, ms/image, {name}: " + "; ".join(
                f"{key} " + " ".join(f"{v:.2f}" for v in values)
                for key, values in results[s]["rounds"].items()))
    if all("netdissect_lite" in results[s] for s in shapes):
        report_netdissect_lite(shapes, results, names, width)
    else:
        report_quoted(results)
    if args.breakdown != "off":
        report_breakdown(shapes, results, names, width)
    if args.diagnostics:
        for s, name in zip(shapes, names):
            scaling = results[s]["scaling"]
            parts = []
            for key, what in (("segs", "load_segmentations"), ("count", "count_iou")):
                one, two = scaling[f"{key} x1"], scaling[f"{key} x2"]
                parts.append(f"{what} {1000 * one / scaling['n']:.2f} ms/image, "
                             f"1-thread/2-thread {one / two:.2f}")
            print(f"thread pool diagnostics, {name}: " + "; ".join(parts))


def netdissect_lite_runner() -> Any:
    """scripts/bench_netdissect_lite.py, the module beside this script."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_netdissect_lite

    return bench_netdissect_lite


def report_quoted(results: dict[tuple[int, int], dict[str, Any]]) -> None:
    """dissect against issue 14's quoted NetDissect-Lite figures (128 x 28 x 28 only)."""
    reference = NETDISSECT_LITE["shape"]
    if reference in results:
        r = results[reference]
        quantile, tally = NETDISSECT_LITE["quantile"], NETDISSECT_LITE["tally"]
        print(f"NetDissect-Lite on {reference[0]}x{reference[1]}x{reference[1]}: {quantile} s "
              f"quantile + {tally} s tally per 1000 images = {quantile + tally:.1f} ms/image "
              "(issue 14's figures on a 2-core machine, NOT measured here)")
        for k in (1, 2):
            ours_t = r["ms"][f"thresholds x{k}"]
            ours_c = r["ms"][f"counting x{k} prefilter {r['auto']}"]
            print(f"  dissect, {k} worker(s): thresholds {ours_t:.2f} + counting {ours_c:.2f} = "
                  f"{ours_t + ours_c:.2f} ms/image; NetDissect-Lite / dissect: thresholds "
                  f"{quantile / ours_t:.1f}x, counting {tally / ours_c:.1f}x, both "
                  f"{(quantile + tally) / (ours_t + ours_c):.1f}x")


def report_netdissect_lite(shapes: list[tuple[int, int]],
                           results: dict[tuple[int, int], dict[str, Any]], names: list[str],
                           width: int) -> None:
    """NetDissect-Lite measured in this run next to dissect, per shape."""
    rows: list[tuple[str, list[str]]] = []
    lite = [results[s]["netdissect_lite"] for s in shapes]
    quantile = [r["quantile_s_per_1000"] for r in lite]
    tally = [r["tally_s_per_1000"] for r in lite]
    rows.append(("NetDissect-Lite quantile (sketch), ms/img", [f"{v:.2f}" for v in quantile]))
    rows.append(("NetDissect-Lite tally, ms/img", [f"{v:.2f}" for v in tally]))
    rows.append(("  its sketch vs exact quantile, max relative error",
                 [f"{r['sketch_max_relative_error']:.1e}" for r in lite]))
    for k in (1, 2):
        ours_t = [results[s]["ms"][f"thresholds x{k}"] for s in shapes]
        ours_c = [results[s]["ms"][f"counting x{k} prefilter {results[s]['auto']}"]
                  for s in shapes]
        rows.append((f"NetDissect-Lite / dissect x{k}: thresholds",
                     [f"{q / t:.1f}" for q, t in zip(quantile, ours_t)]))
        rows.append((f"NetDissect-Lite / dissect x{k}: counting",
                     [f"{q / c:.1f}" for q, c in zip(tally, ours_c)]))
        rows.append((f"NetDissect-Lite / dissect x{k}: both",
                     [f"{(q + a) / (t + c):.1f}"
                      for q, a, t, c in zip(quantile, tally, ours_t, ours_c)]))
    print("NetDissect-Lite measured in this run (one process, PARALLEL = 1, label prefetch in "
          "its own worker processes; scripts/bench_netdissect_lite.py)")
    print_table(rows, names, width)


def report_breakdown(shapes: list[tuple[int, int]], results: dict[tuple[int, int], dict[str, Any]],
                     names: list[str], width: int) -> None:
    """The counting's parts side by side: ms/image, its floor's and the ratio."""
    print("\ncounting per chunk, by part (1 torch thread, chunks in turn; fastest round of each "
          "part): ms/image, and part / its floor")
    rows: list[tuple[str, list[str]]] = []
    for key, label, floor_label in BREAKDOWN:
        parts = [results[s]["breakdown"] for s in shapes]
        rows.append((label, [f"{1000 * p['part'][key] / p['n']:.3f}" for p in parts]))
        if floor_label is not None:
            rows.append((f"  floor: {floor_label}",
                         [f"{1000 * p['floor'][key] / p['n']:.3f}" for p in parts]))
            rows.append(("  part / floor", [f"{p['part'][key] / p['floor'][key]:.2f}"
                                             if p["floor"][key] > 0 else "-" for p in parts]))
    parts = [results[s]["breakdown"] for s in shapes]
    rows.append(("count_iou in all", [f"{1000 * p['count_iou'] / p['n']:.3f}" for p in parts]))
    rows.append(("sum of the parts", [f"{1000 * sum(p['part'].values()) / p['n']:.3f}"
                                      for p in parts]))
    rows.append(("sum of the floors", [f"{1000 * sum(p['floor'].values()) / p['n']:.3f}"
                                       for p in parts]))
    print_table(rows, names, width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=1000)
    parser.add_argument("--shapes", default=SHAPES,
                        help=f"comma-separated UNITSxSIDE layer shapes (default {SHAPES})")
    parser.add_argument("--seg-size", type=int, default=112)
    parser.add_argument("--labels", type=int, default=40,
                        help="about this many labels in 6 categories (default 40, as in the "
                             "issue's NetDissect-Lite comparison)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="images per Dask task (default: dissect.parallel's default)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the generated data here and reuse it (default: a temporary "
                             "directory)")
    parser.add_argument("--schedulers", default="threads",
                        help="'threads' (always measured, prefilter off and on) and optionally "
                             "'processes' (count_iou's default prefilter choice)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every measurement: prints the fastest run of each and "
                             "every round (for shared, noisy machines)")
    parser.add_argument("--diagnostics", action="store_true",
                        help="also time load_segmentations and count_iou alone in a thread pool")
    parser.add_argument("--breakdown", default="on", choices=["on", "off", "only"],
                        help="time the counting's parts against their floors (default on); "
                             "'only': nothing else")
    parser.add_argument("--netdissect-lite", type=Path, default=None, metavar="CHECKOUT",
                        help="also time NetDissect-Lite's quantile and tally from this checkout "
                             "on the same data, one fresh process per shape "
                             "(scripts/bench_netdissect_lite.py), and print the ratios")
    # internal: one measurement in a subprocess
    parser.add_argument("--measure", default=None,
                        choices=["imports", "floor", "thresholds", "tally", "scaling",
                                 "breakdown"])
    parser.add_argument("--scheduler", default="threads")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--prefilter", default="auto", choices=["on", "off", "auto"])
    parser.add_argument("--cache", default=None)
    parser.add_argument("--data", default=None)
    parser.add_argument("--thresholds", default=None)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat: {args.repeat} must be >= 1")
    if args.netdissect_lite and not (args.netdissect_lite / "feature_operation.py").is_file():
        parser.error(f"--netdissect-lite: {args.netdissect_lite} holds no feature_operation.py")
    if args.measure:
        print(json.dumps(measure(args)))
        return
    shapes = parse_shapes(args.shapes)

    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        meta = {"n_images": args.n_images, "seg_size": args.seg_size, "labels": args.labels,
                "version": 2}
        meta_path = workdir / "bench_tally.json"
        data = workdir / "dataset"
        start = time.perf_counter()
        made = []
        if not meta_path.exists() or json.loads(meta_path.read_text()) != meta:
            for old in (workdir / "cache").glob("layer_*.h5"):
                old.unlink()
            generate_dataset(workdir, args.n_images, args.seg_size, args.labels)
            meta_path.write_text(json.dumps(meta))
            made.append("label maps")
        layers = np.load(workdir / "layers.npy")
        for units, size in shapes:
            cache = workdir / "cache" / f"layer_{units}x{size}.h5"
            if not cache.exists():
                write_cache(cache, layers, units, size, args.seg_size, args.labels)
                made.append(f"{units}x{size}")
        print(f"{args.n_images} images, {args.seg_size}x{args.seg_size} PNG label maps, "
              f"~{args.labels} labels in 6 categories; generated "
              f"{', '.join(made) or 'nothing (reused)'} in {time.perf_counter() - start:.1f} s "
              f"({workdir})")
        script = Path(__file__).resolve()
        load_before = f"{os.getloadavg()[0]:.2f}"
        results = {}
        lite = netdissect_lite_runner() if args.netdissect_lite is not None else None
        for units, size in shapes:
            began = time.perf_counter()
            results[(units, size)] = measure_shape(script, workdir, data, units, size, args)
            if lite is not None and args.breakdown != "only":
                results[(units, size)]["netdissect_lite"] = lite.run(
                    args.netdissect_lite, workdir, units, size)
            print(f"  measured {units}x{size}x{size} in {time.perf_counter() - began:.0f} s",
                  flush=True)
        print(f"load average before/after: {load_before} / {os.getloadavg()[0]:.2f} on "
              f"{os.cpu_count()} cores; fastest of {args.repeat} round(s); threads scheduler; "
              "xK = K workers; 'default' = count_iou's automatic prefilter choice")
        report(shapes, results, args)


if __name__ == "__main__":
    main()
