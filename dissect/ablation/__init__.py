"""Causal effects of units: ablation hooks, per-class metrics and the PNAS 2020 studies.

- :func:`ablate_units` (context manager) replaces chosen units' output maps (rule ``zero`` or
  ``mean``) through a forward hook removed on exit; :func:`ablate_unit_sets` is the batched form
  (S unit sets in one forward along a replicated batch).
- :func:`class_metrics` defines the per-class metrics (accuracy, balanced accuracy, precision,
  recall, true-class probability; see :mod:`dissect.ablation.metrics`).
- :func:`load_class_labels` gives each image a class: an image-level category, a CSV, or the
  model's own predictions.
- :class:`AblationStudy` evaluates unit sets (single units, top-N per class and the complement,
  a concept's units, random sets) as Dask tasks, running only the part of the model after the
  layer from cached activations when the model is FX-traceable (:func:`split_at_layer`).
- :func:`run_ablation` does one study of a run directory's layer and writes
  ``<layer>/ablation.h5``, ``<layer>/ablation.csv`` (and ``<layer>/importance.csv``).
"""

from __future__ import annotations

from dissect.ablation.hooks import (
    ablate_unit_sets,
    ablate_units,
    apply_unit_masks,
    compute_unit_means,
    fill_values,
    register_rule,
    replace_output,
    rule_names,
)
from dissect.ablation.labels import load_class_labels, predict_classes, read_class_names
from dissect.ablation.metrics import (
    METRIC_NAMES,
    ClassCounts,
    class_metrics,
    count_classes,
    metrics_from_counts,
)
from dissect.ablation.result import (
    CSV_COLUMNS,
    IMPORTANCE_COLUMNS,
    AblationResult,
    RandomSummary,
    importance_table,
    load_ablation,
    rank_units,
    write_ablation_csv,
    write_importance_csv,
)
from dissect.ablation.runner import STUDIES, concept_units, run_ablation
from dissect.ablation.sources import DatasetImages, TensorRows
from dissect.ablation.study import AblationStudy, default_sizes, random_unit_sets
from dissect.ablation.suffix import split_at_layer

__all__ = [
    "CSV_COLUMNS",
    "IMPORTANCE_COLUMNS",
    "METRIC_NAMES",
    "STUDIES",
    "AblationResult",
    "AblationStudy",
    "ClassCounts",
    "DatasetImages",
    "RandomSummary",
    "TensorRows",
    "ablate_unit_sets",
    "ablate_units",
    "apply_unit_masks",
    "class_metrics",
    "compute_unit_means",
    "concept_units",
    "count_classes",
    "default_sizes",
    "fill_values",
    "importance_table",
    "load_ablation",
    "load_class_labels",
    "metrics_from_counts",
    "predict_classes",
    "random_unit_sets",
    "rank_units",
    "read_class_names",
    "register_rule",
    "replace_output",
    "rule_names",
    "run_ablation",
    "split_at_layer",
    "write_ablation_csv",
    "write_importance_csv",
]
