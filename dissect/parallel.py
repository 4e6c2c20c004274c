"""Dask graphs of the dissection stage: map over image chunks of the cache, tree-reduce.

Only graph building and scheduling live here; the array work is in :mod:`dissect.stats`. Every
reduction is exact (integer sums, top-K merges), so results are bit-identical for any chunking
and any scheduler (DESIGN.md §5).

Schedulers (``--scheduler``): ``'threads'`` (default), ``'processes'``, ``'synchronous'``, or the
``tcp://host:port`` address of a running ``dask.distributed`` scheduler, whose workers must be
able to read the cache and the dataset at the same paths.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import dask
import dask.local
import dask.multiprocessing
import dask.threaded
import numpy as np
import torch
from dask.multiprocessing import initialize_worker_process

from dissect.config import SCHEDULERS, UNION_RULES
from dissect.config import check_scheduler as _check_scheduler_name
from dissect.errors import DissectError, OptionError
from dissect.stats import IoUCounts, TopKQuantile, count_iou

__all__ = [
    "SCHEDULERS",
    "SchedulerSetup",
    "check_scheduler",
    "scheduler_context",
    "default_chunk_size",
    "image_chunks",
    "tree_reduce",
    "compute_thresholds",
    "compute_counts",
    "check_images",
]

_ALLOWED = (f"{', '.join(SCHEDULERS)} or tcp://host:port of a dask.distributed scheduler")

# A chunk's activations (float32) and label maps (int64 on the compute device) stay under this.
_CHUNK_BYTES = 48 * 1024 * 1024
_MAX_CHUNK = 256
_FAN_IN = 8
#: What one merge of threshold states may hold: its input states and its result. The merge
#: tree's fan-in is the most states that fit (2 to _FAN_IN): a merge of f states partitions
#: f K values down to K, so the tree partitions n_tasks K f / (f - 1) values in all (2 n_tasks K
#: for f = 2), which dominates the thresholds of a large dataset (docs/benchmarks.md).
_MERGE_BYTES = 256 * 1024 * 1024


class ActivationReader(Protocol):
    """What the graphs need of :class:`dissect.record.CacheReader` (picklable)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...

    # read_rows(indices) -> np.ndarray is also needed when an ``images`` subset is given.


class SegmentationSource(Protocol):
    """What the graphs need of :class:`dissect.data.BrodenDataset` (picklable)."""

    def load_segmentations(self, indices: Sequence[int] | range
                           ) -> tuple[np.ndarray, np.ndarray]: ...


def check_scheduler(scheduler: str) -> str:
    """Validate a ``--scheduler`` value; returns it. OptionError names the allowed values.

    :func:`dissect.config.check_scheduler` (the names of ``SCHEDULERS`` or an address), and an
    address must name a host and a numeric port.
    """
    name = _check_scheduler_name(scheduler)
    if name not in SCHEDULERS:
        host, _, port = name.partition("://")[2].rpartition(":")
        if not (host and port.isdigit()):
            raise OptionError(f"--scheduler: {scheduler!r} is not a scheduler; expected "
                              f"{_ALLOWED}")
    return name


@dataclass(frozen=True)
class SchedulerSetup:
    """How to run a graph: keyword arguments for ``dask.compute`` and torch threads per task.

    The local schedulers are given as their functions, not their names: for a name,
    ``dask.compute`` imports ``distributed`` to look for a client (0.2 s and 12 MB in every
    process that computes).

    Tasks of the threads and processes pools use one torch thread each (the Dask workers are the
    parallelism); the synchronous scheduler lets torch use every core; ``task_threads`` is None
    where tasks should leave torch's thread count alone (distributed workers get
    OMP_NUM_THREADS=1 from their nanny).
    """

    compute_kwargs: dict[str, Any] = field(default_factory=dict)
    task_threads: int | None = None


@contextmanager
def scheduler_context(scheduler: str = "threads", num_workers: int | None = None, *,
                      timeout: str = "20s") -> Iterator[SchedulerSetup]:
    """Set up a scheduler for ``dask.compute`` and tear it down afterwards.

    Parameters
    ----------
    scheduler:
        ``'threads'``, ``'processes'``, ``'synchronous'`` or ``'tcp://host:port'``.
    num_workers:
        Workers of the threads/processes pools (default: one per CPU core); ignored by the
        others.
    timeout:
        How long to try connecting to a distributed scheduler (a Dask time string).

    Yields
    ------
    SchedulerSetup: use as ``dask.compute(graph, **setup.compute_kwargs)``, or pass it as the
    ``scheduler`` of :func:`compute_thresholds` / :func:`compute_counts` to run several graphs on
    one setup. ``'processes'`` starts one process pool for the block; for a distributed scheduler
    a ``distributed.Client`` is connected for the block. Both are closed after it (a distributed
    cluster itself is left running).

    Raises
    ------
    OptionError
        For an unknown scheduler; DissectError when a distributed scheduler cannot be reached.
    """
    name = check_scheduler(scheduler)
    cores = os.cpu_count() or 1
    if name == "synchronous":
        yield SchedulerSetup({"scheduler": dask.local.get_sync}, None)
        return
    if name in ("threads", "processes"):
        workers = cores if num_workers is None else int(num_workers)
        if workers < 1:
            raise OptionError(f"num_workers: {num_workers!r} must be >= 1")
        threads = 1        # parallelism comes from the Dask workers: one torch thread each
        if name == "threads":
            yield SchedulerSetup({"scheduler": dask.threaded.get, "num_workers": workers},
                                 threads)
            return
        # One process pool for every graph of the block (worker start-up is paid once). Tasks
        # are sent one at a time: dask.multiprocessing batches 6 by default, which hands one
        # worker 10 of 16 chunks while the other idles (our tasks are large, so one at a time
        # costs nothing).
        context = multiprocessing.get_context(dask.config.get("multiprocessing.context", "spawn"))
        with ProcessPoolExecutor(workers, mp_context=context,
                                 initializer=initialize_worker_process) as pool:
            yield SchedulerSetup({"scheduler": dask.multiprocessing.get, "pool": pool,
                                  "chunksize": 1}, threads)
        return
    from distributed import Client

    try:
        client = Client(name, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as error:
        raise DissectError(f"--scheduler: cannot connect to the dask scheduler at {name}: "
                           f"{error}") from None
    with client:
        yield SchedulerSetup({"scheduler": client.get}, None)


def _use_scheduler(scheduler: str | SchedulerSetup, num_workers: int | None
                   ) -> Any:
    """A context yielding ``scheduler`` itself when it is already a SchedulerSetup."""
    if isinstance(scheduler, SchedulerSetup):
        return nullcontext(scheduler)
    return scheduler_context(scheduler, num_workers)


def set_task_threads(threads: int | None) -> None:
    """Inside a task: use ``threads`` torch threads (None: leave the count alone).

    torch's thread count is one setting of the whole process, so tasks running side by side
    must not save and restore it (they would restore each other's values and could leave it at
    1); the caller of ``dask.compute`` restores it once with :func:`torch_threads_kept`.
    """
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


_THREADS_GUARD = threading.Lock()
_THREADS_STATE = {"depth": 0, "saved": 0}


@contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restore torch's thread count after the block (a compute whose tasks may change it).

    Blocks may overlap (two dissections from two threads): the first to enter saves the count
    and the last to leave restores it, so none restores a value a task had set.
    """
    with _THREADS_GUARD:
        if _THREADS_STATE["depth"] == 0:
            _THREADS_STATE["saved"] = torch.get_num_threads()
        _THREADS_STATE["depth"] += 1
    try:
        yield
    finally:
        with _THREADS_GUARD:
            _THREADS_STATE["depth"] -= 1
            if _THREADS_STATE["depth"] == 0:
                torch.set_num_threads(_THREADS_STATE["saved"])


def check_chunk_size(chunk_size: int) -> int:
    """A positive number of images per chunk (OptionError otherwise)."""
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
        raise OptionError(f"chunk_size: expected a positive number of images, got {chunk_size!r}")
    return int(chunk_size)


def default_chunk_size(shape: Sequence[int], seg_size: tuple[int, int] = (0, 0),
                       seg_layers: int = 4) -> int:
    """Images per chunk: a chunk's arrays stay near 48 MB (at most 256 images), and a dataset
    of 128 images or more makes at least 16 chunks (so the workers stay balanced).

    Parameters
    ----------
    shape:
        The cache's (N, U, h, w).
    seg_size:
        (sh, sw) of the label maps; seg_layers: expected pixel layers per image.
    """
    values = int(np.prod(shape[1:]))
    per_image = 4 * values + 4 * seg_layers * int(seg_size[0]) * int(seg_size[1])
    by_memory = max(1, min(_MAX_CHUNK, _CHUNK_BYTES // max(per_image, 1)))
    by_balance = max(8, -(-int(shape[0]) // 16))
    return int(min(by_memory, by_balance))


def image_chunks(n_images: int, chunk_size: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] covering range(n_images) in chunks of ``chunk_size`` images."""
    if int(chunk_size) < 1:
        raise OptionError(f"chunk_size: {chunk_size!r} must be >= 1")
    return [(start, min(start + int(chunk_size), n_images))
            for start in range(0, n_images, int(chunk_size))]


def tree_reduce(parts: list[Any], combine: Callable[..., Any], fan_in: int = _FAN_IN) -> Any:
    """Reduce delayed ``parts`` with ``combine(*group)`` in a tree of the given fan-in."""
    if not parts:
        raise ValueError("tree_reduce needs at least one part")
    level = 0
    while len(parts) > 1:
        parts = [dask.delayed(combine, pure=False)(*parts[i:i + fan_in],
                                                   dask_key_name=f"reduce-{level}-{i}-"
                                                                 f"{uuid.uuid4().hex}")
                 for i in range(0, len(parts), fan_in)]
        level += 1
    return parts[0]


def _merge_states(*states: TopKQuantile) -> TopKQuantile:
    return states[0].merge(*states[1:])


def _sum_counts(*counts: IoUCounts) -> IoUCounts:
    total = counts[0]
    for part in counts[1:]:
        total = total + part
    return total


#: Rows of one task: a [start, stop) range of the cache, or an int64 array of cache rows.
Rows = tuple[int, int] | np.ndarray


def _read_acts(reader: ActivationReader, rows: Rows, stored: bool = False) -> np.ndarray:
    """The rows' activations; ``stored``: in the cache's own dtype when the reader is a
    :class:`CacheReader` (a float16 cache stays float16), else as the reader returns them."""
    from dissect.record.cache import CacheReader

    options = {"stored": True} if stored and isinstance(reader, CacheReader) else {}
    if isinstance(rows, tuple):
        return reader.read(*rows, **options)  # type: ignore[call-arg]
    return reader.read_rows(rows, **options)  # type: ignore[attr-defined]


def _task_rows(n_images: int, size: int, images: np.ndarray | None) -> list[Rows]:
    """The rows of every task: ranges of the cache, or slices of ``images``."""
    if images is None:
        return list(image_chunks(n_images, size))
    return [images[start:stop] for start, stop in image_chunks(len(images), size)]


def check_images(images: Sequence[int] | np.ndarray | None, n_images: int) -> np.ndarray | None:
    """``images`` as int64 (M,) strictly increasing rows in [0, n_images), M >= 1 (None stays).

    Raises OptionError otherwise.
    """
    if images is None:
        return None
    rows = np.asarray(images)
    if rows.ndim != 1 or len(rows) == 0 or not np.issubdtype(rows.dtype, np.integer):
        raise OptionError(f"images: expected a non-empty 1-d array of image indices, got "
                          f"{rows.dtype} of shape {rows.shape}")
    rows = rows.astype(np.int64)
    if rows[0] < 0 or rows[-1] >= n_images or (np.diff(rows) <= 0).any():
        raise OptionError(f"images: indices must increase strictly within [0, {n_images})")
    return rows


def _threshold_chunk(reader: ActivationReader, rows: Rows, quantile: float,
                     n_values: int, threads: int | None) -> TopKQuantile:
    set_task_threads(threads)
    # float16 as stored: TopKQuantile selects float16 values by integer keys (exactly as their
    # float32 values order), several times faster than converting and partitioning float32
    acts = _read_acts(reader, rows, stored=True)
    state = TopKQuantile(acts.shape[1], quantile, n_values)
    state.add(acts)
    return state


def _count_chunk(reader: ActivationReader, dataset: SegmentationSource, rows: Rows,
                 thresholds: np.ndarray, primary: np.ndarray, n_categories: int, union: str,
                 threads: int | None, device: str | None) -> IoUCounts:
    set_task_threads(threads)
    acts = _read_acts(reader, rows, stored=True)      # count_iou converts the active maps only
    seg, image_labels = dataset.load_segmentations(range(*rows) if isinstance(rows, tuple)
                                                   else rows)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return count_iou(acts, seg, image_labels, thresholds, primary, n_categories,
                     union=union, device=device)  # type: ignore[arg-type]


def _wrap(value: Any, label: str) -> Any:
    """A delayed leaf with a fixed name (no tokenizing of large objects)."""
    return dask.delayed(value, name=f"{label}-{uuid.uuid4().hex}", traverse=False)


def compute_thresholds(reader: ActivationReader, quantile: float, *,
                       chunk_size: int | None = None, scheduler: str | SchedulerSetup = "threads",
                       num_workers: int | None = None,
                       images: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Per-unit (1 - quantile) quantile of a cached layer (DESIGN.md §3 step 1).

    Parameters
    ----------
    reader:
        Picklable reader of the cache (``dissect.record.CacheReader``): ``shape`` (N, U, h, w)
        and ``read(start, stop)`` -> float32 rows.
    quantile:
        q in [0, 1].
    chunk_size:
        Images per task (default :func:`default_chunk_size`).
    scheduler, num_workers:
        See :func:`scheduler_context`; ``scheduler`` may also be a SchedulerSetup from it.
    images:
        Only these cache rows (int (M,), strictly increasing; the reader then needs
        ``read_rows``); default every row.

    Returns
    -------
    float64 (U,): equal to ``numpy.quantile(acts[rows, u].astype(float32), 1 - quantile)``.
    """
    shape = tuple(reader.shape)
    n_images = shape[0]
    if n_images == 0:
        raise DissectError("cannot compute thresholds of a cache with no images")
    images = check_images(images, n_images)
    used = n_images if images is None else len(images)
    n_values = used * (int(np.prod(shape[2:])) if len(shape) > 2 else 1)
    size = default_chunk_size(shape) if chunk_size is None else check_chunk_size(chunk_size)
    with _use_scheduler(scheduler, num_workers) as setup:
        source = _wrap(reader, "reader")
        parts = [dask.delayed(_threshold_chunk, pure=False)(
            source, rows, float(quantile), n_values, setup.task_threads,
            dask_key_name=f"thresholds-{number}-{uuid.uuid4().hex}")
            for number, rows in enumerate(_task_rows(n_images, size, images))]
        fan_in = merge_fan_in(TopKQuantile(shape[1], quantile, n_values).k * shape[1] * 4)
        with torch_threads_kept():
            (state,) = dask.compute(tree_reduce(parts, _merge_states, fan_in=fan_in),
                                    **setup.compute_kwargs)
    return state.result()


def merge_fan_in(state_bytes: int) -> int:
    """States of ``state_bytes`` each (U K values: float32 at most, a float16 cache's are half)
    that one thresholds merge takes: its inputs and its result (plus a bounded block) stay
    within ``_MERGE_BYTES``, with 2 to ``_FAN_IN`` inputs."""
    return int(min(_FAN_IN, max(2, _MERGE_BYTES // max(int(state_bytes), 1) - 1)))


def compute_counts(reader: ActivationReader, dataset: SegmentationSource,
                   thresholds: np.ndarray, *, primary: np.ndarray | None = None,
                   n_categories: int | None = None, union: str = "touched",
                   chunk_size: int | None = None, scheduler: str | SchedulerSetup = "threads",
                   num_workers: int | None = None, device: str | None = None,
                   images: Sequence[int] | np.ndarray | None = None) -> IoUCounts:
    """IoU counts of a cached layer summed over the dataset (DESIGN.md §3 steps 2-3).

    Parameters
    ----------
    reader:
        Picklable cache reader (see :func:`compute_thresholds`); row n is dataset image n.
    dataset:
        Picklable ``BrodenDataset`` (``load_segmentations(range(start, stop))``).
    thresholds:
        (U,) float thresholds.
    primary, n_categories:
        int64 (L,) primary category per label (-1 none) and C; default the dataset's
        ``vocab.primary`` and ``len(dataset.categories)``.
    union:
        ``'touched'``, ``'annotated'`` or ``'all'`` (see :func:`dissect.stats.count_iou`).
    chunk_size, scheduler, num_workers:
        See :func:`compute_thresholds`.
    device:
        Torch device for the chunk work; default CUDA when available in the task, else CPU.
    images:
        Only these images (cache rows and dataset indices; see :func:`compute_thresholds`).

    Returns
    -------
    IoUCounts with label_area (L,), intersection (U, L), act_area (U, C) int64.
    """
    if union not in UNION_RULES:
        raise OptionError(f"--union: {union!r} is not a union rule; expected one of "
                          f"{', '.join(UNION_RULES)}")
    if primary is None:
        primary = dataset.vocab.primary  # type: ignore[attr-defined]
    if n_categories is None:
        n_categories = len(dataset.categories)  # type: ignore[attr-defined]
    primary = np.asarray(primary, dtype=np.int64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    shape = tuple(reader.shape)
    n_images = shape[0]
    if len(thresholds) != shape[1]:
        raise OptionError(f"--thresholds: {len(thresholds)} thresholds for a layer of "
                          f"{shape[1]} units")
    if n_images == 0:
        return IoUCounts.zeros(shape[1], len(primary), int(n_categories))
    images = check_images(images, n_images)
    seg_size = getattr(dataset, "seg_size", (0, 0))
    size = (default_chunk_size(shape, seg_size) if chunk_size is None
            else check_chunk_size(chunk_size))
    with _use_scheduler(scheduler, num_workers) as setup:
        source = _wrap(reader, "reader")
        data = _wrap(dataset, "dataset")
        thresholds_d = _wrap(thresholds, "thresholds")
        primary_d = _wrap(primary, "primary")
        parts = [dask.delayed(_count_chunk, pure=False)(
            source, data, rows, thresholds_d, primary_d, int(n_categories), union,
            setup.task_threads, device, dask_key_name=f"counts-{number}-{uuid.uuid4().hex}")
            for number, rows in enumerate(_task_rows(n_images, size, images))]
        with torch_threads_kept():
            (counts,) = dask.compute(tree_reduce(parts, _sum_counts), **setup.compute_kwargs)
    return counts
