"""Tests of dissect.report.compare: runs side by side on hand-made dissections with known labels.

Each run is a run.json plus a ``DissectionResult`` built from hand-made counts (3 units, labels
red/blue (color) and dog/cat (object)), so every detector, concept and agreement is known.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dissect.errors import CacheError, OptionError
from dissect.report import compare

LAYER = "layer1"
NAMES = ["-", "red", "blue", "dog", "cat"]
PRIMARY = np.array([-1, 0, 0, 1, 1])


def write_run(root: Path, dataset: Path, labels: list[int], *, model: str = "tests:Net",
              layers: tuple[str, ...] = (LAYER,)) -> Path:
    """A run whose unit u has label ``labels[u]`` (0: none) with IoU 5 / 15 = 1/3: label area
    10, activation area 10, intersection 5 with its label and 0 elsewhere."""
    from dissect.dissection import DissectionResult
    from dissect.run import RunConfig, write_run_json
    from dissect.stats import IoUCounts

    n_units = len(labels)
    intersection = np.zeros((n_units, len(NAMES)), dtype=np.int64)
    for u, label in enumerate(labels):
        if label:
            intersection[u, label] = 5
    counts = IoUCounts(np.array([0, 10, 10, 10, 10], dtype=np.int64), intersection,
                       np.full((n_units, 2), 10, dtype=np.int64))
    config = RunConfig(model=model, layers=layers, dataset=str(dataset), out=str(root))
    write_run_json(config)
    for layer in layers:
        result = DissectionResult.from_counts(layer, ("color", "object"), np.zeros(n_units),
                                              counts, NAMES, PRIMARY, iou_threshold=0.04)
        result.save(root / layer)
    return root


@pytest.fixture()
def two_runs(toy_dataset: Path, tmp_path: Path) -> tuple[Path, Path]:
    # A: red, dog, none, red;  B: red, cat, blue, none
    a = write_run(tmp_path / "trained", toy_dataset, [1, 3, 0, 1])
    b = write_run(tmp_path / "random", toy_dataset, [1, 4, 2, 0])
    return a, b


def test_compare_data_counts_changes_and_agreement(two_runs: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    index = compare.compare_runs(list(two_runs), tmp_path / "cmp")
    data = json.loads((index.parent / "compare.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["trained", "random"]
    assert data["categories"] == ["color", "object"]
    trained, random = data["rows"]
    assert trained["detectors"] == [{"category": "color", "units": 2, "concepts": 1},
                                    {"category": "object", "units": 1, "concepts": 1}]
    assert (trained["n_detectors"], trained["n_concepts"]) == (3, 2)
    assert random["detectors"] == [{"category": "color", "units": 2, "concepts": 2},
                                   {"category": "object", "units": 1, "concepts": 1}]
    assert (random["n_detectors"], random["n_concepts"]) == (3, 3)
    layer_change, all_change = data["changes"]
    assert layer_change == {"run": "random", "layer": LAYER, "gained": ["blue", "cat"],
                            "lost": ["dog"], "kept": 1}
    assert all_change["layer"] == "all layers" and all_change["gained"] == ["blue", "cat"]
    (agreement,) = data["agreement"]
    assert agreement["n_units"] == 4
    assert agreement["both_detectors"] == 2 and agreement["same_label"] == 1   # units 0, 1
    assert [(r["unit"], r["tally_unit"], r["label_a"], r["label_b"], r["same"])
            for r in agreement["rows"]] == [(0, 1, "red", "red", True), (1, 2, "dog", "cat", False),
                                            (2, 3, "-", "blue", False),
                                            (3, 4, "red", "-", False)]
    assert agreement["rows"][0]["iou_a"] == round(1 / 3, 6)
    text = index.read_text()
    assert "1 of 2 units that detect a concept in both runs have the same label" in text
    assert "<td>blue, cat</td><td>dog</td>" in text
    assert text.count("<svg") == 2 and "https://" not in text


def test_compare_agreement_needs_the_same_model(toy_dataset: Path, tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", toy_dataset, [1, 3])
    b = write_run(tmp_path / "b", toy_dataset, [1, 3], model="tests:OtherNet")
    runs = [compare.summarize_run(a, "a"), compare.summarize_run(b, "b")]
    data = compare.compare_data(runs)
    assert data["agreement"] == []
    assert data["changes"][0]["gained"] == [] and data["changes"][0]["kept"] == 2


def test_compare_refuses_different_datasets(toy_dataset: Path, tmp_path: Path) -> None:
    other = tmp_path / "other_dataset"
    shutil.copytree(toy_dataset, other)
    a = write_run(tmp_path / "a", toy_dataset, [1, 3])
    same = write_run(tmp_path / "same", other, [1, 4])
    compare.compare_runs([a, same], tmp_path / "ok")            # a byte-identical copy is fine
    label_csv = other / "label.csv"
    label_csv.write_text(label_csv.read_text().replace("red", "crimson", 1))
    with pytest.raises(OptionError) as error:
        compare.compare_runs([a, same], tmp_path / "refused")
    message = str(error.value)
    assert str(toy_dataset) in message and str(other) in message and "same dataset" in message
    assert not (tmp_path / "refused").exists()


def test_compare_needs_two_dissected_runs(toy_dataset: Path, tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", toy_dataset, [1])
    with pytest.raises(OptionError, match="at least two"):
        compare.compare_runs([a], tmp_path / "out")
    empty = tmp_path / "empty"
    write_run(empty, toy_dataset, [1])
    shutil.rmtree(empty / LAYER)
    with pytest.raises(CacheError, match="no layer has been dissected"):
        compare.compare_runs([a, empty], tmp_path / "out")
    with pytest.raises(CacheError, match="run.json"):
        compare.compare_runs([a, tmp_path / "missing"], tmp_path / "out")


def test_same_directory_names_get_distinct_run_names(toy_dataset: Path, tmp_path: Path) -> None:
    a = write_run(tmp_path / "x" / "run", toy_dataset, [1])
    b = write_run(tmp_path / "y" / "run", toy_dataset, [2])
    data = json.loads((compare.compare_runs([a, b], tmp_path / "o").parent /
                       "compare.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["run", "run#2"]


def test_compare_command_writes_the_page_and_refuses_one_run(two_runs: tuple[Path, Path],
                                                             tmp_path: Path, capsys) -> None:
    from dissect.cli import main

    assert main(["compare", *map(str, two_runs), "--out", str(tmp_path / "page")]) == 0
    assert str(tmp_path / "page" / "index.html") in capsys.readouterr().out
    data = json.loads((tmp_path / "page" / "compare.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["trained", "random"]
    assert main(["compare", str(two_runs[0]), "--out", str(tmp_path / "one")]) == 2
    assert "at least two" in capsys.readouterr().err
