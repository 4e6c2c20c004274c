"""The activation cache: one HDF5 file per layer (DESIGN.md §4a).

``run_dir/cache/<layer>.h5`` holds

- ``acts`` (N, U, h, w) float16 (or float32), chunks (B, Ub, h, w) of 0.5-4 MB aligned with the
  write batch B (see :func:`choose_chunks`), no compression by default (``lzf``/``gzip`` options);
- ``amax`` (N, U) float32, the spatial max of every image and unit;
- ``done`` (n_blocks,) bool, one flag per write block of B images;
- attributes ``fingerprint`` (JSON of the fields in :func:`fingerprint_fields`), ``schema_version``,
  ``n_written`` (images written), ``complete``.

``run_dir/cache/outputs.h5`` holds ``logits`` (N, C) float32 with the same attributes.

Files are written as ``<name>.h5.partial``; each block's data is flushed before its ``done`` flag,
``complete`` is set last and the file is then renamed into place. Readers use
:class:`CacheReader`, a small picklable object holding only (path, dataset name).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dissect.errors import CacheError, OptionError

SCHEMA_VERSION = 1
#: Chunk size bounds in bytes (DESIGN §4a: 0.5 to 4 MB).
CHUNK_MIN_BYTES = 512 * 1024
CHUNK_MAX_BYTES = 4 * 1024 * 1024
#: Allowed ``dtype`` and ``compression`` values.
CACHE_DTYPES = ("float16", "float32")
COMPRESSIONS = (None, "lzf", "gzip")
#: Largest finite float16 magnitude.
FLOAT16_MAX = float(np.finfo(np.float16).max)
OUTPUTS_NAME = "outputs"
PARTIAL_SUFFIX = ".partial"
#: Fingerprint fields that decide only how a cache is written (its block layout), not what it
#: holds: a complete cache is reused whatever their values; a partial resumes only with the same.
LAYOUT_FIELDS = ("batch_size",)
_RECORD_HINT = "run `dissect record` (or dissect.record.record_activations) to create it"


def cache_path(run_dir: str | os.PathLike[str], layer: str) -> Path:
    """``run_dir/cache/<layer>.h5`` (``/`` and ``\\`` in a layer name become ``_``;
    :meth:`dissect.rundir.RunDir.cache`, the one definition of the layout)."""
    from dissect.rundir import RunDir

    return RunDir(run_dir).cache(layer)


def outputs_path(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir/cache/outputs.h5``, the model outputs (logits) of the dataset
    (:meth:`dissect.rundir.RunDir.outputs`)."""
    from dissect.rundir import RunDir

    return RunDir(run_dir).outputs


def partial_path(path: str | os.PathLike[str]) -> Path:
    """The file a cache is written to before it is complete: ``<path>.partial``."""
    return Path(f"{os.fspath(path)}{PARTIAL_SUFFIX}")


# --------------------------------------------------------------------------- layout
def choose_chunks(shape: Sequence[int], batch_size: int, itemsize: int) -> tuple[int, ...]:
    """HDF5 chunk shape for an (N, U, ...) dataset written B = ``batch_size`` rows at a time.

    If a whole block (B, U, ...) is at most 4 MB, chunks hold k blocks (k >= 1, the fewest that
    reach 0.5 MB, at most N rows); otherwise units are split into the fewest even groups Ub that
    keep (B, Ub, ...) within 4 MB, and if one unit of a block is still larger, rows are split to a
    divisor of B. Every chunk row range therefore lies within one block or holds whole blocks.
    """
    n_rows, n_units, *rest = (int(v) for v in shape)
    per_unit = itemsize * math.prod(rest)
    rows = min(batch_size, n_rows)
    if rows * n_units * per_unit <= CHUNK_MAX_BYTES:
        blocks = max(1, math.ceil(CHUNK_MIN_BYTES / max(1, rows * n_units * per_unit)))
        return (max(1, min(blocks * rows, n_rows)), max(1, n_units), *rest)
    max_units = CHUNK_MAX_BYTES // (rows * per_unit)
    if max_units >= 1:
        groups = math.ceil(n_units / max_units)
        return (rows, math.ceil(n_units / groups), *rest)
    divisors = [d for d in range(1, rows + 1) if rows % d == 0 and d * per_unit <= CHUNK_MAX_BYTES]
    return (max(divisors, default=1), 1, *rest)


def block_range(block: int, batch_size: int, n_rows: int) -> tuple[int, int]:
    """Rows [start, stop) of write block ``block``."""
    start = block * batch_size
    return start, min(start + batch_size, n_rows)


def n_blocks(n_rows: int, batch_size: int) -> int:
    """Number of write blocks of ``batch_size`` rows covering ``n_rows`` rows."""
    return max(1, math.ceil(n_rows / batch_size))


# --------------------------------------------------------------------------- fingerprint
def fingerprint_fields(*, weights: str, model: str, layer: str, dataset: str,
                       mean: Sequence[float], std: Sequence[float], resize: Any, dtype: str,
                       version: str, batch_size: int, **extra: Any) -> dict[str, Any]:
    """The fields a cache depends on, as a JSON-ready dict (stored as attribute ``fingerprint``).

    ``weights`` is the sha256 of the model's state_dict, ``model`` the model spec, ``dataset`` the
    dataset fingerprint, ``mean``/``std``/``resize`` the preprocessing, ``batch_size`` decides the
    write blocks (stored, but not compared for a complete cache: :data:`LAYOUT_FIELDS`); ``extra``
    fields (e.g. autocast, output layout) are added as given.
    """
    fields = {"weights": weights, "model": model, "layer": layer, "dataset": dataset,
              "mean": [float(v) for v in mean], "std": [float(v) for v in std],
              "resize": list(resize) if resize is not None else None, "dtype": dtype,
              "version": version, "batch_size": int(batch_size)}
    fields.update(extra)
    return json.loads(json.dumps(fields))  # normalise tuples -> lists, exactly as stored


def changed_fields(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Names of fingerprint fields whose values differ (or exist on one side only), sorted."""
    return sorted(k for k in set(stored) | set(wanted)
                  if k not in stored or k not in wanted or stored[k] != wanted[k])


def _describe_changes(stored: Mapping[str, Any], wanted: Mapping[str, Any],
                      changed: Sequence[str]) -> str:
    def short(value: Any) -> str:
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return ", ".join(f"{k} ({short(stored.get(k))} -> {short(wanted.get(k))})" for k in changed)


def read_fingerprint(file: h5py.File) -> dict[str, Any]:
    """The fingerprint dict of an open cache file ({} when absent or unreadable)."""
    try:
        return json.loads(file.attrs.get("fingerprint", "{}"))
    except (TypeError, ValueError):
        return {}


# --------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class CacheInfo:
    """What :func:`open_cache` reports about a complete cache file.

    ``n_units``, ``height`` and ``width`` describe ``acts`` (N, U, h, w); for ``outputs.h5``
    (``logits`` (N, C)) ``n_units`` is C and ``height = width = 1``. ``dtype`` is the stored dtype
    name (``'float16'``/``'float32'``), ``name`` the main dataset.
    """

    path: Path
    name: str
    n_images: int
    n_units: int
    height: int
    width: int
    dtype: str
    fingerprint: dict[str, Any] = field(repr=False)
    attrs: dict[str, Any] = field(repr=False)

    @property
    def unit_layout(self) -> dict[str, Any] | None:
        """How the layer output became unit maps (attribute ``unit_layout``; None for caches
        written before it existed and for outputs.h5): ``layout`` ('nchw' | 'nhwc' | 'tokens' |
        'flat'), ``output_shape`` per image, ``units``, ``grid`` [h, w], ``drop_tokens`` (see
        :func:`dissect.record.trace.describe_layout`)."""
        text = self.attrs.get("unit_layout")
        if not text:
            return None
        try:
            value = json.loads(text)
        except (TypeError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the main dataset."""
        if self.name == "logits":
            return (self.n_images, self.n_units)
        return (self.n_images, self.n_units, self.height, self.width)


def _attr_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def open_cache(path: str | os.PathLike[str]) -> CacheInfo:
    """Describe the complete cache file at ``path`` (a ``<layer>.h5`` or ``outputs.h5``).

    Raises
    ------
    CacheError
        When the file is missing, unreadable or incomplete (the message says to run
        ``dissect record``, which also resumes an interrupted recording).
    """
    path = Path(path)
    if not path.is_file():
        if partial_path(path).exists():
            raise CacheError(f"cache {path} is incomplete (the recording was interrupted: "
                             f"{partial_path(path).name} exists); run `dissect record` again to "
                             f"resume it")
        raise CacheError(f"cache {path} does not exist; {_RECORD_HINT}")
    try:
        with h5py.File(path, "r") as file:
            name = "acts" if "acts" in file else "logits" if "logits" in file else None
            if name is None:
                raise CacheError(f"cache {path} holds neither 'acts' nor 'logits'; it is not an "
                                 f"activation cache. {_RECORD_HINT}")
            attrs = {k: _attr_value(v) for k, v in file.attrs.items()}
            if not attrs.get("complete", False):
                raise CacheError(f"cache {path} is incomplete ({attrs.get('n_written', 0)} of "
                                 f"{file[name].shape[0]} images written); run `dissect record` "
                                 f"again to finish it")
            shape = file[name].shape
            dtype = str(file[name].dtype)
            fingerprint = read_fingerprint(file)
    except OSError as error:
        raise CacheError(f"cannot read cache {path}: {error}; {_RECORD_HINT}") from error
    height, width = (shape[2], shape[3]) if len(shape) == 4 else (1, 1)
    return CacheInfo(path, name, int(shape[0]), int(shape[1]), int(height), int(width), dtype,
                     fingerprint, attrs)


class CacheReader:
    """Picklable reader of one dataset of a cache file; holds only ``(path, name)``.

    The file is opened for each read (cheap, and safe in threads, processes and on a
    ``dask.distributed`` cluster). ``name`` is ``'acts'`` (N, U, h, w), ``'amax'`` (N, U) or
    ``'logits'`` (N, C). Reads return float32 arrays.
    """

    def __init__(self, path: str | os.PathLike[str], name: str = "acts") -> None:
        self.path = Path(path)
        self.name = name

    def __repr__(self) -> str:
        return f"CacheReader({str(self.path)!r}, {self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CacheReader) and (self.path, self.name) == (other.path,
                                                                             other.name)

    def __hash__(self) -> int:
        return hash((self.path, self.name))

    def __reduce__(self) -> tuple[Any, ...]:
        return (CacheReader, (str(self.path), self.name))

    def _open(self, chunk_cache: bool = True) -> h5py.File:
        """The file, open for reading. ``chunk_cache=False``: without HDF5's chunk cache, for one
        slice per open, which reads each chunk once anyway. With HDF5 2's default 8 MB cache,
        chunks that fit it pass through it: reading a float16 cache of 1000 images in slices
        of 63 rows took 3.5-3.8x longer at 512x7x7 to 128x28x28 (same time at 64x56x56,
        whose 12.8 MB chunks bypass it; gzip and lzf caches no slower without it)."""
        options = {} if chunk_cache else {"rdcc_nbytes": 0}
        try:
            file = h5py.File(self.path, "r", **options)
        except (OSError, FileNotFoundError) as error:
            raise CacheError(f"cannot read cache {self.path}: {error}; {_RECORD_HINT}") from error
        if self.name not in file:
            file.close()
            raise CacheError(f"cache {self.path} has no dataset {self.name!r}")
        return file

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dataset, e.g. (N, U, h, w) for ``acts``."""
        with self._open() as file:
            return tuple(int(v) for v in file[self.name].shape)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int, *, stored: bool = False) -> np.ndarray:
        """Rows ``[start, stop)`` as float32, e.g. (stop - start, U, h, w) for ``acts``.

        ``stored=True`` returns them in the cache's own dtype (float16 or float32) instead: no
        conversion, for consumers that handle float16 themselves (the quantile's selection).
        A cache as the recorder writes it (whole rows per chunk, no compression) is read with
        plain reads of the chunks' bytes (:func:`_row_spans`), which threads run side by side;
        any other layout through HDF5.
        """
        with self._open(chunk_cache=False) as file:
            data = file[self.name]
            if not 0 <= start <= stop <= data.shape[0]:
                raise OptionError(f"rows [{start}, {stop}) are outside cache {self.path} "
                                  f"({data.shape[0]} rows)")
            rows = _read_range(file, data, start, stop, self.path)
            return rows if stored else rows.astype(np.float32, copy=False)

    def read_rows(self, indices: Sequence[int] | np.ndarray, *, stored: bool = False
                  ) -> np.ndarray:
        """Rows ``indices`` (any order, repeats allowed) as float32 (or, ``stored=True``, the
        cache's dtype), in the order given."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        with self._open() as file:
            data = file[self.name]
            outside = index[(index < 0) | (index >= data.shape[0])]
            if outside.size:
                raise OptionError(f"row indices outside [0, {data.shape[0]}) for cache "
                                  f"{self.path}: {outside[:5].tolist()}")
            unique, inverse = np.unique(index, return_inverse=True)
            out = np.empty((len(unique), *data.shape[1:]),
                           dtype=data.dtype if stored else np.float32)
            # contiguous runs of the sorted unique rows are read as slices
            breaks = np.flatnonzero(np.diff(unique) != 1) + 1
            position = 0
            for run in np.split(unique, breaks) if unique.size else []:
                out[position:position + len(run)] = _read_range(
                    file, data, int(run[0]), int(run[-1]) + 1, self.path)
                position += len(run)
        return out[inverse]


def _read_range(file: h5py.File, data: h5py.Dataset, start: int, stop: int, path: Path
                ) -> np.ndarray:
    """Rows ``[start, stop)`` of ``data`` in its own dtype: plain reads where
    :func:`_row_spans` finds them, else through HDF5."""
    spans = _row_spans(file, data, start, stop)
    if spans is None:
        return data[start:stop]
    rows = np.empty((stop - start, *data.shape[1:]), dtype=data.dtype)
    _read_spans(file.id.get_vfd_handle(), rows, spans, path)
    return rows


def _row_spans(file: h5py.File, data: h5py.Dataset, start: int, stop: int
               ) -> list[tuple[int, int, int]] | None:
    """Where rows ``[start, stop)`` of ``data`` lie in the file, when plain reads can fetch them:
    [(first row, stop row, byte offset), ...] per chunk, or None where HDF5 must read them.

    That is when the file uses the default (sec2) driver and the dataset is chunked with whole
    rows per chunk (chunks (B, *shape[1:]), as the recorder writes them), has no filter (no
    compression, shuffle or checksum), no external storage, a native numeric dtype, and every
    chunk of the range is allocated (an unwritten chunk reads as HDF5's fill value). Within such
    a chunk, row r of the chunk is its bytes ``[r * row_bytes, (r + 1) * row_bytes)``.
    """
    chunks = data.chunks
    if (start >= stop or not hasattr(os, "preadv") or file.driver != "sec2" or chunks is None
            or tuple(chunks[1:]) != tuple(data.shape[1:])
            or data.dtype.kind not in "fiu" or not data.dtype.isnative or data.is_virtual):
        return None
    plist = data.id.get_create_plist()
    if plist.get_nfilters() or plist.get_external_count():
        return None
    row_bytes = math.prod(data.shape[1:]) * data.dtype.itemsize
    spans = []
    for first in range(start - start % chunks[0], stop, chunks[0]):
        info = data.id.get_chunk_info_by_coord((first,) + (0,) * (data.ndim - 1))
        if info.byte_offset is None or info.filter_mask:
            return None
        low = max(start, first)
        spans.append((low, min(stop, first + chunks[0]),
                      info.byte_offset + (low - first) * row_bytes))
    return spans


def _read_spans(handle: int, rows: np.ndarray, spans: list[tuple[int, int, int]],
                path: Path) -> None:
    """Read :func:`_row_spans`' spans from the open file descriptor ``handle`` into ``rows``
    (rows[0] is the first span's first row). ``os.preadv`` runs without the GIL and outside
    h5py's global lock, so threads read side by side (h5py serialises its reads)."""
    first_row = spans[0][0]
    for low, high, offset in spans:
        view = memoryview(rows[low - first_row:high - first_row]).cast("B")
        while len(view):
            got = os.preadv(handle, [view], offset)
            if got <= 0:
                raise CacheError(f"cache {path}: the file ended inside rows [{low}, {high}); "
                                 f"{_RECORD_HINT}")
            view, offset = view[got:], offset + got


# --------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class DatasetSpec:
    """One array of a cache file: name, full shape, dtype name, chunk shape (None: contiguous)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...] | None


def layer_datasets(n_images: int, maps_shape: Sequence[int], dtype: str,
                   batch_size: int) -> list[DatasetSpec]:
    """``acts`` (N, U, h, w) ``dtype`` and ``amax`` (N, U) float32 for a layer cache."""
    n_units, height, width = (int(v) for v in maps_shape)
    shape = (n_images, n_units, height, width)
    return [DatasetSpec("acts", shape, dtype,
                        choose_chunks(shape, batch_size, np.dtype(dtype).itemsize)),
            DatasetSpec("amax", (n_images, n_units), "float32",
                        choose_chunks((n_images, n_units), batch_size, 4))]


def output_datasets(n_images: int, n_outputs: int, batch_size: int) -> list[DatasetSpec]:
    """``logits`` (N, C) float32 for ``outputs.h5``."""
    shape = (n_images, n_outputs)
    return [DatasetSpec("logits", shape, "float32", choose_chunks(shape, batch_size, 4))]


def file_bytes(datasets: Sequence[DatasetSpec]) -> int:
    """Uncompressed size of the datasets in bytes."""
    return sum(math.prod(d.shape) * np.dtype(d.dtype).itemsize for d in datasets)


def check_free_space(directory: Path, needed: int) -> None:
    """CacheError when the file system of ``directory`` has less than ``needed`` bytes free."""
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise CacheError(f"not enough disk space in {directory} for the activation cache: "
                         f"{needed / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free; free space, "
                         f"record fewer layers, use dtype float16 or choose another --out")


def _raise_if_locked(path: Path, error: BaseException) -> None:
    """CacheError when ``error`` says another process holds ``path`` open for writing.

    HDF5 says "unable to lock file"; a damaged file's errors mention e.g. "sblock" (superblock),
    which must not read as a lock (it is rebuilt instead).
    """
    if "unable to lock file" in str(error).lower():
        raise CacheError(f"cache {path} is being written by another process ({error}); wait for "
                         f"it to finish or use another run directory") from error


class CacheState:
    """The on-disk state of one cache before recording: what exists and which blocks are done."""

    def __init__(self, path: Path, fingerprint: Mapping[str, Any], n_rows: int,
                 batch_size: int, force: bool) -> None:
        self.path = path
        self.partial = partial_path(path)
        self.fingerprint = dict(fingerprint)
        self.n_blocks = n_blocks(n_rows, batch_size)
        self.complete = False
        self.done = np.zeros(self.n_blocks, dtype=bool)
        self.shapes: dict[str, tuple[int, ...]] = {}
        #: Batch size of a reusable partial file (its block layout), None when there is none. When
        #: it differs from ``batch_size`` the partial is kept but not reused by this state:
        #: resume with a state built for that batch size (as the recorder does).
        self.partial_batch_size: int | None = None
        self._inspect(force)

    def _check(self, file: h5py.File, where: Path) -> bool:
        """True when ``file`` may be reused; raises CacheError on a fingerprint mismatch.

        The :data:`LAYOUT_FIELDS` (``batch_size``) are not compared: they decide only how the file
        was written, not what it holds (see :meth:`_inspect` for partials).
        """
        stored = read_fingerprint(file)
        changed = [k for k in changed_fields(stored, self.fingerprint) if k not in LAYOUT_FIELDS]
        if changed:
            raise CacheError(
                f"cache {where} was recorded with other settings; changed: "
                f"{_describe_changes(stored, self.fingerprint, changed)}. Rerun with --force "
                f"(force=True) to rebuild it, or use another run directory")
        return file.attrs.get("schema_version") == SCHEMA_VERSION

    def _inspect(self, force: bool) -> None:
        if force:  # rebuild from scratch
            for path in (self.path, self.partial):
                if path.exists():
                    path.unlink()
            return
        if self.path.exists():
            try:
                with h5py.File(self.path, "r") as file:
                    reuse = self._check(file, self.path)
                    complete = bool(file.attrs.get("complete", False))
            except OSError as error:
                _raise_if_locked(self.path, error)
                reuse, complete = False, False  # unreadable: rebuild
            if reuse and complete:  # whatever batch size wrote it: nothing left to compute
                self.complete = True
                self.done[:] = True
                return
            self.path.unlink()
        if self.partial.exists():
            try:
                with h5py.File(self.partial, "r") as file:
                    reuse = self._check(file, self.partial)
                    stored_batch = read_fingerprint(file).get("batch_size")
                    done = np.asarray(file["done"][:], dtype=bool) if "done" in file else None
                    shapes = {k: tuple(file[k].shape) for k in file if k != "done"}
            except (OSError, KeyError) as error:
                _raise_if_locked(self.partial, error)
                reuse, done, stored_batch = False, None, None  # killed mid-write: start again
            if reuse and done is not None and isinstance(stored_batch, int) \
                    and stored_batch != self.fingerprint.get("batch_size"):
                # its blocks are laid out for another batch size: keep it for a resume with that
                # batch size (the recorder switches to it); nothing of it is reused here
                self.partial_batch_size = stored_batch
                return
            if reuse and done is not None and done.shape == self.done.shape:
                self.done = done
                self.shapes = shapes
                self.partial_batch_size = stored_batch if isinstance(stored_batch, int) else None
                return
            self.partial.unlink()

    @property
    def needed_blocks(self) -> np.ndarray:
        """int64 indices of the blocks still to write."""
        return np.flatnonzero(~self.done)


class CacheWriter:
    """Writes one cache file block by block (``<path>.partial`` until :meth:`finish`).

    Constructing it creates the partial file (or reopens the matching partial ``state`` found);
    then :meth:`write_block` for every block still needed and :meth:`finish`; :meth:`close` keeps
    the partial for a later resume.
    """

    def __init__(self, state: CacheState, datasets: Sequence[DatasetSpec], batch_size: int,
                 compression: str | None = None,
                 attributes: Mapping[str, str] | None = None) -> None:
        self.state = state
        self.datasets = {d.name: d for d in datasets}
        self.batch_size = batch_size
        self.n_rows = datasets[0].shape[0]
        if state.shapes and state.shapes != {d.name: d.shape for d in datasets}:
            raise CacheError(f"partial cache {state.partial} holds arrays of shapes "
                             f"{state.shapes}, but this recording gives "
                             f"{ {d.name: d.shape for d in datasets} }; rerun with --force")
        resume = bool(state.shapes)
        state.partial.parent.mkdir(parents=True, exist_ok=True)
        self.file = h5py.File(state.partial, "a" if resume else "w",
                              rdcc_nbytes=4 * CHUNK_MAX_BYTES)
        try:
            if not resume:
                self._create(compression)
            for key, value in (attributes or {}).items():  # e.g. unit_layout (JSON text)
                self.file.attrs[key] = value
            self._arrays = {name: self.file[name] for name in (*self.datasets, "done")}
        except BaseException:
            self.file.close()
            raise

    def _create(self, compression: str | None) -> None:
        for spec in self.datasets.values():
            self.file.create_dataset(spec.name, shape=spec.shape, dtype=spec.dtype,
                                     chunks=spec.chunks, compression=compression)
        self.file.create_dataset("done", data=np.zeros(self.state.n_blocks, dtype=bool))
        self.file.attrs["fingerprint"] = json.dumps(self.state.fingerprint, sort_keys=True)
        self.file.attrs["schema_version"] = SCHEMA_VERSION
        self.file.attrs["n_written"] = 0
        self.file.attrs["complete"] = False
        self.file.flush()

    def write_block(self, block: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write block ``block``'s rows of every dataset, flush, then mark it done and flush."""
        start, stop = block_range(block, self.batch_size, self.n_rows)
        for name, array in arrays.items():
            if array.shape[0] != stop - start:
                raise CacheError(f"block {block} of {self.state.partial}: got {array.shape[0]} "
                                 f"rows for {name!r}, expected {stop - start}")
            write_rows(self._arrays[name], start, array)
        self.file.flush()
        self._arrays["done"][block] = True
        self.state.done[block] = True
        self.file.attrs.modify("n_written", self.n_written)  # in place: no delete + create
        self.file.flush()

    @property
    def n_written(self) -> int:
        """Images in the blocks marked done."""
        return int(sum(min(self.batch_size, self.n_rows - b * self.batch_size)
                       for b in np.flatnonzero(self.state.done)))

    @property
    def all_done(self) -> bool:
        """Whether every block is written."""
        return bool(self.state.done.all())

    def finish(self) -> Path:
        """Set ``complete``, close and rename the partial into place; returns the final path."""
        if not self.all_done:
            raise CacheError(f"cache {self.state.partial} is missing blocks "
                             f"{self.state.needed_blocks[:5].tolist()}; cannot finish it")
        self.file.attrs["complete"] = True
        self.file.close()
        os.replace(self.state.partial, self.state.path)
        self.state.complete = True
        return self.state.path

    def close(self) -> None:
        """Close the file, keeping the partial (for a resume)."""
        if self.file.id.valid:
            self.file.close()


def write_rows(dataset: h5py.Dataset, start: int, array: np.ndarray) -> None:
    """Write ``array`` to rows ``[start, start + len(array))`` of ``dataset``.

    When the rows are exactly one whole chunk of an unfiltered dataset in the same dtype (the
    recorder's usual block), the bytes go straight to the file (``write_direct_chunk``): no copy
    through the HDF5 chunk cache. Otherwise a plain slice assignment.
    """
    if (dataset.chunks == array.shape and not dataset.id.get_create_plist().get_nfilters()
            and array.dtype == dataset.dtype and start % array.shape[0] == 0):
        offset = (start,) + (0,) * (array.ndim - 1)
        dataset.id.write_direct_chunk(offset, np.ascontiguousarray(array))
    else:
        dataset[start:start + array.shape[0]] = array


def finish_partial(state: CacheState) -> Path:
    """Mark a partial whose blocks are all done complete and rename it into place."""
    with h5py.File(state.partial, "a") as file:
        file.attrs["complete"] = True
    os.replace(state.partial, state.path)
    state.complete = True
    return state.path


def check_options(dtype: str, compression: str | None) -> None:
    """OptionError for a ``dtype`` / ``compression`` not in :data:`CACHE_DTYPES` /
    :data:`COMPRESSIONS`."""
    if dtype not in CACHE_DTYPES:
        raise OptionError(f"--dtype: got {dtype!r}, expected one of {', '.join(CACHE_DTYPES)}")
    if compression not in COMPRESSIONS:
        raise OptionError(f"compression: got {compression!r}, expected one of "
                          f"{', '.join(str(c) for c in COMPRESSIONS)}")


def open_activations(cache: Any) -> tuple[Any, str, str, dict[str, Any] | None]:
    """(reader, description, default layer name, fingerprint or None) of a layer cache path or
    of an activation reader (anything with ``read_rows``; its ``path``, when it has one, names
    it). CacheError when the path is not a complete cache of layer activations."""
    if isinstance(cache, (str, os.PathLike)):
        info = open_cache(cache)
        if info.name != "acts":
            raise CacheError(f"cache {cache} holds {info.name!r}, not layer activations 'acts'")
        layer = str(info.fingerprint.get("layer") or Path(cache).stem)
        return CacheReader(cache, "acts"), f"cache {os.fspath(cache)}", layer, info.fingerprint
    path = getattr(cache, "path", None)
    layer = Path(path).stem if path is not None else "layer"
    return cache, f"cache {path}" if path is not None else repr(cache), layer, None
