"""Explanations of predictions by the dissected concepts of one layer (DESIGN.md §11).

For an image, a target class c with logit y_c, the layer's unit maps A (U, h, w) and their gradient
G = dy_c / dA, each unit's contribution is

- ``grad_x_act``: r_u = sum_ij G_u,ij * A_u,ij;
- ``gradcam``:    r_u = mean_ij(G_u,ij) * sum_ij A_u,ij.

Units are grouped by their dissected concept (the unit's label when its IoU reaches the cut-off,
else the ``unlabeled`` bucket), R_l = sum of the group's r_u, share_l = R_l / sum_u max(r_u, 0).
A concept's map is ReLU of the sum of its units' per-position contributions (G * A for
``grad_x_act``, mean(G) * A for ``gradcam``; both sum to R_l before the ReLU), the class map is
Grad-CAM, ReLU(sum_u mean_ij(G_u) * A_u); both are upsampled bilinearly (half-pixel centres) to the
image. For a global-average-pool + linear head both methods give r_u = w_cu * mean(A_u) and
sum_u r_u = y_c - b_c: the head is detected (the last linear layer called reads the spatial mean of
the layer's maps and returns the model output) and its bias reported, else ``bias`` is None.
``residual`` = y_c - (bias or 0) - sum_u r_u - (class/register token contribution).

Token layers (ViT blocks): the patch tokens become the (U, h, w) maps of the recorder's layout
(:mod:`dissect.record.trace`); the leading class/register tokens form their own bucket
(``tokens``). After the last block of a class-token ViT the patch tokens get no gradient: the
explanation's ``notes`` say so.

One forward and one backward pass (to the layer only) per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dissect.config import EXPLAIN_GROUPS, EXPLAIN_METHODS
from dissect.errors import LayerError, ModelError, OptionError
from dissect.record.models import first_tensor, model_name
from dissect.record.trace import (
    LayoutOptions,
    find_module,
    infer_patch_size,
    resolve_layers,
    to_unit_maps,
    token_grid,
)
from dissect.tally import DissectionResult

__all__ = [
    "GROUP_BY",
    "METHODS",
    "UNLABELED",
    "ClassProfile",
    "ConceptContribution",
    "Explanation",
    "explain_class",
    "explain_prediction",
]

#: Allowed values of ``method``.
METHODS = EXPLAIN_METHODS
#: Allowed values of ``group_by``.
GROUP_BY = EXPLAIN_GROUPS
#: Name of the bucket of units below the IoU cut-off or without a label.
UNLABELED = "unlabeled"


@dataclass(frozen=True)
class ConceptContribution:
    """The summed contribution of one concept's units to one prediction (or a class mean).

    Attributes
    ----------
    label:
        Concept name (the label name, or the category name with ``group_by='category'``).
    category:
        The concept's category ('' for the unlabeled bucket).
    contribution:
        R_l, the sum of the units' r_u (a mean over images in a :class:`ClassProfile`).
    share:
        R_l / sum_u max(r_u, 0) (0 when no unit contributes positively).
    units:
        The 0-based units of the concept, ascending.
    """

    label: str
    category: str
    contribution: float
    share: float
    units: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{label, category, contribution, share, units}``."""
        return {"label": self.label, "category": self.category,
                "contribution": self.contribution, "share": self.share,
                "units": list(self.units)}


@dataclass
class Explanation:
    """One image's explanation for one target class.

    Attributes
    ----------
    image:
        The image's id (its position in the batch unless ``image_ids`` were given).
    target, target_name:
        The explained output index and its name (None when no class names were given).
    logit:
        y_c, the model output for the target.
    bias:
        b_c of a detected global-average-pool + linear head, else None.
    residual:
        y_c - (bias or 0) - sum_u r_u - tokens (0 up to rounding for a pooled linear head).
    method, layer, group_by:
        How the explanation was made.
    contributions:
        float64 (U,): r_u of every unit.
    unit_labels, unit_categories:
        (U,) the dissection's label name and category of every unit ('' for none).
    unit_ious:
        float64 (U,): the IoU of each unit's label.
    concepts:
        The concepts, by descending contribution (ties: label name).
    unlabeled:
        The bucket of units below the IoU cut-off or without a label (label ``'unlabeled'``).
    negative:
        The concepts with the most negative contributions (at most ``top_negative``), most
        negative first.
    tokens:
        Contribution of the class/register tokens of a token layer, None for other layers.
    class_map:
        float32 (H, W): Grad-CAM at the layer, upsampled to the image.
    concept_maps:
        Concept name -> float32 (H, W) map, for the ``top_k`` concepts with the largest positive
        contributions, in that order.
    grid:
        (h, w) of the layer's unit maps.
    notes:
        Plain-language remarks (token buckets, patch tokens without gradient, no detected head).
    """

    image: int | str
    target: int
    target_name: str | None
    logit: float
    bias: float | None
    residual: float
    method: str
    layer: str
    group_by: str
    contributions: np.ndarray
    unit_labels: list[str]
    unit_categories: list[str]
    unit_ious: np.ndarray
    concepts: list[ConceptContribution]
    unlabeled: ConceptContribution
    negative: list[ConceptContribution]
    tokens: float | None
    class_map: np.ndarray
    concept_maps: dict[str, np.ndarray]
    grid: tuple[int, int]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of DESIGN.md §11 (without ``maps``, which :func:`write_explanations`
        adds).

        Keys: image, target, target_name, logit, bias, residual, method, layer, group_by,
        units [{unit, contribution, label, iou}], concepts [{label, category, contribution, share,
        units}], unlabeled {contribution, share, units}, negative [...], tokens, grid, notes.
        """
        return {
            "image": self.image,
            "target": self.target,
            "target_name": self.target_name,
            "logit": self.logit,
            "bias": self.bias,
            "residual": self.residual,
            "method": self.method,
            "layer": self.layer,
            "group_by": self.group_by,
            "units": [{"unit": u, "contribution": float(self.contributions[u]),
                       "label": self.unit_labels[u] or None, "iou": float(self.unit_ious[u])}
                      for u in range(len(self.contributions))],
            "concepts": [c.to_dict() for c in self.concepts],
            "unlabeled": {"contribution": self.unlabeled.contribution,
                          "share": self.unlabeled.share, "units": list(self.unlabeled.units)},
            "negative": [c.to_dict() for c in self.negative],
            "tokens": self.tokens,
            "grid": list(self.grid),
            "notes": list(self.notes),
        }


@dataclass
class ClassProfile:
    """Mean concept contributions over the images of one class (:func:`explain_class`).

    Attributes
    ----------
    target, target_name:
        The class (output index) and its name.
    n_images:
        Images that took part.
    mean_logit:
        Mean y_c over them (NaN when there are none).
    mean_bias:
        b_c of a detected pooled linear head (None otherwise).
    concepts:
        Per concept, the mean contribution and the mean per-image share, descending.
    unlabeled:
        The same for the unlabeled bucket.
    mean_contributions:
        float64 (U,): mean r_u.
    mean_tokens:
        Mean class/register token contribution (token layers), else None.
    method, layer, group_by, selection:
        How it was made (``selection``: 'true' or 'predicted').
    """

    target: int
    target_name: str | None
    n_images: int
    mean_logit: float
    mean_bias: float | None
    concepts: list[ConceptContribution]
    unlabeled: ConceptContribution
    mean_contributions: np.ndarray
    mean_tokens: float | None
    method: str
    layer: str
    group_by: str
    selection: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (concepts as in :meth:`Explanation.to_dict`)."""
        return {
            "target": self.target, "target_name": self.target_name, "n_images": self.n_images,
            "mean_logit": self.mean_logit, "bias": self.mean_bias, "method": self.method,
            "layer": self.layer, "group_by": self.group_by, "selection": self.selection,
            "concepts": [c.to_dict() for c in self.concepts],
            "unlabeled": {"contribution": self.unlabeled.contribution,
                          "share": self.unlabeled.share, "units": list(self.unlabeled.units)},
            "mean_contributions": [float(v) for v in self.mean_contributions],
            "tokens": self.mean_tokens,
        }


# --------------------------------------------------------------------------- grouping
@dataclass(frozen=True)
class ConceptGroups:
    """Units grouped by concept.

    Attributes
    ----------
    names, categories:
        (K,) concept names and categories.
    members:
        bool (K, U): unit u belongs to concept k.
    unit_labels, unit_categories:
        (U,) the dissection's label name and category of every unit.
    unit_ious:
        float64 (U,).
    member_units:
        (K,) the units of each concept, ascending.
    """

    names: tuple[str, ...]
    categories: tuple[str, ...]
    members: np.ndarray
    unit_labels: list[str]
    unit_categories: list[str]
    unit_ious: np.ndarray
    member_units: tuple[tuple[int, ...], ...] = ()

    @property
    def unlabeled(self) -> np.ndarray:
        """bool (U,): units in no concept."""
        return ~self.members.any(axis=0)


def concept_groups(dissection: DissectionResult, group_by: str = "label",
                   iou_threshold: float | None = None,
                   unit_concepts: Mapping[int, tuple[str, str]] | None = None) -> ConceptGroups:
    """Group a layer's units by their dissected concept.

    A unit joins the group of its label (``group_by='label'``) or of its label's category
    (``'category'``) when ``unit_iou >= iou_threshold`` (default: the dissection's cut-off) and
    its label is not 0; the others are unlabeled. ``unit_concepts`` (unit -> (name, category), e.g.
    compositional labels) replaces the dissection's labels: listed units join their named group,
    the others are unlabeled.

    Raises
    ------
    OptionError
        For an unknown ``group_by``, a negative cut-off or a unit outside the layer.
    """
    if group_by not in GROUP_BY:
        raise OptionError(f"group_by: got {group_by!r}, expected one of {', '.join(GROUP_BY)}")
    cutoff = dissection.iou_threshold if iou_threshold is None else iou_threshold
    if not isinstance(cutoff, (int, float)) or not np.isfinite(cutoff) or cutoff < 0:
        raise OptionError(f"iou_threshold: expected a number >= 0, got {iou_threshold!r}")
    n_units = dissection.n_units
    labels = [dissection.label_names[int(n)] if int(n) else "" for n in dissection.unit_label]
    categories = [str(c) if int(n) else "" for c, n in
                  zip(dissection.unit_category, dissection.unit_label)]
    ious = np.asarray(dissection.unit_iou, dtype=np.float64)
    keys: dict[tuple[str, str], list[int]] = {}
    if unit_concepts is not None:
        for unit, concept in unit_concepts.items():
            if not isinstance(unit, (int, np.integer)) or not 0 <= int(unit) < n_units:
                raise OptionError(f"unit_concepts: unit {unit!r} is not a unit of layer "
                                  f"{dissection.layer!r} (0..{n_units - 1})")
            name, category = concept
            key = (str(name), str(category)) if group_by == "label" else (str(category),
                                                                          str(category))
            keys.setdefault(key, []).append(int(unit))
    else:
        for unit in range(n_units):
            if dissection.unit_label[unit] and ious[unit] >= cutoff:
                key = (labels[unit], categories[unit]) if group_by == "label" else (
                    categories[unit], categories[unit])
                keys.setdefault(key, []).append(unit)
    ordered = sorted(keys)
    members = np.zeros((len(ordered), n_units), dtype=bool)
    for k, key in enumerate(ordered):
        members[k, keys[key]] = True
    return ConceptGroups(tuple(k[0] for k in ordered), tuple(k[1] for k in ordered), members,
                         labels, categories, ious,
                         tuple(tuple(np.flatnonzero(row).tolist()) for row in members))


# --------------------------------------------------------------------------- forward/backward
@dataclass
class BatchAttribution:
    """What one forward + backward pass gives for a batch (internal, shapes stated).

    logits: float32 (B, C) detached; target: int64 (B,); contributions: float64 (B, U);
    maps: float32 (B, U, h, w) per-position contributions (G * A or mean(G) * A);
    cam: float32 (B, h, w) Grad-CAM before ReLU; tokens: float64 (B,) or None;
    bias: float64 (B,) or None; patch_grad_zero: bool (B,); drop: leading tokens dropped (0 for
    maps); input_size: (H, W); calls: how often the layer ran in the forward pass (the last call
    is explained).
    """

    logits: torch.Tensor
    target: torch.Tensor
    contributions: np.ndarray
    maps: torch.Tensor
    cam: torch.Tensor
    tokens: np.ndarray | None
    bias: np.ndarray | None
    patch_grad_zero: np.ndarray
    drop: int
    input_size: tuple[int, int]
    calls: int = 1


class _LayerGrab:
    """Forward hooks: the layer's output (kept in the graph) and the last linear layer's call.

    The layer's hook returns a clone of the output to the rest of the model, so in-place
    operations after the layer (``out += identity``) do not change the tensor whose gradient is
    taken. An output that does not require grad (frozen weights) is made a leaf that does.
    Hooks are removed by :meth:`remove` (called in ``finally`` by the users of this class).
    """

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.layer = layer
        self.output: torch.Tensor | None = None
        self.calls = 0
        self.last_linear: tuple[nn.Linear, torch.Tensor, torch.Tensor] | None = None
        self.handles: list[Any] = []
        try:
            self.handles.append(find_module(model, layer).register_forward_hook(self._layer_hook))
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    self.handles.append(module.register_forward_hook(self._linear_hook))
        except BaseException:
            self.remove()
            raise

    def _layer_hook(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        tensor = first_tensor(output)
        if tensor is None:
            raise LayerError(f"layer {self.layer!r} returned a {type(output).__name__}; only "
                             f"tensor outputs (or tuples/lists starting with a tensor) can be "
                             f"explained")
        if not tensor.requires_grad:
            tensor = tensor.detach().requires_grad_(True)
        self.output = tensor
        self.calls += 1
        replaced = tensor.clone()
        self.last_linear = None
        if isinstance(output, torch.Tensor):
            return replaced
        return type(output)([replaced, *output[1:]])

    def _linear_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and inputs and isinstance(inputs[0], torch.Tensor):
            self.last_linear = (module, inputs[0], output)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _targets(target: Any, logits: torch.Tensor, start: int) -> torch.Tensor:
    batch, n_classes = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    if isinstance(target, (int, np.integer)):
        chosen = torch.full((batch,), int(target), dtype=torch.long)
    else:
        values = torch.as_tensor(np.asarray(target), dtype=torch.long).reshape(-1)
        chosen = values[start:start + batch]
        if len(chosen) != batch:
            raise OptionError(f"target: expected one class per image, got {len(values)} targets "
                              f"for at least {start + batch} images")
    bad = (chosen < 0) | (chosen >= n_classes)
    if bad.any():
        raise OptionError(f"target: class {int(chosen[bad][0])} is not an output of the model "
                          f"(0..{n_classes - 1})")
    return chosen.to(logits.device)


def _detect_bias(grab: _LayerGrab, logits: torch.Tensor, acts: torch.Tensor,
                 target: torch.Tensor, drop: int) -> np.ndarray | None:
    """b_c per image when the last linear layer reads mean(A) and returns the output, else None."""
    if grab.last_linear is None or drop:
        return None
    module, inputs, output = grab.last_linear
    if inputs.dim() != 2 or output.shape != logits.shape or inputs.shape[1] != acts.shape[1]:
        return None
    pooled = acts.detach().float().mean(dim=(2, 3))
    scale = float(pooled.abs().max()) if pooled.numel() else 0.0
    if not torch.allclose(output.detach(), logits, rtol=1e-5, atol=1e-6) or not torch.allclose(
            inputs.detach().float(), pooled, rtol=1e-4, atol=1e-5 * max(scale, 1.0)):
        return None
    if module.bias is None:
        return np.zeros(len(target), dtype=np.float64)
    return module.bias.detach().double()[target].cpu().numpy()


def attribute_batch(model: nn.Module, layer: str, images: torch.Tensor, target: Any = None,
                    method: str = "grad_x_act", token_layout: LayoutOptions | None = None,
                    start: int = 0) -> BatchAttribution:
    """One forward and one backward pass (to the layer) for a batch: see :class:`BatchAttribution`.

    ``target``: None (top-1), an int, or a sequence with one class per image of the whole call
    (this batch reads ``target[start:start + B]``). Hooks are removed on success and on error.

    Raises
    ------
    ModelError, LayerError, OptionError
        A model output that is not (B, C) logits, a layer the forward pass does not call or whose
        output cannot be read as unit maps, a bad target.
    """
    if method not in METHODS:
        raise OptionError(f"method: got {method!r}, expected one of {', '.join(METHODS)}")
    options = token_layout or LayoutOptions()
    if not isinstance(options, LayoutOptions):
        raise OptionError("token_layout: expected a dissect.record.LayoutOptions or None")
    grab = _LayerGrab(model, layer)
    try:
        with torch.enable_grad():
            logits = first_tensor(model(images))
            if logits is None or logits.dim() != 2:
                shape = None if logits is None else tuple(logits.shape)
                raise ModelError(f"model {model_name(model)} returned {shape}; explaining a "
                                 f"prediction needs (B, C) class scores")
            if grab.output is None:
                raise LayerError(f"layer {layer!r} was not called by the forward pass of "
                                 f"{model_name(model)} (`dissect layers MODEL` lists the "
                                 f"layers that are)")
            chosen = _targets(target, logits.detach(), start)
            score = logits.gather(1, chosen[:, None]).sum()
            if not score.requires_grad:
                raise ModelError(f"the output of {model_name(model)} does not depend on layer "
                                 f"{layer!r} through differentiable operations")
            output = grab.output
            (grad,) = torch.autograd.grad(score, output, allow_unused=True)
            if grad is None:
                grad = torch.zeros_like(output)
        output = output.detach()
        input_size = (int(images.shape[-2]), int(images.shape[-1]))
        drop = 0
        if output.dim() == 3 and options.layout in ("auto", "tokens"):
            drop, height, width = token_grid(output.shape[1], input_size,
                                             options.patch_size or infer_patch_size(model),
                                             options, layer)
            acts = output[:, drop:, :].reshape(len(output), height, width, -1).permute(0, 3, 1, 2)
            grads = grad[:, drop:, :].reshape(len(grad), height, width, -1).permute(0, 3, 1, 2)
        else:
            acts = to_unit_maps(output, options, input_size, None, layer)
            grads = to_unit_maps(grad, options, input_size, None, layer)
        acts64, grads64 = acts.double(), grads.double()
        weights = grads64.mean(dim=(2, 3))                                  # (B, U)
        if method == "grad_x_act":
            maps64 = grads64 * acts64
            contributions = maps64.sum(dim=(2, 3))
        else:
            maps64 = weights[:, :, None, None] * acts64
            contributions = weights * acts64.sum(dim=(2, 3))
        cam = (weights[:, :, None, None] * acts64).sum(dim=1).float()
        tokens = None
        if drop:
            tokens = (grad[:, :drop].double() * output[:, :drop].double()).sum(dim=(1, 2))
            tokens = tokens.cpu().numpy()
        bias = _detect_bias(grab, logits.detach(), acts, chosen, drop)
        patch_zero = (grads == 0).flatten(1).all(dim=1).cpu().numpy()
    finally:
        grab.remove()
    return BatchAttribution(logits.detach().float(), chosen.cpu(),
                            contributions.cpu().numpy(), maps64.float(), cam, tokens, bias,
                            patch_zero, drop, input_size, grab.calls)


# --------------------------------------------------------------------------- public API
def _check_images(images: Any) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 \
            or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise OptionError(f"images: expected a float tensor (B, 3, H, W), got {shape}")
    return images


def _resolve(model: nn.Module, layer: str, dissection: DissectionResult,
             device: str | torch.device | None) -> torch.device:
    if isinstance(model, torch.jit.ScriptModule):
        raise LayerError(f"layer {layer!r} is part of a TorchScript model, whose inner layers "
                         f"cannot be hooked; explain the Python model instead")
    resolved = resolve_layers(model, [layer])
    if resolved != [layer]:
        raise LayerError(f"layer {layer!r}: give one exact layer name, not a pattern")
    if dissection.layer != layer:
        raise OptionError(f"dissection: it is of layer {dissection.layer!r}, but layer "
                          f"{layer!r} is explained")
    if device is None:
        parameter = next(model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")
    from dissect.record.recorder import resolve_device
    resolved_device = resolve_device(device)
    model.to(resolved_device)
    return resolved_device


def _concepts(values: np.ndarray, shares: np.ndarray, groups: ConceptGroups
              ) -> list[ConceptContribution]:
    order = sorted(range(len(groups.names)), key=lambda k: (-values[k], groups.names[k]))
    return [ConceptContribution(groups.names[k], groups.categories[k], float(values[k]),
                                float(shares[k]), groups.member_units[k])
            for k in order]


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(n, h, w) -> float32 (n, H, W), bilinear, align_corners=False."""
    if maps.shape[-2:] == size:
        return maps.float()
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear",
                         align_corners=False)[:, 0]


def explain_prediction(
    model: nn.Module,
    layer: str,
    images: torch.Tensor,
    dissection: DissectionResult,
    target: int | Sequence[int] | torch.Tensor | None = None,
    method: str = "grad_x_act",
    group_by: str = "label",
    iou_threshold: float | None = None,
    token_layout: LayoutOptions | None = None,
    top_negative: int = 3,
    top_k: int = 5,
    device: str | torch.device | None = None,
    class_names: Sequence[str] | None = None,
    image_ids: Sequence[int | str] | None = None,
    unit_concepts: Mapping[int, tuple[str, str]] | None = None,
    batch_size: int | None = None,
) -> list[Explanation]:
    """Explain predictions by the dissected concepts of ``layer`` (DESIGN.md §11).

    Parameters
    ----------
    model:
        The classifier (in the mode it should be explained in; use ``model.eval()``). Its output
        (or the first element of a tuple output) must be (B, C) class scores.
    layer:
        Dotted ``named_modules()`` name of the dissected layer.
    images:
        float32 (B, 3, H, W), preprocessed as for the model.
    dissection:
        The layer's :class:`~dissect.tally.DissectionResult` (labels, categories and IoUs).
    target:
        None (each image's top-1 class), one class for all images, or one class per image.
    method:
        ``'grad_x_act'`` (default) or ``'gradcam'`` (see the module docstring).
    group_by:
        ``'label'`` or ``'category'``.
    iou_threshold:
        A unit belongs to its concept when its IoU >= this (default: the dissection's cut-off).
    token_layout:
        How token outputs map to a grid (:class:`~dissect.record.LayoutOptions`).
    top_negative:
        How many of the most negative concepts to list.
    top_k:
        How many concept maps (largest positive contributions) to compute per image.
    device:
        None: where the model's parameters are; else the model is moved there.
    class_names:
        (C,) names for ``target_name``.
    image_ids:
        (B,) ids for ``Explanation.image`` (default: 0..B-1).
    unit_concepts:
        unit -> (concept name, category) replacing the dissection's labels (e.g. compositional
        labels); units not listed are unlabeled.
    batch_size:
        Images per forward/backward pass (default: all at once).

    Returns
    -------
    One :class:`Explanation` per image, in order.

    Raises
    ------
    OptionError, LayerError, ModelError
        Bad options or images, an unknown layer, a dissection of another layer or unit count, a
        model whose output is not (B, C).
    """
    images = _check_images(images)
    for option, value in (("top_negative", top_negative), ("top_k", top_k)):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise OptionError(f"{option}: expected an integer >= 0, got {value!r}")
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise OptionError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if image_ids is not None and len(image_ids) != len(images):
        raise OptionError(f"image_ids: expected {len(images)} ids, got {len(image_ids)}")
    dev = _resolve(model, layer, dissection, device)
    groups = concept_groups(dissection, group_by, iou_threshold, unit_concepts)
    step = batch_size or max(len(images), 1)
    explanations: list[Explanation] = []
    for start in range(0, len(images), step):
        batch = images[start:start + step].to(dev)
        result = attribute_batch(model, layer, batch, target, method, token_layout, start)
        explanations.extend(_build(result, groups, dissection, layer, method, group_by,
                                   top_negative, top_k, class_names, image_ids, start))
    return explanations


def _check_units(result: BatchAttribution, dissection: DissectionResult, layer: str) -> None:
    if result.contributions.shape[1] != dissection.n_units:
        raise OptionError(f"dissection: layer {layer!r} has {result.contributions.shape[1]} "
                          f"units but the dissection has {dissection.n_units}")


def _build(result: BatchAttribution, groups: ConceptGroups, dissection: DissectionResult,
           layer: str, method: str, group_by: str, top_negative: int, top_k: int,
           class_names: Sequence[str] | None, image_ids: Sequence[int | str] | None,
           start: int) -> list[Explanation]:
    _check_units(result, dissection, layer)
    members = groups.members.astype(np.float64)                        # (K, U)
    unlabeled = groups.unlabeled
    r = result.contributions                                           # (B, U)
    concept_r = r @ members.T                                          # (B, K)
    positive = np.maximum(r, 0).sum(axis=1)                            # (B,)
    safe = np.where(positive > 0, positive, 1.0)
    shares = np.where(positive[:, None] > 0, concept_r / safe[:, None], 0.0)
    unlabeled_r = r[:, unlabeled].sum(axis=1)
    size = result.input_size
    class_maps = _upsample(torch.relu(result.cam), size).cpu().numpy()
    # Concept maps of each image's top_k positive concepts, in one upsampling call.
    member_t = torch.as_tensor(members, dtype=torch.float32, device=result.maps.device)
    picks: list[list[int]] = []
    for b in range(len(r)):
        order = sorted(range(len(groups.names)), key=lambda k: (-concept_r[b, k],
                                                                groups.names[k]))
        picks.append([k for k in order if concept_r[b, k] > 0][:top_k])
    grid = (int(result.maps.shape[2]), int(result.maps.shape[3]))
    flat = None
    if any(picks):
        # (K, U) @ (B, U, h*w) -> (B, K, h*w): every concept's map in one product, then the picks
        every = torch.matmul(member_t, result.maps.flatten(2))
        rows = torch.as_tensor([b for b, p in enumerate(picks) for _ in p], dtype=torch.long)
        cols = torch.as_tensor([k for p in picks for k in p], dtype=torch.long)
        low = every[rows.to(every.device), cols.to(every.device)].reshape(-1, *grid)
        flat = _upsample(torch.relu(low), size).cpu().numpy()
    logits = result.logits.double().cpu().numpy()
    explanations = []
    offset = 0
    for b in range(len(r)):
        target = int(result.target[b])
        logit = float(logits[b, target])
        bias = None if result.bias is None else float(result.bias[b])
        tokens = None if result.tokens is None else float(result.tokens[b])
        residual = logit - (bias or 0.0) - float(r[b].sum()) - (tokens or 0.0)
        concepts = _concepts(concept_r[b], shares[b], groups)
        negative = sorted((c for c in concepts if c.contribution < 0),
                          key=lambda c: (c.contribution, c.label))[:top_negative]
        maps = {}
        for k in picks[b]:
            maps[groups.names[k]] = flat[offset]  # type: ignore[index]
            offset += 1
        notes = []
        if result.drop:
            notes.append(f"layer {layer!r} is a token layer: its {result.drop} leading "
                         f"class/register token(s) are reported as their own bucket 'tokens' "
                         f"({tokens:.6g}); the unit maps are the {grid[0]}x{grid[1]} patch grid")
            if result.patch_grad_zero[b]:
                notes.append(f"the patch tokens of layer {layer!r} get no gradient from the "
                             f"target (the head reads only the class token, as after the last "
                             f"block of a class-token ViT): every unit's contribution is 0 and "
                             f"the evidence is in the 'tokens' bucket; explain an earlier block")
        if result.calls > 1:
            notes.append(f"layer {layer!r} ran {result.calls} times in one forward pass; its "
                         f"last call is explained (as the recorder records it)")
        if bias is None:
            notes.append(f"no linear head reading the global average pool of layer {layer!r} "
                         f"was detected: bias is null and the residual is what the layer's "
                         f"first-order contributions do not account for")
        unlabeled_share = float(unlabeled_r[b] / positive[b]) if positive[b] > 0 else 0.0
        explanations.append(Explanation(
            image=image_ids[start + b] if image_ids is not None else start + b,
            target=target,
            target_name=_class_name(class_names, target),
            logit=logit, bias=bias, residual=residual, method=method, layer=layer,
            group_by=group_by, contributions=r[b].copy(), unit_labels=groups.unit_labels,
            unit_categories=groups.unit_categories, unit_ious=groups.unit_ious,
            concepts=concepts,
            unlabeled=ConceptContribution(UNLABELED, "", float(unlabeled_r[b]), unlabeled_share,
                                          tuple(np.flatnonzero(unlabeled).tolist())),
            negative=negative, tokens=tokens, class_map=class_maps[b], concept_maps=maps,
            grid=grid, notes=notes))
    return explanations


def _class_name(class_names: Sequence[str] | None, target: int) -> str | None:
    if class_names is None:
        return None
    if not 0 <= target < len(class_names):
        raise OptionError(f"class_names: {len(class_names)} names given, but class {target} "
                          f"was explained")
    return str(class_names[target])


def _batches(data: Any, labels: Any, batch_size: int) -> Iterable[tuple[torch.Tensor, Any]]:
    if isinstance(data, torch.Tensor):
        images = _check_images(data)
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels)).reshape(-1)
            if len(labels) != len(images):
                raise OptionError(f"labels: expected {len(images)} labels, got {len(labels)}")
        for start in range(0, len(images), batch_size):
            yield images[start:start + batch_size], (
                None if labels is None else labels[start:start + batch_size])
        return
    if labels is not None:
        raise OptionError("labels: give labels only with an images tensor; a loader yields "
                          "(images, labels) batches")
    for item in data:
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise OptionError("data: a loader must yield (images, labels) batches")
        yield _check_images(item[0]), torch.as_tensor(np.asarray(item[1])).reshape(-1)


def explain_class(
    model: nn.Module,
    layer: str,
    data: torch.Tensor | Iterable[tuple[torch.Tensor, Any]],
    dissection: DissectionResult,
    class_index: int,
    labels: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    selection: str = "true",
    method: str = "grad_x_act",
    group_by: str = "label",
    iou_threshold: float | None = None,
    token_layout: LayoutOptions | None = None,
    device: str | torch.device | None = None,
    class_names: Sequence[str] | None = None,
    unit_concepts: Mapping[int, tuple[str, str]] | None = None,
    batch_size: int = 32,
) -> ClassProfile:
    """The concept profile of a class: mean concept contributions to its logit over its images.

    Streams: memory does not depend on the number of images.

    Parameters
    ----------
    data:
        float32 (N, 3, H, W) images with ``labels`` (N,) int, or an iterable of
        ``(images (B, 3, H, W), labels (B,))`` batches (e.g. a DataLoader).
    class_index:
        The class c; every selected image is explained for target c.
    selection:
        ``'true'``: images whose label is c; ``'predicted'``: images whose top-1 output is c
        (labels are then not needed).
    batch_size:
        Images per pass when ``data`` is a tensor.

    Other parameters are those of :func:`explain_prediction`.

    Returns
    -------
    :class:`ClassProfile`: per concept the mean contribution and the mean per-image share.
    """
    if selection not in ("true", "predicted"):
        raise OptionError(f"selection: got {selection!r}, expected 'true' or 'predicted'")
    if not isinstance(class_index, (int, np.integer)) or class_index < 0:
        raise OptionError(f"class_index: expected a class number >= 0, got {class_index!r}")
    if selection == "true" and isinstance(data, torch.Tensor) and labels is None:
        raise OptionError("labels: selection='true' needs one label per image")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise OptionError(f"batch_size: expected a positive integer, got {batch_size!r}")
    dev = _resolve(model, layer, dissection, device)
    groups = concept_groups(dissection, group_by, iou_threshold, unit_concepts)
    members = groups.members.astype(np.float64)
    unlabeled = groups.unlabeled
    n_units = dissection.n_units
    sum_r = np.zeros(n_units)
    sum_share = np.zeros(len(groups.names))
    sum_unlabeled_share = 0.0
    sum_logit = 0.0
    sum_tokens = 0.0
    count = 0
    bias: float | None = None
    has_tokens = False
    for images, batch_labels in _batches(data, labels, batch_size):
        if selection == "true":
            keep = (batch_labels == int(class_index)).cpu().numpy()
            if not keep.any():
                continue
            images = images[torch.as_tensor(keep)]
        result = attribute_batch(model, layer, images.to(dev), int(class_index), method,
                                 token_layout)
        _check_units(result, dissection, layer)
        keep = np.ones(len(images), dtype=bool)
        if selection == "predicted":
            keep = (result.logits.argmax(dim=1) == int(class_index)).cpu().numpy()
        if result.logits.shape[1] <= class_index:
            raise OptionError(f"class_index: {class_index} is not an output of the model "
                              f"(0..{result.logits.shape[1] - 1})")
        r = result.contributions[keep]
        positive = np.maximum(r, 0).sum(axis=1)
        safe = np.where(positive > 0, positive, 1.0)[:, None]
        sum_r += r.sum(axis=0)
        sum_share += np.where(positive[:, None] > 0, (r @ members.T) / safe, 0.0).sum(axis=0)
        sum_unlabeled_share += float(np.where(positive > 0, r[:, unlabeled].sum(axis=1)
                                              / safe[:, 0], 0.0).sum())
        sum_logit += float(result.logits[torch.as_tensor(keep), int(class_index)].double().sum())
        if result.tokens is not None:
            has_tokens = True
            sum_tokens += float(result.tokens[keep].sum())
        if result.bias is not None:
            bias = float(result.bias[0])
        count += int(keep.sum())
    n = max(count, 1)
    mean_r = sum_r / n
    concepts = _concepts(mean_r @ members.T, sum_share / n, groups)
    return ClassProfile(
        target=int(class_index), target_name=_class_name(class_names, int(class_index)),
        n_images=count, mean_logit=sum_logit / count if count else float("nan"),
        mean_bias=bias, concepts=concepts,
        unlabeled=ConceptContribution(UNLABELED, "", float(mean_r[unlabeled].sum()),
                                      sum_unlabeled_share / n,
                                      tuple(np.flatnonzero(unlabeled).tolist())),
        mean_contributions=mean_r, mean_tokens=sum_tokens / n if has_tokens else None,
        method=method, layer=layer, group_by=group_by, selection=selection)
