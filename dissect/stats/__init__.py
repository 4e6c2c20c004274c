"""Pure array stage functions of Network Dissection (no I/O, no printing, no device choice).

- :class:`TopKQuantile`: exact streaming per-unit quantile (thresholds, DESIGN.md §3 step 1).
- :func:`upsample_maps`, :func:`count_iou`, :class:`IoUCounts`: masks and additive IoU counts of
  a chunk of images (steps 2-3).
- :func:`iou_from_counts`, :func:`best_labels`: IoU and labels from summed counts (steps 4-5).
"""

from dissect.stats.iou import (
    UNION_RULES,
    IoUCounts,
    best_category,
    best_labels,
    count_iou,
    iou_from_counts,
    threshold_below,
    unit_order,
    upsample_maps,
    upsample_pixel_major,
)
from dissect.stats.quantile import TopKQuantile, quantile_positions

__all__ = [
    "UNION_RULES",
    "IoUCounts",
    "TopKQuantile",
    "best_labels",
    "best_category",
    "unit_order",
    "count_iou",
    "iou_from_counts",
    "quantile_positions",
    "threshold_below",
    "upsample_maps",
    "upsample_pixel_major",
]
