"""Ablation: hooks, batched masks, metrics, suffix execution, studies, labels, files.

Models are tiny and their weights are set by hand where the expected numbers matter.
"""

from __future__ import annotations

import csv
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from dissect.ablation import (
    CSV_COLUMNS,
    AblationStudy,
    TensorRows,
    ablate_unit_sets,
    ablate_units,
    apply_unit_masks,
    class_metrics,
    compute_unit_means,
    concept_units,
    count_classes,
    importance_table,
    load_ablation,
    load_class_labels,
    metrics_from_counts,
    random_unit_sets,
    rank_units,
    replace_output,
    split_at_layer,
)
from dissect.errors import DatasetError, LayerError, OptionError


# --------------------------------------------------------------------------- hand-set model
def hand_model() -> nn.Module:
    """input (N, 2, 2, 2) -> units (1x1 conv, 3 units) -> mean over space -> head (2 logits).

    units: u0 = x0, u1 = x1, u2 = x0 + x1; head: logit0 = u0 + 2 u1 + 3 u2, logit1 = -u1 + u2.
    """
    model = nn.Sequential(OrderedDict(
        units=nn.Conv2d(2, 3, 1, bias=False), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(),
        head=nn.Linear(3, 2, bias=False)))
    with torch.no_grad():
        model.units.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])[:, :, None,
                                                                                 None])
        model.head.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]]))
    return model.eval()


def hand_input() -> torch.Tensor:
    """One image: channel 0 all 2, channel 1 all 3 -> unit maps 2, 3, 5; logits (23, 2)."""
    x = torch.empty(1, 2, 2, 2)
    x[:, 0], x[:, 1] = 2.0, 3.0
    return x


def test_ablating_a_unit_changes_the_logits_by_the_known_amount() -> None:
    model, x = hand_model(), hand_input()
    assert torch.equal(model(x), torch.tensor([[23.0, 2.0]]))
    with ablate_units(model, "units", [2]):                 # removes 3 * 5 and 1 * 5
        assert torch.equal(model(x), torch.tensor([[8.0, -3.0]]))
    with ablate_units(model, "units", [0, 1]):              # removes 1 * 2 + 2 * 3 and -3
        assert torch.equal(model(x), torch.tensor([[15.0, 5.0]]))
    with ablate_units(model, "units", [2], rule="mean", means=np.array([0.0, 0.0, 1.0])):
        assert torch.equal(model(x), torch.tensor([[11.0, -2.0]]))   # u2 = 1 instead of 5
    assert torch.equal(model(x), torch.tensor([[23.0, 2.0]]))


def test_batched_sets_match_one_set_at_a_time() -> None:
    model, x = hand_model(), hand_input()
    masks = np.array([[False, False, True], [True, True, False], [False, False, False]])
    with ablate_unit_sets(model, "units", masks):
        out = model(x.repeat(3, 1, 1, 1))
    assert torch.equal(out, torch.tensor([[8.0, -3.0], [15.0, 5.0], [23.0, 2.0]]))
    acts = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)     # (B=2, U=3, 2)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    out = apply_unit_masks(acts, torch.tensor([[True, False, False], [False, True, True]]), fill)
    expected = torch.stack([acts[0], acts[1], acts[0], acts[1]]).clone()
    expected[0:2, 0] = -1.0
    expected[2:4, 1], expected[2:4, 2] = -2.0, -3.0
    assert torch.equal(out, expected)


def test_hooks_are_removed_after_success_and_after_an_exception() -> None:
    model, x = hand_model(), hand_input()
    with ablate_units(model, "units", [1]):
        assert len(model.units._forward_hooks) == 1
        model(x)
    assert len(model.units._forward_hooks) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with ablate_units(model, "units", [1]):
            raise RuntimeError("boom")
    assert len(model.units._forward_hooks) == 0
    with pytest.raises(OptionError, match="unit index 7"):
        with ablate_units(model, "units", [7]):            # out of range: found at the forward
            model(x)
    assert len(model.units._forward_hooks) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with ablate_unit_sets(model, "units", np.ones((2, 3), bool)):
            raise RuntimeError("boom")
    assert len(model.units._forward_hooks) == 0
    assert torch.equal(model(x), torch.tensor([[23.0, 2.0]]))


class _SharedReLU(nn.Module):
    """A torchvision-BasicBlock-like module: one ReLU module called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(x))
        y = self.relu(y + x)                         # the recorder keeps this (last) call
        return self.head(y.mean((2, 3)))


def test_a_module_that_runs_twice_per_forward_is_refused() -> None:
    # A hook would ablate both calls, but the recorded (dissected) maps are the last call's.
    model, x = _SharedReLU().eval(), torch.randn(3, 2, 4, 4)
    for context in (lambda: ablate_units(model, "relu", [0]),
                    lambda: ablate_unit_sets(model, "relu", np.ones((1, 2), bool))):
        with pytest.raises(LayerError, match="'relu' runs more than once in one forward"):
            with context():
                model(x)
    assert not model._forward_hooks and not model._forward_pre_hooks
    with ablate_units(model, "conv", [0]):           # runs once: fine, forward after forward
        model(x)
        model(x)


def test_bad_units_layers_and_rules_are_named() -> None:
    model = hand_model()
    with pytest.raises(OptionError, match="unit index -1"):
        with ablate_units(model, "units", [-1]):
            pass
    with pytest.raises(LayerError, match="'unit'.*close matches: units"):
        with ablate_units(model, "unit", [0]):
            pass
    with pytest.raises(OptionError, match="'median'.*zero, mean"):
        with ablate_units(model, "units", [0], rule="median"):
            pass
    with pytest.raises(OptionError, match="needs the per-unit mean"):
        with ablate_units(model, "units", [0], rule="mean"):
            model(hand_input())
    study = AblationStudy(model, "units", [0], ["a", "b"], images=TensorRows(hand_input()))
    with pytest.raises(OptionError, match="unit index 3 .*\\[0, 3\\)"):
        study.evaluate([[0], [3]])


class _PatchTokens(nn.Module):
    """(N, 3, 4, 4) -> (N, 1 + 4, 6) tokens: a class token then 2x2 patches, channels last."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 6, 2, stride=2)
        self.cls = nn.Parameter(torch.zeros(1, 1, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)


def tiny_token_model() -> nn.Module:
    """A transformer-like model: patch tokens (N, 5, 6) -> Linear over tokens -> mean -> head."""
    model = nn.Sequential(OrderedDict(
        patches=_PatchTokens(), mlp=nn.Linear(6, 6), pool=_TokenMean(), head=nn.Linear(6, 2)))
    return model.eval()


class _TokenMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def test_token_and_channel_last_layers_are_refused_with_name_and_shape() -> None:
    # units of a (B, T, C) token layer are its C channels (the recorder's grid layout); axis 1
    # (tokens) must never be ablated as units: the hook, the batched hook and the study refuse.
    model = tiny_token_model()
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(LayerError, match=r"\(B, C, H, W\).*'mlp' gives \(2, 5, 6\)"):
        with ablate_units(model, "mlp", [0]):
            model(x)
    with pytest.raises(LayerError, match=r"'mlp' gives \(4, 5, 6\)"):
        with ablate_unit_sets(model, "mlp", np.eye(2, 6, dtype=bool)):
            model(x.repeat(2, 1, 1, 1))
    for use_suffix in ("auto", False):  # the FX suffix path refuses the layer the same way
        with pytest.raises(LayerError, match=r"'mlp' gives \(1, 5, 6\)"):
            AblationStudy(model, "mlp", [0, 1], ["a", "b"], images=TensorRows(x),
                          activations=TensorRows(torch.randn(2, 6, 2, 2)),
                          use_suffix=use_suffix)
    # a (B, C) output (recorded as (B, C, 1, 1)) keeps its channels on axis 1: still allowed
    with ablate_units(model, "head", [1]):
        assert torch.all(model(x)[:, 1] == 0)
    # a cache recorded channel-last or as tokens is refused before any forward
    from dissect.ablation import hooks
    for layout in ("nhwc", "tokens"):
        with pytest.raises(LayerError, match=f"'units' was recorded with layout '{layout}'"):
            hooks.check_recorded_layout({"layout": layout}, "units")
    hooks.check_recorded_layout({"layout": "auto"}, "units")
    hooks.check_recorded_layout(None, "units")


def test_unit_means_stream_over_the_cache() -> None:
    acts = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    means = compute_unit_means(TensorRows(acts), batch_size=1)
    assert np.array_equal(means, acts.mean(axis=(0, 2, 3), dtype=np.float64))
    assert np.array_equal(means, [7.5, 11.5, 15.5])


# --------------------------------------------------------------------------- metrics
def test_metrics_of_a_confusion_matrix_built_by_hand() -> None:
    # rows: true class 0..2 (class 3 has no image); columns: predicted output 0..4, where output 4
    # is no class. n = 12 images.
    confusion = np.array([[3, 1, 0, 0, 0],
                          [2, 2, 1, 0, 0],
                          [0, 0, 1, 1, 1]])
    y_true, y_pred = [], []
    for true, row in enumerate(confusion):
        for predicted, count in enumerate(row):
            y_true += [true] * count
            y_pred += [predicted] * count
    prob = np.array([0.5, 0.25, 0.75, 1.0,             # class 0 images
                     0.0, 0.5, 0.5, 0.25, 0.25,         # class 1 images
                     0.5, 0.5, 0.25])                   # class 2 images
    metrics = class_metrics(np.array(y_true), np.array(y_pred), prob, n_classes=4)
    F = Fraction
    # per class: TP, FN, FP, TN = n - TP - FN - FP
    tp_fn_fp = {0: (3, 1, 2), 1: (2, 3, 1), 2: (1, 2, 1), 3: (0, 0, 1)}
    n = 12
    for c, (tp, fn, fp) in tp_fn_fp.items():
        tn = n - tp - fn - fp
        assert metrics["n"][c] == tp + fn
        assert metrics["accuracy"][c] == float(F(tp + tn, n))
        assert metrics["precision"][c] == float(F(tp, tp + fp))
        if c < 3:
            assert metrics["recall"][c] == float(F(tp, tp + fn))
            assert metrics["balanced_accuracy"][c] == pytest.approx(
                float((F(tp, tp + fn) + F(tn, tn + fp)) / 2), abs=0, rel=1e-15)
    assert metrics["accuracy"][0] == 9 / 12 and metrics["recall"][1] == 0.4
    assert metrics["precision"][2] == 0.5 and metrics["accuracy"][3] == 11 / 12
    assert np.isnan(metrics["recall"][3]) and np.isnan(metrics["balanced_accuracy"][3])
    assert np.isnan(metrics["true_class_prob"][3]) and metrics["precision"][3] == 0.0
    y = np.array(y_true)
    for c in range(3):
        assert metrics["true_class_prob"][c] == pytest.approx(prob[y == c].mean(), rel=1e-15)
    assert list(metrics["true_class_prob"][:3]) == [0.625, 0.3, 0.4166666666666667]
    # never predicted: precision 0 (zero_division=0)
    never = class_metrics(np.array([0, 1]), np.array([0, 0]), np.array([1.0, 0.0]), 2)
    assert never["precision"][1] == 0.0 and never["recall"][1] == 0.0


def test_counts_are_additive_over_image_chunks() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 20)
    pred = rng.integers(0, 4, (2, 20))
    prob = rng.random((2, 20))
    whole = count_classes(y, pred, prob, 3)
    parts = count_classes(y[:7], pred[:, :7], prob[:, :7], 3) + \
        count_classes(y[7:], pred[:, 7:], prob[:, 7:], 3)
    assert np.array_equal(whole.true_positive, parts.true_positive)
    assert np.array_equal(whole.predicted, parts.predicted)
    assert np.allclose(whole.prob_sum, parts.prob_sum, rtol=1e-14, atol=0)
    metrics = metrics_from_counts(whole)
    assert metrics["recall"].shape == (2, 3)
    single = class_metrics(y, pred[1], prob[1], 3)
    assert np.array_equal(single["recall"], metrics["recall"][1])


# --------------------------------------------------------------------------- suffix execution
def _layer_output(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    store = {}
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda _m, _i, out: store.setdefault("a", out.clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return store["a"]


def test_suffix_equals_the_full_forward_on_resnet18() -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    x = torch.randn(3, 3, 64, 64)
    suffix = split_at_layer(model, "layer3")
    assert suffix is not None
    acts = _layer_output(model, "layer3", x).half().float()      # as read from a float16 cache
    with torch.no_grad(), replace_output(model, "layer3", acts):
        full = model(x)
    with torch.no_grad():
        assert torch.equal(suffix(acts), full)
    # a residual connection goes around layer3.0.conv1: not splittable there, and a relu module
    # used twice in a block cannot be a cut either
    assert split_at_layer(model, "layer3.0.conv1") is None
    assert split_at_layer(model, "layer3.0.relu") is None
    assert len(model.layer3._forward_hooks) == 0


def test_suffix_equals_the_full_forward_on_the_toy_model() -> None:
    from dissect.toy import toy_model

    torch.manual_seed(0)
    model = toy_model().eval()
    x = torch.randn(2, 3, 32, 32)
    for layer in ("conv2", "pool2", "conv3.1"):       # conv3.1 (batch norm) is followed by an
        suffix = split_at_layer(model, layer)          # in-place ReLU
        assert suffix is not None
        acts = _layer_output(model, layer, x).half().float()
        with torch.no_grad(), replace_output(model, layer, acts):
            full = model(x)
        with torch.no_grad():
            assert torch.equal(suffix(acts.clone()), full)
    assert split_at_layer(model, "conv3.0") is not None
    assert len(model.conv2._forward_hooks) == 0


def test_suffix_path_and_hook_path_give_the_same_effects() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 6, 3, padding=1), relu1=nn.ReLU(), conv2=nn.Conv2d(6, 5, 3, padding=1),
        relu2=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(),
        head=nn.Linear(5, 3))).eval()
    with torch.no_grad():
        model.head.weight.mul_(20.0)           # spread the logits: the predictions differ
    x = torch.randn(12, 3, 6, 6)
    acts = _layer_output(model, "relu1", x)
    y = np.array([0, 1, 2, 0, 1, 2, -1, 0, 1, 2, 2, 1])
    sets = [[0], [1, 3], [0, 1, 2, 3, 4, 5]]
    by_suffix = AblationStudy(model, "relu1", y, ["a", "b", "c"], images=TensorRows(x),
                              activations=TensorRows(acts), batch_size=5, sets_per_batch=2)
    by_hooks = AblationStudy(model, "relu1", y, ["a", "b", "c"], images=TensorRows(x),
                             use_suffix=False, batch_size=5, sets_per_batch=2)
    assert by_suffix.uses_suffix and not by_hooks.uses_suffix
    masks = by_suffix.masks(sets)
    rows = np.arange(12)
    assert torch.allclose(by_suffix.evaluator.logits(masks, rows),
                          by_hooks.evaluator.logits(masks, rows), rtol=0, atol=1e-5)
    a, b = by_suffix.evaluate(sets), by_hooks.evaluate(sets)
    assert np.array_equal(a.counts.true_positive, b.counts.true_positive)
    assert np.array_equal(a.counts.predicted, b.counts.predicted)
    assert np.allclose(a.counts.prob_sum, b.counts.prob_sum, rtol=0, atol=1e-6)
    assert a.counts.n_total == 11 and list(a.n) == [3, 4, 4]
    assert len({tuple(row) for row in a.counts.predicted}) > 1      # ablations change decisions
    # identical for every scheduler; the same decisions for another batching of the sets
    sync = AblationStudy(model, "relu1", y, ["a", "b", "c"], images=TensorRows(x),
                         activations=TensorRows(acts), batch_size=5, sets_per_batch=2,
                         scheduler="synchronous").evaluate(sets)
    assert np.array_equal(sync.counts.true_positive, a.counts.true_positive)
    assert np.array_equal(sync.counts.prob_sum, a.counts.prob_sum)
    one = AblationStudy(model, "relu1", y, ["a", "b", "c"], images=TensorRows(x),
                        activations=TensorRows(acts), batch_size=5, sets_per_batch=1
                        ).evaluate(sets)
    assert np.array_equal(one.counts.predicted, a.counts.predicted)
    assert np.allclose(one.counts.prob_sum, a.counts.prob_sum, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- studies
def _study(**kwargs: object) -> AblationStudy:
    """The hand model on 4 images whose argmax is known; classes 'up' (0) and 'down' (1)."""
    model = hand_model()
    x = torch.zeros(4, 2, 2, 2)
    x[0, 0], x[0, 1] = 2.0, 3.0     # logits (23, 2): class 0
    x[1, 0], x[1, 1] = 0.0, 1.0     # u = (0, 1, 1): logits (5, 0): class 0
    x[2, 0], x[2, 1] = -1.0, -2.0   # u = (-1, -2, -3): logits (-14, -1): class 1
    x[3, 0], x[3, 1] = -2.0, 1.0    # u = (-2, 1, -1): logits (-3, -2): class 1
    return AblationStudy(model, "units", [0, 0, 1, 1], ["up", "down"], images=TensorRows(x),
                         **kwargs)


def test_single_unit_sweep_and_ranking() -> None:
    study = _study(batch_size=3)
    result = study.single()
    assert result.set_names == ("baseline", "unit0", "unit1", "unit2")
    assert [list(u) for u in result.set_units] == [[], [0], [1], [2]]
    recall = result.metrics["recall"]
    assert np.array_equal(recall[0], [1.0, 1.0])
    # unit2 removed: image 0 -> (8, -3) up, image 1 -> (2, -1) up, image 2 -> (-5, 2) down,
    # image 3 -> (0, -1) up: recall down = 1/2
    assert np.array_equal(recall[3], [1.0, 0.5])
    # unit0 removed: image 3 -> (-1, -2) up; unit1 removed: every image keeps its class
    assert np.array_equal(recall[1], [1.0, 0.5]) and np.array_equal(recall[2], [1.0, 1.0])
    ranking, damage = rank_units(result, "recall")
    assert np.array_equal(damage, [[0.0, 0.0, 0.0], [0.5, 0.0, 0.5]])
    # ties broken by the drop in true-class probability: for 'up' only image 1 (logits (5, 0))
    # moves, to (5, 0), (3, 1), (2, -1) without unit 0, 1, 2; for 'down' unit 2 moves image 2
    # from (-14, -1) to (-5, 2), unit 0 only to (-13, -1)
    assert np.array_equal(ranking, [[1, 2, 0], [2, 0, 1]])
    rows = importance_table(ranking, result.class_names, damage=damage, top=1)
    assert [(r["unit"], r["n_classes"], r["classes"]) for r in rows] == \
        [(1, 1, "up"), (2, 1, "down"), (0, 0, "")]


def test_topn_and_keep_sets() -> None:
    study = _study()
    ranking = np.array([[1, 0, 2], [2, 1, 0]])
    result = study.topn(sizes=[1, 2], ranking=ranking, classes=["down"])
    assert result.set_names == ("baseline", "down:top1", "down:keep1", "down:top2",
                                "down:keep2")
    assert result.set_studies == ("topn", "topn", "keep", "topn", "keep")
    assert [list(u) for u in result.set_units] == [[], [2], [0, 1], [1, 2], [0]]
    with pytest.raises(OptionError, match="unknown class 'dwon'.*close names: down"):
        study.topn(sizes=[1], ranking=ranking, classes=["dwon"])
    with pytest.raises(OptionError, match="set size 4"):
        study.topn(sizes=[4], ranking=ranking)
    with pytest.raises(OptionError, match="set size 2 is given twice"):   # rows of one name
        study.random(sizes=[2, 1, 2], repeats=1)


def test_random_sets_are_deterministic_with_a_seed() -> None:
    first = random_unit_sets(10, [1, 3], 4, seed=5)
    assert [list(s) for s in first] == [list(s) for s in random_unit_sets(10, [1, 3], 4, seed=5)]
    assert [list(s) for s in first] != [list(s) for s in random_unit_sets(10, [1, 3], 4, seed=6)]
    assert [len(s) for s in first] == [1] * 4 + [3] * 4
    assert all(len(set(s.tolist())) == len(s) and list(s) == sorted(s) for s in first)
    study = _study()
    a, b = study.random([1, 2], repeats=3, seed=2), study.random([1, 2], repeats=3, seed=2)
    assert [list(u) for u in a.set_units] == [list(u) for u in b.set_units]
    assert a.set_names[1:] == ("random1#0", "random1#1", "random1#2", "random2#0", "random2#1",
                               "random2#2")
    assert np.array_equal(a.counts.true_positive, b.counts.true_positive)
    summary = a.random_summary()
    assert list(summary.sizes) == [1, 2] and list(summary.repeats) == [3, 3]
    recall = a.metrics["recall"]
    assert np.array_equal(summary.mean["recall"][0], recall[1:4].mean(axis=0))
    assert np.array_equal(summary.min["recall"][1], recall[4:7].min(axis=0))
    assert np.array_equal(summary.std["recall"][1], recall[4:7].std(axis=0))


def test_concept_units_and_unknown_concepts() -> None:
    dissection = SimpleNamespace(label_names=["-", "sky", "grass", "skyscraper"],
                                 unit_label=np.array([1, 2, 1, 1]),
                                 unit_iou=np.array([0.2, 0.05, 0.01, 0.08]), iou_threshold=0.04)
    assert list(concept_units(dissection, "sky")) == [0, 3]
    assert list(concept_units(dissection, "sky", 0.005)) == [0, 2, 3]
    with pytest.raises(OptionError, match="unknown concept 'skye'.*close names: sky"):
        concept_units(dissection, "skye")
    with pytest.raises(OptionError, match="no unit is labeled 'skyscraper'.*detected: grass, sky"):
        concept_units(dissection, "skyscraper")
    unnamed = SimpleNamespace(**{**vars(dissection), "label_names": ["", "sky", "grass", "x"]})
    with pytest.raises(OptionError, match="unknown concept ''"):   # label 0 is no concept
        concept_units(unnamed, "", 0.0)
    result = _study().concept([2], "sky")
    assert result.set_names == ("baseline", "sky") and result.set_studies == ("concept",) * 2


def test_importance_table_beside_the_dissection() -> None:
    ranking = np.array([[2, 0, 1], [2, 1, 0], [0, 2, 1]])
    damage = np.array([[0.5, 0.1, 0.6], [0.0, 0.2, 0.3], [np.nan] * 3])  # class 2: no image
    dissection = SimpleNamespace(label_names=["-", "sky", "grass"], unit_label=np.array([1, 2, 2]),
                                 unit_iou=np.array([0.3, 0.01, 0.12]),
                                 unit_category=np.array(["object", "object", "object"]))
    rows = importance_table(ranking, ["a", "b", "c"], damage=damage, dissection=dissection,
                            top=2)
    assert [(r["unit"], r["n_classes"], r["classes"]) for r in rows] == \
        [(2, 2, "a;b"), (0, 1, "a"), (1, 1, "b")]
    assert rows[0]["label"] == "grass" and rows[0]["iou"] == 0.12
    assert rows[1]["label"] == "sky" and rows[1]["category"] == "object"


# --------------------------------------------------------------------------- files
def test_ablation_csv_format_and_merging(tmp_path: Path) -> None:
    study = _study()
    single = study.single()
    h5_path, csv_path = single.save(tmp_path)
    with open(csv_path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(CSV_COLUMNS) == ["study", "set", "units", "class", "n", "accuracy",
                                            "balanced_accuracy", "precision", "recall",
                                            "true_class_prob"]
    assert len(rows) == 1 + 4 * 2
    assert rows[1][:5] == ["single", "baseline", "", "up", "2"]
    assert rows[2][:5] == ["single", "baseline", "", "down", "2"]
    assert rows[7][:5] == ["single", "unit2", "2", "up", "2"]
    assert rows[8][8] == "0.5"                         # recall of 'down' with unit 2 removed
    # a second study is added; a rerun of a study replaces its rows
    study.evaluate([[0, 2]], names=["pair"], study="random").save(tmp_path)
    study.single().save(tmp_path)
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["study"] for r in rows].count("single") == 8
    assert [(r["set"], r["units"]) for r in rows if r["study"] == "random"] == \
        [("baseline", ""), ("baseline", ""), ("pair", "0;2"), ("pair", "0;2")]
    loaded = load_ablation(tmp_path)
    assert sorted(loaded) == ["random", "single"]
    assert np.array_equal(loaded["single"].metrics["recall"], single.metrics["recall"])
    assert [list(u) for u in loaded["single"].set_units] == [[], [0], [1], [2]]
    assert not list(tmp_path.glob("*.partial"))


# --------------------------------------------------------------------------- class labels
def test_class_labels_from_a_category_a_csv_and_predictions(broden_tiny: object,
                                                            tmp_path: Path) -> None:
    from dissect.data import BrodenDataset

    dataset = BrodenDataset(broden_tiny.root)
    names, y = load_class_labels("scene", dataset)
    assert names == ["kitchen", "street"] and list(y) == [0, 1, 0]
    with pytest.raises(OptionError, match="2 labels but the model has 3 outputs"):
        load_class_labels("scene", dataset, n_outputs=3)
    names, y = load_class_labels("scene", dataset, class_names=["street", "park", "kitchen"])
    assert list(y) == [2, 0, 2]
    with pytest.raises(OptionError, match="no image-level labels"):
        load_class_labels("object", dataset)
    with pytest.raises(OptionError, match="'scenes' is neither a category"):
        load_class_labels("scenes", dataset)

    table = tmp_path / "classes.csv"
    table.write_text("image,class\nimg2.png,1\nimg0.png,0\n")
    names, y = load_class_labels(table, dataset, n_outputs=3)
    assert names == ["0", "1", "2"] and list(y) == [0, -1, 1]
    table.write_text("image,class\nimg2.png,cat\nimg1.png,dog\n")
    names, y = load_class_labels(table, dataset, class_names=["dog", "cat"])
    assert list(y) == [-1, 0, 1]
    table.write_text("image,class\nimg2.png,cat\nimg1.png,cow\n")
    with pytest.raises(DatasetError, match="classes.csv, row 3: unknown class 'cow'"):
        load_class_labels(table, dataset, class_names=["dog", "cat"])
    table.write_text("image,class\nimg9.png,0\n")
    with pytest.raises(DatasetError, match="classes.csv, row 2: image 'img9.png' is not in"):
        load_class_labels(table, dataset)
    table.write_text("image,label\nimg0.png,0\n")
    with pytest.raises(DatasetError, match="classes.csv, row 1 .*missing column.*class"):
        load_class_labels(table, dataset)

    names, y = load_class_labels("predicted", dataset, predictions=np.array([2, 0, 2]),
                                 n_outputs=3)
    assert names == ["0", "1", "2"] and list(y) == [2, 0, 2]


def test_token_layer_units_are_patch_token_channels_and_the_class_token_is_kept() -> None:
    # drop_tokens=1: unit u is channel u of the 4 patch tokens; the class token (and so the
    # mean-pooled head's share of it) is left as it is. Reference: a plain hook, no engine.
    torch.manual_seed(0)
    model = tiny_token_model()
    with torch.no_grad():
        model.patches.cls.normal_()
    x = torch.randn(8, 3, 4, 4)
    labels = np.array([0, 1, 0, 1, 0, 1, 1, 0])
    study = AblationStudy(model, "mlp", labels, ["a", "b"], images=TensorRows(x),
                          drop_tokens=1, batch_size=3, scheduler="synchronous")
    assert study.n_units == 6 and not study.uses_suffix
    sets = [[0, 2], [5], [0, 1, 2, 3, 4, 5]]
    result = study.evaluate(sets)

    def reference(units: list[int]) -> np.ndarray:
        def hook(_m, _i, out):
            out = out.clone()
            out[:, 1:, units] = 0
            return out
        handle = model.mlp.register_forward_hook(hook)
        with torch.no_grad():
            prob = torch.softmax(model(x).double(), dim=1)[torch.arange(8), labels].numpy()
        handle.remove()
        return np.array([prob[labels == c].mean() for c in (0, 1)])

    expected = np.stack([reference([])] + [reference(s) for s in sets])
    np.testing.assert_allclose(result.metrics["true_class_prob"], expected, rtol=1e-6)
    # every unit removed still leaves the class token's contribution: not the all-zero output
    with torch.no_grad():
        tokens = model.mlp(model.patches(x))
    assert tokens[:, 0].abs().sum() > 0
    with pytest.raises(LayerError, match="with 7 leading class/register tokens"):
        AblationStudy(model, "mlp", labels, ["a", "b"], images=TensorRows(x), drop_tokens=7)


def test_a_token_layer_recorded_as_tokens_is_ablated_on_its_patch_tokens(toy_dataset: Path,
                                                                         tmp_path: Path) -> None:
    # The recorder stores the layer's unit layout (tokens, 1 dropped class token); a study on
    # that cache reads it, so the same unit sets give what an explicit drop_tokens=1 gives.
    from dissect.ablation import DatasetImages
    from dissect.data import IMAGENET_MEAN, IMAGENET_STD, BrodenDataset
    from dissect.record import CacheReader, open_cache, record_activations

    torch.manual_seed(1)
    model = tiny_token_model()
    dataset = BrodenDataset(toy_dataset)
    paths = record_activations(model, dataset, ["mlp"], tmp_path, mean=IMAGENET_MEAN,
                               std=IMAGENET_STD, batch_size=24, progress=False)
    assert open_cache(paths["mlp"]).unit_layout["drop_tokens"] == 1
    images = DatasetImages(dataset, IMAGENET_MEAN, IMAGENET_STD)
    labels = np.arange(len(dataset)) % 2
    from_cache = AblationStudy(model, "mlp", labels, ["a", "b"], images=images,
                               activations=CacheReader(paths["mlp"]), batch_size=16)
    explicit = AblationStudy(model, "mlp", labels, ["a", "b"], images=images, drop_tokens=1,
                             batch_size=16)
    assert from_cache.drop_tokens == 1 and not from_cache.uses_suffix
    sets = [[0], [1, 3, 5]]
    np.testing.assert_array_equal(from_cache.evaluate(sets).metrics["true_class_prob"],
                                  explicit.evaluate(sets).metrics["true_class_prob"])
