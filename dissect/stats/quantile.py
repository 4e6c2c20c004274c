"""Exact streaming quantiles per unit, from a mergeable top-K buffer (DESIGN.md §3 step 1)."""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["TopKQuantile", "quantile_positions"]


#: Values a merge handles at once besides its result (64 MB of float32).
_BLOCK_VALUES = 16 * 2**20


def _compact(values: np.ndarray) -> np.ndarray:
    """``values`` as float16 when every value is exactly a float16 (NaN included), else as is."""
    if values.dtype == np.float16:
        return values
    with np.errstate(over="ignore", invalid="ignore"):
        half = values.astype(np.float16)
    same = np.array_equal(half.astype(values.dtype), values, equal_nan=True)
    return half if same else values


def _half_keys(values: np.ndarray) -> np.ndarray:
    """int32 keys of float16 ``values`` whose integer order is the float order (a new array).

    The float16 bit patterns, sign-extended to int32: non-negative floats keep their bit
    pattern; for negative ones (sign bit set) the 15 low bits are flipped, so more negative
    floats get smaller keys. -0 sorts just below +0 (equal floats, so every order statistic
    keeps its value); NaN gets keys beyond +-inf (callers track NaN separately, as
    :func:`_has_nan_bits`). int32, not int16: NumPy's partition has a SIMD kernel for 32-bit
    integers on x86-64 machines with AVX2, for 16-bit ones only with AVX-512 (on an AVX2
    machine, 4.9x faster for the top K of a 128 x 28 x 28 chunk). :func:`_half_values`
    inverts it.
    """
    return _flip_negative(values.view(np.int16)).astype(np.int32)


def _half_values(keys: np.ndarray) -> np.ndarray:
    """float16 values of int32 :func:`_half_keys` (a new array, same shape)."""
    return _flip_negative(keys.astype(np.int16)).view(np.float16)


def _flip_negative(bits: np.ndarray) -> np.ndarray:
    """int16 ``bits`` with the 15 low bits of the negative ones flipped (a new array; the map
    is its own inverse). In int16, then widened: half the memory traffic of int32 operations."""
    flipped = bits >> 15
    flipped &= np.int16(0x7FFF)
    flipped ^= bits
    return flipped


def _partition(values: np.ndarray, kth: int | list[int]) -> None:
    """``values.partition(kth, axis=1)`` in place, for float16 through int32 order keys.

    NumPy's float16 partition compares in software; the keys are partitioned with the SIMD
    selection of 32-bit integers. The partitioned positions hold the same values as
    ``np.partition`` gives (up to the sign of zero and NaN payloads).
    """
    if values.dtype == np.float16:
        keys = _half_keys(values)
        keys.partition(kth, axis=1)
        values[...] = _half_values(keys)
    else:
        values.partition(kth, axis=1)


def _has_nan_bits(bits: np.ndarray) -> np.ndarray:
    """bool (U,): rows of int16 (U, m) float16 bit patterns holding a NaN (two reductions).

    A NaN with the sign bit clear is above +inf's pattern 0x7C00 as int16; one with it set is
    above -inf's pattern 0xFC00 as uint16.
    """
    return ((bits.max(axis=1) > np.int16(0x7C00))
            | (bits.view(np.uint16).max(axis=1) > np.uint16(0xFC00)))


def _top_k(values: np.ndarray, k: int, in_place: bool = False) -> np.ndarray:
    """The ``k`` largest values of every row of (U, m) ``values``: (U, min(k, m)), unordered.

    ``in_place`` allows reordering ``values`` itself (no copy).
    """
    width = values.shape[1]
    if k >= width:
        return values
    pool = values if in_place else values.copy()
    _partition(pool, width - k)
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
        work = np.float16 if values.dtype == np.float16 else dtype
        per_unit = np.ascontiguousarray(
            np.moveaxis(values, 1, 0).reshape(self.n_units, -1), dtype=work)
        if np.may_share_memory(per_unit, values):    # partitioned or kept below
            per_unit = per_unit.copy()
        self._count(per_unit.shape[1])
        # The chunk's own top K first (one partition of this private copy, or of the float16
        # values' keys), then the merge with the buffer, which is at most 2 K values per unit.
        if per_unit.dtype == np.float16:
            top = self._top_half(per_unit)
        else:
            top = _top_k(per_unit, self.k, in_place=True)
            # NaN sorts last: a unit's NaN is in its top part
            self.has_nan |= np.isnan(top).any(axis=1)
        top = _compact(top)
        self.buffer = top if self.buffer is None else self._top([self.buffer, top])

    def _top_half(self, values: np.ndarray) -> np.ndarray:
        """The top K of every row of float16 (U, m) ``values`` (all of them when m <= K),
        selected by their order keys (:func:`_half_keys`); records which rows hold a NaN."""
        self.has_nan |= _has_nan_bits(values.view(np.int16))
        if self.k >= values.shape[1]:
            return values
        return _half_values(_top_k(_half_keys(values), self.k, in_place=True))

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
        """The K largest values per unit of (U, m) arrays, as a (U, min(K, total m)) array.

        Units are processed in blocks partitioned in place, so besides the result a merge holds
        at most ``_BLOCK_VALUES`` extra values (not a copy of every input).
        """
        dtype = np.result_type(*parts)
        width = sum(part.shape[1] for part in parts)
        keep = min(self.k, width)
        out = np.empty((self.n_units, keep), dtype=dtype)
        step = max(1, _BLOCK_VALUES // max(width, 1))
        for start in range(0, self.n_units, step):
            stop = min(start + step, self.n_units)
            pool = np.concatenate([part[start:stop].astype(dtype, copy=False)
                                   for part in parts], axis=1)
            if width > keep:
                # NaN sorts last: a unit with NaN keeps it (its result is NaN).
                _partition(pool, width - keep)
            out[start:stop] = pool[:, width - keep:]
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
