"""Export every model the runtime needs to ONNX (TensorRT-ready) and write a manifest.

    python -m export.onnx --engine-dir build/tiny-random [--fp16] [--bf16] [--fp8 --calib DIR] [--models dit,vae]
        [--dbim]                             # also DBIM's mixing-step DiT graph (dit_dbim)
    python -m export.onnx --base /path/FLUX.1-dev --clip /path/clip-vit-large-patch14 --adapter dynaip.safetensors \\
        --engine-dir build/flux-dev          # full depth: run on a big machine (see README), not in CI

The library is :mod:`export.exporter`; this module is only the command line. Bad input prints one line, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dynaip_trt.cli import check_source_args, cli_main, configure_logging
from dynaip_trt.errors import ConfigError
from dynaip_trt.files import claim_dir
from dynaip_trt.manifest import REQUIRED_MODELS, Manifest

from .cli import add_export_args, envelope_from_args
from .specs import BF16_MODELS, FP16_MODELS, SPECS, variants_of

logger = logging.getLogger("export.onnx")


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.split("\n\n")[0])
    add_export_args(p)
    p.add_argument("--models", default=",".join(REQUIRED_MODELS), help=f"subset of {','.join(SPECS)} (default "
                   f"%(default)s)")
    p.add_argument("--dbim", action="store_true", help="also export DBIM's mixing-step DiT graph (dit_dbim), which "
                   "requests with dbim_lambda need")
    p.add_argument("--fp16", action="store_true", help=f"also export FP16 variants of {FP16_MODELS} (and dit_dbim)")
    p.add_argument("--bf16", action="store_true", help=f"also export BF16 variants of {BF16_MODELS} (and dit_dbim)")
    p.add_argument("--fp8", action="store_true", help="also export the FP8 DiT (calibrating into --calib if needed)")
    p.add_argument("--calib", metavar="DIR", help="FP8 calibration folder (default calib/<config>)")
    p.add_argument("--force", action="store_true", help="re-export every graph (default: reuse the graphs of a "
                   "previous build in --engine-dir whose source did not change)")
    args = p.parse_args(argv)
    configure_logging(args.verbose)
    names = tuple(n.strip() for n in args.models.split(",") if n.strip())
    names += ("dit_dbim",) if args.dbim and "dit_dbim" not in names else ()
    unknown = [n for n in names if n not in SPECS]
    if unknown or not names:
        raise ConfigError(f"--models: unknown model {unknown or [args.models]}; choose from {list(SPECS)}")
    if args.fp8 and "dit" not in names:
        raise ConfigError("--fp8 adds an FP8 DiT graph: --models must include dit")
    check_source_args(args)
    if args.engine_dir:  # before loading any model: nothing of the user's may be replaced
        claim_dir(args.engine_dir, Manifest.owned_files, f"--engine-dir {args.engine_dir}")
    from dynaip_trt.weights import load_family  # torch and the model code: only once the arguments are checked

    from .exporter import export_all

    models = load_family(args.config, args.base, args.clip, args.adapter, args.weights_seed)
    out = args.engine_dir or f"build/{models.config.name}"
    calib = args.calib or f"calib/{models.config.name}"
    if args.fp8:
        from calibration.store import owned_files

        claim_dir(calib, owned_files, f"--calib {calib}")
    variants = {p: variants_of(p, names) for p, wanted in (("fp16", args.fp16), ("bf16", args.bf16)) if wanted}
    envelope = envelope_from_args(args, models.config)
    export_all(out, models=models, names=names, opset=args.opset, variants=variants, envelope=envelope,
               what=f"--engine-dir {out}", force=args.force)
    if args.fp8:
        from .fp8 import prepare_fp8

        prepare_fp8(models, out, calib, what=f"--calib {calib}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
