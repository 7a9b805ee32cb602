"""What the world's scorer reads off an image, and how its readings become verdicts (numpy only).

The scorer (trained by :mod:`dynaip_trt.demo.scorer`, shipped as the ONNX graph of :data:`SCORER_FILE`) is one
small CNN over a ``SIZE x SIZE`` RGB image in [-1, 1] (:func:`scorer_input` resizes and normalises). Its outputs
(:data:`OUTPUTS`, batch first):

- global heads: ``setting [B, 4]``, ``position [B, 3]`` (of a single subject), ``count [B, 4]`` (0..3 subjects);
- dense heads on a ``GRID x GRID`` map (one cell per ``SIZE / GRID`` pixels): ``foreground [B, GRID, GRID]`` (logit
  that a subject covers the cell) and ``shape [B, 4, GRID, GRID]``, ``colour [B, 6, GRID, GRID]``,
  ``pattern [B, 3, GRID, GRID]`` (logits of the subject covering the cell).

:func:`read` turns the outputs into one :class:`Reading` per image: setting, position and count from the global heads,
and per **region** (:func:`regions`: the columns nearest each layout position of ``num_subjects`` subjects; one
subject: the whole image) the attributes of the subject there, pooled over the region's cells weighted by their
foreground probability. A region with less than :data:`MIN_FOREGROUND` cells' worth of foreground holds no subject.

:func:`judge` compares a reading with the scene the image should show: per image ``setting``, ``position`` (one
subject), ``count`` (the scorer sees as many subjects as referenced) and ``all_present`` (every referenced subject's
colour found in its own region, the right number of subjects seen: present and not blended); per referenced subject
``shape``, ``colour`` and ``pattern`` under the assignment of subjects to regions that matches most attributes.
A region with no subject fails every attribute.

:func:`wilson` gives rates with Wilson score intervals.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import InputError
from .world import COLOURS, LAYOUTS, PATTERNS, POSITIONS, SETTINGS, SHAPES, Scene

SIZE = 32
GRID = 8
ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(COLOURS), "pattern": PATTERNS}
SETTING_NAMES = tuple(SETTINGS)
POSITION_NAMES = tuple(POSITIONS)
MAX_COUNT = 3
INPUT = "images"
OUTPUTS: tuple[str, ...] = ("setting", "position", "count", "foreground", *ATTRIBUTES)
MIN_FOREGROUND = 1.0  # cells' worth of foreground probability a region needs to hold a subject
SCORER_FILE = "scorer.onnx"
SCORER_METADATA = "scorer.json"  # training command, accuracy on fresh renders, the graph's SHA-256
SCORER_DIR = Path(__file__).resolve().parents[1] / "data" / "scorer"  # the shipped scorer (package data)
PER_IMAGE = ("setting", "position", "count", "all_present")
PER_SUBJECT = tuple(ATTRIBUTES)


@dataclass(frozen=True)
class RegionReading:
    """The subject the scorer sees in one region: ``present`` (enough foreground), ``mass`` (foreground cells) and
    attribute names (meaningless when not present)."""

    present: bool
    mass: float
    shape: str
    colour: str
    pattern: str


@dataclass(frozen=True)
class Reading:
    """What the scorer sees in one image: ``setting``, ``position`` (of a single subject), ``count`` (0..3) and one
    :class:`RegionReading` per region of :func:`regions`."""

    setting: str
    position: str
    count: int
    regions: tuple[RegionReading, ...]


def scorer_input(images: Sequence[np.ndarray | Image.Image]) -> np.ndarray:
    """RGB images (``uint8 [H, W, 3]`` arrays or PIL, any square size) -> ``float32 [B, 3, SIZE, SIZE]`` in [-1, 1]
    (area-resized to ``SIZE`` when needed)."""
    out = []
    for i, im in enumerate(images):
        pil = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8))
        if pil.width != pil.height:
            raise InputError(f"images[{i}] is {pil.width}x{pil.height}; the scorer reads square images")
        pil = pil.convert("RGB")
        if pil.size != (SIZE, SIZE):
            pil = pil.resize((SIZE, SIZE), Image.Resampling.BOX)
        out.append(np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
    return np.stack(out)


def run_scorer(session, images: Sequence[np.ndarray | Image.Image], batch: int = 256) -> dict[str, np.ndarray]:
    """Run the scorer graph in ``session`` (an ``onnxruntime.InferenceSession``, or anything with its ``run``) on
    square RGB images of any size, ``batch`` at a time -> outputs by name (:data:`OUTPUTS`)."""
    parts = [session.run(list(OUTPUTS), {INPUT: scorer_input(images[i:i + batch])})
             for i in range(0, len(images), batch)]
    return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(OUTPUTS)}


def regions(num_subjects: int) -> list[np.ndarray]:
    """Column masks ``[GRID]`` (bool) of the regions read for images of ``num_subjects`` subjects: each column
    belongs to the layout position nearest its centre (one subject: a single region, the whole width)."""
    if num_subjects == 1:
        return [np.ones(GRID, dtype=bool)]
    centres = np.array(list(LAYOUTS[num_subjects].values()))
    cols = (np.arange(GRID) + 0.5) / GRID
    nearest = np.abs(cols[:, None] - centres[None]).argmin(-1)
    return [nearest == k for k in range(len(centres))]


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def read(outputs: dict[str, np.ndarray], num_subjects: int) -> list[Reading]:
    """Scorer outputs for a batch of images of ``num_subjects`` subjects -> one :class:`Reading` per image."""
    missing = [n for n in OUTPUTS if n not in outputs]
    if missing:
        raise InputError(f"scorer outputs lack {missing}; expected {list(OUTPUTS)}")
    fg = 1.0 / (1.0 + np.exp(-outputs["foreground"].astype(np.float64)))  # [B, G, G]
    logp = {a: _log_softmax(outputs[a].astype(np.float64), axis=1) for a in ATTRIBUTES}  # [B, K, G, G]
    cols = regions(num_subjects)
    readings = []
    for b in range(fg.shape[0]):
        found = []
        for col in cols:
            w = fg[b][:, col]  # [G, c]
            mass = float(w.sum())
            names = {a: ATTRIBUTES[a][int((logp[a][b][:, :, col] * w).sum(axis=(1, 2)).argmax())] for a in ATTRIBUTES}
            found.append(RegionReading(mass >= MIN_FOREGROUND, round(mass, 3), **names))
        readings.append(Reading(SETTING_NAMES[int(outputs["setting"][b].argmax())],
                                POSITION_NAMES[int(outputs["position"][b].argmax())],
                                int(outputs["count"][b].argmax()), tuple(found)))
    return readings


def judge(scene: Scene, reading: Reading) -> dict[str, bool | list[bool]]:
    """Verdicts of one image against the ``scene`` it should show (see the module docstring): per image
    ``setting``, ``count``, ``all_present`` and (one subject) ``position``; per referenced subject, in reference
    order, lists ``shape``, ``colour``, ``pattern``."""
    subjects = scene.subjects
    if len(reading.regions) != len(subjects):
        raise InputError(f"a reading of {len(reading.regions)} regions cannot judge a scene of {len(subjects)} "
                         f"subjects; read the image with num_subjects={len(subjects)}")

    def hits(i: int, r: int) -> dict[str, bool]:
        region = reading.regions[r]
        return {a: region.present and getattr(region, a) == getattr(subjects[i], a) for a in ATTRIBUTES}

    best = max(itertools.permutations(range(len(subjects))),
               key=lambda perm: sum(sum(hits(i, r).values()) for i, r in enumerate(perm)))
    per_subject = [hits(i, r) for i, r in enumerate(best)]
    out: dict[str, bool | list[bool]] = {
        "setting": reading.setting == scene.setting,
        "count": reading.count == len(subjects),
        "all_present": reading.count == len(subjects) and all(h["colour"] for h in per_subject),
    }
    if len(subjects) == 1:
        out["position"] = reading.position == scene.positions[0]
    for a in ATTRIBUTES:
        out[a] = [h[a] for h in per_subject]
    return out


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of ``hits / n`` (95% for ``z = 1.96``); ``(nan, nan)`` when ``n == 0``."""
    if n == 0:
        return math.nan, math.nan
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(values: Sequence[bool]) -> dict[str, float | int]:
    """``{"rate", "lo", "hi", "hits", "n"}`` of a list of verdicts (Wilson 95% interval)."""
    n, k = len(values), int(sum(bool(v) for v in values))
    lo, hi = wilson(k, n)
    return {"rate": k / n if n else math.nan, "lo": lo, "hi": hi, "hits": k, "n": n}


def chance(attribute: str) -> float:
    """Accuracy of a guess of ``attribute`` (uniform over its values; the held-out subjects are balanced, so any
    constant guess scores exactly this on them)."""
    return 1.0 / len(ATTRIBUTES[attribute])
