"""The evaluation engine: many unit sets, one layer, batched forwards, Dask tasks.

A batch of S unit sets is an (S, U) bool mask. One forward evaluates all S sets on B images:

- suffix path (the model splits at the layer, see :mod:`dissect.ablation.suffix`): the layer
  activations of the B images are read from a row source (the activation cache), replicated S times
  with the masks applied (:func:`apply_unit_masks`) and only the part of the model after the layer
  runs;
- hook path: the B images are replicated S times and the full model runs with a batched ablation
  hook (:func:`ablate_unit_sets`).

Each batch of unit sets is one Dask task that streams over the evaluation images in chunks and
returns additive per-class counts; memory does not grow with the number of images.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

import dask
import numpy as np
import torch
from torch import nn

from dissect.ablation.hooks import ablate_with_fill, apply_unit_masks
from dissect.ablation.metrics import ClassCounts, count_classes
from dissect.ablation.sources import RowSource
from dissect.errors import OptionError
from dissect.parallel import (
    check_scheduler,
    scheduler_context,
    set_task_threads,
    torch_threads_kept,
)

_HOOK_LOCKS: dict[int, threading.Lock] = {}
_HOOK_LOCKS_GUARD = threading.Lock()


def _hook_lock(model: nn.Module) -> threading.Lock:
    """One lock per model object in this process: hooked forwards of one model never overlap."""
    with _HOOK_LOCKS_GUARD:
        return _HOOK_LOCKS.setdefault(id(model), threading.Lock())


@dataclass
class SetEvaluator:
    """Evaluates batches of unit sets on labeled images (picklable).

    Attributes
    ----------
    model : nn.Module in eval mode, for the hook path (None on the suffix path, so that tasks
        shipped to processes carry the weights once)
    layer : dotted layer name
    fill : (U,) float32, value of an ablated unit
    labels : (N,) int64 class of each dataset row (-1 = unlabeled; never evaluated)
    n_classes : C
    suffix : the model after the layer (suffix path) or None (hook path)
    images : row source of preprocessed images (hook path)
    activations : row source of layer activations (suffix path)
    batch_size : images per forward (a forward has S * batch_size rows)
    device : torch device name
    drop_tokens : leading class/register tokens of a token layer (hook path), else None
    """

    model: nn.Module | None
    layer: str
    fill: np.ndarray
    labels: np.ndarray
    n_classes: int
    suffix: nn.Module | None = None
    images: RowSource | None = None
    activations: RowSource | None = None
    batch_size: int = 32
    device: str = "cpu"
    drop_tokens: int | None = None

    @property
    def uses_suffix(self) -> bool:
        """True when the part after the layer runs from cached activations."""
        return self.suffix is not None

    def logits(self, masks: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        """Model outputs of S unit sets on the given dataset rows.

        Parameters
        ----------
        masks : (S, U) bool
        rows : (B,) int64 dataset rows

        Returns
        -------
        (S, B, C_out) float32 tensor on the CPU.
        """
        mask_tensor = torch.as_tensor(np.asarray(masks, dtype=bool))
        n_sets = mask_tensor.shape[0]
        device = torch.device(self.device)
        with torch.no_grad():
            if self.suffix is not None and self.activations is not None:
                acts = torch.as_tensor(self.activations.read_rows(rows)).to(device, torch.float32)
                output = self.suffix(apply_unit_masks(acts, mask_tensor,
                                                      torch.from_numpy(self.fill)))
            elif self.images is not None and self.model is not None:
                images = torch.as_tensor(self.images.read_rows(rows)).to(device, torch.float32)
                replicated = images.repeat((n_sets,) + (1,) * (images.dim() - 1))
                with _hook_lock(self.model), \
                        ablate_with_fill(self.model, self.layer, masks, self.fill,
                                         self.drop_tokens):
                    output = self.model(replicated)
            else:
                raise OptionError("the ablation engine has neither images nor cached activations")
        if not isinstance(output, torch.Tensor) or output.dim() != 2:
            kind = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output)
            raise OptionError(f"the model output is {kind}; ablation effects need logits (N, C)")
        return output.float().cpu().reshape(n_sets, len(rows), -1)

    def evaluate(self, masks: np.ndarray, rows: np.ndarray) -> ClassCounts:
        """Per-class counts of S unit sets over the labeled rows (streamed in chunks).

        Parameters
        ----------
        masks : (S, U) bool
        rows : (n,) int64 dataset rows, all labeled (labels >= 0)

        Returns
        -------
        ClassCounts with (S, C) arrays.
        """
        masks = np.asarray(masks, dtype=bool)
        total = ClassCounts.zeros(masks.shape[0], self.n_classes)
        for start in range(0, len(rows), self.batch_size):
            chunk = np.asarray(rows[start:start + self.batch_size], dtype=np.int64)
            logits = self.logits(masks, chunk)
            y = torch.as_tensor(self.labels[chunk], dtype=torch.int64)
            probs = torch.softmax(logits.double(), dim=-1)
            index = y.view(1, -1, 1).expand(logits.shape[0], -1, 1)
            true_prob = probs.gather(-1, index).squeeze(-1).numpy()
            predicted = logits.argmax(dim=-1).numpy()
            total = total + count_classes(self.labels[chunk], predicted, true_prob,
                                          self.n_classes)
        return total

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """Argmax output of the unablated model for the rows: (n,) int64."""
        n_units = self.fill.shape[0]
        out = np.zeros(len(rows), dtype=np.int64)
        for start in range(0, len(rows), self.batch_size):
            chunk = np.asarray(rows[start:start + self.batch_size], dtype=np.int64)
            logits = self.logits(np.zeros((1, n_units), dtype=bool), chunk)
            out[start:start + len(chunk)] = logits[0].argmax(dim=-1).numpy()
        return out


def _evaluate_task(evaluator: SetEvaluator, masks: np.ndarray, rows: np.ndarray,
                   threads: int | None) -> ClassCounts:
    set_task_threads(threads)
    return evaluator.evaluate(masks, rows)


def evaluate_masks(evaluator: SetEvaluator, masks: np.ndarray, rows: np.ndarray, *,
                   sets_per_batch: int, scheduler: str = "threads") -> ClassCounts:
    """Evaluate S unit sets as Dask tasks of ``sets_per_batch`` sets each.

    Parameters
    ----------
    masks : (S, U) bool
    rows : (n,) int64 labeled dataset rows
    sets_per_batch : sets per task (and per forward)
    scheduler : 'threads' | 'processes' | 'synchronous' | 'tcp://host:port' (see
        :func:`dissect.parallel.scheduler_context`)

    Returns
    -------
    ClassCounts with (S, C) arrays, rows in the order of ``masks``; identical for every scheduler
    and batching.
    """
    check_scheduler(scheduler)
    masks = np.asarray(masks, dtype=bool)
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    if sets_per_batch < 1:
        raise OptionError(f"option sets_per_batch: {sets_per_batch} must be >= 1")
    if masks.shape[0] == 0:
        return ClassCounts.zeros(0, evaluator.n_classes)
    with scheduler_context(scheduler) as setup:
        # Hooked forwards of one model are serialised by a lock: in threads they keep every core.
        threads = setup.task_threads if evaluator.uses_suffix or scheduler != "threads" else None
        token = uuid.uuid4().hex
        shared = dask.delayed(evaluator, name=f"ablation-evaluator-{token}", traverse=False)
        shared_rows = dask.delayed(rows, name=f"ablation-rows-{token}", traverse=False)
        tasks = [dask.delayed(_evaluate_task, pure=False)(
                     shared, masks[start:start + sets_per_batch], shared_rows,
                     threads, dask_key_name=f"ablation-sets-{start}-{token}")
                 for start in range(0, masks.shape[0], sets_per_batch)]
        with torch_threads_kept():
            parts = dask.compute(*tasks, **setup.compute_kwargs)
    return ClassCounts.stack(list(parts))
