"""The toy world: a generated Broden-format dataset, a small CNN trained on it, a planted model.

- :func:`generate_toy_dataset` writes a deterministic dataset of five procedurally drawn scenes
  (:data:`TOY_SCENES`) with all six Broden categories (color, object, material, part, scene,
  texture); :func:`toy_images` draws the same images in memory, for exact comparisons.
- :func:`toy_model` is the CNN (model spec ``dissect.toy:toy_model``); :func:`train_toy_model`
  trains it on a toy dataset's train split and writes ``toy_model.pt``.
- :func:`planted_model` is built without training: its units at :data:`PLANTED_LAYER` detect the
  concepts :func:`planted_labels` names, so a dissection of it must find exactly those.
- :func:`ensure_toy` makes the dataset and the trained model when they are missing (``dissect
  demo``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dissect.errors import OptionError
from dissect.toy.dataset import (
    GENERATOR_VERSION,
    TOY_SCENES,
    ToyImage,
    generate_toy_dataset,
    plan_toy_dataset,
    toy_images,
)
from dissect.toy.model import (
    DEMO_ABLATION_LAYER,
    DEMO_LAYERS,
    MODEL_FILE,
    ToyCNN,
    load_toy_model,
    scene_classes,
    toy_accuracy,
    toy_model,
    train_toy_model,
)
from dissect.toy.planted import PLANTED_LAYER, planted_labels, planted_model
from dissect.toy.scenes import ToyScene, draw_scene

__all__ = [
    "TOY_SCENES",
    "DEMO_LAYERS",
    "DEMO_ABLATION_LAYER",
    "MODEL_FILE",
    "PLANTED_LAYER",
    "ToyCNN",
    "ToyImage",
    "ToyScene",
    "draw_scene",
    "ensure_toy",
    "generate_toy_dataset",
    "load_toy_model",
    "plan_toy_dataset",
    "planted_labels",
    "planted_model",
    "scene_classes",
    "toy_accuracy",
    "toy_images",
    "toy_model",
    "train_toy_model",
]


def ensure_toy(out_dir: str | os.PathLike[str], n_images: int = 600, size: int = 112,
               seed: int = 0, train: bool = True) -> tuple[Path, Path | None]:
    """The toy dataset at ``out_dir`` and its trained model, made only when missing.

    Parameters
    ----------
    out_dir:
        Dataset directory. Generated (:func:`generate_toy_dataset`) when it has no
        ``index.csv``; reused when its ``toy.json`` records the same parameters.
    n_images, size, seed:
        Generator parameters.
    train:
        Also train the model (``<out_dir>/toy_model.pt``, :func:`train_toy_model` with ``seed``)
        when that file is missing.

    Returns
    -------
    (dataset directory, model state_dict path or None when ``train`` is false).

    Raises
    ------
    OptionError
        When ``out_dir`` holds a different dataset (other parameters, or not a toy dataset).
    """
    out = Path(out_dir)
    if not (out / "index.csv").is_file():
        generate_toy_dataset(out, n_images=n_images, size=size, seed=seed)
    else:
        wanted = {"version": GENERATOR_VERSION, "n_images": n_images, "size": size,
                  "seed": seed}
        try:
            with open(out / "toy.json", encoding="utf-8") as handle:
                found = json.load(handle)
        except (OSError, ValueError):
            found = None
        if not isinstance(found, dict) or any(found.get(k) != v for k, v in wanted.items()):
            have = {k: found.get(k) for k in wanted} if isinstance(found, dict) else "no toy.json"
            raise OptionError(
                f"{out} already holds a dataset that is not the toy dataset asked for "
                f"({have}; wanted {wanted}); remove it or choose another directory")
    if not train:
        return out, None
    model_path = out / MODEL_FILE
    if not model_path.is_file():
        train_toy_model(out, out=model_path, seed=seed)
    return out, model_path
