"""Layer names, forward hooks and the conversion of layer outputs to unit maps.

A recorded layer output becomes ``(B, U, h, w)`` unit maps:

- 4-D ``(B, C, h, w)`` outputs are kept (``layout='nchw'``) or, for channel-last layers such as
  torchvision's Swin stages, permuted from ``(B, h, w, C)`` (``layout='nhwc'``);
- 3-D ``(B, T, C)`` token outputs (transformers) drop their leading class/register tokens and are
  reshaped to ``(B, C, h, w)`` in row-major patch order (patch ``i * w + j`` goes to ``[i, j]``);
- 2-D ``(B, C)`` outputs (pooled features, logits) become ``(B, C, 1, 1)``.

A layer whose output is a tuple or list is recorded from its first element. A module called
several times in one forward pass (e.g. the shared ReLU of a torchvision ``BasicBlock``) is
recorded from its last call.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn

from dissect.config import LAYOUTS
from dissect.errors import LayerError, OptionError
from dissect.record.models import first_tensor, model_name

#: Allowed values of :attr:`LayoutOptions.layout` (the ``layout`` option of the recorder):
#:
#: - ``auto``: 4-D outputs as (B, C, h, w), 3-D as transformer tokens (B, T, C), 2-D (B, C) as
#:   1x1 maps;
#: - ``nchw``: 4-D channel-first outputs only;
#: - ``nhwc``: 4-D channel-last outputs (B, h, w, C), e.g. torchvision Swin stages;
#: - ``tokens``: 3-D (B, T, C) token outputs only: the leading ``drop_tokens`` tokens (class and
#:   register tokens; default ``T - h * w``) are left out and the rest, in row-major patch order,
#:   become an ``h x w`` grid (``grid``; default input size // ``patch_size``).
#:
#: (``LAYOUTS`` itself is defined once, in :mod:`dissect.config`.)
#: The same choices under the name the command line uses for its ``--layout`` option.
TOKEN_LAYOUTS = LAYOUTS
#: How many leading (class/register) tokens the grid inference may drop at most.
MAX_INFERRED_DROP = 16
_WILDCARDS = "*?["


# --------------------------------------------------------------------------- layer names
def layer_names(model: nn.Module) -> list[str]:
    """Every hookable layer name: ``model.named_modules()`` names without the root ``''``."""
    return [name for name, _ in model.named_modules() if name]


def match_pattern(pattern: str, names: Sequence[str]) -> list[str]:
    """Names matching a wildcard ``pattern``, in ``names`` order.

    Matching is ``fnmatch`` (case-sensitive) per dotted segment: ``*`` stays inside one segment, so
    ``layer*`` gives ``layer1 .. layer4`` (not their children), ``layer4.*`` the blocks of
    ``layer4`` and ``layer4.*.conv?`` their convolutions. A pattern ending in ``.**`` also matches
    every descendant (``layer4.**``).
    """
    parts = pattern.split(".")
    deep = parts[-1] == "**"
    if deep:
        parts = parts[:-1]
    found = []
    for name in names:
        segments = name.split(".")
        if len(segments) < len(parts) + deep or (not deep and len(segments) != len(parts)):
            continue
        if all(fnmatch.fnmatchcase(s, p) for s, p in zip(segments, parts)):
            found.append(name)
    return found


def _unknown_layer(name: str, names: Sequence[str], model: nn.Module) -> LayerError:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    if close:
        hint = f"close matches: {', '.join(close)}"
    else:
        top = [n for n in names if "." not in n][:8]
        hint = f"top-level layers: {', '.join(top)}" if top else "the model has no sub-modules"
    return LayerError(f"unknown layer {name!r} in model {model_name(model)}; {hint}. "
                      f"List every layer with `dissect layers MODEL`")


def find_module(model: nn.Module, layer: str) -> nn.Module:
    """The submodule named ``layer``, an exact dotted ``named_modules()`` name (no wildcards).

    The one lookup of a layer by name: LayerError naming the layer and close matches (as
    :func:`resolve_layers`) when the model has no such submodule (the root ``''`` is none).
    """
    modules = dict(model.named_modules())
    if layer and layer in modules:
        return modules[layer]
    raise _unknown_layer(layer, [name for name in modules if name], model)


def resolve_layers(model: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Expand layer names and wildcard patterns to ``named_modules()`` names (no duplicates).

    Exact names must exist; a pattern (containing ``*``, ``?`` or ``[``, see
    :func:`match_pattern`) must match at least one layer. Order: the order of ``patterns``, then
    module order within a pattern.

    Raises
    ------
    LayerError
        Unknown name (listing close matches and pointing to ``dissect layers MODEL``), a pattern
        matching nothing, or no layers at all.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    names = layer_names(model)
    resolved: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in _WILDCARDS):
            matched = match_pattern(pattern, names)
            if not matched:
                raise LayerError(f"layer pattern {pattern!r} matches no layer of "
                                 f"{model_name(model)} (wildcards match within one dotted "
                                 f"segment; end with '.**' for descendants). List every layer with "
                                 f"`dissect layers MODEL`")
        elif pattern in names:
            matched = [pattern]
        else:
            raise _unknown_layer(pattern, names, model)
        resolved.extend(m for m in matched if m not in resolved)
    if not resolved:
        raise LayerError("no layers given; name at least one layer (see `dissect layers MODEL`)")
    return resolved


# --------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class LayoutOptions:
    """How layer outputs become ``(B, U, h, w)`` unit maps.

    Attributes
    ----------
    layout:
        ``'auto'`` (default: 4-D as NCHW, 3-D as tokens, 2-D as (B, C, 1, 1)), ``'nchw'``,
        ``'nhwc'`` (channel-last 4-D outputs) or ``'tokens'`` ((B, T, C) outputs).
    drop_tokens:
        Leading tokens (class token, register tokens) to drop; default ``T - h * w``.
    grid:
        Token grid ``(h, w)``; default ``(H // ph, W // pw)`` from the input size and patch size.
    patch_size:
        Patch size ``p`` or ``(ph, pw)``; default found on the model (a ``patch_size`` attribute,
        ``patch_embed.patch_size``, or the first Conv2d whose stride equals its kernel).
    """

    layout: str = "auto"
    drop_tokens: int | None = None
    grid: tuple[int, int] | None = None
    patch_size: int | tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise OptionError(f"layout: got {self.layout!r}, expected one of {', '.join(LAYOUTS)}")
        if self.drop_tokens is not None and (not isinstance(self.drop_tokens, int)
                                             or self.drop_tokens < 0):
            raise OptionError(f"drop_tokens: expected a non-negative integer, "
                              f"got {self.drop_tokens!r}")
        if self.grid is not None:
            grid = tuple(int(v) for v in self.grid)
            if len(grid) != 2 or min(grid) < 1:
                raise OptionError(f"grid: expected (h, w) positive integers, got {self.grid!r}")
            object.__setattr__(self, "grid", grid)
        if self.patch_size is not None:
            patch = _pair(self.patch_size)
            if patch is None:
                raise OptionError(f"patch_size: expected p or (ph, pw) positive integers, "
                                  f"got {self.patch_size!r}")
            object.__setattr__(self, "patch_size", patch)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (part of the cache fingerprint)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def layouts_for(layers: Sequence[str], layout: LayoutOptions | Mapping[str, LayoutOptions] | None
                ) -> dict[str, LayoutOptions]:
    """The :class:`LayoutOptions` of every layer.

    ``layout`` is None (defaults for all), one :class:`LayoutOptions` for all layers, or a mapping
    from layer name to options (layers not in it get the defaults).

    Raises
    ------
    OptionError
        When the mapping names a layer that is not recorded or holds something else.
    """
    if layout is None or isinstance(layout, LayoutOptions):
        return {layer: layout or LayoutOptions() for layer in layers}
    unknown = [k for k in layout if k not in layers]
    if unknown:
        raise OptionError(f"layout: options given for layers {unknown} that are not recorded "
                          f"({', '.join(layers)})")
    bad = [k for k, v in layout.items() if not isinstance(v, LayoutOptions)]
    if bad:
        raise OptionError(f"layout: the values for {bad} must be LayoutOptions")
    return {layer: layout.get(layer, LayoutOptions()) for layer in layers}


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and value > 0:
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and v > 0 for v in value):
        return (int(value[0]), int(value[1]))
    return None


def infer_patch_size(model: nn.Module) -> tuple[int, int] | None:
    """The patch size of a vision transformer, or None when the model shows none.

    Looked up, in order: ``model.patch_size`` (torchvision ViT), ``model.patch_embed.patch_size``
    (timm), then the first ``Conv2d`` whose stride equals its kernel size (> 1).
    """
    for owner in (model, getattr(model, "patch_embed", None)):
        found = _pair(getattr(owner, "patch_size", None)) if owner is not None else None
        if found is not None:
            return found
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == tuple(module.stride) \
                and max(module.kernel_size) > 1:
            return (int(module.kernel_size[0]), int(module.kernel_size[1]))
    return None


def token_grid(n_tokens: int, input_size: tuple[int, int] | None,
               patch_size: tuple[int, int] | None, options: LayoutOptions,
               layer: str = "?") -> tuple[int, int, int]:
    """``(drop, h, w)``: how ``n_tokens`` tokens of a layer map to an ``h x w`` grid.

    The grid is ``options.grid``, else ``(H // ph, W // pw)`` from the model input size ``(H, W)``
    and the patch size, else the grid of the input's aspect ratio reached by dropping the fewest
    leading tokens (at most :data:`MAX_INFERRED_DROP`). ``drop`` is ``options.drop_tokens`` or
    ``n_tokens - h * w``.

    Raises
    ------
    LayerError
        When the tokens do not fit the grid, naming the layer and the options to set.
    """
    hint = ("; set the token grid (grid=(h, w)), the patch size or the number of leading tokens "
            "to drop (drop_tokens) explicitly")
    grid = options.grid
    if grid is None and patch_size is not None and input_size is not None:
        grid = (input_size[0] // patch_size[0], input_size[1] // patch_size[1])
    if grid is not None:
        drop = n_tokens - grid[0] * grid[1] if options.drop_tokens is None else options.drop_tokens
        if drop < 0 or n_tokens - drop != grid[0] * grid[1]:
            raise LayerError(f"layer {layer!r}: {n_tokens} tokens do not fit a {grid[0]}x{grid[1]} "
                             f"grid after dropping {max(drop, 0)} leading tokens{hint}")
        return drop, grid[0], grid[1]
    height, width = input_size if input_size is not None else (1, 1)
    drops = [options.drop_tokens] if options.drop_tokens is not None else range(
        min(MAX_INFERRED_DROP, n_tokens - 1) + 1)
    for drop in drops:
        count = n_tokens - drop
        rows = math.isqrt(count * height // width) if count > 0 else 0
        for h in (rows, rows + 1):
            if h > 0 and count % h == 0 and h * width == (count // h) * height:
                return drop, h, count // h
    raise LayerError(f"layer {layer!r}: cannot infer a token grid for {n_tokens} tokens and "
                     f"input size {input_size}{hint}")


def describe_layout(shape: Sequence[int], options: LayoutOptions,
                    input_size: tuple[int, int] | None = None,
                    patch_size: tuple[int, int] | None = None, layer: str = "?") -> dict[str, Any]:
    """How a layer output of ``shape`` (batch axis included) is read as unit maps.

    Returns a JSON-ready dict: ``layout`` (the layout actually used: ``'nchw'``, ``'nhwc'``,
    ``'tokens'`` or ``'flat'`` for 2-D outputs), ``output_shape`` (per image), ``units`` U,
    ``grid`` [h, w] of the unit maps and ``drop_tokens`` (leading tokens left out; 0 unless
    tokens). This is what a cache stores as its ``unit_layout`` attribute, so a run and its report
    can state it (a ViT-B/16 block at 224 px: tokens, 197 -> 1 class token dropped, 14x14 grid).

    Raises
    ------
    LayerError
        As :func:`to_unit_maps` for shapes the options cannot read.
    """
    shape = tuple(int(v) for v in shape)
    layout = options.layout
    base = {"output_shape": list(shape[1:]), "drop_tokens": 0}
    if len(shape) == 4 and layout in ("auto", "nchw"):
        return {"layout": "nchw", "units": shape[1], "grid": [shape[2], shape[3]], **base}
    if len(shape) == 4 and layout == "nhwc":
        return {"layout": "nhwc", "units": shape[3], "grid": [shape[1], shape[2]], **base}
    if len(shape) == 3 and layout in ("auto", "tokens"):
        drop, height, width = token_grid(shape[1], input_size, patch_size, options, layer)
        return {"layout": "tokens", "units": shape[2], "grid": [height, width],
                "output_shape": list(shape[1:]), "drop_tokens": drop}
    if len(shape) == 2 and layout == "auto":
        return {"layout": "flat", "units": shape[1], "grid": [1, 1], **base}
    raise LayerError(f"layer {layer!r}: output of shape {shape} cannot be read with "
                     f"layout {layout!r}; expected 4-D (nchw/nhwc), 3-D tokens (B, T, C) or "
                     f"2-D (B, C) with layout 'auto'")


def tokens_to_maps(tokens: torch.Tensor, drop: int, height: int, width: int) -> torch.Tensor:
    """(B, T, C) tokens -> (B, C, h, w) maps: drop ``drop`` leading tokens, row-major patches."""
    batch, _, channels = tokens.shape
    return tokens[:, drop:, :].reshape(batch, height, width, channels).permute(0, 3, 1, 2)


def to_unit_maps(output: torch.Tensor, options: LayoutOptions,
                 input_size: tuple[int, int] | None = None,
                 patch_size: tuple[int, int] | None = None, layer: str = "?") -> torch.Tensor:
    """A layer output as (B, U, h, w) unit maps (a view when possible; see the module docstring).

    Raises
    ------
    LayerError
        For outputs of another rank, or a layout option that does not fit the output.
    """
    layout = options.layout
    if output.dim() == 4 and layout in ("auto", "nchw"):
        return output
    if output.dim() == 4 and layout == "nhwc":
        return output.permute(0, 3, 1, 2)
    if output.dim() == 3 and layout in ("auto", "tokens"):
        drop, height, width = token_grid(output.shape[1], input_size, patch_size, options, layer)
        return tokens_to_maps(output, drop, height, width)
    if output.dim() == 2 and layout == "auto":
        return output[:, :, None, None]
    raise LayerError(f"layer {layer!r}: output of shape {tuple(output.shape)} cannot be read with "
                     f"layout {layout!r}; expected 4-D (nchw/nhwc), 3-D tokens (B, T, C) or "
                     f"2-D (B, C) with layout 'auto'")


# --------------------------------------------------------------------------- recorder
class StopForward(BaseException):
    """Raised by a :class:`LayerRecorder` hook once every recorded layer has run (``stop=...``),
    so the rest of the model is skipped. Private to the recorder, which catches it around the
    forward call (a BaseException, so a model's own ``except Exception`` does not swallow it)."""


def check_hookable(model: nn.Module, layers: Sequence[str]) -> None:
    """LayerError when a layer of ``layers`` is unknown (:func:`find_module`) or inside a
    TorchScript model (cannot be hooked)."""
    for name in layers:
        if isinstance(find_module(model, name), torch.jit.ScriptModule):
            raise LayerError(
                f"layer {name!r} is part of a TorchScript model, whose inner layers cannot "
                f"be hooked; record from the Python model instead (a torchvision name or "
                f"module:callable spec with --weights)")


def copy_maps(layer: str, maps: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``maps`` (the default ``store`` of :class:`LayerRecorder`)."""
    return maps.clone(memory_format=torch.contiguous_format)


class LayerRecorder:
    """Context manager that records named layers' outputs during forward passes.

    Inside ``with LayerRecorder(model, ['layer3', 'layer4']) as recorder:`` every forward pass of
    ``model`` stores, per layer, the output converted to (B, U, h, w) unit maps (see the module
    docstring), detached and cloned in the hook (so in-place operations after the layer do not
    change it), on the model's device and in the layer's dtype. Read them with :meth:`maps`. The
    hooks are removed when the block exits, also on an exception.

    Parameters
    ----------
    model:
        The model (not a TorchScript module: those cannot be hooked).
    layers:
        Layer names or wildcard patterns (:func:`resolve_layers`).
    layout:
        :class:`LayoutOptions` for token and channel-last outputs: one for all layers or a mapping
        from layer name to options (:func:`layouts_for`).
    store:
        ``store(layer, maps)`` turns the (B, U, h, w) unit maps (a view of the detached output)
        into what :meth:`maps` returns; it must copy (default: :func:`copy_maps`, a contiguous
        clone). The recorder uses it to convert to the cache dtype in the same copy.
    stop:
        None (default: the forward runs to the end), or how many times each recorded layer runs
        in one forward (layer name -> calls, from a probe forward): once every layer has made
        its calls, the hook raises :class:`StopForward` and the rest of the model is skipped.
        Call the model through :meth:`forward` then, which catches it (and returns None).
    """

    def __init__(self, model: nn.Module, layers: str | Sequence[str],
                 layout: LayoutOptions | Mapping[str, LayoutOptions] | None = None,
                 store: Callable[[str, torch.Tensor], Any] | None = None,
                 stop: Mapping[str, int] | None = None) -> None:
        self.model = model
        self.layers = resolve_layers(model, layers)
        self.layouts = layouts_for(self.layers, layout)
        self.model_patch_size = infer_patch_size(model)
        self.store = store or copy_maps
        self.outputs: dict[str, Any] = {}
        self.input_size: tuple[int, int] | None = None
        self.stop = None if stop is None else {name: max(1, int(stop.get(name, 1)))
                                               for name in self.layers}
        self.calls: dict[str, int] = {}
        self._handles: list[Any] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)``; None when the forward was stopped after the last layer."""
        try:
            return self.model(*args, **kwargs)
        except StopForward:
            return None

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            tensor = first_tensor(output)
            if tensor is None:
                raise LayerError(f"layer {name!r} returned a {type(output).__name__}; only tensor "
                                 f"outputs (or tuples/lists starting with a tensor) can be "
                                 f"recorded")
            options = self.layouts[name]
            patch = options.patch_size or self.model_patch_size
            maps = to_unit_maps(tensor.detach(), options, self.input_size, patch,  # type: ignore
                                name)
            self.outputs[name] = self.store(name, maps)
            if self.stop is not None and all(self.calls.get(layer, 0) >= count
                                             for layer, count in self.stop.items()):
                raise StopForward
        return hook

    def _input_hook(self, module: nn.Module, inputs: Any) -> None:
        tensor = first_tensor(inputs)
        self.input_size = tuple(tensor.shape[-2:]) if tensor is not None and tensor.dim() >= 2 \
            else None  # type: ignore[assignment]
        self.outputs.clear()
        self.calls.clear()

    def __enter__(self) -> LayerRecorder:
        check_hookable(self.model, self.layers)
        try:
            for name in self.layers:
                module = find_module(self.model, name)
                self._handles.append(module.register_forward_hook(self._hook(name)))
            self._handles.append(self.model.register_forward_pre_hook(self._input_hook))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this recorder registered (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def maps(self) -> dict[str, Any]:
        """Unit maps (B, U, h, w) of the last forward pass (or what ``store`` made of them).

        Raises
        ------
        LayerError
            When a recorded layer was not called by the forward pass.
        """
        missing = [name for name in self.layers if name not in self.outputs]
        if missing:
            raise LayerError(f"layers {missing} were not called by the forward pass of "
                             f"{model_name(self.model)}, so they have no output to record "
                             f"(`dissect layers MODEL` marks such layers)")
        return {name: self.outputs[name] for name in self.layers}
