"""The toy scene classifier: a small CNN and its deterministic training on the toy dataset."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dissect.data import IMAGENET_MEAN, IMAGENET_STD, BrodenDataset, make_loader
from dissect.errors import DatasetError, OptionError
from dissect.toy.dataset import TOY_SCENES

MODEL_FILE = "toy_model.pt"
"""Default file name of the trained state_dict, inside the dataset directory."""

DEFAULT_EPOCHS = 5

DEMO_LAYERS: tuple[str, ...] = ("conv3", "conv4")
"""The toy model's layers that ``dissect demo`` dissects."""
DEMO_ABLATION_LAYER = "conv4"
"""The toy model's layer that ``dissect demo`` ablates."""


def _block(channels_in: int, channels_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution (with ``stride``), batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
    )


class ToyCNN(nn.Module):
    """A four-block CNN for toy scenes.

    Layers (``named_modules`` names) and output shapes for a (B, 3, 112, 112) input:

    ``conv1`` (B, 16, 56, 56; stride 2) -> ``pool1`` (B, 16, 28, 28) -> ``conv2`` (B, 32, 28, 28)
    -> ``pool2`` (B, 32, 14, 14) -> ``conv3`` (B, 64, 14, 14) -> ``conv4`` (B, 64, 14, 14) ->
    ``pool`` (B, 64, 1, 1) -> ``fc`` (B, num_classes).

    Each ``convK`` is Sequential(Conv2d, BatchNorm2d, ReLU); its output is post-ReLU. ``conv4``
    (the last, 14 x 14 for 112-pixel images) and ``conv3`` are the layers to dissect.
    """

    def __init__(self, num_classes: int = len(TOY_SCENES)) -> None:
        super().__init__()
        self.conv1 = _block(3, 16, stride=2)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = _block(16, 32)
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = _block(32, 64)
        self.conv4 = _block(64, 64)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, num_classes) logits."""
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = self.pool(self.conv4(self.conv3(x)))
        return self.fc(torch.flatten(x, 1))


def toy_model(num_classes: int = len(TOY_SCENES)) -> nn.Module:
    """A fresh (untrained) :class:`ToyCNN`; the model spec ``dissect.toy:toy_model``.

    Load trained weights with ``model.load_state_dict(torch.load(path, weights_only=True))``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise OptionError(f"num_classes: expected a positive integer, got {num_classes!r}")
    return ToyCNN(num_classes)


def scene_classes(dataset: BrodenDataset) -> np.ndarray:
    """int64 (N,): class of every image = index in :data:`TOY_SCENES` of its scene label.

    Raises
    ------
    DatasetError
        When an image has no scene label, several, or one that is not a toy scene.
    """
    names = dataset.vocab.names
    classes = np.empty(len(dataset), dtype=np.int64)
    for i, labels in enumerate(dataset.image_level_labels("scene")):
        scenes = [names[int(n)] for n in labels]
        if len(scenes) != 1 or scenes[0] not in TOY_SCENES:
            raise DatasetError(
                f"{dataset.root / 'index.csv'}: image {dataset.image_names[i]} has scene "
                f"label(s) {scenes}; expected exactly one of {', '.join(TOY_SCENES)}")
        classes[i] = TOY_SCENES.index(scenes[0])
    return classes


def _open_scenes(dataset_dir: str | os.PathLike[str]) -> BrodenDataset:
    dataset = BrodenDataset(dataset_dir, categories=["scene"])
    if "scene" not in dataset.categories:
        raise DatasetError(f"{Path(dataset_dir) / 'category.csv'} has no 'scene' category; "
                           f"the toy model's classes are scenes")
    return dataset


def _split_indices(dataset: BrodenDataset, split: str) -> np.ndarray:
    return np.flatnonzero(dataset.splits == split).astype(np.int64)


@torch.no_grad()
def predict_scenes(model: nn.Module, dataset: BrodenDataset,
                   indices: Sequence[int] | np.ndarray, batch_size: int = 64) -> np.ndarray:
    """int64 (n,): predicted class of each image in ``indices`` (eval mode, IMAGENET_MEAN/STD)."""
    model.eval()
    predictions = []
    loader = make_loader(dataset, mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size=batch_size,
                         num_workers=0, indices=np.asarray(indices))
    for images, _ in loader:
        predictions.append(model(images).argmax(dim=1))
    if not predictions:
        return np.zeros(0, dtype=np.int64)
    return torch.cat(predictions).numpy().astype(np.int64)


def toy_accuracy(model: nn.Module, dataset_dir: str | os.PathLike[str],
                 split: str = "val") -> float:
    """Fraction of the images of ``split`` whose scene ``model`` predicts correctly."""
    dataset = _open_scenes(dataset_dir)
    indices = dataset.subset(split)
    truth = scene_classes(dataset)[indices]
    return float((predict_scenes(model, dataset, indices) == truth).mean())


def train_toy_model(dataset_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                    seed: int = 0, epochs: int | None = None, batch_size: int = 32,
                    learning_rate: float = 3e-3, max_steps: int | None = None) -> Path:
    """Train :func:`toy_model` on the ``train`` split of a toy dataset; write its state_dict.

    Deterministic for a given seed (and thread count): weights come from ``torch.manual_seed``,
    batch order and horizontal flips from a seeded generator, images are decoded in the main
    process. Inputs are normalised with ``IMAGENET_MEAN/STD``. Adam with a cosine learning rate,
    cross-entropy on classes = index of the scene label in :data:`TOY_SCENES`.

    Parameters
    ----------
    dataset_dir:
        A toy dataset (:func:`dissect.toy.generate_toy_dataset`), or any Broden dataset whose
        scene labels are toy scenes.
    out:
        Where to write the state_dict (default ``<dataset_dir>/toy_model.pt``). A small JSON
        with the training record (accuracies, epochs, seconds) is written beside it
        (``<out stem>.json``).
    seed:
        Seed of the weights, batch order and flips.
    epochs:
        Passes over the train split (default 5).
    batch_size, learning_rate:
        Optimiser settings.
    max_steps:
        Stop after this many optimiser steps (for quick tests); default no limit.

    Returns
    -------
    The path of the written state_dict.
    """
    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise OptionError(f"epochs: expected a positive integer, got {epochs!r}")
    if batch_size < 1:
        raise OptionError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if max_steps is not None and max_steps < 1:
        raise OptionError(f"max_steps: expected a positive integer or None, got {max_steps!r}")
    started = time.perf_counter()
    dataset = _open_scenes(dataset_dir)
    classes = scene_classes(dataset)
    train = dataset.subset("train")
    out_path = Path(dataset_dir) / MODEL_FILE if out is None else Path(out)

    torch.manual_seed(seed)
    model = toy_model(len(TOY_SCENES))
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(train) // batch_size)
    total_steps = epochs * steps_per_epoch if max_steps is None else min(
        max_steps, epochs * steps_per_epoch)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + np.cos(np.pi * min(step, total_steps) / total_steps)))
    step = 0
    model.train()
    while step < total_steps:
        order = train[torch.randperm(len(train), generator=generator).numpy()]
        loader = make_loader(dataset, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                             batch_size=batch_size, num_workers=0, indices=order)
        for images, index in loader:
            flip = torch.rand(len(images), generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            target = torch.from_numpy(classes[index.numpy()])
            loss = F.cross_entropy(model(images), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step >= total_steps:
                break
    model.eval()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    torch.save(model.state_dict(), partial)
    os.replace(partial, out_path)
    record: dict[str, object] = {
        "seed": seed, "epochs": epochs, "steps": step, "batch_size": batch_size,
        "learning_rate": learning_rate, "classes": list(TOY_SCENES),
        "train_seconds": round(time.perf_counter() - started, 3),
    }
    val = _split_indices(dataset, "val")
    if len(val):
        record["val_accuracy"] = float((predict_scenes(model, dataset, val) == classes[val]).mean())
    with open(out_path.with_suffix(".json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1, sort_keys=True)
        handle.write("\n")
    return out_path


def load_toy_model(path: str | os.PathLike[str]) -> nn.Module:
    """A :func:`toy_model` with the state_dict at ``path`` (``weights_only`` load), in eval mode."""
    model = toy_model()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
