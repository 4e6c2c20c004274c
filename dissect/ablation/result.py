"""Ablation results: arrays indexed (unit set, class), unit rankings, files.

Files of a layer directory ``run_dir/<layer>/``:

- ``ablation.h5``: one group per study run (``single``, ``topn``, ``concept``, ``random`` or a
  custom name); a new run of a study replaces its group. Group datasets: ``class_names`` (C,),
  ``set_studies`` (S,), ``set_names`` (S,), ``units`` (concatenated 0-based unit indices) with
  ``units_offsets`` (S + 1,), ``n`` (C,), the additive counts ``true_positive``, ``predicted``,
  ``prob_sum`` (S, C), each metric (S, C) float64, and when present ``ranking``/``damage`` (C, U)
  and the random-set summary ``random_sizes`` (K,) and ``random_<metric>_<mean|std|min|max>``
  (K, C). Attribute ``n_total`` and the options of the run.
- ``ablation.csv``: long format, one row per (unit set, class) of every group, baseline included,
  for the classes with evaluated images (``n > 0``; the h5 keeps every class):
  ``study,set,units,class,n,accuracy,balanced_accuracy,precision,recall,true_class_prob``.
- ``importance.csv``: ``unit,n_classes,classes,label,category,iou`` (see :func:`importance_table`).
"""

from __future__ import annotations

import csv
import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dissect.ablation.metrics import METRIC_NAMES, ClassCounts, metrics_from_counts
from dissect.errors import CacheError, OptionError

CSV_COLUMNS: tuple[str, ...] = ("study", "set", "units", "class", "n") + METRIC_NAMES
"""The header of ``ablation.csv``."""

IMPORTANCE_COLUMNS: tuple[str, ...] = ("unit", "n_classes", "classes", "label", "category", "iou")
"""The header of ``importance.csv``."""

BASELINE = "baseline"
ABLATION_H5 = "ablation.h5"
ABLATION_CSV = "ablation.csv"
IMPORTANCE_CSV = "importance.csv"
STUDY_ORDER: tuple[str, ...] = ("single", "topn", "concept", "random")


@dataclass(frozen=True)
class RandomSummary:
    """Spread of the random-set metrics over repeats, per set size and class.

    ``sizes`` (K,) int64; ``repeats`` (K,) int64; ``mean``, ``std`` (population, ddof=0), ``min``,
    ``max``: dict metric name -> (K, C) float64.
    """

    sizes: np.ndarray
    repeats: np.ndarray
    mean: dict[str, np.ndarray]
    std: dict[str, np.ndarray]
    min: dict[str, np.ndarray]
    max: dict[str, np.ndarray]


@dataclass(frozen=True)
class AblationResult:
    """Metrics of S unit sets (row 0 = the unablated baseline) for C classes on one layer.

    Attributes
    ----------
    layer : str
    study : str, the study run ('single' | 'topn' | 'concept' | 'random' | custom name)
    class_names : (C,) tuple of str
    set_studies : (S,) tuple of str, the ``study`` column of each set ('topn' and 'keep' in a
        top-N run; the run's study for the baseline)
    set_names : (S,) tuple of str ('baseline' for row 0)
    set_units : (S,) tuple of (k,) int64 arrays, sorted 0-based unit indices
    counts : ClassCounts with (S, C) arrays (see :mod:`dissect.ablation.metrics`)
    ranking : optional (C, U) int64, per class the units from most to least damaging
    damage : optional (C, U) float64, per class the single-unit drop of the ranking metric
    info : options of the run (rule, splits, seed, ...), saved as attributes
    h5_path, csv_path, importance_path : where :func:`~dissect.ablation.run_ablation` saved it
    """

    layer: str
    study: str
    class_names: tuple[str, ...]
    set_studies: tuple[str, ...]
    set_names: tuple[str, ...]
    set_units: tuple[np.ndarray, ...]
    counts: ClassCounts
    ranking: np.ndarray | None = None
    damage: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    h5_path: Path | None = field(default=None, compare=False)
    csv_path: Path | None = field(default=None, compare=False)
    importance_path: Path | None = field(default=None, compare=False)

    @property
    def metrics(self) -> dict[str, np.ndarray]:
        """``n`` (C,) int64 and each metric of :data:`METRIC_NAMES` as (S, C) float64."""
        return metrics_from_counts(self.counts)

    @property
    def n(self) -> np.ndarray:
        """(C,) int64, evaluated images per class."""
        return self.counts.n_true.copy()

    def class_index(self, name: str) -> int:
        """Index of class ``name``; OptionError naming close class names when unknown."""
        return class_index(self.class_names, name)

    def rows_of(self, study: str) -> np.ndarray:
        """Indices of the sets whose ``study`` column is ``study`` (baseline excluded)."""
        return np.array([i for i, s in enumerate(self.set_studies)
                         if s == study and self.set_names[i] != BASELINE], dtype=np.int64)

    def table(self, empty_classes: bool = False) -> list[dict[str, Any]]:
        """The ``ablation.csv`` rows: one dict per (set, class), columns :data:`CSV_COLUMNS`.

        Only classes with evaluated images (``n > 0``) get rows unless ``empty_classes``: a
        1000-class model with ``--classes predicted`` otherwise writes hundreds of thousands of
        rows of undefined metrics. ``ablation.h5`` keeps the full (S, C) arrays.
        """
        metrics = self.metrics
        kept = [c for c in range(len(self.class_names))
                if empty_classes or int(metrics["n"][c]) > 0]
        rows = []
        for s, (study, name, units) in enumerate(zip(self.set_studies, self.set_names,
                                                     self.set_units)):
            unit_text = ";".join(str(int(u)) for u in units)
            for c in kept:
                class_name = self.class_names[c]
                row: dict[str, Any] = {"study": study, "set": name, "units": unit_text,
                                       "class": class_name, "n": int(metrics["n"][c])}
                for metric in METRIC_NAMES:
                    row[metric] = float(metrics[metric][s, c])
                rows.append(row)
        return rows

    def random_summary(self) -> RandomSummary:
        """Mean and spread over repeats of the 'random' sets, grouped by set size."""
        rows = self.rows_of("random")
        lengths = np.array([len(self.set_units[r]) for r in rows], dtype=np.int64)
        sizes = np.unique(lengths)
        groups = [rows[lengths == size] for size in sizes]
        metrics = self.metrics
        shape = (len(groups), len(self.class_names))
        statistics = {"mean": np.mean, "std": np.std, "min": np.min, "max": np.max}
        out = {stat: {metric: np.array([function(metrics[metric][group], axis=0)
                                        for group in groups], dtype=np.float64).reshape(shape)
                      for metric in METRIC_NAMES}
               for stat, function in statistics.items()}
        repeats = np.array([len(group) for group in groups], dtype=np.int64)
        return RandomSummary(sizes, repeats, **out)

    def save(self, layer_dir: str | Path) -> tuple[Path, Path]:
        """Write this run's group into ``ablation.h5`` (replacing a group of the same study) and
        rewrite ``ablation.csv`` from every group. Returns (h5 path, csv path)."""
        layer_dir = Path(layer_dir)
        layer_dir.mkdir(parents=True, exist_ok=True)
        h5_path = layer_dir / ABLATION_H5
        partial = layer_dir / (ABLATION_H5 + ".partial")
        existing = load_ablation(layer_dir) if h5_path.exists() else {}
        existing[self.study] = self
        ordered = sorted(existing.values(), key=_study_key)
        with h5py.File(partial, "w") as handle:
            handle.attrs["schema_version"] = 1
            handle.attrs["layer"] = self.layer
            for result in ordered:
                _write_group(handle.create_group(result.study), result)
        os.replace(partial, h5_path)
        csv_path = layer_dir / ABLATION_CSV
        write_ablation_csv([row for result in ordered for row in result.table()], csv_path)
        return h5_path, csv_path


def _study_key(result: AblationResult) -> tuple[int, str]:
    order = STUDY_ORDER.index(result.study) if result.study in STUDY_ORDER else len(STUDY_ORDER)
    return order, result.study


def class_index(class_names: Sequence[str], name: str) -> int:
    """Index of ``name`` in ``class_names``; OptionError naming close names when unknown."""
    names = list(class_names)
    if name in names:
        return names.index(name)
    close = difflib.get_close_matches(str(name), names, n=5)
    hint = f"close names: {', '.join(close)}" if close else \
        f"classes: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}"
    raise OptionError(f"option classes: unknown class {name!r}; {hint}")


def _strings(values: Sequence[str]) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


def _write_group(group: h5py.Group, result: AblationResult) -> None:
    string = h5py.string_dtype()
    group.attrs["layer"] = result.layer
    group.attrs["study"] = result.study
    group.attrs["n_total"] = int(result.counts.n_total)
    for key, value in result.info.items():
        group.attrs[key] = value if value is not None else ""
    group.create_dataset("class_names", data=_strings(result.class_names), dtype=string)
    group.create_dataset("set_studies", data=_strings(result.set_studies), dtype=string)
    group.create_dataset("set_names", data=_strings(result.set_names), dtype=string)
    lengths = np.array([len(u) for u in result.set_units], dtype=np.int64)
    group.create_dataset("units_offsets", data=np.concatenate([[0], np.cumsum(lengths)]))
    flat = np.concatenate([np.asarray(u, np.int64) for u in result.set_units]) \
        if result.set_units else np.zeros(0, np.int64)
    group.create_dataset("units", data=flat.astype(np.int64))
    group.create_dataset("n", data=result.counts.n_true)
    group.create_dataset("true_positive", data=result.counts.true_positive)
    group.create_dataset("predicted", data=result.counts.predicted)
    group.create_dataset("prob_sum", data=result.counts.prob_sum)
    metrics = result.metrics
    for metric in METRIC_NAMES:
        group.create_dataset(metric, data=metrics[metric])
    if result.ranking is not None:
        group.create_dataset("ranking", data=np.asarray(result.ranking, np.int64))
    if result.damage is not None:
        group.create_dataset("damage", data=np.asarray(result.damage, np.float64))
    if len(result.rows_of("random")):
        summary = result.random_summary()
        group.create_dataset("random_sizes", data=summary.sizes)
        group.create_dataset("random_repeats", data=summary.repeats)
        for stat in ("mean", "std", "min", "max"):
            for metric, values in getattr(summary, stat).items():
                group.create_dataset(f"random_{metric}_{stat}", data=values)


def _read_strings(dataset: h5py.Dataset) -> tuple[str, ...]:
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in dataset[()])


def _read_group(group: h5py.Group) -> AblationResult:
    offsets = group["units_offsets"][()]
    flat = group["units"][()]
    units = tuple(flat[offsets[i]:offsets[i + 1]].astype(np.int64)
                  for i in range(len(offsets) - 1))
    counts = ClassCounts(group["true_positive"][()], group["predicted"][()],
                         group["prob_sum"][()], group["n"][()], int(group.attrs["n_total"]))
    skip = {"layer", "study", "n_total"}
    info = {key: (value.item() if isinstance(value, np.generic) else value)
            for key, value in group.attrs.items() if key not in skip}
    return AblationResult(
        layer=str(group.attrs["layer"]), study=str(group.attrs["study"]),
        class_names=_read_strings(group["class_names"]),
        set_studies=_read_strings(group["set_studies"]),
        set_names=_read_strings(group["set_names"]), set_units=units, counts=counts,
        ranking=group["ranking"][()] if "ranking" in group else None,
        damage=group["damage"][()] if "damage" in group else None, info=info)


def load_ablation(layer_dir: str | Path) -> dict[str, AblationResult]:
    """Every study run saved in ``layer_dir/ablation.h5``, by study name.

    Raises CacheError when the file is missing or unreadable.
    """
    path = Path(layer_dir) / ABLATION_H5
    if not path.is_file():
        raise CacheError(f"{path}: no ablation results; run `dissect ablate` first")
    try:
        with h5py.File(path, "r") as handle:
            return {name: _read_group(handle[name]) for name in handle}
    except (OSError, KeyError) as error:
        raise CacheError(f"{path}: cannot read the ablation results ({error})") from error


def write_ablation_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write ``ablation.csv`` rows (columns :data:`CSV_COLUMNS`) atomically."""
    return _write_csv(rows, CSV_COLUMNS, Path(path))


def _write_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: Path) -> Path:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, path)
    return path


def rank_units(single: AblationResult, rank_by: str = "recall") -> tuple[np.ndarray, np.ndarray]:
    """Per class, units ordered by the damage of ablating each alone.

    The damage of unit u for class c is ``baseline[c] - metric[unit u, c]`` for ``rank_by`` (one of
    :data:`METRIC_NAMES`; default ``recall``, the PNAS paper's class accuracy: the fraction of the
    class's images classified as the class). Ties (frequent on small splits) are broken by the drop
    in true-class probability, then by the lower unit index.

    Parameters
    ----------
    single : an AblationResult holding one single-unit set per unit (a 'single' study)

    Returns
    -------
    ranking (C, U) int64 (most damaging first) and damage (C, U) float64 (NaN for a class with no
    image).
    """
    if rank_by not in METRIC_NAMES:
        raise OptionError(f"option rank_by: unknown metric {rank_by!r}; allowed: "
                          f"{', '.join(METRIC_NAMES)}")
    row_of = {int(units[0]): s for s, units in enumerate(single.set_units)
              if len(units) == 1 and single.set_names[s] != BASELINE}
    n_units = max(row_of) + 1 if row_of else 0
    if sorted(row_of) != list(range(n_units)) or n_units == 0:
        raise OptionError("rank_units needs a single-unit sweep over every unit "
                          "(AblationStudy.single)")
    rows = np.array([row_of[u] for u in range(n_units)], dtype=np.int64)
    metrics = single.metrics
    damage = (metrics[rank_by][0][None, :] - metrics[rank_by][rows]).T        # (C, U)
    prob_drop = (metrics["true_class_prob"][0][None, :]
                 - metrics["true_class_prob"][rows]).T                        # (C, U)
    units = np.arange(n_units)
    ranking = np.zeros(damage.shape, dtype=np.int64)
    for c in range(damage.shape[0]):
        primary = np.nan_to_num(damage[c], nan=-np.inf)
        secondary = np.nan_to_num(prob_drop[c], nan=-np.inf)
        ranking[c] = np.lexsort((units, -secondary, -primary))
    return ranking, damage


def importance_table(ranking: np.ndarray, class_names: Sequence[str], *,
                     damage: np.ndarray | None = None, dissection: Any = None,
                     top: int = 4) -> list[dict[str, Any]]:
    """Importance versus interpretability, one row per unit.

    Parameters
    ----------
    ranking : (C, U) int64, per class the units from most to least damaging (:func:`rank_units`)
    class_names : (C,) names
    damage : optional (C, U); classes whose damage row is all NaN (no image) are not counted
    dissection : optional DissectionResult (``unit_label``, ``unit_iou``, ``unit_category``,
        ``label_names``) giving each unit's best label and IoU
    top : a unit is important for class c when it is among the ``top`` most damaging units of c

    Returns
    -------
    Rows (dicts with :data:`IMPORTANCE_COLUMNS`): ``unit`` (0-based), ``n_classes`` (number of
    classes for which the unit is in the top ``top``), ``classes`` (their names, ``;``-separated),
    ``label``, ``category``, ``iou`` (empty without a dissection); sorted by ``n_classes``
    descending, then IoU descending, then unit.
    """
    ranking = np.asarray(ranking, dtype=np.int64)
    n_classes, n_units = ranking.shape
    if top < 1:
        raise OptionError(f"option top: {top} must be >= 1")
    valid = np.ones(n_classes, dtype=bool) if damage is None else \
        ~np.all(np.isnan(np.asarray(damage, dtype=np.float64)), axis=1)
    important: list[list[str]] = [[] for _ in range(n_units)]
    for c in np.flatnonzero(valid):
        for unit in ranking[c, :top]:
            important[int(unit)].append(str(class_names[c]))
    rows = []
    for unit in range(n_units):
        row: dict[str, Any] = {"unit": unit, "n_classes": len(important[unit]),
                               "classes": ";".join(important[unit]), "label": "",
                               "category": "", "iou": ""}
        if dissection is not None and unit < len(dissection.unit_label):
            row["label"] = str(dissection.label_names[int(dissection.unit_label[unit])])
            row["category"] = str(dissection.unit_category[unit])
            row["iou"] = float(dissection.unit_iou[unit])
        rows.append(row)
    rows.sort(key=lambda r: (-r["n_classes"], -(r["iou"] if r["iou"] != "" else -1.0), r["unit"]))
    return rows


def write_importance_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write ``importance.csv`` rows (columns :data:`IMPORTANCE_COLUMNS`) atomically."""
    return _write_csv(rows, IMPORTANCE_COLUMNS, Path(path))
