"""Model sources, weights loading and layer discovery.

A model spec is one of (tried in registration order, see :func:`model_sources`):

- ``torchscript``: the path of an existing TorchScript file (``torch.jit.load``);
- ``callable``: ``package.module:callable`` -- a function or class returning an ``nn.Module``,
  importable from the current directory or ``PYTHONPATH`` (called with ``num_classes=...`` only
  when ``num_classes`` is given);
- ``torchvision``: a torchvision architecture name such as ``resnet18`` (built with
  ``weights=None``; nothing is ever downloaded).

New sources are added with :func:`register_model_source` (a registry that refuses duplicate
names). Models built without a weights file are initialised from a fixed random seed, so the same
spec always gives the same model (later stages that re-load the model from ``run.json`` then see the
weights that were recorded).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import inspect
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from dissect.errors import ModelError, OptionError

#: Seed used to initialise models that are built without a weights file.
INIT_SEED = 0
#: How many names of each kind a key-mismatch message lists.
LISTED_KEYS = 5
#: Wrapper keys under which training checkpoints commonly store the state_dict.
CHECKPOINT_WRAPPERS = ("state_dict", "model")
#: Key prefixes added by wrappers (DataParallel / DistributedDataParallel, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: File name endings taken as "this spec meant a file" in error messages.
MODEL_FILE_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ModelSource:
    """One way of turning a model spec string into an ``nn.Module``.

    ``matches(spec)`` says whether this source handles ``spec``; ``build(spec, num_classes)``
    returns the module (raising :class:`ModelError` on failure).
    """

    name: str
    description: str
    matches: Callable[[str], bool]
    build: Callable[[str, int | None], nn.Module]


_SOURCES: dict[str, ModelSource] = {}


def register_model_source(source: ModelSource) -> ModelSource:
    """Add ``source`` to the registry (tried after the sources already registered).

    Raises :class:`ModelError` when a source of the same name is already registered.
    """
    if source.name in _SOURCES:
        raise ModelError(f"model source {source.name!r} is already registered; "
                         f"registered sources: {', '.join(_SOURCES)}")
    _SOURCES[source.name] = source
    return source


def model_sources() -> tuple[ModelSource, ...]:
    """The registered model sources, in the order they are tried."""
    return tuple(_SOURCES.values())


def _is_file(spec: str) -> bool:
    return os.path.isfile(spec)


def _load_torchscript(spec: str, num_classes: int | None) -> nn.Module:
    if num_classes is not None:
        raise OptionError(f"num_classes={num_classes} cannot be applied to the TorchScript file "
                          f"{spec!r} (its architecture is fixed); leave num_classes unset")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
            return torch.jit.load(spec, map_location="cpu")
    except Exception as error:  # torch raises RuntimeError/ValueError subclasses here
        raise ModelError(f"cannot load TorchScript model {spec!r}: {error}. A model file must be "
                         f"saved with torch.jit.save; a state_dict goes to --weights with a "
                         f"torchvision name or module:callable spec") from error


def _is_callable_spec(spec: str) -> bool:
    module, sep, attribute = spec.partition(":")
    return bool(sep) and bool(module) and bool(attribute) and not _is_file(spec)


def _import_attribute(spec: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    added = False
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # "importable from the current directory"
        added = True
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelError(f"model spec {spec!r}: cannot import module {module_name!r} ({error}); "
                         f"it must be importable from the current directory or PYTHONPATH") \
            from error
    finally:
        if added:
            sys.path.remove(cwd)
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            public = [n for n in dir(module) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=5)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise ModelError(f"model spec {spec!r}: module {module_name!r} has no attribute "
                             f"{attribute!r}{hint}")
        target = getattr(target, part)
    return target


def _build_callable(spec: str, num_classes: int | None) -> nn.Module:
    factory = _import_attribute(spec)
    if not callable(factory):
        raise ModelError(f"model spec {spec!r} names a {type(factory).__name__}, expected a "
                         f"function or class returning a torch.nn.Module")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = factory(**kwargs)
    except TypeError as error:
        raise ModelError(f"model spec {spec!r}: calling it with {kwargs or 'no arguments'} "
                         f"failed: {error}") from error
    if not isinstance(model, nn.Module):
        raise ModelError(f"model spec {spec!r} returned a {type(model).__name__}, expected a "
                         f"torch.nn.Module")
    return model


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> tuple[str, ...]:
    import torchvision

    return tuple(sorted(torchvision.models.list_models()))


def _is_torchvision_name(spec: str) -> bool:
    return spec in _torchvision_names()


def _build_torchvision(spec: str, num_classes: int | None) -> nn.Module:
    import torchvision

    builder = torchvision.models.get_model_builder(spec)
    kwargs: dict[str, Any] = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None  # never download a backbone either
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return builder(**kwargs)
    except (TypeError, ValueError) as error:
        raise ModelError(f"cannot build torchvision model {spec!r} with {kwargs}: {error}") \
            from error


register_model_source(ModelSource(
    "torchscript", "path of a TorchScript file (torch.jit.save)", _is_file, _load_torchscript))
register_model_source(ModelSource(
    "callable", "'package.module:callable' returning a torch.nn.Module", _is_callable_spec,
    _build_callable))
register_model_source(ModelSource(
    "torchvision", "a torchvision architecture name, built with weights=None",
    _is_torchvision_name, _build_torchvision))


def _unknown_spec_message(spec: str) -> str:
    kinds = "; ".join(f"{s.name}: {s.description}" for s in model_sources())
    if spec.lower().endswith(MODEL_FILE_SUFFIXES) or os.sep in spec:
        return f"model file {spec!r} does not exist. A model spec is one of: {kinds}"
    close = difflib.get_close_matches(spec, _torchvision_names(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown model spec {spec!r}.{hint} A model spec is one of: {kinds}"


# --------------------------------------------------------------------------- loading
def load_model(spec: str, weights: str | os.PathLike[str] | None = None,
               num_classes: int | None = None) -> nn.Module:
    """Build the model named by ``spec`` and load ``weights``; returned in eval mode on the CPU.

    Parameters
    ----------
    spec:
        A torchvision architecture name (``resnet18``), ``package.module:callable`` or the path of
        a TorchScript file. See the module docstring for the order in which they are tried.
    weights:
        Optional checkpoint for :func:`load_weights` (a state_dict, possibly wrapped).
    num_classes:
        Passed to the architecture when given (not allowed for TorchScript files).

    Raises
    ------
    ModelError
        Unknown spec (with close torchvision names), import failure, bad weights file, key or
        shape mismatch.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        raise ModelError(f"model spec must be a non-empty string, got {spec!r}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise OptionError(f"num_classes: expected a positive integer, got {num_classes!r}")
    source = next((s for s in model_sources() if s.matches(spec)), None)
    if source is None:
        raise ModelError(_unknown_spec_message(spec))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        model = source.build(spec, num_classes)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def _unwrap_checkpoint(checkpoint: Any, path: str) -> Mapping[str, Any]:
    state = checkpoint
    while isinstance(state, Mapping):
        wrapper = next((k for k in CHECKPOINT_WRAPPERS
                        if k in state and isinstance(state[k], Mapping)), None)
        if wrapper is None or all(isinstance(v, torch.Tensor) for v in state.values()):
            break
        state = state[wrapper]
    if not isinstance(state, Mapping):
        raise ModelError(f"weights file {path!r} holds a {type(state).__name__}, expected a "
                         f"state_dict (a dict of tensors), possibly under 'state_dict' or 'model'")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ModelError(f"weights file {path!r}: entries {not_tensors[:LISTED_KEYS]} are not "
                         f"tensors; expected a state_dict, possibly under 'state_dict' or 'model'")
    return state


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor],
                           model_keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` / ``_orig_mod.`` prefix that every key has and the model's keys lack."""
    result = dict(state)
    for prefix in WRAPPER_PREFIXES:
        if (result and all(k.startswith(prefix) for k in result)
                and not any(k.startswith(prefix) for k in model_keys)):
            result = {k[len(prefix):]: v for k, v in result.items()}
    return result


def _listed(keys: Sequence[str]) -> str:
    more = f" (+{len(keys) - LISTED_KEYS} more)" if len(keys) > LISTED_KEYS else ""
    return ", ".join(keys[:LISTED_KEYS]) + more


def _load_failure(error: BaseException) -> str:
    """Why torch.load failed, without torch's advice to load with ``weights_only=False``
    (which runs the file's code: we never do, and do not suggest it)."""
    text = str(error)
    match = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if match:
        return (f"it holds a pickled object ({match.group(1)}), not only tensors; save "
                f"model.state_dict() with torch.save and pass that file")
    if "weights_only" in text:
        return "it holds pickled objects other than tensors and plain containers"
    return text


def checkpoint_format_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the file at ``path`` is not a ``torch.save`` file, or None when it looks like one.

    ``torch.save`` writes a zip archive holding ``<name>/data.pkl`` (the default since torch 1.6)
    or, in the legacy format, a pickle (protocol 2) starting with ``0x80 0x02``. Anything else
    (a text file, an HTML error page saved by a browser, a numpy file) is not a checkpoint, whatever
    torch's unpickler then says about it.
    """
    import zipfile

    with open(path, "rb") as handle:
        head = handle.read(8)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            return f"it is a damaged zip archive ({error})"
        if not any(name.endswith("data.pkl") for name in names):
            shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
            return (f"it is a zip archive without the data.pkl of a torch.save file "
                    f"(it holds {shown or 'nothing'})")
        return None
    if head[:2] == b"\x80\x02":
        return None
    if not head:
        return "it is empty"
    return f"it starts with the bytes {head!r}, neither a zip archive nor a legacy torch pickle"


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a state_dict from ``path`` into ``model`` (in place) and return the model.

    The file is read with ``torch.load(weights_only=True)`` (no code runs). Accepted layouts: a
    state_dict, or a checkpoint dict holding it under ``state_dict`` or ``model``; keys may carry a
    ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) prefix.

    Raises
    ------
    ModelError
        Missing or unreadable file; missing, unexpected or shape-mismatched keys (the message lists
        the first of each).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"weights file {path!r} does not exist")
    try:
        problem = checkpoint_format_problem(path)
    except OSError as error:
        raise ModelError(f"cannot read weights file {path!r}: {error}") from error
    if problem is not None:
        raise ModelError(f"weights file {path!r} is not a PyTorch checkpoint: {problem}. "
                         f"Pass a state_dict saved with torch.save(model.state_dict(), path)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors have many types
        raise ModelError(f"cannot read weights file {path!r} with torch.load(weights_only=True): "
                         f"{_load_failure(error)}") from error
    model_state = model.state_dict()
    state = strip_wrapper_prefixes(_unwrap_checkpoint(checkpoint, path), list(model_state))
    shape_errors = [f"{k} {tuple(v.shape)} in file vs {tuple(model_state[k].shape)} in model"
                    for k, v in state.items()
                    if k in model_state and tuple(v.shape) != tuple(model_state[k].shape)]
    # BatchNorm fills in a missing num_batches_tracked itself (checkpoints of old torch versions)
    missing = [k for k in model_state
               if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in model_state]
    problems = [f"{kind}: {_listed(keys)}" for kind, keys in (
        ("missing keys", missing), ("unexpected keys", unexpected),
        ("shape mismatches", shape_errors)) if keys]
    if not problems:  # checked first, so a failed load leaves the model unchanged
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            problems.append(str(error))
    if problems:
        hint = num_classes_hint(state, model_state)
        raise ModelError(f"weights file {path!r} does not fit model {type(model).__name__}: "
                         + "; ".join(problems) + (f". {hint}" if hint else ""))
    return model


def num_classes_hint(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]
                     ) -> str | None:
    """A ``--num-classes N`` suggestion when only the classifier's output size differs.

    That is the case when every shape mismatch is in the first dimension, all to the same file
    size N, and exactly one of them is a weight of 2 or more axes, a Linear layer's or the
    model's last one: the classifier head with its bias, e.g. ``fc.weight`` of a Places365
    ResNet (365 rows in the file, 1000 in the model).
    """
    mismatched = {k: (tuple(v.shape), tuple(model_state[k].shape)) for k, v in state.items()
                  if k in model_state and tuple(v.shape) != tuple(model_state[k].shape)}
    weights = [k for k, (shape, _) in mismatched.items() if len(shape) >= 2]
    matrices = [k for k, v in model_state.items() if v.dim() >= 2]
    if len(weights) != 1 or not (len(mismatched[weights[0]][0]) == 2
                                 or weights[0] == matrices[-1]):
        return None  # a head is a Linear layer (2-D weight) or the model's last conv
    sizes = set()
    for file_shape, model_shape in mismatched.values():
        if len(file_shape) != len(model_shape) or file_shape[1:] != model_shape[1:]:
            return None
        sizes.add(file_shape[0])
    if len(sizes) != 1:
        return None
    size = sizes.pop()
    return (f"The file's classifier ({weights[0]}) has {size} outputs and the model "
            f"{mismatched[weights[0]][1][0]}: build the model with --num-classes {size} "
            f"(num_classes={size})")


def weights_hash(model: nn.Module) -> str:
    """sha256 over the model's state_dict: every key, dtype, shape and the raw bytes."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        value = tensor.detach()
        if value.is_quantized:
            value = value.int_repr()
        value = value.cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{value.dtype}|{tuple(tensor.shape)}|".encode())
        if value.numel():
            digest.update(value.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def model_name(model: nn.Module) -> str:
    """``module.QualName`` of the model's class (the model spec when none is known)."""
    cls = type(model)
    if isinstance(model, torch.jit.ScriptModule):
        return f"torchscript:{getattr(model, 'original_name', cls.__name__)}"
    return f"{cls.__module__}.{cls.__qualname__}"


# --------------------------------------------------------------------------- layers
class LayerRow(NamedTuple):
    """One row of :func:`layer_table`.

    ``shape`` is the per-image output shape (batch dimension dropped; the first element of a tuple
    output), None when the module was not called by the probe forward or cannot be hooked;
    ``calls`` is how often it was called in one forward; ``hookable`` is False for the inner
    modules of a TorchScript model (forward hooks cannot observe them).
    """

    name: str
    kind: str
    shape: tuple[int, ...] | None
    calls: int
    hookable: bool = True


def parse_input_size(input_size: int | str | Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) from ``S`` (-> (3, S, S)), ``(H, W)`` (-> (3, H, W)) or ``(C, H, W)``.

    Strings (command line) may separate the numbers with ``,`` or ``x``: ``'224'``,
    ``'160,224'``, ``'3x224x224'``.
    """
    if isinstance(input_size, str):
        try:
            input_size = [int(v) for v in input_size.replace("x", ",").split(",")]
        except ValueError:
            raise OptionError(f"--input-size: expected S, H,W or C,H,W positive integers, "
                              f"got {input_size!r}") from None
        if len(input_size) == 1:
            input_size = input_size[0]
    if isinstance(input_size, int):
        size: tuple[int, ...] = (3, input_size, input_size)
    else:
        size = tuple(int(v) for v in input_size)
        if len(size) == 2:
            size = (3, *size)
    if len(size) != 3 or min(size) < 1:
        raise OptionError(f"--input-size: expected S, H,W or C,H,W positive integers, "
                          f"got {input_size!r}")
    return size  # type: ignore[return-value]


def first_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a layer's output stands for: itself, or the first element of a tuple/list."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) else None


def layer_table(model: nn.Module, input_size: int | str | Sequence[int] = (3, 224, 224)
                ) -> list[LayerRow]:
    """Every named module (root excluded) with its output shape from one probe forward.

    The probe is a batch of one zero image of ``input_size`` ((C, H, W), (H, W) or S) on the
    model's device, run under ``torch.no_grad`` in eval mode (train/eval modes restored after).
    """
    channels, height, width = parse_input_size(input_size)
    names = [(name, module) for name, module in model.named_modules() if name]
    shapes: dict[str, tuple[int, ...] | None] = {name: None for name, _ in names}
    calls = {name: 0 for name, _ in names}
    handles = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            calls[name] += 1
            tensor = first_tensor(output)
            shapes[name] = tuple(tensor.shape[1:]) if tensor is not None else None
        return hook

    modes = {module: module.training for module in model.modules()}
    try:
        for name, module in names:
            if not isinstance(module, torch.jit.ScriptModule):
                handles.append(module.register_forward_hook(make_hook(name)))
        parameter = next(iter(model.parameters()), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        model.eval()
        with torch.no_grad():
            try:
                model(torch.zeros(1, channels, height, width, device=device))
            except Exception as error:  # the user's model rejected the probe input
                raise ModelError(f"probe forward of {model_name(model)} with input size "
                                 f"{(channels, height, width)} failed: {error}; pass another "
                                 f"--input-size") from error
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.train(mode)
    return [LayerRow(name, _kind(module), shapes[name], calls[name],
                     not isinstance(module, torch.jit.ScriptModule)) for name, module in names]


def _kind(module: nn.Module) -> str:
    if isinstance(module, torch.jit.ScriptModule):
        return f"{getattr(module, 'original_name', 'ScriptModule')} (TorchScript)"
    return type(module).__name__


def list_layers(model: nn.Module, input_size: int | str | Sequence[int] = (3, 224, 224)
                ) -> list[tuple[str, tuple[int, ...] | None]]:
    """``(name, shape)`` of every named module, from one probe forward (see :func:`layer_table`).

    Names are exactly ``model.named_modules()`` names (``layer4.1.conv2``, ``features.28``);
    ``shape`` is the per-image output shape (no batch dimension), None for modules the forward pass
    does not call.
    """
    return [(row.name, row.shape) for row in layer_table(model, input_size)]


def format_layer_table(rows: Sequence[LayerRow]) -> str:
    """The text ``dissect layers`` prints: one aligned line per layer (name, type, shape, note)."""
    lines = [("layer", "type", "output shape", "")]
    for row in rows:
        shape = "x".join(str(v) for v in row.shape) if row.shape is not None else "-"
        note = ("cannot be hooked (TorchScript)" if not row.hookable
                else "not called in forward" if row.calls == 0
                else f"called {row.calls}x (the last call is recorded)" if row.calls > 1 else "")
        lines.append((row.name, row.kind, shape, note))
    widths = [max(len(line[i]) for line in lines) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip()
                     for a, b, c, d in lines)


def describe_layers(spec: str, weights: str | os.PathLike[str] | None = None,
                    input_size: int | str | Sequence[int] = (3, 224, 224),
                    num_classes: int | None = None) -> str:
    """``dissect layers MODEL``: load the model and return :func:`format_layer_table` text."""
    model = load_model(spec, weights=weights, num_classes=num_classes)
    return format_layer_table(layer_table(model, input_size))
