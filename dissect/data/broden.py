"""Reading a Broden-format segmented image dataset (DESIGN.md §2).

A dataset directory holds ``index.csv``, ``category.csv``, ``label.csv``, one ``c_<category>.csv``
per category and an ``images/`` folder. Parsing collects every problem it finds as a
:class:`Problem` (file, line, message); :class:`BrodenDataset` refuses to open a dataset with any,
and :func:`dissect.data.check.check_dataset` lists them all.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dissect.data.vocab import Vocabulary, primary_categories
from dissect.errors import DatasetError, OptionError

INDEX_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
CATEGORY_FIELD = re.compile(r"^\s*([^();]+?)\s*\(\s*([0-9]+)\s*\)\s*$")
DIGITS = re.compile(r"[0-9]+")
#: Largest label number accepted (PNG labels encode at most R + 256 * G = 65535; image-level
#: numbers are allowed more room). Larger numbers are refused rather than allocated for.
MAX_LABEL = 2**20
#: What decoding an unreadable image or PNG raises (Pillow's decompression-bomb refusal is not
#: an OSError).
UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Problem:
    """One problem in a dataset: the file (relative to the dataset root), its line, and what."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}, line {self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}"


@dataclass
class ImageEntry:
    """One row of index.csv, resolved to file names and label numbers."""

    image: str
    split: str
    line: int
    image_size: tuple[int, int]
    seg_size: tuple[int, int]
    pixel_files: dict[str, tuple[str, ...]] = field(default_factory=dict)
    image_labels: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass
class ParsedDataset:
    """Everything the csv files of a dataset say, for the selected categories and splits."""

    root: Path
    all_categories: tuple[str, ...]
    categories: tuple[str, ...]
    vocab: Vocabulary
    known_labels: np.ndarray
    entries: list[ImageEntry]
    index_categories: tuple[str, ...]


def is_inside(relative: str) -> bool:
    """True when ``relative`` is a relative path that cannot leave its folder.

    The check is lexical (not absolute, no drive, no ``..`` component at all), so folders that are
    symbolic links inside the dataset (a Broden copy spread over disks) stay usable, and it costs
    no system call per path. ``..`` is refused even where it would cancel out lexically
    (``a/../b``): when ``a`` is a link, the system resolves ``..`` from the link's target.
    """
    if not relative or os.path.isabs(relative) or relative.startswith(("/", "\\")):
        return False
    parts = relative.replace("\\", "/").split("/")
    return ".." not in parts and ":" not in parts[0]


def _dataset_path(cell: str) -> str:
    """A path cell of index.csv in the form used both to check and to open it: ``\\`` (written
    on Windows) is a folder separator."""
    return cell.strip().replace("\\", "/")


def _read_csv(
    path: Path, root: Path, required: Sequence[str], problems: list[Problem]
) -> tuple[list[str], list[tuple[int, dict[str, str]]]] | None:
    """Rows of a csv file with their line numbers, or None (and a problem) when unusable."""
    name = str(path.relative_to(root))
    if not path.is_file():
        problems.append(Problem(name, None, "file is missing"))
        return None
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            twice = sorted({column for column in header if header.count(column) > 1})
            if twice:
                problems.append(Problem(name, 1, f"header lists column(s) {', '.join(twice)} "
                                                 f"more than once"))
                return None
            missing = [column for column in required if column not in header]
            if missing:
                problems.append(
                    Problem(name, 1, f"header lacks column(s) {', '.join(missing)}; "
                            f"expected {','.join(required)}")
                )
                return None
            rows = []
            for row in reader:
                if None in row:
                    problems.append(Problem(name, reader.line_num,
                                            "more cells than header columns"))
                    continue
                if None in row.values():
                    problems.append(Problem(name, reader.line_num,
                                            f"fewer cells than the {len(header)} header columns"))
                    continue
                rows.append((reader.line_num, row))
            return header, rows
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        problems.append(Problem(name, None, f"cannot be read as csv: {error}"))
        return None


def _parse_int(text: str | None, file: str, line: int, column: str,
               problems: list[Problem], minimum: int = 0) -> int | None:
    try:
        value = int((text or "").strip())
    except ValueError:
        problems.append(Problem(file, line, f"column {column}: {text!r} is not an integer"))
        return None
    if value < minimum:
        problems.append(Problem(file, line, f"column {column}: {value} is below {minimum}"))
        return None
    return value


def _parse_float(text: str | None, file: str, line: int, column: str,
                 problems: list[Problem]) -> float | None:
    try:
        return float((text or "").strip())
    except ValueError:
        problems.append(Problem(file, line, f"column {column}: {text!r} is not a number"))
        return None


def _parse_categories(root: Path, problems: list[Problem]) -> tuple[str, ...]:
    table = _read_csv(root / "category.csv", root, ["name"], problems)
    if table is None:
        return ()
    names: list[str] = []
    for line, row in table[1]:
        name = row["name"].strip()
        if not name:
            problems.append(Problem("category.csv", line, "empty category name"))
        elif "/" in name or "\\" in name or name.startswith("."):
            problems.append(Problem("category.csv", line,
                                    f"category name {name!r} contains '/', '\\' or starts with "
                                    f"'.'; it names the file c_<name>.csv in the dataset folder"))
        elif name in names:
            problems.append(Problem("category.csv", line, f"category {name!r} listed twice"))
        else:
            names.append(name)
    return tuple(names)


@dataclass(frozen=True)
class LabelRow:
    """The category field of one label.csv row: its line, label name and categories named."""

    line: int
    name: str
    categories: tuple[str, ...]


def category_mismatches(field_categories: dict[int, LabelRow],
                        coverage: dict[str, dict[int, float]]) -> list[Problem]:
    """label.csv rows that list a category whose ``c_<category>.csv`` has no row for the label.

    ``coverage`` holds the categories whose c_*.csv could be read (a missing file is its own
    problem).

    Primary categories come from the c_*.csv files (as in NetDissect-Lite, whose loader reads
    only them); such a label would silently get no primary category (or another one) and never be
    scored there. Broden's label.csv category field and its c_*.csv files are written together
    from the same counts, so real Broden has no such rows: they are refused, not guessed at.
    """
    problems = []
    for number, row in sorted(field_categories.items()):
        for category in row.categories:
            if category in coverage and number not in coverage[category]:
                problems.append(Problem(
                    "label.csv", row.line,
                    f"label {number} {row.name!r} is listed under category {category!r}, but "
                    f"c_{category}.csv has no row with number {number}; add that row to "
                    f"c_{category}.csv (code,number,name,frequency,coverage) or remove "
                    f"{category!r} from the label's category field"))
    return problems


def _parse_labels(
    root: Path, all_categories: tuple[str, ...], problems: list[Problem]
) -> tuple[dict[int, str], dict[int, LabelRow]]:
    """label.csv: names by number and the categories named in each row's category field."""
    table = _read_csv(root / "label.csv", root, ["number", "name", "category"], problems)
    names: dict[int, str] = {}
    field_categories: dict[int, LabelRow] = {}
    if table is None:
        return names, field_categories
    for line, row in table[1]:
        number = _parse_int(row["number"], "label.csv", line, "number", problems)
        if number is None:
            continue
        if number > MAX_LABEL:
            problems.append(Problem("label.csv", line,
                                    f"label number {number} is above the largest supported, "
                                    f"{MAX_LABEL}"))
            continue
        if number in names:
            problems.append(Problem("label.csv", line, f"label number {number} listed twice"))
            continue
        names[number] = row["name"]
        cats: list[str] = []
        text = (row["category"] or "").strip()
        for part in text.split(";") if text else []:
            match = CATEGORY_FIELD.match(part)
            if match is None:
                problems.append(Problem(
                    "label.csv", line,
                    f"category field {text!r} is malformed; expected cat(n) or cat1(n1);cat2(n2)"))
                break
            if match.group(1) not in all_categories:
                problems.append(Problem(
                    "label.csv", line,
                    f"category {match.group(1)!r} is not in category.csv"))
                continue
            cats.append(match.group(1))
        field_categories[number] = LabelRow(line, row["name"], tuple(cats))
    return names, field_categories


def _parse_coverage(
    root: Path, categories: tuple[str, ...], names: dict[int, str], problems: list[Problem]
) -> dict[str, dict[int, float]]:
    """c_<category>.csv: the coverage of each label in each category."""
    coverage: dict[str, dict[int, float]] = {}
    for category in categories:
        file = f"c_{category}.csv"
        table = _read_csv(root / file, root, ["code", "number", "coverage"], problems)
        if table is None:                    # reported as missing/unreadable already
            continue
        coverage[category] = {}
        for line, row in table[1]:
            number = _parse_int(row["number"], file, line, "number", problems)
            value = _parse_float(row["coverage"], file, line, "coverage", problems)
            if number is None or value is None:
                continue
            if not np.isfinite(value) or value < 0:
                problems.append(Problem(file, line, f"column coverage: {value} is not a "
                                                    f"finite number >= 0"))
                continue
            if number == 0:                  # 0 means unlabeled: no category membership
                continue
            if number not in names:
                problems.append(Problem(file, line, f"label number {number} is not in label.csv"))
                continue
            coverage[category][number] = value
    return coverage


class _FileIndex:
    """Which files exist under a folder, read one directory listing at a time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.listings: dict[str, set[str]] = {}

    def exists(self, relative: str) -> bool:
        folder, _, name = relative.rpartition("/")
        if folder not in self.listings:
            try:
                self.listings[folder] = {entry.name for entry in os.scandir(self.root / folder)
                                         if entry.is_file()}
            except OSError:
                self.listings[folder] = set()
        return name in self.listings[folder]


def _parse_index(
    root: Path,
    all_categories: tuple[str, ...],
    selected: tuple[str, ...],
    splits: tuple[str, ...] | None,
    known: np.ndarray,
    problems: list[Problem],
) -> tuple[list[ImageEntry], tuple[str, ...]]:
    table = _read_csv(root / "index.csv", root, INDEX_COLUMNS, problems)
    if table is None:
        return [], ()
    header, rows = table
    index_categories = tuple(header[len(INDEX_COLUMNS):]) if header[:6] == list(INDEX_COLUMNS) \
        else tuple(c for c in header if c not in INDEX_COLUMNS)
    for column in index_categories:
        if column not in all_categories:
            problems.append(Problem("index.csv", 1,
                                    f"category column {column!r} is not in category.csv"))
    images_dir = root / "images"
    files = _FileIndex(images_dir)
    entries: list[ImageEntry] = []
    for line, row in rows:
        split = row["split"].strip()
        if splits is not None and split not in splits:
            continue
        image = _dataset_path(row["image"])
        sizes = [_parse_int(row[c], "index.csv", line, c, problems, minimum=1)
                 for c in ("ih", "iw", "sh", "sw")]
        ok = all(s is not None for s in sizes)
        if not image:
            problems.append(Problem("index.csv", line, "column image is empty"))
            ok = False
        elif not is_inside(image):
            problems.append(Problem("index.csv", line,
                                    f"image path {image!r} escapes the dataset's images/ folder"))
            ok = False
        elif not files.exists(image):
            problems.append(Problem("index.csv", line, f"image images/{image} is missing"))
            ok = False
        entry = ImageEntry(image, split, line,
                           (sizes[0] or 0, sizes[1] or 0), (sizes[2] or 0, sizes[3] or 0))
        for category in selected:
            if category not in index_categories:
                continue
            pixel: list[str] = []
            labels: list[int] = []
            for part in (row[category] or "").split(";"):
                part = _dataset_path(part)
                if not part:
                    continue
                if DIGITS.fullmatch(part):
                    number = int(part)
                    if number == 0:          # 0 means unlabeled (DESIGN §2), as in a PNG
                        continue
                    if number >= len(known) or not known[number]:
                        problems.append(Problem(
                            "index.csv", line,
                            f"column {category}: label number {number} is not in label.csv"))
                        ok = False
                    else:
                        labels.append(number)
                elif not is_inside(part):
                    problems.append(Problem(
                        "index.csv", line,
                        f"column {category}: path {part!r} escapes the dataset's images/ folder"))
                    ok = False
                elif not files.exists(part):
                    problems.append(Problem(
                        "index.csv", line, f"column {category}: images/{part} is missing"))
                    ok = False
                else:
                    pixel.append(part)
            entry.pixel_files[category] = tuple(pixel)
            entry.image_labels[category] = tuple(labels)
        if ok:
            entries.append(entry)
    return entries, index_categories


def _names(values: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """A selection of categories or splits as a tuple; one name may be given as a string."""
    if values is None:
        return None
    return (values,) if isinstance(values, str) else tuple(values)


def parse_dataset(
    root: str | os.PathLike[str],
    categories: Iterable[str] | None = None,
    splits: Iterable[str] | None = None,
) -> tuple[ParsedDataset, list[Problem]]:
    """Parse the csv files of a dataset, collecting every problem rather than stopping at one.

    Parameters
    ----------
    root:
        The dataset directory.
    categories:
        Categories to use (default: all of category.csv). Unknown names raise :class:`OptionError`.
    splits:
        Splits to keep (default: all).
    """
    root = Path(root)
    categories, splits = _names(categories), _names(splits)
    problems: list[Problem] = []
    if not root.is_dir():
        raise DatasetError(f"dataset directory {root} " + (
            "is a file, not a directory" if root.exists() else "does not exist"))
    all_categories = _parse_categories(root, problems)
    if categories is None:
        selected = all_categories
    else:
        wanted = list(categories)
        unknown = [c for c in wanted if c not in all_categories]
        if unknown and all_categories:
            raise OptionError(
                f"--categories: unknown category {unknown[0]!r} in {root}; "
                f"categories: {', '.join(all_categories)}")
        selected = tuple(c for c in all_categories if c in wanted)
    names, field_categories = _parse_labels(root, all_categories, problems)
    coverage = _parse_coverage(root, all_categories, names, problems)
    problems.extend(category_mismatches(field_categories, coverage))
    num_labels = max(names, default=0) + 1
    known = np.zeros(num_labels, dtype=bool)
    label_names = [""] * num_labels      # NetDissect-Lite: numbers without a row get name ""
    for number, name in names.items():
        label_names[number] = name
        known[number] = number > 0
    memberships = [tuple(c for c in all_categories if n in coverage.get(c, {}))
                   for n in range(num_labels)]
    primary = primary_categories(selected, coverage, num_labels)
    vocab = Vocabulary(selected, label_names, primary, memberships)
    split_tuple = tuple(splits) if splits is not None else None
    entries, index_categories = _parse_index(root, all_categories, selected, split_tuple, known,
                                             problems)
    if split_tuple is not None and not problems:
        present = _present_splits(root)
        for split in split_tuple:
            if split not in present:
                raise OptionError(f"split {split!r} is not in {root / 'index.csv'}; "
                                  f"splits: {', '.join(sorted(present))}")
    if not entries and not problems:
        problems.append(Problem("index.csv", None, "lists no images"))
    parsed = ParsedDataset(root, all_categories, selected, vocab, known, entries, index_categories)
    return parsed, problems


def _present_splits(root: Path) -> set[str]:
    with open(root / "index.csv", newline="", encoding="utf-8-sig") as handle:
        return {(row.get("split") or "").strip() for row in csv.DictReader(handle)}


def read_rgb(path: str | os.PathLike[str], where: str | None = None) -> np.ndarray:
    """uint8 (h, w, 3) RGB pixels of an image file; DatasetError naming the file (and
    ``where``, e.g. its index.csv row) when it cannot be read as an image."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except UNREADABLE as error:
        place = f" ({where})" if where else ""
        raise DatasetError(f"{path}{place} cannot be read as an image: {error}") from None


def encode_labels(labels: np.ndarray) -> np.ndarray:
    """uint8 (h, w, 3) Broden encoding of integer label numbers (h, w): R + 256 * G, B = 0
    (the inverse of :func:`decode_segmentation`)."""
    labels = np.asarray(labels, dtype=np.int64)
    rgb = np.zeros(labels.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    return rgb


def _label_pixels(path: str | os.PathLike[str]) -> np.ndarray:
    """Label numbers of a segmentation PNG, (sh, sw), in the narrowest dtype that holds them.

    RGB/RGBA: a uint16 view of each pixel's R and G bytes (little-endian R + 256 * G), made
    without arithmetic; L, I;16 and I: the decoded values (uint8, uint16, int32).
    """
    with Image.open(path, formats=("PNG",)) as image:
        mode = image.mode
        if mode not in ("RGB", "RGBA", "L", "I", "I;16"):
            raise ValueError(f"PNG mode {mode} is not a label encoding; expected RGB "
                             f"(label = R + 256 * G) or single-channel L/I")
        pixels = np.asarray(image)
    if mode in ("L", "I", "I;16"):
        return pixels
    # bytes R, G of every pixel read as one little-endian uint16: R + 256 * G (B, A ignored)
    return np.ndarray(pixels.shape[:2], dtype="<u2", buffer=pixels, offset=0,
                      strides=pixels.strides[:2])


def decode_segmentation(path: str | os.PathLike[str]) -> np.ndarray:
    """Label numbers of a segmentation PNG: R + 256 * G as int32 (sh, sw).

    Single-channel PNGs (mode L or I) hold the label number directly. Only the PNG decoder is
    tried (DESIGN.md §2: segmentations are PNGs): no other format's parser sees the file.
    """
    return _label_pixels(path).astype(np.int32)


def pad_segmentations(items: Sequence[tuple[np.ndarray, np.ndarray]]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-image (seg (Lyr, sh, sw), image_labels (K,)) pairs, zero-padding both.

    Returns
    -------
    seg:
        int32 (n, Lmax, sh, sw) with Lmax = max(1, max Lyr).
    image_labels:
        int32 (n, Kmax) with Kmax = max(1, max K).

    Raises ValueError when the images' segmentation sizes differ.
    """
    sizes = {seg.shape[1:] for seg, _ in items}
    if len(sizes) != 1:
        raise ValueError(f"segmentation sizes differ between images: {sorted(sizes)}")
    n_layers = max(1, max(seg.shape[0] for seg, _ in items))
    n_labels = max(1, max(len(labels) for _, labels in items))
    seg_out = np.zeros((len(items), n_layers, *sizes.pop()), dtype=np.int32)
    labels_out = np.zeros((len(items), n_labels), dtype=np.int32)
    for row, (seg, labels) in enumerate(items):
        seg_out[row, : seg.shape[0]] = seg
        labels_out[row, : len(labels)] = labels
    return seg_out, labels_out


class BrodenDataset:
    """A Broden-format dataset, validated when opened.

    Parameters
    ----------
    root:
        The dataset directory (DESIGN.md §2).
    categories:
        Categories to use, default all; their order is always category.csv's. Primary
        categories are decided among the selected categories.
    splits:
        Splits to keep (values of index.csv's ``split`` column), default all.

    Raises
    ------
    DatasetError
        When any csv row is malformed, a referenced file is missing, a label number is unknown or
        a path escapes the dataset root; the message names the file and line of the first problem.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        categories: Iterable[str] | None = None,
        splits: Iterable[str] | None = None,
    ) -> None:
        categories = _names(categories)
        splits = _names(splits)
        parsed, problems = parse_dataset(root, categories, splits)
        if problems:
            more = f" (and {len(problems) - 1} more problems; run `dissect dataset check " \
                   f"{parsed.root}`)" if len(problems) > 1 else ""
            raise DatasetError(f"{parsed.root}: {problems[0]}{more}")
        self._adopt(parsed, splits)
        self._open_args = (str(parsed.root), categories, splits)

    def _adopt(self, parsed: ParsedDataset, splits: tuple[str, ...] | None) -> None:
        self._open_args: tuple[str, tuple[str, ...] | None, tuple[str, ...] | None] | None = None
        self._fingerprint: str | None = None
        self.root = parsed.root
        self.vocab = parsed.vocab
        self.categories = parsed.categories
        self.selected_splits = splits
        self._entries = parsed.entries
        self._all_categories = parsed.all_categories
        self._known = parsed.known_labels
        self._allowed = parsed.known_labels.copy()  # known labels, and 0 (no label)
        if len(self._allowed):
            self._allowed[0] = True
        # the largest T with every label 1..T in label.csv (label maps up to T need no lookup)
        unknown = np.flatnonzero(~self._allowed)
        self._known_prefix = int(unknown[0]) - 1 if len(unknown) else len(self._allowed) - 1

    @classmethod
    def from_parsed(cls, parsed: ParsedDataset) -> BrodenDataset:
        """A dataset over the rows that parsed cleanly, without raising (for the checker)."""
        dataset = cls.__new__(cls)
        dataset._adopt(parsed, None)
        return dataset

    def __len__(self) -> int:
        return len(self._entries)

    def __reduce__(self) -> tuple:
        """Pickle as (root, selection, fingerprint), not as every parsed row.

        Dask's processes and distributed schedulers send the dataset with every task: for Broden
        (63k images) the rows would be megabytes per task. A worker process reopens the dataset
        once (:func:`reopen_dataset` keeps it) and checks that its csv files still have the
        fingerprint they had here. Datasets made by :meth:`from_parsed` pickle their rows.
        """
        if self._open_args is None:
            return (_restore_dataset, (self.__dict__,))
        if self._fingerprint is None:
            self._fingerprint = self.fingerprint()
        return (reopen_dataset, (*self._open_args, self._fingerprint))

    def __repr__(self) -> str:
        return (f"BrodenDataset({str(self.root)!r}, {len(self)} images, "
                f"categories={self.categories})")

    @property
    def image_names(self) -> list[str]:
        """The ``image`` column of every selected image (relative to images/)."""
        return [entry.image for entry in self._entries]

    @property
    def splits(self) -> np.ndarray:
        """(N,) str: the split of every selected image."""
        return np.array([entry.split for entry in self._entries], dtype=str)

    def labeled_images(self) -> np.ndarray:
        """int64 (M,) indices of the images with any label in the selected categories.

        An image counts when a selected category's cell lists a segmentation PNG or an
        image-level label (NetDissect-Lite's ``index_has_any_data``, which leaves the other
        images out of the whole dissection, thresholds included).
        """
        return np.array([i for i, entry in enumerate(self._entries)
                         if any(entry.pixel_files.get(c) or entry.image_labels.get(c)
                                for c in self.categories)], dtype=np.int64)

    def subset(self, split: str) -> np.ndarray:
        """int64 indices of the selected images whose split is ``split`` (OptionError if none)."""
        indices = np.flatnonzero(self.splits == split).astype(np.int64)
        if len(indices) == 0:
            present = sorted(set(self.splits.tolist()))
            raise OptionError(f"split {split!r} has no images in {self.root}; "
                              f"splits: {', '.join(present)}")
        return indices

    def _uniform(self, attribute: str, columns: str) -> tuple[int, int]:
        sizes = {getattr(entry, attribute) for entry in self._entries}
        if len(sizes) != 1:
            example = sorted(sizes)[:3]
            raise DatasetError(
                f"{self.root / 'index.csv'}: columns {columns} differ between images "
                f"({example}); dissect needs one size for the whole selection")
        return sizes.pop()

    @property
    def image_size(self) -> tuple[int, int]:
        """(ih, iw), the same for every selected image (DatasetError otherwise)."""
        return self._uniform("image_size", "ih,iw")

    @property
    def seg_size(self) -> tuple[int, int]:
        """(sh, sw), the same for every selected image (DatasetError otherwise)."""
        return self._uniform("seg_size", "sh,sw")

    def fingerprint(self, selection: bool = True) -> str:
        """sha256 over the dataset's csv files and the category and split selection.

        ``selection=False`` gives the fingerprint of the same dataset opened with no category or
        split selection (what the recorder stores), without parsing it again.
        """
        digest = hashlib.sha256()
        names = ["index.csv", "category.csv", "label.csv"] + [
            f"c_{category}.csv" for category in self._all_categories]
        for name in names:
            digest.update(name.encode())
            digest.update((self.root / name).read_bytes())
        chosen = (self.categories, self.selected_splits) if selection else (
            self._all_categories, None)
        digest.update(repr(chosen).encode())
        return digest.hexdigest()

    def _where(self, index: int) -> str:
        return f"{self.root / 'index.csv'}, line {self._entries[index].line}"

    def load_image(self, index: int) -> np.ndarray:
        """uint8 (ih, iw, 3) RGB pixels of image ``index``."""
        entry = self._entries[index]
        path = self.root / "images" / entry.image
        pixels = read_rgb(path, self._where(index))
        if pixels.shape[:2] != entry.image_size:
            raise DatasetError(
                f"{path} ({self._where(index)}) is {pixels.shape[0]}x{pixels.shape[1]}; "
                f"index.csv says ih,iw = {entry.image_size[0]},{entry.image_size[1]}")
        return pixels

    def _layer_files(self, index: int) -> list[str]:
        """Segmentation PNGs of image ``index`` (relative to images/), selected categories in
        category.csv's order."""
        entry = self._entries[index]
        return [name for category in self.categories
                for name in entry.pixel_files.get(category, ())]

    def _image_labels(self, index: int) -> list[int]:
        entry = self._entries[index]
        return [n for c in self.categories for n in entry.image_labels.get(c, ())]

    def load_segmentation(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Pixel label layers and image-level labels of image ``index``.

        Returns
        -------
        seg:
            int32 (Lyr, sh, sw): one layer per segmentation PNG of every selected category
            (0 = no label); Lyr may be 0.
        image_labels:
            int32 (K,): the image-level label numbers of every selected category.
        """
        seg, labels = self.load_segmentations([index])
        return seg[0, :len(self._layer_files(index))], labels[0, :len(self._image_labels(index))]

    def _decode_layer(self, index: int, path: str, out: np.ndarray) -> int:
        """Decode segmentation PNG ``path`` of image ``index`` into int32 (sh, sw) ``out``;
        returns its largest label number (0 for an empty layer)."""
        entry = self._entries[index]
        try:
            layer = _label_pixels(path)
        except UNREADABLE as error:
            raise DatasetError(f"{path} ({self._where(index)}) cannot be read: {error}") from None
        if layer.shape != entry.seg_size:
            raise DatasetError(
                f"{path} ({self._where(index)}) is {layer.shape[0]}x{layer.shape[1]}; "
                f"index.csv says sh,sw = {entry.seg_size[0]},{entry.seg_size[1]}")
        np.copyto(out, layer, casting="unsafe")
        return int(layer.max()) if layer.size else 0

    def _check_labels(self, seg: np.ndarray, files: list[tuple[int, int, int, str]],
                      largest: int) -> None:
        """DatasetError naming the first file whose layer in int32 (n, Lmax, sh, sw) ``seg``
        holds a label number not in label.csv; ``files`` is (row, layer, image index, name) per
        decoded file, ``largest`` the largest label number in them.

        Only when ``largest`` is beyond the labels 1..T that are all known (PNG values are never
        negative; Broden's labels are contiguous) is each layer looked up in the table of known
        labels.
        """
        if largest <= self._known_prefix:
            return
        for row, layer, index, name in files:
            values = seg[row, layer]
            if values.max() >= len(self._known) or not self._allowed[values].all():
                bad = sorted(set(np.unique(values).tolist())
                             - set(np.flatnonzero(self._known).tolist()) - {0})
                raise DatasetError(
                    f"{self.root / 'images' / name} ({self._where(index)}) holds label number "
                    f"{bad[0]}, which is not in label.csv")

    def load_segmentations(self, indices: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """Zero-padded segmentations of several images.

        Returns
        -------
        seg:
            int32 (n, Lmax, sh, sw), Lmax >= 1, zero-padded layers.
        image_labels:
            int32 (n, Kmax), Kmax >= 1, zero-padded image-level labels.
        """
        rows = [int(i) for i in indices]
        if not rows:
            sh, sw = self.seg_size
            return np.zeros((0, 1, sh, sw), np.int32), np.zeros((0, 1), np.int32)
        sizes = {self._entries[i].seg_size for i in rows}
        if len(sizes) != 1:
            raise DatasetError(f"{self.root / 'index.csv'}: segmentation sizes differ between "
                               f"images: {sorted(sizes)}")
        layer_files = [self._layer_files(i) for i in rows]
        level = [self._image_labels(i) for i in rows]
        # every layer is decoded into place or zeroed (padding): no zero-filled allocation
        seg = np.empty((len(rows), max(1, max(map(len, layer_files))), *sizes.pop()), np.int32)
        labels = np.zeros((len(rows), max(1, max(map(len, level)))), np.int32)
        images = os.path.join(self.root, "images")   # names are checked relative (is_inside)
        files, largest = [], 0
        for row, (index, names) in enumerate(zip(rows, layer_files)):
            for layer, name in enumerate(names):
                largest = max(largest, self._decode_layer(index, os.path.join(images, name),
                                                          seg[row, layer]))
                files.append((row, layer, index, name))
            seg[row, len(names):] = 0
            labels[row, :len(level[row])] = level[row]
        self._check_labels(seg, files, largest)
        return seg, labels

    def image_level_labels(self, category: str) -> list[np.ndarray]:
        """Per selected image, int32 array of its image-level labels in ``category``."""
        if category not in self.categories:
            raise OptionError(f"unknown category {category!r}; categories of {self.root}: "
                              f"{', '.join(self.categories)}")
        return [np.array(entry.image_labels.get(category, ()), dtype=np.int32)
                for entry in self._entries]


_REOPENED: dict[tuple, BrodenDataset] = {}
_REOPENED_LOCK = threading.Lock()
#: Datasets :func:`reopen_dataset` keeps per process (the most recently used).
_REOPENED_MAX = 4


def reopen_dataset(root: str, categories: tuple[str, ...] | None, splits: tuple[str, ...] | None,
                   fingerprint: str) -> BrodenDataset:
    """The dataset a pickled :class:`BrodenDataset` stands for, opened once per process.

    Raises
    ------
    DatasetError
        When the dataset's csv files no longer have ``fingerprint`` (changed on disk since the
        dataset was pickled), or cannot be parsed.
    """
    key = (root, categories, splits, fingerprint)
    with _REOPENED_LOCK:
        dataset = _REOPENED.pop(key, None)
        if dataset is None:
            dataset = BrodenDataset(root, categories, splits)
            dataset._fingerprint = dataset.fingerprint()
            if dataset._fingerprint != fingerprint:
                raise DatasetError(f"{root}: the dataset's csv files changed after this job "
                                   f"was started (fingerprint {dataset._fingerprint[:12]}, "
                                   f"expected {fingerprint[:12]}); run it again")
        _REOPENED[key] = dataset                       # most recent last
        while len(_REOPENED) > _REOPENED_MAX:
            _REOPENED.pop(next(iter(_REOPENED)))
    return dataset


def _restore_dataset(state: dict) -> BrodenDataset:
    dataset = BrodenDataset.__new__(BrodenDataset)
    dataset.__dict__.update(state)
    return dataset
