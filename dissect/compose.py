"""Compositional labels of a layer's units (DESIGN.md §10): AND / OR / AND NOT formulas.

:func:`compose_layer` reads a layer's activation cache and its dataset by image chunks as Dask
tasks (the schedulers of :mod:`dissect.parallel`) and finds, per unit, the left-deep formula of
labels whose mask best matches the unit's mask (IoU, exact integer counts):

- pass 0 counts ``m_u = |M_u|``, ``l_c = |L_c|``, ``j_c(u) = |L_c and M_u|`` (and the category
  domains used by annotated negation) for every unit and label;
- each beam step is one pass over the images where some beam formula can hold: for every
  distinct beam formula F (shared by all units whose beam holds it) the count vector
  ``x = |F and L_c|`` over all labels, and for every (F, unit) pair ``y = |F and M_u and L_c|``;
  every one-label extension of F is then scored at once (:func:`dissect.stats.formula.
  score_extensions`). No mask is built per candidate.
- ``search='exact'``: branch and bound over the same passes, pruned with admissible bounds
  (:func:`dissect.stats.formula.subtree_bound`), starting from the beam result.

``CompositionResult.save(out_dir)`` writes ``compositional.csv`` and ``compositional.json``
atomically (the JSON last: a run killed before it is never taken as complete), and
:func:`composition_is_current` lets a rerun with the same options and cache fingerprint skip the
work.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
import torch

from dissect.config import NEGATIONS, SEARCHES
from dissect.errors import CacheError, DatasetError, OptionError
from dissect.parallel import (
    SchedulerSetup,
    check_chunk_size,
    check_scheduler,
    default_chunk_size,
    image_chunks,
    scheduler_context,
    set_task_threads,
    torch_threads_kept,
    tree_reduce,
)
from dissect.rundir import COMPOSITIONAL_CSV, COMPOSITIONAL_JSON
from dissect.stats import threshold_below, upsample_maps
from dissect.stats.formula import (
    OP_CODES,
    OPS,
    Formula,
    formula_arrays,
    iou_of,
    score_extensions,
    sort_key,
    subtree_bound,
)

__all__ = [
    "COMPOSITION_CSV",
    "COMPOSITION_JSON",
    "CSV_COLUMNS",
    "BeamEntry",
    "CompositionResult",
    "UnitComposition",
    "compose_layer",
    "compose_options",
    "composition_is_current",
    "count_formulas",
    "load_composition",
]

#: The file names of ``<run>/<layer>/`` that :meth:`CompositionResult.save` writes (defined in
#: :mod:`dissect.rundir`).
COMPOSITION_CSV = COMPOSITIONAL_CSV
COMPOSITION_JSON = COMPOSITIONAL_JSON
CSV_COLUMNS = ("unit", "formula", "formula_ids", "leaves", "iou", "label", "label_iou",
               "categories", "optimal")
SCHEMA_VERSION = 1
#: Largest (formula + pair) x column count of one pass's dense result (int64 values).
_PASS_VALUES = 8 * 1024 * 1024


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class BeamEntry:
    """One formula of a unit with its exact counts.

    Attributes
    ----------
    formula:
        The canonical left-deep formula.
    area, inter:
        |F| and |F and M_u| over the selected pixels.
    iou:
        inter / (area + m - inter).
    """

    formula: Formula
    area: int
    inter: int
    iou: float

    def to_json(self, names: Sequence[str]) -> dict[str, Any]:
        return {"formula": self.formula.text(names), "formula_ids": self.formula.ids(),
                "leaves": self.formula.length, "area": self.area, "intersection": self.inter,
                "iou": self.iou}

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> BeamEntry:
        return cls(Formula.from_ids(item["formula_ids"]), int(item["area"]),
                   int(item["intersection"]), float(item["iou"]))


@dataclass
class UnitComposition:
    """One unit's result.

    Attributes
    ----------
    unit:
        0-based unit index.
    mask_area:
        m_u, the unit's mask pixels over the selected images.
    beam:
        The final beam, best first (empty when no label has IoU > 0).
    label, label_iou:
        The best single label (0: none) and its IoU under these semantics.
    exact:
        The exact optimum (``search='exact'``; None when no formula has IoU > 0).
    exact_searched:
        Whether ``search='exact'`` ran.
    """

    unit: int
    mask_area: int
    beam: list[BeamEntry]
    label: int
    label_iou: float
    exact: BeamEntry | None = None
    exact_searched: bool = False

    @property
    def best(self) -> BeamEntry | None:
        """The reported formula: the exact optimum when searched, else the beam's best."""
        if self.exact is not None:
            return self.exact
        return self.beam[0] if self.beam else None

    @property
    def optimal(self) -> str:
        """'yes'/'no': whether the beam's best reached the exact optimum; 'unknown' for beam."""
        if not self.exact_searched:
            return "unknown"
        if self.exact is None:
            return "yes"
        beam_iou = self.beam[0].iou if self.beam else 0.0
        return "yes" if beam_iou >= self.exact.iou else "no"


@dataclass
class CompositionResult:
    """Compositional labels of one layer.

    Attributes
    ----------
    layer:
        Dotted layer name.
    options:
        The resolved options (see :func:`compose_options`).
    fingerprint:
        The cache fingerprint the result came from (JSON-able).
    label_names:
        (L,) names by label number.
    categories:
        The dataset's categories (category.csv order).
    primary:
        int64 (L,) primary category index per label, -1 for none.
    units:
        One :class:`UnitComposition` per unit.
    """

    layer: str
    options: dict[str, Any]
    fingerprint: Any
    label_names: list[str]
    categories: tuple[str, ...]
    primary: np.ndarray
    units: list[UnitComposition] = field(default_factory=list)

    def _categories_of(self, formula: Formula) -> str:
        used = {int(self.primary[c]) for c in formula.labels if self.primary[c] >= 0}
        return ";".join(self.categories[k] for k in sorted(used))

    def rows(self) -> list[dict[str, Any]]:
        """compositional.csv rows, by unit: see :data:`CSV_COLUMNS` (DESIGN.md §10)."""
        rows = []
        for unit in self.units:
            best = unit.best
            rows.append({
                "unit": unit.unit,
                "formula": best.formula.text(self.label_names) if best else "",
                "formula_ids": best.formula.ids_json() if best else "",
                "leaves": best.formula.length if best else 0,
                "iou": best.iou if best else 0.0,
                "label": self.label_names[unit.label] if unit.label else "",
                "label_iou": unit.label_iou,
                "categories": self._categories_of(best.formula) if best else "",
                "optimal": unit.optimal,
            })
        return rows

    def to_json(self) -> dict[str, Any]:
        """The content of compositional.json."""
        names = self.label_names
        return {
            "schema_version": SCHEMA_VERSION,
            "layer": self.layer,
            "options": self.options,
            "fingerprint": self.fingerprint,
            "categories": list(self.categories),
            "units": [{
                "unit": unit.unit, "mask_area": unit.mask_area, "label": unit.label,
                "label_name": names[unit.label] if unit.label else "",
                "label_iou": unit.label_iou, "optimal": unit.optimal,
                "beam": [entry.to_json(names) for entry in unit.beam],
                "exact": unit.exact.to_json(names) if unit.exact is not None else None,
                "exact_searched": unit.exact_searched,
            } for unit in self.units],
        }

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``<out_dir>/compositional.csv`` then ``<out_dir>/compositional.json``.

        Each is written under a temporary name and renamed into place; an older JSON is removed
        first, and the JSON is renamed last, so a run interrupted anywhere never leaves a pair
        of files that :func:`composition_is_current` accepts.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path = out / COMPOSITION_JSON
        json_path.unlink(missing_ok=True)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows())
        _write_atomic(out / COMPOSITION_CSV, text.getvalue())
        _write_atomic(json_path, json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")
        return out


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
    _replace(partial, path)


def _replace(source: Path, target: Path) -> None:
    os.replace(source, target)


def _read_json(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(out_dir) / COMPOSITION_JSON
    if not path.is_file() or not (Path(out_dir) / COMPOSITION_CSV).is_file():
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def composition_is_current(out_dir: str | os.PathLike[str], options: dict[str, Any],
                           fingerprint: Any) -> bool:
    """True when ``out_dir`` holds a complete composition made with these options and this
    cache fingerprint (so a rerun can skip the work)."""
    data = _read_json(out_dir)
    if data is None or data.get("schema_version") != SCHEMA_VERSION:
        return False
    return (data.get("options") == _plain(options)
            and data.get("fingerprint") == _plain(fingerprint))


def load_composition(out_dir: str | os.PathLike[str], label_names: Sequence[str] | None = None,
                     primary: np.ndarray | None = None) -> CompositionResult:
    """Read ``<out_dir>/compositional.json`` back.

    ``label_names``/``primary`` (from the dataset) restore the names and categories of the
    CSV rows; without them names are the formula texts' and categories are empty.

    Raises
    ------
    CacheError
        When the files are missing, incomplete or unreadable.
    """
    data = _read_json(out_dir)
    if data is None:
        raise CacheError(f"{Path(out_dir) / COMPOSITION_JSON} is missing or incomplete; run "
                         f"`dissect compose` for this layer")
    try:
        units = []
        for item in data["units"]:
            units.append(UnitComposition(
                int(item["unit"]), int(item["mask_area"]),
                [BeamEntry.from_json(entry) for entry in item["beam"]],
                int(item["label"]), float(item["label_iou"]),
                BeamEntry.from_json(item["exact"]) if item["exact"] is not None else None,
                bool(item["exact_searched"])))
        if label_names is None:
            top = max([c for u in units for e in u.beam for c in e.formula.labels]
                      + [u.label for u in units] + [0])
            label_names = [str(n) for n in range(top + 1)]
        if primary is None:
            primary = np.full(len(label_names), -1, dtype=np.int64)
        return CompositionResult(str(data["layer"]), data["options"], data["fingerprint"],
                                 list(label_names), tuple(data["categories"]),
                                 np.asarray(primary, np.int64), units)
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise CacheError(f"{Path(out_dir) / COMPOSITION_JSON} is damaged ({error}); run "
                         f"`dissect compose` again") from None


# ----------------------------------------------------------------------------- chunk counts
#: A sum of counts is kept dense once it would hold more than this share of its cells sparsely
#: (a dense cell takes 8 bytes, a sparse entry 16, and a dense sum needs no sort).
DENSE_SHARE = 0.25


@dataclass(frozen=True)
class SparseCounts:
    """Additive int64 counts of shape ``shape``: (flat index, value) pairs (an index may repeat
    in a chunk's counts; sums have unique indices), or, once a sum fills more than
    :data:`DENSE_SHARE` of the cells, a dense flat array ``full`` (``index`` and ``values`` are
    then empty)."""

    shape: tuple[int, int]
    index: np.ndarray
    values: np.ndarray
    full: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __add__(self, other: SparseCounts) -> SparseCounts:
        dense = next((c for c in (self, other) if c.full is not None), None)
        if dense is None and len(self.index) + len(other.index) <= DENSE_SHARE * self.size:
            index = np.concatenate([self.index, other.index])
            values = np.concatenate([self.values, other.values])
            unique, inverse = np.unique(index, return_inverse=True)
            return SparseCounts(self.shape, unique,
                                np.bincount(inverse, weights=values, minlength=len(unique))
                                .round().astype(np.int64) if len(unique) else values)
        total = dense.full.copy() if dense is not None else np.zeros(self.size, np.int64)
        for part in (self, other):
            if part is dense:
                continue
            if part.full is not None:
                total += part.full
            else:
                np.add.at(total, part.index, part.values)   # a chunk's entries may repeat
        empty = np.zeros(0, np.int64)
        return SparseCounts(self.shape, empty, empty, total)

    def dense(self) -> np.ndarray:
        if self.full is not None:
            return self.full.reshape(self.shape)
        out = np.zeros(self.size, dtype=np.int64)
        np.add.at(out, self.index, self.values)
        return out.reshape(self.shape)


def _sum_pairs(*parts: tuple[SparseCounts, SparseCounts]) -> tuple[SparseCounts, SparseCounts]:
    x, y = parts[0]
    for other_x, other_y in parts[1:]:
        x, y = x + other_x, y + other_y
    return x, y


def _image_columns(seg: np.ndarray, image_labels: np.ndarray, leaf_category: np.ndarray,
                   n_labels: int, n_categories: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's leaf incidence.

    Parameters
    ----------
    seg:
        int (Lyr, S) label layers (0 = none). image_labels: int (K,) (0 = padding).
    leaf_category:
        int64 (L,) category index of each label that may be a leaf, -1 for none.

    Returns
    -------
    (labels int64 (k,) present leaf labels, incidence bool (S, k): pixel carries the label on any
    layer, or the label is image-level; annotated bool (C,): categories of present labels).
    """
    n_pixels = seg.shape[1]
    values = seg[seg > 0]
    level = image_labels[image_labels > 0]
    labels = np.union1d(values, level).astype(np.int64)
    labels = labels[(labels < n_labels)]
    labels = labels[leaf_category[labels] >= 0]
    position = np.full(n_labels, -1, dtype=np.int64)
    position[labels] = np.arange(len(labels))
    incidence = np.zeros((n_pixels, len(labels)), dtype=bool)
    for layer in seg:
        pixels = np.flatnonzero(layer)
        columns = position[layer[pixels]]
        keep = columns >= 0
        incidence[pixels[keep], columns[keep]] = True
    level = level[level < n_labels]
    level_columns = position[level]
    incidence[:, level_columns[level_columns >= 0]] = True
    annotated = np.zeros(n_categories, dtype=bool)
    annotated[leaf_category[labels]] = True
    return labels, incidence, annotated


def _signatures(incidence: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct rows of a bool (S, k) incidence: (signatures bool (R, k), pixel_signature int64
    (S,) the row of each pixel, weight int64 (R,) pixels per signature)."""
    n_pixels, k = incidence.shape
    if k == 0:
        return (np.zeros((1, 0), bool), np.zeros(n_pixels, np.int64),
                np.array([n_pixels], np.int64))
    packed = np.packbits(incidence, axis=1)                      # (S, ceil(k / 8)) uint8
    keys = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))).reshape(-1)
    _, first, inverse, weight = np.unique(keys, return_index=True, return_inverse=True,
                                          return_counts=True)
    return incidence[first], inverse.reshape(-1).astype(np.int64), weight.astype(np.int64)


def _can_hold(leaves: np.ndarray, ops: np.ndarray, lengths: np.ndarray, present: np.ndarray,
              annotated_leaf: np.ndarray | None) -> np.ndarray:
    """bool (F,): whether each formula may hold somewhere in an image (a necessary condition).

    ``present`` bool (L,) labels of the image; ``annotated_leaf`` bool (L,) (annotated negation:
    the image is annotated in the label's category) or None (global negation).
    """
    cur = np.where(lengths == 0, True, present[np.maximum(leaves[:, 0], 0)])
    for k in range(1, leaves.shape[1]):
        op = ops[:, k]
        label = np.maximum(leaves[:, k], 0)
        nxt = present[label]
        not_ok = cur if annotated_leaf is None else cur & annotated_leaf[label]
        cur = np.where(op == 0, cur | nxt, np.where(op == 1, cur & nxt,
                                                    np.where(op == 2, not_ok, cur)))
    return cur


def _evaluate(leaves: np.ndarray, ops: np.ndarray, lengths: np.ndarray, table: torch.Tensor,
              row_of: np.ndarray, annotated_leaf: np.ndarray | None) -> torch.Tensor:
    """bool (F, S) masks of formulas in one image; ``table`` bool (k + 1, S) with row 0 empty,
    ``row_of`` int64 (L,) the table row of each label (0: absent).

    Formulas are grouped by their operator sequence, so each group is a few in-place boolean
    operations on gathered table rows.
    """
    device = table.device
    n_pixels = table.shape[1]
    rows = row_of[np.maximum(leaves, 0)]
    out = torch.empty((len(leaves), n_pixels), dtype=torch.bool, device=device)
    signature = np.concatenate([lengths[:, None], ops], axis=1)
    patterns, inverse = np.unique(signature, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    for number, pattern in enumerate(patterns.tolist()):
        members = np.flatnonzero(inverse == number)
        index = torch.from_numpy(members).to(device)
        length = pattern[0]
        if length == 0:
            out[index] = True
            continue
        cur = table[torch.from_numpy(rows[members, 0]).to(device)]
        for k in range(1, length):
            nxt = table[torch.from_numpy(rows[members, k]).to(device)]
            code = pattern[1 + k]
            if code == 0:
                cur |= nxt
            elif code == 1:
                cur &= nxt
            else:
                cur &= ~nxt
                if annotated_leaf is not None:
                    inside = annotated_leaf[np.maximum(leaves[members, k], 0)]
                    cur &= torch.from_numpy(inside).to(device)[:, None]
        out[index] = cur
    return out


def count_formulas(acts: np.ndarray, seg: np.ndarray, image_labels: np.ndarray,
                   thresholds: np.ndarray, leaf_category: np.ndarray, n_categories: int,
                   leaves: np.ndarray, ops: np.ndarray, lengths: np.ndarray,
                   pair_formula: np.ndarray, pair_unit: np.ndarray,
                   negation: str = "global", device: str | torch.device | None = None
                   ) -> tuple[SparseCounts, SparseCounts]:
    """Count vectors of formulas and (formula, unit) pairs over one chunk of images.

    Columns (G = L + C): column 0 is every pixel (label 0 is never a leaf), column c in 1..L-1
    is leaf label c (L_c: the pixel carries c on any layer, or c is an image-level label of the
    image), column L + k is the domain of category k (every pixel of the images annotated in k).

    Parameters
    ----------
    acts:
        float32 (n, U, h, w) activations.
    seg, image_labels:
        int (n, Lyr, sh, sw) and (n, K) label maps and image-level labels (0 = none).
    thresholds:
        (U,) thresholds; M_u = ``upsample(acts[., u]) > threshold`` where the map max exceeds it.
    leaf_category:
        int64 (L,) category index of each label that may be a leaf, -1 for the rest.
    n_categories:
        C.
    leaves, ops, lengths:
        The F formulas (:func:`dissect.stats.formula.formula_arrays`).
    pair_formula, pair_unit:
        int64 (P,) the (formula, unit) pairs to count.
    negation:
        ``'global'`` or ``'annotated'`` (NOT c only inside images annotated in c's category).
    device:
        Torch device of the mask work (default CPU).

    Returns
    -------
    (X (F, G): |F and column|, Y (P, G): |F and M_u and column|) as SparseCounts.
    """
    dev = torch.device(device or "cpu")
    n, n_units = acts.shape[:2]
    sh, sw = seg.shape[2:]
    n_pixels = sh * sw
    n_labels = len(leaf_category)
    n_columns = n_labels + n_categories
    below = threshold_below(np.asarray(thresholds))
    active = acts.reshape(n, n_units, -1).max(axis=2) > below[None, :]
    x_index, x_values, y_index, y_values = [], [], [], []
    seg_flat = np.asarray(seg).reshape(n, seg.shape[1], n_pixels)
    leaf_of = np.where(leaf_category >= 0, leaf_category, 0)
    for r in range(n):
        labels, incidence, annotated = _image_columns(seg_flat[r], np.asarray(image_labels[r]),
                                                      leaf_category, n_labels, n_categories)
        present = np.zeros(n_labels, dtype=bool)
        present[labels] = True
        annotated_leaf = None
        if negation == "annotated":
            annotated_leaf = annotated[leaf_of] & (leaf_category >= 0)
        holds = _can_hold(leaves, ops, lengths, present, annotated_leaf)
        formula_rows = np.flatnonzero(holds)
        if len(formula_rows) == 0:
            continue
        columns = np.concatenate([[0], labels,
                                  n_labels + np.flatnonzero(annotated)]).astype(np.int64)
        # Pixels with the same set of leaf labels (a "signature") are alike for every formula:
        # formulas are evaluated on the R signatures (R << S) and weighted by their pixel counts.
        signatures, pixel_signature, weight = _signatures(incidence)
        table = torch.zeros((len(labels) + 1, len(signatures)), dtype=torch.bool, device=dev)
        table[1:] = torch.from_numpy(np.ascontiguousarray(signatures.T)).to(dev)
        row_of = np.zeros(n_labels, dtype=np.int64)
        row_of[labels] = np.arange(1, len(labels) + 1)
        masks = _evaluate(leaves[formula_rows], ops[formula_rows], lengths[formula_rows], table,
                          row_of, annotated_leaf).to(torch.float64)              # (f, R)
        extended = torch.ones((len(signatures), len(columns)), dtype=torch.float64, device=dev)
        extended[:, 1:1 + len(labels)] = table[1:].T.to(torch.float64)
        weighted = extended * torch.from_numpy(weight).to(dev, torch.float64)[:, None]
        counts = (masks @ weighted).round().to(torch.int64).cpu().numpy()
        x_index.append((formula_rows[:, None] * n_columns + columns[None, :]).ravel())
        x_values.append(counts.ravel())
        local = np.full(len(leaves), -1, dtype=np.int64)
        local[formula_rows] = np.arange(len(formula_rows))
        pairs = np.flatnonzero(holds[pair_formula] & active[r, pair_unit])
        if len(pairs) == 0:
            continue
        units, unit_local = np.unique(pair_unit[pairs], return_inverse=True)
        up = upsample_maps(np.ascontiguousarray(acts[r, units]), (sh, sw))
        unit_masks = np.asarray(up).reshape(len(units), n_pixels) > below[units, None]
        # mask pixels of each unit per signature: (units, R)
        which, pixel = np.nonzero(unit_masks)
        per_signature = np.bincount(which * len(signatures) + pixel_signature[pixel],
                                    minlength=len(units) * len(signatures)).reshape(
                                        len(units), len(signatures))
        per_signature_t = torch.from_numpy(per_signature).to(dev, torch.float64)
        joint = masks[torch.from_numpy(local[pair_formula[pairs]]).to(dev)] \
            * per_signature_t[torch.from_numpy(unit_local.reshape(-1)).to(dev)]
        counts = (joint @ extended).round().to(torch.int64).cpu().numpy()
        y_index.append((pairs[:, None] * n_columns + columns[None, :]).ravel())
        y_values.append(counts.ravel())

    def pack(index: list[np.ndarray], values: list[np.ndarray], rows: int) -> SparseCounts:
        empty = SparseCounts((rows, n_columns), np.zeros(0, np.int64), np.zeros(0, np.int64))
        if not index:
            return empty
        return empty + SparseCounts((rows, n_columns), np.concatenate(index),
                                    np.concatenate(values))

    return (pack(x_index, x_values, len(leaves)), pack(y_index, y_values, len(pair_formula)))


def _count_chunk(reader: Any, dataset: Any, rows: Any, thresholds: np.ndarray,
                 leaf_category: np.ndarray, n_categories: int, leaves: np.ndarray,
                 ops: np.ndarray, lengths: np.ndarray, pair_formula: np.ndarray,
                 pair_unit: np.ndarray, negation: str, threads: int | None,
                 device: str | None) -> tuple[SparseCounts, SparseCounts]:
    set_task_threads(threads)
    acts = reader.read_rows(rows) if isinstance(rows, np.ndarray) else reader.read(*rows)
    seg, image_labels = dataset.load_segmentations(rows if isinstance(rows, np.ndarray)
                                                   else range(*rows))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return count_formulas(acts, seg, image_labels, thresholds, leaf_category, n_categories,
                          leaves, ops, lengths, pair_formula, pair_unit, negation, device)


def _wrap(value: Any, label: str) -> Any:
    return dask.delayed(value, name=f"{label}-{uuid.uuid4().hex}", traverse=False)


@dataclass
class _Context:
    """What every pass needs."""

    reader: Any
    dataset: Any
    task_rows: list[Any]
    thresholds: np.ndarray
    leaf_category: np.ndarray
    n_categories: int
    negation: str
    setup: SchedulerSetup
    device: str | None
    progress: Any = None

    def count(self, formulas: Sequence[Formula | None], pair_formula: np.ndarray,
              pair_unit: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """Dense X (F, G) and Y (P, G) over the selected images (one Dask graph)."""
        leaves, ops, lengths = formula_arrays(formulas, depth)
        source, data = _wrap(self.reader, "reader"), _wrap(self.dataset, "dataset")
        arrays = [_wrap(value, name) for value, name in (
            (self.thresholds, "thresholds"), (self.leaf_category, "leaf-category"),
            (leaves, "leaves"), (ops, "ops"), (lengths, "lengths"),
            (np.asarray(pair_formula, np.int64), "pair-formula"),
            (np.asarray(pair_unit, np.int64), "pair-unit"))]
        parts = [dask.delayed(_count_chunk, pure=False)(
            source, data, rows, arrays[0], arrays[1], self.n_categories, *arrays[2:],
            self.negation, self.setup.task_threads, self.device,
            dask_key_name=f"compose-{number}-{uuid.uuid4().hex}")
            for number, rows in enumerate(self.task_rows)]
        with torch_threads_kept():
            ((x, y),) = dask.compute(tree_reduce(parts, _sum_pairs), **self.setup.compute_kwargs)
        if self.progress is not None:
            self.progress.update(1)
        return x.dense(), y.dense()


#: Most images per task by default. A task's count entries grow with its images ((formula,
#: unit) pairs x the labels present, about 0.3 MB per image for 512 units and beam 5), unlike
#: the tally's fixed-size counts, so compose keeps its chunks small: peak memory then stops
#: growing with the dataset once it has 16 chunks of this size.
COMPOSE_CHUNK = 32


# ----------------------------------------------------------------------------- search
@dataclass
class _Base:
    """Pass-0 counts: n_pixels, label_area (G,), joint (U, G), mask_area (U,)."""

    n_pixels: int
    label_area: np.ndarray
    joint: np.ndarray

    @property
    def mask_area(self) -> np.ndarray:
        return self.joint[:, 0]


def _negation_domain(x: np.ndarray, y: np.ndarray, n_labels: int, domain_column: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(P, L) or (P, 1) arrays of d_c = |F and D_c| and e_c = |F and M and D_c|."""
    return x[:, domain_column], y[:, domain_column]


def _score_pairs(x_rows: np.ndarray, y: np.ndarray, units: np.ndarray, base: _Base,
                 n_labels: int, domain_column: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Extensions of P pairs: X rows (P, G), Y (P, G) -> (area, inter, iou) (P, 3, L)."""
    neg_area, neg_inter = _negation_domain(x_rows, y, n_labels, domain_column)
    return score_extensions(x_rows[:, 0], y[:, 0], base.mask_area[units], x_rows[:, :n_labels],
                            y[:, :n_labels], base.label_area[:n_labels],
                            base.joint[units, :n_labels], neg_area, neg_inter)


def _select(entries: dict[tuple, BeamEntry], ious: np.ndarray, order: np.ndarray,
            make: Any, beam: int) -> None:
    """Add to ``entries`` (canonical key -> entry) candidates in ``order`` (IoU descending)
    until ``beam`` distinct ones are in and the next IoU is below the beam-th one."""
    kth = None
    added = 0
    for flat in order.tolist():
        value = float(ious[flat])
        if kth is not None and value < kth:
            break
        entry = make(flat)
        key = entry.formula.key()
        if key not in entries:
            entries[key] = entry
            added += 1
            if added == beam:
                kth = value


def _top(entries: dict[tuple, BeamEntry], beam: int) -> list[BeamEntry]:
    return sorted(entries.values(), key=lambda e: sort_key(e.iou, e.formula))[:beam]


def _allowed_mask(formula: Formula, candidates: np.ndarray, op_codes: list[int]
                  ) -> np.ndarray:
    """bool (3, L): allowed (op, label) extensions of ``formula``."""
    allowed = np.zeros((len(OPS), len(candidates)), dtype=bool)
    row = candidates.copy()
    row[list(formula.labels)] = False
    allowed[op_codes] = row
    return allowed


def _initial_beams(base: _Base, candidates: np.ndarray, beam: int
                   ) -> tuple[list[list[BeamEntry]], np.ndarray, np.ndarray]:
    """Per unit the ``beam`` best single labels with IoU > 0 (ties: lower label number), and
    every unit's best single label and its IoU."""
    n_labels = candidates.shape[1]
    iou = iou_of(base.joint[:, :n_labels], base.label_area[None, :n_labels],
                 base.mask_area[:, None])
    iou = np.where(candidates, iou, 0.0)
    beams, best_label = [], np.zeros(len(iou), np.int64)
    best_iou = np.zeros(len(iou), np.float64)
    for u in range(len(iou)):
        order = np.argsort(-iou[u], kind="stable")[:beam]
        chosen = [c for c in order.tolist() if iou[u, c] > 0]
        beams.append([BeamEntry(Formula(c), int(base.label_area[c]), int(base.joint[u, c]),
                                float(iou[u, c])) for c in chosen])
        if chosen:
            best_label[u], best_iou[u] = chosen[0], iou[u, chosen[0]]
    return beams, best_label, best_iou


def _pair_batches(pairs: list[tuple[Formula, int]], n_columns: int
                  ) -> list[list[tuple[Formula, int]]]:
    """Split (formula, unit) pairs so that one pass's dense result stays bounded."""
    per_batch = max(1, _PASS_VALUES // max(1, 2 * n_columns))
    return [pairs[i:i + per_batch] for i in range(0, len(pairs), per_batch)]


def _run_pairs(context: _Context, pairs: list[tuple[Formula, int]], depth: int, n_columns: int
               ) -> list[tuple[np.ndarray, np.ndarray, list[tuple[Formula, int]]]]:
    """Passes over the images for (formula, unit) pairs: per batch (X rows per pair, Y, pairs)."""
    results = []
    for batch in _pair_batches(pairs, n_columns):
        formulas = sorted({f for f, _ in batch}, key=lambda f: f.key())
        index = {f: k for k, f in enumerate(formulas)}
        pair_formula = np.array([index[f] for f, _ in batch], dtype=np.int64)
        pair_unit = np.array([u for _, u in batch], dtype=np.int64)
        x, y = context.count(formulas, pair_formula, pair_unit, depth)
        results.append((x[pair_formula], y, batch))
    return results


def _beam_search(context: _Context, base: _Base, candidates: np.ndarray, beams: list[list[
        BeamEntry]], *, max_length: int, beam: int, ops: Sequence[str]) -> list[list[BeamEntry]]:
    """Beam steps (DESIGN.md §10) until max_length - 1 steps or no beam changes."""
    n_labels = candidates.shape[1]
    op_codes = [OP_CODES[op] for op in ops]
    domain_column = _domain_columns(context, n_labels)
    live = set(range(len(beams)))
    for _ in range(max_length - 1):
        pairs = sorted({(entry.formula, u) for u in live for entry in beams[u]
                        if entry.formula.length < max_length},
                       key=lambda p: (p[1], p[0].key()))
        if not pairs:
            break
        per_unit: dict[int, list] = {u: [] for u in live}
        for x_rows, y, batch in _run_pairs(context, pairs, max_length, n_labels +
                                           context.n_categories):
            units = np.array([u for _, u in batch], dtype=np.int64)
            area, inter, iou = _score_pairs(x_rows, y, units, base, n_labels, domain_column)
            for k, (formula, u) in enumerate(batch):
                allowed = _allowed_mask(formula, candidates[u], op_codes)
                values = np.where(allowed & (iou[k] > 0), iou[k], 0.0)
                per_unit[u].append((formula, area[k], inter[k], values))
        for u in sorted(live):
            entries = {entry.formula.key(): entry for entry in beams[u]}
            if per_unit[u]:
                stacked = np.stack([values for *_, values in per_unit[u]])  # (b, 3, L)
                flat = stacked.reshape(-1)
                positive = np.flatnonzero(flat > 0)
                order = positive[np.argsort(-flat[positive], kind="stable")]
                shape = stacked.shape

                def make(index: int, shape: tuple = shape, scored: list = per_unit[u]
                         ) -> BeamEntry:
                    parent, op, label = np.unravel_index(index, shape)
                    formula, area_k, inter_k, values = scored[parent]
                    return BeamEntry(formula.extend(OPS[op], int(label)).canonical(),
                                     int(area_k[op, label]), int(inter_k[op, label]),
                                     float(values[op, label]))

                _select(entries, flat, order, make, beam)
            new = _top(entries, beam)
            changed = [e.formula for e in new] != [e.formula for e in beams[u]]
            beams[u] = new
            if not changed:
                live.discard(u)
        if not live:
            break
    return beams


def _domain_columns(context: _Context, n_labels: int) -> np.ndarray:
    """Column of NOT c's domain per label: 0 (every pixel) for global negation, L + category
    for annotated; shape (1,) or (L,)."""
    if context.negation == "global":
        return np.zeros(1, dtype=np.int64)
    return n_labels + np.maximum(context.leaf_category, 0)


def _exact_search(context: _Context, base: _Base, candidates: np.ndarray,
                  incumbents: list[BeamEntry | None], *, max_length: int, ops: Sequence[str]
                  ) -> list[BeamEntry | None]:
    """Branch and bound: per unit the best formula (beam order) of at most ``max_length``
    leaves, pruning nodes whose :func:`subtree_bound` is below the incumbent's IoU (or 0)."""
    n_labels = candidates.shape[1]
    op_codes = [OP_CODES[op] for op in ops]
    domain_column = _domain_columns(context, n_labels)
    best = list(incumbents)
    m = base.mask_area
    label_area = base.label_area[:n_labels]

    def better(entry: BeamEntry, u: int) -> bool:
        current = best[u]
        return current is None or sort_key(entry.iou, entry.formula) < sort_key(
            current.iou, current.formula)

    def floor(u: int) -> float:
        return best[u].iou if best[u] is not None else 0.0

    # Level 1: single labels (their IoU is known from pass 0).
    frontier: dict[int, list[BeamEntry]] = {}
    for u in range(len(best)):
        labels = np.flatnonzero(candidates[u])
        area = label_area[labels]
        inter = base.joint[u, labels]
        ious = iou_of(inter, area, m[u])
        for c, a, i, value in zip(labels.tolist(), area.tolist(), inter.tolist(), ious.tolist()):
            entry = BeamEntry(Formula(c), int(a), int(i), float(value))
            if value > 0 and better(entry, u):
                best[u] = entry
        frontier[u] = [BeamEntry(Formula(c), int(a), int(i), float(v))
                       for c, a, i, v in zip(labels.tolist(), area.tolist(), inter.tolist(),
                                             ious.tolist())]
    for depth in range(1, max_length):
        remaining = max_length - depth
        pairs = []
        for u, nodes in frontier.items():
            if not nodes:
                continue
            bounds = subtree_bound(np.array([e.area for e in nodes]),
                                   np.array([e.inter for e in nodes]), int(m[u]),
                                   label_area, base.joint[u, :n_labels], base.n_pixels,
                                   remaining, ops)
            keep = (bounds >= floor(u)) & (bounds > 0)
            pairs += [(nodes[k].formula, u) for k in np.flatnonzero(keep).tolist()]
        if not pairs:
            break
        pairs.sort(key=lambda p: (p[1], p[0].key()))
        children: dict[int, dict[tuple, BeamEntry]] = {u: {} for u in frontier}
        for x_rows, y, batch in _run_pairs(context, pairs, max_length,
                                           n_labels + context.n_categories):
            units = np.array([u for _, u in batch], dtype=np.int64)
            area, inter, iou = _score_pairs(x_rows, y, units, base, n_labels, domain_column)
            for k, (formula, u) in enumerate(batch):
                allowed = _allowed_mask(formula, candidates[u], op_codes)
                op_index, labels = np.nonzero(allowed)
                values = iou[k][op_index, labels]
                areas = area[k][op_index, labels]
                inters = inter[k][op_index, labels]

                def entry_of(t: int, formula: Formula = formula, op_index: np.ndarray = op_index,
                             labels: np.ndarray = labels, areas: np.ndarray = areas,
                             inters: np.ndarray = inters, values: np.ndarray = values
                             ) -> BeamEntry:
                    return BeamEntry(formula.extend(OPS[op_index[t]], int(labels[t]))
                                     .canonical(), int(areas[t]), int(inters[t]),
                                     float(values[t]))

                # candidates for a new incumbent: children at or above its IoU
                for t in np.flatnonzero((values > 0) & (values >= floor(u))).tolist():
                    entry = entry_of(t)
                    if better(entry, u):
                        best[u] = entry
                if depth + 1 < max_length:
                    bounds = subtree_bound(areas, inters, int(m[u]), label_area,
                                           base.joint[u, :n_labels], base.n_pixels,
                                           max_length - depth - 1, ops)
                    for t in np.flatnonzero((bounds > 0) & (bounds >= floor(u))).tolist():
                        entry = entry_of(t)
                        children[u].setdefault(entry.formula.key(), entry)
        frontier = {u: sorted(nodes.values(), key=lambda e: e.formula.key())
                    for u, nodes in children.items()}
    return best


# ----------------------------------------------------------------------------- API
def _check_options(max_length: Any, beam: Any, ops: Any, candidates: Any, search: Any,
                   negation: Any) -> tuple[int, int, tuple[str, ...], str | int]:
    def positive(value: Any, option: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise OptionError(f"{option}: {value!r}; expected a positive integer")
        return int(value)

    max_length = positive(max_length, "--max-length")
    beam = positive(beam, "--beam")
    if isinstance(ops, str):
        ops = tuple(part.strip() for part in ops.split(",") if part.strip())
    ops = tuple(ops)
    unknown = [op for op in ops if op not in OPS]
    if unknown or not ops or len(set(ops)) != len(ops):
        raise OptionError(f"--ops: {','.join(map(str, ops))!r}; expected a non-empty list of "
                          f"distinct operators from {', '.join(OPS)}")
    ops = tuple(op for op in OPS if op in ops)
    if candidates != "all":
        candidates = positive(candidates, "--candidates") if not isinstance(candidates, str) \
            else candidates
        if isinstance(candidates, str):
            if not candidates.isdigit() or int(candidates) < 1:
                raise OptionError(f"--candidates: {candidates!r}; expected 'all' or a positive "
                                  f"integer K (the K best single labels of each unit)")
            candidates = int(candidates)
    if search not in SEARCHES:
        raise OptionError(f"--search: {search!r}; expected one of {', '.join(SEARCHES)}")
    if negation not in NEGATIONS:
        raise OptionError(f"--negation: {negation!r}; expected one of {', '.join(NEGATIONS)}")
    return max_length, beam, ops, candidates


def _open_reader(cache: Any) -> tuple[Any, str, str, Any]:
    """(reader, description, default layer, fingerprint) of a cache path or reader."""
    from dissect.record.cache import open_activations

    return open_activations(cache)


def compose_options(*, layer: str, thresholds: np.ndarray, max_length: int, beam: int,
                    ops: Sequence[str], categories: Sequence[str], candidates: str | int,
                    search: str, negation: str, dataset_fingerprint: str | None) -> dict[str, Any]:
    """The options recorded in compositional.json (what decides the result; not the scheduler,
    chunking or device, which never change it)."""
    digest = hashlib.sha256(np.asarray(thresholds, dtype=np.float64).tobytes()).hexdigest()
    return {"layer": layer, "max_length": int(max_length), "beam": int(beam), "ops": list(ops),
            "categories": list(categories), "candidates": candidates, "search": search,
            "negation": negation, "thresholds_sha256": digest,
            "dataset": dataset_fingerprint}


def compose_layer(
    cache: str | os.PathLike[str] | Any,
    dataset: Any,
    thresholds: np.ndarray | Sequence[float],
    *,
    layer: str | None = None,
    max_length: int = 3,
    beam: int = 5,
    ops: Sequence[str] | str = ("or", "and", "and_not"),
    categories: Sequence[str] | None = None,
    candidates: str | int = "all",
    search: str = "beam",
    negation: str = "global",
    chunk_size: int | None = None,
    scheduler: str = "threads",
    num_workers: int | None = None,
    device: str | None = None,
    fingerprint: Any = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> CompositionResult:
    """Compositional labels of every unit of one layer (DESIGN.md §10).

    Parameters
    ----------
    cache:
        Path of ``run_dir/cache/<layer>.h5`` or a picklable reader (``shape``, ``read``,
        ``read_rows``) of activations (N, U, h, w); row n is dataset image n.
    dataset:
        The ``BrodenDataset`` the cache was recorded on. Only ``dataset.labeled_images()`` take
        part (as in the tally); NOT is taken over every pixel of those images.
    thresholds:
        (U,) the layer's thresholds (``DissectionResult.thresholds`` of the tally), so the unit
        masks are exactly the tally's: ``upsample(acts) > threshold`` where the map max exceeds it.
    layer:
        Name stored in the result (default: from the cache).
    max_length:
        Most leaves of a formula (NOT adds none); 1 gives single labels.
    beam:
        Beam width.
    ops:
        Allowed operators, a subset of ``('or', 'and', 'and_not')`` (or ``'or,and'``).
    categories:
        Leaves are labels whose primary category is one of these (default every category of the
        dataset). Labels of no category are never leaves, nor is label 0.
    candidates:
        ``'all'`` (every leaf label present in the selected images) or K: per unit, only its K
        best single labels (IoU, ties to the lower number) may be leaves.
    search:
        ``'beam'`` or ``'exact'`` (branch and bound from the beam result; the reported formula is
        the optimum and ``optimal`` says whether the beam had found it).
    negation:
        ``'global'`` (NOT c = every selected pixel outside L_c) or ``'annotated'`` (only inside
        images having a label of c's primary category).
    chunk_size, scheduler, num_workers:
        Images per Dask task and the scheduler (see :func:`dissect.parallel.scheduler_context`);
        they never change the result.
    device:
        Torch device of the chunk work (default CUDA when available, else CPU).
    fingerprint:
        The cache fingerprint recorded with the result (default: the cache file's).
    out_dir:
        When given: if it holds a current result (same options, same fingerprint) that result is
        loaded and returned; otherwise the result is computed and saved there.
    progress:
        Show a tqdm bar of the passes on stderr.

    Returns
    -------
    CompositionResult.

    Raises
    ------
    OptionError
        For a bad option (named in the message); CacheError/DatasetError for unusable inputs.
    """
    max_length, beam, ops, candidates = _check_options(max_length, beam, ops, candidates,
                                                       search, negation)
    check_scheduler(scheduler)
    reader, where, default_layer, cache_fingerprint = _open_reader(cache)
    if fingerprint is None:
        fingerprint = cache_fingerprint
    shape = tuple(reader.shape)
    if len(shape) != 4:
        raise CacheError(f"{where}: activations of shape {shape}; expected (N, U, h, w)")
    if shape[0] != len(dataset):
        raise CacheError(f"{where} holds {shape[0]} images but dataset {dataset.root} has "
                         f"{len(dataset)}; record the cache on this dataset")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (shape[1],) or np.isnan(thresholds).any():
        raise OptionError(f"thresholds: shape {thresholds.shape}; expected ({shape[1]},) "
                          f"numbers, one per unit of the layer")
    all_categories = tuple(dataset.categories)
    if categories is None:
        chosen = all_categories
    else:
        chosen_list = [categories] if isinstance(categories, str) else list(categories)
        unknown = [c for c in chosen_list if c not in all_categories]
        if unknown:
            raise OptionError(f"--categories: unknown category {unknown[0]!r}; categories: "
                              f"{', '.join(all_categories)}")
        chosen = tuple(c for c in all_categories if c in chosen_list)
    vocab = dataset.vocab
    primary = np.asarray(vocab.primary, dtype=np.int64)
    chosen_index = [all_categories.index(c) for c in chosen]
    leaf_category = np.where(np.isin(primary, chosen_index), primary, -1)
    leaf_category[0] = -1
    name = layer or default_layer
    dataset_fingerprint = dataset.fingerprint() if hasattr(dataset, "fingerprint") else None
    options = compose_options(layer=name, thresholds=thresholds, max_length=max_length,
                              beam=beam, ops=ops, categories=chosen, candidates=candidates,
                              search=search, negation=negation,
                              dataset_fingerprint=dataset_fingerprint)
    if out_dir is not None and composition_is_current(out_dir, options, fingerprint):
        return load_composition(out_dir, vocab.names, primary)

    images = dataset.labeled_images() if hasattr(dataset, "labeled_images") else None
    if images is not None and len(images) == 0:
        raise DatasetError(f"{where}: no image of dataset {dataset.root} has a label in the "
                           f"selected categories ({', '.join(all_categories)})")
    seg_size = getattr(dataset, "seg_size", (0, 0))
    size = (min(default_chunk_size(shape, seg_size), COMPOSE_CHUNK) if chunk_size is None
            else check_chunk_size(chunk_size))
    if images is None or len(images) == shape[0]:
        task_rows: list[Any] = list(image_chunks(shape[0], size))
    else:
        task_rows = [np.asarray(images[a:b], np.int64) for a, b in image_chunks(len(images),
                                                                                 size)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"compose {name}", unit="pass", leave=False)
    n_labels = len(primary)
    try:
        with scheduler_context(scheduler, num_workers) as setup:
            context = _Context(reader, dataset, task_rows, thresholds, leaf_category,
                               len(all_categories), negation, setup, device, bar)
            x, joint = context.count([None], np.zeros(shape[1], np.int64),
                                     np.arange(shape[1], dtype=np.int64), 1)
            base = _Base(int(x[0, 0]), x[0], joint)
            present = (base.label_area[:n_labels] > 0) & (leaf_category >= 0)
            allowed = np.repeat(present[None, :], shape[1], axis=0)
            beams, best_label, best_iou = _initial_beams(base, allowed, beam)
            if candidates != "all":
                allowed = _top_candidates(base, allowed, int(candidates))
                beams, _, _ = _initial_beams(base, allowed, beam)
            beams = _beam_search(context, base, allowed, beams, max_length=max_length,
                                 beam=beam, ops=ops)
            exact: list[BeamEntry | None] = [None] * shape[1]
            if search == "exact":
                exact = _exact_search(context, base, allowed,
                                      [b[0] if b else None for b in beams],
                                      max_length=max_length, ops=ops)
    finally:
        if bar is not None:
            bar.close()
    units = [UnitComposition(u, int(base.mask_area[u]), beams[u], int(best_label[u]),
                             float(best_iou[u]), exact[u], search == "exact")
             for u in range(shape[1])]
    result = CompositionResult(name, options, _plain(fingerprint), list(vocab.names),
                               all_categories, primary, units)
    if out_dir is not None:
        result.save(out_dir)
    return result


def _top_candidates(base: _Base, allowed: np.ndarray, k: int) -> np.ndarray:
    """Per unit its k best single labels (IoU, ties to the lower number) among ``allowed``."""
    n_labels = allowed.shape[1]
    iou = iou_of(base.joint[:, :n_labels], base.label_area[None, :n_labels],
                 base.mask_area[:, None])
    iou = np.where(allowed, iou, -1.0)
    out = np.zeros_like(allowed)
    for u in range(len(iou)):
        order = np.argsort(-iou[u], kind="stable")[:k]
        order = order[iou[u, order] >= 0]
        out[u, order] = True
    return out
