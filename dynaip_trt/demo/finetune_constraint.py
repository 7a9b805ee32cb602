"""Fine-tune the shipped tiny adapter with or without MM-Diff's attention constraint (a fair short comparison).

    python -m dynaip_trt.demo.finetune_constraint --out runs/ft-constrained --attention-weight 1 --steps 300
    python -m dynaip_trt.demo.finetune_constraint --out runs/ft-plain --attention-weight 0 --steps 300

Training the adapter from scratch with the constraint is ``python -m dynaip_trt.demo.train --stage adapter
--attention-weight W`` (about 27 minutes on one thread). This command is the short version: it starts from the
adapter shipped in ``dynaip_trt/data/tiny`` (base, vision tower and encoders frozen, as in the adapter stage) and
runs the adapter stage's loss (:func:`~dynaip_trt.demo.train.adapter_loss`) for ``--steps`` steps, two subjects per
scene by default (``--two-subject-every 1``): the batches are a function of ``--seed`` and the step only, so runs
with and without the constraint see the same data. Writes ``OUT/adapter.safetensors`` (an adapter file for
``runtime.evaluate --constrained-adapter``), ``OUT/recipe.json`` and ``OUT/logs/adapter.jsonl``; a folder is one
recipe (resumes from ``OUT/checkpoints``).

What the constraint targets, measured on held-out two-subject scenes of the world (no training):

    python -m dynaip_trt.demo.finetune_constraint --leakage shipped runs/ft-plain/adapter.safetensors \
        runs/ft-constrained/adapter.safetensors

prints, per adapter, :func:`~dynaip_trt.training.attention_leakage`: the image tokens' attention mass on the other
subject's reference tokens inside each subject's region (0.5 for uniform attention over two subjects).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..cli import cli_main, configure_logging
from ..configs import get_config
from ..errors import ConfigError
from ..models import DynaIPModels
from ..training import TrainBatch, attention_leakage
from ..weights import load_adapter, load_family, save_adapter
from .train import (
    CONFIG_NAME,
    FULL,
    Encoders,
    Recipe,
    Run,
    StageRecipe,
    _check_recipe,
    adapter_loss,
    clip_pixels,
    keep,
    optimise,
    sample_sigmas,
    token_coverage,
    with_attention_weight,
)
from .world import World

logger = logging.getLogger(__name__)


def finetune_recipe(steps: int, batch: int, lr: float, attention_weight: float, two_subject_every: int) -> Recipe:
    """The full recipe with a short adapter stage (linear warm-up over the first 10%, cosine decay, no EMA)."""
    if steps < 1 or batch < 1 or two_subject_every < 1 or not lr > 0:
        raise ConfigError(f"--steps {steps}, --batch {batch} and --two-subject-every {two_subject_every} must be "
                          f">= 1 and --lr {lr:g} > 0")
    stage = StageRecipe(steps=steps, batch=batch, lr=lr, warmup=max(1, steps // 10), checkpoint_every=100)
    return with_attention_weight(dataclasses.replace(FULL, adapter=stage, two_subject_every=two_subject_every),
                                 attention_weight)


def finetune(out: str | Path, recipe: Recipe, seed: int = 0, progress: bool = True) -> Path:
    """Fine-tune the shipped ``tiny`` adapter with ``recipe``'s adapter stage into ``out``; returns the adapter
    file (``out/adapter.safetensors``)."""
    models = load_family(CONFIG_NAME)
    cfg = models.config
    run = Run(Path(out), get_config(CONFIG_NAME), recipe, seed,
              World(size=cfg.height, reference_size=cfg.vision.image_size), progress)
    try:
        run.out.mkdir(parents=True, exist_ok=True)
        _check_recipe(run)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from e
    for m in (models.transformer, models.vision, models.clip_text, models.t5, models.vae):
        m.eval().requires_grad_(False)
    adapter = models.adapter.requires_grad_(True)
    enc = Encoders(run, models.clip_text, models.t5, models.t5_tokenizer, models.vae)
    t0 = time.perf_counter()
    weights = optimise(run, "adapter", {"adapter": adapter},
                       adapter_loss(run, cfg, enc, models.transformer, models.vision, adapter))
    path = save_adapter(keep(adapter.eval(), weights, "adapter"), run.out / "adapter.safetensors")
    (run.out / "checkpoints" / "adapter.safetensors").unlink(missing_ok=True)
    logger.info("fine-tuned %d steps (attention weight %g) in %.1f min: %s", recipe.adapter.steps,
                recipe.attention_weight, (time.perf_counter() - t0) / 60, path)
    return path


def world_leakage(models: DynaIPModels, scenes: int = 64, seed: int = 0) -> float:
    """:func:`~dynaip_trt.training.attention_leakage` of ``models`` on ``scenes`` held-out two-subject scenes of the
    world (generic prompts, canonical references, seeded noise levels), each subject's region its token coverage."""
    cfg = models.config
    world = World(size=cfg.height, reference_size=cfg.vision.image_size)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    drawn = [world.sample_scene(rng, 2, split="heldout") for _ in range(scenes)]
    rendered = [world.render(s) for s in drawn]
    run = Run(Path("."), cfg, FULL, seed, world, progress=False)
    enc = Encoders(run, models.clip_text, models.t5, models.t5_tokenizer, models.vae)
    latents = enc.latents([r[0] for r in rendered])
    refs = [world.reference(p.subject, rng, augment=False) for s in drawn for p in s.placements]
    ids = torch.from_numpy(models.t5_tokenizer.encode_batch([world.prompt(s) for s in drawn]))
    batch = TrainBatch(latents=latents, pixels=clip_pixels(refs, cfg).unflatten(0, (scenes, 2)), clip_ids=ids,
                       t5_ids=ids, noise=torch.randn(latents.shape, generator=gen),
                       sigmas=sample_sigmas(scenes, latents.shape[1], gen), height=cfg.height, width=cfg.width,
                       masks=token_coverage([r[1] for r in rendered], cfg.pixel_multiple))
    return attention_leakage(models, batch)


def print_leakage(adapters: list[str], scenes: int = 64) -> None:
    """Print :func:`world_leakage` per adapter file (``shipped``: the embedded default's)."""
    missing = [a for a in adapters if a != "shipped" and not Path(a).is_file()]
    if missing:
        raise ConfigError(f"--leakage: no such adapter file(s) {missing}")
    for a in adapters:
        models = load_family(CONFIG_NAME)
        if a != "shipped":
            load_adapter(a, models.adapter)
        print(f"{a}: attention leakage {world_leakage(models, scenes):.4f} ({scenes} held-out two-subject scenes)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dynaip_trt.demo.finetune_constraint",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="run folder (adapter.safetensors, recipe.json, logs, checkpoints)")
    p.add_argument("--attention-weight", type=float, metavar="W",
                   help="weight of the attention constraint (0: the same fine-tune without it)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--two-subject-every", type=int, default=1, metavar="K",
                   help="every K-th batch has two subjects per scene, the others one (default 1: all two)")
    p.add_argument("--seed", type=int, default=1, help="seed of the batches (default 1: not the shipped run's)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--leakage", nargs="+", metavar="ADAPTER",
                   help="instead of training: print each adapter's attention leakage ('shipped': the default's)")
    return p.parse_args(argv)


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.leakage:
        print_leakage(args.leakage)
        return 0
    if args.out is None or args.attention_weight is None:
        raise ConfigError("give --out DIR and --attention-weight W (or --leakage ADAPTER...)")
    recipe = finetune_recipe(args.steps, args.batch, args.lr, args.attention_weight, args.two_subject_every)
    finetune(args.out, recipe, args.seed, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
