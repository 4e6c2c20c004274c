"""The report's class concept profiles: a class's gradient-credited concepts beside the units
whose single-unit ablation hurts it most, from hand-made files with known numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dissect.errors import CacheError
from dissect.report.data import class_profiles
from dissect.rundir import RunDir

COLUMNS = ["study", "set", "units", "class", "n", "accuracy", "balanced_accuracy", "precision",
           "recall", "true_class_prob"]


def _ablation(path: Path, recalls: dict[str, dict[str, float]]) -> None:
    """A single study: ``recalls[class][units]`` with units '' for the baseline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for name, by_units in recalls.items():
            for units, recall in by_units.items():
                writer.writerow(["single", "baseline" if units == "" else "s" + units, units,
                                 name, 4, 0.5, 0.5, 0.5, recall, 0.3])


def _profile(run: RunDir, name: str, layer: str, target_name: str,
             concepts: list[tuple[str, float, float]]) -> None:
    run.class_profiles_dir.mkdir(parents=True, exist_ok=True)
    (run.class_profiles_dir / f"{name}.json").write_text(json.dumps({
        "target": 3, "target_name": target_name, "n_images": 7, "layer": layer,
        "method": "grad_x_act", "selection": "true",
        "concepts": [{"label": label, "category": "object", "contribution": value,
                      "share": share, "units": [0]} for label, value, share in concepts],
        "unlabeled": {"contribution": 0.1, "share": 0.25, "units": [2]}}))


def test_profiles_sit_beside_the_units_whose_removal_hurts_the_class(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    _ablation(run.ablation_csv("conv4"), {
        "kitchen": {"": 1.0, "0": 0.5, "1": 0.75, "2": 1.0, "3": 1.25},
        "beach": {"": 0.5, "0": 0.0}})
    _profile(run, "class_kitchen", "conv4", "kitchen",
             [("oven", 2.0, 0.5), ("sink", 1.0, 0.25), ("sky", -1.0, -0.25)])
    _profile(run, "other_layer", "conv3", "kitchen", [("oven", 1.0, 1.0)])
    from dissect.report.data import read_ablation_csv
    from dissect.report.studies import ablation_records, single_drops

    records = ablation_records(read_ablation_csv(run.ablation_csv("conv4")), 4, "recall")
    profiles = class_profiles(tmp_path, "conv4", ["oven", "tile", "", "sky"],
                              single_drops(records))
    assert profiles == [{
        "class": "kitchen", "n_images": 7, "selection": "true", "method": "grad_x_act",
        "concepts": [{"label": "oven", "share": 0.5}, {"label": "sink", "share": 0.25}],
        "unlabeled_share": 0.25,
        # drops 0.5 (unit 0) and 0.25 (unit 1); unit 2 does not hurt, unit 3 helps
        "hurt": [{"unit": 0, "label": "oven", "drop": 0.5},
                 {"unit": 1, "label": "tile", "drop": 0.25}],
        "both": ["oven"]}]


def test_without_an_ablation_a_profile_has_no_units_and_a_bad_file_is_named(
        tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert class_profiles(tmp_path, "conv4", ["a"]) == []
    _profile(run, "k", "conv4", "kitchen", [("oven", 2.0, 1.0)])
    assert class_profiles(tmp_path, "conv4", ["oven"])[0]["hurt"] == []
    (run.class_profiles_dir / "broken.json").write_text('{"layer": "conv4"}')
    with pytest.raises(CacheError, match="broken.json"):
        class_profiles(tmp_path, "conv4", ["oven"])


@pytest.mark.filterwarnings("ignore::dissect.record.recorder.SmallMapsWarning")  # 'head' is 1x1
def test_the_layer_page_states_how_token_outputs_became_unit_maps(toy_dataset: Path,
                                                                   tmp_path: Path) -> None:
    import torch

    from dissect.data import IMAGENET_MEAN, IMAGENET_STD, BrodenDataset
    from dissect.record import record_activations
    from dissect.report.data import unit_layout_text
    from tests.test_ablation import tiny_token_model

    torch.manual_seed(0)
    record_activations(tiny_token_model(), BrodenDataset(toy_dataset), ["mlp", "head"], tmp_path,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size=24, progress=False)
    # 64x64 toy images, 2x2 patches: 32x32 patch tokens after one class token, 6 channels
    assert unit_layout_text(tmp_path, "mlp") == (
        "tokens: output (1025x6) per image -> 6 units of 32x32 maps (1 leading class/register "
        "token left out)")
    assert unit_layout_text(tmp_path, "head") == "flat: output (2) per image -> 2 units of 1x1 maps"
