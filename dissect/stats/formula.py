"""Compositional labels: formulas, their canonical form, and scoring from count vectors.

Pure array code for DESIGN.md §10 (no I/O, no Dask, no device choice).

A formula is left-deep: ``F ::= c | F OR c | F AND c | F AND NOT c`` over label numbers c.
:class:`Formula` holds it as its first leaf and a sequence of ``(op, label)`` steps, with ``op``
one of :data:`OPS` (``'or'``, ``'and'``, ``'and_not'``). Equal formulas are merged by
:func:`canonical_key`: runs of one operator are flattened into a sorted set, and ``AND NOT c`` is
``AND (NOT c)``. :meth:`Formula.canonical` gives the one left-deep representative of a canonical
form (the compound part first, then plain leaves by label number, then negated leaves), so a
formula's text never depends on the order in which a search found it.

Scoring: with ``a = |F|``, ``i = |F and M|``, ``m = |M|``, ``l_c = |L_c|``, ``j_c = |L_c and M|``,
``x_c = |F and L_c|``, ``y_c = |F and M and L_c|`` (all exact integer counts over the selected
pixels), every one-label extension of F has

- OR c: area ``a + l_c - x_c``, intersection ``i + j_c - y_c``;
- AND c: area ``x_c``, intersection ``y_c``;
- AND NOT c: area ``d_c - x_c``, intersection ``e_c - y_c``, with ``d_c = a``, ``e_c = i`` for
  global negation, or ``d_c = |F and D_c|``, ``e_c = |F and M and D_c|`` (D_c: pixels of the
  images annotated in c's category) for annotated negation;

and ``IoU = inter / (area + m - inter)`` (0 when the denominator is 0).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dissect.config import FORMULA_OPS

__all__ = [
    "OPS",
    "OP_CODES",
    "Formula",
    "canonical_key",
    "formula_arrays",
    "iou_of",
    "one_step_bounds",
    "score_extensions",
    "sort_key",
    "subtree_bound",
]

#: Operators, in the order of their integer codes (0, 1, 2): the registry
#: :data:`dissect.config.FORMULA_OPS` under this module's name for it.
OPS: tuple[str, ...] = FORMULA_OPS
OP_CODES: dict[str, int] = {op: code for code, op in enumerate(OPS)}
_TEXT = {"or": "OR", "and": "AND", "and_not": "AND NOT"}

# Canonical tree nodes (nested tuples, totally ordered): (0, c) leaf, (1, c) NOT leaf,
# (2, children) OR of a sorted tuple of children, (3, children) AND.
_LEAF, _NOT, _OR, _AND = 0, 1, 2, 3


@dataclass(frozen=True, order=False)
class Formula:
    """A left-deep formula: ``first`` then ``steps`` ((op, label), ...) applied in order.

    Attributes
    ----------
    first:
        Label number of the first leaf (> 0).
    steps:
        ``((op, label), ...)``; op in :data:`OPS`.
    """

    first: int
    steps: tuple[tuple[str, int], ...] = ()

    @property
    def labels(self) -> tuple[int, ...]:
        """Label numbers of the leaves, in formula order."""
        return (self.first,) + tuple(label for _, label in self.steps)

    @property
    def length(self) -> int:
        """Number of leaves (NOT adds none)."""
        return 1 + len(self.steps)

    def extend(self, op: str, label: int) -> Formula:
        """``self op label`` (not canonicalised)."""
        if op not in OP_CODES:
            raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
        return Formula(self.first, self.steps + ((op, int(label)),))

    def key(self) -> tuple:
        """The canonical form (see :func:`canonical_key`)."""
        return canonical_key(self)

    def canonical(self) -> Formula:
        """The left-deep representative of this formula's canonical form."""
        return _render(canonical_key(self))

    def text(self, names: Sequence[str]) -> str:
        """``(water OR river) AND NOT boat``: upper-case operators, parentheses around every inner
        binary formula; ``names[c]`` names label c."""
        text = names[self.first]
        for number, (op, label) in enumerate(self.steps):
            if number:
                text = f"({text})"
            text = f"{text} {_TEXT[op]} {names[label]}"
        return text

    def ids(self) -> list[Any]:
        """JSON-able ids: ``[first, [op, label], ...]``, e.g. ``[12, ["or", 40]]``."""
        return [self.first] + [[op, label] for op, label in self.steps]

    def ids_json(self) -> str:
        """:meth:`ids` as compact JSON text."""
        return json.dumps(self.ids(), separators=(",", ":"))

    @classmethod
    def from_ids(cls, ids: Sequence[Any]) -> Formula:
        """Inverse of :meth:`ids`."""
        return cls(int(ids[0]), tuple((str(op), int(label)) for op, label in ids[1:]))


def canonical_key(formula: Formula) -> tuple:
    """Canonical form of a left-deep formula as a nested tuple (hashable, totally ordered).

    Runs of one operator are flattened into a sorted set of children; ``AND NOT c`` joins an AND
    run as the child ``NOT c``. Two left-deep formulas have equal keys exactly when they are the
    same formula up to the order of the operands of OR and AND.
    """
    node: tuple = (_LEAF, int(formula.first))
    for op, label in formula.steps:
        item = (_NOT, int(label)) if op == "and_not" else (_LEAF, int(label))
        kind = _OR if op == "or" else _AND
        if node[0] == kind:
            node = (kind, tuple(sorted(node[1] + (item,))))
        else:
            node = (kind, tuple(sorted((node, item))))
    return node


def _render(node: tuple) -> Formula:
    """The left-deep formula of a canonical node: the compound child first, then the plain
    leaves by label number, then the negated ones."""
    if node[0] == _LEAF:
        return Formula(node[1])
    kind, children = node
    compound = [child for child in children if child[0] in (_OR, _AND)]
    plain = sorted(child[1] for child in children if child[0] == _LEAF)
    negated = sorted(child[1] for child in children if child[0] == _NOT)
    if compound:
        base = _render(compound[0])
    else:
        base = Formula(plain.pop(0))
    op = "or" if kind == _OR else "and"
    steps = base.steps + tuple((op, c) for c in plain) + tuple(("and_not", c) for c in negated)
    return Formula(base.first, steps)


def sort_key(iou: float, formula: Formula) -> tuple:
    """The beam order: IoU descending, then fewer leaves, then canonical form."""
    return (-float(iou), formula.length, canonical_key(formula))


def iou_of(inter: np.ndarray, area: np.ndarray, mask_area: np.ndarray | int) -> np.ndarray:
    """``inter / (area + m - inter)``, 0 where the denominator is 0 (float64, any shape)."""
    inter = np.asarray(inter, dtype=np.int64)
    denominator = np.asarray(area, dtype=np.int64) + np.asarray(mask_area, np.int64) - inter
    out = np.zeros(np.broadcast(inter, denominator).shape, dtype=np.float64)
    np.divide(inter, denominator, out=out, where=denominator > 0)
    return out


def score_extensions(area: np.ndarray, inter: np.ndarray, mask_area: np.ndarray,
                     x: np.ndarray, y: np.ndarray, label_area: np.ndarray, joint: np.ndarray,
                     neg_area: np.ndarray, neg_inter: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area, intersection and IoU of every one-label extension of P (formula, unit) pairs.

    Parameters
    ----------
    area, inter, mask_area:
        int64 (P,): a = |F|, i = |F and M_u|, m = |M_u| of each pair.
    x, y:
        int64 (P, L): |F and L_c| and |F and M_u and L_c|.
    label_area:
        int64 (L,): l_c = |L_c|.
    joint:
        int64 (P, L): j_c = |L_c and M_u| (the pair's unit's row).
    neg_area, neg_inter:
        int64 (P, L) or (P, 1): the domain of NOT c intersected with F (d_c) and with F and M_u
        (e_c): ``area[:, None]`` / ``inter[:, None]`` for global negation.

    Returns
    -------
    (ext_area int64 (P, 3, L), ext_inter int64 (P, 3, L), iou float64 (P, 3, L)); axis 1 is
    :data:`OPS` order (or, and, and_not).
    """
    a = np.asarray(area, np.int64)[:, None]
    i = np.asarray(inter, np.int64)[:, None]
    x = np.asarray(x, np.int64)
    y = np.asarray(y, np.int64)
    ext_area = np.stack([a + np.asarray(label_area, np.int64)[None, :] - x, x,
                         np.asarray(neg_area, np.int64) - x], axis=1)
    ext_inter = np.stack([i + np.asarray(joint, np.int64) - y, y,
                          np.asarray(neg_inter, np.int64) - y], axis=1)
    iou = iou_of(ext_inter, ext_area, np.asarray(mask_area, np.int64)[:, None, None])
    return ext_area, ext_inter, iou


def one_step_bounds(area: np.ndarray, inter: np.ndarray, mask_area: int, label_area: np.ndarray,
                    joint: np.ndarray, n_pixels: int) -> np.ndarray:
    """Admissible upper bounds on the IoU of ``F op c`` from (a, i) of F alone (no x, y).

    With FP = a - i the false positives of F, fp_c = l_c - j_c those of L_c, N the selected
    pixels and IoU = inter / (m + false positives):

    - OR: inter <= min(i + j_c, m), false positives >= max(FP, fp_c);
    - AND: inter <= min(i, j_c), false positives >= max(0, fp_c - (N - m - FP)) (the pixels of
      L_c outside M that F misses are at most N - m - FP);
    - AND NOT (global or annotated): inter = i - y_c with y_c >= i + j_c - m, so
      inter <= min(i, m - j_c); false positives >= max(0, FP - fp_c).

    These tighten DESIGN.md §10's bounds (AND's false-positive term and AND NOT's numerator).

    Parameters
    ----------
    area, inter:
        int64 (P,) a and i of P formulas (one unit).
    mask_area:
        m of the unit.
    label_area, joint:
        int64 (L,) l_c and j_c (the unit's row).
    n_pixels:
        N, every pixel of the selected images.

    Returns
    -------
    float64 (P, 3, L), :data:`OPS` order.
    """
    a = np.asarray(area, np.float64)[:, None]
    i = np.asarray(inter, np.float64)[:, None]
    m = float(mask_area)
    lc = np.asarray(label_area, np.float64)[None, :]
    j = np.asarray(joint, np.float64)[None, :]
    fp, fp_c = a - i, lc - j
    with np.errstate(divide="ignore", invalid="ignore"):
        bound_or = np.minimum(i + j, m) / (m + np.maximum(fp, fp_c))
        bound_and = np.minimum(i, j) / (m + np.maximum(0.0, fp_c - (n_pixels - m - fp)))
        bound_not = np.minimum(i, m - j) / (m + np.maximum(0.0, fp - fp_c))
    out = np.stack(np.broadcast_arrays(bound_or, bound_and, bound_not), axis=1)
    return np.nan_to_num(out, nan=0.0, posinf=0.0)


def subtree_bound(area: np.ndarray, inter: np.ndarray, mask_area: int, label_area: np.ndarray,
                  joint: np.ndarray, n_pixels: int, remaining: int, ops: Sequence[str],
                  block: int = 256) -> np.ndarray:
    """Admissible upper bound on the IoU of every formula that extends F by 1..remaining leaves.

    ``remaining == 1``: the best :func:`one_step_bounds` over labels and allowed operators.
    ``remaining >= 2``: every descendant G has inter(G) <= min(m, i + the sum of the
    ``remaining`` largest j_c) when OR is allowed (else <= i), and false positives >= FP(F) when
    OR is the only operator (OR never removes a pixel), else >= 0.

    Parameters
    ----------
    area, inter:
        int64 (P,) a and i of P formulas of one unit.
    mask_area, label_area, joint, n_pixels:
        As :func:`one_step_bounds`.
    remaining:
        Leaves that may still be added (>= 1).
    ops:
        The allowed operators.

    Returns
    -------
    float64 (P,).
    """
    area = np.asarray(area, np.int64)
    inter = np.asarray(inter, np.int64)
    m = int(mask_area)
    if m == 0 or len(area) == 0:
        return np.zeros(len(area), np.float64)
    if remaining == 1:
        return _one_step_max(area, inter, m, np.asarray(label_area, np.int64),
                             np.asarray(joint, np.int64), int(n_pixels), ops)
    if "or" in ops:
        top = np.sort(np.asarray(joint, np.int64))[::-1][:remaining].sum()
        best_inter = np.minimum(inter + top, m)
    else:
        best_inter = inter
    false_positives = (area - inter) if set(ops) == {"or"} else np.zeros_like(area)
    return best_inter / (m + false_positives).astype(np.float64)


def _one_step_max(area: np.ndarray, inter: np.ndarray, m: int, label_area: np.ndarray,
                  joint: np.ndarray, n_pixels: int, ops: Sequence[str]) -> np.ndarray:
    """max over labels d and allowed ops of an upper bound of :func:`one_step_bounds`, in
    O(log L) per formula (closed forms, each >= the per-label bound it replaces):

    - OR, labels with fp_d <= FP: min(i + max j_d, m) / (m + FP) (prefix max over fp order);
      labels with fp_d > FP: i / (m + FP) + max j_d / (m + fp_d) (suffix max), capped at 1;
    - AND: min(i, max j_d) / m;
    - AND NOT: min(i, m - min j_d) / (m + max(0, FP - max fp_d)).
    """
    a = area.astype(np.float64)
    i = inter.astype(np.float64)
    fp = a - i
    fp_d = (label_area - joint).astype(np.float64)
    j = joint.astype(np.float64)
    out = np.zeros(len(area), np.float64)
    if len(j) == 0:
        return out
    if "or" in ops:
        order = np.argsort(fp_d, kind="stable")
        sorted_fp = fp_d[order]
        prefix = np.maximum.accumulate(j[order])
        ratio = j[order] / (m + sorted_fp)
        suffix = np.maximum.accumulate(ratio[::-1])[::-1]
        split = np.searchsorted(sorted_fp, fp, side="right")     # labels [0, split): fp_d <= FP
        low = np.where(split > 0, np.minimum(i + prefix[np.maximum(split - 1, 0)], m)
                       / (m + fp), 0.0)
        high = np.where(split < len(j), np.minimum(
            1.0, i / (m + fp) + suffix[np.minimum(split, len(j) - 1)]), 0.0)
        out = np.maximum(out, np.maximum(low, high))
    if "and" in ops:
        out = np.maximum(out, np.minimum(i, j.max()) / m)
    if "and_not" in ops:
        out = np.maximum(out, np.minimum(i, m - j.min()) / (m + np.maximum(0.0, fp - fp_d.max())))
    return out


def formula_arrays(formulas: Sequence[Formula | None], depth: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Formulas as arrays for chunk evaluation.

    ``None`` stands for the formula "every pixel" (length 0), used for the base counts.

    Returns
    -------
    (leaves int64 (F, D) with -1 padding, ops int64 (F, D) with -1 padding (ops[:, k] combines
    leaf k, ops[:, 0] is -1), lengths int64 (F,)).
    """
    lengths = np.array([0 if f is None else f.length for f in formulas], dtype=np.int64)
    width = max(1, int(lengths.max(initial=0)) if depth is None else int(depth))
    leaves = np.full((len(formulas), width), -1, dtype=np.int64)
    codes = np.full((len(formulas), width), -1, dtype=np.int64)
    for row, formula in enumerate(formulas):
        if formula is None:
            continue
        leaves[row, :formula.length] = formula.labels
        codes[row, 1:formula.length] = [OP_CODES[op] for op, _ in formula.steps]
    return leaves, codes, lengths
