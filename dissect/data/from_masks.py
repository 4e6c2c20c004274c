"""`dissect dataset from-masks`: a Broden dataset from images and index-mask PNGs (DESIGN §13).

Input layout (the usual "image + index PNG" one)::

    images/            any folder tree of images (.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp)
      street/0001.jpg
    masks/object/      one folder per category, the same tree, one PNG per image
      street/0001.png  pixel value k = class k of the category's class list
    masks/part/
      street/0001.png
    classes/object.txt one class name per line

An image and a mask pair when their paths relative to their folders are equal without the file
extension (``street/0001.jpg`` and ``street/0001.png``).

Class lists
    One name per line (a text file, or a list of names in Python). Pixel value 0 is always
    unlabeled, so **the first line is class 1**, the second class 2, and so on -- unless the first
    line is a background name (:data:`BACKGROUND_NAMES`, e.g. ``background`` or
    ``__background__``, as in the class lists of VOC-style models): then that line stands for value
    0 (unlabeled) and line ``k`` (0-based) is class ``k``. Either way a pixel value ``k`` is the
    class whose code is ``k``. Empty lines at the end are ignored; an empty line inside the list,
    or a name listed twice, is an error (it would shift the numbering).

Pixel values
    0 and the ignore index (default 255; None for none) are unlabeled; a value above the number of
    classes is an error naming the file and the values. Masks must be single-channel PNGs: mode L
    (8-bit), P (palette: the palette index is the value, as VOC's masks), I;16 / I (16-bit and
    32-bit) or 1 (bilevel: value 1 is class 1). Colour (RGB) masks must first be converted to class
    indices. Binary masks saved as 0/255 hold only "unlabeled" with the default ignore index: save
    the foreground as 1.

Label numbers
    Global numbers are assigned in category order (the ``masks`` categories in the order given,
    then the other categories of ``classes``, then image-level categories met only in the
    ``image_labels`` file, in order of first appearance), then class order. A name already numbered
    in an earlier category keeps its number (the label then belongs to both categories, as
    ``water`` in Broden's object and material; its primary category is the one with the larger
    coverage). ``c_<category>.csv`` codes follow the class lists.

Image-level labels
    A CSV ``image,category,label``: ``image`` is a path relative to the images folder, with or
    without its extension; ``label`` a class name. A category with a class list only accepts its
    names; a category without one takes the names it meets, sorted. An image may have several
    labels in one category (rows repeated).

Sizes
    Segmentations are stored at half the image size (``ih // 2`` x ``iw // 2``, as Broden: 224
    images, 112 segmentations), downsampled from the mask by nearest neighbour (output pixel i takes
    source pixel ``floor((i + 0.5) * h / sh)``). Every image must have the size of its masks.
    ``size`` resizes the images (bilinear; stored as PNG) to ``size x size`` (or ``(H, W)``); masks
    go straight to the segmentation size by nearest neighbour. Without ``size``, images are copied
    unchanged and must all have one size.

Splits
    Without ``split_file`` every image is in split ``train``. A split file is a CSV ``image,split``
    naming every image (path relative to the images folder, with or without its extension).

Missing masks
    Every image needs a mask in every mask category, unless ``allow_missing_masks`` is set: then a
    missing mask leaves the image unlabeled in that category (as Broden's partial part and material
    annotation), and only an image with no label at all is reported.

Paths written in the CSV files may not leave the images folder (absolute paths and ``..`` are
refused). Folders are walked following symbolic links, hidden files and folders (``.name``)
skipped.

Every problem (unpaired files, size mismatches, wrong mask modes, unknown class values, bad CSV
rows) is collected in one pass and reported in one :class:`~dissect.errors.DatasetError`, one line
each, naming the files; nothing is left in ``out`` then. The output is written to
``<out>.partial`` and renamed when complete. This module uses NumPy and Pillow only.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dissect.data.broden import INDEX_COLUMNS, UNREADABLE, encode_labels, is_inside
from dissect.errors import DatasetError, OptionError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif",
                                     ".tiff", ".webp")
"""File endings taken as images (case-insensitive; torchvision ImageFolder's list)."""

BACKGROUND_NAMES: frozenset[str] = frozenset({
    "background", "__background__", "_background_", "unlabeled", "unlabelled", "void", "none"})
"""A class list whose first line is one of these (case-insensitive) gives that line value 0."""

MASK_MODES: tuple[str, ...] = ("L", "P", "I", "I;16", "I;16B", "I;16L", "1")
"""Pillow modes of a single-channel index mask."""

DEFAULT_SPLIT = "train"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- class lists
@dataclass(frozen=True)
class ClassList:
    """The classes of one category.

    Attributes
    ----------
    names:
        Class names by code: class ``k`` (k >= 1) is ``names[k - 1]``.
    background:
        The first line of the list when it is a background name (it stands for value 0), else None.
    source:
        Where the list came from (a file path, or ``<list>``), for messages.
    """

    names: tuple[str, ...]
    background: str | None
    source: str

    @property
    def entries(self) -> tuple[str, ...]:
        """The list as given: the background line (when present) then the class names."""
        return ((self.background,) if self.background is not None else ()) + self.names

    @property
    def offset(self) -> int:
        """Code of entry ``i`` is ``i + offset``: 0 with a background line, else 1."""
        return 0 if self.background is not None else 1


def read_class_list(source: str | os.PathLike[str] | Sequence[str], what: str = "classes"
                    ) -> ClassList:
    """Parse a class list: a text file (one name per line) or a sequence of names.

    See the module docstring for the numbering (first line = class 1 unless it is a background
    name). ``what`` names the option in messages.

    Raises
    ------
    DatasetError
        A file that cannot be read, an empty line inside the list, a name listed twice, or no name
        (the message names the file and line).
    OptionError
        The same problems in a list given in Python.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        where = str(path)
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise DatasetError(f"{what}: class list {path} cannot be read: {error}") from None
        error_type: type[Exception] = DatasetError
    else:
        lines = [str(name) for name in source]
        where = "<list>"
        error_type = OptionError
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()
    for number, name in enumerate(names, start=1):
        if not name:
            raise error_type(f"{what}: {where}, line {number} is empty; every line up to the "
                             f"last names a class (an empty line would shift the numbering)")
        if number > 1 and name in names[:number - 1]:
            raise error_type(f"{what}: {where}, line {number}: class {name!r} is listed twice "
                             f"(first on line {names.index(name) + 1})")
    if not names:
        raise error_type(f"{what}: {where} lists no class")
    background = names[0] if names[0].lower() in BACKGROUND_NAMES else None
    rest = tuple(names[1:]) if background is not None else tuple(names)
    if not rest:
        raise error_type(f"{what}: {where} lists only the background {background!r}")
    return ClassList(rest, background, where)


# ----------------------------------------------------------------------------- small pure helpers
def seg_size_for(image_size: tuple[int, int]) -> tuple[int, int]:
    """Segmentation size (sh, sw) for an image of (ih, iw): half of it, as Broden (224 -> 112)."""
    return max(1, image_size[0] // 2), max(1, image_size[1] // 2)


def nearest_resize(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an integer label map (h, w) to ``size`` = (H, W) by nearest neighbour.

    Output pixel (i, j) takes source pixel (floor((i + 0.5) * h / H), floor((j + 0.5) * w / W))
    (pixel centres; computed in integers, so it is exact). Returns an array of ``labels``'s dtype.
    """
    h, w = labels.shape
    height, width = size
    if (h, w) == (height, width):
        return labels
    rows = ((2 * np.arange(height) + 1) * h) // (2 * height)
    cols = ((2 * np.arange(width) + 1) * w) // (2 * width)
    return labels[rows[:, None], cols[None, :]]


def save_label_png(path: Path, labels: np.ndarray) -> None:
    """Write integer label numbers (h, w) as a Broden segmentation PNG, atomically (a temporary
    file renamed into place, so a killed process never leaves half a file under ``path``)."""
    temporary = path.with_name(path.name + ".tmp")
    Image.fromarray(encode_labels(labels), "RGB").save(temporary, format="PNG", compress_level=6)
    os.replace(temporary, path)


def check_size_option(size: int | Sequence[int] | None, option: str = "--size"
                      ) -> tuple[int, int] | None:
    """None, or (H, W) from a positive int S (-> (S, S)) or a pair."""
    if size is None:
        return None
    if isinstance(size, bool):
        raise OptionError(f"{option}: expected a positive size S or H,W, got {size!r}")
    values = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(values) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                   and v >= 2 for v in values):
        raise OptionError(f"{option}: expected a size S or H,W of integers >= 2, got {size!r}")
    return int(values[0]), int(values[1])


def write_image(source: Path, target: Path, size: tuple[int, int] | None) -> None:
    """Store an image for the dataset, atomically: the file's bytes unchanged when ``size`` is
    None, else its RGB pixels resized bilinearly to ``size`` = (H, W), as PNG."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    if size is None:
        shutil.copyfile(source, temporary)
    else:
        with Image.open(source) as image:
            resized = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
        resized.save(temporary, format="PNG", compress_level=6)
    os.replace(temporary, target)


def stored_image_name(relative: str, size: tuple[int, int] | None) -> str:
    """Name under ``images/`` of an input image: unchanged, or ``<stem>.png`` when resized."""
    return relative if size is None else strip_extension(relative) + ".png"


def strip_extension(relative: str) -> str:
    """``a/b.c.jpg`` -> ``a/b.c`` (the pairing key)."""
    folder, _, name = relative.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return f"{folder}/{stem}" if folder else stem


def walk_files(root: Path) -> Iterator[str]:
    """Relative POSIX paths of every file under ``root``, sorted per folder, following symbolic
    links (each real folder once), skipping hidden files and folders (names starting with ``.``)."""
    seen: set[str] = set()
    for folder, folders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:              # a link loop
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        relative = Path(folder).relative_to(root).as_posix()
        for name in sorted(files):
            if not name.startswith("."):
                yield name if relative == "." else f"{relative}/{name}"


def list_images(root: Path) -> list[str]:
    """Sorted relative paths of the image files under ``root`` (:data:`IMAGE_EXTENSIONS`)."""
    return sorted(p for p in walk_files(root) if p.lower().endswith(IMAGE_EXTENSIONS))


def check_category_name(name: str, option: str) -> str:
    """A category name usable as an index.csv column and in ``c_<name>.csv``; OptionError."""
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise OptionError(f"{option}: category name {name!r} must be non-empty, without "
                          f"surrounding spaces")
    if any(c in name for c in "/\\,;=\n\"") or name.startswith(".") or name in INDEX_COLUMNS:
        raise OptionError(f"{option}: category name {name!r} may not contain / \\ , ; = or "
                          f"quotes, start with '.', or be one of {', '.join(INDEX_COLUMNS)}")
    return name


def read_mask(path: Path) -> tuple[np.ndarray | None, str | None]:
    """Pixel values (h, w) int64 of an index-mask PNG, or (None, why it cannot be used)."""
    try:
        with Image.open(path, formats=("PNG",)) as image:
            mode = image.mode
            if mode not in MASK_MODES:
                return None, (f"mask mode {mode}; expected a single-channel index PNG (mode "
                              f"L, P, I;16, I or 1) whose pixel value k is class k (colour masks "
                              f"must be converted to class indices first)")
            values = np.asarray(image).astype(np.int64)
    except UNREADABLE as error:
        return None, f"cannot be read as a PNG: {error}"
    return values, None


def image_header_size(path: Path, full: bool = True) -> tuple[tuple[int, int] | None, str | None]:
    """(ih, iw) of an image (decoding it fully when ``full``), or (None, why it cannot be read)."""
    try:
        with Image.open(path) as image:
            if full:
                image.load()
            return (image.size[1], image.size[0]), None
    except UNREADABLE as error:
        return None, f"cannot be read as an image: {error}"


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """A csv file with ``\\n`` line ends, UTF-8."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def prepare_out(out: str | os.PathLike[str], inputs: Sequence[Path], resume: bool = False
                ) -> tuple[Path, Path]:
    """Check ``out`` (must not exist or be empty, not inside an input folder) and return
    (final, partial) paths. The partial folder is emptied unless ``resume``."""
    final = Path(out)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise OptionError(f"--out: {final} already exists and is not an empty directory; "
                          f"remove it or choose another directory")
    resolved = final.resolve()
    for folder in inputs:
        real = folder.resolve()
        if resolved == real or real in resolved.parents:
            raise OptionError(f"--out: {final} is inside the input folder {folder}; choose a "
                              f"directory outside it")
    partial = resolved.with_name(resolved.name + ".partial")
    if partial.exists() and not resume:
        shutil.rmtree(partial)  # an earlier run was interrupted
    return final, partial


# ----------------------------------------------------------------------------- statistics
class LabelStatistics:
    """Per category and label number: images carrying it and the summed pixel fraction
    (Broden's frequency and coverage), and the images labeled in each category."""

    def __init__(self, categories: Sequence[str], n_labels: int) -> None:
        self.n_labels = n_labels
        self.frequency = {c: np.zeros(n_labels, dtype=np.int64) for c in categories}
        self.coverage = {c: np.zeros(n_labels, dtype=np.float64) for c in categories}
        self.images = {c: 0 for c in categories}

    def add(self, category: str, layers: Sequence[np.ndarray], image_labels: Iterable[int]
            ) -> None:
        """One image's labels in ``category``: pixel layers (sh, sw) int and image-level numbers."""
        labels = sorted(set(int(n) for n in image_labels))
        if not layers and not labels:
            return
        counts = np.zeros(self.n_labels, dtype=np.float64)
        for layer in layers:
            counts += np.bincount(layer.ravel(), minlength=self.n_labels)[: self.n_labels]
        counts[0] = 0
        if layers:
            self.coverage[category] += counts / layers[0].size
        self.frequency[category] += counts > 0
        for number in labels:
            if counts[number] == 0:
                self.frequency[category][number] += 1
            self.coverage[category][number] += 1.0
        self.images[category] += 1


def write_vocabulary(out: Path, categories: Sequence[str], members: Mapping[str, Sequence[int]],
                     names: Mapping[int, str], stats: LabelStatistics) -> None:
    """category.csv, label.csv and c_<category>.csv (DESIGN §2).

    ``members[c]`` lists the label numbers of category c in code order (code k is
    ``members[c][k - 1]``); ``names[n]`` is the name of label n.
    """
    write_csv(out / "category.csv", ["name", "first", "last", "count", "frequency"],
              [[c, min(members[c]), max(members[c]), len(members[c]), stats.images[c]]
               for c in categories])
    rows: list[list[object]] = []
    for number in sorted(names):
        cats = [c for c in categories if number in members[c]]
        field_text = ";".join(f"{c}({int(stats.frequency[c][number])})" for c in cats)
        frequency = sum(int(stats.frequency[c][number]) for c in cats)
        coverage = sum(float(stats.coverage[c][number]) for c in cats)
        rows.append([number, names[number], field_text, frequency, f"{coverage:.6f}", ""])
    write_csv(out / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
              rows)
    for c in categories:
        write_csv(out / f"c_{c}.csv", ["code", "number", "name", "frequency", "coverage"],
                  [[code, n, names[n], int(stats.frequency[c][n]),
                    f"{float(stats.coverage[c][n]):.6f}"]
                   for code, n in enumerate(members[c], start=1)])


def raise_problems(problems: Sequence[str], what: str) -> None:
    """One DatasetError listing every problem, one per line (nothing when there is none)."""
    if problems:
        noun = "problem" if len(problems) == 1 else "problems"
        error = DatasetError(f"{what}: {len(problems)} {noun}, nothing was written:\n"
                             + "\n".join(f"  {p}" for p in problems))
        error.problems = list(problems)  # type: ignore[attr-defined]
        raise error


# ----------------------------------------------------------------------------- the conversion
@dataclass
class _Plan:
    """What the csv inputs and the folder listings say, before any pixel is read."""

    categories: list[str]
    mask_categories: list[str]
    members: dict[str, list[int]]
    names: dict[int, str]
    lookup: dict[str, np.ndarray]          # mask category -> code -> global number
    class_counts: dict[str, int]
    images: list[str]                      # relative paths, sorted
    masks: dict[str, dict[str, str]]       # category -> image stem -> mask relative path
    # image stem -> category -> image-level label numbers
    image_labels: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)


def _read_rows(path: Path, columns: Sequence[str], what: str, problems: list[str]
               ) -> list[tuple[int, dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in columns if c not in header]
            if missing:
                problems.append(f"{path}, line 1: {what} header lacks column(s) "
                                f"{', '.join(missing)}; expected {','.join(columns)}")
                return []
            reader.fieldnames = header
            rows = []
            for row in reader:
                if None in row or any(row.get(c) is None for c in columns):
                    problems.append(f"{path}, line {reader.line_num}: expected the "
                                    f"{len(header)} cells of the header {','.join(header)}")
                    continue
                rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items()}))
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        problems.append(f"{path}: {what} cannot be read as csv: {error}")
        return []


def _image_key(cell: str, path: Path, line: int, by_stem: Mapping[str, str],
               relatives: set[str], problems: list[str]) -> str | None:
    """The stem of the image a csv cell names (its path with or without extension), or None
    (and a problem naming the file and line)."""
    name = cell.replace("\\", "/")
    if not is_inside(name):
        problems.append(f"{path}, line {line}: image path {cell!r} escapes the images folder "
                        f"(absolute paths and '..' are refused)")
        return None
    if name in relatives:
        return strip_extension(name)
    if name in by_stem:
        return name
    problems.append(f"{path}, line {line}: image {cell!r} is not in the images folder")
    return None


def _plan(images_dir: Path, masks: Mapping[str, Path], classes: Mapping[str, ClassList],
          image_labels: Path | None, split_file: Path | None, ignore_index: int | None,
          allow_missing_masks: bool, problems: list[str]) -> _Plan:
    mask_categories = list(masks)
    categories = list(mask_categories) + [c for c in classes if c not in masks]
    images = list_images(images_dir)
    by_stem: dict[str, str] = {}
    for relative in images:
        stem = strip_extension(relative)
        if stem in by_stem:
            problems.append(f"{images_dir / by_stem[stem]} and {images_dir / relative}: two "
                            f"images with the path {stem!r} without extension (images and masks "
                            f"pair by that path)")
            continue
        by_stem[stem] = relative
    relatives = set(by_stem.values())
    if not images:
        problems.append(f"{images_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)})")

    # label numbers: category order, then class order; a name keeps its first number
    names: dict[int, str] = {}
    number_of: dict[str, int] = {}
    members: dict[str, list[int]] = {}

    def number(name: str) -> int:
        if name not in number_of:
            number_of[name] = len(number_of) + 1
            names[number_of[name]] = name
        return number_of[name]

    for category in categories:
        members[category] = [number(name) for name in classes[category].names]

    # image-level labels
    labels_by_image: dict[str, dict[str, list[int]]] = {}
    if image_labels is not None:
        rows = _read_rows(image_labels, ("image", "category", "label"), "image labels", problems)
        collected: dict[str, list[str]] = {}
        parsed: list[tuple[int, str, str, str]] = []
        for line, row in rows:
            key = _image_key(row["image"], image_labels, line, by_stem, relatives, problems)
            category, label = row["category"], row["label"]
            if not category or not label:
                problems.append(f"{image_labels}, line {line}: empty category or label")
                continue
            try:
                check_category_name(category, "image labels")
            except OptionError as error:
                problems.append(f"{image_labels}, line {line}: {error}")
                continue
            if category in classes:
                if label not in classes[category].names:
                    problems.append(f"{image_labels}, line {line}: label {label!r} is not a "
                                    f"class of category {category!r} ({classes[category].source})")
                    continue
            else:
                seen = collected.setdefault(category, [])
                if label not in seen:
                    seen.append(label)
            if key is not None:
                parsed.append((line, key, category, label))
        for category, found in collected.items():
            categories.append(category)
            members[category] = [number(name) for name in sorted(found)]
        for _line, key, category, label in parsed:
            numbers = labels_by_image.setdefault(key, {}).setdefault(category, [])
            if number_of[label] not in numbers:
                numbers.append(number_of[label])
    for category in categories:
        if category in classes and category not in masks \
                and not any(category in v for v in labels_by_image.values()):
            problems.append(f"classes of category {category!r} ({classes[category].source}) are "
                            f"given, but it has no masks and no image-level label")

    # masks: pair by stem
    mask_files: dict[str, dict[str, str]] = {}
    for category, folder in masks.items():
        found: dict[str, str] = {}
        empty = True
        for relative in walk_files(folder):
            empty = False
            lower = relative.lower()
            if not lower.endswith(IMAGE_EXTENSIONS):
                continue
            if not lower.endswith(".png"):
                problems.append(f"{folder / relative}: mask of category {category!r} is not a "
                                f"PNG (lossy formats change class values)")
                continue
            stem = strip_extension(relative)
            if stem not in by_stem:
                problems.append(f"{folder / relative}: mask of category {category!r} has no "
                                f"image {images_dir / stem}.* to pair with")
                continue
            found[stem] = relative
        if empty:
            problems.append(f"{folder}: holds no mask of category {category!r}")
        mask_files[category] = found
    for stem, relative in by_stem.items():
        missing = [c for c in mask_categories if stem not in mask_files[c]]
        if mask_categories and not allow_missing_masks:
            for category in missing:
                problems.append(f"{images_dir / relative}: no mask of category {category!r} "
                                f"(expected {masks[category] / stem}.png)")
        elif len(missing) == len(mask_categories) and stem not in labels_by_image:
            problems.append(f"{images_dir / relative}: no mask in any category and no "
                            f"image-level label")

    # splits
    splits: dict[str, str] = {}
    if split_file is not None:
        for line, row in _read_rows(split_file, ("image", "split"), "split file", problems):
            key = _image_key(row["image"], split_file, line, by_stem, relatives, problems)
            if not row["split"] or any(c in row["split"] for c in ",\"\n"):
                problems.append(f"{split_file}, line {line}: split {row['split']!r} must be "
                                f"non-empty, without commas or quotes")
                continue
            if key is not None:
                splits[key] = row["split"]
        for stem, relative in by_stem.items():
            if stem not in splits:
                problems.append(f"{images_dir / relative}: not in the split file {split_file}")

    lookup: dict[str, np.ndarray] = {}
    for category in mask_categories:
        table = np.zeros(len(classes[category].names) + 1, dtype=np.int64)
        table[1:] = members[category]
        lookup[category] = table
    return _Plan(categories, mask_categories, members, names, lookup,
                 {c: len(classes[c].names) for c in mask_categories}, sorted(by_stem.values()),
                 mask_files, labels_by_image, splits)


def _category_problems(values: np.ndarray, n_classes: int, ignore_index: int | None
                       ) -> list[int]:
    """Sorted pixel values that are neither 0, the ignore index, nor a class code 1..n_classes."""
    outside = (values < 0) | (values > n_classes)
    if ignore_index is not None:
        outside &= values != ignore_index
    if not outside.any():                    # the usual case: no sort of the whole mask
        return []
    present = np.unique(values[outside])
    bad = present[(present < 0) | (present > n_classes)]
    if ignore_index is not None:
        bad = bad[bad != ignore_index]
    return [int(v) for v in bad]


def _convert(plan: _Plan, images_dir: Path, mask_dirs: Mapping[str, Path],
             class_lists: Mapping[str, ClassList], ignore_index: int | None,
             target: tuple[int, int] | None, partial: Path, index: Any,
             stats: LabelStatistics, sizes: dict[tuple[int, int], str],
             labeled: dict[str, bool], problems: list[str], writing: bool, progress: bool
             ) -> bool:
    """Read every image and mask once: collect problems, and (while there is none) write the
    images, label PNGs and index rows. Returns whether everything was written."""
    from tqdm.auto import tqdm  # progress bar only

    for relative in tqdm(plan.images, desc="from-masks", unit="img", disable=not progress):
        stem = strip_extension(relative)
        source = images_dir / relative
        image_size, why = image_header_size(source)
        if image_size is None:
            problems.append(f"{source}: {why}")
            writing = False
            continue
        stored_size = target or image_size
        sizes.setdefault(stored_size, relative)
        seg_size = seg_size_for(stored_size)
        cells: dict[str, list[str]] = {c: [] for c in plan.categories}
        layers_of: dict[str, list[np.ndarray]] = {c: [] for c in plan.categories}
        for category in plan.mask_categories:
            mask_relative = plan.masks[category].get(stem)
            if mask_relative is None:
                continue
            mask_path = mask_dirs[category] / mask_relative
            values, why = read_mask(mask_path)
            if values is None:
                problems.append(f"{mask_path}: {why}")
                writing = False
                labeled[category] = True  # reported already
                continue
            if values.shape != image_size:
                problems.append(f"{mask_path}: mask is {values.shape[0]}x{values.shape[1]} "
                                f"(height x width) but its image {source} is "
                                f"{image_size[0]}x{image_size[1]}")
                writing = False
                labeled[category] = True  # reported already
                continue
            bad = _category_problems(values, plan.class_counts[category], ignore_index)
            if bad:
                shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
                ignore = f" and the ignore index {ignore_index}" if ignore_index is not None \
                    else ""
                problems.append(f"{mask_path}: pixel value(s) {shown} are not classes of "
                                f"category {category!r}, which has {plan.class_counts[category]} "
                                f"({class_lists[category].source}); 0{ignore} are unlabeled")
                writing = False
                labeled[category] = True  # reported already
                continue
            if ignore_index is not None:
                values = np.where(values == ignore_index, 0, values)
            if not writing:
                labeled[category] = labeled[category] or bool(values.any())
                continue
            numbers = plan.lookup[category][nearest_resize(values, seg_size)]
            labeled[category] = labeled[category] or bool(values.any())
            name = f"{stem}_{category}.png"
            (partial / "images" / name).parent.mkdir(parents=True, exist_ok=True)
            save_label_png(partial / "images" / name, numbers)
            cells[category].append(name)
            layers_of[category].append(numbers)
        level = plan.image_labels.get(stem, {})
        for category, numbers in level.items():
            cells[category].extend(str(n) for n in numbers)
        if not writing:
            continue
        stored = stored_image_name(relative, target)
        write_image(source, partial / "images" / stored, target)
        for category in plan.categories:
            stats.add(category, layers_of[category], level.get(category, ()))
        index.writerow([stored, plan.splits.get(stem, DEFAULT_SPLIT), stored_size[0],
                        stored_size[1], seg_size[0], seg_size[1],
                        *[";".join(cells[c]) for c in plan.categories]])
    return writing


def dataset_from_masks(
    images: str | os.PathLike[str],
    masks: Mapping[str, str | os.PathLike[str]],
    classes: Mapping[str, Sequence[str] | str | os.PathLike[str]],
    out: str | os.PathLike[str],
    image_labels: str | os.PathLike[str] | None = None,
    ignore_index: int | None = 255,
    split_file: str | os.PathLike[str] | None = None,
    size: int | Sequence[int] | None = None,
    progress: bool = False,
    *,
    allow_missing_masks: bool = False,
) -> Path:
    """Write a Broden-format dataset (DESIGN §2) from images and per-category index masks.

    See the module docstring for the input layout, class-list numbering, sizes and splits.

    Parameters
    ----------
    images:
        Folder of images (any tree).
    masks:
        Category name -> folder of index-mask PNGs mirroring ``images`` (pixel value k = class k).
        May be empty when only image-level labels are given.
    classes:
        Category name -> class list (a text file or a list of names); needed for every mask
        category, optional for image-level categories.
    out:
        Dataset directory to create (must not exist or be empty; not inside an input folder).
    image_labels:
        Optional CSV ``image,category,label`` of image-level labels (class names).
    ignore_index:
        Mask value that is unlabeled besides 0 (None: none). It may not be a class code.
    split_file:
        Optional CSV ``image,split`` naming the split of every image (default: all ``train``).
    size:
        None (images copied unchanged, one size for all), S or (H, W): images resized to it.
    progress:
        A tqdm progress bar on stderr.
    allow_missing_masks:
        An image without a mask in a category is unlabeled there (instead of an error).

    Returns
    -------
    The dataset directory.

    Raises
    ------
    OptionError
        A bad option: unknown or unusable category names, a mask category without a class list, an
        ignore index that is a class code, an existing ``out``.
    DatasetError
        Every problem of the input files at once (see the module docstring), one line each.
    """
    images_dir = Path(images)
    if not images_dir.is_dir():
        raise OptionError(f"--images: {images_dir} is not a directory")
    mask_dirs = {check_category_name(c, "--masks"): Path(p) for c, p in masks.items()}
    for category, folder in mask_dirs.items():
        if not folder.is_dir():
            raise OptionError(f"--masks: {category}={folder} is not a directory")
        if folder.resolve() == images_dir.resolve():
            raise OptionError(f"--masks: {category}={folder} is the images folder; keep masks "
                              f"in their own folder")
    for category in mask_dirs:
        if category not in classes:
            raise OptionError(f"--classes: category {category!r} has masks but no class list; "
                              f"give --classes {category}=FILE")
    class_lists = {check_category_name(c, "--classes"): read_class_list(source, f"--classes {c}")
                   for c, source in classes.items()}
    if ignore_index is not None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
            raise OptionError(f"--ignore-index: expected an integer or None, got "
                              f"{ignore_index!r}")
        for category in mask_dirs:
            n_classes = len(class_lists[category].names)
            if 1 <= ignore_index <= n_classes:
                raise OptionError(
                    f"--ignore-index: {ignore_index} is class {ignore_index} "
                    f"({class_lists[category].names[ignore_index - 1]!r}) of category "
                    f"{category!r}; choose a value above {n_classes} or 0")
    if not mask_dirs and image_labels is None:
        raise OptionError("--masks or --image-labels: give at least one source of labels")
    target = check_size_option(size)
    labels_path = Path(image_labels) if image_labels is not None else None
    split_path = Path(split_file) if split_file is not None else None
    final, partial = prepare_out(out, [images_dir, *mask_dirs.values()])

    problems: list[str] = []
    plan = _plan(images_dir, mask_dirs, class_lists, labels_path, split_path, ignore_index,
                 allow_missing_masks, problems)
    names_written = {stored_image_name(r, target) for r in plan.images}
    for relative in plan.images:
        for category in plan.mask_categories:
            name = f"{strip_extension(relative)}_{category}.png"
            if name in names_written:
                problems.append(f"{images_dir / relative}: its {category} segmentation would be "
                                f"written as images/{name}, the name of an image; rename one")
    n_labels = max(plan.names, default=0) + 1
    stats = LabelStatistics(plan.categories, n_labels)
    sizes: dict[tuple[int, int], str] = {}
    labeled: dict[str, bool] = {c: False for c in plan.mask_categories}
    writing = not problems
    if writing:
        (partial / "images").mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        index = None
        if writing:  # index.csv is written row by row: memory does not grow with the dataset
            handle = stack.enter_context(open(partial / "index.csv", "w", newline="",
                                              encoding="utf-8"))
            index = csv.writer(handle, lineterminator="\n")
            index.writerow([*INDEX_COLUMNS, *plan.categories])
        writing = _convert(plan, images_dir, mask_dirs, class_lists, ignore_index, target,
                           partial, index, stats, sizes, labeled, problems, writing, progress)
    for category in plan.mask_categories:
        if plan.masks[category] and not labeled[category]:
            problems.append(f"{mask_dirs[category]}: no mask of category {category!r} holds a "
                            f"labeled pixel (every value is 0 or the ignore index "
                            f"{ignore_index}); masks saved as 0/255 must store class 1 as 1")
    if len(sizes) > 1:
        listed = ", ".join(f"{h}x{w} ({images_dir / r})" for (h, w), r in list(sizes.items())[:5])
        problems.append(f"{images_dir}: images differ in size ({listed}); dissect needs one "
                        f"size: pass --size S (or size=) to resize them")
    if problems:
        if partial.exists():
            shutil.rmtree(partial)
        raise_problems(problems, f"dataset from {images_dir}")
    write_vocabulary(partial, plan.categories, plan.members, plan.names, stats)
    with open(partial / "from_masks.json", "w", encoding="utf-8") as handle:
        json.dump({"generator": "dissect.data.from_masks", "version": FORMAT_VERSION,
                   "images": str(images_dir), "masks": {c: str(p) for c, p in mask_dirs.items()},
                   "classes": {c: list(class_lists[c].entries) for c in class_lists},
                   "image_labels": str(labels_path) if labels_path else None,
                   "split_file": str(split_path) if split_path else None,
                   "ignore_index": ignore_index, "size": list(target) if target else None,
                   "allow_missing_masks": bool(allow_missing_masks)},
                  handle, indent=1, sort_keys=True)
        handle.write("\n")
    if final.exists():
        final.rmdir()  # empty (checked above)
    os.replace(partial, final)
    return final
