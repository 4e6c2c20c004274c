"""End to end: `dissect run` on the toy data, interrupted after recording, then resumed."""

from __future__ import annotations

import json

import pytest

import dissect.run
from dissect.cli import main
from dissect.toy.model import ToyCNN


@pytest.fixture
def count_forwards(monkeypatch):
    """Count forward passes of the toy CNN (the only model these runs use): ``n`` over dataset
    batches, ``probes`` the recorder's one-image input-size probes."""
    calls = {"n": 0, "probes": 0}
    original = ToyCNN.forward

    def counted(self, x):
        calls["probes" if x.shape[0] == 1 else "n"] += 1
        return original(self, x)

    monkeypatch.setattr(ToyCNN, "forward", counted)
    return calls


def run_args(dataset, out):
    return ["run", "--model", "dissect.toy:toy_model", "--layers", "conv3", "conv4",
            "--dataset", str(dataset), "--out", str(out), "--batch-size", "16",
            "--scheduler", "synchronous"]


@pytest.mark.slow
def test_run_interrupted_after_record_resumes_without_recomputing(
        toy_dataset, tmp_path, monkeypatch, count_forwards, capsys):
    out = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(dissect.run, "tally_stage", interrupted)
        assert main(run_args(toy_dataset, out)) == 130
    assert count_forwards["n"] == 3  # 48 images in batches of 16
    caches = {layer: out / "cache" / f"{layer}.h5" for layer in ("conv3", "conv4")}
    before = {layer: (p.stat().st_ino, p.stat().st_mtime_ns) for layer, p in caches.items()}
    assert not (out / "conv3").exists()

    assert main(run_args(toy_dataset, out)) == 0
    assert count_forwards["n"] == 3, "the resumed run ran the model again"
    assert count_forwards["probes"] == 1, "the resumed run probed the model again"
    after = {layer: (p.stat().st_ino, p.stat().st_mtime_ns) for layer, p in caches.items()}
    assert after == before
    for layer in caches:
        assert (out / layer / "tally.csv").is_file() and (out / layer / "dissection.h5").is_file()
    assert (out / "report" / "index.html").is_file()
    assert str(out / "report" / "index.html") in capsys.readouterr().out

    run = json.loads((out / "run.json").read_text())
    assert run["config"]["layers"] == ["conv3", "conv4"]
    assert set(run["stages"]) == {"record", "tally:conv3", "tally:conv4", "report"}
    for stage in run["stages"].values():
        assert stage["wall_s"] >= 0 and stage["peak_rss_mb"] > 0
    assert run["versions"]["torch"] and run["device"] == "cpu"


@pytest.mark.slow
def test_later_commands_read_the_run_and_tally_is_skipped_when_up_to_date(
        toy_dataset, tmp_path, count_forwards, capsys):
    out = tmp_path / "run"
    assert main(["record", "--model", "dissect.toy:toy_model", "--layers", "conv4",
                 "--dataset", str(toy_dataset), "--out", str(out)]) == 0
    assert main(["tally", "--run", str(out), "--scheduler", "synchronous"]) == 0
    first = (out / "conv4" / "tally.csv").stat().st_mtime_ns
    assert main(["tally", "--run", str(out)]) == 0
    assert (out / "conv4" / "tally.csv").stat().st_mtime_ns == first
    assert main(["tally", "--run", str(out), "--quantile", "0.01"]) == 0
    assert (out / "conv4" / "tally.csv").stat().st_mtime_ns != first
    assert json.loads((out / "run.json").read_text())["config"]["quantile"] == 0.01
    assert main(["tally", "--run", str(out), "--layers", "conv9"]) == 2
    assert "'conv9' was not recorded" in capsys.readouterr().err
    assert main(["report", str(out)]) == 0
    assert (out / "report" / "conv4.html").is_file()


def test_a_damaged_dissection_is_computed_again(recorded_run):
    assert main(["tally", "--run", str(recorded_run), "--scheduler", "synchronous"]) == 0
    dissection = recorded_run / "conv4" / "dissection.h5"
    dissection.write_bytes(dissection.read_bytes()[:5000])          # e.g. a full disk
    assert main(["tally", "--run", str(recorded_run), "--scheduler", "synchronous"]) == 0
    from dissect.tally import load_dissection

    assert load_dissection(recorded_run / "conv4").thresholds.shape == (64,)


def test_recording_again_with_force_drops_the_layers_old_results(recorded_run, toy_dataset):
    assert main(["tally", "--run", str(recorded_run), "--scheduler", "synchronous"]) == 0
    derived = ("ablation.csv", "importance.csv", "compositional.csv", "compositional.json",
               "significance.csv", "significance.h5", "ablation.json")
    for name in derived:                    # results of earlier studies of the old cache
        (recorded_run / "conv4" / name).write_text("unit\n")
    assert main(["record", "--model", "dissect.toy:toy_model", "--layers", "conv4",
                 "--dataset", str(toy_dataset), "--out", str(recorded_run), "--force"]) == 0
    assert not any((recorded_run / "conv4").iterdir())      # nothing left to mix with the new
    assert (recorded_run / "conv3" / "dissection.h5").is_file()         # other layers kept
    stages = json.loads((recorded_run / "run.json").read_text())["stages"]
    assert "tally:conv4" not in stages and "tally:conv3" in stages


def test_tally_refuses_a_cache_put_in_place_of_the_recorded_one(recorded_run, capsys):
    import shutil

    cache = recorded_run / "cache"
    shutil.copy(cache / "conv3.h5", cache / "conv4.h5")       # same unit count, other layer
    assert main(["tally", "--run", str(recorded_run), "--layers", "conv4"]) == 2
    err = capsys.readouterr().err
    assert "conv4.h5 is not the cache recorded for layer 'conv4'" in err and "layer" in err
    assert not (recorded_run / "conv4").exists()


def test_a_layer_added_with_other_preprocessing_is_refused(recorded_run, toy_dataset, capsys):
    before = (recorded_run / "run.json").read_text()
    assert main(["record", "--model", "dissect.toy:toy_model", "--layers", "conv2",
                 "--dataset", str(toy_dataset), "--out", str(recorded_run),
                 "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]) == 2
    err = capsys.readouterr().err
    assert "holds layer(s) conv3, conv4 recorded with other mean, std" in err
    assert (recorded_run / "run.json").read_text() == before
    assert not (recorded_run / "cache" / "conv2.h5").exists()
    assert main(["record", "--model", "dissect.toy:toy_model", "--layers", "conv2",
                 "--dataset", str(toy_dataset), "--out", str(recorded_run)]) == 0
    layers = json.loads((recorded_run / "run.json").read_text())["config"]["layers"]
    assert layers == ["conv3", "conv4", "conv2"]


def test_recording_again_keeps_the_runs_tally_options(recorded_run, toy_dataset):
    assert main(["tally", "--run", str(recorded_run), "--quantile", "0.01", "--union", "all",
                 "--scheduler", "synchronous"]) == 0
    assert main(["record", "--model", "dissect.toy:toy_model", "--layers", "conv2",
                 "--dataset", str(toy_dataset), "--out", str(recorded_run),
                 "--batch-size", "16"]) == 0
    config = json.loads((recorded_run / "run.json").read_text())["config"]
    assert (config["quantile"], config["union"], config["scheduler"]) == (0.01, "all",
                                                                          "synchronous")
    assert config["batch_size"] == 16


def test_a_hand_edited_run_json_is_a_clear_error(recorded_run, capsys):
    data = json.loads((recorded_run / "run.json").read_text())
    del data["stages"]
    (recorded_run / "run.json").write_text(json.dumps(data))
    assert main(["tally", "--run", str(recorded_run), "--layers", "conv4",
                 "--scheduler", "synchronous"]) == 0          # no stages yet is fine
    (recorded_run / "run.json").write_text("[]")
    assert main(["report", str(recorded_run)]) == 2
    assert "not a dissect run record" in capsys.readouterr().err


def test_record_into_a_run_of_another_model_is_refused_and_keeps_the_run(
        toy_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["record", "--model", "dissect.toy:toy_model", "--layers", "conv4",
                 "--dataset", str(toy_dataset), "--out", str(out)]) == 0
    before = (out / "run.json").read_text()
    capsys.readouterr()
    assert main(["record", "--model", "dissect.toy:toy_model", "--layers", "conv4",
                 "--dataset", str(toy_dataset), "--out", str(out), "--mean", "0.5,0.5,0.5"]) == 2
    assert "mean" in capsys.readouterr().err
    assert (out / "run.json").read_text() == before


def test_unknown_layer_exits_2_and_points_to_dissect_layers(toy_dataset, tmp_path, capsys):
    assert main(["record", "--model", "dissect.toy:toy_model", "--layers", "conv5",
                 "--dataset", str(toy_dataset), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "conv5" in err and "dissect layers" in err and "conv4" in err


@pytest.fixture
def recorded_run(toy_dataset, tmp_path):
    """A run with conv3 and conv4 recorded on the toy dataset (no tally yet)."""
    out = tmp_path / "run"
    assert main(["record", "--model", "dissect.toy:toy_model", "--layers", "conv3", "conv4",
                 "--dataset", str(toy_dataset), "--out", str(out)]) == 0
    return out


def test_a_copied_run_is_read_and_written_where_it_is(recorded_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(recorded_run, copy)
    original = (recorded_run / "run.json").read_text()
    assert main(["tally", "--run", str(copy), "--quantile", "0.01",
                 "--scheduler", "synchronous"]) == 0
    assert (copy / "conv4" / "tally.csv").is_file()
    assert not (recorded_run / "conv4").exists()
    assert (recorded_run / "run.json").read_text() == original
    assert json.loads((copy / "run.json").read_text())["config"]["quantile"] == 0.01


def test_a_refused_option_is_not_saved(recorded_run, tmp_path, capsys):
    import numpy as np

    before = (recorded_run / "run.json").read_text()
    assert main(["tally", "--run", str(recorded_run), "--scheduler", "bogus"]) == 2
    assert "--scheduler: 'bogus'" in capsys.readouterr().err
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros(3))
    assert main(["tally", "--run", str(recorded_run), "--thresholds", str(bad)]) == 2
    assert "--thresholds" in capsys.readouterr().err
    assert main(["tally", "--run", str(recorded_run), "--layers", "conv4",
                 "--thresholds", str(bad)]) == 2
    assert "--thresholds" in capsys.readouterr().err
    assert (recorded_run / "run.json").read_text() == before
    good = tmp_path / "good.npy"
    np.save(good, np.full(64, 0.5))
    assert main(["tally", "--run", str(recorded_run), "--layers", "conv4",
                 "--thresholds", str(good), "--scheduler", "synchronous"]) == 0
    from dissect.tally import load_dissection

    assert load_dissection(recorded_run / "conv4").thresholds.tolist() == [0.5] * 64
    # a thresholds file is one layer's, for one command: never saved, never reused elsewhere
    assert json.loads((recorded_run / "run.json").read_text())["config"]["thresholds"] is None
    assert main(["tally", "--run", str(recorded_run), "--layers", "conv3",
                 "--scheduler", "synchronous"]) == 0
    assert load_dissection(recorded_run / "conv3").quantile == 0.005
    assert main(["tally", "--run", str(recorded_run), "--scheduler", "synchronous"]) == 0
    assert load_dissection(recorded_run / "conv4").quantile == 0.005      # computed again


def test_tally_refuses_a_dataset_the_cache_was_not_recorded_on(recorded_run, tmp_path, capsys):
    from dissect.toy import generate_toy_dataset

    other = generate_toy_dataset(tmp_path / "other", n_images=48, size=64, seed=1)
    assert main(["tally", "--run", str(recorded_run), "--dataset", str(other)]) == 2
    assert "recorded on another dataset" in capsys.readouterr().err
    assert not (recorded_run / "conv3").exists()


def test_run_takes_its_options_from_a_config_file(toy_dataset, tmp_path, count_forwards):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": "dissect.toy:toy_model", "layers": ["conv4"],
                                  "dataset": str(toy_dataset), "batch_size": 12,
                                  "scheduler": "synchronous"}))
    out = tmp_path / "run"
    assert main(["run", "--config", str(config), "--out", str(out)]) == 0
    assert count_forwards["n"] == 4  # 48 images in batches of 12
    saved = json.loads((out / "run.json").read_text())["config"]
    assert saved["batch_size"] == 12 and saved["layers"] == ["conv4"]
    config.write_text(json.dumps(["not", "an", "object"]))
    assert main(["run", "--config", str(config), "--out", str(out)]) == 2
    config.write_text(json.dumps({"model": "m", "layers": ["a"], "dataset": "d",
                                  "mean": "abc"}))
    assert main(["run", "--config", str(config), "--out", str(out)]) == 2


def test_an_unusable_output_path_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["dataset", "toy", "--out", str(blocker / "toy"), "--n-images", "8",
                 "--size", "32"]) == 2
    assert capsys.readouterr().err.startswith("dissect: error:")


def test_record_options_reach_the_recorder(toy_dataset, tmp_path):
    from dissect.record import open_cache

    out = tmp_path / "run"
    assert main(["record", "--model", "dissect.toy:toy_model", "--layers", "conv4",
                 "--dataset", str(toy_dataset), "--out", str(out), "--dtype", "float32",
                 "--autocast", "bfloat16", "--channels-last", "--batch-size", "24"]) == 0
    info = open_cache(out / "cache" / "conv4.h5")
    assert info.fingerprint["dtype"] == "float32" and info.fingerprint["autocast"] == "bfloat16"
    config = json.loads((out / "run.json").read_text())["config"]
    assert (config["autocast"], config["channels_last"], config["batch_size"]) == (
        "bfloat16", True, 24)


def test_tally_with_a_category_selection_uses_the_recorded_cache(recorded_run):
    import csv

    assert main(["tally", "--run", str(recorded_run), "--layers", "conv4", "--categories",
                 "object", "part", "--scheduler", "synchronous"]) == 0
    with open(recorded_run / "conv4" / "tally.csv") as handle:
        header = next(csv.reader(handle))
    assert header[:4] == ["unit", "category", "label", "score"]
    assert [c for c in header[4:] if c.endswith("-label")] == ["object-label", "part-label"]


def test_ablate_goes_through_the_orchestrator_and_warns_at_chance(recorded_run, capsys):
    """`dissect ablate` records its stage and options in run.json like `tally`; an untrained
    model is at chance on the scene labels, which says the class order may be wrong."""
    assert main(["tally", "--run", str(recorded_run), "--scheduler", "synchronous"]) == 0
    capsys.readouterr()
    assert main(["ablate", "--run", str(recorded_run), "--layers", "conv4", "--study", "random",
                 "--classes", "scene", "--n", "2", "--repeats", "1", "--eval-split", "all",
                 "--scheduler", "synchronous"]) == 0
    captured = capsys.readouterr()
    assert "random study written to" in captured.out
    import csv

    with open(recorded_run / "conv4" / "ablation.csv") as handle:
        baseline = [row for row in csv.DictReader(handle) if row["set"] == "baseline"]
    n = sum(int(row["n"]) for row in baseline)
    accuracy = sum(float(row["recall"]) * int(row["n"]) for row in baseline) / n
    warned = "at or below chance" in captured.err
    assert warned == (accuracy <= 1 / 5)
    meta = json.loads((recorded_run / "conv4" / "ablation.json").read_text())
    assert ("warning" in meta["random"]) == warned
    assert meta["random"]["classes"] == "scene"
    run = json.loads((recorded_run / "run.json").read_text())
    record = run["stages"]["ablate:conv4"]
    assert record["studies"] == ["random"] and record["options"]["classes"] == "scene"
    assert record["wall_s"] > 0
    assert run["config"]["ablation_studies"] == ["random"] and run["config"]["n"] == [2]


def test_class_order_warning_at_and_above_chance():
    import numpy as np

    from dissect.ablation.metrics import ClassCounts
    from dissect.ablation.result import AblationResult
    from dissect.ablation.runner import class_order_warning

    def result(true_positive):
        n_true = np.array([4, 4, 2])
        counts = ClassCounts(np.array([true_positive]), np.array([[4, 4, 2]]),
                             np.zeros((1, 3)), n_true, 10)
        return AblationResult("l", "single", ("a", "b", "c"), ("single",), ("baseline",),
                              (np.zeros(0, np.int64),), counts)

    # 3 of 10 right is at or below chance (1/3): warned, naming the flag
    assert "--class-names" in class_order_warning(result([1, 1, 1]), 3, "scene")
    assert class_order_warning(result([2, 1, 1]), 3, "scene") is None         # 4 of 10
    assert class_order_warning(result([0, 0, 0]), 3, "predicted") is None


@pytest.mark.filterwarnings("ignore::dissect.ablation.runner.ClassOrderWarning")  # untrained
def test_run_with_ablate_uses_the_class_names_file(toy_dataset, tmp_path):
    from dissect.ablation import load_ablation
    from dissect.toy import TOY_SCENES

    names = tmp_path / "outputs.txt"
    order = list(reversed(TOY_SCENES))
    names.write_text("\n".join(order) + "\n")
    out = tmp_path / "run"
    assert main(run_args(toy_dataset, out)[:4] + ["conv4"] + run_args(toy_dataset, out)[6:]
                + ["--ablate", "--study", "random", "--classes", "scene", "--class-names",
                   str(names), "--n", "2", "--repeats", "1", "--eval-split", "all"]) == 0
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["class_names"] == str(names.resolve())
    assert load_ablation(out / "conv4")["random"].class_names == tuple(order)
