"""Spoken-scenes images and their captions: 1-3 flat-colored shapes on a procedural textured background.

``random_scene(rng)`` draws and renders one 256x256 RGB scene with its ground truth (each object's
color, shape, size and pixel box); ``describe_scene(scene, rng)`` writes the caption to speak, which
names every object once. Both are pure functions of the random generator's state.

Vocabulary (docs/architecture "The spoken-scenes corpus"): 8 colors with canonical RGB (jittered
per object), 8 shapes, 2 sizes (small: 15-25 % of the image width, big: 35-50 %), 6 backgrounds.
Shapes are drawn 4x supersampled and box-filtered (anti-aliased edges), placed so that no two boxes
overlap by more than MAX_OVERLAP of the smaller box, and never in a color that the background
itself has (no green shape on grass, no blue one on water, no white one on snow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from training.manifest import SceneObject

IMAGE_SIZE = 256
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon")
# Extent of an object (the larger side of its box) as a fraction of the image width.
SIZES: dict[str, tuple[float, float]] = {"small": (0.15, 0.25), "big": (0.35, 0.50)}
BACKGROUNDS = ("grass", "sand", "water", "snow", "wood", "stone")
# Colors a background is made of: an object of that color would melt into it.
HIDDEN_COLORS: dict[str, frozenset[str]] = {
    "grass": frozenset({"green"}), "water": frozenset({"blue"}), "snow": frozenset({"white"}),
}
# Largest rotation (degrees) per shape: enough to vary, small enough that a square never turns into a
# diamond or a cross into an "x". Circles are not rotated; stars and hexagons are symmetric anyway.
MAX_ROTATION = {"circle": 0, "square": 20, "triangle": 30, "star": 36, "heart": 25, "cross": 20,
                "diamond": 15, "hexagon": 30}
MAX_OVERLAP = 0.10  # of the smaller box's area
COLOR_JITTER = 12  # +- on all RGB channels together
CHANNEL_JITTER = 5  # +- on each channel
SUPERSAMPLE = 4
_PLACEMENT_TRIES = 60


@dataclass
class Scene:
    """A rendered scene: ``image`` 256x256 RGB, its background and its objects (boxes in pixels)."""

    image: Image.Image
    background: str
    objects: list[SceneObject]


# ----------------------------------------------------------------------------------------------
# Backgrounds


def _noise(rng: np.random.Generator, cells_y: int, cells_x: int) -> np.ndarray:
    """Smooth value noise: (cells_y+1, cells_x+1) random values interpolated to (256, 256) in [0, 1]."""
    grid = rng.random((cells_y + 1, cells_x + 1), dtype=np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))


def _fractal(rng: np.random.Generator, octaves: tuple[int, ...] = (3, 6, 12, 24)) -> np.ndarray:
    """Sum of noise octaves with halving weights, normalized to [0, 1]: (256, 256) float32."""
    total = sum(0.5**i * _noise(rng, cells, cells) for i, cells in enumerate(octaves))
    total -= total.min()
    return total / max(float(total.max()), 1e-6)


def _paint(t: np.ndarray, dark: tuple[int, int, int], light: tuple[int, int, int]) -> np.ndarray:
    """Map t (256, 256) in [0, 1] onto the color ramp dark -> light: (256, 256, 3) float32."""
    t = np.clip(t, 0.0, 1.0)[..., None]
    return np.asarray(dark, np.float32) * (1 - t) + np.asarray(light, np.float32) * t


def _grid() -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    return y, x


def _grass(rng: np.random.Generator) -> np.ndarray:
    blades = _noise(rng, 5, 110)  # many columns, few rows: vertical blades
    t = 0.45 * _fractal(rng) + 0.4 * blades + 0.15 * rng.random((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    return _paint(t, (35, 90, 25), (120, 175, 60))


def _sand(rng: np.random.Generator) -> np.ndarray:
    y, x = _grid()
    angle = rng.uniform(-0.4, 0.4)
    dunes = np.sin(2 * np.pi * ((y * math.cos(angle) + x * math.sin(angle)) / rng.uniform(28, 45)
                                + 0.8 * _fractal(rng, (2, 4, 8))))
    grain = rng.random((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    t = 0.55 + 0.15 * dunes + 0.25 * (grain - 0.5) + 0.2 * (_fractal(rng, (3, 6)) - 0.5)
    return _paint(t, (180, 150, 100), (238, 214, 165))


def _water(rng: np.random.Generator) -> np.ndarray:
    y, x = _grid()
    angle = rng.uniform(0, np.pi)
    phase = (x * math.cos(angle) + y * math.sin(angle)) / rng.uniform(14, 24) + 1.5 * _fractal(rng, (2, 4, 8))
    ripples = 0.5 + 0.5 * np.sin(2 * np.pi * phase)
    t = 0.35 * _fractal(rng) + 0.65 * ripples**3
    return _paint(t, (15, 60, 130), (110, 170, 225))


def _snow(rng: np.random.Generator) -> np.ndarray:
    t = 0.6 + 0.4 * _fractal(rng, (2, 4, 8, 16)) + 0.04 * rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE))
    image = _paint(t, (170, 185, 215), (250, 252, 255))
    sparkles = rng.random((IMAGE_SIZE, IMAGE_SIZE)) < 0.002
    image[sparkles] = 255.0
    return image


def _wood(rng: np.random.Generator) -> np.ndarray:
    # Vertical planks, each with its own tone and grain phase, dark seams between them.
    y, x = _grid()
    plank = rng.uniform(40, 70)
    along = x + rng.uniform(0, plank)
    index = np.floor(along / plank).astype(int)
    within = along - index * plank
    offsets = rng.uniform(0, 100, size=index.max() + 1).astype(np.float32)
    tones = rng.uniform(-0.12, 0.12, size=index.max() + 1).astype(np.float32)
    warp = 24.0 * _noise(rng, 4, 2) + 12.0 * _noise(rng, 12, 6)
    grain = 0.5 + 0.5 * np.sin(2 * np.pi * (x + warp + offsets[index]) / rng.uniform(5, 9))
    t = 0.5 + 0.3 * (grain - 0.5) + tones[index] + 0.15 * (_fractal(rng, (3, 6)) - 0.5)
    t = np.where((within < 1.5) | (within > plank - 1.5), 0.05, t)
    return _paint(t, (95, 58, 28), (185, 130, 75))


def _stone(rng: np.random.Generator) -> np.ndarray:
    # Cobbles: Voronoi cells computed at half resolution (the distance field is smooth, so it scales).
    n_cells, half = int(rng.integers(25, 45)), IMAGE_SIZE // 2
    seeds = rng.random((n_cells, 2), dtype=np.float32) * half
    y, x = np.mgrid[0:half, 0:half].astype(np.float32)
    squared = (y[..., None] - seeds[:, 0]) ** 2 + (x[..., None] - seeds[:, 1]) ** 2
    two_nearest = np.sqrt(np.partition(squared, 1, axis=-1)[..., :2])
    edge = np.asarray(Image.fromarray(two_nearest[..., 1] - two_nearest[..., 0], mode="F")
                      .resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
    nearest = squared.argmin(axis=-1).astype(np.uint8)
    cells = np.asarray(Image.fromarray(nearest).resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST))
    tones = rng.uniform(0.3, 0.8, size=n_cells).astype(np.float32)
    t = tones[cells] + 0.25 * (_fractal(rng) - 0.5) + 0.08 * rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE))
    mortar = np.clip(edge / 2.5, 0.0, 1.0)  # 0 on the cell borders
    t = t * (0.35 + 0.65 * mortar)
    return _paint(t, (60, 58, 56), (185, 180, 172))


def _sky(rng: np.random.Generator) -> np.ndarray:
    # A blue gradient, lighter towards the horizon, with soft clouds.
    y, _ = _grid()
    blue = _paint(y / IMAGE_SIZE * rng.uniform(0.6, 1.0), (40, 110, 200), (170, 210, 245))
    clouds = np.clip((_fractal(rng, (2, 4, 8, 16)) - rng.uniform(0.45, 0.6)) * 3.0, 0.0, 1.0)[..., None]
    return blue * (1 - clouds) + 248.0 * clouds


def _tiles(rng: np.random.Generator) -> np.ndarray:
    # Square tiles of one glaze, each a little lighter or darker, with grout lines between them.
    y, x = _grid()
    tile = rng.uniform(28, 52)
    rows, cols = np.floor(y / tile).astype(int), np.floor(x / tile).astype(int)
    tones = rng.uniform(-0.1, 0.1, size=(rows.max() + 1, cols.max() + 1)).astype(np.float32)
    t = 0.7 + tones[rows, cols] + 0.05 * (_fractal(rng, (4, 8)) - 0.5)
    grout = ((y % tile) < 2.0) | ((x % tile) < 2.0)
    dark = tuple(int(v) for v in rng.integers(40, 120, 3))
    light = tuple(int(v) for v in rng.integers(170, 250, 3))
    return np.where(grout[..., None], 90.0, _paint(t, dark, light))


def _plain(rng: np.random.Generator) -> np.ndarray:
    # One flat color with a slight gradient and grain: a studio backdrop.
    y, x = _grid()
    angle = rng.uniform(0, 2 * np.pi)
    t = 0.5 + 0.25 * ((x * math.cos(angle) + y * math.sin(angle)) / IMAGE_SIZE - 0.5) \
        + 0.02 * rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE))
    base = rng.integers(60, 230, 3).astype(np.float32)
    return _paint(t, tuple(base * 0.8), tuple(np.minimum(base * 1.15, 255)))


_TEXTURES = {"grass": _grass, "sand": _sand, "water": _water, "snow": _snow, "wood": _wood, "stone": _stone,
             "sky": _sky, "tiles": _tiles, "plain": _plain}


def render_background(name: str, rng: np.random.Generator) -> np.ndarray:
    """A procedural texture: (256, 256, 3) float32 RGB in [0, 255]."""
    if name not in _TEXTURES:
        raise ValueError(f"unknown background {name!r}; known: {', '.join(_TEXTURES)}")
    return _TEXTURES[name](rng)


# ----------------------------------------------------------------------------------------------
# Shapes


def _regular(n: int, radius: float = 1.0, start: float = 90.0) -> list[tuple[float, float]]:
    return [(radius * math.cos(math.radians(start + 360 * k / n)), -radius * math.sin(math.radians(start + 360 * k / n)))
            for k in range(n)]


def _outline(shape: str) -> np.ndarray:
    """The shape's polygon in unit coordinates (y down), centered near the origin: (P, 2) [x, y]."""
    if shape == "circle":
        points = _regular(96)
    elif shape == "square":
        points = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif shape == "triangle":
        points = _regular(3)
    elif shape == "star":
        outer, inner = _regular(5), _regular(5, 0.42, 90 + 36)
        points = [p for pair in zip(outer, inner, strict=True) for p in pair]
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 80, endpoint=False)
        points = list(zip(16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)),
                          strict=True))
    elif shape == "cross":
        a = 0.34
        points = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a),
                  (-a, -a)]
    elif shape == "diamond":
        points = [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)]
    elif shape == "hexagon":
        points = _regular(6, start=0.0)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return np.asarray(points, dtype=np.float64)


def _shape_polygon(shape: str, extent: float, degrees: float) -> np.ndarray:
    """The rotated shape scaled so that the larger side of its box is ``extent`` px, box at the origin."""
    points = _outline(shape)
    angle = math.radians(degrees)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    points = points @ rotation.T
    points -= points.min(axis=0)
    return points * (extent / points.max())


def _shape_mask(polygon: np.ndarray, left: float, top: float) -> tuple[np.ndarray, int, int]:
    """Anti-aliased coverage of ``polygon`` placed at (left, top): (h, w) float32 in [0, 1] and its
    integer pixel origin (x, y)."""
    x0, y0 = math.floor(left), math.floor(top)
    width = math.ceil(left + polygon[:, 0].max()) - x0 + 1
    height = math.ceil(top + polygon[:, 1].max()) - y0 + 1
    canvas = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    shifted = (polygon + [left - x0, top - y0]) * SUPERSAMPLE
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in shifted], fill=255)
    return np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0, x0, y0


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection of two boxes as a fraction of the smaller one's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def random_scene(rng: np.random.Generator) -> Scene:
    """Draw and render one scene: background, 1-3 objects with distinct (color, shape), ground truth.

    Deterministic for the generator's state. Boxes are ``(x0, y0, x1, y1)`` pixel bounds of the
    drawn shape (x1, y1 exclusive), within the 256x256 image.
    """
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    canvas = render_background(background, rng)
    colors = [c for c in COLORS if c not in HIDDEN_COLORS.get(background, ())]
    while True:  # rarely more than once: only when big objects do not fit together
        placed = _place_objects(rng, colors, n_objects=int(rng.integers(1, 4)))
        if placed is not None:
            break
    objects = []
    for color, shape, size, polygon, left, top in placed:
        mask, x0, y0 = _shape_mask(polygon, left, top)
        # Jitter brightness as a whole and each channel a little, so white stays white, not pink.
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1) + rng.integers(-CHANNEL_JITTER, CHANNEL_JITTER + 1, 3)
        rgb = np.clip(np.asarray(COLORS[color]) + jitter, 0, 255)
        region = canvas[y0: y0 + mask.shape[0], x0: x0 + mask.shape[1]]
        alpha = mask[: region.shape[0], : region.shape[1], None]
        region[...] = region * (1 - alpha) + rgb.astype(np.float32) * alpha
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        bbox = (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)
        objects.append(SceneObject(color=color, shape=shape, size=size, bbox=bbox))
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mode="RGB")
    return Scene(image=image, background=background, objects=objects)


def _place_objects(rng: np.random.Generator, colors: list[str], n_objects: int) -> list[tuple] | None:
    placed: list[tuple] = []
    boxes: list[tuple[float, float, float, float]] = []
    used = set()
    for _ in range(n_objects):
        while True:
            color, shape = colors[rng.integers(len(colors))], SHAPES[rng.integers(len(SHAPES))]
            if (color, shape) not in used:
                used.add((color, shape))
                break
        size = "small" if rng.random() < 0.5 else "big"
        extent = rng.uniform(*SIZES[size]) * IMAGE_SIZE
        polygon = _shape_polygon(shape, extent, rng.uniform(-1, 1) * MAX_ROTATION[shape])
        width, height = polygon.max(axis=0)
        for _ in range(_PLACEMENT_TRIES):
            left = rng.uniform(2, IMAGE_SIZE - 2 - width)
            top = rng.uniform(2, IMAGE_SIZE - 2 - height)
            box = (left, top, left + width, top + height)
            if all(_overlap(box, other) <= MAX_OVERLAP for other in boxes):
                break
        else:
            return None
        boxes.append(box)
        placed.append((color, shape, size, polygon, left, top))
    return placed


# ----------------------------------------------------------------------------------------------
# Captions

# Frames for the object list; "{objects}" is replaced by the spoken list of objects.
FRAMES = (
    "{objects}",
    "there is {objects}",
    "i see {objects}",
    "i can see {objects}",
    "you can see {objects}",
    "this picture shows {objects}",
    "this image has {objects}",
    "a picture of {objects}",
    "a photo of {objects}",
    "look at {objects}",
    "here we have {objects}",
    "we are looking at {objects}",
    "the image contains {objects}",
    "in this picture there is {objects}",
)
# Frames that relate the first object to the others (used when there are two or three).
RELATION_FRAMES = (
    "{first} next to {rest}",
    "there is {first} next to {rest}",
    "i see {first} beside {rest}",
    "{first} and close to it {rest}",
)
PLACES = {
    "grass": ("on the grass", "in the grass"),
    "sand": ("on the sand", "in the sand"),
    "water": ("in the water", "on the water"),
    "snow": ("in the snow", "on the snow"),
    "wood": ("on the wood", "on wood"),
    "stone": ("on the stone", "on stone"),
}
MENTION_SIZE = 0.5
MENTION_BACKGROUND = 0.5


def _object_phrase(obj: SceneObject, with_size: bool) -> str:
    words = [obj.size, obj.color, obj.shape] if with_size else [obj.color, obj.shape]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def _spoken_list(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe_scene(scene: Scene, rng: np.random.Generator) -> str:
    """A caption to speak for ``scene``: lowercase, naming every object exactly once (color and shape,
    its size about half the time), in random order, in one of many sentence frames, and the
    background about half the time. Commas mark the pauses of a spoken list; they are not words.
    """
    order = rng.permutation(len(scene.objects))
    phrases = [_object_phrase(scene.objects[i], rng.random() < MENTION_SIZE) for i in order]
    if len(phrases) > 1 and rng.random() < 0.25:
        frame = RELATION_FRAMES[rng.integers(len(RELATION_FRAMES))]
        text = frame.format(first=phrases[0], rest=_spoken_list(phrases[1:]))
    else:
        text = FRAMES[rng.integers(len(FRAMES))].format(objects=_spoken_list(phrases))
    if rng.random() < MENTION_BACKGROUND:
        places = PLACES[scene.background]
        place = places[rng.integers(len(places))]
        if rng.random() < 0.3:
            text = f"{place} {text}" if text.startswith(("there", "i ", "you", "we")) else f"{text} {place}"
        elif rng.random() < 0.3:
            text = f"{text} with a {scene.background} background"
        else:
            text = f"{text} {place}"
    return text
