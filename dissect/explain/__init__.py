"""Explanations of predictions by the dissected concepts of a layer (DESIGN.md §11).

- :func:`explain_prediction`: per image and target class, each unit's contribution r_u, the
  contributions summed by concept (with an ``unlabeled`` bucket), shares, concept and Grad-CAM maps;
- :func:`explain_class`: a class's concept profile (mean contributions over its images);
- :func:`input_attributions`: input-space maps (saliency, integrated gradients, occlusion,
  Grad-CAM) from captum;
- :func:`write_explanations`: ``RUN_DIR/explain/<name>.json`` and the heatmap PNGs.
"""

from __future__ import annotations

from dissect.explain.attributions import ATTRIBUTION_METHODS, input_attributions
from dissect.explain.core import (
    GROUP_BY,
    METHODS,
    UNLABELED,
    ClassProfile,
    ConceptContribution,
    ConceptGroups,
    Explanation,
    attribute_batch,
    concept_groups,
    explain_class,
    explain_prediction,
)
from dissect.explain.files import MAP_KINDS, heatmap_overlay, write_explanations

__all__ = [
    "ATTRIBUTION_METHODS",
    "GROUP_BY",
    "MAP_KINDS",
    "METHODS",
    "UNLABELED",
    "ClassProfile",
    "ConceptContribution",
    "ConceptGroups",
    "Explanation",
    "attribute_batch",
    "concept_groups",
    "explain_class",
    "explain_prediction",
    "heatmap_overlay",
    "input_attributions",
    "write_explanations",
]
