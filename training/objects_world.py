"""The objects world: scenes of 1-4 everyday things drawn by people (emoji) and the geometric shapes,
and several people-like captions per scene.

``random_object_scene(rng)`` draws and renders one 256x256 scene with its ground truth (each
object's category, code point, size and pixel box); ``describe_object_scene(scene, rng)`` writes
one caption and says which of its words name which object. Both are pure functions of the random
generator's state, like ``training.scenes`` (the shapes world, unchanged).

What keeps a model from keying on exact glyphs: sizes from 14 % to 55 % of the image width,
rotation up to MAX_ROTATION degrees, mirroring, partial overlap (up to MAX_OVERLAP of the smaller
box), nine backgrounds, and photometric jitter of the whole image (brightness, contrast, blur, JPEG).
Captions: many frames, sizes, counts ("two dogs"), positions ("a pizza on the left"), relations
("a cat next to a car", "a kite above a tree") and the background.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from training.emoji import glyph
from training.manifest import SceneObject
from training.scenes import (
    BACKGROUNDS,
    COLORS,
    FRAMES,
    HIDDEN_COLORS,
    IMAGE_SIZE,
    PLACES,
    Scene,
    _overlap,
    _shape_mask,
    _shape_polygon,
    render_background,
)
from training.vocabulary import SHAPE_GROUP, Category, load_vocabulary

OBJECT_BACKGROUNDS = (*BACKGROUNDS, "sky", "tiles", "plain")
EXTENT = (0.14, 0.55)  # an object's larger side, as a fraction of the image width
SIZE_WORDS = {"small": 0.25, "big": 0.40}  # below / above these extents an object may be called small / big
MAX_ROTATION = 15.0  # degrees
MIRROR = 0.5
MAX_OVERLAP = 0.30  # of the smaller box's area
COUNT = 0.2  # chance that a scene of 2+ objects repeats one category ("two dogs")
_PLACEMENT_TRIES = 60
# Photometric jitter of the whole image.
BRIGHTNESS, CONTRAST = (0.8, 1.2), (0.75, 1.25)
BLUR, BLUR_RADIUS = 0.3, (0.3, 1.2)
JPEG, JPEG_QUALITY = 0.3, (30, 90)

OBJECT_PLACES = {**PLACES, "sky": ("in the sky", "against the sky"), "tiles": ("on the tiles", "on tiles"),
                 "plain": ("on a plain background", "on a plain backdrop")}
MORE_FRAMES = (
    "there are {objects}",
    "a drawing of {objects}",
    "it shows {objects}",
    "an image with {objects}",
    "in this one i can see {objects}",
    "so there is {objects} here",
    "um {objects}",
    "okay so {objects}",
    "we have got {objects}",
    "my picture has {objects}",
)
OBJECT_FRAMES = FRAMES + MORE_FRAMES
SINGULAR_FRAMES = tuple(f for f in OBJECT_FRAMES if not f.startswith("there are"))
NUMBERS = {2: "two", 3: "three"}
# Plurals that adding s or es gets wrong.
IRREGULAR_PLURALS = {"mouse": "mice", "knife": "knives", "sheep": "sheep", "fish": "fish", "deer": "deer",
                     "moose": "moose", "bison": "bison", "goose": "geese", "tomato": "tomatoes",
                     "potato": "potatoes", "mango": "mangoes", "volcano": "volcanoes", "bus": "buses",
                     "leaf": "leaves", "cactus": "cacti", "hippopotamus": "hippos", "octopus": "octopuses"}


@dataclass(frozen=True)
class Caption:
    """A caption to speak and, for each object of its scene, the span of words naming it alone."""

    text: str
    mentions: tuple[tuple[int, int] | None, ...]


def plural_only(name: str) -> bool:
    """Names that are already plural ("skis", "glasses", "french fries"): no article, never counted."""
    return name.endswith("s") and not name.endswith(("ss", "us")) and name.split()[-1] not in IRREGULAR_PLURALS


def plural(name: str) -> str | None:
    """The plural of a spoken name ("two dogs"), or None when the name should not be counted."""
    if plural_only(name) or " with " in name:
        return None
    *head, last = name.split()
    if last in IRREGULAR_PLURALS:
        last = IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "ch", "sh", "x", "z")):
        last += "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join([*head, last])


# ----------------------------------------------------------------------------------------------
# Scenes


def _sprite(category: Category, extent: float, rng: np.random.Generator, colors: list[str]) -> tuple[Image.Image, str | None]:
    """The object as an RGBA image whose larger side is about ``extent`` px, rotated and maybe mirrored;
    and its color (shapes only)."""
    degrees = float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    if category.group == SHAPE_GROUP:
        color = colors[rng.integers(len(colors))]
        mask, _, _ = _shape_mask(_shape_polygon(category.name, extent, degrees), 0.0, 0.0)
        rgba = np.zeros((*mask.shape, 4), np.uint8)
        rgba[..., :3] = COLORS[color]
        rgba[..., 3] = np.rint(mask * 255).astype(np.uint8)
        return Image.fromarray(rgba, mode="RGBA"), color
    image = glyph(category.codepoint)
    scale = extent / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    if rng.random() < MIRROR:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = image.rotate(degrees, resample=Image.BICUBIC, expand=True)
    return image.crop(image.getchannel("A").getbbox()), None


def _categories(rng: np.random.Generator, vocabulary: Sequence[Category], n: int) -> list[Category]:
    """n categories for one scene: distinct, except that one countable category may repeat 2-3 times."""
    chosen = [vocabulary[i] for i in rng.choice(len(vocabulary), size=n, replace=False)]
    if n >= 2 and rng.random() < COUNT and plural(chosen[0].name):
        copies = int(rng.integers(2, min(3, n) + 1))
        chosen[1:copies] = [chosen[0]] * (copies - 1)
    return chosen


def random_object_scene(rng: np.random.Generator, *, objects: tuple[int, int] = (1, 4),
                        vocabulary: Sequence[Category] | None = None) -> Scene:
    """Draw and render one objects-world scene: background, ``objects`` (min, max) things, ground truth.

    vocabulary: the categories to draw from (default: all of ``load_vocabulary()``). Boxes are the
    ``(x0, y0, x1, y1)`` pixel bounds of each drawn object (x1, y1 exclusive), occluded parts included.
    """
    vocabulary = load_vocabulary() if vocabulary is None else vocabulary
    background = OBJECT_BACKGROUNDS[rng.integers(len(OBJECT_BACKGROUNDS))]
    canvas = render_background(background, rng)
    colors = [c for c in COLORS if c not in HIDDEN_COLORS.get(background, ())]
    n = int(rng.integers(objects[0], objects[1] + 1))
    categories = _categories(rng, vocabulary, n)
    shrink = 1.0 if n <= 2 else 0.8  # crowded scenes draw smaller things
    scene_objects: list[SceneObject] = []
    boxes: list[tuple[float, float, float, float]] = []
    for category in categories:
        extent = rng.uniform(*EXTENT) * IMAGE_SIZE * shrink
        for _ in range(_PLACEMENT_TRIES):
            sprite, color = _sprite(category, extent, rng, colors)
            left = int(rng.integers(0, IMAGE_SIZE - sprite.width + 1))
            top = int(rng.integers(0, IMAGE_SIZE - sprite.height + 1))
            box = (left, top, left + sprite.width, top + sprite.height)
            if all(_overlap(box, other) <= MAX_OVERLAP for other in boxes):
                break
            extent = max(0.9 * extent, 0.1 * IMAGE_SIZE)  # no room: try smaller
        boxes.append(box)
        rgba = np.asarray(sprite, dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0
        region = canvas[top: top + sprite.height, left: left + sprite.width]
        region[...] = region * (1 - alpha) + rgba[..., :3] * alpha
        fraction = max(sprite.size) / IMAGE_SIZE
        size = "small" if fraction < SIZE_WORDS["small"] else "big" if fraction > SIZE_WORDS["big"] else "medium"
        scene_objects.append(SceneObject(color=color, shape=category.name if color else None, size=size, bbox=box,
                                         category=category.name, codepoint=category.codepoint))
    return Scene(image=_photometric(canvas, rng), background=background, objects=scene_objects)


def _photometric(canvas: np.ndarray, rng: np.random.Generator) -> Image.Image:
    mean = canvas.mean()
    canvas = (canvas - mean) * rng.uniform(*CONTRAST) + mean * rng.uniform(*BRIGHTNESS)
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mode="RGB")
    if rng.random() < BLUR:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(*BLUR_RADIUS))))
    if rng.random() < JPEG:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(*JPEG_QUALITY)))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


# ----------------------------------------------------------------------------------------------
# Captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" and not word.startswith(("uni", "use", "eu", "one")) else "a"


def _position(box: tuple[int, int, int, int]) -> str | None:
    """Where a box lies, when that is clear: "on the left", "at the top", ..."""
    cx, cy = (box[0] + box[2]) / 2 / IMAGE_SIZE, (box[1] + box[3]) / 2 / IMAGE_SIZE
    options = [p for p, ok in (("on the left", cx < 0.35), ("on the right", cx > 0.65),
                               ("at the top", cy < 0.3), ("at the bottom", cy > 0.7)) if ok]
    return options[0] if len(options) == 1 else None


def _phrase(scene: Scene, members: list[int], rng: np.random.Generator) -> tuple[list[str], tuple[int, int] | None]:
    """Words naming one object (or a counted group of same-category objects) and the span of the
    name within them (None for a counted group)."""
    obj = scene.objects[members[0]]
    name = obj.category.split() if obj.color is None else [obj.color, *obj.category.split()]
    if len(members) > 1:
        return [NUMBERS[len(members)], *plural(" ".join(name)).split()], None
    words = list(name)
    if obj.size in SIZE_WORDS and rng.random() < 0.35:
        words.insert(0, obj.size)
    if not plural_only(obj.category):  # "skis", "glasses": no article
        words.insert(0, _article(words[0]))
    span = (len(words) - len(name), len(words) - 1)
    position = _position(obj.bbox) if rng.random() < 0.2 else None
    return words + (position.split() if position else []), span


def _vertical(scene: Scene, upper: int, lower: int) -> bool:
    a, b = scene.objects[upper].bbox, scene.objects[lower].bbox
    return a[3] <= (b[1] + b[3]) / 2 and (a[1] + a[3]) / 2 <= b[1]


def describe_object_scene(scene: Scene, rng: np.random.Generator) -> Caption:
    """One caption for ``scene``, as a person might say it: its things in random order (one may be
    left out when there are three or more kinds), counts for repeated things, sometimes sizes,
    positions, a relation between two things and the background. Commas mark list pauses."""
    groups: dict[str, list[int]] = {}
    for i, obj in enumerate(scene.objects):
        groups.setdefault(obj.category, []).append(i)
    members = [groups[key] for key in rng.permutation(list(groups))]
    if len(members) >= 3 and rng.random() < 0.2:
        members = members[:-1]
    phrases = [_phrase(scene, group, rng) for group in members]

    relation = None
    if len(phrases) >= 2 and rng.random() < 0.3:
        first, second = members[0][0], members[1][0]
        options = ["next to", "beside", "and"]
        if len(members[0]) == len(members[1]) == 1 and _vertical(scene, first, second):
            options += ["above"] * 2
        if len(members[0]) == len(members[1]) == 1 and _vertical(scene, second, first):
            options += ["below"] * 2
        relation = options[rng.integers(len(options))]
    frames = OBJECT_FRAMES if len(scene.objects) > 1 else SINGULAR_FRAMES
    frame = frames[rng.integers(len(frames))]
    prefix, suffix = (part.split() for part in frame.split("{objects}"))
    words, spans = list(prefix), {}
    for k, (group, (phrase, span)) in enumerate(zip(members, phrases, strict=True)):
        if k > 0:
            if k == 1 and relation:
                words += relation.split()
            elif k == len(phrases) - 1:
                words.append("and")
            else:
                words[-1] += ","
        if span is not None:
            spans[group[0]] = (span[0] + len(words), span[1] + len(words))
        words += phrase
    words += suffix
    if rng.random() < 0.4:
        places = OBJECT_PLACES[scene.background]
        words += places[rng.integers(len(places))].split()
    return Caption(" ".join(words), tuple(spans.get(i) for i in range(len(scene.objects))))


def with_mentions(objects: Sequence[SceneObject], caption: Caption) -> list[SceneObject]:
    """The scene's objects with the caption's mention spans filled in."""
    return [SceneObject(o.color, o.shape, o.size, o.bbox, category=o.category, codepoint=o.codepoint, mention=m)
            for o, m in zip(objects, caption.mentions, strict=True)]
