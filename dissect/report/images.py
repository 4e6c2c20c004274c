"""Image strips for the report: each unit's top images with its thresholded mask drawn on them.

Pure array functions (thumbnails, mask resizing, outlines, strips, JPEG bytes) plus one writer,
:func:`write_unit_strips`, that reads only what it needs: activations for the (image, unit) pairs
that are shown, in blocks of units, and each needed image decoded once and kept only until the last
block that needs it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

#: Pixels between two thumbnails of a strip.
STRIP_GAP = 2
#: Strip background (RGB) for the gaps and for missing images.
STRIP_BACKGROUND = (255, 255, 255)
#: Colour of the mask outline (RGB).
OUTLINE_COLOR = (255, 230, 0)
#: Brightness factor applied outside the mask.
DIM_FACTOR = 0.35
#: JPEG quality of strips (encoding is deterministic for fixed parameters).
JPEG_QUALITY = 85
#: Memory budget (bytes) for the activations of one block of units.
ACTS_BLOCK_BYTES = 64 * 2**20


def thumbnail_shape(image_size: tuple[int, int], height: int) -> tuple[int, int]:
    """Thumbnail (height, width) for images of ``image_size`` (ih, iw), keeping the aspect ratio."""
    ih, iw = image_size
    return height, max(1, int(round(height * iw / ih)))


def make_thumbnail(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize an RGB image.

    Parameters
    ----------
    image : uint8 array (ih, iw, 3)
    shape : (th, tw) output size

    Returns
    -------
    uint8 array (th, tw, 3), bilinear (PIL, antialiased when shrinking).
    """
    th, tw = shape
    if image.shape[:2] == (th, tw):
        return np.ascontiguousarray(image, dtype=np.uint8)
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB")
    return np.asarray(pil.resize((tw, th), Image.Resampling.BILINEAR), dtype=np.uint8)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of boolean masks (pixel centres mapped to source pixels).

    Parameters
    ----------
    mask : bool array (..., sh, sw)
    shape : (th, tw)

    Returns
    -------
    bool array (..., th, tw):
    ``out[..., i, j] = mask[..., floor((i + 0.5) * sh / th), floor((j + 0.5) * sw / tw)]``.
    """
    sh, sw = mask.shape[-2:]
    th, tw = shape
    rows = ((np.arange(th) * 2 + 1) * sh) // (2 * th)
    cols = ((np.arange(tw) * 2 + 1) * sw) // (2 * tw)
    return mask[..., rows[:, None], cols[None, :]]


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of masks: mask pixels with a 4-neighbour outside the mask.

    Pixels on the image border count as boundary when they are in the mask.

    Parameters
    ----------
    mask : bool array (..., h, w)

    Returns
    -------
    bool array (..., h, w)
    """
    interior = mask.copy()
    interior[..., 1:, :] &= mask[..., :-1, :]
    interior[..., :-1, :] &= mask[..., 1:, :]
    interior[..., :, 1:] &= mask[..., :, :-1]
    interior[..., :, :-1] &= mask[..., :, 1:]
    interior[..., 0, :] = False
    interior[..., -1, :] = False
    interior[..., :, 0] = False
    interior[..., :, -1] = False
    return mask & ~interior


#: uint8 (256,): ``floor(v * DIM_FACTOR + 0.5)``, the dimmed value of each pixel value v.
DIM_TABLE = np.floor(np.arange(256) * DIM_FACTOR + 0.5).astype(np.uint8)


def draw_mask(thumb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Dim ``thumb`` outside ``mask`` (:data:`DIM_TABLE`) and outline the mask in
    :data:`OUTLINE_COLOR`.

    Parameters
    ----------
    thumb : uint8 array (..., h, w, 3)
    mask : bool array (..., h, w), same leading shape and size as ``thumb``

    Returns
    -------
    uint8 array (..., h, w, 3), a new array.
    """
    outline = mask_outline(mask)
    inside = mask & ~outline
    out = np.take(DIM_TABLE, thumb)
    out[inside] = thumb[inside]
    out[outline] = OUTLINE_COLOR
    return out


def compose_strip(thumbs: Sequence[np.ndarray], n_slots: int, shape: tuple[int, int]) -> np.ndarray:
    """Place thumbnails side by side in ``n_slots`` slots separated by :data:`STRIP_GAP` pixels.

    Parameters
    ----------
    thumbs : up to ``n_slots`` uint8 arrays (th, tw, 3); missing slots stay background
    n_slots : number of slots (the strip width is fixed by it)
    shape : (th, tw)

    Returns
    -------
    uint8 array (th, n_slots * tw + (n_slots - 1) * STRIP_GAP, 3)
    """
    th, tw = shape
    width = n_slots * tw + max(0, n_slots - 1) * STRIP_GAP
    row = np.tile(np.asarray(STRIP_BACKGROUND, dtype=np.uint8), width)
    strip = np.broadcast_to(row, (th, width * 3)).reshape(th, width, 3).copy()
    for i, thumb in enumerate(thumbs[:n_slots]):
        x = i * (tw + STRIP_GAP)
        strip[:, x : x + tw] = thumb
    return strip


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of an RGB uint8 image (h, w, 3); deterministic (no metadata, fixed settings)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB").save(
        buffer, format="JPEG", quality=quality, subsampling=0, optimize=False, progressive=False
    )
    return buffer.getvalue()


def threshold_masks(
    maps: np.ndarray, thresholds: np.ndarray, seg_size: tuple[int, int], batch: int = 512
) -> np.ndarray:
    """Masks of activation maps, as in the dissection (DESIGN §3 step 2).

    Parameters
    ----------
    maps : float array (n, h, w), each map of some unit on some image
    thresholds : float (n,), the threshold of each map's unit
    seg_size : (sh, sw)
    batch : maps upsampled per call (bounds the float32 (batch, sh, sw) temporary)

    Returns
    -------
    bool array (n, sh, sw): ``upsample_maps(maps, seg_size) > thresholds[:, None, None]``, compared
    in float32 exactly as the dissection does (``threshold_below``).
    """
    from dissect.stats import threshold_below, upsample_maps

    below = threshold_below(np.asarray(thresholds, dtype=np.float64))
    out = np.zeros((maps.shape[0], *seg_size), dtype=bool)
    for start in range(0, maps.shape[0], batch):
        stop = min(maps.shape[0], start + batch)
        up = upsample_maps(np.ascontiguousarray(maps[start:stop], dtype=np.float32), seg_size)
        out[start:stop] = np.asarray(up) > below[start:stop, None, None]
    return out


def plan_unit_blocks(n_units: int, top_k: int, map_size: int,
                     budget: int = ACTS_BLOCK_BYTES) -> int:
    """Units per block so that a block's activations (<= block * top_k images x block units x
    map_size float32 values) stay under ``budget`` bytes; at least 1."""
    per_unit_sq = max(1, top_k * map_size * 4)
    block = int(np.sqrt(budget / per_unit_sq))
    return max(1, min(n_units, block))


def _last_use(top_indices: np.ndarray, block: int) -> dict[int, int]:
    """For each image index in ``top_indices`` (U, k; -1 = none), the last unit block using it."""
    last: dict[int, int] = {}
    for u0 in range(0, top_indices.shape[0], block):
        for n in np.unique(top_indices[u0 : u0 + block]):
            if n >= 0:
                last[int(n)] = u0 // block
    return last


def write_unit_strips(
    read_acts: Callable[[np.ndarray, int, int], np.ndarray],
    load_image: Callable[[int], np.ndarray],
    thresholds: np.ndarray,
    top_indices: np.ndarray,
    paths: Sequence[Path],
    *,
    image_size: tuple[int, int],
    seg_size: tuple[int, int],
    map_size: int,
    thumbnail_height: int = 96,
) -> None:
    """Write one JPEG strip per unit: its top images with the unit's mask drawn on them.

    Parameters
    ----------
    read_acts : ``read_acts(rows, u0, u1)`` returns float32 (len(rows), u1 - u0, h, w) activations
        of the sorted, unique image indices ``rows`` (int64) and units ``u0 .. u1 - 1``
    load_image : ``load_image(n)`` returns image n as uint8 (ih, iw, 3)
    thresholds : float (U,)
    top_indices : int64 (U, k), each unit's top images in display order; -1 marks an empty slot
    paths : U output paths (parents are created)
    image_size : (ih, iw) of the dataset images
    seg_size : (sh, sw), the size masks are computed at
    map_size : h * w of one activation map (sets the unit block size)
    thumbnail_height : thumbnail height in pixels

    Each needed image is decoded once; thumbnails are kept only until the last block of units that
    shows them, and activations are read one block of units at a time.
    """
    n_units, k = top_indices.shape
    shape = thumbnail_shape(image_size, thumbnail_height)
    block = plan_unit_blocks(n_units, k, map_size)
    last_use = _last_use(top_indices, block)
    thumbs: dict[int, np.ndarray] = {}
    for block_id, u0 in enumerate(range(0, n_units, block)):
        u1 = min(n_units, u0 + block)
        tops = top_indices[u0:u1]
        rows = np.unique(tops[tops >= 0]).astype(np.int64)
        for n in rows:
            if int(n) not in thumbs:
                thumbs[int(n)] = make_thumbnail(load_image(int(n)), shape)
        # every shown (unit, image) map of the block, masked in a few batched calls
        unit_of, image_of = np.nonzero(tops >= 0)
        images_shown = tops[unit_of, image_of]
        if rows.size:
            acts = read_acts(rows, u0, u1)
            maps = acts[np.searchsorted(rows, images_shown), unit_of]
            del acts
            masks = threshold_masks(maps, np.asarray(thresholds)[u0 + unit_of], seg_size)
        else:
            masks = np.zeros((0, *seg_size), dtype=bool)
        for u in range(u0, u1):
            own = unit_of == u - u0
            shown = images_shown[own].tolist()
            drawn: list[np.ndarray] = []
            if shown:
                tiles = np.stack([thumbs[n] for n in shown])
                drawn = list(draw_mask(tiles, resize_mask(masks[own], shape)))
            path = Path(paths[u])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_jpeg(compose_strip(drawn, k, shape)))
        for n in rows:
            if last_use[int(n)] == block_id:
                del thumbs[int(n)]
