"""dissect.compose and dissect.stats.formula: compositional labels (DESIGN.md §10).

Every count is checked against brute-force boolean masks built from the definitions; the beam
and exact searches against exhaustive enumeration of every left-deep formula.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_csv, write_label_png
from PIL import Image

from dissect.compose import (
    COMPOSITION_CSV,
    COMPOSITION_JSON,
    compose_layer,
    composition_is_current,
    count_formulas,
    load_composition,
)
from dissect.data import BrodenDataset
from dissect.errors import OptionError
from dissect.stats import upsample_maps
from dissect.stats.formula import (
    OPS,
    Formula,
    canonical_key,
    formula_arrays,
    one_step_bounds,
    sort_key,
    subtree_bound,
)

# labels: color 1-3 (one pixel layer), object 4-6 (one layer, missing on some images),
# part 7-8 (two layers that may carry the same label on a pixel), scene 9-10 (image-level)
CATEGORIES = ["color", "object", "part", "scene"]
LABELS = {1: ("red", "color"), 2: ("green", "color"), 3: ("blue", "color"),
          4: ("dog", "object"), 5: ("cat", "object"), 6: ("car", "object"),
          7: ("leg", "part"), 8: ("wheel", "part"), 9: ("kitchen", "scene"),
          10: ("street", "scene")}


# ----------------------------------------------------------------------------- fixtures
def write_broden(root: Path, layers: list[dict[str, list[np.ndarray]]],
                 level: list[dict[str, list[int]]], labels: dict[int, tuple[str, str]] = LABELS,
                 categories: list[str] = CATEGORIES) -> Path:
    """A Broden directory: per image, pixel layers and image-level labels by category."""
    (root / "images").mkdir(parents=True)
    write_csv(root / "category.csv", ["name", "first", "last", "count", "frequency"],
              [[c, 1, 1, 1, 1] for c in categories])
    write_csv(root / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
              [[0, "-", "", 0, 0, ""]] + [[n, name, f"{cat}(1)", 1, 0.1, ""]
                                          for n, (name, cat) in sorted(labels.items())])
    for category in categories:
        write_csv(root / f"c_{category}.csv", ["code", "number", "name", "frequency", "coverage"],
                  [[k + 1, n, name, 1, 0.1] for k, (n, (name, cat)) in
                   enumerate(sorted(labels.items())) if cat == category])
    sh, sw = next(a for image in layers for arrays in image.values() for a in arrays).shape
    rows = []
    for i, (image_layers, image_level) in enumerate(zip(layers, level)):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / "images" / f"{i}.png")
        cells = []
        for category in categories:
            parts = []
            for k, array in enumerate(image_layers.get(category, [])):
                name = f"seg/{i}_{category}_{k}.png"
                write_label_png(root / "images" / name, array)
                parts.append(name)
            parts += [str(n) for n in image_level.get(category, [])]
            cells.append(";".join(parts))
        rows.append([f"{i}.png", "train", 8, 8, sh, sw] + cells)
    write_csv(root / "index.csv", ["image", "split", "ih", "iw", "sh", "sw"] + categories, rows)
    return root


def random_broden(root: Path, seed: int, n_images: int = 8, size: int = 6,
                  renumber: dict[int, int] | None = None) -> Path:
    """Random label maps over LABELS; image 1 has no object layer, the last image no label."""
    rng = np.random.default_rng(seed)
    relabel = np.arange(11) if renumber is None else np.array(
        [0] + [renumber[n] for n in range(1, 11)])
    layers, level = [], []
    for i in range(n_images):
        if i == n_images - 1:
            layers.append({})
            level.append({})
            continue
        color = rng.integers(0, 4, (size, size))
        obj = rng.choice([0, 4, 5, 6], (size, size), p=[0.4, 0.2, 0.2, 0.2])
        part_a = np.where(obj > 0, rng.choice([0, 7, 8], (size, size)), 0)
        part_b = np.where(rng.random((size, size)) < 0.3, 8, 0)
        image = {"color": [relabel[color]], "part": [relabel[part_a], relabel[part_b]]}
        if i != 1:
            image["object"] = [relabel[obj]]
        layers.append(image)
        level.append({"scene": [int(relabel[9 + (i % 2)])]} if i % 3 != 2 else {})
    labels = LABELS if renumber is None else {renumber[n]: v for n, v in LABELS.items()}
    return write_broden(root, layers, level, labels)


def write_cache(path: Path, acts: np.ndarray) -> Path:
    """A complete activation cache (DESIGN §4a), float16 values."""
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


# ----------------------------------------------------------------------------- brute force
def brute_leaves(dataset: BrodenDataset, rows: np.ndarray) -> np.ndarray:
    """bool (n, L, S): L_c per image, from the definition (any layer; image-level = all)."""
    sh, sw = dataset.seg_size
    out = np.zeros((len(rows), dataset.vocab.num_labels, sh * sw), dtype=bool)
    for k, i in enumerate(rows):
        seg, level = dataset.load_segmentation(int(i))
        for layer in seg:
            for pixel, label in enumerate(layer.reshape(-1)):
                if label:
                    out[k, label, pixel] = True
        for label in level:
            out[k, label, :] = True
    out[:, 0] = False
    return out


def brute_units(acts: np.ndarray, thresholds: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool (n, U, S): up > threshold (float64 comparison) where the map max exceeds it."""
    n, units = acts.shape[:2]
    out = np.zeros((n, units, size[0] * size[1]), dtype=bool)
    for i in range(n):
        for u in range(units):
            if acts[i, u].max() > thresholds[u]:
                up = upsample_maps(acts[i, u:u + 1], size)[0].astype(np.float64)
                out[i, u] = (up > thresholds[u]).reshape(-1)
    return out


def brute_formula(formula: Formula, leaves: np.ndarray, annotated: np.ndarray | None,
                  primary: np.ndarray) -> np.ndarray:
    """bool (n, S) mask of a formula; ``annotated`` bool (n, C) for annotated negation."""
    mask = leaves[:, formula.first].copy()
    for op, label in formula.steps:
        other = leaves[:, label]
        if op == "or":
            mask = mask | other
        elif op == "and":
            mask = mask & other
        else:
            negated = ~other
            if annotated is not None:
                negated &= annotated[:, primary[label]][:, None]
            mask = mask & negated
    return mask


def annotated_images(leaves: np.ndarray, primary: np.ndarray, n_categories: int) -> np.ndarray:
    present = leaves.any(axis=2)                                     # (n, L)
    out = np.zeros((len(leaves), n_categories), dtype=bool)
    for label in np.flatnonzero(primary >= 0):
        out[:, primary[label]] |= present[:, label]
    return out


def all_formulas(labels: list[int], max_length: int, ops: tuple[str, ...]) -> list[Formula]:
    """Every left-deep formula of at most max_length distinct leaves, canonical, deduplicated."""
    found: dict[tuple, Formula] = {}
    level = [Formula(c) for c in labels]
    for formula in level:
        found[formula.key()] = formula
    for _ in range(max_length - 1):
        nxt = []
        for formula in level:
            for op, c in itertools.product(ops, labels):
                if c in formula.labels:
                    continue
                new = formula.extend(op, c).canonical()
                if new.key() not in found:
                    found[new.key()] = new
                    nxt.append(new)
        level = nxt
    return list(found.values())


def exhaustive_best(unit_mask: np.ndarray, formulas: list[Formula], leaves: np.ndarray,
                    annotated: np.ndarray | None, primary: np.ndarray
                    ) -> tuple[float, Formula | None]:
    """Best (beam order) formula with IoU > 0 over ``formulas``, from masks."""
    best = None
    for formula in formulas:
        mask = brute_formula(formula, leaves, annotated, primary)
        inter = int((mask & unit_mask).sum())
        union = int((mask | unit_mask).sum())
        iou = inter / union if union else 0.0
        if iou > 0 and (best is None or sort_key(iou, formula) < sort_key(*best)):
            best = (iou, formula)
    return best if best is not None else (0.0, None)


@pytest.fixture
def random_case(tmp_path: Path):
    root = random_broden(tmp_path / "broden", seed=3)
    dataset = BrodenDataset(root)
    rng = np.random.default_rng(7)
    acts = rng.gamma(1.0, size=(len(dataset), 4, 3, 3)).astype(np.float16).astype(np.float32)
    cache = write_cache(tmp_path / "cache" / "conv.h5", acts)
    thresholds = np.quantile(acts.transpose(1, 0, 2, 3).reshape(4, -1), 0.7, axis=1)
    return dataset, acts, cache, thresholds


# ----------------------------------------------------------------------------- formulas
def test_canonical_form_merges_equal_formulas_and_renders_left_deep() -> None:
    a_or_b_or_c = Formula(1, (("or", 2), ("or", 3)))
    assert a_or_b_or_c.key() == Formula(3, (("or", 1), ("or", 2))).key()
    assert Formula(5, (("and_not", 2), ("and", 3))).key() == \
        Formula(3, (("and", 5), ("and_not", 2))).key()
    assert Formula(1, (("or", 2), ("and", 3))).key() != Formula(1, (("and", 3), ("or", 2))).key()
    assert Formula(1, (("and", 2),)).key() != Formula(1, (("and_not", 2),)).key()
    names = ["", "water", "river", "boat", "sky"]
    formula = Formula(2, (("or", 1), ("and_not", 3))).canonical()
    assert formula == Formula(1, (("or", 2), ("and_not", 3)))
    assert formula.text(names) == "(water OR river) AND NOT boat"
    assert Formula(3, (("and_not", 4), ("and", 1))).canonical().text(names) == \
        "(water AND boat) AND NOT sky"
    assert Formula.from_ids(json.loads(formula.ids_json())) == formula
    assert formula.ids() == [1, ["or", 2], ["and_not", 3]]
    for f in all_formulas([1, 2, 3, 4], 3, OPS):
        assert f.canonical() == f and f.canonical().key() == canonical_key(f)


# ----------------------------------------------------------------------------- counts
@pytest.mark.parametrize("negation", ["global", "annotated"])
def test_counts_equal_brute_force(random_case, negation: str) -> None:
    dataset, acts, _, thresholds = random_case
    rows = dataset.labeled_images()
    assert len(rows) == len(dataset) - 1
    seg, level = dataset.load_segmentations(rows)
    primary = dataset.vocab.primary
    leaf_category = primary.copy()
    leaf_category[0] = -1
    rng = np.random.default_rng(1)
    formulas: list[Formula | None] = [None]
    for _ in range(25):
        labels = rng.choice(np.arange(1, 11), size=rng.integers(1, 4), replace=False)
        steps = tuple((OPS[rng.integers(3)], int(c)) for c in labels[1:])
        formulas.append(Formula(int(labels[0]), steps))
    leaves_arr, ops_arr, lengths = formula_arrays(formulas, 3)
    pair_formula = np.repeat(np.arange(len(formulas)), 4)
    pair_unit = np.tile(np.arange(4), len(formulas))
    x, y = count_formulas(acts[rows], seg, level, thresholds, leaf_category, 4, leaves_arr,
                          ops_arr, lengths, pair_formula, pair_unit, negation)
    x, y = x.dense(), y.dense()
    leaves = brute_leaves(dataset, rows)
    units = brute_units(acts[rows], thresholds, dataset.seg_size)
    annotated = annotated_images(leaves, primary, 4)
    domains = np.stack([np.ones((len(rows), leaves.shape[2]), bool)]
                       + [leaves[:, c] for c in range(1, 11)]
                       + [np.repeat(annotated[:, k:k + 1], leaves.shape[2], 1)
                          for k in range(4)])                             # (G, n, S)
    assert x.shape == (len(formulas), 15) and y.shape == (len(pair_formula), 15)
    for f, formula in enumerate(formulas):
        mask = np.ones(leaves.shape[::2], bool) if formula is None else brute_formula(
            formula, leaves, annotated if negation == "annotated" else None, primary)
        expected = [(mask & domain).sum() for domain in domains]
        assert x[f].tolist() == expected
        for u in range(4):
            joint = mask & units[:, u]
            assert y[f * 4 + u].tolist() == [(joint & domain).sum() for domain in domains]
    assert y[:, 0].sum() > 0 and x[1:, 1:11].sum() > 0


# ----------------------------------------------------------------------------- search
def planted_case(tmp_path: Path):
    """A unit whose mask is exactly (red OR green) AND NOT dog (maps at the seg size)."""
    root = random_broden(tmp_path / "broden", seed=11, n_images=6, size=8)
    dataset = BrodenDataset(root)
    rows = dataset.labeled_images()
    leaves = brute_leaves(dataset, np.arange(len(dataset)))
    target = (leaves[:, 1] | leaves[:, 2]) & ~leaves[:, 4]
    acts = np.zeros((len(dataset), 2, 8, 8), np.float32)
    acts[:, 0] = target.reshape(-1, 8, 8)
    acts[:, 1] = leaves[:, 9].reshape(-1, 8, 8) * 2.0          # image-level kitchen
    return dataset, acts, rows


def test_planted_formula_recovered_with_iou_one(tmp_path: Path) -> None:
    dataset, acts, _ = planted_case(tmp_path)
    cache = write_cache(tmp_path / "cache" / "conv.h5", acts)
    result = compose_layer(cache, dataset, np.array([0.5, 0.5]), scheduler="synchronous")
    unit = result.units[0]
    assert unit.best.formula.text(dataset.vocab.names) == "(red OR green) AND NOT dog"
    assert unit.best.iou == 1.0
    assert unit.best.inter == unit.mask_area == unit.best.area > 0
    assert unit.label_iou < 1.0
    # image-level labels are whole-image masks: unit 1 fires on every pixel of kitchen images
    kitchen = result.units[1]
    assert kitchen.label == 9 and kitchen.label_iou == 1.0
    assert kitchen.best.formula == Formula(9) and kitchen.best.iou == 1.0
    n_kitchen = sum(9 in dataset.load_segmentation(i)[1] for i in range(len(dataset)))
    assert kitchen.mask_area == n_kitchen * 64 > 0
    row = result.rows()[0]
    assert (row["formula"], row["leaves"], row["iou"], row["categories"], row["optimal"]) == (
        "(red OR green) AND NOT dog", 3, 1.0, "color;object", "unknown")


def units_and_formulas(dataset: BrodenDataset, acts: np.ndarray, thresholds: np.ndarray):
    rows = dataset.labeled_images()
    leaves = brute_leaves(dataset, rows)
    units = brute_units(acts[rows], thresholds, dataset.seg_size)
    present = [c for c in range(1, 11) if leaves[:, c].any()]
    return rows, leaves, units, present


@pytest.mark.parametrize("negation", ["global", "annotated"])
def test_wide_beam_and_exact_equal_exhaustive(random_case, negation: str) -> None:
    dataset, acts, cache, thresholds = random_case
    _, leaves, units, present = units_and_formulas(dataset, acts, thresholds)
    primary = dataset.vocab.primary
    annotated = annotated_images(leaves, primary, 4) if negation == "annotated" else None
    formulas = all_formulas(present, 3, OPS)
    wide = compose_layer(cache, dataset, thresholds, beam=len(formulas), negation=negation,
                         scheduler="synchronous")
    exact = compose_layer(cache, dataset, thresholds, beam=1, search="exact",
                          negation=negation, scheduler="synchronous")
    suboptimal = 0
    for u in range(4):
        iou, formula = exhaustive_best(units[:, u], formulas, leaves, annotated, primary)
        assert formula is not None and iou > 0
        assert (wide.units[u].beam[0].formula, wide.units[u].beam[0].iou) == (formula, iou)
        assert (exact.units[u].best.formula, exact.units[u].best.iou) == (formula, iou)
        beam_iou = exact.units[u].beam[0].iou
        assert exact.units[u].optimal == ("yes" if beam_iou == iou else "no")
        suboptimal += beam_iou < iou
        for entry in wide.units[u].beam[:20]:       # every reported count is exact
            mask = brute_formula(entry.formula, leaves, annotated, primary)
            assert entry.inter == (mask & units[:, u]).sum() and entry.area == mask.sum()
    assert suboptimal >= 1          # beam 1 misses the optimum on some unit of this case


def test_beam_slots_hold_distinct_formulas(random_case) -> None:
    dataset, _, cache, thresholds = random_case
    result = compose_layer(cache, dataset, thresholds, beam=6, ops=("or",), max_length=3,
                           scheduler="synchronous")
    for unit in result.units:
        keys = [entry.formula.key() for entry in unit.beam]
        assert len(keys) == len(set(keys)) == 6
        assert [sort_key(e.iou, e.formula) for e in unit.beam] == sorted(
            sort_key(e.iou, e.formula) for e in unit.beam)


def test_renumbering_labels_does_not_change_the_result(tmp_path: Path, random_case) -> None:
    dataset, _, cache, thresholds = random_case
    mapping = {n: 31 - 2 * n for n in range(1, 11)}       # reverses the label order
    other = BrodenDataset(random_broden(tmp_path / "renumbered", seed=3, renumber=mapping))
    first = compose_layer(cache, dataset, thresholds, scheduler="synchronous")
    second = compose_layer(cache, other, thresholds, scheduler="synchronous")
    names, other_names = dataset.vocab.names, other.vocab.names
    for a, b in zip(first.units, second.units):
        assert [e.iou for e in a.beam] == [e.iou for e in b.beam]
        assert {e.formula.key(): e.iou for e in a.beam} == {
            Formula(mapping_inverse(b_entry.formula.first, mapping),
                    tuple((op, mapping_inverse(c, mapping)) for op, c in b_entry.formula.steps)
                    ).key(): b_entry.iou for b_entry in b.beam}
        assert names[a.label] == other_names[b.label] and a.label_iou == b.label_iou


def mapping_inverse(number: int, mapping: dict[int, int]) -> int:
    return {v: k for k, v in mapping.items()}[number]


def test_schedulers_and_chunkings_give_identical_results(random_case, tmp_path: Path) -> None:
    dataset, _, cache, thresholds = random_case
    reference = compose_layer(cache, dataset, thresholds, scheduler="synchronous",
                              out_dir=tmp_path / "reference")
    runs = [("threads", 1), ("synchronous", 3), ("processes", 2)]
    for scheduler, chunk in runs:
        out = tmp_path / f"{scheduler}-{chunk}"
        result = compose_layer(cache, dataset, thresholds, scheduler=scheduler,
                               chunk_size=chunk, num_workers=2, out_dir=out)
        assert result.rows() == reference.rows()
        for name in (COMPOSITION_CSV, COMPOSITION_JSON):
            assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()


def test_killed_run_then_rerun_gives_identical_files(random_case, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    dataset, _, cache, thresholds = random_case
    clean = tmp_path / "clean"
    compose_layer(cache, dataset, thresholds, scheduler="synchronous", out_dir=clean)
    killed = tmp_path / "killed"
    import dissect.compose as compose_module

    def die(source: Path, target: Path) -> None:
        raise KeyboardInterrupt("killed after writing the CSV temp")

    monkeypatch.setattr(compose_module, "_replace", die)
    with pytest.raises(KeyboardInterrupt):
        compose_layer(cache, dataset, thresholds, scheduler="synchronous", out_dir=killed)
    monkeypatch.undo()
    assert (killed / (COMPOSITION_CSV + ".partial")).is_file()
    assert not (killed / COMPOSITION_JSON).exists()
    result = compose_layer(cache, dataset, thresholds, scheduler="synchronous", out_dir=killed)
    for name in (COMPOSITION_CSV, COMPOSITION_JSON):
        assert (killed / name).read_bytes() == (clean / name).read_bytes()
    # a current result is loaded, not recomputed; other options are not current
    assert composition_is_current(killed, result.options, result.fingerprint)
    assert not composition_is_current(killed, {**result.options, "beam": 4}, result.fingerprint)
    monkeypatch.setattr(compose_module, "count_formulas", None)   # would fail if called
    again = compose_layer(cache, dataset, thresholds, scheduler="synchronous", out_dir=killed)
    assert again.rows() == result.rows()
    loaded = load_composition(killed, dataset.vocab.names, dataset.vocab.primary)
    assert loaded.rows() == result.rows()


def test_csv_columns_and_options_errors(random_case, tmp_path: Path) -> None:
    dataset, _, cache, thresholds = random_case
    compose_layer(cache, dataset, thresholds, max_length=2, scheduler="synchronous",
                  out_dir=tmp_path)
    lines = (tmp_path / COMPOSITION_CSV).read_text().splitlines()
    assert lines[0] == "unit,formula,formula_ids,leaves,iou,label,label_iou,categories,optimal"
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "1", "2", "3"]
    for bad in [{"ops": ("xor",)}, {"beam": 0}, {"search": "greedy"}, {"negation": "some"},
                {"candidates": "most"}, {"categories": ["nope"]}, {"max_length": 1.5}]:
        with pytest.raises(OptionError):
            compose_layer(cache, dataset, thresholds, scheduler="synchronous", **bad)
    with pytest.raises(OptionError, match="thresholds"):
        compose_layer(cache, dataset, thresholds[:2], scheduler="synchronous")


def test_bounds_are_admissible(random_case) -> None:
    """subtree_bound(F) >= the IoU of every extension of F (brute force), one_step_bounds(F)
    >= the IoU of each F op c; checked on every formula of 1 and 2 leaves and every unit."""
    dataset, acts, _, thresholds = random_case
    _, leaves, units, present = units_and_formulas(dataset, acts, thresholds)
    primary = dataset.vocab.primary
    n_pixels = leaves.shape[0] * leaves.shape[2]
    label_area = leaves.sum(axis=(0, 2))
    formulas = [f for f in all_formulas(present, 2, OPS)]
    tight = 0
    for u in range(4):
        unit = units[:, u]
        m = int(unit.sum())
        joint = (leaves & unit[:, None, :]).sum(axis=(0, 2))
        for formula in formulas:
            mask = brute_formula(formula, leaves, None, primary)
            area, inter = np.array([mask.sum()]), np.array([(mask & unit).sum()])
            others = [c for c in present if c not in formula.labels]
            descendants = [(formula.extend(op, c), 1) for op in OPS for c in others]
            if formula.length == 1:
                descendants += [(f.extend(op, d), 2) for f, _ in list(descendants)
                                for op in OPS for d in others if d not in f.labels]
            ious = {1: [], 2: []}
            steps = one_step_bounds(area, inter, m, label_area, joint, n_pixels)[0]
            for f, depth in descendants:
                g = brute_formula(f, leaves, None, primary)
                union = (g | unit).sum()
                iou = (g & unit).sum() / union if union else 0.0
                ious[depth].append(iou)
                if depth == 1:
                    op, c = f.steps[-1]
                    assert steps[OPS.index(op), c] >= iou - 1e-12
            for remaining in (1, 2) if formula.length == 1 else (1,):
                best = max(ious[1] + (ious[2] if remaining == 2 else []))
                bound = subtree_bound(area, inter, m, label_area, joint, n_pixels, remaining,
                                      OPS)[0]
                assert bound >= best - 1e-12
                tight += bound < 1.0
    assert tight > 0


def test_count_sums_are_exact_sparse_or_dense() -> None:
    # A chunk's counts may repeat an index; sums switch to a dense array once they would fill
    # more than DENSE_SHARE of the cells. Every order of sums equals a plain np.add.at.
    from dissect.compose import SparseCounts

    rng = np.random.default_rng(1)
    shape, size = (7, 9), 63
    empty = SparseCounts(shape, np.zeros(0, np.int64), np.zeros(0, np.int64))
    saw_dense = saw_sparse = False
    for _ in range(300):
        total, expected = empty, np.zeros(size, np.int64)
        for _ in range(int(rng.integers(1, 6))):
            k = int(rng.integers(0, 40))
            index = rng.integers(0, size, k) if rng.random() < 0.5 else \
                rng.choice(size, k, replace=False)
            values = rng.integers(1, 100, k)
            np.add.at(expected, index, values)
            part = empty + SparseCounts(shape, index, values)
            total = total + part if rng.random() < 0.5 else part + total
        saw_dense |= total.full is not None
        saw_sparse |= total.full is None
        np.testing.assert_array_equal(total.dense().ravel(), expected)
    assert saw_dense and saw_sparse
