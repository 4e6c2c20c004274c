"""Writing explanations: ``<out_dir>/<name>.json`` and heatmap PNGs under ``<out_dir>/<name>/``.

The JSON is a list with one object per (image, target): the keys of DESIGN.md §11 (see
:meth:`dissect.explain.Explanation.to_dict`) plus ``maps``, a list of
``{"kind", "title", "path"}`` with ``kind`` one of :data:`MAP_KINDS` and ``path`` the PNG's path
relative to ``out_dir`` (``<name>/<i>_<kind>[_<k>].png``); concept maps also carry ``label`` (the
concept's name, as in ``concepts``). Order: the image, Grad-CAM, the top-k
concept maps (titled ``"concept (share %)"``), then the input-space maps.

Heatmaps are drawn over the image: the map is scaled to [0, 1] by its maximum (its absolute
value for the signed ``ig`` and ``occlusion`` maps), coloured, and blended with the image with
the map's value as opacity (at most :data:`MAX_ALPHA`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dissect.errors import OptionError
from dissect.explain.core import Explanation

__all__ = ["MAP_KINDS", "MAX_ALPHA", "heatmap_overlay", "write_explanations"]

#: Allowed ``kind`` values of the ``maps`` entries.
MAP_KINDS = ("image", "gradcam", "concept", "saliency", "ig", "occlusion")
#: Largest opacity of a heatmap over its image.
MAX_ALPHA = 0.75
_TITLES = {"saliency": "saliency", "ig": "integrated gradients (|attribution|)",
           "occlusion": "occlusion (|effect|)", "gradcam": "Grad-CAM"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Colour ramp (value 0 .. 1): dark blue, blue, cyan, yellow, red.
_RAMP = np.array([[0, 0, 96], [0, 64, 255], [0, 224, 255], [255, 240, 0], [255, 0, 0]],
                 dtype=np.float64)


def _colour(values: np.ndarray) -> np.ndarray:
    """float (H, W) in [0, 1] -> float64 (H, W, 3) RGB on the ramp."""
    position = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.minimum(np.floor(position).astype(np.int64), len(_RAMP) - 2)
    frac = (position - low)[..., None]
    return _RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac


def heatmap_overlay(heatmap: np.ndarray, image: np.ndarray | None = None,
                    signed: bool = False) -> np.ndarray:
    """A heatmap drawn over an image.

    Parameters
    ----------
    heatmap : float array (H, W); negative values count as 0 unless ``signed`` (then |value|).
    image : uint8 array (H, W, 3) or None (a mid-grey background).
    signed : whether to show the magnitude of a signed map.

    Returns
    -------
    uint8 array (H, W, 3).
    """
    values = np.asarray(heatmap, dtype=np.float64)
    values = np.abs(values) if signed else np.maximum(values, 0.0)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    top = float(values.max()) if values.size else 0.0
    scaled = values / top if top > 0 else np.zeros_like(values)
    if image is None:
        base = np.full(values.shape + (3,), 128.0)
    else:
        base = np.asarray(image, dtype=np.float64)
        if base.shape != values.shape + (3,):
            raise OptionError(f"images_uint8: an image of shape {base.shape} does not match its "
                              f"heatmap {values.shape}")
    alpha = (scaled * MAX_ALPHA)[..., None]
    blended = base * (1 - alpha) + _colour(scaled) * alpha
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _write_png(path: Path, image: np.ndarray) -> None:
    partial = path.with_name(path.name + ".partial")
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB").save(
        partial, format="PNG")
    os.replace(partial, path)


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def write_explanations(
    explanations: Sequence[Explanation],
    out_dir: str | os.PathLike[str],
    name: str,
    images_uint8: np.ndarray | Sequence[np.ndarray] | None = None,
    attributions: Mapping[str, np.ndarray | torch.Tensor] | None = None,
    top_k: int = 5,
) -> Path:
    """Write ``<out_dir>/<name>.json`` and the PNGs under ``<out_dir>/<name>/``.

    Parameters
    ----------
    explanations:
        From :func:`~dissect.explain.explain_prediction`, one per image.
    out_dir:
        The run's ``explain`` directory (created when missing).
    name:
        The image set's name: letters, digits, ``.``, ``_``, ``-`` (no path separators).
    images_uint8:
        (B, H, W, 3) uint8 RGB images at the size of the maps, or None (no image PNG; heatmaps on
        grey).
    attributions:
        method (``saliency``, ``gradcam``, ``ig``, ``occlusion``) -> (B, H, W) maps, e.g. from
        :func:`~dissect.explain.input_attributions`. A ``gradcam`` entry replaces the
        explanation's own class map.
    top_k:
        Concept maps per image (the explanation's first ``top_k``).

    Returns
    -------
    The JSON file's path. Each file is written under a temporary name and renamed into place.

    Raises
    ------
    OptionError
        A bad name, unknown attribution kind, or arrays whose count or size does not match.
    """
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise OptionError(f"explain name: got {name!r}; expected letters, digits, '.', '_' or "
                          f"'-' (at most 128, no path separators)")
    if not isinstance(top_k, int) or top_k < 0:
        raise OptionError(f"top_k: expected an integer >= 0, got {top_k!r}")
    count = len(explanations)
    images = None if images_uint8 is None else [np.asarray(i) for i in images_uint8]
    if images is not None and len(images) != count:
        raise OptionError(f"images_uint8: {len(images)} images for {count} explanations")
    extra = {k: _as_numpy(v) for k, v in (attributions or {}).items()}
    for kind, maps in extra.items():
        if kind not in MAP_KINDS or kind in ("image", "concept"):
            raise OptionError(f"attributions: unknown kind {kind!r}; expected saliency, gradcam, "
                              f"ig or occlusion")
        if len(maps) != count:
            raise OptionError(f"attributions[{kind!r}]: {len(maps)} maps for {count} "
                              f"explanations")
    out = Path(out_dir)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, explanation in enumerate(explanations):
        image = None if images is None else images[i]
        if image is not None and (image.dtype != np.uint8 or image.ndim != 3
                                  or image.shape[2] != 3):
            raise OptionError(f"images_uint8[{i}]: expected uint8 (H, W, 3), got "
                              f"{image.dtype} {image.shape}")
        entries: list[dict[str, str]] = []

        def emit(kind: str, title: str, picture: np.ndarray, suffix: str = "",
                 label: str | None = None, i: int = i,
                 entries: list[dict[str, str]] = entries) -> None:
            file_name = f"{i}_{kind}{suffix}.png"
            _write_png(folder / file_name, picture)
            entry = {"kind": kind, "title": title, "path": f"{name}/{file_name}"}
            if label is not None:
                entry["label"] = label
            entries.append(entry)

        if image is not None:
            emit("image", "image", image)
        cam = extra.get("gradcam", [explanation.class_map] * count)[i]
        emit("gradcam", "Grad-CAM", heatmap_overlay(cam, image))
        for k, (concept, heat) in enumerate(list(explanation.concept_maps.items())[:top_k]):
            share = next((c.share for c in explanation.concepts if c.label == concept), 0.0)
            title = f"{concept} ({_percent(share)})"
            emit("concept", title, heatmap_overlay(heat, image), f"_{k}", label=concept)
        for kind, maps in extra.items():
            if kind == "gradcam":
                continue
            emit(kind, _TITLES[kind], heatmap_overlay(maps[i], image,
                                                      signed=kind in ("ig", "occlusion")))
        record = explanation.to_dict()
        record["maps"] = entries
        records.append(record)
    path = out / f"{name}.json"
    partial = out / f"{name}.json.partial"
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(records, handle, indent=1, allow_nan=False, default=_json_default)
    os.replace(partial, path)
    return path


def _percent(share: float) -> str:
    if not math.isfinite(share):
        return "n/a"
    return f"{round(100 * share)}%"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
