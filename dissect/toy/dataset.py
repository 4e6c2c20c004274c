"""Writing the toy dataset in the Broden layout (DESIGN.md §2).

Layout written by :func:`generate_toy_dataset`::

    out_dir/
      index.csv        image,split,ih,iw,sh,sw,color,object,material,part,scene,texture
      category.csv     name,first,last,count,frequency
      label.csv        number,name,category,frequency,coverage,syns
      c_<category>.csv code,number,name,frequency,coverage   (one per category)
      toy.json         the generator's parameters
      images/toy/000000.png            the image (size x size RGB)
      images/toy/000000_color.png      label numbers R + 256 * G at (size//2 x size//2)
      images/toy/000000_object.png
      images/toy/000000_material.png   only on material-annotated images (about half)
      images/toy/000000_part_1.png     parts of one kind of object (e.g. houses) ...
      images/toy/000000_part_2.png     ... and of another (e.g. cars): two part layers

``frequency`` counts images that carry a label (in that category); ``coverage`` is the sum over
images of the fraction of the image's pixels carrying it (Broden's "images' worth" of pixels).
In label.csv both are summed over the label's categories, as in Broden.
Scenes and textures are image-level labels (digits in the index cell), so each image carrying
one adds 1.0 to its coverage.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dissect.data.broden import encode_labels
from dissect.errors import OptionError
from dissect.toy.scenes import (
    CATEGORIES,
    CATEGORY_LABELS,
    LABEL_NAMES,
    LABELS,
    PART_LAYERS,
    SCENES,
    ToyScene,
    draw_scene,
    scale_nearest,
)

TOY_SCENES: tuple[str, ...] = SCENES
"""Scene names, the toy classes, in label number order: class k is ``TOY_SCENES[k]``."""

GENERATOR_VERSION = 1
"""Bumped whenever the drawing changes, so a stored toy dataset can be recognised as stale."""

IMAGE_FOLDER = "toy"
VAL_OCCURRENCES = (3, 4)
"""Occurrence k (0-based) of a scene goes to ``val`` when ``k % 8`` is in this tuple (25%)."""


@dataclass(frozen=True)
class ToyImage:
    """One image of the toy dataset: its row in index.csv and what was drawn.

    Attributes
    ----------
    index:
        Row number (0-based) in index.csv.
    name:
        Image path relative to ``images/`` (``toy/000000.png``).
    split:
        ``train`` or ``val``.
    size:
        Image side in pixels; the segmentation side is ``size // 2``.
    drawn:
        The label maps at the segmentation size.
    """

    index: int
    name: str
    split: str
    size: int
    drawn: ToyScene

    @property
    def stem(self) -> str:
        return self.name[: -len(".png")]

    def pixels(self) -> np.ndarray:
        """uint8 (size, size, 3): the image, the drawn shades scaled up by nearest neighbour."""
        return scale_nearest(self.drawn.rgb(), self.size)

    def part_layers(self) -> list[np.ndarray]:
        """The non-empty part layers, in layer order: each int32 (size//2, size//2)."""
        return [layer for layer in self.drawn.part if layer.any()]

    def cells(self) -> dict[str, str]:
        """The category cells of this image's index.csv row."""
        drawn, stem = self.drawn, self.stem
        parts = [f"{stem}_part_{k + 1}.png" for k in range(PART_LAYERS) if drawn.part[k].any()]
        return {
            "color": f"{stem}_color.png",
            "object": f"{stem}_object.png",
            "material": f"{stem}_material.png" if drawn.material_annotated else "",
            "part": ";".join(parts),
            "scene": str(drawn.scene_label),
            "texture": ";".join(str(t) for t in drawn.textures),
        }


def _check_arguments(n_images: int, size: int, seed: int) -> None:
    if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or n_images < 1:
        raise OptionError(f"--n-images: expected a positive integer, got {n_images!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise OptionError(f"--size: expected an integer >= 16 (pixels), got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise OptionError(f"--seed: expected a non-negative integer, got {seed!r}")


def plan_toy_dataset(n_images: int, seed: int) -> list[tuple[str, str, bool]]:
    """Scene, split and material annotation of every image, before drawing.

    Scenes are balanced (a seeded permutation of ``i % len(SCENES)``). Within each scene, the
    k-th image goes to ``val`` when ``k % 8`` is 3 or 4 (25%) and has its materials annotated
    when k is odd (50%, in both splits). The first beach image is never annotated, so ``water``
    always has a strictly larger coverage as an object than as a material.

    Returns
    -------
    One (scene, split, material_annotated) tuple per image, in index order.
    """
    _check_arguments(n_images, 16, seed)
    rng = np.random.default_rng([seed, 0x70F])
    order = rng.permutation(np.arange(n_images) % len(SCENES))
    seen = {scene: 0 for scene in SCENES}
    plan = []
    for scene_index in order.tolist():
        scene = SCENES[scene_index]
        k = seen[scene]
        seen[scene] += 1
        plan.append((scene, "val" if k % 8 in VAL_OCCURRENCES else "train", k % 2 == 1))
    return plan


def toy_images(n_images: int = 600, size: int = 112, seed: int = 0) -> Iterator[ToyImage]:
    """Draw the toy dataset's images one at a time (pure; nothing is written).

    Image i is drawn from its own generator seeded by ``(seed, i)``; its scene, split and
    annotation come from :func:`plan_toy_dataset`. ``generate_toy_dataset(out, n, size, seed)``
    writes exactly these images.
    """
    _check_arguments(n_images, size, seed)
    grid = size // 2
    for index, (scene, split, annotated) in enumerate(plan_toy_dataset(n_images, seed)):
        rng = np.random.default_rng([seed, index])
        drawn = draw_scene(scene, grid, rng, material_annotated=annotated)
        yield ToyImage(index, f"{IMAGE_FOLDER}/{index:06d}.png", split, size, drawn)


def _save_png(path: Path, rgb: np.ndarray) -> None:
    """Write RGB pixels as a PNG with no metadata (byte-identical for identical pixels)."""
    Image.fromarray(np.ascontiguousarray(rgb), "RGB").save(path, format="PNG", compress_level=6)


class _Tally:
    """Per category and label: images carrying it (frequency) and summed pixel fraction."""

    def __init__(self) -> None:
        size = len(LABEL_NAMES)
        self.frequency = {c: np.zeros(size, dtype=np.int64) for c in CATEGORIES}
        self.coverage = {c: np.zeros(size, dtype=np.float64) for c in CATEGORIES}
        self.images = {c: 0 for c in CATEGORIES}

    def add_pixels(self, category: str, layers: list[np.ndarray]) -> None:
        if not layers:
            return
        counts = sum(np.bincount(layer.ravel(), minlength=len(LABEL_NAMES)) for layer in layers)
        counts[0] = 0
        self.frequency[category] += counts > 0
        self.coverage[category] += counts / layers[0].size
        self.images[category] += bool(counts.any())

    def add_image_labels(self, category: str, labels: tuple[int, ...]) -> None:
        for label in set(labels):
            self.frequency[category][label] += 1
            self.coverage[category][label] += 1.0
        self.images[category] += bool(labels)

    def add(self, image: ToyImage) -> None:
        drawn = image.drawn
        self.add_pixels("color", [drawn.color])
        self.add_pixels("object", [drawn.object])
        if drawn.material_annotated:
            self.add_pixels("material", [drawn.material])
        self.add_pixels("part", image.part_layers())
        self.add_image_labels("scene", (drawn.scene_label,))
        self.add_image_labels("texture", drawn.textures)


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _number(value: float) -> str:
    return f"{value:.6f}"


def _write_vocabulary(out: Path, tally: _Tally) -> None:
    """category.csv, label.csv and c_<category>.csv from the tallied statistics."""
    members = {c: [LABELS[name] for name in CATEGORY_LABELS[c]] for c in CATEGORIES}
    _write_csv(out / "category.csv", ["name", "first", "last", "count", "frequency"],
               [[c, min(members[c]), max(members[c]), len(members[c]), tally.images[c]]
                for c in CATEGORIES])
    rows: list[list[object]] = []
    for number in range(1, len(LABEL_NAMES)):
        cats = [c for c in CATEGORIES if number in members[c]]
        field = ";".join(f"{c}({tally.frequency[c][number]})" for c in cats)
        frequency = sum(int(tally.frequency[c][number]) for c in cats)
        coverage = sum(float(tally.coverage[c][number]) for c in cats)
        rows.append([number, LABEL_NAMES[number], field, frequency, _number(coverage), ""])
    _write_csv(out / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
               rows)
    for c in CATEGORIES:
        _write_csv(out / f"c_{c}.csv", ["code", "number", "name", "frequency", "coverage"],
                   [[code, n, LABEL_NAMES[n], int(tally.frequency[c][n]),
                     _number(float(tally.coverage[c][n]))]
                    for code, n in enumerate(sorted(members[c]), start=1)])


def generate_toy_dataset(out_dir: str | os.PathLike[str], n_images: int = 600, size: int = 112,
                         seed: int = 0) -> Path:
    """Write the deterministic toy dataset in the Broden layout.

    Five scenes (:data:`TOY_SCENES`: beach, forest, street, kitchen, bedroom), each with its own
    layout, objects and colours, drawn with randomness from ``seed``. Categories, in order:
    ``color``, ``object`` and ``part`` (pixel labels; parts of different kinds of object in two
    layers), ``material`` (pixel labels on about half the images; the cell is empty on the
    others), ``scene`` (image-level, every image) and ``texture`` (image-level, on images with
    stripes, dots or a chequered floor). ``water`` is both an object and a material; its primary
    category is ``object`` (larger coverage). Split: 75% ``train``, 25% ``val``, balanced per
    scene.

    Parameters
    ----------
    out_dir:
        Directory to create; it must not exist or be empty. Files are written to
        ``<out_dir>.partial`` first and moved into place when complete.
    n_images:
        Number of images (>= 1; >= 5 gives every scene).
    size:
        Image side in pixels (>= 16); segmentations are ``size // 2`` square.
    seed:
        Non-negative seed; the same arguments give byte-identical files.

    Returns
    -------
    The dataset directory as a :class:`Path`.

    Raises
    ------
    OptionError
        For an invalid argument or an ``out_dir`` that holds files.
    """
    _check_arguments(n_images, size, seed)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OptionError(f"--out: {out} already exists and is not an empty directory; "
                          f"remove it or choose another directory")
    final, out = out, out.resolve().with_name(out.resolve().name + ".partial")
    if out.exists():
        shutil.rmtree(out)  # a previous run was interrupted
    (out / "images" / IMAGE_FOLDER).mkdir(parents=True)
    grid = size // 2
    tally = _Tally()
    images_dir = out / "images"
    with open(out / "index.csv", "w", newline="", encoding="utf-8") as handle:
        index = csv.writer(handle, lineterminator="\n")
        index.writerow(["image", "split", "ih", "iw", "sh", "sw", *CATEGORIES])
        for image in toy_images(n_images, size, seed):  # one image in memory at a time
            drawn = image.drawn
            _save_png(images_dir / image.name, image.pixels())
            _save_png(images_dir / f"{image.stem}_color.png", encode_labels(drawn.color))
            _save_png(images_dir / f"{image.stem}_object.png", encode_labels(drawn.object))
            if drawn.material_annotated:
                _save_png(images_dir / f"{image.stem}_material.png",
                          encode_labels(drawn.material))
            for k in range(PART_LAYERS):
                if drawn.part[k].any():
                    _save_png(images_dir / f"{image.stem}_part_{k + 1}.png",
                              encode_labels(drawn.part[k]))
            tally.add(image)
            cells = image.cells()
            index.writerow([image.name, image.split, size, size, grid, grid]
                           + [cells[c] for c in CATEGORIES])
    _write_vocabulary(out, tally)
    with open(out / "toy.json", "w", encoding="utf-8") as handle:
        json.dump({"generator": "dissect.toy", "version": GENERATOR_VERSION,
                   "n_images": int(n_images), "size": int(size), "seed": int(seed)},
                  handle, indent=1, sort_keys=True)
        handle.write("\n")
    os.replace(out, final)
    return final
