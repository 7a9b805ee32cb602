"""Load-test a running DynaIP HTTP server: a bounded number of requests at a fixed concurrency.

    python -m runtime.loadtest --url http://127.0.0.1:8000 --requests 40 --concurrency 4

Sends ``--requests`` ``POST /v1/generate`` requests from ``--concurrency`` threads (standard library HTTP client;
each request has its own seed), never more than ``--max-seconds`` of sending, and prints throughput, latency
percentiles of the successful requests and every error by status. Exit status 0 when every request succeeded, 1
otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dynaip_trt.cli import check_writable_file, cli_main, configure_logging, write_json_report, written_json_report
from dynaip_trt.errors import InputError

logger = logging.getLogger("runtime.loadtest")


@dataclass
class LoadResult:
    """What a load test measured (latencies in seconds, of successful requests)."""

    sent: int
    ok: int
    wall_s: float
    latencies_s: list[float]
    statuses: dict[int, int]
    errors: dict[str, int] = field(default_factory=dict)  # "status: first line of the message" -> count
    hit_time_limit: bool = False

    @property
    def throughput(self) -> float:
        """Successful requests per second over the whole run."""
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    def percentile(self, q: float) -> float:
        """Latency percentile ``q`` (0..100) of the successful requests; NaN when none succeeded."""
        return float(np.percentile(self.latencies_s, q)) if self.latencies_s else float("nan")

    def summary(self) -> dict[str, Any]:
        return {"sent": self.sent, "ok": self.ok, "failed": self.sent - self.ok, "wall_s": round(self.wall_s, 3),
                "throughput_rps": round(self.throughput, 3),
                **{f"p{q}_s": round(self.percentile(q), 4) for q in (50, 95, 99)},
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())}, "errors": self.errors,
                "hit_time_limit": self.hit_time_limit}

    def report(self) -> str:
        s = self.summary()
        lines = [f"requests: {self.sent} sent, {self.ok} ok, {self.sent - self.ok} failed in {self.wall_s:.2f} s"
                 + (" (stopped at --max-seconds)" if self.hit_time_limit else ""),
                 f"throughput: {s['throughput_rps']:.2f} requests/s",
                 f"latency of ok requests: p50 {s['p50_s']:.3f} s, p95 {s['p95_s']:.3f} s, p99 {s['p99_s']:.3f} s",
                 "statuses: " + ", ".join(f"{k} x{v}" for k, v in s["statuses"].items())]
        lines += [f"error x{n}: {e}" for e, n in sorted(self.errors.items())]
        return "\n".join(lines)


def synthetic_reference(seed: int, size: int = 64) -> bytes:
    """A deterministic PNG of blocky noise (a stand-in subject when no ``--ref`` is given)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(blocks.repeat(8, 0).repeat(8, 1)).save(buf, format="PNG")
    return buf.getvalue()


def request_body(prompt: str, references: list[bytes], options: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of ``POST /v1/generate`` (without the seed, which each request sets)."""
    return {"prompt": prompt, "references": [base64.b64encode(r).decode("ascii") for r in references], **options}


def post(url: str, body: dict[str, Any], timeout: float) -> tuple[int, bytes]:
    """POST ``body`` as JSON; returns (status, response body). Network failures are status 0 with the reason."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        return 0, str(getattr(e, "reason", e)).encode()


def _error_text(status: int, payload: bytes) -> str:
    try:
        message = json.loads(payload)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = payload.decode("utf-8", "replace")
    return f"{status}: {message.splitlines()[0][:200] if message else '(empty body)'}"


def run_load(url: str, body: dict[str, Any], requests: int, concurrency: int, timeout: float = 120.0,
             max_seconds: float = 600.0, seed: int = 0) -> LoadResult:
    """Send ``requests`` requests (request ``i`` with seed ``seed + i``) from ``concurrency`` threads; no request
    starts after ``max_seconds``. Returns what was measured."""
    endpoint = url.rstrip("/") + "/v1/generate"
    lock = threading.Lock()
    next_index = [0]
    latencies: list[float] = []
    statuses: Counter = Counter()
    errors: Counter = Counter()
    start = time.perf_counter()
    deadline = start + max_seconds
    stopped = [False]

    def worker() -> None:
        while True:
            with lock:
                if next_index[0] >= requests:
                    return
                if time.perf_counter() > deadline:
                    stopped[0] = True
                    return
                i = next_index[0]
                next_index[0] += 1
            t0 = time.perf_counter()
            status, payload = post(endpoint, {**body, "seed": seed + i}, timeout)
            elapsed = time.perf_counter() - t0
            with lock:
                statuses[status] += 1
                if status == 200:
                    latencies.append(elapsed)
                else:
                    errors[_error_text(status, payload)] += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return LoadResult(sent=next_index[0], ok=statuses.get(200, 0), wall_s=wall, latencies_s=sorted(latencies),
                      statuses=dict(statuses), errors=dict(errors), hit_time_limit=stopped[0])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.loadtest", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, required=True, help="requests to send")
    p.add_argument("--concurrency", type=int, required=True, help="requests in flight at once")
    p.add_argument("--prompt", default="two toys on a beach")
    p.add_argument("--ref", action="append", metavar="IMAGE", help="reference image of one subject (repeat per "
                   "subject); default: two synthetic 64x64 subjects")
    p.add_argument("--steps", type=int, help="denoising steps (default: the build's)")
    p.add_argument("--seed", type=int, default=0, help="request i uses seed + i")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--max-seconds", type=float, default=600.0, help="no request starts after this many seconds")
    p.add_argument("--json", help="also write the results as JSON to this file")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if not args.url.startswith(("http://", "https://")):
        raise InputError(f"--url {args.url}: expected http://HOST:PORT")
    for flag, value in (("--requests", args.requests), ("--concurrency", args.concurrency)):
        if value < 1:
            raise InputError(f"{flag} {value}: must be >= 1")
    for flag, value in (("--timeout", args.timeout), ("--max-seconds", args.max_seconds)):
        if not value > 0:
            raise InputError(f"{flag} {value}: must be > 0")
    for ref in args.ref or []:
        if not Path(ref).is_file():
            raise InputError(f"--ref {ref}: no such file")
    if args.json:
        check_writable_file(args.json, "--json", written_json_report)


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    check_args(args)
    refs = [Path(r).read_bytes() for r in args.ref] if args.ref else [synthetic_reference(0), synthetic_reference(1)]
    options = {} if args.steps is None else {"steps": args.steps}
    body = request_body(args.prompt, refs, options)
    result = run_load(args.url, body, args.requests, args.concurrency, args.timeout, args.max_seconds, args.seed)
    print(result.report())
    if args.json:
        write_json_report(args.json, {"url": args.url, "concurrency": args.concurrency, **result.summary()})
    return 0 if result.ok == result.sent else 1


if __name__ == "__main__":
    sys.exit(main())
