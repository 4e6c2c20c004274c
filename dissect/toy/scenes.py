"""Procedurally drawn toy scenes: the vocabulary, the palette and pure drawing functions.

A scene is drawn on a square grid of ``grid`` x ``grid`` cells (the segmentation resolution).
Every cell holds one *shade* (an exact RGB value with a colour name), one object label, at most
one part label (in one of two part layers) and at most one material label. The image is the
shade map scaled up by nearest neighbour, so image pixels and label cells agree exactly.

Everything here is a pure function of a :class:`numpy.random.Generator`; nothing touches disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dissect.errors import OptionError

CATEGORIES: tuple[str, ...] = ("color", "object", "material", "part", "scene", "texture")
"""Category order of the toy dataset (category.csv row order and index.csv column order)."""

COLORS: tuple[str, ...] = ("black", "blue", "brown", "gray", "green", "orange", "pink",
                           "purple", "red", "white", "yellow")
OBJECTS: tuple[str, ...] = ("sky", "cloud", "sun", "water", "sand", "grass", "road", "sidewalk",
                            "wall", "floor", "house", "car", "tree", "flower", "umbrella",
                            "ball", "boat", "cabinet", "table", "bed", "lamp", "painting")
MATERIALS: tuple[str, ...] = ("water", "wood", "glass", "metal", "fabric", "plastic", "brick",
                              "rubber", "tile")
PARTS: tuple[str, ...] = ("roof", "door", "window", "wheel", "trunk", "crown", "canopy", "pole",
                          "hull", "sail", "handle", "tabletop", "leg", "blanket", "pillow",
                          "lampshade", "stand")
SCENES: tuple[str, ...] = ("beach", "forest", "street", "kitchen", "bedroom")
TEXTURES: tuple[str, ...] = ("striped", "dotted", "chequered")

CATEGORY_LABELS: dict[str, tuple[str, ...]] = {
    "color": COLORS, "object": OBJECTS, "material": MATERIALS, "part": PARTS,
    "scene": SCENES, "texture": TEXTURES,
}


def _number_labels() -> dict[str, int]:
    """Global label numbers: 1, 2, ... in category order; a name in two categories gets one."""
    numbers: dict[str, int] = {}
    for category in CATEGORIES:
        for name in CATEGORY_LABELS[category]:
            if name not in numbers:
                numbers[name] = len(numbers) + 1
    return numbers


LABELS: dict[str, int] = _number_labels()
"""Label number of every toy concept name. ``water`` is both an object and a material."""

LABEL_NAMES: tuple[str, ...] = ("-",) + tuple(LABELS)
"""``LABEL_NAMES[n]`` is the name of label number n (``'-'`` for 0)."""

# Shades: key -> (colour name, RGB). Pairwise RGB distances are >= 30 so an exact-colour
# detector with a small tolerance never confuses two shades. Some shades are used by one kind of
# thing only (sun, sand, grass, road, cabinet, bed frame): the planted model detects those.
SHADES: dict[str, tuple[str, tuple[int, int, int]]] = {
    "black": ("black", (25, 25, 25)),
    "sky": ("blue", (135, 190, 235)),
    "sea": ("blue", (30, 90, 170)),
    "glass": ("blue", (175, 215, 240)),
    "navy": ("blue", (45, 60, 190)),
    "wall-blue": ("blue", (160, 170, 220)),
    "trunk": ("brown", (105, 65, 35)),
    "wood": ("brown", (170, 120, 70)),
    "bed": ("brown", (135, 80, 45)),
    "brick": ("brown", (175, 85, 60)),
    "road": ("gray", (95, 95, 100)),
    "sidewalk": ("gray", (175, 175, 170)),
    "roof": ("gray", (125, 120, 130)),
    "metal": ("gray", (145, 150, 160)),
    "tile": ("gray", (205, 205, 210)),
    "grass": ("green", (80, 165, 60)),
    "leaf": ("green", (35, 115, 45)),
    "leaf-light": ("green", (110, 190, 95)),
    "cabinet": ("green", (150, 195, 170)),
    "wall-green": ("green", (200, 230, 185)),
    "orange": ("orange", (245, 135, 25)),
    "pink": ("pink", (245, 145, 190)),
    "purple": ("purple", (125, 55, 165)),
    "red": ("red", (215, 35, 40)),
    "white": ("white", (248, 248, 248)),
    "wall-white": ("white", (235, 225, 200)),
    "sand": ("yellow", (225, 200, 130)),
    "sun": ("yellow", (255, 200, 30)),
    "yellow": ("yellow", (240, 230, 60)),
    "wall-yellow": ("yellow", (245, 225, 160)),
}
SHADE_KEYS: tuple[str, ...] = tuple(SHADES)
SHADE_RGB: np.ndarray = np.array([SHADES[k][1] for k in SHADE_KEYS], dtype=np.uint8)
"""uint8 (n_shades, 3): RGB of each shade, in SHADE_KEYS order."""
SHADE_COLOR: np.ndarray = np.array([LABELS[SHADES[k][0]] for k in SHADE_KEYS], dtype=np.int32)
"""int32 (n_shades,): colour label number of each shade."""
_SHADE_INDEX = {key: index for index, key in enumerate(SHADE_KEYS)}

ACCENTS: tuple[str, ...] = ("red", "orange", "pink", "purple", "yellow")
"""Accent shades used on small things of every scene (balls, cars, flowers, blankets, ...)."""

PART_LAYERS = 2
"""Number of part layers: parts of different kinds of object go to different layers."""


@dataclass(frozen=True)
class ToyScene:
    """What was drawn for one image, at the segmentation grid (``grid`` x ``grid`` cells).

    Attributes
    ----------
    scene:
        Scene name, one of :data:`SCENES`.
    shade:
        int16 (grid, grid): index into :data:`SHADE_KEYS` of every cell.
    color, object, material:
        int32 (grid, grid): label numbers (0 = none); ``color`` and ``object`` have no zeros.
    part:
        int32 (PART_LAYERS, grid, grid): part label numbers per layer (0 = none).
    material_annotated:
        Whether the image's materials are written to the dataset (partial annotation).
    textures:
        Texture label numbers (image-level), sorted.
    """

    scene: str
    shade: np.ndarray
    color: np.ndarray
    object: np.ndarray
    material: np.ndarray
    part: np.ndarray
    material_annotated: bool
    textures: tuple[int, ...]

    @property
    def scene_label(self) -> int:
        """Label number of the scene."""
        return LABELS[self.scene]

    def rgb(self) -> np.ndarray:
        """uint8 (grid, grid, 3): the RGB value of every cell."""
        return SHADE_RGB[self.shade]


class Canvas:
    """Label maps being painted, painter's-algorithm style (later strokes cover earlier ones).

    Shape coordinates are fractions of the side (0..1, y downwards); cell centres sit at
    ``(i + 0.5) / grid``.
    """

    def __init__(self, grid: int) -> None:
        self.grid = grid
        centres = np.arange(grid, dtype=np.float64) + 0.5
        self.y = centres[:, None]
        self.x = centres[None, :]
        self.shade = np.full((grid, grid), -1, dtype=np.int16)
        self.object = np.zeros((grid, grid), dtype=np.int32)
        self.material = np.zeros((grid, grid), dtype=np.int32)
        self.part = np.zeros((grid, grid), dtype=np.int32)
        self.layer = np.zeros((grid, grid), dtype=np.int8)

    # ----------------------------------------------------------------- shapes (bool masks)
    def rect(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Cells of the rectangle [x0, x1) x [y0, y1), at least one cell wide and high."""
        g = self.grid
        j0, i0 = _cell(x0 * g, g), _cell(y0 * g, g)
        j1 = min(g, max(j0 + 1, int(np.floor(x1 * g + 0.5))))
        i1 = min(g, max(i0 + 1, int(np.floor(y1 * g + 0.5))))
        mask = np.zeros((g, g), dtype=bool)
        mask[i0:i1, j0:j1] = True
        return mask

    def ellipse(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        """Cells whose centre lies in the ellipse; radii are at least one cell."""
        g = self.grid
        rx_c, ry_c = max(rx * g, 1.0), max(ry * g, 1.0)
        return ((self.x - cx * g) / rx_c) ** 2 + ((self.y - cy * g) / ry_c) ** 2 <= 1.0

    def triangle(self, p0: tuple[float, float], p1: tuple[float, float],
                 p2: tuple[float, float]) -> np.ndarray:
        """Cells whose centre lies in the triangle (at least the cell of its centroid)."""
        g = self.grid
        (ax, ay), (bx, by), (cx, cy) = ((p[0] * g, p[1] * g) for p in (p0, p1, p2))

        def side(px: float, py: float, qx: float, qy: float) -> np.ndarray:
            return (qx - px) * (self.y - py) - (qy - py) * (self.x - px)

        s0, s1, s2 = side(ax, ay, bx, by), side(bx, by, cx, cy), side(cx, cy, ax, ay)
        mask = ((s0 >= 0) & (s1 >= 0) & (s2 >= 0)) | ((s0 <= 0) & (s1 <= 0) & (s2 <= 0))
        if not mask.any():
            mask[_cell((ay + by + cy) / 3, g), _cell((ax + bx + cx) / 3, g)] = True
        return mask

    def stripes(self, period: float, vertical: bool, phase: float = 0.0) -> np.ndarray:
        """Every other band of width ``period / 2`` (fraction of the side), at least one cell."""
        width = max(1.0, period * self.grid / 2)
        coord = self.x if vertical else self.y
        band = np.floor((coord - 0.5 + phase * self.grid) / width).astype(np.int64) % 2 == 0
        return np.broadcast_to(band, (self.grid, self.grid)).copy()

    def dots(self, period: float) -> np.ndarray:
        """A square lattice of single-cell (or small round) dots with spacing ``period``."""
        step = max(2.0, period * self.grid)
        radius = max(0.5, step * 0.25)
        dy = (self.y - 0.5) % step - step / 2
        dx = (self.x - 0.5) % step - step / 2
        return dx ** 2 + dy ** 2 <= radius ** 2

    def chequer(self, period: float) -> np.ndarray:
        """A chequerboard of squares of side ``period`` (at least one cell)."""
        step = max(1.0, period * self.grid)
        return (np.floor((self.x - 0.5) / step).astype(np.int64)
                + np.floor((self.y - 0.5) / step).astype(np.int64)) % 2 == 0

    # ----------------------------------------------------------------- painting
    def fill_object(self, mask: np.ndarray, obj: str, shade: str,
                    material: str | None = None) -> None:
        """Paint a whole object region (clears the parts it covers)."""
        self.shade[mask] = _SHADE_INDEX[shade]
        self.object[mask] = LABELS[obj]
        self.material[mask] = LABELS[material] if material else 0
        self.part[mask] = 0
        self.layer[mask] = 0

    def fill_part(self, mask: np.ndarray, obj: str, part: str, layer: int, shade: str,
                  material: str | None = None) -> None:
        """Paint a part of object ``obj`` into part layer ``layer`` (0 or 1)."""
        self.fill_object(mask, obj, shade, material)
        self.part[mask] = LABELS[part]
        self.layer[mask] = layer

    def recolour(self, mask: np.ndarray, shade: str) -> None:
        """Change only the shade (texture paint): labels other than colour stay."""
        self.shade[mask] = _SHADE_INDEX[shade]


def _cell(value: float, grid: int) -> int:
    """Index of the cell holding coordinate ``value`` (in cells), clamped to the grid."""
    return min(grid - 1, max(0, int(np.floor(value))))


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


# ---------------------------------------------------------------------- shared elements
def _sky(c: Canvas, rng: np.random.Generator, horizon: float, p_sun: float,
         bottom: float | None = None) -> None:
    """Sky down to ``bottom`` (default the horizon); sun and clouds above the horizon."""
    c.fill_object(c.rect(0, 0, 1, horizon if bottom is None else bottom), "sky", "sky")
    if rng.random() < p_sun:
        r = rng.uniform(0.06, 0.09)
        cx = rng.uniform(0.1, 0.9)
        cy = rng.uniform(min(r, horizon / 2), max(min(r, horizon / 2), horizon - r))
        c.fill_object(c.ellipse(cx, cy, r, r) & (c.y < horizon * c.grid), "sun", "sun")
    for _ in range(int(rng.integers(0, 3))):
        rx = rng.uniform(0.08, 0.15)
        cloud = c.ellipse(rng.uniform(0.05, 0.95), rng.uniform(0.05, 0.7) * horizon, rx,
                          rx * rng.uniform(0.35, 0.5))
        c.fill_object(cloud & (c.y < horizon * c.grid), "cloud", "white")


def _ball(c: Canvas, rng: np.random.Generator, top: float, dotted: bool) -> None:
    r = rng.uniform(0.04, 0.065)
    cx, cy = rng.uniform(r, 1 - r), rng.uniform(min(top + r, 1 - r), 1 - r)
    shade = _pick(rng, ACCENTS)
    mask = c.ellipse(cx, cy, r, r)
    c.fill_object(mask, "ball", shade, "plastic")
    if dotted:
        c.recolour(mask & c.dots(0.04), "white")


def _painting(c: Canvas, rng: np.random.Generator, wall_bottom: float) -> None:
    w, h = rng.uniform(0.14, 0.22), rng.uniform(0.1, 0.16)
    x0, y0 = rng.uniform(0.05, 0.95 - w), rng.uniform(0.06, max(0.07, wall_bottom - h - 0.2))
    c.fill_object(c.rect(x0, y0, x0 + w, y0 + h), "painting", "wood")
    c.fill_object(c.rect(x0 + 0.02, y0 + 0.02, x0 + w - 0.02, y0 + h - 0.02), "painting",
                  _pick(rng, ACCENTS))


# ---------------------------------------------------------------------- the scenes
def _draw_beach(c: Canvas, rng: np.random.Generator, texture: str | None) -> None:
    horizon = rng.uniform(0.35, 0.5)
    shore = horizon + rng.uniform(0.12, 0.2)
    _sky(c, rng, horizon, 0.7)
    c.fill_object(c.rect(0, horizon, 1, shore), "water", "sea", "water")
    c.fill_object(c.rect(0, shore, 1, 1), "sand", "sand")
    if rng.random() < 0.5:  # a boat on the sea: hull and sail in part layer 1
        w = rng.uniform(0.16, 0.26)
        x0 = rng.uniform(0.03, 0.97 - w)
        bottom = rng.uniform(horizon + 0.06, shore)
        top = bottom - rng.uniform(0.04, 0.06)
        mast = x0 + w * rng.uniform(0.35, 0.55)
        sail_top = top - rng.uniform(0.12, 0.2)
        c.fill_part(c.rect(x0, top, x0 + w, bottom), "boat", "hull", 1,
                    _pick(rng, ("wood", "white", "navy")), "wood")
        c.fill_part(c.triangle((mast, sail_top), (mast, top), (mast + w * 0.45, top)), "boat",
                    "sail", 1, _pick(rng, ("white", "white") + ACCENTS), "fabric")
    if texture == "striped" or rng.random() < 0.8:  # a beach umbrella: part layer 0
        cx = rng.uniform(0.15, 0.85)
        cy = rng.uniform(shore + 0.04, max(shore + 0.05, 0.72))
        rx = rng.uniform(0.12, 0.18)
        pole_bottom = min(0.98, cy + rng.uniform(0.16, 0.24))
        c.fill_part(c.rect(cx - 0.012, cy, cx + 0.012, pole_bottom), "umbrella", "pole", 0,
                    "metal", "metal")
        canopy = c.ellipse(cx, cy, rx, rx * rng.uniform(0.5, 0.7)) & (c.y < cy * c.grid + 0.5)
        c.fill_part(canopy, "umbrella", "canopy", 0, _pick(rng, ACCENTS), "fabric")
        if texture == "striped":
            stripe = _pick(rng, ("white",) + ACCENTS)
            c.recolour(canopy & c.stripes(rng.uniform(0.06, 0.1), True, rng.random()), stripe)
    for _ in range(int(rng.integers(1, 3))):
        _ball(c, rng, shore + 0.02, texture == "dotted")


def _draw_forest(c: Canvas, rng: np.random.Generator, texture: str | None) -> None:
    horizon = rng.uniform(0.25, 0.4)
    _sky(c, rng, horizon, 0.5)
    c.fill_object(c.rect(0, horizon, 1, 1), "grass", "grass")
    if rng.random() < 0.35:  # a pond
        c.fill_object(c.ellipse(rng.uniform(0.2, 0.8), rng.uniform(horizon + 0.15, 0.85),
                                rng.uniform(0.12, 0.2), rng.uniform(0.04, 0.07)),
                      "water", "sea", "water")
    for _ in range(int(rng.integers(2, 7))):
        r = rng.uniform(0.018, 0.03)
        c.fill_object(c.ellipse(rng.uniform(0.03, 0.97), rng.uniform(horizon + 0.05, 0.97), r, r),
                      "flower", _pick(rng, ACCENTS))
    bases = np.sort(rng.uniform(horizon + 0.08, 0.97, size=int(rng.integers(2, 5))))
    for base in bases:  # far trees first
        scale = 0.6 + 0.6 * (base - horizon) / (1 - horizon)
        x = rng.uniform(0.08, 0.92)
        half = 0.02 * scale
        height = rng.uniform(0.16, 0.26) * scale
        c.fill_part(c.rect(x - half, base - height, x + half, base), "tree", "trunk", 0,
                    "trunk", "wood")
        leaf = _pick(rng, ("leaf", "leaf-light"))
        rx, ry = rng.uniform(0.08, 0.12) * scale, rng.uniform(0.1, 0.14) * scale
        top = base - height
        if rng.random() < 0.5:
            crown = c.ellipse(x, top - ry * 0.6, rx, ry)
        else:
            crown = c.triangle((x - rx, top + 0.02), (x + rx, top + 0.02), (x, top - 2.2 * ry))
        c.fill_part(crown, "tree", "crown", 0, leaf)


def _draw_street(c: Canvas, rng: np.random.Generator, texture: str | None) -> None:
    horizon = rng.uniform(0.2, 0.32)
    ground = rng.uniform(0.58, 0.66)
    road = ground + rng.uniform(0.06, 0.1)
    _sky(c, rng, horizon, 0.3, bottom=ground)  # the sky shows between the houses
    n_houses = int(rng.integers(2, 4))
    striped = int(rng.integers(n_houses)) if texture == "striped" else -1
    for k in range(n_houses):  # houses: parts in layer 0
        left, right = k / n_houses, (k + 1) / n_houses
        x0 = rng.uniform(left, left + 0.06)
        x1 = rng.uniform(right - 0.06, right)
        top = ground - rng.uniform(0.22, 0.34)
        body = c.rect(x0, top, x1, ground)
        c.fill_object(body, "house", _pick(rng, ("brick", "wall-white", "wall-yellow")), "brick")
        if k == striped:
            c.recolour(body & c.stripes(rng.uniform(0.05, 0.09), bool(rng.random() < 0.5)),
                       _pick(rng, ("white",) + ACCENTS))
        c.fill_part(c.triangle((x0 - 0.02, top + 0.005), (x1 + 0.02, top + 0.005),
                               ((x0 + x1) / 2, top - rng.uniform(0.08, 0.14))),
                    "house", "roof", 0, _pick(rng, ("roof", "brick")))
        w = x1 - x0
        rows = 1 if ground - top < 0.3 else 2
        for row in range(rows):
            wy = top + 0.04 + row * 0.11
            for col in range(2):
                wx = x0 + w * (0.15 + 0.5 * col)
                c.fill_part(c.rect(wx, wy, wx + w * 0.2, wy + 0.06), "house", "window", 0,
                            "glass", "glass")
        dx = x0 + w * rng.uniform(0.35, 0.5)
        c.fill_part(c.rect(dx, ground - rng.uniform(0.09, 0.12), dx + max(0.05, w * 0.15),
                           ground), "house", "door", 0, _pick(rng, ("wood",) + ACCENTS), "wood")
    c.fill_object(c.rect(0, ground, 1, road), "sidewalk", "sidewalk")
    c.fill_object(c.rect(0, road, 1, 1), "road", "road")
    bottoms = np.sort(rng.uniform(road + 0.14, 0.98, size=int(rng.integers(1, 3))))
    for bottom in bottoms:  # cars: parts in layer 1
        w = rng.uniform(0.24, 0.34)
        x0 = rng.uniform(0.0, 1 - w)
        rw = 0.035
        shade = _pick(rng, ACCENTS + ("navy", "white"))
        body_top = bottom - rw - rng.uniform(0.06, 0.08)
        cabin_top = body_top - rng.uniform(0.05, 0.07)
        c.fill_object(c.rect(x0, body_top, x0 + w, bottom - rw * 0.5), "car", shade, "metal")
        c.fill_object(c.rect(x0 + 0.2 * w, cabin_top, x0 + 0.8 * w, body_top), "car", shade,
                      "metal")
        for wx in (x0 + 0.26 * w, x0 + 0.52 * w):
            c.fill_part(c.rect(wx, cabin_top + 0.015, wx + 0.2 * w, body_top), "car", "window",
                        1, "glass", "glass")
        for wx in (x0 + 0.22 * w, x0 + 0.78 * w):
            c.fill_part(c.ellipse(wx, bottom - rw, rw, rw), "car", "wheel", 1, "black",
                        "rubber")


def _indoor(c: Canvas, rng: np.random.Generator, walls: tuple[str, ...],
            floors: tuple[tuple[str, str], ...], texture: str | None,
            wall_texture: tuple[str, ...]) -> float:
    """Wall and floor of a room; returns the floor line."""
    floor_line = rng.uniform(0.55, 0.68)
    wall = c.rect(0, 0, 1, floor_line)
    c.fill_object(wall, "wall", _pick(rng, walls))
    if texture in wall_texture:
        paint = _pick(rng, ("white",) + ACCENTS)
        if texture == "striped":
            c.recolour(wall & c.stripes(rng.uniform(0.06, 0.1), True, rng.random()), paint)
        else:
            c.recolour(wall & c.dots(rng.uniform(0.08, 0.12)), paint)
    floor = c.rect(0, floor_line, 1, 1)
    shade, material = floors[int(rng.integers(len(floors)))]
    if texture == "chequered":
        shade, material = "tile", "tile"
    c.fill_object(floor, "floor", shade, material)
    if texture == "chequered":
        c.recolour(floor & c.chequer(rng.uniform(0.07, 0.11)), "black")
    if rng.random() < 0.45:
        _painting(c, rng, floor_line)
    return floor_line


def _draw_kitchen(c: Canvas, rng: np.random.Generator, texture: str | None) -> None:
    floor_line = _indoor(c, rng, ("wall-white", "wall-yellow"),
                         (("tile", "tile"), ("tile", "tile"), ("wood", "wood")), texture,
                         ("striped", "dotted"))
    n_cabinets = int(rng.integers(1, 3))
    for k in range(n_cabinets):  # cabinets: the handle is a part in layer 1
        left = k / n_cabinets
        w = rng.uniform(0.2, 0.3) * (1.5 if n_cabinets == 1 else 1.0)
        x0 = rng.uniform(left, max(left, left + 1 / n_cabinets - w))
        h = rng.uniform(0.25, 0.35)
        bottom = floor_line + rng.uniform(0.0, 0.05)
        c.fill_object(c.rect(x0, bottom - h, x0 + w, bottom), "cabinet", "cabinet", "wood")
        hx = x0 + w * rng.uniform(0.6, 0.8)
        c.fill_part(c.rect(hx, bottom - h * 0.7, hx + 0.02, bottom - h * 0.45), "cabinet",
                    "handle", 1, "black", "metal")
    if rng.random() < 0.85:  # a table: parts in layer 0
        w = rng.uniform(0.25, 0.4)
        x0 = rng.uniform(0.02, 0.98 - w)
        top = floor_line + rng.uniform(0.05, 0.1)
        leg_bottom = min(0.98, top + rng.uniform(0.15, 0.22))
        shade = _pick(rng, ("wood", "white"))
        for lx in (x0 + 0.02, x0 + w - 0.05):
            c.fill_part(c.rect(lx, top, lx + 0.03, leg_bottom), "table", "leg", 0, shade, "wood")
        c.fill_part(c.rect(x0, top - 0.035, x0 + w, top + 0.005), "table", "tabletop", 0, shade,
                    "wood")


def _draw_bedroom(c: Canvas, rng: np.random.Generator, texture: str | None) -> None:
    blanket_texture = texture if texture in ("striped", "dotted") and rng.random() < 0.6 else None
    floor_line = _indoor(c, rng, ("wall-blue", "wall-green", "wall-white"),
                         (("wood", "wood"), ("wood", "wood"), ("tile", "tile")),
                         None if blanket_texture else texture, ("striped", "dotted"))
    w = rng.uniform(0.42, 0.56)
    x0 = rng.uniform(0.02, 0.98 - w)
    bottom = rng.uniform(floor_line + 0.16, 0.95)
    base_h = rng.uniform(0.1, 0.14)
    head_left = bool(rng.random() < 0.5)
    hx0 = x0 if head_left else x0 + w - 0.06
    c.fill_object(c.rect(hx0, bottom - base_h - rng.uniform(0.12, 0.18), hx0 + 0.06, bottom),
                  "bed", "bed", "wood")
    c.fill_object(c.rect(x0, bottom - base_h, x0 + w, bottom), "bed", "bed", "wood")
    bx0, bx1 = (x0 + 0.06 + w * 0.22, x0 + w) if head_left else (x0, x0 + w - 0.06 - w * 0.22)
    blanket = c.rect(bx0, bottom - base_h - 0.04, bx1, bottom - base_h * 0.35)
    c.fill_part(blanket, "bed", "blanket", 0, _pick(rng, ACCENTS + ("navy", "white")), "fabric")
    if blanket_texture == "striped":
        c.recolour(blanket & c.stripes(rng.uniform(0.05, 0.08), False), "white")
    elif blanket_texture == "dotted":
        c.recolour(blanket & c.dots(0.05), "white")
    px = x0 + 0.07 if head_left else x0 + w - 0.07 - w * 0.18
    c.fill_part(c.rect(px, bottom - base_h - 0.05, px + w * 0.18, bottom - base_h), "bed",
                "pillow", 0, "white", "fabric")
    if rng.random() < 0.6:  # a lamp: parts in layer 1
        lx = rng.uniform(0.06, 0.94)
        foot = rng.uniform(floor_line + 0.04, 0.98)
        neck = foot - rng.uniform(0.22, 0.3)
        c.fill_part(c.rect(lx - 0.01, neck, lx + 0.01, foot), "lamp", "stand", 1, "metal",
                    "metal")
        half = rng.uniform(0.05, 0.07)
        c.fill_part(c.triangle((lx - half, neck + 0.01), (lx + half, neck + 0.01),
                               (lx, neck - 0.09)), "lamp", "lampshade", 1, _pick(rng, ACCENTS),
                    "fabric")


_DRAWERS: dict[str, Callable[[Canvas, np.random.Generator, str | None], None]] = {
    "beach": _draw_beach, "forest": _draw_forest, "street": _draw_street,
    "kitchen": _draw_kitchen, "bedroom": _draw_bedroom,
}
_TEXTURE_CHOICES: dict[str, tuple[str | None, ...]] = {
    "beach": (None, None, "striped", "dotted"),
    "forest": (None,),
    "street": (None, None, "striped"),
    "kitchen": (None, "striped", "dotted", "chequered"),
    "bedroom": (None, "striped", "dotted", "chequered"),
}


def draw_scene(scene: str, grid: int, rng: np.random.Generator,
               material_annotated: bool = True) -> ToyScene:
    """Draw one scene of kind ``scene`` on a ``grid`` x ``grid`` label grid.

    Parameters
    ----------
    scene:
        One of :data:`SCENES`: ``beach``, ``forest``, ``street``, ``kitchen``, ``bedroom``.
    grid:
        Side of the label grid in cells (the segmentation size), >= 8.
    rng:
        The random generator; the drawing is a pure function of its state.
    material_annotated:
        Recorded in the result; the drawing itself does not depend on it.

    Raises
    ------
    OptionError
        For an unknown scene.

    Returns
    -------
    ToyScene with every map at (grid, grid); textures are image-level labels of the texture
    painted (stripes, dots or a chequered floor), if any.
    """
    if scene not in _DRAWERS:
        raise OptionError(f"unknown toy scene {scene!r}; scenes: {', '.join(SCENES)}")
    choices = _TEXTURE_CHOICES[scene]
    texture = choices[int(rng.integers(len(choices)))]
    canvas = Canvas(grid)
    _DRAWERS[scene](canvas, rng, texture)
    layers = np.zeros((PART_LAYERS, grid, grid), dtype=np.int32)
    for layer in range(PART_LAYERS):
        layers[layer] = np.where(canvas.layer == layer, canvas.part, 0)
    return ToyScene(
        scene=scene,
        shade=canvas.shade,
        color=SHADE_COLOR[canvas.shade],
        object=canvas.object,
        material=canvas.material,
        part=layers,
        material_annotated=material_annotated,
        textures=(LABELS[texture],) if texture else (),
    )


def scale_nearest(cells: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour scaling of a (grid, grid, ...) array to (size, size, ...).

    Output pixel i takes cell ``(i * grid) // size``, so for size = 2 * grid each cell becomes a
    2 x 2 block.
    """
    grid = cells.shape[0]
    index = (np.arange(size) * grid) // size
    return cells[index][:, index]
