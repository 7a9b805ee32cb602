"""Throughput of the HTTP server by model replica count, in one run on one machine (the table of docs/serving.md).

    python -m runtime.serve_benchmark --engine-dir build/tiny --replicas 1,2 --requests 60 --concurrency 8

Starts one local Ray instance, and for each replica count deploys the application of ``python -m runtime.serve``
with the machine's CPUs divided among the replicas (``--threads`` = CPUs / replicas), sends a warm-up burst, then
``--requests`` requests at ``--concurrency`` (:func:`runtime.loadtest.run_load`), and prints one markdown table:
throughput, latency percentiles, errors, and each row's throughput as a ratio to the first row's. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import urllib.request

from dynaip_trt.cli import check_writable_file, cli_main, configure_logging, write_json_report, written_json_report
from dynaip_trt.errors import InputError

from . import serve
from .loadtest import LoadResult, request_body, run_load, synthetic_reference

logger = logging.getLogger("runtime.serve_benchmark")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.serve_benchmark", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--engine-dir", required=True, help="build directory")
    p.add_argument("--replicas", default="1,2", help="model replica counts to compare, comma-separated")
    p.add_argument("--requests", type=int, default=60, help="measured requests per replica count")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--steps", type=int, default=28, help="denoising steps per request")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (loopback)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--threads", type=int, help="threads per replica in every row (default: CPUs / replicas)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="per replica count, no request starts later")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    return p.parse_args(argv)


def _replica_counts(text: str) -> list[int]:
    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"--replicas {text!r}: expected comma-separated counts, e.g. 1,2") from None
    if not counts or min(counts) < 1:
        raise InputError(f"--replicas {text!r}: counts must be >= 1")
    return counts


def _serve_args(args: argparse.Namespace, replicas: int, cpus: int) -> list[str]:
    """``python -m runtime.serve`` flags for one row: the CPUs shared out among the replicas (or ``--threads``)."""
    threads = args.threads if args.threads is not None else max(1, cpus // replicas)
    return ["--engine-dir", args.engine_dir, "--replicas", str(replicas), "--threads", str(threads),
            "--port", str(args.port), "--num-cpus", str(cpus), "--max-queued", str(4 * args.concurrency),
            "--app-name", "dynaip-benchmark"]


def _wait_ready(url: str, replicas: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "healthz", timeout=10) as r:
                if json.loads(r.read()).get("replicas_ready") == replicas:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise InputError(f"{replicas} replica(s) were not ready after {timeout:g} s")


def table(rows: list[tuple[int, int, LoadResult]]) -> str:
    """The markdown table: one row per replica count, throughput ratios to the first row."""
    base = rows[0][2].throughput or float("nan")
    lines = ["| model replicas | threads each | requests ok / sent | throughput (req/s) | p50 (s) | p95 (s) | "
             "p99 (s) | throughput vs first row |", "|---|---|---|---|---|---|---|---|"]
    for replicas, threads, r in rows:
        lines.append(f"| {replicas} | {threads} | {r.ok} / {r.sent} | {r.throughput:.2f} | {r.percentile(50):.3f} | "
                     f"{r.percentile(95):.3f} | {r.percentile(99):.3f} | {r.throughput / base:.2f}x |")
    return "\n".join(lines)


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    counts = _replica_counts(args.replicas)
    if args.json:
        check_writable_file(args.json, "--json", written_json_report)
    if args.requests < 1 or args.concurrency < 1:
        raise InputError("--requests and --concurrency must be >= 1")
    cpus = args.num_cpus or os.cpu_count() or 1
    plans = []
    for n in counts:  # every configuration is checked before Ray starts
        serve_args = serve.parse_args(_serve_args(args, n, cpus))
        plans.append((n, serve_args, serve.check_args(serve_args)))
    body = request_body("two toys on a beach", [synthetic_reference(0), synthetic_reference(1)],
                        {"steps": args.steps})
    serve.start_ray(None, cpus)
    from ray import serve as ray_serve

    rows = []
    try:
        for n, serve_args, plan in plans:
            url = serve.deploy(serve_args, plan)
            _wait_ready(url, n)
            run_load(url, body, args.concurrency, args.concurrency, seed=10_000)  # warm-up: sessions, caches
            result = run_load(url, body, args.requests, args.concurrency, max_seconds=args.max_seconds)
            logger.info("%d replica(s): %s", n, result.report().replace("\n", "; "))
            rows.append((n, plan.threads, result))
            ray_serve.delete(serve_args.app_name)  # frees its CPUs before the next row's replicas start
    finally:
        serve.shutdown(serve_args.app_name, started_ray=True)
    print(f"{args.requests} requests per row at concurrency {args.concurrency}, {args.steps} steps, {cpus} CPUs, "
          f"build {args.engine_dir}\n")
    print(table(rows))
    if args.json:
        write_json_report(args.json, {"rows": [{"replicas": n, "threads": t, **r.summary()} for n, t, r in rows]})
    return 0 if all(r.ok == r.sent for _, _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
