"""Runs side by side: ``compare_runs(run_dirs, out_dir)`` writes a static page comparing the
dissections of several runs on the same dataset (trained against random weights, two
architectures, one layer across checkpoints: the comparison of the Network Dissection paper).

The page (``out_dir/index.html``, data model in ``out_dir/compare.json``) shows per run, layer and
category the detector units and unique concepts (a table and bar charts across runs), the concepts
each run gains and loses against the first run, and for runs of the same model spec the label
agreement of every unit of a layer both dissected. Units are 0-based (tally.csv numbers them
from 1).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dissect.errors import CacheError, OptionError
from dissect.report import data as report_data
from dissect.rundir import RunDir

#: Files whose bytes identify a dataset (two copies of one dataset compare equal).
DATASET_FILES = ("index.csv", "category.csv", "label.csv")


def dataset_identity(dataset: str) -> tuple[str, tuple[str, ...] | None]:
    """(resolved path, SHA-256 of :data:`DATASET_FILES` or None when one is missing)."""
    root = Path(dataset).expanduser()
    resolved = str(root.resolve()) if dataset else ""
    digests = []
    for name in DATASET_FILES:
        path = root / name
        if not path.is_file():
            return resolved, None
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    return resolved, tuple(digests)


def check_same_dataset(runs: Sequence[dict[str, Any]]) -> None:
    """Refuse runs on different datasets: each must have the first run's dataset path, or a copy
    of it (the same index.csv, category.csv and label.csv bytes).

    Raises
    ------
    OptionError naming both runs and both datasets.
    """
    first = runs[0]
    path0, digest0 = dataset_identity(first["dataset"])
    for run in runs[1:]:
        path, digest = dataset_identity(run["dataset"])
        if path == path0 or (digest is not None and digest == digest0):
            continue
        raise OptionError(
            f"runs to compare must use the same dataset: {run['path']} was dissected on "
            f"{run['dataset']!r} but {first['path']} on {first['dataset']!r}; their index.csv, "
            "category.csv and label.csv differ")


def summarize_layer(result: Any) -> dict[str, Any]:
    """One layer of one run: ``{"layer", "n_units", "categories", "detectors": [{"category",
    "units", "concepts"}], "n_detectors", "n_concepts", "concepts": sorted detected label names,
    "unit_labels": (U,) names ('-' without a label), "unit_ious", "unit_detector"}``."""
    categories = [str(c) for c in result.categories]
    names = [str(x) for x in list(result.label_names)]
    unit_label = np.asarray(result.unit_label, dtype=np.int64)
    unit_iou = np.asarray(result.unit_iou, dtype=np.float64)
    unit_category = [str(c) for c in list(result.unit_category)]
    detectors = report_data.detector_mask(unit_iou, unit_label, float(result.iou_threshold))
    labels = [names[lab] if 0 < lab < len(names) and unit_iou[u] > 0 else "-"
              for u, lab in enumerate(unit_label.tolist())]
    return {
        "layer": str(result.layer), "n_units": int(unit_label.shape[0]),
        "iou_threshold": report_data.round_float(result.iou_threshold),
        "categories": categories,
        "detectors": report_data.detector_counts(unit_label, unit_category, detectors, categories),
        "n_detectors": int(detectors.sum()),
        "n_concepts": int(np.unique(unit_label[detectors]).size),
        "concepts": sorted({labels[u] for u in np.flatnonzero(detectors)}),
        "unit_labels": labels,
        "unit_ious": [report_data.round_float(v) for v in unit_iou],
        "unit_detector": [bool(d) for d in detectors],
    }


def summarize_run(run_dir: Path, name: str) -> dict[str, Any]:
    """A run's record and the summary of every dissected layer (:func:`summarize_layer`).

    Raises CacheError when run.json is missing or no layer is dissected.
    """
    from dissect.tally import load_dissection

    run_dir = Path(run_dir)
    paths = RunDir(run_dir)
    config = report_data.read_run_record(run_dir).get("config", {})
    layers = []
    for layer in [str(x) for x in config.get("layers") or []]:
        if paths.dissection(layer).exists():
            layers.append(summarize_layer(load_dissection(paths.layer_dir(layer))))
    if not layers:
        raise CacheError(f"{run_dir}: no layer has been dissected; run `dissect tally --run "
                         f"{run_dir}` before comparing it")
    return {"name": name, "path": str(run_dir), "model": str(config.get("model", "")),
            "weights": None if config.get("weights") is None else str(config["weights"]),
            "dataset": str(config.get("dataset", "")), "layers": layers}


def concept_changes(reference: Sequence[str], other: Sequence[str]) -> dict[str, Any]:
    """Concepts gained (detected in ``other`` only), lost (in ``reference`` only) and kept."""
    a, b = set(reference), set(other)
    return {"gained": sorted(b - a), "lost": sorted(a - b), "kept": len(a & b)}


def label_agreement(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Unit-by-unit labels of one layer in two runs of the same model.

    Returns
    -------
    ``{"n_units", "both_detectors", "same_label" (among units detecting in both), "rows":
    [{"unit", "tally_unit", "label_a", "iou_a", "detector_a", "label_b", "iou_b", "detector_b",
    "same"}]}``; rows for the units that are detectors in either run, in unit order.
    """
    rows = []
    both = same = 0
    for u in range(a["n_units"]):
        da, db = a["unit_detector"][u], b["unit_detector"][u]
        if not (da or db):
            continue
        match = da and db and a["unit_labels"][u] == b["unit_labels"][u]
        both += int(da and db)
        same += int(match)
        rows.append({"unit": u, "tally_unit": u + 1, "label_a": a["unit_labels"][u],
                     "iou_a": a["unit_ious"][u], "detector_a": da,
                     "label_b": b["unit_labels"][u], "iou_b": b["unit_ious"][u],
                     "detector_b": db, "same": bool(match)})
    return {"n_units": a["n_units"], "both_detectors": both, "same_label": same, "rows": rows}


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for path in paths:
        base = path.resolve().name or str(path)
        name, k = base, 2
        while name in names:
            name, k = f"{base}#{k}", k + 1
        names.append(name)
    return names


def compare_data(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The comparison's data model from :func:`summarize_run` summaries (the first run is the
    reference of the gained/lost and agreement sections).

    Returns
    -------
    ``{"dataset", "runs": [{"name", "path", "model", "weights"}], "categories", "rows": [{"run",
    "layer", "n_units", "detectors", "n_detectors", "n_concepts"}], "changes": [{"run", "layer",
    "gained", "lost", "kept"}] (per layer both runs dissected, then "all layers" as the union),
    "agreement": [{"run", "layer", ...label_agreement}] (same model spec, same layer and units)}``.
    """
    reference = runs[0]
    categories: list[str] = []
    rows = []
    for run in runs:
        for layer in run["layers"]:
            for c in layer["categories"]:
                if c not in categories:
                    categories.append(c)
            rows.append({"run": run["name"], "layer": layer["layer"], "n_units": layer["n_units"],
                         "detectors": layer["detectors"], "n_detectors": layer["n_detectors"],
                         "n_concepts": layer["n_concepts"]})
    changes = []
    agreement = []
    ref_layers = {layer["layer"]: layer for layer in reference["layers"]}
    for run in runs[1:]:
        for layer in run["layers"]:
            ref = ref_layers.get(layer["layer"])
            if ref is None:
                continue
            changes.append({"run": run["name"], "layer": layer["layer"],
                            **concept_changes(ref["concepts"], layer["concepts"])})
            if run["model"] == reference["model"] and ref["n_units"] == layer["n_units"]:
                agreement.append({"run": run["name"], "layer": layer["layer"],
                                  **label_agreement(ref, layer)})
        union_ref = sorted({c for layer in reference["layers"] for c in layer["concepts"]})
        union = sorted({c for layer in run["layers"] for c in layer["concepts"]})
        changes.append({"run": run["name"], "layer": "all layers",
                        **concept_changes(union_ref, union)})
    return {
        "schema_version": 1, "dataset": reference["dataset"], "reference": reference["name"],
        "runs": [{"name": r["name"], "path": r["path"], "model": r["model"],
                  "weights": r["weights"]} for r in runs],
        "categories": categories, "rows": rows, "changes": changes, "agreement": agreement,
    }


def compare_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write a static page comparing runs on one dataset; return its ``index.html``.

    Parameters
    ----------
    run_dirs : two or more run directories (each with run.json and at least one dissected layer)
    out_dir : output directory (``index.html``, ``compare.json``)

    Raises
    ------
    OptionError
        For fewer than two runs, or runs on different datasets (the message names both).
    CacheError
        When a run directory has no run.json or no dissected layer.
    """
    from dissect.report.render import (
        _write_text,
        category_colors,
        layers_chart,
        make_environment,
    )

    paths = [Path(p) for p in run_dirs]
    if len(paths) < 2:
        raise OptionError(f"compare needs at least two run directories; got {len(paths)}")
    names = _unique_names(paths)
    runs = [summarize_run(path, name) for path, name in zip(paths, names)]
    check_same_dataset(runs)
    data = compare_data(runs)
    colors = category_colors(data["categories"])
    columns = [{"name": f"{r['run']}: {r['layer']}", "detectors": r["detectors"],
                "n_detectors": r["n_detectors"], "n_concepts": r["n_concepts"]}
               for r in data["rows"]]
    view = {"colors": colors, "detectors_chart": layers_chart(columns, colors),
            "concepts_chart": layers_chart(columns, colors, key="concepts")}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "compare.json",
                json.dumps(data, sort_keys=True, indent=1, ensure_ascii=True) + "\n")
    index = out / "index.html"
    _write_text(index, make_environment().get_template("compare.html").render(data=data,
                                                                              view=view))
    return index


__all__ = ["check_same_dataset", "compare_data", "compare_runs", "concept_changes",
           "dataset_identity", "label_agreement", "summarize_layer", "summarize_run"]
