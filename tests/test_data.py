"""The Broden dataset layer: exact decoding of a hand-written dataset and clear errors."""

from __future__ import annotations

import pickle
import zlib

import numpy as np
import pytest
import torch
from conftest import write_label_png
from PIL import Image

from dissect.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BrodenDataset,
    check_dataset,
    decode_segmentation,
    make_loader,
)
from dissect.errors import DatasetError, OptionError


def test_tiny_broden_decodes_to_the_values_written(broden_tiny):
    ds = BrodenDataset(broden_tiny.root)
    assert len(ds) == 3
    assert ds.categories == ("color", "object", "part", "scene")
    assert ds.image_size == (8, 8) and ds.seg_size == (4, 4)
    for i in range(3):
        seg, labels = ds.load_segmentation(i)
        np.testing.assert_array_equal(seg, broden_tiny.seg[i])
        assert seg.dtype == np.int32
        assert labels.tolist() == broden_tiny.image_labels[i]
        np.testing.assert_array_equal(ds.load_image(i), broden_tiny.images[i])


def test_label_above_255_survives_decoding(broden_tiny):
    seg, _ = BrodenDataset(broden_tiny.root).load_segmentation(2)
    assert (seg == 300).sum() == 4 + 1


def test_vocabulary_numbers_names_and_primary_categories(broden_tiny):
    vocab = BrodenDataset(broden_tiny.root).vocab
    assert vocab.num_labels == 301
    assert vocab.name(300) == "wheel" and vocab.number("wheel") == 300
    assert vocab.names[150] == ""                 # no row in label.csv: NetDissect-Lite's name
    # wheel: coverage 0.2 in object, 0.05 in part -> object
    assert vocab.category_of(300) == "object"
    assert vocab.concept(4).category == "part"
    assert vocab.primary[0] == -1
    assert vocab.labels_in("object").tolist() == [3, 300]
    assert vocab.labels_in("scene").tolist() == [6, 7]
    assert set(vocab.memberships[300]) == {"object", "part"}
    with pytest.raises(OptionError, match="wheel"):
        vocab.number("wheels")


def test_primary_category_ties_go_to_the_later_category(broden_tiny):
    root = broden_tiny.root
    text = (root / "c_part.csv").read_text().replace("3,300,wheel,1,0.05", "3,300,wheel,1,0.2")
    (root / "c_part.csv").write_text(text)
    assert BrodenDataset(root).vocab.category_of(300) == "part"


def test_category_selection_restricts_layers_and_primary(broden_tiny):
    ds = BrodenDataset(broden_tiny.root, categories=["part", "scene"])
    assert ds.categories == ("part", "scene")
    seg, labels = ds.load_segmentation(0)
    np.testing.assert_array_equal(seg, broden_tiny.seg[0][2:])
    assert labels.tolist() == [6]
    # among the selected categories, wheel belongs only to part
    assert ds.vocab.category_of(300) == "part"
    assert ds.vocab.category_of(3) is None
    with pytest.raises(OptionError, match="--categories.*'texture'"):
        BrodenDataset(broden_tiny.root, categories=["texture"])


def test_splits_and_subsets(broden_tiny):
    ds = BrodenDataset(broden_tiny.root)
    assert ds.splits.tolist() == ["train", "train", "val"]
    assert ds.subset("val").tolist() == [2]
    val = BrodenDataset(broden_tiny.root, splits=["val"])
    assert len(val) == 1 and val.image_names == ["img2.png"]
    with pytest.raises(OptionError, match="'test'"):
        BrodenDataset(broden_tiny.root, splits=["test"])
    with pytest.raises(OptionError, match="'test'.*train, val"):
        ds.subset("test")


def test_load_segmentations_pads_layers_and_labels(broden_tiny):
    ds = BrodenDataset(broden_tiny.root)
    seg, labels = ds.load_segmentations([1, 0, 2])
    assert seg.shape == (3, 4, 4, 4) and labels.shape == (3, 1)
    np.testing.assert_array_equal(seg[0, :1], broden_tiny.seg[1])
    assert not seg[0, 1:].any()
    np.testing.assert_array_equal(seg[1], broden_tiny.seg[0])
    np.testing.assert_array_equal(seg[2, :2], broden_tiny.seg[2])
    assert labels[:, 0].tolist() == [7, 6, 6]


def test_image_level_labels_per_category(broden_tiny):
    ds = BrodenDataset(broden_tiny.root)
    assert [a.tolist() for a in ds.image_level_labels("scene")] == [[6], [7], [6]]
    assert [a.tolist() for a in ds.image_level_labels("color")] == [[], [], []]


def test_dataset_pickles_and_fingerprint_tracks_selection(broden_tiny):
    ds = BrodenDataset(broden_tiny.root)
    copy = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(copy.load_segmentation(0)[0], broden_tiny.seg[0])
    assert copy.fingerprint() == ds.fingerprint()
    part = BrodenDataset(broden_tiny.root, categories=["part"], splits=["train"])
    assert part.fingerprint() != ds.fingerprint()
    assert part.fingerprint(selection=False) == ds.fingerprint()
    part_copy = pickle.loads(pickle.dumps(part))
    assert part_copy.categories == part.categories and len(part_copy) == len(part)
    assert part_copy.image_names == part.image_names


def test_dataset_pickles_as_its_path_and_reopens_once_per_process(broden_tiny, monkeypatch):
    import dissect.data.broden as broden

    monkeypatch.setattr(broden, "_REOPENED", {})
    ds = BrodenDataset(broden_tiny.root)
    payload = pickle.dumps(ds)
    assert len(payload) < 1000 and b"images" not in payload   # no rows in the pickle
    first, second = pickle.loads(payload), pickle.loads(payload)
    assert first is second                                     # parsed once in this process
    assert first.image_names == ds.image_names
    # the csv files change on disk: a process that has not opened the dataset refuses it
    monkeypatch.setattr(broden, "_REOPENED", {})
    label_csv = broden_tiny.root / "label.csv"
    label_csv.write_text(label_csv.read_text() + "\n")
    with pytest.raises(DatasetError, match="changed after this job was started"):
        pickle.loads(payload)


def test_checker_datasets_pickle_their_rows(broden_tiny):
    from dissect.data.broden import parse_dataset

    parsed, problems = parse_dataset(broden_tiny.root)
    assert problems == []
    ds = BrodenDataset.from_parsed(parsed)
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.image_names == ds.image_names and copy is not ds
    np.testing.assert_array_equal(copy.load_segmentation(1)[0], ds.load_segmentation(1)[0])


def test_decode_segmentation_does_not_overflow(tmp_path):
    labels = np.array([[0, 255, 256, 1197], [65535, 1, 2, 3]])
    write_label_png(tmp_path / "s.png", labels)
    np.testing.assert_array_equal(decode_segmentation(tmp_path / "s.png"), labels)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "I;16"])
def test_decode_segmentation_reads_every_label_encoding(tmp_path, mode):
    """R + 256 * G of RGB/RGBA (B and A ignored), the value itself for single-channel PNGs."""
    rng = np.random.default_rng(3)
    if mode in ("RGB", "RGBA"):
        pixels = rng.integers(0, 256, (5, 7, len(mode)), dtype=np.uint8)
        expected = pixels[..., 0].astype(np.int64) + 256 * pixels[..., 1].astype(np.int64)
        image = Image.fromarray(pixels)
    else:
        dtype = {"L": np.uint8, "I;16": np.uint16}[mode]
        expected = rng.integers(0, np.iinfo(dtype).max + 1, (5, 7))
        image = Image.fromarray(expected.astype(dtype))
    image.save(tmp_path / "s.png")
    with Image.open(tmp_path / "s.png") as check:
        assert check.mode == mode
    decoded = decode_segmentation(tmp_path / "s.png")
    assert decoded.dtype == np.int32
    np.testing.assert_array_equal(decoded, expected)


@pytest.mark.parametrize("label", [8, 299, 301])
def test_unknown_label_named_in_a_chunk(broden_tiny, label):
    """Labels 1..7 and 300 are known: a label beyond the contiguous known ones, in the gap,
    or above the largest names the file that holds it."""
    layer = np.array(broden_tiny.seg[2][1])
    layer[0, 0] = label
    path = broden_tiny.root / "images" / "seg" / "a2_part.png"
    write_label_png(path, layer)
    ds = BrodenDataset(broden_tiny.root)
    seg, _ = ds.load_segmentations([0, 1])       # other images still load
    np.testing.assert_array_equal(seg[0], broden_tiny.seg[0])
    with pytest.raises(DatasetError, match=f"a2_part.png .*line 4.*label number {label},"):
        ds.load_segmentations([0, 2, 1])
    with pytest.raises(DatasetError, match="a2_part.png"):
        ds.load_segmentation(2)


def test_loader_normalises_and_keeps_index_order(broden_tiny):
    ds = BrodenDataset(broden_tiny.root)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    batches = list(make_loader(ds, mean=mean, std=std, batch_size=2, num_workers=1))
    images = torch.cat([b[0] for b in batches])
    index = torch.cat([b[1] for b in batches])
    assert index.tolist() == [0, 1, 2]
    expected = (torch.tensor(np.stack(broden_tiny.images)).permute(0, 3, 1, 2).float() / 255
                - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)
    resized = next(iter(make_loader(ds, mean=mean, std=std, resize=4, num_workers=0)))[0]
    assert resized.shape == (3, 3, 4, 4)
    with pytest.raises(OptionError, match="--std"):
        make_loader(ds, mean=mean, std=(1.0, 0.0, 1.0))
    with pytest.raises(OptionError, match="--std"):
        make_loader(ds, mean=mean, std=(float("nan"), 1.0, 1.0))
    with pytest.raises(OptionError, match=r"--mean.*divide 0..255 values by 255"):
        make_loader(ds, mean=(124.0, 117.0, 104.0), std=std)


def test_loader_items_carry_label_layers_and_image_labels(broden_tiny):
    ds = BrodenDataset(broden_tiny.root)
    loader = make_loader(ds, mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size=2,
                         num_workers=1, segmentation=True)
    (images0, seg0, labels0, index0), (images1, seg1, labels1, index1) = list(loader)
    assert images0.shape == (2, 3, 8, 8) and index0.tolist() == [0, 1]
    assert seg0.dtype == torch.int32 and seg0.shape == (2, 4, 4, 4)
    np.testing.assert_array_equal(seg0[0].numpy(), broden_tiny.seg[0])
    np.testing.assert_array_equal(seg0[1, :1].numpy(), broden_tiny.seg[1])
    assert not seg0[1, 1:].any()
    assert labels0.tolist() == [[6], [7]] and labels1.tolist() == [[6]]
    np.testing.assert_array_equal(seg1[0].numpy(), broden_tiny.seg[2])
    assert index1.tolist() == [2]


def test_clean_dataset_has_no_problems(broden_tiny):
    assert check_dataset(broden_tiny.root) == []


def _replace(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


# Each case corrupts the dataset one way; `check` must list the problem with its file and line,
# and opening (or, for file contents, loading) must raise a DatasetError naming both.
def corrupt_missing_image(root):
    (root / "images" / "img1.png").unlink()
    return "index.csv", 3, "images/img1.png is missing"


def corrupt_missing_png(root):
    (root / "images" / "seg" / "a2_part.png").unlink()
    return "index.csv", 4, "images/seg/a2_part.png is missing"


def corrupt_unknown_image_label(root):
    _replace(root / "index.csv", "seg/a1_color.png,,,7", "seg/a1_color.png,,,9")
    return "index.csv", 3, "label number 9 is not in label.csv"


def corrupt_unknown_category_column(root):
    _replace(root / "index.csv", "part,scene", "part,place")
    return "index.csv", 1, "category column 'place' is not in category.csv"


def corrupt_malformed_label_category(root):
    _replace(root / "label.csv", "object(2);part(3)", "object(2;part3")
    return "label.csv", 10, "malformed"


def corrupt_escaping_image_path(root):
    _replace(root / "index.csv", "img2.png,val", "../../etc/passwd,val")
    return "index.csv", 4, "escapes the dataset's images/ folder"


def corrupt_escaping_png_path(root):
    _replace(root / "index.csv", "seg/a2_part.png", "/etc/hosts")
    return "index.csv", 4, "escapes the dataset's images/ folder"


def corrupt_short_row(root):
    with open(root / "index.csv", "a") as handle:
        handle.write("img9.png,train\n")
    return "index.csv", 5, "fewer cells than the 10 header columns"


def corrupt_unicode_digits(root):
    _replace(root / "index.csv", "seg/a1_color.png,,,7", "seg/a1_color.png,,,\u00b2")
    return "index.csv", 3, "column scene: images/\u00b2 is missing"


def corrupt_huge_label_number(root):
    with open(root / "label.csv", "a") as handle:
        handle.write("99999999999,giant,color(3),1,0.1,\n")
    return "label.csv", 11, "label number 99999999999 is above the largest supported"


def corrupt_dotdot_inside_path(root):
    _replace(root / "index.csv", "seg/a2_part.png", "seg/../../index.csv")
    return "index.csv", 4, "escapes the dataset's images/ folder"


def corrupt_dotdot_through_a_folder(root):
    """``seg/..`` is refused even though it cancels out lexically: when seg is a link to another
    disk, the system resolves ``..`` from the link's target, outside the dataset."""
    _replace(root / "index.csv", "seg/a2_part.png", "seg/../seg/a2_part.png")
    return "index.csv", 4, "escapes the dataset's images/ folder"


def corrupt_empty_image_cell(root):
    _replace(root / "index.csv", "img2.png,val", ",val")
    return "index.csv", 4, "column image is empty"


def corrupt_duplicate_column(root):
    _replace(root / "index.csv", "part,scene", "part,object")
    return "index.csv", 1, "header lists column(s) object more than once"


def corrupt_category_name_is_a_path(root):
    (root / "c_x").mkdir()
    with open(root / "category.csv", "a") as handle:
        handle.write("x/../../outside,1,1,0,0\n")
    return "category.csv", 6, "category name 'x/../../outside' contains '/'"


def corrupt_nan_coverage(root):
    _replace(root / "c_part.csv", "leg,1,0.1", "leg,1,nan")
    return "c_part.csv", 2, "column coverage: nan is not a finite number >= 0"


@pytest.mark.parametrize("corrupt", [
    corrupt_missing_image, corrupt_missing_png, corrupt_unknown_image_label,
    corrupt_unknown_category_column, corrupt_malformed_label_category,
    corrupt_escaping_image_path, corrupt_escaping_png_path, corrupt_short_row,
    corrupt_unicode_digits, corrupt_huge_label_number, corrupt_dotdot_inside_path,
    corrupt_dotdot_through_a_folder, corrupt_empty_image_cell, corrupt_duplicate_column,
    corrupt_category_name_is_a_path, corrupt_nan_coverage])
def test_csv_level_problems_are_listed_and_refused(broden_tiny, corrupt):
    file, line, text = corrupt(broden_tiny.root)
    problems = check_dataset(broden_tiny.root)
    assert any(p.file == file and p.line == line and text in p.message for p in problems), problems
    with pytest.raises(DatasetError) as error:
        BrodenDataset(broden_tiny.root)
    assert f"{file}, line {line}" in str(error.value) and text in str(error.value)


def corrupt_unreadable_image(root):
    (root / "images" / "img1.png").write_bytes(b"not a png")
    return 1, "load_image", "img1.png", "cannot be read"


def corrupt_image_size(root):
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(root / "images" / "img0.png")
    return 0, "load_image", "img0.png", "is 6x8; index.csv says ih,iw = 8,8"


def corrupt_seg_size(root):
    write_label_png(root / "images" / "seg" / "a1_color.png", np.ones((4, 5), int))
    return 1, "load_segmentation", "a1_color.png", "is 4x5; index.csv says sh,sw = 4,4"


def corrupt_unknown_pixel_label(root):
    write_label_png(root / "images" / "seg" / "a2_part.png", np.full((4, 4), 299))
    return 2, "load_segmentation", "a2_part.png", "label number 299, which is not in label.csv"


def corrupt_palette_png(root):
    Image.fromarray(np.ones((4, 4), np.uint8), "L").convert("LA").save(
        root / "images" / "seg" / "a2_part.png")
    return 2, "load_segmentation", "a2_part.png", "PNG mode LA is not a label encoding"


def corrupt_segmentation_not_png(root):
    """Only the PNG decoder reads segmentations (DESIGN §2): a BMP named .png is refused."""
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(
        root / "images" / "seg" / "a2_part.png", format="BMP")
    return 2, "load_segmentation", "a2_part.png", "cannot identify image file"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (len(data).to_bytes(4, "big") + kind + data
            + zlib.crc32(kind + data).to_bytes(4, "big"))


def corrupt_decompression_bomb(root):
    """A PNG whose header claims 20000x20000 pixels: Pillow refuses it as a decompression bomb
    (an exception that is not an OSError), which must still be a DatasetError."""
    header = (20000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    (root / "images" / "seg" / "a2_part.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b""))
    return 2, "load_segmentation", "a2_part.png", "decompression bomb"


@pytest.mark.parametrize("corrupt", [corrupt_unreadable_image, corrupt_image_size,
                                     corrupt_seg_size, corrupt_unknown_pixel_label,
                                     corrupt_palette_png, corrupt_segmentation_not_png,
                                     corrupt_decompression_bomb])
def test_file_content_problems_are_listed_and_raised_on_load(broden_tiny, corrupt):
    index, method, file, text = corrupt(broden_tiny.root)
    line = index + 2
    problems = check_dataset(broden_tiny.root)
    assert any(p.line == line and file in p.message and text in p.message for p in problems), \
        problems
    # the problem gives its line once (as file and line), not again inside the message
    assert not any("index.csv, line" in p.message for p in problems), problems
    ds = BrodenDataset(broden_tiny.root)
    with pytest.raises(DatasetError) as error:
        getattr(ds, method)(index)
    assert file in str(error.value) and f"line {line}" in str(error.value)
    assert text in str(error.value)


def test_missing_csv_and_missing_directory(broden_tiny, tmp_path):
    (broden_tiny.root / "c_scene.csv").unlink()
    problems = check_dataset(broden_tiny.root)
    assert [str(p) for p in problems] == ["c_scene.csv: file is missing"]
    with pytest.raises(DatasetError, match="does not exist"):
        BrodenDataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="index.csv is a file, not a directory"):
        BrodenDataset(broden_tiny.root / "index.csv")


def test_symlinked_image_folders_and_bom_headers_load(broden_tiny, tmp_path):
    root = broden_tiny.root
    elsewhere = tmp_path / "other_disk"
    (root / "images" / "seg").rename(elsewhere)
    (root / "images" / "seg").symlink_to(elsewhere)
    text = (root / "index.csv").read_text()
    (root / "index.csv").write_text("\ufeff" + text)
    ds = BrodenDataset(root)
    np.testing.assert_array_equal(ds.load_segmentation(0)[0], broden_tiny.seg[0])
    assert check_dataset(root) == []


def test_fingerprint_ignores_unrelated_csv_files(broden_tiny):
    before = BrodenDataset(broden_tiny.root).fingerprint()
    (broden_tiny.root / "my_classes.csv").write_text("image,class\nimg0.png,1\n")
    assert BrodenDataset(broden_tiny.root).fingerprint() == before
    _replace(broden_tiny.root / "c_part.csv", "leg,1,0.1", "leg,1,0.2")
    assert BrodenDataset(broden_tiny.root).fingerprint() != before


def test_image_level_label_0_means_unlabeled(broden_tiny):
    # Broden's generator writes 0 for an image-level label it dropped (DESIGN §2: 0 = unlabeled)
    _replace(broden_tiny.root / "index.csv", "seg/a1_color.png,,,7", "seg/a1_color.png,,,0;7")
    _replace(broden_tiny.root / "index.csv", "seg/a2_part.png,6", "seg/a2_part.png,0")
    assert check_dataset(broden_tiny.root) == []
    ds = BrodenDataset(broden_tiny.root)
    assert [a.tolist() for a in ds.image_level_labels("scene")] == [[6], [7], []]
    assert ds.load_segmentation(1)[1].tolist() == [7]


def test_backslash_paths_are_checked_and_opened_alike(broden_tiny):
    _replace(broden_tiny.root / "index.csv", "seg/a0_part1.png;seg/a0_part2.png",
             "seg\\a0_part1.png;seg\\a0_part2.png")
    assert check_dataset(broden_tiny.root) == []
    seg, _ = BrodenDataset(broden_tiny.root).load_segmentation(0)
    np.testing.assert_array_equal(seg, broden_tiny.seg[0])


def test_one_category_or_split_may_be_a_string(broden_tiny):
    ds = BrodenDataset(broden_tiny.root, categories="scene", splits="val")
    assert ds.categories == ("scene",) and ds.image_names == ["img2.png"]


def test_index_without_images_is_a_problem(broden_tiny):
    text = (broden_tiny.root / "index.csv").read_text()
    (broden_tiny.root / "index.csv").write_text(text.splitlines()[0] + "\n")
    assert [str(p) for p in check_dataset(broden_tiny.root)] == ["index.csv: lists no images"]
    with pytest.raises(DatasetError, match="index.csv: lists no images"):
        BrodenDataset(broden_tiny.root)


def test_label_listed_under_a_category_whose_file_lacks_it(broden_tiny):
    # label.csv says red is color(1), but c_color.csv has no row for it: NetDissect-Lite's loader
    # takes primary categories from the c_*.csv files only, so red would never be scored
    rows = (broden_tiny.root / "c_color.csv").read_text().splitlines()
    (broden_tiny.root / "c_color.csv").write_text("\n".join([rows[0], rows[2]]) + "\n")
    problems = check_dataset(broden_tiny.root)
    assert [(p.file, p.line) for p in problems] == [("label.csv", 3)]
    message = str(problems[0])
    assert message.startswith("label.csv, line 3: label 1 'red' is listed under category 'color'")
    assert "c_color.csv has no row with number 1" in message
    with pytest.raises(DatasetError, match=r"label.csv, line 3: label 1 'red'.*c_color.csv"):
        BrodenDataset(broden_tiny.root)
    # a label in two categories missing from one of its files is refused too
    rows = (broden_tiny.root / "c_part.csv").read_text().splitlines()
    (broden_tiny.root / "c_part.csv").write_text("\n".join(rows[:3]) + "\n")
    assert [(p.line, "c_part.csv" in p.message, "'wheel'" in p.message)
            for p in check_dataset(broden_tiny.root)] == [(3, False, False), (10, True, True)]


def test_consistent_label_and_category_files_load(broden_tiny):
    # every category named in label.csv has its c_*.csv row: no problem, primaries from coverage
    assert check_dataset(broden_tiny.root) == []
    vocab = BrodenDataset(broden_tiny.root).vocab
    assert vocab.category_of(1) == "color" and vocab.category_of(300) == "object"
    # a c_*.csv row that label.csv's field does not name is what NetDissect-Lite reads: kept
    (broden_tiny.root / "c_scene.csv").write_text(
        "code,number,name,frequency,coverage\n1,6,kitchen,2,1.0\n2,7,street,1,1.0\n3,2,green,1,0.9\n")
    assert check_dataset(broden_tiny.root) == []
    assert BrodenDataset(broden_tiny.root).vocab.category_of(2) == "scene"


def test_load_segmentations_pads_with_zeros_whatever_the_memory_held(broden_tiny, monkeypatch):
    # the chunk's array is allocated without zero-filling: every layer an image lacks must be
    # zeroed explicitly (images 0, 1, 2 have 4, 1 and 2 layers); the decoded layers are the
    # files' own label numbers, and a later label beyond the known ones is still refused
    dataset = BrodenDataset(broden_tiny.root)
    real_empty = np.empty

    def dirty_empty(shape, dtype=float, *args, **kwargs):
        out = real_empty(shape, dtype, *args, **kwargs)
        if np.dtype(dtype).kind in "iu":
            out.fill(77)
        return out

    monkeypatch.setattr(np, "empty", dirty_empty)
    seg, labels = dataset.load_segmentations([0, 1, 2])
    assert seg.shape == (3, 4, 4, 4) and seg.dtype == np.int32
    for row in range(3):
        names = dataset._layer_files(row)
        for layer, name in enumerate(names):
            np.testing.assert_array_equal(
                seg[row, layer], decode_segmentation(broden_tiny.root / "images" / name))
        assert (seg[row, len(names):] == 0).all()
    assert (seg != 77).all() and [len(dataset._layer_files(i)) for i in range(3)] == [4, 1, 2]
    write_label_png(broden_tiny.root / "images" / "seg" / "a1_color.png",
                    np.array([[0, 1, 2, 301]] * 4))
    with pytest.raises(DatasetError, match="a1_color.png .* label number 301"):
        dataset.load_segmentations([0, 1, 2])
