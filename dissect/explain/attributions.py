"""Input-space attribution maps beside the concept explanations, computed with captum.

:func:`input_attributions` gives one (H, W) map per image and method:

- ``saliency``: captum ``Saliency`` (|d y_c / d x|), the maximum over the colour channels
  (Simonyan et al. 2014);
- ``ig``: captum ``IntegratedGradients`` from a baseline (default: zeros, i.e. the mean image
  for normalised input), summed over the colour channels (signed);
- ``occlusion``: captum ``Occlusion`` with a square window over all channels (baseline 0): the
  mean drop of y_c over the windows covering a pixel (signed; the channels carry equal values,
  their mean is taken);
- ``gradcam``: captum ``LayerGradCam`` at ``layer`` (ReLU'd, summed over units), upsampled
  bilinearly (half-pixel centres) to the image; for a token layer (ViT), which captum's Grad-CAM
  cannot read as maps, the Grad-CAM of :func:`dissect.explain.core.attribute_batch` on the
  recorder's token grid.

captum is imported when a map is asked for (it pulls in matplotlib).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dissect.config import ATTRIBUTION_METHODS
from dissect.errors import OptionError
from dissect.record.models import first_tensor
from dissect.record.trace import LayoutOptions, find_module

__all__ = ["ATTRIBUTION_METHODS", "input_attributions"]


class _Logits(nn.Module):
    """The model with its output reduced to the (B, C) tensor captum needs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = first_tensor(self.model(images))
        if output is None or output.dim() != 2:
            raise OptionError("model: input attributions need (B, C) class scores as output")
        return output


def input_attributions(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    methods: Sequence[str] = ("saliency", "gradcam"),
    layer: str | None = None,
    token_layout: LayoutOptions | None = None,
    baselines: torch.Tensor | float = 0.0,
    ig_steps: int = 32,
    occlusion_window: int | None = None,
    occlusion_stride: int | None = None,
) -> dict[str, torch.Tensor]:
    """Input-space maps (see the module docstring) for each image and its target class.

    Parameters
    ----------
    model:
        The classifier (eval mode); output (B, C) or a tuple starting with it.
    images:
        float32 (B, 3, H, W), preprocessed as for the model.
    target:
        None (top-1 of each image), one class for all, or (B,) classes.
    methods:
        Any of ``'saliency'``, ``'gradcam'``, ``'ig'``, ``'occlusion'``.
    layer:
        The layer for ``gradcam`` (a ``named_modules()`` name); required for it.
    baselines:
        Baseline of ``ig`` (a number or a (B, 3, H, W) / (1, 3, H, W) tensor).
    ig_steps:
        Integration steps of ``ig``.
    occlusion_window, occlusion_stride:
        Window side and stride in pixels (default: H // 8 and half the window, at least 1).

    Returns
    -------
    dict method -> float32 (B, H, W) CPU tensor, in ``methods`` order.

    Raises
    ------
    OptionError
        Unknown method, ``gradcam`` without a layer, bad images, steps, window or target.
    """
    unknown = [m for m in methods if m not in ATTRIBUTION_METHODS]
    if unknown:
        raise OptionError(f"attributions: unknown method(s) {', '.join(map(repr, unknown))}; "
                          f"expected any of {', '.join(ATTRIBUTION_METHODS)}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise OptionError(f"images: expected a float tensor (B, 3, H, W), got "
                          f"{getattr(images, 'shape', type(images).__name__)}")
    if "gradcam" in methods and layer is None:
        raise OptionError("attributions: 'gradcam' needs the layer (layer=...)")
    if not isinstance(ig_steps, int) or ig_steps < 1:
        raise OptionError(f"ig_steps: expected a positive integer, got {ig_steps!r}")
    from captum.attr import IntegratedGradients, LayerGradCam, Occlusion, Saliency

    wrapped = _Logits(model)
    height, width = int(images.shape[2]), int(images.shape[3])
    with torch.no_grad():
        logits = wrapped(images)
    chosen = _target(target, logits)
    results: dict[str, torch.Tensor] = {}
    for method in methods:
        if method == "saliency":
            leaf = images.detach().clone().requires_grad_(True)
            grads = Saliency(wrapped).attribute(leaf, target=chosen, abs=True)
            results[method] = grads.detach().amax(dim=1)
        elif method == "ig":
            attr = IntegratedGradients(wrapped).attribute(
                images, baselines=baselines, target=chosen, n_steps=ig_steps,
                internal_batch_size=max(len(images), 1))
            results[method] = attr.detach().sum(dim=1)
        elif method == "occlusion":
            window = occlusion_window or max(1, height // 8)
            stride = occlusion_stride or max(1, window // 2)
            if not isinstance(window, int) or not isinstance(stride, int) or window < 1 \
                    or stride < 1 or window > min(height, width):
                raise OptionError(f"occlusion_window/occlusion_stride: expected positive "
                                  f"integers, the window at most {min(height, width)}, got "
                                  f"{window!r}/{stride!r}")
            attr = Occlusion(wrapped).attribute(images, sliding_window_shapes=(3, window, window),
                                                strides=(3, stride, stride), baselines=0.0,
                                                target=chosen)
            results[method] = attr.detach().mean(dim=1)
        else:
            results[method] = _gradcam(model, wrapped, layer, images, chosen,  # type: ignore
                                       token_layout, LayerGradCam)
    return {name: value.float().cpu() for name, value in results.items()}


def _target(target: Any, logits: torch.Tensor) -> torch.Tensor:
    batch, n_classes = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    if isinstance(target, (int, np.integer)):
        chosen = torch.full((batch,), int(target), dtype=torch.long, device=logits.device)
    else:
        chosen = torch.as_tensor(np.asarray(target), dtype=torch.long).reshape(-1).to(
            logits.device)
        if len(chosen) != batch:
            raise OptionError(f"target: expected {batch} classes, got {len(chosen)}")
    if ((chosen < 0) | (chosen >= n_classes)).any():
        raise OptionError(f"target: classes must be outputs of the model (0..{n_classes - 1})")
    return chosen


def _gradcam(model: nn.Module, wrapped: nn.Module, layer: str, images: torch.Tensor,
             chosen: torch.Tensor, token_layout: LayoutOptions | None,
             layer_gradcam: Any) -> torch.Tensor:
    module = find_module(model, layer)
    size = (int(images.shape[2]), int(images.shape[3]))
    probe: list[int] = []
    handle = module.register_forward_hook(
        lambda m, i, o: probe.append(first_tensor(o).dim()))  # type: ignore[union-attr]
    try:
        with torch.no_grad():
            wrapped(images[:1])
    finally:
        handle.remove()
    if probe and probe[-1] == 4 and (token_layout is None or token_layout.layout in
                                     ("auto", "nchw")):
        cam = layer_gradcam(wrapped, module).attribute(images, target=chosen,
                                                       relu_attributions=True)
        cam = cam.detach()
    else:
        from dissect.explain.core import attribute_batch
        result = attribute_batch(model, layer, images, chosen.cpu(), "gradcam", token_layout)
        cam = torch.relu(result.cam)[:, None]
    return F.interpolate(cam.float(), size=size, mode="bilinear", align_corners=False)[:, 0]
