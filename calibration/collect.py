"""Collect FP8 calibration data from the PyTorch reference pipeline.

    python -m calibration.collect --calib calib/tiny-random --samples 8 [--record-steps 4]
    python -m calibration.collect --base /models/FLUX.1-dev --clip /models/clip-vit-large-patch14 \\
        --adapter dynaip.safetensors --calib calib/flux-dev --samples 32         # real weights (a GPU machine)

Sample ``i`` renders prompt ``i`` of ``calibration/data/prompts.txt`` with ``1 + i % max_subjects`` synthetic
reference subjects (deterministic images) and seed ``seed + i``. The flat DiT inputs (``MODEL_IO["dit"]``) of
``--record-steps`` evenly spaced denoising steps are saved to ``dit_inputs.npz``; the largest ``|input|`` of
every FP8 layer (:func:`dynaip_trt.fp8.fp8_layers`) over all steps, and of its weight, to ``amax.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from dynaip_trt.cli import add_source_args, check_source_args, cli_main, configure_logging
from dynaip_trt.cli import progress as progress_bar
from dynaip_trt.configs import DEFAULT_CONFIG
from dynaip_trt.errors import ConfigError
from dynaip_trt.files import claim_dir
from dynaip_trt.fp8 import fp8_layers
from dynaip_trt.models import DynaIPModels
from dynaip_trt.pipeline import DynaIPPipeline
from dynaip_trt.weights import load_family

from .store import AmaxTable, load_prompts, owned_files, save_records, synthetic_reference

logger = logging.getLogger("calibration.collect")


class StepRecorder:
    """An ``on_step`` hook of :class:`~dynaip_trt.pipeline.DynaIPPipeline` keeping the flat DiT inputs of the steps
    in ``steps`` (CPU copies, ``MODEL_IO["dit"]`` names) in ``records``."""

    def __init__(self, steps: tuple[int, ...]):
        self.steps = set(steps)
        self.records: list[dict[str, torch.Tensor]] = []

    def __call__(self, step: int, feeds: dict[str, torch.Tensor]) -> None:
        if step in self.steps:
            self.records.append({k: v.detach().cpu().contiguous().clone() for k, v in feeds.items()})


@contextlib.contextmanager
def input_amax(layers: dict[str, nn.Linear]) -> Iterator[dict[str, float]]:
    """Track ``max |input|`` of each layer while the block runs: ``{name: amax}``, filled in place."""
    amax = {name: 0.0 for name in layers}

    def hook(name):
        def record(module, args):
            amax[name] = max(amax[name], float(args[0].detach().abs().max()))
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        yield amax
    finally:
        for h in handles:
            h.remove()


def fitted_prompts(models: DynaIPModels, prompts: list[str] | None = None) -> list[str]:
    """The calibration prompts, trailing words dropped until each fits the config's text length."""
    out = []
    for prompt in prompts or load_prompts():
        words = prompt.split()
        while len(words) > 1 and any(tok.overflow(" ".join(words)) for tok in (models.clip_tokenizer,
                                                                               models.t5_tokenizer)):
            words.pop()
        out.append(" ".join(words))
    return out


def sample_request(i: int, prompts: list[str], max_subjects: int, seed: int) -> tuple[str, list, int]:
    """(prompt, synthetic reference images, seed) of sample ``i``: 1..max_subjects subjects in turn."""
    subjects = 1 + i % max_subjects
    refs = [synthetic_reference(seed * 7919 + i * 16 + s) for s in range(subjects)]
    return prompts[i % len(prompts)], refs, seed + i


def record_steps(steps: int, count: int) -> tuple[int, ...]:
    """``count`` evenly spaced step indices of a ``steps``-step schedule (first and last included)."""
    return tuple(sorted({int(round(v)) for v in np.linspace(0, steps - 1, max(1, min(count, steps)))}))


def collect(models: DynaIPModels, out_dir: str | Path, samples: int = 8, steps_recorded: int = 4, seed: int = 0,
            prompts: list[str] | None = None, progress: bool = True, what: str | None = None) -> AmaxTable:
    """Run the reference pipeline on ``samples`` calibration requests; write ``dit_inputs.npz`` and ``amax.json``
    to ``out_dir`` and return the amax table. ``out_dir`` must be new, empty or a calibration folder of ours
    (:class:`~dynaip_trt.errors.OutputError` naming it as ``what`` otherwise, before any work)."""
    out_dir = claim_dir(out_dir, owned_files, what or f"out_dir={str(out_dir)!r}")
    cfg = models.config
    prompts = fitted_prompts(models, prompts)
    steps = record_steps(cfg.steps, steps_recorded)
    recorder = StepRecorder(steps)
    pipe = DynaIPPipeline(models, on_step=recorder)
    layers = fp8_layers(models.transformer)
    with input_amax(layers) as amax:
        for i in progress_bar(range(samples), "calibrate", progress):
            prompt, refs, sample_seed = sample_request(i, prompts, cfg.max_subjects, seed)
            pipe(prompt, refs, seed=sample_seed, output_type="latent", progress=False)
    table = AmaxTable(config=cfg.name, source="max-hooks", samples=samples, records=len(recorder.records),
                      layers={n: {"input": amax[n], "weight": float(layers[n].weight.detach().abs().max())}
                              for n in layers})
    save_records(out_dir, recorder.records)
    table.save(out_dir)
    logger.info("recorded %d DiT inputs (steps %s of %d samples) and the amax of %d linear layers in %s",
                len(recorder.records), list(steps), samples, len(layers), out_dir)
    return table


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calibration.collect", description=__doc__.split("\n\n")[0])
    add_source_args(p, DEFAULT_CONFIG)
    p.add_argument("--calib", metavar="DIR", help="calibration folder to write (default calib/<config>)")
    p.add_argument("--samples", type=int, default=8, help="calibration requests to run")
    p.add_argument("--record-steps", type=int, default=4, help="denoising steps recorded per request")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    configure_logging(args.verbose)
    if args.samples < 1 or args.record_steps < 1:
        raise ConfigError("--samples and --record-steps must be >= 1")
    check_source_args(args)
    if args.calib:  # before loading any model: nothing of the user's may be replaced
        claim_dir(args.calib, owned_files, f"--calib {args.calib}")
    models = load_family(args.config, args.base, args.clip, args.adapter, args.weights_seed)
    out = args.calib or f"calib/{models.config.name}"
    collect(models, out, args.samples, args.record_steps, args.weights_seed, what=f"--calib {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
