"""Explanation pages of the report: one page per ``RUN_DIR/explain/<name>.json`` (DESIGN §11).

Each file is a list of explanations (one per image and target); each carries ``maps``, a list of
``{"kind", "title", "path"}`` with ``path`` relative to ``RUN_DIR/explain``. The report copies the
maps into ``report/explain/`` (so it works from ``file://`` and can be moved as one folder) and lays
out per explanation: the image, the class map (Grad-CAM), the top-k concept maps captioned
"concept (share %)", then the input-space maps.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from dissect.errors import CacheError

#: Concept maps shown per explanation.
TOP_CONCEPTS = 5
#: Map kinds with a fixed place; every other kind is an input-space map.
IMAGE_KINDS = ("image", "input")
CLASS_KINDS = ("gradcam", "class", "class_map")
CONCEPT_KINDS = ("concept", "concept_map")


def _round(value: Any) -> float | None:
    if value is None:
        return None
    from dissect.report.data import round_float

    try:
        return round_float(float(value))
    except (TypeError, ValueError):
        return None


def safe_map_path(text: Any, where: str) -> str:
    """A map's ``path``, checked to stay inside ``explain/``: relative, no ``..``, no drive.

    Raises CacheError naming ``where`` (the file and entry) otherwise.
    """
    if not isinstance(text, str) or text.strip() == "":
        raise CacheError(f"{where}: map path {text!r}; expected a path relative to explain/")
    path = PurePosixPath(text.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", text):
        raise CacheError(f"{where}: map path {text!r} leaves the explain directory; expected a "
                         "relative path inside it")
    return str(path)


def explanation_view(entry: dict[str, Any], where: str, top_k: int = TOP_CONCEPTS
                     ) -> dict[str, Any]:
    """One explanation object (DESIGN §11) as the page shows it.

    Returns
    -------
    ``{"image", "target", "target_name", "logit", "bias", "residual", "method", "layer",
    "concepts": [{"label", "category", "share", "contribution", "units"}] (top ``top_k`` by the
    file's order), "unlabeled": {"contribution", "units"}, "image_map", "class_map",
    "concept_maps": [{"path", "caption"}], "input_maps": [{"path", "caption", "kind"}]}``;
    map paths relative to ``explain/``. A concept map matches a concept by its ``label`` (or
    ``concept``) key, else by its title; it is captioned ``"<concept> (<share> %)"``.
    """
    if not isinstance(entry, dict):
        raise CacheError(f"{where}: expected an object per explanation, found "
                         f"{type(entry).__name__}")
    concepts = entry.get("concepts") or []
    if not isinstance(concepts, list):
        raise CacheError(f"{where}: 'concepts' must be a list")
    by_label = {}
    shown = []
    for c in concepts:
        if not isinstance(c, dict):
            raise CacheError(f"{where}: each concept must be an object")
        item = {"label": str(c.get("label", "")), "category": str(c.get("category", "") or ""),
                "share": _round(c.get("share")), "contribution": _round(c.get("contribution")),
                "units": [int(u) for u in c.get("units") or []]}
        by_label.setdefault(item["label"], item)
        shown.append(item)
    maps = entry.get("maps") or []
    if not isinstance(maps, list):
        raise CacheError(f"{where}: 'maps' must be a list of {{kind, title, path}}")
    image_map = class_map = None
    concept_maps, input_maps = [], []
    for i, m in enumerate(maps):
        if not isinstance(m, dict):
            raise CacheError(f"{where}: map {i} must be an object with kind, title, path")
        kind = str(m.get("kind", "")).lower()
        title = str(m.get("title", "") or kind)
        path = safe_map_path(m.get("path"), f"{where}, map {i}")
        if kind in IMAGE_KINDS and image_map is None:
            image_map = {"path": path, "caption": title}
        elif kind in CLASS_KINDS and class_map is None:
            class_map = {"path": path, "caption": title}
        elif kind in CONCEPT_KINDS:
            name = str(m.get("label", m.get("concept", title)))
            concept = by_label.get(name)
            if concept is not None and concept["share"] is not None:
                caption = f"{name} ({concept['share'] * 100:.1f} %)"
            else:
                caption = title
            concept_maps.append({"path": path, "caption": caption})
        else:
            input_maps.append({"path": path, "caption": title, "kind": kind})
    unlabeled = entry.get("unlabeled") or {}
    logit = _round(entry.get("logit"))
    return {
        "image": str(entry.get("image", "")),
        "target": entry.get("target") if isinstance(entry.get("target"), (int, str)) else None,
        "target_name": str(entry.get("target_name", entry.get("target", ""))),
        "logit": logit,
        "bias": _round(entry.get("bias")),
        "residual": _round(entry.get("residual")),
        "method": str(entry.get("method", "")),
        "layer": str(entry.get("layer", "")),
        "concepts": shown[:top_k],
        "unlabeled": {"contribution": _round(unlabeled.get("contribution")),
                      "units": len(unlabeled.get("units") or [])},
        "image_map": image_map, "class_map": class_map,
        "concept_maps": concept_maps[:top_k], "input_maps": input_maps,
    }


def read_explanations(explain_dir: Path, top_k: int = TOP_CONCEPTS) -> list[dict[str, Any]]:
    """Every ``explain_dir/<name>.json`` as ``{"name", "page", "items": [explanation_view]}``,
    sorted by name; ``[]`` when the directory does not exist.

    Raises CacheError naming the file for unreadable JSON or a malformed entry.
    """
    from dissect.report.data import safe_file_name

    explain_dir = Path(explain_dir)
    if not explain_dir.is_dir():
        return []
    out = []
    for path in sorted(explain_dir.glob("*.json")):
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CacheError(f"{path}: cannot read the explanations ({error})") from None
        if not isinstance(entries, list):
            raise CacheError(f"{path}: expected a list of explanations (DESIGN §11)")
        items = [explanation_view(e, f"{path}: entry {i}", top_k) for i, e in enumerate(entries)]
        out.append({"name": path.stem, "page": f"explain_{safe_file_name(path.stem)}.html",
                    "items": items})
    return out


def copy_explanation_maps(explanations: list[dict[str, Any]], explain_dir: Path,
                          out_dir: Path) -> list[str]:
    """Copy every map of ``explanations`` from ``explain_dir`` to ``out_dir/explain`` (same
    relative paths). Returns the paths that are missing (their ``<img>`` stays empty)."""
    missing = []
    seen = set()
    for page in explanations:
        for item in page["items"]:
            maps = [item["image_map"], item["class_map"], *item["concept_maps"],
                    *item["input_maps"]]
            for m in maps:
                if m is None or m["path"] in seen:
                    continue
                seen.add(m["path"])
                source = explain_dir / m["path"]
                if not source.is_file():
                    missing.append(m["path"])
                    continue
                target = out_dir / "explain" / m["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
    return missing


def share_percent(share: float | None) -> str:
    """``share`` (a fraction) as a percent with one decimal, ``-`` when unknown."""
    if share is None or not math.isfinite(share):
        return "-"
    return f"{share * 100:.1f} %"
