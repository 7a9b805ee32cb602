"""Train the world's scorer: the judge of the quality evaluation (``python -m runtime.evaluate``).

    python -m dynaip_trt.demo.scorer --out runs/scorer            # train, export scorer.onnx + scorer.json
    python -m dynaip_trt.demo.scorer --out runs/scorer --steps 200 # a quick look

One small CNN (:class:`Scorer`, ~0.2M parameters) with the heads of :mod:`dynaip_trt.demo.verdicts`: setting,
position, subject count, and per cell of an 8x8 map foreground, shape, colour and pattern. It is trained on fresh
renders of **every** subject of the world (a judge, not the model under test), one to three subjects per scene plus
empty backgrounds, with the subjects moved, resized and turned a little beyond the world's layouts and the images
blurred, noised and colour-jittered, so that generated images (softer, less exact) are in range.

The output folder gets ``scorer.onnx`` (ONNX opset 18, dynamic batch; what the evaluation runs with ONNX Runtime,
no torch), ``scorer.json`` (training settings, the accuracy on fresh renders of the held-out subjects, measured
through the ONNX graph and the same reading code the evaluation uses, and the graph's SHA-256) and
``scorer.safetensors`` (the torch weights). ``dynaip_trt/data/scorer/`` ships the result of the default command.
Every batch is drawn from ``numpy.random.default_rng([seed, step])``: the same seed gives the same scorer.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..cli import check_writable_file, cli_main, configure_logging
from ..errors import InputError, OutputError
from ..files import atomic_path
from .verdicts import (
    ATTRIBUTES,
    GRID,
    INPUT,
    MAX_COUNT,
    OUTPUTS,
    POSITION_NAMES,
    SCORER_FILE,
    SCORER_METADATA,
    SETTING_NAMES,
    SIZE,
    judge,
    rate,
    read,
    run_scorer,
    scorer_input,
)
from .world import Scene, World

logger = logging.getLogger(__name__)

CELL = SIZE // GRID
WEIGHTS_FILE = "scorer.safetensors"
PROG = "python -m dynaip_trt.demo.scorer"


@dataclass(frozen=True)
class ScorerRecipe:
    """Training settings (AdamW with one-cycle learning rate).

    ``empty_odds``: share of scenes with no subject; ``jitter``: extra centre jitter (fraction of the subject's
    size) beyond the world's layouts; ``resize``: size factor range; ``turn_odds`` / ``turn``: share of subjects
    turned and the angle range (degrees); ``blur``: max Gaussian sigma (pixels); ``noise``: max noise std (in [-1, 1]
    units); ``colour_jitter``: max per-channel gain change.
    """

    steps: int = 2000
    batch: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    empty_odds: float = 0.08
    subject_odds: tuple[float, float, float] = (0.4, 0.4, 0.2)
    jitter: float = 0.12
    resize: tuple[float, float] = (0.85, 1.15)
    turn_odds: float = 0.5
    turn: float = 25.0
    blur: float = 1.2
    noise: float = 0.08
    colour_jitter: float = 0.08


class Scorer(nn.Module):
    """``images [B, 3, 32, 32]`` in [-1, 1] -> the outputs of :data:`~dynaip_trt.demo.verdicts.OUTPUTS`.

    Trunk: three stages of two 3x3 conv + GroupNorm + SiLU (widths 32, 64, 96), max-pooled between stages, so the
    last stage is an 8x8 map (stride 4) with a 32-pixel receptive field. Dense heads: a 1x1 conv per cell
    (foreground ``[B, 8, 8]``, attributes ``[B, K, 8, 8]``); global heads: linear layers on the mean- and max-pooled
    map.
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 96)):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for i, w in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            c = w
        self.trunk = nn.Sequential(*layers)
        self.dense = nn.Conv2d(c, 1 + sum(len(v) for v in ATTRIBUTES.values()), 1)
        self.globals = nn.Linear(2 * c, len(SETTING_NAMES) + len(POSITION_NAMES) + MAX_COUNT + 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.trunk(images)  # [B, C, 8, 8]
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # [B, 2C]
        setting, position, count = self.globals(pooled).split(
            [len(SETTING_NAMES), len(POSITION_NAMES), MAX_COUNT + 1], dim=1)
        dense = self.dense(h)  # [B, 1 + K, 8, 8]
        foreground, *attrs = dense.split([1, *(len(v) for v in ATTRIBUTES.values())], dim=1)
        return setting, position, count, foreground[:, 0], *attrs


# ------------------------------------------------------------------------------------------------------- data
def _perturb(world: World, scene: Scene, rng: np.random.Generator, recipe: ScorerRecipe) -> Scene:
    """Move, resize and (some) turn the subjects of ``scene`` beyond the world's layouts."""
    placements = []
    for p in scene.placements:
        shift = rng.uniform(-recipe.jitter, recipe.jitter, 2) * p.size
        turn = rng.uniform(-recipe.turn, recipe.turn) if rng.random() < recipe.turn_odds else 0.0
        placements.append(dataclasses.replace(p, cx=p.cx + shift[0], cy=p.cy + shift[1], rotation=turn,
                                              size=p.size * rng.uniform(*recipe.resize)))
    return dataclasses.replace(scene, placements=tuple(placements))


def sample_batch(world: World, rng: np.random.Generator, recipe: ScorerRecipe) -> dict[str, np.ndarray]:
    """One training batch of renders and their targets: ``images`` uint8 ``[B, S, S, 3]``, ``setting [B]``,
    ``position [B]`` (-1 unless one subject), ``count [B]``, ``cover [B, G, G]`` (subject coverage of each cell),
    ``labels [B, 3, G, G]`` (shape, colour, pattern of the subject covering most of each cell; -1 where none)."""
    b = recipe.batch
    images = np.zeros((b, world.size, world.size, 3), np.uint8)
    out = {"setting": np.zeros(b, np.int64), "position": np.full(b, -1, np.int64), "count": np.zeros(b, np.int64),
           "cover": np.zeros((b, GRID, GRID), np.float32), "labels": np.full((b, 3, GRID, GRID), -1, np.int64)}
    cell = world.size // GRID
    for i in range(b):
        empty = rng.random() < recipe.empty_odds
        n = 1 if empty else int(rng.choice(3, p=recipe.subject_odds)) + 1
        scene = _perturb(world, world.sample_scene(rng, n, split="all"), rng, recipe)
        out["setting"][i] = SETTING_NAMES.index(scene.setting)
        if empty:
            images[i] = world.background(scene)
            continue
        images[i], masks = world.render(scene)
        cover = masks.reshape(n, GRID, cell, GRID, cell).mean(axis=(2, 4))  # [n, G, G]
        out["count"][i] = n
        out["position"][i] = POSITION_NAMES.index(scene.positions[0]) if n == 1 else -1
        out["cover"][i] = np.clip(cover.sum(0), 0, 1)
        owner = cover.argmax(0)
        for j, p in enumerate(scene.placements):
            sel = (owner == j) & (cover[j] > 0)
            for k, v in enumerate(p.subject.labels):
                out["labels"][i, k][sel] = v
    out["images"] = images
    return out


def degrade(x: torch.Tensor, gen: torch.Generator, recipe: ScorerRecipe) -> torch.Tensor:
    """Per image: a Gaussian blur (sigma 0..``blur`` px), a colour gain (1 +- ``colour_jitter`` per channel) and
    Gaussian noise (std 0..``noise``); ``x`` ``[B, 3, H, W]`` in [-1, 1]."""
    b = x.shape[0]
    sigma = torch.rand(b, generator=gen) * recipe.blur
    k = torch.arange(-2, 3, dtype=torch.float32)
    kern = torch.exp(-k[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kern = kern / kern.sum(-1, keepdim=True)  # [B, 5]
    y = x.transpose(0, 1)  # [3, B, H, W]: one kernel per image through groups
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), kern[:, None, None, :], groups=b)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), kern[:, None, :, None], groups=b).transpose(0, 1)
    gain = 1 + (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1) * recipe.colour_jitter
    y = (y + 1) * gain - 1
    y = y + torch.randn(y.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * recipe.noise
    return y.clamp(-1, 1)


def loss_of(model: Scorer, batch: dict[str, np.ndarray], gen: torch.Generator, recipe: ScorerRecipe
            ) -> torch.Tensor:
    x = degrade(torch.from_numpy(scorer_input(list(batch["images"]))), gen, recipe)
    setting, position, count, fg, *attrs = model(x)
    t = {k: torch.from_numpy(v) for k, v in batch.items() if k != "images"}
    loss = F.cross_entropy(setting, t["setting"]) + F.cross_entropy(count, t["count"])
    if (t["position"] >= 0).any():
        loss = loss + F.cross_entropy(position, t["position"], ignore_index=-1)
    loss = loss + F.binary_cross_entropy_with_logits(fg, t["cover"])
    for k, logits in enumerate(attrs):  # [B, K, G, G]; cells weighted by their coverage
        labels = t["labels"][:, k]
        per_cell = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
        weight = t["cover"] * (labels >= 0)
        loss = loss + (per_cell * weight).sum() / weight.sum().clamp_min(1.0)
    return loss


def train(world: World, recipe: ScorerRecipe = ScorerRecipe(), seed: int = 0, progress: bool = True) -> Scorer:
    """Train a :class:`Scorer` (deterministic for a seed on a given machine and torch version)."""
    torch.manual_seed(seed)
    model = Scorer()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    model.train()
    start = time.time()
    bar = tqdm(range(recipe.steps), desc="scorer", disable=not progress)
    for step in bar:
        batch = sample_batch(world, np.random.default_rng([seed, step]), recipe)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        loss = loss_of(model, batch, gen, recipe)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == recipe.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            logger.info("step %d/%d loss %.4f (%.0f s)", step + 1, recipe.steps, loss.item(), time.time() - start)
    return model.eval()


# ---------------------------------------------------------------------------------------------- export, accuracy
def export_onnx(model: Scorer, path: Path) -> None:
    """Write ``model`` as an ONNX graph (opset 18, dynamic batch) atomically to ``path``."""
    import onnx

    x = torch.zeros(2, 3, SIZE, SIZE)
    with torch.no_grad():
        program = torch.onnx.export(model.eval(), (x,), dynamo=True, input_names=[INPUT], output_names=list(OUTPUTS),
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                                    opset_version=18, verbose=False)
    proto = program.model_proto
    proto.producer_name = "dynaip-trt scorer"
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))


def render_accuracy(path: Path, world: World, scenes_per_count: int = 300, seed: int = 12345,
                    split: str = "heldout", perturbed: bool = False) -> dict[str, dict]:
    """The scorer's verdict rates on fresh renders of ``split`` subjects (1, 2 and 3 per scene), through the ONNX
    graph at ``path`` and the evaluation's reading code: ``{"1": {metric: rate}, "2": ..., "3": ...}``.

    ``perturbed``: the renders get the training's perturbations (subjects moved, resized, turned; images blurred,
    colour-shifted and noised, each at a random strength up to the recipe's maximum), so the figures say how the
    scorer copes with images less exact than renders, such as generated ones."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    recipe = ScorerRecipe()
    rng = np.random.default_rng([seed, int(perturbed)])
    gen = torch.Generator().manual_seed(seed)
    report = {}
    for n in range(1, MAX_COUNT + 1):
        scenes = [world.sample_scene(rng, n, split=split) for _ in range(scenes_per_count)]
        if perturbed:
            scenes = [_perturb(world, s, rng, recipe) for s in scenes]
        images = [world.render(s)[0] for s in scenes]
        if perturbed:
            x = degrade(torch.from_numpy(scorer_input(images)), gen, recipe)
            images = list(((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8))
        readings = read(run_scorer(session, images), n)
        verdicts = [judge(s, r) for s, r in zip(scenes, readings)]
        report[str(n)] = {k: rate([x for v in verdicts for x in (v[k] if isinstance(v[k], list) else [v[k]])])
                          for k in verdicts[0]}
    return report


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def written_by_us(folder: Path) -> bool:
    """Whether ``folder`` holds a scorer this command wrote (its ``scorer.json`` names the command): then its scorer
    files may be replaced."""
    try:
        meta = json.loads((folder / SCORER_METADATA).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and str(meta.get("command", "")).startswith(PROG)


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (scorer.onnx, scorer.json, "
                   "scorer.safetensors); created if missing")
    p.add_argument("--steps", type=int, default=ScorerRecipe.steps)
    p.add_argument("--batch", type=int, default=ScorerRecipe.batch)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--reuse", action="store_true", help="reuse the weights a previous run wrote to --out (no "
                   "training): export and measure again")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    configure_logging(args.verbose)
    if args.steps < 1 or args.batch < 1 or args.threads < 0 or args.seed < 0:
        raise InputError("--steps and --batch must be >= 1, --threads and --seed >= 0")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    ours = written_by_us(out)
    paths = {name: check_writable_file(out / name, f"--out {out}: {name}", lambda f: ours)
             for name in (SCORER_FILE, SCORER_METADATA, WEIGHTS_FILE)}
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = ScorerRecipe(steps=args.steps, batch=args.batch)
    world = World(size=SIZE, reference_size=SIZE)
    from safetensors.torch import load_model, save_model

    if args.reuse:
        if not ours or not paths[WEIGHTS_FILE].is_file():
            raise InputError(f"--reuse: --out {out} holds no scorer this command trained")
        previous = json.loads((out / SCORER_METADATA).read_text())
        model, seconds = Scorer(), previous.get("train_seconds")
        load_model(model, str(paths[WEIGHTS_FILE]))
        model.eval()
        recipe = ScorerRecipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in previous["recipe"].items()})
        args.seed = previous["seed"]
    else:
        start = time.time()
        model = train(world, recipe, seed=args.seed)
        seconds = round(time.time() - start, 1)
        with atomic_path(paths[WEIGHTS_FILE]) as tmp:
            save_model(model, str(tmp))
    export_onnx(model, paths[SCORER_FILE])
    accuracy = {f"{split}{' perturbed' if hard else ''}": render_accuracy(paths[SCORER_FILE], world, split=split,
                                                                           perturbed=hard)
                for split in ("heldout", "train") for hard in (False, True)}
    meta = {"command": f"{PROG} --out DIR --steps {recipe.steps} --batch {recipe.batch} --seed {args.seed}",
            "seed": args.seed, "recipe": dataclasses.asdict(recipe), "train_seconds": seconds,
            "torch": torch.__version__, "parameters": sum(p.numel() for p in model.parameters()),
            "input": {"name": INPUT, "shape": ["batch", 3, SIZE, SIZE], "range": [-1, 1]}, "outputs": list(OUTPUTS),
            "accuracy_on_fresh_renders": accuracy, "sha256": sha256(paths[SCORER_FILE])}
    with atomic_path(paths[SCORER_METADATA]) as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
    for split, report in accuracy.items():
        logger.info("%s subjects: %s", split, "; ".join(
            f"{n} subject(s): " + ", ".join(f"{k} {v['rate']:.3f}" for k, v in r.items()) for n, r in report.items()))
    logger.info("wrote %s (%s s of training)", out, seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
