"""The FP8 DiT graphs: ``dit.fp8-<base>.onnx`` with ``QuantizeLinear``/``DequantizeLinear`` (FLOAT8E4M3FN, opset 19)
in front of exactly the GEMMs :func:`dynaip_trt.fp8.fp8_layers` names, the rest in a base precision (manifest
variant ``fp8-<base>``, :func:`dynaip_trt.manifest.fp8_variant`): the explicit-quantization pattern TensorRT builds
FP8 GEMMs from. The engine's base is bf16 by default (``export.build --fp8-base``); ``dit.fp8-fp16.onnx`` is always
written too: ONNX Runtime's CPU provider has no bf16 kernels, so it is the CPU parity and quality oracle.

:func:`prepare_fp8` is the whole step (calibrate or reuse a calibration folder, export, check placement, record
the quality cost) that ``export.build --precision fp8`` and ``export.onnx --fp8`` run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import torch

from calibration.quantization import TORCH_DTYPES, check_table, dit_variant, quality_report, recalibrate, \
    write_report
from calibration.recording import collect
from calibration.store import AmaxTable, load_records
from dynaip_trt.errors import ConfigError
from dynaip_trt.files import staged_files
from dynaip_trt.manifest import FP8_BASES, FP8_QUALITY_FILE, Manifest, fp8_variant
from dynaip_trt.models import DynaIPModels

from .engines import DEFAULT_FP8_BASE
from .exporter import add_variant, export_model, variant_file
from .graph import GraphCheckError
from .specs import DiTSpec

logger = logging.getLogger(__name__)

FP8_OPSET = 19  # QuantizeLinear/DequantizeLinear with float8 types need opset 19


def fp8_translation_table() -> dict:
    """ONNX translation of ``dynaip::fp8_qdq``: ``QuantizeLinear`` to FLOAT8E4M3FN + ``DequantizeLinear``."""
    from onnxscript import opset19 as op

    def fp8_qdq_onnx(x, scale):
        zero = op.Constant(value=onnx.helper.make_tensor("zero", onnx.TensorProto.FLOAT8E4M3FN, [], [0.0]))
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero), scale)

    return {torch.ops.dynaip.fp8_qdq.default: fp8_qdq_onnx}


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
    manifest as the ``fp8-<base>`` variant of ``dit``. Q/DQ placement is checked before anything is moved into
    place."""
    build_dir = Path(build_dir)
    manifest = Manifest.load(build_dir)
    if "dit" not in manifest.models:
        raise ConfigError(f"{build_dir} has no dit model to add an fp8 variant to")
    if base not in FP8_BASES:
        raise ConfigError(f"FP8 base precision {base!r}: choose one of {list(FP8_BASES)}")
    with staged_files(build_dir, prefix=".fp8-") as staging:
        files, _ = export_model(DiTSpec(models), staging / variant_file("dit", fp8_variant(base)), opset,
                                TORCH_DTYPES[base],
                                module=dit_variant(models, "fp8", table, base),
                                translation_table=fp8_translation_table())
        check_qdq_placement(onnx.load(str(files[0]), load_external_data=False), sorted(table.layers))
    final = [build_dir / f.name for f in files]
    add_variant(manifest.models["dit"], fp8_variant(base), final)
    manifest.save(build_dir)
    logger.info("wrote %s (%d FP8 linear layers, %s elsewhere, opset %d)", final[0], len(table.layers), base, opset)
    return manifest


def prepare_fp8(models: DynaIPModels, build_dir: str | Path, calib_dir: str | Path, samples: int = 8,
                progress: bool = True, what: str | None = None, base: str = DEFAULT_FP8_BASE) -> dict:
    """Calibrate (reusing ``calib_dir`` when it was collected for these weights), add the FP8 DiT graphs to the
    build (``dit.fp8-<base>.onnx`` for the engine and ``dit.fp8-fp16.onnx``, the CPU oracle) and write the quality
    report of FP8 on ``base`` (``fp8_quality.json``: PyTorch, where bf16 runs on the CPU); returns the report (see
    :func:`calibration.quantize.quality_report`). ``what`` names ``calib_dir`` in errors."""
    build_dir, calib_dir = Path(build_dir), Path(calib_dir)
    try:
        table = AmaxTable.load(calib_dir, models.config)
        check_table(models.transformer, table)
        records = load_records(calib_dir)
        logger.info("reusing the calibration data in %s (%d records)", calib_dir, len(records))
    except ConfigError as e:
        logger.info("collecting calibration data in %s (%s)", calib_dir, e)
        table = collect(models, calib_dir, samples=samples, progress=progress,
                        what=what or f"calib_dir={str(calib_dir)!r}")
        records = load_records(calib_dir)
    table = recalibrate(models, table, records, calib_dir)
    for b in dict.fromkeys((base, "fp16")):
        export_fp8_variant(build_dir, models, table, b)
    report = quality_report(models, table, records, base=base, precisions=(base, "fp8"))
    write_report(build_dir / FP8_QUALITY_FILE, models, table, len(records), report, base)
    return report
