"""Class labels of images for ablation studies.

The class of an image is an index into the model's outputs: the model's output ``k`` is class ``k``.
Three sources, :func:`load_class_labels`:

- an image-level category of the dataset (e.g. ``scene``): the classes are that category's labels
  in label-number order, so **model output k must be the k-th label of the category** (this is how
  :func:`dissect.toy.train_toy_model` trains: class = index in ``TOY_SCENES``). When the model's
  outputs are ordered differently, pass ``class_names`` (one name per model output, in output
  order): an image's class is then the position of its label's name in ``class_names``.
- a CSV file with columns ``image,class``: ``image`` as in the dataset's ``index.csv``; ``class`` a
  model output index, or a name of ``class_names`` when given. Images not listed are unlabeled.
- ``predicted``: the unablated model's own argmax, so a user without labels still measures effects
  relative to the model's decisions; class names are ``class_names`` or the output indices.

An ImageFolder evaluation set (:class:`~dissect.data.imagefolder.ImageFolderDataset`) has a fourth
source, ``folders`` (its default, :func:`folder_labels`): an image's class is its class folder,
class k being the k-th sorted folder name, or the k-th of ``class_names`` when given (then folders
are matched to outputs by name).
"""

from __future__ import annotations

import csv
import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dissect.errors import DatasetError, OptionError

PREDICTED = "predicted"
#: Class source of an ImageFolder evaluation set: each image's class folder.
FOLDERS = "folders"


def _category_labels(source: str, dataset: Any, class_names: Sequence[str] | None,
                     n_outputs: int | None) -> tuple[list[str], np.ndarray]:
    vocab = dataset.vocab
    numbers = [int(number) for number in np.sort(np.asarray(vocab.labels_in(source)))]
    per_image = dataset.image_level_labels(source)
    if not any(len(labels) for labels in per_image):
        raise OptionError(f"option classes: category {source!r} has no image-level labels in "
                          f"{dataset.root}; use an image-level category (e.g. scene), a CSV "
                          "'image,class' or 'predicted'")
    label_names = [vocab.names[number] for number in numbers]
    if class_names is not None:
        names = [str(name) for name in class_names]
        position = {name: k for k, name in enumerate(names)}
        by_number = {number: position.get(vocab.names[number], -1)
                     for labels in per_image for number in map(int, labels)}
    else:
        names = label_names
        if n_outputs is not None and n_outputs != len(names):
            raise OptionError(
                f"option classes: category {source!r} has {len(names)} labels but the model has "
                f"{n_outputs} outputs; model output k must be the k-th label of the category in "
                "label-number order, or give class_names (one name per model output)")
        index_of = {number: k for k, number in enumerate(numbers)}
        by_number = {number: index_of.get(number, -1)
                     for labels in per_image for number in map(int, labels)}
    y = np.full(len(per_image), -1, dtype=np.int64)
    for image, labels in enumerate(per_image):
        for number in map(int, labels):  # the first listed label of the category that is a class
            if by_number.get(number, -1) >= 0:
                y[image] = by_number[number]
                break
    return names, y


def _csv_labels(path: Path, dataset: Any, class_names: Sequence[str] | None,
                n_outputs: int | None) -> tuple[list[str], np.ndarray]:
    image_row = {name: i for i, name in enumerate(dataset.image_names)}
    names = [str(name) for name in class_names] if class_names is not None else None
    position = {name: k for k, name in enumerate(names)} if names is not None else {}
    limit = len(names) if names is not None else n_outputs
    y = np.full(len(image_row), -1, dtype=np.int64)
    try:
        handle = open(path, newline="", encoding="utf-8")
    except OSError as error:
        raise DatasetError(f"{path}: cannot read the class CSV ({error.strerror})") from error
    with handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [column for column in ("image", "class") if column not in header]
        if missing:
            raise DatasetError(f"{path}, row 1 (header): missing column(s) {', '.join(missing)}; "
                               f"expected columns image,class, found {','.join(header)}")
        for row_number, row in enumerate(reader, start=2):
            image, value = (row.get("image") or "").strip(), (row.get("class") or "").strip()
            if image not in image_row:
                close = difflib.get_close_matches(image, list(image_row), n=3)
                hint = f"; close: {', '.join(close)}" if close else ""
                raise DatasetError(f"{path}, row {row_number}: image {image!r} is not in the "
                                   f"dataset's index.csv{hint}")
            if value in position:
                k = position[value]
            elif value.isascii() and value.isdigit() and (limit is None or int(value) < limit):
                k = int(value)
            else:
                if names is not None:
                    close = difflib.get_close_matches(value, names, n=3)
                    expected = f"one of the class names (close: {', '.join(close) or 'none'}) " \
                               f"or an output index in [0, {len(names)})"
                elif limit is not None:
                    expected = f"a model output index in [0, {limit})"
                else:
                    expected = "a model output index (a non-negative integer), or give class_names"
                raise DatasetError(f"{path}, row {row_number}: unknown class {value!r}; expected "
                                   f"{expected}")
            if y[image_row[image]] >= 0 and y[image_row[image]] != k:
                raise DatasetError(f"{path}, row {row_number}: image {image!r} is listed twice "
                                   "with different classes")
            y[image_row[image]] = k
    if names is None:
        count = limit if limit is not None else int(y.max()) + 1 if (y >= 0).any() else 0
        names = [str(k) for k in range(count)]
    return names, y


def predict_classes(model: nn.Module, dataset: Any, *, mean: Sequence[float],
                    std: Sequence[float], resize: tuple[int, int] | None = None,
                    batch_size: int = 32, device: str | torch.device | None = None,
                    num_workers: int | None = 0) -> tuple[np.ndarray, int]:
    """The unablated model's argmax for every image of ``dataset`` (streaming).

    Returns
    -------
    (predictions (N,) int64, number of model outputs).
    """
    from dissect.data import make_loader

    device = torch.device(device or "cpu")
    predictions = np.zeros(len(dataset), dtype=np.int64)
    n_outputs = 0
    loader = make_loader(dataset, mean=mean, std=std, resize=resize, batch_size=batch_size,
                         num_workers=num_workers)
    with torch.no_grad():
        for images, index in loader:
            logits = model(images.to(device))
            n_outputs = int(logits.shape[1])
            predictions[np.asarray(index)] = logits.argmax(dim=1).cpu().numpy()
    return predictions, n_outputs


def load_class_labels(source: str | Path, dataset: Any, *,
                      class_names: Sequence[str] | None = None, n_outputs: int | None = None,
                      predictions: np.ndarray | None = None, model: nn.Module | None = None,
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      resize: tuple[int, int] | None = None, batch_size: int = 32,
                      device: str | torch.device | None = None) -> tuple[list[str], np.ndarray]:
    """The class of each image of ``dataset`` (see the module docstring for the sources).

    Parameters
    ----------
    source : str or Path
        An image-level category of the dataset (e.g. ``'scene'``), the path of a CSV
        ``image,class``, ``'predicted'``, or for an ImageFolder set ``'folders'``.
    dataset : BrodenDataset (opened with no split selection: image i = cache row i) or
        ImageFolderDataset
    class_names : optional sequence of str
        One name per model output, in output order (maps outputs to classes; see module docstring).
    n_outputs : optional int
        The number of model outputs; checked against a category's labels, and the number of classes
        of a CSV of output indices / of ``predicted``.
    predictions : optional (N,) int array
        For ``'predicted'``: the model's argmax per image (e.g. from the evaluation engine).
        Otherwise ``model`` with ``mean``/``std``/``resize``/``batch_size``/``device`` is run.

    Returns
    -------
    (class_names list of C str, y (N,) int64 with values in [0, C) or -1 = unlabeled).

    Raises
    ------
    OptionError for an unknown source (lists the categories); DatasetError for a bad CSV (names the
    file and row).
    """
    text = str(source)
    if class_names is not None and n_outputs is not None and len(class_names) != n_outputs:
        raise OptionError(f"option class_names: {len(class_names)} names given but the model has "
                          f"{n_outputs} outputs; give one name per model output, in output order")
    if text == PREDICTED:
        if predictions is None:
            if model is None or mean is None or std is None:
                raise OptionError("classes 'predicted' needs predictions=... or a model with "
                                  "mean and std to compute them")
            predictions, n_outputs = predict_classes(model, dataset, mean=mean, std=std,
                                                     resize=resize, batch_size=batch_size,
                                                     device=device)
        y = np.asarray(predictions, dtype=np.int64).reshape(-1)
        if y.shape != (len(dataset),):
            raise OptionError(f"predictions has {y.size} values, the dataset {len(dataset)} images")
        count = len(class_names) if class_names is not None else \
            (n_outputs if n_outputs is not None else int(y.max()) + 1)
        names = [str(name) for name in class_names] if class_names is not None else \
            [str(k) for k in range(count)]
        y = np.where(y < len(names), y, -1)
        return names, y
    categories = tuple(getattr(getattr(dataset, "vocab", None), "categories", ()))
    if text == FOLDERS:
        if not hasattr(dataset, "class_names") or not hasattr(dataset, "labels"):
            raise OptionError(f"option classes: 'folders' is the class source of an ImageFolder "
                              f"evaluation set, and {getattr(dataset, 'root', dataset)} is none; "
                              f"use an image-level category ({', '.join(categories)}), a CSV "
                              "'image,class' or 'predicted'")
        if class_names is not None and list(class_names) != list(dataset.class_names):
            raise OptionError("option class_names: an ImageFolder set maps its folders to "
                              "outputs when it is opened; open it with these class names "
                              "(ImageFolderDataset(root, class_names=...))")
        return folder_labels(dataset, n_outputs, class_names=class_names)
    if text in categories:
        return _category_labels(text, dataset, class_names, n_outputs)
    path = Path(text)
    if path.suffix.lower() == ".csv" or path.is_file():
        if not path.is_file():
            raise DatasetError(f"{path}: class CSV file not found")
        return _csv_labels(path, dataset, class_names, n_outputs)
    if not categories and hasattr(dataset, "class_names"):
        raise OptionError(f"option classes: {text!r} is no class source of the ImageFolder set "
                          f"{getattr(dataset, 'root', dataset)}: its classes are its folders "
                          f"('{FOLDERS}', the default), or give 'predicted' or a CSV "
                          "'image,class' (image paths relative to the set)")
    raise OptionError(f"option classes: {text!r} is neither a category of the dataset "
                      f"({', '.join(categories)}), a CSV file 'image,class', nor "
                      "'predicted'")


def folder_labels(dataset: Any, n_outputs: int | None = None, *,
                  class_names: str | os.PathLike[str] | Sequence[str] | None = None
                  ) -> tuple[list[str], np.ndarray]:
    """Classes of an ImageFolder evaluation set from its folders (source ``folders``).

    Parameters
    ----------
    dataset : ImageFolderDataset (``class_names``: the sorted folders, or the names it was
        opened with; ``labels`` (N,): class of each image)
    n_outputs : the number of model outputs; class k is output k, so there must be as many
        classes as outputs
    class_names : the class names (file or sequence) the dataset was opened with, if any (a
        file is named in errors)

    Returns
    -------
    (class_names list of C str, y (N,) int64 copy of ``dataset.labels``).

    Raises
    ------
    OptionError naming the class-names file (or the dataset folder) when the number of class
    names (or of class folders) differs from the number of model outputs.
    """
    names = [str(name) for name in dataset.class_names]
    if n_outputs is not None and len(names) != n_outputs:
        if class_names is not None:
            where = class_names if isinstance(class_names, (str, os.PathLike)) else \
                "the class names given"
            raise OptionError(f"option class_names: {where} lists {len(names)} class "
                              f"names but the model has {n_outputs} outputs; give one name per "
                              "model output, in output order")
        raise OptionError(f"option eval_dataset: {dataset.root} has {len(names)} class folders "
                          f"but the model has {n_outputs} outputs; without --class-names the "
                          "k-th folder (sorted by name) is taken as output k, so give "
                          "--class-names FILE (one name per model output, in output order) to "
                          "match folders to outputs by name")
    return names, np.asarray(dataset.labels, dtype=np.int64).copy()


def read_class_names(source: str | Path | Sequence[str]) -> list[str]:
    """Class names in model-output order from a sequence or a text file (one name per line)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise DatasetError(f"{path}: cannot read the class names ({error.strerror})") from error
        names = [line.strip() for line in lines if line.strip()]
        if not names:
            raise DatasetError(f"{path}: no class name (expected one name per line)")
        return names
    return [str(name) for name in source]
