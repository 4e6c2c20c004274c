"""dissect.stats: exact quantiles, upsampling, IoU counts on hand-made cases, IoU and labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dissect.stats import (
    IoUCounts,
    TopKQuantile,
    best_category,
    best_labels,
    count_iou,
    iou_from_counts,
    quantile_positions,
    threshold_below,
    unit_order,
    upsample_maps,
    upsample_pixel_major,
)


# ----------------------------------------------------------------------------- quantile
def numpy_thresholds(values: np.ndarray, quantile: float) -> np.ndarray:
    """numpy.quantile of every unit of (n, U, ...) values cast to float32, as float64."""
    per_unit = np.moveaxis(np.asarray(values), 1, 0).reshape(values.shape[1], -1)
    return np.array([np.quantile(row.astype(np.float32), 1 - quantile) for row in per_unit],
                    dtype=np.float64)


def test_quantile_hand_value() -> None:
    # values 0..9 per unit; level 0.75 -> virtual index 6.75 -> 6.75
    values = np.stack([np.arange(10.0), np.arange(10.0) * 2], axis=1)[:, :, None]  # (10, 2, 1)
    top = TopKQuantile(2, 0.25, n_values_per_unit=10)
    top.add(values)
    assert top.result().tolist() == [6.75, 13.5]
    assert quantile_positions(10, 0.75) == (6, 7, 0.75)
    # K covers positions 6..9 only
    assert top.k == 4 and top.buffer.shape == (2, 4)


def test_quantile_buffer_is_small() -> None:
    top = TopKQuantile(3, 0.005, n_values_per_unit=1000)
    # virtual index 999 * 0.995 = 994.005 -> positions 994, 995 -> K = 6
    assert top.k == 6


@pytest.mark.parametrize("seed", range(6))
def test_quantile_equals_numpy_any_chunking_and_merge_order(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, units = 23, 3
    quantile = [0.005, 0.1, 0.37, 0.5, 0.0, 0.9][seed]
    kinds = {
        "float16": rng.normal(size=(n, units, 3, 2)).astype(np.float16),
        "ties": rng.integers(0, 3, size=(n, units, 3, 2)).astype(np.float16),
        "float32": (rng.standard_cauchy(size=(n, units, 3, 2))).astype(np.float32),
    }
    for values in kinds.values():
        expected = numpy_thresholds(values, quantile)
        for _ in range(4):
            cuts = np.sort(rng.choice(np.arange(1, n), size=rng.integers(0, 6), replace=False))
            states = []
            for part in np.split(values, cuts):
                state = TopKQuantile(units, quantile, n * 6)
                # float16 chunks are added as float32 (what the cache reader returns)
                state.add(part.astype(np.float32) if part.dtype == np.float16 else part)
                states.append(state)
            rng.shuffle(states)
            while len(states) > 1:                      # random merge tree
                i = int(rng.integers(0, len(states) - 1))
                states[i:i + 2] = [states[i].merge(states[i + 1])]
            np.testing.assert_array_equal(states[0].result(), expected)


def test_quantile_single_add_torch_and_float64() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(size=(7, 2, 4))
    top = TopKQuantile(2, 0.2, 28)
    top.add(torch.from_numpy(values))
    expected = [np.quantile(values[:, u].ravel(), 0.8) for u in range(2)]
    assert top.result().tolist() == expected     # float64 input: computed in float64


def test_quantile_nan_and_errors() -> None:
    values = np.ones((4, 2, 1), dtype=np.float32)
    values[2, 1, 0] = np.nan
    top = TopKQuantile(2, 0.5, 4)
    top.add(values[:2])
    other = TopKQuantile(2, 0.5, 4)
    other.add(values[2:])
    result = top.merge(other).result()
    assert result[0] == 1.0 and np.isnan(result[1])
    with pytest.raises(ValueError, match="sized for 4"):
        top.merge(other).add(values[:1])
    with pytest.raises(ValueError, match="quantile"):
        TopKQuantile(2, 1.5, 4)
    with pytest.raises(ValueError, match="different"):
        top.merge(TopKQuantile(2, 0.4, 4))


def test_quantile_fewer_values_than_capacity() -> None:
    values = np.arange(30, dtype=np.float32).reshape(5, 1, 6)
    top = TopKQuantile(1, 0.1, n_values_per_unit=1000)
    top.add(values)
    assert top.result()[0] == np.quantile(values.ravel(), 0.9)


# ----------------------------------------------------------------------------- upsampling
def test_upsample_hand_values_numpy_and_torch() -> None:
    maps = np.array([[[0.0, 4.0]]], dtype=np.float32)                    # (1, 1, 2)
    up = upsample_maps(maps, (1, 4))
    assert isinstance(up, np.ndarray) and up.dtype == np.float32
    # half-pixel centres at -0.25, 0.25, 0.75, 1.25 source pixels, clamped at the edges
    assert up.tolist() == [[[0.0, 1.0, 3.0, 4.0]]]
    up_t = upsample_maps(torch.from_numpy(maps), (1, 4))
    assert isinstance(up_t, torch.Tensor) and up_t.tolist() == up.tolist()
    assert upsample_maps(np.zeros((0, 7, 7), np.float32), (14, 14)).shape == (0, 14, 14)


def test_upsample_equals_pil_bilinear() -> None:
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(2, 5, 7)).astype(np.float32)
    up = upsample_maps(maps, (17, 23))
    for i in range(2):
        pil = np.asarray(Image.fromarray(maps[i], mode="F").resize((23, 17), Image.BILINEAR))
        np.testing.assert_allclose(up[i], pil, rtol=0, atol=1e-5)


def test_upsample_does_not_depend_on_batch() -> None:
    # torch's channels-last kernel rounds its vectorised lanes and its remainder loop differently;
    # padding keeps every map in the lanes, whatever the batch size (1..70 crosses every SIMD
    # width's remainder)
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(70, 7, 7)).astype(np.float32)
    alone = np.stack([upsample_maps(maps[i:i + 1], (112, 112))[0] for i in range(70)])
    for n in (2, 7, 9, 17, 31, 33, 64, 70):
        np.testing.assert_array_equal(upsample_maps(maps[:n], (112, 112)), alone[:n])
    planar = torch.nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=(112, 112),
                                             mode="bilinear", align_corners=False)[:, 0]
    np.testing.assert_allclose(alone, planar.numpy(), rtol=1e-6, atol=1e-6)
    pixel_major = upsample_pixel_major(torch.from_numpy(maps), (112, 112))
    assert pixel_major.shape == (112 * 112, 70)
    np.testing.assert_array_equal(pixel_major.T.reshape(70, 112, 112).numpy(), alone)


def test_threshold_below_is_exact_for_float32() -> None:
    t = np.array([0.1, 1.0, -0.3, 1e300, -1e300, np.inf])
    below = threshold_below(t)
    assert below.dtype == np.float32
    rng = np.random.default_rng(0)
    xs = np.concatenate([rng.normal(size=1000).astype(np.float32),
                         np.array([0.1, 1.0, -0.3, np.inf, -np.inf, 3e38], np.float32),
                         np.nextafter(np.float32(0.1), np.float32(1)) + np.zeros(1, np.float32)])
    for u in range(len(t)):
        np.testing.assert_array_equal(xs > below[u], xs.astype(np.float64) > t[u])


# ----------------------------------------------------------------------------- hand-made counts
# Categories: 0 color, 1 object, 2 part, 3 scene. Labels: 1 red, 2 green (color), 3 dog (object),
# 4 leg, 5 head (part), 6 kitchen, 7 street (scene, image-level), 300 wheel: in object and part,
# primary object.
PRIMARY = np.full(301, -1, dtype=np.int64)
PRIMARY[[1, 2, 3, 4, 5, 6, 7, 300]] = [0, 0, 1, 2, 2, 3, 3, 1]
COLOR0 = [[1, 1, 2, 2]] * 4
OBJECT0 = [[0, 3, 3, 0], [0, 3, 3, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
PART0A = [[0, 4, 0, 0], [0, 4, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
PART0B = [[0, 5, 5, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
COLOR1 = [[2, 2, 2, 2], [2, 2, 2, 2], [1, 1, 0, 0], [0, 0, 0, 0]]
OBJECT2 = [[0, 0, 0, 0], [0, 300, 300, 0], [0, 300, 300, 0], [0, 0, 3, 3]]
PART2 = [[0, 0, 0, 0], [0, 0, 300, 0], [0, 0, 0, 0], [0, 0, 0, 4]]
ZERO = [[0] * 4] * 4


def hand_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """3 images with 4x4 maps (identity upsampling), 2 units, threshold 0.5.

    Unit 0 fires on the top-left 2x2 block of every image; unit 1 on nothing in image 0, row 3
    of image 1 (unlabeled pixels) and pixel (3, 3) of image 2.
    """
    seg = np.array([[COLOR0, OBJECT0, PART0A, PART0B],
                    [COLOR1, ZERO, ZERO, ZERO],
                    [OBJECT2, PART2, ZERO, ZERO]], dtype=np.int32)
    image_labels = np.array([[6], [7], [6]], dtype=np.int32)
    acts = np.zeros((3, 2, 4, 4), dtype=np.float32)
    acts[:, 0, :2, :2] = 1.0
    acts[1, 1, 3, :] = 1.0
    acts[2, 1, 3, 3] = 1.0
    return acts, seg, image_labels, np.array([0.5, 0.5])


def test_hand_case_label_area_and_intersection() -> None:
    acts, seg, image_labels, thresholds = hand_case()
    counts = count_iou(acts, seg, image_labels, thresholds, PRIMARY, 4, "touched")
    expected_area = {1: 10, 2: 16, 3: 6, 4: 3, 5: 2, 6: 32, 7: 16, 300: 5}
    assert {int(label): int(v) for label, v in enumerate(counts.label_area) if v} == expected_area
    unit0 = {1: 4, 2: 4, 3: 2, 4: 2, 5: 1, 6: 8, 7: 4, 300: 1}
    unit1 = {3: 1, 4: 1, 6: 1, 7: 4}
    for u, expected in enumerate([unit0, unit1]):
        got = {int(label): int(v) for label, v in enumerate(counts.intersection[u]) if v}
        assert got == expected


@pytest.mark.parametrize("union, expected", [
    # columns: color, object, part, scene
    ("touched", [[8, 8, 4, 12], [0, 1, 1, 5]]),
    ("annotated", [[8, 8, 8, 12], [4, 1, 1, 5]]),
    ("all", [[12, 12, 12, 12], [5, 5, 5, 5]]),
])
def test_hand_case_union_rules(union: str, expected: list[list[int]]) -> None:
    acts, seg, image_labels, thresholds = hand_case()
    counts = count_iou(acts, seg, image_labels, thresholds, PRIMARY, 4, union)
    assert counts.act_area.tolist() == expected
    assert counts.act_area.dtype == np.int64 and counts.intersection.dtype == np.int64
    iou = iou_from_counts(counts, PRIMARY)
    # red for unit 0: intersection 4, label area 10, act_area[color]
    assert iou[0, 1] == 4 / (expected[0][0] + 10 - 4)
    # kitchen (image-level) for unit 0: 8 / (act_area[scene] + 32 - 8)
    assert iou[0, 6] == 8 / (expected[0][3] + 32 - 8)


def test_counts_are_additive_over_images() -> None:
    acts, seg, image_labels, thresholds = hand_case()
    whole = count_iou(acts, seg, image_labels, thresholds, PRIMARY, 4)
    parts = [count_iou(acts[i:i + 1], seg[i:i + 1], image_labels[i:i + 1], thresholds,
                       PRIMARY, 4) for i in range(3)]
    total = IoUCounts.zeros(2, 301, 4) + parts[2] + parts[0] + parts[1]
    assert total.equals(whole)
    empty = count_iou(acts[:0], seg[:0], image_labels[:0], thresholds, PRIMARY, 4)
    assert empty.equals(IoUCounts.zeros(2, 301, 4))


def test_strict_threshold_and_skipped_units() -> None:
    acts, seg, image_labels, _ = hand_case()
    # threshold exactly 1.0: max == threshold is skipped, nothing counts
    counts = count_iou(acts, seg, image_labels, np.array([1.0, 1.0]), PRIMARY, 4)
    assert counts.intersection.sum() == 0 and counts.act_area.sum() == 0
    assert counts.label_area[6] == 32        # label_area does not depend on units


def test_unit_equal_to_concept_mask_has_iou_one() -> None:
    rng = np.random.default_rng(0)
    primary = np.array([-1, 0, 0, 1])
    seg = rng.integers(0, 3, size=(5, 1, 8, 8)).astype(np.int32)     # labels 1, 2 (color)
    seg = np.concatenate([seg, np.where(seg == 2, 3, 0)[:, :, ::-1]], axis=1)  # object layer
    seg = np.ascontiguousarray(seg)
    acts = np.stack([(seg[:, 0] == 1), (seg[:, 0] == 0)], axis=1).astype(np.float32)
    counts = count_iou(acts, seg, np.zeros((5, 1), np.int32), np.array([0.5, 0.5]), primary, 2)
    iou = iou_from_counts(counts, primary)
    assert iou[0, 1] == 1.0
    assert iou[0, 2] == 0.0                  # disjoint from green
    assert iou[1, 1] == 0.0 and iou[1, 2] == 0.0


def test_count_iou_accepts_tensors_and_device() -> None:
    acts, seg, image_labels, thresholds = hand_case()
    a = count_iou(acts, seg, image_labels, thresholds, PRIMARY, 4)
    b = count_iou(torch.from_numpy(acts).half(), torch.from_numpy(seg), image_labels,
                  thresholds, PRIMARY, 4, device="cpu")
    assert a.equals(b)
    with pytest.raises(ValueError, match="union"):
        count_iou(acts, seg, image_labels, thresholds, PRIMARY, 4, union="every")


# ----------------------------------------------------------------------------- IoU and labels
def test_iou_from_counts_zero_denominators() -> None:
    primary = np.array([-1, 0, 1, -1])
    counts = IoUCounts(label_area=np.array([0, 10, 0, 5]),
                       intersection=np.array([[0, 5, 0, 5], [0, 0, 0, 0]]),
                       act_area=np.array([[10, 0], [0, 0]]))
    iou = iou_from_counts(counts, primary)
    assert iou.tolist() == [[0.0, 5 / 15, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


def test_best_labels_ties_and_empty_categories() -> None:
    primary = np.array([-1, 0, 0, 1, 1, 2])
    iou = np.array([
        [0.0, 0.2, 0.2, 0.1, 0.3, 0.0],   # tie in cat 0 -> label 1; unit: cat 1 (label 4)
        [0.0, 0.0, 0.0, 0.5, 0.5, 0.0],   # cat 0 none -> 0; tie in cat 1 -> label 3
        [0.0, 0.4, 0.1, 0.4, 0.0, 0.0],   # tie across categories -> later (cat 1, label 3)
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # nothing: last category, label 0
    ])
    cat_label, cat_iou, unit_label, unit_iou = best_labels(iou, primary, 3)
    assert cat_label.tolist() == [[1, 4, 0], [0, 3, 0], [1, 3, 0], [0, 0, 0]]
    assert cat_iou.tolist() == [[0.2, 0.3, 0.0], [0.0, 0.5, 0.0], [0.4, 0.4, 0.0], [0, 0, 0]]
    assert unit_label.tolist() == [4, 3, 3, 0]
    assert unit_iou.tolist() == [0.3, 0.5, 0.4, 0.0]
    assert best_category(cat_iou).tolist() == [1, 1, 1, 2]


def test_unit_order_is_netdissect_lites_reversed_argsort() -> None:
    scores = np.array([0.1, 0.3, 0.3, 0.0, 0.3])
    assert unit_order(scores).tolist() == [4, 2, 1, 0, 3]


@pytest.mark.parametrize("n_pixels, n_columns", [(37, 5), (48, 8), (48, 16), (33, 7)])
def test_mask_pixels_numpy_and_torch_scans_agree(n_pixels: int, n_columns: int) -> None:
    """Strided and contiguous (S, P) layouts, with and without padding columns (which hold
    values above every threshold and must be ignored), S with and without a factor 16."""
    from dissect.stats.iou import _mask_pixels

    rng = np.random.default_rng(0)
    planar = rng.normal(size=(n_columns, n_pixels)).astype(np.float32)   # (P, S)
    planar[5:] = 100.0                                                 # padding columns
    if n_columns == 5:
        up = torch.from_numpy(planar).T                                # (S, P) strided view
    else:
        up = torch.from_numpy(np.ascontiguousarray(planar.T))          # (S, P) contiguous
    below = torch.tensor([0.0, 0.5, 3.0, -1.0, 1.0])
    numpy_scan = _mask_pixels(up, below, use_numpy=True)
    torch_scan = _mask_pixels(up, below, use_numpy=False)
    for a, b in zip(numpy_scan, torch_scan):
        np.testing.assert_array_equal(a, b)
    which, pixel = numpy_scan
    expected_pixel, expected_which = np.nonzero(planar[:5].T > below.numpy()[None, :])
    np.testing.assert_array_equal(which, expected_which)
    np.testing.assert_array_equal(pixel, expected_pixel)
    assert len(which) > 0 and which.max() < 5


def test_quantile_state_is_float16_when_lossless_and_exact_in_small_blocks(monkeypatch) -> None:
    import dissect.stats.quantile as quantile_module

    monkeypatch.setattr(quantile_module, "_BLOCK_VALUES", 7)   # many unit blocks per merge
    rng = np.random.default_rng(3)
    half = rng.normal(size=(30, 5, 3, 3)).astype(np.float16)       # a float16 cache
    full = rng.normal(size=(10, 5, 3, 3)).astype(np.float32)       # not representable
    capacity = (30 + 10) * 9
    a = TopKQuantile(5, 0.05, capacity)
    a.add(half[:15])
    b = TopKQuantile(5, 0.05, capacity)
    b.add(half[15:])
    assert a.buffer.dtype == np.float16 and b.buffer.dtype == np.float16
    merged = a.merge(b)
    assert merged.buffer.dtype == np.float16
    np.testing.assert_array_equal(merged.result(), numpy_thresholds(half, 0.05))
    c = TopKQuantile(5, 0.05, capacity)
    c.add(full)
    assert c.buffer.dtype == np.float32
    everything = np.concatenate([half.astype(np.float32), full])
    np.testing.assert_array_equal(c.merge(a, b).result(), numpy_thresholds(everything, 0.05))
    np.testing.assert_array_equal(b.merge(c).merge(a).result(),
                                  numpy_thresholds(everything, 0.05))


@pytest.mark.parametrize("shape,size", [((7, 7), (28, 28)), ((16, 16), (8, 8)),
                                        ((12, 5), (6, 10))])
def test_upsample_maps_matches_pil_bilinear_when_enlarging_and_shrinking(shape, size) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    maps = rng.normal(size=(3, *shape)).astype(np.float32)
    ours = upsample_maps(maps, size)
    pil = np.stack([np.asarray(Image.fromarray(m, "F").resize(size[::-1], Image.BILINEAR))
                    for m in maps])
    np.testing.assert_allclose(ours, pil, rtol=0, atol=2e-6)
    # the skip rule of DESIGN §3 relies on this: a resized map never exceeds the map's maximum
    assert (ours.max(axis=(1, 2)) <= maps.max(axis=(1, 2))).all()


@pytest.mark.parametrize("density", [0.02, 0.9])
def test_iou_counts_pickle_exactly_sparse_or_dense(density: float) -> None:
    import pickle

    rng = np.random.default_rng(4)
    intersection = rng.integers(1, 10**12, size=(37, 211), dtype=np.int64)
    intersection[rng.random(intersection.shape) > density] = 0
    counts = IoUCounts(rng.integers(0, 100, 211, dtype=np.int64), intersection,
                       rng.integers(0, 100, (37, 5), dtype=np.int64))
    payload = pickle.dumps(counts)
    back = pickle.loads(payload)
    assert back.equals(counts) and back.intersection.dtype == np.int64
    if density < 0.5:   # stored as nonzero entries: far smaller than the dense array
        assert len(payload) < intersection.nbytes / 4


# ----------------------------------------------------------------------------- cell prefilter
def full_pixels(maps: np.ndarray, below: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Sorted codes map * S + pixel of every mask pixel through the full resize (reference)."""
    from dissect.stats.iou import _mask_pixels, _upsample_padded

    which, pixel = _mask_pixels(_upsample_padded(torch.from_numpy(maps), size), below)
    return np.sort(which * (size[0] * size[1]) + pixel)


def tiled_pixels(maps: np.ndarray, below: np.ndarray, size: tuple[int, int],
                 cells: int) -> np.ndarray:
    """The same codes through the cell prefilter's tiles."""
    from dissect.stats.iou import _tiled_mask_pixels

    which, pixel = _tiled_mask_pixels(torch.from_numpy(maps), below, size, cells)
    return np.sort(which * (size[0] * size[1]) + pixel)


@pytest.mark.parametrize("shape,size,cells", [
    ((7, 7), (112, 112), 1), ((2, 3), (16, 24), 1), ((14, 7), (112, 112), 1),
    ((7, 7), (112, 112), 2), ((7, 7), (112, 112), 6), ((28, 28), (112, 112), 4),
    ((28, 28), (112, 112), 8), ((56, 56), (112, 112), 8), ((14, 7), (112, 112), 3),
    ((28, 14), (112, 112), 5), ((9, 5), (36, 80), 4), ((8, 8), (8, 8), 2)])
def test_prefilter_finds_exactly_the_full_resize_pixels(shape, size, cells) -> None:
    # thresholds at values of the full resize itself and one float32 step below them: a tile
    # value one ulp off the full resize would change a mask
    from dissect.stats.iou import _upsample_padded

    rng = np.random.default_rng(sum(shape) + cells)
    for trial in range(4):
        n = int(rng.integers(1, 19))
        maps = rng.normal(size=(n, *shape)).astype(np.float32)
        if trial % 2:                                   # a float16 cache, read as float32
            maps = (3 * maps).astype(np.float16).astype(np.float32)
        up = _upsample_padded(torch.from_numpy(maps), size)[:, :n].numpy()       # (S, n)
        high = np.sort(up, axis=0)[int(0.97 * len(up))]          # data values near the top
        for below in (high, np.nextafter(high, np.float32(-np.inf)),
                      up[rng.integers(0, len(up), n), np.arange(n)],
                      threshold_below(np.quantile(maps.reshape(n, -1), 0.9, axis=1))):
            below = below.astype(np.float32)
            expected = full_pixels(maps, below, size)
            assert len(expected) > 0
            np.testing.assert_array_equal(tiled_pixels(maps, below, size, cells), expected)


def test_prefilter_margin_values_at_the_cut_off() -> None:
    # Source values exactly at the threshold, one ulp either side of it, and exactly at and one
    # ulp above the prefilter's cut-off t - 2**-18 * A: the interpolated values land on both
    # sides of t through rounding, and the tiles must agree with the full resize.
    from dissect.stats.iou import _PREFILTER_MARGIN

    rng = np.random.default_rng(7)
    size = (112, 112)
    for t in (np.float32(1.0), np.float32(-0.75), np.float32(3.1e-3), np.float32(0.0)):
        largest = np.float32(4.0)
        cut = threshold_below(np.array([float(t) - _PREFILTER_MARGIN * float(largest)]))[0]
        palette = np.array([t, np.nextafter(t, np.float32(np.inf)),
                            np.nextafter(t, np.float32(-np.inf)), cut,
                            np.nextafter(cut, np.float32(np.inf)), -largest], np.float32)
        maps = palette[rng.integers(0, len(palette), size=(20, 28, 28))]
        maps[:, 0, 0] = largest                         # A = 4 in every map
        below = np.full(20, t, np.float32)
        for cells in (1, 2, 8):
            expected = full_pixels(maps, below, size)
            assert len(expected) > 0
            np.testing.assert_array_equal(tiled_pixels(maps, below, size, cells), expected)


def test_prefilter_applies_only_to_dyadic_enlargement_on_the_cpu() -> None:
    from dissect.stats.iou import prefilter_applies

    assert prefilter_applies((28, 28), (112, 112)) and prefilter_applies((56, 28), (112, 112))
    assert not prefilter_applies((13, 13), (56, 56))        # 56 / 13 is no power of two
    assert not prefilter_applies((28, 28), (84, 84))        # factor 3
    assert not prefilter_applies((224, 224), (112, 112))    # shrinking: antialiased
    assert not prefilter_applies((28, 28), (112, 112), device="meta")
    assert prefilter_applies((14, 14), (112, 112)) and prefilter_applies((7, 7), (112, 112))
    assert prefilter_applies((2, 2), (64, 64))
    assert not prefilter_applies((1, 8), (16, 64))          # one row: no tile's window fits


def test_pair_runs_batches_and_groups_hand_values() -> None:
    from dissect.stats.iou import _image_runs, _pair_batches, _pair_groups

    runs = _image_runs(np.array([0, 0, 0, 1, 1, 2, 5, 5, 5, 5, 5]))
    assert runs == [0, 3, 5, 6, 11]
    assert _pair_batches(runs, 2) == [(0, 2), (2, 3), (3, 5), (5, 6), (6, 8), (8, 10), (10, 11)]
    # whole runs of at most 4 pairs; the run of 5 is split (4 + 1)
    ones = np.ones(11, np.int64)
    assert _pair_groups(runs, ones, 4, 100, 100) == [(0, 3), (3, 6), (6, 10), (10, 11)]
    assert _pair_groups(runs, ones, 11, 100, 100) == [(0, 11)]
    assert _pair_groups(runs, ones, 1, 100, 100) == [(i, i + 1) for i in range(11)]
    # at most 2 images a group
    assert _pair_groups(runs, ones, 100, 100, 2) == [(0, 5), (5, 11)]
    assert _pair_groups(runs, ones, 100, 100, 1) == [(0, 3), (3, 5), (5, 6), (6, 11)]
    # by cost: at most 10 per group; a pair costing more than that is a group of its own
    cost = np.array([1, 1, 1, 4, 4, 2, 30, 1, 1, 1, 1])
    assert _pair_groups(runs, cost, 100, 10, 100) == [(0, 3), (3, 6), (6, 7), (7, 11)]
    assert _pair_groups(runs, cost, 100, 10 ** 6, 100) == [(0, 11)]
    assert _image_runs(np.zeros(0, np.int64)) == [0]
    assert _pair_groups([0], np.zeros(0, np.int64), 4, 10, 1) == []
    assert _pair_batches([0], 4) == []


def test_tile_cells_aim_at_sixteen_output_pixels_per_tile_side() -> None:
    from dissect.stats.iou import _tile_cells

    # 16 // factor source cells, the larger factor of the two sides, within 1 .. min(h, w) - 1
    assert [_tile_cells((s, s), (112, 112)) for s in (7, 14, 28, 56)] == [1, 2, 4, 8]
    assert _tile_cells((28, 14), (112, 112)) == 2 and _tile_cells((3, 64), (12, 128)) == 2
    assert _tile_cells((2, 2), (64, 64)) == 1 and _tile_cells((5, 5), (10, 10)) == 4


def test_hot_tiles_equal_a_max_pooling_of_the_windows() -> None:
    from dissect.stats.iou import _hot_tiles

    rng = np.random.default_rng(5)
    for (h, w), cells in [((28, 28), 8), ((14, 14), 8), ((56, 28), 8), ((9, 17), 8),
                          ((28, 28), 3), ((29, 30), 4), ((7, 7), 1), ((2, 5), 1)]:
        values = rng.standard_normal((12, h, w)).astype(np.float32)
        cutoff = np.full(12, 2.0, np.float32)
        cutoff[:2] = -10.0                                  # every tile hot
        cutoff[2] = 10.0                                    # none
        tiles = (-(-(h - 1) // cells), -(-(w - 1) // cells))
        expected = np.zeros((12, *tiles), bool)
        for j in range(tiles[0]):
            for k in range(tiles[1]):
                window = values[:, j * cells:j * cells + cells + 1, k * cells:k * cells + cells + 1]
                expected[:, j, k] = (window > cutoff[:, None, None]).any(axis=(1, 2))
        np.testing.assert_array_equal(_hot_tiles(values, cutoff, cells, tiles), expected)


def test_prefilter_gives_way_to_the_full_path_for_non_finite_maps() -> None:
    from dissect.stats.iou import _tiled_mask_pixels

    maps = np.random.default_rng(0).normal(size=(3, 9, 9)).astype(np.float32)
    maps[1, 4, 4] = np.nan
    assert _tiled_mask_pixels(torch.from_numpy(maps), np.zeros(3, np.float32), (36, 36),
                              4) is None
    maps[1, 4, 4] = np.inf
    assert _tiled_mask_pixels(torch.from_numpy(maps), np.zeros(3, np.float32), (36, 36),
                              4) is None


@pytest.mark.parametrize("shape,seg_size", [((28, 28), (112, 112)), ((9, 5), (36, 40)),
                                            ((13, 13), (56, 56)), ((8, 16), (64, 64)),
                                            ((7, 7), (112, 112))])
@pytest.mark.parametrize("tile_side,group_maps", [(16, 1024), (64, 7), (1, 1)])
def test_count_iou_with_and_without_prefilter_is_identical(monkeypatch, shape, seg_size,
                                                           tile_side, group_maps) -> None:
    # tile sides of 1 to 8 cells; groups of whole images, of one image, and one image of more
    # maps than a group: the group holding the inf map gives way to the full path
    import dissect.stats.iou as iou_module

    monkeypatch.setattr(iou_module, "_TILE_SIDE", tile_side)
    monkeypatch.setattr(iou_module, "_GROUP_MAPS", group_maps)
    monkeypatch.setattr(iou_module, "_TILES", {})
    assert count_iou.__kwdefaults__["prefilter"] is None      # automatic (prefilter_default)
    rng = np.random.default_rng(11)
    n, units, n_labels = 6, 9, 12
    acts = rng.gamma(1.5, 0.4, size=(n, units, *shape)).astype(np.float16)
    acts[0, 0, :, :] = np.nan                                          # a broken map
    acts[2, 3, 1, 1] = np.inf               # an active map with a non-finite value
    seg = rng.integers(0, n_labels, size=(n, 3, *seg_size)).astype(np.int32)
    seg[:, 2] = 0
    seg[3, 1] = 0                           # images of one batch use different layer counts
    image_labels = rng.integers(0, n_labels, size=(n, 2)).astype(np.int32)
    primary = rng.integers(-1, 4, size=n_labels)
    primary[0] = -1
    values = acts.astype(np.float32)
    thresholds = np.nanquantile(np.moveaxis(values, 1, 0).reshape(units, -1), 0.9, axis=1)
    thresholds[1] = values[1, 1].max()                        # a threshold at a data value
    calls = []              # per batch of maps: through the prefilter (True) or not
    for name, tiled in (("_tiled_mask_pixels", True), ("_upsample_threshold", False)):
        def spy(*args, function=getattr(iou_module, name), tiled=tiled, **kwargs):
            calls.append(tiled)
            return function(*args, **kwargs)

        monkeypatch.setattr(iou_module, name, spy)
    for union in ("touched", "annotated", "all"):
        full = count_iou(acts, seg, image_labels, thresholds, primary, 4, union,
                         prefilter=False)
        calls.clear()
        tiled = count_iou(acts, seg, image_labels, thresholds, primary, 4, union,
                          prefilter=True)
        assert tiled.equals(full)
        assert full.intersection.sum() > 0
    # in the last prefilter=True run: where the prefilter applies, the group with the inf map took the full path, and with
    # groups smaller than the chunk's active maps the other groups took the prefilter
    assert False in calls
    if iou_module.prefilter_applies(shape, seg_size):
        assert (True in calls) == (group_maps < n * units)
    else:
        assert True not in calls


def test_prefilter_groups_are_bounded_by_the_pixels_of_their_hot_tiles(monkeypatch) -> None:
    # Thresholds below every value: every tile is hot and every pixel a mask pixel. With a
    # budget of 2 maps' pixels a group, an image's maps are split into groups of at most 2 (the
    # memory of a group's pixels stays bounded), and the counts equal the full path's.
    import dissect.stats.iou as iou_module

    rng = np.random.default_rng(4)
    n, units, n_labels, size = 3, 5, 7, (32, 32)
    acts = rng.normal(size=(n, units, 4, 4)).astype(np.float32)
    seg = rng.integers(0, n_labels, size=(n, 2, *size)).astype(np.int32)
    image_labels = rng.integers(0, n_labels, size=(n, 1)).astype(np.int32)
    primary = rng.integers(-1, 3, size=n_labels)
    primary[0] = -1
    thresholds = np.full(units, acts.min() - 1.0)
    full = count_iou(acts, seg, image_labels, thresholds, primary, 3, prefilter=False)
    assert full.act_area.sum() > 0
    monkeypatch.setattr(iou_module, "_BATCH_VALUES", 2 * size[0] * size[1])
    sizes = []
    tiled_function = iou_module._tiled_mask_pixels

    def spy(maps, *args, **kwargs):
        sizes.append(len(maps))
        return tiled_function(maps, *args, **kwargs)

    monkeypatch.setattr(iou_module, "_tiled_mask_pixels", spy)
    assert count_iou(acts, seg, image_labels, thresholds, primary, 3, prefilter=True).equals(full)
    assert sizes == [2, 2, 1] * n                   # 5 maps an image: 2 + 2 + 1


def test_count_iou_of_float16_equals_its_float32_values() -> None:
    """float16 activations (the cache read as stored) give the counts of their float32 values:
    the map maxima are taken in float16, NaN of either sign and +-inf included."""
    rng = np.random.default_rng(5)
    n, units, n_labels = 5, 7, 9
    acts = rng.gamma(1.5, 0.4, size=(n, units, 7, 7)).astype(np.float16)
    acts[0, 0, 3, 3] = np.nan
    acts[1, 1, 0, 0] = -np.float32(np.nan)
    acts[2, 2, 1, 1], acts[3, 3, 2, 2] = np.inf, -np.inf
    seg = rng.integers(0, n_labels, size=(n, 2, 28, 28)).astype(np.int32)
    image_labels = rng.integers(0, n_labels, size=(n, 2)).astype(np.int32)
    primary = rng.integers(-1, 3, size=n_labels)
    primary[0] = -1
    values = acts.astype(np.float32)
    thresholds = np.nanquantile(np.moveaxis(values, 1, 0).reshape(units, -1), 0.8, axis=1)
    for union in ("touched", "annotated", "all"):
        expected = count_iou(values, seg, image_labels, thresholds, primary, 3, union)
        assert count_iou(acts, seg, image_labels, thresholds, primary, 3, union).equals(expected)
        assert count_iou(torch.from_numpy(acts), seg, image_labels, thresholds, primary, 3,
                         union).equals(expected)
        assert expected.intersection.sum() > 0


@pytest.mark.parametrize("cut_off", [None, 0, 28 * 28])
def test_count_iou_default_prefilter_choice_per_layer_shape(monkeypatch, cut_off) -> None:
    # The default (prefilter=None) at the benchmark's four layer shapes onto 112 x 112 labels:
    # with no cut-off (the full path everywhere), the measured one (every shape takes the
    # prefilter) and one from 28 x 28, the counts equal the full path's.
    import dissect.stats.iou as iou_module

    assert iou_module._PREFILTER_MIN_CELLS == 0       # the measured default

    monkeypatch.setattr(iou_module, "_PREFILTER_MIN_CELLS", cut_off)
    calls = []
    tiled_function = iou_module._tiled_mask_pixels

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return tiled_function(*args, **kwargs)

    monkeypatch.setattr(iou_module, "_tiled_mask_pixels", spy)
    rng = np.random.default_rng(3)
    n, n_labels, size = 3, 10, (112, 112)
    seg = rng.integers(0, n_labels, size=(n, 2, *size)).astype(np.int32)
    image_labels = rng.integers(0, n_labels, size=(n, 1)).astype(np.int32)
    primary = rng.integers(-1, 3, size=n_labels)
    primary[0] = -1
    for units, side in [(8, 7), (6, 14), (4, 28), (3, 56)]:
        acts = rng.gamma(1.5, 0.4, size=(n, units, side, side)).astype(np.float16)
        values = np.moveaxis(acts.astype(np.float32), 1, 0).reshape(units, -1)
        thresholds = np.quantile(values, 0.98, axis=1)
        expected_tiles = cut_off is not None and side * side >= cut_off
        assert iou_module.prefilter_default((side, side), size) == expected_tiles
        calls.clear()
        full = count_iou(acts, seg, image_labels, thresholds, primary, 3, prefilter=False)
        assert not calls
        chosen = count_iou(acts, seg, image_labels, thresholds, primary, 3)
        assert bool(calls) == expected_tiles, (side, calls)
        assert chosen.equals(full) and full.intersection.sum() > 0


def test_quantile_add_in_unit_blocks_keeps_nan_sign_and_input(monkeypatch) -> None:
    # a chunk is selected in blocks of units (each its own sign check and NaN check): units with
    # NaN, with negative values or with only non-negative ones land in different blocks; the
    # result equals numpy for every block size and both float16 key widths, and the caller's
    # array (here a non-contiguous view) is left as it was
    import dissect.stats.quantile as quantile_module

    rng = np.random.default_rng(11)
    base = rng.gamma(1.0, 1.0, size=(9, 7, 4, 5))
    base[:, 2] -= 3.0                                       # unit 2: mostly negative
    base[4, 5, 1, 1] = np.nan                               # unit 5: NaN
    base[:, 6] = 0.0                                        # unit 6: all zero (ties)
    for dtype in (np.float16, np.float32, np.float64):
        chunk = base.astype(dtype)
        chunk[5, 3, 0, 0] = -np.inf                         # unit 3: one -inf
        view = np.swapaxes(np.swapaxes(chunk, 2, 3).copy(), 2, 3)     # same values, strided
        expected = [np.quantile(chunk[:, u].astype(np.float32 if dtype != np.float64
                                                    else np.float64).ravel(), 0.9)
                    for u in range(7)]
        for block in (7, 20, 45, 2 ** 19):
            for int16 in (True, False):
                monkeypatch.setattr(quantile_module, "_BLOCK_VALUES", block)
                monkeypatch.setattr(quantile_module, "_SELECT_INT16", int16)
                before = view.copy()
                top = TopKQuantile(7, 0.1, 9 * 20)
                top.add(view[:4])
                top.add(view[4:])
                np.testing.assert_array_equal(view, before)
                np.testing.assert_array_equal(top.result(), expected)
                assert np.isnan(top.result()[5]) and top.has_nan.tolist() == [
                    False] * 5 + [True, False]


def test_quantile_add_copies_maps_whole_or_casts(monkeypatch) -> None:
    # A unit's map of one image is copied as one void element where no cast is needed, also
    # from a view whose units run backwards; integer values are cast as before. Small blocks:
    # several blocks of units per chunk.
    import dissect.stats.quantile as quantile_module

    monkeypatch.setattr(quantile_module, "_BLOCK_VALUES", 50)
    rng = np.random.default_rng(12)
    base = rng.integers(-20, 20, size=(8, 6, 3, 5))
    for chunk in (base.astype(np.float16)[:, ::-1], base.astype(np.float32)[:, ::-1],
                  base.astype(np.float64), base, base[:, :, :, ::2]):
        values = np.asarray(chunk)
        expected = np.quantile(np.moveaxis(values, 1, 0).reshape(6, -1).astype(
            np.float64 if values.dtype in (np.float64, np.int64) else np.float32), 0.8, axis=1)
        top = TopKQuantile(6, 0.2, values[:, 0].size)
        top.add(values[:5])
        top.add(values[5:])
        np.testing.assert_array_equal(top.result(), expected)


# ----------------------------------------------------------------------------- quantile, float16
@pytest.fixture(params=[True, False], ids=["int16-keys", "int32-keys"])
def key_width(request, monkeypatch) -> bool:
    """Both ways float16 order keys are selected: as int16 (NumPy with 16-bit SIMD selection)
    and widened to int32 (elsewhere); the machine running the tests picks one by default."""
    from dissect.stats import quantile as quantile_module

    monkeypatch.setattr(quantile_module, "_SELECT_INT16", request.param)
    return request.param


def test_quantile_of_float16_values_as_stored(key_width) -> None:
    # float16 arrays (a cache read without conversion) are selected by integer order keys:
    # negative values, -0 / +0, infinities, ties; equal to numpy on the float32 values, and the
    # caller's array is left alone (a single image is a view that could be partitioned in place)
    rng = np.random.default_rng(5)
    values = rng.normal(size=(12, 4, 3, 3)).astype(np.float16)
    values[:, 1] = -np.abs(values[:, 1])
    values[:6, 2] = -0.0
    values[6:, 2] = 0.0
    values[3, 3, 0, 0] = np.inf
    values[4, 3, 0, 0] = -np.inf
    relu = np.maximum(values, np.float16(0))             # no sign bit anywhere: keys are the bits
    relu[:, 2] = np.float16(0.5)
    for chunk in (values, relu):
        for quantile in (0.005, 0.3, 0.5, 0.95):
            top = TopKQuantile(4, quantile, 12 * 9)
            for i in range(12):
                before = chunk[i:i + 1].copy()
                top.add(chunk[i:i + 1])
                np.testing.assert_array_equal(chunk[i:i + 1], before)
            assert top.buffer.dtype == np.float16
            np.testing.assert_array_equal(top.result(), numpy_thresholds(chunk, quantile))
            whole = TopKQuantile(4, quantile, 12 * 9)
            whole.add(chunk.astype(np.float32))
            np.testing.assert_array_equal(whole.merge(TopKQuantile(4, quantile, 12 * 9)).result(),
                                          top.result())
            halves = TopKQuantile(4, quantile, 12 * 9)
            halves.add(chunk[:7])
            np.testing.assert_array_equal(halves.merge(TopKQuantile(4, quantile, 12 * 9))
                                          .result(), numpy_thresholds(chunk[:7], quantile))


def test_quantile_float16_nan_of_either_sign(key_width) -> None:
    values = np.ones((4, 3, 2), dtype=np.float16)
    bits = values.view(np.uint16)
    bits[1, 0, 0] = 0x7E00                      # NaN
    bits[2, 1, 1] = 0xFE00                      # NaN with the sign bit set (sorts low as a key)
    top = TopKQuantile(3, 0.25, 8)
    top.add(values)
    result = top.result()
    assert np.isnan(result[0]) and np.isnan(result[1]) and result[2] == 1.0


def test_float16_partition_every_bit_pattern(key_width) -> None:
    # all 65536 float16 patterns: the in-place order keys order the non-NaN floats as float32
    # does (-0 just below +0) and are their own inverse; a partition by them puts at every
    # position the value np.partition of the float32 values puts there; the NaN check finds
    # exactly the NaN patterns
    from dissect.stats.quantile import _flip_negative, _has_nan_bits, _partition

    values = np.arange(2 ** 16, dtype=np.uint16).view(np.float16)
    keys = values.view(np.int16).copy()
    _flip_negative(keys)
    assert len(np.unique(keys)) == 2 ** 16
    back = keys.copy()
    _flip_negative(back)
    np.testing.assert_array_equal(back.view(np.uint16), values.view(np.uint16))
    finite = ~np.isnan(values)
    ordered = values[finite][np.argsort(keys[finite], kind="stable")].astype(np.float32)
    assert (np.diff(ordered) >= 0).all()
    inf_key, minus_inf_key = keys[values.view(np.uint16) == 0x7C00], keys[
        values.view(np.uint16) == 0xFC00]
    assert ((keys > inf_key) | (keys < minus_inf_key) == ~finite).all()
    rng = np.random.default_rng(0)
    rows = rng.permutation(values[finite])[:62 * 1024].reshape(62, 1024)     # shuffled
    expected = np.partition(rows.astype(np.float32), [3, 500, 1020], axis=1)
    for negative in (None, True):
        part = rows.copy()
        _partition(part, [3, 500, 1020], negative)
        np.testing.assert_array_equal(part[:, [3, 500, 1020]].astype(np.float32),
                                      expected[:, [3, 500, 1020]])
        # from the first kth on, the row holds the same values as np.partition's (before
        # it, the widened keys' partition leaves the row unspecified)
        np.testing.assert_array_equal(np.sort(part[:, 3:].astype(np.float32), axis=1),
                                      np.sort(expected[:, 3:], axis=1))
    positive = np.abs(rows)                          # sign bits clear: keys are the bits
    part = positive.copy()
    _partition(part, [3, 500], negative=False)
    np.testing.assert_array_equal(part[:, [3, 500]], np.partition(positive.astype(np.float32),
                                                                  [3, 500], axis=1)[:, [3, 500]])
    square = values.reshape(256, 256)
    np.testing.assert_array_equal(_has_nan_bits(square.view(np.int16)), np.isnan(square).any(1))
    lone = np.zeros((2, 4), np.float16)
    lone.view(np.uint16)[1, 2] = 0xFC01                      # the NaN next to -inf
    np.testing.assert_array_equal(_has_nan_bits(lone.view(np.int16)), [False, True])
    lone.view(np.uint16)[1, 2] = 0x7C01                      # the NaN next to +inf
    np.testing.assert_array_equal(_has_nan_bits(lone.view(np.int16), negative=False),
                                  [False, True])


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.int16, np.uint8, np.uint16])
@pytest.mark.parametrize("writeable", [True, False])
def test_label_counts_equal_numpy_bincount(dtype, writeable: bool) -> None:
    from dissect.stats.iou import _label_counts, _used_layers

    rng = np.random.default_rng(7)
    seg = rng.integers(0, 9, size=(5, 3, 6, 7)).astype(dtype)
    seg[1, 2] = 0                                           # a padded layer
    seg[3] = 0                                              # an image with no label
    seg[4, 1:] = 0
    seg.flags.writeable = writeable
    image_labels = np.array([[0, 0], [3, 0], [0, 0], [8, 8], [2, 5]])
    used = _used_layers(seg)
    np.testing.assert_array_equal(used, [3, 2, 3, 0, 1])
    pixel_counts, level_counts = _label_counts(seg, used, image_labels, 9)
    for i in range(5):
        expected = np.bincount(seg[i, :used[i]].reshape(-1).astype(np.int64), minlength=9)
        expected[0] = 0
        np.testing.assert_array_equal(pixel_counts[i], expected)
        np.testing.assert_array_equal(
            level_counts[i], np.bincount(image_labels[i][image_labels[i] > 0], minlength=9))


@pytest.mark.parametrize("n_labels", [9, 49, 50, 5000])
def test_label_counts_of_regions_with_small_and_large_vocabularies(n_labels: int) -> None:
    # 14 x 14 label maps of 2 x 2 regions: 4 interleaved histogram copies for up to
    # 196 / 4 = 49 labels, one copy for more; both equal NumPy's bincount
    from dissect.stats.iou import _COUNT_COPIES, _label_counts, _used_layers

    assert _COUNT_COPIES == 4
    rng = np.random.default_rng(n_labels)
    blocks = rng.integers(0, n_labels, size=(3, 2, 7, 7))
    seg = np.repeat(np.repeat(blocks, 2, axis=2), 2, axis=3).astype(np.int32)
    seg[2, 1] = 0
    pixel_counts, _ = _label_counts(seg, _used_layers(seg), np.zeros((3, 1), np.int64),
                                    n_labels)
    for i in range(3):
        expected = np.bincount(seg[i].reshape(-1), minlength=n_labels)
        expected[0] = 0
        np.testing.assert_array_equal(pixel_counts[i], expected)


def brute_force_counts(acts: np.ndarray, seg: np.ndarray, image_labels: np.ndarray,
                       thresholds: np.ndarray, primary: np.ndarray, n_categories: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DESIGN §3 steps 2-3 with the 'touched' rule, one (image, unit, layer) at a time."""
    n, units = acts.shape[:2]
    size = seg.shape[2:]
    area = size[0] * size[1]
    n_labels = len(primary)
    label_area = np.zeros(n_labels, np.int64)
    intersection = np.zeros((units, n_labels), np.int64)
    act_area = np.zeros((units, n_categories), np.int64)
    for i in range(n):
        levels = [int(x) for x in image_labels[i] if x > 0]
        for layer in seg[i]:
            label_area += np.bincount(layer.reshape(-1), minlength=n_labels)
        for label in levels:
            label_area[label] += area
        for u in range(units):
            if not acts[i, u].max() > thresholds[u]:
                continue
            mask = upsample_maps(acts[i, u][None], size)[0] > np.float32(thresholds[u])
            touched = {int(primary[label]) for label in levels if primary[label] >= 0}
            for layer in seg[i]:
                hit = np.bincount(layer[mask], minlength=n_labels)
                hit[0] = 0
                intersection[u] += hit
                touched |= {int(primary[label]) for label in np.flatnonzero(hit)
                            if primary[label] >= 0}
            for label in levels:
                intersection[u, label] += mask.sum()
            for c in touched:
                act_area[u, c] += mask.sum()
    label_area[0] = 0
    return label_area, intersection, act_area


@pytest.mark.parametrize("label_type", [np.int32, np.int64, np.uint16])
@pytest.mark.parametrize("n_present", [20, 300])
def test_count_iou_equals_brute_force_on_region_label_maps(label_type, n_present: int) -> None:
    # Region-like label maps, fewer and more than 255 labels in a batch (uint8 and int64 renumbering), label dtypes
    # renumbered by torch (int32, int64) and by NumPy (uint16), prefilter on and off.
    rng = np.random.default_rng(n_present)
    n, units, n_labels, n_cat = 4, 5, 400, 3
    acts = rng.gamma(1.5, 0.4, size=(n, units, 7, 7)).astype(np.float32)
    pool = rng.choice(np.arange(1, n_labels), size=n_present, replace=False)
    blocks = pool[rng.integers(0, n_present, size=(n, 3, 14, 14))]
    seg = np.repeat(np.repeat(blocks, 2, axis=2), 2, axis=3).astype(label_type)   # (n, 3, 28, 28)
    seg[:, 2, :10] = 0
    seg[1, 1:] = 0
    primary = rng.integers(-1, n_cat, size=n_labels)
    primary[0] = -1
    image_labels = rng.integers(0, n_labels, size=(n, 2))
    thresholds = np.quantile(np.moveaxis(acts, 1, 0).reshape(units, -1), 0.8, axis=1)
    expected = brute_force_counts(acts, seg, image_labels, thresholds, primary, n_cat)
    assert expected[1].sum() > 0 and (np.diff(seg, axis=3) == 0).mean() > 0.5
    assert (len(np.unique(seg)) > 256) == (n_present > 256)
    for prefilter in (False, True):
        counts = count_iou(acts, seg, image_labels, thresholds, primary, n_cat, "touched",
                           prefilter=prefilter)
        np.testing.assert_array_equal(counts.label_area, expected[0])
        np.testing.assert_array_equal(counts.intersection, expected[1])
        np.testing.assert_array_equal(counts.act_area, expected[2])


# -- ties (2026-12-06) ---------------------------------------------------------------------
def relu_values(shape: tuple[int, ...], seed: int, dtype=np.float16) -> np.ndarray:
    """Values as after a ReLU: 60% exactly 0 (some -0), whole zero maps, a few negatives."""
    rng = np.random.default_rng(seed)
    values = np.maximum(rng.gamma(1.5, 0.4, size=shape) - 0.6, 0.0)
    values[rng.random(shape[:2]) < 0.3] = 0.0                   # whole maps of 0
    values[rng.random(shape) < 0.05] = -0.0
    values[rng.random(shape) < 0.01] = -rng.random()
    return values.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_partition_of_tie_heavy_rows_equals_numpy(dtype) -> None:
    # rows where 0 fills most of the row: the tie-broken keys select exactly np.partition's
    # values at the kth positions, and the same multiset from the first kth on
    from dissect.stats.quantile import _partition

    rows = relu_values((9, 40, 49), 1, dtype).reshape(9, -1)
    width = rows.shape[1]
    for kth in ([5, width // 2, width - 3], [width - 300, width - 299], width - 1):
        part = rows.copy()
        _partition(part, kth)
        expected = np.partition(rows.astype(np.float64), kth, axis=1)
        first = min(kth) if isinstance(kth, list) else kth
        np.testing.assert_array_equal(part[:, kth].astype(np.float64), expected[:, kth])
        np.testing.assert_array_equal(np.sort(part[:, first:].astype(np.float64), axis=1),
                                      np.sort(expected[:, first:], axis=1))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_quantile_of_relu_values_with_nan_of_either_sign_equals_numpy(dtype) -> None:
    values = relu_values((30, 4, 7, 7), 2, dtype)
    values[3, 1, 2, 2] = np.nan
    values[5, 2].view(np.uint16 if dtype == np.float16 else np.uint32)[1, 1] |= (
        0x8000 if dtype == np.float16 else 0x80000000)             # -0 and ...
    values[7, 2, 0, 0] = -np.array(np.nan, dtype)                  # a NaN with the sign bit
    assert np.signbit(values[7, 2, 0, 0])
    top = TopKQuantile(4, 0.01, 30 * 49)
    top.add(values[:11])
    top.add(values[11:])
    expected = [np.quantile(values[:, u].astype(np.float32), 0.99) for u in range(4)]
    np.testing.assert_array_equal(top.result(), np.asarray(expected, np.float64))
    assert np.isnan(top.result()[[1, 2]]).all()


def test_heavy_ties_finds_a_row_that_one_value_half_fills() -> None:
    from dissect.stats.quantile import _heavy_ties

    rng = np.random.default_rng(9)
    distinct = rng.permutation(4000).reshape(4, 1000).astype(np.int32)
    assert not _heavy_ties(distinct)
    for share in (0.5, 0.9):
        tied = distinct.copy()
        tied[2, rng.random(1000) < share] = 7                   # one row, one value
        assert _heavy_ties(tied)
    signed = np.where(rng.random((3, 500)) < 0.6, 0.0, rng.random((3, 500))).astype(np.float32)
    signed[signed == 0] = rng.choice(np.float32([0.0, -0.0]), size=int((signed == 0).sum()))
    assert _heavy_ties(signed)                        # +0 and -0 tie as the float partition sees
    assert not _heavy_ties(np.zeros((2, 1), np.int32))          # one column: nothing to tie
