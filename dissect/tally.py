"""One layer's Network Dissection: thresholds, IoU counts, labels, and the outputs.

:func:`dissect_layer` runs DESIGN.md §3 on a layer's activation cache with the Dask graphs of
:mod:`dissect.parallel` and returns a :class:`DissectionResult`; ``result.save(layer_dir)`` writes

- ``<layer_dir>/dissection.h5``: datasets ``thresholds`` (U,) float64, ``label_area`` (L,) int64,
  ``intersection`` (U, L) int64, ``act_area`` (U, C) int64, ``iou`` (U, L) float64,
  ``cat_label`` (U, C) int64, ``cat_iou`` (U, C) float64, ``unit_label`` (U,) int64, ``unit_iou``
  (U,) float64, ``unit_category`` (U,) str, ``label_names`` (L,) str, ``primary`` (L,) int64;
  attributes ``layer``, ``categories``, ``quantile`` (NaN when thresholds were given),
  ``threshold_source`` ('quantile' | 'given'), ``union``, ``iou_threshold``, ``schema_version``.
  Label names are a dataset, not an attribute (HDF5 attributes are limited to 64 KB).
- ``<layer_dir>/tally.csv``: NetDissect-Lite's table (see :meth:`DissectionResult.table`).

:func:`load_dissection` reads ``dissection.h5`` back; :func:`summarize_detectors` counts the
units that detect a concept (IoU >= the threshold) and the unique concepts per category.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dissect.config import (
    UNION_RULES,
    check_choice,
    check_iou_threshold,
    check_quantile,
    check_scheduler,
    default_of,
)
from dissect.dissection import (  # noqa: F401 -- re-exported: the tally's result types
    DISSECTION_FILE,
    TALLY_FILE,
    DetectorSummary,
    DissectionResult,
    format_detectors,
    load_dissection,
    summarize_detectors,
    tally_columns,
)
from dissect.errors import CacheError, DatasetError, OptionError
from dissect.parallel import (
    ActivationReader,
    compute_counts,
    compute_thresholds,
    scheduler_context,
)

__all__ = [
    "UNION_RULES",
    "DISSECTION_FILE",
    "TALLY_FILE",
    "DissectionResult",
    "DetectorSummary",
    "dissect_layer",
    "load_dissection",
    "load_thresholds",
    "summarize_detectors",
    "tally_columns",
]

def load_thresholds(source: str | os.PathLike[str] | np.ndarray | Sequence[float],
                    n_units: int) -> np.ndarray:
    """Thresholds given by the user: an array or a ``.npy`` file of shape (U,).

    Returns
    -------
    float64 (U,).

    Raises
    ------
    OptionError
        Naming ``--thresholds`` when the file cannot be read, or the shape is not (U,), or a
        value is NaN.
    """
    where = "--thresholds"
    if isinstance(source, (str, os.PathLike)):
        where = f"--thresholds {os.fspath(source)}"
        try:
            values = np.load(source, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise OptionError(f"{where}: cannot read a .npy array of shape ({n_units},): "
                              f"{error}") from None
    else:
        values = source
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise OptionError(f"{where}: expected {n_units} numbers: {error}") from None
    if array.shape != (n_units,):
        raise OptionError(f"{where}: shape {array.shape}; expected ({n_units},), one threshold "
                          f"per unit of the layer")
    if np.isnan(array).any():
        raise OptionError(f"{where}: unit {int(np.flatnonzero(np.isnan(array))[0])} has a NaN "
                          f"threshold")
    return array


def _check_options(quantile: float, union: str, iou_threshold: float, scheduler: str) -> None:
    check_quantile(quantile)
    check_choice("--union", union, UNION_RULES)
    check_iou_threshold(iou_threshold)
    check_scheduler(scheduler)


def _open_reader(cache: str | os.PathLike[str] | ActivationReader) -> tuple[Any, str, str]:
    """(reader, description, default layer name) of a cache path or reader."""
    from dissect.record.cache import open_activations

    return open_activations(cache)[:3]


def _labeled_images(dataset: Any, where: str) -> np.ndarray | None:
    """Rows that take part in the dissection: images with a label in the selected categories
    (None: every image). DatasetError when there is none."""
    labeled = getattr(dataset, "labeled_images", None)
    if labeled is None:
        return None
    images = labeled()
    if len(images) == 0:
        raise DatasetError(f"{where}: no image of dataset {dataset.root} has a label in the "
                           f"selected categories ({', '.join(dataset.categories)})")
    return None if len(images) == len(dataset) else images


def dissect_layer(
    cache: str | os.PathLike[str] | ActivationReader,
    dataset: Any,
    *,
    layer: str | None = None,
    quantile: float = default_of("quantile"),
    thresholds: str | os.PathLike[str] | np.ndarray | None = None,
    union: str = default_of("union"),
    iou_threshold: float = default_of("iou_threshold"),
    chunk_size: int | None = None,
    scheduler: str = default_of("scheduler"),
    out_dir: str | os.PathLike[str] | None = None,
    num_workers: int | None = None,
    device: str | None = None,
) -> DissectionResult:
    """Network Dissection of one layer from its activation cache (DESIGN.md §3).

    Parameters
    ----------
    cache:
        Path of ``run_dir/cache/<layer>.h5`` (checked with ``dissect.record.open_cache``), or a
        picklable reader with ``shape`` and ``read(start, stop)`` (``CacheReader``).
    dataset:
        The ``BrodenDataset`` the cache was recorded on (row n = image n); its selected
        categories are the categories of the result. Labels of no selected category get IoU 0.
        Images with no label in the selected categories take no part (thresholds included),
        as in NetDissect-Lite.
    layer:
        Name stored in the result (default: the cache's fingerprint layer or file stem).
    quantile:
        q in [0, 1): threshold[u] is the (1 - q) quantile of the unit's activations.
    thresholds:
        Instead of the quantile: a (U,) array or a ``.npy`` file of one.
    union:
        ``'touched'`` (default, NetDissect-Lite), ``'annotated'`` or ``'all'`` (DESIGN §3).
    iou_threshold:
        A unit detects its concept when its IoU is at least this (default 0.04).
    chunk_size:
        Images per Dask task (default from the layer and segmentation sizes).
    scheduler:
        ``'threads'``, ``'processes'``, ``'synchronous'`` or ``'tcp://host:port'``.
    out_dir:
        When given, ``dissection.h5`` and ``tally.csv`` are written there.
    num_workers:
        Workers of the threads/processes schedulers (default: one per core).
    device:
        Torch device of the count tasks (default: CUDA when available, else CPU).

    Raises
    ------
    CacheError
        Missing/incomplete cache, or its number of images differs from the dataset's.
    OptionError
        Bad quantile, union, iou_threshold, scheduler or thresholds.
    """
    _check_options(quantile, union, iou_threshold, scheduler)
    reader, where, default_layer = _open_reader(cache)
    shape = tuple(reader.shape)
    if len(shape) != 4:
        raise CacheError(f"{where}: activations of shape {shape}; expected (N, U, h, w)")
    if shape[0] != len(dataset):
        raise CacheError(f"{where} holds {shape[0]} images but dataset {dataset.root} has "
                         f"{len(dataset)}; record the cache on this dataset (every image, no "
                         f"split selection)")
    given = None if thresholds is None else load_thresholds(thresholds, shape[1])
    images = _labeled_images(dataset, where)
    vocab = dataset.vocab
    categories = tuple(dataset.categories)
    primary = np.asarray(vocab.primary, dtype=np.int64)
    with scheduler_context(scheduler, num_workers) as setup:
        if given is None:
            values = compute_thresholds(reader, float(quantile), chunk_size=chunk_size,
                                        scheduler=setup, images=images)
        else:
            values = given
        counts = compute_counts(reader, dataset, values, primary=primary,
                                n_categories=len(categories), union=union,
                                chunk_size=chunk_size, scheduler=setup, device=device,
                                images=images)
    result = DissectionResult.from_counts(
        layer or default_layer, categories, values, counts, vocab.names, primary,
        iou_threshold=float(iou_threshold), quantile=None if given is not None else float(quantile),
        union=union)
    if out_dir is not None:
        result.save(out_dir)
    return result


