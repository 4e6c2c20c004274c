"""An ablation evaluation set in torchvision's ImageFolder layout (DESIGN §13).

::

    root/
      beach/0001.jpg      one folder per class; images anywhere below it
      beach/more/0002.png
      forest/0003.jpg

Class names are the folder names, sorted (torchvision's ``ImageFolder`` order: class k is the
k-th sorted folder), or a given list (a text file with one name per line, or a sequence): class
k is the k-th name, which is the model's output k when the list is the model's class list; then
every folder must be one of the names, and names without a folder are classes with no image.
Images are the files with an :data:`~dissect.data.from_masks.IMAGE_EXTENSIONS` ending (any case)
below a class folder, in sorted path order; files directly in ``root`` and hidden files and
folders are ignored, a class folder with no image is an error (as torchvision). Folders are
walked following symbolic links; class names may not contain path separators or ``..``.

The dataset has what :func:`dissect.data.make_loader` and the ablation engine's
:class:`~dissect.ablation.DatasetImages` use: ``len``, ``load_image(i)``, ``image_size``, plus
``labels`` (the class of every image), ``class_names``, ``image_names``, ``splits`` and
``fingerprint()``. ``image_size`` reads every image's header once; images of different sizes need
a resize (``make_loader(..., resize=(H, W))``, ``--resize``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dissect.data.broden import UNREADABLE, read_rgb
from dissect.data.from_masks import IMAGE_EXTENSIONS, walk_files
from dissect.errors import DatasetError, OptionError

#: The split every image of an ImageFolder evaluation set is in.
IMAGEFOLDER_SPLIT = "val"


def _check_class_name(name: str, where: str, error: type[Exception]) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise error(f"{where}: class name {name!r} is not a folder name inside the dataset "
                    f"(no '/', '\\', '..' or leading '.'); paths may not leave the root")


def read_class_names(source: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    """Class names from a text file (one per line; empty lines at the end ignored) or a sequence.

    DatasetError (file and line) or OptionError (a list) for an empty or repeated name, or one
    that is not a plain folder name.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise DatasetError(f"--class-names: {path} cannot be read: {error}") from None
        error_type: type[Exception] = DatasetError
        where = str(path)
    else:
        lines = [str(name) for name in source]
        error_type = OptionError
        where = "--class-names"
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise error_type(f"{where}: lists no class name")
    for number, name in enumerate(names, start=1):
        _check_class_name(name, f"{where}, line {number}", error_type)
        if name in names[:number - 1]:
            raise error_type(f"{where}, line {number}: class {name!r} is listed twice")
    return names


class ImageFolderDataset:
    """Images and their classes from an ImageFolder tree.

    Parameters
    ----------
    root:
        The folder holding one folder per class.
    class_names:
        None (the sorted folder names), a text file or a sequence of names (class k = name k).
    split:
        The split name every image is in (``splits``, ``subset``); default ``val``.

    Attributes
    ----------
    root : Path
    class_names : list[str] (C,)
    image_names : list[str] (N,) paths relative to ``root``, sorted by class folder name, then path
    labels : np.ndarray int64 (N,) class index of every image

    Raises
    ------
    DatasetError
        A missing root, a folder that is not a listed class, a class folder with no image, no
        image at all, or a bad class-names file (naming the folder or file).
    """

    def __init__(self, root: str | os.PathLike[str],
                 class_names: str | os.PathLike[str] | Sequence[str] | None = None,
                 split: str = IMAGEFOLDER_SPLIT) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: not a directory (expected an ImageFolder tree, "
                               f"one folder per class)")
        folders = sorted(entry.name for entry in os.scandir(self.root)
                         if entry.is_dir() and not entry.name.startswith("."))
        if class_names is None:
            names = folders
            for name in names:
                _check_class_name(name, str(self.root), DatasetError)
        else:
            names = read_class_names(class_names)
            unknown = [f for f in folders if f not in names]
            if unknown:
                shown = ", ".join(str(self.root / f) for f in unknown[:10])
                raise DatasetError(f"{shown}: folder(s) not in the class names "
                                   f"({len(names)} given); every class folder must be listed")
        if not names:
            raise DatasetError(f"{self.root}: no class folders (expected one folder per class)")
        self.class_names: list[str] = list(names)
        self.split = str(split)
        image_names: list[str] = []
        labels: list[int] = []
        empty = []
        for name in sorted(self.class_names):      # image order: by path, whatever the list
            folder = self.root / name
            if not folder.is_dir():
                continue
            index = self.class_names.index(name)
            found = sorted(p for p in walk_files(folder) if p.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                empty.append(str(folder))
            image_names.extend(f"{name}/{p}" for p in found)
            labels.extend([index] * len(found))
        if empty:
            raise DatasetError(f"{', '.join(empty)}: class folder(s) with no image "
                               f"({', '.join(IMAGE_EXTENSIONS)})")
        self.image_names: list[str] = image_names
        self.labels: np.ndarray = np.asarray(labels, dtype=np.int64)
        self._sizes: list[tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self.image_names)

    def __repr__(self) -> str:
        return (f"ImageFolderDataset({str(self.root)!r}, {len(self)} images, "
                f"{len(self.class_names)} classes)")

    @property
    def splits(self) -> np.ndarray:
        """(N,) str: ``split`` for every image."""
        return np.full(len(self), self.split)

    def subset(self, split: str) -> np.ndarray:
        """int64 indices of the images in ``split`` (every image, or OptionError)."""
        if split != self.split:
            raise OptionError(f"split {split!r} has no images in {self.root}; its images are "
                              f"all in split {self.split!r}")
        return np.arange(len(self), dtype=np.int64)

    def _path(self, index: int) -> Path:
        return self.root / self.image_names[index]

    def image_sizes(self) -> list[tuple[int, int]]:
        """(ih, iw) of every image, from the file headers (read once)."""
        if self._sizes is None:
            sizes = []
            for index in range(len(self)):
                try:
                    with Image.open(self._path(index)) as image:
                        sizes.append((image.size[1], image.size[0]))
                except UNREADABLE as error:
                    raise DatasetError(f"{self._path(index)} cannot be read as an image: "
                                       f"{error}") from None
            self._sizes = sizes
        return self._sizes

    @property
    def image_size(self) -> tuple[int, int]:
        """(ih, iw), the same for every image; DatasetError naming two sizes otherwise (pass a
        resize to the loader then)."""
        sizes = self.image_sizes()
        distinct = sorted(set(sizes))
        if len(distinct) != 1:
            examples = [f"{h}x{w} ({self._path(sizes.index((h, w)))})" for h, w in distinct[:2]]
            raise DatasetError(f"{self.root}: images differ in size ({', '.join(examples)}, "
                               f"{len(distinct)} sizes); resize them (--resize H,W)")
        return distinct[0]

    def load_image(self, index: int) -> np.ndarray:
        """uint8 (ih, iw, 3) RGB pixels of image ``index``."""
        return read_rgb(self._path(index))

    def fingerprint(self, selection: bool = True) -> str:
        """sha256 over the class names and, per image, its path, class and file size.

        (Image bytes are not read: as the Broden fingerprint covers the csv files, this covers the
        listing.) ``selection`` is accepted for compatibility with BrodenDataset and ignored.
        """
        digest = hashlib.sha256()
        digest.update(repr(("imagefolder", self.class_names, self.split)).encode())
        for name, label in zip(self.image_names, self.labels.tolist()):
            size = (self.root / name).stat().st_size
            digest.update(f"{name}\0{label}\0{size}\n".encode())
        return digest.hexdigest()
