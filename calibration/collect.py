"""Collect FP8 calibration data from the PyTorch reference pipeline.

    python -m calibration.collect --config tiny --out calib/tiny --samples 8 [--record-steps 4]
    python -m calibration.collect --base /models/FLUX.1-dev --clip /models/clip-vit-large-patch14 \\
        --adapter dynaip.safetensors --out calib/flux-dev --samples 32         # real weights (a GPU machine)

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
from tqdm.auto import tqdm

from dynaip_trt.errors import ConfigError, cli_main
from dynaip_trt.files import claim_dir
from dynaip_trt.fp8 import fp8_layers
from dynaip_trt.manifest import MODEL_IO
from dynaip_trt.models import DynaIPModels
from dynaip_trt.pipeline import DynaIPPipeline, TorchStages, dit_feeds
from export.onnx import build_family, configure_logging
from export.wrappers import DiTStep

from .store import AmaxTable, load_prompts, owned_files, save_records, synthetic_reference

logger = logging.getLogger("calibration.collect")


class FlatDiTStages(TorchStages):
    """PyTorch reference stages whose DiT step is a module with the exported flat signature.

    ``dit``: a module taking the inputs of ``MODEL_IO["dit"]`` in order -> velocity ``[B, N, 64]`` (default: the
    fp32 :class:`~export.wrappers.DiTStep`; a reduced-precision or FP8 copy for quality comparisons). The inputs
    of the steps in ``record_steps`` (counted from the last :meth:`new_sample`) are kept in ``records``.
    """

    def __init__(self, models: DynaIPModels, dit: nn.Module | None = None, record_steps: tuple[int, ...] = ()):
        super().__init__(models)
        self.flat_dit = dit or DiTStep(models.transformer, models.config.adapter.attention_mode)
        self.record_steps = set(record_steps)
        self.records: list[dict[str, torch.Tensor]] = []
        self.step = 0

    def new_sample(self) -> None:
        self.step = 0

    @torch.no_grad()
    def dit(self, latents, text, pooled, timestep, guidance, img_ids, txt_ids, ref) -> torch.Tensor:
        feeds = dit_feeds(latents, text, pooled, timestep, guidance, img_ids, txt_ids, ref)
        if self.step in self.record_steps:
            self.records.append({k: v.detach().cpu().contiguous().clone() for k, v in feeds.items()})
        self.step += 1
        return self.flat_dit(*(feeds[n] for n in MODEL_IO["dit"][0])).float()


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
    tok, limit = models.t5_tokenizer, models.config.text.max_text_length
    out = []
    for prompt in prompts or load_prompts():
        words = prompt.split()
        while len(words) > 1 and tok.count(" ".join(words)) > limit:
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
    stages = FlatDiTStages(models, record_steps=steps)
    pipe = DynaIPPipeline(cfg, stages, models.clip_tokenizer, models.t5_tokenizer)
    layers = fp8_layers(models.transformer)
    with input_amax(layers) as amax:
        for i in tqdm(range(samples), desc="calibrate", disable=not progress):
            prompt, refs, sample_seed = sample_request(i, prompts, cfg.max_subjects, seed)
            stages.new_sample()
            pipe(prompt, refs, seed=sample_seed, output_type="latent", progress=False)
    table = AmaxTable(config=cfg.name, source="max-hooks", samples=samples, records=len(stages.records),
                      layers={n: {"input": amax[n], "weight": float(layers[n].weight.detach().abs().max())}
                              for n in layers})
    save_records(out_dir, stages.records)
    table.save(out_dir)
    logger.info("recorded %d DiT inputs (steps %s of %d samples) and the amax of %d linear layers in %s",
                len(stages.records), list(steps), samples, len(layers), out_dir)
    return table


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calibration.collect", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="named config when no weights are given (tiny, flux-dev)")
    p.add_argument("--base", help="local diffusers-format FLUX folder")
    p.add_argument("--clip", help="local transformers CLIP vision folder")
    p.add_argument("--adapter", "--weights", dest="adapter", help="DynaIP adapter .safetensors")
    p.add_argument("--out", help="calibration directory (default calib/<config>)")
    p.add_argument("--samples", type=int, default=8, help="calibration requests to run")
    p.add_argument("--record-steps", type=int, default=4, help="denoising steps recorded per request")
    p.add_argument("--seed", type=int, default=0, help="weights seed (seeded configs) and first request seed")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    configure_logging(args.verbose)
    if args.samples < 1 or args.record_steps < 1:
        raise ConfigError("--samples and --record-steps must be >= 1")
    if args.out:  # before loading any model: nothing of the user's may be replaced
        claim_dir(args.out, owned_files, f"--out {args.out}")
    models = build_family(args.config, args.base, args.clip, args.adapter, args.seed)
    out = args.out or f"calib/{models.config.name}"
    collect(models, out, args.samples, args.record_steps, args.seed, what=f"--out {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
