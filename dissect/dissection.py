"""One layer's dissection result: its arrays, ``tally.csv``, ``dissection.h5`` (DESIGN.md §3).

Reading a saved result (:func:`load_dissection`) needs only h5py and NumPy; computing one from
counts (:meth:`DissectionResult.from_counts`) imports the array functions of
:mod:`dissect.stats` when called.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from dissect.errors import CacheError
from dissect.rundir import DISSECTION_FILE, TALLY_FILE

if TYPE_CHECKING:
    from dissect.stats import IoUCounts

__all__ = [
    "DISSECTION_FILE",
    "TALLY_FILE",
    "DissectionResult",
    "TallyTable",
    "DetectorSummary",
    "load_dissection",
    "summarize_detectors",
    "tally_columns",
    "format_detectors",
]

SCHEMA_VERSION = 1
_ARRAYS = ("thresholds", "label_area", "intersection", "act_area", "iou", "cat_label", "cat_iou",
           "unit_label", "unit_iou", "primary")


def tally_columns(categories: Sequence[str]) -> list[str]:
    """tally.csv columns: unit, category, label, score, then 5 per category (NetDissect-Lite)."""
    columns = ["unit", "category", "label", "score"]
    for category in categories:
        columns += [f"{category}-label", f"{category}-truth", f"{category}-activation",
                    f"{category}-intersect", f"{category}-iou"]
    return columns


class TallyTable(list):
    """tally.csv's rows (dicts, ``unit`` 1-based as in NetDissect-Lite); prints compactly:
    unit, category, label and score of the first rows."""

    shown = 10

    def __repr__(self) -> str:
        lines = [f"{'unit':>5}  {'category':<10} {'label':<24} {'score':>7}"]
        lines += [f"{row['unit']:>5}  {row['category']:<10} {str(row['label'])[:24]:<24} "
                  f"{row['score']:>7.4f}" for row in self[:self.shown]]
        if len(self) > self.shown:
            lines.append(f"... {len(self) - self.shown} more rows (tally.csv unit numbers are "
                         f"1-based)")
        return "\n".join(lines)

    __str__ = __repr__


@dataclass(eq=False)
class DissectionResult:
    """Everything Network Dissection computed for one layer.

    Attributes
    ----------
    layer:
        Dotted layer name.
    categories:
        The C categories (columns), category.csv order.
    thresholds:
        float64 (U,) activation thresholds.
    label_area, intersection, act_area:
        int64 (L,), (U, L), (U, C): the summed IoU counts (DESIGN.md §3 step 3).
    iou:
        float64 (U, L).
    cat_label, cat_iou:
        int64 / float64 (U, C): best label per unit and category (label 0 = none).
    unit_label, unit_iou:
        int64 / float64 (U,): the unit's label (best over categories) and its IoU.
    unit_category:
        (U,) str: category of the unit's label (ties: the later category, as NetDissect-Lite).
    iou_threshold:
        A unit detects its concept when ``unit_iou >= iou_threshold``.
    label_names:
        (L,) names by label number ('' for numbers label.csv does not list, as in
        NetDissect-Lite's tally.csv).
    primary:
        int64 (L,) index into ``categories`` of each label's primary category, -1 for none.
    quantile:
        q of the thresholds, or None when thresholds were given.
    union:
        The union rule: 'touched', 'annotated' or 'all'.
    """

    layer: str
    categories: tuple[str, ...]
    thresholds: np.ndarray
    label_area: np.ndarray
    intersection: np.ndarray
    act_area: np.ndarray
    iou: np.ndarray
    cat_label: np.ndarray
    cat_iou: np.ndarray
    unit_label: np.ndarray
    unit_iou: np.ndarray
    unit_category: np.ndarray
    iou_threshold: float
    label_names: list[str]
    primary: np.ndarray
    quantile: float | None = None
    union: str = "touched"
    attrs: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_counts(cls, layer: str, categories: Sequence[str], thresholds: np.ndarray,
                    counts: IoUCounts, label_names: Sequence[str], primary: np.ndarray, *,
                    iou_threshold: float = 0.04, quantile: float | None = None,
                    union: str = "touched") -> DissectionResult:
        """IoU and labels (DESIGN.md §3 steps 4-5) from summed counts."""
        categories = tuple(categories)
        primary = np.asarray(primary, dtype=np.int64)
        from dissect.stats import best_category, best_labels, iou_from_counts

        iou = iou_from_counts(counts, primary)
        cat_label, cat_iou, unit_label, unit_iou = best_labels(iou, primary, len(categories))
        best = best_category(cat_iou) if categories else np.zeros(0, np.int64)
        unit_category = np.array([categories[c] for c in best], dtype=object)
        return cls(layer, categories, np.asarray(thresholds, dtype=np.float64),
                   counts.label_area, counts.intersection, counts.act_area, iou, cat_label,
                   cat_iou, unit_label, unit_iou, unit_category, float(iou_threshold),
                   list(label_names), primary, quantile, union)

    @property
    def n_units(self) -> int:
        """U."""
        return len(self.thresholds)

    @property
    def counts(self) -> IoUCounts:
        """The summed counts as an IoUCounts."""
        from dissect.stats import IoUCounts

        return IoUCounts(self.label_area, self.intersection, self.act_area)

    def columns(self) -> list[str]:
        """Column names of :meth:`table` (see :func:`tally_columns`)."""
        return tally_columns(self.categories)

    def table(self) -> TallyTable:
        """The rows of tally.csv, NetDissect-Lite's format (a list of dicts, so
        ``pandas.DataFrame(result.table())`` works; printed, it shows a compact view).

        One row per unit, sorted by descending score (ties: the higher unit first, as
        NetDissect-Lite's ``argsort()[::-1]``; see :func:`dissect.stats.unit_order`): ``unit``
        (1-based), ``category`` and ``label`` (name) of the unit's label, ``score`` (its IoU),
        then per category ``<cat>-label`` (best label name in the category; label 0's name,
        '' unless label.csv lists 0, for none),
        ``<cat>-truth`` (its label_area), ``<cat>-activation`` (act_area[u, cat]; for label 0,
        the last category's, as NetDissect-Lite),
        ``<cat>-intersect`` (intersection[u, label]) and ``<cat>-iou``. Ints and floats are
        Python numbers.
        """
        from dissect.stats import unit_order

        order = unit_order(self.unit_iou)
        rows = []
        for u in order.tolist():
            row: dict[str, Any] = {
                "unit": u + 1,
                "category": str(self.unit_category[u]),
                "label": self.label_names[int(self.unit_label[u])],
                "score": float(self.unit_iou[u]),
            }
            for c, category in enumerate(self.categories):
                label = int(self.cat_label[u, c])
                row[f"{category}-label"] = self.label_names[label]
                row[f"{category}-truth"] = int(self.label_area[label])
                # NetDissect-Lite reads this through the label's primary category; label 0
                # (no label in the category) has the last category there (coverage ties).
                activation_category = c if label else len(self.categories) - 1
                row[f"{category}-activation"] = int(self.act_area[u, activation_category])
                row[f"{category}-intersect"] = int(self.intersection[u, label])
                row[f"{category}-iou"] = float(self.cat_iou[u, c])
            rows.append(row)
        return TallyTable(rows)

    def __repr__(self) -> str:
        detected = int((self.unit_iou >= self.iou_threshold).sum())
        return (f"<DissectionResult {self.layer}: {self.n_units} units, {len(self.label_names)} "
                f"labels, {detected} detectors (IoU >= {self.iou_threshold}); .table() for "
                f"tally.csv's rows>")

    def detectors(self, iou_threshold: float | None = None) -> list[DetectorSummary]:
        """:func:`summarize_detectors` of this result."""
        return summarize_detectors(self, iou_threshold)

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``<out_dir>/dissection.h5`` and ``<out_dir>/tally.csv``; returns ``out_dir``.

        Each file is written under a temporary name and renamed into place when complete.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        h5_path = out / DISSECTION_FILE
        partial = out / (DISSECTION_FILE + ".partial")
        strings = h5py.string_dtype("utf-8")
        with h5py.File(partial, "w") as file:
            for name in _ARRAYS:
                file.create_dataset(name, data=getattr(self, name))
            file.create_dataset("unit_category", data=[str(c) for c in self.unit_category],
                                dtype=strings)
            file.create_dataset("label_names", data=list(self.label_names), dtype=strings)
            file.attrs["schema_version"] = SCHEMA_VERSION
            file.attrs["layer"] = self.layer
            file.attrs["categories"] = np.array(self.categories, dtype=object) \
                if self.categories else np.zeros(0, dtype=strings)
            file.attrs["quantile"] = float("nan") if self.quantile is None else self.quantile
            file.attrs["threshold_source"] = "given" if self.quantile is None else "quantile"
            file.attrs["union"] = self.union
            file.attrs["iou_threshold"] = self.iou_threshold
        os.replace(partial, h5_path)
        csv_path = out / TALLY_FILE
        partial = out / (TALLY_FILE + ".partial")
        with open(partial, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns())
            writer.writeheader()
            writer.writerows(self.table())
        os.replace(partial, csv_path)
        return out


@dataclass(frozen=True)
class DetectorSummary:
    """Detectors of one category (units whose label is in it with unit_iou >= the threshold).

    Attributes
    ----------
    category:
        Category name.
    n_units:
        Number of detector units.
    concepts:
        ``(label name, (unit, ...))`` per unique concept, most units first (ties: label number);
        units 0-based, ascending. ``len(concepts)`` is the number of unique detectors.
    """

    category: str
    n_units: int
    concepts: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def n_concepts(self) -> int:
        """Number of unique concepts detected in the category."""
        return len(self.concepts)


def summarize_detectors(result: DissectionResult, iou_threshold: float | None = None
                        ) -> list[DetectorSummary]:
    """Unit counts and unique concepts per category, in category order.

    Parameters
    ----------
    result:
        A layer's dissection.
    iou_threshold:
        Default ``result.iou_threshold``; a unit is a detector when ``unit_iou >= iou_threshold``
        and it has a label.
    """
    cut = result.iou_threshold if iou_threshold is None else float(iou_threshold)
    detector = (result.unit_iou >= cut) & (result.unit_label > 0)
    summaries = []
    for category in result.categories:
        units = np.flatnonzero(detector & (result.unit_category == category))
        by_label: dict[int, list[int]] = {}
        for u in units.tolist():
            by_label.setdefault(int(result.unit_label[u]), []).append(u)
        ordered = sorted(by_label.items(), key=lambda item: (-len(item[1]), item[0]))
        summaries.append(DetectorSummary(
            category, int(len(units)),
            tuple((result.label_names[label], tuple(members)) for label, members in ordered)))
    return summaries


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_dissection(layer_dir: str | os.PathLike[str]) -> DissectionResult:
    """Read ``<layer_dir>/dissection.h5`` back into a DissectionResult.

    Raises
    ------
    CacheError
        When the file is missing or unreadable (the message says to run ``dissect tally``).
    """
    path = Path(layer_dir) / DISSECTION_FILE
    if not path.is_file():
        raise CacheError(f"{path} does not exist; run `dissect tally` for this layer first")
    try:
        with h5py.File(path, "r") as file:
            arrays = {name: file[name][()] for name in _ARRAYS}
            unit_category = np.array([_text(v) for v in file["unit_category"][()]], dtype=object)
            label_names = [_text(v) for v in file["label_names"][()]]
            attrs = {key: file.attrs[key] for key in file.attrs}
    except (OSError, KeyError) as error:
        raise CacheError(f"cannot read {path}: {error}; run `dissect tally` again") from None
    quantile = float(attrs["quantile"])
    return DissectionResult(
        layer=_text(attrs["layer"]),
        categories=tuple(_text(c) for c in attrs["categories"]),
        thresholds=arrays["thresholds"], label_area=arrays["label_area"],
        intersection=arrays["intersection"], act_area=arrays["act_area"], iou=arrays["iou"],
        cat_label=arrays["cat_label"], cat_iou=arrays["cat_iou"],
        unit_label=arrays["unit_label"], unit_iou=arrays["unit_iou"],
        unit_category=unit_category, iou_threshold=float(attrs["iou_threshold"]),
        label_names=label_names, primary=arrays["primary"],
        quantile=None if math.isnan(quantile) else quantile, union=_text(attrs["union"]),
        attrs={key: (_text(v) if isinstance(v, (bytes, str)) else v)
               for key, v in attrs.items()})


def format_detectors(result: DissectionResult) -> str:
    """One line: detector units and unique concepts of a layer, with units per category."""
    summary = summarize_detectors(result)
    per_category = ", ".join(f"{s.category} {s.n_units}" for s in summary if s.n_units)
    units = sum(s.n_units for s in summary)
    concepts = sum(s.n_concepts for s in summary)
    source = "given thresholds" if result.quantile is None else f"quantile {result.quantile}"
    return (f"{result.layer}: {units}/{result.n_units} units detect a concept "
            f"(IoU >= {result.iou_threshold}; {source}, union {result.union}), {concepts} unique "
            f"concepts"
            f"{f' ({per_category})' if per_category else ''}")
