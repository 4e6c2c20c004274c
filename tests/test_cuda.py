"""The CUDA path (issue 19): recorder, tally and ablation suffix on a GPU equal the CPU path.

Every test here is marked ``cuda`` and skipped without a CUDA device (``pytest -m cuda`` runs
them on a GPU machine; ``scripts/gpu_session.sh`` does). Exact comparisons use
:class:`DyadicNet`, whose inputs and weights are small dyadic rationals: every sum of its
convolutions is exact in float32 whatever the order or algorithm (FFT convolutions aside), so the
CPU and the GPU must give the same bits, and any difference is a data-path bug (a block written
before its copy finished, a wrong layout, a wrong row). A trained-size model (the toy CNN) is
compared within one float16 step, since cuDNN and the CPU sum in other orders.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from dissect.config import IMAGENET_MEAN, IMAGENET_STD
from dissect.record import CacheReader, load_model, open_cache, record_activations

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MEAN, STD = IMAGENET_MEAN, IMAGENET_STD
BATCH = 20  # 48 toy images: blocks of 20, 20 and 8 (a short last block)


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 off for matmuls and cuDNN convolutions during a test (restored afterwards)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


class Sleep(nn.Module):
    """Keeps the GPU busy for ``cycles`` clock cycles on the current stream (identity)."""

    def __init__(self, cycles: int) -> None:
        super().__init__()
        self.cycles = int(cycles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cycles and x.is_cuda:
            torch.cuda._sleep(self.cycles)
        return x


class DyadicNet(nn.Module):
    """A small CNN whose arithmetic is exact in float32.

    Inputs are rounded to multiples of 1/2 (|x| <= 3 for ImageNet-normalised images), weights
    are integers in [-2, 2] / 8 and biases multiples of 1/4: ``conv1`` values are multiples of
    1/16 below 2^9, ``conv2`` values multiples of 1/128 below 2^16, far inside float32's 24 bits.

    Layers: ``quant`` (B, 3, H, W), ``sleep`` (identity, optionally busy on the GPU), ``conv1``
    (B, 8, H, W), ``relu``, ``pool`` (B, 8, H/2, W/2), ``conv2`` (B, 16, H/2, W/2), ``head``.
    """

    def __init__(self, seed: int = 0, sleep_cycles: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.sleep = Sleep(sleep_cycles)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.weight.copy_(torch.randint(-2, 3, conv.weight.shape,
                                                generator=generator) / 8)
                conv.bias.copy_(torch.randint(-4, 5, conv.bias.shape, generator=generator) / 4)
            self.head.weight.copy_(torch.randint(-2, 3, self.head.weight.shape,
                                                 generator=generator) / 8)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.round(x * 2) / 2
        x = self.sleep(x)
        x = self.pool(self.relu(self.conv1(x)))
        x = self.conv2(x)
        return self.head(x.mean(dim=(2, 3)))


def record(model: nn.Module, dataset: Path, run_dir: Path, layers: list[str], device: str,
           **options) -> dict[str, Path]:
    options.setdefault("dtype", "float16")
    return record_activations(model, dataset, layers, run_dir, mean=MEAN, std=STD,
                              batch_size=BATCH, device=device, progress=False, num_workers=0,
                              model_spec="test", **options)


def read_cache(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as handle:
        return {name: handle[name][()] for name in ("acts", "amax", "done")}


def assert_same_cache(first: Path, second: Path) -> None:
    """Two complete caches with identical arrays (bits) and fingerprints."""
    a, b = read_cache(first), read_cache(second)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name]), \
            f"{name}: {int((a[name] != b[name]).sum())} of {a[name].size} values differ"
    assert open_cache(first).fingerprint == open_cache(second).fingerprint


# --- recorder -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_cuda_cache_equals_cpu_cache_exactly(toy_dataset, tmp_path, dtype):
    """Same bits on both devices where the arithmetic is exact, for every block (short last
    block included) and both layers; the fingerprint does not depend on the device."""
    layers = ["conv1", "conv2"]
    cpu = record(DyadicNet(), toy_dataset, tmp_path / "cpu", layers, "cpu", dtype=dtype)
    gpu = record(DyadicNet(), toy_dataset, tmp_path / "gpu", layers, "cuda", dtype=dtype)
    for layer in layers:
        assert_same_cache(cpu[layer], gpu[layer])
        assert read_cache(gpu[layer])["acts"].std() > 0  # not a degenerate all-equal cache


def test_cuda_cache_of_toy_cnn_within_one_float16_step(toy_dataset, tmp_path):
    """A model with inexact sums: the CUDA float16 cache is within one float16 step of the CPU
    one (cuDNN sums in another order; TF32 off)."""
    layers = ["conv3", "conv4"]
    cpu = record(load_model("dissect.toy:toy_model"), toy_dataset, tmp_path / "cpu", layers,
                 "cpu")
    gpu = record(load_model("dissect.toy:toy_model"), toy_dataset, tmp_path / "gpu", layers,
                 "cuda")
    for layer in layers:
        a, b = read_cache(cpu[layer])["acts"], read_cache(gpu[layer])["acts"]
        step = np.spacing(np.maximum(np.abs(a), np.abs(b)))
        assert (np.abs(a.astype(np.float32) - b.astype(np.float32))
                <= step.astype(np.float32)).all()
        assert (a == b).mean() > 0.9
        amax_a, amax_b = read_cache(cpu[layer])["amax"], read_cache(gpu[layer])["amax"]
        np.testing.assert_allclose(amax_a, amax_b, rtol=1e-5, atol=1e-6)


def test_channels_last_records_the_same_cache(toy_dataset, tmp_path):
    """channels_last on CUDA: same bits as the contiguous recording (exact model)."""
    plain = record(DyadicNet(), toy_dataset, tmp_path / "plain", ["conv2"], "cuda",
                   dtype="float32")
    last = record(DyadicNet(), toy_dataset, tmp_path / "last", ["conv2"], "cuda",
                  dtype="float32", channels_last=True)
    assert_same_cache(plain["conv2"], last["conv2"])


@pytest.mark.parametrize("autocast", ["bfloat16", "float16"])
def test_autocast_records_close_to_float32(toy_dataset, tmp_path, autocast):
    """Autocast on CUDA (with and without channels_last) records a complete, finite cache close
    to the float32 forward (bfloat16 keeps 8 bits: within 5% of the layer's largest value)."""
    reference = record(load_model("dissect.toy:toy_model"), toy_dataset, tmp_path / "ref",
                       ["conv4"], "cuda", dtype="float32")["conv4"]
    expected = read_cache(reference)["acts"]
    for channels_last in (False, True):
        path = record(load_model("dissect.toy:toy_model"), toy_dataset,
                      tmp_path / f"{autocast}-{channels_last}", ["conv4"], "cuda",
                      autocast=autocast, channels_last=channels_last)["conv4"]
        info = open_cache(path)
        assert info.n_images == 48 and info.fingerprint["autocast"] == autocast
        acts = read_cache(path)["acts"].astype(np.float32)
        assert acts.shape == expected.shape and np.isfinite(acts).all()
        assert np.abs(acts - expected).max() <= 0.05 * np.abs(expected).max()
        assert read_cache(path)["done"].all()


# --- the writer thread waits for the copies -------------------------------------------------

SLEEP_CYCLES = 50_000_000  # about 25 ms at 2 GHz per batch: the copies finish long after queuing


def _record_on_side_stream(dataset: Path, run_dir: Path) -> Path:
    """Record DyadicNet's conv2 with the forward queued on a non-default stream, the GPU kept
    busy before the layer: the hooks' copies finish long after the batch was handed to the
    writer thread, whose own device-to-host copies run on the default stream.

    Memory the side stream gets from the caching allocator is first filled with NaN, so a block
    read before its copy finished cannot hold the right values by chance (stale memory of an
    earlier identical recording).
    """
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    with torch.cuda.stream(side):
        scrub = torch.full((64 * 2**20,), float("nan"), device="cuda")  # 256 MB, then cached
        del scrub
        paths = record(DyadicNet(sleep_cycles=SLEEP_CYCLES), dataset, run_dir, ["conv2"],
                       "cuda", dtype="float32")
    side.synchronize()
    return paths["conv2"]


def test_writer_waits_for_the_copy_of_each_block(toy_dataset, tmp_path):
    expected = record(DyadicNet(), toy_dataset, tmp_path / "cpu", ["conv2"], "cpu",
                      dtype="float32")["conv2"]
    assert_same_cache(expected, _record_on_side_stream(toy_dataset, tmp_path / "gpu"))


class _NoEvent:
    """A CUDA event that records nothing and waits for nothing."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, *args, **kwargs) -> None:
        pass


def test_writer_test_fails_without_the_event(toy_dataset, tmp_path, monkeypatch):
    """The test above has teeth: with the recorder's event made a no-op, the cache written from
    the side stream is not the CPU cache (the writer read blocks before their copies ended)."""
    expected = read_cache(record(DyadicNet(), toy_dataset, tmp_path / "cpu", ["conv2"], "cpu",
                                 dtype="float32")["conv2"])
    monkeypatch.setattr(torch.cuda, "Event", _NoEvent)
    got = read_cache(_record_on_side_stream(toy_dataset, tmp_path / "gpu"))
    assert not np.array_equal(got["acts"], expected["acts"])


# --- tally ----------------------------------------------------------------------------------

def test_cuda_counts_equal_cpu_counts(toy_dataset, tmp_path):
    """dissect_layer on the GPU gives the same thresholds and the same integer counts as on the
    CPU, for every union rule (toy CNN float16 caches: 8x8 maps onto 32x32 label maps)."""
    from dissect.data import BrodenDataset
    from dissect.tally import dissect_layer

    paths = record(load_model("dissect.toy:toy_model"), toy_dataset, tmp_path / "run",
                   ["conv3", "conv4"], "cpu")
    dataset = BrodenDataset(toy_dataset)
    for layer, path in paths.items():
        for union in ("touched", "annotated", "all"):
            results = {device: dissect_layer(path, dataset, union=union, device=device,
                                             scheduler="synchronous")
                       for device in ("cpu", "cuda")}
            cpu, gpu = results["cpu"], results["cuda"]
            assert np.array_equal(cpu.thresholds, gpu.thresholds)
            for name in ("label_area", "intersection", "act_area"):
                assert np.array_equal(getattr(cpu, name), getattr(gpu, name)), (layer, union,
                                                                                 name)
            assert cpu.intersection.sum() > 0


@pytest.mark.parametrize("size", [(2, 2), (3, 3), (5, 6), (7, 7)])
def test_count_iou_cuda_equals_cpu_on_random_maps(broden_tiny, size):
    """count_iou on CUDA == on the CPU for float16-valued maps onto 4x4 label maps: enlarged by
    an integer ratio (2x2), by non-integer ratios (3x3, 5x6 -> 4x4) and shrunk (7x7, antialiased);
    thresholds are data values, so masks have ties (a corner pixel equals its map's value)."""
    from dissect.data import BrodenDataset
    from dissect.stats import count_iou

    dataset = BrodenDataset(broden_tiny.root)
    seg, image_labels = dataset.load_segmentations(range(len(dataset)))
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(len(dataset), 12) + size).astype(np.float16).astype(np.float32)
    thresholds = np.quantile(acts.transpose(1, 0, 2, 3).reshape(12, -1), 0.7, axis=1,
                             method="lower")
    primary = np.asarray(dataset.vocab.primary, dtype=np.int64)
    counts = {device: count_iou(acts, seg, image_labels, thresholds, primary,
                                len(dataset.categories), device=device)
              for device in ("cpu", "cuda")}
    for name in ("label_area", "intersection", "act_area"):
        assert np.array_equal(getattr(counts["cpu"], name), getattr(counts["cuda"], name)), name
    assert counts["cpu"].intersection.sum() > 0


# --- ablation -------------------------------------------------------------------------------

def test_ablation_suffix_on_cuda_equals_full_forward(toy_dataset, tmp_path):
    """On CUDA, the model suffix run from the float32 cache gives the logits of the full
    forward with the same units ablated by the hook (baseline, single units, a set)."""
    from dissect.ablation import AblationStudy
    from dissect.ablation.sources import DatasetImages
    from dissect.data import BrodenDataset

    model = load_model("dissect.toy:toy_model")
    path = record(model, toy_dataset, tmp_path / "run", ["conv4"], "cuda",
                  dtype="float32")["conv4"]
    dataset = BrodenDataset(toy_dataset)
    model = model.to("cuda")
    labels = np.arange(len(dataset)) % 5
    names = [f"class{k}" for k in range(5)]
    images = DatasetImages(dataset, MEAN, STD)
    suffix = AblationStudy(model, "conv4", labels, names, images=images,
                           activations=CacheReader(path), device="cuda", use_suffix=True)
    hooked = AblationStudy(model, "conv4", labels, names, images=images, device="cuda",
                           use_suffix=False)
    assert suffix.uses_suffix and not hooked.uses_suffix
    masks = suffix.masks([[], [0], [5], [1, 2, 3, 40], list(range(32))])
    rows = np.arange(0, len(dataset), 3)
    by_suffix = suffix.evaluator.logits(masks, rows)
    by_hook = hooked.evaluator.logits(masks, rows)
    assert by_suffix.shape == by_hook.shape == (len(masks), len(rows), 5)
    torch.testing.assert_close(by_suffix, by_hook, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(by_suffix[0], by_suffix[-1])  # the ablation changed something
