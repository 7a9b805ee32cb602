"""The README's pictures of the two seed methods on the embedded ``tiny`` default (docs/dci-mmdiff.md).

    python -m dynaip_trt.demo.method_figures --dbim docs/dbim-demo.png
    python -m dynaip_trt.demo.method_figures --constraint docs/constraint-demo.png \\
        --constrained-adapter runs/ft-w1/adapter.safetensors --unconstrained-adapter runs/ft-w0/adapter.safetensors

``--dbim``: DCI's dual-branch integration. Rows: held-out subjects (one, then two per scene); columns: the
references, the image without DBIM, then DBIM at each ``--lambdas`` (same seed; the auxiliary prompt replaces
"object(s)" by ``--aux-noun``, which the tiny word-level vocabulary must know, its plural becoming ``[UNK]``).

``--constraint``: MM-Diff's attention constraint. Rows: pairs of held-out subjects; columns: the two references,
then per prompt the image with the unconstrained adapter (the shipped one unless ``--unconstrained-adapter``) and
with ``--constrained-adapter``. Every image is upscaled 4x (nearest neighbour) so the 32x32 pixels stay visible.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..cli import (
    check_writable_file,
    cli_main,
    configure_logging,
    save_image,
    written_image,
)
from ..configs import get_config
from ..errors import ConfigError
from ..pipeline import DynaIPPipeline
from ..weights import load_adapter, load_embedded
from .figure import (
    GAP,
    LABEL,
    ONE_PROMPTS,
    ONE_SUBJECTS,
    TWO_PROMPTS,
    TWO_SUBJECTS,
    _subject,
    _zoom,
)
from .world import GENERIC_NOUN, World

logger = logging.getLogger(__name__)

DEFAULT_LAMBDAS = (-2.0, 0.0, 2.0)
DEFAULT_AUX_NOUN = "circle"  # a noun of the tiny vocabulary; its plural is unknown there ([UNK])
CONSTRAINT_SUBJECTS = (*TWO_SUBJECTS, ("blue striped triangle", "cyan solid cross"))


def grid(headers: Sequence[str], rows: Sequence[tuple[str, Sequence[Image.Image]]]) -> Image.Image:
    """A labelled grid of equally sized tiles: one header per column, one caption line above each row."""
    tile = max(im.width for _, ims in rows for im in ims) * 4
    n_cols = max(len(headers), *(len(ims) for _, ims in rows))
    canvas = Image.new("RGB", (n_cols * (tile + GAP) + GAP, LABEL + len(rows) * (tile + GAP + LABEL) + GAP),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, h in enumerate(headers):
        draw.text((GAP + c * (tile + GAP), 2), h, fill=(0, 0, 0))
    for r, (caption, images) in enumerate(rows):
        y = LABEL + r * (tile + GAP + LABEL) + LABEL
        draw.text((GAP, y - LABEL + 2), caption, fill=(60, 60, 60))
        for c, im in enumerate(images):
            canvas.paste(_zoom(im), (GAP + c * (tile + GAP), y))
    return canvas


def _references(world: World, names: Sequence[str], rng: np.random.Generator) -> list[Image.Image]:
    return [Image.fromarray(world.reference(_subject(world, n), rng, augment=False)) for n in names]


def dbim_figure(pipe: DynaIPPipeline, lambdas: Sequence[float] = DEFAULT_LAMBDAS, aux_noun: str = DEFAULT_AUX_NOUN,
                seed: int = 0) -> Image.Image:
    """References | no DBIM | DBIM at each lambda, for three one-subject and two two-subject rows."""
    world = World(size=pipe.config.height, reference_size=pipe.config.vision.image_size)
    cases = [((n,), ONE_PROMPTS[i % len(ONE_PROMPTS)], GENERIC_NOUN, aux_noun) for i, n in enumerate(ONE_SUBJECTS)]
    cases += [(pair, TWO_PROMPTS[i], GENERIC_NOUN + "s", aux_noun + "s") for i, pair in enumerate(TWO_SUBJECTS)]
    rng = np.random.default_rng(seed)
    rows = []
    for r, (names, prompt, word, aux) in enumerate(cases):
        refs = _references(world, names, rng)
        images = pipe(prompt, refs, seed=seed + r, progress=False)
        for lam in lambdas:
            images += pipe(prompt, refs, seed=seed + r, dbim_lambda=lam, subject_word=word, aux_noun=aux,
                           progress=False)
        rows.append((f"{' + '.join(names)}:  {prompt}", refs + [Image.new("RGB", refs[0].size, "white")] *
                     (2 - len(refs)) + images))
    return grid(["references", "", "no DBIM", *(f"lambda {lam:g}" for lam in lambdas)], rows)


def constraint_figure(unconstrained: DynaIPPipeline, constrained: DynaIPPipeline, prompts: Sequence[str] =
                      TWO_PROMPTS[:2], seed: int = 0) -> Image.Image:
    """Two references | per prompt: unconstrained, constrained (same seed), for each pair of held-out subjects."""
    world = World(size=constrained.config.height, reference_size=constrained.config.vision.image_size)
    rng = np.random.default_rng(seed)
    rows = []
    for r, names in enumerate(CONSTRAINT_SUBJECTS):
        refs = _references(world, names, rng)
        images = []
        for prompt in prompts:
            images += unconstrained(prompt, refs, seed=seed + r, progress=False)
            images += constrained(prompt, refs, seed=seed + r, progress=False)
        rows.append((f"{' + '.join(names)}:  {' | '.join(prompts)}", refs + images))
    headers = ["references", ""] + [h for i in range(len(prompts)) for h in (f"prompt {i + 1}: plain", "constrained")]
    return grid(headers, rows)


def _pipeline(adapter: str | None = None) -> DynaIPPipeline:
    """The embedded ``tiny`` default, with the adapter of ``adapter`` (a file) when given."""
    models = load_embedded(get_config("tiny"))
    if adapter is not None:
        load_adapter(adapter, models.adapter)
    return DynaIPPipeline(models)


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynaip_trt.demo.method_figures",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--dbim", metavar="PNG", help="write the DBIM picture here")
    p.add_argument("--lambdas", default=",".join(f"{x:g}" for x in DEFAULT_LAMBDAS),
                   help="the DBIM picture's lambdas (comma list; one starting with '-' is given as --lambdas=-2,2)")
    p.add_argument("--aux-noun", default=DEFAULT_AUX_NOUN, help="DBIM's auxiliary noun (a word the model knows)")
    p.add_argument("--constraint", metavar="PNG", help="write the attention-constraint picture here")
    p.add_argument("--constrained-adapter", metavar="FILE", help="adapter trained with the attention constraint")
    p.add_argument("--unconstrained-adapter", metavar="FILE", help="the adapter to compare with (default: shipped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    configure_logging()
    if not args.dbim and not args.constraint:
        raise ConfigError("give --dbim PNG and/or --constraint PNG")
    if args.constraint and not args.constrained_adapter:
        raise ConfigError("--constraint needs --constrained-adapter FILE (an adapter trained with the constraint)")
    for flag, path in (("--constrained-adapter", args.constrained_adapter),
                       ("--unconstrained-adapter", args.unconstrained_adapter)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    try:
        lambdas = [float(x) for x in args.lambdas.split(",")]
    except ValueError as e:
        raise ConfigError(f"--lambdas {args.lambdas!r} must be a comma list of numbers") from e
    outs = {flag: check_writable_file(path, f"--{flag}", written_image)
            for flag, path in (("dbim", args.dbim), ("constraint", args.constraint)) if path}
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if "dbim" in outs:
        save_image(dbim_figure(_pipeline(), lambdas, args.aux_noun, args.seed), outs["dbim"], "--dbim")
        logger.info("wrote %s", outs["dbim"])
    if "constraint" in outs:
        figure = constraint_figure(_pipeline(args.unconstrained_adapter), _pipeline(args.constrained_adapter),
                                   seed=args.seed)
        save_image(figure, outs["constraint"], "--constraint")
        logger.info("wrote %s", outs["constraint"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
