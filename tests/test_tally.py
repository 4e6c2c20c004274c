"""dissect.tally: the fast path against a plain reference loop, tally.csv, dissection.h5."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from dissect.data import BrodenDataset
from dissect.errors import CacheError, OptionError
from dissect.stats import count_iou, iou_from_counts, upsample_maps
from dissect.stats.iou import prefilter_applies
from dissect.tally import (
    DissectionResult,
    dissect_layer,
    load_dissection,
    summarize_detectors,
    tally_columns,
)


# ----------------------------------------------------------------------------- reference
def reference_counts(acts: np.ndarray, seg: np.ndarray, image_labels: np.ndarray,
                     thresholds: np.ndarray, primary: np.ndarray, n_categories: int,
                     union: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DESIGN.md §3 steps 2-3 written as plainly as possible: one image, one unit, one pixel
    at a time. Returns (label_area (L,), intersection (U, L), act_area (U, C))."""
    acts = np.asarray(acts, dtype=np.float32)
    n, n_units = acts.shape[:2]
    _, n_layers, sh, sw = seg.shape
    n_labels = len(primary)
    label_area = np.zeros(n_labels, dtype=np.int64)
    intersection = np.zeros((n_units, n_labels), dtype=np.int64)
    act_area = np.zeros((n_units, n_categories), dtype=np.int64)
    for i in range(n):
        level_labels = [int(l) for l in image_labels[i] if l != 0]
        present = set(level_labels)
        for layer in range(n_layers):
            for y in range(sh):
                for x in range(sw):
                    label = int(seg[i, layer, y, x])
                    if label != 0:
                        label_area[label] += 1
                        present.add(label)
        for label in level_labels:
            label_area[label] += sh * sw
        image_categories = {int(primary[l]) for l in present if primary[l] >= 0}
        for u in range(n_units):
            if not float(acts[i, u].max()) > float(thresholds[u]):
                continue
            up = upsample_maps(acts[i, u:u + 1], (sh, sw))[0]  # checked in test_stats.py
            mask_area = 0
            touched = set()
            for y in range(sh):
                for x in range(sw):
                    if float(up[y, x]) > float(thresholds[u]):
                        mask_area += 1
                        for layer in range(n_layers):
                            label = int(seg[i, layer, y, x])
                            if label != 0:
                                intersection[u, label] += 1
                                if primary[label] >= 0:
                                    touched.add(int(primary[label]))
            for label in level_labels:
                intersection[u, label] += mask_area
                if primary[label] >= 0:
                    touched.add(int(primary[label]))
            counted = {"touched": touched, "annotated": image_categories,
                       "all": set(range(n_categories))}[union]
            for c in counted:
                act_area[u, c] += mask_area
    return label_area, intersection, act_area


def reference_iou(label_area: np.ndarray, intersection: np.ndarray, act_area: np.ndarray,
                  primary: np.ndarray) -> np.ndarray:
    n_units, n_labels = intersection.shape
    iou = np.zeros((n_units, n_labels))
    for u in range(n_units):
        for label in range(1, n_labels):
            if primary[label] < 0:
                continue
            union = act_area[u, primary[label]] + label_area[label] - intersection[u, label]
            if union > 0:
                iou[u, label] = intersection[u, label] / union
    return iou


def assert_matches_reference(acts, seg, image_labels, thresholds, primary, n_categories,
                             union) -> None:
    fast = count_iou(acts, seg, image_labels, thresholds, primary, n_categories, union)
    label_area, intersection, act_area = reference_counts(acts, seg, image_labels, thresholds,
                                                          primary, n_categories, union)
    np.testing.assert_array_equal(fast.label_area, label_area)
    np.testing.assert_array_equal(fast.intersection, intersection)
    np.testing.assert_array_equal(fast.act_area, act_area)
    assert intersection.sum() > 0
    np.testing.assert_allclose(iou_from_counts(fast, primary),
                               reference_iou(label_area, intersection, act_area, primary),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("union", ["touched", "annotated", "all"])
@pytest.mark.parametrize("seed, sh, sw", [(0, 13, 10), (1, 13, 10), (2, 16, 12), (3, 12, 16),
                                          (4, 24, 32)])
def test_fast_path_equals_reference_random(union: str, seed: int, sh: int, sw: int) -> None:
    """13x10: non-integer upsampling factors, a pixel count with no factor 16; 16x12: one;
    12x16 and 24x32: factors 4 and 8 (a power of two), so ``count_iou`` takes the cell
    prefilter, with the maps of all six images in one batch."""
    rng = np.random.default_rng(seed)
    n, n_units, h, w = 6, 5, 3, 4
    # labels 1-4 color (0), 5-8 object (1), 9-10 scene (2, image-level), 11 no category;
    # label 8 also appears in the part-like layer 2, so a pixel can carry it twice.
    primary = np.array([-1, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, -1])
    seg = np.zeros((n, 3, sh, sw), dtype=np.int32)
    seg[:, 0] = rng.integers(0, 5, size=(n, sh, sw))
    seg[:, 1] = rng.integers(5, 9, size=(n, sh, sw)) * (rng.random((n, sh, sw)) < 0.5)
    seg[:, 2] = rng.choice([0, 8, 11], size=(n, sh, sw))
    seg[n - 1, 1:] = 0                                     # padded layers
    seg[1] = 0                                             # no pixel label at all
    image_labels = np.zeros((n, 2), dtype=np.int32)
    image_labels[:, 0] = rng.choice([0, 9, 10], size=n)
    image_labels[0] = [9, 10]
    image_labels[1] = [10, 0]
    acts = rng.normal(size=(n, n_units, h, w)).astype(np.float16).astype(np.float32)
    acts[:, 0] = np.round(acts[:, 0])                       # ties at the threshold
    thresholds = np.array([np.quantile(acts[:, u].ravel(), 0.8) for u in range(n_units)])
    assert prefilter_applies((h, w), (sh, sw)) == (sh % h == 0 and sw % w == 0)
    assert_matches_reference(acts, seg, image_labels, thresholds, primary, 3, union)


def test_many_labels_and_images_per_batch_equal_reference(monkeypatch) -> None:
    """More than 255 labels in one batch of images (the compact label numbers need more than a
    byte) and batches of a few images each, through the cell prefilter and the full path."""
    import dissect.stats.iou as iou_module

    rng = np.random.default_rng(9)
    n, n_units, h, w, sh, sw = 7, 4, 4, 4, 16, 16
    n_labels = 400
    primary = rng.integers(-1, 3, size=n_labels)
    primary[0] = -1
    seg = rng.integers(0, n_labels, size=(n, 2, sh, sw)).astype(np.int32)
    seg[2, 1] = 0
    image_labels = rng.integers(0, n_labels, size=(n, 2)).astype(np.int32)
    acts = rng.normal(size=(n, n_units, h, w)).astype(np.float32)
    thresholds = np.quantile(np.moveaxis(acts, 1, 0).reshape(n_units, -1), 0.7, axis=1)
    label_area, intersection, act_area = reference_counts(acts, seg, image_labels, thresholds,
                                                          primary, 3, "touched")
    assert intersection.sum() > 0
    assert prefilter_applies((h, w), (sh, sw))
    for group_maps in (1, 6, 1024):
        monkeypatch.setattr(iou_module, "_GROUP_MAPS", group_maps)
        for prefilter in (True, False):
            fast = count_iou(acts, seg, image_labels, thresholds, primary, 3, "touched",
                             prefilter=prefilter)
            np.testing.assert_array_equal(fast.label_area, label_area)
            np.testing.assert_array_equal(fast.intersection, intersection)
            np.testing.assert_array_equal(fast.act_area, act_area)


def test_segmentation_without_layers_counts_like_an_empty_layer() -> None:
    """seg (n, 0, sh, sw): only image-level labels; the same counts as one all-zero layer."""
    rng = np.random.default_rng(5)
    acts = rng.normal(size=(3, 4, 2, 3)).astype(np.float32)
    image_labels = np.array([[1], [2], [0]])
    primary, thresholds = np.array([-1, 0, 0]), np.full(4, 0.5)
    for union in ("touched", "annotated", "all"):
        empty = count_iou(acts, np.zeros((3, 0, 5, 6), np.int32), image_labels, thresholds,
                          primary, 1, union)
        zero = count_iou(acts, np.zeros((3, 1, 5, 6), np.int32), image_labels, thresholds,
                         primary, 1, union)
        assert empty.equals(zero) and empty.intersection.sum() > 0


@pytest.mark.parametrize("union", ["touched", "annotated", "all"])
def test_fast_path_equals_reference_toy(toy_dataset: Path, union: str) -> None:
    dataset = BrodenDataset(toy_dataset)
    seg, image_labels = dataset.load_segmentations(range(10))
    rng = np.random.default_rng(5)
    acts = rng.gamma(1.0, size=(10, 4, 4, 4)).astype(np.float16).astype(np.float32)
    thresholds = np.array([np.quantile(acts[:, u].ravel(), 0.9) for u in range(4)])
    assert_matches_reference(acts, seg, image_labels, thresholds, dataset.vocab.primary,
                             len(dataset.categories), union)


# ----------------------------------------------------------------------------- dissect_layer
def write_cache(path: Path, acts: np.ndarray, batch: int = 2) -> Path:
    """A complete activation cache in the DESIGN §4a layout, written directly with h5py."""
    acts16 = acts.astype(np.float16)
    n = len(acts16)
    with h5py.File(path, "w") as file:
        file.create_dataset("acts", data=acts16)
        file.create_dataset("amax", data=acts16.reshape(n, acts16.shape[1], -1).max(-1)
                            .astype(np.float32))
        file.create_dataset("done", data=np.ones(-(-n // batch), dtype=bool))
        file.attrs["fingerprint"] = json.dumps({"layer": "features.conv"})
        file.attrs["schema_version"] = 1
        file.attrs["n_written"] = n
        file.attrs["complete"] = True
    return path


def tiny_acts() -> np.ndarray:
    """(3, 2, 4, 4) maps at the segmentation size of broden_tiny (identity upsampling).

    Unit 0 fires on the top-left 2x2 block of every image; unit 1 on row 3 of image 1
    (unlabeled) and pixel (3, 3) of image 2 (dog in object, leg in part).
    """
    acts = np.zeros((3, 2, 4, 4), dtype=np.float32)
    acts[:, 0, :2, :2] = 1.0
    acts[1, 1, 3, :] = 1.0
    acts[2, 1, 3, 3] = 1.0
    return acts


@pytest.fixture
def tiny_result(broden_tiny, tmp_path: Path) -> tuple[DissectionResult, Path]:
    dataset = BrodenDataset(broden_tiny.root)
    (tmp_path / "cache").mkdir()
    cache = write_cache(tmp_path / "cache" / "features.conv.h5", tiny_acts())
    out = tmp_path / "features.conv"
    result = dissect_layer(cache, dataset, thresholds=np.array([0.5, 0.5]), out_dir=out,
                           scheduler="synchronous")
    return result, out


def test_tiny_dissection_values(tiny_result) -> None:
    result, _ = tiny_result
    assert result.layer == "features.conv"
    assert result.categories == ("color", "object", "part", "scene")
    # touched union, hand-computed (see tests/test_stats.py hand case)
    assert result.act_area.tolist() == [[8, 8, 4, 12], [0, 1, 1, 5]]
    names = [[result.label_names[l] for l in row] for row in result.cat_label]
    assert names == [["red", "dog", "leg", "kitchen"], ["-", "dog", "leg", "street"]]
    np.testing.assert_allclose(result.cat_iou, [[4 / 14, 2 / 12, 2 / 5, 8 / 36],
                                                [0.0, 1 / 6, 1 / 3, 4 / 17]], rtol=1e-15)
    assert result.unit_label.tolist() == [4, 4]
    assert result.unit_category.tolist() == ["part", "part"]
    assert result.quantile is None


def test_tally_csv_format(tiny_result) -> None:
    result, out = tiny_result
    with open(out / "tally.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    header = ["unit", "category", "label", "score"]
    for category in ["color", "object", "part", "scene"]:
        header += [f"{category}-{s}" for s in ["label", "truth", "activation", "intersect",
                                               "iou"]]
    assert rows[0] == header == tally_columns(result.categories)
    assert [row[0] for row in rows[1:]] == ["1", "2"]          # 1-based, by score
    first = dict(zip(header, rows[1]))
    assert first["category"] == "part" and first["label"] == "leg"
    assert first["score"] == repr(2 / 5)
    assert (first["color-label"], first["color-truth"], first["color-activation"],
            first["color-intersect"], first["color-iou"]) == ("red", "10", "8", "4",
                                                              repr(4 / 14))
    second = dict(zip(header, rows[2]))
    assert (second["color-label"], second["color-truth"], second["color-iou"]) == (
        "-", "0", "0.0")
    assert second["scene-label"] == "street" and second["scene-activation"] == "5"


def test_table_sort_puts_the_higher_unit_first_on_ties(tiny_result) -> None:
    result, _ = tiny_result
    result.unit_iou = np.array([0.3, 0.3])
    assert [row["unit"] for row in result.table()] == [2, 1]
    result.unit_iou = np.array([0.1, 0.3])
    assert [row["unit"] for row in result.table()] == [2, 1]


def test_dissection_h5_round_trip(tiny_result) -> None:
    result, out = tiny_result
    loaded = load_dissection(out)
    for name in ["thresholds", "label_area", "intersection", "act_area", "iou", "cat_label",
                 "cat_iou", "unit_label", "unit_iou", "primary"]:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(result, name))
        assert getattr(loaded, name).dtype == getattr(result, name).dtype
    assert loaded.unit_category.tolist() == result.unit_category.tolist()
    assert loaded.label_names == result.label_names
    assert (loaded.layer, loaded.categories, loaded.union, loaded.iou_threshold,
            loaded.quantile) == (result.layer, result.categories, "touched", 0.04, None)
    assert loaded.table() == result.table()
    with h5py.File(out / "dissection.h5") as file:
        assert file.attrs["threshold_source"] == "given"
    with pytest.raises(CacheError, match="dissect tally"):
        load_dissection(out.parent / "missing")


def test_quantile_thresholds_and_union_option(broden_tiny, tmp_path: Path) -> None:
    dataset = BrodenDataset(broden_tiny.root)
    acts = np.random.default_rng(0).normal(size=(3, 2, 2, 2)).astype(np.float32)
    cache = write_cache(tmp_path / "layer.h5", acts)
    result = dissect_layer(cache, dataset, quantile=0.25, union="all", chunk_size=1)
    expected = [np.quantile(acts.astype(np.float16).astype(np.float32)[:, u].ravel(), 0.75)
                for u in range(2)]
    assert result.thresholds.tolist() == expected
    assert result.union == "all" and result.quantile == 0.25
    assert (result.act_area == result.act_area[:, :1]).all()   # 'all': same for every category


def test_category_selection(broden_tiny, tmp_path: Path) -> None:
    dataset = BrodenDataset(broden_tiny.root, categories=["part", "color"])
    cache = write_cache(tmp_path / "layer.h5", tiny_acts())
    result = dissect_layer(cache, dataset, thresholds=np.array([0.5, 0.5]))
    assert result.categories == ("color", "part")
    assert result.act_area.shape == (2, 2) and result.cat_label.shape == (2, 2)
    # wheel (300) is in object and part: with object unselected its primary is part
    assert result.primary[300] == 1
    assert tally_columns(result.categories)[4:6] == ["color-label", "color-truth"]


def test_images_without_labels_in_the_selected_categories_take_no_part(broden_tiny,
                                                                       tmp_path: Path) -> None:
    # NetDissect-Lite keeps only images with data in its categories (index_has_any_data):
    # img1 has no object cell, so with object alone it is left out, thresholds included.
    dataset = BrodenDataset(broden_tiny.root, categories=["object"])
    assert dataset.labeled_images().tolist() == [0, 2]
    acts = np.random.default_rng(3).normal(size=(3, 2, 2, 2)).astype(np.float32)
    acts[1] += 10.0                      # img1 would dominate every threshold
    cache = write_cache(tmp_path / "layer.h5", acts)
    result = dissect_layer(cache, dataset, quantile=0.25, union="all", chunk_size=1)
    kept = acts.astype(np.float16).astype(np.float32)[[0, 2]]
    assert result.thresholds.tolist() == [np.quantile(kept[:, u].ravel(), 0.75)
                                          for u in range(2)]
    seg, labels = dataset.load_segmentations([0, 2])
    expected = count_iou(kept, seg, labels, result.thresholds, dataset.vocab.primary, 1, "all")
    np.testing.assert_array_equal(result.act_area, expected.act_area)
    np.testing.assert_array_equal(result.intersection, expected.intersection)
    # every category selected: every image has a label, all rows are used
    assert BrodenDataset(broden_tiny.root).labeled_images().tolist() == [0, 1, 2]


def test_no_labeled_image_is_a_dataset_error(broden_tiny, tmp_path: Path) -> None:
    from dissect.errors import DatasetError

    index = broden_tiny.root / "index.csv"
    index.write_text(index.read_text().replace("seg/a0_object.png", "")
                     .replace("seg/a2_object.png", ""))
    dataset = BrodenDataset(broden_tiny.root, categories=["object"])
    cache = write_cache(tmp_path / "layer.h5", tiny_acts())
    with pytest.raises(DatasetError, match=r"no image .* has a label in the selected "
                                           r"categories \(object\)"):
        dissect_layer(cache, dataset)


def test_errors_name_the_option_or_file(broden_tiny, tmp_path: Path) -> None:
    dataset = BrodenDataset(broden_tiny.root)
    cache = write_cache(tmp_path / "layer.h5", tiny_acts())
    with pytest.raises(OptionError, match=r"--thresholds.*\(2,\)"):
        dissect_layer(cache, dataset, thresholds=np.zeros(3))
    np.save(tmp_path / "t.npy", np.zeros((2, 1)))
    with pytest.raises(OptionError, match=r"--thresholds .*t.npy.*\(2,\)"):
        dissect_layer(cache, dataset, thresholds=tmp_path / "t.npy")
    (tmp_path / "bad.npy").write_text("not numpy")
    with pytest.raises(OptionError, match="--thresholds .*bad.npy"):
        dissect_layer(cache, dataset, thresholds=str(tmp_path / "bad.npy"))
    np.save(tmp_path / "good.npy", np.array([0.5, 0.5]))
    assert dissect_layer(cache, dataset, thresholds=tmp_path / "good.npy",
                         scheduler="synchronous").thresholds.tolist() == [0.5, 0.5]
    with pytest.raises(OptionError, match="--union.*touched, annotated, all"):
        dissect_layer(cache, dataset, union="some")
    with pytest.raises(OptionError, match="--quantile"):
        dissect_layer(cache, dataset, quantile=1.5)
    with pytest.raises(OptionError, match="--iou-threshold"):
        dissect_layer(cache, dataset, iou_threshold=-1)
    with pytest.raises(OptionError, match="--scheduler"):
        dissect_layer(cache, dataset, scheduler="dask")
    short = write_cache(tmp_path / "short.h5", tiny_acts()[:2])
    with pytest.raises(CacheError, match=r"short.h5 holds 2 images.*broden_tiny has 3"):
        dissect_layer(short, dataset)
    with pytest.raises(CacheError, match="does not exist"):
        dissect_layer(tmp_path / "none.h5", dataset)


def test_summarize_detectors(tiny_result) -> None:
    result, _ = tiny_result
    summary = summarize_detectors(result)
    assert [s.category for s in summary] == ["color", "object", "part", "scene"]
    part = summary[2]
    assert (part.n_units, part.n_concepts, part.concepts) == (2, 1, (("leg", (0, 1)),))
    assert summary[0].n_units == 0 and summary[0].concepts == ()
    strict = result.detectors(iou_threshold=0.35)
    assert strict[2].concepts == (("leg", (0,)),)


# ----------------------------------------------------------------------------- planted model
def test_planted_units_get_their_labels(toy_dataset: Path, tmp_path: Path) -> None:
    from dissect.data import IMAGENET_MEAN, IMAGENET_STD
    from dissect.record import cache_path, record_activations
    from dissect.toy import PLANTED_LAYER, planted_labels, planted_model

    dataset = BrodenDataset(toy_dataset)
    record_activations(planted_model(), dataset, [PLANTED_LAYER], tmp_path, mean=IMAGENET_MEAN,
                       std=IMAGENET_STD, progress=False)
    result = dissect_layer(cache_path(tmp_path, PLANTED_LAYER), dataset,
                           out_dir=tmp_path / PLANTED_LAYER)
    got = {unit: result.label_names[int(result.unit_label[unit])]
           for unit in planted_labels()}
    assert got == planted_labels()
    assert all(result.unit_iou[unit] >= result.iou_threshold for unit in planted_labels())


def test_activation_column_of_an_empty_category_is_netdissect_lites() -> None:
    from dissect.stats import IoUCounts
    from dissect.tally import DissectionResult

    counts = IoUCounts(np.array([0, 10, 20]), np.array([[0, 0, 4]]), np.array([[7, 5]]))
    result = DissectionResult.from_counts("x", ["color", "scene"], np.zeros(1), counts,
                                          ["-", "red", "street"], np.array([-1, 0, 1]))
    (row,) = result.table()
    # color has no positive IoU: its label is 0, whose primary category in NetDissect-Lite is
    # the last one, so the activation column shows scene's act_area (5), not color's (7)
    assert (row["color-label"], row["color-activation"], row["color-iou"]) == ("-", 5, 0.0)
    assert (row["scene-label"], row["scene-activation"], row["scene-intersect"]) == (
        "street", 5, 4)
    assert row["score"] == 4 / 21


def test_labels_label_csv_does_not_list_are_named_empty_as_in_netdissect_lite(
        toy_dataset: Path, tmp_path: Path) -> None:
    """The toy label.csv has no row 0: NetDissect-Lite's build_dense_label_array names such
    numbers '', so a unit with no positive IoU has label '' in tally.csv."""
    from dissect.stats import IoUCounts
    from dissect.tally import DissectionResult

    vocab = BrodenDataset(toy_dataset).vocab
    assert vocab.names[0] == "" and all(vocab.names[1:])
    n_labels, n_cat = vocab.num_labels, len(vocab.categories)
    counts = IoUCounts(np.ones(n_labels, np.int64), np.zeros((1, n_labels), np.int64),
                       np.ones((1, n_cat), np.int64))
    result = DissectionResult.from_counts("x", list(vocab.categories), np.zeros(1), counts,
                                          vocab.names, vocab.primary)
    with (result.save(tmp_path) / "tally.csv").open(newline="") as handle:
        (row,) = csv.DictReader(handle)
    assert row["label"] == "" and row["score"] == "0.0"
    assert all(row[f"{c}-label"] == "" for c in vocab.categories)
