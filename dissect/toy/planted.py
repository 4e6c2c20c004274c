"""A network whose units are built, not trained, to detect known toy concepts.

:func:`planted_model` returns a small module whose layer :data:`PLANTED_LAYER` (``units``) has one
unit per planted concept (:func:`planted_labels`): the four accent colours of the toy dataset
(``red``, ``orange``, ``pink``, ``purple``), five objects and one part drawn in a shade no
other thing uses (``sun``, ``sand``, ``road``, ``cabinet``, ``bed``; ``trunk``). A dissection of
that layer on a toy dataset (24 images or more) must give every unit its planted label, with
IoU >= 0.04; that is the end-to-end check of the dissection pipeline.

Why these win: a unit's mask is (a dithered sample of) exactly its concept's region, so its IoU
with that label is the sampled fraction, and every other label either overlaps only part of the
mask or covers more than it (an object always has other shades too; a colour name always covers
other things). No planted concept is coextensive with another label.

How a unit is made, for an input normalised with ``IMAGENET_MEAN/STD``:

1. ``rgb``: undo the normalisation, back to 0..255 RGB.
2. ``match``: for each toy shade s, ``relu(1 - |rgb - rgb_s|^2 / tolerance^2)``: 1 on pixels of
   exactly that shade, 0 on every other toy shade (shades are >= 30 apart; tolerance 12).
3. ``select``: a 1x1 convolution with 0/1 weights that sums the shades of each unit's concept.
4. ``pool``: 2x2 average pooling, down to the segmentation resolution (size // 2) of the toy
   dataset, where each label cell is one 2x2 block of identical pixels.
5. ``units``: an ordered 16x16 (Bayer) dither multiplies the map by ``1 + 0.5 * level`` with
   256 levels spread evenly over every 16x16 block. A concept covering more than the 0.5% of
   pixels that the 0.995 quantile keeps then gets a mask that is an even sample of its region
   (an unmodulated 0/1 map would give a threshold of 1 and an empty mask).

The head (``gap``, ``fc``) classifies scenes from the mean of the units of each scene's
characteristic object: sand (beach), trunk (forest), road (street), cabinet (kitchen),
bed (bedroom).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dissect.data import IMAGENET_MEAN, IMAGENET_STD
from dissect.toy.dataset import TOY_SCENES
from dissect.toy.scenes import SHADE_KEYS, SHADE_RGB

PLANTED_LAYER = "units"
"""The dotted layer name of the planted units (dissect this layer)."""

PLANTED_CONCEPTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("red", ("red",)),
    ("orange", ("orange",)),
    ("pink", ("pink",)),
    ("purple", ("purple",)),
    ("sun", ("sun",)),
    ("sand", ("sand",)),
    ("road", ("road",)),
    ("cabinet", ("cabinet",)),
    ("bed", ("bed",)),
    ("trunk", ("trunk",)),
)
"""(label name, toy shade keys it responds to), one per unit, in unit order."""

SCENE_UNITS: dict[str, str] = {"beach": "sand", "forest": "trunk", "street": "road",
                               "kitchen": "cabinet", "bedroom": "bed"}
"""The planted concept whose presence decides each scene in the planted head."""

TOLERANCE = 12.0
"""RGB distance (0..255 scale) at which a shade detector falls to zero."""

DITHER_SIZE = 16
"""Side of the ordered-dither (Bayer) matrix: 256 levels, fine enough that a concept covering
many times the 0.5% of pixels above the threshold loses little IoU to the level steps (the
levels stay distinct in a float16 cache)."""


def bayer_matrix(size: int) -> torch.Tensor:
    """The ordered-dither (Bayer) matrix of side ``size`` (a power of two).

    Returns
    -------
    int64 (size, size) holding each of 0 .. size**2 - 1 once; every aligned 2**k x 2**k block
    holds a contiguous, evenly spread subset of the levels.
    """
    matrix = torch.zeros((1, 1), dtype=torch.int64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([4 * matrix, 4 * matrix + 2], 1),
                            torch.cat([4 * matrix + 3, 4 * matrix + 1], 1)], 0)
    return matrix


def planted_labels() -> dict[int, str]:
    """Unit index (0-based, at :data:`PLANTED_LAYER`) -> the label name it is built to detect."""
    return {unit: name for unit, (name, _) in enumerate(PLANTED_CONCEPTS)}


class Denormalise(nn.Module):
    """(B, 3, H, W) normalised input -> RGB on the 0..255 scale: ``(x * std + mean) * 255``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.std + self.mean) * 255.0


class ShadeMatch(nn.Module):
    """(B, 3, H, W) RGB 0..255 -> (B, S, H, W) in [0, 1]: closeness to each of S prototypes.

    ``out[:, s] = relu(1 - |x - prototype_s|^2 / tolerance^2)``.
    """

    def __init__(self, prototypes: torch.Tensor, tolerance: float) -> None:
        super().__init__()
        self.register_buffer("prototypes", prototypes.float().view(-1, 3, 1, 1))
        self.tolerance = float(tolerance)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distance = ((x[:, None] - self.prototypes[None]) ** 2).sum(dim=2)
        return torch.relu(1.0 - distance / self.tolerance ** 2)


class Dither(nn.Module):
    """Multiply (B, U, h, w) maps by ``1 + 0.5 * bayer[i % n, j % n] / n**2`` (ordered dither,
    n = ``size``)."""

    def __init__(self, size: int = DITHER_SIZE) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("bayer", bayer_matrix(size).float() / size ** 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        rows = torch.arange(h, device=x.device) % self.size
        cols = torch.arange(w, device=x.device) % self.size
        level = self.bayer[rows][:, cols]
        return x * (1.0 + 0.5 * level)


class PlantedModel(nn.Module):
    """The planted network: see the module docstring for its layers."""

    def __init__(self) -> None:
        super().__init__()
        shades = [key for _, keys in PLANTED_CONCEPTS for key in keys]
        used = sorted(set(shades), key=SHADE_KEYS.index)
        prototypes = torch.tensor(SHADE_RGB[[SHADE_KEYS.index(k) for k in used]],
                                  dtype=torch.float32)
        self.rgb = Denormalise(IMAGENET_MEAN, IMAGENET_STD)
        self.match = ShadeMatch(prototypes, TOLERANCE)
        self.select = nn.Conv2d(len(used), len(PLANTED_CONCEPTS), kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(2)
        self.units = Dither()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(len(PLANTED_CONCEPTS), len(TOY_SCENES))
        with torch.no_grad():
            self.select.weight.zero_()
            for unit, (_, keys) in enumerate(PLANTED_CONCEPTS):
                for key in keys:
                    self.select.weight[unit, used.index(key), 0, 0] = 1.0
            self.fc.weight.zero_()
            self.fc.bias.zero_()
            names = [name for name, _ in PLANTED_CONCEPTS]
            for k, scene in enumerate(TOY_SCENES):
                self.fc.weight[k, names.index(SCENE_UNITS[scene])] = 20.0
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, len(TOY_SCENES)) scene logits."""
        maps = self.units(self.pool(self.select(self.match(self.rgb(x)))))
        return self.fc(torch.flatten(self.gap(maps), 1))


def planted_model() -> nn.Module:
    """The planted model in eval mode; its units at :data:`PLANTED_LAYER` are listed by
    :func:`planted_labels`. Input: (B, 3, H, W) normalised with ``IMAGENET_MEAN/STD``; the units
    have resolution (H // 2, W // 2)."""
    return PlantedModel().eval()

