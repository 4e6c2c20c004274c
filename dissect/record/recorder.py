"""``record_activations``: one pass of the model over a dataset, each layer to its own cache."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dissect.errors import CacheError, LayerError, ModelError, OptionError
from dissect.record.cache import (
    FLOAT16_MAX,
    OUTPUTS_NAME,
    CacheState,
    CacheWriter,
    DatasetSpec,
    block_range,
    cache_path,
    check_free_space,
    check_options,
    file_bytes,
    fingerprint_fields,
    finish_partial,
    layer_datasets,
    output_datasets,
    outputs_path,
)
from dissect.record.models import first_tensor, load_model, model_name, weights_hash
from dissect.record.trace import (
    LayerRecorder,
    LayoutOptions,
    check_hookable,
    describe_layout,
    find_module,
    infer_patch_size,
    layouts_for,
    resolve_layers,
)

#: Allowed values of the ``autocast`` option (None: no autocast).
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> ``cuda`` when available, else ``cpu``; strings are checked (OptionError)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise OptionError(f"--device: {device!r} is not a torch device ({error}); use cpu, cuda "
                          f"or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device: {device!r} asked for, but CUDA is not available here; "
                          f"use --device cpu")
    if resolved.type == "cuda" and resolved.index is not None \
            and resolved.index >= torch.cuda.device_count():
        raise OptionError(f"--device: {device!r} does not exist; this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")
    return resolved


#: Unit maps this small (h and w at most this) hold too few positions for a segmentation mask:
#: :func:`check_input_size` warns when the dataset's segmentations are finer than them.
SMALL_MAP_SIZE = 4
#: Input size tried when a model rejects the dataset's size and does not state its own.
COMMON_INPUT_SIZE = 224


class SmallMapsWarning(UserWarning):
    """A recorded layer's unit maps are at most 4x4 at the dataset's image size: its masks are
    coarse blocks of the segmentation; recording at a larger ``--resize`` gives finer maps."""


@dataclass(frozen=True)
class InputProbe:
    """What one probe forward at the dataset's image size found (:func:`check_input_size`).

    ``input_size`` (H, W) fed to the model; per recorded layer, ``shapes`` the unit-map shape
    (U, h, w), ``calls`` how often it ran in the forward, ``layouts`` the
    :func:`~dissect.record.trace.describe_layout` dict stored in its cache (``unit_layout``);
    ``notes`` one sentence per layer with small maps (also issued as :class:`SmallMapsWarning`).
    """

    input_size: tuple[int, int]
    shapes: dict[str, tuple[int, int, int]]
    calls: dict[str, int]
    layouts: dict[str, dict[str, Any]]
    notes: tuple[str, ...] = ()


def expected_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The fixed input size (H, W) a model states, or None.

    Looked up: ``model.image_size`` (torchvision ``VisionTransformer``), ``model.img_size`` and
    ``model.patch_embed.img_size`` (timm).
    """
    for owner, attribute in ((model, "image_size"), (model, "img_size"),
                             (getattr(model, "patch_embed", None), "img_size")):
        value = getattr(owner, attribute, None) if owner is not None else None
        if isinstance(value, int) and value > 0:
            return (value, value)
        if isinstance(value, (tuple, list)) and len(value) == 2 and all(
                isinstance(v, int) and v > 0 for v in value):
            return (int(value[0]), int(value[1]))
    return None


def _probe_forward(model: nn.Module, size: tuple[int, int], channels: int = 3) -> Any:
    parameter = next(iter(model.parameters()), next(iter(model.buffers()), None))
    device = parameter.device if parameter is not None else torch.device("cpu")
    with torch.no_grad():
        return model(torch.zeros(1, channels, *size, device=device))


def _size_text(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


def _resize_text(size: tuple[int, int]) -> str:
    return str(size[0]) if size[0] == size[1] else f"{size[0]},{size[1]}"


def check_input_size(model: nn.Module, size: int | Sequence[int], layers: str | Sequence[str],
                     *, layout: LayoutOptions | Mapping[str, LayoutOptions] | None = None,
                     seg_size: Sequence[int] | None = None, warn: bool = True,
                     stacklevel: int = 2) -> InputProbe:
    """Probe ``model`` with one zero image of ``size`` before recording ``layers`` at that size.

    Run it with the dataset's image size after any resize (``record_activations`` does, before
    it opens a cache). The forward runs on the model's device, in eval mode, without gradients
    (train/eval modes restored).

    Parameters
    ----------
    model:
        The model (not modified).
    size:
        S or (H, W): the images' size as the model will see them.
    layers:
        Layer names or patterns (:func:`~dissect.record.resolve_layers`).
    layout:
        The recorder's :class:`~dissect.record.LayoutOptions` (one, or per layer).
    seg_size:
        The dataset's segmentation size (sh, sw): a layer whose maps are at most
        :data:`SMALL_MAP_SIZE` x :data:`SMALL_MAP_SIZE` and coarser than it gets a note (and a
        :class:`SmallMapsWarning` when ``warn``) suggesting a larger ``--resize``.
    warn:
        Issue the notes as warnings (``stacklevel`` as for :func:`warnings.warn`).

    Returns
    -------
    InputProbe

    Raises
    ------
    ModelError
        When the model rejects the size: names the size it expects (its ``image_size``, or
        224x224 when a probe at that size works) and the ``--resize`` to pass.
    LayerError
        Unknown layers, TorchScript layers (cannot be hooked), layers the forward does not call,
        outputs the layout options cannot read.
    """
    from dissect.data.loader import check_resize

    input_size = check_resize(size)
    if input_size is None:
        raise OptionError("check_input_size: size must be S or (H, W), got None")
    layers = resolve_layers(model, layers)
    check_hookable(model, layers)
    layouts = layouts_for(layers, layout)
    raw: dict[str, tuple[int, ...] | None] = {}
    calls = {name: 0 for name in layers}

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            calls[name] += 1
            tensor = first_tensor(output)
            raw[name] = tuple(tensor.shape) if tensor is not None else None
        return hook

    modes = {module: module.training for module in model.modules()}
    handles = [find_module(model, name).register_forward_hook(make_hook(name))
               for name in layers]
    try:
        model.eval()
        try:
            _probe_forward(model, input_size)
        except Exception as error:  # the user's model rejected the input
            raise ModelError(_input_size_message(model, input_size, error)) from error
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.train(mode)
    missing = [name for name in layers if calls[name] == 0]
    if missing:
        raise LayerError(f"layers {missing} were not called by the forward pass of "
                         f"{model_name(model)}, so they have no output to record "
                         f"(`dissect layers MODEL` marks such layers)")
    patch = infer_patch_size(model)
    described: dict[str, dict[str, Any]] = {}
    shapes: dict[str, tuple[int, int, int]] = {}
    notes: list[str] = []
    for name in layers:
        shape = raw[name]
        if shape is None:
            raise LayerError(f"layer {name!r} returned no tensor; only tensor outputs (or "
                             f"tuples/lists starting with a tensor) can be recorded")
        options = layouts[name]
        info = describe_layout(shape, options, input_size, options.patch_size or patch, name)
        described[name] = info
        shapes[name] = (info["units"], info["grid"][0], info["grid"][1])
        height, width = info["grid"]
        finer = seg_size is None or seg_size[0] > height or seg_size[1] > width
        if height == width == 1 and finer:
            notes.append(f"layer {name!r} has 1x1 unit maps (output {tuple(shape[1:])}): no "
                         f"spatial resolution, each mask is the whole image or nothing; a larger "
                         f"--resize does not change that, dissect a layer before the pooling")
        elif max(height, width) <= SMALL_MAP_SIZE and finer:
            target = tuple(v * 2 for v in input_size)
            notes.append(f"layer {name!r} has {height}x{width} unit maps at the image size "
                         f"{_size_text(input_size)}"
                         + (f" (segmentations {_size_text(seg_size)})" if seg_size else "")
                         + f": each mask is a few coarse blocks; pass a larger --resize (e.g. "
                         f"--resize {_resize_text(target)}) for finer maps")
    if warn:
        for note in notes:
            warnings.warn(note, SmallMapsWarning, stacklevel=stacklevel)
    return InputProbe(input_size, shapes, dict(calls), described, tuple(notes))


def _input_size_message(model: nn.Module, size: tuple[int, int], error: BaseException) -> str:
    """The ModelError text for a model that failed on a ``size`` input."""
    name = model_name(model)
    expected = expected_input_size(model)
    if expected is None and size != (COMMON_INPUT_SIZE, COMMON_INPUT_SIZE):
        try:
            _probe_forward(model, (COMMON_INPUT_SIZE, COMMON_INPUT_SIZE))
            expected = (COMMON_INPUT_SIZE, COMMON_INPUT_SIZE)
        except Exception:  # noqa: BLE001 - the model fails at that size too: size not known
            expected = None
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if expected is not None and expected != size:
        return (f"model {name} expects {_size_text(expected)} input images, but the images are "
                f"{_size_text(size)} (the dataset's size, after any --resize): pass --resize "
                f"{_resize_text(expected)} (resize={_resize_text(expected)}). The model said: "
                f"{reason}")
    return (f"model {name} failed on a {_size_text(size)} input image (the dataset's size, after "
            f"any --resize): {reason}. If it needs another input size, pass --resize S")


@dataclass(frozen=True)
class StoredMaps:
    """One layer's block as the hook stores it, on the model's device.

    ``acts`` (B, U, h, w) in the cache dtype (the hook's copy), ``amax`` and ``amin`` (B, U)
    float32: the spatial max / min of the layer's output before the dtype conversion (``amin``
    only for float16, where it serves the range check; else None).
    """

    acts: torch.Tensor
    amax: torch.Tensor
    amin: torch.Tensor | None


def store_maps(dtype: str) -> Callable[[str, torch.Tensor], StoredMaps]:
    """A :class:`~dissect.record.LayerRecorder` ``store`` converting to ``dtype`` in its copy."""
    torch_dtype = torch.float16 if dtype == "float16" else torch.float32

    def store(layer: str, maps: torch.Tensor) -> StoredMaps:
        acts = maps.to(torch_dtype, memory_format=torch.contiguous_format, copy=True)
        amin = maps.amin(dim=(2, 3)).float() if dtype == "float16" else None
        return StoredMaps(acts, maps.amax(dim=(2, 3)).float(), amin)
    return store


def check_float16_range(amax: np.ndarray, amin: np.ndarray, layer: str, start: int) -> None:
    """OptionError when a map's finite spatial max or min lies outside +-65504 (float16).

    ``amax``, ``amin`` (B, U) are the spatial extremes before conversion; ``start`` is the first
    image of the block (for the message). A map holding an infinity hides other values there.
    """
    peak = np.maximum(np.abs(amax), np.abs(amin))
    beyond = np.isfinite(peak) & (peak > FLOAT16_MAX)
    if beyond.any():
        image, unit = (int(v) for v in np.argwhere(beyond)[0])
        raise OptionError(
            f"--dtype float16: layer {layer!r} has the value {float(peak[image, unit]):.6g} "
            f"(image {start + image}, unit {unit}), outside the float16 range "
            f"+-{FLOAT16_MAX:g}; record it with --dtype float32 (dtype='float32', with --force to "
            f"replace the partial cache)")


def cache_arrays(stored: StoredMaps, dtype: str, layer: str, start: int
                 ) -> dict[str, np.ndarray]:
    """Cache arrays of one block: ``acts`` (B, U, h, w) ``dtype`` and ``amax`` (B, U) float32."""
    amax = stored.amax.cpu().numpy()
    if stored.amin is not None:
        check_float16_range(amax, stored.amin.cpu().numpy(), layer, start)
    return {"acts": stored.acts.cpu().numpy(), "amax": amax}


def logits_array(output: Any) -> np.ndarray:
    """(B, C) float32 model outputs (the first element of a tuple output)."""
    tensor = first_tensor(output)
    if tensor is None or tensor.dim() != 2:
        shape = tuple(tensor.shape) if tensor is not None else type(output).__name__
        raise ModelError(f"logits=True needs a model output of shape (B, C); the model returned "
                         f"{shape}")
    return tensor.detach().float().cpu().numpy()


class BackgroundWriter:
    """Runs block writes on one background thread, in order, while the next forward pass runs.

    ``submit(job)`` queues a callable (one block's host conversion, checks and cache writes); at
    most ``depth`` jobs wait, so memory stays bounded whatever the dataset size. Used as a context
    manager: leaving the block waits for every queued job (blocks already computed are written
    even when the caller fails, so a resume does not redo them). The first exception raised by a
    job is raised by the next :meth:`submit` or on leaving the block; jobs after it are dropped.
    """

    _STOP = object()

    def __init__(self, depth: int = 2) -> None:
        self.error: BaseException | None = None
        self._jobs: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._thread = threading.Thread(target=self._run, name="dissect-cache-writer",
                                        daemon=True)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is self._STOP:
                return
            if self.error is None:
                try:
                    job()
                except BaseException as error:  # handed to the caller by submit / __exit__
                    self.error = error

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job`` (blocks while ``depth`` jobs wait); raises a failed job's exception."""
        if self.error is not None:
            raise self.error
        self._jobs.put(job)

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
        return self

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        self._jobs.put(self._STOP)
        self._thread.join()
        if error is None and self.error is not None:
            raise self.error


@contextlib.contextmanager
def prepared_model(model: nn.Module, device: torch.device, channels_last: bool
                   ) -> Iterator[nn.Module]:
    """The model in eval mode on ``device`` (channels_last optional); modes and device restored."""
    modes = {module: module.training for module in model.modules()}
    reference = next(iter(model.parameters()), next(iter(model.buffers()), None))
    original_device = reference.device if reference is not None else None
    try:
        model.eval()
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        yield model
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
        if original_device is not None:
            model.to(original_device)
        for module, mode in modes.items():
            module.train(mode)


def _open_dataset(dataset: Any) -> Any:
    if isinstance(dataset, (str, os.PathLike)):
        from dissect.data import BrodenDataset

        return BrodenDataset(dataset)
    return dataset


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise OptionError(f"--batch-size: expected a positive integer, got {batch_size!r}")
    return int(batch_size)


def record_activations(
    model: nn.Module | str,
    dataset: Any,
    layers: str | Sequence[str],
    run_dir: str | os.PathLike[str],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    resize: int | Sequence[int] | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    dtype: str = "float16",
    logits: bool = False,
    force: bool = False,
    compression: str | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    model_spec: str | None = None,
    autocast: str | None = None,
    channels_last: bool = False,
    layout: str | LayoutOptions | Mapping[str, LayoutOptions] | None = None,
    drop_tokens: int | None = None,
    token_grid: Sequence[int] | None = None,
    patch_size: int | Sequence[int] | None = None,
    stop_early: bool = True,
) -> dict[str, Path]:
    """Record ``layers`` of ``model`` on every image of ``dataset`` into ``run_dir/cache``.

    One pass of the model over the images (one set of forward hooks) writes each layer to its own
    file ``run_dir/cache/<layer>.h5`` (DESIGN.md §4a): ``acts`` (N, U, h, w) in ``dtype``,
    ``amax`` (N, U) float32, ``done`` flags per block of ``batch_size`` images. Row n is image n of
    ``dataset``. A rerun skips complete caches and resumes partial ones from their done blocks; a
    cache recorded with other settings raises CacheError naming the changed fingerprint fields,
    unless ``force`` (then every cache of the call is rebuilt). The batch size is not such a
    setting: a complete cache is reused whatever batch size wrote it, and partial caches resume
    with the batch size they were begun with (their block layout), whatever ``batch_size`` says.

    Parameters
    ----------
    model:
        An ``nn.Module`` or a model spec for :func:`~dissect.record.load_model` (no weights). It is
        run in eval mode on ``device``; its train/eval modes and device are restored afterwards.
    dataset:
        A :class:`~dissect.data.BrodenDataset` or the path of a dataset directory.
    layers:
        Layer names or wildcard patterns (:func:`~dissect.record.resolve_layers`).
    run_dir:
        The run directory; caches go to ``run_dir/cache``.
    mean, std:
        Normalisation on the 0..1 RGB scale (three values each).
    resize:
        None (images at their stored size), S or (H, W).
    batch_size:
        Images per forward pass and per cache write block B (a resumed partial cache keeps the
        batch size it was begun with).
    device:
        None (CUDA when available, else CPU), ``'cpu'``, ``'cuda'``, ``'cuda:N'``.
    dtype:
        ``'float16'`` (default; a finite value beyond +-65504 raises OptionError) or ``'float32'``.
    logits:
        Also write the model outputs (N, C) float32 to ``run_dir/cache/outputs.h5``.
    force:
        Rebuild the caches of this call even when they exist.
    compression:
        None (default), ``'lzf'`` or ``'gzip'``.
    num_workers:
        Image decoding worker processes (None: :func:`dissect.data.make_loader`'s default).
    progress:
        Show a tqdm progress bar (images/s) on stderr.
    model_spec:
        The spec string the model was built from (fingerprint field ``model``); default: the
        model's class name.
    autocast:
        None, ``'bfloat16'`` or ``'float16'``: run the forward under ``torch.autocast``.
    channels_last:
        Convert the model and inputs to the channels_last memory format.
    layout:
        How layer outputs become (N, U, h, w) unit maps: one of
        :data:`~dissect.record.TOKEN_LAYOUTS` (``'auto'`` default: 4-D as NCHW, 3-D (B, T, C) as
        transformer tokens, 2-D as 1x1 maps; ``'nchw'``; ``'nhwc'`` channel-last;
        ``'tokens'``), or :class:`~dissect.record.LayoutOptions` for all layers or as a mapping
        layer name -> options (then leave the three token options below unset).
    drop_tokens:
        Token layers: leading tokens (class, register tokens) left out of the grid; default
        ``T - h * w`` (1 for a torchvision ViT: the class token).
    token_grid:
        Token layers: the (h, w) grid of the patch tokens; default input size // patch size
        (14x14 for ViT-B/16 at 224 px).
    patch_size:
        Token layers: p or (ph, pw); default found on the model.
        The layout used is stored in each cache's ``unit_layout`` attribute
        (:func:`~dissect.record.trace.describe_layout`; :attr:`CacheInfo.unit_layout`) and its
        options in the fingerprint.
    stop_early:
        Stop each forward pass once the recorded layers have run (the rest of the model is
        skipped) when no logits are to be written; the caches are the same either way.

    Returns
    -------
    dict
        Layer name -> path of its complete cache file (outputs.h5 is
        :func:`~dissect.record.outputs_path`).

    Raises
    ------
    LayerError, OptionError, CacheError, ModelError, DatasetError
    """
    from dissect import __version__
    from dissect.data.loader import check_normalisation, check_resize, make_loader

    check_options(dtype, compression)
    batch_size = _check_batch_size(batch_size)
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise OptionError(f"autocast: got {autocast!r}, expected None or one of "
                          f"{', '.join(AUTOCAST_DTYPES)}")
    mean_t, std_t = check_normalisation(mean, std)
    resize_t = check_resize(resize)
    torch_device = resolve_device(device)
    if isinstance(model, (str, os.PathLike)):
        model_spec = model_spec or os.fspath(model)
        model = load_model(os.fspath(model))
    dataset = _open_dataset(dataset)
    layers = resolve_layers(model, layers)
    check_hookable(model, layers)
    layouts = layouts_for(layers, layout_options(layout, drop_tokens, token_grid, patch_size))
    if logits and OUTPUTS_NAME in layers:
        raise OptionError(f"layer {OUTPUTS_NAME!r} would share its cache file with the model "
                          f"outputs (logits=True); record it in another run directory")
    n_images = len(dataset)
    if n_images == 0:
        raise OptionError(f"dataset {getattr(dataset, 'root', dataset)} has no images to record")

    common = dict(weights=weights_hash(model), model=model_spec or model_name(model),
                  dataset=dataset.fingerprint(), mean=mean_t, std=std_t, resize=resize_t,
                  version=__version__, batch_size=batch_size, autocast=autocast)
    def make_states(batch: int) -> tuple[dict[str, CacheState], CacheState | None]:
        fields = dict(common, batch_size=batch)
        layer_states = {layer: CacheState(cache_path(run_dir, layer),
                                          fingerprint_fields(layer=layer, dtype=dtype,
                                                             layout=layouts[layer].as_dict(),
                                                             **fields),
                                          n_images, batch, force)
                        for layer in layers}
        out_state = CacheState(outputs_path(run_dir),
                               fingerprint_fields(layer=OUTPUTS_NAME, dtype="float32", **fields),
                               n_images, batch, force) if logits else None
        return layer_states, out_state

    states, output_state = make_states(batch_size)
    # A partial's blocks are laid out for the batch size that began it: resume with that one.
    partial_batches = {state.partial_batch_size
                       for state in [*states.values(), output_state]
                       if state is not None and state.partial_batch_size is not None}
    if len(partial_batches) > 1:
        raise CacheError(f"partial caches in {Path(run_dir) / 'cache'} were begun with different "
                         f"batch sizes {sorted(partial_batches)}; rerun with --force (force=True) "
                         f"to rebuild them, or record their layers separately")
    if partial_batches and partial_batches != {batch_size}:
        batch_size = partial_batches.pop()
        states, output_state = make_states(batch_size)
    for state in [*states.values(), *([output_state] if output_state is not None else [])]:
        if not state.complete and state.needed_blocks.size == 0:
            finish_partial(state)  # killed after its last block, before it was renamed
    todo = {layer: state for layer, state in states.items() if not state.complete}
    if output_state is not None and not output_state.complete:
        todo[OUTPUTS_NAME] = output_state
    if todo:
        probe = _probe_dataset_size(model, dataset, layers, layouts, resize_t)
        needs_output = output_state is not None and not output_state.complete
        stop = {layer: probe.calls[layer] for layer in layers if layer in todo} \
            if stop_early and probe is not None and not needs_output else None
        _record_pass(model, dataset, todo, states, output_state, make_loader=make_loader,
                     mean=mean_t, std=std_t, resize=resize_t, batch_size=batch_size,
                     device=torch_device, dtype=dtype, compression=compression,
                     num_workers=num_workers, progress=progress, autocast=autocast,
                     channels_last=channels_last, layouts=layouts, stop=stop or None,
                     unit_layouts=probe.layouts if probe is not None else {})
    return {layer: state.path for layer, state in states.items()}


def layout_options(layout: str | LayoutOptions | Mapping[str, LayoutOptions] | None,
                   drop_tokens: int | None = None, token_grid: Sequence[int] | None = None,
                   patch_size: int | Sequence[int] | None = None
                   ) -> LayoutOptions | Mapping[str, LayoutOptions] | None:
    """The recorder's layout options from its explicit parameters (see
    :func:`record_activations`): a layout name plus the token options give one
    :class:`LayoutOptions`; options objects pass through (OptionError when token options are
    given beside them)."""
    explicit = {k: v for k, v in (("drop_tokens", drop_tokens), ("token_grid", token_grid),
                                  ("patch_size", patch_size)) if v is not None}
    if layout is None or isinstance(layout, str):
        if layout is None and not explicit:
            return None
        grid = tuple(token_grid) if token_grid is not None else None
        patch = tuple(patch_size) if isinstance(patch_size, (list, tuple)) else patch_size
        return LayoutOptions(layout or "auto", drop_tokens, grid, patch)  # type: ignore[arg-type]
    if explicit:
        raise OptionError(f"layout: {', '.join(explicit)} given beside LayoutOptions; put them "
                          f"into the LayoutOptions instead")
    return layout


def _probe_dataset_size(model: nn.Module, dataset: Any, layers: Sequence[str],
                        layouts: Mapping[str, LayoutOptions],
                        resize: tuple[int, int] | None) -> InputProbe | None:
    """:func:`check_input_size` at the size the recorder feeds the model (None when the dataset
    has no single image size and no resize is asked for: the probe cannot stand for it)."""
    from dissect.errors import DatasetError

    try:
        size = resize or tuple(dataset.image_size)
    except (AttributeError, DatasetError):
        return None
    try:
        seg_size = tuple(dataset.seg_size)
    except (AttributeError, DatasetError):
        seg_size = None
    return check_input_size(model, size, layers, layout=dict(layouts), seg_size=seg_size,
                            stacklevel=4)  # the warning points at record_activations' caller


def _record_pass(model: nn.Module, dataset: Any, todo: Mapping[str, CacheState],
                 states: Mapping[str, CacheState], output_state: CacheState | None, *,
                 make_loader: Any, mean: Sequence[float], std: Sequence[float],
                 resize: tuple[int, int] | None, batch_size: int, device: torch.device,
                 dtype: str, compression: str | None, num_workers: int | None, progress: bool,
                 autocast: str | None, channels_last: bool,
                 layouts: Mapping[str, LayoutOptions], stop: Mapping[str, int] | None = None,
                 unit_layouts: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Run the model once over the blocks any cache in ``todo`` still needs, writing each."""
    from tqdm.auto import tqdm

    n_images = len(dataset)
    needed = np.zeros(next(iter(todo.values())).n_blocks, dtype=bool)
    for state in todo.values():
        needed |= ~state.done
    blocks = np.flatnonzero(needed)
    indices = np.concatenate([np.arange(*block_range(int(b), batch_size, n_images))
                              for b in blocks])
    hooked = [layer for layer in states if layer in todo]
    loader = make_loader(dataset, mean=mean, std=std, resize=resize, batch_size=batch_size,
                         num_workers=num_workers, pin_memory=device.type == "cuda",
                         indices=indices)
    writers: dict[str, CacheWriter] = {}
    bar = tqdm(total=len(indices), unit="img", desc="record", disable=not progress,
               leave=False, smoothing=0.1)

    def write_job(block: int, start: int, maps: Mapping[str, StoredMaps], output: Any
                  ) -> Callable[[], None]:
        """The background job of one block: host arrays, float16 range check, cache writes."""
        # on CUDA the hooks' copies are queued on the caller's current stream: the writer thread
        # waits for them before its device-to-host copies (made on its own default stream)
        ready = torch.cuda.Event() if device.type == "cuda" else None
        if ready is not None:
            ready.record(torch.cuda.current_stream(device))

        def job() -> None:
            if ready is not None:
                ready.synchronize()
            arrays: dict[str, dict[str, np.ndarray]] = {}
            for layer in hooked:
                if not todo[layer].done[block]:
                    arrays[layer] = cache_arrays(maps[layer], dtype, layer, start)
            if output_state is not None and not output_state.done[block]:
                arrays[OUTPUTS_NAME] = {"logits": logits_array(output)}
            for name, block_arrays in arrays.items():
                writers[name].write_block(block, block_arrays)
        return job

    try:
        recorder = LayerRecorder(model, hooked, {k: layouts[k] for k in hooked},
                                 store_maps(dtype), stop=stop) if hooked else None
        with prepared_model(model, device, channels_last), \
                recorder or contextlib.nullcontext(), torch.inference_mode(), \
                BackgroundWriter() as background:
            for images, index in loader:
                block = int(index[0]) // batch_size
                start, stop = block_range(block, batch_size, n_images)
                if int(index[0]) != start or len(index) != stop - start:
                    raise RuntimeError(f"loader batch {index[:3].tolist()}... is not block "
                                       f"{block} [{start}, {stop})")  # an internal bug
                images = images.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with (torch.autocast(device.type, dtype=AUTOCAST_DTYPES[autocast]) if autocast
                      else contextlib.nullcontext()):
                    output = recorder.forward(images) if recorder is not None \
                        else model(images)
                maps = recorder.maps() if recorder is not None else {}
                if not writers:
                    writers.update(_open_writers(todo, maps, output, n_images, batch_size,
                                                 dtype, compression, unit_layouts or {}))
                background.submit(write_job(block, start, maps, output))
                bar.update(len(index))
        for writer in writers.values():
            writer.finish()
    finally:
        bar.close()
        for writer in writers.values():
            writer.close()


def _open_writers(todo: Mapping[str, CacheState], maps: Mapping[str, StoredMaps],
                  output: Any, n_images: int, batch_size: int, dtype: str,
                  compression: str | None,
                  unit_layouts: Mapping[str, Mapping[str, Any]] | None = None
                  ) -> dict[str, CacheWriter]:
    """One writer per cache in ``todo`` (shapes from the first batch), after a disk-space check."""
    specs: dict[str, list[DatasetSpec]] = {}
    for name in todo:
        if name == OUTPUTS_NAME and name not in maps:
            tensor = first_tensor(output)
            n_outputs = int(tensor.shape[1]) if tensor is not None and tensor.dim() == 2 else 0
            specs[name] = output_datasets(n_images, n_outputs, batch_size)
        else:
            specs[name] = layer_datasets(n_images, tuple(maps[name].acts.shape[1:]), dtype,
                                         batch_size)
    needed = sum(file_bytes(spec) * len(todo[name].needed_blocks) // todo[name].n_blocks
                 for name, spec in specs.items())
    directory = next(iter(todo.values())).path.parent
    directory.mkdir(parents=True, exist_ok=True)
    check_free_space(directory, needed)
    writers: dict[str, CacheWriter] = {}
    try:
        for name, spec in specs.items():
            layout = (unit_layouts or {}).get(name)
            attributes = {"unit_layout": json.dumps(dict(layout), sort_keys=True)} \
                if layout is not None else None
            writers[name] = CacheWriter(todo[name], spec, batch_size, compression, attributes)
    except BaseException:
        for writer in writers.values():
            writer.close()
        raise
    return writers

