"""`dissect dataset segment`: label an image folder with a segmentation model (DESIGN §13).

The PNAS 2020 paper's way to dissect without hand annotation: a segmentation model labels every
pixel, and the result is a Broden-format dataset with one pixel category (``object`` by default)
that every later stage reads unchanged.

For each image (RGB, at its stored size or resized to ``size``), normalised as
``(x / 255 - mean) / std``:

1. the model's output is a (B, C, H, W) tensor of logits, or a dict holding it under ``out`` (as
   torchvision's segmentation models return);
2. logits whose H x W is not the image size are upsampled bilinearly (``align_corners=False``,
   as torchvision's models do internally);
3. per pixel, the channel with the largest logit (the first on ties) and its softmax
   probability; channel ``c`` is entry ``c`` of the class list (a background first entry, e.g.
   ``background``, is unlabeled: see :mod:`dissect.data.from_masks` for the list rules), and a
   pixel whose probability is below ``min_confidence`` is unlabeled (0);
4. the label map goes to the segmentation size (half the image size, as Broden) by nearest
   neighbour (:func:`dissect.data.from_masks.nearest_resize`), exactly as a mask would in
   ``from-masks``: segmenting a folder gives the same files as converting the model's argmax
   masks.

Label number k is class k of the list (one category, so numbers are the class codes).

Resuming: files are written to ``<out>.partial``; each image and its label PNG are written
atomically (a temporary file renamed into place; the label PNG after the image), and the csv files
last, after which the folder is renamed to ``out``. A killed run, started again with the same
inputs, keeps the images already labeled (``segment.json`` in the partial folder records the
model's weights hash, the class list and the options, and a run with other ones refuses to mix
with it).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dissect.data.broden import INDEX_COLUMNS
from dissect.data.from_masks import (
    DEFAULT_SPLIT,
    ClassList,
    LabelStatistics,
    check_category_name,
    check_size_option,
    image_header_size,
    list_images,
    nearest_resize,
    prepare_out,
    raise_problems,
    read_class_list,
    save_label_png,
    seg_size_for,
    stored_image_name,
    strip_extension,
    write_image,
    write_vocabulary,
)
from dissect.data.loader import IMAGENET_MEAN, IMAGENET_STD, check_normalisation, image_tensor
from dissect.errors import DatasetError, ModelError, OptionError

STATE_FILE = "segment.json"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- the model
def _torchvision_segmentation_names() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models.segmentation))


def _checkpoint_has_aux(weights: str | os.PathLike[str]) -> bool:
    """Whether a checkpoint holds an ``aux_classifier`` (torchvision trains with one)."""
    try:
        state = torch.load(os.fspath(weights), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - load_weights reports an unreadable file properly
        return False
    while isinstance(state, Mapping) and not any("aux_classifier." in str(k) for k in state):
        inner = next((state[k] for k in ("state_dict", "model")
                      if k in state and isinstance(state[k], Mapping)), None)
        if inner is None:
            break
        state = inner
    return isinstance(state, Mapping) and any("aux_classifier." in str(k) for k in state)


def load_segmenter(spec: str | os.PathLike[str] | nn.Module,
                   weights: str | os.PathLike[str] | None, n_channels: int) -> nn.Module:
    """The segmentation model named by ``spec``, in eval mode on the CPU.

    ``spec`` is a torchvision segmentation architecture (``fcn_resnet50``, ``deeplabv3_resnet50``,
    ``lraspp_mobilenet_v3_large``, ...; built with ``weights=None`` and ``num_classes =
    n_channels``, with an auxiliary head when the checkpoint has one), ``package.module:callable``,
    a TorchScript file, or an ``nn.Module``. ``weights`` is a state_dict file
    (``torch.load(weights_only=True)``). ModelError on failure.
    """
    from dissect.record.models import INIT_SEED, load_model, load_weights

    if isinstance(spec, nn.Module):
        if weights is not None:
            load_weights(spec, weights)
        return spec.eval()
    spec = os.fspath(spec)
    if not os.path.isfile(spec) and spec in _torchvision_segmentation_names():
        # load_model cannot pass aux_loss: torchvision checkpoints carry aux_classifier keys
        import torchvision

        builder = torchvision.models.get_model_builder(spec)
        aux = weights is not None and _checkpoint_has_aux(weights)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(INIT_SEED)
                model = builder(weights=None, weights_backbone=None, num_classes=n_channels,
                                aux_loss=aux)
        except (TypeError, ValueError) as error:
            raise ModelError(f"cannot build torchvision segmentation model {spec!r} with "
                             f"{n_channels} classes: {error}") from error
        if weights is not None:
            load_weights(model, weights)
        return model.eval()
    return load_model(spec, weights=weights)


def logits_of(output: Any, n_images: int, n_channels: int, where: str) -> torch.Tensor:
    """The (B, C, H, W) logits of a segmentation model's output (a tensor or a dict with 'out')."""
    if isinstance(output, Mapping):
        if "out" not in output:
            raise ModelError(f"{where}: the model returned a dict with keys "
                             f"{sorted(map(str, output))}; expected the logits under 'out'")
        output = output["out"]
    if not isinstance(output, torch.Tensor) or output.dim() != 4 or output.shape[0] != n_images:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ModelError(f"{where}: the model returned {shape}; expected logits of shape "
                         f"({n_images}, C, H, W) (a segmentation model)")
    if output.shape[1] != n_channels:
        raise ModelError(f"{where}: the model outputs {output.shape[1]} channels but the class "
                         f"list has {n_channels} entries (one per output channel, a background "
                         f"first line included)")
    return output


def label_maps(logits: torch.Tensor, size: tuple[int, int], channel_labels: torch.Tensor,
               min_confidence: float) -> torch.Tensor:
    """Label numbers per pixel from logits.

    Parameters
    ----------
    logits:
        float (B, C, h, w).
    size:
        (H, W) of the images: logits of another size are upsampled bilinearly
        (align_corners=False).
    channel_labels:
        int64 (C,): the label number of each channel (0 for a background channel).
    min_confidence:
        Pixels whose softmax probability of the chosen channel is below it get 0.

    Returns
    -------
    int64 (B, H, W) label numbers.
    """
    logits = logits.float()
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = torch.nn.functional.interpolate(logits, size=size, mode="bilinear",
                                                 align_corners=False)
    channel = logits.argmax(dim=1)
    confidence = torch.softmax(logits, dim=1).gather(1, channel[:, None])[:, 0]
    labels = channel_labels.to(channel.device)[channel]
    return torch.where(confidence >= min_confidence, labels, torch.zeros_like(labels))


# ----------------------------------------------------------------------------- the run
def _state(model: nn.Module, spec: Any, class_list: ClassList, category: str,
           min_confidence: float, size: tuple[int, int] | None, mean: Sequence[float],
           std: Sequence[float], images: Sequence[str]) -> dict[str, Any]:
    import hashlib

    from dissect.record.models import model_name, weights_hash

    listing = hashlib.sha256("\n".join(images).encode()).hexdigest()
    return {"generator": "dissect.segment", "version": FORMAT_VERSION,
            "model": spec if isinstance(spec, str) else model_name(model),
            "weights": weights_hash(model), "classes": list(class_list.entries),
            "category": category, "min_confidence": float(min_confidence),
            "size": list(size) if size else None, "mean": list(mean), "std": list(std),
            "images": listing}


def _check_resume(partial: Path, state: dict[str, Any]) -> None:
    """Start ``partial`` (writing its state file), or check that it holds a run of ``state``."""
    path = partial / STATE_FILE
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise OptionError(f"--out: {path} of an interrupted run cannot be read ({error}); "
                              f"remove {partial} to start again") from None
        changed = [key for key in state if stored.get(key) != state[key]]
        if changed:
            raise OptionError(f"--out: {partial} holds an interrupted run with other "
                              f"{', '.join(changed)}; rerun with the same inputs to resume, or "
                              f"remove {partial} to start again")
        for leftover in partial.rglob("*.tmp"):  # a file being written when the run was killed
            leftover.unlink()
        return
    if partial.exists():
        shutil.rmtree(partial)  # no state file: a run killed before it began
    (partial / "images").mkdir(parents=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _load_pixels(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 (H, W, 3) RGB pixels of an image, resized bilinearly to ``size`` when given (the
    pixels :func:`dissect.data.from_masks.write_image` stores)."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
        if size is not None:
            rgb = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return np.array(rgb)


def _save_outputs(source: Path, image_target: Path, label_target: Path,
                  labels: np.ndarray, size: tuple[int, int] | None) -> None:
    """One image's files: the image, then its label PNG (each written atomically)."""
    write_image(source, image_target, size)
    label_target.parent.mkdir(parents=True, exist_ok=True)
    save_label_png(label_target, labels)


def segment_images(
    images_dir: str | os.PathLike[str],
    segmenter: str | os.PathLike[str] | nn.Module,
    classes: str | os.PathLike[str] | Sequence[str],
    out: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    category: str = "object",
    min_confidence: float = 0.5,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = False,
    size: int | Sequence[int] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Path:
    """Label every image of a folder with a segmentation model; write a Broden-format dataset.

    Parameters
    ----------
    images_dir:
        Folder of images (any tree; :data:`~dissect.data.from_masks.IMAGE_EXTENSIONS`).
    segmenter:
        Torchvision segmentation architecture name, ``package.module:callable``, TorchScript file,
        or an ``nn.Module`` (put in eval mode). Its output: (B, C, H, W) logits or a dict with
        ``out``.
    classes:
        The class list, one entry per output channel (a text file or a list of names); a first
        entry named ``background`` (or another :data:`~dissect.data.from_masks.BACKGROUND_NAMES`
        name) marks channel 0 as unlabeled.
    out:
        Dataset directory to create (must not exist or be empty).
    weights:
        State_dict file for the model (``torch.load(weights_only=True)``).
    category:
        The category name of the labels.
    min_confidence:
        In [0, 1]: pixels whose softmax probability is below it are unlabeled.
    batch_size:
        Images per forward.
    device:
        Torch device (default: ``cuda`` when available, else ``cpu``).
    progress:
        A tqdm progress bar on stderr.
    size:
        None (images at their stored size, one size for all), S or (H, W): images resized to it.
    mean, std:
        Normalisation on the 0..1 scale (default torchvision's ImageNet values).

    Returns
    -------
    The dataset directory (one pixel category ``category``, split ``train`` for every image).

    Raises
    ------
    OptionError, ModelError, DatasetError
    """
    from dissect.record.recorder import resolve_device

    images_root = Path(images_dir)
    if not images_root.is_dir():
        raise OptionError(f"--images: {images_root} is not a directory")
    check_category_name(category, "--category")
    if isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float)) \
            or not 0.0 <= float(min_confidence) <= 1.0:
        raise OptionError(f"--min-confidence: expected a number in [0, 1], got "
                          f"{min_confidence!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise OptionError(f"--batch-size: expected a positive integer, got {batch_size!r}")
    mean_t, std_t = check_normalisation(mean, std)
    target = check_size_option(size)
    class_list = read_class_list(classes, "--classes")
    torch_device = resolve_device(device)
    final, partial = prepare_out(out, [images_root], resume=True)

    images = list_images(images_root)
    problems: list[str] = []
    if not images:
        problems.append(f"{images_root}: no image files")
    stems: dict[str, str] = {}
    stored_names = {stored_image_name(r, target) for r in images}
    sizes: dict[tuple[int, int], str] = {}
    for relative in images:
        stem = strip_extension(relative)
        if stem in stems:
            problems.append(f"{images_root / stems[stem]} and {images_root / relative}: two "
                            f"images would share the segmentation images/{stem}_{category}.png")
        stems.setdefault(stem, relative)
        if f"{stem}_{category}.png" in stored_names:
            problems.append(f"{images_root / relative}: its segmentation would be written as "
                            f"images/{stem}_{category}.png, the name of an image; rename one")
        image_size, why = image_header_size(images_root / relative, full=False)
        if image_size is None:
            problems.append(f"{images_root / relative}: {why}")
        else:
            sizes.setdefault(target or image_size, relative)
    if len(sizes) > 1:
        listed = ", ".join(f"{h}x{w} ({images_root / r})" for (h, w), r in list(sizes.items())[:5])
        problems.append(f"{images_root}: images differ in size ({listed}); pass --size S (or "
                        f"size=) to resize them")
    raise_problems(problems, f"segmenting {images_root}")
    image_size = next(iter(sizes))
    seg_size = seg_size_for(image_size)

    n_channels = len(class_list.entries)
    model = load_segmenter(segmenter, weights, n_channels)
    state = _state(model, segmenter if isinstance(segmenter, str) else None, class_list,
                   category, min_confidence, target, mean_t, std_t, images)
    _check_resume(partial, state)
    channel_labels = torch.arange(n_channels, dtype=torch.int64) + class_list.offset
    if class_list.background is not None:
        channel_labels[0] = 0

    def label_path(relative: str) -> Path:
        return partial / "images" / f"{strip_extension(relative)}_{category}.png"

    todo = [r for r in images if not label_path(r).is_file()]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(images), initial=len(images) - len(todo), desc="segment", unit="img",
               disable=not progress)
    model = model.to(torch_device)
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            pixels = []
            for relative in batch:
                try:
                    pixels.append(_load_pixels(images_root / relative, target))
                except (OSError, ValueError) as error:
                    raise DatasetError(f"{images_root / relative} cannot be read as an image: "
                                       f"{error}") from None
            tensor = torch.stack([image_tensor(p, mean_t, std_t) for p in pixels])
            with torch.inference_mode():
                output = model(tensor.to(torch_device))
                logits = logits_of(output, len(batch), n_channels,
                                   f"segmenter {segmenter if isinstance(segmenter, str) else ''}"
                                   .strip())
                labels = label_maps(logits, image_size, channel_labels,
                                    float(min_confidence)).cpu().numpy()
            for relative, label in zip(batch, labels):
                _save_outputs(images_root / relative,
                              partial / "images" / stored_image_name(relative, target),
                              label_path(relative), nearest_resize(label, seg_size), target)
                bar.update(1)
    finally:
        bar.close()
        model.to("cpu")
    _write_csv_files(partial, images, class_list, category, image_size, seg_size, target)
    if final.exists():
        final.rmdir()  # empty (checked by prepare_out)
    os.replace(partial, final)
    return final


def _write_csv_files(partial: Path, images: Sequence[str], class_list: ClassList, category: str,
                     image_size: tuple[int, int], seg_size: tuple[int, int],
                     target: tuple[int, int] | None) -> None:
    """The vocabulary csv files from the label PNGs written, then index.csv (last)."""
    from dissect.data.broden import decode_segmentation

    n_labels = len(class_list.names) + 1
    stats = LabelStatistics([category], n_labels)
    temporary = partial / "index.csv.tmp"
    with open(temporary, "w", newline="", encoding="utf-8") as handle:
        index = csv.writer(handle, lineterminator="\n")
        index.writerow([*INDEX_COLUMNS, category])
        for relative in images:
            name = f"{strip_extension(relative)}_{category}.png"
            stats.add(category, [decode_segmentation(partial / "images" / name)], ())
            index.writerow([stored_image_name(relative, target), DEFAULT_SPLIT, image_size[0],
                            image_size[1], seg_size[0], seg_size[1], name])
    numbers = list(range(1, n_labels))
    write_vocabulary(partial, [category], {category: numbers},
                     dict(zip(numbers, class_list.names)), stats)
    os.replace(temporary, partial / "index.csv")
