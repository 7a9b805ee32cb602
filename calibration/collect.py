"""Collect FP8 calibration data from the PyTorch reference pipeline (the library: :mod:`calibration.recording`).

    python -m calibration.collect --calib calib/tiny-random --samples 8 [--record-steps 4]
    python -m calibration.collect --base /models/FLUX.1-dev --clip /models/clip-vit-large-patch14 \\
        --adapter dynaip.safetensors --calib calib/flux-dev --samples 32         # real weights (a GPU machine)

Arguments and the output folder are checked before any model is loaded; bad input prints one line, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dynaip_trt.cli import add_source_args, check_source_args, cli_main, configure_logging, family_name
from dynaip_trt.configs import DEFAULT_CONFIG
from dynaip_trt.errors import ConfigError
from dynaip_trt.files import claim_dir

from .store import owned_files

logger = logging.getLogger("calibration.collect")


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
    out = args.calib or f"calib/{family_name(args.config, args.base)}"
    claim_dir(out, owned_files, f"--calib {out}")  # before loading any model: nothing of the user's is replaced
    from dynaip_trt.weights import load_family

    from .recording import collect

    models = load_family(args.config, args.base, args.clip, args.adapter, args.weights_seed)
    collect(models, out, args.samples, args.record_steps, args.weights_seed, what=f"--calib {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
