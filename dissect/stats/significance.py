"""Pure statistics of label significance (DESIGN.md §12): permutation null, p, q, baselines.

Everything here is array code: no I/O, no printing, no device choice.

The permutation null and why it is computed block by block
-----------------------------------------------------------
Image i's unit masks are counted against the segmentation of image pi(i), pi a permutation of
the images that maps every image into its own stratum (same annotated-category signature and
segmentation size). The null is drawn from the group G of permutations that map each *block*
onto itself, where the blocks are a fixed partition of every stratum into groups of
``block_size`` consecutive images (:func:`partition_blocks`; the partition depends on the data
only, never on how the work is chunked). G is a subgroup of the permutations within strata, so
under the null hypothesis (the pairing of masks and segmentations is exchangeable within
strata, hence within blocks) the observed pairing is one uniformly placed member of the orbit
{g(data): g in G}: drawing g_1..g_B uniformly from G (independent uniform permutations of each
block) and p = (1 + #{b: T_b >= T_obs}) / (B + 1) is a valid (slightly conservative, because of
the + 1) permutation p-value, for any fixed partition. The price of the smaller group is a
little power: a uniform permutation of m images leaves on average one image paired with itself,
so about 1/m of the null's images keep their real pairing (the null leans towards the observed
statistic; p can only grow).

What it buys is speed: within a block only m * m pairings (i, j) exist, whatever B is. Each
block's masks are upsampled and thresholded once, its label maps decoded once, the counts of
every pairing (mask of i, labels of j) that some permutation uses are computed once
(:func:`count_pair`), and permutation b's counts are the sum of its m pairings' counts
(:func:`count_blocks`). With m = 8 and B = 100 that is 64 pair countings per block instead of
800.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats as scipy_stats

from dissect.stats.iou import IoUCounts, threshold_below, upsample_maps

__all__ = [
    "ImageMasks",
    "ImageLabels",
    "PairCounts",
    "NullCounts",
    "FisherCounts",
    "BlockCounts",
    "stratum_ids",
    "partition_blocks",
    "block_permutations",
    "image_masks",
    "image_labels",
    "count_pair",
    "count_blocks",
    "null_statistics",
    "permutation_p_values",
    "benjamini_hochberg",
    "independence_iou",
    "fisher_tables",
    "fisher_tests",
    "poisson_weights",
    "bootstrap_sums",
    "bootstrap_interval",
]

#: Counts below this fit int32 (the permuted intersections are stored as int32 while they do).
_INT32_LIMIT = 2**31 - 1
# Upsampled maps of one image are thresholded in batches of at most this many values.
_BATCH_VALUES = 2 * 1024 * 1024


# ----------------------------------------------------------------------------- blocks
def stratum_ids(signatures: np.ndarray) -> np.ndarray:
    """Stratum of every image: images with equal signature rows share a stratum.

    Parameters
    ----------
    signatures:
        (N, K) array (any dtype): e.g. per selected category whether the image is annotated in
        it, then the segmentation height and width.

    Returns
    -------
    int64 (N,): stratum numbers 0.. in order of the signatures' first appearance.
    """
    signatures = np.asarray(signatures)
    if signatures.ndim != 2:
        raise ValueError(f"signatures must be (N, K), got shape {signatures.shape}")
    if len(signatures) == 0:
        return np.zeros(0, np.int64)
    _, first, inverse = np.unique(signatures, axis=0, return_index=True, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    order = np.argsort(first, kind="stable")         # unique rows -> appearance rank
    rank = np.empty(len(first), np.int64)
    rank[order] = np.arange(len(first))
    return rank[inverse]


def partition_blocks(strata: np.ndarray, block_size: int) -> list[np.ndarray]:
    """A fixed partition of every stratum into blocks of consecutive images.

    The images of each stratum, in index order, are cut into groups of ``block_size``; a
    remainder smaller than ``block_size`` joins the stratum's last full block (blocks hold
    ``block_size`` to ``2 * block_size - 1`` images; a stratum smaller than ``block_size`` is one
    block). Blocks are returned in the order of their first image.

    Parameters
    ----------
    strata:
        int (N,) stratum of each image (positions 0..N-1).
    block_size:
        m >= 1.

    Returns
    -------
    list of int64 (m_k,) ascending image positions; together a partition of range(N).
    """
    if int(block_size) < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    strata = np.asarray(strata, dtype=np.int64)
    blocks: list[np.ndarray] = []
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        cuts = list(range(0, len(members), block_size))
        if len(cuts) > 1 and len(members) - cuts[-1] < block_size:
            cuts.pop()
        bounds = cuts + [len(members)]
        blocks += [members[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    blocks.sort(key=lambda block: int(block[0]))
    return blocks


def block_permutations(seed: int, block_id: int, n_permutations: int, size: int) -> np.ndarray:
    """The B permutations of one block, a function of (seed, block_id) only.

    Returns
    -------
    int64 (B, size): row b is a uniform random permutation of range(size), drawn from
    ``numpy.random.default_rng([seed, block_id])``.
    """
    rng = np.random.default_rng([int(seed), int(block_id)])
    out = np.empty((int(n_permutations), int(size)), dtype=np.int64)
    for b in range(int(n_permutations)):
        out[b] = rng.permutation(int(size))
    return out


# ----------------------------------------------------------------------------- masks and labels
@dataclass(frozen=True, eq=False)
class ImageMasks:
    """The non-empty unit masks of one image (DESIGN.md §3 step 2), as pixel lists.

    Attributes
    ----------
    units:
        int64 (k,) ascending units whose mask has at least one pixel.
    areas:
        int64 (k,) mask pixels of each.
    which:
        int64 (M,) index into ``units`` of every mask pixel.
    pixel:
        int64 (M,) flat pixel index (row * sw + column) of every mask pixel.
    """

    units: np.ndarray
    areas: np.ndarray
    which: np.ndarray
    pixel: np.ndarray


@dataclass(frozen=True, eq=False)
class ImageLabels:
    """The labels of one image, prepared for counting mask pixels against them.

    Attributes
    ----------
    present:
        int64 (k,) labels carried by some pixel (label 0 excluded), ascending.
    compact_seg:
        int64 (Lyr', S): the used pixel layers with labels renumbered 1..k (0: no label).
    level_labels, level_counts:
        int64 (r,): image-level labels (> 0) and how often each is listed.
    label_area:
        int64 (L,): this image's label_area (pixels per label over its layers; an image-level
        label adds S per listing).
    has:
        int64 (h,) every label the image carries (pixel or image-level), ascending.
    level_categories:
        bool (C,): categories of the image-level labels.
    annotated:
        bool (C,): categories of any label the image carries (the 'annotated' union rule).
    """

    present: np.ndarray
    compact_seg: np.ndarray
    level_labels: np.ndarray
    level_counts: np.ndarray
    label_area: np.ndarray
    has: np.ndarray
    level_categories: np.ndarray
    annotated: np.ndarray


def image_masks(acts: np.ndarray | torch.Tensor, thresholds: np.ndarray, size: tuple[int, int],
                device: str | torch.device | None = None) -> list[ImageMasks]:
    """Unit masks of every image: the tally's masks, exactly (DESIGN.md §3 step 2).

    A map is upsampled only when its maximum exceeds the threshold; ``mask = up > threshold``
    (strict) with :func:`dissect.stats.upsample_maps` and :func:`dissect.stats.threshold_below`,
    as :func:`dissect.stats.count_iou` does.

    Parameters
    ----------
    acts:
        float (n, U, h, w) activations.
    thresholds:
        (U,) thresholds.
    size:
        (sh, sw) segmentation size.
    device:
        Torch device of the upsampling (default: the tensor's, else the CPU).

    Returns
    -------
    list of n :class:`ImageMasks`.
    """
    dev = torch.device(device) if device is not None else (
        acts.device if isinstance(acts, torch.Tensor) else torch.device("cpu"))
    acts_t = (acts.to(device=dev, dtype=torch.float32) if isinstance(acts, torch.Tensor)
              else torch.from_numpy(np.ascontiguousarray(acts, dtype=np.float32)).to(dev))
    n, n_units = acts_t.shape[:2]
    below_np = threshold_below(np.asarray(thresholds))
    below = torch.from_numpy(below_np).to(dev)
    area = int(size[0]) * int(size[1])
    active = (acts_t.reshape(n, n_units, -1).amax(dim=2) > below).cpu().numpy()
    per_batch = max(1, _BATCH_VALUES // max(area, 1))
    on_host = dev.type == "cpu"
    acts_np = acts_t.numpy() if on_host else None
    out = []
    for i in range(n):
        units_all = np.flatnonzero(active[i])
        which_parts, pixel_parts = [], []
        for start in range(0, len(units_all), per_batch):
            units = units_all[start:start + per_batch]
            if on_host:      # NumPy's comparison and scan are faster than torch's on the CPU
                up = upsample_maps(acts_np[i, units], size)                   # (k, sh, sw)
                flat = np.flatnonzero(up > below_np[units][:, None, None])
                which = flat // area
                which_parts.append(which + start)
                pixel_parts.append(flat - which * area)
                continue
            units_t = torch.from_numpy(units).to(dev)
            up_t = upsample_maps(acts_t[i].index_select(0, units_t), size).reshape(-1, area)
            which_t, pixel_t = torch.nonzero(up_t > below[units_t][:, None], as_tuple=True)
            which_parts.append(which_t.cpu().numpy().astype(np.int64) + start)
            pixel_parts.append(pixel_t.cpu().numpy().astype(np.int64))
        which = np.concatenate(which_parts) if which_parts else np.zeros(0, np.int64)
        pixel = np.concatenate(pixel_parts) if pixel_parts else np.zeros(0, np.int64)
        areas = np.bincount(which, minlength=len(units_all)).astype(np.int64)
        keep = areas > 0
        renumber = np.cumsum(keep) - 1
        out.append(ImageMasks(units_all[keep].astype(np.int64), areas[keep], renumber[which],
                              pixel))
    return out


def _categories(primary: np.ndarray, n_categories: int) -> np.ndarray:
    """int64 (L,): primary category of each label, n_categories (a sink) for 0 and none."""
    category = np.where(primary >= 0, primary, n_categories).astype(np.int64)
    if len(category):
        category[0] = n_categories
    return category


def image_labels(seg: np.ndarray, image_level: np.ndarray, primary: np.ndarray,
                 n_categories: int) -> list[ImageLabels]:
    """Per image, the label summary that :func:`count_pair` counts masks against.

    Parameters
    ----------
    seg:
        int (n, Lyr, sh, sw) label layers, zero padded; values in [0, L).
    image_level:
        int (n, K) image-level labels, 0 = padding.
    primary:
        int64 (L,) primary category per label (-1: none).
    n_categories:
        C.

    Returns
    -------
    list of n :class:`ImageLabels`.
    """
    seg = np.asarray(seg)
    image_level = np.asarray(image_level).astype(np.int64)
    primary = np.asarray(primary, dtype=np.int64)
    n, n_layers = seg.shape[:2]
    area = int(seg.shape[2]) * int(seg.shape[3])
    n_labels = len(primary)
    category = _categories(primary, n_categories)
    flat = np.ascontiguousarray(seg).reshape(n, n_layers, area)
    out = []
    for i in range(n):
        nonempty = flat[i].any(axis=1) if n_layers else np.zeros(0, bool)
        used = int(np.flatnonzero(nonempty)[-1]) + 1 if nonempty.any() else 0
        layers = flat[i, :used]
        pixel_counts = np.bincount(layers.reshape(-1), minlength=n_labels).astype(np.int64)
        pixel_counts[0] = 0
        present = np.flatnonzero(pixel_counts)
        compact_of = np.zeros(n_labels, dtype=np.int64)
        compact_of[present] = np.arange(1, len(present) + 1)
        compact_seg = compact_of[layers]
        listed = image_level[i][image_level[i] > 0]
        level_labels, level_counts = np.unique(listed, return_counts=True)
        label_area = pixel_counts.copy()
        label_area[level_labels] += level_counts * area
        has = np.union1d(present, level_labels).astype(np.int64)
        level_categories = np.zeros(n_categories + 1, bool)
        level_categories[category[level_labels]] = True
        annotated = np.zeros(n_categories + 1, bool)
        annotated[category[has]] = True
        out.append(ImageLabels(present.astype(np.int64), compact_seg, level_labels.astype(
            np.int64), level_counts.astype(np.int64), label_area, has,
            level_categories[:n_categories], annotated[:n_categories]))
    return out


# ----------------------------------------------------------------------------- pair counting
@dataclass(frozen=True, eq=False)
class PairCounts:
    """Counts of one image's masks against one (possibly other) image's labels.

    Attributes
    ----------
    inter_codes, inter_counts:
        int64 (E,): ``unit * L + label`` and the intersection it adds (codes may repeat: a label
        both in pixels and image-level).
    act_codes, act_areas:
        int64 (F,): ``unit * C + category`` and the mask area it adds to act_area.
    """

    inter_codes: np.ndarray
    inter_counts: np.ndarray
    act_codes: np.ndarray
    act_areas: np.ndarray


def count_pair(masks: ImageMasks, labels: ImageLabels, primary: np.ndarray, n_categories: int,
               union: str = "touched") -> PairCounts:
    """The tally's counts (DESIGN.md §3 step 3) of one image's masks against ``labels``.

    With ``labels`` of the same image, summing over images gives exactly
    :func:`dissect.stats.count_iou`'s intersection and act_area.

    Parameters
    ----------
    masks:
        :class:`ImageMasks` of image i.
    labels:
        :class:`ImageLabels` of image j.
    primary:
        int64 (L,) primary category per label.
    n_categories:
        C.
    union:
        'touched', 'annotated' or 'all' (the union rule of act_area).
    """
    primary = np.asarray(primary, dtype=np.int64)
    n_labels, n_cat = len(primary), int(n_categories)
    units, areas = masks.units, masks.areas
    k = len(units)
    empty = np.zeros(0, np.int64)
    if k == 0:
        return PairCounts(empty, empty, empty, empty)
    codes_parts, count_parts = [], []
    hit_map, hit_label = empty, empty
    if len(labels.compact_seg):
        n_bins = len(labels.present) + 1
        codes = labels.compact_seg[:, masks.pixel] + masks.which * n_bins
        histogram = np.bincount(codes.reshape(-1), minlength=k * n_bins).reshape(k, n_bins)
        histogram[:, 0] = 0
        hit_map, compact = np.nonzero(histogram)
        hit_label = labels.present[compact - 1]
        codes_parts.append(units[hit_map] * n_labels + hit_label)
        count_parts.append(histogram[hit_map, compact].astype(np.int64))
    if len(labels.level_labels):
        codes_parts.append((units[:, None] * n_labels + labels.level_labels[None, :]).reshape(-1))
        count_parts.append((areas[:, None] * labels.level_counts[None, :]).reshape(-1))
    inter_codes = np.concatenate(codes_parts) if codes_parts else empty
    inter_counts = np.concatenate(count_parts) if count_parts else empty
    if union == "touched":
        category = _categories(primary, n_cat)
        touched = np.zeros((k, n_cat + 1), bool)
        touched[:, :n_cat] = labels.level_categories[None, :]
        touched[hit_map, category[hit_label]] = True
        rows, cats = np.nonzero(touched[:, :n_cat])
    elif union == "annotated":
        rows, cats = np.nonzero(np.broadcast_to(labels.annotated[None, :], (k, n_cat)))
    elif union == "all":
        rows, cats = np.nonzero(np.ones((k, n_cat), bool))
    else:
        raise ValueError(f"union must be touched, annotated or all, got {union!r}")
    return PairCounts(inter_codes, inter_counts, units[rows] * n_cat + cats, areas[rows])


@dataclass(eq=False)
class NullCounts:
    """Permutation counts of some images, permutations last (B contiguous values per count).

    Attributes
    ----------
    codes:
        int64 (K,) ascending ``unit * L + label`` codes: the (unit, label) pairs with a count.
    intersection:
        int32 or int64 (K, B): intersection of each code under permutation b.
    act_area:
        int64 (U, C, B).
    """

    codes: np.ndarray
    intersection: np.ndarray
    act_area: np.ndarray

    def add_to(self, dense: np.ndarray) -> None:
        """Add the intersection into ``dense`` (U * L, B) int32/int64 (codes are unique).

        The caller keeps ``dense`` wide enough (see ``dissect.significance``)."""
        dense[self.codes] += self.intersection


@dataclass(eq=False)
class FisherCounts:
    """Additive image counts of the image-level 2x2 tables and the IoU0 baseline.

    Attributes
    ----------
    both:
        int64 (U, L): images where the unit fires (non-empty mask) and that carry the label.
    fires_annotated:
        int64 (U, C): images annotated in category c where the unit fires.
    has:
        int64 (L,): images carrying the label.
    annotated:
        int64 (C,): images annotated in category c (carry a label of primary category c).
    mask_annotated:
        int64 (U, C): mask pixels in images annotated in c.
    mask_total:
        int64 (U,): mask pixels in all images.
    n_images:
        Images counted.
    """

    both: np.ndarray
    fires_annotated: np.ndarray
    has: np.ndarray
    annotated: np.ndarray
    mask_annotated: np.ndarray
    mask_total: np.ndarray
    n_images: int

    def __add__(self, other: FisherCounts) -> FisherCounts:
        return FisherCounts(self.both + other.both, self.fires_annotated + other.fires_annotated,
                            self.has + other.has, self.annotated + other.annotated,
                            self.mask_annotated + other.mask_annotated,
                            self.mask_total + other.mask_total, self.n_images + other.n_images)


@dataclass(eq=False)
class BlockCounts:
    """What :func:`count_blocks` returns for some blocks of images.

    Attributes
    ----------
    observed:
        IoUCounts of the identity pairing (the tally's counts of these images).
    null:
        NullCounts of the B permutations (None when B = 0).
    fisher:
        FisherCounts of the identity pairing.
    """

    observed: IoUCounts
    null: NullCounts | None
    fisher: FisherCounts


def _fisher_counts(masks: list[ImageMasks], labels: list[ImageLabels], n_units: int,
                   n_labels: int, n_cat: int) -> FisherCounts:
    both = np.zeros(n_units * n_labels, np.int64)
    fires_annotated = np.zeros((n_units, n_cat), np.int64)
    has = np.zeros(n_labels, np.int64)
    annotated = np.zeros(n_cat, np.int64)
    mask_annotated = np.zeros((n_units, n_cat), np.int64)
    mask_total = np.zeros(n_units, np.int64)
    both_codes = []
    for image_masks_, image_labels_ in zip(masks, labels):
        units, areas = image_masks_.units, image_masks_.areas
        both_codes.append((units[:, None] * n_labels + image_labels_.has[None, :]).reshape(-1))
        has[image_labels_.has] += 1
        cats = np.flatnonzero(image_labels_.annotated)
        annotated[cats] += 1
        fires_annotated[np.ix_(units, cats)] += 1
        mask_annotated[np.ix_(units, cats)] += areas[:, None]
        mask_total[units] += areas
    if both_codes:
        both += np.bincount(np.concatenate(both_codes), minlength=n_units * n_labels)
    return FisherCounts(both.reshape(n_units, n_labels), fires_annotated, has, annotated,
                        mask_annotated, mask_total, len(masks))


def count_blocks(masks: list[ImageMasks], labels: list[ImageLabels], blocks: list[np.ndarray],
                 pairings: list[np.ndarray], primary: np.ndarray, n_units: int,
                 n_categories: int, union: str = "touched") -> BlockCounts:
    """Observed, permuted and 2x2-table counts of some blocks of images.

    Permutation b pairs the a-th image of block k with image ``pairings[k][b, a]`` of the same
    block: its counts are the sum over images of :func:`count_pair` (masks of the image, labels
    of its partner); every distinct pairing is counted once.

    Parameters
    ----------
    masks, labels:
        Per image (positions 0..n-1): :func:`image_masks` and :func:`image_labels`.
    blocks:
        int (m_k,) positions of each block's images.
    pairings:
        int (B, m_k) per block: permutations of range(m_k) (B may be 0).
    primary:
        int64 (L,).
    n_units, n_categories:
        U and C.
    union:
        The union rule.

    Returns
    -------
    :class:`BlockCounts`; ``observed`` equals :func:`dissect.stats.count_iou` of the same images.
    """
    primary = np.asarray(primary, dtype=np.int64)
    n_labels, n_cat = len(primary), int(n_categories)
    n_perm = int(pairings[0].shape[0]) if pairings else 0
    label_area = np.zeros(n_labels, np.int64)
    observed_inter = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    observed_act = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    used: list[tuple[np.ndarray, dict[int, PairCounts]]] = []
    for block, pairing in zip(blocks, pairings):
        block = np.asarray(block, dtype=np.int64)
        m = len(block)
        pairing = np.asarray(pairing, dtype=np.int64).reshape(n_perm, m)
        wanted = np.unique(np.concatenate([np.arange(m) * (m + 1),
                                           (np.arange(m)[None, :] * m + pairing).reshape(-1)]))
        pairs: dict[int, PairCounts] = {}
        for code in wanted.tolist():
            a, c = divmod(code, m)
            pairs[code] = count_pair(masks[block[a]], labels[block[c]], primary, n_cat, union)
        for a in range(m):
            own = pairs[a * (m + 1)]
            observed_inter[0].append(own.inter_codes)
            observed_inter[1].append(own.inter_counts)
            observed_act[0].append(own.act_codes)
            observed_act[1].append(own.act_areas)
            label_area += labels[block[a]].label_area
        used.append((pairing, pairs))
    intersection = _sum_codes(observed_inter, n_units * n_labels).reshape(n_units, n_labels)
    act_area = _sum_codes(observed_act, n_units * n_cat).reshape(n_units, n_cat)
    observed = IoUCounts(label_area, intersection, act_area)
    null = _null_counts(used, n_perm, n_units, n_cat) if n_perm else None
    fisher = _fisher_counts([masks[i] for block in blocks for i in block],
                            [labels[i] for block in blocks for i in block],
                            n_units, n_labels, n_cat)
    return BlockCounts(observed, null, fisher)


def _sum_codes(parts: tuple[list[np.ndarray], list[np.ndarray]], size: int) -> np.ndarray:
    """int64 (size,): sum of values per code (float64 bincount of integers < 2**53: exact)."""
    codes, values = np.concatenate(parts[0]), np.concatenate(parts[1])
    return np.rint(np.bincount(codes, weights=values.astype(np.float64), minlength=size)
                   ).astype(np.int64)


def _segments(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ranges [starts[k], starts[k] + lengths[k]) as int64."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(lengths)
    return np.repeat(starts - ends + lengths, lengths) + np.arange(total)


def _null_counts(used: list[tuple[np.ndarray, dict[int, PairCounts]]], n_perm: int,
                 n_units: int, n_cat: int) -> NullCounts:
    """Sum every permutation's pair counts over the blocks."""
    all_codes = np.unique(np.concatenate(
        [np.zeros(0, np.int64)] + [p.inter_codes for _, pairs in used for p in pairs.values()]))
    n_codes = len(all_codes)
    inter_keys, inter_values, act_keys, act_values = [], [], [], []
    for pairing, pairs in used:
        m = pairing.shape[1]
        order = sorted(pairs)
        slot = np.full(m * m, -1, np.int64)
        slot[order] = np.arange(len(order))
        counts = [pairs[code] for code in order]
        inter_len = np.array([len(p.inter_codes) for p in counts], np.int64)
        act_len = np.array([len(p.act_codes) for p in counts], np.int64)
        inter_codes = np.searchsorted(all_codes, np.concatenate(
            [p.inter_codes for p in counts]))
        inter_counts = np.concatenate([p.inter_counts for p in counts])
        act_codes = np.concatenate([p.act_codes for p in counts])
        act_areas = np.concatenate([p.act_areas for p in counts])
        chosen = slot[(np.arange(m)[None, :] * m + pairing).reshape(-1)]     # (B * m,)
        perm = np.repeat(np.arange(n_perm, dtype=np.int64), m)
        for lengths, codes, values, keys, vals in (
                (inter_len, inter_codes, inter_counts, inter_keys, inter_values),
                (act_len, act_codes, act_areas, act_keys, act_values)):
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            take = _segments(starts[chosen], lengths[chosen])
            keys.append(codes[take] * n_perm + np.repeat(perm, lengths[chosen]))
            vals.append(values[take])
    inter = _sum_codes((inter_keys, inter_values), n_codes * n_perm).reshape(n_codes, n_perm)
    if len(inter) and inter.max() < _INT32_LIMIT:        # halves what a task sends back
        inter = inter.astype(np.int32)
    act = _sum_codes((act_keys, act_values), n_units * n_cat * n_perm).reshape(
        n_units, n_cat, n_perm)
    return NullCounts(all_codes, inter, act)


# ----------------------------------------------------------------------------- statistics
def null_statistics(label_area: np.ndarray, intersection: np.ndarray, act_area: np.ndarray,
                    primary: np.ndarray, unit_label: np.ndarray, units_per_step: int = 32
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per permutation, each unit's best IoU and the IoU of its (fixed) label.

    The IoU is :func:`dissect.stats.iou_from_counts`'s, value for value (the same float64
    operations), computed for every permutation at once, a few units at a time.

    Parameters
    ----------
    label_area:
        int64 (L,) (the same for every permutation: a permutation only re-pairs images).
    intersection:
        int64 (U, L, B); act_area int64 (U, C, B): the permuted counts, permutations last.
    primary:
        int64 (L,).
    unit_label:
        int64 (U,) each unit's label (0: none, IoU 0).

    Returns
    -------
    (best float64 (B, U): max over labels of IoU_b[u, l] (0 when none is positive),
    label_iou float64 (B, U): IoU_b[u, unit_label[u]]).
    """
    primary = np.asarray(primary, dtype=np.int64)
    unit_label = np.asarray(unit_label, dtype=np.int64)
    n_units, n_labels, n_perm = intersection.shape
    valid = primary >= 0
    if n_labels:
        valid[0] = False
    labels = np.flatnonzero(valid)
    cats = primary[labels]
    area = label_area[labels].astype(np.float64)[None, :, None]
    best = np.zeros((n_perm, n_units))
    label_iou = np.zeros((n_perm, n_units))
    for start in range(0, n_units, units_per_step):
        stop = min(start + units_per_step, n_units)
        inter = intersection[start:stop, labels].astype(np.float64)       # (u, l, B)
        act = act_area[start:stop][:, cats].astype(np.float64)
        denominator = act + area - inter
        iou = np.zeros_like(inter)
        np.divide(inter, denominator, out=iou, where=denominator > 0)
        if len(labels):
            best[:, start:stop] = np.maximum(iou.max(axis=1), 0.0).T
        position = np.searchsorted(labels, unit_label[start:stop])
        found = (position < len(labels)) & (labels[np.minimum(position, len(labels) - 1)]
                                            == unit_label[start:stop]) if len(labels) else \
            np.zeros(stop - start, bool)
        rows = np.flatnonzero(found)
        label_iou[:, start + rows] = iou[rows, position[rows]].T
    return best, label_iou


def permutation_p_values(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """p = (1 + #{b: null[b] >= observed}) / (B + 1) per column.

    Parameters
    ----------
    observed:
        float (U,) observed statistics.
    null:
        float (B, U) the statistics under B permutations.

    Returns
    -------
    float64 (U,) in [1 / (B + 1), 1].
    """
    observed = np.asarray(observed, dtype=np.float64)
    null = np.asarray(null, dtype=np.float64).reshape(-1, len(observed))
    return (1.0 + (null >= observed[None, :]).sum(axis=0)) / (null.shape[0] + 1.0)


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) of m tests.

    q_(k) = min over j >= k of (m / j) p_(j), capped at 1 (p sorted ascending); a test is
    significant at FDR level alpha when q <= alpha.

    Parameters
    ----------
    p:
        float (m,) p-values (NaN entries are left out and stay NaN).

    Returns
    -------
    float64 (m,).
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    if m == 0:
        return q
    order = valid[np.argsort(p[valid], kind="stable")]
    scaled = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q


def independence_iou(mask_coverage: np.ndarray, label_coverage: np.ndarray) -> np.ndarray:
    """IoU expected if mask and concept were independent: IoU0 = q f / (q + f - q f).

    Parameters
    ----------
    mask_coverage:
        float (n,) q: fraction of the union domain's pixels inside the mask.
    label_coverage:
        float (n,) f: fraction carrying the concept.

    Returns
    -------
    float64 (n,): 0 where q + f - q f is 0.
    """
    q = np.asarray(mask_coverage, dtype=np.float64)
    f = np.asarray(label_coverage, dtype=np.float64)
    denominator = q + f - q * f
    out = np.zeros(np.broadcast(q, f).shape)
    np.divide(q * f, denominator, out=out, where=denominator > 0)
    return out


def fisher_tables(counts: FisherCounts, unit_label: np.ndarray, primary: np.ndarray
                  ) -> np.ndarray:
    """Image-level 2x2 tables of each unit and its label.

    Over the images annotated in the label's primary category: rows fire / does not fire
    (non-empty mask), columns carries the label / does not.

    Returns
    -------
    int64 (U, 2, 2): ``[[fire & label, fire & no label], [no fire & label, neither]]``; zeros
    for units whose label is 0 or has no category.
    """
    unit_label = np.asarray(unit_label, dtype=np.int64)
    primary = np.asarray(primary, dtype=np.int64)
    n_units = len(unit_label)
    tables = np.zeros((n_units, 2, 2), np.int64)
    for u in range(n_units):
        label = int(unit_label[u])
        c = int(primary[label]) if label > 0 else -1
        if c < 0:
            continue
        a = int(counts.both[u, label])
        b = int(counts.fires_annotated[u, c]) - a
        c_ = int(counts.has[label]) - a
        d = int(counts.annotated[c]) - a - b - c_
        tables[u] = [[a, b], [c_, d]]
    return tables


def fisher_tests(tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Odds ratio and one-sided (enrichment) Fisher exact p of each 2x2 table (scipy).

    Parameters
    ----------
    tables:
        int (n, 2, 2).

    Returns
    -------
    (odds float64 (n,): scipy's sample odds ratio a d / (b c) (inf or NaN where it is),
    p float64 (n,): ``scipy.stats.fisher_exact(table, alternative='greater')``).
    """
    tables = np.asarray(tables, dtype=np.int64)
    odds = np.empty(len(tables))
    p = np.empty(len(tables))
    for k, table in enumerate(tables):
        result = scipy_stats.fisher_exact(table, alternative="greater")
        odds[k], p[k] = float(result[0]), float(result[1])
    return odds, p


def poisson_weights(seed: int, images: np.ndarray, n_draws: int) -> np.ndarray:
    """Poisson(1) bootstrap weights of images, a function of (seed, image index) only.

    Returns
    -------
    int64 (n, R): row k drawn from ``numpy.random.default_rng([seed, 1, images[k]])``, so the
    weights of an image do not depend on the chunk it is processed in.
    """
    images = np.asarray(images, dtype=np.int64).reshape(-1)
    out = np.empty((len(images), int(n_draws)), dtype=np.int64)
    for k, image in enumerate(images.tolist()):
        out[k] = np.random.default_rng([int(seed), 1, image]).poisson(1.0, int(n_draws))
    return out


def bootstrap_sums(weights: np.ndarray, intersection: np.ndarray, act: np.ndarray,
                   label_area: np.ndarray) -> np.ndarray:
    """Weighted sums of per-image counts for every bootstrap draw (additive over images).

    Parameters
    ----------
    weights:
        int (n, R) per image and draw.
    intersection, act, label_area:
        int (n, U): per image, the unit's label's intersection, its act_area term and the
        label's area.

    Returns
    -------
    float64 (3, R, U): sums of intersection, act and label_area (exact integers < 2**53).
    """
    w = np.asarray(weights, dtype=np.float64)
    return np.stack([w.T @ np.asarray(x, dtype=np.float64)
                     for x in (intersection, act, label_area)])


def bootstrap_interval(sums: np.ndarray, level: float = 0.95
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of each unit's label IoU.

    Parameters
    ----------
    sums:
        float (3, R, U) from :func:`bootstrap_sums`, summed over every image.
    level:
        Coverage (0.95: the 2.5% and 97.5% percentiles, numpy's linear interpolation).

    Returns
    -------
    (low (U,), high (U,), iou (R, U)): IoU_r = I / (A + LA - I), 0 where that is 0 / 0.
    """
    inter, act, area = np.asarray(sums, dtype=np.float64)
    denominator = act + area - inter
    iou = np.zeros_like(inter)
    np.divide(inter, denominator, out=iou, where=denominator > 0)
    tail = round(50.0 * (1.0 - level), 10)          # 2.5 for 0.95 (not 2.4999999999999996)
    low, high = np.percentile(iou, [tail, 100.0 - tail], axis=0)
    return low, high, iou
