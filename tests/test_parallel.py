"""dissect.parallel: every scheduler and chunking gives bit-identical thresholds and counts."""

from __future__ import annotations

import json
import operator
from pathlib import Path

import dask
import h5py
import numpy as np
import pytest

from dissect.data import BrodenDataset
from dissect.errors import OptionError
from dissect.parallel import (
    check_scheduler,
    compute_counts,
    compute_thresholds,
    image_chunks,
    scheduler_context,
)
from dissect.record import CacheReader
from dissect.stats import TopKQuantile, count_iou


def write_cache(path: Path, acts: np.ndarray, batch: int = 2) -> Path:
    """A complete activation cache in the DESIGN §4a layout, written directly with h5py."""
    acts16 = acts.astype(np.float16)
    n = len(acts16)
    with h5py.File(path, "w") as file:
        file.create_dataset("acts", data=acts16, chunks=(min(batch, n), *acts16.shape[1:]))
        file.create_dataset("amax", data=acts16.reshape(n, acts16.shape[1], -1).max(-1)
                            .astype(np.float32))
        file.create_dataset("done", data=np.ones(-(-n // batch), dtype=bool))
        file.attrs["fingerprint"] = json.dumps({"layer": path.stem})
        file.attrs["schema_version"] = 1
        file.attrs["n_written"] = n
        file.attrs["complete"] = True
    return path


def random_acts(n: int, units: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish random maps with a few strong peaks, so masks are not trivial."""
    rng = np.random.default_rng(seed)
    acts = rng.gamma(1.0, 1.0, size=(n, units, size, size))
    acts[rng.random(acts.shape) < 0.05] += 4.0
    return acts.astype(np.float32)


def serial_counts(reader: CacheReader, dataset: BrodenDataset, thresholds: np.ndarray,
                  union: str = "touched"):
    """Counts from one call over the whole dataset, no Dask."""
    seg, labels = dataset.load_segmentations(range(len(dataset)))
    return count_iou(reader.read(0, len(dataset)), seg, labels, thresholds,
                     dataset.vocab.primary, len(dataset.categories), union)


def check_all_schedulers(reader: CacheReader, dataset: BrodenDataset, chunk_sizes: list[int],
                         quantile: float) -> None:
    n = len(dataset)
    acts = reader.read(0, n)
    expected_t = np.array([np.quantile(acts[:, u].ravel(), 1 - quantile)
                           for u in range(acts.shape[1])], dtype=np.float64)
    expected_c = serial_counts(reader, dataset, expected_t)
    assert expected_c.intersection.sum() > 0 and expected_c.act_area.sum() > 0
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp",
                      dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tcp://")
        for scheduler in ["synchronous", "threads", "processes", address]:
            with scheduler_context(scheduler, num_workers=2) as setup:
                for size in chunk_sizes:
                    got_t = compute_thresholds(reader, quantile, chunk_size=size,
                                               scheduler=setup)
                    np.testing.assert_array_equal(got_t, expected_t)
                    got_c = compute_counts(reader, dataset, got_t, chunk_size=size,
                                           scheduler=setup)
                    assert got_c.equals(expected_c), (scheduler, size)


def test_schedulers_and_chunkings_are_identical_toy(toy_dataset: Path, tmp_path: Path) -> None:
    dataset = BrodenDataset(toy_dataset)
    n = len(dataset)
    cache = write_cache(tmp_path / "conv.h5", random_acts(n, 6, 8), batch=8)
    # 1, 2 and 3 chunks
    check_all_schedulers(CacheReader(cache), dataset, [n, -(-n // 2), -(-n // 3)], 0.02)


def test_schedulers_and_chunkings_are_identical_tiny(broden_tiny, tmp_path: Path) -> None:
    dataset = BrodenDataset(broden_tiny.root)
    cache = write_cache(tmp_path / "conv.h5", random_acts(3, 4, 2, seed=1))
    reader = CacheReader(cache)
    thresholds = compute_thresholds(reader, 0.2, chunk_size=1, scheduler="threads")
    expected = serial_counts(reader, dataset, thresholds, "annotated")
    for size in (3, 2, 1):
        got = compute_counts(reader, dataset, thresholds, union="annotated", chunk_size=size,
                             scheduler="synchronous")
        assert got.equals(expected)


def test_processes_scheduler_sends_one_task_at_a_time(monkeypatch) -> None:
    # dask.multiprocessing batches 6 ready tasks per submission by default: one worker then gets
    # 6 chunks at once and finishes last while the others idle (2 workers, 16 chunks: 10 vs 6).
    with scheduler_context("processes", num_workers=2) as setup:
        pool = setup.compute_kwargs["pool"]
        submit, batches = pool.submit, []

        def recording(function, tasks, *args, **kwargs):
            batches.append(len(tasks))
            return submit(function, tasks, *args, **kwargs)

        monkeypatch.setattr(pool, "submit", recording)
        parts = [dask.delayed(operator.add)(i, 1) for i in range(8)]
        assert dask.compute(*parts, **setup.compute_kwargs) == tuple(range(1, 9))
    assert batches == [1] * 8


def test_an_image_subset_equals_the_serial_result_on_those_images(toy_dataset: Path,
                                                                  tmp_path: Path) -> None:
    dataset = BrodenDataset(toy_dataset)
    n = len(dataset)
    reader = CacheReader(write_cache(tmp_path / "conv.h5", random_acts(n, 5, 8, seed=4), batch=8))
    images = np.array([0, 1, 2, 7, 8, 20, 31, n - 1])
    acts = reader.read(0, n)[images]
    expected_t = np.array([np.quantile(acts[:, u].ravel(), 0.9) for u in range(5)])
    seg, labels = dataset.load_segmentations(images)
    expected_c = count_iou(acts, seg, labels, expected_t, dataset.vocab.primary,
                           len(dataset.categories))
    assert expected_c.intersection.sum() > 0
    for scheduler in ("synchronous", "threads", "processes"):
        with scheduler_context(scheduler, num_workers=2) as setup:
            for size in (1, 3, 8):
                got_t = compute_thresholds(reader, 0.1, chunk_size=size, scheduler=setup,
                                           images=images)
                np.testing.assert_array_equal(got_t, expected_t)
                got_c = compute_counts(reader, dataset, got_t, chunk_size=size, scheduler=setup,
                                       images=images)
                assert got_c.equals(expected_c), (scheduler, size)


def test_bad_image_subsets_name_the_option(toy_dataset: Path, tmp_path: Path) -> None:
    reader = CacheReader(write_cache(tmp_path / "conv.h5", random_acts(4, 2, 2), batch=2))
    for bad in ([], [2, 1], [0, 0], [0, 4], [-1], np.array([0.5])):
        with pytest.raises(OptionError, match="images"):
            compute_thresholds(reader, 0.1, images=bad)


class ArrayReader:
    """A reader of activations held in memory."""

    def __init__(self, acts: np.ndarray) -> None:
        self.acts = acts
        self.shape = acts.shape

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.acts[start:stop]


def test_tree_of_many_chunks_matches_topk() -> None:
    # more chunks than the fan-in: a two-level reduction tree
    acts = random_acts(70, 3, 3, seed=2)
    expected = TopKQuantile(3, 0.01, 70 * 9)
    expected.add(acts)
    got = compute_thresholds(ArrayReader(acts), 0.01, chunk_size=1, scheduler="threads")
    np.testing.assert_array_equal(got, expected.result())


def test_bad_scheduler_names_option() -> None:
    for bad in ["thread", "tcp://nohost", "http://host:1", ""]:
        with pytest.raises(OptionError, match="--scheduler.*threads, processes, synchronous"):
            check_scheduler(bad)
    assert check_scheduler("tcp://127.0.0.1:8786") == "tcp://127.0.0.1:8786"
    with pytest.raises(OptionError, match="--scheduler"):
        with scheduler_context("multiprocess"):
            pass


def test_image_chunks() -> None:
    assert image_chunks(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert image_chunks(0, 3) == []
    with pytest.raises(OptionError, match="chunk_size"):
        image_chunks(7, 0)


def test_unreachable_distributed_scheduler_is_a_dissect_error() -> None:
    from dissect.errors import DissectError

    with pytest.raises(DissectError, match="--scheduler: cannot connect.*tcp://127.0.0.1:1"):
        with scheduler_context("tcp://127.0.0.1:1", timeout="1s"):
            pass


def test_a_threaded_compute_leaves_torchs_thread_count_as_it_was(broden_tiny,
                                                                  tmp_path: Path) -> None:
    import torch

    dataset = BrodenDataset(broden_tiny.root)
    reader = CacheReader(write_cache(tmp_path / "c.h5", random_acts(3, 5, 2)), "acts")
    torch.set_num_threads(2)
    try:
        for _ in range(3):
            thresholds = compute_thresholds(reader, 0.2, chunk_size=1, scheduler="threads")
            compute_counts(reader, dataset, thresholds, chunk_size=1, scheduler="threads")
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(2)


def test_a_chunk_size_that_is_not_positive_is_refused(tmp_path: Path) -> None:
    reader = CacheReader(write_cache(tmp_path / "c.h5", random_acts(3, 2, 2)), "acts")
    for bad in (0, -2, 1.5):
        with pytest.raises(OptionError, match="chunk_size"):
            compute_thresholds(reader, 0.2, chunk_size=bad, scheduler="synchronous")


def test_overlapping_computes_restore_the_count_saved_before_the_first() -> None:
    import torch

    from dissect.parallel import set_task_threads, torch_threads_kept

    torch.set_num_threads(2)
    try:
        with torch_threads_kept():
            set_task_threads(1)                   # a task of the first compute
            with torch_threads_kept():            # a second compute starts meanwhile
                set_task_threads(1)
            assert torch.get_num_threads() == 1   # the first compute is still running
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(2)


def test_local_schedulers_do_not_import_distributed(broden_tiny, tmp_path: Path) -> None:
    """Given a scheduler's name, dask.compute imports distributed to look for a client (0.2 s
    and 12 MB per process); the local schedulers are passed as functions instead."""
    import subprocess
    import sys

    cache = write_cache(tmp_path / "c.h5", random_acts(3, 5, 2))
    code = f"""
import sys
from dissect.data import BrodenDataset
from dissect.parallel import compute_counts, compute_thresholds
from dissect.record import CacheReader
reader, dataset = CacheReader({str(cache)!r}, "acts"), BrodenDataset({str(broden_tiny.root)!r})
for scheduler in ("threads", "synchronous"):
    thresholds = compute_thresholds(reader, 0.2, chunk_size=1, scheduler=scheduler)
    counts = compute_counts(reader, dataset, thresholds, chunk_size=1, scheduler=scheduler)
print(counts.intersection.sum() > 0, "distributed" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "False"]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_thresholds_read_the_cache_as_stored_and_equal_numpy(tmp_path: Path, dtype) -> None:
    """compute_thresholds reads the cache in its own dtype (float16 is selected by integer
    keys, float32 as is); results equal numpy.quantile of the float32 values, with ties, -0,
    +-inf and a NaN of either sign in the cache, for ranges and image subsets."""
    rng = np.random.default_rng(8)
    acts = rng.integers(-3, 4, size=(12, 5, 3, 4)).astype(dtype)    # many ties
    acts[2, 0, 0, 0] = -0.0
    acts[3, 1, 1, 1], acts[4, 1, 0, 0] = np.inf, -np.inf
    acts[5, 2, 2, 2] = np.nan
    acts[6, 3, 0, 1] = -np.float32(np.nan)
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("acts", data=acts, chunks=(4, 5, 3, 4))
    reader = CacheReader(path)
    assert reader.read(0, 4, stored=True).dtype == dtype
    assert reader.read_rows([1, 0], stored=True).dtype == dtype
    assert reader.read(0, 4).dtype == np.float32
    for images in (None, np.array([0, 2, 3, 5, 6, 9, 11])):
        rows = acts.astype(np.float32)[slice(None) if images is None else images]
        for quantile in (0.005, 0.1, 0.5):
            with np.errstate(invalid="ignore"):          # inf - inf in numpy's lerp
                expected = np.array([np.quantile(rows[:, u].ravel(), 1 - quantile)
                                     for u in range(5)])
            for size in (1, 5, 12):
                got = compute_thresholds(reader, quantile, chunk_size=size,
                                         scheduler="synchronous", images=images)
                np.testing.assert_array_equal(got, expected)


def test_merge_fan_in_fits_the_merge_budget(monkeypatch) -> None:
    import dissect.parallel as parallel

    budget = parallel._MERGE_BYTES
    assert parallel.merge_fan_in(1) == parallel._FAN_IN == 8
    assert parallel.merge_fan_in(budget // 9) == 8          # 8 inputs and the result fit
    assert parallel.merge_fan_in(budget // 5) == 4
    assert parallel.merge_fan_in(budget // 3) == 2
    assert parallel.merge_fan_in(budget) == 2               # never fewer than 2 inputs
    monkeypatch.setattr(parallel, "_MERGE_BYTES", 100)
    assert parallel.merge_fan_in(25) == 3


@pytest.mark.parametrize("fan_in", [2, 3, 8])
def test_thresholds_equal_numpy_for_every_merge_fan_in(monkeypatch, fan_in: int) -> None:
    # 30 tasks of one image merged 2, 3 or 8 at a time
    import dissect.parallel as parallel

    state_bytes = TopKQuantile(5, 0.025, 30 * 16).k * 5 * 4
    monkeypatch.setattr(parallel, "_MERGE_BYTES", (fan_in + 1) * state_bytes)
    fan_ins = []
    reduce = parallel.tree_reduce
    monkeypatch.setattr(parallel, "tree_reduce", lambda parts, combine, fan_in: (
        fan_ins.append(fan_in), reduce(parts, combine, fan_in))[1])
    rng = np.random.default_rng(2)
    acts = rng.integers(0, 40, size=(30, 5, 4, 4)).astype(np.float32)        # ties
    expected = np.quantile(np.moveaxis(acts, 1, 0).reshape(5, -1), 0.975, axis=1)
    for scheduler in ("synchronous", "threads"):
        got = compute_thresholds(ArrayReader(acts), 0.025, chunk_size=1, scheduler=scheduler)
        np.testing.assert_array_equal(got, expected)
    assert fan_ins == [fan_in, fan_in]
