"""Model sources, weights loading, layer listing and layer-name resolution (dissect.record)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from dissect.errors import LayerError, ModelError, OptionError
from dissect.record import (
    LayerRecorder,
    ModelSource,
    format_layer_table,
    layer_table,
    list_layers,
    load_model,
    load_weights,
    model_sources,
    register_model_source,
    resolve_layers,
    weights_hash,
)
from dissect.record.models import parse_input_size


class Tiny(nn.Module):
    """conv (3->4, 3x3, pad 1) -> relu -> features[0] conv stride 2 -> pool -> fc; ``unused``."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.features = nn.Sequential(nn.Conv2d(4, 6, 2, stride=2), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, num_classes)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv(x))
        x = self.relu(self.features(x))  # relu called twice
        return self.fc(self.pool(x).flatten(1))


# --------------------------------------------------------------------------- model sources
def test_torchvision_name_num_classes_and_fixed_init() -> None:
    model = load_model("squeezenet1_1", num_classes=7)
    assert model.classifier[1].out_channels == 7
    assert not model.training
    assert weights_hash(model) == weights_hash(load_model("squeezenet1_1", num_classes=7))
    assert weights_hash(model) != weights_hash(load_model("squeezenet1_1", num_classes=8))


def test_callable_spec_from_current_directory(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_models_mod.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        CALLS = []
        def make(**kwargs):
            CALLS.append(kwargs)
            return nn.Linear(3, kwargs.get("num_classes", 2))
        class Holder:
            @staticmethod
            def build():
                return nn.Conv2d(3, 1, 1)
        def not_a_model():
            return 42
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert load_model("my_models_mod:make").out_features == 2
        assert load_model("my_models_mod:make", num_classes=9).out_features == 9
        import my_models_mod
        assert my_models_mod.CALLS == [{}, {"num_classes": 9}]
        assert isinstance(load_model("my_models_mod:Holder.build"), nn.Conv2d)
        with pytest.raises(ModelError, match="returned a int"):
            load_model("my_models_mod:not_a_model")
        with pytest.raises(ModelError, match="has no attribute 'mak'.*make"):
            load_model("my_models_mod:mak")
        with pytest.raises(ModelError, match="cannot import module 'no_such_mod_xyz'"):
            load_model("no_such_mod_xyz:make")
    finally:
        sys.modules.pop("my_models_mod", None)


def test_torchscript_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
    path = tmp_path / "model.ts"
    with pytest.warns(FutureWarning):  # torch.jit.script is deprecated upstream
        torch.jit.save(torch.jit.script(module), str(path))
    loaded = load_model(str(path))
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(loaded(x), module(x))
    with pytest.raises(OptionError, match="num_classes"):
        load_model(str(path), num_classes=3)
    rows = layer_table(loaded, 4)
    assert [(r.name, r.kind, r.shape, r.hookable) for r in rows] == [
        ("0", "Conv2d (TorchScript)", None, False), ("1", "ReLU (TorchScript)", None, False)]
    assert "cannot be hooked (TorchScript)" in format_layer_table(rows)
    with pytest.raises(LayerError, match="TorchScript model, whose inner layers cannot be hooked"):
        LayerRecorder(loaded, ["0"]).__enter__()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load TorchScript model"):
        load_model(str(bad))


def test_unknown_spec_lists_close_names_and_kinds() -> None:
    with pytest.raises(ModelError) as info:
        load_model("resnet81")
    message = str(info.value)
    assert "resnet18" in message and "module:callable" in message and "TorchScript" in message
    with pytest.raises(ModelError, match="model file 'missing/model.pt' does not exist"):
        load_model("missing/model.pt")


def test_registry_refuses_duplicate_names() -> None:
    names = [source.name for source in model_sources()]
    assert names == ["torchscript", "callable", "torchvision"]
    with pytest.raises(ModelError, match="'torchvision' is already registered"):
        register_model_source(ModelSource("torchvision", "again", lambda s: False,
                                          lambda s, n: nn.Identity()))
    assert len(model_sources()) == 3


# --------------------------------------------------------------------------- weights
@pytest.fixture
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return Tiny().state_dict()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix", "nested"])
def test_weights_layouts(tmp_path: Path, tiny_state: dict[str, torch.Tensor], wrap: str) -> None:
    prefixed = {f"module.{k}": v for k, v in tiny_state.items()}
    checkpoint = {"plain": tiny_state,
                  "state_dict": {"state_dict": tiny_state, "epoch": 3},
                  "model": {"model": tiny_state, "optimizer": {"lr": 0.1}},
                  "module_prefix": prefixed,
                  "nested": {"model": {"state_dict": prefixed}, "epoch": 1}}[wrap]
    path = tmp_path / "w.pt"
    torch.save(checkpoint, path)
    torch.manual_seed(2)
    model = load_weights(Tiny(), path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, tiny_state[key]), key


def test_weights_through_load_model(tmp_path: Path) -> None:
    torch.manual_seed(3)
    state = nn.Linear(4, 2).state_dict()
    path = tmp_path / "w.pth"
    torch.save(state, path)
    (tmp_path / "lin_mod_for_weights.py").write_text(
        "import torch.nn as nn\ndef make():\n    return nn.Linear(4, 2)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        model = load_model("lin_mod_for_weights:make", weights=path)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("lin_mod_for_weights", None)
    assert torch.equal(model.weight, state["weight"])


def test_weights_mismatch_lists_keys_and_shapes(tmp_path: Path,
                                                tiny_state: dict[str, torch.Tensor]) -> None:
    state = dict(tiny_state)
    del state["fc.bias"]
    state["head.weight"] = torch.zeros(1)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError) as info:
        load_weights(model, path)
    message = str(info.value)
    assert "missing keys: fc.bias" in message and "unexpected keys: head.weight" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # unchanged
    state = dict(tiny_state)
    state["fc.weight"] = torch.zeros(3, 6)
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"shape mismatches: fc.weight \(3, 6\) in file vs "
                                         r"\(5, 6\) in model"):
        load_weights(Tiny(), path)


def test_classifier_size_mismatch_suggests_num_classes(tmp_path: Path) -> None:
    # a Places365 checkpoint loaded into a 1000-class model: every mismatch is fc's first axis
    path = tmp_path / "places.pt"
    torch.save(Tiny(num_classes=365).state_dict(), path)
    with pytest.raises(ModelError, match=r"fc.weight \(365, 6\) in file vs \(1000, 6\).*"
                                         r"classifier \(fc.weight\) has 365 outputs and the "
                                         r"model 1000: build the model with --num-classes 365 "
                                         r"\(num_classes=365\)"):
        load_weights(Tiny(num_classes=1000), path)
    load_weights(Tiny(num_classes=365), path)
    # another mismatch than the classifier's outputs gets no such hint
    state = Tiny().state_dict()
    state["conv.weight"] = torch.zeros(5, 3, 3, 3)
    torch.save(state, path)
    with pytest.raises(ModelError) as error:
        load_weights(Tiny(), path)
    assert "conv.weight" in str(error.value) and "--num-classes" not in str(error.value)


def test_weights_without_num_batches_tracked(tmp_path: Path) -> None:
    torch.manual_seed(4)
    source = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    source[1].running_mean.fill_(0.25)
    state = {k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "old.pt")
    model = load_weights(nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)), tmp_path / "old.pt")
    assert torch.equal(model[1].running_mean, torch.full((2,), 0.25))
    assert torch.equal(model[0].weight, source[0].weight)


def test_weights_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_weights(Tiny(), tmp_path / "nope.pt")
    path = tmp_path / "w.pt"
    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3), "note": "hello"}, path)
    with pytest.raises(ModelError, match=r"\['note'\] are not tensors"):
        load_weights(Tiny(), path)
    path.write_bytes(b"garbage")  # torch itself says "KeyError: 103" (an unpickling opcode)
    with pytest.raises(ModelError, match=r"w.pt' is not a PyTorch checkpoint: it starts with the "
                                         r"bytes b'garbage'.*torch.save\(model.state_dict"):
        load_weights(Tiny(), path)
    path.write_bytes(b"")
    with pytest.raises(ModelError, match="is not a PyTorch checkpoint: it is empty"):
        load_weights(Tiny(), path)
    import zipfile
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "x")
    with pytest.raises(ModelError, match="not a PyTorch checkpoint: it is a zip archive without "
                                         "the data.pkl.*notes.txt"):
        load_weights(Tiny(), path)
    # both formats torch.save writes are still read: the zip archive and the legacy pickle
    for new_format in (True, False):
        torch.save(Tiny().state_dict(), path, _use_new_zipfile_serialization=new_format)
        load_weights(Tiny(), path)
    torch.save(Tiny(), path)              # a whole pickled module: refused, no code runs
    with pytest.raises(ModelError, match=r"pickled object \(.*Tiny\).*state_dict") as error:
        load_weights(Tiny(), path)
    assert "weights_only=False" not in str(error.value)   # we never advise running its code


# --------------------------------------------------------------------------- layers
def test_list_layers_shapes_and_unused() -> None:
    model = Tiny().train()
    layers = list_layers(model, input_size=(3, 8, 6))
    assert layers == [("conv", (4, 8, 6)), ("relu", (6, 4, 3)), ("features", (6, 4, 3)),
                      ("features.0", (6, 4, 3)), ("features.1", (6, 4, 3)), ("pool", (6, 1, 1)),
                      ("fc", (5,)), ("unused", None)]
    assert model.training and all(m.training for m in model.modules())
    rows = layer_table(model, 8)
    assert [r.calls for r in rows] == [1, 2, 1, 1, 1, 1, 1, 0]
    text = format_layer_table(rows).splitlines()
    assert text[0].split() == ["layer", "type", "output", "shape"]
    assert text[1].split() == ["conv", "Conv2d", "4x8x8"]
    assert "called 2x" in text[2] and text[-1].split()[:3] == ["unused", "Linear", "-"]
    assert "not called" in text[-1]


def test_list_layers_nested_torchvision_names() -> None:
    shapes = dict(list_layers(load_model("resnet18"), input_size=64))
    assert shapes["layer4.1.conv2"] == (512, 2, 2)
    assert shapes["fc"] == (1000,)
    assert dict(list_layers(load_model("squeezenet1_1"), input_size=64))["features.12"] == (
        512, 3, 3)


def test_probe_failure_is_model_error() -> None:
    with pytest.raises(ModelError, match="input size"):
        list_layers(Tiny(), input_size=(1, 8, 8))
    with pytest.raises(OptionError, match="--input-size"):
        list_layers(Tiny(), input_size=(3, 0, 8))
    with pytest.raises(OptionError, match="--input-size"):
        list_layers(Tiny(), input_size="big")
    assert [parse_input_size(v) for v in ("64", "32,48", "3x8x6", 5, (7, 9))] == [
        (3, 64, 64), (3, 32, 48), (3, 8, 6), (3, 5, 5), (3, 7, 9)]


def test_resolve_layers_exact_and_wildcards() -> None:
    model = load_model("resnet18")
    assert resolve_layers(model, "layer3") == ["layer3"]
    assert resolve_layers(model, ["layer*"]) == ["layer1", "layer2", "layer3", "layer4"]
    assert resolve_layers(model, ["layer4.*.conv?", "layer4.0.conv1"]) == [
        "layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
    assert resolve_layers(model, ["layer4.1.**"]) == [
        "layer4.1.conv1", "layer4.1.bn1", "layer4.1.relu", "layer4.1.conv2", "layer4.1.bn2"]
    with pytest.raises(LayerError, match="'layer9\\*' matches no layer"):
        resolve_layers(model, ["layer9*"])


def test_unknown_layer_lists_close_matches() -> None:
    model = load_model("resnet18")
    with pytest.raises(LayerError) as info:
        resolve_layers(model, ["layer4.1.conv"])
    message = str(info.value)
    assert "'layer4.1.conv'" in message and "layer4.1.conv1" in message
    assert "layer4.1.conv2" in message and "dissect layers MODEL" in message
    with pytest.raises(LayerError, match="top-level layers: conv1, bn1, relu, maxpool"):
        resolve_layers(model, ["zzzzzz"])
