"""Shared fixtures: a small generated toy dataset and a 3-image Broden directory written by hand."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_label_png(path: Path, labels: np.ndarray) -> None:
    """Write int label numbers (h, w) as a Broden segmentation PNG: R + 256 * G."""
    labels = np.asarray(labels, dtype=np.int64)
    rgb = np.zeros(labels.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb, "RGB").save(path)


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@dataclass
class TinyBroden:
    """The hand-written dataset and what each image holds, for exact comparisons."""

    root: Path
    seg: list[np.ndarray]           # per image: (Lyr, 4, 4) int label layers, category order
    image_labels: list[list[int]]   # per image: image-level label numbers, category order
    images: list[np.ndarray]        # per image: (8, 8, 3) uint8


def make_broden_tiny(root: Path) -> TinyBroden:
    """Three 8x8 images with 4x4 segmentations in categories color, object, part, scene.

    Label 300 ('wheel', number above 255) belongs to object and part, with the larger coverage in
    object (its primary category). Image 0 has two part layers; scenes are image-level labels;
    image 1 has no object annotation.
    """
    (root / "images").mkdir(parents=True)
    write_csv(root / "category.csv", ["name", "first", "last", "count", "frequency"],
              [["color", 1, 2, 2, 2], ["object", 3, 300, 2, 2], ["part", 4, 300, 3, 2],
               ["scene", 6, 7, 2, 3]])
    labels = [[0, "-", "", 0, 0, ""], [1, "red", "color(1)", 2, 0.3, ""],
              [2, "green", "color(2)", 1, 0.2, ""], [3, "dog", "object(1)", 1, 0.25, ""],
              [4, "leg", "part(1)", 1, 0.1, ""], [5, "head", "part(2)", 1, 0.1, ""],
              [6, "kitchen", "scene(1)", 2, 1.0, ""], [7, "street", "scene(2)", 1, 1.0, ""],
              [300, "wheel", "object(2);part(3)", 1, 0.2, ""]]
    write_csv(root / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
              labels)
    header = ["code", "number", "name", "frequency", "coverage"]
    write_csv(root / "c_color.csv", header, [[1, 1, "red", 2, 0.3], [2, 2, "green", 1, 0.2]])
    write_csv(root / "c_object.csv", header, [[1, 3, "dog", 1, 0.25], [2, 300, "wheel", 1, 0.2]])
    write_csv(root / "c_part.csv", header,
              [[1, 4, "leg", 1, 0.1], [2, 5, "head", 1, 0.1], [3, 300, "wheel", 1, 0.05]])
    write_csv(root / "c_scene.csv", header, [[1, 6, "kitchen", 2, 1.0], [2, 7, "street", 1, 1.0]])

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    color0 = np.array([[1, 1, 2, 2]] * 4)
    object0 = np.array([[0, 3, 3, 0], [0, 3, 3, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    part0a = np.array([[0, 4, 0, 0], [0, 4, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    part0b = np.array([[0, 5, 5, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    color1 = np.array([[2, 2, 2, 2], [2, 2, 2, 2], [1, 1, 0, 0], [0, 0, 0, 0]])
    object2 = np.array([[0, 0, 0, 0], [0, 300, 300, 0], [0, 300, 300, 0], [0, 0, 3, 3]])
    part2 = np.array([[0, 0, 0, 0], [0, 0, 300, 0], [0, 0, 0, 0], [0, 0, 0, 4]])
    files = {"a0_color.png": color0, "a0_object.png": object0, "a0_part1.png": part0a,
             "a0_part2.png": part0b, "a1_color.png": color1, "a2_object.png": object2,
             "a2_part.png": part2}
    for name, array in files.items():
        write_label_png(root / "images" / "seg" / name, array)
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(root / "images" / f"img{i}.png")
    write_csv(root / "index.csv",
              ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "part", "scene"],
              [["img0.png", "train", 8, 8, 4, 4, "seg/a0_color.png", "seg/a0_object.png",
                "seg/a0_part1.png;seg/a0_part2.png", "6"],
               ["img1.png", "train", 8, 8, 4, 4, "seg/a1_color.png", "", "", "7"],
               ["img2.png", "val", 8, 8, 4, 4, "", "seg/a2_object.png", "seg/a2_part.png", "6"]])
    seg = [np.stack([color0, object0, part0a, part0b]), np.stack([color1]),
           np.stack([object2, part2])]
    return TinyBroden(root, seg, [[6], [7], [6]], images)


@pytest.fixture
def broden_tiny(tmp_path: Path) -> TinyBroden:
    """A fresh copy of the 3-image hand-written Broden dataset (tests may corrupt it)."""
    return make_broden_tiny(tmp_path / "broden_tiny")


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated toy dataset (48 images of 64x64), shared by the whole session.

    Tests must not modify it.
    """
    from dissect.toy import generate_toy_dataset

    return generate_toy_dataset(tmp_path_factory.mktemp("toy") / "toybroden", n_images=48,
                                size=64, seed=0)
