"""dissect: what the units of a trained vision model detect, and what they do.

The pipeline (see docs/internals.md): :mod:`dissect.data` reads a Broden-style dataset,
:mod:`dissect.record` records layer activations into an HDF5 cache, :mod:`dissect.tally` computes
thresholds and unit/concept IoU with Dask (:mod:`dissect.parallel`, :mod:`dissect.stats`),
:mod:`dissect.ablation` measures causal effects and :mod:`dissect.report` writes HTML reports.
"""

from __future__ import annotations

__version__ = "0.1.0"

from dissect.errors import (  # noqa: E402
    CacheError,
    DatasetError,
    DissectError,
    LayerError,
    ModelError,
    OptionError,
)

__all__ = [
    "__version__",
    "DissectError",
    "DatasetError",
    "ModelError",
    "LayerError",
    "CacheError",
    "OptionError",
]
