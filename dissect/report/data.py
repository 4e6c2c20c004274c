"""The report's data model: everything the templates show, computed from a run directory.

:func:`build_report_data` reads ``run.json``, each layer's dissection, the activation cache's
``amax`` (streamed in row chunks) and, when present, the layer's ``ablation.csv``,
``importance.csv``, ``compositional.csv``, ``significance.csv``/``.h5`` (see
:mod:`dissect.report.studies`) and the run's ``explain/*.json``, and returns a plain dict of
str/int/float/bool/list/dict values (saved as ``report/report.json``). The helpers are pure
functions over arrays so each piece can be tested on hand-made inputs.

Units are 0-based channel indices everywhere in the report (as in ``ablation.csv``; ``tally.csv``
numbers them from 1, which each unit carries as ``tally_unit``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dissect.errors import CacheError, OptionError
from dissect.rundir import (
    ABLATION_CSV,
    COMPOSITIONAL_CSV,
    DISSECTION_FILE,
    IMPORTANCE_CSV,
    SIGNIFICANCE_CSV,
    TALLY_FILE,
    RunDir,
)

#: Version of the report.json layout.
SCHEMA_VERSION = 1
#: Default number of top images per unit.
TOP_K = 10
#: Number of next-best labels listed per unit.
N_NEXT_LABELS = 3
#: Number of most-hurt classes listed per unit.
N_HURT_CLASSES = 3
#: Metric of ablation.csv whose drop ranks the hurt classes (the PNAS paper's class accuracy).
ABLATION_METRIC = "recall"
ABLATION_METRICS = ("accuracy", "balanced_accuracy", "precision", "recall", "true_class_prob")
ABLATION_COLUMNS = ("study", "set", "units", "class", "n") + ABLATION_METRICS
#: Histogram bin width of unit IoUs.
IOU_BIN_WIDTH = 0.01
#: Decimals kept for floats in the data model (fixed so report.json is stable).
FLOAT_DECIMALS = 6
#: Rows of ``amax`` read per chunk are chosen so a chunk holds about this many values.
AMAX_CHUNK_VALUES = 2**22


def round_float(value: float) -> float:
    """A float rounded to :data:`FLOAT_DECIMALS` decimals; NaN and inf become 0.0."""
    value = float(value)
    if not math.isfinite(value):
        return 0.0
    return round(value, FLOAT_DECIMALS) + 0.0


def safe_file_name(layer: str) -> str:
    """A file name for a layer: characters outside ``[A-Za-z0-9._-]`` become ``_``.

    Dotted module names (``layer4.1.conv2``) are kept as they are.
    """
    name = re.sub(r"[^A-Za-z0-9._-]", "_", layer)
    if name in ("", ".", "..", "index", "report"):
        name = f"layer_{name.strip('.')}"
    return name


# --------------------------------------------------------------------------------------------
# Top images through amax


def sortable_keys(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Unique uint64 keys that order (value desc, row asc) as (key desc).

    Parameters
    ----------
    values : float32 (r, U)
    rows : int64 (r,), the image index of each row, each < 2**32

    Returns
    -------
    uint64 (r, U): the high 32 bits order float32 values (the usual sign-flip of IEEE bits; -0.0 is
    taken as 0.0 and NaN as -inf), the low 32 bits are ``2**32 - 1 - row``, so for equal values the
    lower row has the larger key.
    """
    v = np.asarray(values, dtype=np.float32)
    v = np.where(np.isnan(v), np.float32(-np.inf), v) + np.float32(0.0)  # NaN -> -inf, -0.0 -> 0.0
    bits = v.view(np.uint32).astype(np.uint64)
    negative = (bits >> np.uint64(31)) == 1
    ordered = np.where(negative, ~bits & np.uint64(0xFFFFFFFF), bits | np.uint64(0x80000000))
    low = (np.uint64(0xFFFFFFFF) - rows.astype(np.uint64))[:, None]
    return (ordered << np.uint64(32)) | low


def decode_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`sortable_keys`: (rows int64, values float32) of the same shape."""
    keys = keys.astype(np.uint64)
    rows = (np.uint64(0xFFFFFFFF) - (keys & np.uint64(0xFFFFFFFF))).astype(np.int64)
    ordered = keys >> np.uint64(32)
    positive = (ordered >> np.uint64(31)) == 1
    bits = np.where(positive, ordered & np.uint64(0x7FFFFFFF), ~ordered & np.uint64(0xFFFFFFFF))
    return rows, bits.astype(np.uint32).view(np.float32)


def top_images(
    read_rows: Callable[[int, int], np.ndarray], n_images: int, k: int, chunk_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's ``k`` images of largest ``amax``, streaming ``amax`` in row chunks.

    Parameters
    ----------
    read_rows : ``read_rows(start, stop)`` returns float (stop - start, U) rows of ``amax``
    n_images : N
    k : images per unit
    chunk_rows : rows per read (memory is O((chunk_rows + k) * U))

    Returns
    -------
    indices : int64 (U, min(k, N)), image indices by descending amax, ties by lower index; equals
        ``np.argsort(-amax, axis=0, kind='stable')[:k].T``
    values : float32 (U, min(k, N)), the amax values
    """
    if n_images <= 0:
        raise CacheError("the activation cache holds no images; expected amax of shape (N, U) "
                         "with N > 0")
    k = min(k, n_images)
    step = max(1, chunk_rows)
    best = np.zeros((0, 0), dtype=np.uint64)  # (<= k, U) keys of the best rows so far
    for start in range(0, n_images, step):
        stop = min(n_images, start + step)
        values = np.asarray(read_rows(start, stop), dtype=np.float32)
        keys = sortable_keys(values, np.arange(start, stop, dtype=np.int64))
        if best.shape[0]:
            keys = np.concatenate([best, keys], axis=0)
        if keys.shape[0] > k:
            keys = np.partition(keys, keys.shape[0] - k, axis=0)[keys.shape[0] - k :]
        best = keys
    rows, values = decode_keys(np.sort(best, axis=0)[::-1])
    return np.ascontiguousarray(rows.T), np.ascontiguousarray(values.T)


# --------------------------------------------------------------------------------------------
# Layer summaries


def label_categories(primary: np.ndarray, categories: Sequence[str]) -> list[str]:
    """Category name of each label: ``categories[primary[l]]``, or ``''`` where primary is -1.

    Parameters
    ----------
    primary : int64 (L,), index into ``categories`` or -1 (label 0, gaps, unselected categories)
    categories : the C category names
    """
    return [categories[p] if 0 <= p < len(categories) else "" for p in np.asarray(primary).tolist()]


def detector_mask(unit_iou: np.ndarray, unit_label: np.ndarray, iou_threshold: float) -> np.ndarray:
    """bool (U,): units that detect their concept, ``unit_iou >= iou_threshold`` and a label > 0
    (as ``dissect.tally.summarize_detectors``).

    Parameters
    ----------
    unit_iou : float (U,)
    unit_label : int (U,), 0 = no label
    iou_threshold : the detection cut-off
    """
    return (np.asarray(unit_iou, dtype=np.float64) >= iou_threshold) & (np.asarray(unit_label) > 0)


def detector_counts(
    unit_label: np.ndarray,
    unit_category: Sequence[str],
    detectors: np.ndarray,
    categories: Sequence[str],
) -> list[dict[str, Any]]:
    """Per category: the number of detector units and of unique concepts they detect.

    Parameters
    ----------
    unit_label : int64 (U,)
    unit_category : (U,) category name of each unit's label
    detectors : bool (U,)
    categories : category names, the output order

    Returns
    -------
    ``[{"category": c, "units": int, "concepts": int}, ...]`` in ``categories`` order.
    """
    out = []
    cats = np.asarray(list(unit_category), dtype=object)
    labels = np.asarray(unit_label)
    for c in categories:
        sel = detectors & (cats == c)
        out.append({"category": c, "units": int(sel.sum()),
                    "concepts": int(np.unique(labels[sel]).size)})
    return out


def concept_bars(
    unit_label: np.ndarray,
    unit_category: Sequence[str],
    detectors: np.ndarray,
    label_names: Sequence[str],
    categories: Sequence[str],
) -> list[dict[str, Any]]:
    """The unique detected concepts with their number of detector units (NetDissect's bar chart).

    Returns
    -------
    ``[{"label": name, "number": l, "category": c, "units": int}, ...]`` grouped by category in
    ``categories`` order, within a category by descending units, then label number (the order of
    ``dissect.tally.summarize_detectors``).
    """
    labels = np.asarray(unit_label)
    cats = list(unit_category)
    counts: dict[tuple[str, int], int] = {}
    for u in np.flatnonzero(detectors):
        key = (cats[u], int(labels[u]))
        counts[key] = counts.get(key, 0) + 1
    order = {c: i for i, c in enumerate(categories)}
    bars = [
        {"label": str(label_names[num]), "number": num, "category": cat, "units": n}
        for (cat, num), n in counts.items()
    ]
    bars.sort(key=lambda b: (order.get(b["category"], len(order)), -b["units"], b["number"]))
    return bars


def iou_histogram(unit_iou: np.ndarray, bin_width: float = IOU_BIN_WIDTH) -> dict[str, list]:
    """Histogram of unit IoUs with bins ``[i * w, (i + 1) * w)``.

    Parameters
    ----------
    unit_iou : float (U,), values in [0, 1]
    bin_width : w

    Returns
    -------
    ``{"edges": [0, w, ..., B * w], "counts": [int] * B}`` with B the smallest number of bins that
    covers the largest IoU (at least 10); a value on the last edge goes to the last bin.
    """
    iou = np.clip(np.asarray(unit_iou, dtype=np.float64), 0.0, None)
    top = float(iou.max()) if iou.size else 0.0
    n_bins = max(10, int(math.floor(top / bin_width + 1e-9)) + 1)
    index = np.minimum(np.floor(iou / bin_width + 1e-9).astype(np.int64), n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    return {
        "edges": [round_float(i * bin_width) for i in range(n_bins + 1)],
        "counts": [int(c) for c in counts],
    }


def next_best_labels(
    iou: np.ndarray, unit_label: np.ndarray, allowed: np.ndarray, n: int = N_NEXT_LABELS
) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's ``n`` best labels after its own label.

    Parameters
    ----------
    iou : float (U, L)
    unit_label : int64 (U,), excluded from each unit's list
    allowed : bool (L,), labels that may be listed (labels of the selected categories, not 0)
    n : labels per unit

    Returns
    -------
    labels : int64 (U, n), by descending IoU, ties by lower label number; -1 where fewer than ``n``
        allowed labels have IoU > 0
    values : float64 (U, n), their IoUs (0 where the label is -1)
    """
    iou = np.asarray(iou, dtype=np.float64)
    n_units, n_labels = iou.shape
    scores = np.where(np.asarray(allowed, dtype=bool)[None, :], iou, -1.0)
    own = np.asarray(unit_label, dtype=np.int64)
    valid = (own >= 0) & (own < n_labels)
    scores[np.flatnonzero(valid), own[valid]] = -1.0
    # stable sort on -score keeps lower label numbers first among ties
    order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
    values = np.take_along_axis(scores, order, axis=1)
    labels = np.where(values > 0, order, -1).astype(np.int64)
    values = np.where(values > 0, values, 0.0)
    if labels.shape[1] < n:
        pad = n - labels.shape[1]
        labels = np.pad(labels, ((0, 0), (0, pad)), constant_values=-1)
        values = np.pad(values, ((0, 0), (0, pad)))
    return labels, values


# --------------------------------------------------------------------------------------------
# Ablation


def read_ablation_csv(path: Path) -> list[dict[str, str]]:
    """Rows of ``<layer>/ablation.csv`` (DESIGN §6) as dicts of strings.

    Raises
    ------
    CacheError
        When a column of :data:`ABLATION_COLUMNS` is missing or the file cannot be read.
    """
    from dissect.report.studies import read_csv_rows

    return read_csv_rows(path, ABLATION_COLUMNS)


def _metric(row: dict[str, str], metric: str, path: Path, line: int) -> float:
    text = (row.get(metric) or "").strip()
    if text == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise CacheError(
            f"{path}: row {line}: column {metric!r} holds {text!r}; expected a number"
        ) from None


def _single_unit(row: dict[str, str], n_units: int, path: Path, line: int) -> int | None:
    """The unit of a one-unit set (``units`` column), None for a set of several units."""
    tokens = [t for t in (row["units"] or "").split(";") if t.strip() != ""]
    try:
        units = [int(t) for t in tokens]
    except ValueError:
        raise CacheError(
            f"{path}: row {line}: column 'units' holds {row['units']!r}; expected 0-based unit "
            "indices separated by ';'"
        ) from None
    if len(units) != 1:
        return None
    if not 0 <= units[0] < n_units:
        raise CacheError(
            f"{path}: row {line}: unit {units[0]} is out of range; the layer has {n_units} units"
        )
    return units[0]


def ablation_effects(
    rows: Sequence[dict[str, str]],
    n_units: int,
    metric: str = ABLATION_METRIC,
    n: int = N_HURT_CLASSES,
    path: Path = Path(ABLATION_CSV),
) -> list[list[dict[str, Any]]]:
    """Per unit, the classes whose ``metric`` drops most when the unit alone is ablated.

    Parameters
    ----------
    rows : rows of ablation.csv (:func:`read_ablation_csv`)
    n_units : U
    metric : one of :data:`ABLATION_METRICS` (default ``recall``, the PNAS paper's class accuracy,
        which also ranks units in ``dissect.ablation.rank_units``)
    n : classes per unit
    path : the file the rows came from (for messages)

    Returns
    -------
    A list of U lists of ``{"class", "n", "baseline", "ablated", "drop"}`` (values rounded to
    :data:`FLOAT_DECIMALS`) with ``drop = baseline - ablated > 0``, by descending drop, ties by the
    larger drop of ``true_class_prob``, then by class order in the file. Only rows of the ``single``
    study count: its ``set == 'baseline'`` rows are the baseline, its one-unit sets the ablations.
    Units it did not ablate get ``[]``; classes where a value is empty or NaN are left out.
    """
    if metric not in ABLATION_METRICS:
        raise OptionError(f"ablation metric {metric!r} is not one of {', '.join(ABLATION_METRICS)}")
    baseline: dict[str, tuple[float, float]] = {}
    counts: dict[str, int] = {}
    class_order: dict[str, int] = {}
    ablated: dict[int, dict[str, tuple[float, float]]] = {}
    for line, row in enumerate(rows, start=2):
        if row["study"] != "single":
            continue
        cls = row["class"]
        class_order.setdefault(cls, len(class_order))
        values = (_metric(row, metric, path, line), _metric(row, "true_class_prob", path, line))
        if row["set"] == "baseline":
            baseline[cls] = values
            try:
                counts[cls] = int(float(row["n"] or 0))
            except ValueError:
                raise CacheError(
                    f"{path}: row {line}: column 'n' holds {row['n']!r}; expected an integer"
                ) from None
            continue
        unit = _single_unit(row, n_units, path, line)
        if unit is not None:
            ablated.setdefault(unit, {})[cls] = values
    effects: list[list[dict[str, Any]]] = []
    for u in range(n_units):
        found = []
        for cls, (value, prob) in ablated.get(u, {}).items():
            base, base_prob = baseline.get(cls, (math.nan, math.nan))
            drop = round_float(base - value) if not math.isnan(base - value) else 0.0
            if drop <= 0:
                continue
            prob_drop = base_prob - prob if not math.isnan(base_prob - prob) else 0.0
            found.append(
                (
                    (-drop, -round_float(prob_drop), class_order[cls]),
                    {
                        "class": cls,
                        "n": counts.get(cls, 0),
                        "baseline": round_float(base),
                        "ablated": round_float(value),
                        "drop": drop,
                    },
                )
            )
        found.sort(key=lambda item: item[0])
        effects.append([entry for _, entry in found[:n]])
    return effects


# --------------------------------------------------------------------------------------------
# The whole data model


def image_level_mask(dataset: Any, n_labels: int) -> np.ndarray:
    """bool (L,): labels given to some image as an image-level label (index.csv digits entries:
    scenes, many textures), from ``dataset.image_level_labels(category)`` of every category."""
    mask = np.zeros(n_labels, dtype=bool)
    for category in getattr(dataset, "categories", ()):
        for labels in dataset.image_level_labels(category):
            labels = np.asarray(labels, dtype=np.int64)
            labels = labels[(labels > 0) & (labels < n_labels)]
            mask[labels] = True
    return mask


def scatter_points(units: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Importance against interpretability: one point per unit with an importance value.

    The y value is the unit's ``damage`` (largest single-unit drop of the metric over classes)
    when any unit has one, else the number of classes the unit is important for
    (importance.csv). Returns ``{"y": "damage" | "n_classes", "points": [{"unit", "iou", "value",
    "label", "category"}]}`` in unit order, or None when no unit has either value.
    """
    if any(u["damage"] is not None for u in units):
        key = "damage"
        points = [(u, u["damage"]) for u in units if u["damage"] is not None]
    elif any(u["important_for"] is not None for u in units):
        key = "n_classes"
        points = [(u, len(u["important_for"])) for u in units if u["important_for"] is not None]
    else:
        return None
    return {"y": key, "points": [{"unit": u["unit"], "iou": u["iou"], "value": v,
                                  "label": u["label"], "category": u["category"]}
                                 for u, v in points]}


def layer_data(
    result: Any,
    top_indices: np.ndarray,
    top_values: np.ndarray,
    image_names: Sequence[str],
    effects: list[list[dict[str, Any]]] | None,
    *,
    metric: str = ABLATION_METRIC,
    ablation: dict[str, Any] | None = None,
    damage: Sequence[float | None] | None = None,
    importance: Sequence[list[str] | None] | None = None,
    formulas: Sequence[dict[str, Any] | None] | None = None,
    significance: Sequence[dict[str, Any] | None] | None = None,
    null_histograms: Sequence[dict[str, Any]] | None = None,
    pooled_null: dict[str, Any] | None = None,
    image_level: np.ndarray | None = None,
    files: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The data model of one layer.

    Parameters
    ----------
    result : a ``DissectionResult`` (attributes layer, categories, thresholds (U,), iou (U, L),
        unit_label (U,), unit_iou (U,), unit_category (U,), label_names (L,), primary (L,),
        iou_threshold)
    top_indices, top_values : (U, k) from :func:`top_images`
    image_names : (N,) image paths relative to the dataset's ``images/``
    effects : per unit hurt classes from :func:`ablation_effects` (the single study), or None
    metric : the ablation metric of ``effects``
    ablation : :func:`dissect.report.studies.ablation_view` of ablation.csv, or None
    damage : (U,) from :func:`dissect.report.studies.unit_damage`
    importance : (U,) from :func:`dissect.report.studies.read_importance`
    formulas : (U,) from :func:`dissect.report.studies.read_compositional`
    significance : (U,) from :func:`dissect.report.studies.read_significance`
    null_histograms, pooled_null : per unit (U,) and for the layer, from
        :func:`dissect.report.studies.read_null_histograms`
    image_level : bool (L,), labels that are image-level (:func:`image_level_mask`)
    files : name -> path relative to the report directory of the layer's result files
    """
    from dissect.report import studies

    layer = str(result.layer)
    categories = [str(c) for c in result.categories]
    names = [str(x) for x in list(result.label_names)]
    primary = np.asarray(result.primary, dtype=np.int64)
    label_cats = label_categories(primary, categories)
    unit_label = np.asarray(result.unit_label, dtype=np.int64)
    unit_iou = np.asarray(result.unit_iou, dtype=np.float64)
    unit_category = [str(c) for c in list(result.unit_category)]
    thresholds = np.asarray(result.thresholds, dtype=np.float64)
    iou_threshold = float(result.iou_threshold)
    n_units = unit_label.shape[0]
    detectors = detector_mask(unit_iou, unit_label, iou_threshold)
    allowed = (primary >= 0) & (np.arange(primary.shape[0]) != 0)
    next_labels, next_ious = next_best_labels(np.asarray(result.iou), unit_label, allowed)
    file_name = safe_file_name(layer)
    if image_level is None:
        image_level = np.zeros(len(names), dtype=bool)

    units = []
    for u in range(n_units):
        lab = int(unit_label[u])
        has_label = 0 < lab < len(names) and unit_iou[u] > 0
        units.append(
            {
                "unit": u,
                "tally_unit": u + 1,
                "label": names[lab] if has_label else "-",
                "category": unit_category[u] if has_label else "",
                "image_level": bool(has_label and lab < len(image_level) and image_level[lab]),
                "iou": round_float(unit_iou[u]),
                "detector": bool(detectors[u]),
                "threshold": round_float(thresholds[u]),
                "next": [
                    {"label": names[label], "category": label_cats[label], "iou": round_float(v)}
                    for label, v in zip(next_labels[u].tolist(), next_ious[u].tolist())
                    if label >= 0
                ],
                "top_images": [
                    {"index": int(n), "image": str(image_names[int(n)]), "amax": round_float(v)}
                    for n, v in zip(top_indices[u], top_values[u])
                ],
                "strip": f"img/{file_name}/unit_{u:04d}.jpg",
                "ablation": [] if effects is None else effects[u],
                "damage": None if damage is None else damage[u],
                "important_for": None if importance is None else importance[u],
                "formula": None if formulas is None else formulas[u],
                "significance": None if significance is None else significance[u],
                "null": None if null_histograms is None else null_histograms[u],
            }
        )
    counts = detector_counts(unit_label, unit_category, detectors, categories)
    n_concepts = int(np.unique(unit_label[detectors]).size)
    view = None
    if ablation is not None or effects is not None:
        view = dict(ablation) if ablation is not None else {
            "metric": metric, "studies": ["single"], "curves": [], "mean_curve": None,
            "headline": None, "concepts": [], "options": {}}
        view["metric"] = metric
        view["single"] = effects is not None
    return {
        "name": layer,
        "page": f"{file_name}.html",
        "n_units": n_units,
        "iou_threshold": round_float(iou_threshold),
        "categories": categories,
        "detectors": counts,
        "n_detectors": int(detectors.sum()),
        "n_concepts": n_concepts,
        "concepts": concept_bars(unit_label, unit_category, detectors, names, categories),
        "iou_histogram": iou_histogram(unit_iou),
        "ablation": view,
        "scatter": scatter_points(units),
        "compositional": None if formulas is None else studies.compositional_summary(formulas),
        "significance": None if significance is None
        else studies.significance_summary(significance, detectors),
        "pooled_null": pooled_null,
        "files": dict(files or {}),
        "units": units,
    }


def open_run_dataset(run_dir: Path, config: dict[str, Any]) -> Any:
    """The run's dataset (``config['dataset']`` of run.json), opened with every image selected."""
    from dissect.data import BrodenDataset

    if not config.get("dataset"):
        raise CacheError(f"{RunDir(run_dir).run_json}: config.dataset is missing; expected a "
                         "dataset directory")
    return BrodenDataset(config["dataset"])


def amax_reader(run_dir: Path, layer: str) -> tuple[Callable[[int, int], np.ndarray], int, int]:
    """(read(start, stop) -> float32 (rows, U) of ``amax``, N, U) for a layer's activation cache."""
    from dissect.record import CacheReader, open_cache

    path = RunDir(run_dir).cache(layer)
    info = open_cache(path)
    reader = CacheReader(path, name="amax")
    return reader.read, int(info.n_images), int(info.n_units)


#: Result files of a layer that the report copies beside its pages and links to (in this order).
LAYER_FILES = (TALLY_FILE, ABLATION_CSV, IMPORTANCE_CSV, COMPOSITIONAL_CSV, SIGNIFICANCE_CSV)


def read_run_record(run_dir: Path) -> dict[str, Any]:
    """``run.json`` of a run directory as a dict (the report's one reader of it)."""
    return RunDir(run_dir).read()


def layer_results(run_dir: Path, layer: str, n_units: int, metric: str) -> dict[str, Any]:
    """The keyword arguments of :func:`layer_data` read from a layer's result files, each only
    when its file exists: ablation.csv (``effects`` from the single study, ``ablation``,
    ``damage``, and ``single_drops`` for :func:`class_profiles`, which the caller takes out
    before :func:`layer_data`), importance.csv, compositional.csv, significance.csv and
    significance.h5 (``null_histograms``), and ``files`` (the existing :data:`LAYER_FILES`)."""
    from dissect.report import studies

    run = RunDir(run_dir)
    layer_dir = run.layer_dir(layer)
    out: dict[str, Any] = {"effects": None}
    path = run.ablation_csv(layer)
    if path.exists():
        rows = read_ablation_csv(path)
        records = studies.ablation_records(rows, n_units, metric, path=path)
        view = studies.ablation_view(records, n_units, metric)
        options_path = run.ablation_meta(layer)
        view["options"] = studies.read_ablation_options(options_path) \
            if options_path.is_file() else {}
        out["ablation"] = view
        if "single" in view["studies"]:
            out["effects"] = ablation_effects(rows, n_units, metric, path=path)
            out["damage"] = studies.unit_damage(records, n_units)
            out["single_drops"] = studies.single_drops(records)
    for key, path, read in (("importance", run.importance(layer), studies.read_importance),
                            ("formulas", run.compositional_csv(layer), studies.read_compositional),
                            ("significance", run.significance_csv(layer),
                             studies.read_significance)):
        if path.exists():
            out[key] = read(path, n_units)
    path = run.significance_h5(layer)
    if path.exists():
        arrays = studies.read_null_histograms(path, n_units)
        if arrays is not None:
            out["null_histograms"], out["pooled_null"] = arrays
    file_name = safe_file_name(layer)
    out["files"] = {name: f"files/{file_name}/{name}" for name in LAYER_FILES
                    if (layer_dir / name).is_file()}
    return out


def unit_layout_text(run_dir: str | Path, layer: str) -> str | None:
    """How the layer's output became unit maps, from its cache's ``unit_layout`` (None for a
    cache without one): e.g. ``tokens: output (197, 768) -> 768 units of 14x14 maps (1 leading
    class/register token left out)``."""
    from dissect.record import open_cache

    layout = open_cache(RunDir(run_dir).cache(layer)).unit_layout
    if not layout:
        return None
    try:
        shape = "x".join(str(int(v)) for v in layout["output_shape"])
        grid = "x".join(str(int(v)) for v in layout["grid"])
        text = (f"{layout['layout']}: output ({shape}) per image -> {int(layout['units'])} units "
                f"of {grid} maps")
        drop = int(layout.get("drop_tokens") or 0)
    except (KeyError, TypeError, ValueError):
        return None
    if drop:
        text += f" ({drop} leading class/register token{'s' if drop > 1 else ''} left out)"
    return text


#: Concepts and units listed per class profile.
TOP_PROFILE = 5


def class_profiles(run_dir: str | Path, layer: str, unit_labels: Sequence[str],
                   single_drops: Mapping[str, Sequence[tuple[int, float]]] | None = None,
                   top: int = TOP_PROFILE) -> list[dict[str, Any]]:
    """The layer's class concept profiles (``explain/classes/*.json``, from ``dissect explain
    --class``), each beside the units whose single-unit ablation hurts that class most
    (``single_drops``: :func:`dissect.report.studies.single_drops` of the layer's ablation
    records, read by :func:`layer_results`; None without a single study).

    Returns a list, in file-name order, of ``{"class", "n_images", "selection", "method",
    "concepts": [{"label", "share"}] (top positive shares), "unlabeled_share", "hurt": [{"unit",
    "label", "drop"}] (largest drops of ``metric`` > 0; [] without a single study),
    "both": labels in both lists}``. CacheError names a profile that cannot be read.
    """
    import json

    run = RunDir(run_dir)
    folder = run.class_profiles_dir
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("layer") != layer:
                continue
            name = str(data["target_name"] if data.get("target_name") is not None
                       else data["target"])
            concepts = [{"label": str(c["label"]), "share": float(c["share"])}
                        for c in data["concepts"] if float(c["contribution"]) > 0][:top]
            unlabeled = float(data["unlabeled"]["share"])
            n_images = int(data["n_images"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CacheError(f"{path}: not a class profile of `dissect explain --class` "
                             f"({error})") from None
        drops = sorted((single_drops or {}).get(name, ()), key=lambda d: (-d[1], d[0]))
        hurt = [{"unit": u, "label": unit_labels[u] if 0 <= u < len(unit_labels) else "",
                 "drop": round_float(drop)} for u, drop in drops[:top] if drop > 0]
        credited = {c["label"] for c in concepts}
        out.append({"class": name, "n_images": n_images, "selection": data.get("selection"),
                    "method": data.get("method"), "concepts": concepts,
                    "unlabeled_share": unlabeled, "hurt": hurt,
                    "both": sorted(credited & {h["label"] for h in hurt if h["label"]})})
    return out


def build_report_data(
    run_dir: str | Path,
    *,
    dataset: Any = None,
    top_k: int = TOP_K,
    ablation_metric: str = ABLATION_METRIC,
) -> dict[str, Any]:
    """The report's data model for a run directory (saved by :func:`render_report` as report.json).

    Parameters
    ----------
    run_dir : a run directory (DESIGN §4) with run.json, cache/<layer>.h5 and <layer>/dissection.h5
        for at least one layer of ``config.layers``
    dataset : an opened ``BrodenDataset`` of the run (default: ``config.dataset`` of run.json)
    top_k : top images per unit
    ablation_metric : one of :data:`ABLATION_METRICS`; its drop ranks the classes hurt by ablation

    Returns
    -------
    ``{"schema_version", "model", "weights", "dataset", "n_images", "top_k", "quantile",
    "categories", "layers", "missing_layers", "explanations"}``; each layer as :func:`layer_data`
    with the results of :func:`layer_results`; ``explanations`` as
    :func:`dissect.report.explain.read_explanations` of ``run_dir/explain``. Layers without a
    dissection are listed in ``missing_layers``.

    Raises
    ------
    CacheError
        When run.json, a cache or a dissection is missing or does not match (U or N differ), or no
        layer has been dissected.
    OptionError
        For a bad ``top_k`` or ``ablation_metric``.
    """
    from dissect.report.explain import read_explanations
    from dissect.tally import load_dissection

    if top_k < 1:
        raise OptionError(f"top_k is {top_k}; expected a positive number of images per unit")
    if ablation_metric not in ABLATION_METRICS:
        raise OptionError(
            f"ablation_metric {ablation_metric!r} is not one of {', '.join(ABLATION_METRICS)}"
        )
    run_dir = Path(run_dir)
    paths = RunDir(run_dir)
    run = read_run_record(run_dir)
    config = run.get("config", {})
    layers = [str(x) for x in config.get("layers") or []]
    if dataset is None:
        dataset = open_run_dataset(run_dir, config)
    image_names = list(dataset.image_names)
    image_level: np.ndarray | None = None

    out_layers: list[dict[str, Any]] = []
    missing: list[str] = []
    categories: list[str] = []
    for layer in layers:
        layer_dir = paths.layer_dir(layer)
        if not paths.dissection(layer).exists():
            missing.append(layer)
            continue
        result = load_dissection(layer_dir)
        if image_level is None:
            image_level = image_level_mask(dataset, len(result.label_names))
        read, n_images, n_units = amax_reader(run_dir, layer)
        if n_images != len(image_names):
            raise CacheError(
                f"{paths.cache_dir}: the cache of layer {layer!r} holds {n_images} images but "
                f"the dataset {config.get('dataset')} has {len(image_names)}; expected the same "
                "images"
            )
        if np.asarray(result.unit_iou).shape[0] != n_units:
            raise CacheError(
                f"{paths.dissection(layer)}: {np.asarray(result.unit_iou).shape[0]} units but "
                f"the cache of layer {layer!r} has {n_units}; rerun `dissect tally`"
            )
        chunk = max(1, AMAX_CHUNK_VALUES // max(1, n_units))
        top_idx, top_val = top_images(read, n_images, top_k, chunk)
        results = layer_results(run_dir, layer, n_units, ablation_metric)
        effects = results.pop("effects")
        drops = results.pop("single_drops", None)
        data = layer_data(result, top_idx, top_val, image_names, effects, metric=ablation_metric,
                          image_level=image_level, **results)
        data["class_profiles"] = class_profiles(
            run_dir, layer, [u["label"] for u in data["units"]], drops)
        data["unit_layout"] = unit_layout_text(run_dir, layer)
        for c in data["categories"]:
            if c not in categories:
                categories.append(c)
        out_layers.append(data)
    if not out_layers:
        raise CacheError(
            f"{run_dir}: no layer has been dissected; expected <layer>/{DISSECTION_FILE} for one "
            f"of the layers {', '.join(layers) or '(none in run.json)'}; run "
            f"`dissect tally --run {run_dir}`"
        )
    pages = [d["page"] for d in out_layers]
    if len(set(pages)) != len(pages):
        raise CacheError(f"{run_dir}: layers {', '.join(layers)} map to the same report file names")
    return {
        "schema_version": SCHEMA_VERSION,
        "model": str(config.get("model", "")),
        "weights": None if config.get("weights") is None else str(config.get("weights")),
        "dataset": str(config.get("dataset", "")),
        "n_images": len(image_names),
        "top_k": top_k,
        "quantile": None if config.get("quantile") is None else float(config["quantile"]),
        "categories": categories,
        "layers": out_layers,
        "missing_layers": missing,
        "explanations": read_explanations(paths.explain_dir),
    }
