"""Per-class classification metrics from additive counts.

Every metric is a one-vs-rest quantity of one class ``c`` over the ``n`` evaluated images (all
images with a class, whatever their class):

- ``TP`` images of class c predicted as c; ``FN`` images of class c predicted as another output;
  ``FP`` images of another class predicted as c; ``TN = n - TP - FN - FP``.
- ``accuracy = (TP + TN) / n`` (accuracy of the one-vs-rest decision "is it c?").
- ``recall = TP / (TP + FN)``: the fraction of the class's images classified as the class (what the
  PNAS paper calls the class accuracy); NaN when the class has no image.
- ``true_negative_rate = TN / (TN + FP)``; ``balanced_accuracy = (recall + true_negative_rate) / 2``
  (NaN when either is undefined).
- ``precision = TP / (TP + FP)``; 0 when the class is never predicted (scikit-learn's
  ``zero_division=0`` convention, so that averages over repeated random ablations stay defined).
- ``true_class_prob``: the mean softmax probability of class c over the images of class c (NaN when
  the class has no image).
- ``n``: the number of evaluated images of class c (``TP + FN``).

The counts are additive over images, so chunks of images can be evaluated separately (in any order)
and summed; metrics are computed once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METRIC_NAMES: tuple[str, ...] = ("accuracy", "balanced_accuracy", "precision", "recall",
                                 "true_class_prob")
"""The metric columns of ``ablation.csv``, in order."""


@dataclass(frozen=True)
class ClassCounts:
    """Additive per-class counts for S evaluations (unit sets) of the same images.

    Attributes
    ----------
    true_positive : (S, C) int64
        Images of class c predicted as c.
    predicted : (S, C) int64
        Evaluated images predicted as c (of any class). Outputs >= C are counted nowhere.
    prob_sum : (S, C) float64
        Sum over the images of class c of the softmax probability of class c.
    n_true : (C,) int64
        Evaluated images of class c (the same for every evaluation).
    n_total : int
        Evaluated images.
    """

    true_positive: np.ndarray
    predicted: np.ndarray
    prob_sum: np.ndarray
    n_true: np.ndarray
    n_total: int

    def __add__(self, other: ClassCounts) -> ClassCounts:
        """Counts of the union of two disjoint image chunks (same evaluations)."""
        return ClassCounts(self.true_positive + other.true_positive,
                           self.predicted + other.predicted, self.prob_sum + other.prob_sum,
                           self.n_true + other.n_true, self.n_total + other.n_total)

    @staticmethod
    def zeros(n_sets: int, n_classes: int) -> ClassCounts:
        """Empty counts for ``n_sets`` evaluations of ``n_classes`` classes."""
        return ClassCounts(np.zeros((n_sets, n_classes), np.int64),
                           np.zeros((n_sets, n_classes), np.int64),
                           np.zeros((n_sets, n_classes), np.float64),
                           np.zeros(n_classes, np.int64), 0)

    @staticmethod
    def stack(parts: list[ClassCounts]) -> ClassCounts:
        """Concatenate the evaluations (rows) of counts taken over the same images."""
        if not parts:
            raise ValueError("stack needs at least one ClassCounts")
        first = parts[0]
        for part in parts[1:]:
            if part.n_total != first.n_total or not np.array_equal(part.n_true, first.n_true):
                raise ValueError("ClassCounts.stack: parts were counted over different images")
        return ClassCounts(np.concatenate([p.true_positive for p in parts]),
                           np.concatenate([p.predicted for p in parts]),
                           np.concatenate([p.prob_sum for p in parts]),
                           first.n_true.copy(), first.n_total)

    def select(self, rows: np.ndarray | list[int] | slice) -> ClassCounts:
        """The counts of some evaluations (rows)."""
        return ClassCounts(self.true_positive[rows], self.predicted[rows], self.prob_sum[rows],
                           self.n_true, self.n_total)


def count_classes(y_true: np.ndarray, y_pred: np.ndarray, true_prob: np.ndarray,
                  n_classes: int) -> ClassCounts:
    """Additive counts of S evaluations of the same n images.

    Parameters
    ----------
    y_true : (n,) int
        Class of each image, in ``[0, n_classes)``.
    y_pred : (n,) or (S, n) int
        Predicted output index (argmax) per evaluation; values >= ``n_classes`` (outputs that are
        no class) count as wrong for every class.
    true_prob : (n,) or (S, n) float
        Softmax probability of the image's true class, per evaluation.
    n_classes : int
        C, the number of classes.

    Returns
    -------
    ClassCounts with (S, C) arrays (S = 1 for 1-d ``y_pred``).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.atleast_2d(np.asarray(y_pred, dtype=np.int64))
    true_prob = np.atleast_2d(np.asarray(true_prob, dtype=np.float64))
    n_sets, n = y_pred.shape
    if y_true.shape != (n,) or true_prob.shape != (n_sets, n):
        raise ValueError(f"count_classes: shapes y_true {y_true.shape}, y_pred {y_pred.shape}, "
                         f"true_prob {true_prob.shape} do not match")
    if n and (y_true.min() < 0 or y_true.max() >= n_classes):
        raise ValueError(f"count_classes: y_true must lie in [0, {n_classes})")
    offsets = np.arange(n_sets, dtype=np.int64)[:, None] * n_classes
    true_index = offsets + y_true[None, :]
    size = n_sets * n_classes
    correct = (y_pred == y_true[None, :])
    true_positive = np.bincount(true_index[correct], minlength=size)
    in_range = (y_pred >= 0) & (y_pred < n_classes)
    predicted = np.bincount((offsets + y_pred)[in_range], minlength=size)
    prob_sum = np.bincount(true_index.ravel(), weights=true_prob.ravel(), minlength=size)
    return ClassCounts(true_positive.reshape(n_sets, n_classes).astype(np.int64),
                       predicted.reshape(n_sets, n_classes).astype(np.int64),
                       prob_sum.reshape(n_sets, n_classes).astype(np.float64),
                       np.bincount(y_true, minlength=n_classes).astype(np.int64), int(n))


def _ratio(numerator: np.ndarray, denominator: np.ndarray, empty: float) -> np.ndarray:
    """numerator / denominator as float64, ``empty`` where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.broadcast_to(np.asarray(denominator, dtype=np.float64), numerator.shape)
    out = np.full(numerator.shape, empty, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def metrics_from_counts(counts: ClassCounts) -> dict[str, np.ndarray]:
    """Per-class metrics (definitions in this module's docstring) from additive counts.

    Returns
    -------
    dict with ``n`` (C,) int64 and each of :data:`METRIC_NAMES` as (S, C) float64.
    """
    tp = counts.true_positive.astype(np.float64)
    n_true = counts.n_true.astype(np.float64)[None, :]
    false_negative = n_true - tp
    false_positive = counts.predicted - tp
    true_negative = counts.n_total - tp - false_negative - false_positive
    recall = _ratio(tp, n_true, np.nan)
    true_negative_rate = _ratio(true_negative, true_negative + false_positive, np.nan)
    return {
        "n": counts.n_true.copy(),
        "accuracy": _ratio(tp + true_negative, np.float64(counts.n_total), np.nan),
        "balanced_accuracy": (recall + true_negative_rate) / 2.0,
        "precision": _ratio(tp, tp + false_positive, 0.0),
        "recall": recall,
        "true_class_prob": _ratio(counts.prob_sum, n_true, np.nan),
    }


def class_metrics(y_true: np.ndarray, y_pred: np.ndarray, true_prob: np.ndarray,
                  n_classes: int) -> dict[str, np.ndarray]:
    """Per-class metrics of one evaluation of n images.

    Parameters
    ----------
    y_true : (n,) int in ``[0, n_classes)``
    y_pred : (n,) int, predicted output index (outputs >= ``n_classes`` are wrong for every class)
    true_prob : (n,) float, softmax probability of each image's true class
    n_classes : int, C

    Returns
    -------
    dict: ``n`` (C,) int64 (images per class) and ``accuracy``, ``balanced_accuracy``,
    ``precision``, ``recall``, ``true_class_prob`` as (C,) float64, defined in this module's
    docstring.
    """
    metrics = metrics_from_counts(count_classes(y_true, y_pred, true_prob, n_classes))
    return {name: (value if name == "n" else value[0]) for name, value in metrics.items()}
