"""The command-line options ``export.onnx`` and ``export.build`` share (on top of :mod:`dynaip_trt.cli`'s
vocabulary): which weights, which opset, and the request envelope the graphs and engines must serve. Lean (no
torch), so ``--help`` and bad arguments answer at once."""

from __future__ import annotations

import argparse

from dynaip_trt.cli import add_source_args
from dynaip_trt.configs import DEFAULT_CONFIG, DynaIPConfig
from dynaip_trt.errors import ConfigError

from dynaip_trt.manifest import DEFAULT_OPSET

from .envelope import Envelope


def add_export_args(p: argparse.ArgumentParser) -> None:
    """Weights (``--config``/``--base``/``--clip``/``--adapter``/``--seed``), ``--engine-dir``, ``--opset`` and
    the envelope (``--max-subjects``, ``--batch``, ``--resolutions``)."""
    add_source_args(p, DEFAULT_CONFIG)
    p.add_argument("--engine-dir", metavar="DIR", help="build folder to write (default build/<config>); it must be "
                   "new, empty or a previous build: a folder holding other files is refused")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--max-subjects", type=int, help="largest subject count the graphs and engines serve")
    p.add_argument("--batch", type=int, default=None, help="largest batch the engines accept (default 4)")
    p.add_argument("--resolutions", help="HxW[,HxW...] the engines must serve (default: the config's)")
    p.add_argument("-v", "--verbose", action="store_true")


def parse_resolutions(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple((int(h), int(w)) for h, w in (r.lower().split("x") for r in text.split(",")))
    except ValueError:
        raise ConfigError(f"--resolutions {text!r}: expected HxW[,HxW...], e.g. 1024x1024,768x1344") from None


def envelope_from_args(args: argparse.Namespace, cfg: DynaIPConfig) -> Envelope:
    """The :class:`Envelope` of ``--batch``/``--max-subjects``/``--resolutions`` (defaults: 4, the config's)."""
    max_s = args.max_subjects or cfg.max_subjects
    if not 1 <= max_s <= cfg.max_subjects:
        raise ConfigError(f"--max-subjects {max_s} must be in 1..{cfg.max_subjects} (the config's maximum)")
    max_b = args.batch or 4
    if max_b < 1:
        raise ConfigError(f"--batch {max_b} must be >= 1")
    res = parse_resolutions(args.resolutions) if args.resolutions else ((cfg.height, cfg.width),)
    for h, w in res:
        if h % cfg.pixel_multiple or w % cfg.pixel_multiple or h <= 0 or w <= 0:
            raise ConfigError(f"--resolutions {h}x{w}: sides must be positive multiples of {cfg.pixel_multiple}")
    return Envelope(batch=(1, 1, max_b), subjects=(1, min(2, max_s), max_s), resolutions=res)
