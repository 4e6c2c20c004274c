"""Explanations of predictions (DESIGN.md §11): exact values on hand-made nets, equivalences."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dissect.errors import LayerError, ModelError, OptionError
from dissect.explain import (
    concept_groups,
    explain_class,
    explain_prediction,
    input_attributions,
    write_explanations,
)
from dissect.tally import DissectionResult


def make_dissection(layer: str, labels: list[tuple[str, str] | None], ious: list[float],
                    iou_threshold: float = 0.04) -> DissectionResult:
    """A DissectionResult by hand: unit u has label labels[u] = (name, category) or none."""
    categories = tuple(sorted({c for item in labels if item for c in [item[1]]}))
    names = [""] + sorted({item[0] for item in labels if item})
    number = {name: i for i, name in enumerate(names)}
    n_units, n_labels = len(labels), len(names)
    primary = np.full(n_labels, -1, dtype=np.int64)
    for item in labels:
        if item:
            primary[number[item[0]]] = categories.index(item[1])
    unit_label = np.array([number[item[0]] if item else 0 for item in labels], dtype=np.int64)
    unit_iou = np.asarray(ious, dtype=np.float64)
    iou = np.zeros((n_units, n_labels))
    iou[np.arange(n_units), unit_label] = unit_iou * (unit_label > 0)
    cat_label = np.zeros((n_units, len(categories)), dtype=np.int64)
    cat_iou = np.zeros((n_units, len(categories)))
    unit_category = np.array([item[1] if item else (categories[-1] if categories else "")
                              for item in labels], dtype=object)
    for u, item in enumerate(labels):
        if item:
            c = categories.index(item[1])
            cat_label[u, c], cat_iou[u, c] = unit_label[u], unit_iou[u]
    zeros = np.zeros
    return DissectionResult(layer, categories, zeros(n_units), zeros(n_labels, np.int64),
                            zeros((n_units, n_labels), np.int64),
                            zeros((n_units, len(categories)), np.int64), iou, cat_label, cat_iou,
                            unit_label, unit_iou, unit_category, iou_threshold, names, primary)


def resnet18() -> nn.Module:
    from torchvision.models import resnet18 as build
    torch.manual_seed(0)
    model = build(weights=None, num_classes=10).eval()
    with torch.no_grad():  # a nonzero head bias, so the bias term is really tested
        model.fc.bias.uniform_(-0.5, 0.5)
    return model


def resnet_dissection(layer: str = "layer4", n_units: int = 512) -> DissectionResult:
    names = [("dog", "object"), ("water", "material"), ("sky", "object"), ("red", "color"), None]
    labels = [names[u % 5] for u in range(n_units)]
    ious = [0.02 + 0.01 * (u % 7) for u in range(n_units)]   # below 0.04 for u % 7 < 2
    return make_dissection(layer, labels, ious)


class DogNet(nn.Module):
    """conv 1x1 (3 -> 6 units, ReLU) -> global average pool -> linear (6 -> 3 classes).

    Only unit 3 has a nonzero weight for class 0 (weight 2.0, bias 0.5); unit u's map is
    ReLU(x_0 + u - 1), so unit 3's is positive for inputs in [-1, 1].
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, 0] = 1.0
            self.conv.bias.copy_(torch.arange(6.0) - 1.0)
            self.fc.weight.zero_()
            self.fc.weight[0, 3] = 2.0
            self.fc.weight[1] = torch.linspace(-1, 1, 6)
            self.fc.weight[2, 0] = 1.0
            self.fc.bias.copy_(torch.tensor([0.5, 0.0, -0.2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def dog_dissection() -> DissectionResult:
    labels = [("cat", "object"), ("grass", "material"), None, ("dog", "object"),
              ("cat", "object"), ("sky", "object")]
    return make_dissection("relu", labels, [0.1, 0.2, 0.0, 0.3, 0.01, 0.05])


def images(n: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tiny_vit() -> nn.Module:
    from torchvision.models import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                              hidden_dim=16, mlp_dim=32, num_classes=5).eval()
    with torch.no_grad():  # torchvision starts the head at zero: no gradient at all
        model.heads.head.weight.normal_()
        model.heads.head.bias.normal_()
    return model


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


@pytest.fixture(scope="module")
def resnet_case():
    model = resnet18()
    x = images(2, 64)
    dissection = resnet_dissection()
    grad = explain_prediction(model, "layer4", x, dissection)
    cam = explain_prediction(model, "layer4", x, dissection, method="gradcam")
    return model, x, dissection, grad, cam


# --------------------------------------------------------------------------- exact identities
def test_pooled_linear_head_contributions_sum_to_logit_minus_bias(resnet_case):
    model, x, _, grad, _ = resnet_case
    with torch.no_grad():
        logits = model(x).double()
        pooled = model.layer4(model.layer3(model.layer2(model.layer1(model.maxpool(
            model.relu(model.bn1(model.conv1(x)))))))).double().mean(dim=(2, 3))
    for b, explanation in enumerate(grad):
        target = int(logits[b].argmax())
        assert explanation.target == target
        assert explanation.logit == pytest.approx(float(logits[b, target]), rel=1e-6)
        assert explanation.bias == pytest.approx(float(model.fc.bias[target].detach()), rel=1e-6)
        total = explanation.contributions.sum() + explanation.bias
        assert total == pytest.approx(explanation.logit, rel=1e-4)
        assert abs(explanation.residual) <= 1e-4 * abs(explanation.logit)
        # r_u = w_cu * mean(A_u), unit by unit
        expected = model.fc.weight[target].double().detach() * pooled[b]
        np.testing.assert_allclose(explanation.contributions, expected.numpy(), rtol=1e-4,
                                   atol=1e-6)
        assert explanation.tokens is None and explanation.grid == (2, 2)


def test_gradcam_equals_grad_x_act_for_pooled_linear_head(resnet_case):
    _, _, _, grad, cam = resnet_case
    for a, b in zip(grad, cam):
        assert a.target == b.target and b.method == "gradcam"
        np.testing.assert_allclose(b.contributions, a.contributions, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(b.class_map, a.class_map, rtol=1e-5, atol=1e-6)
        assert [c.label for c in a.concepts] == [c.label for c in b.concepts]


def test_concepts_plus_unlabeled_equal_sum_over_units(resnet_case):
    _, _, dissection, grad, _ = resnet_case
    for explanation in grad:
        r = explanation.contributions
        total = sum(c.contribution for c in explanation.concepts) \
            + explanation.unlabeled.contribution
        assert total == pytest.approx(r.sum(), rel=1e-9, abs=1e-9)
        positive = np.maximum(r, 0).sum()
        units_seen = sorted(u for c in explanation.concepts for u in c.units) \
            + list(explanation.unlabeled.units)
        assert sorted(units_seen) == list(range(512))
        for concept in explanation.concepts:
            assert concept.contribution == pytest.approx(r[list(concept.units)].sum(), abs=1e-12)
            assert concept.share == pytest.approx(concept.contribution / positive, abs=1e-12)
            for u in concept.units:   # members are above the cut-off with this label
                assert dissection.unit_iou[u] >= 0.04
                assert explanation.unit_labels[u] == concept.label
        # below the cut-off (u % 7 < 2) or no label (u % 5 == 4): unlabeled
        expected = [u for u in range(512) if u % 7 < 2 or u % 5 == 4]
        assert list(explanation.unlabeled.units) == expected
        values = [c.contribution for c in explanation.concepts]
        assert values == sorted(values, reverse=True)
        assert explanation.negative == sorted(
            [c for c in explanation.concepts if c.contribution < 0],
            key=lambda c: c.contribution)[:3]


def test_group_by_category_sums_the_label_groups(resnet_case):
    model, x, dissection, grad, _ = resnet_case
    by_category = explain_prediction(model, "layer4", x, dissection, group_by="category")
    for per_label, per_category in zip(grad, by_category):
        sums: dict[str, float] = {}
        for concept in per_label.concepts:
            sums[concept.category] = sums.get(concept.category, 0.0) + concept.contribution
        got = {c.label: c.contribution for c in per_category.concepts}
        assert set(got) == {"object", "material", "color"}
        for category, value in sums.items():
            assert got[category] == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_iou_threshold_moves_units_to_unlabeled(resnet_case):
    model, x, dissection, _, _ = resnet_case
    strict = explain_prediction(model, "layer4", x[:1], dissection, iou_threshold=0.075)
    assert list(strict[0].unlabeled.units) == [u for u in range(512)
                                               if u % 7 < 6 or u % 5 == 4]


def test_only_the_dog_unit_explains_all_of_the_dog_class():
    model = DogNet().eval()
    x = images(3, 8, seed=2)
    result = explain_prediction(model, "relu", x, dog_dissection(), target=0, top_k=2)
    for b, explanation in enumerate(result):
        assert explanation.concepts[0].label == "dog"
        assert explanation.concepts[0].units == (3,)
        assert explanation.concepts[0].share == pytest.approx(1.0, abs=1e-12)
        a3 = torch.relu(x[b, 0] + 2.0).double()
        assert explanation.concepts[0].contribution == pytest.approx(2.0 * float(a3.mean()),
                                                                     rel=1e-9)
        assert explanation.bias == pytest.approx(0.5)
        assert np.count_nonzero(explanation.contributions) == 1
        assert all(c.contribution == 0 for c in explanation.concepts[1:])
        assert explanation.unlabeled.contribution == 0 and explanation.unlabeled.units == (2, 4)
        assert list(explanation.concept_maps) == ["dog"]   # the only positive concept
        # concept map and class map of one unit: w * A_3 / (h * w), already at image size
        expected = (2.0 * a3 / 64).float().numpy()
        np.testing.assert_allclose(explanation.concept_maps["dog"], expected, rtol=1e-6)
        np.testing.assert_allclose(explanation.class_map, expected, rtol=1e-6)
        assert explanation.notes == []


def test_batch_equals_per_image(resnet_case):
    model, x, dissection, grad, _ = resnet_case
    single = explain_prediction(model, "layer4", x, dissection, batch_size=1)
    for a, b in zip(grad, single):
        assert a.target == b.target and a.image == b.image
        np.testing.assert_allclose(b.contributions, a.contributions, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(b.class_map, a.class_map, rtol=1e-5, atol=1e-6)
        assert list(a.concept_maps) == list(b.concept_maps)
        for label in a.concept_maps:
            np.testing.assert_allclose(b.concept_maps[label], a.concept_maps[label], rtol=1e-5,
                                       atol=1e-6)


def test_without_detected_head_bias_is_null_and_noted(resnet_case):
    model, x, _, _, _ = resnet_case
    result = explain_prediction(model, "layer3", x[:1], resnet_dissection("layer3", 256))
    assert result[0].bias is None
    assert result[0].residual == pytest.approx(result[0].logit - result[0].contributions.sum())
    assert any("bias is null" in note for note in result[0].notes)
    assert result[0].class_map.shape == (64, 64) and result[0].grid == (4, 4)


def test_brute_force_contributions_of_an_inner_layer():
    """r_u = sum G * A against autograd on a hooked output, for a block that is not pooled."""
    model = resnet18()
    x = images(2, 32, seed=3)
    layer = "layer3.0.bn2"   # followed by an in-place `out += identity` in the block
    result = explain_prediction(model, layer, x, resnet_dissection(layer, 256), target=[1, 4])
    stored = {}
    module = dict(model.named_modules())[layer]

    def keep(m, i, o):
        stored["a"] = o
        return o.clone()
    handle = module.register_forward_hook(keep)
    try:
        logits = model(x)
        score = logits[0, 1] + logits[1, 4]
        (grad,) = torch.autograd.grad(score, stored["a"])
    finally:
        handle.remove()
    expected = (grad.double() * stored["a"].detach().double()).sum(dim=(2, 3)).numpy()
    np.testing.assert_allclose(np.stack([e.contributions for e in result]), expected,
                               rtol=1e-6, atol=1e-9)
    assert [e.target for e in result] == [1, 4]
    # a module run twice per forward (a BasicBlock's shared ReLU): the last call, and a note
    twice = explain_prediction(model, "layer4.1.relu", x[:1],
                               resnet_dissection("layer4.1.relu", 512))[0]
    assert any("ran 2 times" in note for note in twice.notes)
    assert twice.bias is not None   # its last call is the block output that is pooled
    assert twice.contributions.sum() + twice.bias == pytest.approx(twice.logit, rel=1e-4)


# --------------------------------------------------------------------------- hooks and errors
def test_hooks_removed_after_success_and_error(resnet_case):
    model, x, dissection, _, _ = resnet_case
    before = hook_count(model)
    explain_prediction(model, "layer4", x[:1], dissection)
    assert hook_count(model) == before
    with pytest.raises(OptionError, match="target"):
        explain_prediction(model, "layer4", x[:1], dissection, target=99)
    assert hook_count(model) == before

    class Boom(nn.Module):
        def forward(self, t):
            raise RuntimeError("boom")
    net = DogNet().eval()
    net.fc = nn.Sequential(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        explain_prediction(net, "relu", images(1, 8), dog_dissection())
    assert hook_count(net) == 0


def test_errors_name_the_problem(resnet_case):
    model, x, dissection, _, _ = resnet_case
    with pytest.raises(LayerError, match="layer5"):
        explain_prediction(model, "layer5", x, dissection)
    with pytest.raises(OptionError, match="layer4.*layer3|layer3.*layer4"):
        explain_prediction(model, "layer3", x, dissection)
    with pytest.raises(OptionError, match="256 units but the dissection has 512"):
        explain_prediction(model, "layer3", x[:1], resnet_dissection("layer3", 512))
    with pytest.raises(OptionError, match="method"):
        explain_prediction(model, "layer4", x, dissection, method="lrp")
    with pytest.raises(OptionError, match="group_by"):
        explain_prediction(model, "layer4", x, dissection, group_by="colour")
    with pytest.raises(OptionError, match=r"\(B, 3, H, W\)"):
        explain_prediction(model, "layer4", x[0], dissection)
    with pytest.raises(ModelError, match=r"\(B, C\)"):
        explain_prediction(nn.Sequential(DogNet().conv), "0", images(1, 8),
                           make_dissection("0", [None] * 6, [0.0] * 6))
    assert hook_count(model) == 0


# --------------------------------------------------------------------------- tokens (ViT)
def test_vit_block_maps_on_the_patch_grid_without_class_token():
    model = tiny_vit()
    x = images(2, 32, seed=4)
    layer = "encoder.layers.encoder_layer_0"
    dissection = make_dissection(layer, [("dog", "object")] * 4 + [None] * 12, [0.5] * 16)
    result = explain_prediction(model, layer, x, dissection)
    # brute force: G * A over the 16 patch tokens; token 0 (class) is its own bucket
    stored = {}
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: stored.setdefault("a", o))
    try:
        logits = model(x)
        target = logits.argmax(dim=1)
        (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), stored["a"])
    finally:
        handle.remove()
    product = grad.double() * stored["a"].detach().double()          # (B, 17, 16)
    for b, explanation in enumerate(result):
        assert explanation.grid == (4, 4)
        assert explanation.class_map.shape == (32, 32)
        assert all(m.shape == (32, 32) for m in explanation.concept_maps.values())
        np.testing.assert_allclose(explanation.contributions, product[b, 1:].sum(0).numpy(),
                                   rtol=1e-6, atol=1e-10)
        assert explanation.tokens == pytest.approx(float(product[b, 0].sum()), rel=1e-6)
        assert explanation.bias is None
        assert explanation.residual == pytest.approx(
            explanation.logit - explanation.contributions.sum() - explanation.tokens)
        assert any("1 leading class/register token" in note for note in explanation.notes)
        assert explanation.concepts[0].units == (0, 1, 2, 3)
    assert hook_count(model) == 0


def test_vit_last_block_patch_tokens_get_no_gradient_and_say_so():
    model = tiny_vit()
    layer = "encoder.layers.encoder_layer_1"
    dissection = make_dissection(layer, [("dog", "object")] * 16, [0.5] * 16)
    explanation = explain_prediction(model, layer, images(1, 32, seed=5), dissection)[0]
    assert not explanation.contributions.any()
    assert explanation.tokens != 0
    assert any("get no gradient" in note for note in explanation.notes)


# --------------------------------------------------------------------------- captum maps
def test_saliency_ig_occlusion_of_a_linear_model_are_known_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).eval()
    x = images(2, 6, seed=6)
    maps = input_attributions(model, x, target=[2, 3], methods=("saliency", "ig", "occlusion"),
                              ig_steps=8, occlusion_window=1, occlusion_stride=1)
    weights = model[1].weight.detach().reshape(4, 3, 6, 6)
    for b, target in enumerate([2, 3]):
        np.testing.assert_allclose(maps["saliency"][b], weights[target].abs().amax(0),
                                   rtol=1e-6)
        exact = (x[b] * weights[target]).sum(0)   # IG and occlusion are exact for linear models
        np.testing.assert_allclose(maps["ig"][b], exact, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(maps["occlusion"][b], exact, rtol=1e-4, atol=1e-6)
    assert set(maps) == {"saliency", "ig", "occlusion"} and maps["ig"].shape == (2, 6, 6)
    with pytest.raises(OptionError, match="gradcam"):
        input_attributions(model, x, methods=("gradcam",))
    with pytest.raises(OptionError, match="lime"):
        input_attributions(model, x, methods=("lime",))


def test_captum_gradcam_is_at_the_layer_and_target():
    model = DogNet().eval()
    x = images(2, 8, seed=7)
    for target in (0, 1):
        ours = explain_prediction(model, "relu", x, dog_dissection(), target=target)
        theirs = input_attributions(model, x, target=target, methods=("gradcam",),
                                    layer="relu")["gradcam"]
        for b in range(2):
            np.testing.assert_allclose(theirs[b].numpy(), ours[b].class_map, rtol=1e-5,
                                       atol=1e-7)
    vit = tiny_vit()
    layer = "encoder.layers.encoder_layer_0"
    dissection = make_dissection(layer, [None] * 16, [0.0] * 16)
    ours = explain_prediction(vit, layer, x.new_zeros(1, 3, 32, 32) + 0.3, dissection)
    theirs = input_attributions(vit, x.new_zeros(1, 3, 32, 32) + 0.3, methods=("gradcam",),
                                layer=layer)["gradcam"]
    np.testing.assert_allclose(theirs[0].numpy(), ours[0].class_map, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- class profile
def test_explain_class_is_the_mean_over_the_class_images():
    model = DogNet().eval()
    x = images(5, 8, seed=8)
    labels = [1, 0, 1, 1, 2]
    dissection = dog_dissection()
    profile = explain_class(model, "relu", x, dissection, 1, labels=labels, batch_size=2)
    singles = explain_prediction(model, "relu", x[[0, 2, 3]], dissection, target=1)
    assert profile.n_images == 3
    np.testing.assert_allclose(profile.mean_contributions,
                               np.mean([e.contributions for e in singles], axis=0), rtol=1e-12)
    for concept in profile.concepts:
        per_image = [next(c for c in e.concepts if c.label == concept.label) for e in singles]
        assert concept.contribution == pytest.approx(np.mean([c.contribution for c in per_image]))
        assert concept.share == pytest.approx(np.mean([c.share for c in per_image]))
    assert profile.mean_logit == pytest.approx(np.mean([e.logit for e in singles]))
    # predicted selection over a loader of (images, labels) batches
    with torch.no_grad():
        predicted = model(x).argmax(1)
    loader = [(x[:3], torch.tensor(labels[:3])), (x[3:], torch.tensor(labels[3:]))]
    chosen = int(predicted[0])
    by_prediction = explain_class(model, "relu", loader, dissection, chosen,
                                  selection="predicted")
    rows = [i for i in range(5) if int(predicted[i]) == chosen]
    expected = explain_prediction(model, "relu", x[rows], dissection, target=chosen)
    assert by_prediction.n_images == len(rows)
    np.testing.assert_allclose(by_prediction.mean_contributions,
                               np.mean([e.contributions for e in expected], axis=0), rtol=1e-12)


# --------------------------------------------------------------------------- files
def test_write_explanations_json_and_pngs(tmp_path):
    model = DogNet().eval()
    x = images(2, 8, seed=9)
    result = explain_prediction(model, "relu", x, dog_dissection(), target=0,
                                class_names=["dog", "cat", "tree"], image_ids=["a.jpg", "b.jpg"])
    pictures = np.zeros((2, 8, 8, 3), dtype=np.uint8) + 100
    extra = input_attributions(model, x, target=0, methods=("saliency", "gradcam"), layer="relu")
    path = write_explanations(result, tmp_path / "explain", "two", pictures, extra)
    assert path == tmp_path / "explain" / "two.json"
    records = json.loads(path.read_text())
    assert len(records) == 2
    first = records[0]
    for key in ("image", "target", "target_name", "logit", "bias", "residual", "method", "layer",
                "units", "concepts", "unlabeled", "maps", "notes"):
        assert key in first
    assert first["image"] == "a.jpg" and first["target_name"] == "dog"
    assert first["units"][3] == {"unit": 3, "contribution": pytest.approx(
        result[0].contributions[3]), "label": "dog", "iou": 0.3}
    assert first["concepts"][0]["label"] == "dog" and first["concepts"][0]["share"] == 1.0
    assert [m["kind"] for m in first["maps"]] == ["image", "gradcam", "concept", "saliency"]
    assert first["maps"][2]["title"] == "dog (100%)" and first["maps"][2]["label"] == "dog"
    for entry in first["maps"]:
        png = tmp_path / "explain" / entry["path"]
        assert png.is_file() and Image.open(png).size == (8, 8)
    assert not list((tmp_path / "explain").rglob("*.partial"))
    for bad in ("../up", "a/b", ""):
        with pytest.raises(OptionError, match="explain name"):
            write_explanations(result, tmp_path / "explain", bad, pictures)


def test_concept_groups_from_compositional_labels():
    dissection = dog_dissection()
    groups = concept_groups(dissection, unit_concepts={0: ("dog OR cat", "object"),
                                                       5: ("dog OR cat", "object")})
    assert groups.names == ("dog OR cat",)
    assert groups.members[0].tolist() == [True, False, False, False, False, True]
    with pytest.raises(OptionError, match="unit 9"):
        concept_groups(dissection, unit_concepts={9: ("x", "object")})
