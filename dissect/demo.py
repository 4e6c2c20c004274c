"""`dissect demo`: the whole job on the embedded toy dataset and toy model."""

from __future__ import annotations

import os
from pathlib import Path

from dissect.run import RunConfig, run_pipeline


def run_demo(out: str | os.PathLike[str] = "reports/demo",
             datasets_dir: str | os.PathLike[str] = "datasets", *, progress: bool = True,
             n_images: int = 600, size: int = 112) -> Path:
    """Build the toy dataset and model when missing, dissect and ablate the model, report.

    Returns the path of the report's index.html.
    """
    from dissect.toy import DEMO_ABLATION_LAYER, DEMO_LAYERS, ensure_toy

    target = Path(datasets_dir) / "toybroden"
    if progress and not (target / "toy_model.pt").is_file():
        print(f"making the toy dataset ({n_images} images) and training the toy model in "
              f"{target} (once; well under a minute on 2 cores)", flush=True)
    dataset, weights = ensure_toy(target, n_images=n_images,
                                  size=size, seed=0, train=True)
    if progress:
        print(f"toy dataset: {dataset}\ntoy model:   {weights}", flush=True)
    config = RunConfig(
        model="dissect.toy:toy_model", weights=str(Path(weights).resolve()),
        layers=tuple(DEMO_LAYERS), dataset=str(Path(dataset).resolve()),
        out=str(Path(out).resolve()), ablate=True, classes="scene",
        ablation_layers=(DEMO_ABLATION_LAYER,), ablation_studies=("single", "topn", "random"))
    index = run_pipeline(config, progress=progress)
    if progress:
        print(summarize_run(config.run_dir), flush=True)
    return index


def summarize_run(run_dir: str | os.PathLike[str]) -> str:
    """One line per dissected layer: detector units and unique concepts per category."""
    from dissect.run import read_config
    from dissect.tally import format_detectors, load_dissection

    config = read_config(run_dir)
    return "\n".join(format_detectors(load_dissection(Path(run_dir) / layer))
                     for layer in config.layers)
