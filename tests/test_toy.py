"""The toy world: generated dataset read back exactly, determinism, training, the planted model."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dissect.data import IMAGENET_MEAN, IMAGENET_STD, BrodenDataset, image_tensor
from dissect.errors import DatasetError, OptionError
from dissect.stats import best_labels, count_iou, iou_from_counts
from dissect.toy import (
    PLANTED_LAYER,
    TOY_SCENES,
    ensure_toy,
    generate_toy_dataset,
    plan_toy_dataset,
    planted_labels,
    planted_model,
    scene_classes,
    toy_images,
    toy_model,
    train_toy_model,
)
from dissect.toy.planted import PLANTED_CONCEPTS, bayer_matrix
from dissect.toy.scenes import (
    CATEGORIES,
    LABELS,
    SHADE_COLOR,
    SHADE_KEYS,
    SHADE_RGB,
    draw_scene,
    scale_nearest,
)

N_SMALL, SIZE_SMALL = 24, 48


@pytest.fixture(scope="module")
def small_toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images of 48 x 48 (segmentations 24 x 24), seed 0."""
    return generate_toy_dataset(tmp_path_factory.mktemp("small") / "toy", N_SMALL, SIZE_SMALL, 0)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def decode_png(path: Path) -> np.ndarray:
    rgb = np.array(Image.open(path)).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1]


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------- drawing
def test_shades_are_distinct_and_every_cell_is_painted():
    rgb = SHADE_RGB.astype(np.float64)
    distance = np.sqrt(((rgb[:, None] - rgb[None]) ** 2).sum(-1))
    assert distance[~np.eye(len(rgb), dtype=bool)].min() >= 30
    for scene in TOY_SCENES:
        for seed in range(12):
            drawn = draw_scene(scene, 20, np.random.default_rng(seed))
            assert drawn.shade.min() >= 0
            assert (drawn.color > 0).all() and (drawn.object > 0).all()
            np.testing.assert_array_equal(drawn.color, SHADE_COLOR[drawn.shade])
            # at most one part layer per cell
            assert ((drawn.part > 0).sum(0) <= 1).all()
            again = draw_scene(scene, 20, np.random.default_rng(seed))
            np.testing.assert_array_equal(again.shade, drawn.shade)
            np.testing.assert_array_equal(again.part, drawn.part)


def test_scale_nearest_makes_two_by_two_blocks():
    cells = np.arange(9).reshape(3, 3)
    scaled = scale_nearest(cells, 6)
    np.testing.assert_array_equal(scaled[::2, ::2], cells)
    np.testing.assert_array_equal(scaled[1::2, 1::2], cells)


def test_unknown_scene_is_refused():
    with pytest.raises(OptionError, match="harbour"):
        draw_scene("harbour", 16, np.random.default_rng(0))


# ------------------------------------------------------------------------- the files
def test_files_hold_exactly_what_was_drawn(small_toy):
    ds = BrodenDataset(small_toy)
    assert len(ds) == N_SMALL
    assert ds.categories == CATEGORIES
    assert ds.image_size == (SIZE_SMALL, SIZE_SMALL)
    assert ds.seg_size == (SIZE_SMALL // 2, SIZE_SMALL // 2)
    rows = read_csv(small_toy / "index.csv")
    for i, image in enumerate(toy_images(N_SMALL, SIZE_SMALL, 0)):
        drawn = image.drawn
        assert rows[i]["image"] == image.name and rows[i]["split"] == image.split
        np.testing.assert_array_equal(ds.load_image(i), image.pixels())
        # raw PNG values, R + 256 * G, for each category cell
        np.testing.assert_array_equal(decode_png(small_toy / "images" / rows[i]["color"]),
                                      drawn.color)
        np.testing.assert_array_equal(decode_png(small_toy / "images" / rows[i]["object"]),
                                      drawn.object)
        if drawn.material_annotated:
            np.testing.assert_array_equal(
                decode_png(small_toy / "images" / rows[i]["material"]), drawn.material)
        else:
            assert rows[i]["material"] == ""
        part_files = [p for p in rows[i]["part"].split(";") if p]
        parts = [decode_png(small_toy / "images" / p) for p in part_files]
        assert len(parts) == len(image.part_layers())
        for decoded, layer in zip(parts, image.part_layers()):
            np.testing.assert_array_equal(decoded, layer)
        # the dataset layer: every pixel layer in category order, then image-level labels
        expected = [drawn.color, drawn.object] + (
            [drawn.material] if drawn.material_annotated else []) + image.part_layers()
        seg, labels = ds.load_segmentation(i)
        np.testing.assert_array_equal(seg, np.stack(expected))
        assert labels.tolist() == [drawn.scene_label, *drawn.textures]


def test_vocabulary_files_match_the_drawn_statistics(small_toy):
    images = list(toy_images(N_SMALL, SIZE_SMALL, 0))
    cells = (SIZE_SMALL // 2) ** 2
    by_category = {
        "color": [[im.drawn.color] for im in images],
        "object": [[im.drawn.object] for im in images],
        "material": [[im.drawn.material] if im.drawn.material_annotated else [] for im in images],
        "part": [im.part_layers() for im in images],
    }
    for category, layers in by_category.items():
        rows = read_csv(small_toy / f"c_{category}.csv")
        assert [int(r["code"]) for r in rows] == list(range(1, len(rows) + 1))
        for row in rows:
            number = int(row["number"])
            counts = [sum(int((layer == number).sum()) for layer in ls) for ls in layers]
            assert int(row["frequency"]) == sum(c > 0 for c in counts), (category, row)
            assert float(row["coverage"]) == pytest.approx(sum(counts) / cells, abs=1e-6)
    scenes = read_csv(small_toy / "c_scene.csv")
    for row in scenes:
        n = sum(im.drawn.scene == row["name"] for im in images)
        assert int(row["frequency"]) == n and float(row["coverage"]) == n
    category_rows = {r["name"]: r for r in read_csv(small_toy / "category.csv")}
    assert list(category_rows) == list(CATEGORIES)
    assert int(category_rows["scene"]["frequency"]) == N_SMALL
    assert int(category_rows["material"]["frequency"]) == sum(
        im.drawn.material_annotated for im in images)


def test_all_six_categories_and_the_special_cases_are_present(small_toy):
    rows = read_csv(small_toy / "index.csv")
    assert all(r["scene"].isdigit() for r in rows)
    material = [r["material"] != "" for r in rows]
    assert any(material) and not all(material)          # partial annotation
    textures = [r["texture"] for r in rows]
    assert any(textures) and not all(textures)
    assert all(t.replace(";", "").isdigit() for t in textures if t)   # image-level entries
    assert any(len(r["part"].split(";")) == 2 for r in rows)          # two part layers
    # water: object and material, primary object by a strictly larger coverage
    labels = {r["name"]: r for r in read_csv(small_toy / "label.csv")}
    assert labels["water"]["category"].startswith("object(")
    assert ";material(" in labels["water"]["category"]
    cover = {c: {r["name"]: float(r["coverage"]) for r in read_csv(small_toy / f"c_{c}.csv")}
             for c in ("object", "material")}
    assert cover["object"]["water"] > cover["material"]["water"] > 0
    vocab = BrodenDataset(small_toy).vocab
    assert vocab.category_of(LABELS["water"]) == "object"
    assert set(vocab.memberships[LABELS["water"]]) == {"object", "material"}
    # scene labels: TOY_SCENES in label number order
    numbers = [vocab.number(s) for s in TOY_SCENES]
    assert numbers == sorted(numbers)


def test_conftest_sized_dataset_has_every_category_several_times(toy_dataset):
    categories = {r["name"]: int(r["frequency"]) for r in read_csv(toy_dataset / "category.csv")}
    assert set(categories) == set(CATEGORIES)
    assert min(categories.values()) >= 5
    rows = read_csv(toy_dataset / "index.csv")
    assert sum(len(r["part"].split(";")) == 2 for r in rows) >= 5
    for name in ("striped", "dotted", "chequered"):
        assert int(next(r for r in read_csv(toy_dataset / "c_texture.csv")
                        if r["name"] == name)["frequency"]) >= 2
    splits = [r["split"] for r in rows]
    assert 0 < splits.count("val") < splits.count("train")


def test_plan_balances_scenes_splits_and_annotation():
    plan = plan_toy_dataset(600, 0)
    scenes = [p[0] for p in plan]
    assert all(scenes.count(s) == 120 for s in TOY_SCENES)
    val = [p for p in plan if p[1] == "val"]
    assert len(val) == 150
    assert sum(p[2] for p in val) == 75 and sum(p[2] for p in plan) == 300


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, small_toy):
    again = generate_toy_dataset(tmp_path / "again", N_SMALL, SIZE_SMALL, 0)
    assert file_hashes(again) == file_hashes(small_toy)
    other = generate_toy_dataset(tmp_path / "other", N_SMALL, SIZE_SMALL, 1)
    hashes, reference = file_hashes(other), file_hashes(small_toy)
    assert hashes.keys() & reference.keys()
    assert hashes["index.csv"] != reference["index.csv"]
    changed = sum(hashes[k] != reference[k] for k in hashes.keys() & reference.keys()
                  if k.endswith("0.png"))
    assert changed >= 0.9 * sum(k.endswith("0.png") for k in hashes.keys() & reference.keys())
    assert not (tmp_path / "again.partial").exists()


@pytest.mark.parametrize("arguments, option", [
    ({"n_images": 0}, "--n-images"), ({"size": 8}, "--size"), ({"seed": -1}, "--seed"),
    ({"n_images": 2.5}, "--n-images"),
])
def test_bad_arguments_raise_option_errors(tmp_path, arguments, option):
    with pytest.raises(OptionError, match=option):
        generate_toy_dataset(tmp_path / "toy", **arguments)


def test_refuses_to_write_into_a_non_empty_directory(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(OptionError, match="taken"):
        generate_toy_dataset(tmp_path / "taken", 5, 16)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------- the CNN
def test_toy_model_layers_and_shapes():
    model = toy_model().eval()
    names = [name for name, _ in model.named_children()]
    assert names == ["conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "pool", "fc"]
    shapes = {}
    hooks = [getattr(model, n).register_forward_hook(
        lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape))) for n in names]
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 112, 112))
    for hook in hooks:
        hook.remove()
    assert out.shape == (2, len(TOY_SCENES))
    assert shapes["conv1"] == (2, 16, 56, 56)
    assert shapes["conv3"] == (2, 64, 14, 14) and shapes["conv4"] == (2, 64, 14, 14)
    with pytest.raises(OptionError, match="num_classes"):
        toy_model(0)


def test_scene_classes_follow_toy_scenes(small_toy, broden_tiny):
    ds = BrodenDataset(small_toy)
    classes = scene_classes(ds)
    expected = [TOY_SCENES.index(im.drawn.scene) for im in toy_images(N_SMALL, SIZE_SMALL, 0)]
    assert classes.tolist() == expected
    # broden_tiny's scenes are kitchen, street, kitchen
    assert scene_classes(BrodenDataset(broden_tiny.root)).tolist() == [3, 2, 3]
    label_csv = broden_tiny.root / "label.csv"
    label_csv.write_text(label_csv.read_text().replace("street", "harbour"))
    with pytest.raises(DatasetError, match="harbour"):
        scene_classes(BrodenDataset(broden_tiny.root))


def test_training_is_deterministic_and_changes_the_weights(small_toy, tmp_path):
    first = train_toy_model(small_toy, out=tmp_path / "a.pt", seed=0, epochs=1, max_steps=2,
                            batch_size=8)
    second = train_toy_model(small_toy, out=tmp_path / "b.pt", seed=0, epochs=1, max_steps=2,
                             batch_size=8)
    third = train_toy_model(small_toy, out=tmp_path / "c.pt", seed=1, epochs=1, max_steps=2,
                            batch_size=8)
    a, b, c = (torch.load(p, weights_only=True) for p in (first, second, third))
    assert list(a) == list(toy_model().state_dict())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.0.weight"], c["conv1.0.weight"])
    torch.manual_seed(0)
    initial = toy_model().state_dict()
    assert not torch.equal(a["conv1.0.weight"], initial["conv1.0.weight"])
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["steps"] == 2 and record["classes"] == list(TOY_SCENES)
    assert 0.0 <= record["val_accuracy"] <= 1.0
    assert not list(tmp_path.glob("*.partial"))


def test_training_writes_beside_the_dataset_by_default(small_toy, tmp_path):
    dataset = generate_toy_dataset(tmp_path / "toy", 10, 32, 3)
    path = train_toy_model(dataset, epochs=1, max_steps=1)
    assert path == dataset / "toy_model.pt"
    with pytest.raises(OptionError, match="epochs"):
        train_toy_model(dataset, epochs=0)


def test_ensure_toy_makes_only_what_is_missing(tmp_path):
    out = tmp_path / "toybroden"
    dataset, model = ensure_toy(out, n_images=10, size=32, seed=0, train=False)
    assert dataset == out and model is None
    before = file_hashes(out)
    stamp = (out / "index.csv").stat().st_mtime_ns
    dataset, model = ensure_toy(out, n_images=10, size=32, seed=0, train=True)
    assert model == out / "toy_model.pt" and model.is_file()
    assert (out / "index.csv").stat().st_mtime_ns == stamp
    weights = model.read_bytes()
    ensure_toy(out, n_images=10, size=32, seed=0, train=True)
    assert model.read_bytes() == weights
    assert {k: v for k, v in file_hashes(out).items() if k in before} == before
    with pytest.raises(OptionError, match="n_images"):
        ensure_toy(out, n_images=11, size=32, seed=0, train=False)


# ------------------------------------------------------------------------- the planted model
def planted_acts(model: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    """(U, h, w) float32 activations of PLANTED_LAYER for one uint8 image."""
    out = {}
    layer = dict(model.named_modules())[PLANTED_LAYER]
    hook = layer.register_forward_hook(lambda m, i, o: out.__setitem__("acts", o))
    try:
        with torch.no_grad():
            model(image_tensor(pixels, IMAGENET_MEAN, IMAGENET_STD)[None])
    finally:
        hook.remove()
    return out["acts"][0].numpy()


def test_bayer_matrix_holds_every_level_once():
    matrix = bayer_matrix(4)
    assert matrix.tolist() == [[0, 8, 2, 10], [12, 4, 14, 6], [3, 11, 1, 9], [15, 7, 13, 5]]
    assert sorted(bayer_matrix(16).flatten().tolist()) == list(range(256))


def test_planted_units_fire_exactly_where_their_concept_is_drawn():
    model = planted_model()
    labels = planted_labels()
    assert list(labels.values()) == [name for name, _ in PLANTED_CONCEPTS]
    dither = 1 + 0.5 * bayer_matrix(16).float().numpy() / 256
    seen = set()
    for image in itertools.islice(toy_images(20, 64, 5), 20):
        drawn = image.drawn
        acts = planted_acts(model, image.pixels())
        assert acts.shape == (len(labels), 32, 32)
        for unit, name in labels.items():
            keys = dict(PLANTED_CONCEPTS)[name]
            where = np.isin(drawn.shade, [SHADE_KEYS.index(k) for k in keys])
            if name in ("red", "orange", "pink", "purple"):
                np.testing.assert_array_equal(where, drawn.color == LABELS[name])
            else:  # an exclusive shade: only ever on its object (or part)
                category = drawn.part.max(0) if name == "trunk" else drawn.object
                assert (category[where] == LABELS[name]).all()
            np.testing.assert_array_equal(acts[unit] > 0, where)
            np.testing.assert_allclose(acts[unit][where], np.tile(dither, (2, 2))[where],
                                       rtol=1e-5)
            if where.any():
                seen.add(name)
    assert seen == set(labels.values())


def test_planted_head_classifies_scenes():
    model = planted_model()
    images = list(toy_images(15, 48, 2))
    batch = torch.stack([image_tensor(im.pixels(), IMAGENET_MEAN, IMAGENET_STD) for im in images])
    with torch.no_grad():
        predicted = model(batch).argmax(1).tolist()
    assert [TOY_SCENES[p] for p in predicted] == [im.drawn.scene for im in images]


def test_dissecting_the_planted_layer_recovers_every_planted_label(toy_dataset):
    """DESIGN §3 with dissect.stats on the conftest toy dataset: 0.995 quantile, touched rule."""
    ds = BrodenDataset(toy_dataset)
    model = planted_model()
    acts = np.stack([planted_acts(model, ds.load_image(i)) for i in range(len(ds))])
    thresholds = np.quantile(acts.transpose(1, 0, 2, 3).reshape(acts.shape[1], -1), 0.995,
                             axis=1)
    seg, image_labels = ds.load_segmentations(range(len(ds)))
    vocab = ds.vocab
    counts = count_iou(acts, seg, image_labels, thresholds, vocab.primary, len(vocab.categories))
    iou = iou_from_counts(counts, vocab.primary)
    _, _, unit_label, unit_iou = best_labels(iou, vocab.primary, len(vocab.categories))
    found = {unit: vocab.names[label] for unit, label in enumerate(unit_label)}
    assert found == planted_labels()
    assert (unit_iou >= 0.04).all()
    # the runner-up is clearly behind
    for unit in range(len(unit_label)):
        runner_up = np.sort(iou[unit])[-2]
        assert unit_iou[unit] >= 1.5 * runner_up



def test_water_is_primarily_an_object_even_with_one_beach_image(tmp_path):
    root = generate_toy_dataset(tmp_path / "five", 5, 32, 0)
    cover = {c: {r["name"]: float(r["coverage"]) for r in read_csv(root / f"c_{c}.csv")}
             for c in ("object", "material")}
    assert cover["object"]["water"] > cover["material"]["water"]
    assert BrodenDataset(root).vocab.category_of(LABELS["water"]) == "object"
