"""Plot DCI's DBIM sweep of an evaluation report: subject fidelity (CP) and prompt following (PF) against lambda.

    python -m runtime.evaluate --config tiny --rows dbim --dbim-lambdas=-2,-1,0,1,2 --json dbim.json
    python -m runtime.plot_dbim --json dbim.json --out dbim.png [--kind one_subject|two_subjects]

CP is the mean rate of the subject verdicts (colour, shape, pattern: the CP analogue of the world's scorer), PF the
mean rate of the prompt verdicts (setting, and position for one subject); each ``DBIM lambda`` row is a point with
its 95% intervals, the report's reference row (no DBIM) a dashed line. Needs matplotlib (``pip install
matplotlib``, part of the ``dev`` extra); bad input prints one error line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from dynaip_trt.cli import check_writable_file, cli_main, configure_logging
from dynaip_trt.errors import BackendUnavailableError, InputError
from dynaip_trt.files import atomic_path

logger = logging.getLogger("runtime.plot_dbim")

CP_METRICS = ("colour", "shape", "pattern")
PF_METRICS = ("setting", "position")


def written_plot(path: Path) -> bool:
    """An output this command may replace: a PNG it wrote (its metadata says so)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get("Software", "").startswith("dynaip-trt plot_dbim")
    except (OSError, ValueError):
        return False


def sweep(report: dict[str, Any], kind: str) -> tuple[list[float], dict[str, list[tuple[float, float, float]]],
                                                       dict[str, float]]:
    """The report's DBIM rows -> (lambdas, ``{"CP": [(rate, lo, hi)], "PF": [...]}`` per lambda, the reference
    row's ``{"CP": rate, "PF": rate}``); a metric's interval is the mean of its verdicts' intervals."""
    rows = [r for r in report.get("rows", []) if r.get("group") == "dbim" and kind in r]
    if not rows:
        raise InputError(f"the report has no DBIM rows with {kind} scenes: run python -m runtime.evaluate --rows dbim "
                         f"(with {kind} scenes in --scenes)")
    rows.sort(key=lambda r: r["options"]["dbim_lambda"])

    def score(stats: dict[str, Any], metric_names: tuple[str, ...]) -> tuple[float, float, float]:
        names = [m for m in metric_names if m in stats]
        return tuple(sum(stats[m][k] for m in names) / len(names) for k in ("rate", "lo", "hi"))  # type: ignore

    curves = {"CP": [score(r[kind], CP_METRICS) for r in rows], "PF": [score(r[kind], PF_METRICS) for r in rows]}
    ref = next((r for r in report["rows"] if r["name"] == report.get("reference_row") and kind in r), None)
    baseline = {} if ref is None else {k: score(ref[kind], m)[0] for k, m in (("CP", CP_METRICS), ("PF", PF_METRICS))}
    return [float(r["options"]["dbim_lambda"]) for r in rows], curves, baseline


def plot(lambdas: list[float], curves: dict[str, list[tuple[float, float, float]]], baseline: dict[str, float],
         title: str, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BackendUnavailableError("the plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for (name, points), colour in zip(curves.items(), ("tab:blue", "tab:orange")):
        rate = [p[0] for p in points]
        # Wilson bounds of a rate of 1 come out as 0.9999999999999999: clamp the float noise at 0
        err = [[max(0.0, p[0] - p[1]) for p in points], [max(0.0, p[2] - p[0]) for p in points]]
        ax.errorbar(lambdas, rate, yerr=err, marker="o", capsize=3, color=colour, label=name)
        if name in baseline:
            ax.axhline(baseline[name], color=colour, linestyle="--", linewidth=1, label=f"{name} without DBIM")
    ax.set_xlabel("dbim_lambda")
    ax.set_ylabel("rate")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": "dynaip-trt plot_dbim"})
    plt.close(fig)


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.plot_dbim", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, metavar="FILE", help="report of python -m runtime.evaluate --rows dbim")
    p.add_argument("--out", required=True, metavar="FILE", help="the plot (.png)")
    p.add_argument("--kind", default="one_subject", choices=("one_subject", "two_subjects"))
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    configure_logging(args.verbose)
    if not args.out.lower().endswith(".png"):
        raise InputError(f"--out {args.out}: the plot is a PNG file (.png)")
    out = check_writable_file(args.out, "--out", written_plot)
    try:
        report = json.loads(Path(args.json).read_text())
    except FileNotFoundError:
        raise InputError(f"--json {args.json}: no such file") from None
    except (OSError, ValueError) as e:
        raise InputError(f"--json {args.json}: not a readable JSON report ({e})") from None
    if not isinstance(report, dict) or report.get("tool") != "dynaip-trt evaluate":
        raise InputError(f"--json {args.json}: not a report of python -m runtime.evaluate")
    lambdas, curves, baseline = sweep(report, args.kind)
    title = f"DBIM on {report.get('config', '?')} ({args.kind.replace('_', ' ')}, {report['scenes'][args.kind]} scenes)"
    plot(lambdas, curves, baseline, title, out)
    logger.info("wrote %s (%d lambdas)", out, len(lambdas))
    return 0


if __name__ == "__main__":
    sys.exit(main())
