"""FP8 calibration with NVIDIA ModelOpt and FP8's quality report (the library: :mod:`calibration.quantization`).

    python -m calibration.quantize --calib calib/tiny-random [--calibrator auto|modelopt|max] [--report [PATH]] \\
        [--fp8-base fp16|bf16]

The FP8 ONNX graph is exported by ``python -m export.build --precision fp8`` (or ``python -m export.onnx --fp8``).
Arguments and files are checked before any model is loaded; bad input prints one line, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dynaip_trt.cli import add_source_args, check_source_args, check_writable_file, cli_main, configure_logging
from dynaip_trt.configs import DEFAULT_CONFIG
from dynaip_trt.errors import ConfigError
from dynaip_trt.manifest import FP8_BASES

from .store import AMAX_FILE, QUALITY_FILE, RECORDS_FILE, AmaxTable

logger = logging.getLogger("calibration.quantize")


def written_report(path: Path) -> bool:
    """Whether ``path`` is a quality report this command wrote (it may be replaced)."""
    import json

    try:
        return "amax_source" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calibration.quantize", description=__doc__.split("\n\n")[0])
    add_source_args(p, DEFAULT_CONFIG)
    p.add_argument("--calib", required=True, metavar="DIR", help="calibration folder (python -m calibration.collect)")
    p.add_argument("--calibrator", choices=("auto", "modelopt", "max"), default="auto",
                   help="modelopt: recalibrate with NVIDIA ModelOpt and save amax.json; max: use collect's amax; "
                        "auto: modelopt when installed")
    p.add_argument("--report", nargs="?", const="", default=None, metavar="PATH",
                   help=f"write the FP8/fp16/bf16 quality report (default <calib>/{QUALITY_FILE})")
    p.add_argument("--samples", type=int, default=2, help="full generations in the quality report")
    p.add_argument("--fp8-base", choices=FP8_BASES, default="fp16", help="precision of the non-FP8 ops")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    configure_logging(args.verbose)
    check_source_args(args)
    if args.samples < 1:
        raise ConfigError("--samples must be >= 1")
    calib = Path(args.calib)
    for name in (AMAX_FILE, RECORDS_FILE):
        if not (calib / name).is_file():
            raise ConfigError(f"--calib {calib} has no {name}: run python -m calibration.collect --calib {calib}")
    report = None
    if args.report is not None:
        report = check_writable_file(args.report or calib / QUALITY_FILE, "--report", written_report)
    from dynaip_trt.weights import load_family

    from .quantization import quality_report, recalibrate, write_report
    from .store import load_records

    models = load_family(args.config, args.base, args.clip, args.adapter, args.weights_seed)
    collected = AmaxTable.load(calib, models.config)
    records = load_records(calib)
    table = recalibrate(models, collected, records, calib, args.calibrator)
    if report is not None:
        rows = quality_report(models, table, records, args.samples, base=args.fp8_base)
        write_report(report, models, table, len(records), rows, args.fp8_base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
