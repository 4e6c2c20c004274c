"""Row sources: where the evaluation engine reads images or layer activations from.

A source has ``len()`` and ``read_rows(indices) -> array`` (float32, rows in the order asked). The
activation cache's :class:`dissect.record.CacheReader` is a source as it is; the classes here wrap
a dataset (images preprocessed exactly as the recorder does, via :func:`dissect.data.make_loader`)
or arrays held in memory (user data, tests). All are picklable, so Dask can ship them to processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch


class RowSource(Protocol):
    """Anything the engine can read rows from (images (N, 3, H, W) or acts (N, U, h, w))."""

    def __len__(self) -> int: ...

    def read_rows(self, indices: np.ndarray) -> np.ndarray | torch.Tensor: ...


class TensorRows:
    """Rows of an array held in memory: preprocessed images or layer activations.

    Parameters
    ----------
    array : (N, ...) float tensor or array (converted to a float32 tensor on the CPU)
    """

    def __init__(self, array: np.ndarray | torch.Tensor) -> None:
        self.array = torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor)
                                     else array).detach().to("cpu", torch.float32)

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, ...) of the array."""
        return tuple(self.array.shape)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as float32."""
        return self.array[start:stop].numpy()

    def read_rows(self, indices: np.ndarray) -> torch.Tensor:
        """Rows ``indices`` (any order) as a float32 tensor."""
        return self.array[torch.as_tensor(np.asarray(indices, dtype=np.int64))]


class DatasetImages:
    """Preprocessed images of a dataset, read with :func:`dissect.data.make_loader`.

    Parameters
    ----------
    dataset : BrodenDataset
    mean, std : 3 floats on the 0..1 RGB scale
    resize : None (stored size) or (H, W)
    """

    def __init__(self, dataset: Any, mean: Sequence[float], std: Sequence[float],
                 resize: tuple[int, int] | None = None) -> None:
        self.dataset = dataset
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.resize = tuple(resize) if resize is not None else None

    def __len__(self) -> int:
        return len(self.dataset)

    def read_rows(self, indices: np.ndarray) -> torch.Tensor:
        """Images ``indices`` as float32 (n, 3, H, W), normalised, in the order asked."""
        from dissect.data import make_loader

        indices = np.asarray(indices, dtype=np.int64)
        loader = make_loader(self.dataset, mean=self.mean, std=self.std, resize=self.resize,
                             batch_size=max(1, len(indices)), num_workers=0,
                             indices=indices)
        batches, order = [], []
        for images, index in loader:
            batches.append(images)
            order.append(np.asarray(index, dtype=np.int64))
        images = torch.cat(batches)
        got = np.concatenate(order)
        if not np.array_equal(got, indices):
            position = {int(v): i for i, v in enumerate(got)}
            images = images[torch.as_tensor([position[int(v)] for v in indices])]
        return images
