"""Row sources: where the evaluation engine reads images or layer activations from.

A source has ``len()`` and ``read_rows(indices) -> array`` (float32, rows in the order asked). The
activation cache's :class:`dissect.record.CacheReader` is a source as it is; the classes here wrap
a dataset (images preprocessed exactly as the recorder does, via :func:`dissect.data.make_loader`)
or arrays held in memory (user data, tests). All are picklable, so Dask can ship them to processes.

:func:`open_eval_set` opens an ablation evaluation set other than the dissection dataset
(``--eval-dataset``): a Broden-format dataset or an ImageFolder tree, as an :class:`EvalSet`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from dissect.errors import DatasetError


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


#: Kinds of ablation evaluation sets (DESIGN §13).
EVAL_KINDS = ("imagefolder", "broden")


@dataclass(frozen=True)
class EvalSet:
    """An ablation evaluation set other than the dissection dataset (``--eval-dataset``).

    Attributes
    ----------
    path : its absolute directory
    kind : 'imagefolder' (a torchvision ImageFolder tree: class = folder) or 'broden'
        (a Broden-format dataset: classes from ``--classes`` as for the dissection dataset)
    dataset : ImageFolderDataset or BrodenDataset (every image; image i = eval cache row i)
    name : its name in the run (:meth:`dissect.rundir.RunDir.eval_name`): its cache is
        ``RunDir.eval_cache(layer, name)``
    """

    path: Path
    kind: str
    dataset: Any
    name: str

    def info(self) -> dict[str, Any]:
        """What ablation.json / ablation.h5 record of the set: ``eval_dataset`` (path),
        ``eval_kind``, ``eval_images`` (number of images)."""
        return {"eval_dataset": str(self.path), "eval_kind": self.kind,
                "eval_images": len(self.dataset)}


#: Broden files whose presence beside a missing ``index.csv`` means a broken Broden dataset
#: rather than an ImageFolder tree.
_BRODEN_FILES = ("category.csv", "label.csv")


def open_eval_set(path: str | os.PathLike[str],
                  class_names: str | os.PathLike[str] | Sequence[str] | None = None
                  ) -> EvalSet:
    """Open an ablation evaluation set: a Broden-format dataset when ``path`` holds
    ``index.csv``, else an ImageFolder tree.

    Parameters
    ----------
    path : the set's directory
    class_names : ImageFolder only: one name per model output, in output order (a text file or
        a sequence); class k is then name k and every folder must be a listed name. Default: the
        sorted folder names (folder k = output k). Broden sets map classes through
        :func:`~dissect.ablation.labels.load_class_labels` instead.

    Raises
    ------
    DatasetError naming the path: not a directory, no class folders, a folder not among the
    class names, a class folder without images, a Broden dataset without ``index.csv``, or a
    malformed Broden dataset.
    """
    from dissect.data import BrodenDataset
    from dissect.data.imagefolder import ImageFolderDataset
    from dissect.rundir import RunDir

    root = Path(os.path.abspath(os.fspath(path)))
    if not root.is_dir():
        raise DatasetError(f"--eval-dataset {root}: not a directory (expected an ImageFolder "
                           "tree, one folder per class, or a Broden-format dataset with "
                           "index.csv)")
    name = RunDir.eval_name(root)
    if (root / "index.csv").is_file():
        return EvalSet(root, "broden", BrodenDataset(root), name)
    found = [file for file in _BRODEN_FILES if (root / file).is_file()]
    if found:
        raise DatasetError(f"--eval-dataset {root}: has {', '.join(found)} but no index.csv: "
                           "a Broden-format dataset needs index.csv (an ImageFolder tree holds "
                           "only class folders)")
    return EvalSet(root, "imagefolder", ImageFolderDataset(root, class_names=class_names), name)
