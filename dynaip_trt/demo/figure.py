"""The README's picture: references of held-out subjects -> images the embedded ``tiny`` default makes of them.

    python -m dynaip_trt.demo.figure --out docs/tiny-demo.png --references examples/tiny

Rows: one held-out subject (three rows) and two held-out subjects (two rows). Columns: the references (canonical
views), then one image per prompt at adapter scale 1, then the first prompt at adapter scale 0 (the base model alone,
which cannot know the subject). Every image is upscaled 4x (nearest neighbour) so the 32x32 pixels stay visible.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..cli import check_writable_file, cli_main, configure_logging, save_image, written_image
from ..errors import ConfigError
from ..pipeline import DynaIPPipeline
from .world import World

logger = logging.getLogger(__name__)

ZOOM = 4
GAP = 6
LABEL = 14
ONE_PROMPTS = ("an object on the left in a forest", "an object in the middle on a beach",
               "an object on the right in the snow", "an object in the middle at night")
TWO_PROMPTS = ("two objects in a forest", "two objects on a beach", "two objects in the snow", "two objects at night")
ONE_SUBJECTS = ("blue striped triangle", "red outlined triangle", "cyan solid cross")
TWO_SUBJECTS = (("yellow solid square", "magenta striped cross"), ("green striped circle", "red outlined triangle"))


def _subject(world: World, name: str):
    for s in world.split("heldout"):
        if s.name == name:
            return s
    raise ConfigError(f"{name!r} is not a held-out subject of the world")


def _zoom(image: Image.Image) -> Image.Image:
    return image.resize((image.width * ZOOM, image.height * ZOOM), Image.NEAREST)


def make_figure(pipe: DynaIPPipeline, seed: int = 0) -> Image.Image:
    """Render the figure (see the module docstring) with ``pipe`` (a 32x32 ``tiny`` pipeline)."""
    world = World(size=pipe.config.height, reference_size=pipe.config.vision.image_size)
    rows = [([_subject(world, n)], ONE_PROMPTS) for n in ONE_SUBJECTS]
    rows += [([_subject(world, a), _subject(world, b)], TWO_PROMPTS) for a, b in TWO_SUBJECTS]
    tile = pipe.config.height * ZOOM
    n_cols = 2 + len(ONE_PROMPTS) + 1
    width = n_cols * (tile + GAP) + GAP
    height = LABEL + len(rows) * (tile + GAP + LABEL) + GAP
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    headers = ["references", ""] + [f"prompt {i + 1}" for i in range(len(ONE_PROMPTS))] + ["scale 0"]
    for c, h in enumerate(headers):
        draw.text((GAP + c * (tile + GAP), 2), h, fill=(0, 0, 0))
    rng = np.random.default_rng(seed)
    for r, (subjects, prompts) in enumerate(rows):
        y = LABEL + r * (tile + GAP + LABEL) + LABEL
        draw.text((GAP, y - LABEL + 2), " + ".join(s.name for s in subjects) + ":  " + " | ".join(prompts),
                  fill=(60, 60, 60))
        refs = [Image.fromarray(world.reference(s, rng, augment=False)) for s in subjects]
        for c, ref in enumerate(refs):
            canvas.paste(_zoom(ref), (GAP + c * (tile + GAP), y))
        outputs = pipe(list(prompts), refs, scales=1.0, seed=seed + r, progress=False)
        baseline = pipe(prompts[0], refs, scales=0.0, seed=seed + r, progress=False)
        for c, im in enumerate([*outputs, *baseline]):
            canvas.paste(_zoom(im), (GAP + (2 + c) * (tile + GAP), y))
    return canvas


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynaip_trt.demo.figure", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output image (.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--references", metavar="DIR", help="also write the figure's held-out references there, one "
                   "PNG per subject (e.g. red_outlined_triangle.png): inputs for runtime.generate")
    p.add_argument("--weights-dir", help="a folder of trained weights to use instead of the embedded ones (a training "
                   "run's OUT/package)")
    args = p.parse_args(argv)
    configure_logging()
    out = check_writable_file(args.out, "--out", written_image)
    world = World(size=32, reference_size=32)
    names = sorted({*ONE_SUBJECTS, *(n for pair in TWO_SUBJECTS for n in pair)})
    refs = {Path(args.references) / f"{n.replace(' ', '_')}.png": n for n in names} if args.references else {}
    for path in refs:
        check_writable_file(path, "--references", written_image)
    if args.weights_dir:
        import json

        from ..configs import DynaIPConfig
        from ..weights import load_embedded

        folder = Path(args.weights_dir)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"--weights-dir {folder}: no config.json there (a train run's OUT/package folder)")
        cfg = DynaIPConfig.from_dict(json.loads((folder / "config.json").read_text()))
        pipe = DynaIPPipeline(load_embedded(cfg, folder))
    else:
        pipe = DynaIPPipeline.from_config("tiny")
    save_image(make_figure(pipe, args.seed), out)
    for path, name in refs.items():
        save_image(Image.fromarray(world.reference(_subject(world, name), np.random.default_rng(0), augment=False)),
                   path, "--references")
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
