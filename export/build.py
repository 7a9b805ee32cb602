"""Build TensorRT engines: export and check ONNX, calibrate FP8 if asked, then build one engine per model.

    python -m export.build --precision fp16                 # the embedded default -> build/<config>
    python -m export.build --precision fp16 --dbim          # ... with DBIM's mixing-step DiT (engine + CUDA graph)
    python -m export.build --precision fp8 --config flux-dev --resolutions 1024x1024,768x1344 --max-subjects 4
        [--fp8-base bf16|fp16] [--no-tf32] [--version-compatible]
    python -m export.build --precision bf16 --base /models/FLUX.1-dev --clip /models/clip-vit-large-patch14 \\
        --adapter dynaip.safetensors --engine-dir build/flux-dev

Steps: (1) ``export.onnx`` with the graphs the precision needs (fp16/bf16 variants; see :mod:`export.engines`),
graph checks included; (2) fp8 only: calibration data (``calibration.collect``, reused when ``--calib`` already
holds it for these weights), ModelOpt/max calibration, the Q/DQ DiT graphs (``dit.fp8-<base>.onnx`` for the engine,
``dit.fp8-fp16.onnx`` as the CPU oracle) and the quality cost against fp32 (``fp8_quality.json``); (3) the engine
plan (``engine_plan.json``: profiles, flags, source hashes); (4) the engines, staged and moved into place together,
then the manifest's ``tensorrt`` section.

Exit codes: 0 built; 2 bad arguments or inputs (unknown precision, missing weights...); 3 ONNX exported and
checked but the engine step cannot run here: TensorRT's builder or a GPU is missing, or the GPU lacks the
precision (fp8 needs compute capability 8.9, bf16 8.0); the message says what to install or do.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from calibration.store import owned_files as owned_calibration_files
from dynaip_trt.cli import check_source_args, cli_main, configure_logging, family_name
from dynaip_trt.cli import progress as progress_bar
from dynaip_trt.errors import BackendUnavailableError, ConfigError
from dynaip_trt.files import atomic_path, claim_dir, staged_files
from dynaip_trt.manifest import FP8_BASES, MODEL_IO, PLAN_FILE, REQUIRED_MODELS, Manifest, sha256_file

from .cli import add_export_args, envelope_from_args
from .engines import (DEFAULT_FP8_BASE, ENGINE_PRECISIONS, EngineBuilder, EnginePlan, check_gpu_supports,
                      graph_precision, import_tensorrt_builder, plan_engines, record_engines, required_variants,
                      system_section)
from .envelope import Envelope

if TYPE_CHECKING:  # torch and the model code load only when there is something to export or calibrate
    from dynaip_trt.models import DynaIPModels

logger = logging.getLogger("export.build")

EXIT_NEEDS_TENSORRT = 3


def write_plan(out_dir: Path, plans: list[EnginePlan], precision: str) -> Path:
    """``engine_plan.json``: the builder configuration of every engine (what a build will do, inspectable)."""
    path = out_dir / PLAN_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"precision": precision, "engines": [p.to_dict() for p in plans]}, indent=1))
    return path


def engine_step_unavailable(precision: str, fp8_base: str = DEFAULT_FP8_BASE) -> str | None:
    """Why the engine step of a ``precision`` build cannot run on this machine (no TensorRT builder, no usable GPU,
    a GPU without the precision), or ``None`` when it can: the command exits 3 in the first case, 0 in the second."""
    try:
        _, gpu = import_tensorrt_builder()
        check_gpu_supports(gpu, {m: graph_precision(m, precision, fp8_base) for m in MODEL_IO})
    except BackendUnavailableError as e:
        return str(e)
    return None


def engine_is_current(manifest: Manifest, directory: Path, plan: EnginePlan, system: dict) -> bool:
    """Whether the build already holds ``plan``'s engine, built with this very plan (source graph hash, flags,
    profile) on this system (TensorRT version, GPU), its file intact."""
    section = manifest.tensorrt or {}
    entry = manifest.models.get(plan.model)
    return (all(section.get(k) == v for k, v in system.items()) and entry is not None and entry.engine == plan.engine
            and section.get("engines", {}).get(plan.model) == plan.to_dict()
            and (directory / plan.engine).is_file()
            and sha256_file(directory / plan.engine) == entry.files.get(plan.engine))


def build_engines(out_dir: Path, plans: list[EnginePlan], precision: str, verbose: bool = False,
                  progress: bool = True, force: bool = False) -> Manifest:
    """Build every planned engine that is not already current (:func:`engine_is_current`; ``force`` rebuilds all)
    into a staging folder, move them into ``out_dir`` together and record them in the manifest. Raises
    :class:`BackendUnavailableError` without TensorRT's builder or a GPU, or when the GPU cannot run a planned
    precision (checked before anything is built)."""
    builder = EngineBuilder(out_dir, verbose=verbose)
    check_gpu_supports(builder.gpu, {p.model: p.precision for p in plans})
    manifest = Manifest.load(out_dir)
    system = system_section(builder.trt, builder.gpu)
    todo = plans if force else [p for p in plans if not engine_is_current(manifest, out_dir, p, system)]
    if len(todo) < len(plans):
        logger.info("engines of %s are current: not rebuilt (--force rebuilds them)",
                    sorted({p.model for p in plans} - {p.model for p in todo}))
    with staged_files(out_dir, prefix=".engines-") as staging:
        for plan in progress_bar(todo, f"build {precision}", progress):
            builder.build(plan, staging)
    return record_engines(manifest, out_dir, plans, system, precision)


def run(models: DynaIPModels | None, out_dir: str | Path, precision: str, envelope: Envelope, calib_dir: str | Path,
        opset: int, skip_export: bool = False, plan_only: bool = False, optimization_level: int = 3,
        workspace_bytes: int | None = None, calib_samples: int = 8, verbose: bool = False,
        progress: bool = True, force: bool = False, fp8_base: str = DEFAULT_FP8_BASE, tf32: bool = True,
        version_compatible: bool = False, dbim: bool = False) -> list[EnginePlan]:
    """The whole build (see the module docstring); returns the engine plans. ``models`` may be ``None`` only with
    ``skip_export`` for fp16/bf16 (nothing to export or calibrate). ``dbim``: also export DBIM's mixing-step DiT
    (``dit_dbim``) and build its engine (with ``skip_export``, an exported ``dit_dbim`` is built anyway). Raises
    :class:`BackendUnavailableError` after the ONNX step when engines cannot be built here."""
    if precision not in ENGINE_PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from {list(ENGINE_PRECISIONS)}")
    if fp8_base not in FP8_BASES:
        raise ConfigError(f"unknown FP8 base precision {fp8_base!r}; choose from {list(FP8_BASES)}")
    out_dir = Path(out_dir)
    if models is None and (precision == "fp8" or not skip_export):
        raise ConfigError("exporting and FP8 calibration need the model family (models=None is only for "
                          "fp16/bf16 builds with skip_export)")
    if skip_export:
        Manifest.load(out_dir).verify(out_dir)
    else:
        from .exporter import export_all

        names = REQUIRED_MODELS + (("dit_dbim",) if dbim else ())
        export_all(out_dir, models=models, names=names, opset=opset,
                   variants=required_variants(precision, names, fp8_base=fp8_base), envelope=envelope,
                   progress=progress, force=force)
    if precision == "fp8":
        from .fp8 import prepare_fp8

        prepare_fp8(models, out_dir, calib_dir, calib_samples, progress, base=fp8_base)
    manifest = Manifest.load(out_dir)
    plans = plan_engines(manifest, out_dir, precision, envelope, optimization_level=optimization_level,
                         workspace_bytes=workspace_bytes, fp8_base=fp8_base, tf32=tf32,
                         version_compatible=version_compatible)
    path = write_plan(out_dir, plans, precision)
    logger.info("ONNX graphs exported and checked; engine plan in %s", path)
    if not plan_only:
        build_engines(out_dir, plans, precision, verbose, progress, force)
        logger.info("%s engines for %s written to %s", precision, [p.model for p in plans], out_dir)
    return plans


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.build", description=__doc__.split("\n\n")[0])
    add_export_args(p)
    p.add_argument("--precision", required=True, help=f"engine precision: {', '.join(ENGINE_PRECISIONS)}")
    p.add_argument("--calib", metavar="DIR", help="FP8 calibration folder (default calib/<config>)")
    p.add_argument("--calib-samples", type=int, default=8, help="FP8 calibration requests when collecting")
    p.add_argument("--skip-export", action="store_true", help="build from the ONNX already in --engine-dir")
    p.add_argument("--plan-only", action="store_true", help="export and write engine_plan.json; build nothing")
    p.add_argument("--force", action="store_true", help="re-export every graph and rebuild every engine (default: "
                   "reuse those whose source did not change)")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level (0-5)")
    p.add_argument("--workspace-gib", type=float, default=None, help="builder workspace limit (default: no limit)")
    p.add_argument("--fp8-base", choices=FP8_BASES, default=DEFAULT_FP8_BASE,
                   help="fp8: precision of everything but the FP8 GEMMs (default bf16; fp16 overflows on real FLUX)")
    p.add_argument("--no-tf32", action="store_true",
                   help="clear TensorRT's default TF32 flag: fp32 layers compute in strict fp32 (slower)")
    p.add_argument("--version-compatible", action="store_true",
                   help="engines later TensorRT versions of the same major version (and tensorrt_lean) can run")
    p.add_argument("--dbim", action="store_true", help="also export and build DBIM's mixing-step DiT (dit_dbim), "
                   "which requests with dbim_lambda need")
    args = p.parse_args(argv)
    configure_logging(args.verbose)
    if args.precision not in ENGINE_PRECISIONS:
        raise ConfigError(f"--precision {args.precision!r} is unknown; choose from {list(ENGINE_PRECISIONS)}")
    if args.calib_samples < 1:
        raise ConfigError("--calib-samples must be >= 1")
    check_source_args(args)
    name = family_name(args.config, args.base)
    out, calib = args.engine_dir or f"build/{name}", args.calib or f"calib/{name}"
    if args.skip_export:  # the folder must already be a build
        cfg = Manifest.load(out, what=f"--engine-dir {out}").dynaip_config
    else:  # before the long export: nothing of the user's may be replaced
        claim_dir(out, Manifest.owned_files, f"--engine-dir {out}")
    if args.precision == "fp8":
        claim_dir(calib, owned_calibration_files, f"--calib {calib}")
    models = None
    if not args.skip_export or args.precision == "fp8":
        from dynaip_trt.weights import load_family

        models = load_family(args.config, args.base, args.clip, args.adapter, args.weights_seed)
    if models is not None:
        cfg = models.config
    try:
        run(models, out, args.precision, envelope_from_args(args, cfg), calib, args.opset, args.skip_export,
            args.plan_only, args.opt_level, int(args.workspace_gib * 2**30) if args.workspace_gib else None,
            args.calib_samples, args.verbose, force=args.force, fp8_base=args.fp8_base, tf32=not args.no_tf32,
            version_compatible=args.version_compatible, dbim=args.dbim)
    except BackendUnavailableError as e:
        logger.error("the ONNX graphs are exported and checked, but the engine step cannot run here: %s. "
                     "Copy the build folder to a GPU machine with TensorRT and run this command with "
                     "--skip-export there.", e)
        return EXIT_NEEDS_TENSORRT
    return 0


if __name__ == "__main__":
    sys.exit(main())
