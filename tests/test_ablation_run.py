"""run_ablation on a recorded run of the (untrained) toy model: files, studies, options, errors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from dissect.ablation import CSV_COLUMNS, IMPORTANCE_COLUMNS, load_ablation, run_ablation
from dissect.errors import CacheError, LayerError, OptionError

LAYER = "conv3"
#: the untrained toy model is at chance on the scene labels: its class-order warning is expected
pytestmark = pytest.mark.filterwarnings("ignore::dissect.ablation.runner.ClassOrderWarning")


@pytest.fixture(scope="module")
def toy_run(toy_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with conv3 recorded in float32 and dissected."""
    from dissect.run import RunConfig, record_stage, tally_stage

    run_dir = tmp_path_factory.mktemp("ablation_run") / "run"
    config = RunConfig(model="dissect.toy:toy_model", layers=(LAYER,), dataset=str(toy_dataset),
                       out=str(run_dir), dtype="float32", batch_size=16, device="cpu")
    record_stage(config, progress=False)
    tally_stage(config)
    return run_dir


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        return list(reader)


def test_single_study_writes_the_csv_h5_and_importance(toy_run: Path) -> None:
    from dissect.data import BrodenDataset
    from dissect.toy import TOY_SCENES

    result = run_ablation(toy_run, LAYER, "single", classes="scene", scheduler="synchronous")
    assert result.info["path"] == "suffix" and result.class_names == tuple(TOY_SCENES)
    n_units = 64
    assert result.set_names[0] == "baseline" and len(result.set_names) == n_units + 1
    dataset = BrodenDataset(_dataset_dir(toy_run))
    val = dataset.subset("val")
    assert result.counts.n_total == len(val)
    rows = _csv_rows(toy_run / LAYER / "ablation.csv")
    assert len(rows) == (n_units + 1) * len(TOY_SCENES)
    baseline = [r for r in rows if r["set"] == "baseline"]
    assert [r["class"] for r in baseline] == list(TOY_SCENES)
    assert all(r["study"] == "single" and r["units"] == "" for r in baseline)
    assert sum(int(r["n"]) for r in baseline) == len(val)
    assert [r["units"] for r in rows if r["class"] == TOY_SCENES[0]][1:4] == ["0", "1", "2"]
    with open(toy_run / LAYER / "importance.csv", newline="") as handle:
        importance = list(csv.DictReader(handle))
    assert tuple(importance[0]) == IMPORTANCE_COLUMNS and len(importance) == n_units
    assert sum(int(r["n_classes"]) for r in importance) == 4 * len(TOY_SCENES)
    assert all(r["label"] for r in importance)           # labels from the dissection
    assert result.csv_path == toy_run / LAYER / "ablation.csv"


def _dataset_dir(run_dir: Path) -> str:
    from dissect.run import read_run

    return read_run(run_dir)["config"]["dataset"]


def test_suffix_from_the_float32_cache_equals_the_full_forward(toy_run: Path) -> None:
    options = dict(classes="scene", n=[2, 8], repeats=2, seed=3, save=False)
    by_suffix = run_ablation(toy_run, LAYER, "random", **options)
    by_hooks = run_ablation(toy_run, LAYER, "random", use_cache=False, **options)
    assert by_suffix.info["path"] == "suffix" and by_hooks.info["path"] == "hooks"
    assert [list(u) for u in by_suffix.set_units] == [list(u) for u in by_hooks.set_units]
    assert np.array_equal(by_suffix.counts.predicted, by_hooks.counts.predicted)
    assert np.array_equal(by_suffix.counts.true_positive, by_hooks.counts.true_positive)
    assert np.allclose(by_suffix.counts.prob_sum, by_hooks.counts.prob_sum, rtol=0, atol=1e-5)
    again = run_ablation(toy_run, LAYER, "random", **options)
    assert [list(u) for u in again.set_units] == [list(u) for u in by_suffix.set_units]
    assert again.set_names[1:] == ("random2#0", "random2#1", "random8#0", "random8#1")


@pytest.mark.slow
def test_processes_give_the_same_results_as_threads(toy_run: Path) -> None:
    # the suffix (an FX GraphModule) and the cache reader are pickled to worker processes
    options = dict(classes="scene", n=[3], repeats=3, seed=1, save=False, sets_per_batch=1)
    threads = run_ablation(toy_run, LAYER, "random", **options)
    processes = run_ablation(toy_run, LAYER, "random", scheduler="processes", **options)
    assert processes.info["path"] == "suffix"
    assert np.array_equal(processes.counts.true_positive, threads.counts.true_positive)
    assert np.array_equal(processes.counts.predicted, threads.counts.predicted)
    assert np.array_equal(processes.counts.prob_sum, threads.counts.prob_sum)


def test_topn_concept_and_predicted_classes(toy_run: Path) -> None:
    topn = run_ablation(toy_run, LAYER, "topn", classes="scene", n="1,4")
    assert topn.ranking.shape == (5, 64) and topn.info["rank_split"] == "train"
    names = [n for n in topn.set_names if n != "baseline"]
    assert names[:4] == ["beach:top1", "beach:keep1", "beach:top4", "beach:keep4"]
    assert [len(u) for u in topn.set_units[1:5]] == [1, 63, 4, 60]
    assert list(topn.set_units[3]) == sorted(topn.ranking[0, :4])
    from dissect.tally import load_dissection

    dissection = load_dissection(toy_run / LAYER)
    best = int(np.argmax(dissection.unit_iou))
    concept = str(dissection.label_names[dissection.unit_label[best]])
    result = run_ablation(toy_run, LAYER, "concept", concept=concept, iou_threshold=0.0)
    assert best in result.set_units[1] and result.set_names == ("baseline", concept)
    with pytest.raises(OptionError, match="unknown concept 'skyy'"):
        run_ablation(toy_run, LAYER, "concept", concept="skyy")
    saved = load_ablation(toy_run / LAYER)
    assert {"topn", "concept"} <= set(saved)
    studies = {r["study"] for r in _csv_rows(toy_run / LAYER / "ablation.csv")}
    assert {"topn", "keep", "concept"} <= studies

    predicted = run_ablation(toy_run, LAYER, "random", classes="predicted", n=[1], repeats=1,
                             save=False)
    recall = predicted.metrics["recall"][0]
    assert np.all(recall[predicted.n > 0] == 1.0)        # the model agrees with itself
    mean_rule = run_ablation(toy_run, LAYER, "random", rule="mean", n=[64], repeats=1,
                             save=False)
    # every unit at its dataset mean: every image gets the same output
    assert mean_rule.counts.predicted[1].max() == mean_rule.counts.n_total


def test_bad_options_are_named(toy_run: Path, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="unknown study 'toppn'"):
        run_ablation(toy_run, LAYER, "toppn")
    with pytest.raises(OptionError, match="set size 65"):
        run_ablation(toy_run, LAYER, "random", n=[65], save=False)
    with pytest.raises(OptionError, match="'x' is not an integer"):
        run_ablation(toy_run, LAYER, "random", n="1,x", save=False)
    with pytest.raises(OptionError, match="split 'test' has no images"):
        run_ablation(toy_run, LAYER, "random", eval_split="test", n=[1], save=False)
    with pytest.raises(OptionError, match="unknown class 'beech'"):
        run_ablation(toy_run, LAYER, "topn", n=[1], target_classes=["beech"], save=False)
    with pytest.raises(LayerError, match="'conv5'"):
        run_ablation(toy_run, "conv5", "single", save=False)
    with pytest.raises(CacheError, match="does not exist"):
        run_ablation(toy_run, "conv2", "single", use_cache=True, save=False)
    with pytest.raises(CacheError, match="run.json"):
        run_ablation(tmp_path, LAYER, "single")
    # a cache recorded with other preprocessing is refused, naming the field
    import json
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(toy_run, copy)
    run_json = json.loads((copy / "run.json").read_text())
    run_json["config"]["mean"] = [0.5, 0.5, 0.5]
    (copy / "run.json").write_text(json.dumps(run_json))
    with pytest.raises(CacheError, match="recorded with another mean"):
        run_ablation(copy, LAYER, "single", save=False)
