"""AblationStudy: evaluate unit sets of one layer on labeled images (Bau et al., PNAS 2020).

Every study returns an :class:`~dissect.ablation.result.AblationResult` whose row 0 is the
unablated baseline, evaluated by the same engine as the unit sets (so from the same cached
activations on the suffix path). Metrics per class are defined in :mod:`dissect.ablation.metrics`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from dissect.ablation.engine import SetEvaluator, check_scheduler, evaluate_masks
from dissect.ablation.hooks import (
    check_recorded_layout,
    check_rule,
    check_token_shape,
    check_unit_shape,
    check_units,
    fill_values,
    forward_hook,
    token_drop,
)
from dissect.ablation.metrics import ClassCounts
from dissect.ablation.result import BASELINE, AblationResult, class_index, rank_units
from dissect.ablation.sources import RowSource
from dissect.ablation.suffix import split_at_layer
from dissect.errors import OptionError
from dissect.record.trace import find_module

USE_SUFFIX: tuple[object, ...] = ("auto", True, False)
"""Allowed values of ``use_suffix``: 'auto' (suffix path when possible), True (required), False."""

DEFAULT_ROWS_PER_FORWARD = 256


def _recorded_layout(activations: RowSource | None) -> tuple[Any, Any]:
    """(the ``layout`` fingerprint field, the ``unit_layout``) of a cache-backed activation
    source; (None, None) otherwise."""
    path = getattr(activations, "path", None)
    if path is None:
        return None, None
    try:
        from dissect.record.cache import open_cache

        info = open_cache(path)
        return (info.fingerprint or {}).get("layout"), info.unit_layout
    except Exception:  # noqa: BLE001 - not a readable cache: nothing recorded to check
        return None, None


def default_sizes(n_units: int) -> list[int]:
    """1, 2, 4, 8, ... up to U / 2 (at least [1])."""
    sizes, size = [], 1
    while size <= max(1, n_units // 2):
        sizes.append(size)
        size *= 2
    return sizes


def check_sizes(sizes: Sequence[int], n_units: int) -> list[int]:
    """Validate set sizes: integers in [1, U], each once (a repeated size would give rows of
    the same set name); OptionError naming the bad value."""
    out: list[int] = []
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) \
                or not 1 <= int(size) <= n_units:
            raise OptionError(f"option n: set size {size!r} is invalid; expected integers in "
                              f"[1, {n_units}] (the layer has {n_units} units)")
        if int(size) in out:
            raise OptionError(f"option n: set size {int(size)} is given twice; give each size "
                              f"once")
        out.append(int(size))
    return out


class AblationStudy:
    """Ablation studies of one layer of a model, evaluated on labeled images.

    Parameters
    ----------
    model : nn.Module, put in eval mode
    layer : dotted ``named_modules()`` name
    labels : (N,) int, class of each row of the image/activation sources (-1 = unlabeled, never
        evaluated); class k is model output k (see :mod:`dissect.ablation.labels`)
    class_names : (C,) names
    images : row source of preprocessed images (N, 3, H, W), e.g. ``DatasetImages`` (hook path)
    activations : row source of the layer's activations (N, U, h, w), e.g. a ``CacheReader``
        (suffix path)
    rule : 'zero' | 'mean' (registered rules); ``means`` (U,) needed by 'mean'
    batch_size : images per forward
    sets_per_batch : unit sets per Dask task and per forward (default: 256 // batch_size, >= 1)
    scheduler : 'threads' (default) | 'processes' | 'synchronous' | 'tcp://host:port'
    device : torch device name (default 'cpu')
    use_suffix : 'auto' | True | False. The suffix path (only the part after the layer runs, from
        ``activations``) is used when ``activations`` is given and the model splits at the layer
        (:func:`dissect.ablation.suffix.split_at_layer`); otherwise the full model runs on
        ``images`` with an ablation hook.
    drop_tokens : for a transformer token layer (B, T, C): the number of leading class/register
        tokens. Unit u is then channel u of the patch tokens ``[drop_tokens:]`` (the class and
        register tokens are left as they are), always on the full-forward path (the cache holds
        no class token). Default: read from the cache's ``unit_layout`` when it was recorded as
        tokens; None: units on axis 1.

    Examples
    --------
    >>> reader = CacheReader(cache_path(run_dir, "layer3"))                # doctest: +SKIP
    >>> study = AblationStudy(model, "layer3", y, names, activations=reader)  # doctest: +SKIP
    >>> result = study.evaluate([[0, 5], [7]])                              # doctest: +SKIP
    >>> result.metrics["recall"]   # (3, C): baseline, units {0, 5}, unit {7}  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, layer: str, labels: np.ndarray | Sequence[int],
                 class_names: Sequence[str], *, images: RowSource | None = None,
                 activations: RowSource | None = None, rule: str = "zero",
                 means: np.ndarray | None = None, batch_size: int = 32,
                 sets_per_batch: int | None = None, scheduler: str = "threads",
                 device: str | torch.device | None = None,
                 use_suffix: bool | str = "auto", drop_tokens: int | None = None) -> None:
        find_module(model, layer)
        check_rule(rule)
        check_scheduler(scheduler)
        if use_suffix not in USE_SUFFIX:
            raise OptionError(f"option use_suffix: {use_suffix!r}; allowed: 'auto', True, False")
        if batch_size < 1:
            raise OptionError(f"option batch_size: {batch_size} must be >= 1")
        self.model = model.eval()
        self.layer = layer
        self.rule = rule
        self.scheduler = scheduler
        self.batch_size = int(batch_size)
        self.sets_per_batch = int(sets_per_batch) if sets_per_batch is not None else \
            max(1, DEFAULT_ROWS_PER_FORWARD // self.batch_size)
        if self.sets_per_batch < 1:
            raise OptionError(f"option sets_per_batch: {sets_per_batch} must be >= 1")
        self.device = str(device) if device is not None else "cpu"
        self.class_names = tuple(str(name) for name in class_names)
        self.labels = self._check_labels(labels, images, activations)
        layout, unit_layout = _recorded_layout(activations)
        if drop_tokens is None:
            drop_tokens = token_drop(unit_layout)
        if drop_tokens is not None and (isinstance(drop_tokens, bool)
                                        or not isinstance(drop_tokens, (int, np.integer))
                                        or drop_tokens < 0):
            raise OptionError(f"option drop_tokens: expected an integer >= 0, got "
                              f"{drop_tokens!r}")
        self.drop_tokens = None if drop_tokens is None else int(drop_tokens)
        if self.drop_tokens is None:
            check_recorded_layout(layout, layer)
        elif images is None:
            raise OptionError(f"layer {layer!r} is a token layer: its ablation runs the full "
                              "model (the cache holds no class token), so it needs images")
        if images is not None:
            self._layer_shape(images)  # LayerError for outputs without units on axis 1
        suffix, why = None, "no cached activations were given"
        if self.drop_tokens is not None:
            why = "the layer outputs transformer tokens and the cache holds only the patch grid"
        elif use_suffix is not False and activations is not None:
            suffix = split_at_layer(model, layer)
            why = "the model cannot be split there (not FX-traceable, the layer is called more " \
                  "than once, or the output depends on values computed before the layer)"
            if suffix is not None and images is not None:
                layer_shape = self._layer_shape(images)
                cached_shape = tuple(int(v) for v in np.asarray(
                    activations.read_rows(np.array([0]))).shape[1:])
                if layer_shape[1:] != cached_shape:
                    suffix = None
                    why = f"the cached activations have shape {cached_shape} per image but the " \
                          f"layer outputs {layer_shape[1:]} (another layout or input size)"
        if suffix is None and use_suffix is True:
            raise OptionError(f"use_suffix=True for layer {layer!r}, but {why}")
        self.suffix_note = "" if suffix is not None else why
        if suffix is None and images is None:
            raise OptionError(f"layer {layer!r}: the full-forward path needs images (the model "
                              "cannot run from cached activations here)")
        self.n_units = self._count_units(images, activations)
        self.means = means
        self.evaluator = SetEvaluator(
            model=self.model if suffix is None else None, layer=layer,
            fill=fill_values(rule, self.n_units, means),
            labels=self.labels, n_classes=len(self.class_names), suffix=suffix,
            images=images if suffix is None else None,
            activations=activations if suffix is not None else None,
            batch_size=self.batch_size, device=self.device, drop_tokens=self.drop_tokens)
        self._n_outputs: int | None = None

    # ----------------------------------------------------------------------------- setup helpers
    def _check_labels(self, labels: np.ndarray | Sequence[int], images: RowSource | None,
                      activations: RowSource | None) -> np.ndarray:
        array = np.asarray(labels, dtype=np.int64).reshape(-1)
        for name, source in (("images", images), ("activations", activations)):
            if source is not None and len(source) != len(array):
                raise OptionError(f"labels has {len(array)} rows but {name} has {len(source)}")
        if array.size and (array.max() >= len(self.class_names) or array.min() < -1):
            raise OptionError(f"labels must lie in [-1, {len(self.class_names)}) "
                              f"({len(self.class_names)} class names); found "
                              f"{int(array.min())}..{int(array.max())}")
        return array

    def _count_units(self, images: RowSource | None, activations: RowSource | None) -> int:
        if images is not None:
            shape = self._layer_shape(images)
            return shape[2] if self.drop_tokens is not None else shape[1]
        if activations is not None and hasattr(activations, "shape"):
            return int(activations.shape[1])  # type: ignore[attr-defined]
        return int(np.asarray(activations.read_rows(np.array([0]))).shape[1])  # type: ignore

    def _layer_shape(self, images: RowSource) -> tuple[int, ...]:
        """Output shape of the layer for image 0 (one forward); LayerError if not a tensor."""
        if getattr(self, "_probed_shape", None) is not None:
            return self._probed_shape
        shapes: list[object] = []
        module = find_module(self.model, self.layer)
        record = (lambda _m, _i, out: shapes.append(
            tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__))
        with forward_hook(module, record), torch.no_grad():
            self.model(torch.as_tensor(images.read_rows(np.array([0]))).to(
                self.device, torch.float32))
        shape = shapes[0] if shapes else "nothing (the layer did not run)"
        if self.drop_tokens is not None:
            check_token_shape(shape, self.layer, self.drop_tokens)
        else:
            check_unit_shape(shape, self.layer)
        self._probed_shape: tuple[int, ...] = shapes[0]
        return shapes[0]

    @property
    def uses_suffix(self) -> bool:
        """True when evaluations run only the part of the model after the layer, from the cache."""
        return self.evaluator.uses_suffix

    @property
    def n_outputs(self) -> int:
        """The number of model outputs (from one forward of row 0)."""
        if self._n_outputs is None:
            logits = self.evaluator.logits(np.zeros((1, self.n_units), bool), np.array([0]))
            self._n_outputs = int(logits.shape[-1])
        return self._n_outputs

    def with_labels(self, labels: np.ndarray | Sequence[int],
                    class_names: Sequence[str]) -> AblationStudy:
        """A copy of this study with other class labels (model, sources and suffix are shared)."""
        other = copy.copy(self)
        other.class_names = tuple(str(name) for name in class_names)
        other.labels = other._check_labels(labels, None, None)
        if len(other.labels) != len(self.labels):
            raise OptionError(f"labels has {len(other.labels)} rows, expected {len(self.labels)}")
        other.evaluator = copy.copy(self.evaluator)
        other.evaluator.labels = other.labels
        other.evaluator.n_classes = len(other.class_names)
        return other

    def labeled_rows(self, indices: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """The evaluated rows: ``indices`` (default: all) that have a class, sorted (n,) int64."""
        rows = np.arange(len(self.labels)) if indices is None else \
            np.asarray(indices, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self.labels)):
            raise OptionError(f"image indices must lie in [0, {len(self.labels)})")
        rows = np.unique(rows)
        rows = rows[self.labels[rows] >= 0]
        if rows.size == 0:
            raise OptionError("no labeled image to evaluate (every selected image has class -1)")
        return rows

    def masks(self, unit_sets: Sequence[Sequence[int]]) -> np.ndarray:
        """(S, U) bool masks of unit sets (OptionError naming a bad unit index)."""
        masks = np.zeros((len(unit_sets), self.n_units), dtype=bool)
        for s, units in enumerate(unit_sets):
            masks[s, check_units(units, self.n_units)] = True
        return masks

    # --------------------------------------------------------------------------------- evaluation
    def predict(self, indices: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """Argmax of the unablated model for ``indices`` (default: every row): (n,) int64."""
        rows = np.arange(len(self.labels)) if indices is None else \
            np.asarray(indices, dtype=np.int64)
        return self.evaluator.predict(rows)

    def evaluate_counts(self, unit_sets: Sequence[Sequence[int]],
                        indices: np.ndarray | Sequence[int] | None = None) -> ClassCounts:
        """Additive per-class counts (S, C) of unit sets (no baseline row added)."""
        rows = self.labeled_rows(indices)
        return evaluate_masks(self.evaluator, self.masks(unit_sets), rows,
                              sets_per_batch=self.sets_per_batch, scheduler=self.scheduler)

    def evaluate(self, unit_sets: Sequence[Sequence[int]],
                 indices: np.ndarray | Sequence[int] | None = None, *,
                 names: Sequence[str] | None = None, studies: Sequence[str] | None = None,
                 study: str = "custom", info: dict[str, Any] | None = None) -> AblationResult:
        """Metrics of the baseline and of each unit set on the labeled images among ``indices``.

        Parameters
        ----------
        unit_sets : S sequences of 0-based unit indices
        indices : dataset rows to evaluate (default: all); unlabeled rows are skipped
        names : (S,) set names (default: ``set<s>``); studies : (S,) study column (default: study)
        study : the name of this study run (the h5 group, and the baseline's study column)

        Returns
        -------
        AblationResult with S + 1 rows (row 0 = baseline).
        """
        names = list(names) if names is not None else [f"set{s}" for s in range(len(unit_sets))]
        studies = list(studies) if studies is not None else [study] * len(unit_sets)
        if len(names) != len(unit_sets) or len(studies) != len(unit_sets):
            raise OptionError("names and studies must have one entry per unit set")
        if BASELINE in names:
            raise OptionError(f"the set name {BASELINE!r} is reserved for the unablated model")
        all_sets = [np.zeros(0, np.int64)] + [check_units(u, self.n_units) for u in unit_sets]
        counts = self.evaluate_counts(all_sets, indices)
        full_info = {"rule": self.rule, "path": "suffix" if self.uses_suffix else "hooks"}
        full_info.update(info or {})
        return AblationResult(
            layer=self.layer, study=study, class_names=self.class_names,
            set_studies=tuple([study] + studies), set_names=tuple([BASELINE] + names),
            set_units=tuple(all_sets), counts=counts, info=full_info)

    # ------------------------------------------------------------------------------------ studies
    def single(self, indices: np.ndarray | Sequence[int] | None = None, *,
               info: dict[str, Any] | None = None) -> AblationResult:
        """Single-unit sweep: every unit ablated alone (sets ``unit<u>``, study 'single')."""
        return self.evaluate([[u] for u in range(self.n_units)], indices,
                             names=[f"unit{u}" for u in range(self.n_units)], study="single",
                             info=info)

    def topn(self, indices: np.ndarray | Sequence[int] | None = None,
             sizes: Sequence[int] | None = None, *,
             rank_indices: np.ndarray | Sequence[int] | None = None,
             ranking: np.ndarray | None = None, classes: Sequence[str] | None = None,
             rank_by: str = "recall", info: dict[str, Any] | None = None) -> AblationResult:
        """Per class, remove its N most damaging units; and keep only them (ablate all others).

        Units are ranked per class by the single-unit damage measured on ``rank_indices`` (a
        single-unit sweep; see :func:`~dissect.ablation.result.rank_units` for the metric
        ``rank_by``, default recall = PNAS class accuracy, ties by true-class probability drop),
        unless ``ranking`` (C, U) is given. Sets are evaluated on ``indices``: ``<class>:top<N>``
        (study 'topn', the top N units removed) and ``<class>:keep<N>`` (study 'keep', every unit
        but the top N removed), for each N of ``sizes`` (default 1, 2, 4, ... <= U / 2) and each
        class of ``classes`` (default: every class with images in the rank split).

        Returns
        -------
        AblationResult (study 'topn') with ``ranking`` and ``damage`` (C, U).
        """
        sizes = check_sizes(sizes if sizes is not None else default_sizes(self.n_units),
                            self.n_units)
        damage = None
        if ranking is None:
            sweep = self.single(rank_indices)
            ranking, damage = rank_units(sweep, rank_by)
        ranking = np.asarray(ranking, dtype=np.int64)
        if ranking.shape != (len(self.class_names), self.n_units):
            raise OptionError(f"ranking has shape {ranking.shape}, expected "
                              f"({len(self.class_names)}, {self.n_units})")
        if classes is not None:
            targets = [class_index(self.class_names, name) for name in classes]
        elif damage is not None:
            targets = [c for c in range(len(self.class_names)) if not np.all(np.isnan(damage[c]))]
        else:
            targets = list(range(len(self.class_names)))
        unit_sets, names, studies = [], [], []
        everything = np.arange(self.n_units)
        for c in targets:
            for size in sizes:
                top = np.sort(ranking[c, :size])
                unit_sets += [top, np.setdiff1d(everything, top)]
                names += [f"{self.class_names[c]}:top{size}", f"{self.class_names[c]}:keep{size}"]
                studies += ["topn", "keep"]
        run_info = {"rank_by": rank_by, "sizes": ";".join(map(str, sizes))}
        run_info.update(info or {})
        result = self.evaluate(unit_sets, indices, names=names, studies=studies, study="topn",
                               info=run_info)
        return dataclasses.replace(result, ranking=ranking, damage=damage)

    def concept(self, units: Sequence[int], name: str,
                indices: np.ndarray | Sequence[int] | None = None, *,
                info: dict[str, Any] | None = None) -> AblationResult:
        """Remove all units of one concept together (set ``name``, study 'concept')."""
        if len(units) == 0:
            raise OptionError(f"option concept: no unit of layer {self.layer!r} is labeled "
                              f"{name!r}")
        return self.evaluate([units], indices, names=[name], study="concept", info=info)

    def random(self, sizes: Sequence[int] | None = None, repeats: int = 5, seed: int = 0,
               indices: np.ndarray | Sequence[int] | None = None, *,
               info: dict[str, Any] | None = None) -> AblationResult:
        """Random unit sets: for each size N, ``repeats`` sets of N distinct units.

        Sets ``random<N>#<r>`` (study 'random') are drawn with ``numpy.random.default_rng(seed)``
        in the order (size, repeat), so a seed gives the same sets every time. See
        :meth:`AblationResult.random_summary` for the mean and spread over repeats.
        """
        sizes = check_sizes(sizes if sizes is not None else default_sizes(self.n_units),
                            self.n_units)
        if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
            raise OptionError(f"option repeats: {repeats!r} must be an integer >= 1")
        unit_sets = random_unit_sets(self.n_units, sizes, int(repeats), int(seed))
        names = [f"random{size}#{r}" for size in sizes for r in range(int(repeats))]
        run_info = {"seed": int(seed), "repeats": int(repeats),
                    "sizes": ";".join(map(str, sizes))}
        run_info.update(info or {})
        return self.evaluate(unit_sets, indices, names=names, study="random", info=run_info)


def random_unit_sets(n_units: int, sizes: Sequence[int], repeats: int,
                     seed: int) -> list[np.ndarray]:
    """``repeats`` random sets of each size (distinct units, sorted), deterministic in ``seed``.

    Returns a list of len(sizes) * repeats (k,) int64 arrays, ordered (size, repeat).
    """
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(n_units, size=size, replace=False)).astype(np.int64)
            for size in sizes for _ in range(repeats)]


__all__ = ["AblationStudy", "default_sizes", "random_unit_sets"]
