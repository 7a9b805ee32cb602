"""The synthetic world (``dynaip_trt.demo.world``): seeded determinism, the held-out split, masks that match the
rendered pixels, generic prompts, and the reference augmentation ranges."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest

from dynaip_trt.demo.world import (
    COLOURS,
    JITTER,
    LAYOUTS,
    PATTERNS,
    POSITIONS,
    SETTINGS,
    SHAPES,
    SIZES,
    Placement,
    Scene,
    World,
)
from dynaip_trt.errors import InputError

WORLD = World(size=32, reference_size=32)
# analytic area of each shape in its unit coordinates (a subject of side `size` covers AREA * (size / 2) ** 2 px)
AREA = {"circle": math.pi * 0.95**2, "square": 1.6**2, "triangle": math.sqrt(3) / 4 * 2.1**2,
        "cross": 2 * 1.9 * 0.8 - 0.8**2}


def _scenes(seed: int, count: int = 6) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [WORLD.sample_scene(rng, num_subjects=1 + i % 3) for i in range(count)]


def test_same_seed_same_scenes_images_masks_and_references():
    a, b = _scenes(7), _scenes(7)
    assert a == b
    for sa, sb in zip(a, b):
        ia, ma = WORLD.render(sa)
        ib, mb = WORLD.render(sb)
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb)
    sub = WORLD.subjects[5]
    ra = WORLD.reference(sub, np.random.default_rng(3))
    rb = WORLD.reference(sub, np.random.default_rng(3))
    assert np.array_equal(ra, rb)
    c = _scenes(8)
    assert c != a
    assert not np.array_equal(WORLD.render(a[0])[0], WORLD.render(c[0])[0])
    assert not np.array_equal(ra, WORLD.reference(sub, np.random.default_rng(4)))


def test_image_types_and_shapes():
    for scene in _scenes(0):
        img, masks = WORLD.render(scene)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert masks.shape == (len(scene.placements), 32, 32) and masks.dtype == np.float32
        assert masks.min() >= 0.0 and masks.max() <= 1.0
    big = World(size=64, reference_size=48)
    scene = big.sample_scene(np.random.default_rng(0), 2)
    assert big.render(scene)[0].shape == (64, 64, 3)
    assert big.reference(WORLD.subjects[0], np.random.default_rng(0)).shape == (48, 48, 3)


def test_subjects_and_heldout_split():
    subjects = WORLD.subjects
    assert len(subjects) == len(SHAPES) * len(COLOURS) * len(PATTERNS) >= 40
    assert len({(s.shape, s.colour, s.pattern) for s in subjects}) == len(subjects)
    assert [s.index for s in subjects] == list(range(len(subjects)))
    train, held = WORLD.split("train"), WORLD.split("heldout")
    assert len(held) == 12 and len(train) == len(subjects) - 12
    assert not {s.index for s in train} & {s.index for s in held}
    # every attribute value is seen in training and tested in the held-out split; only combinations are new
    for attr, values in (("shape", SHAPES), ("colour", COLOURS), ("pattern", PATTERNS)):
        assert {getattr(s, attr) for s in train} == set(values)
        counts = [sum(getattr(s, attr) == v for s in held) for v in values]
        assert min(counts) == max(counts) == 12 // len(values), (attr, counts)
    rng = np.random.default_rng(1)
    drawn = [p.subject for _ in range(200) for p in WORLD.sample_scene(rng, 3, split="heldout").placements]
    assert {s.index for s in drawn} == {s.index for s in held}
    drawn = [p.subject for _ in range(300) for p in WORLD.sample_scene(rng, 2, split="train").placements]
    assert {s.index for s in drawn} == {s.index for s in train}


def test_labels_round_trip():
    for s in WORLD.subjects:
        si, ci, pi = s.labels
        assert (SHAPES[si], list(COLOURS)[ci], PATTERNS[pi]) == (s.shape, s.colour, s.pattern)
        assert s.name == f"{s.colour} {s.pattern} {s.shape}"


def test_masks_match_rendered_pixels():
    rng = np.random.default_rng(2)
    for _ in range(300):
        scene = WORLD.sample_scene(rng, num_subjects=int(rng.integers(1, 4)))
        img, masks = WORLD.render(scene)
        bg = WORLD.background(scene).astype(np.int64)
        diff = np.abs(img.astype(np.int64) - bg).sum(-1)  # [H, W]
        untouched = masks.sum(0) == 0
        assert (diff[untouched] == 0).all(), "pixels no subject covers must be the background"
        for m, p in zip(masks, scene.placements):
            inside = m >= 0.5
            assert inside.sum() > 0.1 * p.size**2
            assert diff[inside].mean() > 20, "covered pixels must show the subject, not the background"
            ys, xs = np.nonzero(m > 0)  # the bounding box of the covered pixels is centred on the placement
            assert abs((xs.min() + xs.max() + 1) / 2 - p.cx) <= 0.5 and abs((ys.min() + ys.max() + 1) / 2 - p.cy) <= 0.5
        # subjects never touch each other or the border, and each mask has the pixels of its own subject's colour
        assert ((masks > 0).sum(0) <= 1).all()
        for m, p in zip(masks, scene.placements):  # nothing cut off at the border (every shape is within 1.05)
            reach = 1.05 * p.size / 2
            assert reach <= p.cx <= 32 - reach and reach <= p.cy <= 32 - reach
            assert m.sum() == pytest.approx(AREA[p.subject.shape] * (p.size / 2) ** 2, rel=0.08)
        for m, p in zip(masks, scene.placements):
            full = m == 1.0
            if p.subject.pattern == "solid" and full.any():
                assert (img[full] == np.array(COLOURS[p.subject.colour], dtype=np.uint8)).all()


def test_mask_areas_follow_the_shapes():
    """Coverage sums to the analytic area of each shape (circle, square, equilateral triangle, plus sign)."""
    size = 20.0
    for shape in SHAPES:
        sub = next(s for s in WORLD.subjects if s.shape == shape and s.pattern == "solid")
        scene = Scene("snow", (Placement(sub, "middle", 16.0, 16.0, size),), texture_seed=0)
        _, masks = WORLD.render(scene)
        assert masks.sum() == pytest.approx(AREA[shape] * (size / 2) ** 2, rel=0.03), shape


def test_attributes_change_what_they_should():
    """Shape changes the mask; colour and pattern change the pixels inside the same mask."""
    def render(shape: str, colour: str, pattern: str) -> tuple[np.ndarray, np.ndarray]:
        sub = next(s for s in WORLD.subjects if (s.shape, s.colour, s.pattern) == (shape, colour, pattern))
        img, masks = WORLD.render(Scene("night", (Placement(sub, "middle", 16.0, 16.0, 18.0),), texture_seed=1))
        return img.astype(np.int64), masks[0] >= 0.5

    ref_img, ref_mask = render("circle", "red", "solid")
    for shape in SHAPES[1:]:
        _, m = render(shape, "red", "solid")
        iou = (m & ref_mask).sum() / (m | ref_mask).sum()
        assert iou < 0.85, (shape, iou)
    for colour, pattern in (("blue", "solid"), ("red", "striped"), ("red", "outlined")):
        img, m = render("circle", colour, pattern)
        assert np.array_equal(m, ref_mask)
        assert np.abs(img - ref_img)[m].sum(-1).mean() > 40, (colour, pattern)


def test_generic_prompts_never_name_attributes():
    attribute_words = set(SHAPES) | set(COLOURS) | set(PATTERNS)
    vocab = set(WORLD.vocabulary())
    rng = np.random.default_rng(4)
    for _ in range(100):
        scene = WORLD.sample_scene(rng, num_subjects=int(rng.integers(1, 4)))
        prompt = WORLD.prompt(scene)
        words = set(prompt.split())
        assert not words & attribute_words, prompt
        assert words <= vocab and set(WORLD.describe(scene).split()) <= vocab
        assert SETTINGS[scene.setting] in prompt
        if len(scene.placements) == 1:
            assert POSITIONS[scene.positions[0]] in prompt
        for p in scene.placements:
            assert p.subject.name in WORLD.describe(scene)
    one = Scene("forest", (Placement(WORLD.subjects[0], "left", 9.0, 17.0, 16.0),), 0)
    assert WORLD.prompt(one) == "an object on the left in a forest"
    assert WORLD.describe(one) == "a red solid circle on the left in a forest"
    two = WORLD.sample_scene(rng, 2, setting="beach")
    assert WORLD.prompt(two) == "two objects on a beach"


def test_layouts_positions_and_sizes():
    rng = np.random.default_rng(5)
    for n in (1, 2, 3):
        seen = set()
        for _ in range(60):
            scene = WORLD.sample_scene(rng, n)
            lo, hi = SIZES[n]
            for p in scene.placements:
                assert lo * 32 <= p.size <= hi * 32
                assert abs(p.cx / 32 - LAYOUTS[n][p.position]) <= JITTER[n] + 1e-9
                seen.add(p.position)
            xs = [p.cx for p in sorted(scene.placements, key=lambda p: LAYOUTS[n][p.position])]
            assert xs == sorted(xs)
        assert seen == set(LAYOUTS[n])
    fixed = WORLD.sample_scene(rng, subjects=WORLD.subjects[:2], positions=["right", "left"], setting="night")
    assert fixed.positions == ("right", "left") and fixed.subjects == WORLD.subjects[:2]
    assert fixed.placements[0].cx > fixed.placements[1].cx


def test_reference_augmentation_ranges():
    aug = WORLD.augment
    rng = np.random.default_rng(6)
    kinds, rotations, scales = set(), [], []
    for i in range(300):
        view = WORLD.sample_reference_view(WORLD.subjects[i % 72], rng)
        scale = view.size / WORLD.reference_size
        assert aug.scale[0] <= scale <= aug.scale[1]
        assert abs(view.cx / 32 - 0.5) <= aug.shift and abs(view.cy / 32 - 0.5) <= aug.shift
        assert abs(view.rotation) <= aug.rotation
        assert view.background in aug.background_kinds
        for c in view.background_colours:
            assert colorsys.rgb_to_hsv(*(v / 255 for v in c))[1] <= aug.background_saturation + 0.01
        kinds.add(view.background)
        rotations.append(view.rotation)
        scales.append(scale)
    assert kinds == set(aug.background_kinds)
    assert min(rotations) < -0.8 * aug.rotation and max(rotations) > 0.8 * aug.rotation  # the range is used
    assert min(scales) < aug.scale[0] + 0.05 and max(scales) > aug.scale[1] - 0.05
    canonical = WORLD.sample_reference_view(WORLD.subjects[0], rng, augment=False)
    assert (canonical.rotation, canonical.cx, canonical.cy) == (0.0, 16.0, 16.0)
    img = WORLD.render_reference(canonical)
    assert (img[16, 16] == np.array(COLOURS["red"], dtype=np.uint8)).all() and (img[0, 0] == 200).all()


def test_reference_shows_the_subject_colour():
    rng = np.random.default_rng(8)
    for sub in WORLD.subjects[::5]:
        view = WORLD.sample_reference_view(sub, rng)
        img = WORLD.render_reference(view).astype(np.int64)
        target = np.array(COLOURS[sub.colour])
        assert (np.abs(img - target).sum(-1) <= 3).sum() >= 0.05 * view.size**2, sub.name


@pytest.mark.parametrize("kwargs, message", [
    ({"num_subjects": 4}, "num_subjects=4 must be 1..3"),
    ({"num_subjects": 2, "positions": ["left", "middle"]}, r"positions \('left', 'middle'\) do not fit 2"),
    ({"num_subjects": 1, "positions": ["up"]}, "do not fit 1 subject"),
    ({"setting": "moon"}, "unknown setting 'moon'"),
    ({"split": "test"}, "unknown split 'test'"),
])
def test_bad_arguments_name_the_problem(kwargs, message):
    with pytest.raises(InputError, match=message):
        WORLD.sample_scene(np.random.default_rng(0), **kwargs)
