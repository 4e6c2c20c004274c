"""Streaming images of a dataset through a torch DataLoader (decoding happens in workers)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dissect.config import (  # noqa: F401 -- defined once there, re-exported here
    IMAGENET_MEAN,
    IMAGENET_STD,
    NETDISSECT_MEAN,
    NETDISSECT_STD,
    check_normalisation,
)
from dissect.data.broden import BrodenDataset, pad_segmentations
from dissect.errors import OptionError


def check_resize(resize: int | Sequence[int] | None) -> tuple[int, int] | None:
    """None, or (H, W) from an int or a pair of positive ints."""
    if resize is None:
        return None
    size = (int(resize), int(resize)) if isinstance(resize, (int, np.integer)) else tuple(
        int(v) for v in resize)
    if len(size) != 2 or min(size) <= 0:
        raise OptionError(f"--resize: expected a positive size or H,W, got {resize!r}")
    return size  # type: ignore[return-value]


def image_tensor(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float],
                 resize: tuple[int, int] | None = None) -> torch.Tensor:
    """Normalised float32 (3, H, W) tensor from uint8 (h, w, 3) RGB pixels.

    ``(pixels / 255 - mean) / std``, after a bilinear antialiased resize to ``resize`` = (H, W).
    """
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div_(255)
    if resize is not None and tuple(tensor.shape[1:]) != tuple(resize):
        tensor = F.interpolate(tensor[None], size=resize, mode="bilinear", align_corners=False,
                               antialias=True)[0]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean_t) / std_t


class ImageTensors(torch.utils.data.Dataset):
    """Torch view of a :class:`BrodenDataset`.

    Item i is ``(image (3, H, W) float32, index int)``, or with ``segmentation=True``
    ``(image, seg (Lyr, sh, sw) int32, image_labels (K,) int32, index)`` (see
    :meth:`BrodenDataset.load_segmentation`).
    """

    def __init__(self, dataset: BrodenDataset, mean: Sequence[float], std: Sequence[float],
                 resize: tuple[int, int] | None = None,
                 indices: Sequence[int] | np.ndarray | None = None,
                 segmentation: bool = False) -> None:
        self.dataset = dataset
        self.mean, self.std = check_normalisation(mean, std)
        self.resize = check_resize(resize)
        self.indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)
        self.segmentation = segmentation

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple:
        index = int(self.indices[item])
        image = image_tensor(self.dataset.load_image(index), self.mean, self.std, self.resize)
        if not self.segmentation:
            return image, index
        seg, labels = self.dataset.load_segmentation(index)
        return image, seg, labels, index


def collate_segmented(items: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor,
                                                       torch.Tensor, torch.Tensor]:
    """Batch items of ``ImageTensors(segmentation=True)``.

    Returns images float32 (B, 3, H, W), seg int32 (B, Lmax, sh, sw) and image_labels int32
    (B, Kmax), zero-padded as :func:`pad_segmentations`, and index int64 (B,).
    """
    seg, labels = pad_segmentations([(item[1], item[2]) for item in items])
    return (torch.stack([item[0] for item in items]), torch.from_numpy(seg),
            torch.from_numpy(labels), torch.tensor([item[3] for item in items]))


def default_workers() -> int:
    """Decoding workers: one fewer than the cores (at most 4), so the model keeps a core."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def make_loader(dataset: BrodenDataset, *, mean: Sequence[float], std: Sequence[float],
                resize: int | Sequence[int] | None = None, batch_size: int = 32,
                num_workers: int | None = None, pin_memory: bool = False,
                indices: Sequence[int] | np.ndarray | None = None,
                segmentation: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` in index order.

    Yields ``(images, index)``: images float32 (B, 3, H, W) normalised as in
    :func:`image_tensor`, index int64 (B,) positions in ``dataset``. With
    ``segmentation=True`` it yields ``(images, seg, image_labels, index)`` with seg int32
    (B, Lmax, sh, sw) label layers and image_labels int32 (B, Kmax), zero-padded. Images and
    PNGs are decoded in ``num_workers`` worker processes (default :func:`default_workers`).
    """
    if batch_size < 1:
        raise OptionError(f"--batch-size: expected a positive integer, got {batch_size}")
    if dataset and resize is None:
        dataset.image_size  # noqa: B018 -- raises DatasetError when sizes differ
    workers = default_workers() if num_workers is None else int(num_workers)
    return torch.utils.data.DataLoader(
        ImageTensors(dataset, mean, std, check_resize(resize), indices, segmentation),
        batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory,
        collate_fn=collate_segmented if segmentation else None,
        persistent_workers=False, prefetch_factor=4 if workers > 0 else None)
