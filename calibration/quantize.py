"""FP8 (E4M3, per-tensor) quantization of the MM-DiT's linear layers, its ONNX export, and its quality cost.

    python -m calibration.quantize --calib calib/tiny [--calibrator auto|modelopt|max] [--report [PATH]] \\
        [--export build/tiny] [--fp8-base fp16|bf16]

- Which layers: every ``nn.Linear`` of the double- and single-stream blocks except the AdaLayerNorm modulation
  projections (``norm*.linear``). The embedders (``x_embedder``, ``context_embedder``, ``time_text_embed``),
  ``norm_out`` and the final ``proj_out`` stay in the base precision (:func:`fp8_layers`).
- Calibration: max calibration of inputs and weights. With NVIDIA ModelOpt installed (``--calibrator modelopt``,
  the default when importable) ``modelopt.torch.quantization`` calibrates on the recorded DiT inputs (it runs
  on the CPU too); otherwise the amax recorded by ``python -m calibration.collect`` is used. Both give the same
  numbers (max of ``|x|``), tested.
- Quantized model: :class:`FP8Linear` fake-quantizes input and weight with ``scale = amax / 448`` through the
  custom op ``dynaip::fp8_qdq`` (``torch.float8_e4m3fn`` casts, saturating), which the ONNX exporter turns into
  ``QuantizeLinear``/``DequantizeLinear`` (opset 19, FLOAT8E4M3FN zero point) in front of each MatMul: the
  explicit-quantization pattern TensorRT builds FP8 GEMMs from. The rest of the graph is ``--fp8-base``
  (fp16 by default; bf16 avoids FP16 overflow on real FLUX weights but ONNX Runtime's CPU provider cannot run it).
- ``--report``: DiT velocity relative L2 on the recorded inputs, final-latent relative L2 and image PSNR of
  full generations (held-out seeds and references), for fp16, bf16 and FP8 against fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from dynaip_trt.errors import BackendUnavailableError, ConfigError, cli_main
from dynaip_trt.fp8 import FP8_E4M3_MAX, fp8_layers, to_fp8
from dynaip_trt.manifest import MODEL_IO, Manifest, fp8_variant
from dynaip_trt.metrics import cosine, psnr, rel_l2
from dynaip_trt.models import DynaIPModels
from dynaip_trt.files import atomic_path, staged_files
from export.onnx import (TORCH_DTYPES, GraphCheckError, add_variant, build_family, configure_logging,
                         export_model, variant_file)
from export.specs import DiTSpec
from export.wrappers import CastIO, DiTStep

from .store import AmaxTable, load_records

logger = logging.getLogger("calibration.quantize")

FP8_OPSET = 19  # QuantizeLinear/DequantizeLinear with float8 types need opset 19
@torch.library.custom_op("dynaip::fp8_qdq", mutates_args=())
def fp8_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP8 E4M3 quantize-dequantize: ``e4m3(clamp(x / scale, +-448)) * scale`` in ``x``'s dtype."""
    return (to_fp8(x, scale.float()).float() * scale.float()).to(x.dtype)


@fp8_qdq.register_fake
def _fp8_qdq_shape(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def fp8_translation_table() -> dict:
    """ONNX translation of ``dynaip::fp8_qdq``: ``QuantizeLinear`` to FLOAT8E4M3FN + ``DequantizeLinear``."""
    from onnxscript import opset19 as op

    def fp8_qdq_onnx(x, scale):
        zero = op.Constant(value=onnx.helper.make_tensor("zero", onnx.TensorProto.FLOAT8E4M3FN, [], [0.0]))
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero), scale)

    return {torch.ops.dynaip.fp8_qdq.default: fp8_qdq_onnx}


class FP8Linear(nn.Module):
    """``nn.Linear`` with FP8 fake quantization of input and weight: ``[..., in] -> [..., out]``.

    ``input_scale = input_amax / 448`` and ``weight_scale = weight_amax / 448`` are buffers (they follow
    ``.to(dtype)``); the bias is added in the base precision.
    """

    def __init__(self, linear: nn.Linear, input_amax: float, weight_amax: float):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("input_scale", torch.tensor(max(input_amax, 1e-12) / FP8_E4M3_MAX))
        self.register_buffer("weight_scale", torch.tensor(max(weight_amax, 1e-12) / FP8_E4M3_MAX))

    def _apply(self, fn, recurse=True):
        """Casts (``.half()``, ``.to(dtype)``) keep both scales positive: a tiny amax / 448 is 0 in fp16, and
        TensorRT's ONNX parser rejects a Q/DQ scale that is not positive. Each scale is clamped to the smallest
        positive normal value of its dtype (subnormals may be flushed to zero on the GPU)."""
        super()._apply(fn, recurse)
        for name in ("input_scale", "weight_scale"):
            scale = getattr(self, name)
            setattr(self, name, scale.clamp_min(torch.finfo(scale.dtype).tiny))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fp8_qdq(x, self.input_scale), fp8_qdq(self.weight, self.weight_scale), self.bias)


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


def quantize_transformer(transformer: nn.Module, table: AmaxTable) -> nn.Module:
    """A copy of ``transformer`` with every :func:`fp8_layers` layer replaced by :class:`FP8Linear`
    (the table is checked first, :func:`check_table`)."""
    check_table(transformer, table)
    q = copy.deepcopy(transformer)
    for name, layer in fp8_layers(q).items():
        amax = table.layers[name]
        parent, _, child = name.rpartition(".")
        setattr(q.get_submodule(parent) if parent else q, child, FP8Linear(layer, amax["input"], amax["weight"]))
    return q


def dit_variant(models: DynaIPModels, precision: str, table: AmaxTable | None = None, base: str = "fp16"
                ) -> nn.Module:
    """The flat DiT step (inputs of ``MODEL_IO["dit"]``, fp32 in and out) computed in ``precision``: fp32, fp16,
    bf16, or fp8 (FP8 linear layers from ``table`` on a ``base`` fp16/bf16 graph, as the exported engine)."""
    mode = models.config.adapter.attention_mode
    if precision == "fp8":
        if table is None:
            raise ConfigError("fp8 needs an amax table (python -m calibration.collect)")
        module, dtype = DiTStep(quantize_transformer(models.transformer, table), mode), TORCH_DTYPES[base]
    elif precision in TORCH_DTYPES:
        module, dtype = DiTStep(models.transformer, mode), TORCH_DTYPES[precision]
    else:
        raise ConfigError(f"unknown precision {precision!r}; choose from {[*TORCH_DTYPES, 'fp8']}")
    return module.eval() if dtype == torch.float32 else CastIO(module, dtype).eval()


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
                m(*(rec[n] for n in MODEL_IO["dit"][0]))

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # it prints "Inserted N quantizers"
        warnings.simplefilter("ignore")
        return mtq.quantize(module, {"quant_cfg": quant_cfg, "algorithm": "max"}, forward_loop=forward_loop)


def calibrate_modelopt(models: DynaIPModels, records: list[dict[str, torch.Tensor]], samples: int) -> AmaxTable:
    """Amax of every FP8 layer's input and weight from ModelOpt's max calibration over ``records``."""
    module = modelopt_fp8_dit(models, records)
    amax = {name: {kind: float(module.get_submodule(f"transformer.{name}.{kind}_quantizer").amax)
                   for kind in ("input", "weight")} for name in fp8_layers(models.transformer)}
    return AmaxTable(config=models.config.name, source="modelopt", samples=samples, records=len(records), layers=amax)


class FP8DiTSpec(DiTSpec):
    """The DiT spec whose module has FP8 linear layers (exported with :func:`fp8_translation_table`)."""

    def __init__(self, models: DynaIPModels, table: AmaxTable):
        super().__init__(models)
        self.table = table

    def module(self) -> nn.Module:
        return DiTStep(quantize_transformer(self.models.transformer, self.table), self.cfg.adapter.attention_mode)


def quantized_matmul_weights(model: onnx.ModelProto) -> list[str]:
    """Weight initializers of every MatMul/Gemm whose two inputs both come from ``DequantizeLinear`` (through
    Transpose/Reshape): the GEMMs TensorRT runs in FP8."""
    producers = {out: node for node in model.graph.node for out in node.output}

    def source(name: str):
        node = producers.get(name)
        while node is not None and node.op_type in ("Transpose", "Reshape"):
            node = producers.get(node.input[0])
        return node

    weights = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        a, b = source(node.input[0]), source(node.input[1])
        if a is not None and b is not None and a.op_type == b.op_type == "DequantizeLinear":
            q = producers.get(b.input[0])
            weights.append(q.input[0] if q is not None and q.op_type == "QuantizeLinear" else b.input[0])
    return weights


def check_qdq_placement(model: onnx.ModelProto, layers: list[str]) -> None:
    """Every layer of ``layers`` (names in the transformer) must be an FP8 GEMM and nothing else may be.

    Raises :class:`~export.onnx.GraphCheckError` naming the layers missing Q/DQ and the unexpected ones."""
    weights = quantized_matmul_weights(model)
    matched = {w for w in weights for n in layers if w == f"{n}.weight" or w.endswith(f".{n}.weight")}
    missing = [n for n in layers if not any(w == f"{n}.weight" or w.endswith(f".{n}.weight") for w in weights)]
    unexpected = sorted(set(weights) - matched)
    if missing or unexpected:
        raise GraphCheckError(f"FP8 Q/DQ placement: layers without Q/DQ {missing[:5]} ({len(missing)}), "
                              f"unexpected FP8 GEMMs {unexpected[:5]} ({len(unexpected)})")


def export_fp8_variant(build_dir: str | Path, models: DynaIPModels, table: AmaxTable, base: str = "fp16",
                       opset: int = FP8_OPSET) -> Manifest:
    """Export the FP8 DiT (``dit.fp8-<base>.onnx``, ``base`` elsewhere) into a build directory and list it in its
    manifest as the ``fp8-<base>`` variant of ``dit`` (:func:`~dynaip_trt.manifest.fp8_variant`). Q/DQ placement is
    checked before anything is moved into place."""
    build_dir = Path(build_dir)
    manifest = Manifest.load(build_dir)
    if "dit" not in manifest.models:
        raise ConfigError(f"{build_dir} has no dit model to add an fp8 variant to")
    if base not in ("fp16", "bf16"):
        raise ConfigError(f"--fp8-base {base!r}: choose fp16 or bf16")
    with staged_files(build_dir, prefix=".fp8-") as staging:
        files, _ = export_model(FP8DiTSpec(models, table), staging / variant_file("dit", fp8_variant(base)), opset,
                                TORCH_DTYPES[base], translation_table=fp8_translation_table())
        check_qdq_placement(onnx.load(str(files[0]), load_external_data=False), sorted(table.layers))
    final = [build_dir / f.name for f in files]
    add_variant(manifest.models["dit"], fp8_variant(base), final)
    manifest.save(build_dir)
    logger.info("wrote %s (%d FP8 linear layers, %s elsewhere, opset %d)", final[0], len(table.layers), base, opset)
    return manifest


def quality_report(models: DynaIPModels, table: AmaxTable, records: list[dict[str, torch.Tensor]],
                   samples: int = 2, seed: int = 1000, base: str = "fp16",
                   precisions: tuple[str, ...] = ("fp16", "bf16", "fp8")) -> dict[str, dict[str, float]]:
    """FP8's (and fp16's, bf16's) cost against the fp32 DiT, everything else fp32.

    Returns ``{precision: {"step_rel_l2": mean, "step_rel_l2_max", "step_cosine_min"`` (velocity on ``records``),
    ``"latent_rel_l2"`` (mean over ``samples`` full generations of final latents ``[1, N, 64]``),
    ``"image_psnr"`` (lowest PSNR in dB of their decoded images vs the fp32 images)}``. The generations use
    seeds and synthetic references (from ``seed``) other than the calibration's.
    """
    from dynaip_trt.pipeline import DynaIPPipeline

    from .collect import FlatDiTStages, fitted_prompts, sample_request

    names = MODEL_IO["dit"][0]
    ref_dit = dit_variant(models, "fp32")
    with torch.no_grad():
        ref_steps = [ref_dit(*(r[n] for n in names)) for r in records]
    prompts = fitted_prompts(models)
    requests = [sample_request(i, prompts, models.config.max_subjects, seed) for i in range(samples)]

    def generate(dit: nn.Module) -> list[tuple[torch.Tensor, np.ndarray]]:
        pipe = DynaIPPipeline(models.config, FlatDiTStages(models, dit), models.clip_tokenizer, models.t5_tokenizer)
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
            steps = [dit(*(r[n] for n in names)) for r in records]
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


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calibration.quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--calib", required=True, help="calibration directory (python -m calibration.collect --out)")
    p.add_argument("--config", default="tiny", help="named config when no weights are given (tiny, flux-dev)")
    p.add_argument("--base", help="local diffusers-format FLUX folder")
    p.add_argument("--clip", help="local transformers CLIP vision folder")
    p.add_argument("--adapter", "--weights", dest="adapter", help="DynaIP adapter .safetensors")
    p.add_argument("--seed", type=int, default=0, help="weights seed of seeded configs")
    p.add_argument("--calibrator", choices=("auto", "modelopt", "max"), default="auto",
                   help="modelopt: recalibrate with NVIDIA ModelOpt and save amax.json; max: use collect's amax; "
                        "auto: modelopt when installed")
    p.add_argument("--report", nargs="?", const="", default=None,
                   help="write the FP8/fp16/bf16 quality report (default <calib>/quality.json)")
    p.add_argument("--samples", type=int, default=2, help="full generations in the quality report")
    p.add_argument("--export", metavar="BUILD_DIR", help="add dit.fp8-<base>.onnx to this build directory")
    p.add_argument("--fp8-base", choices=("fp16", "bf16"), default="fp16", help="precision of the non-FP8 ops")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    configure_logging(args.verbose)
    models = build_family(args.config, args.base, args.clip, args.adapter, args.seed)
    collected = AmaxTable.load(args.calib, models.config)
    records = load_records(args.calib)
    table = recalibrate(models, collected, records, args.calib, args.calibrator)
    if args.report is not None:
        report = quality_report(models, table, records, args.samples, base=args.fp8_base)
        write_report(args.report or Path(args.calib) / "quality.json", models, table, len(records), report,
                     args.fp8_base)
    if args.export:
        export_fp8_variant(args.export, models, table, args.fp8_base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
