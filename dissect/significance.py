"""Significance of one layer's labels (DESIGN.md §12): orchestration over the cache and outputs.

:func:`significance_layer` streams a layer's activation cache and the dataset's label maps by
blocks of images (Dask tasks, :mod:`dissect.parallel`'s schedulers) and computes, per unit:

- the permutation p-value of its best IoU over all labels (the choice of the best of all labels
  is inside the null), the null mean, sd and z of its label's IoU, and Benjamini-Hochberg
  q-values over the layer's units (:mod:`dissect.stats.significance` explains the block
  permutations that make B permutations cost far less than B tallies);
- always: the independence baseline IoU0 and the image-level 2x2 table (unit fires x image
  carries the label, over the images annotated in the label's category) with its odds ratio and
  one-sided Fisher p;
- with ``ci=True``: a percentile bootstrap interval of the label's IoU (1,000 Poisson(1) weight
  draws per image, one extra pass);
- with ``select_split``/``eval_split``: labels chosen on one split, IoU and p measured on the
  other; the statistic is then the label's IoU (its null: the same label's permuted IoU).

Only labeled images take part (``dataset.labeled_images()``, as the tally). Results are
identical for every scheduler and chunking (integer counts summed exactly; permutations and
bootstrap weights are functions of the seed and the data's blocks and images only).

``SignificanceResult.save(out_dir)`` writes ``significance.csv`` (one row per unit, 0-based,
columns :data:`CSV_COLUMNS`, empty cells for what was not computed) and ``significance.h5``
(arrays, options and the cache fingerprint; renamed into place last: it marks completion).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import h5py
import numpy as np
import torch

from dissect.errors import CacheError, DatasetError, OptionError
from dissect.parallel import (
    check_chunk_size,
    check_scheduler,
    compute_counts,
    scheduler_context,
    set_task_threads,
    torch_threads_kept,
    tree_reduce,
)
from dissect.stats import UNION_RULES, IoUCounts, best_labels, iou_from_counts
from dissect.stats.significance import (
    BlockCounts,
    FisherCounts,
    benjamini_hochberg,
    block_permutations,
    bootstrap_interval,
    bootstrap_sums,
    count_blocks,
    count_pair,
    fisher_tables,
    fisher_tests,
    image_labels,
    image_masks,
    independence_iou,
    null_statistics,
    partition_blocks,
    permutation_p_values,
    poisson_weights,
    stratum_ids,
)

__all__ = [
    "SIGNIFICANCE_CSV",
    "SIGNIFICANCE_H5",
    "CSV_COLUMNS",
    "SignificanceResult",
    "significance_layer",
    "significance_options",
    "load_significance",
    "significance_is_current",
]

SIGNIFICANCE_CSV = "significance.csv"
SIGNIFICANCE_H5 = "significance.h5"
SCHEMA_VERSION = 1
CSV_COLUMNS = ("unit", "label", "category", "iou", "iou0", "fisher_or", "fisher_p", "perm_p",
               "null_mean", "null_sd", "z", "q", "ci_low", "ci_high", "significant")
#: Images per block of the permutation null (see :mod:`dissect.stats.significance`).
BLOCK_SIZE = 8
_INT32_LIMIT = 2**31 - 1
#: Bootstrap draws of ``ci`` and the interval's coverage.
CI_DRAWS = 1000
CI_LEVEL = 0.95
#: The permuted intersections (U, L, B) int32 of one pass stay under this; a layer that needs
#: more is done in several passes over unit groups (each pass reads the data again).
NULL_BUDGET_BYTES = 512 * 1024 * 1024
# Images per task by default, and tasks in flight per worker between accumulations.
_DEFAULT_CHUNK = 32
_TASKS_PER_WORKER = 2

_FLOATS = ("iou", "iou0", "fisher_or", "fisher_p", "perm_p", "null_mean", "null_sd", "z", "q",
           "ci_low", "ci_high", "observed")
_ARRAYS = _FLOATS + ("unit_label", "significant", "fisher_table", "null", "null_label_iou",
                     "label_area", "intersection", "act_area", "primary")


@dataclass(eq=False)
class SignificanceResult:
    """Significance of every unit's label in one layer (DESIGN.md §12).

    Attributes
    ----------
    layer, categories:
        Layer name; the C selected categories.
    unit_label:
        int64 (U,) each unit's label (0: none); ``unit_category`` (U,) str its primary category
        ('' for none); ``label_names`` (L,) and ``primary`` int64 (L,) as in the tally.
    iou:
        float64 (U,) the label's IoU (on the evaluation images).
    iou0:
        float64 (U,) independence baseline (NaN: no label).
    fisher_table:
        int64 (U, 2, 2); ``fisher_or``, ``fisher_p`` float64 (U,) (NaN: no label).
    observed, null:
        float64 (U,) and (B, U): the test statistic (``statistic`` 'max': best IoU over labels;
        'label': the selected label's IoU) observed and under each permutation.
    null_label_iou:
        float64 (B, U): the label's IoU under each permutation; ``null_mean``, ``null_sd``
        (ddof 1), ``z`` = (iou - null_mean) / null_sd (NaN when sd is 0 or no label).
    perm_p, q:
        float64 (U,): permutation p-value and Benjamini-Hochberg q-value over the units.
    significant:
        bool (U,): q <= alpha.
    ci_low, ci_high:
        float64 (U,): percentile bootstrap interval of the label's IoU (NaN unless ci).
    label_area, intersection, act_area:
        The observed IoU counts of the evaluation images (the tally's counts).
    options, fingerprint:
        What the result was computed with (see :func:`significance_options`), and the cache
        fingerprint (JSON text).
    """

    layer: str
    categories: tuple[str, ...]
    label_names: list[str]
    primary: np.ndarray
    unit_label: np.ndarray
    unit_category: np.ndarray
    iou: np.ndarray
    iou0: np.ndarray
    fisher_table: np.ndarray
    fisher_or: np.ndarray
    fisher_p: np.ndarray
    observed: np.ndarray
    null: np.ndarray
    null_label_iou: np.ndarray
    null_mean: np.ndarray
    null_sd: np.ndarray
    z: np.ndarray
    perm_p: np.ndarray
    q: np.ndarray
    significant: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    label_area: np.ndarray
    intersection: np.ndarray
    act_area: np.ndarray
    statistic: str
    alpha: float
    iou_threshold: float
    n_images: int
    options: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def n_units(self) -> int:
        """U."""
        return len(self.unit_label)

    def counts_equal(self, tally: Any) -> bool:
        """True when the observed counts equal a ``DissectionResult``'s (the same images)."""
        return (np.array_equal(self.label_area, tally.label_area)
                and np.array_equal(self.intersection, tally.intersection)
                and np.array_equal(self.act_area, tally.act_area))

    def summary(self) -> dict[str, int]:
        """Counts for a report: ``units``, ``detectors`` (label with iou >= iou_threshold),
        ``significant`` units, and ``significant_detectors``."""
        detector = (self.unit_label > 0) & (self.iou >= self.iou_threshold)
        return {"units": self.n_units, "detectors": int(detector.sum()),
                "significant": int(self.significant.sum()),
                "significant_detectors": int((detector & self.significant).sum())}

    def rows(self) -> list[dict[str, str]]:
        """The rows of significance.csv (strings; '' for what was not computed)."""
        rows = []
        for u in range(self.n_units):
            label = int(self.unit_label[u])
            row = {"unit": str(u), "label": self.label_names[label] if label else "",
                   "category": str(self.unit_category[u])}
            for name in CSV_COLUMNS[3:-1]:
                row[name] = _cell(float(getattr(self, name)[u]))
            row["significant"] = "yes" if self.significant[u] else "no"
            rows.append(row)
        return rows

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``significance.csv`` and ``significance.h5`` into ``out_dir``; returns it.

        Both are written under temporary names; the old ``significance.h5`` (the completion
        marker) is removed first, the csv renamed into place, and ``significance.h5`` last.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        csv_part = out / (SIGNIFICANCE_CSV + ".partial")
        h5_part = out / (SIGNIFICANCE_H5 + ".partial")
        with open(csv_part, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(CSV_COLUMNS))
            writer.writeheader()
            writer.writerows(self.rows())
        strings = h5py.string_dtype("utf-8")
        with h5py.File(h5_part, "w") as file:
            for name in _ARRAYS:
                file.create_dataset(name, data=np.asarray(getattr(self, name)))
            file.create_dataset("unit_category", data=[str(c) for c in self.unit_category],
                                dtype=strings)
            file.create_dataset("label_names", data=list(self.label_names), dtype=strings)
            file.create_dataset("categories", data=list(self.categories), dtype=strings)
            attrs = {"schema_version": SCHEMA_VERSION, "layer": self.layer,
                     "statistic": self.statistic, "alpha": self.alpha,
                     "iou_threshold": self.iou_threshold, "n_images": self.n_images,
                     "options": _options_text(self.options), "fingerprint": self.fingerprint,
                     "complete": True}
            for key, value in attrs.items():
                file.attrs[key] = value
        (out / SIGNIFICANCE_H5).unlink(missing_ok=True)
        os.replace(csv_part, out / SIGNIFICANCE_CSV)
        os.replace(h5_part, out / SIGNIFICANCE_H5)
        return out


def _cell(value: float) -> str:
    return "" if math.isnan(value) else repr(value)


def _options_text(options: dict[str, Any]) -> str:
    return json.dumps(options, sort_keys=True)


def _fingerprint_text(fingerprint: Any) -> str:
    if fingerprint is None:
        return ""
    if isinstance(fingerprint, str):
        return fingerprint
    return json.dumps(fingerprint, sort_keys=True, default=str)


def significance_options(thresholds: np.ndarray, *, permutations: int = 100, seed: int = 0,
                         alpha: float = 0.05, ci: bool = False, select_split: str | None = None,
                         eval_split: str | None = None, union: str = "touched",
                         iou_threshold: float = 0.04, block_size: int = BLOCK_SIZE,
                         categories: Sequence[str] = ()) -> dict[str, Any]:
    """The options a significance result depends on, as stored in ``significance.h5``.

    ``thresholds`` (U,) enter as a sha256 of their float64 bytes. Pass the result to
    :func:`significance_is_current` to decide whether a stored result can be reused.
    """
    digest = hashlib.sha256(np.ascontiguousarray(thresholds, dtype=np.float64).tobytes())
    return {"permutations": int(permutations), "seed": int(seed), "alpha": float(alpha),
            "ci": bool(ci), "ci_draws": CI_DRAWS if ci else 0, "select_split": select_split,
            "eval_split": eval_split, "union": str(union), "iou_threshold": float(iou_threshold),
            "block_size": int(block_size), "categories": [str(c) for c in categories],
            "thresholds_sha256": digest.hexdigest(), "schema_version": SCHEMA_VERSION}


def significance_is_current(out_dir: str | os.PathLike[str], options: dict[str, Any],
                            fingerprint: Any) -> bool:
    """True when ``out_dir`` holds a complete result with these options and cache fingerprint."""
    out = Path(out_dir)
    path = out / SIGNIFICANCE_H5
    if not (path.is_file() and (out / SIGNIFICANCE_CSV).is_file()):
        return False
    try:
        with h5py.File(path, "r") as file:
            attrs = {key: _text(file.attrs[key]) for key in ("options", "fingerprint")}
            complete = bool(file.attrs.get("complete", False))
    except (OSError, KeyError):
        return False
    return (complete and attrs["options"] == _options_text(options)
            and attrs["fingerprint"] == _fingerprint_text(fingerprint))


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_significance(out_dir: str | os.PathLike[str]) -> SignificanceResult:
    """Read ``<out_dir>/significance.h5`` back.

    Raises
    ------
    CacheError
        When it is missing or unreadable (the message says to run ``dissect significance``).
    """
    path = Path(out_dir) / SIGNIFICANCE_H5
    if not path.is_file():
        raise CacheError(f"{path} does not exist; run `dissect significance` for this layer")
    try:
        with h5py.File(path, "r") as file:
            arrays = {name: file[name][()] for name in _ARRAYS}
            unit_category = np.array([_text(v) for v in file["unit_category"][()]], dtype=object)
            label_names = [_text(v) for v in file["label_names"][()]]
            categories = tuple(_text(v) for v in file["categories"][()])
            attrs = {key: file.attrs[key] for key in file.attrs}
    except (OSError, KeyError) as error:
        raise CacheError(f"cannot read {path}: {error}; run `dissect significance` "
                         f"again") from None
    return SignificanceResult(
        layer=_text(attrs["layer"]), categories=categories, label_names=label_names,
        unit_category=unit_category, statistic=_text(attrs["statistic"]),
        alpha=float(attrs["alpha"]), iou_threshold=float(attrs["iou_threshold"]),
        n_images=int(attrs["n_images"]), options=json.loads(_text(attrs["options"])),
        fingerprint=_text(attrs["fingerprint"]),
        **{name: arrays[name] for name in _ARRAYS})


# ----------------------------------------------------------------------------- checks
def _check_options(permutations: int, seed: int, alpha: float, union: str,
                   iou_threshold: float, block_size: int, scheduler: str) -> None:
    if isinstance(permutations, bool) or not isinstance(permutations, (int, np.integer)) \
            or permutations < 1:
        raise OptionError(f"--permutations: {permutations!r}; expected an integer >= 1 "
                          f"(default 100)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise OptionError(f"--seed: {seed!r}; expected an integer >= 0")
    if not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) < 1.0:
        raise OptionError(f"--alpha: {alpha!r}; expected a number in (0, 1) (default 0.05)")
    if union not in UNION_RULES:
        raise OptionError(f"--union: {union!r}; expected one of {', '.join(UNION_RULES)}")
    if not isinstance(iou_threshold, (int, float)) or not 0.0 <= float(iou_threshold) <= 1.0:
        raise OptionError(f"--iou-threshold: {iou_threshold!r}; expected a number in [0, 1]")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
            or block_size < 2:
        raise OptionError(f"block_size: {block_size!r}; expected an integer >= 2")
    check_scheduler(scheduler)


def _open_reader(cache: Any) -> tuple[Any, str, str, Any]:
    """(reader, description, default layer, fingerprint) of a cache path or reader."""
    from dissect.record.cache import open_activations

    return open_activations(cache)


def _annotation_signatures(dataset: Any, images: np.ndarray) -> np.ndarray:
    """int64 (M, C + 2): per image, annotated (1) or not in each selected category per
    index.csv (a PNG or an image-level label listed), then the segmentation size."""
    method = getattr(dataset, "annotated_categories", None)
    if method is not None:
        annotated = np.asarray(method(), dtype=np.int64)[images]
    else:
        entries = getattr(dataset, "_entries", None)
        if entries is None:
            annotated = np.zeros((len(images), 0), np.int64)
        else:
            annotated = np.array([[int(bool(entries[i].pixel_files.get(c)
                                             or entries[i].image_labels.get(c)))
                                   for c in dataset.categories] for i in images.tolist()],
                                 dtype=np.int64).reshape(len(images), -1)
    entries = getattr(dataset, "_entries", None)
    if entries is not None:
        sizes = np.array([entries[i].seg_size for i in images.tolist()], np.int64)
    else:
        sizes = np.tile(np.asarray(dataset.seg_size, np.int64), (len(images), 1))
    return np.concatenate([annotated, sizes.reshape(len(images), 2)], axis=1)


def _split_images(dataset: Any, labeled: np.ndarray, split: str, option: str) -> np.ndarray:
    try:
        chosen = dataset.subset(split)
    except OptionError as error:
        raise OptionError(f"{option}: {error}") from None
    images = np.intersect1d(labeled, chosen)
    if len(images) == 0:
        raise DatasetError(f"{option} {split}: no image of split {split!r} in {dataset.root} "
                           f"has a label in the selected categories")
    return images


# ----------------------------------------------------------------------------- tasks
def _null_task(reader: Any, dataset: Any, blocks: list[np.ndarray], block_ids: list[int],
               units: np.ndarray, thresholds: np.ndarray, primary: np.ndarray, n_cat: int,
               union: str, seed: int, n_perm: int, threads: int | None,
               device: str | None) -> BlockCounts:
    """Counts of some whole blocks (cache rows) for the given units."""
    set_task_threads(threads)
    rows = np.unique(np.concatenate(blocks))
    acts = reader.read_rows(rows)
    if len(units) != acts.shape[1]:
        acts = acts[:, units]
    seg, level = dataset.load_segmentations(rows)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    masks = image_masks(acts, thresholds, seg.shape[2:], device)
    labels = image_labels(seg, level, primary, n_cat)
    local = [np.searchsorted(rows, block) for block in blocks]
    pairings = [block_permutations(seed, k, n_perm, len(block))
                for k, block in zip(block_ids, blocks)]
    return count_blocks(masks, labels, local, pairings, primary, len(units), n_cat, union)


def _ci_task(reader: Any, dataset: Any, rows: np.ndarray, unit_label: np.ndarray,
             thresholds: np.ndarray, primary: np.ndarray, n_cat: int, union: str, seed: int,
             n_draws: int, threads: int | None, device: str | None) -> np.ndarray:
    """Bootstrap sums (3, R, U) of some images' label counts."""
    set_task_threads(threads)
    acts = reader.read_rows(rows)
    seg, level = dataset.load_segmentations(rows)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    n_units, n_labels = acts.shape[1], len(primary)
    category = np.where(unit_label > 0, primary[unit_label], -1)
    masks = image_masks(acts, thresholds, seg.shape[2:], device)
    labels = image_labels(seg, level, primary, n_cat)
    inter = np.zeros((len(rows), n_units), np.int64)
    act = np.zeros((len(rows), n_units), np.int64)
    area = np.zeros((len(rows), n_units), np.int64)
    has_label = unit_label > 0
    for k, (image_masks_, image_labels_) in enumerate(zip(masks, labels)):
        pair = count_pair(image_masks_, image_labels_, primary, n_cat, union)
        unit, label = np.divmod(pair.inter_codes, n_labels)
        hit = (unit_label[unit] == label) & (label > 0)
        inter[k] = np.bincount(unit[hit], weights=pair.inter_counts[hit], minlength=n_units)
        unit, cat = np.divmod(pair.act_codes, n_cat)
        hit = category[unit] == cat
        act[k] = np.bincount(unit[hit], weights=pair.act_areas[hit], minlength=n_units)
        area[k] = np.where(has_label, image_labels_.label_area[unit_label], 0)
    return bootstrap_sums(poisson_weights(seed, rows, n_draws), inter, act, area)


def _sum(*parts: np.ndarray) -> np.ndarray:
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total


def _leaf(value: Any, label: str) -> Any:
    return dask.delayed(value, name=f"{label}-{uuid.uuid4().hex}", traverse=False)


def _workers(scheduler: str, num_workers: int | None) -> int:
    if scheduler == "synchronous":
        return 1
    if scheduler in ("threads", "processes"):
        return int(num_workers) if num_workers else (os.cpu_count() or 1)
    return 16


def _group_tasks(blocks: list[np.ndarray], size: int) -> list[list[int]]:
    """Consecutive blocks into tasks of at least ``size`` images (the last may hold fewer)."""
    tasks: list[list[int]] = []
    current: list[int] = []
    count = 0
    for k, block in enumerate(blocks):
        current.append(k)
        count += len(block)
        if count >= size:
            tasks.append(current)
            current, count = [], 0
    if current:
        tasks.append(current)
    return tasks


@dataclass
class _Pass:
    observed: IoUCounts
    fisher: FisherCounts
    null_intersection: np.ndarray          # (U, L, B)
    null_act: np.ndarray                   # (U, C, B)


def _run_null(reader: Any, dataset: Any, images: np.ndarray, blocks: list[np.ndarray],
              thresholds: np.ndarray, primary: np.ndarray, n_cat: int, union: str, seed: int,
              n_perm: int, chunk_size: int, setup: Any, workers: int, device: str | None,
              progress: bool) -> _Pass:
    """The permutation pass over every block, in unit groups that fit NULL_BUDGET_BYTES."""
    n_units, n_labels = len(thresholds), len(primary)
    per_unit = max(1, n_perm * n_labels * 4)
    group = max(1, min(n_units, NULL_BUDGET_BYTES // per_unit))
    tasks = _group_tasks(blocks, chunk_size)
    wave = max(1, _TASKS_PER_WORKER * workers)
    # A permutation re-pairs images within blocks and a task holds whole blocks, so every
    # permuted intersection of the images summed so far is at most their label_area: the
    # accumulator stays int32 while label_area does, and widens to int64 before it would not.
    null_inter = np.zeros((n_units, n_labels, n_perm), np.int32)
    null_act = np.zeros((n_units, n_cat, n_perm), np.int64)
    observed_inter = np.zeros((n_units, n_labels), np.int64)
    observed_act = np.zeros((n_units, n_cat), np.int64)
    label_area = np.zeros(n_labels, np.int64)
    fisher: FisherCounts | None = None
    groups = [(a, min(a + group, n_units)) for a in range(0, n_units, group)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks) * len(groups), desc="significance", unit="task")
    source, data = _leaf(reader, "reader"), _leaf(dataset, "dataset")
    primary_d = _leaf(primary, "primary")
    for g, (first, last) in enumerate(groups):
        flat = null_inter[first:last].reshape((last - first) * n_labels, n_perm)   # a view
        thresholds_d = _leaf(thresholds[first:last], "thresholds")
        units_d = _leaf(np.arange(first, last), "units")
        group_fisher: FisherCounts | None = None
        for start in range(0, len(tasks), wave):
            graphs = [dask.delayed(_null_task, pure=False)(
                source, data, [blocks[k] for k in task], task, units_d, thresholds_d,
                primary_d, n_cat, union, seed, n_perm, setup.task_threads, device,
                dask_key_name=f"significance-{g}-{number}-{uuid.uuid4().hex}")
                for number, task in enumerate(tasks[start:start + wave], start)]
            with torch_threads_kept():
                parts = dask.compute(*graphs, **setup.compute_kwargs)
            for part in parts:
                if g == 0:
                    label_area += part.observed.label_area
                if null_inter.dtype == np.int32 and label_area.max(initial=0) >= _INT32_LIMIT:
                    null_inter = null_inter.astype(np.int64)
                    flat = null_inter[first:last].reshape((last - first) * n_labels, n_perm)
                part.null.add_to(flat)
                null_act[first:last] += part.null.act_area
                observed_inter[first:last] += part.observed.intersection
                observed_act[first:last] += part.observed.act_area
                group_fisher = part.fisher if group_fisher is None else group_fisher + \
                    part.fisher
            del parts
            if bar is not None:
                bar.update(len(graphs))
        fisher = group_fisher if fisher is None else _join_units(fisher, group_fisher)
    if bar is not None:
        bar.close()
    return _Pass(IoUCounts(label_area, observed_inter, observed_act), fisher,  # type: ignore
                 null_inter, null_act)


def _join_units(first: FisherCounts, other: FisherCounts) -> FisherCounts:
    """Fisher counts of the first unit groups, extended by another group's units."""
    return FisherCounts(np.concatenate([first.both, other.both]),
                        np.concatenate([first.fires_annotated, other.fires_annotated]),
                        first.has, first.annotated,
                        np.concatenate([first.mask_annotated, other.mask_annotated]),
                        np.concatenate([first.mask_total, other.mask_total]), first.n_images)


def _run_ci(reader: Any, dataset: Any, images: np.ndarray, unit_label: np.ndarray,
            thresholds: np.ndarray, primary: np.ndarray, n_cat: int, union: str, seed: int,
            chunk_size: int, setup: Any) -> np.ndarray:
    source, data = _leaf(reader, "reader"), _leaf(dataset, "dataset")
    label_d, thresholds_d = _leaf(unit_label, "labels"), _leaf(thresholds, "thresholds")
    primary_d = _leaf(primary, "primary")
    parts = [dask.delayed(_ci_task, pure=False)(
        source, data, images[a:a + chunk_size], label_d, thresholds_d, primary_d, n_cat, union,
        seed, CI_DRAWS, setup.task_threads, None,
        dask_key_name=f"significance-ci-{a}-{uuid.uuid4().hex}")
        for a in range(0, len(images), chunk_size)]
    with torch_threads_kept():
        (sums,) = dask.compute(tree_reduce(parts, _sum, fan_in=4), **setup.compute_kwargs)
    return sums


# ----------------------------------------------------------------------------- the API
def significance_layer(
    cache: str | os.PathLike[str] | Any,
    dataset: Any,
    thresholds: str | os.PathLike[str] | np.ndarray,
    *,
    layer: str | None = None,
    permutations: int = 100,
    seed: int = 0,
    alpha: float = 0.05,
    ci: bool = False,
    select_split: str | None = None,
    eval_split: str | None = None,
    union: str = "touched",
    iou_threshold: float = 0.04,
    chunk_size: int | None = None,
    scheduler: str = "threads",
    num_workers: int | None = None,
    device: str | None = None,
    fingerprint: Any = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    block_size: int = BLOCK_SIZE,
) -> SignificanceResult:
    """Permutation p-values, q-values, baselines and intervals of one layer's labels.

    Parameters
    ----------
    cache:
        ``run_dir/cache/<layer>.h5`` or a picklable reader (``shape``, ``read_rows``).
    dataset:
        The ``BrodenDataset`` the cache was recorded on (row n = image n); its selected
        categories are the categories, as in the tally.
    thresholds:
        (U,) thresholds (the tally's, from ``dissection.h5``) or a ``.npy`` file of them.
    layer:
        Name stored in the result (default: the cache's layer).
    permutations:
        B >= 1 permutations of the null (default 100); p >= 1 / (B + 1).
    seed:
        Seed of the permutations and bootstrap weights.
    alpha:
        FDR level of ``significant`` (q <= alpha).
    ci:
        Also the percentile bootstrap interval of the label's IoU (an extra pass).
    select_split, eval_split:
        Choose labels on the images of ``select_split``, measure on ``eval_split`` (both or
        neither; ``eval_split`` alone restricts everything to that split).
    union:
        'touched' (default), 'annotated' or 'all': the tally's union rule.
    iou_threshold:
        The detector cut-off (for :meth:`SignificanceResult.summary`).
    chunk_size:
        Images per task (whole blocks; default 32).
    scheduler, num_workers:
        As :func:`dissect.parallel.scheduler_context`.
    device:
        Torch device of upsampling and thresholding (default CUDA when available).
    fingerprint:
        The cache fingerprint to store (default: read from the cache file).
    out_dir:
        When given, the result is saved there.
    progress:
        A tqdm progress bar on stderr.
    block_size:
        Images per permutation block (default 8; see :mod:`dissect.stats.significance`).

    Raises
    ------
    CacheError, DatasetError, OptionError
        Missing cache or one of another size than the dataset, no labeled image, bad option.
    """
    from dissect.tally import load_thresholds

    _check_options(permutations, seed, alpha, union, iou_threshold, block_size, scheduler)
    if (select_split is None) != (eval_split is None) and select_split is not None:
        raise OptionError("--select-split needs --eval-split (labels are chosen on one split "
                          "and measured on the other)")
    if select_split is not None and select_split == eval_split:
        raise OptionError(f"--select-split and --eval-split are both {select_split!r}; "
                          f"expected two different splits")
    reader, where, default_layer, cache_fingerprint = _open_reader(cache)
    shape = tuple(reader.shape)
    if len(shape) != 4:
        raise CacheError(f"{where}: activations of shape {shape}; expected (N, U, h, w)")
    if shape[0] != len(dataset):
        raise CacheError(f"{where} holds {shape[0]} images but dataset {dataset.root} has "
                         f"{len(dataset)}; record the cache on this dataset")
    values = load_thresholds(thresholds, shape[1])
    size = _DEFAULT_CHUNK if chunk_size is None else check_chunk_size(chunk_size)
    labeled = np.asarray(dataset.labeled_images(), dtype=np.int64)
    if len(labeled) == 0:
        raise DatasetError(f"{where}: no image of dataset {dataset.root} has a label in the "
                           f"selected categories ({', '.join(dataset.categories)})")
    images = labeled if eval_split is None else _split_images(dataset, labeled, eval_split,
                                                             "--eval-split")
    categories = tuple(dataset.categories)
    n_cat = len(categories)
    primary = np.asarray(dataset.vocab.primary, dtype=np.int64)
    blocks_local = partition_blocks(stratum_ids(_annotation_signatures(dataset, images)),
                                    int(block_size))
    blocks = [images[block] for block in blocks_local]
    workers = _workers(scheduler, num_workers)
    with scheduler_context(scheduler, num_workers) as setup:
        if select_split is not None:
            selected = _split_images(dataset, labeled, select_split, "--select-split")
            chosen = compute_counts(reader, dataset, values, primary=primary, n_categories=n_cat,
                                    union=union, chunk_size=size, scheduler=setup,
                                    device=device, images=selected)
            _, _, unit_label, _ = best_labels(iou_from_counts(chosen, primary), primary, n_cat)
        done = _run_null(reader, dataset, images, blocks, values, primary, n_cat, union,
                         int(seed), int(permutations), size, setup, workers, device, progress)
        iou = iou_from_counts(done.observed, primary)
        if select_split is None:
            _, _, unit_label, _ = best_labels(iou, primary, n_cat)
        sums = (_run_ci(reader, dataset, images, unit_label, values, primary, n_cat, union,
                        int(seed), size, setup) if ci else None)
    result = _assemble(layer or default_layer, categories, dataset.vocab.names, primary, values,
                       done, iou, unit_label, sums, statistic="label" if select_split else "max",
                       union=union, alpha=float(alpha), iou_threshold=float(iou_threshold),
                       seg_area=int(np.prod(dataset.seg_size)), n_images=len(images))
    result.options = significance_options(
        values, permutations=permutations, seed=seed, alpha=alpha, ci=ci,
        select_split=select_split, eval_split=eval_split, union=union,
        iou_threshold=iou_threshold, block_size=block_size, categories=categories)
    result.fingerprint = _fingerprint_text(fingerprint if fingerprint is not None
                                           else cache_fingerprint)
    if out_dir is not None:
        result.save(out_dir)
    return result


def _assemble(layer: str, categories: tuple[str, ...], label_names: Sequence[str],
              primary: np.ndarray, thresholds: np.ndarray, done: _Pass, iou: np.ndarray,
              unit_label: np.ndarray, sums: np.ndarray | None, *, statistic: str, union: str,
              alpha: float, iou_threshold: float, seg_area: int, n_images: int
              ) -> SignificanceResult:
    n_units = len(thresholds)
    rows = np.arange(n_units)
    unit_label = np.asarray(unit_label, dtype=np.int64)
    has_label = unit_label > 0
    label_iou = np.where(has_label, iou[rows, unit_label], 0.0)
    best, null_label_iou = null_statistics(done.observed.label_area, done.null_intersection,
                                           done.null_act, primary, unit_label)
    if statistic == "max":
        observed, null = np.maximum(iou.max(axis=1, initial=0.0), 0.0), best
    else:
        observed, null = label_iou, null_label_iou
    perm_p = permutation_p_values(observed, null)
    q = benjamini_hochberg(perm_p)
    nan = np.full(n_units, np.nan)
    null_mean = np.where(has_label, null_label_iou.mean(axis=0), np.nan)
    null_sd = (np.where(has_label, null_label_iou.std(axis=0, ddof=1), np.nan)
               if null.shape[0] > 1 else nan.copy())
    z = nan.copy()
    ok = has_label & (null_sd > 0)
    z[ok] = (label_iou[ok] - null_mean[ok]) / null_sd[ok]
    category = np.where(has_label, primary[unit_label], -1)
    fisher = done.fisher
    if union == "all":
        domain = np.full(n_units, float(fisher.n_images * seg_area))
        mask = fisher.mask_total.astype(np.float64)
    else:
        domain = np.where(category >= 0, fisher.annotated[np.maximum(category, 0)], 0) * \
            float(seg_area)
        mask = fisher.mask_annotated[rows, np.maximum(category, 0)].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        coverage_mask = np.where(domain > 0, mask / domain, 0.0)
        coverage_label = np.where(domain > 0, done.observed.label_area[unit_label] / domain, 0.0)
    iou0 = np.where(has_label, independence_iou(coverage_mask, coverage_label), np.nan)
    tables = fisher_tables(fisher, unit_label, primary)
    odds, fisher_p = fisher_tests(tables)
    odds[~has_label] = np.nan
    fisher_p[~has_label] = np.nan
    if sums is not None:
        ci_low, ci_high, _ = bootstrap_interval(sums, CI_LEVEL)
        ci_low = np.where(has_label, ci_low, np.nan)
        ci_high = np.where(has_label, ci_high, np.nan)
    else:
        ci_low, ci_high = nan.copy(), nan.copy()
    unit_category = np.array([categories[c] if c >= 0 else "" for c in category], dtype=object)
    return SignificanceResult(
        layer=layer, categories=categories, label_names=list(label_names), primary=primary,
        unit_label=unit_label, unit_category=unit_category, iou=label_iou, iou0=iou0,
        fisher_table=tables, fisher_or=odds, fisher_p=fisher_p, observed=observed, null=null,
        null_label_iou=null_label_iou, null_mean=null_mean, null_sd=null_sd, z=z,
        perm_p=perm_p, q=q, significant=q <= alpha, ci_low=ci_low, ci_high=ci_high,
        label_area=done.observed.label_area, intersection=done.observed.intersection,
        act_area=done.observed.act_area, statistic=statistic, alpha=alpha,
        iou_threshold=iou_threshold, n_images=n_images)
