"""`dissect explain` through the orchestrator (dissect.run.explain_stage): the files it writes
agree with the explain API on the same preprocessed images, image files and dataset images are
preprocessed alike, a class profile is the mean over the class's images, and bad input exits 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dissect.cli import main

LAYER = "conv4"


@pytest.fixture(scope="module")
def explain_run(toy_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with conv4 recorded and tallied (toy model, random weights)."""
    from dissect.run import RunConfig, record_stage, tally_stage

    run_dir = tmp_path_factory.mktemp("explain_run") / "run"
    config = RunConfig(model="dissect.toy:toy_model", layers=(LAYER,), dataset=str(toy_dataset),
                       out=str(run_dir), batch_size=16, device="cpu",
                       scheduler="synchronous")
    record_stage(config, progress=False)
    tally_stage(config)
    return run_dir


def _api_explanations(run_dir: Path, indices: list[int], target: int | None = None):
    """The explain API on dataset images ``indices``, preprocessed as the run records them."""
    import torch

    from dissect.data import BrodenDataset, image_tensor
    from dissect.explain import explain_prediction
    from dissect.record import load_model
    from dissect.rundir import RunDir
    from dissect.tally import load_dissection

    run = RunDir(run_dir)
    config = run.config()
    dataset = BrodenDataset(config.dataset)
    images = torch.stack([image_tensor(dataset.load_image(i), config.mean, config.std,
                                       tuple(dataset.image_size)) for i in indices])
    model = load_model(config.model, config.weights, config.num_classes).eval()
    return explain_prediction(model, LAYER, images, load_dissection(run.layer_dir(LAYER)),
                              target, top_k=2)


def test_dataset_images_agree_with_the_api_and_add_up_to_the_logit(explain_run: Path) -> None:
    assert main(["explain", "--run", str(explain_run), "--layer", LAYER, "--dataset-images",
                 "3", "--attributions", "saliency", "--top-k", "2", "--name", "three"]) == 0
    records = json.loads((explain_run / "explain" / "three.json").read_text())
    assert [r["image"] for r in records] == ["toy/000000.png", "toy/000024.png",
                                             "toy/000047.png"]
    expected = _api_explanations(explain_run, [0, 24, 47])
    for record, want in zip(records, expected):
        got = np.array([u["contribution"] for u in record["units"]])
        assert record["target"] == want.target
        np.testing.assert_allclose(got, want.contributions, rtol=1e-5, atol=1e-7)
        # A pooled linear head: the contributions and the bias make up the logit exactly.
        assert record["bias"] is not None
        assert abs(got.sum() + record["bias"] - record["logit"]) <= 1e-4 * max(
            1.0, abs(record["logit"]))
        kinds = [m["kind"] for m in record["maps"]]
        assert kinds.count("concept") == min(2, len(record["concepts"]))
        assert {"image", "gradcam", "saliency"} <= set(kinds)
        for entry in record["maps"]:
            assert (explain_run / "explain" / entry["path"]).is_file()
    stages = json.loads((explain_run / "run.json").read_text())["stages"]
    assert stages["explain:three"]["explain"] == {"layer": LAYER, "images": 3}


def test_an_image_file_is_preprocessed_as_the_dataset_image(explain_run: Path,
                                                            tmp_path: Path) -> None:
    from dissect.rundir import RunDir

    source = Path(RunDir(explain_run).config().dataset) / "images" / "toy" / "000000.png"
    copy = tmp_path / "mine.png"
    shutil.copyfile(source, copy)
    for args in (["--images", str(copy), "--name", "file"],
                 ["--dataset-images", "1", "--name", "row"]):
        assert main(["explain", "--run", str(explain_run), "--layer", LAYER, "--target", "2",
                     "--attributions", "none", *args]) == 0
    file_record, = json.loads((explain_run / "explain" / "file.json").read_text())
    row_record, = json.loads((explain_run / "explain" / "row.json").read_text())
    assert file_record["image"] == str(copy) and file_record["target"] == 2
    assert file_record["units"] == row_record["units"]
    assert file_record["logit"] == row_record["logit"]
    assert [m["kind"] for m in file_record["maps"] if m["kind"] in ("saliency", "ig")] == []


def test_a_class_profile_is_the_mean_over_the_class_images(explain_run: Path) -> None:
    from dissect.data import BrodenDataset
    from dissect.rundir import RunDir

    assert main(["explain", "--run", str(explain_run), "--layer", LAYER, "--class",
                 "forest"]) == 0
    profile = json.loads((explain_run / "explain" / "classes" / "class_forest.json")
                         .read_text())
    dataset = BrodenDataset(RunDir(explain_run).config().dataset)
    scene = dataset.image_level_labels("scene")
    forest = dataset.vocab.names.index("forest")
    members = [i for i, labels in enumerate(scene) if forest in set(map(int, labels))]
    index = profile["target"]
    assert profile["target_name"] == "forest" and profile["n_images"] == len(members) > 0
    per_image = _api_explanations(explain_run, members, target=index)
    mean = np.mean([e.contributions for e in per_image], axis=0)
    np.testing.assert_allclose(profile["mean_contributions"], mean, rtol=1e-5, atol=1e-7)
    # The class profile is not an image set: the report does not read it as one.
    assert not (explain_run / "explain" / "class_forest.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--layer", "conv9", "--dataset-images", "2"], "not a layer of the run"),
    (["--layer", LAYER, "--class", "zebra"], "class 'zebra' is not a model output"),
    (["--layer", LAYER, "--class", "99"], "class 99 is not a model output"),
    (["--layer", LAYER, "--images", "/nonexistent/x.png"], "/nonexistent/x.png"),
    (["--layer", LAYER, "--dataset-images", "0"], "--dataset-images"),
    (["--layer", LAYER, "--dataset-images", "2", "--top-k", "-1"], "--top-k"),
])
def test_bad_input_exits_2_with_one_message(explain_run: Path, capsys, args, message) -> None:
    assert main(["explain", "--run", str(explain_run), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dissect: error:") and message in err


def test_two_sources_or_an_unknown_attribution_are_usage_errors(explain_run: Path) -> None:
    for args in (["--dataset-images", "2", "--class", "1"],
                 ["--dataset-images", "2", "--attributions", "gradients"]):
        with pytest.raises(SystemExit) as stop:
            main(["explain", "--run", str(explain_run), "--layer", LAYER, *args])
        assert stop.value.code == 2


def test_an_untallied_layer_says_to_tally_first(toy_dataset: Path, tmp_path: Path,
                                                capsys) -> None:
    from dissect.run import RunConfig, record_stage

    config = RunConfig(model="dissect.toy:toy_model", layers=("conv3",),
                       dataset=str(toy_dataset), out=str(tmp_path / "run"), batch_size=24,
                       device="cpu")
    record_stage(config, progress=False)
    assert main(["explain", "--run", str(tmp_path / "run"), "--layer", "conv3",
                 "--dataset-images", "1"]) == 2
    assert "dissect tally" in capsys.readouterr().err


def test_input_maps_do_not_depend_on_the_batch_size(explain_run: Path) -> None:
    for batch, name in ((1, "one"), (3, "three_at_once")):
        assert main(["explain", "--run", str(explain_run), "--layer", LAYER, "--dataset-images",
                     "3", "--attributions", "saliency", "--batch-size", str(batch),
                     "--name", name, "--top-k", "0"]) == 0
    for i in range(3):
        a = (explain_run / "explain" / "one" / f"{i}_saliency.png").read_bytes()
        b = (explain_run / "explain" / "three_at_once" / f"{i}_saliency.png").read_bytes()
        assert a == b


def test_an_image_file_that_is_not_an_image_is_named(explain_run: Path, tmp_path: Path,
                                                      capsys) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(["explain", "--run", str(explain_run), "--layer", LAYER, "--images",
                 str(bad)]) == 2
    assert f"{bad} cannot be read as an image" in capsys.readouterr().err
