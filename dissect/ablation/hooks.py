"""Forward hooks that ablate units of a layer, and the replacement rules.

A unit is a channel (axis 1) of a layer's output tensor, which must be (B, C, H, W) or (B, C) -- the
layouts in which the recorder's units are also axis 1 (DESIGN §4a). Channel-last (B, H, W, C)
layers are refused with a LayerError (:func:`check_unit_shape`, :func:`check_recorded_layout`):
ablating axis 1 there would address rows, not the channels the dissection labels. Token outputs
(B, T, C) of transformers are refused too unless the hook is told how many leading tokens the
recorder left out (``drop_tokens``, the ``drop_tokens`` of the cache's ``unit_layout``; see
:func:`token_drop`): then unit u is channel u (the last axis) of the patch tokens ``[drop:]``,
and the class/register tokens ``[:drop]`` are left as they are -- exactly the positions the
recorder's grid shows. Ablating a set of units replaces their output maps by a per-unit
constant given by a rule:

- ``zero`` (default): 0.
- ``mean``: the unit's mean activation over the dataset (``means``, see :func:`compute_unit_means`).

New rules are added with :func:`register_rule`. The hooks are removed when the context exits, also
after an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from dissect.errors import LayerError, OptionError
from dissect.record.trace import find_module

RuleFunction = Callable[[int, "np.ndarray | None"], np.ndarray]
"""A rule maps (number of units U, optional per-unit means (U,)) to fill values (U,) float32."""

_RULES: dict[str, RuleFunction] = {}


def register_rule(name: str) -> Callable[[RuleFunction], RuleFunction]:
    """Decorator registering an ablation rule under ``name``; a duplicate name is refused."""

    def decorate(function: RuleFunction) -> RuleFunction:
        if name in _RULES:
            raise ValueError(f"ablation rule {name!r} is already registered")
        _RULES[name] = function
        return function

    return decorate


def rule_names() -> tuple[str, ...]:
    """The registered rule names (allowed values of the ``rule`` option)."""
    return tuple(_RULES)


@register_rule("zero")
def _zero_rule(n_units: int, means: np.ndarray | None) -> np.ndarray:
    return np.zeros(n_units, dtype=np.float32)


@register_rule("mean")
def _mean_rule(n_units: int, means: np.ndarray | None) -> np.ndarray:
    if means is None:
        raise OptionError("rule 'mean' needs the per-unit mean activations (means=...); compute "
                          "them from the activation cache with compute_unit_means(reader)")
    values = np.asarray(means, dtype=np.float32).reshape(-1)
    if values.shape != (n_units,):
        raise OptionError(f"rule 'mean': means has {values.size} values but the layer has "
                          f"{n_units} units")
    return values


def fill_values(rule: str, n_units: int, means: np.ndarray | None = None) -> np.ndarray:
    """The value each unit takes when ablated under ``rule``.

    Returns
    -------
    (U,) float32. Raises OptionError for an unknown rule or missing/mis-sized means.
    """
    if rule not in _RULES:
        raise OptionError(f"option rule: unknown ablation rule {rule!r}; allowed: "
                          f"{', '.join(_RULES)}")
    return _RULES[rule](n_units, means)


def check_rule(rule: str) -> None:
    """Raise OptionError when ``rule`` is not a registered rule."""
    if rule not in _RULES:
        raise OptionError(f"option rule: unknown ablation rule {rule!r}; allowed: "
                          f"{', '.join(_RULES)}")


def check_units(units: Sequence[int] | np.ndarray, n_units: int | None = None) -> np.ndarray:
    """Validate a unit set: integers in ``[0, n_units)`` (when known).

    Returns
    -------
    (k,) int64, sorted, duplicates removed. Raises OptionError naming the bad index.
    """
    array = np.asarray(list(units) if not isinstance(units, np.ndarray) else units)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer)
                               or (np.issubdtype(array.dtype, np.floating)
                                   and np.all(array == np.round(array)))):
        raise OptionError(f"option units: expected a list of integer unit indices, got {units!r}")
    array = array.astype(np.int64)
    bad = array[(array < 0) | ((array >= n_units) if n_units is not None else False)]
    if bad.size:
        allowed = f"[0, {n_units})" if n_units is not None else "non-negative integers"
        raise OptionError(f"option units: unit index {int(bad[0])} is out of range; allowed "
                          f"{allowed}")
    return np.unique(array)


#: Recorder layouts (``LayoutOptions.layout``) whose units are not axis 1 of the layer output.
UNSUPPORTED_LAYOUTS = ("nhwc", "tokens")


def check_unit_shape(shape: Any, layer: str) -> tuple[int, ...]:
    """LayerError unless ``shape`` is a (B, C, H, W) or (B, C) layer output (units on axis 1).

    ``shape`` is the output's shape tuple, or a type name when the output is not a tensor.
    """
    if not isinstance(shape, tuple) or len(shape) not in (2, 4):
        got = f"gives {shape}" if isinstance(shape, tuple) else f"outputs {shape}"
        if isinstance(shape, tuple) and len(shape) == 3:
            got += (" (transformer tokens (B, T, C)? the hooks ablate their channels when told "
                    "the number of leading class/register tokens, drop_tokens)")
        raise LayerError(f"ablation supports layers with (B, C, H, W) (or (B, C)) outputs, units "
                         f"on axis 1; layer {layer!r} {got}. Ablate a convolutional layer or one "
                         "whose output has channels on axis 1")
    return shape


def check_recorded_layout(layout: Any, layer: str) -> None:
    """LayerError when the cache of ``layer`` was recorded with a layout ablation cannot address.

    ``layout`` is the ``layout`` field of a cache fingerprint (a ``LayoutOptions`` dict, or its
    ``layout`` string); None or 'auto'/'nchw' pass (3-D outputs are refused by the shape check).
    """
    name = layout.get("layout") if isinstance(layout, dict) else layout
    if name in UNSUPPORTED_LAYOUTS:
        raise LayerError(f"ablation supports layers with (B, C, H, W) (or (B, C)) outputs, units "
                         f"on axis 1; layer {layer!r} was recorded with layout {name!r}, whose "
                         "units (channels) are the last axis of the output")


def token_drop(unit_layout: Any) -> int | None:
    """The ``drop_tokens`` of a cache's ``unit_layout`` (``CacheInfo.unit_layout``) when the layer
    was recorded as tokens, else None (units on axis 1)."""
    if isinstance(unit_layout, dict) and unit_layout.get("layout") == "tokens":
        return int(unit_layout.get("drop_tokens", 0))
    return None


def check_token_shape(shape: Any, layer: str, drop_tokens: int) -> tuple[int, ...]:
    """LayerError unless ``shape`` is a (B, T, C) token output with more than ``drop_tokens``
    tokens (units are then its C channels of the patch tokens ``[drop_tokens:]``)."""
    if not isinstance(shape, tuple) or len(shape) != 3 or shape[1] <= drop_tokens:
        got = f"gives {shape}" if isinstance(shape, tuple) else f"outputs {shape}"
        raise LayerError(f"layer {layer!r} was to be ablated as transformer tokens (B, T, C) "
                         f"with {drop_tokens} leading class/register tokens, but it {got}")
    return shape


def _output_tensor(output: Any, layer: str, drop_tokens: int | None = None) -> torch.Tensor:
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    if drop_tokens is None:
        check_unit_shape(shape, layer)
    else:
        check_token_shape(shape, layer, drop_tokens)
    return output


def _units_last(tensor: torch.Tensor, drop_tokens: int | None) -> torch.Tensor:
    """A (B, U, ...) view of the units: the layer output itself, or for tokens the (B, U, T')
    view of the patch tokens (a view: writes to it change ``tensor``)."""
    if drop_tokens is None:
        return tensor
    return tensor[:, drop_tokens:, :].transpose(1, 2)


def apply_unit_masks(acts: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Replicate a batch along a set axis and ablate one unit set per replica.

    Parameters
    ----------
    acts : (B, U, ...) float tensor
        Layer output of B images; it is replicated S times, set-major.
    masks : (S, U) bool tensor
        ``masks[s, u]``: unit u is ablated in set s.
    fill : (U,) float tensor
        Value of an ablated unit (see :func:`fill_values`).

    Returns
    -------
    (S * B, U, ...) tensor of ``acts.dtype``, set-major; kept units are exactly the input values.
    """
    n_sets, n_units = masks.shape
    if acts.shape[1] != n_units:
        raise OptionError(f"unit masks have {n_units} units but the layer output has "
                          f"{acts.shape[1]} (shape {tuple(acts.shape)})")
    rows = acts.shape[0]
    per_set = acts.reshape((1, rows) + tuple(acts.shape[1:]))
    trailing = (1,) * (acts.dim() - 2)
    mask_view = masks.to(acts.device).reshape((n_sets, 1, n_units) + trailing)
    fill_view = fill.to(device=acts.device, dtype=acts.dtype).reshape((1, 1, n_units) + trailing)
    out = torch.where(mask_view, fill_view, per_set)
    return out.reshape((n_sets * rows,) + tuple(acts.shape[1:]))


def mask_replicated(acts: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Ablate set s in rows ``s*B:(s+1)*B`` of an (S * B, U, ...) batch (already replicated).

    Returns a new (S * B, U, ...) tensor; see :func:`apply_unit_masks` for the arguments.
    """
    n_sets, n_units = masks.shape
    if acts.shape[0] % n_sets:
        raise ValueError(f"batch of {acts.shape[0]} rows is not a multiple of {n_sets} sets")
    rows = acts.shape[0] // n_sets
    per_set = acts.reshape((n_sets, rows) + tuple(acts.shape[1:]))
    trailing = (1,) * (acts.dim() - 2)
    mask_view = masks.to(acts.device).reshape((n_sets, 1, n_units) + trailing)
    fill_view = fill.to(device=acts.device, dtype=acts.dtype).reshape((1, 1, n_units) + trailing)
    return torch.where(mask_view, fill_view, per_set).reshape(acts.shape)


@contextmanager
def forward_hook(module: nn.Module, hook: Any) -> Iterator[None]:
    """Register ``hook`` as a forward hook of ``module`` for the block; removed on exit, also
    after an exception."""
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def once_per_forward(model: nn.Module, layer: str) -> Iterator[Callable[[], None]]:
    """Yield a function for a hook of ``layer`` to call on each call of the layer: it raises
    LayerError when the layer runs a second time within one forward pass of ``model``.

    The recorder keeps a reused module's last output (trace.py), but a forward hook would change
    every call of it (the first ReLU of a torchvision BasicBlock as well as the block output), so
    an ablation of such a layer would not be the ablation of the recorded units. Calls outside a
    ``model(...)`` call (``model.forward`` called directly) are not counted.
    """
    state = {"active": False, "calls": 0}

    def start(_module: nn.Module, _inputs: Any) -> None:
        state["active"], state["calls"] = True, 0

    def end(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        state["active"] = False

    def note_call() -> None:
        if not state["active"]:
            return
        state["calls"] += 1
        if state["calls"] > 1:
            raise LayerError(
                f"layer {layer!r} runs more than once in one forward pass (a module used twice, "
                f"like the shared ReLU of a torchvision BasicBlock); its recorded maps are those "
                f"of its last call, which a forward hook cannot ablate alone: ablate a module "
                f"that runs once, such as the enclosing block")

    handles = [model.register_forward_pre_hook(start), model.register_forward_hook(end)]
    try:
        yield note_call
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def ablate_units(model: nn.Module, layer: str, units: Sequence[int] | np.ndarray,
                 rule: str = "zero", means: np.ndarray | None = None,
                 drop_tokens: int | None = None) -> Iterator[None]:
    """Ablate ``units`` of ``layer`` during the ``with`` block.

    A forward hook on the module replaces the output maps of the chosen units (axis 1 of the output
    tensor) by the rule's value: ``zero`` -> 0, ``mean`` -> ``means[u]`` (per-unit dataset mean,
    (U,) array). The hook is removed on exit, also after an exception. For a token layer
    ((B, T, C) output) pass ``drop_tokens`` (see :func:`token_drop`): unit u is then channel u of
    the patch tokens ``[drop_tokens:]``; the leading class/register tokens keep their values.

    Parameters
    ----------
    model : nn.Module
    layer : str, a dotted ``named_modules()`` name (LayerError otherwise)
    units : sequence of int, 0-based unit indices (OptionError when out of range; the range is
        checked at the first forward, when U is known)
    rule : 'zero' | 'mean' (or any name added with :func:`register_rule`)
    means : (U,) float array, needed by ``rule='mean'``
    drop_tokens : None (units on axis 1) or, for a (B, T, C) token layer, the number of leading
        tokens left as they are

    Examples
    --------
    >>> with ablate_units(model, "layer3", [4, 17]):          # doctest: +SKIP
    ...     logits = model(images)
    """
    module = find_module(model, layer)
    check_rule(rule)
    unit_array = check_units(units)

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> torch.Tensor:
        note_call()
        tensor = _output_tensor(output, layer, drop_tokens)
        out = tensor.clone()
        units_view = _units_last(out, drop_tokens)          # (B, U, ...), a view of out
        n_units = units_view.shape[1]
        check_units(unit_array, n_units)
        fill = torch.from_numpy(fill_values(rule, n_units, means))
        index = torch.from_numpy(unit_array).to(tensor.device)
        shape = (len(unit_array),) + (1,) * (units_view.dim() - 2)
        units_view[:, index] = fill[index.cpu()].to(device=tensor.device,
                                                    dtype=tensor.dtype).reshape(shape)
        return out

    with once_per_forward(model, layer) as note_call, forward_hook(module, hook):
        yield


@contextmanager
def ablate_unit_sets(model: nn.Module, layer: str, masks: np.ndarray | torch.Tensor,
                     rule: str = "zero", means: np.ndarray | None = None,
                     drop_tokens: int | None = None) -> Iterator[None]:
    """Evaluate S unit sets in one forward: the batched form of :func:`ablate_units`.

    Inside the block, feed the model a batch replicated S times along the batch axis, set-major
    (``images.repeat(S, 1, 1, 1)``: rows ``s*B:(s+1)*B`` are set s); the hook ablates the units of
    ``masks[s]`` in the rows of set s. The hook is removed on exit, also after an exception.

    Parameters
    ----------
    masks : (S, U) bool array or tensor, ``masks[s, u]`` = unit u ablated in set s
    rule, means, drop_tokens : as in :func:`ablate_units`
    """
    mask_array = np.asarray(masks, dtype=bool)
    if mask_array.ndim != 2:
        raise OptionError(f"masks must be (S, U) bool, got shape {mask_array.shape}")
    with ablate_with_fill(model, layer, mask_array, fill_values(rule, mask_array.shape[1], means),
                          drop_tokens=drop_tokens):
        yield


def mask_replicated_tokens(tokens: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor,
                           drop_tokens: int) -> torch.Tensor:
    """:func:`mask_replicated` for an (S * B, T, U) token batch: set s ablates channel u of the
    patch tokens ``[drop_tokens:]`` of its rows; the leading tokens keep their values.

    Returns a new (S * B, T, U) tensor.
    """
    n_sets, n_units = masks.shape
    if tokens.shape[0] % n_sets:
        raise ValueError(f"batch of {tokens.shape[0]} rows is not a multiple of {n_sets} sets")
    if tokens.shape[2] != n_units:
        raise OptionError(f"unit masks have {n_units} units but the token layer has "
                          f"{tokens.shape[2]} channels (shape {tuple(tokens.shape)})")
    rows = tokens.shape[0] // n_sets
    per_set = tokens.reshape(n_sets, rows, tokens.shape[1], n_units)
    patches = torch.arange(tokens.shape[1], device=tokens.device) >= drop_tokens
    mask_view = masks.to(tokens.device).reshape(n_sets, 1, 1, n_units) \
        & patches.reshape(1, 1, -1, 1)
    fill_view = fill.to(device=tokens.device, dtype=tokens.dtype).reshape(1, 1, 1, n_units)
    return torch.where(mask_view, fill_view, per_set).reshape(tokens.shape)


@contextmanager
def ablate_with_fill(model: nn.Module, layer: str, masks: np.ndarray,
                     fill: np.ndarray, drop_tokens: int | None = None) -> Iterator[None]:
    """:func:`ablate_unit_sets` with explicit fill values (U,) float32 instead of a rule."""
    module = find_module(model, layer)
    mask_tensor = torch.as_tensor(np.asarray(masks, dtype=bool))
    fill_tensor = torch.as_tensor(np.asarray(fill, dtype=np.float32))

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> torch.Tensor:
        note_call()
        tensor = _output_tensor(output, layer, drop_tokens)
        if drop_tokens is not None:
            return mask_replicated_tokens(tensor, mask_tensor, fill_tensor, drop_tokens)
        return mask_replicated(tensor, mask_tensor, fill_tensor)

    with once_per_forward(model, layer) as note_call, forward_hook(module, hook):
        yield


@contextmanager
def replace_output(model: nn.Module, layer: str, values: torch.Tensor) -> Iterator[None]:
    """Replace the output of ``layer`` by ``values`` (same shape) during the block.

    Used to check that running the model's suffix on given activations equals the full forward
    whose layer output is those activations. The hook is removed on exit.
    """
    module = find_module(model, layer)

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> torch.Tensor:
        tensor = _output_tensor(output, layer)
        if tuple(tensor.shape) != tuple(values.shape):
            raise LayerError(f"layer {layer!r}: replacement of shape {tuple(values.shape)} does "
                             f"not match the output shape {tuple(tensor.shape)}")
        return values.to(device=tensor.device, dtype=tensor.dtype).clone()  # in-place ops follow

    with forward_hook(module, hook):
        yield


class RowReader(Protocol):
    """What :func:`compute_unit_means` needs of an activation source (e.g. a CacheReader)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...


def compute_unit_means(reader: RowReader, *, batch_size: int = 64) -> np.ndarray:
    """Per-unit mean activation over every image and position, streaming over the cache.

    Parameters
    ----------
    reader : a CacheReader (or anything with ``shape`` (N, U, ...) and ``read(start, stop)``
        returning float32 rows)
    batch_size : images read at a time (memory is bounded by one block)

    Returns
    -------
    (U,) float64, the mean of ``acts[:, u]`` over images and spatial positions.
    """
    shape = tuple(reader.shape)
    n_images, n_units = shape[0], shape[1]
    if n_images == 0:
        raise OptionError("compute_unit_means: the activation cache holds no image")
    total = np.zeros(n_units, dtype=np.float64)
    for start in range(0, n_images, batch_size):
        block = np.asarray(reader.read(start, min(start + batch_size, n_images)), np.float64)
        total += block.reshape(block.shape[0], n_units, -1).sum(axis=(0, 2))
    positions = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    return total / (n_images * positions)
