"""How fast the command lines answer: ``--help`` of every command, typical mistakes (each must answer before any
model loads), and a whole tiny ONNX Runtime generation, each a fresh process timed end to end.

    python -m runtime.startup_benchmark --engine-dir build/tiny [--repeats 5] [--json FILE]

Targets (issues 11 and 12): ``--help`` under 1 s, every argument or file error under 1.5 s, a whole tiny ONNX
Runtime generate under 3 s. Figures depend on the machine and its load: run it on an idle machine and record where.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dynaip_trt.cli import check_writable_file, cli_main, configure_logging, write_json_report, written_json_report
from dynaip_trt.manifest import Manifest

logger = logging.getLogger("runtime.startup_benchmark")

ROOT = Path(__file__).resolve().parents[1]
REF = str(ROOT / "examples" / "subject_a.png")
COMMANDS = ("runtime.generate", "runtime.benchmark", "export.onnx", "export.build", "export.parity",
            "calibration.collect", "calibration.quantize", "runtime.serve", "runtime.loadtest",
            "runtime.serve_benchmark")
HELP_TARGET_S, ERROR_TARGET_S, GENERATE_TARGET_S = 1.0, 1.5, 3.0


def cases(engine_dir: str, scratch: Path) -> list[tuple[str, list[str], float, int]]:
    """(label, python -m arguments, target seconds, expected exit code) of every measured command."""
    gen = ["runtime.generate", "--prompt", "two friends playing with toys on a sunny beach", "--ref", REF]
    out = str(scratch / "out.png")
    rows = [(f"{m} --help", [m, "--help"], HELP_TARGET_S, 0) for m in COMMANDS]
    rows += [
        ("generate: missing --ref file", [*gen[:3], "--ref", "missing.png", "--out", out], ERROR_TARGET_S, 2),
        ("generate: no such --engine-dir", [*gen, "--engine-dir", "no-such-build", "--out", out], ERROR_TARGET_S, 2),
        ("generate: unwritable --out", [*gen, "--out", "/proc/x.png"], ERROR_TARGET_S, 2),
        ("generate: bad --scale", [*gen, "--out", out, "--scale", "-1"], ERROR_TARGET_S, 2),
        ("export.onnx: unknown --models", ["export.onnx", "--models", "unet"], ERROR_TARGET_S, 2),
        ("serve: no such --engine-dir", ["runtime.serve", "--engine-dir", "no-such-build"], ERROR_TARGET_S, 2),
        ("export.build: unknown --precision", ["export.build", "--precision", "int4"], ERROR_TARGET_S, 2),
        ("calibration.quantize: empty --calib", ["calibration.quantize", "--calib", str(scratch)], ERROR_TARGET_S, 2),
        ("generate: whole tiny ONNX Runtime run", [*gen, "--ref", REF, "--engine-dir", engine_dir, "--out", out],
         GENERATE_TARGET_S, 0),
    ]
    return rows


def time_command(args: list[str], expected: int, repeats: int) -> list[float]:
    """Seconds of ``python -m args`` per run (a fresh interpreter each time); the exit code must be ``expected``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
        if run.returncode != expected:
            raise RuntimeError(f"python -m {' '.join(args)} exited {run.returncode}, expected {expected}: "
                               f"{run.stderr.strip()[-300:]}")
    return times


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.startup_benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-dir", required=True, metavar="DIR", help="a tiny build folder (python -m export.onnx)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    configure_logging()
    Manifest.load(args.engine_dir, what=f"--engine-dir {args.engine_dir}")
    if args.json:
        check_writable_file(args.json, "--json", written_json_report)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for label, command, target, expected in cases(args.engine_dir, Path(scratch)):
            t = time_command(command, expected, args.repeats)
            rows.append({"case": label, "min_s": min(t), "median_s": statistics.median(t), "max_s": max(t),
                         "target_s": target, "met": statistics.median(t) < target})
    print(f"# {platform.machine()} CPU, {args.repeats} runs each, python {platform.python_version()}")
    print("case | min s | median s | max s | target s | met")
    print("--- | --- | --- | --- | --- | ---")
    for r in rows:
        print(f"{r['case']} | {r['min_s']:.2f} | {r['median_s']:.2f} | {r['max_s']:.2f} | < {r['target_s']:g} | "
              f"{'yes' if r['met'] else 'NO'}")
    if args.json:
        write_json_report(args.json, {"machine": platform.machine(), "repeats": args.repeats, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
