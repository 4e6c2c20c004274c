"""Exact streaming quantiles per unit, from a mergeable top-K buffer (DESIGN.md §3 step 1)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["TopKQuantile", "quantile_positions"]


#: Values a selection copies and partitions at once (a block of units; at least one unit): 1 MB
#: of float16, so the block stays in a core's cache from its copy to its partition (whole
#: chunks measured 1.2-1.3x slower), and besides its result a chunk or a merge holds no more.
_BLOCK_VALUES = 2**19


def _compact(values: np.ndarray) -> np.ndarray:
    """``values`` as float16 when every value is exactly a float16 (NaN included), else as is."""
    if values.dtype == np.float16:
        return values
    with np.errstate(over="ignore", invalid="ignore"):
        half = values.astype(np.float16)
    same = np.array_equal(half.astype(values.dtype), values, equal_nan=True)
    return half if same else values


def _int16_select() -> bool:
    """Whether NumPy selects 16-bit integers with SIMD here (x86-64 with AVX-512 at the
    Ice Lake level; NumPy's own dispatch). Elsewhere it selects 32-bit integers several times
    faster (SIMD on AVX2 machines) and float16 order keys are widened first."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:                      # NumPy < 2: keep the widening (always correct)
        return False
    return bool(__cpu_features__.get("AVX512_ICL", False))


#: Partition float16 order keys as int16 (True) or widened to int32 (False); both exact.
_SELECT_INT16 = _int16_select()


def _flip_negative(bits: np.ndarray) -> None:
    """Flip, in place, the 15 low bits of the negative ones of int16 ``bits`` (float16 bit
    patterns): the result's integer order is the floats' order (its own inverse).

    Non-negative patterns keep their bits; for negative ones the 15 low bits are flipped, so
    more negative floats get smaller keys. -0 sorts just below +0 (equal floats, so every order
    statistic keeps its value); NaN gets keys beyond +-inf (callers track NaN separately, as
    :func:`_has_nan_bits`).
    """
    flipped = bits >> 15
    flipped &= np.int16(0x7FFF)
    bits ^= flipped


#: Columns of a row that :func:`_heavy_ties` looks at, and the share of them one value must
#: take (a quarter): a value that fills half a row is then found with certainty in practice.
_TIE_SAMPLE = 64


def _heavy_ties(values: np.ndarray) -> bool:
    """Whether some row of (R, w) ``values`` has one value in a quarter or more of
    ``_TIE_SAMPLE`` evenly spaced columns (compared as the partition compares them).

    NumPy's selection of int32, int64 and float32 slowed down 5-60x on rows where one value,
    such as ReLU's 0, fills half or more of the row; such rows get tie-broken keys.
    """
    width = values.shape[1]
    sample = np.sort(values[:, ::max(1, width // _TIE_SAMPLE)][:, :_TIE_SAMPLE], axis=1)
    quarter = max(1, sample.shape[1] // 4)
    return sample.shape[1] > quarter and bool((sample[:, quarter:] == sample[:, :-quarter]).any())


def _partition(values: np.ndarray, kth: int | list[int], negative: bool | None = None) -> None:
    """``values.partition(kth, axis=1)`` in place, float16 included. Only the columns from
    ``min(kth)`` on are sure to be written back (callers read the partitioned top only).

    float16 values are partitioned by integer order keys in their own bits
    (:func:`_flip_negative`, needed only when some bit pattern has its sign set: ``negative``,
    found here when None), as int16 where NumPy selects 16-bit integers with SIMD, else
    widened to int32. Rows with heavy ties (:func:`_heavy_ties`) are partitioned by keys that
    carry the column in their low bits, so that no two keys of a row tie: int32 keys with the
    column (mod 2**16) in the low 16 bits for float16, int64 keys with the column in the low
    32 bits for float32 (C contiguous). The partitioned positions hold the same values as
    ``np.partition`` gives (up to the sign of zero and NaN payloads; a float32 NaN with the
    sign bit set sorts first in the tie-broken keys, so callers find NaN before partitioning).
    """
    first = min(kth) if isinstance(kth, list) else kth
    if (values.dtype == np.float32 and values.flags.c_contiguous and values.size
            and _heavy_ties(values)):
        # the float16 keys 32 bits wide (flipped in int64: sign-extended, the flip is
        # (key >> 31) & 0x7FFFFFFF), the column in the low 32 bits
        keys = values.view(np.int32).astype(np.int64)
        keys ^= (keys >> 31) & 0x7FFFFFFF
        keys <<= 32
        keys |= np.arange(values.shape[1], dtype=np.int64)
        keys.partition(kth, axis=1)
        top = keys[:, first:]
        top >>= 32
        top ^= (top >> 31) & 0x7FFFFFFF
        np.copyto(values.view(np.int32)[:, first:], top, casting="unsafe")
        return
    if values.dtype != np.float16:
        values.partition(kth, axis=1)
        return
    bits = values.view(np.int16)
    if negative is None:
        negative = bool(bits.min() < 0)
    if negative:
        _flip_negative(bits)
    if _SELECT_INT16:
        bits.partition(kth, axis=1)
    else:
        keys = bits.astype(np.int32)
        ties = bool(values.size) and _heavy_ties(bits)
        if ties:
            keys <<= 16
            keys |= np.arange(bits.shape[1], dtype=np.int32) & 0xFFFF
        keys.partition(kth, axis=1)
        bits = bits[:, first:]
        top = keys[:, first:]
        if ties:
            top >>= 16
        np.copyto(bits, top, casting="unsafe")          # exact: every key's high half fits
    if negative:
        _flip_negative(bits)


def _has_nan_bits(bits: np.ndarray, negative: bool = True) -> np.ndarray:
    """bool (U,): rows of int16 (U, m) float16 bit patterns holding a NaN (one or two
    reductions).

    A NaN with the sign bit clear is above +inf's pattern 0x7C00 as int16; one with it set is
    above -inf's pattern 0xFC00 as uint16 (looked for only when ``negative``: some pattern has
    its sign bit set).
    """
    nan = bits.max(axis=1) > np.int16(0x7C00)
    if negative:
        nan |= bits.view(np.uint16).max(axis=1) > np.uint16(0xFC00)
    return nan


def _top_k(values: np.ndarray, k: int, in_place: bool = False,
           negative: bool | None = None) -> np.ndarray:
    """The ``k`` largest values of every row of (U, m) ``values``: (U, min(k, m)), unordered.

    ``in_place`` allows reordering ``values`` itself (no copy); ``negative``: see
    :func:`_partition`.
    """
    width = values.shape[1]
    if k >= width:
        return values
    pool = values if in_place else values.copy()
    _partition(pool, width - k, negative)
    return pool[:, width - k:]


def quantile_positions(n_values: int, level: float) -> tuple[int, int, float]:
    """Where ``numpy.quantile(values, level)`` (method 'linear') reads a sorted array.

    Parameters
    ----------
    n_values:
        Number of values n >= 1.
    level:
        The quantile level in [0, 1] (for dissection, 1 - q).

    Returns
    -------
    (previous, next, gamma):
        0-based ascending positions of the two order statistics and the interpolation weight, as
        numpy computes them: virtual index ``(n - 1) * level``, ``previous = floor``,
        ``next = previous + 1``, ``gamma = virtual - previous``; both positions are ``n - 1``
        when the virtual index is at or beyond the last value.
    """
    virtual = (n_values - 1) * float(level)
    if virtual >= n_values - 1:
        return n_values - 1, n_values - 1, float(virtual - math.floor(virtual))
    previous = math.floor(virtual)
    return previous, previous + 1, float(virtual - previous)


class TopKQuantile:
    """The exact ``(1 - quantile)`` quantile of every unit's values, computed in one pass.

    The state is, per unit, a buffer with the K largest values seen so far, where K is just
    enough to hold the two order statistics that numpy's linear interpolation reads when a unit
    has ``n_values_per_unit`` values. The top K of a union of parts is the top K of the parts'
    top K, so :meth:`merge` is exact and associative (ties included), and the result does not
    depend on how the values were chunked or in which order states were merged.

    Definition of the result: ``result()[u] == numpy.quantile(v, 1 - quantile)`` where ``v`` holds
    every value added for unit u, cast to float32 (float16 inputs, as stored in the activation
    cache, are cast to float32 exactly; float64 inputs are kept as float64). numpy computes the
    interpolation in the array's dtype, so for float16/float32 inputs the threshold is the float32
    value numpy returns, handed back as float64. NaN anywhere in a unit's values makes its result
    NaN, as in numpy.

    Parameters
    ----------
    n_units:
        U, the number of units (axis 1 of the arrays given to :meth:`add`).
    quantile:
        q in [0, 1]: the fraction of values above the result (0.005 in Network Dissection).
    n_values_per_unit:
        The largest number of values any unit will receive (N * h * w for a layer); K is chosen
        for it. Fewer values are fine; more raise ValueError.

    Examples
    --------
    >>> import numpy as np
    >>> values = np.arange(40, dtype=np.float32).reshape(4, 2, 5)   # (n, U, ...)
    >>> top = TopKQuantile(2, 0.25, n_values_per_unit=20)
    >>> top.add(values[:1]); top.add(values[1:])
    >>> top.result().tolist() == [float(np.quantile(values[:, u], 0.75)) for u in range(2)]
    True
    """

    def __init__(self, n_units: int, quantile: float, n_values_per_unit: int) -> None:
        if not 0.0 <= float(quantile) <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {quantile!r}")
        if int(n_values_per_unit) < 1 or int(n_units) < 1:
            raise ValueError("n_units and n_values_per_unit must be >= 1, got "
                             f"{n_units!r} and {n_values_per_unit!r}")
        self.n_units = int(n_units)
        self.quantile = float(quantile)
        self.level = 1.0 - self.quantile
        self.capacity = int(n_values_per_unit)
        previous, _, _ = quantile_positions(self.capacity, self.level)
        # K = the values at ascending positions previous..n-1 (at least 2 when n allows it).
        self.k = min(self.capacity, max(2, self.capacity - previous))
        self.count = 0
        # (U, min(K, count)); float16 while every value added is exactly a float16 (a float16
        # cache), which halves the state, else the values' own float32/float64
        self.buffer: np.ndarray | None = None
        self.value_dtype = np.dtype(np.float32)      # dtype the quantile is interpolated in
        self.has_nan = np.zeros(self.n_units, dtype=bool)

    # -- accumulation ---------------------------------------------------------------------
    def add(self, values: np.ndarray | torch.Tensor) -> None:
        """Add a chunk of values.

        Parameters
        ----------
        values:
            (n, U, ...) array or tensor (any float dtype, any trailing shape): every value of
            ``values[:, u]`` is one more value of unit u.
        """
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        values = np.asarray(values)
        if values.ndim < 2 or values.shape[1] != self.n_units:
            raise ValueError(f"values must be (n, {self.n_units}, ...), got {values.shape}")
        if values.shape[0] == 0:
            return
        dtype = np.result_type(values.dtype, np.float32)
        self.value_dtype = np.result_type(self.value_dtype, dtype)
        # float16 values (a float16 cache read as stored) stay float16: selected by their
        # order keys, exactly as numpy orders them after the cast to float32.
        work = np.dtype(np.float16) if values.dtype == np.float16 else dtype
        n, size = values.shape[0], math.prod(values.shape[2:])
        per_image = values.reshape(n, self.n_units, size)          # a view where it can be
        self._count(n * size)

        # A unit's values of one image are contiguous: where no cast is needed they are copied
        # as one element of a void dtype (NumPy then moves whole maps, 1.0-1.6x faster)
        whole = (np.dtype((np.void, size * per_image.itemsize))
                 if per_image.dtype == work and size and per_image.strides[2] == per_image.itemsize
                 else None)

        def fill(pool: np.ndarray, start: int, stop: int) -> None:  # units' values as rows
            rows = per_image[:, start:stop].transpose(1, 0, 2)
            target = pool.reshape(stop - start, n, size)
            if whole is None:
                np.copyto(target, rows)
            else:
                np.copyto(target.view(whole), rows.view(whole))

        # The chunk's own top K first (block by block, a private copy partitioned in place),
        # then the merge with the buffer, which is at most 2 K values per unit.
        top = _compact(self._top_blocks(fill, n * size, work, find_nan=True))
        self.buffer = top if self.buffer is None else self._top([self.buffer, top])

    def merge(self, *others: TopKQuantile) -> TopKQuantile:
        """A new state holding the values of ``self`` and ``others`` (none is modified).

        Several states are merged with one partition of their concatenated buffers.
        """
        merged = TopKQuantile(self.n_units, self.quantile, self.capacity)
        merged.count = self.count
        merged.has_nan = self.has_nan.copy()
        merged.value_dtype = self.value_dtype
        for other in others:
            if (other.n_units, other.quantile, other.capacity) != (
                    self.n_units, self.quantile, self.capacity):
                raise ValueError("cannot merge TopKQuantile states with different n_units, "
                                 "quantile or n_values_per_unit")
            merged._count(other.count)
            merged.has_nan |= other.has_nan
            merged.value_dtype = np.result_type(merged.value_dtype, other.value_dtype)
        buffers = [state.buffer for state in (self, *others) if state.buffer is not None]
        merged.buffer = merged._top(buffers) if buffers else None
        return merged

    def _count(self, n_new: int) -> None:
        if self.count + n_new > self.capacity:
            raise ValueError(f"TopKQuantile was sized for {self.capacity} values per unit and "
                             f"received {self.count + n_new}")
        self.count += n_new

    def _top(self, parts: list[np.ndarray]) -> np.ndarray:
        """The K largest values per unit of (U, m) arrays, as a (U, min(K, total m)) array."""

        def fill(pool: np.ndarray, start: int, stop: int) -> None:
            np.concatenate([part[start:stop] for part in parts], axis=1, out=pool)

        return self._top_blocks(fill, sum(part.shape[1] for part in parts),
                                np.result_type(*parts), find_nan=False)

    def _top_blocks(self, fill: Callable[[np.ndarray, int, int], None], width: int,
                    dtype: np.dtype, find_nan: bool) -> np.ndarray:
        """The K largest of every unit's ``width`` values, as a (U, min(K, width)) array.

        Units are taken in blocks of about ``_BLOCK_VALUES`` values: ``fill(pool, start,
        stop)`` writes units start..stop's values into the (stop - start, width) ``pool`` (one
        buffer, reused), which is then partitioned in place. ``find_nan``: record which units
        have a NaN among these values (before the partition, which may drop a NaN).
        """
        keep = min(self.k, width)
        out = np.empty((self.n_units, keep), dtype=dtype)
        step = max(1, _BLOCK_VALUES // max(width, 1))
        block = np.empty((min(step, self.n_units), width), dtype=dtype)
        for start in range(0, self.n_units, step):
            stop = min(start + step, self.n_units)
            pool = block[:stop - start]
            fill(pool, start, stop)
            negative = None
            if dtype == np.float16 and (find_nan or width > keep):
                bits = pool.view(np.int16)
                negative = bool(bits.min() < 0)          # one scan serves both uses below
                if find_nan:
                    self.has_nan[start:stop] |= _has_nan_bits(bits, negative)
            if find_nan and dtype != np.float16 and width:
                self.has_nan[start:stop] |= np.isnan(pool.max(axis=1))
            out[start:stop] = _top_k(pool, keep, in_place=True, negative=negative)
        return out

    # -- result ----------------------------------------------------------------------------
    def result(self) -> np.ndarray:
        """(U,) float64: the (1 - quantile) quantile of every unit's values (see class doc)."""
        if self.buffer is None or self.count == 0:
            raise ValueError("TopKQuantile.result() needs at least one added value per unit")
        n = self.count
        previous, following, gamma = quantile_positions(n, self.level)
        offset = n - self.buffer.shape[1]        # ascending position of buffer's smallest value
        lowest = previous - offset
        if lowest < 0:                            # cannot happen: K covers these positions
            raise RuntimeError("TopKQuantile buffer too small")
        width = self.buffer.shape[1]
        wanted = sorted({lowest, following - offset})
        part = self.buffer.copy()
        if width > 1:
            _partition(part, wanted)
        a = part[:, lowest].astype(self.value_dtype)
        b = part[:, following - offset].astype(self.value_dtype)
        # numpy's _lerp, evaluated in the buffer dtype with a Python-float weight (inf - inf is
        # NaN, as numpy's result, without its warning)
        with np.errstate(invalid="ignore"):
            diff = b - a
            value = a + diff * gamma
            if gamma >= 0.5:
                value = b - diff * (1 - gamma)
        out = np.asarray(value, dtype=np.float64)
        out[self.has_nan] = np.nan
        return out

    # -- display ---------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"TopKQuantile(n_units={self.n_units}, quantile={self.quantile}, "
                f"n_values_per_unit={self.capacity}, count={self.count}, k={self.k})")
