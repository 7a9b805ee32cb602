"""A procedural, seeded synthetic world for training and evaluating the tiny DynaIP default (numpy only).

Subjects are flat 2-D objects: a **shape** x a **colour** x a **pattern** (4 x 6 x 3 = 72 subjects), so telling two
subjects apart needs more than their colour. Twelve of them are held out of training (:data:`HELDOUT`): every
shape, colour and pattern also occurs in training, only the combination is new, so the held-out subjects test
zero-shot personalization.

A :class:`Scene` puts one to three subjects into a **setting** (forest, beach, snow, night) at **positions** (left,
middle, right). Everything random about a scene (sizes, jitter, background texture) is drawn once by
:meth:`World.sample_scene` and stored in the scene, so :meth:`World.render` is a pure function of the scene:
the same scene always gives the same pixels and the same per-subject masks.

Prompts name the subjects **generically** (:meth:`World.prompt`: "an object on the left in a forest", "two objects
in the snow"), never their colour, shape or pattern: the identity of a subject comes from its reference image only,
so a model sampled with adapter scale 0 cannot know it (a fair baseline). :meth:`World.describe` gives the
attribute-naming caption of a scene ("a red striped circle on the left in a forest") for labels and tokenizer
vocabularies.

References (:meth:`World.reference`) show one subject alone, augmented: scale, position, rotation and background
(:class:`ReferenceAugment` holds the ranges).

Images are ``uint8 [H, W, 3]`` arrays (``PIL.Image.fromarray`` turns them into images); masks are float32 coverage
``[S, H, W]`` in [0, 1] (the fraction of each pixel the subject covers, from 4x4 supersampling).

Example::

    world = World(size=32)
    rng = np.random.default_rng(0)
    scene = world.sample_scene(rng, num_subjects=2, split="heldout")
    image, masks = world.render(scene)                       # [32, 32, 3] uint8, [2, 32, 32] float32
    prompt = world.prompt(scene)                             # "two objects on a beach"
    refs = [world.reference(p.subject, rng) for p in scene.placements]   # [32, 32, 3] uint8 each
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import InputError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "yellow": (235, 200, 20),
    "green": (30, 170, 50),
    "cyan": (20, 190, 210),
    "blue": (35, 60, 210),
    "magenta": (200, 40, 190),
}
PATTERNS: tuple[str, ...] = ("solid", "striped", "outlined")
SETTINGS: dict[str, str] = {"forest": "in a forest", "beach": "on a beach", "snow": "in the snow", "night": "at night"}
POSITIONS: dict[str, str] = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
NUMBER_WORDS: dict[int, str] = {1: "an", 2: "two", 3: "three"}
GENERIC_NOUN = "object"

MAX_SUBJECTS = 3
SUPERSAMPLE = 4
WHITE = np.array([248.0, 248.0, 248.0])
STRIPE_TINT = 0.7  # striped: every other band is the colour mixed this much with white
OUTLINE_WIDTH = 0.25  # outlined: border width in the shape's unit coordinates (the shape spans [-1, 1])
STRIPE_BANDS = 5
EXTENT = 1.6  # every shape lies within this radius of its centre, in its unit coordinates

# Layouts per number of subjects in a scene: the horizontal centre of each position (fraction of the width), the
# subject size range (fraction of the side) and the placement jitter (fraction of the side, each axis). Chosen so
# that subjects never touch each other or the border (every shape lies within x, y in [-1.05, 1.05]).
LAYOUTS: dict[int, dict[str, float]] = {
    1: {"left": 0.3, "middle": 0.5, "right": 0.7},
    2: {"left": 0.26, "right": 0.74},
    3: {"left": 0.18, "middle": 0.5, "right": 0.82},
}
SIZES: dict[int, tuple[float, float]] = {1: (0.42, 0.5), 2: (0.36, 0.42), 3: (0.24, 0.27)}
JITTER: dict[int, float] = {1: 0.03, 2: 0.02, 3: 0.01}
CENTRE_Y = 0.55


@dataclass(frozen=True)
class Subject:
    """One subject of the world: a shape, a colour and a pattern (names from :data:`SHAPES`, :data:`COLOURS`,
    :data:`PATTERNS`). ``index`` is its position in :attr:`World.subjects` (0..71)."""

    index: int
    shape: str
    colour: str
    pattern: str

    @property
    def name(self) -> str:
        """The attribute-naming description, e.g. ``"red striped circle"`` (``"solid"`` is said too)."""
        return f"{self.colour} {self.pattern} {self.shape}"

    @property
    def labels(self) -> tuple[int, int, int]:
        """Attribute class indices ``(shape, colour, pattern)`` into :data:`SHAPES`, :data:`COLOURS`, :data:`PATTERNS`."""
        return SHAPES.index(self.shape), list(COLOURS).index(self.colour), PATTERNS.index(self.pattern)


def _all_subjects() -> tuple[Subject, ...]:
    combos = [(s, c, p) for s in SHAPES for c in COLOURS for p in PATTERNS]
    return tuple(Subject(i, s, c, p) for i, (s, c, p) in enumerate(combos))


def _heldout(subjects: Sequence[Subject]) -> frozenset[int]:
    """One colour per (shape, pattern) pair: colour index == (shape + 2 * pattern) mod 6. Gives 12 held-out subjects:
    each shape 3 times, each pattern 4 times, each colour twice; every attribute value stays in training."""
    out = set()
    for sub in subjects:
        s, c, p = sub.labels
        if c == (s + 2 * p) % len(COLOURS):
            out.add(sub.index)
    return frozenset(out)


SUBJECTS: tuple[Subject, ...] = _all_subjects()
HELDOUT: frozenset[int] = _heldout(SUBJECTS)


@dataclass(frozen=True)
class Placement:
    """One subject placed in a scene. ``cx``, ``cy``: centre in pixels; ``size``: the shape's side in pixels (its
    unit square [-1, 1]^2 maps to ``size x size`` pixels); ``rotation``: degrees, counter-clockwise."""

    subject: Subject
    position: str
    cx: float
    cy: float
    size: float
    rotation: float = 0.0


@dataclass(frozen=True)
class Scene:
    """A complete description of one image: everything :meth:`World.render` needs, nothing random left.

    ``placements`` are in the order of the subjects' references (subject 0 is the first reference);
    ``texture_seed`` seeds the background's texture.
    """

    setting: str
    placements: tuple[Placement, ...]
    texture_seed: int

    @property
    def subjects(self) -> tuple[Subject, ...]:
        return tuple(p.subject for p in self.placements)

    @property
    def positions(self) -> tuple[str, ...]:
        return tuple(p.position for p in self.placements)


@dataclass(frozen=True)
class ReferenceAugment:
    """Ranges of the reference-image augmentation (sampled uniformly).

    ``scale``: subject size as a fraction of the reference side; ``shift``: centre offset from the middle, fraction
    of the side, each axis; ``rotation``: degrees; background: a flat colour, a vertical gradient or a noise
    texture, each of low saturation (at most ``background_saturation``) so the subject's colour stays its own.
    """

    scale: tuple[float, float] = (0.5, 0.8)
    shift: float = 0.1
    rotation: float = 25.0
    background_saturation: float = 0.25
    background_kinds: tuple[str, ...] = ("flat", "gradient", "noise")


@dataclass(frozen=True)
class ReferenceView:
    """The drawn augmentation of one reference image (what :meth:`World.reference` rendered)."""

    subject: Subject
    cx: float
    cy: float
    size: float
    rotation: float
    background: str
    background_colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    texture_seed: int


# ------------------------------------------------------------------------------------------------ shape geometry
def _sdf(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) of ``shape`` in unit coordinates (``x`` right, ``y`` down; the shape spans
    about [-1, 1]^2). Formulas after Inigo Quilez's 2-D distance functions."""
    if shape == "circle":
        return np.hypot(x, y) - 0.95
    if shape == "square":
        dx, dy = np.abs(x) - 0.8, np.abs(y) - 0.8
        return np.hypot(np.maximum(dx, 0), np.maximum(dy, 0)) + np.minimum(np.maximum(dx, dy), 0)
    if shape == "triangle":  # equilateral (side 2.1), pointing up, bounding box centred
        r, k = 1.05, math.sqrt(3.0)
        px, py = np.abs(x) - r, -y + r / (2 * k) + r / k  # y up; the bounding box centred on the origin
        flip = px + k * py > 0
        px, py = np.where(flip, (px - k * py) / 2, px), np.where(flip, (-k * px - py) / 2, py)
        px = px - np.clip(px, -2 * r, 0)
        return -np.hypot(px, py) * np.sign(py)
    if shape == "cross":  # plus sign: arms of half-length 0.95 and half-width 0.4
        bx, by = 0.95, 0.4
        ax, ay = np.abs(x), np.abs(y)
        px, py = np.maximum(ax, ay), np.minimum(ax, ay)
        qx, qy = px - bx, py - by
        k = np.maximum(qx, qy)
        wx, wy = np.where(k > 0, qx, by - px), np.where(k > 0, qy, -k)
        return np.sign(k) * np.hypot(np.maximum(wx, 0), np.maximum(wy, 0))
    raise InputError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _subject_layer(subject: Subject, cx: float, cy: float, size: float, rotation: float, height: int, width: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Colour ``[H, W, 3]`` float and coverage ``[H, W]`` in [0, 1] of one subject (4x4 supersampled)."""
    ss = SUPERSAMPLE
    # only the pixels of the subject's bounding box (every shape lies within EXTENT half-sizes of its centre)
    reach = EXTENT * size / 2
    x0, x1 = max(0, math.floor(cx - reach)), min(width, math.ceil(cx + reach))
    y0, y1 = max(0, math.floor(cy - reach)), min(height, math.ceil(cy + reach))
    colour_full, cover_full = np.zeros((height, width, 3)), np.zeros((height, width))
    if x0 >= x1 or y0 >= y1:
        return colour_full, cover_full
    h, w = y1 - y0, x1 - x0
    ys = y0 + (np.arange(h * ss) + 0.5) / ss
    xs = x0 + (np.arange(w * ss) + 0.5) / ss
    gx, gy = np.meshgrid(xs - cx, ys - cy)
    a = math.radians(rotation)
    half = size / 2
    # rotate the pixel grid by -rotation into the subject's frame (counter-clockwise on screen, y pointing down)
    u = (math.cos(a) * gx - math.sin(a) * gy) / half
    v = (math.sin(a) * gx + math.cos(a) * gy) / half
    d = _sdf(subject.shape, u, v)
    inside = d < 0
    base = np.array(COLOURS[subject.colour], dtype=np.float64)
    colour = np.broadcast_to(base, (*d.shape, 3)).copy()
    if subject.pattern == "striped":
        band = np.floor((v + 1.0) * STRIPE_BANDS / 2.0).astype(np.int64) % 2 == 1
        colour[band] = base * (1 - STRIPE_TINT) + WHITE * STRIPE_TINT
    elif subject.pattern == "outlined":
        colour[d < -OUTLINE_WIDTH] = WHITE
    colour *= inside[..., None]
    cover = inside.reshape(h, ss, w, ss).mean(axis=(1, 3))
    summed = colour.reshape(h, ss, w, ss, 3).sum(axis=(1, 3)) / (ss * ss)
    # premultiplied: the mean colour over the covered sub-samples
    colour_full[y0:y1, x0:x1] = np.where(cover[..., None] > 0, summed / np.maximum(cover[..., None], 1e-9), 0.0)
    cover_full[y0:y1, x0:x1] = cover
    return colour_full, cover_full


# ----------------------------------------------------------------------------------------------------- backgrounds
def _value_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1] ``[H, W]``: a ``cells x cells`` random grid, bilinearly upsampled."""
    grid = rng.random((cells + 1, cells + 1))
    ys = np.linspace(0, cells, height)
    xs = np.linspace(0, cells, width)
    y0 = np.minimum(ys.astype(int), cells - 1)
    x0 = np.minimum(xs.astype(int), cells - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
    g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fx) + g01 * fx) * (1 - fy) + (g10 * (1 - fx) + g11 * fx) * fy


def _setting_background(setting: str, height: int, width: int, seed: int) -> np.ndarray:
    """The background of a setting, ``[H, W, 3]`` float in 0..255 (textured, seeded)."""
    rng = np.random.default_rng(seed)
    yy = np.linspace(0.0, 1.0, height)[:, None, None]
    noise = _value_noise(rng, height, width, 4)[..., None]
    grain = rng.normal(0.0, 3.0, (height, width, 1))
    if setting == "forest":
        img = np.array([30.0, 62.0, 34.0]) + 30.0 * (noise - 0.5) * np.array([0.6, 1.0, 0.5])
        for _ in range(int(rng.integers(3, 6))):  # tree trunks
            x = rng.uniform(0, width)
            w = rng.uniform(0.04, 0.08) * width
            trunk = (np.abs(np.arange(width) - x) < w / 2)[None, :, None]
            img = np.where(trunk, np.array([78.0, 56.0, 34.0]), img)
    elif setting == "beach":
        horizon = rng.uniform(0.35, 0.45)
        sky = np.array([125.0, 190.0, 235.0]) + 25.0 * yy
        sand = np.array([225.0, 200.0, 148.0]) + 20.0 * (noise - 0.5)
        img = np.where(yy < horizon, sky, sand)
    elif setting == "snow":
        img = np.array([232.0, 236.0, 244.0]) - 22.0 * noise * np.array([1.0, 0.8, 0.4]) - 10.0 * (1 - yy)
    elif setting == "night":
        img = np.array([14.0, 18.0, 48.0]) + 14.0 * (1 - yy) * np.array([0.5, 0.5, 1.0]) + 8.0 * (noise - 0.5)
        img = np.broadcast_to(img, (height, width, 3)).copy()
        n_stars = int(rng.integers(4, 9))
        img[rng.integers(0, height, n_stars), rng.integers(0, width, n_stars)] = 235.0
    else:
        raise InputError(f"unknown setting {setting!r}; expected one of {tuple(SETTINGS)}")
    return np.clip(np.broadcast_to(img, (height, width, 3)) + grain, 0, 255)


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _reference_background(kind: str, colours: tuple[tuple[int, int, int], tuple[int, int, int]], size: int,
                          seed: int) -> np.ndarray:
    a, b = (np.array(c, dtype=np.float64) for c in colours)
    if kind == "flat":
        return np.broadcast_to(a, (size, size, 3)).copy()
    if kind == "gradient":
        t = np.linspace(0.0, 1.0, size)[:, None, None]
        return np.broadcast_to(a * (1 - t) + b * t, (size, size, 3)).copy()
    if kind == "noise":
        t = _value_noise(np.random.default_rng(seed), size, size, 5)[..., None]
        return a * (1 - t) + b * t
    raise InputError(f"unknown reference background {kind!r}")


# ----------------------------------------------------------------------------------------------------------- world
@dataclass(frozen=True)
class World:
    """The synthetic world at one image size.

    Args:
        size: side of scene images in pixels (square).
        reference_size: side of reference images in pixels.
        augment: reference augmentation ranges.
    """

    size: int = 32
    reference_size: int = 32
    augment: ReferenceAugment = field(default_factory=ReferenceAugment)

    # ------------------------------------------------------------------------------------------------ subjects
    @property
    def subjects(self) -> tuple[Subject, ...]:
        """All 72 subjects (shape-major, then colour, then pattern)."""
        return SUBJECTS

    def split(self, name: str) -> tuple[Subject, ...]:
        """Subjects of ``"train"`` (60), ``"heldout"`` (12) or ``"all"`` (72)."""
        if name == "all":
            return SUBJECTS
        if name == "train":
            return tuple(s for s in SUBJECTS if s.index not in HELDOUT)
        if name == "heldout":
            return tuple(s for s in SUBJECTS if s.index in HELDOUT)
        raise InputError(f"unknown split {name!r}; expected 'train', 'heldout' or 'all'")

    # -------------------------------------------------------------------------------------------------- scenes
    def sample_scene(self, rng: np.random.Generator, num_subjects: int = 1, split: str = "train",
                     subjects: Sequence[Subject] | None = None, setting: str | None = None,
                     positions: Sequence[str] | None = None) -> Scene:
        """Draw a scene: ``num_subjects`` distinct subjects of ``split`` (or the given ``subjects``), a random
        setting (or ``setting``) and positions (or ``positions``; one subject: left, middle or right; two: left
        and right; three: all three, in a random order), with random size and placement jitter."""
        if subjects is not None:
            num_subjects = len(subjects)
        if num_subjects not in LAYOUTS:
            raise InputError(f"num_subjects={num_subjects} must be 1..{MAX_SUBJECTS}")
        if subjects is None:
            pool = self.split(split)
            subjects = [pool[i] for i in rng.choice(len(pool), num_subjects, replace=False)]
        layout = LAYOUTS[num_subjects]
        if positions is None:
            names = list(layout)
            positions = [names[rng.integers(len(names))]] if num_subjects == 1 else \
                [names[i] for i in rng.permutation(len(names))]
        if len(positions) != num_subjects or any(p not in layout for p in positions) or \
                len(set(positions)) != num_subjects:
            raise InputError(f"positions {tuple(positions)} do not fit {num_subjects} subject(s): choose distinct "
                             f"ones of {tuple(layout)}")
        if setting is None:
            setting = list(SETTINGS)[rng.integers(len(SETTINGS))]
        if setting not in SETTINGS:
            raise InputError(f"unknown setting {setting!r}; expected one of {tuple(SETTINGS)}")
        lo, hi = SIZES[num_subjects]
        jitter = JITTER[num_subjects]
        s = self.size
        placements = tuple(
            Placement(subject=sub, position=pos, cx=(layout[pos] + rng.uniform(-jitter, jitter)) * s,
                      cy=(CENTRE_Y + rng.uniform(-jitter, jitter)) * s, size=rng.uniform(lo, hi) * s)
            for sub, pos in zip(subjects, positions)
        )
        return Scene(setting=setting, placements=placements, texture_seed=int(rng.integers(2**31)))

    def background(self, scene: Scene) -> np.ndarray:
        """The scene's background alone, ``uint8 [H, W, 3]``."""
        return _setting_background(scene.setting, self.size, self.size, scene.texture_seed).round().astype(np.uint8)

    def render(self, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
        """Scene -> (image ``uint8 [H, W, 3]``, coverage masks ``float32 [S, H, W]`` in [0, 1], one per placement).

        Subjects never overlap in the layouts used here; were they to, later placements would be drawn on top and
        the masks would still give each subject's own coverage."""
        s = self.size
        img = _setting_background(scene.setting, s, s, scene.texture_seed)
        masks = np.zeros((len(scene.placements), s, s), dtype=np.float32)
        for i, p in enumerate(scene.placements):
            colour, cover = _subject_layer(p.subject, p.cx, p.cy, p.size, p.rotation, s, s)
            img = img * (1 - cover[..., None]) + colour * cover[..., None]
            masks[i] = cover
        return np.clip(img, 0, 255).round().astype(np.uint8), masks

    def prompt(self, scene: Scene) -> str:
        """The generic prompt: names the number of subjects, their positions (one subject) and the setting, never
        an attribute. ``"an object on the left in a forest"``, ``"two objects on a beach"``."""
        n = len(scene.placements)
        where = SETTINGS[scene.setting]
        if n == 1:
            return f"{NUMBER_WORDS[1]} {GENERIC_NOUN} {POSITIONS[scene.positions[0]]} {where}"
        return f"{NUMBER_WORDS[n]} {GENERIC_NOUN}s {where}"

    def describe(self, scene: Scene) -> str:
        """The attribute-naming caption (labels, not prompts): ``"a red striped circle on the left and a blue solid
        square on the right in a forest"`` (placements from left to right)."""
        order = sorted(scene.placements, key=lambda p: p.cx)
        parts = [f"a {p.subject.name} {POSITIONS[p.position]}" for p in order]
        return f"{' and '.join(parts)} {SETTINGS[scene.setting]}"

    # ---------------------------------------------------------------------------------------------- references
    def sample_reference_view(self, subject: Subject, rng: np.random.Generator, augment: bool = True
                              ) -> ReferenceView:
        """Draw the augmentation of one reference of ``subject``; ``augment=False`` gives the canonical view
        (centred, upright, 0.65 of the side, on a flat light grey)."""
        r = self.reference_size
        if not augment:
            return ReferenceView(subject, r / 2, r / 2, 0.65 * r, 0.0, "flat", ((200, 200, 200),) * 2, 0)
        a = self.augment
        size = rng.uniform(*a.scale) * r
        cx, cy = (0.5 + rng.uniform(-a.shift, a.shift, 2)) * r
        rotation = rng.uniform(-a.rotation, a.rotation)
        kind = a.background_kinds[rng.integers(len(a.background_kinds))]
        colours = tuple(_hsv_to_rgb(rng.random(), rng.uniform(0, a.background_saturation), rng.uniform(0.15, 0.95))
                        for _ in range(2))
        return ReferenceView(subject, float(cx), float(cy), float(size), float(rotation), kind, colours,
                             int(rng.integers(2**31)))

    def render_reference(self, view: ReferenceView) -> np.ndarray:
        """A reference view -> ``uint8 [R, R, 3]``."""
        r = self.reference_size
        bg = _reference_background(view.background, view.background_colours, r, view.texture_seed)
        colour, cover = _subject_layer(view.subject, view.cx, view.cy, view.size, view.rotation, r, r)
        img = bg * (1 - cover[..., None]) + colour * cover[..., None]
        return np.clip(img, 0, 255).round().astype(np.uint8)

    def reference(self, subject: Subject, rng: np.random.Generator, augment: bool = True) -> np.ndarray:
        """One reference image of ``subject`` alone, ``uint8 [R, R, 3]`` (augmented unless ``augment=False``)."""
        return self.render_reference(self.sample_reference_view(subject, rng, augment))

    # ---------------------------------------------------------------------------------------------- vocabulary
    @staticmethod
    def vocabulary() -> list[str]:
        """Every word :meth:`prompt` and :meth:`describe` can produce (lower case, sorted)."""
        words = {GENERIC_NOUN, GENERIC_NOUN + "s", "a", "and", *SHAPES, *COLOURS, *PATTERNS, *NUMBER_WORDS.values()}
        for phrase in (*SETTINGS.values(), *POSITIONS.values()):
            words.update(phrase.split())
        return sorted(words)
