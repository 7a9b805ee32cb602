"""FP8 (E4M3, per-tensor) quantization of the MM-DiT's linear layers: calibration with NVIDIA ModelOpt, and FP8's
quality cost (the command line is ``python -m calibration.quantize``).

- Which layers and how they run: :mod:`dynaip_trt.fp8` (:func:`~dynaip_trt.fp8.fp8_layers`,
  :class:`~dynaip_trt.fp8.FP8Linear` with static scales ``amax / 448``).
- Calibration: max calibration of inputs and weights. With NVIDIA ModelOpt installed (``--calibrator modelopt``,
  the default when importable) ``modelopt.torch.quantization`` calibrates on the recorded DiT inputs (it runs
  on the CPU too); otherwise the amax recorded by ``python -m calibration.collect`` is used. Both give the same
  numbers (max of ``|x|``), tested.
- ``--report``: DiT velocity relative L2 on the recorded inputs, final-latent relative L2 and image PSNR of
  full generations (held-out seeds and references), for fp16, bf16 and FP8 against fp32.

The FP8 ONNX graph (``dit.fp8.onnx``) is exported by :mod:`export.fp8` (``python -m export.build --precision fp8``
or ``python -m export.onnx --fp8``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dynaip_trt.errors import BackendUnavailableError, ConfigError
from dynaip_trt.files import atomic_path
from dynaip_trt.fp8 import fp8_layers, quantize_fp8

from dynaip_trt.manifest import FP8_BASES
from dynaip_trt.metrics import cosine, psnr, rel_l2
from dynaip_trt.models import DynaIPModels
from dynaip_trt.pipeline import DynaIPPipeline
from dynaip_trt.stage_modules import DiTStep

from .recording import fitted_prompts, sample_request
from .store import AmaxTable

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_table(transformer: nn.Module, table: AmaxTable) -> None:
    """The table must have an entry for every :func:`fp8_layers` layer whose weight amax matches the weights.

    Raises :class:`ConfigError` when the table lacks a layer or was calibrated for other weights."""
    for name, layer in fp8_layers(transformer).items():
        if name not in table.layers:
            raise ConfigError(f"the amax table has no entry for layer {name}; re-run python -m calibration.collect")
        calibrated = table.layers[name]["weight"]
        actual = float(layer.weight.detach().abs().max())
        if abs(actual - calibrated) > 1e-3 * max(actual, 1e-12):
            raise ConfigError(f"layer {name}: weight amax {actual:.6g} differs from the calibrated {calibrated:.6g}"
                              f"; the amax table was made for other weights: re-run python -m calibration.collect")


def quantized_transformer(transformer: nn.Module, table: AmaxTable) -> nn.Module:
    """A copy of ``transformer`` whose :func:`fp8_layers` run FP8 Q/DQ with the table's static scales (the table
    is checked first, :func:`check_table`)."""
    check_table(transformer, table)
    return quantize_fp8(transformer, "qdq", table.layers)


def dit_variant(models: DynaIPModels, precision: str, table: AmaxTable | None = None, base: str = "fp16"
                ) -> nn.Module:
    """The flat DiT step (inputs of ``MODEL_IO["dit"]``, fp32 in and out) computed in ``precision``: fp32, fp16,
    bf16, or fp8 (FP8 linear layers from ``table`` on a ``base`` fp16/bf16 graph, as the exported engine)."""
    mode = models.config.adapter.attention_mode
    if precision == "fp8":
        if table is None:
            raise ConfigError("fp8 needs an amax table (python -m calibration.collect)")
        if base not in FP8_BASES:
            raise ConfigError(f"FP8 base precision {base!r}: choose one of {list(FP8_BASES)}")
        return DiTStep(quantized_transformer(models.transformer, table), mode, TORCH_DTYPES[base]).eval()
    if precision not in TORCH_DTYPES:
        raise ConfigError(f"unknown precision {precision!r}; choose from {[*TORCH_DTYPES, 'fp8']}")
    return DiTStep(models.transformer, mode, TORCH_DTYPES[precision]).eval()


def modelopt_fp8_dit(models: DynaIPModels, records: list[dict[str, torch.Tensor]]) -> nn.Module:
    """A ModelOpt FP8 fake-quantized copy of the flat DiT step (the :func:`fp8_layers` layers only, max
    calibration over ``records``). Raises :class:`BackendUnavailableError` without ModelOpt."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its untested-transformers-version warning
            import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise BackendUnavailableError("ModelOpt calibration needs NVIDIA ModelOpt: pip install nvidia-modelopt[torch] "
                                      "(or use --calibrator max)") from e
    fp8 = {"num_bits": (4, 3), "axis": None}
    quant_cfg: dict = {"*": {"enable": False}}
    for name in fp8_layers(models.transformer):
        quant_cfg[f"transformer.{name}.input_quantizer"] = fp8
        quant_cfg[f"transformer.{name}.weight_quantizer"] = fp8
    module = copy.deepcopy(DiTStep(models.transformer, models.config.adapter.attention_mode)).eval()

    def forward_loop(m: nn.Module) -> None:
        with torch.no_grad():
            for rec in records:
                m(**rec)

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # it prints "Inserted N quantizers"
        warnings.simplefilter("ignore")
        return mtq.quantize(module, {"quant_cfg": quant_cfg, "algorithm": "max"}, forward_loop=forward_loop)


def calibrate_modelopt(models: DynaIPModels, records: list[dict[str, torch.Tensor]], samples: int) -> AmaxTable:
    """Amax of every FP8 layer's input and weight from ModelOpt's max calibration over ``records``."""
    module = modelopt_fp8_dit(models, records)
    amax = {name: {kind: float(module.get_submodule(f"transformer.{name}.{kind}_quantizer").amax)
                   for kind in ("input", "weight")} for name in fp8_layers(models.transformer)}
    return AmaxTable(config=models.config.name, source="modelopt", samples=samples, records=len(records), layers=amax)


def quality_report(models: DynaIPModels, table: AmaxTable, records: list[dict[str, torch.Tensor]],
                   samples: int = 2, seed: int = 1000, base: str = "fp16",
                   precisions: tuple[str, ...] = ("fp16", "bf16", "fp8")) -> dict[str, dict[str, float]]:
    """FP8's (and fp16's, bf16's) cost against the fp32 DiT, everything else fp32.

    Returns ``{precision: {"step_rel_l2": mean, "step_rel_l2_max", "step_cosine_min"`` (velocity on ``records``),
    ``"latent_rel_l2"`` (mean over ``samples`` full generations of final latents ``[1, N, 64]``),
    ``"image_psnr"`` (lowest PSNR in dB of their decoded images vs the fp32 images)}``. The generations use
    seeds and synthetic references (from ``seed``) other than the calibration's.
    """
    ref_dit = dit_variant(models, "fp32")
    with torch.no_grad():
        ref_steps = [ref_dit(**r)[0] for r in records]
    prompts = fitted_prompts(models)
    requests = [sample_request(i, prompts, models.config.max_subjects, seed) for i in range(samples)]

    def generate(dit: nn.Module) -> list[tuple[torch.Tensor, np.ndarray]]:
        pipe = DynaIPPipeline(models, dit=dit)
        out = []
        for prompt, refs, s in requests:
            lat = pipe(prompt, refs, seed=s, output_type="latent", progress=False)
            out.append((lat, np.asarray(pipe.decode(lat, models.config.height, models.config.width)[0])))
        return out

    reference = generate(ref_dit)
    report = {}
    for precision in precisions:
        dit = dit_variant(models, precision, table, base)
        with torch.no_grad():
            steps = [dit(**r)[0] for r in records]
        step_err = [rel_l2(a, b) for a, b in zip(steps, ref_steps)]
        gen = generate(dit)
        report[precision] = {
            "step_rel_l2": float(np.mean(step_err)), "step_rel_l2_max": float(np.max(step_err)),
            "step_cosine_min": min(cosine(a, b) for a, b in zip(steps, ref_steps)),
            "latent_rel_l2": float(np.mean([rel_l2(g[0], r[0]) for g, r in zip(gen, reference)])),
            "image_psnr": min(psnr(g[1], r[1]) for g, r in zip(gen, reference)),
        }
    return report


def format_report(report: dict[str, dict[str, float]]) -> str:
    """A fixed-width table of :func:`quality_report`."""
    cols = ("step_rel_l2", "step_rel_l2_max", "step_cosine_min", "latent_rel_l2", "image_psnr")
    lines = ["precision " + " ".join(f"{c:>16}" for c in cols)]
    lines += [f"{p:<9} " + " ".join(f"{row[c]:>16.4g}" for c in cols) for p, row in report.items()]
    return "\n".join(lines)


def modelopt_available() -> bool:
    """Whether ``modelopt.torch.quantization`` can be imported."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization  # noqa: F401
    except ImportError:
        return False
    return True


def recalibrate(models: DynaIPModels, table: AmaxTable, records: list[dict[str, torch.Tensor]],
                calib_dir: str | Path, calibrator: str = "auto") -> AmaxTable:
    """The amax table to quantize with: ModelOpt's max calibration over ``records`` (saved to ``calib_dir``) for
    ``calibrator`` ``"modelopt"``, or ``"auto"`` with ModelOpt installed; otherwise ``table`` (collect's)."""
    if calibrator == "max" or (calibrator == "auto" and not modelopt_available()):
        logger.info("using the max calibration of calibration.collect (%s)",
                    "--calibrator max" if calibrator == "max" else "NVIDIA ModelOpt is not installed")
        return table
    calibrated = calibrate_modelopt(models, records, table.samples)
    drift = max(abs(calibrated.layers[n]["input"] - a["input"]) / a["input"] for n, a in table.layers.items())
    logger.info("ModelOpt calibration of %d layers; largest input-amax difference to collect's: %.2e",
                len(calibrated.layers), drift)
    calibrated.save(calib_dir)
    return calibrated


def write_report(path: str | Path, models: DynaIPModels, table: AmaxTable, records: int,
                 report: dict[str, dict[str, float]], base: str) -> Path:
    """Log :func:`quality_report`'s table and write it as JSON to ``path`` (atomically)."""
    logger.info("quality vs the fp32 DiT on held-out requests (%s amax, fp8 on %s):\n%s", table.source, base,
                format_report(report))
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"config": models.config.name, "amax_source": table.source, "fp8_base": base,
                                   "records": records, "rows": report}, indent=1))
    return Path(path)
