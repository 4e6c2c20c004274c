"""run_ablation: one ablation study of one layer of a run directory, in one call.

The model, weights, preprocessing and dataset come from the run's
:class:`~dissect.config.RunConfig` (``run.json``, read through :class:`~dissect.rundir.RunDir`);
the cached activations of the layer (``run_dir/cache/<layer>.h5``) feed the suffix path and the
``mean`` rule; results go to ``run_dir/<layer>/ablation.h5`` and ``ablation.csv`` (and
``importance.csv`` for the single and top-N studies).

With an evaluation set (``eval_dataset``, ``--eval-dataset``: an ImageFolder tree or a
Broden-format dataset, DESIGN §13) the effects are measured on that set instead: its activations
at the layer are recorded once into the run (``RunDir.eval_cache(layer, name)``, their own
fingerprint; reused on later calls, recorded again when the set or the model changed) and feed the
suffix path. What needs the dissection (the concept study's units, the labels in importance.csv)
still comes from the run's dissection of the layer, and the ``mean`` rule's unit means from the
run's layer cache. ``ablation.json`` and ``ablation.h5`` name the evaluation set
(``eval_dataset``, ``eval_kind``, ``eval_images``, ``eval_classes``, ``eval_class_names``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dissect.ablation.hooks import check_rule, compute_unit_means, find_module
from dissect.ablation.labels import (
    FOLDERS,
    PREDICTED,
    folder_labels,
    load_class_labels,
    read_class_names,
)
from dissect.ablation.result import (
    AblationResult,
    importance_table,
    rank_units,
    write_importance_csv,
)
from dissect.ablation.sources import DatasetImages, EvalSet, open_eval_set
from dissect.ablation.study import USE_SUFFIX, AblationStudy
from dissect.config import STUDIES, RunConfig
from dissect.errors import CacheError, OptionError
from dissect.rundir import RunDir

ALL_SPLITS = "all"


def parse_sizes(n: Sequence[int] | str | int | None) -> list[int] | None:
    """Set sizes from ``[1, 2, 4]``, ``'1,2,4'`` or ``4``; OptionError naming a bad entry."""
    if n is None:
        return None
    if isinstance(n, (int, np.integer)) and not isinstance(n, bool):
        return [int(n)]
    items = [item.strip() for item in n.split(",")] if isinstance(n, str) else list(n)
    sizes = []
    for item in items:
        try:
            value = int(item)
        except (TypeError, ValueError):
            raise OptionError(f"option n: {item!r} is not an integer; expected sizes like "
                              "1,2,4,8") from None
        sizes.append(value)
    if not sizes:
        raise OptionError("option n: no set size given; expected sizes like 1,2,4,8")
    return sizes


def split_rows(dataset: Any, split: str | None) -> np.ndarray:
    """Rows of a split (``None`` or 'all': every image); OptionError listing the splits."""
    if split is None or split == ALL_SPLITS:
        return np.arange(len(dataset), dtype=np.int64)
    return np.asarray(dataset.subset(split), dtype=np.int64)


def concept_units(dissection: Any, concept: str, iou_threshold: float | None = None
                  ) -> np.ndarray:
    """Units whose dissection label is ``concept`` with ``unit_iou >= iou_threshold``.

    Parameters
    ----------
    dissection : DissectionResult (``unit_label`` (U,), ``unit_iou`` (U,), ``label_names`` (L,),
        ``iou_threshold``)
    concept : label name
    iou_threshold : default ``dissection.iou_threshold``

    Returns
    -------
    (k,) int64 sorted unit indices. OptionError when the concept is no label (close names listed)
    or no unit detects it at this threshold (the detected concepts listed).
    """
    names = [str(name) for name in dissection.label_names]
    threshold = float(dissection.iou_threshold if iou_threshold is None else iou_threshold)
    if not concept or concept not in names:
        close = difflib.get_close_matches(concept, [n for n in names if n], n=5)
        hint = f"close names: {', '.join(close)}" if close else "no close name"
        raise OptionError(f"option concept: unknown concept {concept!r}; {hint}")
    unit_names = np.array([names[int(label)] for label in dissection.unit_label], dtype=object)
    detected = np.asarray(dissection.unit_iou, dtype=np.float64) >= threshold
    units = np.flatnonzero((unit_names == concept) & detected).astype(np.int64)
    if units.size == 0:
        present = sorted(set(unit_names[detected].tolist()))
        listed = ", ".join(present[:20]) + (" ..." if len(present) > 20 else "")
        raise OptionError(f"option concept: no unit is labeled {concept!r} with IoU >= "
                          f"{threshold}; concepts detected: {listed or 'none'}")
    return units


def check_cache_matches(info: Any, wanted: dict[str, Any]) -> None:
    """CacheError naming the fingerprint fields of a cache that differ from ``wanted``.

    ``wanted`` maps fingerprint fields (``weights``, ``dataset``, ``mean``, ``std``, ``resize``)
    to the values of this ablation; fields the cache does not record are not compared.
    """
    from dissect.record.cache import changed_fields

    stored = info.fingerprint or {}
    changed = changed_fields({k: v for k, v in stored.items() if k in wanted},
                             {k: v for k, v in wanted.items() if k in stored})
    if changed:
        described = ", ".join(f"{key} (cache {str(stored[key])[:24]!r}, now "
                              f"{str(wanted[key])[:24]!r})" for key in changed)
        raise CacheError(f"cache {info.path} was recorded with another {described}; record the "
                         "layer again (`dissect record ... --force`), or from Python pass "
                         "use_cache=False to run the whole model")


def _load_dissection(run: RunDir, layer: str) -> Any:
    if not run.dissection(layer).is_file():
        return None
    from dissect.tally import load_dissection

    return load_dissection(run.layer_dir(layer))


class ClassOrderWarning(UserWarning):
    """The unablated model is at or below chance on its own evaluation labels."""


def class_order_warning(result: AblationResult, n_classes: int, source: Any,
                        labels_of: str | None = None) -> str | None:
    """A warning text when the baseline's accuracy over the labeled evaluation images (the
    share of images whose predicted class is their class) is at or below chance (1 / C):
    the model outputs are then probably in another order than the labels. None otherwise, and
    for ``classes='predicted'`` (correct by definition). ``labels_of`` names where the labels
    come from in the text (default: ``repr(source)``)."""
    if str(source) == PREDICTED or n_classes < 2:
        return None
    n = np.asarray(result.counts.n_true, dtype=np.float64)
    if n.sum() == 0:
        return None
    recall = np.nan_to_num(result.metrics["recall"][0], nan=0.0)
    accuracy = float((recall * n).sum() / n.sum())
    if accuracy > 1.0 / n_classes:
        return None
    return (f"the unablated model classifies {accuracy:.1%} of the {int(n.sum())} labeled "
            f"evaluation images correctly, at or below chance (1/{n_classes} = "
            f"{1.0 / n_classes:.1%}): its outputs are probably in another order than the "
            f"class labels of {labels_of or repr(source)}; pass --class-names FILE (one name "
            f"per model output, in output order), or --classes predicted")


def _write_meta(path: Path, study: str, info: dict[str, Any]) -> None:
    """Keep one study's options and warnings in ``ablation.json`` (written whole, atomically)."""
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        data = {}
    data[study] = {k: (v if isinstance(v, (str, int, float, bool, type(None), list)) else str(v))
                   for k, v in info.items()}
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    partial.replace(path)


def run_ablation(run: RunDir | str | os.PathLike[str], layer: str, study: str, *,
                 config: RunConfig | None = None,
                 dataset: str | os.PathLike[str] | None = None, classes: str | None = None,
                 class_names: Sequence[str] | str | os.PathLike[str] | None = None,
                 n: Sequence[int] | str | int | None = None, concept: str | None = None,
                 repeats: int | None = None, seed: int | None = None,
                 rank_split: str | None = None, eval_split: str | None = None,
                 rank_by: str = "recall", rule: str | None = None,
                 iou_threshold: float | None = None, scheduler: str | None = None,
                 use_cache: bool | str = "auto", batch_size: int | None = None,
                 sets_per_batch: int | None = None, device: str | None = None,
                 target_classes: Sequence[str] | None = None, top: int = 4,
                 save: bool = True, eval_dataset: str | os.PathLike[str] | None = None,
                 progress: bool = False) -> AblationResult:
    """Run one ablation study on ``layer`` of a run and save it.

    Parameters
    ----------
    run : the run directory (a RunDir or a path with ``run.json``)
    layer : dotted layer name
    study : 'single' (every unit alone) | 'topn' (per class, its top-N units removed, study
        'topn', and kept alone, study 'keep'; ranked on ``rank_split``) | 'concept' (all units
        labeled ``concept`` by the dissection, IoU >= ``iou_threshold``) | 'random' (``repeats``
        random sets of each size, ``seed``)
    config : the run's RunConfig (default: read from ``run.json``); it gives the model,
        weights, preprocessing, dataset, and the default of every option below left None
    dataset : dataset directory (default: the run's)
    classes : class source (:func:`~dissect.ablation.labels.load_class_labels`): an image-level
        category, a CSV ``image,class`` or 'predicted'; default 'scene' when the dataset has that
        category, else 'predicted'
    class_names : model-output class names (a sequence, or a text file with one name per line)
    n : set sizes for topn/random (list, '1,2,4' or int; default 1, 2, 4, ... <= U / 2)
    repeats, seed : random sets per size and their seed
    rank_split, eval_split : splits of the dataset ('all' or None: every image)
    rank_by : metric whose single-unit drop ranks units (default 'recall', see
        :func:`~dissect.ablation.result.rank_units`)
    rule : 'zero' | 'mean' (the unit's mean activation over the dataset, from the cache)
    scheduler : 'threads' | 'processes' | 'synchronous' | 'tcp://host:port'
    use_cache : 'auto' (run only the part after the layer from the cache when the model can be
        split there) | True (require it) | False (full forward with hooks)
    batch_size : images per forward (default: the run's); sets_per_batch: sets per Dask task
    target_classes : for topn, the classes to build sets for (default: every class with images)
    top : for importance.csv, a unit counts for a class when among its ``top`` most damaging
    save : write ``<layer>/ablation.h5``, ``ablation.csv``, ``ablation.json`` (options and
        warnings) and, for single and topn, ``importance.csv`` from that study's single-unit
        ranking (on the eval split for single, on the rank split for topn)
    eval_dataset : measure the effects on this set instead of the dissection dataset (default
        ``config.eval_dataset``): a directory holding ``index.csv`` is a Broden-format dataset
        (classes from ``classes`` as for the dissection dataset, splits as there), any other an
        ImageFolder tree (classes: its folders, source 'folders', mapped to model outputs by
        ``class_names`` when given, else the k-th sorted folder is output k; ``classes`` may
        also be 'predicted' or a CSV; every image is in split 'val', so a topn study needs
        ``rank_split`` 'val' or 'all'). Its activations are recorded into the run
        (``RunDir.eval_cache``) when the suffix path can use them.
    progress : show the recorder's progress bar while an evaluation set is recorded

    Returns
    -------
    AblationResult (row 0 = baseline) with ``h5_path``/``csv_path``/``importance_path`` set when
    saved. When the unablated model's accuracy on the labeled evaluation images is at or below
    chance, a warning is issued (``warnings.warn``, category :class:`ClassOrderWarning`) and kept
    in ``info['warning']`` and ``ablation.json``: the outputs are probably in another order than
    the labels.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    config = config if config is not None else run.config()
    classes = classes if classes is not None else config.classes
    class_names = class_names if class_names is not None else config.class_names
    n = n if n is not None else (list(config.n) if config.n else None)
    concept = concept if concept is not None else config.concept
    repeats = repeats if repeats is not None else config.repeats
    seed = seed if seed is not None else config.seed
    rank_split = rank_split if rank_split is not None else config.rank_split
    eval_split = eval_split if eval_split is not None else config.eval_split
    rule = rule if rule is not None else config.rule
    scheduler = scheduler if scheduler is not None else config.scheduler
    if study not in STUDIES:
        raise OptionError(f"option study: unknown study {study!r}; allowed: {', '.join(STUDIES)}")
    check_rule(rule)
    if use_cache not in USE_SUFFIX:
        raise OptionError(f"option use_cache: {use_cache!r}; allowed: 'auto', True, False")
    if study == "concept" and not concept:
        raise OptionError("option concept: study 'concept' needs a concept name (--concept NAME)")
    sizes = parse_sizes(n)
    eval_dataset = eval_dataset if eval_dataset is not None else config.eval_dataset
    folders = False
    if eval_dataset is not None:
        eval_set = open_eval_set(eval_dataset, class_names)  # a Broden set does not use them
        folders = eval_set.kind == "imagefolder"
    else:
        eval_set = None
    base, data, eval_cache = _open_study(
        run, config, layer, dataset=dataset, rule=rule, scheduler=scheduler,
        use_cache=use_cache, batch_size=batch_size, sets_per_batch=sets_per_batch,
        device=device, eval_set=eval_set, progress=progress)
    if classes is not None:
        source = classes
    elif folders:
        source = FOLDERS
    else:
        source = "scene" if "scene" in tuple(data.vocab.categories) else PREDICTED
    if folders and str(source) == FOLDERS:
        label_names, y = folder_labels(data, base.n_outputs, class_names=class_names)
    else:
        names = read_class_names(class_names) if class_names is not None else None
        predictions = base.predict() if str(source) == PREDICTED else None
        label_names, y = load_class_labels(source, data, class_names=names,
                                           n_outputs=base.n_outputs, predictions=predictions)
    runner = base.with_labels(y, label_names)
    eval_rows = split_rows(data, eval_split)
    info: dict[str, Any] = {"classes": str(source), "eval_split": eval_split or ALL_SPLITS}
    info["class_names"] = str(class_names) if isinstance(class_names, (str, os.PathLike)) \
        else None
    info.update(eval_info(data, label_names, eval_set))
    if eval_cache is not None:
        info["eval_cache"] = eval_cache.relative_to(run.path).as_posix() \
            if eval_cache.is_relative_to(run.path) else str(eval_cache)
    dissection = _load_dissection(run, layer) if study != "random" else None

    ranking = damage = None
    if study == "single":
        result = runner.single(eval_rows, info=info)
        ranking, damage = rank_units(result, rank_by)
    elif study == "topn":
        info["rank_split"] = rank_split or ALL_SPLITS
        result = runner.topn(eval_rows, sizes, rank_indices=_rank_rows(data, rank_split,
                                                                       eval_set),
                             classes=target_classes, rank_by=rank_by, info=info)
        ranking, damage = result.ranking, result.damage
    elif study == "concept":
        if dissection is None:
            raise CacheError(f"{run.dissection(layer)} does not exist; run "
                             f"`dissect tally --run {run.path} --layers {layer}` first")
        threshold = iou_threshold if iou_threshold is not None else dissection.iou_threshold
        info["iou_threshold"] = float(threshold)
        result = runner.concept(concept_units(dissection, str(concept), threshold),
                                str(concept), eval_rows, info=info)
    else:
        result = runner.random(sizes, repeats, seed, eval_rows, info=info)
    labels_of = f"the class folders of {data.root}" if folders and str(source) == FOLDERS \
        else None
    warning = class_order_warning(result, len(label_names), source, labels_of)
    if warning:
        warnings.warn(warning, ClassOrderWarning, stacklevel=2)
        result.info["warning"] = warning
    if not save:
        return result
    h5_path, csv_path = result.save(run.layer_dir(layer))
    _write_meta(run.ablation_meta(layer), study, result.info)
    importance_path = None
    if ranking is not None:
        rows = importance_table(ranking, result.class_names, damage=damage,
                                dissection=dissection, top=top)
        importance_path = write_importance_csv(rows, run.importance(layer))
    return dataclasses.replace(result, h5_path=h5_path, csv_path=csv_path,
                               importance_path=importance_path)


def eval_info(data: Any, class_names: Sequence[str], eval_set: EvalSet | None
              ) -> dict[str, Any]:
    """What ablation.json and ablation.h5 record of the evaluation set: ``eval_dataset`` (its
    path; the dissection dataset's when no other set is given), ``eval_kind`` ('imagefolder' |
    'broden'), ``eval_images`` (its number of images), ``eval_classes`` (number of classes) and
    ``eval_class_names`` (``;``-separated, in model-output order)."""
    if eval_set is not None:
        info = eval_set.info()
    else:
        info = {"eval_dataset": str(data.root), "eval_kind": "broden", "eval_images": len(data)}
    info["eval_classes"] = len(class_names)
    info["eval_class_names"] = ";".join(str(name) for name in class_names)
    return info


def _rank_rows(data: Any, rank_split: str | None, eval_set: EvalSet | None) -> np.ndarray:
    """Rows of the rank split; for an ImageFolder set, an OptionError that says how to rank."""
    if eval_set is None or eval_set.kind != "imagefolder" or rank_split in (None, ALL_SPLITS) \
            or rank_split == data.split:
        return split_rows(data, rank_split)
    raise OptionError(f"option rank_split: the evaluation set {eval_set.path} is an ImageFolder "
                      f"tree whose images are all in split {data.split!r}, so it has no split "
                      f"{rank_split!r} to rank units on; pass --rank-split {data.split} (or "
                      "all) to rank on the evaluation images themselves, or give a "
                      "Broden-format evaluation set with that split")


#: Fingerprint fields of an evaluation-set cache that, when changed, make it be recorded again
#: (the set's content, the model or the preprocessing changed).
EVAL_CACHE_FIELDS = ("weights", "model", "layer", "dataset", "mean", "std", "resize", "dtype")


def _stored_fingerprint(path: Path) -> dict[str, Any] | None:
    """The fingerprint of a (partial) cache file; None when absent or unreadable (the recorder
    then rebuilds it or names the problem)."""
    if not path.exists():
        return None
    import h5py

    from dissect.record.cache import read_fingerprint

    try:
        with h5py.File(path, "r") as file:
            return read_fingerprint(file)
    except OSError:
        return None


def record_eval_cache(run: RunDir, config: RunConfig, model: Any, layer: str,
                      eval_set: EvalSet, *, device: str | None = None,
                      progress: bool = False) -> Path:
    """Record the activations of ``layer`` on an evaluation set into the run, or reuse them.

    The cache is ``run.eval_cache(layer, eval_set.name)``, written by
    :func:`dissect.record.record_activations` (run directory ``run.eval_dir(eval_set.name)``) with
    the run's model spec, preprocessing (mean, std, resize), dtype, batch size, autocast and
    layout options, so its fingerprint is that of the run's caches with the evaluation set's
    dataset fingerprint. A complete cache with the same fingerprint is reused, a partial one
    resumed; one whose :data:`EVAL_CACHE_FIELDS` differ (the set's files, the model weights or
    the preprocessing changed) is recorded again from scratch.

    Returns
    -------
    The path of the complete cache. CacheError (naming the cache and what to remove) when the
    recorder refuses it for another reason (e.g. a cache written by another dissect version).
    """
    from dissect.record import SmallMapsWarning, record_activations, weights_hash
    from dissect.record.cache import changed_fields, partial_path

    path = run.eval_cache(layer, eval_set.name)
    resize = config.resize
    wanted = {"weights": weights_hash(model), "model": config.model, "layer": layer,
              "dataset": eval_set.dataset.fingerprint(),
              "mean": [float(v) for v in config.mean], "std": [float(v) for v in config.std],
              "resize": [int(v) for v in resize] if resize is not None else None,
              "dtype": config.dtype}
    stale: list[str] = []
    for candidate in (path, partial_path(path)):
        stored = _stored_fingerprint(candidate)
        if stored is not None:
            stale += changed_fields({k: stored.get(k) for k in EVAL_CACHE_FIELDS}, wanted)
    try:
        with warnings.catch_warnings():
            # the small-maps note is about segmentation masks: an evaluation set has none
            warnings.simplefilter("ignore", SmallMapsWarning)
            paths = record_activations(
                model, eval_set.dataset, [layer], run.eval_dir(eval_set.name),
                mean=config.mean, std=config.std, resize=resize,
                batch_size=config.batch_size, device=device, dtype=config.dtype,
                force=bool(stale), progress=progress, model_spec=config.model,
                autocast=config.autocast, channels_last=config.channels_last,
                layout=config.layout, drop_tokens=config.drop_tokens,
                token_grid=config.token_grid, patch_size=config.patch_size)
    except CacheError as error:
        raise CacheError(f"the activations of the evaluation set {eval_set.path} at layer "
                         f"{layer!r} cannot be recorded into {path}: {error}. Remove "
                         f"{run.eval_dir(eval_set.name)} to record them again") from error
    return Path(paths[layer])


def _open_study(run: RunDir, config: RunConfig, layer: str, *,
                dataset: str | os.PathLike[str] | None, rule: str, scheduler: str,
                use_cache: bool | str, batch_size: int | None, sets_per_batch: int | None,
                device: str | None, eval_set: EvalSet | None = None,
                progress: bool = False) -> tuple[AblationStudy, Any, Path | None]:
    """The run's model, dataset (or evaluation set) and layer cache as an AblationStudy with no
    labels yet; also the evaluation-set cache it reads (None without one)."""
    from dissect.ablation.suffix import split_at_layer
    from dissect.data import BrodenDataset
    from dissect.record import (
        CacheReader,
        load_model,
        open_cache,
        resolve_device,
        weights_hash,
    )

    model = load_model(config.model, config.weights, config.num_classes)
    find_module(model, layer)
    device_name = str(resolve_device(device if device is not None else config.device))
    model = model.to(device_name)
    run_data = BrodenDataset(dataset if dataset is not None else config.dataset) \
        if eval_set is None or rule == "mean" else None
    data = eval_set.dataset if eval_set is not None else run_data
    mean, std, resize = config.mean, config.std, config.resize

    reader = None
    path = run.cache(layer)
    if rule == "mean" or (eval_set is None and (use_cache is True or path.is_file())):
        info = open_cache(path)  # CacheError when missing or incomplete
        if info.n_images != len(run_data):
            raise CacheError(f"cache {path} holds {info.n_images} images but the dataset "
                             f"{run_data.root} has {len(run_data)}; record the layer on this "
                             "dataset")
        check_cache_matches(info, {
            "weights": weights_hash(model), "dataset": run_data.fingerprint(),
            "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "resize": list(resize) if resize is not None else None})
        reader = CacheReader(path)
    means = compute_unit_means(reader) if rule == "mean" and reader is not None else None
    activations, eval_cache = (reader if use_cache is not False else None), None
    if eval_set is not None:
        activations = None
        if use_cache is True or (use_cache == "auto" and split_at_layer(model, layer) is not None):
            eval_cache = record_eval_cache(run, config, model, layer, eval_set,
                                           device=device_name, progress=progress)
            activations = CacheReader(eval_cache)
    study = AblationStudy(model, layer, np.full(len(data), -1, np.int64), (),
                          images=DatasetImages(data, mean, std, resize),
                          activations=activations, rule=rule,
                          means=means, batch_size=int(batch_size or config.batch_size),
                          sets_per_batch=sets_per_batch, scheduler=scheduler, device=device_name,
                          use_suffix=use_cache)
    return study, data, eval_cache
