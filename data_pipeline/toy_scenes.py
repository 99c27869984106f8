"""Synthetic toy scenes: sampling and rendering (the embedded default dataset).

Captions of these scenes (alt-text, SSC, DSC) live in data_pipeline/toy_captions.py.

Each scene is coloured shapes on a pale/neutral background, optionally with one written word.
Because the ground truth is known exactly, captioner output can be scored attribute by
attribute. Two worlds (``WORLDS``) share the vocabulary and the renderer:

- ``shapes`` (the demo's): 1-3 solid shapes of 7 (no hexagon), one per cell of a 3x3 grid, in
  square images of 96-160 px. The main subject (the largest object) is
  unambiguous: every other object is of a smaller size class (a small main subject is alone),
  and it is listed first. Small enough for minutes of CPU training.
- ``full``: 1-4 shapes anywhere (rejection-sampled), striped and dotted textures, seven aspect
  ratios with the long side 128-512 px, written words when ``text_probability`` > 0. The harder
  preset (``data.toy.world=full``). This module is pure: no file IO, no config, no torch;
everything random derives only from the ``numpy.random.Generator`` passed in.

Caption vocabulary is exactly the constant names below (colour names are the ``COLOURS`` keys,
shapes are ``SHAPES``, plurals via ``toy_captions.plural``). Background names deliberately
contain no object colour or shape word, so captions stay parsable.
Pixel boxes are ``(x0, y0, x1, y1)`` half-open: ``x0 <= x < x1``, ``y0 <= y < y1``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "heart",
                           "diamond", "cross")
COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30), "orange": (255, 140, 0), "yellow": (240, 210, 0),
    "green": (30, 160, 50), "blue": (30, 70, 220), "purple": (130, 40, 170),
    "pink": (255, 105, 180), "brown": (130, 80, 30),
}
SIZES: tuple[str, ...] = ("small", "medium", "large")
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted")
POSITIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                              "bottom left", "bottom", "bottom right")  # row-major 3x3


class BackgroundSpec(NamedTuple):
    """A background: ``start`` colour at top/left, ``end`` at bottom/right (RGB 0-255)."""
    start: RGB
    end: RGB
    vertical: bool  # True: gradient runs top -> bottom; False: left -> right


BACKGROUNDS: dict[str, BackgroundSpec] = {
    "white": BackgroundSpec((255, 255, 255), (255, 255, 255), True),
    "light gray": BackgroundSpec((225, 225, 225), (225, 225, 225), True),
    "beige": BackgroundSpec((240, 230, 205), (240, 230, 205), True),
    "cream": BackgroundSpec((255, 250, 232), (255, 250, 232), True),
    "dark gray": BackgroundSpec((60, 60, 60), (60, 60, 60), True),
    "sky gradient": BackgroundSpec((200, 225, 250), (245, 250, 255), True),
    "sunset gradient": BackgroundSpec((255, 225, 200), (235, 215, 245), True),
    "mint gradient": BackgroundSpec((215, 245, 225), (245, 255, 250), False),
}
WORDS: tuple[str, ...] = (
    "apple", "river", "cloud", "house", "tree", "bread", "music", "lamp", "stone",
    "water", "happy", "dream", "smile", "ocean", "forest", "garden", "window", "paper",
    "train", "pizza", "coffee", "summer", "winter", "spring", "magic", "tiger", "zebra",
    "robot", "rocket", "planet", "moon", "sun", "book", "chair", "table", "candle",
    "piano", "lemon", "honey", "bird", "fish", "horse", "snow", "rain", "open", "hello",
)
ASPECT_RATIOS: tuple[tuple[int, int], ...] = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16),
                                              (2, 1), (1, 2))  # width:height

_SIZE_FRACTIONS: dict[str, float] = {"small": 0.20, "medium": 0.32, "large": 0.45}
# Grid: side / cell's short side +- jitter; far apart (squashed, 4:3 large ~ square medium: docs/data.md)
_CELL_FRACTIONS, _GRID_SIZE_JITTER = {"small": 0.50, "medium": 0.72, "large": 0.95}, 0.02
_SIZE_JITTER = 0.03  # +- fraction of the short side; classes stay >= 0.06 apart
_GAP, _PLACEMENT_TRIES = 4, 50  # minimum pixel gap between any two boxes (objects and text); tries
_TEXT_CONTRAST = 2.2  # minimum WCAG contrast ratio of the word against its background
_WHITE = np.array([255, 255, 255], dtype=np.uint8)


@dataclass(frozen=True)
class World:
    """What a toy world samples.

    Attributes:
        max_objects: objects per scene are 1..max_objects.
        textures: the textures objects are drawn with (``("solid",)``: no texture words).
        aspect_ratios: width:height pairs images are drawn in.
        long_side: (min, max) pixels of the image's long side, in steps of 16.
        grid: True: one object per 3x3 grid cell, smaller size classes than the main subject
            for every other object, main subject first; False: free rejection-sampled
            placement in random order, any sizes.
        shapes: the ``SHAPES`` objects are drawn from.
    """

    max_objects: int
    textures: tuple[str, ...]
    aspect_ratios: tuple[tuple[int, int], ...]
    long_side: tuple[int, int]
    grid: bool
    shapes: tuple[str, ...] = SHAPES


WORLDS: dict[str, World] = {
    "shapes": World(max_objects=3, textures=("solid",), aspect_ratios=((1, 1),),  # square: docs/data.md
                    long_side=(96, 160), grid=True,  # no hexagon: a small one is a circle (docs/data.md)
                    shapes=("circle", "square", "triangle", "star", "heart", "diamond", "cross")),
    "full": World(max_objects=4, textures=TEXTURES, aspect_ratios=ASPECT_RATIOS, long_side=(128, 512), grid=False),
}


@dataclass(frozen=True)
class SceneObject:
    """One shape. ``box`` is its square pixel box (x0, y0, x1, y1), half-open."""
    shape: str
    colour: str
    size: str
    texture: str
    position: str
    box: Box


@dataclass(frozen=True)
class WrittenText:
    """A written word; ``box`` is the pixel box (x0, y0, x1, y1) of its ink."""
    word: str
    colour: str
    box: Box


@dataclass(frozen=True)
class Scene:
    """A full scene: image size in pixels, background name, objects and optional word."""
    width: int
    height: int
    background: str
    objects: tuple[SceneObject, ...]
    text: WrittenText | None


def grid_position(box: Box, width: int, height: int) -> str:
    """Name of the 3x3 grid cell (over a ``width`` x ``height`` image) holding the box centre."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    col, row = min(int(cx * 3 / width), 2), min(int(cy * 3 / height), 2)
    return POSITIONS[row * 3 + col]


def _apart(a: Box, b: Box, gap: int = _GAP) -> bool:
    """True if boxes ``a`` and ``b`` are separated by at least ``gap`` pixels."""
    return (a[2] + gap <= b[0] or b[2] + gap <= a[0]
            or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _contrast(a: RGB, b: RGB) -> float:
    """WCAG contrast ratio (1..21) between two sRGB colours."""
    def lum(rgb: RGB) -> float:
        lin = [c / 255 / 12.92 if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    lo, hi = sorted((lum(a), lum(b)))
    return (hi + 0.05) / (lo + 0.05)


def text_colours(background: str) -> tuple[str, ...]:
    """COLOURS names with WCAG contrast >= 2.2 against both ends of ``background``."""
    spec = BACKGROUNDS[background]
    return tuple(name for name, rgb in COLOURS.items()
                 if min(_contrast(rgb, spec.start), _contrast(rgb, spec.end)) >= _TEXT_CONTRAST)


@functools.lru_cache(maxsize=128)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled default font at ``size`` pixels (cached; no file IO)."""
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=4096)
def _ink(word: str, size: int) -> tuple[int, int, int, int]:
    """Ink bbox (left, top, width, height) in pixels of ``word`` at font ``size``."""
    left, top, right, bottom = _font(size).getbbox(word)
    return int(left), int(top), int(right - left), int(bottom - top)


# ---------------------------------------------------------------- sampling


def _image_size(rng: np.random.Generator, world: World) -> tuple[int, int]:
    """Sample (width, height) in pixels: long side in ``world.long_side`` step 16, short side step 8."""
    a, b = world.aspect_ratios[rng.integers(len(world.aspect_ratios))]
    lo, hi = world.long_side
    long = 16 * int(rng.integers(lo // 16, hi // 16 + 1))
    short = max(64, round(long * min(a, b) / max(a, b) / 8) * 8)
    return (long, short) if a >= b else (short, long)


def _place(rng: np.random.Generator, image_wh: tuple[int, int], wh: tuple[int, int],
           taken: list[Box]) -> Box | None:
    """Rejection-sample a ``wh`` box inside the image, >= _GAP px from ``taken``; None on failure."""
    (width, height), (w, h) = image_wh, wh
    if w > width or h > height:
        return None
    for _ in range(_PLACEMENT_TRIES):
        x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        box = (x0, y0, x0 + w, y0 + h)
        if all(_apart(box, t) for t in taken):
            return box
    return None


def _sample_objects(rng: np.random.Generator, width: int, height: int, world: World) -> tuple[SceneObject, ...]:
    """Sample 1-``world.max_objects`` non-overlapping objects by rejection sampling (unplaceable
    ones dropped)."""
    short = min(width, height)
    placed: list[SceneObject] = []
    for _ in range(int(rng.integers(1, world.max_objects + 1))):
        shape = world.shapes[rng.integers(len(world.shapes))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        size = SIZES[rng.integers(len(SIZES))]
        texture = world.textures[rng.integers(len(world.textures))]
        frac = _SIZE_FRACTIONS[size] + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)
        side = max(8, round(frac * short))
        box = _place(rng, (width, height), (side, side), [o.box for o in placed])
        if box is not None:
            pos = grid_position(box, width, height)
            placed.append(SceneObject(shape, colour, size, texture, pos, box))
    return tuple(placed)


def _sample_grid_objects(rng: np.random.Generator, width: int, height: int,
                         world: World) -> tuple[SceneObject, ...]:
    """The grid layout: the main subject, then objects of strictly smaller size classes, each in
    its own 3x3 cell with its centre jittered within the cell. A small main subject is alone."""
    main_size = int(rng.integers(len(SIZES)))
    count = 1 if main_size == 0 else int(rng.integers(1, world.max_objects + 1))
    sizes = [main_size, *(int(rng.integers(main_size)) for _ in range(count - 1))]
    cells = rng.permutation(len(POSITIONS))[:count]
    cell_w, cell_h = width / 3, height / 3
    objects = []
    for size, cell in zip(sizes, cells):
        frac = _CELL_FRACTIONS[SIZES[size]] + rng.uniform(-_GRID_SIZE_JITTER, _GRID_SIZE_JITTER)
        side = max(8, round(frac * min(cell_w, cell_h)))
        row, col = divmod(int(cell), 3)
        slack_x, slack_y = max(0.0, cell_w - side), max(0.0, cell_h - side)
        x0 = int(col * cell_w + slack_x * rng.uniform(0.1, 0.9))
        y0 = int(row * cell_h + slack_y * rng.uniform(0.1, 0.9))
        box = (x0, y0, x0 + side, y0 + side)
        objects.append(SceneObject(world.shapes[rng.integers(len(world.shapes))], list(COLOURS)[rng.integers(len(COLOURS))],
                                   SIZES[size], world.textures[rng.integers(len(world.textures))],
                                   grid_position(box, width, height), box))
    return tuple(objects)


def _sample_text(rng: np.random.Generator, width: int, height: int, background: str,
                 objects: tuple[SceneObject, ...]) -> WrittenText | None:
    """Sample a contrasting word placed clear of all objects, or None if it does not fit."""
    word = WORDS[rng.integers(len(WORDS))]
    choices = text_colours(background)
    colour = choices[rng.integers(len(choices))]
    base_px = min(width, height) * rng.uniform(0.10, 0.16)
    for scale in (1.0, 0.75, 0.5):  # shrink the word if it does not fit at full size
        font_px = max(10, round(base_px * scale))
        box = _place(rng, (width, height), _ink(word, font_px)[2:], [o.box for o in objects])
        if box is not None:
            return WrittenText(word, colour, box)
    return None


def sample_scene(rng: np.random.Generator, *, text_probability: float = 0.4, world: World = WORLDS["full"]) -> Scene:
    """Sample a random scene of ``world``; a word is attempted with probability ``text_probability``."""
    width, height = _image_size(rng, world)
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    sample_objects = _sample_grid_objects if world.grid else _sample_objects
    objects = sample_objects(rng, width, height, world)
    text = None
    if rng.random() < text_probability:
        text = _sample_text(rng, width, height, background, objects)
    return Scene(width, height, background, objects, text)


# ---------------------------------------------------------------- rendering


def _heart_polygon(n: int = 48) -> tuple[tuple[float, float], ...]:
    """Classic parametric heart, normalised to the unit square (y down)."""
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    x, y = (x - x.min()) / np.ptp(x), (y - y.min()) / np.ptp(y)
    return tuple(zip(x.tolist(), y.tolist()))


def _ring(n: int, radii: tuple[float, ...], start: float) -> tuple[tuple[float, float], ...]:
    """``n`` points around (0.5, 0.5) in unit coords, radii cycling, from angle ``start`` rad."""
    return tuple((0.5 + radii[k % len(radii)] * math.cos(start + 2 * math.pi * k / n),
                  0.5 + radii[k % len(radii)] * math.sin(start + 2 * math.pi * k / n))
                 for k in range(n))


_T = 1 / 3
_UNIT_POLYGONS: dict[str, tuple[tuple[float, float], ...]] = {
    "triangle": ((0.5, 0.0), (1.0, 1.0), (0.0, 1.0)),
    "diamond": ((0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)),
    "hexagon": _ring(6, (0.5,), 0.0),
    "cross": ((_T, 0), (2 * _T, 0), (2 * _T, _T), (1, _T), (1, 2 * _T), (2 * _T, 2 * _T),
              (2 * _T, 1), (_T, 1), (_T, 2 * _T), (0, 2 * _T), (0, _T), (_T, _T)),
    "star": _ring(10, (0.5, 0.22), -math.pi / 2),  # five points, inner radius 0.22
    "heart": _heart_polygon(),
}


def shape_mask(shape: str, side: int) -> Image.Image:
    """Binary "L" mask (0 or 255) of ``shape`` filling a ``side`` x ``side`` pixel square."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    s = side - 1
    if shape == "circle":
        draw.ellipse((0, 0, s, s), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, s, s), fill=255)
    else:
        draw.polygon([(u * s, v * s) for u, v in _UNIT_POLYGONS[shape]], fill=255)
    return mask


def _texture(obj: SceneObject) -> Image.Image:
    """RGB fill image for ``obj``'s box: solid colour, colour/white stripes, or white dots."""
    side = obj.box[2] - obj.box[0]
    colour = COLOURS[obj.colour]
    if obj.texture == "solid":
        return Image.new("RGB", (side, side), colour)
    yy, xx = np.ogrid[:side, :side]
    if obj.texture == "striped":
        period = max(4, side // 6)
        band = math.ceil(period * 0.6)  # colour band >= 60% of each period
        # Stripe direction varies with box parity: diagonal or horizontal.
        coord = (xx + yy) if (obj.box[0] + obj.box[1]) % 2 == 0 else (yy + 0 * xx)  # 2-D
        is_colour = (coord % period) < band
    else:  # dotted: regular grid of white dots, ~15% of the area
        spacing = max(6, side // 5)
        half = (spacing - 1) / 2
        r = max(1.0, 0.22 * spacing)
        is_colour = ((xx % spacing - half) ** 2 + (yy % spacing - half) ** 2) > r * r
    arr = np.where(is_colour[..., None], np.array(colour, dtype=np.uint8), _WHITE)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def background_array(background: str, width: int, height: int) -> np.ndarray:
    """Background pixels, uint8 array of shape (height, width, 3); gradients are linear."""
    spec = BACKGROUNDS[background]
    n = height if spec.vertical else width
    t = np.linspace(0.0, 1.0, n)[:, None]
    start, end = np.array(spec.start, float), np.array(spec.end, float)
    ramp = np.rint(start + t * (end - start)).astype(np.uint8)  # (n, 3)
    ramp = ramp[:, None, :] if spec.vertical else ramp[None, :, :]
    return np.ascontiguousarray(np.broadcast_to(ramp, (height, width, 3)))


def render_scene(scene: Scene) -> Image.Image:
    """Render ``scene`` deterministically to an RGB image of (scene.width, scene.height)."""
    image = Image.fromarray(background_array(scene.background, scene.width, scene.height), "RGB")
    for obj in scene.objects:
        side = obj.box[2] - obj.box[0]
        image.paste(_texture(obj), obj.box[:2], shape_mask(obj.shape, side))
    if scene.text is not None:
        t = scene.text
        size = _font_size_for(t)
        left, top, _, _ = _ink(t.word, size)
        ImageDraw.Draw(image).text((t.box[0] - left, t.box[1] - top), t.word,
                                   fill=COLOURS[t.colour], font=_font(size))
    return image


def _font_size_for(text: WrittenText) -> int:
    """Font size (pixels) whose ink box for ``text.word`` has ``text.box``'s width/height.

    The size is not stored in the scene; the search starts at an estimate from the ink
    height and is exact because sampling used the same font metrics.
    """
    wh = (text.box[2] - text.box[0], text.box[3] - text.box[1])
    estimate = 100 * wh[1] / max(1, _ink(text.word, 100)[3])
    for size in sorted(range(10, 400), key=lambda s: abs(s - estimate)):
        if _ink(text.word, size)[2:] == wh:
            return size
    raise ValueError(f"no font size matches text box {text.box}")


# ---------------------------------------------------------------- captions


def scene_ground_truth(scene: Scene) -> dict:
    """JSON-serialisable ground truth: objects, text (or None) and background name."""
    objects = [{"shape": o.shape, "colour": o.colour, "size": o.size, "texture": o.texture,
                "position": o.position, "box": list(o.box)} for o in scene.objects]
    t = scene.text
    text = None if t is None else {"word": t.word, "colour": t.colour, "box": list(t.box)}
    return {"objects": objects, "text": text, "background": scene.background}
