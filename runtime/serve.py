"""Serve a build over HTTP with Ray Serve, on one machine or a Ray cluster.

    python -m runtime.serve --engine-dir build/tiny [--replicas N | --min-replicas A --max-replicas B]
        [--host 127.0.0.1] [--port 8000] [--address auto] [--device cuda] ...

Starts a local Ray instance (or joins a cluster with ``--address``), deploys the DynaIP application (a FastAPI
ingress in front of model replicas, see :mod:`runtime.serve_app`), prints its URL and serves until SIGINT or SIGTERM,
then shuts down what it started. Arguments and the build directory are checked before Ray starts: a problem is one
line on stderr and exit status 2. The HTTP API is described in docs/serving.md and at ``/docs`` once running.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dynaip_trt.cli import cli_main, configure_logging
from dynaip_trt.errors import InputError

logger = logging.getLogger("runtime.serve")

BACKENDS = ("onnxruntime", "tensorrt")
MIB = 1 << 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--engine-dir", required=True, help="build directory (export.onnx / export.build); every node "
                   "running a model replica needs it at this path")
    scale = p.add_argument_group("replicas (a fixed count, or autoscaling on ongoing requests)")
    scale.add_argument("--replicas", type=int, help="model replicas (default 1)")
    scale.add_argument("--min-replicas", type=int, help="autoscaling: fewest model replicas (default 1)")
    scale.add_argument("--max-replicas", type=int, help="autoscaling: most model replicas")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy listens on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--address", help="join this Ray cluster ('auto': the one started on this node with ray start); "
                   "default: start a local Ray instance")
    p.add_argument("--num-cpus", type=int, help="local Ray instance: CPUs it may use (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: one GPU per model replica")
    p.add_argument("--backend", choices=BACKENDS, help="default: tensorrt with --device cuda when the build has "
                   "engines, else onnxruntime")
    p.add_argument("--precision", default="fp32", help="onnxruntime: fp32 or a variant the build lists (fp16)")
    p.add_argument("--threads", type=int, help="CPU threads per model replica (ONNX Runtime intra-op; the replica "
                   "reserves as many Ray CPUs); default: the CPUs divided among the most replicas (--device cpu)")
    p.add_argument("--max-batch", type=int, help="most requests generated together (default and limit: the build's "
                   "batch profile)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a replica waits to fill a batch")
    p.add_argument("--cache-mb", type=float, default=256.0, help="per replica: size of each engine cache (reference "
                   "K/V, prompt embeddings)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="larger request bodies get 413")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds; later answers become 504")
    p.add_argument("--retries", type=int, default=2, help="retries on another replica when a replica dies "
                   "mid-request (then 503)")
    p.add_argument("--max-queued", type=int, default=32, help="requests waiting for a replica beyond the replicas' "
                   "capacity; more get 503 with Retry-After")
    p.add_argument("--retry-after", type=float, default=1.0, help="seconds, the Retry-After of a 503")
    p.add_argument("--ingress-replicas", type=int, default=1, help="HTTP ingress replicas")
    p.add_argument("--app-name", default="dynaip", help="Ray Serve application name")
    p.add_argument("--deploy-timeout", type=float, default=600.0, help="seconds for every replica to start (engine "
                   "loading included); then the command stops with the deployment's status")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Plan:
    """What the validated arguments ask for."""

    replicas: int | None
    min_replicas: int | None
    max_replicas: int | None
    backend: str
    threads: int
    max_batch: int
    summary: dict


def _check_range(flag: str, value: float | None, low: float, high: float = math.inf) -> None:
    if value is not None and not (low <= value <= high and math.isfinite(value)):
        bound = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise InputError(f"{flag} {value:g}: must be {bound}")


def check_args(args: argparse.Namespace) -> Plan:
    """Validate the arguments and the build directory before anything heavy starts (no Ray, no model)."""
    from dynaip_trt.errors import ManifestError
    from dynaip_trt.manifest import Manifest

    from .build_info import summarize_build

    for flag, value, low in (("--replicas", args.replicas, 1), ("--min-replicas", args.min_replicas, 0),
                             ("--max-replicas", args.max_replicas, 1), ("--threads", args.threads, 0),
                             ("--max-batch", args.max_batch, 1), ("--batch-wait-ms", args.batch_wait_ms, 0),
                             ("--cache-mb", args.cache_mb, 0), ("--max-body-mb", args.max_body_mb, 1 / 1024),
                             ("--request-timeout", args.request_timeout, 0.1), ("--retries", args.retries, 0),
                             ("--max-queued", args.max_queued, 1), ("--retry-after", args.retry_after, 0),
                             ("--ingress-replicas", args.ingress_replicas, 1), ("--num-cpus", args.num_cpus, 1),
                             ("--deploy-timeout", args.deploy_timeout, 1)):
        _check_range(flag, value, low)
    _check_range("--port", args.port, 1, 65535)
    if args.replicas is not None and (args.min_replicas is not None or args.max_replicas is not None):
        raise InputError("--replicas is a fixed count; leave it out to autoscale with --min-replicas/--max-replicas")
    if args.min_replicas is not None and args.max_replicas is None:
        raise InputError("--min-replicas needs --max-replicas (the autoscaling range)")
    if args.max_replicas is not None and (args.min_replicas or 1) > args.max_replicas:
        raise InputError(f"--min-replicas {args.min_replicas} is above --max-replicas {args.max_replicas}")
    if args.address is not None and args.num_cpus is not None:
        raise InputError("--num-cpus sizes a local Ray instance; a cluster joined with --address has its own")

    directory = Path(args.engine_dir)
    if not directory.is_dir():
        raise InputError(f"--engine-dir {directory}: no such directory (create one with python -m export.onnx)")
    try:
        manifest = Manifest.load(directory)
    except ManifestError as e:
        raise InputError(f"--engine-dir {directory}: {e}") from None
    summary = summarize_build(directory, manifest)

    backend = args.backend or ("tensorrt" if args.device == "cuda" and manifest.tensorrt else "onnxruntime")
    if backend == "tensorrt":
        if args.device != "cuda":
            raise InputError("--backend tensorrt needs --device cuda (TensorRT engines run on GPUs)")
        if not manifest.tensorrt:
            raise InputError(f"--engine-dir {directory} has no TensorRT engines: build them with python -m "
                             f"export.build, or use --backend onnxruntime")
        if args.precision != "fp32":
            raise InputError("--precision applies to --backend onnxruntime; TensorRT engines have the precision "
                             "they were built with")
    elif not any(args.precision in (e.precision, *e.variants) for e in manifest.models.values()):
        raise InputError(f"--precision {args.precision}: the build has no such graphs (it has "
                         f"{sorted({p for e in manifest.models.values() for p in (e.precision, *e.variants)})})")

    build_batch = summary["max_batch"]
    if args.max_batch is not None and args.max_batch > build_batch:
        raise InputError(f"--max-batch {args.max_batch}: the build's batch profile allows at most {build_batch} "
                         f"(re-export with --batch to raise it)")
    most = args.max_replicas or args.replicas or 1
    cpus = args.num_cpus or os.cpu_count() or 1
    threads = args.threads if args.threads is not None else 0 if args.device == "cuda" else max(1, cpus // most)
    if args.address is None:
        if args.device == "cpu" and most * max(1, threads) > cpus:
            raise InputError(f"{most} model replica(s) x --threads {threads} need {most * threads} CPUs; the local "
                             f"Ray instance has {cpus} (lower --threads or the replica count, or set --num-cpus)")
        _check_port_free(args.host, args.port)
    return Plan(replicas=None if args.max_replicas else (args.replicas or 1), min_replicas=args.min_replicas,
                max_replicas=args.max_replicas, backend=backend, threads=threads,
                max_batch=args.max_batch or build_batch, summary=summary)


def _check_port_free(host: str, port: int) -> None:
    """A local instance's proxy must be able to listen on ``host:port``: say so now rather than after Ray starts."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise InputError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


def _settings(args: argparse.Namespace, plan: Plan):
    from .serve_app import ServeSettings

    return ServeSettings(
        engine_dir=str(Path(args.engine_dir).resolve()), backend=plan.backend, device=args.device,
        precision=args.precision, threads=plan.threads, cache_bytes=int(args.cache_mb * MIB),
        max_batch=plan.max_batch, batch_wait_s=args.batch_wait_ms / 1000.0,
        max_body_bytes=int(args.max_body_mb * MIB), request_timeout_s=args.request_timeout, retries=args.retries,
        max_queued=args.max_queued, retry_after_s=args.retry_after,
        log_level="DEBUG" if args.verbose else "INFO")


def start_ray(address: str | None, num_cpus: int | None) -> int | None:
    """Join ``address``, or start a local instance bound to the loopback address (no dashboard). Returns the port
    of this node's Prometheus metrics endpoint (local instance only)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if address is not None:
        ray.init(address=address, logging_level=logging.WARNING)
        return None
    context = ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                       logging_level=logging.WARNING)
    return context.address_info.get("metrics_export_port")


class DeployError(RuntimeError):
    """The application did not reach RUNNING (a replica failed to start, or could not be scheduled in time)."""


def deploy(args: argparse.Namespace, plan: Plan) -> str:
    """Start Serve's HTTP proxy, run the application and wait (at most ``--deploy-timeout``) until every replica is
    running; returns the URL. :class:`DeployError` says what went wrong."""
    from ray import serve

    serve.start(http_options={"host": args.host, "port": args.port,
                              "request_timeout_s": args.request_timeout + 10.0})  # a backstop of the ingress's
    app = _application(args, plan)
    serve.run_many([serve.RunTarget(target=app, name=args.app_name, route_prefix="/")],
                   wait_for_applications_running=False)
    deadline = time.monotonic() + args.deploy_timeout
    while True:
        status = serve.status().applications.get(args.app_name)
        if status is not None and status.status == "RUNNING":
            break
        problems = [] if status is None else [status.message] + [d.message for d in status.deployments.values()]
        problem = _last_error([p for p in problems if p]) or "no status message"
        if status is not None and status.status == "DEPLOY_FAILED":
            raise DeployError(problem)
        if time.monotonic() > deadline:
            raise DeployError(f"not running after --deploy-timeout {args.deploy_timeout:g} s: {problem}")
        time.sleep(1.0)
    host = f"[{args.host}]" if ":" in args.host else args.host
    return f"http://{host}:{args.port}/"


def _application(args: argparse.Namespace, plan: Plan):
    from .serve_app import build_app

    return build_app(_settings(args, plan), plan.summary, replicas=plan.replicas, min_replicas=plan.min_replicas,
                     max_replicas=plan.max_replicas, ingress_replicas=args.ingress_replicas)


CONFIG_ONLY_FLAGS = ("host", "port", "address", "num_cpus", "deploy_timeout", "app_name")


def app_builder(args: dict):
    """The application for Serve config files (``serve deploy``, KubeRay's RayService ``serveConfigV2``)::

        import_path: runtime.serve:app_builder
        args: {engine_dir: /models/flux-dev, device: cuda, min_replicas: 1, max_replicas: 8}

    ``args`` are this command's flags (``_`` or ``-`` between words; ``true`` for ``--verbose``), checked as the
    command checks them. Host, port and the application name come from the config file (``http_options``,
    ``name``), not from ``args``."""
    argv: list[str] = []
    for key, value in args.items():
        name = str(key).replace("-", "_")
        if name in CONFIG_ONLY_FLAGS:
            raise InputError(f"args.{key}: set it in the Serve config file (http_options / the application's "
                             f"name), not in args")
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (False, None):
            argv += [flag, str(value)]
    try:
        parsed = parse_args(argv + ["--address", "auto"])  # on a cluster: no local port or CPU checks
    except SystemExit:
        raise InputError(f"args {args}: not flags of python -m runtime.serve (see its --help)") from None
    return _application(parsed, check_args(parsed))


def _last_error(messages: list[str]) -> str:
    """One line from Serve's status messages: the last line naming an error (a replica constructor's exception),
    else the first line."""
    lines = [ln.strip() for m in messages for ln in m.splitlines() if ln.strip()]
    return next((ln for ln in reversed(lines) if "Error" in ln), lines[0] if lines else "")


def shutdown(app_name: str, started_ray: bool) -> None:
    """Remove what this process started: the whole local instance, or only our application on a cluster."""
    import ray
    from ray import serve

    try:
        if started_ray:
            serve.shutdown()
        else:
            serve.delete(app_name)
    finally:
        ray.shutdown()


def wait_for_signal() -> int:
    """Block until SIGINT or SIGTERM; returns the signal number."""
    received: list[int] = []
    done = threading.Event()

    def handler(signum, frame):
        received.append(signum)
        done.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    while not done.wait(1.0):
        pass
    return received[0]


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose)
    plan = check_args(args)
    metrics_port = start_ray(args.address, args.num_cpus)
    started_ray = args.address is None
    try:
        try:
            url = deploy(args, plan)
        except DeployError as e:
            logger.error("deploying the application failed: %s", e)
            return 1
        replicas = (f"{plan.replicas} model replica(s)" if plan.replicas else
                    f"{plan.min_replicas or 1}..{plan.max_replicas} model replicas (autoscaling)")
        print(f"DynaIP serving {args.engine_dir} at {url} ({replicas}, {plan.backend}, {plan.threads} thread(s) "
              f"each; API docs: {url}docs). Stop with Ctrl-C.", flush=True)
        if metrics_port:
            print(f"Prometheus metrics of this node: http://127.0.0.1:{metrics_port}/metrics", flush=True)
        signum = wait_for_signal()
        logger.info("%s received: shutting down", signal.Signals(signum).name)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # shutting down: a second Ctrl-C must not leave processes behind
        shutdown(args.app_name, started_ray)
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
