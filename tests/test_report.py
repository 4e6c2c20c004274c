"""Tests of dissect.report: the data model, image strips, templates, escaping and determinism.

Pure pieces are checked on hand-made arrays; the whole report on a small synthetic run made by the
real producers (toy dataset, record_activations, dissect_layer) plus a hand-written ablation.csv.
"""

from __future__ import annotations

import csv
import json
import shutil
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from dissect.errors import CacheError, OptionError
from dissect.report import build_report_data, render_report
from dissect.report import data as rdata
from dissect.report import images as rimages
from dissect.report import render as rrender

LAYER = "features.conv"
N_UNITS = 6


# ----------------------------------------------------------------------------- synthetic run


class TinyNet(torch.nn.Module):
    """One strided conv (3 -> 6 units, 64x64 images -> 16x16 maps) with fixed seeded weights."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.features = torch.nn.Sequential()
        self.features.add_module("conv", torch.nn.Conv2d(3, N_UNITS, 5, stride=4, padding=2))
        with torch.no_grad():
            weight = torch.randn(N_UNITS, 3, 5, 5, generator=generator)
            self.features.conv.weight.copy_(weight)
            self.features.conv.bias.zero_()
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)))


def write_ablation_csv(path: Path, rows: list[list[object]]) -> None:
    """Write an ablation.csv (DESIGN §6): rows of study, set, units, class, n and the 5 metrics."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(rdata.ABLATION_COLUMNS)
        writer.writerows(rows)


#: ablation.csv of the synthetic run, classes a, b, c. By recall: unit 1 hurts b (0.25) then a
#: (0.1); unit 3 hurts a and b by 0.1 each, b first (its true-class probability drops more); unit 4
#: hurts c. By accuracy: unit 1 hurts a, unit 4 hurts c. The topn rows (and their baseline) and
#: the two-unit set are not single-unit ablations and must be ignored.
ABLATION_ROWS = [
    ["single", "baseline", "", "a", 5, 0.9, 0.8, 0.8, 0.8, 0.7],
    ["single", "baseline", "", "b", 4, 0.8, 0.5, 0.5, 0.5, 0.4],
    ["single", "baseline", "", "c", 3, 0.95, 1.0, 1.0, 1.0, 0.9],
    ["single", "unit1", "1", "a", 5, 0.85, 0.7, 0.8, 0.7, 0.6],
    ["single", "unit1", "1", "b", 4, 0.8, 0.5, 0.5, 0.25, 0.3],
    ["single", "unit1", "1", "c", 3, 0.95, 1.0, 1.0, 1.0, 0.9],
    ["single", "unit3", "3", "a", 5, 0.9, 0.8, 0.8, 0.7, 0.69],
    ["single", "unit3", "3", "b", 4, 0.8, 0.5, 0.5, 0.4, 0.2],
    ["single", "unit3", "3", "c", 3, 0.95, 1.0, 1.0, 1.0, 0.9],
    ["single", "unit4", "4", "a", 5, 0.9, 0.8, 0.8, 0.9, 0.7],
    ["single", "unit4", "4", "b", 4, 0.8, 0.5, 0.5, 0.5, 0.4],
    ["single", "unit4", "4", "c", 3, 0.9, 1.0, 1.0, 0.0, 0.1],
    ["single", "pair", "0;2", "a", 5, 0.0, 0.0, 0.0, 0.0, 0.0],
    # top-N study (baseline a 0.8, b 0.5 by recall): a:top1 removes unit 1, a:top2 units 1 and 3
    ["topn", "baseline", "", "a", 5, 0.9, 0.8, 0.8, 0.8, 0.7],
    ["topn", "baseline", "", "b", 4, 0.8, 0.5, 0.5, 0.5, 0.4],
    ["topn", "a:top1", "1", "a", 5, 0.8, 0.6, 0.6, 0.6, 0.5],
    ["topn", "a:top1", "1", "b", 4, 0.8, 0.0, 0.0, 0.0, 0.0],     # another class: not a:top1's
    ["keep", "a:keep1", "0;2;3;4;5", "a", 5, 0.5, 0.3, 0.3, 0.3, 0.3],
    ["topn", "a:top2", "1;3", "a", 5, 0.7, 0.4, 0.4, 0.4, 0.4],
    ["keep", "a:keep2", "0;2;4;5", "a", 5, 0.5, 0.2, 0.2, 0.2, 0.2],
    ["topn", "b:top1", "1", "b", 4, 0.7, 0.25, 0.25, 0.25, 0.2],
    ["keep", "b:keep1", "0;2;3;4;5", "b", 4, 0.6, 0.1, 0.1, 0.1, 0.1],
    ["topn", "b:top2", "1;3", "b", 4, 0.6, 0.1, 0.1, 0.1, 0.1],
    ["keep", "b:keep2", "0;2;4;5", "b", 4, 0.6, 0.2, 0.2, 0.2, 0.2],
    # random sets: two of size 1, two of size 2
    ["random", "baseline", "", "a", 5, 0.9, 0.8, 0.8, 0.8, 0.7],
    ["random", "baseline", "", "b", 4, 0.8, 0.5, 0.5, 0.5, 0.4],
    ["random", "baseline", "", "c", 3, 0.95, 1.0, 1.0, 1.0, 0.9],
    ["random", "random1#0", "0", "a", 5, 0.9, 0.8, 0.8, 0.8, 0.7],
    ["random", "random1#0", "0", "b", 4, 0.8, 0.5, 0.5, 0.5, 0.4],
    ["random", "random1#0", "0", "c", 3, 0.9, 0.5, 0.5, 0.5, 0.5],
    ["random", "random1#1", "5", "a", 5, 0.9, 0.7, 0.7, 0.7, 0.7],
    ["random", "random1#1", "5", "b", 4, 0.8, 0.4, 0.4, 0.4, 0.4],
    ["random", "random2#0", "0;5", "a", 5, 0.9, 0.6, 0.6, 0.6, 0.6],
    ["random", "random2#0", "0;5", "b", 4, 0.8, 0.5, 0.5, 0.5, 0.4],
    ["random", "random2#1", "2;4", "a", 5, 0.9, 0.8, 0.8, 0.8, 0.7],
    ["random", "random2#1", "2;4", "b", 4, 0.8, 0.3, 0.3, 0.3, 0.3],
    # concept "dog" = units 1 and 3: a 0.8 -> 0.5, b unchanged, c 1.0 -> 0.9
    ["concept", "baseline", "", "a", 5, 0.9, 0.8, 0.8, 0.8, 0.7],
    ["concept", "baseline", "", "b", 4, 0.8, 0.5, 0.5, 0.5, 0.4],
    ["concept", "baseline", "", "c", 3, 0.95, 1.0, 1.0, 1.0, 0.9],
    ["concept", "dog", "1;3", "a", 5, 0.8, 0.5, 0.5, 0.5, 0.5],
    ["concept", "dog", "1;3", "b", 4, 0.8, 0.5, 0.5, 0.5, 0.4],
    ["concept", "dog", "1;3", "c", 3, 0.9, 0.9, 0.9, 0.9, 0.8],
]


def build_synthetic_run(root: Path, dataset_dir: Path, *, quantile: float = 0.05,
                        iou_threshold: float = 0.1) -> Path:
    """A run directory made by the real producers: run.json, cache/<LAYER>.h5 (record_activations
    of :class:`TinyNet` on ``dataset_dir``), <LAYER>/dissection.h5 (dissect_layer) and a
    hand-written <LAYER>/ablation.csv. A second layer in run.json is left undissected."""
    from dissect.data import IMAGENET_MEAN, IMAGENET_STD, BrodenDataset
    from dissect.record import record_activations
    from dissect.run import RunConfig, write_run_json
    from dissect.tally import dissect_layer

    run_dir = root / "run"
    dataset = BrodenDataset(dataset_dir)
    config = RunConfig(model="tests:TinyNet", layers=(LAYER, "head"), dataset=str(dataset_dir),
                       out=str(run_dir), quantile=quantile, iou_threshold=iou_threshold)
    write_run_json(config)
    caches = record_activations(TinyNet().eval(), dataset, [LAYER], run_dir, mean=IMAGENET_MEAN,
                                std=IMAGENET_STD, batch_size=16, progress=False, num_workers=0)
    dissect_layer(caches[LAYER], dataset, layer=LAYER, quantile=quantile,
                  iou_threshold=iou_threshold, scheduler="synchronous", out_dir=run_dir / LAYER)
    write_ablation_csv(run_dir / LAYER / "ablation.csv", ABLATION_ROWS)
    write_later_results(run_dir)
    (run_dir / LAYER / "ablation.json").write_text(json.dumps(
        {"topn": {"rank_split": "train", "eval_split": "val", "rule": "zero", "rank_by": "recall"},
         "random": {"seed": 0, "repeats": 2, "warning": "accuracy at <chance>"}}))
    return run_dir


#: importance.csv of the synthetic run: unit 1 is among the top units of a and b, unit 4 of c.
IMPORTANCE_TEXT = """unit,n_classes,classes,label,category,iou
1,2,a;b,x,object,0.2
4,1,c,y,object,0.1
0,0,,z,object,0.3
"""
#: compositional.csv: unit 0 gains 0.1 with its formula, unit 2 nothing (mean gain 0.05).
COMPOSITIONAL_TEXT = """unit,formula,formula_ids,leaves,iou,label,label_iou,categories,optimal
0,(x OR y) AND NOT <b>z</b>,"[1, 2, 3]",3,0.3,x,0.2,object,yes
2,x,[1],1,0.15,x,0.15,object,unknown
"""
#: significance.csv: unit 0 significant, unit 1 not, unit 2 not computed (empty cell).
SIGNIFICANCE_TEXT = """unit,label,category,iou,iou0,fisher_or,fisher_p,perm_p,null_mean,null_sd,z,q,ci_low,ci_high,significant
0,x,object,0.3,0.01,5.0,0.001,0.0099,0.02,0.01,28.0,0.03,,,yes
1,y,object,0.05,0.04,1.1,0.4,0.5,0.05,0.01,0.0,0.6,,,no
2,z,object,0.02,0.02,1.0,0.5,0.7,0.02,0.01,0.0,0.8,,,
"""
#: significance.h5 arrays: observed (U,) and a null of B = 4 permutations (B, U).
NULL_OBSERVED = np.array([0.3, 0.05, 0.02, 0.0, 0.1, 0.1])
NULL_VALUES = np.array([[0.01, 0.05, 0.02, 0.0, 0.2, 0.0],
                        [0.02, 0.06, 0.01, 0.0, 0.1, 0.0],
                        [0.03, 0.04, 0.03, 0.0, 0.0, 0.0],
                        [0.3, 0.05, 0.00, 0.0, 0.05, 0.0]])


def write_later_results(run_dir: Path) -> None:
    """Hand-made importance.csv, compositional.csv, significance.csv/.h5 and an explanation set
    (explain/demo.json with three PNG maps) in the synthetic run."""
    layer_dir = run_dir / LAYER
    (layer_dir / "importance.csv").write_text(IMPORTANCE_TEXT)
    (layer_dir / "compositional.csv").write_text(COMPOSITIONAL_TEXT)
    (layer_dir / "significance.csv").write_text(SIGNIFICANCE_TEXT)
    with h5py.File(layer_dir / "significance.h5", "w") as f:
        f["observed"] = NULL_OBSERVED
        f["null"] = NULL_VALUES
    explain = run_dir / "explain" / "demo"
    explain.mkdir(parents=True)
    for i, name in enumerate(["image.png", "gradcam.png", "dog.png", "saliency.png"]):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(explain / name)
    entry = {"image": "img<1>.jpg", "target": 2, "target_name": "kitchen", "logit": 3.5,
             "bias": 0.5, "residual": 0.0, "method": "grad_x_act", "layer": LAYER,
             "units": [{"unit": 3, "contribution": 2.0, "label": "dog", "iou": 0.2}],
             "concepts": [{"label": "dog", "category": "object", "contribution": 2.0,
                           "share": 0.8, "units": [3]},
                          {"label": "sky", "category": "object", "contribution": 0.5,
                           "share": 0.2, "units": [1]}],
             "unlabeled": {"contribution": 0.5, "units": [0, 2]},
             "maps": [{"kind": "image", "title": "image", "path": "demo/image.png"},
                      {"kind": "gradcam", "title": "Grad-CAM", "path": "demo/gradcam.png"},
                      {"kind": "concept", "title": "dog", "path": "demo/dog.png"},
                      {"kind": "saliency", "title": "saliency", "path": "demo/saliency.png"}]}
    (run_dir / "explain" / "demo.json").write_text(json.dumps([entry]))


_SHARED_RUNS: dict[Path, Path] = {}


def shared_synthetic_run(toy_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic run of ``toy_dataset``, built once per session (tests must not modify it)."""
    if toy_dataset not in _SHARED_RUNS:
        _SHARED_RUNS[toy_dataset] = build_synthetic_run(tmp_path_factory.mktemp("report_run"),
                                                        toy_dataset)
    return _SHARED_RUNS[toy_dataset]


@pytest.fixture(scope="module")
def synthetic_run(toy_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_synthetic_run(toy_dataset, tmp_path_factory)


@pytest.fixture(scope="module")
def rendered(synthetic_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """index.html of the synthetic run's report, rendered once for this module."""
    return render_report(synthetic_run, tmp_path_factory.mktemp("report_out") / "report")


# ----------------------------------------------------------------------------- top images


def test_sortable_keys_order_values_then_lower_row() -> None:
    values = np.array([[-1.5], [0.0], [-0.0], [2.0], [2.0], [-np.inf], [np.inf]], dtype=np.float32)
    rows = np.arange(7, dtype=np.int64) + 10
    keys = rdata.sortable_keys(values, rows)[:, 0]
    order = np.argsort(keys)[::-1]
    # descending value; among equal values 2.0 (rows 13, 14) and 0.0/-0.0 (11, 12) lower row first
    assert rows[order].tolist() == [16, 13, 14, 11, 12, 10, 15]
    back_rows, back_values = rdata.decode_keys(keys)
    assert back_rows.tolist() == rows.tolist()
    assert back_values.tolist() == [-1.5, 0.0, 0.0, 2.0, 2.0, -np.inf, np.inf]


@pytest.mark.parametrize("n_images,chunk_rows,k", [(40, 1, 10), (40, 7, 10), (40, 40, 10),
                                                    (6, 4, 10), (25, 3, 1)])
def test_top_images_equal_stable_argsort(n_images: int, chunk_rows: int, k: int) -> None:
    rng = np.random.default_rng(n_images + chunk_rows)
    amax = (rng.integers(-4, 5, (n_images, 5)) * 0.25).astype(np.float32)  # many ties
    reads: list[tuple[int, int]] = []

    def read(start: int, stop: int) -> np.ndarray:
        reads.append((start, stop))
        return amax[start:stop]

    indices, values = rdata.top_images(read, n_images, k, chunk_rows)
    expected = np.argsort(-amax, axis=0, kind="stable")[:k].T
    assert indices.dtype == np.int64 and indices.shape == (5, min(k, n_images))
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(values, np.take_along_axis(amax.T, expected, axis=1))
    assert all(stop - start <= chunk_rows for start, stop in reads)
    assert sum(stop - start for start, stop in reads) == n_images


def test_top_images_rejects_empty_cache() -> None:
    with pytest.raises(CacheError, match="no images"):
        rdata.top_images(lambda s, e: np.zeros((0, 2), np.float32), 0, 10, 4)


# ----------------------------------------------------------------------------- summaries


def test_detector_counts_and_concept_bars_by_hand() -> None:
    unit_label = np.array([3, 3, 5, 7, 7, 3, 5])
    unit_category = ["object", "object", "part", "scene", "scene", "object", "part"]
    unit_iou = np.array([0.05, 0.04, 0.2, 0.039, 0.1, 0.3, 0.0])
    detectors = rdata.detector_mask(unit_iou, unit_label, 0.04)
    assert detectors.tolist() == [True, True, True, False, True, True, False]
    no_label = rdata.detector_mask(np.array([0.0, 0.0]), np.array([0, 2]), 0.0)
    assert no_label.tolist() == [False, True]
    counts = rdata.detector_counts(unit_label, unit_category, detectors,
                                   ["color", "object", "part", "scene"])
    assert counts == [{"category": "color", "units": 0, "concepts": 0},
                      {"category": "object", "units": 3, "concepts": 1},
                      {"category": "part", "units": 1, "concepts": 1},
                      {"category": "scene", "units": 1, "concepts": 1}]
    names = ["-", "a", "b", "dog", "d", "leg", "f", "kitchen"]
    bars = rdata.concept_bars(unit_label, unit_category, detectors, names,
                              ["scene", "object", "part"])
    assert bars == [{"label": "kitchen", "number": 7, "category": "scene", "units": 1},
                    {"label": "dog", "number": 3, "category": "object", "units": 3},
                    {"label": "leg", "number": 5, "category": "part", "units": 1}]


def test_concept_bars_sort_by_units_then_number() -> None:
    unit_label = np.array([2, 1, 3, 3, 2, 3])
    detectors = np.ones(6, dtype=bool)
    names = ["-", "zeta", "beta", "alpha"]
    bars = rdata.concept_bars(unit_label, ["o"] * 6, detectors, names, ["o"])
    assert [(b["label"], b["units"]) for b in bars] == [("alpha", 3), ("beta", 2), ("zeta", 1)]
    unit_label = np.array([3, 1, 2])
    bars = rdata.concept_bars(unit_label, ["o"] * 3, np.ones(3, bool), ["-", "z", "b", "a"], ["o"])
    assert [b["label"] for b in bars] == ["z", "b", "a"]


def test_iou_histogram_bins() -> None:
    hist = rdata.iou_histogram(np.array([0.0, 0.005, 0.01, 0.03, 0.099, 0.1, 0.125]))
    assert hist["edges"] == [round(0.01 * i, 6) for i in range(14)]
    assert hist["counts"] == [2, 1, 0, 1, 0, 0, 0, 0, 0, 1, 1, 0, 1]
    assert rdata.iou_histogram(np.zeros(3))["counts"] == [3] + [0] * 9


def test_next_best_labels_by_hand() -> None:
    iou = np.array([[0.0, 0.1, 0.2, 0.05, 0.2, 0.3],
                    [0.0, 0.0, 0.0, 0.0, 0.0, 0.3]])
    allowed = np.array([False, True, True, True, True, False])  # label 5: unselected category
    labels, values = rdata.next_best_labels(iou, np.array([1, 5]), allowed)
    assert labels.tolist() == [[2, 4, 3], [-1, -1, -1]]   # tie 0.2: lower number first
    np.testing.assert_array_equal(values, [[0.2, 0.2, 0.05], [0.0, 0.0, 0.0]])


def test_label_categories_and_safe_file_name() -> None:
    assert rdata.label_categories(np.array([-1, 0, 1, 1]), ["object", "scene"]) == \
        ["", "object", "scene", "scene"]
    assert rdata.safe_file_name("layer4.1.conv2") == "layer4.1.conv2"
    assert rdata.safe_file_name("a/b c<d>") == "a_b_c_d_"
    assert rdata.safe_file_name("..") == "layer_"
    assert rdata.safe_file_name("index") == "layer_index"


# ----------------------------------------------------------------------------- ablation


def test_ablation_effects_rank_drops(tmp_path: Path) -> None:
    path = tmp_path / "ablation.csv"
    write_ablation_csv(path, ABLATION_ROWS)
    rows = rdata.read_ablation_csv(path)
    effects = rdata.ablation_effects(rows, N_UNITS, path=path)      # recall
    assert effects[0] == [] and effects[2] == [] and effects[5] == []
    assert effects[1] == [
        {"class": "b", "n": 4, "baseline": 0.5, "ablated": 0.25, "drop": 0.25},
        {"class": "a", "n": 5, "baseline": 0.8, "ablated": 0.7, "drop": 0.1},
    ]
    assert [(e["class"], e["drop"]) for e in effects[3]] == [("b", 0.1), ("a", 0.1)]
    assert effects[4] == [{"class": "c", "n": 3, "baseline": 1.0, "ablated": 0.0, "drop": 1.0}]
    by_accuracy = rdata.ablation_effects(rows, N_UNITS, "accuracy")
    assert [[e["class"] for e in unit] for unit in by_accuracy] == [[], ["a"], [], [], ["c"], []]
    assert [len(u) for u in rdata.ablation_effects(rows, N_UNITS, n=1)] == [0, 1, 0, 1, 1, 0]
    with pytest.raises(OptionError, match="f1"):
        rdata.ablation_effects([], 2, "f1")


def test_ablation_csv_errors_name_file_and_row(tmp_path: Path) -> None:
    path = tmp_path / "ablation.csv"
    path.write_text("study,set,units,class\nsingle,baseline,,a\n")
    with pytest.raises(CacheError, match=r"ablation\.csv: missing column\(s\) n, accuracy"):
        rdata.read_ablation_csv(path)
    write_ablation_csv(path, [["single", "baseline", "", "a", 1, 0, 0, 0, "x", 0]])
    with pytest.raises(CacheError, match=r"row 2: column 'recall' holds 'x'"):
        rdata.ablation_effects(rdata.read_ablation_csv(path), 3, path=path)
    write_ablation_csv(path, [["single", "u9", "9", "a", 1, 0, 0, 0, 0, 0]])
    with pytest.raises(CacheError, match="unit 9 is out of range; the layer has 3 units"):
        rdata.ablation_effects(rdata.read_ablation_csv(path), 3, path=path)


# ----------------------------------------------------------------------------- images


def test_resize_mask_and_outline_by_hand() -> None:
    mask = np.array([[1, 0], [0, 1]], dtype=bool)
    big = rimages.resize_mask(mask, (4, 4))
    assert big.astype(int).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    small = np.zeros((4, 4), dtype=bool)
    small[0, 0] = small[1, 3] = True       # (2, 2) samples rows 1, 3 and columns 1, 3
    assert rimages.resize_mask(small, (2, 2)).astype(int).tolist() == [[0, 1], [0, 0]]
    square = np.zeros((5, 5), dtype=bool)
    square[1:4, 1:4] = True
    outline = rimages.mask_outline(square)
    expected = square.copy()
    expected[2, 2] = False
    np.testing.assert_array_equal(outline, expected)
    full = np.ones((3, 3), dtype=bool)
    assert rimages.mask_outline(full).sum() == 8  # border pixels count as boundary


def test_draw_mask_dims_outside_and_outlines() -> None:
    thumb = np.full((5, 5, 3), 200, dtype=np.uint8)
    mask = np.zeros((5, 5), dtype=bool)
    mask[1:4, 1:4] = True
    out = rimages.draw_mask(thumb, mask)
    assert out[0, 0].tolist() == [70, 70, 70]               # 200 * 0.35
    assert out[2, 2].tolist() == [200, 200, 200]            # inside, not boundary
    assert out[1, 1].tolist() == list(rimages.OUTLINE_COLOR)
    assert thumb[0, 0].tolist() == [200, 200, 200]          # input unchanged


def test_threshold_masks_upsample_and_compare_like_the_dissection() -> None:
    maps = np.array([[[0.0, 1.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]], dtype=np.float32)
    masks = rimages.threshold_masks(maps, np.array([0.5, 1.0 - 1e-12]), (2, 4), batch=1)
    # bilinear (half-pixel centres, clamped edges) of [0, 1] to width 4: 0, 0.25, 0.75, 1
    assert masks[0].astype(int).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert masks[1].all()      # 1.0 > 1 - 1e-12 although float32(1 - 1e-12) == 1.0


def test_compose_strip_and_jpeg_are_deterministic() -> None:
    a = np.full((4, 3, 3), 10, dtype=np.uint8)
    b = np.full((4, 3, 3), 20, dtype=np.uint8)
    strip = rimages.compose_strip([a, b], 3, (4, 3))
    assert strip.shape == (4, 3 * 3 + 2 * rimages.STRIP_GAP, 3)
    assert strip[0, 0, 0] == 10 and strip[0, 3 + rimages.STRIP_GAP, 0] == 20
    assert strip[0, 3, 0] == 255 and (strip[:, -3:] == 255).all()   # gap and empty slot
    assert rimages.encode_jpeg(strip) == rimages.encode_jpeg(strip.copy())
    assert rimages.thumbnail_shape((64, 128), 32) == (32, 64)


def test_write_unit_strips_masks_and_decodes_each_image_once(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    """Strips hold each unit's top images with ``upsample(acts) > threshold`` drawn; every needed
    image is loaded once even across unit blocks; acts are read per block of units."""
    n_images, n_units, h, w = 5, 4, 2, 2
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(n_images, n_units, h, w)).astype(np.float32)
    images = rng.integers(0, 256, (n_images, 8, 8, 3), dtype=np.uint8)
    thresholds = np.array([0.0, 0.5, -0.2, 10.0])
    top = np.array([[0, 1, -1], [1, 2, 3], [4, 0, -1], [3, -1, -1]], dtype=np.int64)
    loads: list[int] = []
    reads: list[tuple[list[int], int, int]] = []
    written: dict[str, np.ndarray] = {}

    def read_acts(rows: np.ndarray, u0: int, u1: int) -> np.ndarray:
        reads.append((rows.tolist(), u0, u1))
        return acts[rows, u0:u1]

    def load_image(n: int) -> np.ndarray:
        loads.append(n)
        return images[n]

    def fake_encode(image: np.ndarray, quality: int = 85) -> bytes:
        written[f"strip{len(written)}"] = image
        return b"jpeg"

    monkeypatch.setattr(rimages, "encode_jpeg", fake_encode)
    monkeypatch.setattr(rimages, "plan_unit_blocks", lambda *args, **kwargs: 2)
    paths = [tmp_path / "img" / f"unit_{u:04d}.jpg" for u in range(n_units)]
    rimages.write_unit_strips(read_acts, load_image, thresholds, top, paths, image_size=(8, 8),
                              seg_size=(4, 4), map_size=h * w, thumbnail_height=8)
    assert sorted(loads) == [0, 1, 2, 3, 4]                      # image 0, 1, 3 shared: once each
    assert reads == [([0, 1, 2, 3], 0, 2), ([0, 3, 4], 2, 4)]
    assert all(p.read_bytes() == b"jpeg" for p in paths)
    up = torch.nn.functional.interpolate(torch.from_numpy(acts.reshape(-1, 1, h, w)), size=(4, 4),
                                         mode="bilinear", align_corners=False)
    up = up.numpy().reshape(n_images, n_units, 4, 4)
    for u in range(n_units):
        strip = written[f"strip{u}"]
        assert strip.shape == (8, 3 * 8 + 2 * rimages.STRIP_GAP, 3)
        for slot, n in enumerate(top[u]):
            tile = strip[:, slot * (8 + rimages.STRIP_GAP): slot * (8 + rimages.STRIP_GAP) + 8]
            if n < 0:
                assert (tile == 255).all()
                continue
            mask = rimages.resize_mask(up[n, u] > thresholds[u], (8, 8))
            np.testing.assert_array_equal(tile, rimages.draw_mask(images[n], mask))
    assert not (up[3, 3] > 10.0).any()   # unit 3: empty mask, whole image dimmed


def test_gather_rows_reads_one_slice_per_chunk_row() -> None:
    acts = np.arange(10 * 3 * 2 * 1, dtype=np.float16).reshape(10, 3, 2, 1)
    slices: list[tuple[int, int]] = []

    class Recorder:
        shape = acts.shape

        def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
            assert isinstance(key[0], slice) and isinstance(key[1], slice)   # never fancy
            slices.append((key[0].start, key[0].stop))
            return acts[key]

    rows = np.array([0, 2, 3, 7, 9])
    out = rrender.gather_rows(Recorder(), rows, 1, 3, chunk_rows=4)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, acts[rows, 1:3].astype(np.float32))
    assert slices == [(0, 4), (7, 8), (9, 10)]   # chunk rows [0, 4), [4, 8), [8, 12)


# ----------------------------------------------------------------------------- charts and templates


def test_nice_ticks() -> None:
    assert rrender.nice_ticks(0) == [0.0, 1.0]
    assert rrender.nice_ticks(7) == [0, 2, 4, 6, 8]
    assert rrender.nice_ticks(1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert rrender.nice_ticks(120) == [0, 20, 40, 60, 80, 100, 120]
    assert rrender.nice_ticks(130) == [0, 50, 100, 150]


def test_concept_chart_heights_proportional_to_units() -> None:
    concepts = [{"label": "dog", "category": "object", "units": 4},
                {"label": "sky", "category": "object", "units": 2},
                {"label": "kitchen", "category": "scene", "units": 1}]
    chart = rrender.concept_chart(concepts, {"object": "#111111", "scene": "#222222"}, height=100)
    assert [b["h"] for b in chart["bars"]] == [100.0, 50.0, 25.0]
    assert [b["color"] for b in chart["bars"]] == ["#111111", "#111111", "#222222"]
    assert [l["category"] for l in chart["legend"]] == ["object", "scene"]
    assert chart["bars"][0]["x"] < chart["bars"][1]["x"] < chart["bars"][2]["x"]


def test_layers_chart_stacks_categories_and_fits_its_legend() -> None:
    layers = [{"name": f"l{i}", "n_detectors": 3, "n_concepts": 2,
               "detectors": [{"category": c, "units": i + j, "concepts": 1}
                             for j, c in enumerate(["a", "b", "c", "d", "e"])]}
              for i in range(2)]
    colors = rrender.category_colors(["a", "b", "c", "d", "e"])
    chart = rrender.layers_chart(layers, colors, height=100)
    assert [l["category"] for l in chart["legend"]] == ["a", "b", "c", "d", "e"]
    assert chart["width"] >= chart["legend"][-1]["x"] + 100     # the last entry is not clipped
    first, second = chart["columns"]
    assert [s["category"] for s in first["segments"]] == ["b", "c", "d", "e"]  # a: 0 units
    assert chart["ticks"][-1]["text"] == "15"                   # 15 units in the second bar
    assert second["segments"][-1]["y"] == 24.0                  # top of the stack: 24 + 100 - 100
    assert sum(s["h"] for s in second["segments"]) == 100.0


def _hand_model(label: str) -> dict:
    """A hand-made data model of one 2-unit layer (for template tests without a run)."""
    result = types.SimpleNamespace(
        layer="conv<1>", categories=["object", "scene"], thresholds=np.array([0.5, 0.25]),
        iou=np.array([[0.0, 0.2, 0.01, 0.0], [0.0, 0.0, 0.0, 0.06]]),
        unit_label=np.array([1, 3]), unit_iou=np.array([0.2, 0.06]),
        unit_category=np.array(["object", "scene"]),
        label_names=np.array(["-", label, "cat", "kitchen"]), primary=np.array([-1, 0, 0, 1]),
        iou_threshold=0.04)
    top = np.array([[1, 0], [0, 1]])
    layer = rdata.layer_data(result, top, np.ones((2, 2), np.float32), ["a.jpg", "b.jpg"], None)
    return {"schema_version": 1, "model": "net<b>", "weights": None, "dataset": "/d", "n_images": 2,
            "top_k": 2, "quantile": 0.005, "categories": ["object", "scene"], "layers": [layer],
            "missing_layers": [], "explanations": []}


def test_templates_escape_untrusted_names(tmp_path: Path) -> None:
    data = _hand_model("<script>alert(1)</script>")
    index = rrender.render_pages(data, tmp_path, (8, 8))
    page = (tmp_path / "conv_1_.html").read_text()
    assert "<script>alert" not in page and "<script>alert" not in index.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "net&lt;b&gt;" in index.read_text() and "conv&lt;1&gt;" in page
    assert 'href="conv_1_.html"' in index.read_text()
    stored = json.loads((tmp_path / "report.json").read_text())
    assert stored["layers"][0]["units"][0]["label"] == "<script>alert(1)</script>"


def test_templates_refuse_undefined_names() -> None:
    env = rrender.make_environment()
    with pytest.raises(Exception, match="undefined"):
        env.from_string("{{ nothing.here }}").render()
    assert env.from_string("{{ x }}").render(x="<a>") == "&lt;a&gt;"


def test_layer_page_lists_cards_next_labels_and_charts(tmp_path: Path) -> None:
    data = _hand_model("dog")
    rrender.render_pages(data, tmp_path, (8, 8))
    page = (tmp_path / "conv_1_.html").read_text()
    assert page.count('<section class="unit') == 2
    assert 'data-unit="0" data-iou="0.2" data-label="dog" data-category="object"' in page
    assert "next: cat (object, 0.010)" in page
    assert page.count('class="bar"') == 2 and page.count('class="bin"') == 21
    assert 'src="img/conv_1_/unit_0001.jpg"' in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page


# ----------------------------------------------------------------------------- the whole report


def test_report_json_matches_dissection_and_cache(synthetic_run: Path, rendered: Path) -> None:
    from dissect.record import cache_path
    from dissect.tally import load_dissection

    data = json.loads((rendered.parent / "report.json").read_text())
    assert data == json.loads(rrender.dumps_report_json(build_report_data(synthetic_run)))
    assert data["schema_version"] == 1 and data["model"] == "tests:TinyNet"
    assert data["missing_layers"] == ["head"] and data["n_images"] == 48
    (layer,) = data["layers"]
    assert layer["name"] == LAYER and layer["page"] == f"{LAYER}.html"
    result = load_dissection(synthetic_run / LAYER)
    detectors = (np.asarray(result.unit_iou) >= result.iou_threshold) & (result.unit_label > 0)
    assert detectors.any() and not detectors.all()  # the synthetic run is not degenerate
    categories = list(result.categories)
    assert [d["category"] for d in layer["detectors"]] == categories
    for d in layer["detectors"]:
        in_cat = detectors & (np.asarray(result.unit_category) == d["category"])
        assert d["units"] == int(in_cat.sum())
        assert d["concepts"] == len(set(np.asarray(result.unit_label)[in_cat].tolist()))
    assert layer["n_detectors"] == int(detectors.sum())
    assert layer["n_concepts"] == len(set(np.asarray(result.unit_label)[detectors].tolist()))
    assert sum(b["units"] for b in layer["concepts"]) == layer["n_detectors"]
    assert sum(layer["iou_histogram"]["counts"]) == N_UNITS

    with h5py.File(cache_path(synthetic_run, LAYER), "r") as f:
        amax = f["amax"][:]
    top = np.argsort(-amax, axis=0, kind="stable")[:10].T
    names = [u["label"] for u in layer["units"]]
    assert [u["unit"] for u in layer["units"]] == list(range(N_UNITS))
    for u, unit in enumerate(layer["units"]):
        assert [t["index"] for t in unit["top_images"]] == top[u].tolist()
        assert unit["iou"] == round(float(result.unit_iou[u]), 6)
        assert unit["detector"] == bool(detectors[u])
        if unit["iou"] > 0:
            assert unit["label"] == str(result.label_names[int(result.unit_label[u])])
        assert unit["strip"] == f"img/{LAYER}/unit_{u:04d}.jpg"
        assert (rendered.parent / unit["strip"]).is_file()
        assert len(unit["next"]) <= 3
        ious = [n["iou"] for n in unit["next"]]
        assert ious == sorted(ious, reverse=True) and all(v <= unit["iou"] + 1e-9 for v in ious)
    assert names  # labels present
    assert layer["ablation"]["metric"] == "recall" and layer["ablation"]["single"]
    assert layer["ablation"]["options"]["random"] == {"repeats": "2", "seed": "0",
                                                      "warning": "accuracy at <chance>"}
    assert layer["ablation"]["studies"] == ["single", "topn", "keep", "random", "concept"]
    assert layer["ablation"]["headline"] == {"n": 2, "classes": 2, "topn_drop": 0.4,
                                             "random_drop": 0.1}
    assert [u["damage"] for u in layer["units"]] == [None, 0.25, None, 0.1, 1.0, None]
    assert layer["scatter"]["y"] == "damage"
    assert [(p["unit"], p["value"]) for p in layer["scatter"]["points"]] == [
        (1, 0.25), (3, 0.1), (4, 1.0)]
    assert [u["important_for"] for u in layer["units"]] == [[], ["a", "b"], None, None, ["c"],
                                                            None]
    assert layer["compositional"] == {"units": 2, "mean_gain": 0.05, "mean_iou": 0.225}
    assert layer["units"][0]["formula"]["gain"] == 0.1
    detector, other = layer["units"][0]["detector"], layer["units"][1]["detector"]
    assert layer["significance"] == {"tested": 2, "significant": 1, "share": 0.5,
                                     "detectors": int(detector) + int(other),
                                     "detectors_significant": int(detector)}
    assert [u["significance"]["significant"] if u["significance"] else None
            for u in layer["units"]] == [True, False, None, None, None, None]
    # unit 0: top = max(0.3, 0.3) -> width 0.025; null 0.01, 0.02 -> bin 0, 0.03 -> 1, 0.3 -> 11
    assert layer["units"][0]["null"]["counts"] == [2, 1] + [0] * 9 + [1]
    assert layer["units"][0]["null"]["exceed"] == 1
    assert (layer["pooled_null"]["n_observed"], layer["pooled_null"]["n_null"]) == (6, 24)
    assert [u["tally_unit"] for u in layer["units"]] == [1, 2, 3, 4, 5, 6]
    assert sorted(layer["files"]) == ["ablation.csv", "compositional.csv", "importance.csv",
                                      "significance.csv", "tally.csv"]
    assert (rendered.parent / layer["files"]["tally.csv"]).read_bytes() == \
        (synthetic_run / LAYER / "tally.csv").read_bytes()
    assert [e["class"] for e in layer["units"][1]["ablation"]] == ["b", "a"]
    assert [e["class"] for e in layer["units"][3]["ablation"]] == ["b", "a"]
    assert [e["class"] for e in layer["units"][4]["ablation"]] == ["c"]
    assert layer["units"][0]["ablation"] == []


def test_report_strips_show_the_units_masks(synthetic_run: Path, rendered: Path) -> None:
    """Decode one strip: pixels inside the unit's mask keep the image, outside are dimmed."""
    from dissect.data import BrodenDataset
    from dissect.record import cache_path
    from dissect.tally import load_dissection

    data = json.loads((rendered.parent / "report.json").read_text())
    unit = max(data["layers"][0]["units"], key=lambda u: u["iou"])
    strip = np.asarray(Image.open(rendered.parent / unit["strip"]).convert("RGB"), dtype=np.float64)
    th = rrender.THUMBNAIL_HEIGHT
    assert strip.shape == (th, 10 * th + 9 * rimages.STRIP_GAP, 3)
    dataset = BrodenDataset(data["dataset"])
    result = load_dissection(synthetic_run / LAYER)
    n = unit["top_images"][0]["index"]
    with h5py.File(cache_path(synthetic_run, LAYER), "r") as f:
        maps = f["acts"][n, unit["unit"]][None].astype(np.float32)
    mask = rimages.threshold_masks(maps, result.thresholds[[unit["unit"]]], dataset.seg_size)[0]
    assert mask.any()
    thumb = rimages.make_thumbnail(dataset.load_image(n), (th, th))
    expected = rimages.draw_mask(thumb, rimages.resize_mask(mask, (th, th)))
    assert np.abs(strip[:, :th] - expected).mean() < 6.0   # JPEG error only


def test_index_page_lists_layers_and_counts(synthetic_run: Path, rendered: Path) -> None:
    text = rendered.read_text()
    data = json.loads((rendered.parent / "report.json").read_text())
    layer = data["layers"][0]
    assert f'<a href="{LAYER}.html">{LAYER}</a>' in text
    assert "tests:TinyNet" in text and data["dataset"] in text
    row = text[text.index(f'<tr data-layer="{LAYER}">'):]
    row = row[: row.index("</tr>")]
    cells = [c.split(">", 1)[1] for c in row.split("<td")[1:]]
    cells = [c[: c.index("</td>")] for c in cells]
    assert cells[3:] == [str(d["units"]) for d in layer["detectors"]] + [
        str(layer["n_detectors"]), str(layer["n_concepts"]), "50.0 %", "+0.050",
        "top 2: &minus;0.400 vs random &minus;0.100"]
    assert ("removing each class's top 2 units costs 0.400 recall on average (2 classes), "
            "against 0.100 for 2 random units") in text
    assert '<a href="explain_demo.html">demo</a> (1)' in text
    assert "Not dissected yet: head" in text
    assert "<svg" in text


def test_render_twice_gives_identical_bytes(synthetic_run: Path, rendered: Path,
                                            tmp_path: Path) -> None:
    again = render_report(synthetic_run, tmp_path / "again")
    first = sorted(p.relative_to(rendered.parent) for p in rendered.parent.rglob("*")
                   if p.is_file())
    second = sorted(p.relative_to(again.parent) for p in again.parent.rglob("*") if p.is_file())
    # report.json, index, layer page, strips, 5 result files, explanation page and its 4 maps
    assert first == second and len(first) == 3 + N_UNITS + 5 + 1 + 4
    for rel in first:
        assert (rendered.parent / rel).read_bytes() == (again.parent / rel).read_bytes(), rel


def test_label_with_script_renders_as_text(toy_dataset: Path, tmp_path: Path) -> None:
    """Labels named <script>alert(1)</script>... in label.csv reach the pages only escaped."""
    dataset_dir = tmp_path / "toy"
    shutil.copytree(toy_dataset, dataset_dir)
    evil = "<script>alert(1)</script>"
    for path in [dataset_dir / "label.csv", *dataset_dir.glob("c_*.csv")]:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        column = rows[0].index("name")
        for row in rows[1:]:
            if row[column] != "-":
                row[column] = evil + row[column]     # every label, names stay unique
        with path.open("w", newline="") as f:
            csv.writer(f).writerows(rows)
    run_dir = build_synthetic_run(tmp_path, dataset_dir)
    index = render_report(run_dir)
    data = json.loads((index.parent / "report.json").read_text())
    shown = [n["label"] for u in data["layers"][0]["units"] for n in [u, *u["next"]]]
    assert shown and all(label.startswith(evil) for label in shown)   # on the page ...
    for page in index.parent.glob("*.html"):
        text = page.read_text()
        assert "<script>alert" not in text   # ... only as text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in (index.parent / f"{LAYER}.html").read_text()


def test_missing_outputs_raise_cache_errors(synthetic_run: Path, tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="run.json"):
        build_report_data(tmp_path)
    run_dir = tmp_path / "run"
    shutil.copytree(synthetic_run, run_dir, ignore=shutil.ignore_patterns("report"))
    shutil.rmtree(run_dir / LAYER)
    with pytest.raises(CacheError, match="no layer has been dissected"):
        build_report_data(run_dir)
    with pytest.raises(OptionError, match="top_k"):
        build_report_data(synthetic_run, top_k=0)


def test_render_again_removes_strips_of_units_that_are_gone(synthetic_run: Path,
                                                            tmp_path: Path) -> None:
    index = render_report(synthetic_run, tmp_path / "report")
    strips = index.parent / "img" / LAYER
    stale, other = strips / "unit_9999.jpg", strips / "notes.txt"
    stale.write_bytes(b"old strip")
    other.write_text("not a strip")
    render_report(synthetic_run, tmp_path / "report")
    assert not stale.exists() and other.read_text() == "not a strip"
    assert len(list(strips.glob("unit_*.jpg"))) == N_UNITS


# ----------------------------------------------------------------------------- later results


def _records(rows: list[list[object]], n_units: int = N_UNITS, metric: str = "recall"):
    from dissect.report import studies

    header = list(rdata.ABLATION_COLUMNS)
    dict_rows = [{k: str(v) for k, v in zip(header, row)} for row in rows]
    return studies.ablation_records(dict_rows, n_units, metric)


def test_ablation_curves_by_hand() -> None:
    from dissect.report import studies

    curves = studies.ablation_curves(_records(ABLATION_ROWS))
    assert [c["class"] for c in curves] == ["a", "b"]        # the top-N targets, not c
    a, b = curves
    assert a["n"] == 5 and b["n"] == 4
    assert a["removed"] == [{"n": 0, "value": 0.8}, {"n": 1, "value": 0.6},
                            {"n": 2, "value": 0.4}]
    assert a["kept"] == [{"n": 1, "value": 0.3}, {"n": 2, "value": 0.2}]
    assert a["random"] == [
        {"n": 0, "mean": 0.8, "sd": 0.0, "min": 0.8, "max": 0.8, "repeats": 0},
        {"n": 1, "mean": 0.75, "sd": 0.05, "min": 0.7, "max": 0.8, "repeats": 2},
        {"n": 2, "mean": 0.7, "sd": 0.1, "min": 0.6, "max": 0.8, "repeats": 2}]
    assert b["removed"] == [{"n": 0, "value": 0.5}, {"n": 1, "value": 0.25},
                            {"n": 2, "value": 0.1}]   # a:top1's row for class b is ignored
    mean = studies.mean_curve(curves)
    assert mean["class"] == "mean over 2 classes" and mean["n"] == 9
    assert mean["removed"] == [{"n": 0, "value": 0.65}, {"n": 1, "value": 0.425},
                               {"n": 2, "value": 0.25}]
    assert mean["random"][2] == {"n": 2, "mean": 0.55, "sd": 0.1, "min": 0.45, "max": 0.65,
                                 "repeats": 2}
    assert studies.ablation_headline(curves) == {"n": 2, "classes": 2, "topn_drop": 0.4,
                                                 "random_drop": 0.1}
    assert studies.ablation_headline(curves, prefer=1) == {"n": 1, "classes": 2,
                                                           "topn_drop": 0.225,
                                                           "random_drop": 0.05}
    # only a random study: every class gets a curve, no headline
    only_random = studies.ablation_curves(_records([r for r in ABLATION_ROWS
                                                    if r[0] == "random"]))
    assert [c["class"] for c in only_random] == ["a", "b", "c"]
    assert only_random[2]["random"][1]["mean"] == 0.5
    assert studies.ablation_headline(only_random) is None
    assert studies.mean_curve([]) is None


def test_concept_ablations_and_unit_damage_by_hand() -> None:
    from dissect.report import studies

    records = _records(ABLATION_ROWS)
    (dog,) = studies.concept_ablations(records)
    assert dog == {"concept": "dog", "units": [1, 3], "n_hurt": 2, "mean_drop": 0.133333,
                   "hurt": [{"class": "a", "n": 5, "baseline": 0.8, "ablated": 0.5, "drop": 0.3},
                            {"class": "c", "n": 3, "baseline": 1.0, "ablated": 0.9,
                             "drop": 0.1}]}
    assert studies.concept_ablations(records, n=1)[0]["hurt"][0]["class"] == "a"
    # unit 4 helps a (-0.1) but hurts c by 1.0; units 0, 2, 5 were not ablated alone
    assert studies.unit_damage(records, N_UNITS) == [None, 0.25, None, 0.1, 1.0, None]
    by_accuracy = studies.unit_damage(_records(ABLATION_ROWS, metric="accuracy"), N_UNITS)
    assert by_accuracy == [None, 0.05, None, 0.0, 0.05, None]
    view = studies.ablation_view(records, N_UNITS, "recall")
    assert view["studies"] == ["single", "topn", "keep", "random", "concept"]


def test_ablation_records_name_file_and_row() -> None:
    from dissect.report import studies

    with pytest.raises(CacheError, match=r"row 2: unit 7 is out of range; the layer has 6"):
        _records([["random", "random1#0", "7", "a", 1, 0, 0, 0, 0, 0]])
    assert _records([["random", "r", "3;;1;", "a", 1, 0, 0, 0, 0, 0]])[0].units == (1, 3)
    with pytest.raises(CacheError, match=r"row 2: unit -1 is out of range"):
        _records([["random", "r", "-1;2", "a", 1, 0, 0, 0, 0, 0]])
    with pytest.raises(CacheError, match=r"row 3: column 'units' holds '1;x'"):
        _records([["random", "baseline", "", "a", 1, 0, 0, 0, 0, 0],
                  ["random", "r", "1;x", "a", 1, 0, 0, 0, 0, 0]])
    with pytest.raises(OptionError, match="f1"):
        studies.ablation_records([], 2, "f1")


def test_importance_compositional_significance_readers(tmp_path: Path) -> None:
    from dissect.report import studies

    path = tmp_path / "importance.csv"
    path.write_text(IMPORTANCE_TEXT)
    assert studies.read_importance(path, 6) == [[], ["a", "b"], None, None, ["c"], None]
    path.write_text("unit,n_classes,classes\n1,3,a;b\n")
    with pytest.raises(CacheError, match=r"row 2: n_classes is '3' but 2 classes are listed"):
        studies.read_importance(path, 6)
    path = tmp_path / "compositional.csv"
    path.write_text(COMPOSITIONAL_TEXT)
    formulas = studies.read_compositional(path, 3)
    assert formulas[0] == {"formula": "(x OR y) AND NOT <b>z</b>", "iou": 0.3, "label": "x",
                           "label_iou": 0.2, "gain": 0.1, "leaves": 3, "optimal": "yes"}
    assert formulas[1] is None
    assert studies.compositional_summary(formulas) == {"units": 2, "mean_gain": 0.05,
                                                       "mean_iou": 0.225}
    assert studies.compositional_summary([None]) is None
    with pytest.raises(CacheError, match=r"compositional.csv: row 2: unit 0 is out of range"):
        studies.read_compositional(path, 0)
    path = tmp_path / "significance.csv"
    path.write_text(SIGNIFICANCE_TEXT)
    rows = studies.read_significance(path, 4)
    assert [r and r["significant"] for r in rows] == [True, False, None, None]
    assert rows[0]["q"] == 0.03 and rows[0]["ci_low"] is None and rows[0]["z"] == 28.0
    summary = studies.significance_summary(rows, np.array([True, False, True, True]))
    assert summary == {"tested": 2, "significant": 1, "share": 0.5, "detectors": 1,
                       "detectors_significant": 1}
    assert studies.significance_summary([None, rows[2]], np.ones(2, bool)) is None
    path.write_text(SIGNIFICANCE_TEXT.replace(",yes\n", ",maybe\n"))
    with pytest.raises(CacheError, match=r"row 2: column 'significant' holds 'maybe'"):
        studies.read_significance(path, 4)


def test_null_histograms_by_hand(tmp_path: Path) -> None:
    from dissect.report import studies

    hists = studies.null_histograms(NULL_OBSERVED, NULL_VALUES, bins=4)
    # unit 4: top = max(0.1, 0.2) = 0.2, width 0.05: 0.2 -> last bin, 0.1 -> bin 2, 0.0 -> 0,
    # 0.05 -> 1; two values (0.2, 0.1) reach the observed 0.1
    assert hists[4]["counts"] == [1, 1, 1, 1] and hists[4]["exceed"] == 2
    assert hists[4]["width"] == 0.05
    assert hists[3]["counts"] == [4, 0, 0, 0] and hists[3]["exceed"] == 4   # all zero
    assert sum(hists[0]["counts"]) == 4 and hists[0]["observed"] == 0.3
    path = tmp_path / "significance.h5"
    with h5py.File(path, "w") as f:
        f["observed"] = NULL_OBSERVED
        f["null"] = NULL_VALUES
    per_unit, pooled = studies.read_null_histograms(path, 6, block=4, bins=4)
    assert per_unit == hists
    # bins of 0.01: observed 0.3 -> bin 30 (the last non-empty bin), null has ten zeros of 24
    assert (pooled["n_observed"], pooled["n_null"], len(pooled["edges"])) == (6, 24, 32)
    assert pooled["observed"][30] == round(1 / 6, 6) and pooled["observed"][10] == round(2 / 6, 6)
    assert pooled["null"][0] == round(10 / 24, 6) and pooled["null"][30] == round(1 / 24, 6)
    assert abs(sum(pooled["null"]) - 1) < 1e-5
    with pytest.raises(CacheError, match=r"expected \(5,\) and \(B, 5\)"):
        studies.read_null_histograms(path, 5)
    with h5py.File(path, "w") as f:
        f["observed"] = NULL_OBSERVED
    assert studies.read_null_histograms(path, 6) is None     # no null: degrade gracefully


def test_explanation_view_and_unsafe_paths(tmp_path: Path) -> None:
    from dissect.report import explain

    entry = {"image": "a.jpg", "target": 1, "target_name": "kitchen", "logit": 2.0,
             "concepts": [{"label": "dog", "category": "object", "share": 0.625,
                           "contribution": 1.25, "units": [3, 5]}],
             "unlabeled": {"contribution": 0.5, "units": [0]},
             "maps": [{"kind": "gradcam", "title": "Grad-CAM", "path": "x/cam.png"},
                      {"kind": "concept", "title": "dog", "path": "x/dog.png"},
                      {"kind": "concept", "title": "tree", "path": "x/tree.png"},
                      {"kind": "integrated_gradients", "title": "IG", "path": "x/ig.png"}]}
    view = explain.explanation_view(entry, "demo.json: entry 0")
    assert view["class_map"] == {"path": "x/cam.png", "caption": "Grad-CAM"}
    assert view["concept_maps"] == [{"path": "x/dog.png", "caption": "dog (62.5 %)"},
                                    {"path": "x/tree.png", "caption": "tree"}]
    assert view["input_maps"] == [{"path": "x/ig.png", "caption": "IG",
                                   "kind": "integrated_gradients"}]
    assert view["image_map"] is None and view["unlabeled"] == {"contribution": 0.5, "units": 1}
    for bad in ["../secret.png", "/etc/passwd", "x/../../y.png", "C:/x.png", ""]:
        entry["maps"] = [{"kind": "image", "title": "t", "path": bad}]
        with pytest.raises(CacheError, match="demo.json: entry 0, map 0"):
            explain.explanation_view(entry, "demo.json: entry 0")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CacheError, match=r"bad.json: cannot read"):
        explain.read_explanations(tmp_path)
    assert explain.read_explanations(tmp_path / "absent") == []


def test_image_level_labels_and_scene_note(broden_tiny, tmp_path: Path) -> None:
    from dissect.data import BrodenDataset

    mask = rdata.image_level_mask(BrodenDataset(broden_tiny.root), 301)
    assert np.flatnonzero(mask).tolist() == [6, 7]           # kitchen, street (scenes)
    data = _hand_model("dog")
    layer = data["layers"][0]
    result = types.SimpleNamespace(
        layer="conv<1>", categories=["object", "scene"], thresholds=np.array([0.5, 0.25]),
        iou=np.array([[0.0, 0.2, 0.01, 0.0], [0.0, 0.0, 0.0, 0.06]]),
        unit_label=np.array([1, 3]), unit_iou=np.array([0.2, 0.06]),
        unit_category=np.array(["object", "scene"]),
        label_names=np.array(["-", "dog", "cat", "kitchen"]), primary=np.array([-1, 0, 0, 1]),
        iou_threshold=0.04)
    layer = rdata.layer_data(result, np.array([[1, 0], [0, 1]]), np.ones((2, 2), np.float32),
                             ["a.jpg", "b.jpg"], None,
                             image_level=np.array([False, False, False, True]))
    assert [u["image_level"] for u in layer["units"]] == [False, True]
    data["layers"] = [layer]
    rrender.render_pages(data, tmp_path, (8, 8))
    page = (tmp_path / "conv_1_.html").read_text()
    assert page.count('class="scene-note"') == 1
    assert "kitchen is an image-level (scene) label: it covers the whole image" in page
    assert "unit 1</span><span class=\"numbering\">(tally.csv row unit 2)" in page


def test_layer_page_shows_the_study(synthetic_run: Path, rendered: Path) -> None:
    page = (rendered.parent / f"{LAYER}.html").read_text()
    assert ("Removing each class's top 2 units costs 0.400 recall on average over 2 classes, "
            "against 0.100 for 2 random units.") in page
    assert page.count("<figure>") == 3                   # mean + classes a and b
    assert "<td>dog</td>" in page and "a 0.80 &rarr; 0.50; c 1.00 &rarr; 0.90" in page
    assert page.count('<a href="#unit-') == 2 + 3        # concept units + scatter dots
    assert "formula: (x OR y) AND NOT &lt;b&gt;z&lt;/b&gt; (IoU 0.300" in page
    assert page.count('class="sig yes"') == 1 and page.count('class="sig no"') == 1
    assert page.count('class="null"') == N_UNITS
    assert page.count('class="pooled"') == 2 * 31       # 31 bins of 0.01 (up to IoU 0.3)
    assert page.count("ablation: no class hurt") == 0
    assert page.count("not removed alone in the single-unit study") == 3
    assert page.count('<div class="ablation">') == 3
    for name in ["tally.csv", "ablation.csv", "importance.csv"]:
        assert f'<a href="files/{LAYER}/{name}">{name}</a>' in page
    assert '<a href="report.json">report.json</a>' in page
    assert "scroll-margin-top" in page
    assert "topn: eval_split val, rank_by recall, rank_split train, rule zero" in page
    assert "Warning (random): accuracy at &lt;chance&gt;" in page
    explain_page = (rendered.parent / "explain_demo.html").read_text()
    assert "img&lt;1&gt;.jpg &rarr; kitchen (logit 3.500)" in explain_page
    assert '<img src="explain/demo/dog.png" alt="dog (80.0 %)">' in explain_page
    assert (rendered.parent / "explain" / "demo" / "dog.png").is_file()


def test_null_histograms_leave_out_nan() -> None:
    from dissect.report import studies

    hists = studies.null_histograms(np.array([np.nan, 0.4]),
                                    np.array([[np.nan, 0.1], [0.2, np.nan]]), bins=2)
    assert hists[0] == {"width": 0.1, "counts": [0, 1], "observed": 0.0, "exceed": 1}
    assert hists[1]["counts"] == [1, 0] and hists[1]["exceed"] == 0
