"""The recorder: hooks, exact recorded values, token layouts, resume after SIGKILL, fingerprints."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dissect.data import BrodenDataset
from dissect.errors import CacheError, LayerError, OptionError
from dissect.record import (
    CacheReader,
    LayerRecorder,
    LayoutOptions,
    cache_path,
    open_cache,
    outputs_path,
    record_activations,
    resolve_device,
)
from dissect.record.trace import infer_patch_size, token_grid, tokens_to_maps

N_IMAGES = 10
HEIGHT, WIDTH = 16, 32  # non-square on purpose
ZERO = (0.0, 0.0, 0.0)
ONE = (1.0, 1.0, 1.0)
REPO = Path(__file__).resolve().parents[1]


def make_image_dataset(root: Path, n_images: int, height: int, width: int) -> Path:
    """A minimal Broden directory: random RGB images, one image-level scene label each."""
    (root / "images").mkdir(parents=True)

    def write(name: str, header: list[str], rows: list[list[Any]]) -> None:
        with open(root / name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)

    write("category.csv", ["name", "first", "last", "count", "frequency"],
          [["scene", 1, 2, 2, n_images]])
    write("label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
          [[0, "-", "", 0, 0, ""], [1, "a", "scene(1)", 1, 1.0, ""],
           [2, "b", "scene(2)", 1, 1.0, ""]])
    write("c_scene.csv", ["code", "number", "name", "frequency", "coverage"],
          [[1, 1, "a", 1, 1.0], [2, 2, "b", 1, 1.0]])
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_images):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"img{i}.png")
        rows.append([f"img{i}.png", "train", height, width, height // 2, width // 2, 1 + i % 2])
    write("index.csv", ["image", "split", "ih", "iw", "sh", "sw", "scene"], rows)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> BrodenDataset:
    root = make_image_dataset(tmp_path_factory.mktemp("rec") / "images10", N_IMAGES, HEIGHT, WIDTH)
    return BrodenDataset(root)


def pixels_01(dataset: BrodenDataset) -> np.ndarray:
    """(N, 3, H, W) float64 images on the 0..1 scale (mean 0, std 1 normalisation)."""
    return np.stack([dataset.load_image(i) for i in range(len(dataset))]).transpose(
        0, 3, 1, 2).astype(np.float64) / 255


class HandConv(nn.Module):
    """conv 2x2 stride 2 with hand-set weights: unit 0 = sum of the red 2x2 patch,
    unit 1 = 0.5 * (green - blue) at the patch's top-left pixel + 1; head: mean of unit 0."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 2, stride=2)
        self.relu = nn.ReLU()
        self.head = nn.Linear(2, 3)
        with torch.no_grad():
            weight = torch.zeros(2, 3, 2, 2)
            weight[0, 0] = 1.0
            weight[1, 1, 0, 0], weight[1, 2, 0, 0] = 0.5, -0.5
            self.conv.weight.copy_(weight * scale)
            self.conv.bias.copy_(torch.tensor([0.0, 1.0]) * scale)
            self.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
            self.head.bias.zero_()
        self.calls = 0
        self.fail_at: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("planned failure")
        maps = self.relu(self.conv(x))
        return self.head(maps.mean(dim=(2, 3)))


def hand_conv_expected(pixels: np.ndarray) -> np.ndarray:
    """(N, 2, H/2, W/2) float64: the HandConv conv output computed with NumPy."""
    red = pixels[:, 0]
    unit0 = red[:, 0::2, 0::2] + red[:, 1::2, 0::2] + red[:, 0::2, 1::2] + red[:, 1::2, 1::2]
    unit1 = 0.5 * (pixels[:, 1, 0::2, 0::2] - pixels[:, 2, 0::2, 0::2]) + 1.0
    return np.stack([unit0, unit1], axis=1)


def record(model: nn.Module | str, dataset: BrodenDataset, layers: Any, run_dir: Path,
           **options: Any) -> dict[str, Path]:
    settings: dict[str, Any] = dict(mean=ZERO, std=ONE, batch_size=4, num_workers=0,
                                    progress=False)
    settings.update(options)
    return record_activations(model, dataset, layers, run_dir, **settings)


def assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name


# --------------------------------------------------------------------------- values
def test_recorded_values_equal_hand_computation(dataset: BrodenDataset, tmp_path: Path) -> None:
    model = HandConv()
    paths = record(model, dataset, ["conv", "relu"], tmp_path, dtype="float32", logits=True,
                   num_workers=None)  # default: decoding in a worker process
    assert paths == {"conv": cache_path(tmp_path, "conv"), "relu": cache_path(tmp_path, "relu")}
    expected = hand_conv_expected(pixels_01(dataset))
    acts = CacheReader(paths["conv"]).read(0, N_IMAGES)
    assert acts.shape == (N_IMAGES, 2, HEIGHT // 2, WIDTH // 2)
    np.testing.assert_allclose(acts, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(CacheReader(paths["conv"], "amax").read(0, N_IMAGES),
                               expected.max(axis=(2, 3)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(CacheReader(paths["relu"]).read(0, N_IMAGES),
                               np.maximum(expected, 0), rtol=1e-6, atol=1e-6)
    means = np.maximum(expected, 0).mean(axis=(2, 3))
    logits = CacheReader(outputs_path(tmp_path), "logits").read(0, N_IMAGES)
    np.testing.assert_allclose(logits, np.stack([means[:, 0], means[:, 1],
                                                 means[:, 0] - means[:, 1]], 1), rtol=1e-5)
    # one probe forward at the dataset's size, then one pass: ceil(10 / 4) forwards for both
    # layers and the logits
    assert model.calls == 1 + 3
    info = open_cache(paths["conv"])
    assert (info.n_images, info.n_units, info.height, info.width, info.dtype) == (
        N_IMAGES, 2, HEIGHT // 2, WIDTH // 2, "float32")
    assert info.fingerprint["layer"] == "conv" and info.fingerprint["mean"] == [0.0, 0.0, 0.0]
    with h5py.File(paths["conv"]) as file:
        assert file["done"][:].tolist() == [True, True, True]
        assert file.attrs["n_written"] == N_IMAGES and bool(file.attrs["complete"])
        assert file.attrs["schema_version"] == 1
    assert not list(tmp_path.glob("cache/*.partial"))
    assert_no_hooks(model)


def test_float16_default_and_normalisation(dataset: BrodenDataset, tmp_path: Path) -> None:
    mean, std = (0.25, 0.5, 0.75), (0.5, 2.0, 4.0)
    paths = record(HandConv(), dataset, "conv", tmp_path, mean=mean, std=std, batch_size=3)
    normalised = (pixels_01(dataset) - np.array(mean)[:, None, None]) / np.array(std)[:, None,
                                                                                      None]
    with h5py.File(paths["conv"]) as file:
        assert file["acts"].dtype == np.float16 and file["amax"].dtype == np.float32
        assert file["acts"].compression is None
        assert file["done"].shape == (4,)  # ceil(10 / 3) blocks
        acts = file["acts"][:]
    np.testing.assert_allclose(acts, hand_conv_expected(normalised), rtol=1e-3, atol=1e-3)


def test_inplace_relu_after_batchnorm_keeps_negatives(dataset: BrodenDataset,
                                                      tmp_path: Path) -> None:
    class BatchNormReLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3, eps=0.0)
            self.relu = nn.ReLU(inplace=True)
            self.bn.running_mean.fill_(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.bn(x))

    paths = record(BatchNormReLU(), dataset, ["bn", "relu"], tmp_path, dtype="float32")
    expected = pixels_01(dataset) - 0.5
    bn = CacheReader(paths["bn"]).read(0, N_IMAGES)
    assert bn.min() < -0.4
    np.testing.assert_allclose(bn, expected, atol=1e-6)
    np.testing.assert_allclose(CacheReader(paths["relu"]).read(0, N_IMAGES),
                               np.maximum(expected, 0), atol=1e-6)


# --------------------------------------------------------------------------- hooks and modes
def test_logits_added_to_a_complete_run(dataset: BrodenDataset, tmp_path: Path) -> None:
    model = HandConv()
    paths = record(model, dataset, ["conv"], tmp_path)
    before = paths["conv"].stat().st_mtime_ns
    model.calls = 0
    record(model, dataset, ["conv"], tmp_path, logits=True)  # only the outputs are missing
    assert model.calls == 1 + 3 and paths["conv"].stat().st_mtime_ns == before  # probe + 3
    info = open_cache(outputs_path(tmp_path))
    assert (info.name, info.shape, info.dtype) == ("logits", (N_IMAGES, 3), "float32")
    assert info.fingerprint["layer"] == "outputs" and info.fingerprint["dtype"] == "float32"
    model.calls = 0
    record(model, dataset, ["conv"], tmp_path, logits=True)
    assert model.calls == 0


def test_hooks_removed_and_modes_restored_after_exception(dataset: BrodenDataset,
                                                          tmp_path: Path) -> None:
    model = HandConv()
    model.train()
    model.head.eval()  # mixed modes must come back exactly
    model.fail_at = 3  # the probe, block 0, then fails on block 1
    with pytest.raises(RuntimeError, match="planned failure"):
        record(model, dataset, ["conv", "relu"], tmp_path)
    assert_no_hooks(model)
    assert model.training and model.conv.training and not model.head.training
    partial = Path(f"{cache_path(tmp_path, 'conv')}.partial")
    with h5py.File(partial) as file:
        assert file["done"][:].tolist() == [True, False, False]
        assert file.attrs["n_written"] == 4 and not file.attrs["complete"]
    with pytest.raises(CacheError, match="interrupted.*dissect record"):
        open_cache(cache_path(tmp_path, "conv"))
    model.fail_at = None
    model.calls = 0
    record(model, dataset, ["conv", "relu"], tmp_path)  # resumes the two missing blocks
    assert model.calls == 1 + 2  # the probe and the two blocks
    assert open_cache(cache_path(tmp_path, "conv")).n_images == N_IMAGES


def test_layer_recorder_context_manager() -> None:
    model = HandConv()
    x = torch.rand(2, 3, 4, 4)
    with LayerRecorder(model, ["conv"]) as recorder:
        model(x)
        maps = recorder.maps()
        assert set(model.conv._forward_hooks) and set(model._forward_pre_hooks)
    assert_no_hooks(model)
    assert torch.equal(maps["conv"], model.conv(x).detach())
    with pytest.raises(ZeroDivisionError):
        with LayerRecorder(model, ["conv", "relu"]):
            raise ZeroDivisionError
    assert_no_hooks(model)


def test_layer_not_called_in_forward(dataset: BrodenDataset, tmp_path: Path) -> None:
    model = HandConv()
    model.spare = nn.Conv2d(3, 1, 1)
    with pytest.raises(LayerError, match=r"\['spare'\] were not called"):
        record(model, dataset, ["conv", "spare"], tmp_path)
    assert_no_hooks(model)


def test_unknown_layer_in_record(dataset: BrodenDataset, tmp_path: Path) -> None:
    with pytest.raises(LayerError, match="'cnv'.*close matches: conv.*dissect layers MODEL"):
        record(HandConv(), dataset, ["cnv"], tmp_path)
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- tokens
class TinyViT(nn.Module):
    """Patch embedding (conv p x p stride p), [class + register tokens, patches], identity block."""

    def __init__(self, patch: int = 4, dim: int = 3, n_leading: int = 1,
                 channel_last_stage: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.leading = nn.Parameter(torch.randn(1, n_leading, dim))
        self.blocks = nn.Identity()
        self.stage = nn.Identity()
        self.channel_last_stage = channel_last_stage
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(x)                                  # (B, C, h, w)
        if self.channel_last_stage:
            self.stage(patches.permute(0, 2, 3, 1))                    # (B, h, w, C)
        tokens = patches.flatten(2).transpose(1, 2)                    # (B, h * w, C), row-major
        tokens = torch.cat([self.leading.expand(len(x), -1, -1), tokens], dim=1)
        tokens = self.blocks(tokens)
        return self.head(tokens[:, 0])


@pytest.mark.parametrize("n_leading", [1, 5])
def test_token_layer_reshaped_in_patch_order(dataset: BrodenDataset, tmp_path: Path,
                                             n_leading: int) -> None:
    model = TinyViT(n_leading=n_leading)
    paths = record(model, dataset, ["patch_embed", "blocks"], tmp_path, dtype="float32")
    grid = CacheReader(paths["blocks"]).read(0, N_IMAGES)
    assert grid.shape == (N_IMAGES, 3, HEIGHT // 4, WIDTH // 4)  # non-square 4 x 8 grid
    np.testing.assert_array_equal(grid, CacheReader(paths["patch_embed"]).read(0, N_IMAGES))
    assert open_cache(paths["blocks"]).fingerprint["layout"]["layout"] == "auto"


def test_token_grid_inference() -> None:
    model = TinyViT(patch=2)
    assert LayerRecorder(model, ["blocks"]).model_patch_size == (2, 2)
    with pytest.raises(OptionError, match=r"layers \['head'\] that are not recorded"):
        LayerRecorder(model, ["blocks"], {"head": LayoutOptions()})
    # no patch size anywhere: grid of the input aspect ratio after dropping the fewest tokens
    assert token_grid(37, (16, 32), None, LayoutOptions()) == (5, 4, 8)
    assert token_grid(197, (224, 224), None, LayoutOptions()) == (1, 14, 14)
    assert token_grid(197, (224, 224), (16, 16), LayoutOptions()) == (1, 14, 14)
    assert token_grid(40, None, None, LayoutOptions(grid=(4, 8), drop_tokens=8)) == (8, 4, 8)
    with pytest.raises(LayerError, match="do not fit a 4x8 grid"):
        token_grid(40, None, None, LayoutOptions(grid=(4, 8), drop_tokens=1))
    with pytest.raises(LayerError, match="'blocks'.*drop_tokens"):
        token_grid(3, (16, 32), None, LayoutOptions(drop_tokens=0), layer="blocks")
    tokens = torch.arange(2 * 7 * 2).reshape(2, 7, 2)   # 1 leading token + 2 x 3 grid
    maps = tokens_to_maps(tokens, 1, 2, 3)
    assert maps.shape == (2, 2, 2, 3)
    assert maps[1, 0].tolist() == [[16, 18, 20], [22, 24, 26]]  # token 1 + i * 3 + j, channel 0
    assert maps[1, 1, 1, 2].item() == tokens[1, 6, 1].item()


def test_channel_last_layer(dataset: BrodenDataset, tmp_path: Path) -> None:
    model = TinyViT(channel_last_stage=True)
    paths = record(model, dataset, ["patch_embed", "stage"], tmp_path, dtype="float32",
                   layout={"stage": LayoutOptions(layout="nhwc")})
    np.testing.assert_array_equal(CacheReader(paths["stage"]).read(0, N_IMAGES),
                                  CacheReader(paths["patch_embed"]).read(0, N_IMAGES))
    with pytest.raises(OptionError, match="layout"):
        LayoutOptions(layout="nwhc")


def test_torchvision_vit_token_layer() -> None:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=1,
                              hidden_dim=4, mlp_dim=8).eval()
    assert infer_patch_size(model) == (8, 8)
    raw: list[torch.Tensor] = []
    layer = model.encoder.layers.encoder_layer_0
    handle = layer.register_forward_hook(lambda m, i, o: raw.append(o.detach().clone()))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), LayerRecorder(model, ["encoder.layers.encoder_layer_0"]) as recorder:
        model(x)
    handle.remove()
    maps = recorder.maps()["encoder.layers.encoder_layer_0"]
    assert raw[0].shape == (2, 5, 4) and maps.shape == (2, 4, 2, 2)
    for i in range(2):
        for j in range(2):
            assert torch.equal(maps[:, :, i, j], raw[0][:, 1 + 2 * i + j, :])


def test_token_layout_options_are_parameters_and_stored(dataset: BrodenDataset,
                                                        tmp_path: Path) -> None:
    from dissect.record import TOKEN_LAYOUTS

    assert TOKEN_LAYOUTS == ("auto", "nchw", "nhwc", "tokens")
    model = TinyViT(n_leading=2)
    paths = record(model, dataset, ["patch_embed", "blocks"], tmp_path / "auto", dtype="float32")
    # the layout actually used is stored with each cache (for run.json and the report)
    assert open_cache(paths["blocks"]).unit_layout == {
        "layout": "tokens", "output_shape": [2 + 32, 3], "units": 3, "grid": [4, 8],
        "drop_tokens": 2}
    assert open_cache(paths["patch_embed"]).unit_layout == {
        "layout": "nchw", "output_shape": [3, 4, 8], "units": 3, "grid": [4, 8],
        "drop_tokens": 0}
    # the same choices as explicit parameters: in the fingerprint, same maps
    explicit = record(model, dataset, ["blocks"], tmp_path / "explicit", dtype="float32",
                      layout="tokens", drop_tokens=2, token_grid=(4, 8), patch_size=4)
    assert open_cache(explicit["blocks"]).fingerprint["layout"] == {
        "layout": "tokens", "drop_tokens": 2, "grid": [4, 8], "patch_size": [4, 4]}
    np.testing.assert_array_equal(CacheReader(explicit["blocks"]).read(0, N_IMAGES),
                                  CacheReader(paths["blocks"]).read(0, N_IMAGES))
    # a grid that does not fit is refused before any file is written
    with pytest.raises(LayerError, match="'blocks': 34 tokens do not fit a 4x4 grid after "
                                         "dropping 2 leading tokens"):
        record(model, dataset, ["blocks"], tmp_path / "bad", layout="tokens", token_grid=(4, 4),
               drop_tokens=2)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(OptionError, match="layout: got 'token'"):
        record(model, dataset, ["blocks"], tmp_path / "bad", layout="token")
    with pytest.raises(OptionError, match="drop_tokens given beside LayoutOptions"):
        record(model, dataset, ["blocks"], tmp_path / "bad", layout=LayoutOptions(),
               drop_tokens=1)


class Needs224(nn.Module):
    """Refuses any input but 224x224 and does not say so in an attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (224, 224):
            raise ValueError(f"bad input {tuple(x.shape)}")
        return self.conv(x).mean(dim=(2, 3))


def test_fixed_input_size_is_probed_before_any_work(dataset: BrodenDataset,
                                                    tmp_path: Path) -> None:
    from torchvision.models import VisionTransformer

    from dissect.errors import ModelError
    from dissect.record import SmallMapsWarning, check_input_size

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=1,
                            hidden_dim=4, mlp_dim=8)
    layer = "encoder.layers.encoder_layer_0"
    message = (r"model torchvision.models.vision_transformer.VisionTransformer expects 32x32 "
               r"input images, but the images are 16x32 .*: pass --resize 32 \(resize=32\)")
    with pytest.raises(ModelError, match=message):
        record(vit, dataset, [layer], tmp_path)
    assert not (tmp_path / "cache").exists()      # refused before any cache file
    assert_no_hooks(vit)
    with pytest.raises(ModelError, match=message):
        check_input_size(vit, (16, 32), [layer])
    with pytest.warns(SmallMapsWarning, match=r"'encoder.layers.encoder_layer_0' has 2x2 unit "
                                              r"maps at the image size 32x32 \(segmentations "
                                              r"8x16\).*--resize 64"):
        paths = record(vit, dataset, [layer], tmp_path, resize=32)
    assert open_cache(paths[layer]).shape == (N_IMAGES, 4, 2, 2)
    assert open_cache(paths[layer]).unit_layout["drop_tokens"] == 1
    # no stated size: a model that works at 224x224 is named with that size
    with pytest.raises(ModelError, match=r"Needs224 expects 224x224 input images, but the images "
                                         r"are 16x32.*--resize 224.*bad input \(1, 3, 16, 32\)"):
        check_input_size(Needs224(), (16, 32), ["conv"])
    probe = check_input_size(Needs224(), 224, ["conv"])
    assert probe.shapes == {"conv": (2, 224, 224)} and probe.calls == {"conv": 1}
    assert probe.notes == ()
    # a model that fails at every size: its own reason, and a pointer to --resize
    class Broken(HandConv):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("planned failure")

    with pytest.raises(ModelError, match=r"Broken failed on a 16x32 input image .*: planned "
                                         r"failure. If it needs another input size, pass --resize"):
        check_input_size(Broken(), (16, 32), ["conv"])


def test_small_maps_get_a_note(dataset: BrodenDataset) -> None:
    from dissect.record import SmallMapsWarning, check_input_size

    model = TinyViT(patch=8)              # 16x32 images: a 2x4 token grid, segmentations 8x16
    with pytest.warns(SmallMapsWarning) as caught:
        probe = check_input_size(model, (16, 32), ["patch_embed", "blocks"], seg_size=(8, 16))
    assert len(caught) == 2 and probe.notes == tuple(str(w.message) for w in caught)
    assert probe.notes[1].startswith("layer 'blocks' has 2x4 unit maps at the image size 16x32 "
                                     "(segmentations 8x16)")
    assert "--resize 32,64" in probe.notes[1]
    assert probe.layouts["blocks"]["layout"] == "tokens"
    # maps as fine as the segmentation, or larger than 4x4, get no note
    assert check_input_size(model, (16, 32), ["blocks"], seg_size=(2, 4), warn=False).notes == ()
    assert check_input_size(TinyViT(patch=4), (16, 32), ["blocks"], seg_size=(8, 16)).notes == ()
    # pooled (B, C) features: no --resize advice, it would not help
    with pytest.warns(SmallMapsWarning, match=r"'head' has 1x1 unit maps \(output \(2,\)\): no "
                                              r"spatial resolution.*before the pooling"):
        check_input_size(model, (16, 32), ["head"], seg_size=(8, 16))


class SharedRelu(nn.Module):
    """conv -> relu -> conv2 -> relu (the same module twice) -> head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv2(self.relu(self.conv(x))))
        return self.head(x.mean(dim=(2, 3)))


def _caches_equal(a: Path, b: Path) -> None:
    with h5py.File(a) as first, h5py.File(b) as second:
        assert set(first) == set(second)
        for key in first:
            np.testing.assert_array_equal(first[key][:], second[key][:])
        assert dict(first.attrs) == dict(second.attrs)


@pytest.mark.parametrize("layers", [["conv"], ["relu"], ["conv2", "conv"]])
def test_forward_stops_after_the_last_recorded_layer(dataset: BrodenDataset, tmp_path: Path,
                                                     layers: list[str]) -> None:
    model = SharedRelu()
    called: dict[str, int] = {}
    handles = [getattr(model, name).register_forward_pre_hook(
        lambda m, i, name=name: called.__setitem__(name, called.get(name, 0) + 1))
        for name in ("conv2", "head")]
    try:
        stopped = record(model, dataset, layers, tmp_path / "stopped")
        after_stop = dict(called)
        called.clear()
        full = record(model, dataset, layers, tmp_path / "full", stop_early=False)
        after_full = dict(called)
    finally:
        for handle in handles:
            handle.remove()
    for layer in layers:
        _caches_equal(stopped[layer], full[layer])
    blocks = 3                              # 10 images in blocks of 4, plus the probe forward
    assert after_full == {"conv2": 1 + blocks, "head": 1 + blocks}
    # the head never runs in a stopped forward; conv2 only when a recorded layer needs it (the
    # shared relu is recorded from its last call, after conv2)
    runs_conv2 = layers != ["conv"]
    assert after_stop == {"conv2": 1 + blocks * runs_conv2, "head": 1} if runs_conv2 else \
        after_stop == {"conv2": 1, "head": 1}
    assert_no_hooks(model)


def test_logits_need_the_whole_forward(dataset: BrodenDataset, tmp_path: Path) -> None:
    model = HandConv()
    called = []
    handle = model.head.register_forward_pre_hook(lambda m, i: called.append(1))
    try:
        record(model, dataset, ["conv"], tmp_path, logits=True)
    finally:
        handle.remove()
    assert len(called) == 1 + 3
    assert open_cache(outputs_path(tmp_path)).shape == (N_IMAGES, 3)


def test_torchscript_layers_are_refused_before_any_work(dataset: BrodenDataset,
                                                        tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "model.ts"
    with pytest.warns(FutureWarning):  # torch.jit.script is deprecated upstream
        torch.jit.save(torch.jit.script(nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())), str(path))
    with pytest.raises(LayerError, match=r"layer '0' is part of a TorchScript model, whose inner "
                                         r"layers cannot be hooked; record from the Python "
                                         r"model.*--weights"):
        record(str(path), dataset, ["0"], tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_token_layer_ablation_changes_patch_tokens_only(dataset: BrodenDataset,
                                                       tmp_path: Path) -> None:
    from dissect.ablation.hooks import (
        ablate_unit_sets,
        ablate_units,
        compute_unit_means,
        token_drop,
    )

    model = TinyViT(n_leading=2).eval()   # the head reads token 0, a leading (class) token
    paths = record(model, dataset, ["blocks"], tmp_path, dtype="float32")
    drop = token_drop(open_cache(paths["blocks"]).unit_layout)
    assert drop == 2 and token_drop({"layout": "nchw", "drop_tokens": 0}) is None
    x = torch.randn(3, 3, HEIGHT, WIDTH)
    with torch.no_grad(), LayerRecorder(model, ["blocks"]) as recorder:
        base = model(x)
    base_maps = recorder.maps()["blocks"]
    with torch.no_grad(), ablate_units(model, "blocks", [0, 2], drop_tokens=drop), \
            LayerRecorder(model, ["blocks"]) as recorder:
        out = model(x)
    maps = recorder.maps()["blocks"]          # the recorder sees the ablated output
    assert torch.equal(out, base)             # the class token is left as it is
    assert torch.all(maps[:, [0, 2]] == 0) and torch.equal(maps[:, 1], base_maps[:, 1])
    with torch.no_grad(), ablate_units(model, "blocks", [0], drop_tokens=0):
        assert not torch.equal(model(x), base)  # with no leading token, token 0 is a patch
    with pytest.raises(LayerError, match=r"'blocks' gives \(3, 34, 3\).*drop_tokens"):
        with torch.no_grad(), ablate_units(model, "blocks", [0]):
            model(x)
    # S sets in one forward == one set at a time; rule 'mean' fills with the cache means
    masks = np.array([[True, False, False], [False, True, True]])
    means = compute_unit_means(CacheReader(paths["blocks"]))
    with torch.no_grad(), ablate_unit_sets(model, "blocks", masks, rule="mean", means=means,
                                           drop_tokens=drop), \
            LayerRecorder(model, ["blocks"]) as recorder:
        model(x.repeat(2, 1, 1, 1))
    batched = recorder.maps()["blocks"]
    for s, units in enumerate(([0], [1, 2])):
        with torch.no_grad(), ablate_units(model, "blocks", units, rule="mean", means=means,
                                           drop_tokens=drop), \
                LayerRecorder(model, ["blocks"]) as recorder:
            model(x)
        assert torch.equal(batched[3 * s:3 * s + 3], recorder.maps()["blocks"])
    assert torch.allclose(batched[3:, 1], torch.full_like(batched[3:, 1], float(means[1])))
    assert_no_hooks(model)


# --------------------------------------------------------------------------- resume, fingerprints
KILL_MODEL = """
import os
import signal
import time
import torch
from torch import nn


def build() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 2, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    kill_at = int(os.environ.get("DISSECT_TEST_KILL_AT", "0"))
    calls = [0]

    def count(module, inputs):
        calls[0] += 1
        if calls[0] == kill_at:
            time.sleep(float(os.environ.get("DISSECT_TEST_KILL_DELAY", "0")))
            os.kill(os.getpid(), signal.SIGKILL)

    model.register_forward_pre_hook(count)
    model.calls = calls
    return model
"""

KILL_SCRIPT = """
import sys
from dissect.record import record_activations
record_activations("killmodel_for_test:build", sys.argv[1], ["0", "2"], sys.argv[2],
                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), batch_size=3, logits=True,
                   num_workers=0, progress=False)
"""


@pytest.mark.parametrize("delay", [1.0, 0.0])
def test_resume_after_sigkill_equals_uninterrupted_run(dataset: BrodenDataset, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       delay: float) -> None:
    (tmp_path / "killmodel_for_test.py").write_text(KILL_MODEL)
    script = tmp_path / "record_and_die.py"
    script.write_text(KILL_SCRIPT)
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    # killed as the 3rd forward pass of the images begins (after the probe forward); a pause first lets the background writer land the
    # two blocks already computed, without it any prefix of them may be done (or a write cut)
    env = dict(os.environ, DISSECT_TEST_KILL_AT="4", DISSECT_TEST_KILL_DELAY=str(delay),
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    result = subprocess.run([sys.executable, str(script), str(dataset.root), str(killed)],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    for name in ("0", "2", "outputs"):
        partial = killed / "cache" / f"{name}.h5.partial"
        assert not (killed / "cache" / f"{name}.h5").exists()
        if delay:
            with h5py.File(partial) as file:
                assert file["done"][:].tolist() == [True, True, False, False]
                assert file.attrs["n_written"] == 6
    missing = 2
    if not delay:  # written in order: done is a prefix of the two computed blocks
        try:
            with h5py.File(killed / "cache" / "0.h5.partial") as file:
                done = file["done"][:].tolist()
        except (OSError, KeyError):  # killed inside an HDF5 write: unreadable, redone
            done = [False] * 4
        assert done in ([False] * 4, [True] + [False] * 3, [True, True, False, False])
        missing = 4 - sum(done)
    monkeypatch.syspath_prepend(str(tmp_path))
    from dissect.record import load_model

    options: dict[str, Any] = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), batch_size=3,
                                   logits=True, model_spec="killmodel_for_test:build")
    try:
        model = load_model("killmodel_for_test:build")
        record(model, dataset.root, ["0", "2"], killed, **options)
        if delay:
            assert model.calls[0] == 1 + missing  # the probe and the two missing blocks
        else:  # layer 0's missing blocks at least; other files may have landed fewer
            assert 1 + missing <= model.calls[0] <= 1 + 4
        record(load_model("killmodel_for_test:build"), dataset, ["0", "2"], fresh, **options)
    finally:
        sys.modules.pop("killmodel_for_test", None)
    for name in ("0", "2", "outputs"):
        with h5py.File(killed / "cache" / f"{name}.h5") as a, \
                h5py.File(fresh / "cache" / f"{name}.h5") as b:
            assert set(a) == set(b)
            for key in a:
                np.testing.assert_array_equal(a[key][:], b[key][:])
            assert dict(a.attrs) == dict(b.attrs)
            assert bool(a.attrs["complete"]) and a.attrs["n_written"] == N_IMAGES


def test_fingerprint_mismatch_names_field_and_force_rebuilds(dataset: BrodenDataset,
                                                             tmp_path: Path) -> None:
    model = HandConv()
    record(model, dataset, ["conv"], tmp_path, dtype="float32")
    with pytest.raises(CacheError) as info:
        record(model, dataset, ["conv"], tmp_path, dtype="float32", mean=(0.5, 0.0, 0.0))
    message = str(info.value)
    assert "changed: mean ([0.0, 0.0, 0.0] -> [0.5, 0.0, 0.0])" in message
    assert "--force" in message and "std" not in message.split("changed:")[1]
    with pytest.raises(CacheError, match="changed: dtype"):
        record(model, dataset, ["conv"], tmp_path, dtype="float16")
    other = HandConv()
    with torch.no_grad():
        other.conv.bias.add_(1.0)
    with pytest.raises(CacheError, match="changed: weights"):
        record(other, dataset, ["conv"], tmp_path, dtype="float32")
    model.calls = 0
    record(model, dataset, ["conv"], tmp_path, dtype="float32")  # same settings: reused
    assert model.calls == 0
    record(other, dataset, ["conv"], tmp_path, dtype="float32", force=True)
    expected = hand_conv_expected(pixels_01(dataset))
    expected += 1.0  # both biases
    np.testing.assert_allclose(CacheReader(cache_path(tmp_path, "conv")).read(0, N_IMAGES),
                               expected, atol=1e-5)


def test_partial_with_other_batch_size_resumes_with_its_own(dataset: BrodenDataset,
                                                             tmp_path: Path) -> None:
    model = HandConv()
    model.fail_at = 3  # probe; batch 4: block 0 of 3 written, then killed
    with pytest.raises(RuntimeError):
        record(model, dataset, ["conv"], tmp_path, dtype="float32")
    model.fail_at, model.calls = None, 0
    record(model, dataset, ["conv"], tmp_path, dtype="float32", batch_size=5)
    assert model.calls == 1 + 2  # probe + the two missing blocks of 4, not blocks of 5
    info = open_cache(cache_path(tmp_path, "conv"))
    assert info.fingerprint["batch_size"] == 4
    np.testing.assert_allclose(CacheReader(cache_path(tmp_path, "conv")).read(0, N_IMAGES),
                               hand_conv_expected(pixels_01(dataset)), atol=1e-5)
    model.calls = 0
    record(model, dataset, ["conv"], tmp_path, batch_size=5, force=True)
    assert model.calls == 1 + 2
    assert open_cache(cache_path(tmp_path, "conv")).fingerprint["batch_size"] == 5


def test_partials_begun_with_different_batch_sizes_are_named(dataset: BrodenDataset,
                                                             tmp_path: Path) -> None:
    model = HandConv()
    for layer, batch in (("conv", 4), ("relu", 3)):
        model.fail_at, model.calls = 3, 0  # probe, block 0, fails
        with pytest.raises(RuntimeError):
            record(model, dataset, [layer], tmp_path, batch_size=batch)
    model.fail_at = None
    with pytest.raises(CacheError, match=r"different batch sizes \[3, 4\].*--force"):
        record(model, dataset, ["conv", "relu"], tmp_path)


def test_complete_cache_is_reused_whatever_the_batch_size(dataset: BrodenDataset,
                                                          tmp_path: Path) -> None:
    model = HandConv()
    paths = record(model, dataset, ["conv"], tmp_path, batch_size=3, logits=True)
    before = {p: p.read_bytes() for p in (paths["conv"], outputs_path(tmp_path))}
    model.calls = 0
    again = record(model, dataset, ["conv"], tmp_path, batch_size=8, logits=True)
    assert model.calls == 0 and again == paths  # nothing recomputed
    assert {p: p.read_bytes() for p in before} == before  # same arrays, files untouched
    # another field than the batch size still refuses the cache
    with pytest.raises(CacheError, match="changed: dtype"):
        record(model, dataset, ["conv"], tmp_path, batch_size=8, dtype="float32")


# --------------------------------------------------------------------------- options
def test_float16_overflow_suggests_float32(dataset: BrodenDataset, tmp_path: Path) -> None:
    model = HandConv(scale=1e5)
    with pytest.raises(OptionError, match=r"layer 'conv'.*float16 range.*--dtype float32"):
        record(model, dataset, ["conv"], tmp_path)
    paths = record(model, dataset, ["conv"], tmp_path / "f32", dtype="float32")
    assert CacheReader(paths["conv"], "amax").read(0, N_IMAGES).max() > 1e5


def test_disk_space_checked_before_writing(dataset: BrodenDataset, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("dissect.record.cache.shutil.disk_usage",
                        lambda path: usage._replace(free=100))
    with pytest.raises(CacheError, match=r"0\.00 GB needed.*free"):
        record(HandConv(), dataset, ["conv"], tmp_path)
    assert not list((tmp_path / "cache").glob("*"))


def test_option_errors(dataset: BrodenDataset, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="--dtype"):
        record(HandConv(), dataset, ["conv"], tmp_path, dtype="float64")
    with pytest.raises(OptionError, match="compression"):
        record(HandConv(), dataset, ["conv"], tmp_path, compression="zip")
    with pytest.raises(OptionError, match="--batch-size"):
        record(HandConv(), dataset, ["conv"], tmp_path, batch_size=0)
    with pytest.raises(OptionError, match="autocast"):
        record(HandConv(), dataset, ["conv"], tmp_path, autocast="int8")
    with pytest.raises(OptionError, match="--device"):
        resolve_device("tpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="CUDA is not available"):
            resolve_device("cuda")


def test_autocast_channels_last_and_lzf(dataset: BrodenDataset, tmp_path: Path) -> None:
    reference = record(HandConv(), dataset, ["conv"], tmp_path / "ref", dtype="float32")
    paths = record(HandConv(), dataset, ["conv"], tmp_path / "amp", dtype="float32",
                   autocast="bfloat16", channels_last=True, compression="lzf")
    expected = CacheReader(reference["conv"]).read(0, N_IMAGES)
    np.testing.assert_allclose(CacheReader(paths["conv"]).read(0, N_IMAGES), expected,
                               rtol=2e-2, atol=2e-2)
    with h5py.File(paths["conv"]) as file:
        assert file["acts"].compression == "lzf"
    assert open_cache(paths["conv"]).fingerprint["autocast"] == "bfloat16"


def test_model_spec_string_and_dataset_path(dataset: BrodenDataset, tmp_path: Path) -> None:
    paths = record("squeezenet1_1", dataset.root, ["features.0"], tmp_path, batch_size=8,
                   resize=(32, 64))
    info = open_cache(paths["features.0"])
    assert info.fingerprint["model"] == "squeezenet1_1"
    assert info.fingerprint["resize"] == [32, 64]
    assert info.shape == (N_IMAGES, 64, 15, 31)


def test_toy_model_on_toy_dataset_matches_direct_forward(toy_dataset: Path,
                                                         tmp_path: Path) -> None:
    from dissect.data import IMAGENET_MEAN, IMAGENET_STD, make_loader
    from dissect.record import load_model

    paths = record("dissect.toy:toy_model", toy_dataset, ["conv3", "conv4"], tmp_path,
                   mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size=16, dtype="float32")
    model = load_model("dissect.toy:toy_model")  # same fixed-seed initialisation
    toy = BrodenDataset(toy_dataset)
    images = torch.cat([x for x, _ in make_loader(toy, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                                  batch_size=48, num_workers=0)])
    outputs: dict[str, torch.Tensor] = {}
    handles = [getattr(model, name).register_forward_hook(
        lambda m, i, o, name=name: outputs.__setitem__(name, o.detach().clone()))
        for name in ("conv3", "conv4")]
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    for name in ("conv3", "conv4"):
        acts = CacheReader(paths[name]).read(0, len(toy))
        assert acts.shape == tuple(outputs[name].shape)
        np.testing.assert_allclose(acts, outputs[name].numpy(), rtol=1e-5, atol=1e-5)
    assert open_cache(paths["conv3"]).fingerprint["model"] == "dissect.toy:toy_model"


# --------------------------------------------------------------------------- background writer
def test_background_writer_runs_jobs_in_order_and_waits_for_them() -> None:
    from dissect.record.recorder import BackgroundWriter

    ran: list[tuple[int, str]] = []
    with BackgroundWriter(depth=1) as background:
        for i in range(5):
            background.submit(lambda i=i: ran.append((i, threading.current_thread().name)))
    assert [i for i, _ in ran] == [0, 1, 2, 3, 4]
    assert all(name == "dissect-cache-writer" for _, name in ran)


def test_background_writer_raises_a_failed_job_and_drops_later_ones() -> None:
    from dissect.record.recorder import BackgroundWriter

    ran: list[int] = []

    def fail() -> None:
        raise CacheError("disk full")

    with pytest.raises(CacheError, match="disk full"):  # raised on leaving the block
        with BackgroundWriter() as background:
            background.submit(fail)
            background.submit(lambda: ran.append(1))
    assert ran == []
    gate = threading.Event()
    with pytest.raises(CacheError, match="disk full"):  # or by the next submit
        with BackgroundWriter() as background:
            background.submit(fail)
            background.submit(gate.set)
            gate.wait(0.2)  # dropped: never set
            for _ in range(50):
                background.submit(lambda: None)
                time.sleep(0.01)
    assert not gate.is_set()


def test_background_writer_finishes_queued_jobs_when_the_caller_fails() -> None:
    from dissect.record.recorder import BackgroundWriter

    ran: list[int] = []
    with pytest.raises(KeyError):
        with BackgroundWriter(depth=3) as background:
            for i in range(3):
                background.submit(lambda i=i: (time.sleep(0.02), ran.append(i)))
            raise KeyError("caller")
    assert ran == [0, 1, 2]
