"""The report's view of a layer's later results: the ablation study (``ablation.csv``),
``importance.csv``, ``compositional.csv`` and ``significance.csv`` / ``significance.h5``.

Every function here is pure over rows or arrays except the ``read_*`` readers, which read one file
each and raise :class:`~dissect.errors.CacheError` naming the file, the row and what was expected.
Units are 0-based everywhere (as in every file but ``tally.csv``).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dissect.errors import CacheError, OptionError
from dissect.rundir import ABLATION_CSV

#: Classes listed per concept ablation (the most hurt first).
N_CONCEPT_CLASSES = 3
#: The set size the index headline prefers (the PNAS paper's top-4).
HEADLINE_SIZE = 4
#: Bins of the per-unit null histograms.
NULL_BINS = 12
#: Bin width of the layer's pooled observed-versus-null histogram.
POOLED_BIN_WIDTH = 0.01

IMPORTANCE_COLUMNS = ("unit", "n_classes", "classes")
COMPOSITIONAL_COLUMNS = ("unit", "formula", "iou", "label", "label_iou")
SIGNIFICANCE_COLUMNS = ("unit", "label", "iou", "perm_p", "q", "significant")
#: Floats of a significance.csv row carried into the data model (empty cell -> None).
SIGNIFICANCE_FLOATS = ("iou", "iou0", "fisher_or", "fisher_p", "perm_p", "null_mean", "null_sd",
                       "z", "q", "ci_low", "ci_high")

_TOP_SET = re.compile(r"^(.*):(top|keep)(\d+)$")


def _round(value: float) -> float:
    from dissect.report.data import round_float

    return round_float(value)


def _float_cell(text: str | None, path: Path, line: int, column: str) -> float | None:
    """A float cell; None for an empty cell; CacheError naming the row for anything else."""
    text = (text or "").strip()
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise CacheError(f"{path}: row {line}: column {column!r} holds {text!r}; expected a "
                         "number") from None
    return value


def _unit_cell(text: str | None, n_units: int, path: Path, line: int) -> int:
    try:
        unit = int((text or "").strip())
    except ValueError:
        raise CacheError(f"{path}: row {line}: column 'unit' holds {text!r}; expected a 0-based "
                         "unit index") from None
    if not 0 <= unit < n_units:
        raise CacheError(f"{path}: row {line}: unit {unit} is out of range; the layer has "
                         f"{n_units} units (0-based)")
    return unit


def read_csv_rows(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts of strings; CacheError naming the missing columns."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise CacheError(f"{path}: missing column(s) {', '.join(missing)}; expected "
                                 f"at least {','.join(required)}")
            return [dict(row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise CacheError(f"{path}: cannot read ({error})") from None


# --------------------------------------------------------------------------------------------
# ablation.csv as records


@dataclass(frozen=True)
class AblationRecord:
    """One row of ablation.csv: ``units`` sorted 0-based indices, ``value`` the chosen metric
    (NaN when empty), ``prob`` the true-class probability (NaN when empty), ``line`` its row."""

    study: str
    set: str
    units: tuple[int, ...]
    cls: str
    n: int
    value: float
    prob: float
    line: int


def ablation_records(rows: Sequence[dict[str, str]], n_units: int, metric: str,
                     path: Path = Path(ABLATION_CSV)) -> list[AblationRecord]:
    """Parse ablation.csv rows (DESIGN §6) for one metric.

    Parameters
    ----------
    rows : dicts from :func:`dissect.report.data.read_ablation_csv`
    n_units : U (unit indices must be in 0 .. U - 1)
    metric : accuracy | balanced_accuracy | precision | recall | true_class_prob

    Raises
    ------
    CacheError naming the file and row of a bad number or unit; OptionError for a bad metric.
    """
    from dissect.report.data import ABLATION_METRICS

    if metric not in ABLATION_METRICS:
        raise OptionError(f"ablation metric {metric!r} is not one of {', '.join(ABLATION_METRICS)}")
    out = []
    for line, row in enumerate(rows, start=2):
        text = row.get("units") or ""
        try:
            units = tuple(sorted(map(int, text.split(";")))) if text.strip() else ()
        except ValueError:
            try:   # tolerate empty tokens ("1;;2", a trailing ';')
                units = tuple(sorted(int(t) for t in text.split(";") if t.strip() != ""))
            except ValueError:
                raise CacheError(f"{path}: row {line}: column 'units' holds {text!r}; expected "
                                 "0-based unit indices separated by ';'") from None
        if units and (units[0] < 0 or units[-1] >= n_units):
            bad = units[0] if units[0] < 0 else units[-1]
            raise CacheError(f"{path}: row {line}: unit {bad} is out of range; the layer has "
                             f"{n_units} units")
        value = _float_cell(row.get(metric), path, line, metric)
        prob = _float_cell(row.get("true_class_prob"), path, line, "true_class_prob")
        n = _float_cell(row.get("n"), path, line, "n")
        out.append(AblationRecord(
            study=str(row.get("study", "")), set=str(row.get("set", "")), units=units,
            cls=str(row.get("class", "")), n=int(n or 0),
            value=math.nan if value is None else value,
            prob=math.nan if prob is None else prob, line=line))
    return out


def _baselines(records: Sequence[AblationRecord]) -> dict[tuple[str, str], AblationRecord]:
    """(study, class) -> the baseline record of that study run."""
    return {(r.study, r.cls): r for r in records if r.set == "baseline"}


def _class_order(records: Sequence[AblationRecord]) -> dict[str, int]:
    order: dict[str, int] = {}
    for r in records:
        order.setdefault(r.cls, len(order))
    return order


def ablation_curves(records: Sequence[AblationRecord]) -> list[dict[str, Any]]:
    """Per class, the metric against the number of units N of the top-N, keep and random sets.

    ``topn`` rows of set ``<class>:top<N>`` (the class's N most damaging units removed) and ``keep``
    rows of set ``<class>:keep<N>`` (only those N kept) count for their own class; ``random`` rows
    (set size N = number of units) count for every class. The N = 0 point of the removed and random
    series is the baseline of that study run.

    Returns
    -------
    ``[{"class", "n", "removed": [{"n", "value"}], "kept": [{"n", "value"}], "random": [{"n",
    "mean", "sd", "min", "max", "repeats"}]}, ...]`` in class order of the file; ``sd`` is the
    population standard deviation over the repeats. Classes come from the top-N study when it
    exists (its target classes), else from the random study. Values are rounded (data model).
    """
    base = _baselines(records)
    removed: dict[str, dict[int, float]] = {}
    kept: dict[str, dict[int, float]] = {}
    random: dict[str, dict[int, list[float]]] = {}
    for r in records:
        if r.set == "baseline" or math.isnan(r.value):
            continue
        if r.study in ("topn", "keep"):
            match = _TOP_SET.match(r.set)
            if match is None or match.group(1) != r.cls:
                continue
            kind, size = match.group(2), int(match.group(3))
            (removed if kind == "top" else kept).setdefault(r.cls, {})[size] = r.value
        elif r.study == "random":
            random.setdefault(r.cls, {}).setdefault(len(r.units), []).append(r.value)
    targets = set(removed) | set(kept)
    order = _class_order(records)
    classes = sorted(targets if targets else set(random), key=lambda c: order[c])
    curves = []
    for cls in classes:
        top_base = base.get(("topn", cls))
        rand_base = base.get(("random", cls))
        n = (top_base or rand_base).n if (top_base or rand_base) else 0
        series_removed = []
        if cls in removed:
            if top_base is not None and not math.isnan(top_base.value):
                series_removed.append({"n": 0, "value": _round(top_base.value)})
            series_removed += [{"n": k, "value": _round(v)}
                               for k, v in sorted(removed[cls].items())]
        series_random = []
        if cls in random:
            if rand_base is not None and not math.isnan(rand_base.value):
                b = _round(rand_base.value)
                series_random.append({"n": 0, "mean": b, "sd": 0.0, "min": b, "max": b,
                                      "repeats": 0})
            for k, values in sorted(random[cls].items()):
                v = np.asarray(values, dtype=np.float64)
                series_random.append({"n": k, "mean": _round(v.mean()), "sd": _round(v.std()),
                                      "min": _round(v.min()), "max": _round(v.max()),
                                      "repeats": int(v.size)})
        curves.append({
            "class": cls, "n": int(n), "removed": series_removed,
            "kept": [{"n": k, "value": _round(v)} for k, v in sorted(kept.get(cls, {}).items())],
            "random": series_random,
        })
    return curves


def mean_curve(curves: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The curves averaged over classes: at each N the mean over the classes that have a point
    there (``random`` band: the mean of the classes' min and max; ``sd`` the mean of their sd).
    ``None`` for no curves. ``class`` is ``"mean over K classes"``, ``n`` the total images."""
    if not curves:
        return None

    def average(series: str, keys: Sequence[str]) -> list[dict[str, Any]]:
        at: dict[int, list[dict[str, Any]]] = {}
        for c in curves:
            for p in c[series]:
                at.setdefault(p["n"], []).append(p)
        out = []
        for k in sorted(at):
            point: dict[str, Any] = {"n": k}
            for key in keys:
                point[key] = _round(float(np.mean([p[key] for p in at[k]])))
            if series == "random":
                point["repeats"] = min(p["repeats"] for p in at[k])
            out.append(point)
        return out

    return {"class": f"mean over {len(curves)} classes", "n": sum(c["n"] for c in curves),
            "removed": average("removed", ["value"]), "kept": average("kept", ["value"]),
            "random": average("random", ["mean", "sd", "min", "max"])}


def ablation_headline(curves: Sequence[dict[str, Any]],
                      prefer: int = HEADLINE_SIZE) -> dict[str, Any] | None:
    """The index page's sentence: removing each class's top-N units costs X on average, against Y
    for N random units.

    N is ``prefer`` when both the removed and the random series have it for some class, else the
    common size closest to it (the smaller on a tie). Over the classes with both points at N:
    ``topn_drop`` = mean(removed[0] - removed[N]), ``random_drop`` = mean(random[0].mean -
    random[N].mean) (each against its own study's baseline).

    Returns
    -------
    ``{"n", "classes", "topn_drop", "random_drop"}`` or None when no class has both series.
    """
    per_size: dict[int, list[tuple[float, float]]] = {}
    for c in curves:
        removed = {p["n"]: p["value"] for p in c["removed"]}
        random = {p["n"]: p["mean"] for p in c["random"]}
        if 0 not in removed or 0 not in random:
            continue
        for k in set(removed) & set(random) - {0}:
            per_size.setdefault(k, []).append((removed[0] - removed[k], random[0] - random[k]))
    if not per_size:
        return None
    size = min(per_size, key=lambda k: (abs(k - prefer), k))
    drops = np.asarray(per_size[size], dtype=np.float64)
    return {"n": int(size), "classes": int(drops.shape[0]),
            "topn_drop": _round(drops[:, 0].mean()), "random_drop": _round(drops[:, 1].mean())}


def concept_ablations(records: Sequence[AblationRecord],
                      n: int = N_CONCEPT_CLASSES) -> list[dict[str, Any]]:
    """The concept study: for each concept set, its units and the classes it hurts most.

    Returns
    -------
    ``[{"concept", "units": [int], "hurt": [{"class", "n", "baseline", "ablated", "drop"}],
    "n_hurt", "mean_drop"}, ...]`` in file order; ``hurt`` holds at most ``n`` classes with
    ``drop = baseline - ablated > 0`` by descending drop, ties by class order in the file;
    ``n_hurt`` counts every class with a positive drop and ``mean_drop`` is the mean drop over the
    classes with both values (the concept study's own baseline).
    """
    base = _baselines(records)
    order = _class_order(records)
    sets: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.study != "concept" or r.set == "baseline":
            continue
        entry = sets.setdefault(r.set, {"concept": r.set, "units": list(r.units), "drops": []})
        b = base.get(("concept", r.cls))
        if b is None or math.isnan(b.value) or math.isnan(r.value):
            continue
        entry["drops"].append((r.cls, r.n, b.value, r.value))
    out = []
    for entry in sets.values():
        drops = entry.pop("drops")
        hurt = [d for d in drops if _round(d[2] - d[3]) > 0]
        hurt.sort(key=lambda d: (-_round(d[2] - d[3]), order[d[0]]))
        entry["hurt"] = [{"class": c, "n": k, "baseline": _round(b), "ablated": _round(a),
                          "drop": _round(b - a)} for c, k, b, a in hurt[:n]]
        entry["n_hurt"] = len(hurt)
        entry["mean_drop"] = _round(float(np.mean([b - a for _, _, b, a in drops]))) \
            if drops else 0.0
        out.append(entry)
    return out


def single_drops(records: Sequence[AblationRecord]) -> dict[str, list[tuple[int, float]]]:
    """Per class, ``(unit, drop)`` for every unit the ``single`` study ablated alone: the drop of
    the metric against the study's baseline (rounded), in file order; units or baselines with
    an empty value are left out."""
    base = _baselines(records)
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.study != "single" or r.set == "baseline" or len(r.units) != 1:
            continue
        b = base.get(("single", r.cls))
        if b is None or math.isnan(b.value) or math.isnan(r.value):
            continue
        out.setdefault(r.cls, []).append((r.units[0], _round(b.value - r.value)))
    return out


def unit_damage(records: Sequence[AblationRecord], n_units: int) -> list[float | None]:
    """Per unit, the largest drop of the metric over classes when the unit alone is ablated
    (:func:`single_drops`); None for a unit the study did not ablate. A unit that hurts no
    class gets its largest (<= 0) change."""
    best: list[float | None] = [None] * n_units
    for drops in single_drops(records).values():
        for u, drop in drops:
            if best[u] is None or drop > best[u]:  # type: ignore[operator]
                best[u] = drop
    return best


def ablation_view(records: Sequence[AblationRecord], n_units: int, metric: str) -> dict[str, Any]:
    """The layer's ablation section of the data model.

    Returns
    -------
    ``{"metric", "studies": [names present, file order], "curves", "mean_curve", "headline",
    "concepts"}`` (see :func:`ablation_curves`, :func:`mean_curve`, :func:`ablation_headline`,
    :func:`concept_ablations`).
    """
    studies: list[str] = []
    for r in records:
        if r.study not in studies:
            studies.append(r.study)
    curves = ablation_curves(records)
    return {"metric": metric, "studies": studies, "curves": curves,
            "mean_curve": mean_curve(curves), "headline": ablation_headline(curves),
            "concepts": concept_ablations(records)}


def read_ablation_options(path: Path) -> dict[str, dict[str, str]]:
    """``ablation.json``: per study run its options (rule, splits, rank_by, sizes, seed, ...,
    and ``warning`` when the run issued one), values as text; CacheError for unreadable JSON."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CacheError(f"{path}: cannot read the ablation options ({error})") from None
    if not isinstance(data, dict):
        raise CacheError(f"{path}: expected an object of study name -> options")
    return {str(study): {str(k): "" if v is None else str(v) for k, v in sorted(opts.items())}
            for study, opts in sorted(data.items()) if isinstance(opts, dict)}


# --------------------------------------------------------------------------------------------
# importance.csv, compositional.csv, significance.csv / .h5


def read_importance(path: Path, n_units: int) -> list[list[str] | None]:
    """Per unit, the classes it is important for (``importance.csv``: ``classes`` ``;``-separated,
    ``n_classes`` their number); None for a unit without a row.

    Raises CacheError when ``n_classes`` disagrees with ``classes`` or a unit is out of range.
    """
    rows = read_csv_rows(path, IMPORTANCE_COLUMNS)
    out: list[list[str] | None] = [None] * n_units
    for line, row in enumerate(rows, start=2):
        u = _unit_cell(row.get("unit"), n_units, path, line)
        classes = [c for c in (row.get("classes") or "").split(";") if c != ""]
        count = _float_cell(row.get("n_classes"), path, line, "n_classes")
        if count is None or int(count) != len(classes):
            raise CacheError(f"{path}: row {line}: n_classes is {row.get('n_classes')!r} but "
                             f"{len(classes)} classes are listed; expected the same number")
        out[u] = classes
    return out


def read_compositional(path: Path, n_units: int) -> list[dict[str, Any] | None]:
    """Per unit, its formula from ``compositional.csv`` (DESIGN §10): ``{"formula", "iou",
    "label", "label_iou", "gain" (iou - label_iou), "leaves", "optimal"}``; None without a row."""
    rows = read_csv_rows(path, COMPOSITIONAL_COLUMNS)
    out: list[dict[str, Any] | None] = [None] * n_units
    for line, row in enumerate(rows, start=2):
        u = _unit_cell(row.get("unit"), n_units, path, line)
        iou = _float_cell(row.get("iou"), path, line, "iou")
        label_iou = _float_cell(row.get("label_iou"), path, line, "label_iou")
        if iou is None or label_iou is None:
            raise CacheError(f"{path}: row {line}: iou and label_iou must be numbers")
        leaves = _float_cell(row.get("leaves"), path, line, "leaves")
        out[u] = {"formula": str(row.get("formula") or ""), "iou": _round(iou),
                  "label": str(row.get("label") or ""), "label_iou": _round(label_iou),
                  "gain": _round(iou - label_iou),
                  "leaves": None if leaves is None else int(leaves),
                  "optimal": str(row.get("optimal") or "")}
    return out


def compositional_summary(formulas: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """``{"units", "mean_gain", "mean_iou"}`` over the units with a formula, None when none."""
    rows = [f for f in formulas if f is not None]
    if not rows:
        return None
    return {"units": len(rows), "mean_gain": _round(float(np.mean([f["gain"] for f in rows]))),
            "mean_iou": _round(float(np.mean([f["iou"] for f in rows])))}


_TRUE = {"yes", "true", "1", "y", "t"}
_FALSE = {"no", "false", "0", "n", "f"}


def parse_significant(text: str | None, path: Path, line: int) -> bool | None:
    """``significant`` cell: yes/true/1 -> True, no/false/0 -> False, empty -> None."""
    value = (text or "").strip().lower()
    if value == "":
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise CacheError(f"{path}: row {line}: column 'significant' holds {text!r}; expected yes or no")


def read_significance(path: Path, n_units: int) -> list[dict[str, Any] | None]:
    """Per unit, its row of ``significance.csv`` (DESIGN §12): ``{"significant": bool | None,
    "label", <each of SIGNIFICANCE_FLOATS>: float | None}``; None for a unit without a row."""
    rows = read_csv_rows(path, SIGNIFICANCE_COLUMNS)
    out: list[dict[str, Any] | None] = [None] * n_units
    for line, row in enumerate(rows, start=2):
        u = _unit_cell(row.get("unit"), n_units, path, line)
        entry: dict[str, Any] = {"label": str(row.get("label") or ""),
                                 "significant": parse_significant(row.get("significant"), path,
                                                                  line)}
        for column in SIGNIFICANCE_FLOATS:
            value = _float_cell(row.get(column), path, line, column)
            entry[column] = None if value is None or not math.isfinite(value) else _round(value)
        out[u] = entry
    return out


def significance_summary(rows: Sequence[dict[str, Any] | None],
                         detectors: np.ndarray) -> dict[str, Any] | None:
    """``{"tested", "significant", "share", "detectors", "detectors_significant"}``: units with a
    decided ``significant`` cell, how many are significant and their share, and the same among
    detector units (bool (U,)). None when no unit was tested."""
    decided = [(u, r["significant"]) for u, r in enumerate(rows)
               if r is not None and r["significant"] is not None]
    if not decided:
        return None
    significant = sum(1 for _, s in decided if s)
    det = [s for u, s in decided if bool(detectors[u])]
    return {"tested": len(decided), "significant": significant,
            "share": _round(significant / len(decided)), "detectors": len(det),
            "detectors_significant": sum(1 for s in det if s)}


def null_histograms(observed: np.ndarray, null: np.ndarray,
                    bins: int = NULL_BINS) -> list[dict[str, Any]]:
    """Per unit, the histogram of its permutation null with its observed statistic.

    Parameters
    ----------
    observed : float (U,), the unit's best IoU T_u
    null : float (B, U), T_b,u over B permutations

    Returns
    -------
    U dicts ``{"width", "counts": (bins,) int, "observed", "exceed"}``: bins
    ``[i * w, (i + 1) * w)`` with w = max(observed, max null) / bins (1 / bins when both are 0),
    the last bin closed; ``exceed`` = #{b : T_b,u >= T_u}. Non-finite null values are left out
    and a non-finite observed value counts as 0.
    """
    observed = np.asarray(observed, dtype=np.float64)
    null = np.asarray(null, dtype=np.float64)
    if null.ndim != 2 or null.shape[1] != observed.shape[0]:
        raise CacheError(f"significance null has shape {null.shape}; expected (B, "
                         f"{observed.shape[0]}) to match observed ({observed.shape[0]},)")
    out = []
    for u in range(observed.shape[0]):
        values = null[:, u]
        values = values[np.isfinite(values)]              # NaN: a permutation without a value
        obs = float(observed[u]) if np.isfinite(observed[u]) else 0.0
        top = max(obs, float(values.max()) if values.size else 0.0)
        width = top / bins if top > 0 else 1.0 / bins
        index = np.minimum(np.floor(values / width).astype(np.int64), bins - 1)
        counts = np.bincount(np.clip(index, 0, bins - 1), minlength=bins)
        out.append({"width": _round(width), "counts": [int(c) for c in counts],
                    "observed": _round(obs),
                    "exceed": int((values >= obs).sum())})
    return out


def pooled_null_counts(observed: np.ndarray, null: np.ndarray,
                       bin_width: float = POOLED_BIN_WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """Counts of observed (U,) and of every finite null value (B, U) in bins
    ``[i * w, (i + 1) * w)`` for i < ceil(1 / w), IoUs of 1 in the last bin.

    Returns int64 (nb,) observed counts and int64 (nb,) null counts (additive over unit blocks).
    """
    n_bins = int(round(1.0 / bin_width))

    def count(values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64).ravel()
        values = values[np.isfinite(values)]
        index = np.clip(np.floor(values / bin_width + 1e-9).astype(np.int64), 0, n_bins - 1)
        return np.bincount(index, minlength=n_bins).astype(np.int64)

    return count(observed), count(null)


def pooled_null_histogram(observed_counts: np.ndarray, null_counts: np.ndarray,
                          bin_width: float = POOLED_BIN_WIDTH) -> dict[str, Any]:
    """The layer's observed-versus-null histogram from :func:`pooled_null_counts`: bins up to the
    last non-empty one (at least 10), each series as fractions of its values.

    Returns ``{"edges", "observed": [fraction], "null": [fraction], "n_observed", "n_null"}``.
    """
    used = np.flatnonzero((observed_counts > 0) | (null_counts > 0))
    n_bins = max(10, int(used[-1]) + 1 if used.size else 0)
    n_obs, n_null = int(observed_counts.sum()), int(null_counts.sum())
    return {"edges": [_round(i * bin_width) for i in range(n_bins + 1)],
            "observed": [_round(c / max(1, n_obs)) for c in observed_counts[:n_bins]],
            "null": [_round(c / max(1, n_null)) for c in null_counts[:n_bins]],
            "n_observed": n_obs, "n_null": n_null}


def read_null_histograms(path: Path, n_units: int, block: int = 256, bins: int = NULL_BINS
                         ) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """:func:`null_histograms` and the layer's :func:`pooled_null_histogram` from
    ``significance.h5`` (datasets ``observed`` (U,) and ``null`` (B, U)), read ``block`` units at a
    time; None when the file lacks either dataset.

    Raises CacheError when the file cannot be read or the shapes do not match the layer.
    """
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "observed" not in f or "null" not in f:
                return None
            observed, null = f["observed"], f["null"]
            if observed.shape != (n_units,) or null.ndim != 2 or null.shape[1] != n_units:
                raise CacheError(f"{path}: observed {observed.shape} and null {null.shape}; "
                                 f"expected ({n_units},) and (B, {n_units}) for this layer")
            out: list[dict[str, Any]] = []
            pooled_obs = pooled_null = None
            for u0 in range(0, n_units, block):
                u1 = min(n_units, u0 + block)
                obs_block, null_block = observed[u0:u1], null[:, u0:u1]
                out += null_histograms(obs_block, null_block, bins)
                a, b = pooled_null_counts(obs_block, null_block)
                pooled_obs = a if pooled_obs is None else pooled_obs + a
                pooled_null = b if pooled_null is None else pooled_null + b
            if pooled_obs is None or pooled_null is None:
                pooled_obs, pooled_null = pooled_null_counts(np.zeros(0), np.zeros((0, 0)))
            return out, pooled_null_histogram(pooled_obs, pooled_null)
    except OSError as error:
        raise CacheError(f"{path}: cannot read ({error})") from None


__all__ = [
    "AblationRecord", "ablation_curves", "ablation_headline", "ablation_records", "ablation_view",
    "compositional_summary", "concept_ablations", "mean_curve", "null_histograms",
    "parse_significant", "read_compositional", "read_importance", "read_null_histograms",
    "read_significance", "significance_summary", "unit_damage",
]
