"""The activation cache file: chunk layout, writer/resume state, readers, open_cache."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from dissect.errors import CacheError, OptionError
from dissect.record import CacheReader, cache_path, open_cache, outputs_path
from dissect.record.cache import (
    CHUNK_MAX_BYTES,
    CHUNK_MIN_BYTES,
    CacheState,
    CacheWriter,
    changed_fields,
    choose_chunks,
    fingerprint_fields,
    layer_datasets,
    partial_path,
    write_rows,
)

FINGERPRINT = fingerprint_fields(weights="w0", model="m", layer="conv", dataset="d0",
                                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize=None,
                                 dtype="float16", version="0.1.0", batch_size=4)


def test_paths() -> None:
    assert cache_path("/runs/a", "layer4.1.conv2") == Path("/runs/a/cache/layer4.1.conv2.h5")
    assert cache_path("/runs/a", "odd/name") == Path("/runs/a/cache/odd_name.h5")
    assert outputs_path("/runs/a") == Path("/runs/a/cache/outputs.h5")
    assert partial_path(Path("/r/cache/x.h5")) == Path("/r/cache/x.h5.partial")


@pytest.mark.parametrize("shape, batch, itemsize, expected", [
    ((1000, 512, 7, 7), 32, 2, (32, 512, 7, 7)),        # 1.6 MB block: one block per chunk
    ((1000, 64, 8, 8), 32, 2, (64, 64, 8, 8)),          # 256 KB block: two blocks reach 0.5 MB
    ((40, 64, 8, 8), 32, 2, (40, 64, 8, 8)),            # never more rows than N
    ((1000, 512, 56, 56), 32, 2, (32, 20, 56, 56)),     # 103 MB block: <= 20 units per 4 MB,
                                                        # 26 groups -> ceil(512 / 26) = 20
    ((1000, 100, 56, 56), 32, 4, (32, 10, 56, 56)),     # 40 MB block: 10 groups of 10 units
    ((100, 3, 1024, 1024), 32, 4, (1, 1, 1024, 1024)),  # one map is 4 MB: rows split to 1
    ((100, 3, 512, 512), 32, 4, (4, 1, 512, 512)),      # 1 MB map: 4 rows (a divisor of 32)
    ((1000, 1000), 32, 4, (160, 1000)),                 # logits: 128 KB blocks, 5 per chunk
])
def test_choose_chunks(shape: tuple[int, ...], batch: int, itemsize: int,
                       expected: tuple[int, ...]) -> None:
    chunks = choose_chunks(shape, batch, itemsize)
    assert chunks == expected


def test_choose_chunks_bounds_and_alignment() -> None:
    for n_units, side, batch in [(64, 56, 32), (512, 7, 16), (2048, 14, 64), (96, 28, 8),
                                 (10, 3, 7), (768, 14, 50)]:
        shape = (5000, n_units, side, side)
        chunks = choose_chunks(shape, batch, 2)
        size = np.prod(chunks) * 2
        assert size <= CHUNK_MAX_BYTES
        assert size >= CHUNK_MIN_BYTES or chunks[1:] == shape[1:] and chunks[0] % batch == 0
        assert chunks[0] % batch == 0 or batch % chunks[0] == 0  # aligned with write blocks


def test_changed_fields() -> None:
    other = dict(FINGERPRINT, mean=[0.0, 0.5, 0.5], dtype="float32")
    assert changed_fields(FINGERPRINT, other) == ["dtype", "mean"]
    assert changed_fields(FINGERPRINT, dict(FINGERPRINT)) == []
    assert changed_fields({"layer": "a"}, {"layer": "a", "autocast": None}) == ["autocast"]
    assert FINGERPRINT["mean"] == [0.5, 0.5, 0.5] and FINGERPRINT["resize"] is None


def write_cache(path: Path, acts: np.ndarray, batch: int = 4, blocks: list[int] | None = None,
                finish: bool = True) -> CacheState:
    state = CacheState(path, FINGERPRINT, len(acts), batch, force=False)
    writer = CacheWriter(state, layer_datasets(len(acts), acts.shape[1:], "float16", batch), batch)
    try:
        for block in state.needed_blocks if blocks is None else blocks:
            rows = slice(block * batch, (block + 1) * batch)
            writer.write_block(int(block), {"acts": acts[rows],
                                            "amax": acts[rows].max(axis=(2, 3))})
        if finish:
            writer.finish()
    finally:
        writer.close()
    return state


@pytest.fixture
def acts() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(10, 3, 2, 5)).astype(np.float16)


def test_write_open_and_read(tmp_path: Path, acts: np.ndarray) -> None:
    path = cache_path(tmp_path, "conv")
    write_cache(path, acts)
    assert path.exists() and not partial_path(path).exists()
    info = open_cache(path)
    assert (info.name, info.shape, info.dtype) == ("acts", (10, 3, 2, 5), "float16")
    assert info.fingerprint == FINGERPRINT
    assert info.attrs["n_written"] == 10 and info.attrs["complete"] is True
    reader = CacheReader(path)
    assert reader.shape == (10, 3, 2, 5) and len(reader) == 10
    part = reader.read(3, 7)
    assert part.dtype == np.float32
    np.testing.assert_array_equal(part, acts[3:7].astype(np.float32))
    rows = reader.read_rows([9, 2, 3, 2, 0])
    np.testing.assert_array_equal(rows, acts[[9, 2, 3, 2, 0]].astype(np.float32))
    assert reader.read_rows([]).shape == (0, 3, 2, 5)
    amax = CacheReader(path, "amax").read(0, 10)
    np.testing.assert_array_equal(amax, acts.max(axis=(2, 3)).astype(np.float32))
    with pytest.raises(OptionError, match=r"rows \[8, 11\) are outside"):
        reader.read(8, 11)
    with pytest.raises(OptionError, match="outside"):
        reader.read_rows([10])
    with pytest.raises(CacheError, match="no dataset 'logits'"):
        CacheReader(path, "logits").read(0, 1)


def test_reader_pickles_without_a_handle(tmp_path: Path, acts: np.ndarray) -> None:
    path = cache_path(tmp_path, "conv")
    write_cache(path, acts)
    reader = CacheReader(path, "acts")
    reader.read(0, 1)
    assert vars(reader) == {"path": path, "name": "acts"}
    clone = pickle.loads(pickle.dumps(reader))
    assert clone == reader and hash(clone) == hash(reader)
    np.testing.assert_array_equal(clone.read(0, 10), reader.read(0, 10))


def test_partial_resume_state(tmp_path: Path, acts: np.ndarray) -> None:
    path = cache_path(tmp_path, "conv")
    write_cache(path, acts, blocks=[0, 2], finish=False)
    assert not path.exists()
    with pytest.raises(CacheError, match="incomplete.*interrupted.*dissect record"):
        open_cache(path)
    with h5py.File(partial_path(path)) as file:
        assert file["done"][:].tolist() == [True, False, True]
        assert file.attrs["n_written"] == 6  # blocks 0 and 2 (the last holds 2 images)
    state = CacheState(path, FINGERPRINT, 10, 4, force=False)
    assert state.needed_blocks.tolist() == [1]
    write_cache(path, acts)  # resumes block 1 only
    np.testing.assert_array_equal(CacheReader(path).read(0, 10), acts.astype(np.float32))
    changed = dict(FINGERPRINT, dataset="d1")
    with pytest.raises(CacheError, match=r"changed: dataset \(\"d0\" -> \"d1\"\)"):
        CacheState(path, changed, 10, 4, force=False)
    state = CacheState(path, changed, 10, 4, force=True)
    assert not path.exists() and state.needed_blocks.tolist() == [0, 1, 2]


def test_batch_size_is_compared_only_to_resume_a_partial(tmp_path: Path, acts: np.ndarray) -> None:
    path = cache_path(tmp_path, "conv")
    write_cache(path, acts, blocks=[0], finish=False)
    other = dict(FINGERPRINT, batch_size=3)
    state = CacheState(path, other, 10, 3, force=False)  # kept for a resume with batch 4
    assert state.partial_batch_size == 4 and state.needed_blocks.tolist() == [0, 1, 2, 3]
    assert partial_path(path).exists() and not state.shapes
    state = CacheState(path, FINGERPRINT, 10, 4, force=False)
    assert state.partial_batch_size == 4 and state.needed_blocks.tolist() == [1, 2]
    write_cache(path, acts)
    state = CacheState(path, other, 10, 3, force=False)  # complete: reused as it is
    assert state.complete and state.needed_blocks.size == 0 and path.exists()
    assert open_cache(path).fingerprint["batch_size"] == 4


def test_unreadable_partial_is_started_again(tmp_path: Path) -> None:
    path = cache_path(tmp_path, "conv")
    path.parent.mkdir(parents=True)
    partial_path(path).write_bytes(b"\x89HDF killed mid-write")
    state = CacheState(path, FINGERPRINT, 10, 4, force=False)
    assert state.needed_blocks.tolist() == [0, 1, 2] and not partial_path(path).exists()


def test_truncated_partial_is_started_again_not_taken_for_a_lock(tmp_path: Path,
                                                                  acts: np.ndarray) -> None:
    # HDF5's error for a truncated file names the "sblock" (superblock): not a lock held by
    # another writer, so the partial is rebuilt instead of blocking every resume.
    path = cache_path(tmp_path, "conv")
    write_cache(path, acts, blocks=[0, 2], finish=False)
    size = partial_path(path).stat().st_size
    with open(partial_path(path), "r+b") as handle:
        handle.truncate(size // 2)
    state = CacheState(path, FINGERPRINT, 10, 4, force=False)
    assert state.needed_blocks.tolist() == [0, 1, 2] and not partial_path(path).exists()


def test_open_cache_errors(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="does not exist; run `dissect record`"):
        open_cache(tmp_path / "cache" / "nope.h5")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as file:
        file["x"] = np.zeros(3)
    with pytest.raises(CacheError, match="neither 'acts' nor 'logits'"):
        open_cache(other)
    with h5py.File(other, "w") as file:
        file["acts"] = np.zeros((2, 1, 1, 1))
        file.attrs["complete"] = False
        file.attrs["n_written"] = 1
    with pytest.raises(CacheError, match=r"incomplete \(1 of 2 images written\)"):
        open_cache(other)
    (tmp_path / "broken.h5").write_bytes(b"not hdf5")
    with pytest.raises(CacheError, match="cannot read cache"):
        open_cache(tmp_path / "broken.h5")


@pytest.mark.parametrize("chunks, compression", [
    ((4, 3, 2, 2), None),      # a block is one chunk: written directly
    ((8, 3, 2, 2), None),      # two blocks per chunk: through the chunk cache
    ((4, 3, 2, 2), "lzf"),     # filtered: through the filter pipeline
    ((2, 3, 2, 2), None),      # a block spans two chunks
])
def test_write_rows_equals_slice_assignment(tmp_path: Path, chunks: tuple[int, ...],
                                            compression: str | None) -> None:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((10, 3, 2, 2)).astype(np.float16)
    with h5py.File(tmp_path / "a.h5", "w") as file:
        dataset = file.create_dataset("acts", shape=data.shape, dtype="float16", chunks=chunks,
                                      compression=compression)
        for start in (4, 0, 8):  # out of order; the last block is short (2 rows)
            write_rows(dataset, start, data[start:start + 4])
        file.flush()
        np.testing.assert_array_equal(dataset[:], data)
    with h5py.File(tmp_path / "a.h5", "r") as file:  # what reached the file, read back
        np.testing.assert_array_equal(file["acts"][:], data)
        assert file["acts"].compression == compression


# --------------------------------------------------------------------------- ablation.csv
def test_ablation_csv_rows_only_for_classes_with_images(tmp_path: Path) -> None:
    from dissect.ablation.metrics import ClassCounts
    from dissect.ablation.result import AblationResult, load_ablation

    # 2 sets (baseline, unit 1) x 3 classes; class 'b' has no evaluated image
    counts = ClassCounts(true_positive=np.array([[2, 0, 1], [1, 0, 1]]),
                         predicted=np.array([[2, 1, 1], [2, 1, 1]]),
                         prob_sum=np.array([[1.5, 0.0, 0.5], [1.0, 0.0, 0.5]]),
                         n_true=np.array([2, 0, 2]), n_total=4)
    result = AblationResult("layer", "single", ("a", "b", "c"), ("single", "single"),
                            ("baseline", "unit1"), (np.array([], np.int64), np.array([1])),
                            counts)
    assert [(r["set"], r["class"], r["n"]) for r in result.table()] == \
        [("baseline", "a", 2), ("baseline", "c", 2), ("unit1", "a", 2), ("unit1", "c", 2)]
    assert [r["recall"] for r in result.table()] == [1.0, 0.5, 0.5, 0.5]
    assert [r["class"] for r in result.table(empty_classes=True)] == ["a", "b", "c"] * 2
    _, csv_path = result.save(tmp_path)
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 1 + 4 and not any(",b," in line for line in lines)
    # the h5 keeps every class
    loaded = load_ablation(tmp_path)["single"]
    assert loaded.class_names == ("a", "b", "c")
    assert np.array_equal(loaded.counts.n_true, [2, 0, 2])
    assert np.array_equal(loaded.counts.predicted, counts.predicted)


# ----------------------------------------------------------------------------- direct reads
def _write(path: Path, values: np.ndarray, **options) -> Path:
    with h5py.File(path, "w") as file:
        file.create_dataset("acts", data=values, **options)
    return path


def _spy_direct(monkeypatch) -> list[bool]:
    """Record per read whether CacheReader.read took plain reads (True) or HDF5 (False)."""
    import dissect.record.cache as cache_module

    taken: list[bool] = []
    spans = cache_module._row_spans

    def spy(*args):
        result = spans(*args)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(cache_module, "_row_spans", spy)
    return taken


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int32])
def test_plain_reads_of_whole_row_chunks_equal_hdf5(tmp_path: Path, monkeypatch, dtype) -> None:
    # chunks of 4 rows over 10 rows (the last chunk half full): every range, aligned or not,
    # is read with plain reads and equals HDF5's own read
    values = np.random.default_rng(0).normal(size=(10, 3, 2, 5)).astype(dtype)
    reader = CacheReader(_write(tmp_path / "c.h5", values, chunks=(4, 3, 2, 5)))
    taken = _spy_direct(monkeypatch)
    expected = []
    for start in range(11):
        for stop in range(start, 11):
            got = reader.read(start, stop, stored=True)
            assert got.dtype == values.dtype and got.shape == (stop - start, 3, 2, 5)
            np.testing.assert_array_equal(got, values[start:stop])
            np.testing.assert_array_equal(reader.read(start, stop),
                                          values[start:stop].astype(np.float32))
            expected += [stop > start] * 2            # an empty range is left to HDF5
    assert taken == expected


@pytest.mark.parametrize("options,why", [
    ({"chunks": (4, 3, 2, 5), "compression": "gzip"}, "a filter"),
    ({"chunks": (4, 3, 2, 5), "shuffle": True}, "a filter"),
    ({"chunks": (4, 1, 2, 5)}, "chunks that split rows"),
    ({}, "contiguous layout"),
])
def test_hdf5_reads_where_plain_reads_cannot(tmp_path: Path, monkeypatch, options, why) -> None:
    values = np.random.default_rng(1).normal(size=(10, 3, 2, 5)).astype(np.float32)
    reader = CacheReader(_write(tmp_path / "c.h5", values, **options))
    taken = _spy_direct(monkeypatch)
    np.testing.assert_array_equal(reader.read(2, 9), values[2:9])
    assert taken == [False], why


def test_hdf5_reads_big_endian_and_unwritten_chunks(tmp_path: Path, monkeypatch) -> None:
    values = np.arange(10 * 6, dtype=">f4").reshape(10, 6)
    reader = CacheReader(_write(tmp_path / "big.h5", values, chunks=(4, 6)))
    taken = _spy_direct(monkeypatch)
    np.testing.assert_array_equal(reader.read(1, 7), values[1:7])
    # an incomplete cache: rows 4-7 were never written (their chunk holds no data yet)
    with h5py.File(tmp_path / "gap.h5", "w") as file:
        data = file.create_dataset("acts", (12, 6), np.float32, chunks=(4, 6))
        data[0:4] = 1.0
        data[8:12] = 2.0
    gap = CacheReader(tmp_path / "gap.h5")
    np.testing.assert_array_equal(gap.read(2, 10), np.repeat([1.0, 0.0, 2.0], [2, 4, 2])[
        :, None] * np.ones((1, 6), np.float32))
    np.testing.assert_array_equal(gap.read(0, 4), np.ones((4, 6), np.float32))
    assert taken == [False, False, True]


def test_a_cache_cut_short_is_a_cache_error(tmp_path: Path, monkeypatch) -> None:
    import dissect.record.cache as cache_module

    values = np.ones((8, 1000), np.float32)
    path = _write(tmp_path / "c.h5", values, chunks=(4, 1000))
    reader = CacheReader(path)
    # the file ends before a chunk's bytes (a read returns nothing): named, not a partial array
    monkeypatch.setattr(cache_module.os, "preadv", lambda handle, buffers, offset: 0)
    with pytest.raises(CacheError, match=r"ended inside rows \[4, 8\)"):
        reader.read(4, 8)
    monkeypatch.undo()
    with h5py.File(path, "r") as file:
        end = file["acts"].id.get_chunk_info(1).byte_offset + 100
    with open(path, "r+b") as handle:
        handle.truncate(end)
    with pytest.raises(CacheError, match="cannot read cache"):             # HDF5 sees it first
        reader.read(4, 8)


def test_plain_reads_resume_after_short_reads(tmp_path: Path, monkeypatch) -> None:
    import os

    import dissect.record.cache as cache_module

    values = np.random.default_rng(3).normal(size=(9, 5, 3)).astype(np.float32)
    reader = CacheReader(_write(tmp_path / "c.h5", values, chunks=(4, 5, 3)))
    calls, real = [], os.preadv

    def short(handle, buffers, offset):                 # at most 7 bytes a call
        calls.append(offset)
        return real(handle, [buffers[0][:7]], offset)

    monkeypatch.setattr(cache_module.os, "preadv", short)
    np.testing.assert_array_equal(reader.read(1, 9), values[1:9])
    assert len(calls) == -(-(3 * 60) // 7) + -(-(4 * 60) // 7) + -(-(1 * 60) // 7)


def test_read_rows_takes_plain_reads_per_run(tmp_path: Path, monkeypatch) -> None:
    # rows of runs [1, 2], [5, 6, 7], [9] (chunks of 4) by plain reads, stored or converted
    # to float32 after the read
    values = np.random.default_rng(4).normal(size=(10, 3, 2)).astype(np.float16)
    reader = CacheReader(_write(tmp_path / "c.h5", values, chunks=(4, 3, 2)))
    taken = _spy_direct(monkeypatch)
    rows = [7, 1, 5, 9, 2, 6, 1]
    np.testing.assert_array_equal(reader.read_rows(rows, stored=True), values[rows])
    assert taken == [True, True, True]
    np.testing.assert_array_equal(reader.read_rows(rows), values[rows].astype(np.float32))
    assert taken == [True] * 6
