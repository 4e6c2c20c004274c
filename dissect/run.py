"""The orchestrator: one function per stage, each recording its timing and options in run.json.

Every command of the CLI and every script goes through these stage functions
(:func:`record_stage`, :func:`tally_stage`, :func:`ablation_stage`, :func:`report_stage`,
:func:`run_pipeline`), so a run directory always says what was computed, from what and how long
it took. Paths come from :class:`dissect.rundir.RunDir`, options from
:class:`dissect.config.RunConfig`. Nothing below this module imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dissect.config import RECORDING_FIELDS, RunConfig
from dissect.errors import CacheError, OptionError
from dissect.rundir import RunDir, StageTiming, stage_timer

__all__ = ["RunConfig", "RunDir", "record_stage", "tally_stage", "compose_stage",
           "significance_stage", "ablation_stage",
           "report_stage", "run_pipeline", "read_run", "read_config", "write_run_json",
           "stage_timer", "StageTiming", "open_dataset"]


# --- convenience names of the Python API (thin wrappers over RunDir) ------------------------

def read_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The contents of ``run_dir/run.json`` (CacheError when it is not a run)."""
    return RunDir(run_dir).read()


def read_config(run_dir: str | os.PathLike[str]) -> RunConfig:
    """The validated :class:`RunConfig` saved in ``run_dir/run.json``."""
    return RunDir(run_dir).config()


def write_run_json(config: RunConfig, *, device: str | None = None,
                   stages: dict[str, Any] | None = None) -> Path:
    """Write (or update) ``config.out/run.json`` (see :meth:`RunDir.write_config`); ``stages``
    are stage records to add (name -> JSON object)."""
    run = RunDir(config.out)
    path = run.write_config(config, device=device)
    if stages:
        run.update(stages={**run.stages(), **stages})
    return path


def open_dataset(config: RunConfig) -> Any:
    """The run's dataset, every image (cache rows are dataset images), chosen categories."""
    from dissect.data import BrodenDataset

    return BrodenDataset(config.dataset, categories=config.categories)


def _note(message: str) -> None:
    print(f"dissect: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def task_progress(description: str, enabled: bool = True) -> Iterator[None]:
    """A tqdm bar on stderr counting the Dask tasks that finish inside the block (local
    schedulers: threads, processes, synchronous; a distributed cluster shows its own
    dashboard). Off when ``enabled`` is false."""
    if not enabled:
        yield
        return
    from dask.callbacks import Callback
    from tqdm.auto import tqdm

    bar = tqdm(desc=description, unit="task", leave=False, file=sys.stderr)

    class _Bar(Callback):
        def _start_state(self, dsk: Any, state: Any) -> None:
            bar.total = (bar.total or 0) + len(state["ready"]) + len(state["waiting"]) \
                + len(state["running"]) + len(state["finished"])
            bar.refresh()

        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any
                      ) -> None:
            bar.update(1)

    try:
        with _Bar():
            yield
    finally:
        bar.close()


# --- record ---------------------------------------------------------------------------------

def record_stage(config: RunConfig, *, force: bool = False, progress: bool = True,
                 summary: list[str] | None = None) -> dict[str, Path]:
    """Record the activations of every layer of ``config`` (resuming a partial cache).

    With ``force`` the caches are recorded again and every file derived from the old caches
    (:meth:`RunDir.outputs_of`) is removed with its stage record.
    """
    from dissect.data import BrodenDataset
    from dissect.record import load_model, record_activations, resolve_device, resolve_layers

    run = RunDir(config.out)
    dataset = BrodenDataset(config.dataset)
    model = load_model(config.model, config.weights, config.num_classes)
    layers = tuple(resolve_layers(model, config.layers))
    if layers != config.layers:
        config = dataclasses.replace(config, layers=layers)
    _check_same_recording(run, config)
    if config.weights is None and progress:
        _note(f"no --weights: {config.model} is randomly initialised (fixed seed)")
    device = str(resolve_device(config.device))
    before = {layer: _file_id(run.cache(layer)) for layer in layers}
    with stage_timer() as timing:
        paths = record_activations(
            model, dataset, list(layers), run.path, mean=config.mean, std=config.std,
            resize=config.resize, batch_size=config.batch_size, device=device,
            dtype=config.dtype, logits=config.logits, force=force, progress=progress,
            model_spec=config.model, autocast=config.autocast,
            channels_last=config.channels_last, layout=config.layout,
            drop_tokens=config.drop_tokens, token_grid=config.token_grid,
            patch_size=config.patch_size)
    # run.json is written only once the recorder accepted the run directory, so a refused run
    # (a cache from another model, say) leaves the earlier run's record untouched.
    run.write_config(_merge_layers(run, config), device=device)
    from dissect.record import open_cache

    run.update(caches={**run.caches(),
                       **{layer: open_cache(path).fingerprint for layer, path in paths.items()}})
    if force:
        run.drop_layer_outputs(layers)
    timing.extra["layers"] = list(layers)
    run.record_stage("record", timing)
    reused = [layer for layer in layers if before[layer] is not None
              and before[layer] == _file_id(run.cache(layer))]
    recorded = [layer for layer in layers if layer not in reused]
    if reused:
        _log(summary, f"record {', '.join(reused)}: reused the complete cache")
    if recorded:
        _log(summary, f"record {', '.join(recorded)}: recorded in {timing.wall_s:.1f} s")
    return paths


def _file_id(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of a file, None when missing: tells a reused file from a rewritten one."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _earlier_layers(run: RunDir, config: RunConfig) -> tuple[dict[str, Any], list[str]]:
    """(run.json's config, or {}; the layers recorded into the run before, with a cache, that
    this recording leaves as they are)."""
    if not run.exists():
        return {}, []
    previous = run.read().get("config") or {}
    return previous, [layer for layer in previous.get("layers", [])
                      if layer not in config.layers and run.cache(layer).is_file()]


def _check_same_recording(run: RunDir, config: RunConfig) -> None:
    """OptionError when the run directory holds other layers recorded with other settings.

    run.json has one model, dataset and preprocessing for the whole run (later commands read
    them), so a layer added to a run must be recorded like the layers already there.
    """
    previous, others = _earlier_layers(run, config)
    mine = {k: v for k, v in config.to_json().items() if k in RECORDING_FIELDS}
    changed = [k for k in RECORDING_FIELDS if k in previous and previous[k] != mine[k]]
    if others and changed:
        raise OptionError(
            f"--run {run.path} holds layer(s) {', '.join(others)} recorded with other "
            f"{', '.join(changed)} ({', '.join(f'{k}={previous[k]!r}' for k in changed)}); "
            f"record into another --run, or give the same settings, or record every layer "
            f"again (--layers {' '.join([*others, *config.layers])} --force)")


def _merge_layers(run: RunDir, config: RunConfig) -> RunConfig:
    """Keep layers recorded earlier into the same run directory."""
    _, earlier = _earlier_layers(run, config)
    return dataclasses.replace(config, layers=tuple(earlier) + config.layers)


# --- tally ----------------------------------------------------------------------------------

def _fingerprint_text(fingerprint: Any) -> str:
    return fingerprint if isinstance(fingerprint, str) else json.dumps(fingerprint,
                                                                       sort_keys=True)


def _file_sha256(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as error:
        raise OptionError(f"--thresholds: cannot read {path}: {error}") from None


def checked_cache(run: RunDir, config: RunConfig, layer: str) -> Any:
    """The layer's cache info (``dissect.record.open_cache``), checked to be the cache recorded
    for ``layer`` in this run and on this run's dataset (the one fingerprint check)."""
    from dissect.record import open_cache
    from dissect.record.cache import LAYOUT_FIELDS, changed_fields

    if layer not in config.layers:
        raise OptionError(f"--layers: {layer!r} was not recorded in {run.path}; recorded: "
                          f"{', '.join(config.layers)}")
    path = run.cache(layer)
    info = open_cache(path)
    fingerprint = dict(info.fingerprint or {})
    expected = run.caches().get(layer)
    if expected is None:          # runs of earlier versions: what the config says
        expected = {"layer": layer, "model": config.model}
        fingerprint = {k: fingerprint.get(k) for k in expected}
    changed = [k for k in changed_fields(fingerprint, expected) if k not in LAYOUT_FIELDS]
    if changed:
        raise CacheError(f"{path} is not the cache recorded for layer {layer!r} in this run "
                         f"(changed: {', '.join(changed)}); record it again with `dissect "
                         f"record ... --layers {layer} --force`")
    return info


def _tally_options(config: RunConfig, info: Any) -> dict[str, Any]:
    return {"quantile": config.quantile, "thresholds": config.thresholds, "union": config.union,
            "categories": list(config.categories) if config.categories else None,
            "iou_threshold": config.iou_threshold,
            "cache": _fingerprint_text(info.fingerprint),
            "thresholds_sha256": _file_sha256(config.thresholds)}


def tally_stage(config: RunConfig, layers: Sequence[str] | None = None, *,
                force: bool = False, save_config: bool = False, progress: bool = False,
                summary: list[str] | None = None) -> dict[str, Any]:
    """Dissect each layer from its cache; a layer already tallied with the same options, the
    same cache and the same thresholds file is skipped unless ``force``.

    With ``save_config`` the config (its tally options) is written to run.json once every
    layer succeeded. Returns layer -> DissectionResult. ``progress`` shows a bar per layer;
    ``summary`` (a list) receives one line per layer: reused or computed, and the time.
    """
    from dissect.tally import dissect_layer, load_dissection

    run = RunDir(config.out)
    dataset = open_dataset(config)
    recorded_dataset = dataset.fingerprint(selection=False)
    results = {}
    stages = run.stages()
    layers = list(layers or config.layers)
    if config.thresholds and len(layers) != 1:
        raise OptionError(f"--thresholds: {config.thresholds} holds one layer's thresholds; "
                          f"choose that layer with --layers (this run has {', '.join(layers)})")
    for layer in layers:
        info = checked_cache(run, config, layer)
        if (info.fingerprint or {}).get("dataset") != recorded_dataset:
            raise CacheError(
                f"{info.path} was recorded on another dataset than {config.dataset} (its index "
                f"or label files differ); tally the dataset it was recorded on, or record again")
        options = _tally_options(config, info)
        name = f"tally:{layer}"
        if not force and stages.get(name, {}).get("options") == options and \
                run.dissection(layer).is_file():
            try:
                results[layer] = load_dissection(run.layer_dir(layer))
                _log(summary, f"tally {layer}: reused (same cache and options)")
                continue
            except CacheError:      # damaged (e.g. a disk filled up): compute it again
                pass
        with stage_timer() as timing, task_progress(f"tally {layer}", progress):
            results[layer] = dissect_layer(
                info.path, dataset, layer=layer, quantile=config.quantile,
                thresholds=config.thresholds, union=config.union,
                iou_threshold=config.iou_threshold, scheduler=config.scheduler,
                device=config.device, out_dir=run.layer_dir(layer))
        timing.extra["options"] = options
        run.record_stage(name, timing)
        _log(summary, f"tally {layer}: computed in {timing.wall_s:.1f} s")
    if save_config:
        run.write_config(config)
    return results


# --- ablation -------------------------------------------------------------------------------

def ablation_stage(config: RunConfig, layers: Sequence[str] | None = None, *,
                   save_config: bool = False, progress: bool = False,
                   summary: list[str] | None = None, **options: Any) -> dict[str, Any]:
    """Run the configured ablation studies on each layer (``ablation_layers``, else every
    recorded layer); records each layer's timing and options. ``options`` go to
    :func:`dissect.ablation.run_ablation` (e.g. ``dataset``, ``batch_size``).

    Returns layer -> {study: AblationResult}.
    """
    from dissect.ablation import run_ablation

    run = RunDir(config.out)
    results: dict[str, Any] = {}
    for layer in layers or config.ablation_layers or config.layers:
        with stage_timer() as timing:
            results[layer] = {}
            for study in config.ablation_studies:
                with task_progress(f"ablate {layer} {study}", progress):
                    results[layer][study] = run_ablation(run, layer, study, config=config,
                                                         progress=progress, **options)
        timing.extra["studies"] = list(config.ablation_studies)
        timing.extra["options"] = {k: v for k, v in config.to_json().items()
                                   if k in ("classes", "class_names", "eval_dataset", "rule",
                                            "repeats", "rank_split", "eval_split", "n",
                                            "concept", "seed")}
        run.record_stage(f"ablate:{layer}", timing)
        _log(summary, f"ablate {layer} ({', '.join(config.ablation_studies)}): computed in "
                      f"{timing.wall_s:.1f} s")
    if save_config:
        run.write_config(config)
    return results


# --- compositional labels and significance --------------------------------------------------

def _tallied(run: RunDir, config: RunConfig, layer: str, command: str) -> tuple[Any, Any]:
    """(cache info, DissectionResult) of a tallied layer; CacheError saying to tally first."""
    from dissect.tally import load_dissection

    info = checked_cache(run, config, layer)
    if not run.dissection(layer).is_file():
        raise CacheError(f"{run.dissection(layer)} does not exist: `dissect {command}` uses the "
                         f"tally's thresholds; run `dissect tally --run {run.path} --layers "
                         f"{layer}` first")
    return info, load_dissection(run.layer_dir(layer))


def compose_stage(config: RunConfig, layers: Sequence[str] | None = None, *,
                  progress: bool = False, summary: list[str] | None = None,
                  save_config: bool = False) -> dict[str, Any]:
    """Compositional labels (DESIGN.md §10) of each tallied layer, from the tally's thresholds.

    A layer whose ``compositional.json`` holds the same options and cache fingerprint is
    reused. Returns layer -> CompositionResult.
    """
    from dissect.compose import compose_layer

    run = RunDir(config.out)
    dataset = open_dataset(config)
    results = {}
    for layer in layers or config.layers:
        info, dissection = _tallied(run, config, layer, "compose")
        with stage_timer() as timing:
            results[layer] = compose_layer(
                info.path, dataset, dissection.thresholds, layer=layer,
                max_length=config.max_length, beam=config.beam, ops=config.ops,
                categories=config.compose_categories, candidates=config.candidates,
                search=config.search, negation=config.negation, scheduler=config.scheduler,
                device=config.device, fingerprint=info.fingerprint,
                out_dir=run.layer_dir(layer), progress=progress)
        timing.extra["options"] = {**results[layer].options}
        run.record_stage(f"compose:{layer}", timing)
        _log(summary, f"compose {layer}: computed in {timing.wall_s:.1f} s")
        _log(summary, format_composition(results[layer]))
    if save_config:
        run.write_config(config)
    return results


def significance_stage(config: RunConfig, layers: Sequence[str] | None = None, *,
                       progress: bool = False, summary: list[str] | None = None,
                       save_config: bool = False) -> dict[str, Any]:
    """Permutation p-values, q-values and baselines (DESIGN.md §12) of each tallied layer's
    labels, with the tally's thresholds, union rule and IoU cut-off. A layer whose
    ``significance.h5`` holds the same options and cache is reused. Returns layer ->
    SignificanceResult."""
    from dissect.significance import (
        load_significance,
        significance_is_current,
        significance_layer,
        significance_options,
    )

    run = RunDir(config.out)
    dataset = open_dataset(config)
    results = {}
    for layer in layers or config.layers:
        info, dissection = _tallied(run, config, layer, "significance")
        options = significance_options(
            dissection.thresholds, permutations=config.permutations,
            seed=config.significance_seed, alpha=config.alpha, ci=config.ci,
            select_split=config.select_split, eval_split=config.significance_eval_split,
            union=dissection.union, iou_threshold=dissection.iou_threshold,
            categories=tuple(dataset.categories))
        if significance_is_current(run.layer_dir(layer), options, info.fingerprint):
            results[layer] = load_significance(run.layer_dir(layer))
            _log(summary, f"significance {layer}: reused (same cache and options)")
            continue
        with stage_timer() as timing:
            results[layer] = significance_layer(
                info.path, dataset, dissection.thresholds, layer=layer,
                permutations=config.permutations, seed=config.significance_seed,
                alpha=config.alpha, ci=config.ci, select_split=config.select_split,
                eval_split=config.significance_eval_split, union=dissection.union,
                iou_threshold=dissection.iou_threshold, scheduler=config.scheduler,
                device=config.device, fingerprint=info.fingerprint,
                out_dir=run.layer_dir(layer), progress=progress)
        timing.extra["options"] = options
        run.record_stage(f"significance:{layer}", timing)
        _log(summary, f"significance {layer}: computed in {timing.wall_s:.1f} s")
        _log(summary, format_significance(results[layer]))
    if save_config:
        run.write_config(config)
    return results


def format_composition(result: Any) -> str:
    """One line: how much the formulas raise IoU over the best single label."""
    units = [u for u in result.units if u.best is not None]
    if not units:
        return f"{result.layer}: no unit has a formula with IoU > 0"
    gains = [u.best.iou - u.label_iou for u in units]
    longer = sum(u.best.formula.length > 1 for u in units)
    return (f"{result.layer}: formulas for {len(units)}/{len(result.units)} units, mean IoU gain "
            f"over the single label {sum(gains) / len(gains):+.4f}"
            + (f", {longer} with more than one leaf" if longer else ""))


def format_significance(result: Any) -> str:
    """One line: labels significant at the chosen false discovery rate."""
    labeled = result.unit_label > 0
    alpha = result.options.get("alpha", "alpha")
    return (f"{result.layer}: {int(result.significant.sum())}/{int(labeled.sum())} unit labels "
            f"significant (BH q <= {alpha}, {result.options.get('permutations')} permutations, "
            f"union {result.options.get('union')})")


# --- explanations ---------------------------------------------------------------------------

def _explain_inputs(config: RunConfig, dataset: Any, files: Sequence[str | os.PathLike[str]],
                    indices: Sequence[int]) -> tuple[Any, list[Any], list[str]]:
    """Images preprocessed as recorded: float32 (B, 3, H, W), the uint8 (H, W, 3) pictures
    at the same size (for the overlays), and their ids (file or dataset image names)."""
    import numpy as np
    import torch
    from PIL import Image

    from dissect.data import image_tensor
    from dissect.data.broden import read_rgb

    size = tuple(config.resize) if config.resize is not None else tuple(dataset.image_size)
    pixels, ids = [], []
    for path in files:
        pixels.append(read_rgb(path))
        ids.append(str(path))
    names = dataset.image_names
    for index in indices:
        pixels.append(dataset.load_image(int(index)))
        ids.append(names[int(index)])
    tensors, pictures = [], []
    for picture in pixels:
        tensor = image_tensor(picture, config.mean, config.std, size)  # type: ignore[arg-type]
        tensors.append(tensor)
        shown = picture if picture.shape[:2] == size else np.asarray(
            Image.fromarray(picture).resize((size[1], size[0]), Image.BILINEAR))
        pictures.append(np.ascontiguousarray(shown, dtype=np.uint8))
    return torch.stack(tensors), pictures, ids


def _explain_class_names(config: RunConfig, dataset: Any, n_outputs: int) -> list[str] | None:
    """Names of the model outputs: the run's --class-names file, else the class category's
    labels when there is one label per output (as the ablation study maps them), else None."""
    from dissect.ablation.labels import read_class_names

    if config.class_names:
        return read_class_names(config.class_names)
    category = config.classes or "scene"
    if category not in tuple(dataset.vocab.categories):
        return None
    numbers = sorted(int(n) for n in dataset.vocab.labels_in(category))
    if len(numbers) != n_outputs:
        return None
    return [dataset.vocab.names[n] for n in numbers]


def _class_index(value: str | int, class_names: Sequence[str] | None, n_outputs: int) -> int:
    """An output index from a number or a class name (OptionError naming the choices)."""
    text = str(value)
    if text.isdigit():
        index = int(text)
    elif class_names is not None and text in class_names:
        index = list(class_names).index(text)
    else:
        known = f"; class names: {', '.join(class_names[:20])}" if class_names else \
            " (the run has no class names: give an output index, or --class-names FILE)"
        raise OptionError(f"class {text!r} is not a model output{known}")
    if not 0 <= index < n_outputs:
        raise OptionError(f"class {index} is not a model output (0..{n_outputs - 1})")
    return index


def explain_stage(run_dir: str | os.PathLike[str], layer: str, *,
                  images: Sequence[str | os.PathLike[str]] = (),
                  dataset_images: int | None = None, class_: str | int | None = None,
                  target: str | int | None = None, method: str = "grad_x_act",
                  group_by: str = "label", iou_threshold: float | None = None,
                  top_k: int = 5, attributions: Sequence[str] = ("saliency", "gradcam"),
                  name: str | None = None, batch_size: int | None = None,
                  device: str | None = None, selection: str = "true",
                  progress: bool = False, summary: list[str] | None = None) -> Path:
    """Explain predictions of a run's model by the dissected concepts of ``layer`` (DESIGN §11).

    Exactly one source: ``images`` (image files, preprocessed as recorded in run.json),
    ``dataset_images`` (N images of the run's dataset, evenly spaced), or ``class_`` (a class's
    concept profile over the dataset images labeled as it, or predicted as it with
    ``selection='predicted'``). Writes ``explain/<name>.json`` with the heatmap PNGs (images)
    or ``explain/classes/<name>.json`` (a class profile); returns that path.
    """
    import numpy as np
    import torch

    from dissect.data import BrodenDataset
    from dissect.explain import explain_class, explain_prediction, input_attributions
    from dissect.explain.files import write_explanations
    from dissect.record import LayoutOptions, load_model, resolve_device

    sources = [bool(images), dataset_images is not None, class_ is not None]
    if sum(sources) != 1:
        raise OptionError("explain: give exactly one of --images FILE ..., --dataset-images N "
                          "and --class K")
    if dataset_images is not None and (isinstance(dataset_images, bool)
                                       or not isinstance(dataset_images, int)
                                       or dataset_images < 1):
        raise OptionError(f"--dataset-images: expected a positive number, got "
                          f"{dataset_images!r}")
    run = RunDir(run_dir)
    config = run.config()
    if layer not in config.layers:
        raise OptionError(f"--layer {layer!r} is not a layer of the run {run.path} "
                          f"(recorded: {', '.join(config.layers)})")
    _, dissection = _tallied(run, config, layer, "explain")
    dataset = BrodenDataset(config.dataset)
    dev = resolve_device(device if device is not None else config.device)
    model = load_model(config.model, config.weights, config.num_classes).eval().to(dev)
    layout = LayoutOptions(config.layout, config.drop_tokens, config.token_grid,
                           config.patch_size)
    n_outputs = _n_outputs(model, dataset, config, dev)
    class_names = _explain_class_names(config, dataset, n_outputs)
    common = dict(method=method, group_by=group_by, iou_threshold=iou_threshold,
                  token_layout=layout, device=dev, class_names=class_names)
    with stage_timer() as timing:
        if class_ is not None:
            index = _class_index(class_, class_names, n_outputs)
            labels = _explain_labels(config, dataset, class_names, n_outputs) \
                if selection == "true" else None
            profile = explain_class(
                model, layer, _dataset_batches(config, dataset, labels,
                                               batch_size or config.batch_size,
                                               f"explain {layer} class {index}", progress),
                dissection, index, selection=selection, **common)
            if profile.n_images == 0:
                raise OptionError(f"explain --class {class_}: no image of the dataset is "
                                  f"{'labeled' if selection == 'true' else 'predicted'} as "
                                  f"class {index}")
            stem = name or f"class_{class_names[index] if class_names else index}"
            path = _write_profile(run, _safe_name(stem), profile.to_dict())
            timing.extra["explain"] = {"layer": layer, "class": index,
                                       "images": profile.n_images}
            _log(summary, f"explain {layer}: class {profile.target_name or index} over "
                          f"{profile.n_images} images: "
                          + _shares(profile.concepts, profile.unlabeled, top_k))
        else:
            indices = [] if dataset_images is None else sorted(set(np.linspace(
                0, len(dataset) - 1, min(dataset_images, len(dataset))).round().astype(int)))
            tensors, pictures, ids = _explain_inputs(config, dataset, images, indices)
            chosen = None if target is None else _class_index(target, class_names, n_outputs)
            explanations = explain_prediction(model, layer, tensors, dissection, chosen,
                                              top_k=top_k, image_ids=ids,
                                              batch_size=batch_size or config.batch_size,
                                              **common)
            step = batch_size or config.batch_size
            maps: dict[str, Any] = {}
            for start in range(0, len(tensors), step) if attributions else ():
                part = input_attributions(
                    model, tensors[start:start + step].to(dev),
                    [e.target for e in explanations[start:start + step]], tuple(attributions),
                    layer=layer, token_layout=layout)
                for kind, values in part.items():
                    maps[kind] = values if kind not in maps else torch.cat([maps[kind], values])
            stem = name or ("dataset" if dataset_images is not None else "images")
            path = write_explanations(explanations, run.explain_dir, _safe_name(stem),
                                      images_uint8=pictures, attributions=maps, top_k=top_k)
            timing.extra["explain"] = {"layer": layer, "images": len(explanations)}
            for e in explanations:
                _log(summary, f"explain {e.image}: {e.target_name or e.target} "
                              f"(logit {e.logit:.3f}): "
                              + _shares(e.concepts, e.unlabeled, top_k))
    run.record_stage(f"explain:{path.stem}", timing)
    return path


def _shares(concepts: Sequence[Any], unlabeled: Any, top_k: int) -> str:
    """``tabletop 11%, fabric 9%; unlabeled 70%``: the top positive concept shares."""
    top = [f"{c.label} {c.share:.0%}" for c in concepts if c.contribution > 0][:top_k]
    return (", ".join(top) or "no concept with a positive contribution") + \
        f"; unlabeled {unlabeled.share:.0%}"


def _n_outputs(model: Any, dataset: Any, config: RunConfig, device: Any) -> int:
    """The number of model outputs, from one forward of the first dataset image."""
    import torch

    from dissect.errors import ModelError
    from dissect.record.models import first_tensor

    tensors, _, _ = _explain_inputs(config, dataset, (), [0])
    with torch.no_grad():
        out = first_tensor(model(tensors.to(device)))
    if out is None or out.dim() != 2:
        raise ModelError(f"{config.model}: explanations need (B, C) class scores as the model "
                         f"output, got {None if out is None else tuple(out.shape)}")
    return int(out.shape[1])


def _explain_labels(config: RunConfig, dataset: Any, class_names: Sequence[str] | None,
                    n_outputs: int) -> Any:
    """(N,) model-output class of each dataset image (-1: none), as the ablation reads it."""
    from dissect.ablation.labels import load_class_labels

    source = config.classes or "scene"
    if source not in tuple(dataset.vocab.categories) and not Path(source).is_file():
        raise OptionError(f"explain --class: the dataset has no {source!r} category to find "
                          f"the class's images; pass --selection predicted (images predicted "
                          f"as the class) or set the run's --classes")
    return load_class_labels(source, dataset, class_names=class_names, n_outputs=n_outputs)[1]


def _dataset_batches(config: RunConfig, dataset: Any, labels: Any, batch_size: int,
                     description: str = "", progress: bool = False) -> Any:
    """(images, labels) batches of every dataset image (labels -1 when none are known), with a
    progress bar over the images when ``progress``."""
    import numpy as np
    from tqdm.auto import tqdm

    from dissect.data import make_loader

    known = np.full(len(dataset), -1) if labels is None else np.asarray(labels)
    loader = make_loader(dataset, mean=config.mean, std=config.std, resize=config.resize,
                         batch_size=batch_size, num_workers=0)
    with tqdm(total=len(dataset), desc=description, unit="img", disable=not progress,
              leave=False) as bar:
        for images, index in loader:
            yield images, known[np.asarray(index)]
            bar.update(len(index))


def _safe_name(text: str) -> str:
    """A file stem of letters, digits, '.', '_', '-' (others become '_')."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]", "_", text).strip(".")[:128] or "explain"


def _write_profile(run: RunDir, stem: str, record: dict[str, Any]) -> Path:
    """``explain/classes/<stem>.json``, written under a temporary name and renamed."""
    folder = run.class_profiles_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.json"
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=1, allow_nan=False, default=float))
    os.replace(partial, path)
    return path


# --- report ---------------------------------------------------------------------------------

def report_stage(run_dir: str | os.PathLike[str], *, summary: list[str] | None = None
                 ) -> Path:
    """Render the HTML report of a run; returns the path of index.html."""
    run = RunDir(run_dir)
    run.config()  # a clear error before anything else when run_dir is not a run
    from dissect.report import render_report

    with stage_timer() as timing:
        index = render_report(run.path)
    run.record_stage("report", timing)
    _log(summary, f"report: written in {timing.wall_s:.1f} s")
    return index


def _log(summary: list[str] | None, line: str) -> None:
    if summary is not None:
        summary.append(line)


# --- the whole pipeline ---------------------------------------------------------------------

def run_pipeline(config: RunConfig, *, force: bool = False, progress: bool = True,
                 summary: list[str] | None = None) -> Path:
    """Record, tally, (compose, significance, ablate,) report. Resumes whatever is already
    done. Returns index.html.

    ``summary`` (a list) receives the lines of what was reused and what computed, with times,
    then one detector line per layer (naming the quantile and union rule used).
    """
    record_stage(config, force=force, progress=progress, summary=summary)
    saved = RunDir(config.out).config()
    config = dataclasses.replace(saved, thresholds=config.thresholds)
    results = tally_stage(config, force=force, progress=progress, summary=summary)
    if config.compose:
        compose_stage(config, progress=progress, summary=summary)
    if config.significance:
        significance_stage(config, progress=progress, summary=summary)
    if config.ablate:
        ablation_stage(config, progress=progress, summary=summary)
    index = report_stage(config.out, summary=summary)
    if summary is not None:
        from dissect.tally import format_detectors

        summary.extend(format_detectors(result) for result in results.values())
    return index
