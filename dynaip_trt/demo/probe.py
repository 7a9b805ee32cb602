"""A quick CNN probe that reads scenes of the synthetic world, and the held-out evaluation it scores.

Used to iterate on the tiny default's training recipe and to measure the figures of its model card; the package's
evaluation command has its own scorer. Two small CNNs, trained on world renders of **all** subjects (a judge, not
the model under test) with blur and noise so generated images are in range:

- :class:`SceneProbe`: whole image -> setting (4 classes) and the position of a single subject (3 classes).
- :class:`SubjectProbe`: a ``CROP x CROP`` window centred on a layout position -> the shape, colour and pattern of
  the subject there.

:func:`evaluate` samples the model on held-out subjects through :class:`~dynaip_trt.pipeline.DynaIPPipeline`
(adapter scale 0 and 1; one subject on every setting x position, two subjects on every setting) and reports:

- one subject: setting and position accuracy (prompt following), and shape / colour / pattern accuracy of the
  subject found at the predicted position (subject fidelity);
- two subjects: for each referenced subject, whether the subject at the left or right position (the assignment
  that matches best) has its colour / shape / pattern.

    python -m dynaip_trt.demo.probe --run runs/tiny [--json report.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_model, save_model
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, cli_main
from ..files import atomic_path
from ..models import DynaIPModels
from ..pipeline import DynaIPPipeline
from .world import CENTRE_Y, COLOURS, LAYOUTS, PATTERNS, POSITIONS, SETTINGS, SHAPES, Scene, World

logger = logging.getLogger(__name__)

CROP = 20
POSITION_NAMES = tuple(POSITIONS)
SETTING_NAMES = tuple(SETTINGS)


def _cnn(widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = 3
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1),
                   nn.GroupNorm(8, w), nn.SiLU(), nn.MaxPool2d(2)]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


class SceneProbe(nn.Module):
    """``[B, 3, H, W]`` in [-1, 1] -> (setting logits ``[B, 4]``, single-subject position logits ``[B, 3]``)."""

    def __init__(self):
        super().__init__()
        self.body = _cnn((32, 64, 96))
        self.setting = nn.Linear(96, len(SETTINGS))
        self.position = nn.Linear(96, len(POSITIONS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.setting(h), self.position(h)


class SubjectProbe(nn.Module):
    """Crops ``[B, 3, CROP, CROP]`` -> (shape ``[B, 4]``, colour ``[B, 6]``, pattern ``[B, 3]``) logits."""

    def __init__(self):
        super().__init__()
        self.body = _cnn((48, 96, 128))
        self.head = nn.Linear(128, len(SHAPES) + len(COLOURS) + len(PATTERNS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.head(self.body(x)).split([len(SHAPES), len(COLOURS), len(PATTERNS)], dim=-1)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def crop(image: np.ndarray, num_subjects: int, position: str) -> np.ndarray:
    """The ``CROP x CROP`` window of ``image`` centred where the layout of ``num_subjects`` puts ``position``
    (edge pixels repeated outside the image)."""
    s = image.shape[0]
    cx, cy = LAYOUTS[num_subjects][position] * s, CENTRE_Y * s
    x0, y0 = int(round(cx - CROP / 2)), int(round(cy - CROP / 2))
    pad = np.pad(image, ((CROP, CROP), (CROP, CROP), (0, 0)), mode="edge")
    return pad[y0 + CROP: y0 + 2 * CROP, x0 + CROP: x0 + 2 * CROP]


def degrade(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random Gaussian blur (sigma 0..1 px) and noise (std 0..0.08), so generated images are in range."""
    b = images.shape[0]
    sigma = torch.rand(b, generator=gen)
    k = torch.arange(-2, 3, dtype=torch.float32)
    kern = torch.exp(-k[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kern = kern / kern.sum(-1, keepdim=True)  # [B, 5]
    x = images.transpose(0, 1)  # [3, B, H, W]: one blur kernel per image via groups
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), kern[:, None, None, :], groups=b)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), kern[:, None, :, None], groups=b)
    x = x.transpose(0, 1)
    return x + torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.08


@dataclass
class Probe:
    scene: SceneProbe
    subject: SubjectProbe

    @torch.no_grad()
    def read(self, images: list[np.ndarray], num_subjects: int) -> list[dict]:
        """What the probe sees in each image: setting, position (one subject), and the attributes of the subject at
        each position of the layout (one subject: at the predicted position)."""
        self.scene.eval(), self.subject.eval()
        setting, position = self.scene(to_tensor(images))
        out = []
        for i, img in enumerate(images):
            found = {"setting": SETTING_NAMES[int(setting[i].argmax())]}
            if num_subjects == 1:
                found["position"] = POSITION_NAMES[int(position[i].argmax())]
                slots = [found["position"]]
            else:
                slots = list(LAYOUTS[num_subjects])
            logits = self.subject(to_tensor([crop(img, num_subjects, p) for p in slots]))
            found["subjects"] = {p: {"shape": SHAPES[int(logits[0][j].argmax())],
                                     "colour": list(COLOURS)[int(logits[1][j].argmax())],
                                     "pattern": PATTERNS[int(logits[2][j].argmax())]} for j, p in enumerate(slots)}
            out.append(found)
        return out

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            save_model(nn.ModuleDict({"scene": self.scene, "subject": self.subject}), str(tmp))

    @classmethod
    def load(cls, path: Path) -> "Probe":
        probe = cls(SceneProbe(), SubjectProbe())
        load_model(nn.ModuleDict({"scene": probe.scene, "subject": probe.subject}), str(path), strict=True)
        return probe


def train_probe(world: World, steps: int = 1500, batch: int = 64, seed: int = 0, progress: bool = True) -> Probe:
    """Train both probes on fresh renders of every subject (1 or 2 per scene) with blur and noise."""
    torch.manual_seed(seed)
    probe = Probe(SceneProbe(), SubjectProbe())
    params = [*probe.scene.parameters(), *probe.subject.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    for _ in tqdm(range(steps), desc="probe", disable=not progress):
        n = int(rng.integers(1, 3))
        scenes = [world.sample_scene(rng, n, split="all") for _ in range(batch)]
        images = [world.render(s)[0] for s in scenes]
        x = degrade(to_tensor(images), gen)
        setting, position = probe.scene(x)
        loss = F.cross_entropy(setting, torch.tensor([SETTING_NAMES.index(s.setting) for s in scenes]))
        if n == 1:
            loss = loss + F.cross_entropy(position, torch.tensor([POSITION_NAMES.index(s.positions[0])
                                                                  for s in scenes]))
        crops, labels = [], []
        for img, s in zip(x.permute(0, 2, 3, 1).numpy(), scenes):
            for p in s.placements:
                crops.append(crop(img, n, p.position))
                labels.append(p.subject.labels)
        logits = probe.subject(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2))
        lab = torch.tensor(labels)
        loss = loss + sum(F.cross_entropy(lg, lab[:, i]) for i, lg in enumerate(logits))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return probe


# ----------------------------------------------------------------------------------------------------- evaluation
def _interval(hits: list[bool]) -> dict[str, float]:
    """Accuracy with a 95% Wilson interval."""
    n, k = len(hits), sum(hits)
    if n == 0:
        return {"acc": float("nan"), "n": 0}
    p, z = k / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"acc": round(p, 4), "lo": round(centre - half, 4), "hi": round(centre + half, 4), "n": n}


def _generate(pipe: DynaIPPipeline, world: World, scenes: list[Scene], scale: float, seed: int,
              rng: np.random.Generator) -> list[np.ndarray]:
    """One image per scene, its subjects' references drawn (augmented) from ``rng``."""
    out = []
    for i, scene in enumerate(scenes):
        refs = [Image.fromarray(world.reference(p.subject, rng)) for p in scene.placements]
        img = pipe(world.prompt(scene), refs, scales=scale, seed=seed + i, progress=False)[0]
        out.append(np.asarray(img))
    return out


def eval_scenes(world: World, seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    """The held-out evaluation set: every held-out subject on every setting x position (one subject), and
    every setting for twelve pairs of held-out subjects of different colours (two subjects)."""
    rng = np.random.default_rng(seed)
    held = world.split("heldout")
    one = [world.sample_scene(rng, subjects=[s], setting=st, positions=[pos])
           for s in held for st in SETTINGS for pos in LAYOUTS[1]]
    pairs = [(a, b) for a, b in itertools.combinations(held, 2) if a.colour != b.colour]
    pairs = [pairs[i] for i in rng.choice(len(pairs), 12, replace=False)]
    two = [world.sample_scene(rng, subjects=list(p), setting=st) for p in pairs for st in SETTINGS]
    return one, two


def evaluate(models: DynaIPModels, probe: Probe, world: World, scales: tuple[float, ...] = (0.0, 1.0),
             seed: int = 0, limit: int | None = None, progress: bool = True) -> dict:
    """Sample held-out scenes at each adapter scale and score them with ``probe`` (see the module docstring)."""
    pipe = DynaIPPipeline.from_models(models)
    one, two = eval_scenes(world, seed)
    if limit is not None:
        one, two = one[:: max(1, len(one) // limit)], two[:: max(1, len(two) // limit)]
    report: dict = {}
    for scale in tqdm(scales, desc="evaluate", disable=not progress):
        rng = np.random.default_rng([seed, 1])
        images = _generate(pipe, world, one, scale, seed, rng)
        seen = probe.read(images, 1)
        hits: dict[str, list[bool]] = {k: [] for k in ("setting", "position", "shape", "colour", "pattern")}
        for scene, found in zip(one, seen):
            hits["setting"].append(found["setting"] == scene.setting)
            hits["position"].append(found["position"] == scene.positions[0])
            got = next(iter(found["subjects"].values()))
            for attr in ("shape", "colour", "pattern"):
                hits[attr].append(got[attr] == getattr(scene.subjects[0], attr))
        images2 = _generate(pipe, world, two, scale, seed + 10_000, rng)
        hits2: dict[str, list[bool]] = {k: [] for k in ("setting", "shape", "colour", "pattern", "both_colours")}
        for scene, found in zip(two, probe.read(images2, 2)):
            hits2["setting"].append(found["setting"] == scene.setting)
            slots = list(found["subjects"].values())
            best = max(itertools.permutations(range(2)), key=lambda perm: sum(
                slots[j][a] == getattr(scene.subjects[i], a) for i, j in enumerate(perm)
                for a in ("colour", "shape", "pattern")))
            for i, j in enumerate(best):
                for attr in ("shape", "colour", "pattern"):
                    hits2[attr].append(slots[j][attr] == getattr(scene.subjects[i], attr))
            hits2["both_colours"].append(all(slots[j]["colour"] == scene.subjects[i].colour
                                             for i, j in enumerate(best)))
        report[f"scale={scale:g}"] = {"one_subject": {k: _interval(v) for k, v in hits.items()},
                                      "two_subjects": {k: _interval(v) for k, v in hits2.items()}}
    return report


def probe_accuracy(probe: Probe, world: World, n: int = 256, seed: int = 1) -> dict:
    """The probe's own accuracy on fresh renders (held-out subjects, one and two per scene)."""
    rng = np.random.default_rng(seed)
    res: dict[str, list[bool]] = {k: [] for k in ("setting", "position", "shape", "colour", "pattern")}
    for k in (1, 2):
        scenes = [world.sample_scene(rng, k, split="heldout") for _ in range(n)]
        for scene, found in zip(scenes, probe.read([world.render(s)[0] for s in scenes], k)):
            res["setting"].append(found["setting"] == scene.setting)
            if k == 1:
                res["position"].append(found["position"] == scene.positions[0])
            for p in scene.placements:
                got = found["subjects"][p.position] if k == 2 else next(iter(found["subjects"].values()))
                for attr in ("shape", "colour", "pattern"):
                    res[attr].append(got[attr] == getattr(p.subject, attr))
    return {k: _interval(v)["acc"] for k, v in res.items()}


def table(report: dict) -> str:
    """The report as a plain-text table (one row per scale and subject count)."""
    cols = ("setting", "position", "shape", "colour", "pattern")
    lines = [f"{'row':<22}" + "".join(f"{c:>10}" for c in cols)]
    for scale, r in report.items():
        for kind in ("one_subject", "two_subjects"):
            cells = "".join(f"{r[kind][c]['acc']:>10.3f}" if c in r[kind] else f"{'-':>10}" for c in cols)
            lines.append(f"{scale + ' ' + kind:<22}" + cells)
    return "\n".join(lines)


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    from .train import FULL, Run, load_family

    p = argparse.ArgumentParser(prog="python -m dynaip_trt.demo.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a training run folder (python -m dynaip_trt.demo.train --out)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--probe", help="probe weights (trained and saved there if missing; default RUN/probe.safetensors)")
    p.add_argument("--probe-steps", type=int, default=1500)
    p.add_argument("--limit", type=int, help="evaluate about this many scenes per kind (quick look)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("dynaip_trt.pipeline").setLevel(logging.WARNING)  # one line per generated image otherwise
    run_dir = Path(args.run)
    if not (run_dir / "base.safetensors").is_file():
        raise ConfigError(f"--run {run_dir}: no finished base stage there (base.safetensors)")
    from ..configs import get_config

    cfg = get_config("tiny")
    world = World(size=cfg.height, reference_size=cfg.vision.image_size)
    run = Run(run_dir, cfg, FULL, 0, world)
    models = load_family(run)
    probe_path = Path(args.probe) if args.probe else run_dir / "probe.safetensors"
    if probe_path.is_file():
        probe = Probe.load(probe_path)
    else:
        probe = train_probe(world, steps=args.probe_steps, seed=args.seed)
        probe.save(probe_path)
    logger.info("probe accuracy on held-out renders: %s", probe_accuracy(probe, world))
    report = evaluate(models, probe, world, seed=args.seed, limit=args.limit)
    print(table(report))
    if args.json:
        with atomic_path(Path(args.json)) as tmp:
            tmp.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
