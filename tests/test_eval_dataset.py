"""Ablation on another labeled set (``eval_dataset``): an ImageFolder tree or a Broden dataset.

Effects measured on the evaluation set must equal a brute-force reference (a plain forward hook
that zeroes the units, no cache); the set's activations are recorded once into the run and reused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dissect.ablation import run_ablation
from dissect.errors import DatasetError, OptionError
from dissect.rundir import RunDir

LAYER = "conv3"
#: the untrained toy model is at chance on these labels: its class-order warning is expected
pytestmark = pytest.mark.filterwarnings("ignore::dissect.ablation.runner.ClassOrderWarning")
MODEL = "dissect.toy:toy_model"
#: ImageFolder classes of the tree (a subset of the five toy outputs) and images per class.
FOLDERS = {"beach": 3, "kitchen": 2, "street": 3}


@pytest.fixture(scope="module")
def run_dir(toy_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of the (untrained, fixed-seed) toy model: conv3 recorded in float32 and tallied."""
    from dissect.run import RunConfig, record_stage, tally_stage

    run_dir = tmp_path_factory.mktemp("eval_run") / "run"
    config = RunConfig(model=MODEL, layers=(LAYER,), dataset=str(toy_dataset), out=str(run_dir),
                       dtype="float32", batch_size=16, device="cpu")
    record_stage(config, progress=False)
    tally_stage(config)
    return run_dir


def _write_png(path: Path, seed: int, size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_imagefolder(root: Path, classes: dict[str, int] = FOLDERS, seed: int = 0) -> Path:
    """An ImageFolder tree of generated 64x64 PNGs, ``classes``: folder -> number of images."""
    for k, (name, count) in enumerate(classes.items()):
        for i in range(count):
            _write_png(root / name / f"img{i}.png", seed * 1000 + k * 10 + i)
    return root


def _class_names_file(path: Path, names: list[str]) -> Path:
    path.write_text("\n".join(names) + "\n")
    return path


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tree, class-names file): three class folders, the five toy scenes as output names."""
    from dissect.toy import TOY_SCENES

    base = tmp_path_factory.mktemp("eval_sets")
    return (make_imagefolder(base / "val"),
            _class_names_file(base / "classes.txt", list(TOY_SCENES)))


# ------------------------------------------------------------------------------ the reference
def _preprocess(pixels: np.ndarray) -> torch.Tensor:
    from dissect.config import IMAGENET_MEAN, IMAGENET_STD

    tensor = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean) / std


def reference_metrics(images: torch.Tensor, y: np.ndarray, units: list[int],
                      n_classes: int, fill: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-class metrics of the toy model with ``units`` of LAYER zeroed (or set to ``fill[u]``)
    by a plain forward hook (full forward, no cache), computed by hand from the definitions."""
    from dissect.record import load_model

    model = load_model(MODEL).eval()
    module = dict(model.named_modules())[LAYER]

    def zero(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, units] = 0 if fill is None else \
            torch.as_tensor(fill[units], dtype=output.dtype).view(1, -1, 1, 1)
        return output

    handle = module.register_forward_hook(zero)
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        handle.remove()
    prob = torch.softmax(logits.double(), dim=1).numpy()
    pred = logits.argmax(dim=1).numpy()
    n = len(y)
    out: dict[str, list[float]] = {k: [] for k in ("accuracy", "balanced_accuracy", "precision",
                                                   "recall", "true_class_prob", "n")}
    for c in range(n_classes):
        tp = int(np.sum((y == c) & (pred == c)))
        fn = int(np.sum((y == c) & (pred != c)))
        fp = int(np.sum((y != c) & (pred == c)))
        tn = n - tp - fn - fp
        recall = tp / (tp + fn) if tp + fn else np.nan
        tnr = tn / (tn + fp) if tn + fp else np.nan
        out["accuracy"].append((tp + tn) / n)
        out["recall"].append(recall)
        out["balanced_accuracy"].append((recall + tnr) / 2)
        out["precision"].append(tp / (tp + fp) if tp + fp else 0.0)
        out["true_class_prob"].append(float(prob[y == c, c].mean()) if tp + fn else np.nan)
        out["n"].append(tp + fn)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def _folder_reference(root: Path, names: list[str]) -> tuple[torch.Tensor, np.ndarray]:
    paths = sorted(root.glob("*/*.png"))
    images = torch.stack([_preprocess(np.array(Image.open(p).convert("RGB"))) for p in paths])
    return images, np.array([names.index(p.parent.name) for p in paths], dtype=np.int64)


def _check_against_reference(result, images: torch.Tensor, y: np.ndarray,
                             sets: dict[str, list[int]], fill: np.ndarray | None = None) -> None:
    for name, units in sets.items():
        row = result.set_names.index(name)
        expected = reference_metrics(images, y, units, len(result.class_names), fill)
        assert np.array_equal(result.n, expected["n"])
        for metric in ("accuracy", "balanced_accuracy", "precision", "recall"):
            assert np.allclose(result.metrics[metric][row], expected[metric], equal_nan=True,
                               rtol=0, atol=1e-12), (name, metric)
        assert np.allclose(result.metrics["true_class_prob"][row], expected["true_class_prob"],
                           equal_nan=True, rtol=0, atol=1e-5), name


# ---------------------------------------------------------------------------------- the tests
def test_eval_cache_paths_are_named_by_the_run_dir(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    name = RunDir.eval_name(tmp_path / "sets" / "my val")
    assert name.startswith("my_val-") and len(name) == len("my_val-") + 8
    assert name == RunDir.eval_name(str(tmp_path / "sets" / "my val") + "/")
    assert name != RunDir.eval_name(tmp_path / "other" / "my val")
    assert run.eval_cache("features/3", name) == \
        tmp_path / "run" / "cache" / f"eval-{name}" / "cache" / "features_3.h5"
    from dissect.record import cache_path

    # the recorder, given eval_dir as its run directory, writes exactly eval_cache
    assert cache_path(run.eval_dir(name), "features/3") == run.eval_cache("features/3", name)


def test_imagefolder_metrics_equal_a_plain_hook_reference_and_the_cache_is_reused(
        run_dir: Path, imagefolder: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from dissect.toy import TOY_SCENES

    root, names_file = imagefolder
    options = dict(eval_dataset=root, class_names=names_file, scheduler="synchronous")
    result = run_ablation(run_dir, LAYER, "single", **options)
    assert result.info["path"] == "suffix" and result.class_names == tuple(TOY_SCENES)
    assert result.counts.n_total == sum(FOLDERS.values())
    images, y = _folder_reference(root, list(TOY_SCENES))
    _check_against_reference(result, images, y, {"baseline": [], "unit0": [0], "unit17": [17],
                                                 "unit63": [63]})

    run = RunDir(run_dir)
    name = RunDir.eval_name(root)
    cache = run.eval_cache(LAYER, name)
    assert cache.is_file() and run.cache(LAYER).is_file()
    assert result.info["eval_cache"] == cache.relative_to(run_dir).as_posix()
    meta = json.loads(run.ablation_meta(LAYER).read_text())["single"]
    assert meta["eval_dataset"] == str(root.resolve()) and meta["eval_kind"] == "imagefolder"
    assert meta["eval_images"] == sum(FOLDERS.values()) and meta["eval_classes"] == 5
    assert meta["eval_class_names"] == ";".join(TOY_SCENES)
    assert meta["classes"] == "folders" and meta["class_names"] == str(names_file)

    # a second call reuses the cache: the recorder's pass must not run again
    def no_recording(*args: object, **kwargs: object) -> None:
        raise AssertionError("the evaluation set was recorded again")

    monkeypatch.setattr("dissect.record.recorder._record_pass", no_recording)
    stamp = cache.stat().st_mtime_ns
    options_random = dict(options, n=[4, 32], repeats=2, seed=1, save=False)
    by_suffix = run_ablation(run_dir, LAYER, "random", **options_random)
    assert cache.stat().st_mtime_ns == stamp and by_suffix.info["path"] == "suffix"
    # the suffix path from the eval cache equals the full forward with hooks on the eval images
    by_hooks = run_ablation(run_dir, LAYER, "random", use_cache=False, **options_random)
    assert by_hooks.info["path"] == "hooks" and "eval_cache" not in by_hooks.info
    assert np.array_equal(by_suffix.counts.predicted, by_hooks.counts.predicted)
    assert np.array_equal(by_suffix.counts.true_positive, by_hooks.counts.true_positive)
    assert np.allclose(by_suffix.counts.prob_sum, by_hooks.counts.prob_sum, rtol=0, atol=1e-5)
    sets = {by_suffix.set_names[s]: list(by_suffix.set_units[s]) for s in (1, 3)}
    _check_against_reference(by_suffix, images, y, sets)


def test_a_changed_set_is_recorded_again_and_folder_order_is_output_order(
        run_dir: Path, tmp_path: Path) -> None:
    from dissect.record import open_cache

    classes = {f"class{k}": 1 + k % 2 for k in range(5)}         # as many folders as outputs
    root = make_imagefolder(tmp_path / "five", classes, seed=3)
    first = run_ablation(run_dir, LAYER, "concept", eval_dataset=root, concept=_concept(run_dir),
                         iou_threshold=0.0, save=False)
    assert first.class_names == tuple(sorted(classes)) and first.info["path"] == "suffix"
    cache = RunDir(run_dir).eval_cache(LAYER, RunDir.eval_name(root))
    assert open_cache(cache).n_images == sum(classes.values())
    _write_png(root / "class0" / "extra.png", seed=99)                # the set changed
    second = run_ablation(run_dir, LAYER, "concept", eval_dataset=root, concept=_concept(run_dir),
                          iou_threshold=0.0, save=False)
    assert open_cache(cache).n_images == sum(classes.values()) + 1
    assert second.counts.n_total == sum(classes.values()) + 1
    # the concept's units come from the run's dissection, whatever the evaluation set
    assert [list(u) for u in second.set_units] == [list(u) for u in first.set_units]
    images, y = _folder_reference(root, sorted(classes))
    _check_against_reference(second, images, y, {"baseline": [],
                                                 second.set_names[1]: list(second.set_units[1])})


def _concept(run_dir: Path) -> str:
    from dissect.tally import load_dissection

    dissection = load_dissection(run_dir / LAYER)
    best = int(np.argmax(dissection.unit_iou))
    return str(dissection.label_names[dissection.unit_label[best]])


def test_a_broden_format_eval_set(run_dir: Path, tmp_path: Path) -> None:
    from dissect.data import BrodenDataset
    from dissect.toy import TOY_SCENES, generate_toy_dataset

    root = generate_toy_dataset(tmp_path / "other_broden", n_images=20, size=64, seed=7)
    result = run_ablation(run_dir, LAYER, "random", eval_dataset=root, n=[8], repeats=1,
                          scheduler="synchronous")
    assert result.info["path"] == "suffix" and result.class_names == tuple(TOY_SCENES)
    data = BrodenDataset(root)
    rows = data.subset("val")
    assert result.counts.n_total == len(rows)
    scene = data.image_level_labels("scene")
    y = np.array([TOY_SCENES.index(data.vocab.names[int(scene[i][0])]) for i in rows])
    images = torch.stack([_preprocess(data.load_image(int(i))) for i in rows])
    _check_against_reference(result, images, y, {"baseline": [],
                                                 result.set_names[1]: list(result.set_units[1])})
    meta = json.loads(RunDir(run_dir).ablation_meta(LAYER).read_text())["random"]
    assert meta["eval_kind"] == "broden" and meta["eval_images"] == 20
    assert meta["eval_dataset"] == str(root.resolve()) and meta["classes"] == "scene"
    assert RunDir(run_dir).eval_cache(LAYER, RunDir.eval_name(root)).is_file()


def test_topn_on_an_imagefolder_set_ranks_on_a_split_it_has(
        run_dir: Path, imagefolder: tuple[Path, Path]) -> None:
    root, names_file = imagefolder
    options = dict(eval_dataset=root, class_names=names_file, n=[2], save=False)
    with pytest.raises(OptionError, match=r"rank_split.*ImageFolder.*--rank-split val"):
        run_ablation(run_dir, LAYER, "topn", **options)
    result = run_ablation(run_dir, LAYER, "topn", rank_split="val", **options)
    assert {n.split(":")[0] for n in result.set_names[1:]} == set(FOLDERS)


def test_bad_evaluation_sets_are_named(run_dir: Path, tmp_path: Path,
                                       imagefolder: tuple[Path, Path]) -> None:
    from dissect.toy import TOY_SCENES

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "stray.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=rf"{empty}: no class folders"):
        run_ablation(run_dir, LAYER, "single", eval_dataset=empty, save=False)
    with pytest.raises(DatasetError, match="not a directory"):
        run_ablation(run_dir, LAYER, "single", eval_dataset=tmp_path / "missing", save=False)
    root, _ = imagefolder
    short = _class_names_file(tmp_path / "three.txt", sorted(FOLDERS))
    with pytest.raises(OptionError, match=rf"{short} lists 3 class names but the model has 5"):
        run_ablation(run_dir, LAYER, "single", eval_dataset=root, class_names=short, save=False)
    with pytest.raises(OptionError, match=rf"{root} has 3 class folders but the model has 5 "
                                          r"outputs.*--class-names"):
        run_ablation(run_dir, LAYER, "single", eval_dataset=root, save=False)
    other = _class_names_file(tmp_path / "other.txt", [n for n in TOY_SCENES if n != "street"]
                              + ["harbour"])
    with pytest.raises(DatasetError, match=rf"{root / 'street'}: folder\(s\) not in the class "
                                           "names"):
        run_ablation(run_dir, LAYER, "single", eval_dataset=root, class_names=other, save=False)
    with pytest.raises(OptionError, match="'scene' is no class source of the ImageFolder set"):
        run_ablation(run_dir, LAYER, "single", eval_dataset=root, classes="scene", save=False)
    broken = tmp_path / "broken_broden"
    make_imagefolder(broken / "images", {"a": 1})
    (broken / "label.csv").write_text("number,name\n")
    with pytest.raises(DatasetError, match=rf"{broken}: has label.csv but no index.csv"):
        run_ablation(run_dir, LAYER, "single", eval_dataset=broken, save=False)
    # nothing was recorded for the refused sets
    assert not any(RunDir(run_dir).cache_dir.glob("eval-empty-*"))


def test_a_killed_recording_resumes_and_the_mean_rule_uses_the_run_cache(
        run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dissect.record.cache import CacheWriter, partial_path

    root = make_imagefolder(tmp_path / "resumed", {f"c{k}": 1 for k in range(5)}, seed=5)
    cache = RunDir(run_dir).eval_cache(LAYER, RunDir.eval_name(root))

    def killed(self: CacheWriter) -> Path:
        raise RuntimeError("killed before the cache was renamed into place")

    with monkeypatch.context() as patch:
        patch.setattr(CacheWriter, "finish", killed)
        with pytest.raises(RuntimeError, match="killed"):
            run_ablation(run_dir, LAYER, "single", eval_dataset=root, save=False)
    assert partial_path(cache).is_file() and not cache.exists()

    def no_recording(*args: object, **kwargs: object) -> None:
        raise AssertionError("the recorded blocks were not reused")

    monkeypatch.setattr("dissect.record.recorder._record_pass", no_recording)
    options = dict(eval_dataset=root, rule="mean", n=[16], repeats=1, save=False)
    by_suffix = run_ablation(run_dir, LAYER, "random", **options)
    assert cache.is_file() and not partial_path(cache).exists()
    by_hooks = run_ablation(run_dir, LAYER, "random", use_cache=False, **options)
    assert by_suffix.info["path"] == "suffix" and by_hooks.info["path"] == "hooks"
    assert np.array_equal(by_suffix.counts.predicted, by_hooks.counts.predicted)
    assert np.allclose(by_suffix.counts.prob_sum, by_hooks.counts.prob_sum, rtol=0, atol=1e-5)
    # the mean rule's fill values are the unit means over the run's dataset (its layer cache)
    from dissect.ablation import compute_unit_means
    from dissect.record import CacheReader

    means = np.asarray(compute_unit_means(CacheReader(RunDir(run_dir).cache(LAYER))))
    images, y = _folder_reference(root, [f"c{k}" for k in range(5)])
    _check_against_reference(by_suffix, images, y,
                             {"baseline": [], "random16#0": list(by_suffix.set_units[1])}, means)


def test_ablate_command_takes_an_eval_dataset_and_saves_it(run_dir: Path, imagefolder,
                                                           tmp_path: Path) -> None:
    import shutil

    from dissect.cli import main

    tree, names = imagefolder
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert main(["ablate", "--run", str(run), "--layer", LAYER, "--study", "single",
                 "--eval-dataset", str(tree), "--class-names", str(names), "--quiet"]) == 0
    meta = json.loads((run / LAYER / "ablation.json").read_text())
    assert meta["single"]["eval_dataset"] == str(tree.resolve())
    assert meta["single"]["eval_kind"] == "imagefolder"
    config = json.loads((run / "run.json").read_text())["config"]
    assert config["eval_dataset"] == str(tree.resolve())
    assert json.loads((run / "run.json").read_text())["stages"][f"ablate:{LAYER}"][
        "options"]["eval_dataset"] == str(tree.resolve())
    assert RunDir(run).eval_cache(LAYER, RunDir.eval_name(tree)).is_file()
    assert main(["ablate", "--run", str(run), "--layer", LAYER, "--study", "single",
                 "--eval-dataset", str(tmp_path / "missing")]) == 2
