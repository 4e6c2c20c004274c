"""One unit is one row in every output of a run: tally.csv counts units from 1 (NetDissect-Lite's
format), every other file, the report and the API from 0 (the channel index)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from dissect.cli import main

LAYER = "conv4"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_same_unit_is_the_same_row_in_every_output(toy_dataset: Path,
                                                        tmp_path: Path) -> None:
    from dissect.tally import load_dissection

    run = tmp_path / "run"
    assert main(["run", "--model", "dissect.toy:toy_model", "--layers", LAYER, "--dataset",
                 str(toy_dataset), "--run", str(run), "--batch-size", "24", "--scheduler",
                 "synchronous", "--compose", "--max-length", "2", "--significance",
                 "--permutations", "9", "--ablate", "--study", "single", "--classes",
                 "predicted", "--eval-split", "all", "--quiet"]) == 0
    assert main(["explain", "--run", str(run), "--layer", LAYER, "--dataset-images", "1",
                 "--attributions", "none"]) == 0
    dissection = load_dissection(run / LAYER)
    n = dissection.n_units
    names = dissection.label_names
    label = {u: names[int(dissection.unit_label[u])] if dissection.unit_label[u] > 0 else ""
             for u in range(n)}
    iou = {u: float(dissection.unit_iou[u]) for u in range(n)}
    assert len(set(label.values())) > 3, "too few distinct labels to tell units apart"

    tally = {int(r["unit"]) - 1: r for r in _rows(run / LAYER / "tally.csv")}
    assert sorted(tally) == list(range(n))
    significance = {int(r["unit"]): r for r in _rows(run / LAYER / "significance.csv")}
    compositional = {int(r["unit"]): r for r in _rows(run / LAYER / "compositional.csv")}
    importance = {int(r["unit"]): r for r in _rows(run / LAYER / "importance.csv")}
    single = _rows(run / LAYER / "ablation.csv")
    report = {u["unit"]: u for u in json.loads((run / "report" / "report.json").read_text())
              ["layers"][0]["units"]}
    explained = {u["unit"]: u for u in json.loads((run / "explain" / "dataset.json")
                                                  .read_text())[0]["units"]}
    assert sorted(significance) == sorted(compositional) == sorted(report) == \
        sorted(explained) == list(range(n))
    assert importance and set(importance) <= set(range(n))
    ablated = {int(r["units"]) for r in single if r["set"] != "baseline"}
    assert ablated == set(range(n))
    for u in range(n):
        assert tally[u]["label"] == label[u]
        assert abs(float(tally[u]["score"]) - iou[u]) < 1e-12
        assert significance[u]["label"] == label[u]
        assert report[u]["label"] == label[u] and report[u]["tally_unit"] == u + 1
        assert (explained[u]["label"] or "") == label[u]
        assert abs(explained[u]["iou"] - iou[u]) < 1e-12
        if u in importance:
            assert importance[u]["label"] == label[u]
