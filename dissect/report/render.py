"""Render a run's report: ``report/index.html``, ``report/<layer>.html``, ``report/report.json`` and
``report/img/<layer>/unit_NNNN.jpg``.

The data model comes from :func:`dissect.report.data.build_report_data`; this module lays out the
charts (plain geometry computed here, so the templates only place elements), writes the image
strips and renders the Jinja2 templates shipped in ``dissect/report/templates``. Pages are
self-contained (inline CSS, SVG and a small script), load nothing from the network and work from
``file://``. The same inputs give byte-identical outputs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from dissect.report import data as report_data
from dissect.report.images import write_unit_strips
from dissect.rundir import RunDir

#: Category colours, assigned in the order categories first appear in the run.
PALETTE = (
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1",
    "#76b7b2", "#edc948", "#9c755f", "#ff9da7", "#bab0ac",
)
#: Thumbnail height of the strips, pixels.
THUMBNAIL_HEIGHT = 96


# --------------------------------------------------------------------------------------------
# Chart layout (pure functions: data model pieces in, SVG geometry out)


def category_colors(categories: Sequence[str]) -> dict[str, str]:
    """Colour of each category: :data:`PALETTE` in order, cycling."""
    return {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(categories)}


def nice_ticks(top: float, max_ticks: int = 6) -> list[float]:
    """Axis ticks 0, s, 2s, ... covering ``top`` with s in {1, 2, 5} x 10^k and at most
    ``max_ticks + 1`` ticks; ``[0, 1]`` when ``top <= 0``."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / max_ticks
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw - 1e-12)
    n = int(math.ceil(top / step - 1e-9))
    return [round(i * step, 10) for i in range(n + 1)]


MISSING_COLOR = "#888888"


def _plot_box(left: int, top: int, height: int, right: int) -> dict[str, int]:
    return {"left": left, "top": top, "bottom": top + height, "right": right}


def _y_ticks(ticks: Sequence[float], bottom: int, scale: float) -> list[dict[str, Any]]:
    """Tick marks of a vertical axis: y position (1 decimal) and text."""
    return [{"y": round(bottom - t * scale, 1), "text": f"{t:g}"} for t in ticks]


#: Horizontal space of one legend entry, pixels.
LEGEND_STEP = 110


def _legend(categories: Sequence[str], colors: dict[str, str], left: int) -> list[dict[str, Any]]:
    return [{"x": left + i * LEGEND_STEP, "color": colors.get(c, MISSING_COLOR), "category": c}
            for i, c in enumerate(categories)]


def _unique(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def concept_chart(concepts: Sequence[dict[str, Any]], colors: dict[str, str], *,
                  bar_width: int = 14, height: int = 180) -> dict[str, Any]:
    """Layout of the unique-concepts bar chart: one bar per detected concept, its height the number
    of units detecting it, grouped and coloured by category (NetDissect's figure).

    Parameters
    ----------
    concepts : ``layer["concepts"]`` of the data model, in display order
    colors : category -> colour
    bar_width, height : bar width and plot height in pixels

    Returns
    -------
    ``{"width", "height", "plot", "bars": [{"x", "y", "w", "h", "color", "label", "category",
    "units", "tx", "ty"}], "ticks": [{"y", "text"}], "legend_y", "legend": [{"x", "color",
    "category"}]}`` (pixels; ints or 1-decimal floats). ``tx, ty`` anchor the rotated bar label.
    """
    left, top, legend_h, gap = 34, 10, 22, 2
    longest = max([len(c["label"]) for c in concepts], default=0)
    label_space = min(170, 20 + int(longest * 5))  # rotated labels, about 5 px per character
    ticks = nice_ticks(max([c["units"] for c in concepts], default=0))
    scale = height / ticks[-1]
    bottom = top + height
    bars = []
    for i, c in enumerate(concepts):
        x = left + gap + i * (bar_width + gap)
        h = round(c["units"] * scale, 1)
        bars.append({"x": x, "y": round(bottom - h, 1), "w": bar_width, "h": h,
                     "color": colors.get(c["category"], MISSING_COLOR), "label": c["label"],
                     "category": c["category"], "units": c["units"],
                     "tx": x + bar_width // 2 + 4, "ty": bottom + 6})
    legend = _legend(_unique([c["category"] for c in concepts]), colors, left)
    width = max(320, left + gap + len(concepts) * (bar_width + gap) + 10,
                left + len(legend) * LEGEND_STEP)
    return {
        "width": width,
        "height": bottom + label_space + legend_h,
        "plot": _plot_box(left, top, height, width - 10),
        "bars": bars,
        "ticks": _y_ticks(ticks, bottom, scale),
        "legend_y": bottom + label_space,
        "legend": legend,
    }


def histogram_chart(histogram: dict[str, list], iou_threshold: float, *, width: int = 520,
                    height: int = 160) -> dict[str, Any]:
    """Layout of the IoU histogram with a dashed vertical line at ``iou_threshold``.

    Parameters
    ----------
    histogram : ``layer["iou_histogram"]`` (``edges`` (B + 1,), ``counts`` (B,))
    iou_threshold : the detection cut-off
    width, height : chart width and plot height in pixels

    Returns
    -------
    ``{"width", "height", "plot", "bars": [{"x", "y", "w", "h", "lo", "hi", "count"}], "yticks",
    "xticks", "threshold_x", "threshold"}``.
    """
    left, top, bottom_space, right = 40, 10, 34, 10
    edges, counts = histogram["edges"], histogram["counts"]
    ticks = nice_ticks(max(counts, default=0))
    span = edges[-1] - edges[0]
    sx = (width - left - right) / span
    sy = height / ticks[-1]
    bottom = top + height
    bars = []
    for i, count in enumerate(counts):
        x0 = left + (edges[i] - edges[0]) * sx
        x1 = left + (edges[i + 1] - edges[0]) * sx
        h = round(count * sy, 1)
        bars.append({"x": round(x0 + 0.5, 1), "w": round(max(0.5, x1 - x0 - 1), 1),
                     "y": round(bottom - h, 1), "h": h, "lo": f"{edges[i]:.2f}",
                     "hi": f"{edges[i + 1]:.2f}", "count": count})
    xticks = [{"x": round(left + t * sx, 1), "text": f"{edges[0] + t:g}"}
              for t in nice_ticks(span, 5) if t <= span + 1e-9]
    return {
        "width": width,
        "height": bottom + bottom_space,
        "plot": _plot_box(left, top, height, width - right),
        "bars": bars,
        "yticks": _y_ticks(ticks, bottom, sy),
        "xticks": xticks,
        "threshold_x": round(left + (min(iou_threshold, edges[-1]) - edges[0]) * sx, 1),
        "threshold": f"{iou_threshold:g}",
    }


def layers_chart(layers: Sequence[dict[str, Any]], colors: dict[str, str], *,
                 bar_width: int = 44, height: int = 180, key: str = "units") -> dict[str, Any]:
    """Layout of the across-layers chart: per layer a bar stacked by category of the number of
    detector units, with "detectors / unique concepts" written above it. The legend lists the
    categories that have detectors, in ``colors`` order.

    Parameters
    ----------
    layers : ``data["layers"]``
    colors : category -> colour
    bar_width, height : bar width and plot height in pixels
    key : ``units`` (detector units, the default) or ``concepts`` (unique concepts): the value of
        each ``detectors`` entry the bars stack

    Returns
    -------
    ``{"width", "height", "plot", "columns": [{"x", "w", "name", "label_x", "segments": [{"y",
    "h", "color", "category", "units"}], "total_y", "n_detectors", "n_concepts"}], "ticks",
    "legend_y", "legend"}``.
    """
    left, top, label_space, legend_h, gap = 40, 24, 70, 22, 18
    totals = [sum(d[key] for d in layer["detectors"]) for layer in layers]
    ticks = nice_ticks(max(totals, default=0))
    sy = height / ticks[-1]
    bottom = top + height
    columns = []
    for i, layer in enumerate(layers):
        x = left + gap + i * (bar_width + gap)
        base = float(bottom)
        segments = []
        for d in layer["detectors"]:
            if d[key] == 0:
                continue
            base -= d[key] * sy
            segments.append({"y": round(base, 1), "h": round(d[key] * sy, 1),
                             "color": colors.get(d["category"], MISSING_COLOR),
                             "category": d["category"], "units": d[key]})
        columns.append({"x": x, "w": bar_width, "name": layer["name"],
                        "label_x": x + bar_width // 2, "segments": segments,
                        "total_y": round(base - 4, 1), "n_detectors": layer["n_detectors"],
                        "n_concepts": layer["n_concepts"]})
    found = _unique([d["category"] for layer in layers for d in layer["detectors"] if d[key]])
    used = [c for c in colors if c in found] + [c for c in found if c not in colors]
    width = max(320, left + gap + len(layers) * (bar_width + gap) + 10,
                left + len(used) * LEGEND_STEP)
    return {
        "width": width,
        "height": bottom + label_space + legend_h,
        "plot": _plot_box(left, top, height, width - 10),
        "columns": columns,
        "ticks": _y_ticks(ticks, bottom, sy),
        "legend_y": bottom + label_space,
        "legend": _legend(used, colors, left),
    }


#: Per-class ablation charts drawn on a layer page (the data model keeps every class).
MAX_CURVE_CHARTS = 24
#: Colours of the ablation curves: top-N removed, random sets, only top-N kept.
CURVE_COLORS = {"removed": "#d32f2f", "random": "#546e7a", "kept": "#2e7d32"}


def axis_ticks(low: float, high: float, max_ticks: int = 6) -> list[float]:
    """Ticks ``k * s`` covering [low, high] (low <= 0 <= high assumed or not), s from
    :func:`nice_ticks` of the span; ``[0, 1]`` for an empty span."""
    low, high = min(0.0, low), max(0.0, high)
    if high - low <= 0:
        return [0.0, 1.0]
    step = nice_ticks(high - low, max_ticks)[1]
    first = math.floor(low / step + 1e-9)
    last = math.ceil(high / step - 1e-9)
    return [round(k * step, 10) for k in range(first, last + 1)]


def curve_chart(curve: dict[str, Any], *, width: int = 300, height: int = 150) -> dict[str, Any]:
    """Layout of one ablation chart: the metric (y, 0..1) against N (x, the distinct set sizes
    at equal spacing, as on a log axis for 1, 2, 4, ...).

    Parameters
    ----------
    curve : one entry of ``layer["ablation"]["curves"]`` (or its ``mean_curve``)

    Returns
    -------
    ``{"width", "height", "plot", "yticks", "xticks": [{"x", "text"}], "removed": "points",
    "kept": "points", "random": "points", "band": "points" (min..max polygon), "dots":
    [{"x", "y", "color", "title"}], "colors"}``; a series with no point gives ``""``.
    """
    left, top, bottom_space, right = 34, 8, 30, 8
    sizes = sorted({p["n"] for key in ("removed", "kept", "random") for p in curve[key]})
    plot_w = width - left - right
    step = plot_w / max(1, len(sizes) - 1)
    xs = {n: round(left + (i * step if len(sizes) > 1 else plot_w / 2), 1)
          for i, n in enumerate(sizes)}
    bottom = top + height

    def y(v: float) -> float:
        return round(bottom - min(1.0, max(0.0, v)) * height, 1)

    def line(points: list[tuple[float, float]]) -> str:
        return " ".join(f"{px},{py}" for px, py in points)

    dots = []
    series = {}
    for key, field in (("removed", "value"), ("kept", "value"), ("random", "mean")):
        pts = [(xs[p["n"]], y(p[field])) for p in curve[key]]
        series[key] = line(pts)
        for p, (px, py) in zip(curve[key], pts):
            extra = (f" (sd {p['sd']:.3f}, min {p['min']:.3f}, max {p['max']:.3f}, "
                     f"{p['repeats']} sets)") if key == "random" and p["repeats"] else ""
            dots.append({"x": px, "y": py, "color": CURVE_COLORS[key],
                         "title": f"{key} N={p['n']}: {p[field]:.3f}{extra}"})
    upper = [(xs[p["n"]], y(p["max"])) for p in curve["random"]]
    lower = [(xs[p["n"]], y(p["min"])) for p in curve["random"]][::-1]
    return {
        "width": width, "height": bottom + bottom_space,
        "plot": _plot_box(left, top, height, width - right),
        "yticks": _y_ticks([0.0, 0.25, 0.5, 0.75, 1.0], bottom, height),
        "xticks": [{"x": xs[n], "text": str(n)} for n in sizes],
        "removed": series["removed"], "kept": series["kept"], "random": series["random"],
        "band": line(upper + lower) if len(upper) > 1 else "",
        "dots": dots, "colors": CURVE_COLORS,
    }


def scatter_chart(scatter: dict[str, Any], colors: dict[str, str], iou_threshold: float, *,
                  width: int = 520, height: int = 220) -> dict[str, Any]:
    """Layout of the importance-versus-interpretability scatter: x = the unit's IoU, y = its
    damage (or number of classes), one dot per unit coloured by category (grey: no label).

    Returns
    -------
    ``{"width", "height", "plot", "yticks", "xticks", "dots": [{"x", "y", "color", "title",
    "unit"}], "threshold_x", "zero_y", "y_label", "legend_y", "legend"}``.
    """
    left, top, bottom_space, right = 44, 10, 34, 10
    points = scatter["points"]
    values = [p["value"] for p in points]
    ious = [p["iou"] for p in points]
    yt = axis_ticks(min(values, default=0.0), max(values, default=0.0))
    xt = nice_ticks(max(max(ious, default=0.0), iou_threshold), 5)
    plot_w = width - left - right
    sx = plot_w / xt[-1]
    sy = height / (yt[-1] - yt[0])
    bottom = top + height

    def y(v: float) -> float:
        return round(bottom - (v - yt[0]) * sy, 1)

    dots = [{"x": round(left + p["iou"] * sx, 1), "y": y(p["value"]), "unit": p["unit"],
             "color": colors.get(p["category"], MISSING_COLOR) if p["category"] else MISSING_COLOR,
             "title": f"unit {p['unit']}: {p['label']} ({p['category'] or 'no label'}), IoU "
                      f"{p['iou']:.3f}, {scatter['y']} {p['value']:g}"}
            for p in points]
    used = _unique([p["category"] for p in points if p["category"]])
    legend = _legend([c for c in colors if c in used], colors, left)
    return {
        "width": max(width, left + len(legend) * LEGEND_STEP), "height": bottom + bottom_space + 22,
        "plot": _plot_box(left, top, height, width - right),
        "yticks": [{"y": y(t), "text": f"{t:g}"} for t in yt],
        "xticks": [{"x": round(left + t * sx, 1), "text": f"{t:g}"} for t in xt],
        "dots": dots, "threshold_x": round(left + iou_threshold * sx, 1), "zero_y": y(0.0),
        "y_label": "largest class drop" if scatter["y"] == "damage" else "classes important for",
        "legend_y": bottom + bottom_space, "legend": legend,
    }


def null_chart(null: dict[str, Any], *, width: int = 120, height: int = 26) -> dict[str, Any]:
    """Layout of a unit's small null histogram: bars of the permutation null and a red line at
    the observed IoU. Returns ``{"width", "height", "path" (the bars as one SVG path),
    "observed_x", "title"}``."""
    counts = null["counts"]
    top = max(counts, default=0) or 1
    span = (null["width"] * len(counts)) or 1.0
    bar_w = width / max(1, len(counts))
    w = round(max(0.5, bar_w - 1), 1)
    path = " ".join(f"M{round(i * bar_w, 1)} {height}v-{round(c / top * (height - 2), 1)}h{w}"
                    f"v{round(c / top * (height - 2), 1)}z" for i, c in enumerate(counts) if c)
    x_obs = round(min(1.0, null["observed"] / span) * (width - 1), 1)
    total = sum(counts)
    return {"width": width, "height": height, "path": path, "observed_x": x_obs,
            "title": f"null of {total} permutations, {null['exceed']} at or above the observed "
                     f"IoU {null['observed']:.3f}"}


def pooled_null_chart(pooled: dict[str, Any], *, width: int = 520,
                      height: int = 150) -> dict[str, Any]:
    """Layout of the layer's observed-versus-null histogram: per IoU bin two bars side by side,
    the fraction of units (observed best IoU) and of permutation values (null).

    Returns ``{"width", "height", "plot", "bars": [{"x", "y", "w", "h", "color", "title"}],
    "yticks", "xticks", "colors"}``.
    """
    left, top, bottom_space, right = 40, 10, 34, 10
    edges = pooled["edges"]
    n_bins = len(edges) - 1
    ticks = nice_ticks(max(pooled["observed"] + pooled["null"] + [0.0]))
    sy = height / ticks[-1]
    bin_w = (width - left - right) / max(1, n_bins)
    bottom = top + height
    colors = {"observed": "#d32f2f", "null": "#90a4ae"}
    bars = []
    for i in range(n_bins):
        for k, key in enumerate(("null", "observed")):
            h = round(pooled[key][i] * sy, 1)
            bars.append({"x": round(left + i * bin_w + k * bin_w / 2, 1),
                         "w": round(max(0.5, bin_w / 2 - 0.5), 1), "y": round(bottom - h, 1),
                         "h": h, "color": colors[key],
                         "title": f"IoU {edges[i]:.2f}-{edges[i + 1]:.2f}: {key} "
                                  f"{pooled[key][i] * 100:.1f} %"})
    span = edges[-1] - edges[0]
    xticks = [{"x": round(left + t / span * (width - left - right), 1), "text": f"{t:g}"}
              for t in nice_ticks(span, 5) if t <= span + 1e-9]
    return {"width": width, "height": bottom + bottom_space,
            "plot": _plot_box(left, top, height, width - right), "bars": bars,
            "yticks": _y_ticks(ticks, bottom, sy), "xticks": xticks, "colors": colors}


def ablation_charts(layer: dict[str, Any]) -> dict[str, Any] | None:
    """Charts of a layer's ablation view: ``{"mean": curve_chart | None, "classes":
    [curve_chart with "class" and "n"] (the first :data:`MAX_CURVE_CHARTS`), "hidden": int}``."""
    view = layer["ablation"]
    if view is None:
        return None
    charts = []
    for curve in view["curves"][:MAX_CURVE_CHARTS]:
        chart = curve_chart(curve)
        chart["class"], chart["n"] = curve["class"], curve["n"]
        charts.append(chart)
    mean = view["mean_curve"]
    return {"mean": curve_chart(mean, width=420, height=190) if mean else None,
            "classes": charts, "hidden": max(0, len(view["curves"]) - MAX_CURVE_CHARTS)}


def detector_table(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the index page's table: per layer, one cell per run category (``None`` where the
    layer was not dissected for that category) with its detector units and unique concepts."""
    rows = []
    for layer in data["layers"]:
        by_cat = {d["category"]: d for d in layer["detectors"]}
        rows.append(
            {
                "name": layer["name"], "page": layer["page"], "n_units": layer["n_units"],
                "iou_threshold": layer["iou_threshold"], "n_detectors": layer["n_detectors"],
                "n_concepts": layer["n_concepts"],
                "cells": [by_cat.get(c) for c in data["categories"]],
                "significance": layer.get("significance"),
                "compositional": layer.get("compositional"),
                "headline": (layer["ablation"] or {}).get("headline"),
                "metric": (layer["ablation"] or {}).get("metric"),
            }
        )
    return rows


def layout_report(data: dict[str, Any]) -> dict[str, Any]:
    """The view of the data model: ``{"colors", "detector_table", "layers_chart", "charts":
    {layer: {"concepts", "histogram"}}}`` (colours, table rows and chart geometry)."""
    colors = category_colors(data["categories"])
    return {
        "colors": colors,
        "detector_table": detector_table(data),
        "layers_chart": layers_chart(data["layers"], colors),
        "charts": {
            layer["name"]: {
                "concepts": concept_chart(layer["concepts"], colors),
                "histogram": histogram_chart(layer["iou_histogram"], layer["iou_threshold"]),
                "ablation": ablation_charts(layer),
                "scatter": None if layer.get("scatter") is None
                else scatter_chart(layer["scatter"], colors, layer["iou_threshold"]),
                "nulls": {u["unit"]: null_chart(u["null"]) for u in layer["units"]
                          if u.get("null") is not None},
                "pooled_null": None if layer.get("pooled_null") is None
                else pooled_null_chart(layer["pooled_null"]),
            }
            for layer in data["layers"]
        },
    }


# --------------------------------------------------------------------------------------------
# Templates


def _format_float(value: float, decimals: int = 3) -> str:
    return f"{float(value):.{decimals}f}"


def make_environment() -> Environment:
    """The Jinja2 environment of the report templates (package data of ``dissect.report``):
    autoescaping on, undefined names are errors, filter ``fixed(x, d)`` formats a float."""
    env = Environment(
        loader=PackageLoader("dissect.report", "templates"),
        autoescape=select_autoescape(
            enabled_extensions=("html", "svg", "xml"), default=True, default_for_string=True
        ),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fixed"] = _format_float
    return env


def dumps_report_json(data: dict[str, Any]) -> str:
    """report.json text: sorted keys, ASCII only, one-space indent, trailing newline."""
    return json.dumps(data, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n"


def _write_text(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8"))


# --------------------------------------------------------------------------------------------
# Activations for the strips


def gather_rows(acts: Any, rows: np.ndarray, u0: int, u1: int, chunk_rows: int) -> np.ndarray:
    """``acts[rows, u0:u1]`` as float32, read as one slice per group of ``chunk_rows`` rows.

    Parameters
    ----------
    acts : an (N, U, h, w) array or h5py dataset (sliced, never fancy-indexed: h5py point
        selections are slow)
    rows : sorted unique int64 row indices
    u0, u1 : the unit range
    chunk_rows : rows per group (the dataset's chunk height, so each slice touches one chunk row)

    Returns
    -------
    float32 (len(rows), u1 - u0, h, w). At most ``chunk_rows`` extra rows are held at a time.
    """
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((rows.size, u1 - u0, *acts.shape[2:]), dtype=np.float32)
    bounds = np.flatnonzero(np.diff(rows // max(1, chunk_rows))) + 1
    for start, stop in zip([0, *bounds.tolist()], [*bounds.tolist(), rows.size]):
        if start == stop:
            continue
        lo, hi = int(rows[start]), int(rows[stop - 1]) + 1
        out[start:stop] = np.asarray(acts[lo:hi, u0:u1])[rows[start:stop] - lo]
    return out


def acts_block_reader(path: Path) -> tuple[Callable[[np.ndarray, int, int], np.ndarray], Any]:
    """A reader ``read(rows, u0, u1)`` of ``acts[rows, u0:u1]`` (float32; rows sorted unique int64)
    from a cache file (:func:`gather_rows`, one slice per HDF5 chunk row), and the open h5py file
    (close it when done)."""
    import h5py

    f = h5py.File(path, "r")
    acts = f["acts"]
    chunk_rows = acts.chunks[0] if acts.chunks else 64

    def read(rows: np.ndarray, u0: int, u1: int) -> np.ndarray:
        return gather_rows(acts, rows, u0, u1, chunk_rows)

    return read, f


def remove_stale_strips(strips: list[Path]) -> None:
    """Delete ``unit_*.jpg`` files beside ``strips`` that are not among them.

    A report rendered again into the same directory after the layer lost units (a model with
    fewer units recorded under the same layer name) must not keep the old units' strips. Only
    files named like strips are touched.
    """
    keep = {path.resolve() for path in strips}
    for directory in {path.parent for path in strips}:
        for old in directory.glob("unit_*.jpg"):
            if old.resolve() not in keep:
                old.unlink()


def write_layer_strips(
    run_dir: Path,
    layer: dict[str, Any],
    thresholds: np.ndarray,
    dataset: Any,
    out_dir: Path,
    thumbnail_height: int = THUMBNAIL_HEIGHT,
) -> None:
    """Write the strips ``out_dir/<unit strip path>`` of one layer of the data model.

    Parameters
    ----------
    run_dir : the run directory (its ``cache/<layer>.h5`` is read)
    layer : one entry of ``data["layers"]``
    thresholds : float (U,), the dissection's thresholds
    dataset : the run's ``BrodenDataset``
    out_dir : the report directory
    thumbnail_height : pixels
    """
    from dissect.record import open_cache

    path = RunDir(run_dir).cache(layer["name"])
    info = open_cache(path)
    k = max([len(u["top_images"]) for u in layer["units"]], default=0)
    top = np.full((len(layer["units"]), max(1, k)), -1, dtype=np.int64)
    for u in layer["units"]:
        idx = [t["index"] for t in u["top_images"]]
        top[u["unit"], : len(idx)] = idx
    strips = [out_dir / u["strip"] for u in layer["units"]]
    remove_stale_strips(strips)
    read, handle = acts_block_reader(path)
    try:
        write_unit_strips(
            read,
            dataset.load_image,
            np.asarray(thresholds, dtype=np.float64),
            top,
            strips,
            image_size=tuple(dataset.image_size),
            seg_size=tuple(dataset.seg_size),
            map_size=int(info.height) * int(info.width),
            thumbnail_height=thumbnail_height,
        )
    finally:
        handle.close()


def image_root_uri(dataset: str) -> str:
    """``file://`` URI of the dataset's ``images/`` folder (the lightbox links the originals
    there); ``""`` when the dataset path is not absolute."""
    path = Path(dataset)
    return (path / "images").as_uri() + "/" if path.is_absolute() else ""


def render_pages(data: dict[str, Any], out_dir: Path, thumbnail_shape: tuple[int, int]) -> Path:
    """Write report.json, index.html, one page per layer and one per explanation set from the
    data model.

    ``thumbnail_shape`` (th, tw) sizes the strip ``<img>`` elements. Returns the index.html path.
    """
    from dissect.report.images import STRIP_GAP

    env = make_environment()
    view = layout_report(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(out_dir / "report.json", dumps_report_json(data))
    th, tw = thumbnail_shape
    k = data["top_k"]
    strip = {"height": th, "width": k * tw + (k - 1) * STRIP_GAP, "tile": tw, "gap": STRIP_GAP,
             "image_root": image_root_uri(data["dataset"])}
    index = out_dir / "index.html"
    _write_text(index, env.get_template("index.html").render(report=data, view=view))
    layer_template = env.get_template("layer.html")
    for layer in data["layers"]:
        text = layer_template.render(
            report=data, layer=layer, chart=view["charts"][layer["name"]], view=view, strip=strip
        )
        _write_text(out_dir / layer["page"], text)
    for page in data.get("explanations", []):
        text = env.get_template("explain.html").render(report=data, page=page)
        _write_text(out_dir / page["page"], text)
    return index


def copy_layer_files(run_dir: Path, data: dict[str, Any], out_dir: Path) -> None:
    """Copy each layer's result files (``layer["files"]``: tally.csv, ablation.csv, ...) from
    ``run_dir/<layer>/`` to their place under ``out_dir`` so the report links them as one
    folder."""
    import shutil

    for layer in data["layers"]:
        for name, rel in layer["files"].items():
            target = out_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(RunDir(run_dir).layer_dir(layer["name"]) / name, target)


def render_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    dataset: Any = None,
    top_k: int = report_data.TOP_K,
    thumbnail_height: int = THUMBNAIL_HEIGHT,
    ablation_metric: str = report_data.ABLATION_METRIC,
) -> Path:
    """Write the HTML report of a run and return the path of its ``index.html``.

    Parameters
    ----------
    run_dir : a run directory with run.json, the activation caches and at least one dissection
    out_dir : output directory (default ``run_dir/report``)
    dataset : an opened ``BrodenDataset`` of the run (default: ``config.dataset`` of run.json)
    top_k : top images per unit
    thumbnail_height : strip thumbnail height in pixels
    ablation_metric : accuracy | balanced_accuracy | precision | recall | true_class_prob

    Writes ``report.json`` (the data model), ``index.html``, ``<layer>.html`` per dissected layer,
    ``img/<layer>/unit_NNNN.jpg`` (one strip per unit), ``files/<layer>/`` (copies of the layer's
    tally.csv, ablation.csv, importance.csv, compositional.csv, significance.csv when present) and
    ``explain_<name>.html`` with the maps under ``explain/`` for each
    ``RUN_DIR/explain/<name>.json``. Identical inputs give identical bytes.

    Raises
    ------
    CacheError, DatasetError, OptionError
        As :func:`build_report_data`, and for a bad ``thumbnail_height``.
    """
    from dissect.errors import OptionError
    from dissect.report.explain import copy_explanation_maps
    from dissect.report.images import thumbnail_shape
    from dissect.tally import load_dissection

    if thumbnail_height < 8:
        raise OptionError(f"thumbnail_height is {thumbnail_height}; expected at least 8 pixels")
    run_dir = Path(run_dir)
    paths = RunDir(run_dir)
    out = Path(out_dir) if out_dir is not None else paths.report_dir
    if dataset is None:
        dataset = report_data.open_run_dataset(run_dir, report_data.read_run_record(run_dir)
                                               .get("config", {}))
    data = report_data.build_report_data(
        run_dir, dataset=dataset, top_k=top_k, ablation_metric=ablation_metric
    )
    out.mkdir(parents=True, exist_ok=True)
    for layer in data["layers"]:
        thresholds = np.asarray(load_dissection(paths.layer_dir(layer["name"])).thresholds)
        write_layer_strips(run_dir, layer, thresholds, dataset, out, thumbnail_height)
    copy_layer_files(run_dir, data, out)
    copy_explanation_maps(data["explanations"], paths.explain_dir, out)
    shape = thumbnail_shape(tuple(dataset.image_size), thumbnail_height)
    return render_pages(data, out, shape)
