"""Recording FP8 calibration data from the PyTorch reference pipeline (``python -m calibration.collect``).

Sample ``i`` renders prompt ``i`` of ``calibration/data/prompts.txt`` with ``1 + i % max_subjects`` synthetic
reference subjects (deterministic images) and seed ``seed + i``. The flat DiT inputs (``MODEL_IO["dit"]``) of
evenly spaced denoising steps are saved to ``dit_inputs.npz``; the largest ``|input|`` of every FP8 layer
(:func:`dynaip_trt.fp8.fp8_layers`) over all steps, and of its weight, to ``amax.json``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from dynaip_trt.cli import progress as progress_bar
from dynaip_trt.files import claim_dir
from dynaip_trt.fp8 import fp8_layers
from dynaip_trt.models import DynaIPModels
from dynaip_trt.pipeline import DynaIPPipeline

from .store import AmaxTable, load_prompts, owned_files, save_records, synthetic_reference

logger = logging.getLogger(__name__)


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
