"""Masks, IoU counts and best labels of Network Dissection (DESIGN.md §3 steps 2-5).

Everything here is pure array code: arrays in, arrays out, no I/O, no printing. Functions that
use torch take an optional ``device``; they never pick one themselves (default: the device of a
torch input, else the CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from dissect.config import UNION_RULES

__all__ = [
    "UNION_RULES",
    "IoUCounts",
    "upsample_maps",
    "upsample_pixel_major",
    "threshold_below",
    "prefilter_applies",
    "prefilter_default",
    "count_iou",
    "iou_from_counts",
    "best_labels",
    "best_category",
    "unit_order",
]

#: The union rules (``UNION_RULES``, from the one registry in dissect.config), as a type.
UnionRule = Literal["touched", "annotated", "all"]

# The full resize upsamples one image's maps at a time, in batches of at most this many pixels
# (8 MB of float32).
_BATCH_VALUES = 2 * 1024 * 1024
#: Map sizes (h * w) up to which ``count_iou`` converts float16 maps before taking their maxima.
_SHORT_ROWS = 14 * 14


@dataclass(frozen=True, eq=False)
class IoUCounts:
    """Additive IoU counts of one layer over some images (DESIGN.md §3 step 3).

    Attributes
    ----------
    label_area:
        int64 (L,): pixels carrying each label, over every pixel layer; an image-level label adds
        sh * sw. Label 0 is always 0.
    intersection:
        int64 (U, L): mask pixels of unit u carrying label l (image-level label: the whole mask).
    act_area:
        int64 (U, C): mask pixels of unit u over the images that count for category c under the
        union rule.

    ``a + b`` sums two counts (associative and exact, so chunks may be summed in any order).
    """

    label_area: np.ndarray
    intersection: np.ndarray
    act_area: np.ndarray

    @classmethod
    def zeros(cls, n_units: int, n_labels: int, n_categories: int) -> IoUCounts:
        """All-zero counts for U units, L labels and C categories."""
        return cls(np.zeros(n_labels, np.int64), np.zeros((n_units, n_labels), np.int64),
                   np.zeros((n_units, n_categories), np.int64))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(U, L, C)."""
        return (self.intersection.shape[0], self.intersection.shape[1], self.act_area.shape[1])

    def __add__(self, other: IoUCounts) -> IoUCounts:
        if not isinstance(other, IoUCounts):
            return NotImplemented
        if self.shape != other.shape:
            raise ValueError(f"cannot add IoUCounts of shapes (U, L, C) {self.shape} and "
                             f"{other.shape}")
        return IoUCounts(self.label_area + other.label_area,
                         self.intersection + other.intersection,
                         self.act_area + other.act_area)

    def __reduce__(self) -> tuple:
        """Pickle ``intersection`` as its nonzero entries when that is smaller.

        Dask's processes and distributed schedulers move every chunk's counts between processes;
        a chunk's (U, L) intersection is mostly zeros (a unit's masks meet few of the labels).
        """
        flat = self.intersection.reshape(-1)
        where = np.flatnonzero(flat)
        if 2 * len(where) >= len(flat):
            return (IoUCounts, (self.label_area, self.intersection, self.act_area))
        index_dtype = np.int32 if len(flat) < 2 ** 31 else np.int64
        return (_counts_from_sparse, (self.label_area, self.intersection.shape,
                                      where.astype(index_dtype), flat[where], self.act_area))

    def equals(self, other: IoUCounts) -> bool:
        """True when every count is equal."""
        return (self.shape == other.shape
                and np.array_equal(self.label_area, other.label_area)
                and np.array_equal(self.intersection, other.intersection)
                and np.array_equal(self.act_area, other.act_area))


def _counts_from_sparse(label_area: np.ndarray, shape: tuple[int, int], where: np.ndarray,
                        values: np.ndarray, act_area: np.ndarray) -> IoUCounts:
    intersection = np.zeros(shape, dtype=values.dtype)
    intersection.reshape(-1)[where] = values
    return IoUCounts(label_area, intersection, act_area)


def _device_of(array: np.ndarray | torch.Tensor, device: str | torch.device | None
               ) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(array, torch.Tensor):
        return array.device
    return torch.device("cpu")


def _as_tensor(array: np.ndarray | torch.Tensor, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.to(device=device, dtype=dtype)
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).to(device=device, dtype=dtype)


def upsample_maps(maps: np.ndarray | torch.Tensor, size: tuple[int, int]
                  ) -> np.ndarray | torch.Tensor:
    """Bilinear upsampling of activation maps with half-pixel centres and edge clamping.

    ``torch.nn.functional.interpolate(mode='bilinear', align_corners=False)``, which equals PIL's
    BILINEAR resize (NetDissect-Lite's) when enlarging, to float32 rounding. A map larger than
    ``size`` in either direction (e.g. an early VGG layer at 224 against Broden's 112 masks) is
    resized with ``antialias=True``, as PIL's BILINEAR filter does when shrinking; both never
    exceed the map's maximum. The result of one map does not depend on the batch it is in (see
    :func:`upsample_pixel_major`).

    Parameters
    ----------
    maps:
        (n, h, w) float array or tensor.
    size:
        (sh, sw), the target size.

    Returns
    -------
    float32 (n, sh, sw): a NumPy array for NumPy input, a tensor (same device) for tensor input
    (possibly a strided view).
    """
    as_numpy = not isinstance(maps, torch.Tensor)
    tensor = _as_tensor(maps, torch.float32, _device_of(maps, None))
    if tensor.ndim != 3:
        raise ValueError(f"maps must be (n, h, w), got shape {tuple(tensor.shape)}")
    target = (int(size[0]), int(size[1]))
    up = upsample_pixel_major(tensor, target).reshape(*target, len(tensor)).permute(2, 0, 1)
    return up.numpy() if as_numpy else up


#: On the CPU, maps are upsampled as the channels of one channels-last image, padded to a multiple
#: of this many: torch's kernel then takes every map through its vectorised loop, whose float32
#: rounding differs from its scalar remainder loop by an ulp, so a map's result does not depend on
#: how many maps share its batch. 16 float32 lanes is the widest vector of torch's CPU builds
#: (AVX-512; AVX2 and SVE256 have 8, NEON 4). It is 4-5x faster than the planar (N, 1, h, w)
#: kernel.
_LANES = 16


def upsample_pixel_major(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """:func:`upsample_maps` of float32 (n, h, w) maps, as a (sh * sw, n) pixel-major view.

    On the CPU when enlarging: one channels-last ``interpolate`` of the maps as the channels of
    one image (zero maps pad n to a multiple of :data:`_LANES`). Otherwise (shrinking, other
    devices): the planar (n, 1, h, w) ``interpolate``, transposed. The comparison with thresholds
    and the scan for mask pixels then run over memory in order.
    """
    return _upsample_padded(maps, size)[:, :maps.shape[0]]


def _upsample_padded(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(sh * sw, P) upsampled maps, P >= n: columns n.. are padding (zero maps), contiguous on
    the CPU path (see :func:`upsample_pixel_major`)."""
    n, height, width = maps.shape
    shrinks = height > size[0] or width > size[1]
    if maps.device.type != "cpu" or shrinks or n == 0:
        up = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False,
                           antialias=shrinks)[:, 0]
        return up.reshape(n, size[0] * size[1]).T
    padded = -(-n // _LANES) * _LANES
    channels = maps.new_zeros((height, width, padded))
    channels[:, :, :n] = maps.permute(1, 2, 0)
    return _upsample_channels(channels, size)


def _upsample_channels(channels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(sh * sw, P) bilinear enlargement of contiguous float32 (h, w, P) CPU ``channels``, P a
    multiple of :data:`_LANES`: torch's channels-last kernel on the maps as the channels of
    one image (see :func:`upsample_pixel_major`)."""
    height, width, padded = channels.shape
    up = F.interpolate(channels.reshape(1, height, width, padded).permute(0, 3, 1, 2), size=size,
                       mode="bilinear", align_corners=False)   # (1, padded, sh, sw), NHWC
    return up[0].permute(1, 2, 0).reshape(size[0] * size[1], padded)


#: The cell prefilter's margin, relative to a map's largest absolute value (see
#: :func:`_tiled_mask_pixels`).
_PREFILTER_MARGIN = 2.0 ** -18

#: Output pixels per tile side the cell prefilter aims at: a tile spans ``_TILE_SIDE // factor``
#: source cells (at least 1) for an enlargement by ``factor``. Smaller tiles skip more of the
#: map but upsample more window per owned pixel; scripts/bench_tally.py found the mask pixels
#: fastest at 1 cell for 7 -> 112, 2 for 14 -> 112, 3-4 for 28 -> 112 and 4-8 for 56 -> 112.
_TILE_SIDE = 16
#: The smallest maps (h * w values) ``count_iou`` uses the cell prefilter for by default; None:
#: never. scripts/bench_tally.py (docs/benchmarks.md, "Tally at four layer shapes") measured
#: it faster than the full path at every shape it applies to, 7 x 7 to 56 x 56.
_PREFILTER_MIN_CELLS: int | None = 0
#: Tiles upsampled by one call (as its channels; more made torch's kernel slower per value).
_TILES_PER_CALL = 512
#: Active maps the cell prefilter takes at once in ``count_iou`` (whole images; the found pixels
#: of one group are held until its images are counted).
_GROUP_MAPS = 1024
#: Label pixels (images times sh * sw) of one such group: their renumbered label layers stay in
#: the cache for the gathers under the mask pixels. scripts/bench_tally.py's data at 112 x 112
#: (20 images a group): at most 16 images per group measured 7% faster than no limit at every
#: shape, one image per group twice as slow (the prefilter's fixed cost per call).
_GROUP_PIXELS = 2 ** 18


@dataclass(frozen=True, eq=False)
class _AxisTiles:
    """Tiles of one axis of a dyadic upsampling (``n_out = factor * n_in``, factor 2**k).

    Tile j reads the ``window`` source rows ``start[j] .. start[j] + window - 1`` and owns the
    output rows whose first source row (torch's ``input_index0``) lies in its cells;
    ``output[j, o]`` is the full-size output row of row o of the tile's upsampled window when
    tile j owns it, else -1. Every output row is owned by exactly one tile.
    """

    factor: int
    window: int
    start: np.ndarray         # int64 (tiles,)
    rows: np.ndarray          # int64 (tiles, window): source rows read by each tile
    output: np.ndarray        # int64 (tiles, window * factor)
    owned: np.ndarray         # int64 (tiles, 2): [first, last) owned rows of a tile's output
    kind: np.ndarray          # int64 (tiles,): tiles of one kind own the same rows


def _first_source_rows(n_in: int, n_out: int) -> np.ndarray:
    """int64 (n_out,): torch's ``input_index0`` of every output row of a bilinear resize with
    align_corners=False and a dyadic ratio: ``max((o + 0.5) * n_in / n_out - 0.5, 0)`` rounded
    down and clamped to n_in - 1 (exact in float64: every term is a short dyadic fraction)."""
    source = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    return np.minimum(np.floor(source).astype(np.int64), n_in - 1)


def _axis_tiles(n_in: int, n_out: int, cells: int) -> _AxisTiles | None:
    """The tiles of one axis, or None when the axis is not a dyadic enlargement that tiles.

    Cells are the n_in - 1 intervals between source rows; tile j owns first source rows
    ``[j * cells, (j + 1) * cells)`` and the last tile also owns n_in - 1 (the clamped bottom
    rows). A tile's window is ``cells + 1`` source rows starting at ``min(j * cells, n_in -
    window)``: inside it every owned output row reads the same two source rows with the same
    weights as in the full resize (the window is upsampled by the same factor, so the weights,
    short dyadic fractions, are bit-identical; clamping happens only at the window's edges, which
    are the map's edges wherever an owned row is clamped).
    """
    factor, remainder = divmod(n_out, n_in)
    window = cells + 1
    if remainder or factor & (factor - 1) or n_in < window:
        return None
    first = _first_source_rows(n_in, n_out)
    n_tiles = -(-(n_in - 1) // cells)
    owner = np.minimum(first // cells, n_tiles - 1)
    start = np.minimum(np.arange(n_tiles) * cells, n_in - window)
    output = np.full((n_tiles, window * factor), -1, dtype=np.int64)
    rows_out = np.arange(n_out)
    local = rows_out - start[owner] * factor
    output[owner, local] = rows_out
    rows = start[:, None] + np.arange(window)[None, :]
    owned = np.stack([np.argmax(output >= 0, axis=1),
                      window * factor - np.argmax(output[:, ::-1] >= 0, axis=1)], axis=1)
    if not (output[np.arange(n_tiles)[:, None], np.arange(window * factor)[None, :]] >= 0).sum(
            axis=1).tolist() == (owned[:, 1] - owned[:, 0]).tolist():
        raise RuntimeError("cell prefilter: a tile's owned rows are not contiguous")
    _, kind = np.unique(owned, axis=0, return_inverse=True)
    return _AxisTiles(factor, window, start, rows, output, owned, kind.reshape(-1))


_TILES: dict[tuple[int, int, int, int, int], tuple[_AxisTiles, _AxisTiles] | None] = {}


def _tiles(height: int, width: int, size: tuple[int, int], cells: int
           ) -> tuple[_AxisTiles, _AxisTiles] | None:
    """Both axes' tiles of the cell prefilter (memoised), or None where it does not apply."""
    key = (height, width, size[0], size[1], cells)
    if key not in _TILES:
        rows, columns = _axis_tiles(height, size[0], cells), _axis_tiles(width, size[1], cells)
        _TILES[key] = None if rows is None or columns is None else (rows, columns)
    return _TILES[key]


def _tile_cells(shape: tuple[int, int], size: tuple[int, int]) -> int:
    """Source cells per tile side for (h, w) maps enlarged to (sh, sw): ``_TILE_SIDE`` output
    pixels over the larger factor, at least 1 and at most min(h, w) - 1 (a window fits)."""
    factor = max(int(size[0]) // max(int(shape[0]), 1), int(size[1]) // max(int(shape[1]), 1), 1)
    return max(1, min(_TILE_SIDE // factor, min(int(shape[0]), int(shape[1])) - 1))


def prefilter_applies(shape: tuple[int, int], size: tuple[int, int],
                      device: str | torch.device = "cpu") -> bool:
    """Whether the cell prefilter can be used for (h, w) maps and (sh, sw) masks
    (``count_iou(..., prefilter=True)`` then uses it).

    It can on the CPU when both sides enlarge by a power of two (7 -> 112, 28 -> 112,
    28 x 14 -> 112 x 112, ...) and each side has at least 2 values (a tile's window);
    other ratios (13 -> 56), shrinking (antialiased) and other devices take the full path.
    """
    height, width = int(shape[0]), int(shape[1])
    target = (int(size[0]), int(size[1]))
    return (torch.device(device).type == "cpu"
            and _tiles(height, width, target, _tile_cells((height, width), target)) is not None)


def prefilter_default(shape: tuple[int, int], size: tuple[int, int],
                      device: str | torch.device = "cpu") -> bool:
    """Whether ``count_iou(..., prefilter=None)`` (the default) uses the cell prefilter: where it
    applies (:func:`prefilter_applies`) to maps of at least ``_PREFILTER_MIN_CELLS`` values.

    The cut-off comes from scripts/bench_tally.py (docs/benchmarks.md, "Tally at four layer
    shapes"): 0, since the prefilter measured faster than the full path at every shape it
    applies to (7 x 7 to 56 x 56 onto 112 x 112).
    """
    return (_PREFILTER_MIN_CELLS is not None
            and int(shape[0]) * int(shape[1]) >= _PREFILTER_MIN_CELLS
            and prefilter_applies(shape, size, device))


def _hot_tiles(values: np.ndarray, cutoff: np.ndarray, cells: int, n_tiles: tuple[int, int]
               ) -> np.ndarray:
    """bool (B, ty, tx): tiles j, k of (B, h, w) ``values`` whose window, source rows
    ``[j * cells, j * cells + cells]`` and columns ``[k * cells, k * cells + cells]`` (clipped to
    the map), holds a value above the map's ``cutoff`` (float32 (B,)).

    The values above the cut-off are few (about 1 in 200 at q = 0.005): they are found with one
    comparison pass and each marks the <= 2 x 2 tiles whose windows hold it (a value on a tile
    border row or column belongs to both neighbours' windows), which is cheaper than a max
    pooling over every value. Maps are scanned in blocks of at most ``_BATCH_VALUES // 4``
    values, so that the index arrays stay small however many values pass.
    """
    n_maps, height, width = values.shape
    hot = np.zeros((n_maps, *n_tiles), dtype=bool)
    flat = values.reshape(n_maps, height * width)
    step = max(1, _BATCH_VALUES // 4 // max(height * width, 1))
    for first in range(0, n_maps, step):
        # one flat scan (NumPy's 2-d nonzero is several times slower per value)
        found = np.flatnonzero(flat[first:first + step] > cutoff[first:first + step, None])
        which, position = np.divmod(found, height * width)
        which += first
        row, column = np.divmod(position, width)
        for tile_y in _tiles_holding(row, cells, n_tiles[0]):
            for tile_x in _tiles_holding(column, cells, n_tiles[1]):
                hot[which, tile_y, tile_x] = True
    return hot


def _tiles_holding(index: np.ndarray, cells: int, n_tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """The two tiles (possibly the same) whose windows hold source row ``index``: its own tile
    ``index // cells`` (the last tile for the map's last row) and, for a row on a tile border
    (``index % cells == 0``), the previous tile, whose window ends there."""
    tile, offset = np.divmod(index, cells)
    previous = np.where((offset == 0) & (tile > 0), tile - 1, tile)
    return np.minimum(tile, n_tiles - 1), np.minimum(previous, n_tiles - 1)


def _hot_tile_maps(maps: torch.Tensor, below: np.ndarray, size: tuple[int, int],
                   cells: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cell prefilter's hot tiles of float32 (B, h, w) CPU maps with (B,) thresholds
    ``below`` (tiles of ``cells`` cells, default :func:`_tile_cells`).

    Returns (hot bool (B, ty, tx) (:func:`_hot_tiles`; none for a map with a non-finite value),
    owned int64 (B,) the output pixels owned by a map's hot tiles: a bound on its mask pixels
    and what the prefilter upsamples of it besides the windows' rings (the whole (sh, sw) area
    for a non-finite map), finite bool (B,)).
    """
    n_maps, height, width = maps.shape
    cells = _tile_cells((height, width), size) if cells is None else cells
    rows, columns = _tiles(height, width, size, cells)  # type: ignore[misc]
    values = maps.numpy()
    flat = values.reshape(n_maps, height * width)
    largest = np.maximum(flat.max(axis=1), -flat.min(axis=1)).astype(np.float64)   # (B,)
    finite = np.isfinite(largest)
    # the cut-off t - 2**-18 A, rounded down (see _tiled_mask_pixels); a map with a non-finite
    # value gets +inf: no value passes, no hot tile
    with np.errstate(invalid="ignore"):
        cutoff = threshold_below(below.astype(np.float64) - _PREFILTER_MARGIN * largest)
    cutoff[~finite] = np.inf
    # A tile is hot when a value its owned pixels read exceeds the cut-off: the source rows
    # [j * cells, j * cells + cells] (clipped to the map) for tile j, and the same for columns.
    hot = _hot_tiles(values, cutoff, cells, (len(rows.start), len(columns.start)))
    tile_pixels = ((rows.owned[:, 1] - rows.owned[:, 0])[:, None]
                   * (columns.owned[:, 1] - columns.owned[:, 0])[None, :])        # (ty, tx)
    owned = np.where(finite, (hot * tile_pixels).sum(axis=(1, 2)), size[0] * size[1])
    return hot, owned, finite


def _tiled_mask_pixels(maps: torch.Tensor, below: np.ndarray, size: tuple[int, int],
                       cells: int | None = None, hot: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray] | None:
    """Mask pixels of (B, h, w) CPU maps, upsampling only tiles that can hold one.

    The exact cell prefilter. An output pixel of torch's bilinear kernel is
    ``sum_i w_i v_i`` over the <= 4 source values v_i around it, with weights w_i >= 0 that are
    products of the row and column interpolation weights. For a dyadic ratio these weights
    are short dyadic fractions, exact in float32, and sum to exactly 1; the kernel evaluates the
    sum with at most 4 multiplications and 3 additions (fused or not), each rounded with a
    relative error of at most u = 2**-24, so the computed value is at most
    ``max_i v_i + 7 u (1 + 7u) max_i |v_i|  <  max_i v_i + 2**-18 A`` with A the map's largest
    absolute value. A tile all of whose source values are ``<= t - 2**-18 A`` can therefore hold
    no pixel above the float32 threshold t: it is skipped (the cut-off is rounded down to
    float32, which only keeps more tiles). The other tiles are cut out of their maps with one
    ring of extra source values (their window, :class:`_AxisTiles`), upsampled together as the
    channels of one image by the same channels-last kernel as :func:`_upsample_padded` (the
    same vector lanes, so the same rounding), and only the output pixels each tile owns are
    kept: they have the very values of the full resize. Maps with a non-finite value make the
    function return None (the caller then takes the full path).

    Parameters
    ----------
    maps:
        float32 (B, h, w) CPU tensor (the active maps of a chunk, any images).
    below:
        float32 (B,) thresholds (:func:`threshold_below`).
    size:
        (sh, sw), an enlargement of (h, w) by a power of two on each side that tiles
        (:func:`prefilter_applies`).
    cells:
        Source cells per tile side (default :func:`_tile_cells`); cells + 1 <= h and w.
    hot:
        The maps' hot tiles when already known (:func:`_hot_tile_maps`, default cells; every
        map finite), else found here.

    Returns
    -------
    (which (M,) int64 map index, pixel (M,) int64 flat pixel index of the (sh, sw) mask), in no
    particular order; or None.
    """
    n_maps, height, width = maps.shape
    cells = _tile_cells((height, width), size) if cells is None else cells
    rows, columns = _tiles(height, width, size, cells)  # type: ignore[misc]
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if n_maps == 0:
        return empty
    if hot is None:
        hot, _, finite = _hot_tile_maps(maps, below, size, cells)
        if not finite.all():
            return None
    flat = maps.numpy().reshape(n_maps, height * width)
    which, tile_y, tile_x = np.nonzero(hot)                                     # (T,) each
    if len(which) == 0:
        return empty
    window_size = (rows.window * rows.factor, columns.window * columns.factor)
    offsets = (np.arange(rows.window)[:, None] * width
               + np.arange(columns.window)[None, :]).reshape(-1)              # (wy * wx,)
    corner = which * (height * width) + rows.start[tile_y] * width + columns.start[tile_x]
    # Tiles of one kind (first, inner or last tile on each axis) own the same rectangle of
    # their upsampled window: only that rectangle is compared with the thresholds.
    kind = rows.kind[tile_y] * (columns.kind.max() + 1) + columns.kind[tile_x]
    found_which, found_pixel = [], []
    for group in np.split(np.argsort(kind, kind="stable"),
                          np.flatnonzero(np.diff(np.sort(kind))) + 1):
        y0, y1 = rows.owned[tile_y[group[0]]]
        x0, x1 = columns.owned[tile_x[group[0]]]
        # the mask pixel of owned pixel (y, x) of tile t: origin[t] + y * sw + x
        origin = ((rows.start[tile_y[group]] * rows.factor + y0) * size[1]
                  + columns.start[tile_x[group]] * columns.factor + x0)         # (g,)
        step = (np.arange(y1 - y0)[:, None] * size[1] + np.arange(x1 - x0)[None, :]).reshape(-1)
        for first in range(0, len(group), _TILES_PER_CALL):
            tiles = group[first:first + _TILES_PER_CALL]
            # The windows are gathered straight into the kernel's channels-last (wy, wx, P)
            # layout, P a power of two >= _LANES (so the hits split with a shift and a mask);
            # the padding columns repeat the first window (finite values that never pass).
            n_columns = max(_LANES, 1 << (len(tiles) - 1).bit_length())
            column_corner = np.full(n_columns, corner[tiles[0]])
            column_corner[:len(tiles)] = corner[tiles]
            windows = np.take(flat, offsets[:, None] + column_corner[None, :])     # (wy*wx, P)
            up = _upsample_channels(torch.from_numpy(windows).reshape(
                rows.window, columns.window, n_columns), window_size)              # (Sw, P)
            limits = np.full(n_columns, np.inf, dtype=np.float32)   # padding never passes
            limits[:len(tiles)] = below[which[tiles]]
            owned = up.numpy().reshape(*window_size, n_columns)[y0:y1, x0:x1]    # (oy, ox, P)
            hits = np.flatnonzero(owned > limits)
            del up, owned
            column = hits & (n_columns - 1)
            local = hits >> (n_columns.bit_length() - 1)
            found_which.append(np.take(which[tiles], column))
            found_pixel.append(np.take(origin[first:first + len(tiles)], column)
                               + np.take(step, local))
    if not found_which:
        return empty
    return np.concatenate(found_which), np.concatenate(found_pixel)


def threshold_below(thresholds: np.ndarray) -> np.ndarray:
    """float32 thresholds t32 with ``x > t32`` exactly when ``x > t`` for every float32 x.

    Parameters
    ----------
    thresholds:
        (U,) float thresholds t (float64 from a file, or float32 values from TopKQuantile).

    Returns
    -------
    float32 (U,): t rounded down to float32 (t itself when it is a float32 value; NaN stays NaN).
    """
    exact = np.asarray(thresholds, dtype=np.float64)
    with np.errstate(over="ignore"):              # beyond float32's range: +-inf, fixed below
        below = exact.astype(np.float32)
    too_high = below.astype(np.float64) > exact
    below[too_high] = np.nextafter(below[too_high], np.float32(-np.inf))
    return below


def _mask_pixels(up: torch.Tensor, below: np.ndarray | torch.Tensor,
                 use_numpy: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of ``up > below`` for a batch of upsampled maps, returned to the host.

    Parameters
    ----------
    up:
        float32 (S, P) upsampled maps, pixel-major, P >= B (columns B.. are padding and are
        ignored: :func:`_upsample_padded`).
    below:
        float32 (B,) thresholds (see :func:`threshold_below`).

    Returns
    -------
    (which (M,) int64 map index, pixel (M,) int64 flat pixel index), NumPy arrays, pixel-major.
    ``use_numpy`` (default: on the CPU) has NumPy do the comparison and the scan, several times
    faster than torch's CPU kernels for this; otherwise torch does, on the tensors' device.
    """
    n_maps, n_columns = below.shape[0], up.shape[1]
    if use_numpy is None:
        use_numpy = up.device.type == "cpu"
    if use_numpy:
        limits = np.full(n_columns, np.inf, dtype=np.float32)   # padding columns never pass
        limits[:n_maps] = below.cpu().numpy() if isinstance(below, torch.Tensor) else below
        flat = _flat_above(up.numpy(), limits)
        pixel = flat // n_columns
        return flat - pixel * n_columns, pixel
    below = torch.as_tensor(below, dtype=torch.float32, device=up.device)
    pixel_t, which_t = torch.nonzero(up[:, :n_maps] > below[None, :], as_tuple=True)
    return which_t.cpu().numpy(), pixel_t.cpu().numpy()


#: Rows of (S, P) maps compared at once by :func:`_flat_above` (NumPy's inner loop then runs
#: over k * P values instead of P).
_ROWS_PER_COMPARE = 16


def _flat_above(values: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """Flat indices (row-major) of ``values > limits[None, :]``, int64 (M,), ascending.

    ``values`` is float32 (S, P), ``limits`` float32 (P,).
    """
    rows, columns = values.shape
    k = math.gcd(rows, _ROWS_PER_COMPARE) if values.flags.c_contiguous else 1
    if k > 1:
        values, limits = values.reshape(rows // k, k * columns), np.concatenate([limits] * k)
    return np.flatnonzero(values > limits[None, :])


#: Label map dtypes :func:`_compact_labels` renumbers with ``torch.index_select``.
_TORCH_INDEX = (np.dtype(np.int32), np.dtype(np.int64))
#: Copies of the histogram :func:`_label_counts` counts into, in turn (1.5-1.8x faster than one
#: on region-like label maps; scripts/bench_tally.py's breakdown, label bookkeeping).
_COUNT_COPIES = 4
#: Label map dtypes :func:`_label_counts` counts with ``torch.bincount``.
_TORCH_BINCOUNT = (np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.int16), np.dtype(np.uint8))


def _label_counts(seg: np.ndarray, used_layers: np.ndarray, image_labels: np.ndarray,
                  n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image pixel label counts (n, L) and image-level label counts (n, L), label 0 zeroed.

    ``used_layers[i]`` layers of image i are read (the rest are zero padding).
    """
    n = seg.shape[0]
    pixel_counts = np.zeros((n, n_labels), dtype=np.int64)
    # torch's CPU bincount is about twice NumPy's on int32 label maps (NumPy first casts them to
    # int64 and scans them for their range); both count exactly
    seg_t = (torch.from_numpy(seg) if seg.dtype in _TORCH_BINCOUNT and seg.flags.writeable
             and seg.flags.c_contiguous else None)
    # Label maps are regions: neighbouring pixels mostly carry the same label, and every
    # increment of one counter then waits for the one before. Pixel p counts into copy
    # p % n_copies of the histogram (label + copy * L), and the copies are summed; one copy
    # where the histograms would outgrow a label layer (a vocabulary of over S / 4 labels).
    n_copies = _COUNT_COPIES if _COUNT_COPIES * n_labels <= math.prod(seg.shape[2:]) else 1
    if seg_t is not None and n_copies > 1:
        copies = torch.from_numpy(np.arange(math.prod(seg.shape[1:]), dtype=np.int64)
                                  % n_copies * n_labels)
        if n_copies * n_labels < 2 ** 31:
            copies = copies.int()
    for i in range(n):
        if seg_t is not None and used_layers[i]:
            values = seg_t[i, :used_layers[i]].reshape(-1)
            counts = torch.bincount(values + copies[:len(values)] if n_copies > 1 else values,
                                    minlength=n_copies * n_labels)
            pixel_counts[i] = counts.reshape(n_copies, n_labels).sum(0).numpy()
        else:
            pixel_counts[i] = np.bincount(seg[i, :used_layers[i]].reshape(-1),
                                          minlength=n_labels)
    image_rows, slots = np.nonzero(image_labels > 0)
    level_counts = np.zeros((n, n_labels), dtype=np.int64)
    np.add.at(level_counts, (image_rows, image_labels[image_rows, slots]), 1)
    pixel_counts[:, 0] = 0
    return pixel_counts, level_counts


def _used_layers(seg: np.ndarray) -> np.ndarray:
    """(n,) int64: per image, 1 + the index of its last layer holding any label (0 if none)."""
    n, n_layers = seg.shape[:2]
    if n_layers == 0:
        return np.zeros(n, dtype=np.int64)
    nonempty = seg.reshape(n, n_layers, -1).any(axis=2)
    last = n_layers - np.argmax(nonempty[:, ::-1], axis=1)
    return np.where(nonempty.any(axis=1), last, 0).astype(np.int64)


def _image_runs(pair_image: np.ndarray) -> list[int]:
    """Bounds [0, ..., P] of the runs of one image in image-major (P,) ``pair_image`` ([0] for
    no pairs)."""
    if len(pair_image) == 0:
        return [0]
    return [0, *(np.flatnonzero(np.diff(pair_image)) + 1).tolist(), len(pair_image)]


def _pair_batches(runs: list[int], max_maps: int) -> list[tuple[int, int]]:
    """[start, stop) ranges over image-major (image, unit) pairs with image runs ``runs``
    (:func:`_image_runs`): one image per batch, split into batches of at most ``max_maps``."""
    return [(first, min(first + max_maps, stop))
            for start, stop in zip(runs[:-1], runs[1:])
            for first in range(start, stop, max_maps)]


def _pair_groups(runs: list[int], cost: np.ndarray, max_maps: int, max_cost: int,
                 max_runs: int) -> list[tuple[int, int]]:
    """[start, stop) ranges over image-major pairs with image runs ``runs`` (:func:`_image_runs`)
    and an int64 (P,) ``cost`` per pair: consecutive whole runs, at most ``max_runs`` of them
    holding at most ``max_maps`` pairs and ``max_cost`` cost each; a run that alone holds more
    is split into ranges that keep both bounds (at least one pair each)."""
    total = np.concatenate([[0], np.cumsum(cost)]).tolist()

    def fits(start: int, stop: int) -> bool:
        return stop - start <= max_maps and total[stop] - total[start] <= max_cost

    groups, start, n_runs = [], 0, 0
    for run_start, run_stop in zip(runs[:-1], runs[1:]):
        n_runs += 1
        if n_runs <= max_runs and fits(start, run_stop):
            continue
        n_runs = 1
        if start < run_start:                    # close the group before this run
            groups.append((start, run_start))
            start = run_start
        while not fits(start, run_stop):         # the run alone is too large: split it
            stop = start + 1
            while stop < run_stop and fits(start, stop + 1):
                stop += 1
            groups.append((start, stop))
            start = stop
    return groups + [(start, runs[-1])] if runs[-1] > start else groups


def _mask_batches(maps_of: Callable[[int, int], torch.Tensor], pair_image: np.ndarray,
                  below: np.ndarray | torch.Tensor, size: tuple[int, int], tiled: bool
                  ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Mask pixels of the active maps of a chunk, in batches of consecutive image-major pairs.

    ``maps_of(start, stop)`` gives the float32 (B, h, w) maps of pairs start..stop
    (``pair_image`` (P,) their images), ``below`` their (P,) thresholds (:func:`threshold_below`).
    ``tiled``: through the cell prefilter (:func:`_tiled_mask_pixels`), the maps of several
    whole images at once (at most ``_GROUP_MAPS`` maps of ``_GROUP_PIXELS`` label pixels
    whose hot tiles own at most ``_BATCH_VALUES`` pixels, which bounds the memory of a batch's
    pixels; an image beyond that is split); else, and for a group with a non-finite value,
    the full resize, one image at a time in batches of at most ``_BATCH_VALUES`` upsampled
    values.

    Yields (start, stop, which (M,) int64 map index from ``start``, pixel (M,) int64).
    """
    runs = _image_runs(pair_image)
    max_maps = max(1, _BATCH_VALUES // (size[0] * size[1]))
    if not tiled:
        for start, stop in _pair_batches(runs, max_maps):
            yield start, stop, *_upsample_threshold(maps_of(start, stop), below[start:stop], size)
        return
    maps = maps_of(0, len(pair_image))                       # every active map, float32
    hot, owned, finite = _hot_tile_maps(maps, below, size)
    max_images = max(1, _GROUP_PIXELS // (size[0] * size[1]))
    for low, high in _pair_groups(runs, owned, _GROUP_MAPS, _BATCH_VALUES, max_images):
        if finite[low:high].all():
            yield low, high, *_tiled_mask_pixels(maps[low:high], below[low:high], size,
                                                 hot=hot[low:high])
            continue
        group_runs = [low, *(r for r in runs if low < r < high), high]
        for start, stop in _pair_batches(group_runs, max_maps):
            yield start, stop, *_upsample_threshold(maps[start:stop], below[start:stop], size)


def _weighted_count(codes: list[np.ndarray], weights: list[np.ndarray], size: int
                    ) -> np.ndarray:
    """int64 (size,): sum of ``weights`` per code (exact: float64 sums of integers < 2**53)."""
    if not codes:
        return np.zeros(size, dtype=np.int64)
    total = np.bincount(np.concatenate(codes), weights=np.concatenate(weights).astype(
        np.float64), minlength=size)
    return np.rint(total).astype(np.int64)


def count_iou(
    acts: np.ndarray | torch.Tensor,
    seg: np.ndarray | torch.Tensor,
    image_labels: np.ndarray | torch.Tensor,
    thresholds: np.ndarray,
    primary: np.ndarray,
    n_categories: int,
    union: UnionRule = "touched",
    device: str | torch.device | None = None,
    *,
    prefilter: bool | None = None,
) -> IoUCounts:
    """IoU counts of one chunk of images (DESIGN.md §3 steps 2-3).

    For every (image, unit) whose map maximum exceeds the unit's threshold, the map is upsampled
    to the segmentation size (:func:`upsample_maps`) and thresholded strictly
    (``mask = up > threshold``); every other pair contributes nothing. The per-pixel work
    (maxima, upsampling, thresholding) runs with torch on ``device``; the label bookkeeping of
    the mask pixels (a few percent of the pixels) runs with NumPy on the host.

    Parameters
    ----------
    acts:
        (n, U, h, w) float activations (float16 values are used as float32).
    seg:
        (n, Lyr, sh, sw) integer label maps, zero-padded layers; 0 = no label. Every layer counts,
        so a pixel labelled in two layers counts for both labels. Values must lie in [0, L).
    image_labels:
        (n, K) integer image-level labels, 0 = padding. Each entry covers the whole image.
    thresholds:
        (U,) float thresholds.
    primary:
        int64 (L,): primary category index of each label number, -1 for label 0 and labels of
        no (selected) category.
    n_categories:
        C.
    union:
        Which images count in ``act_area[u, c]`` (the mask area term of the IoU union):
        ``'touched'`` (default, NetDissect-Lite): some mask pixel carries a label of primary
        category c, or the image has an image-level label of primary category c (per unit);
        ``'annotated'``: the image has any label (pixel or image-level) of primary category c;
        ``'all'``: every image.
    device:
        Torch device for the per-pixel work; default the device of ``acts`` when it is a
        tensor, else the CPU.
    prefilter:
        The exact cell prefilter (:func:`_tiled_mask_pixels`): only the tiles of a map that can
        hold a mask pixel are upsampled, with the full resize's values, so the counts are
        identical either way. True: use it wherever it applies (:func:`prefilter_applies`);
        False: never; None (default): where it was measured faster
        (:func:`prefilter_default`: on the CPU, every map size it applies to).

    Returns
    -------
    IoUCounts with label_area (L,), intersection (U, L), act_area (U, C), all int64 on the host.
    Label 0 is never counted. ``label_area`` counts each image once, whatever the units.
    """
    if union not in UNION_RULES:
        raise ValueError(f"union must be one of {', '.join(UNION_RULES)}, got {union!r}")
    dev = _device_of(acts, device)
    primary = np.asarray(primary, dtype=np.int64)
    n_labels = len(primary)
    n_cat = int(n_categories)
    # float16 activations (a cache read as stored) stay float16 until a map is upsampled: the
    # map maxima are exact in float16, and only the active maps are converted to float32
    half = acts.dtype in (np.float16, torch.float16)
    acts_t = _as_tensor(acts, torch.float16 if half else torch.float32, dev)
    seg = seg.cpu().numpy() if isinstance(seg, torch.Tensor) else np.asarray(seg)
    image_labels = (image_labels.cpu().numpy() if isinstance(image_labels, torch.Tensor)
                    else np.asarray(image_labels)).astype(np.int64)
    if acts_t.ndim != 4 or seg.ndim != 4 or image_labels.ndim != 2:
        raise ValueError("count_iou needs acts (n, U, h, w), seg (n, Lyr, sh, sw) and "
                         f"image_labels (n, K); got {tuple(acts_t.shape)}, {seg.shape}, "
                         f"{image_labels.shape}")
    n, n_units, h, w = acts_t.shape
    _, n_layers, sh, sw = seg.shape
    area = sh * sw
    if seg.shape[0] != n or image_labels.shape[0] != n or len(thresholds) != n_units:
        raise ValueError(f"count_iou: {n} images of {n_units} units need seg, image_labels and "
                         f"thresholds for the same; got {seg.shape}, {image_labels.shape}, "
                         f"{len(thresholds)} thresholds")
    if n == 0:
        return IoUCounts.zeros(n_units, n_labels, n_cat)

    # Category of each label, with n_cat as a sink for label 0 and labels of no category.
    category = np.where(primary >= 0, primary, n_cat)
    category[0] = n_cat
    onehot = np.zeros((n_labels, n_cat + 1), dtype=np.int64)
    onehot[np.arange(n_labels), category] = 1

    # -- labels of each image: label_area, and the categories images carry ----------------
    used_layers = _used_layers(seg)                                                # (n,)
    pixel_counts, level_counts = _label_counts(seg, used_layers, image_labels, n_labels)
    label_area = pixel_counts.sum(0) + level_counts.sum(0) * area
    level_categories = ((level_counts > 0).astype(np.int64) @ onehot) > 0        # (n, C+1)

    # -- active (image, unit) pairs, processed in batches of upsampled maps --------------
    below_np = threshold_below(np.asarray(thresholds))                            # (U,)
    below = torch.from_numpy(below_np).to(dev)
    maxima = acts_t.reshape(n, n_units, h * w)
    # torch's float16 max over short rows is slower than converting first (7 x 7: 2.7x)
    maxima = (maxima.float().amax(dim=2) if half and h * w <= _SHORT_ROWS
              else maxima.amax(dim=2).float())
    pair_image_t, pair_unit_t = torch.nonzero(maxima > below, as_tuple=True)     # image-major
    pair_image, pair_unit = pair_image_t.cpu().numpy(), pair_unit_t.cpu().numpy()
    if prefilter is None:
        prefilter = prefilter_default((h, w), (sh, sw), dev)
    flat_maps = acts_t.reshape(n * n_units, h, w)

    def maps_of(start: int, stop: int) -> torch.Tensor:        # float32 maps of pairs start..
        return flat_maps.index_select(0, pair_image_t[start:stop] * n_units
                                      + pair_unit_t[start:stop]).float()

    mask_area = np.zeros((n, n_units), dtype=np.int64)
    joint_codes, joint_counts, touched_codes, touched_areas = [], [], [], []
    seg_images = np.ascontiguousarray(seg).reshape(n, n_layers, area)
    # Per batch, the labels of its images are renumbered 1..k (0: no label) so that the
    # per-map histograms have k + 1 bins instead of L.
    compact_of = np.zeros(n_labels, dtype=np.int64)
    present = np.zeros(0, np.int64)
    batches = _mask_batches(maps_of, pair_image, below_np[pair_unit] if dev.type == "cpu"
                            else below[pair_unit_t], (sh, sw),
                            bool(prefilter) and prefilter_applies((h, w), (sh, sw), dev))
    compact_key = None
    for start, stop, which, pixel in batches:
        images = pair_image[start:stop]      # (B,) nondecreasing: whole images, or part of one
        units = pair_unit[start:stop]
        if (images[0], images[-1]) != compact_key:
            runs = _image_runs(images)
            batch_images = images[runs[:-1]]                                           # (g,)
            layers = used_layers[batch_images].max()
            # consecutive images (the usual case) are a view of the chunk's label maps
            first, last = int(batch_images[0]), int(batch_images[-1]) + 1
            present, compact_seg = _compact_labels(
                seg_images[first:last, :layers] if last - first == len(batch_images)
                else seg_images[batch_images, :layers],
                pixel_counts[batch_images].sum(axis=0), compact_of, present)
            compact_key = (images[0], images[-1])
        if images[0] != images[-1]:       # several images: image i's pixel p is column i*S+p
            local_image = np.repeat(np.arange(len(runs) - 1), np.diff(runs))         # (B,)
            pixel = local_image[which] * area + pixel
        areas, joint, touched = _map_histograms(
            compact_seg, present, which, pixel, units, n_labels, category,
            level_categories[images] if union == "touched" else None)
        mask_area[images, units] = areas
        joint_codes.append(joint[0])
        joint_counts.append(joint[1])
        if touched is not None:
            touched_codes.append(touched[0])
            touched_areas.append(touched[1])
    intersection, act_area = _chunk_totals(
        joint_codes, joint_counts, touched_codes, touched_areas, mask_area, pixel_counts,
        level_counts, onehot, union)
    return IoUCounts(label_area.astype(np.int64), intersection, act_area.astype(np.int64))


def _upsample_threshold(maps: torch.Tensor, below: np.ndarray | torch.Tensor,
                        size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Mask pixels of (B, h, w) maps of one image: :func:`_upsample_padded` to ``size``, then
    :func:`_mask_pixels` against the float32 (B,) thresholds ``below``.

    Returns (which (M,), pixel (M,)) int64 host arrays, pixel-major.
    """
    up = _upsample_padded(maps, size)                                           # (S, P)
    return _mask_pixels(up, below)


def _compact_labels(seg_images: np.ndarray, pixel_counts: np.ndarray, compact_of: np.ndarray,
                    previous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The labels of g images renumbered 1..k (0: no label).

    ``seg_images`` is their (g, Lyr', S) label layers (Lyr': the most any of them uses),
    ``pixel_counts`` their (L,) pixel label counts summed, ``compact_of`` an int64 (L,) scratch
    table that is zero except at ``previous`` (the labels of the images before; left zero except
    at these images' labels). Returns (present int64 (k,) the labels, compact_seg (Lyr', g * S)
    the renumbered layers, layer-major: uint8 for k < 256, else int64).
    """
    compact_of[previous] = 0
    present = np.flatnonzero(pixel_counts)                                          # (k,)
    compact_of[present] = np.arange(1, len(present) + 1)
    n_images, n_layers, area = seg_images.shape
    # uint8 where the numbers fit: the gathers under the mask pixels then stay in the cache
    table = compact_of.astype(np.uint8) if len(present) < 256 else compact_of
    layer_major = seg_images.transpose(1, 0, 2)
    if seg_images.dtype in _TORCH_INDEX and seg_images.flags.writeable:
        # torch gathers with int32 label numbers as they are (NumPy's take first converts
        # them to int64): 1.3x faster
        compact = torch.index_select(torch.from_numpy(table), 0,
                                     torch.from_numpy(layer_major).reshape(-1)).numpy()
    else:
        compact = np.take(table, layer_major)
    return present, compact.reshape(n_layers, n_images * area)


def _map_histograms(compact_seg: np.ndarray, present: np.ndarray, which: np.ndarray,
                    position: np.ndarray, units: np.ndarray, n_labels: int,
                    category: np.ndarray, level_categories: np.ndarray | None
                    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray],
                               tuple[np.ndarray, np.ndarray] | None]:
    """Label histograms of a batch of B masks (maps of units ``units`` of g images).

    ``compact_seg``, ``present``: :func:`_compact_labels` of the g images; ``which``,
    ``position``: the (M,) mask pixels, as map index and column of ``compact_seg`` (image
    i's pixel p: ``i * S + p``); ``category``: (L,) category of each label (C for none);
    ``level_categories``: bool (B, C + 1) categories of each map's image's image-level labels
    for the 'touched' union rule, else None.

    Returns (areas int64 (B,) mask pixels per map, (unit * L + label, pixels) of every nonzero
    (map, label) intersection, and for 'touched' (unit * C + category, area) of every category
    a map touches, else None).
    """
    n_maps = len(units)
    n_layers = compact_seg.shape[0]
    n_cat = level_categories.shape[1] - 1 if level_categories is not None else 0
    # Label of every mask pixel in every used layer (Lyr', M) -> label histogram per map.
    n_bins = len(present) + 1
    # int32 codes counted by torch: about twice as fast as int64 codes and np.bincount
    code_type = np.int32 if n_maps * n_bins < 2 ** 31 else np.int64
    codes = (which.astype(code_type) * code_type(n_bins)
             + np.take(compact_seg, position, axis=1))                              # (Lyr', M)
    histogram = torch.bincount(torch.from_numpy(codes.reshape(-1)),
                               minlength=n_maps * n_bins).numpy().reshape(n_maps, n_bins)
    if n_layers:      # each mask pixel is counted once per used layer
        areas = histogram.sum(axis=1) // n_layers                                     # (B,)
    else:
        areas = np.bincount(which, minlength=n_maps)
    histogram[:, 0] = 0
    map_index, compact = np.nonzero(histogram)
    label = present[compact - 1]
    joint = (units[map_index] * n_labels + label, histogram[map_index, compact])
    if level_categories is None:
        return areas, joint, None
    touched = level_categories.copy()                                              # (B, C+1)
    touched[map_index, category[label]] = True
    map_hit, cat_hit = np.nonzero(touched[:, :n_cat])
    return areas, joint, (units[map_hit] * n_cat + cat_hit, areas[map_hit])


def _chunk_totals(joint_codes: list[np.ndarray], joint_counts: list[np.ndarray],
                  touched_codes: list[np.ndarray], touched_areas: list[np.ndarray],
                  mask_area: np.ndarray, pixel_counts: np.ndarray, level_counts: np.ndarray,
                  onehot: np.ndarray, union: str) -> tuple[np.ndarray, np.ndarray]:
    """The chunk's (U, L) intersection and (U, C) act_area from the per-map parts of
    :func:`_map_histograms`, the (n, U) mask areas and the (n, L) label counts."""
    n_units = mask_area.shape[1]
    n_labels = level_counts.shape[1]
    n_cat = onehot.shape[1] - 1
    intersection = _weighted_count(joint_codes, joint_counts, n_units * n_labels).reshape(
        n_units, n_labels)
    # Image-level labels: the whole mask of the image counts for the label.
    # per (image, label) entry: its count times the image's mask areas (no BLAS matmul: its
    # threads would compete with the Dask workers)
    rows, labels = np.nonzero(level_counts)
    if len(rows):
        np.add.at(intersection.T, labels, mask_area[rows] * level_counts[rows, labels][:, None])
    if union == "touched":
        act_area = _weighted_count(touched_codes, touched_areas, n_units * n_cat).reshape(
            n_units, n_cat)
    elif union == "all":
        act_area = np.repeat(mask_area.sum(0)[:, None], n_cat, axis=1)
    else:
        present = ((pixel_counts > 0) | (level_counts > 0)).astype(np.int64)
        image_categories = ((present @ onehot)[:, :n_cat] > 0).astype(np.int64)  # (n, C)
        act_area = mask_area.T @ image_categories
    return intersection, act_area


def iou_from_counts(counts: IoUCounts, primary: np.ndarray) -> np.ndarray:
    """IoU of every unit and label (DESIGN.md §3 step 4).

    ``iou[u, l] = intersection[u, l] / (act_area[u, primary[l]] + label_area[l] -
    intersection[u, l])``, and 0 where the denominator is 0, for label 0 and for labels whose
    primary is -1.

    Parameters
    ----------
    counts:
        IoUCounts with label_area (L,), intersection (U, L), act_area (U, C).
    primary:
        int64 (L,) primary category index of each label, -1 for none.

    Returns
    -------
    float64 (U, L).
    """
    primary = np.asarray(primary, dtype=np.int64)
    n_units, n_labels, n_cat = counts.shape
    if len(primary) != n_labels or (primary >= n_cat).any():
        raise ValueError(f"primary must be (L={n_labels},) with values < C={n_cat}")
    valid = primary >= 0
    valid[0] = False
    act = counts.act_area[:, np.where(valid, primary, 0)].astype(np.float64)
    intersection = counts.intersection.astype(np.float64)
    denominator = act + counts.label_area[None, :].astype(np.float64) - intersection
    iou = np.zeros((n_units, n_labels), dtype=np.float64)
    ok = (denominator > 0) & valid[None, :]
    np.divide(intersection, denominator, out=iou, where=ok)
    return iou


def best_labels(iou: np.ndarray, primary: np.ndarray, n_categories: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Best label per unit and category, and per unit (DESIGN.md §3 step 5, NetDissect-Lite ties).

    Per category c, the label of primary category c with the highest IoU, ties to the lowest
    label number; a category in which no label has a positive IoU gets label 0 (no label) with
    IoU 0, as NetDissect-Lite's argmax does. The unit's label is the best over categories, ties
    to the later category (:func:`best_category`).

    Parameters
    ----------
    iou:
        float64 (U, L).
    primary:
        int64 (L,) primary category index per label, -1 for none.
    n_categories:
        C.

    Returns
    -------
    (cat_label int64 (U, C), cat_iou float64 (U, C), unit_label int64 (U,), unit_iou float64 (U,))
    """
    iou = np.asarray(iou, dtype=np.float64)
    primary = np.asarray(primary, dtype=np.int64)
    n_units = iou.shape[0]
    cat_label = np.zeros((n_units, n_categories), dtype=np.int64)
    cat_iou = np.zeros((n_units, n_categories), dtype=np.float64)
    for c in range(n_categories):
        members = np.flatnonzero(primary == c)
        members = members[members > 0]
        if len(members) == 0:
            continue
        sub = iou[:, members]
        best = np.argmax(sub, axis=1)                 # first maximum: lowest label number
        value = sub[np.arange(n_units), best]
        positive = value > 0
        cat_label[:, c] = np.where(positive, members[best], 0)
        cat_iou[:, c] = np.where(positive, value, 0.0)
    if n_categories:
        best_cat = best_category(cat_iou)
        unit_label = cat_label[np.arange(n_units), best_cat]
        unit_iou = cat_iou[np.arange(n_units), best_cat]
    else:
        unit_label = np.zeros(n_units, np.int64)
        unit_iou = np.zeros(n_units, np.float64)
    return cat_label, cat_iou, unit_label, unit_iou


def best_category(cat_iou: np.ndarray) -> np.ndarray:
    """Index of each unit's best category, ties to the later category.

    NetDissect-Lite picks ``score.argsort(axis=0)[::-1][0]`` over a handful of categories,
    where the sort is stable, so among equal IoUs the category listed last wins (a unit with no
    positive IoU anywhere therefore gets the last category and label 0).

    Parameters
    ----------
    cat_iou:
        float64 (U, C) best IoU per unit and category, C >= 1.

    Returns
    -------
    int64 (U,).
    """
    cat_iou = np.asarray(cat_iou)
    return np.argsort(cat_iou, axis=1, kind="stable")[:, -1].astype(np.int64)


def unit_order(unit_iou: np.ndarray) -> np.ndarray:
    """Units by descending score, the order of NetDissect-Lite's tally.csv.

    NetDissect-Lite orders rows by ``score.argsort()[::-1]``; with a stable sort that puts the
    higher unit first among equal scores, which is what this returns (deterministically).

    Parameters
    ----------
    unit_iou:
        float (U,) scores.

    Returns
    -------
    int64 (U,) unit indices.
    """
    return np.argsort(np.asarray(unit_iou), kind="stable")[::-1].astype(np.int64)
