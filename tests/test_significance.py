"""Significance of labels (DESIGN.md §12): exact counts, valid p-values, FDR, determinism."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from dissect.errors import CacheError, OptionError
from dissect.stats import count_iou, iou_from_counts
from dissect.stats.significance import (
    FisherCounts,
    benjamini_hochberg,
    block_permutations,
    bootstrap_interval,
    count_blocks,
    fisher_tables,
    fisher_tests,
    image_labels,
    image_masks,
    independence_iou,
    null_statistics,
    partition_blocks,
    permutation_p_values,
    poisson_weights,
    stratum_ids,
)


# ----------------------------------------------------------------------------- synthetic data
def random_chunk(seed: int, n: int = 12, units: int = 7, labels: int = 15, categories: int = 3):
    """Activations, label layers (some empty, padded, repeated image-level labels), primary."""
    rng = np.random.default_rng(seed)
    primary = rng.integers(-1, categories, labels)
    primary[0] = -1
    acts = rng.gamma(1.0, 1.0, (n, units, 4, 4)).astype(np.float32)
    seg = rng.integers(0, labels, (n, 3, 8, 8))
    seg[:, 2] = 0                              # a padding layer
    seg[3] = 0                                 # an image without pixel labels
    seg[5, 1] = 0
    seg[2, 0, :4] = 0
    level = rng.integers(0, labels, (n, 3))
    level[:, 1] = level[:, 0]                  # a label listed twice counts twice
    level[7] = 0
    thresholds = np.quantile(acts.transpose(1, 0, 2, 3).reshape(units, -1), 0.8, axis=1)
    return acts, seg, level, thresholds, primary, categories


def dense_null(null, n_perm: int, n_units: int, n_labels: int) -> np.ndarray:
    """int64 (U, L, B) permuted intersections."""
    flat = np.zeros((n_units * n_labels, n_perm), np.int64)
    null.add_to(flat)
    return flat.reshape(n_units, n_labels, n_perm)


@pytest.mark.parametrize("union", ["touched", "annotated", "all"])
def test_identity_and_every_permutation_equal_count_iou(union: str) -> None:
    acts, seg, level, thresholds, primary, n_cat = random_chunk(1)
    n, n_units = acts.shape[:2]
    masks = image_masks(acts, thresholds, (8, 8))
    labels = image_labels(seg, level, primary, n_cat)
    blocks = [np.arange(0, 5), np.arange(5, 12)]
    pairings = [block_permutations(3, k, 4, len(block)) for k, block in enumerate(blocks)]
    counts = count_blocks(masks, labels, blocks, pairings, primary, n_units, n_cat, union)
    tally = count_iou(acts, seg, level, thresholds, primary, n_cat, union=union)
    assert counts.observed.equals(tally)
    assert tally.intersection.sum() > 0 and tally.act_area.sum() > 0
    null = dense_null(counts.null, 4, n_units, len(primary))
    for b in range(4):                           # brute force: re-pair the arrays, recount
        partner = np.empty(n, np.int64)
        for block, pairing in zip(blocks, pairings):
            partner[block] = block[pairing[b]]
        total = count_iou(acts, seg[partner], level[partner], thresholds, primary, n_cat,
                          union=union)
        assert np.array_equal(null[:, :, b], total.intersection)
        assert np.array_equal(counts.null.act_area[:, :, b], total.act_area)
        assert np.array_equal(total.label_area, tally.label_area)
        # the null statistics are iou_from_counts' values, exactly
        iou = iou_from_counts(total, primary)
        labels = np.array([0, 1, 2, 3, 14, 5, 0])
        best, label_iou = null_statistics(tally.label_area, null, counts.null.act_area, primary,
                                          labels, units_per_step=3)
        assert np.array_equal(best[b], np.maximum(iou.max(axis=1), 0))
        assert np.array_equal(label_iou[b], iou[np.arange(n_units), labels])
        assert best[b].max() > 0


def test_blocks_and_permutations_depend_on_the_data_only() -> None:
    strata = stratum_ids(np.array([[1, 0], [0, 1], [1, 0], [1, 0], [0, 1], [1, 0], [1, 0]]))
    assert strata.tolist() == [0, 1, 0, 0, 1, 0, 0]
    blocks = partition_blocks(strata, 2)
    # stratum 0 = images 0 2 3 5 6: blocks (0 2), (3 5 6) (the remainder joins); stratum 1: (1 4)
    assert [b.tolist() for b in blocks] == [[0, 2], [1, 4], [3, 5, 6]]
    first = block_permutations(7, 3, 5, 4)
    assert np.array_equal(first, block_permutations(7, 3, 5, 4))
    assert not np.array_equal(first, block_permutations(8, 3, 5, 4))
    assert all(sorted(row) == [0, 1, 2, 3] for row in first.tolist())


def test_benjamini_hochberg_hand_case() -> None:
    p = np.array([0.01, 0.04, 0.03, 0.20, 0.5])
    # sorted 0.01 0.03 0.04 0.2 0.5 times m/k = 5, 2.5, 5/3, 5/4, 1: 0.05 0.075 0.0667 0.25 0.5
    # then running minimum from the top: 0.05 0.0667 0.0667 0.25 0.5
    expected = np.array([0.05, 0.2 / 3, 0.2 / 3, 0.25, 0.5])
    assert np.allclose(benjamini_hochberg(p), expected, rtol=0, atol=1e-15)
    assert np.allclose(benjamini_hochberg(np.array([0.9, 0.8])), [0.9, 0.9])
    assert np.isnan(benjamini_hochberg(np.array([np.nan, 0.1]))[0])


def test_permutation_p_values_count_ties() -> None:
    null = np.array([[0.1, 0.5], [0.2, 0.5], [0.3, 0.1]])
    assert permutation_p_values(np.array([0.2, 0.5]), null).tolist() == [3 / 4, 3 / 4]
    assert permutation_p_values(np.array([0.9, 0.6]), null).tolist() == [1 / 4, 1 / 4]


def test_fisher_and_odds_ratio_equal_scipy_on_hand_tables() -> None:
    # unit 0, label 1 (category 0): 6 images annotated in category 0, the unit fires in 4,
    # 3 carry label 1, 3 both -> [[3, 1], [0, 2]]
    counts = FisherCounts(both=np.array([[0, 3, 0], [0, 1, 2]]),
                          fires_annotated=np.array([[4, 9], [2, 5]]), has=np.array([0, 3, 4]),
                          annotated=np.array([6, 10]), mask_annotated=np.zeros((2, 2), np.int64),
                          mask_total=np.zeros(2, np.int64), n_images=12)
    tables = fisher_tables(counts, np.array([1, 2]), np.array([-1, 0, 1]))
    assert tables.tolist() == [[[3, 1], [0, 2]], [[2, 3], [2, 3]]]
    odds, p = fisher_tests(tables)
    for k, table in enumerate(tables):
        ref = scipy_stats.fisher_exact(table, alternative="greater")
        assert p[k] == ref[1]
    assert odds[0] == np.inf and odds[1] == pytest.approx(2 * 3 / (3 * 2))
    # hypergeometric tail by hand for table 0: P(X >= 3), X ~ H(6 images, 3 labelled, 4 fire)
    assert p[0] == pytest.approx(4 / 20)


def test_independence_iou_and_bootstrap_interval_by_hand() -> None:
    assert independence_iou(np.array([0.5, 0.0]), np.array([0.5, 0.3])).tolist() == \
        [0.25 / 0.75, 0.0]
    sums = np.array([[[1.0], [2.0], [0.0]], [[2.0], [2.0], [0.0]], [[3.0], [3.0], [0.0]]])
    low, high, iou = bootstrap_interval(sums, 0.5)
    assert iou[:, 0].tolist() == [1 / 4, 2 / 3, 0.0]
    assert low[0] == np.percentile([0.25, 2 / 3, 0], 25) and high[0] == \
        np.percentile([0.25, 2 / 3, 0], 75)
    weights = poisson_weights(5, np.array([3, 9]), 50)
    assert np.array_equal(weights[1], poisson_weights(5, np.array([9]), 50)[0])


# ----------------------------------------------------------------------------- validity
def null_units_data(seed: int, n: int, n_units: int, planted: int = 0):
    """Images with random blocky label maps; unit maps independent of the labels, except the
    first ``planted`` units, which fire on label 1 + u."""
    rng = np.random.default_rng(seed)
    n_labels, n_cat = 9, 2
    primary = np.array([-1, 0, 0, 0, 0, 1, 1, 1, 1])
    low = rng.integers(0, n_labels, (n, 1, 4, 4))
    seg = np.kron(low, np.ones((1, 1, 2, 2), np.int64))                  # (n, 1, 8, 8)
    level = np.zeros((n, 1), np.int64)
    acts = rng.gamma(2.0, 1.0, (n, n_units, 4, 4)).astype(np.float32)
    for u in range(planted):
        acts[:, u] += 6.0 * (low[:, 0] == 1 + u % (n_labels - 1))
    thresholds = np.quantile(acts.transpose(1, 0, 2, 3).reshape(n_units, -1), 0.9, axis=1)
    return acts, seg, level, thresholds, primary, n_cat


def block_test(data, n_perm: int, seed: int):
    acts, seg, level, thresholds, primary, n_cat = data
    n, n_units = acts.shape[:2]
    blocks = partition_blocks(np.zeros(n, np.int64), 8)
    pairings = [block_permutations(seed, k, n_perm, len(block)) for k, block in enumerate(blocks)]
    counts = count_blocks(image_masks(acts, thresholds, (8, 8)),
                          image_labels(seg, level, primary, n_cat), blocks, pairings, primary,
                          n_units, n_cat, "touched")
    observed = iou_from_counts(counts.observed, primary).max(axis=1)
    best, _ = null_statistics(counts.observed.label_area,
                              dense_null(counts.null, n_perm, n_units, len(primary)),
                              counts.null.act_area, primary, np.zeros(n_units, np.int64))
    return permutation_p_values(observed, best)


def test_p_values_of_independent_units_are_uniform_and_bh_finds_nothing() -> None:
    p = block_test(null_units_data(0, 96, 200), 99, seed=0)
    assert scipy_stats.kstest(p, "uniform").pvalue > 0.01
    assert p.min() < 0.1 and p.max() > 0.9          # spread over the whole range
    assert not (benjamini_hochberg(p) <= 0.05).any()


def test_bh_keeps_the_false_discovery_rate_below_alpha_with_planted_units() -> None:
    # FDR control is a bound on the expected proportion of false discoveries: measure it over
    # 16 independent datasets (40 planted units, 56 null units each), not on one draw.
    proportions = []
    for k in range(16):
        p = block_test(null_units_data(100 + k, 96, 200, planted=40), 99, seed=k)
        discovered = benjamini_hochberg(p) <= 0.05
        assert discovered[:40].all()                # every planted unit is found
        assert np.all(p[:40] == 1 / 100)            # and beats every permutation
        proportions.append(discovered[40:].sum() / discovered.sum())
    # BH bounds the FDR by alpha * m0 / m = 0.05 * 56 / 96 = 0.029
    assert np.mean(proportions) <= 0.05


# ----------------------------------------------------------------------------- the layer API
@pytest.fixture(scope="module")
def planted_run(toy_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    from dissect.data import IMAGENET_MEAN, IMAGENET_STD, BrodenDataset
    from dissect.record import cache_path, record_activations
    from dissect.tally import dissect_layer
    from dissect.toy import PLANTED_LAYER, planted_model

    run = tmp_path_factory.mktemp("planted")
    dataset = BrodenDataset(toy_dataset)
    record_activations(planted_model(), dataset, [PLANTED_LAYER], run, mean=IMAGENET_MEAN,
                       std=IMAGENET_STD, progress=False)
    cache = cache_path(run, PLANTED_LAYER)
    return cache, dataset, dissect_layer(cache, dataset, scheduler="synchronous")


def test_planted_units_get_the_smallest_p_and_the_tallys_counts(planted_run, tmp_path) -> None:
    from dissect.significance import load_significance, significance_is_current
    from dissect.toy import planted_labels

    cache, dataset, tally = planted_run
    result = significance_layer_(cache, dataset, tally.thresholds, permutations=19,
                                 out_dir=tmp_path)
    assert result.counts_equal(tally)
    assert [result.label_names[label] for label in result.unit_label] == \
        list(planted_labels().values())
    assert np.all(result.perm_p == 1 / 20) and np.all(result.q == 0.05)
    assert result.significant.all()
    assert (result.fisher_p < 1e-6).all() and (result.iou > 10 * result.iou0).all()
    assert (result.z > 3).all()
    with open(tmp_path / "significance.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["unit", "label", "category", "iou", "iou0", "fisher_or", "fisher_p",
                             "perm_p", "null_mean", "null_sd", "z", "q", "ci_low", "ci_high",
                             "significant"]
    assert rows[0]["unit"] == "0" and rows[0]["label"] == "red" and rows[0]["ci_low"] == ""
    assert float(rows[3]["perm_p"]) == 0.05 and rows[3]["significant"] == "yes"
    loaded = load_significance(tmp_path)
    assert np.array_equal(loaded.null, result.null) and loaded.options == result.options
    assert significance_is_current(tmp_path, result.options, result.fingerprint)
    assert not significance_is_current(tmp_path, {**result.options, "seed": 1},
                                       result.fingerprint)
    assert not significance_is_current(tmp_path, result.options, "another cache")
    (tmp_path / "significance.csv").unlink()
    assert not significance_is_current(tmp_path, result.options, result.fingerprint)
    with pytest.raises(CacheError, match="dissect significance"):
        load_significance(tmp_path / "nowhere")


def significance_layer_(*args, **kwargs):
    from dissect.significance import significance_layer

    kwargs.setdefault("scheduler", "synchronous")
    return significance_layer(*args, **kwargs)


def same(a, b) -> bool:
    return all(np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True)
               for name in ("null", "null_label_iou", "perm_p", "q", "iou0", "fisher_p",
                            "intersection", "act_area", "ci_low", "ci_high", "unit_label"))


def test_identical_for_every_scheduler_and_chunking_and_reproducible(planted_run) -> None:
    cache, dataset, tally = planted_run
    first = significance_layer_(cache, dataset, tally.thresholds, permutations=6, seed=3,
                                ci=True, chunk_size=8, union="annotated")
    for scheduler, chunk, workers in (("synchronous", 1, None), ("threads", 5, 2),
                                      ("processes", 20, 1)):
        again = significance_layer_(cache, dataset, tally.thresholds, permutations=6, seed=3,
                                    ci=True, chunk_size=chunk, scheduler=scheduler,
                                    union="annotated", num_workers=workers)
        assert same(first, again), (scheduler, chunk)
    other = significance_layer_(cache, dataset, tally.thresholds, permutations=6, seed=4,
                                ci=True, chunk_size=8, union="annotated")
    assert not np.array_equal(other.null, first.null)
    assert not np.array_equal(other.ci_low, first.ci_low)


def test_bootstrap_interval_equals_brute_force(planted_run) -> None:
    cache, dataset, tally = planted_run
    from dissect.record import CacheReader

    result = significance_layer_(cache, dataset, tally.thresholds, permutations=2, ci=True,
                                 seed=11, chunk_size=7)
    images = dataset.labeled_images()
    acts = CacheReader(cache).read_rows(images)
    seg, level = dataset.load_segmentations(images)
    per_image = [count_iou(acts[k:k + 1], seg[k:k + 1], level[k:k + 1], tally.thresholds,
                           dataset.vocab.primary, len(dataset.categories))
                 for k in range(len(images))]
    weights = poisson_weights(11, images, 1000).astype(np.float64)        # (n, R)
    units = np.arange(len(tally.thresholds))
    labels, cats = result.unit_label, dataset.vocab.primary[result.unit_label]
    inter = np.array([c.intersection[units, labels] for c in per_image])    # (n, U)
    act = np.array([c.act_area[units, cats] for c in per_image])
    area = np.array([c.label_area[labels] for c in per_image])
    i, a, la = weights.T @ inter, weights.T @ act, weights.T @ area
    iou = np.where(a + la - i > 0, i / np.where(a + la - i > 0, a + la - i, 1), 0.0)
    assert np.array_equal(result.ci_low, np.percentile(iou, 2.5, axis=0))
    assert np.array_equal(result.ci_high, np.percentile(iou, 97.5, axis=0))
    assert (result.ci_low <= result.iou + 1e-12).all() and (result.iou <= result.ci_high).all()


def test_held_out_labels_are_chosen_on_one_split_and_measured_on_the_other(planted_run) -> None:
    from dissect.parallel import compute_counts
    from dissect.record import CacheReader
    from dissect.stats import best_labels

    cache, dataset, tally = planted_run
    result = significance_layer_(cache, dataset, tally.thresholds, permutations=9,
                                 select_split="train", eval_split="val")
    primary, n_cat = dataset.vocab.primary, len(dataset.categories)
    labeled = dataset.labeled_images()
    reader = CacheReader(cache)
    train = np.intersect1d(labeled, dataset.subset("train"))
    val = np.intersect1d(labeled, dataset.subset("val"))
    chosen = compute_counts(reader, dataset, tally.thresholds, images=train,
                            scheduler="synchronous")
    _, _, labels, _ = best_labels(iou_from_counts(chosen, primary), primary, n_cat)
    measured = iou_from_counts(compute_counts(reader, dataset, tally.thresholds, images=val,
                                              scheduler="synchronous"), primary)
    assert np.array_equal(result.unit_label, labels)
    assert np.array_equal(result.iou, measured[np.arange(len(labels)), labels])
    assert result.statistic == "label" and np.array_equal(result.observed, result.iou)
    assert result.n_images == len(val)


def test_bad_options_name_the_option(planted_run) -> None:
    cache, dataset, tally = planted_run
    with pytest.raises(OptionError, match="--permutations"):
        significance_layer_(cache, dataset, tally.thresholds, permutations=0)
    with pytest.raises(OptionError, match="--select-split needs --eval-split"):
        significance_layer_(cache, dataset, tally.thresholds, select_split="train")
    with pytest.raises(OptionError, match="--alpha"):
        significance_layer_(cache, dataset, tally.thresholds, alpha=1.5)
    with pytest.raises(OptionError, match="--thresholds"):
        significance_layer_(cache, dataset, tally.thresholds[:3])


def test_accumulator_widens_to_int64_before_counts_could_overflow(planted_run, monkeypatch):
    import dissect.significance as significance

    cache, dataset, tally = planted_run
    narrow = significance_layer_(cache, dataset, tally.thresholds, permutations=5, chunk_size=8)
    monkeypatch.setattr(significance, "_INT32_LIMIT", 1000)        # widen after the first task
    monkeypatch.setattr(significance, "NULL_BUDGET_BYTES", 3 * 5 * 4 * len(dataset.vocab.names))
    wide = significance_layer_(cache, dataset, tally.thresholds, permutations=5, chunk_size=8)
    assert same(narrow, wide) and narrow.null.max() > 0             # 4 passes of 3 units each
