"""Parity harness: TensorRT vs ONNX Runtime vs the PyTorch outputs saved at export, with polygraphy.

    python -m export.parity --engine-dir build/tiny [--precisions fp32,fp16,bf16,fp8|auto] [--models dit,vae] \\
        [--backends auto|onnxruntime,tensorrt] [--json report.json] [-v]

``export.onnx`` runs every fp32 PyTorch model once on inputs at the envelope's opt point (batch 2) and saves
inputs and outputs as ``reference/<model>.npz``, hashed in the manifest like every other file. This harness feeds
those inputs to every graph of the build through polygraphy's ONNX Runtime runner (CPU provider) and, with
TensorRT and a GPU, to each model's engine through its TrtRunner. Each result is compared with the saved fp32
PyTorch outputs, and each engine also with ONNX Runtime on the graph it was built from (same precision). One row
per comparison: relative L2, max abs and cosine (the worst over the model's outputs), and PASS when the relative
L2 is within the precision's tolerance. What a backend cannot run here is reported as SKIP with the reason.

Exit codes: 0 every comparison passed; 1 a comparison failed; 2 bad arguments or build directory (unknown model or
precision, missing or tampered files); 3 a requested backend is not installed (the message says what to install).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynaip_trt.cli import check_writable_file, cli_main, configure_logging, write_json_report, written_json_report
from dynaip_trt.cli import progress as progress_bar
from dynaip_trt.errors import BackendUnavailableError, ConfigError, InputError, import_optional
from dynaip_trt.manifest import MODEL_IO, PRECISIONS, Manifest, check_profile, check_tensorrt_section, \
    safe_join
from dynaip_trt.metrics import report
from dynaip_trt.tensorrt_api import import_tensorrt_gpu

from .engines import base_precision
from .references import Arrays, load_references

logger = logging.getLogger("export.parity")

# Relative L2 tolerances against the fp32 PyTorch outputs (and between TensorRT and ONNX Runtime on the same graph).
# Measured on the tiny build (python -m export.onnx --fp16 --bf16; fp8: calibration.collect --samples 4, then
# calibration.quantize --export) on ONNX Runtime's CPU provider, worst over every model and 24 input sets (seeds 0-7
# at 2x2, 1x1 and 2x4 batch x subjects, 64x64) with the worst model in brackets; each tolerance is 3-4x that worst.
FP32_REL_L2 = 3e-5  # measured 7.4e-6 (dit; others <= 1.5e-6): float reassociation only
FP16_REL_L2 = 3e-3  # measured 8.0e-4 (vae; dit 5.4e-4): 11-bit significand
# measured with PyTorch on the CPU (ONNX Runtime's CPU provider has no bf16 kernels): 2.5e-2 (dit; 9.8e-2 before
# dynaip_trt.attention.FP32TimeEmbedding kept FLUX's timestep/guidance * 1000 out of bf16): 8-bit significand.
BF16_REL_L2 = 1e-1
FP8_REL_L2 = 5e-2  # measured 1.3e-2 (dit, median 7.2e-3): FP8 E4M3 (4-bit significand) in every block GEMM, fp16 around
# fp32 engines: TensorRT's TF32 flag is on by default (export.build --no-tf32 clears it), and TF32 rounds GEMM inputs
# to an 11-bit significand, as fp16 does.
TF32_REL_L2 = FP16_REL_L2
TOLERANCES = {"fp32": FP32_REL_L2, "fp16": FP16_REL_L2, "bf16": BF16_REL_L2, "fp8": FP8_REL_L2}

# Graphs ONNX Runtime's CPU provider cannot run (reported as SKIP when it fails on them; any other failure is FAIL).
ORT_CPU_UNSUPPORTED = {"bf16": "ONNX Runtime's CPU provider has no bfloat16 kernels (MatMul, Add, Conv...)"}
BACKENDS = ("onnxruntime", "tensorrt")
REFERENCE = "pytorch-fp32"
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
EXIT_FAILED, EXIT_NEEDS_BACKEND = 1, 3


@dataclass
class Row:
    """One comparison: ``backend`` running ``model``'s ``precision`` graph/engine against ``vs`` (the saved PyTorch
    fp32 outputs, or ONNX Runtime on the same graph). Metrics are the worst over the model's outputs; ``None`` for
    a skipped row, whose ``note`` says why."""

    model: str
    precision: str
    backend: str
    vs: str
    rel_l2: float | None = None
    max_abs: float | None = None
    cosine: float | None = None
    tolerance: float | None = None
    result: str = SKIP
    note: str = ""


def compare(row: Row, actual: Arrays, expected: Arrays, tolerance: float) -> Row:
    """Fill ``row`` with the metrics of ``actual`` against ``expected`` (same keys) and PASS/FAIL: PASS when the
    largest relative L2 over the outputs is at most ``tolerance`` (NaN fails)."""
    row.tolerance = tolerance
    bad = [f"{n} missing" if n not in actual else f"{n} {actual[n].shape} != {expected[n].shape}"
           for n in expected if n not in actual or actual[n].shape != expected[n].shape]
    if bad:
        row.result, row.note = FAIL, "outputs differ: " + ", ".join(bad)
        return row
    metrics = [report(actual[n], expected[n]) for n in expected]
    row.rel_l2 = float(np.max([m["rel_l2"] for m in metrics]))
    row.max_abs = float(np.max([m["max_abs"] for m in metrics]))
    row.cosine = float(np.min([m["cosine"] for m in metrics]))
    row.result = PASS if row.rel_l2 <= tolerance else FAIL
    return row


def first_line(error: Exception, limit: int = 120) -> str:
    """The start of an error's message, for a row's note."""
    return (str(error).splitlines() or [""])[0][:limit]


def precision_family(precision: str) -> str:
    """``fp8`` for the FP8 graph keys ``fp8-bf16``/``fp8-fp16``; other precisions are their own family."""
    return precision.split("-", 1)[0]


def tolerance_of(precision: str) -> float:
    """Relative L2 tolerance of a graph or engine precision; an FP8 graph on a bf16 base gets the larger of the
    FP8 and bf16 tolerances (both roundings add up)."""
    return max(TOLERANCES[precision_family(precision)], TOLERANCES[base_precision(precision)])


def run_runner(runner, feeds: Arrays, as_torch: bool = False) -> Arrays:
    """Activate a polygraphy runner, run ``feeds`` once (each cast to the dtype its input declares) and return
    float32 copies of its outputs (runners reuse their output buffers).

    ``as_torch``: feed CPU torch tensors (polygraphy then returns torch tensors): numpy has no bfloat16, so a
    runner with bf16 inputs or outputs (TensorRT engines) is only usable this way; outputs are compared through
    a float32 view."""
    from polygraphy.datatype import DataType

    with runner:
        meta = runner.get_input_metadata(use_numpy_dtypes=False)
        if as_torch:
            import torch

            feed = {n: torch.from_numpy(np.ascontiguousarray(a)).to(DataType.to_dtype(meta[n].dtype, "torch"))
                    for n, a in feeds.items()}
            return {n: o.detach().to("cpu", torch.float32).numpy().copy() for n, o in runner.infer(feed).items()}
        feed = {n: np.ascontiguousarray(a, dtype=DataType.to_dtype(meta[n].dtype, "numpy"))
                for n, a in feeds.items()}
        return {n: np.array(o, dtype=np.float32) for n, o in runner.infer(feed).items()}


def run_onnxruntime(path: Path, feeds: Arrays) -> Arrays:
    """Outputs of the ONNX graph ``path`` on ONNX Runtime's CPU provider (polygraphy's OnnxrtRunner)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return run_runner(OnnxrtRunner(SessionFromOnnx(str(path), providers=["cpu"])), feeds)


def run_tensorrt(path: Path, feeds: Arrays) -> Arrays:
    """Outputs of the serialized TensorRT engine ``path`` on the current GPU (polygraphy's TrtRunner)."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return run_runner(TrtRunner(EngineFromBytes(BytesFromPath(str(path)))), feeds, as_torch=True)


def tensorrt_unavailable() -> str | None:
    """Why TensorRT engines cannot run here (no ``tensorrt`` module, no GPU), or ``None`` when they can."""
    try:
        import_tensorrt_gpu(what="the TensorRT half of the parity check")
    except BackendUnavailableError as e:
        return str(e)
    return None


def quiet_polygraphy(verbose: bool) -> None:
    """Polygraphy logs through its own logger: errors only unless ``verbose``."""
    if not verbose:
        from polygraphy.logger import G_LOGGER

        G_LOGGER.module_severity = G_LOGGER.ERROR


def resolve_backends(spec: str) -> tuple[str, ...]:
    """``auto`` -> ONNX Runtime, plus TensorRT when it can run here; or an explicit comma list of :data:`BACKENDS`.

    Raises :class:`ConfigError` for an unknown backend and :class:`BackendUnavailableError` (naming what to
    install) when a requested backend cannot run here."""
    if spec == "auto":
        import_optional("onnxruntime", "the onnxruntime comparison", "pip install -e .[onnx]")
        reason = tensorrt_unavailable()
        if reason is None:
            return BACKENDS
        logger.info("comparing ONNX Runtime with the saved PyTorch outputs only: the TensorRT half needs TensorRT "
                    "and an NVIDIA GPU (%s)", reason)
        return ("onnxruntime",)
    backends = tuple(b.strip() for b in spec.split(",") if b.strip())
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise ConfigError(f"--backends {spec!r}: choose auto or a comma list of {list(BACKENDS)}")
    if "onnxruntime" in backends:
        import_optional("onnxruntime", "the onnxruntime comparison", "pip install -e .[onnx]")
    if "tensorrt" in backends:
        reason = tensorrt_unavailable()
        if reason is not None:
            raise BackendUnavailableError(reason)
    return backends


def parse_list(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...] | None:
    """A comma list of ``allowed`` names, or ``None`` for ``auto``; :class:`ConfigError` names unknown ones."""
    if text == "auto":
        return None
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in items if s not in allowed]
    if unknown or not items:
        raise ConfigError(f"--{what}: unknown {what} {unknown or [text]}; choose auto or from {list(allowed)}")
    return items


def engine_precision(manifest: Manifest, name: str) -> tuple[str, float]:
    """Precision of ``name``'s engine (that of the graph it was built from, recorded in the manifest's
    ``tensorrt`` section) and its tolerance. fp32 engines get :data:`TF32_REL_L2` unless built with TF32 cleared
    (``export.build --no-tf32``): TensorRT's TF32 flag is on by default."""
    plan = (manifest.tensorrt or {}).get("engines", {}).get(name, {})
    precision = plan.get("precision", manifest.models[name].precision)
    tf32 = precision == "fp32" and plan.get("tf32", True)
    return precision, TF32_REL_L2 if tf32 else tolerance_of(precision)


def select_graphs(graphs: dict[str, str], precisions: tuple[str, ...] | None) -> tuple[str, ...]:
    """The graph keys of ``graphs`` (``ModelEntry.graphs()``) whose precision family is in ``precisions``
    (``None``: all), in :data:`PRECISIONS` order; a requested precision the model has no graph of stays (its row
    says so)."""
    wanted = []
    for p in precisions or PRECISIONS:
        keys = sorted(k for k in graphs if precision_family(k) == p)
        wanted += keys or ([p] if precisions else [])
    return tuple(wanted)


def onnxruntime_rows(directory: Path, name: str, graphs: dict[str, str], precisions: tuple[str, ...],
                     feeds: Arrays, expected: Arrays) -> tuple[list[Row], dict[str, Arrays]]:
    """ONNX Runtime on ``name``'s graph of each of ``precisions`` against the saved PyTorch outputs; returns the
    rows and ``{precision: outputs}`` of the graphs that ran (for the TensorRT comparison)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
    from polygraphy.exception import PolygraphyException

    rows, outputs = [], {}
    for precision in precisions:
        row = Row(name, precision, "onnxruntime", REFERENCE)
        if precision not in graphs:
            row.note = f"no {precision} graph of {name} in this build (it has {sorted(graphs)})"
        else:
            try:
                outputs[precision] = run_onnxruntime(safe_join(directory, graphs[precision]), feeds)
            except (ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.InvalidGraph, ort_errors.NotImplemented,
                    ort_errors.RuntimeException, PolygraphyException) as e:
                if base_precision(precision) in ORT_CPU_UNSUPPORTED:
                    row.note = f"{ORT_CPU_UNSUPPORTED[base_precision(precision)]}: {first_line(e)}"
                else:
                    row.result, row.note = FAIL, f"ONNX Runtime failed: {first_line(e)}"
            else:
                compare(row, outputs[precision], expected, tolerance_of(precision))
        rows.append(row)
    return rows, outputs


def tensorrt_rows(directory: Path, manifest: Manifest, name: str, precisions: tuple[str, ...], feeds: Arrays,
                  expected: Arrays, ort_outputs: dict[str, Arrays] | None) -> list[Row]:
    """``name``'s engine against the saved PyTorch outputs and, when ``ort_outputs`` is given, against ONNX
    Runtime on the graph of the engine's precision."""
    from polygraphy.exception import PolygraphyException

    entry = manifest.models[name]
    precision, tolerance = engine_precision(manifest, name)
    row = Row(name, precision, "tensorrt", REFERENCE)
    if not entry.engine:
        row.note = "no TensorRT engine in this build (python -m export.build)"
    elif precision not in precisions:
        row.note = f"the engine is {precision}, not among the requested precisions"
    else:
        try:
            check_profile(name, entry.profile, {n: a.shape for n, a in feeds.items()})
        except InputError as e:
            row.note = f"reference inputs outside the engine's profile: {e}"
    if row.note:
        return [row]
    try:
        actual = run_tensorrt(safe_join(directory, entry.engine), feeds)
    except PolygraphyException as e:
        row.result, row.note = FAIL, f"TensorRT failed: {first_line(e)}"
        return [row]
    rows = [compare(row, actual, expected, tolerance)]
    if ort_outputs is not None:
        vs = Row(name, precision, "tensorrt", "onnxruntime")
        if precision in ort_outputs:
            compare(vs, actual, ort_outputs[precision], tolerance)
        else:
            vs.note = f"no ONNX Runtime outputs of the {precision} graph"
        rows.append(vs)
    return rows


def run_parity(directory: str | Path, precisions: tuple[str, ...] | None = None, models: tuple[str, ...] | None = None,
               backends: tuple[str, ...] = ("onnxruntime",), progress: bool = True) -> list[Row]:
    """Compare ``backends`` with the saved PyTorch outputs (and TensorRT with ONNX Runtime) for ``models`` (default:
    every model of the build) in ``precisions`` (default: every graph of the build).

    The manifest's hashes of the selected models' files are verified first. Raises :class:`ConfigError` for an
    unknown model or a precision no selected model has, :class:`ManifestError` for a bad build directory.
    """
    directory = Path(directory)
    manifest = Manifest.load(directory)
    names = models or tuple(manifest.models)
    unknown = [n for n in names if n not in MODEL_IO]
    if unknown:
        raise ConfigError(f"unknown models {unknown}; choose from {list(MODEL_IO)}")
    manifest.verify(directory, list(names))
    available = {n: manifest.models[n].graphs() for n in names}
    absent = [p for p in precisions or () if not any(precision_family(k) == p for g in available.values() for k in g)]
    if absent:
        raise ConfigError(f"{directory} has no {absent} graphs of {list(names)}; export them (python -m export.onnx "
                          f"--fp16/--bf16; fp8: python -m export.onnx --fp8)")
    if "tensorrt" in backends and any(manifest.models[n].engine for n in names):
        trt, gpu = import_tensorrt_gpu(what="the TensorRT half of the parity check")
        check_tensorrt_section(manifest.tensorrt, trt.__version__, gpu.name, gpu.compute_capability, directory)
    rows: list[Row] = []
    for name in progress_bar(names, "parity", progress):
        feeds, expected = load_references(directory, name, manifest.models[name])
        wanted = select_graphs(available[name], precisions)
        ort_outputs = None
        if "onnxruntime" in backends:
            ort_rows, ort_outputs = onnxruntime_rows(directory, name, available[name], wanted, feeds, expected)
            rows += ort_rows
        if "tensorrt" in backends:
            rows += tensorrt_rows(directory, manifest, name, wanted, feeds, expected, ort_outputs)
    return rows


def format_table(rows: list[Row]) -> str:
    """A fixed-width table of ``rows``, one line each (SKIP and FAIL rows end with their note)."""

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [f"{'model':<7} {'precision':<9} {'backend':<11} {'vs':<12} {'rel_l2':>9} {'max_abs':>9} {'cosine':>10} "
             f"{'tolerance':>9}  result"]
    for r in rows:
        lines.append(f"{r.model:<7} {r.precision:<9} {r.backend:<11} {r.vs:<12} {num(r.rel_l2, '.2e'):>9} "
                     f"{num(r.max_abs, '.2e'):>9} {num(r.cosine, '.8f'):>10} {num(r.tolerance, '.1e'):>9}  "
                     f"{r.result}{'  ' + r.note if r.note else ''}")
    return "\n".join(lines)


def format_markdown(rows: list[Row]) -> str:
    """The rows as a Markdown table (what the README shows, pasted from this output)."""
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["| model | precision | backend | vs | rel L2 | max abs | cosine | tolerance | result |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.model} | {r.precision} | {r.backend} | {r.vs} | {num(r.rel_l2, '.2e')} | "
              f"{num(r.max_abs, '.2e')} | {num(r.cosine, '.8f')} | {num(r.tolerance, '.0e')} | {r.result} |"
              for r in rows]
    return "\n".join(lines)


def report_json(directory: str | Path, backends: tuple[str, ...], rows: list[Row]) -> dict[str, Any]:
    """The report as JSON-ready data: build directory, backends, tolerances and every row."""
    return {"build": str(directory), "backends": list(backends), "tolerances": TOLERANCES,
            "tf32_tolerance": TF32_REL_L2, "passed": all(r.result != FAIL for r in rows),
            "rows": [asdict(r) for r in rows]}


@cli_main(logger)  # other DynaIPErrors (bad arguments or build directory): one line, exit 2
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-dir", required=True, metavar="DIR",
                   help="build folder (python -m export.onnx or export.build)")
    p.add_argument("--precisions", default="auto",
                   help=f"comma list of {','.join(PRECISIONS)}, or auto: every graph in the build")
    p.add_argument("--models", default="auto", help=f"comma list of {','.join(MODEL_IO)}, or auto: every model")
    p.add_argument("--backends", default="auto",
                   help=f"auto (ONNX Runtime, plus TensorRT when it and a GPU are present) or a comma list of "
                        f"{','.join(BACKENDS)}")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--format", choices=("text", "markdown"), default="text", help="how the table is printed")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    configure_logging(args.verbose)
    quiet_polygraphy(args.verbose)
    if args.json:
        check_writable_file(args.json, "--json", written_json_report)
    Manifest.load(args.engine_dir, what=f"--engine-dir {args.engine_dir}")  # before any backend is imported
    precisions = parse_list(args.precisions, PRECISIONS, "precisions")
    models = parse_list(args.models, tuple(MODEL_IO), "models")
    try:
        backends = resolve_backends(args.backends)
        rows = run_parity(args.engine_dir, precisions, models, backends)
    except BackendUnavailableError as e:
        logger.error("%s", e)
        return EXIT_NEEDS_BACKEND
    print(format_markdown(rows) if args.format == "markdown" else format_table(rows))
    if args.json:
        write_json_report(args.json, report_json(args.engine_dir, backends, rows))
    failed = [r for r in rows if r.result == FAIL]
    if failed:
        logger.error("%d of %d comparisons failed", len(failed), len(rows))
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
