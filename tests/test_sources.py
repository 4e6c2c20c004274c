"""Dataset sources (DESIGN §13): from-masks, segment, and ImageFolder evaluation sets."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import dissect.segment as segment_module
from dissect.ablation import AblationStudy, DatasetImages, class_metrics
from dissect.data import BrodenDataset, check_dataset, decode_segmentation
from dissect.data.from_masks import (
    dataset_from_masks,
    nearest_resize,
    read_class_list,
    strip_extension,
)
from dissect.data.imagefolder import ImageFolderDataset
from dissect.errors import DatasetError, ModelError, OptionError
from dissect.segment import label_maps, segment_images
from dissect.tally import dissect_layer


# ----------------------------------------------------------------------------- helpers
def save_rgb(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), "RGB").save(path)


def save_mask(path: Path, values: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(values, dtype=np.uint8), mode).save(path)


def write_label_png(path: Path, labels: np.ndarray) -> None:
    """Broden encoding R + 256 * G written independently of the code under test."""
    labels = np.asarray(labels, dtype=np.int64)
    rgb = np.zeros(labels.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    save_rgb(path, rgb)


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_cache(path: Path, acts: np.ndarray) -> Path:
    """A complete activation cache (DESIGN §4a), written directly with h5py."""
    acts16 = acts.astype(np.float16)
    n = len(acts16)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as file:
        file.create_dataset("acts", data=acts16)
        file.create_dataset("amax", data=acts16.reshape(n, acts16.shape[1], -1).max(-1)
                            .astype(np.float32))
        file.create_dataset("done", data=np.ones(n, dtype=bool))
        file.attrs["fingerprint"] = json.dumps({"layer": "conv"})
        file.attrs["schema_version"] = 1
        file.attrs["n_written"] = n
        file.attrs["complete"] = True
    return path


def half(values: np.ndarray) -> np.ndarray:
    """Nearest-neighbour halving of an even-sized map: output pixel i is source pixel 2i + 1."""
    return values[1::2, 1::2]


# ----------------------------------------------------------------------------- from-masks
OBJECT_CLASSES = ["person", "car"]                 # codes 1, 2 -> labels 1, 2
PART_CLASSES = ["background", "wheel", "window"]   # background line: codes 1, 2 -> labels 3, 4
SCENES = {"beach": 5, "street": 6}                 # image-level, no class list: sorted names
N_IMAGES, SIDE = 5, 8


@pytest.fixture(scope="module")
def mask_source(tmp_path_factory) -> dict:
    """Five 8x8 images in two folders, object masks (mode L, with the ignore value 255), part
    masks (mode P, palette indices) on four of them, scene labels for every image."""
    root = tmp_path_factory.mktemp("masks")
    rng = np.random.default_rng(0)
    names = ["a/img0.jpg", "a/img1.png", "b/img2.png", "b/img3.png", "b/img4.png"]
    objects, parts = [], []
    for i, name in enumerate(names):
        save_rgb(root / "images" / name, rng.integers(0, 256, (SIDE, SIDE, 3)))
        obj = rng.choice([0, 1, 2, 255], size=(SIDE, SIDE), p=[0.3, 0.3, 0.3, 0.1])
        save_mask(root / "masks" / "object" / (strip_extension(name) + ".png"), obj)
        objects.append(obj)
        if i == 3:
            parts.append(None)                          # image 3 is not part-annotated
            continue
        part = rng.choice([0, 1, 2], size=(SIDE, SIDE))
        image = Image.fromarray(part.astype(np.uint8), "P")
        image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
        (root / "masks" / "part" / Path(name).parent).mkdir(parents=True, exist_ok=True)
        image.save(root / "masks" / "part" / (strip_extension(name) + ".png"))
        parts.append(part)
    (root / "object.txt").write_text("\n".join(OBJECT_CLASSES) + "\n\n")
    (root / "part.txt").write_text("\n".join(PART_CLASSES) + "\n")
    scenes = ["street", "beach", "beach", "street", "beach"]
    write_csv(root / "labels.csv", ["image", "category", "label"],
              [[strip_extension(n) if i % 2 else n, "scene", s]
               for i, (n, s) in enumerate(zip(names, scenes))])
    write_csv(root / "splits.csv", ["image", "split"],
              [[n, "val" if i == 4 else "train"] for i, n in enumerate(names)])
    return {"root": root, "names": names, "objects": objects, "parts": parts, "scenes": scenes}


def convert(source: dict, out: Path, **options) -> Path:
    root = source["root"]
    return dataset_from_masks(
        root / "images", {"object": root / "masks" / "object", "part": root / "masks" / "part"},
        {"object": root / "object.txt", "part": root / "part.txt"}, out,
        image_labels=root / "labels.csv", split_file=root / "splits.csv",
        allow_missing_masks=True, **options)


def write_reference(source: dict, out: Path) -> Path:
    """The same content written directly in the Broden format (by hand, independently)."""
    (out / "images").mkdir(parents=True)
    object_labels = np.array([0, 1, 2])           # code -> label
    part_labels = np.array([0, 3, 4])
    frequency = {c: np.zeros(7, int) for c in ("object", "part", "scene")}
    coverage = {c: np.zeros(7) for c in ("object", "part", "scene")}
    rows = []
    for i, name in enumerate(source["names"]):
        pixels = np.asarray(Image.open(source["root"] / "images" / name).convert("RGB"))
        save_rgb(out / "images" / f"im{i}.png", pixels)
        obj = source["objects"][i].copy()
        obj[obj == 255] = 0
        seg = object_labels[half(obj)]
        write_label_png(out / "images" / f"im{i}_o.png", seg)
        cells = [f"im{i}_o.png", "", str(SCENES[source["scenes"][i]])]
        for label in range(1, 7):
            if (seg == label).any():
                frequency["object"][label] += 1
                coverage["object"][label] += (seg == label).mean()
        if source["parts"][i] is not None:
            seg = part_labels[half(source["parts"][i])]
            write_label_png(out / "images" / f"im{i}_p.png", seg)
            cells[1] = f"im{i}_p.png"
            for label in range(1, 7):
                if (seg == label).any():
                    frequency["part"][label] += 1
                    coverage["part"][label] += (seg == label).mean()
        frequency["scene"][SCENES[source["scenes"][i]]] += 1
        coverage["scene"][SCENES[source["scenes"][i]]] += 1.0
        rows.append([f"im{i}.png", "val" if i == 4 else "train", SIDE, SIDE, SIDE // 2,
                     SIDE // 2, *cells])
    write_csv(out / "index.csv", ["image", "split", "ih", "iw", "sh", "sw", "object", "part",
                                  "scene"], rows)
    members = {"object": [1, 2], "part": [3, 4], "scene": [5, 6]}
    names = {1: "person", 2: "car", 3: "wheel", 4: "window", 5: "beach", 6: "street"}
    write_csv(out / "category.csv", ["name", "first", "last", "count", "frequency"],
              [[c, m[0], m[-1], len(m), 5] for c, m in members.items()])
    write_csv(out / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
              [[n, names[n], f"{c}({frequency[c][n]})", frequency[c][n], coverage[c][n], ""]
               for c, m in members.items() for n in m])
    for c, m in members.items():
        write_csv(out / f"c_{c}.csv", ["code", "number", "name", "frequency", "coverage"],
                  [[k + 1, n, names[n], frequency[c][n], coverage[c][n]]
                   for k, n in enumerate(m)])
    return out


def test_from_masks_equals_broden_written_by_hand(mask_source, tmp_path: Path) -> None:
    out = convert(mask_source, tmp_path / "converted")
    assert check_dataset(out) == []
    reference = write_reference(mask_source, tmp_path / "reference")
    assert check_dataset(reference) == []
    ours, theirs = BrodenDataset(out), BrodenDataset(reference)
    assert ours.categories == theirs.categories == ("object", "part", "scene")
    assert ours.vocab.names == theirs.vocab.names == \
        ["", "person", "car", "wheel", "window", "beach", "street"]
    np.testing.assert_array_equal(ours.vocab.primary, theirs.vocab.primary)
    assert ours.image_names == mask_source["names"]            # images copied unchanged
    assert (out / "images" / "a" / "img0.jpg").read_bytes() == \
        (mask_source["root"] / "images" / "a" / "img0.jpg").read_bytes()
    assert ours.splits.tolist() == ["train"] * 4 + ["val"]
    assert (ours.image_size, ours.seg_size) == ((8, 8), (4, 4))
    for i in range(N_IMAGES):
        np.testing.assert_array_equal(ours.load_image(i), theirs.load_image(i))
        seg, labels = ours.load_segmentation(i)
        seg_ref, labels_ref = theirs.load_segmentation(i)
        np.testing.assert_array_equal(seg, seg_ref)
        np.testing.assert_array_equal(labels, labels_ref)
    assert ours.load_segmentation(3)[0].shape[0] == 1            # no part layer on image 3
    for name in ("label.csv", "c_object.csv", "c_part.csv", "c_scene.csv"):
        ours_rows = list(csv.DictReader(open(out / name)))
        their_rows = list(csv.DictReader(open(reference / name)))
        assert len(ours_rows) == len(their_rows)
        for a, b in zip(ours_rows, their_rows):
            assert {k: a[k] for k in a if k != "coverage"} == \
                {k: str(b[k]) for k in a if k != "coverage"}
            assert float(a["coverage"]) == pytest.approx(float(b["coverage"]), abs=1e-6)

    # the tally of the converted dataset equals the tally of the reference
    rng = np.random.default_rng(1)
    acts = rng.gamma(1.0, size=(N_IMAGES, 3, 2, 2)).astype(np.float32)
    results = []
    for dataset, where in ((ours, "a"), (theirs, "b")):
        cache = write_cache(tmp_path / where / "cache" / "conv.h5", acts)
        results.append(dissect_layer(cache, dataset, quantile=0.2, scheduler="synchronous"))
    a, b = results
    assert a.intersection.sum() > 0 and a.label_area[1:].min() > 0
    for field in ("thresholds", "label_area", "intersection", "act_area", "iou", "unit_label"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_from_masks_resizes_images_bilinear_and_masks_nearest(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (6, 10, 3))
    mask = rng.integers(0, 3, (6, 10))
    save_rgb(tmp_path / "in" / "x.jpg", pixels)
    save_mask(tmp_path / "m" / "x.png", mask)
    out = dataset_from_masks(tmp_path / "in", {"object": tmp_path / "m"},
                             {"object": ["cat", "dog"]}, tmp_path / "out", size=(8, 12))
    assert check_dataset(out) == []
    dataset = BrodenDataset(out)
    assert dataset.image_names == ["x.png"]
    assert (dataset.image_size, dataset.seg_size) == ((8, 12), (4, 6))
    expected = np.asarray(Image.open(tmp_path / "in" / "x.jpg").convert("RGB")
                          .resize((12, 8), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(dataset.load_image(0), expected)
    # mask row i of the 4 rows comes from source row floor((i + 0.5) * 6 / 4): 0, 2, 3, 5
    rows, cols = [0, 2, 3, 5], [0, 2, 4, 5, 7, 9]
    np.testing.assert_array_equal(dataset.load_segmentation(0)[0][0],
                                  mask[np.ix_(rows, cols)])


def test_nearest_resize_picks_pixel_centres() -> None:
    values = np.arange(5)[None, :].repeat(2, axis=0)
    np.testing.assert_array_equal(nearest_resize(values, (1, 2))[0], [1, 3])
    np.testing.assert_array_equal(nearest_resize(values, (2, 10))[0],
                                  [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    np.testing.assert_array_equal(half(np.arange(64).reshape(8, 8)),
                                  nearest_resize(np.arange(64).reshape(8, 8), (4, 4)))


def test_class_list_numbering(tmp_path: Path) -> None:
    plain = read_class_list(["sky", "tree"])
    assert (plain.names, plain.background, plain.offset) == (("sky", "tree"), None, 1)
    listed = read_class_list(["__background__", "sky"])
    assert (listed.names, listed.background, listed.offset) == (("sky",), "__background__", 0)
    (tmp_path / "gap.txt").write_text("sky\n\ntree\n")
    with pytest.raises(DatasetError, match=r"gap\.txt, line 2 is empty"):
        read_class_list(tmp_path / "gap.txt")
    with pytest.raises(OptionError, match="listed twice"):
        read_class_list(["sky", "sky"])


def test_from_masks_shared_name_is_one_label(tmp_path: Path) -> None:
    """A name in two categories keeps its first number and belongs to both (Broden's water)."""
    save_rgb(tmp_path / "in" / "x.png", np.zeros((4, 4, 3)))
    save_mask(tmp_path / "o" / "x.png", [[1, 1, 2, 2]] * 4)
    save_mask(tmp_path / "s" / "x.png", [[0, 1, 0, 2]] * 2 + [[0, 1, 0, 1]] * 2)
    out = dataset_from_masks(tmp_path / "in", {"object": tmp_path / "o", "stuff": tmp_path / "s"},
                             {"object": ["water", "boat"], "stuff": ["sand", "water"]},
                             tmp_path / "out")
    rows = {r["name"]: r for r in csv.DictReader(open(out / "label.csv"))}
    assert [(r["number"], r["category"]) for r in rows.values()] == \
        [("1", "object(1);stuff(1)"), ("2", "object(1)"), ("3", "stuff(1)")]
    dataset = BrodenDataset(out)
    # segmentation pixels are source pixels (1, 1), (1, 3), (3, 1), (3, 3)
    np.testing.assert_array_equal(dataset.load_segmentation(0)[0],
                                  [[[1, 2], [1, 2]], [[3, 1], [3, 3]]])
    assert dataset.vocab.category_of(1) == "object"          # coverage 0.5 > 0.25


def test_from_masks_reports_every_problem_at_once(mask_source, tmp_path: Path) -> None:
    root = tmp_path / "bad"
    rng = np.random.default_rng(2)
    for name in ("ok", "rgb", "beyond", "small", "alone"):
        save_rgb(root / "images" / f"{name}.jpg", rng.integers(0, 256, (8, 8, 3)))
    save_mask(root / "masks" / "ok.png", np.ones((8, 8)))
    save_rgb(root / "masks" / "rgb.png", np.ones((8, 8, 3)))            # wrong mode
    save_mask(root / "masks" / "beyond.png", np.full((8, 8), 3))        # classes: 2
    save_mask(root / "masks" / "small.png", np.ones((4, 8)))            # size mismatch
    save_mask(root / "masks" / "orphan.png", np.ones((8, 8)))           # no image
    write_csv(root / "labels.csv", ["image", "category", "label"],
              [["../ok.jpg", "scene", "beach"], ["ok", "scene", "beach"]])
    write_csv(root / "splits.csv", ["image", "split"],
              [["ok.jpg", "train"], ["/etc/passwd", "val"]])
    with pytest.raises(DatasetError) as caught:
        dataset_from_masks(root / "images", {"object": root / "masks"},
                           {"object": ["cat", "dog"]}, tmp_path / "out",
                           image_labels=root / "labels.csv", split_file=root / "splits.csv")
    message = str(caught.value)
    expected = [
        f"{root / 'masks' / 'orphan.png'}: mask of category 'object' has no image",
        f"{root / 'images' / 'alone.jpg'}: no mask of category 'object'",
        f"{root / 'masks' / 'rgb.png'}: mask mode RGB",
        f"{root / 'masks' / 'beyond.png'}: pixel value(s) 3 are not classes",
        f"{root / 'masks' / 'small.png'}: mask is 4x8 (height x width) but its image",
        f"{root / 'labels.csv'}, line 2: image path '../ok.jpg' escapes the images folder",
        f"{root / 'splits.csv'}, line 3: image path '/etc/passwd' escapes the images folder",
        f"{root / 'images' / 'rgb.jpg'}: not in the split file",
    ]
    for text in expected:
        assert text in message
    assert len(caught.value.problems) == len(message.splitlines()) - 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("case", ["unpaired", "mode", "value", "escape"])
def test_from_masks_one_malformed_input_is_one_error_naming_the_file(tmp_path: Path,
                                                                     case: str) -> None:
    save_rgb(tmp_path / "in" / "x.png", np.zeros((4, 4, 3)))
    mask = tmp_path / "m" / ("y.png" if case == "unpaired" else "x.png")
    if case == "mode":
        save_rgb(mask, np.ones((4, 4, 3)))
    else:
        save_mask(mask, np.full((4, 4), 7 if case == "value" else 1))
    labels = None
    if case == "escape":
        labels = tmp_path / "labels.csv"
        write_csv(labels, ["image", "category", "label"], [["../../x.png", "scene", "a"]])
    with pytest.raises(DatasetError) as caught:
        dataset_from_masks(tmp_path / "in", {"object": tmp_path / "m"}, {"object": ["cat"]},
                           tmp_path / "out", image_labels=labels)
    problems = caught.value.problems
    named = {"unpaired": mask, "mode": mask, "value": mask, "escape": labels}[case]
    assert len(problems) == (2 if case == "unpaired" else 1)   # y.png alone and x.png without
    assert problems[0].startswith(str(named))
    assert str(named) in str(caught.value)


def test_from_masks_image_level_labels_only(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        save_rgb(tmp_path / "in" / f"{name}.png", np.zeros((4, 4, 3)))
    write_csv(tmp_path / "l.csv", ["image", "category", "label"],
              [["a.png", "scene", "sea"], ["b", "scene", "city"], ["b", "texture", "dots"]])
    with pytest.raises(DatasetError) as caught:
        dataset_from_masks(tmp_path / "in", {}, {}, tmp_path / "out",
                           image_labels=tmp_path / "l.csv")
    assert caught.value.problems == [f"{tmp_path / 'in' / 'c.png'}: no mask in any category and "
                                     f"no image-level label"]
    (tmp_path / "in" / "c.png").unlink()
    out = dataset_from_masks(tmp_path / "in", {}, {"scene": ["sea", "city", "lake"]},
                             tmp_path / "out", image_labels=tmp_path / "l.csv")
    assert check_dataset(out) == []
    dataset = BrodenDataset(out)
    assert dataset.categories == ("scene", "texture")
    assert dataset.vocab.names == ["", "sea", "city", "lake", "dots"]
    assert [dataset.load_segmentation(i)[1].tolist() for i in range(2)] == [[1], [2, 4]]


def test_from_masks_options_are_checked(tmp_path: Path) -> None:
    save_rgb(tmp_path / "in" / "x.png", np.zeros((4, 4, 3)))
    save_mask(tmp_path / "m" / "x.png", np.ones((4, 4)))
    with pytest.raises(OptionError, match="--ignore-index: 1 is class 1"):
        dataset_from_masks(tmp_path / "in", {"object": tmp_path / "m"}, {"object": ["cat"]},
                           tmp_path / "out", ignore_index=1)
    with pytest.raises(OptionError, match="no class list"):
        dataset_from_masks(tmp_path / "in", {"object": tmp_path / "m"}, {}, tmp_path / "out")
    with pytest.raises(OptionError, match="inside the input folder"):
        dataset_from_masks(tmp_path / "in", {"object": tmp_path / "m"}, {"object": ["cat"]},
                           tmp_path / "in" / "out")


# ----------------------------------------------------------------------------- segment
def _same_files(a: Path, b: Path, skip: tuple[str, ...] = ()) -> None:
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    for name in set(names) - set(skip):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_from_masks_command_writes_what_the_api_writes(mask_source, tmp_path: Path,
                                                       capsys) -> None:
    from dissect.cli import main

    root = mask_source["root"]
    args = ["dataset", "from-masks", "--images", str(root / "images"),
            "--masks", f"object={root / 'masks' / 'object'}", f"part={root / 'masks' / 'part'}",
            "--classes", f"object={root / 'object.txt'}", f"part={root / 'part.txt'}",
            "--image-labels", str(root / "labels.csv"), "--split-file",
            str(root / "splits.csv"), "--allow-missing-masks", "--out", str(tmp_path / "cli")]
    assert main(args) == 0
    assert str(tmp_path / "cli") in capsys.readouterr().out
    _same_files(tmp_path / "cli", convert(mask_source, tmp_path / "api"))
    # One unnamed mask folder is category 'object'; its unnamed class list goes with it.
    assert main(["dataset", "from-masks", "--images", str(root / "images"), "--masks",
                 str(root / "masks" / "object"), "--classes", str(root / "object.txt"),
                 "--ignore-index", "255", "--out", str(tmp_path / "one")]) == 0
    assert BrodenDataset(tmp_path / "one").categories == ("object",)


@pytest.mark.parametrize("extra, message", [
    (["--masks", "a=x", "a=y"], "category 'a' is given twice"),
    (["--masks", "object=M", "part=M", "--classes", "C"], "name the category"),
    (["--masks", "object=M"], "class list"),
])
def test_from_masks_command_bad_options_exit_2(mask_source, tmp_path: Path, capsys, extra,
                                              message) -> None:
    from dissect.cli import main

    root = mask_source["root"]
    extra = [v.replace("M", str(root / "masks" / "object")).replace("C", str(root / "object.txt"))
             if v.endswith(("M", "C")) else v for v in extra]
    assert main(["dataset", "from-masks", "--images", str(root / "images"), *extra, "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dissect: error:") and message in err
    assert not (tmp_path / "out").exists()


class ColourSegmenter(nn.Module):
    """A fixed 1x1 convolution: on inputs x in {0, 1} (mean 0, std 1), channel 1 = 8 r - 4,
    channel 2 = 8 g - 4, channel 0 = 0. Red pixels -> channel 1 (p = 0.98), green -> 2, black ->
    0 (p = 0.96), yellow -> a tie of 1 and 2 (argmax 1, p = 0.495: below 0.5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[0.0, 0, 0], [8, 0, 0], [0, 8, 0]])[..., None,
                                                                                    None])
            self.conv.bias.copy_(torch.tensor([0.0, -4, -4]))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


def colour_images(root: Path, n: int = 5, side: int = 8) -> list[np.ndarray]:
    """Images of random red / green / black / yellow pixels; returns the colour codes."""
    rng = np.random.default_rng(4)
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [255, 255, 0]])
    codes = []
    for i in range(n):
        code = rng.integers(0, 4, (side, side))
        save_rgb(root / f"g{i % 2}" / f"im{i}.png", colours[code])
        codes.append(code)
    return codes


SEGMENT_OPTIONS = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), device="cpu")


@pytest.mark.parametrize("classes, labels", [
    (["background", "red", "green"], [0, 1, 2, 0]),    # black, red, green, yellow (low conf.)
    (["dark", "red", "green"], [1, 2, 3, 0])])
def test_segment_writes_the_expected_label_pngs(tmp_path: Path, classes, labels) -> None:
    codes = colour_images(tmp_path / "in")
    out = segment_images(tmp_path / "in", ColourSegmenter(), classes, tmp_path / "out",
                         batch_size=2, **SEGMENT_OPTIONS)
    assert check_dataset(out) == []
    dataset = BrodenDataset(out)
    assert dataset.categories == ("object",)
    assert dataset.vocab.names[1:] == [c for c in classes if c != "background"]
    names = ["g0/im0.png", "g0/im2.png", "g0/im4.png", "g1/im1.png", "g1/im3.png"]
    assert dataset.image_names == names
    for row, name in enumerate(names):
        i = int(name[-5])
        expected = half(np.array(labels)[codes[i]])
        np.testing.assert_array_equal(
            decode_segmentation(out / "images" / f"{name[:-4]}_object.png"), expected)
        np.testing.assert_array_equal(dataset.load_segmentation(row)[0][0], expected)
        assert (out / "images" / name).read_bytes() == (tmp_path / "in" / name).read_bytes()
    assert (np.array(labels)[np.concatenate([c.ravel() for c in codes])] == 0).any()


def test_segment_takes_a_torchscript_file(tmp_path: Path) -> None:
    colour_images(tmp_path / "in", n=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)          # torch.jit is deprecated
        torch.jit.save(torch.jit.script(ColourSegmenter()), tmp_path / "seg.pt")
    classes = ["background", "red", "green"]
    a = segment_images(tmp_path / "in", tmp_path / "seg.pt", classes, tmp_path / "a",
                       **SEGMENT_OPTIONS)
    b = segment_images(tmp_path / "in", ColourSegmenter(), classes, tmp_path / "b",
                       **SEGMENT_OPTIONS)
    for name in ("g0/im0_object.png", "g1/im1_object.png"):
        assert (a / "images" / name).read_bytes() == (b / "images" / name).read_bytes()


def test_segment_command_writes_what_the_api_writes(tmp_path: Path, capsys) -> None:
    from dissect.cli import main

    colour_images(tmp_path / "in", n=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)          # torch.jit is deprecated
        torch.jit.save(torch.jit.script(ColourSegmenter()), tmp_path / "seg.pt")
    (tmp_path / "classes.txt").write_text("background\nred\ngreen\n")
    assert main(["dataset", "segment", "--images", str(tmp_path / "in"), "--segmenter",
                 str(tmp_path / "seg.pt"), "--classes", str(tmp_path / "classes.txt"),
                 "--out", str(tmp_path / "cli"), "--mean", "0,0,0", "--std", "1,1,1",
                 "--device", "cpu", "--batch-size", "2", "--min-confidence", "0.5"]) == 0
    assert str(tmp_path / "cli") in capsys.readouterr().out
    api = segment_images(tmp_path / "in", ColourSegmenter(), ["background", "red", "green"],
                         tmp_path / "api", batch_size=2, **SEGMENT_OPTIONS)
    _same_files(tmp_path / "cli", api, skip=("segment.json",))  # it names the segmenter
    assert str(tmp_path / "seg.pt") in (tmp_path / "cli" / "segment.json").read_text()
    assert main(["dataset", "segment", "--images", str(tmp_path / "in"), "--segmenter",
                 str(tmp_path / "seg.pt"), "--classes", str(tmp_path / "missing.txt"),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_label_maps_confidence_threshold_and_upsampling() -> None:
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.1]]]])         # (1, 2, 1, 2)
    channel_labels = torch.tensor([5, 7])
    # pixel 0: channel 0, p = 0.88; pixel 1: channel 1, p = 0.525
    assert label_maps(logits, (1, 2), channel_labels, 0.5).tolist() == [[[5, 7]]]
    assert label_maps(logits, (1, 2), channel_labels, 0.6).tolist() == [[[5, 0]]]
    assert label_maps(logits, (1, 2), channel_labels, 0.0).tolist() == [[[5, 7]]]
    # 1x2 logits upsampled to 1x4: pixel centres 0.25 and 0.75 interpolate between the two
    assert label_maps(logits, (1, 4), channel_labels, 0.0).tolist() == [[[5, 5, 5, 7]]]


def test_segment_killed_run_resumes_to_identical_files(tmp_path: Path, monkeypatch) -> None:
    colour_images(tmp_path / "in")
    classes = ["background", "red", "green"]
    whole = segment_images(tmp_path / "in", ColourSegmenter(), classes, tmp_path / "whole",
                           batch_size=2, **SEGMENT_OPTIONS)
    original = segment_module._save_outputs
    calls = []

    def failing(*args, **kwargs):
        if len(calls) == 3:
            raise RuntimeError("killed")
        calls.append(args)
        original(*args, **kwargs)

    monkeypatch.setattr(segment_module, "_save_outputs", failing)
    with pytest.raises(RuntimeError, match="killed"):
        segment_images(tmp_path / "in", ColourSegmenter(), classes, tmp_path / "out",
                       batch_size=2, **SEGMENT_OPTIONS)
    partial = tmp_path / "out.partial"
    assert not (tmp_path / "out").exists() and not (partial / "index.csv").exists()
    assert len(list(partial.rglob("*_object.png"))) == 3
    with pytest.raises(OptionError, match="min_confidence"):
        segment_images(tmp_path / "in", ColourSegmenter(), classes, tmp_path / "out",
                       min_confidence=0.9, **SEGMENT_OPTIONS)
    (partial / "images" / "g0" / "im9_object.png.tmp").write_bytes(b"half a file")
    calls.clear()
    monkeypatch.setattr(segment_module, "_save_outputs",
                        lambda *a, **k: (calls.append(a), original(*a, **k)))
    out = segment_images(tmp_path / "in", ColourSegmenter(), classes, tmp_path / "out",
                         batch_size=3, **SEGMENT_OPTIONS)
    assert len(calls) == 2                       # only the images the killed run had not done
    files = sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for name in files:
        assert (whole / name).read_bytes() == (out / name).read_bytes(), name


def test_segment_refuses_wrong_channel_count_and_mixed_sizes(tmp_path: Path) -> None:
    colour_images(tmp_path / "in")
    with pytest.raises(ModelError, match="outputs 3 channels but the class list has 2"):
        segment_images(tmp_path / "in", ColourSegmenter(), ["red", "green"], tmp_path / "out",
                       **SEGMENT_OPTIONS)
    save_rgb(tmp_path / "in" / "big.png", np.zeros((10, 8, 3)))
    with pytest.raises(DatasetError, match="images differ in size"):
        segment_images(tmp_path / "in", ColourSegmenter(), ["a", "b", "c"], tmp_path / "o2",
                       **SEGMENT_OPTIONS)


@pytest.fixture
def one_thread():
    """One torch thread: a MobileNet forward on a shared 2-core machine is many times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_segment_torchvision_architecture_with_checkpoint(tmp_path: Path, one_thread) -> None:
    """A torchvision segmentation name with the user's checkpoint loads (built with
    weights=None and the class list's length as num_classes) and labels as the model does."""
    import torchvision

    model = torchvision.models.get_model("lraspp_mobilenet_v3_large", weights=None,
                                         weights_backbone=None, num_classes=3)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    colour_images(tmp_path / "in", n=1, side=32)
    out = segment_images(tmp_path / "in", "lraspp_mobilenet_v3_large", ["bg", "a", "b"],
                         tmp_path / "out", weights=tmp_path / "w.pt", min_confidence=0.0,
                         device="cpu")
    assert check_dataset(out) == []
    pixels = np.asarray(Image.open(tmp_path / "in" / "g0" / "im0.png"), dtype=np.float64)
    x = (pixels / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(x).permute(2, 0, 1)[None].float())["out"]
    expected = logits.argmax(1)[0].numpy() + 1                  # "bg" is no background name
    np.testing.assert_array_equal(decode_segmentation(out / "images" / "g0" / "im0_object.png"),
                                  nearest_resize(expected, (16, 16)))


@pytest.mark.slow
def test_load_segmenter_takes_a_torchvision_checkpoint_with_an_aux_head(tmp_path: Path,
                                                                        one_thread) -> None:
    """torchvision trains its segmentation models with an auxiliary head: load_model (built
    without it) would refuse those keys, so the checkpoint decides."""
    import torchvision

    model = torchvision.models.get_model("deeplabv3_mobilenet_v3_large", weights=None,
                                         weights_backbone=None, num_classes=4, aux_loss=True)
    torch.save({"model": model.state_dict()}, tmp_path / "w.pt")
    loaded = segment_module.load_segmenter("deeplabv3_mobilenet_v3_large", tmp_path / "w.pt", 4)
    assert loaded.aux_classifier is not None and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ----------------------------------------------------------------------------- ImageFolder
class TinyClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(6)
    root = tmp_path / "eval"
    for k, name in enumerate(["cat", "dog", "fox"]):
        for i in range(3 + k):
            sub = "deeper/" if i == 2 else ""
            save_rgb(root / name / f"{sub}{i}.png",
                     rng.integers(0, 256, (6, 6, 3)) // (k + 1))
    (root / "README.txt").write_text("not an image")
    (root / "cat" / "notes.txt").write_text("ignored")
    return root


def test_imagefolder_reads_classes_and_images(image_folder: Path) -> None:
    dataset = ImageFolderDataset(image_folder)
    assert dataset.class_names == ["cat", "dog", "fox"]
    assert len(dataset) == 12
    assert dataset.image_names[:3] == ["cat/0.png", "cat/1.png", "cat/deeper/2.png"]
    np.testing.assert_array_equal(dataset.labels, [0] * 3 + [1] * 4 + [2] * 5)
    assert dataset.image_size == (6, 6) and dataset.load_image(0).dtype == np.uint8
    np.testing.assert_array_equal(dataset.load_image(4),
                                  np.asarray(Image.open(image_folder / dataset.image_names[4])))
    listed = ImageFolderDataset(image_folder, class_names=["zebra", "fox", "dog", "cat"])
    assert listed.labels.tolist() == [3] * 3 + [2] * 4 + [1] * 5
    assert listed.fingerprint() != dataset.fingerprint()
    assert dataset.fingerprint() == ImageFolderDataset(image_folder).fingerprint()
    with pytest.raises(OptionError, match="split 'train'"):
        dataset.subset("train")


def test_imagefolder_malformed_inputs_name_the_file(image_folder: Path, tmp_path: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("cat\n../dog\nfox\n")
    with pytest.raises(DatasetError, match=rf"{names}, line 2: class name '\.\./dog'"):
        ImageFolderDataset(image_folder, class_names=names)
    with pytest.raises(DatasetError, match=rf"{image_folder / 'fox'}: folder\(s\) not in"):
        ImageFolderDataset(image_folder, class_names=["cat", "dog"])
    (image_folder / "empty").mkdir()
    with pytest.raises(DatasetError, match=rf"{image_folder / 'empty'}: class folder"):
        ImageFolderDataset(image_folder)
    (image_folder / "empty").rmdir()
    save_rgb(image_folder / "dog" / "wide.png", np.zeros((6, 9, 3)))
    with pytest.raises(DatasetError, match="images differ in size"):
        _ = ImageFolderDataset(image_folder).image_size


def test_imagefolder_ablation_metrics_equal_a_plain_hook_reference(image_folder: Path) -> None:
    dataset = ImageFolderDataset(image_folder)
    model = TinyClassifier().eval()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    study = AblationStudy(model, "conv", dataset.labels, dataset.class_names,
                          images=DatasetImages(dataset, mean, std), batch_size=5,
                          scheduler="synchronous", use_suffix=False)
    result = study.evaluate([[0, 2], [1]])

    def reference(units: list[int]) -> dict[str, np.ndarray]:
        def zero(_module, _inputs, output):
            output = output.clone()
            output[:, units] = 0
            return output

        handle = model.conv.register_forward_hook(zero)
        try:
            x = torch.stack([
                torch.from_numpy((np.asarray(Image.open(image_folder / name).convert("RGB"))
                                  / 255.0 - np.array(mean)) / np.array(std)).permute(2, 0, 1)
                for name in dataset.image_names]).float()
            with torch.no_grad():
                prob = torch.softmax(model(x), dim=1).numpy()
        finally:
            handle.remove()
        y = dataset.labels
        return class_metrics(y, prob.argmax(1), prob[np.arange(len(y)), y], 3)

    metrics = result.metrics
    for row, units in enumerate([[], [0, 2], [1]]):
        expected = reference(units)
        for name in ("accuracy", "balanced_accuracy", "precision", "recall", "true_class_prob"):
            np.testing.assert_allclose(metrics[name][row], expected[name], rtol=0, atol=1e-6,
                                       equal_nan=True)
        np.testing.assert_array_equal(metrics["n"], [3, 4, 5])
    assert not np.allclose(metrics["true_class_prob"][0], metrics["true_class_prob"][1])


def test_imagefolder_records_a_cache_for_the_suffix_path(image_folder: Path, tmp_path: Path
                                                         ) -> None:
    """The recorder takes an ImageFolder set as it is (its own fingerprint), and ablation from
    that cache (only the part after the layer runs) gives the hook path's metrics."""
    from dissect.record import CacheReader, open_cache, record_activations

    dataset = ImageFolderDataset(image_folder)
    model = TinyClassifier().eval()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    paths = record_activations(model, dataset, ["conv"], tmp_path / "run", mean=mean, std=std,
                               dtype="float32", num_workers=0, progress=False, batch_size=5)
    assert open_cache(paths["conv"]).fingerprint["dataset"] == dataset.fingerprint()
    images = DatasetImages(dataset, mean, std)
    cached = AblationStudy(model, "conv", dataset.labels, dataset.class_names, images=images,
                           activations=CacheReader(paths["conv"]), scheduler="synchronous")
    hooked = AblationStudy(model, "conv", dataset.labels, dataset.class_names, images=images,
                           scheduler="synchronous", use_suffix=False)
    assert cached.suffix_note == ""                     # the suffix path is taken
    a, b = cached.evaluate([[0, 2]]).metrics, hooked.evaluate([[0, 2]]).metrics
    for name in ("accuracy", "recall", "true_class_prob"):
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-5, equal_nan=True)
