"""The Ray Serve application: a FastAPI ingress deployment in front of DynaIP model replicas.

    HTTP -> Ray Serve proxy -> DynaIPIngress (FastAPI; decode + validate images, retries, timeout, errors)
                                  |  DeploymentHandle (queue bounded by max_queued_requests -> 503 + Retry-After)
                                  v
                               DynaIPModel x N (one DynaIPEngine each; serve.batch groups same-shape requests)

The ingress owns everything a client sees: the request id (``X-Request-ID``, Ray Serve's own, echoed in every
response and logged on every line), 4xx answers carrying the Python API's one-line message, 413 for an oversized
body, 503 with ``Retry-After`` on overload, 504 after the request timeout, and one retry on another replica per
allowed attempt when a model replica dies mid-request (a seeded generation is idempotent). Model replicas batch
requests that share :meth:`DynaIPEngine.batch_key`, up to the build's batch profile, and export Prometheus metrics
through :mod:`ray.serve.metrics` (queue depth, batch size, cache hit rate, latency per stage).

``python -m runtime.serve`` builds this application from its flags; :func:`build_app` is the one entry point.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from dynaip_trt.errors import DynaIPError, InputError, ResourceError
from dynaip_trt.request import GenerationRequest

from .http_api import GenerateRequest, b64_json, encode_png, to_generation_request

logger = logging.getLogger("runtime.serve")

MODEL_DEPLOYMENT = "DynaIPModel"
INGRESS_DEPLOYMENT = "DynaIPIngress"
INGRESS_QUEUE_FACTOR = 10  # requests the proxies may queue for the ingress, per request the model queue holds
LOG_FORMAT = "%(levelname)s %(asctime)s %(name)s [request_id=%(request_id)s] %(message)s"
DRAIN_FACTOR = 8  # an oversized body up to this many times the limit is read before the 413 (see BodyLimit)
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000]
# Stages protocol methods timed per call; the denoise session they start has its steps timed as "denoise_step"
TIMED_STAGES = ("clip_levels", "reference_kv", "encode_text", "denoise_session", "decode")

_request_ids: contextvars.ContextVar[str] = contextvars.ContextVar("dynaip_request_ids", default="-")


@dataclass(frozen=True)
class ServeSettings:
    """Everything the deployments need, set by ``python -m runtime.serve``'s flags (validated there).

    Attributes:
        engine_dir: the build directory (every model replica's node must have it at this path).
        backend, device, precision: as :meth:`DynaIPEngine.from_dir`; ``device="cuda"`` gives each replica a GPU.
        threads: ONNX Runtime intra-op threads per replica (its CPU budget; 0: ONNX Runtime's default).
        cache_bytes: byte budget of each engine cache (reference K/V, prompt embeddings) per replica.
        max_batch: most requests generated together (at most the build's batch profile).
        batch_wait_s: how long a replica waits to fill a batch.
        max_body_bytes: request bodies above this get 413.
        request_timeout_s: a request not answered by then gets 504 (and its work is cancelled).
        retries: extra attempts on another replica when a replica dies mid-request.
        max_queued: requests queued per caller beyond the replicas' capacity; more get 503 + Retry-After.
        retry_after_s: the Retry-After of a 503.
        log_level: level of the runtime's loggers in the replicas.
    """

    engine_dir: str
    backend: str = "onnxruntime"
    device: str | None = None
    precision: str = "fp32"
    threads: int = 0
    cache_bytes: int = 256 << 20
    max_batch: int = 1
    batch_wait_s: float = 0.01
    max_body_bytes: int = 32 << 20
    request_timeout_s: float = 120.0
    retries: int = 2
    max_queued: int = 32
    retry_after_s: float = 1.0
    log_level: str = "INFO"


@dataclass(frozen=True)
class Outcome:
    """A model replica's answer to one request: PNG bytes, or an HTTP status with the engine's one-line message."""

    png: bytes | None = None
    status: int = 200
    error: str = ""
    error_type: str = ""


@dataclass
class _Job:
    request: GenerationRequest
    request_id: str
    received: float
    started: bool = False  # taken into a batch (no longer waiting)


class _RequestIdFilter(logging.Filter):
    """Puts the current request id(s) on every record: the ingress's request, or the ids of the batch a model
    replica is running."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_ids.get()
        return True


def configure_logging(level: str) -> None:
    """The package loggers (``runtime``, ``dynaip_trt``) of a replica write one line per record with the request
    id to stderr (the replica's Ray log, streamed to the driver's console on a local cluster)."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    for name in ("runtime", "dynaip_trt"):
        lg = logging.getLogger(name)
        lg.handlers = [handler]
        lg.setLevel(level)
        lg.propagate = False


class TimedStages:
    """A :class:`Stages` that reports the duration of each protocol call to ``observe(stage, seconds)`` and
    delegates everything else (GPU backends enqueue asynchronously: their figures are host-side times)."""

    def __init__(self, stages: Any, observe: Callable[[str, float], None]):
        self._stages = stages
        self._observe = observe

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._stages, name)
        if name not in TIMED_STAGES or not callable(attr):
            return attr
        return self._timed(attr, name)

    def _timed(self, fn: Callable, name: str) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self._observe(name, time.perf_counter() - start)
            if callable(getattr(out, "step", None)):  # a denoise session: time its steps
                out.step = self._timed(out.step, "denoise_step")
            return out

        return timed


def _histogram(name: str, description: str, tag_keys: tuple[str, ...] = ()) -> Any:
    from ray.serve import metrics

    return metrics.Histogram(name, description=description, boundaries=LATENCY_BOUNDARIES_MS, tag_keys=tag_keys)


def error_response(status: int, message: str, request_id: str, error_type: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error body every failure gets: ``{"error": {"message", "type", "request_id"}}``."""
    return JSONResponse({"error": {"message": message, "type": error_type, "request_id": request_id}},
                        status_code=status, headers=headers)


class DynaIPModel:
    """One :class:`DynaIPEngine` per replica; same-shape requests are generated together."""

    def __init__(self, settings: ServeSettings):
        from ray.serve import metrics

        from .engine import DynaIPEngine

        configure_logging(settings.log_level)
        self.settings = settings
        self._stage_ms = _histogram("dynaip_stage_latency_ms", "Latency per stage of a model replica (ms): queue, "
                                    "generate, encode_png, and each engine stage", ("stage",))
        self._batch_size = metrics.Histogram("dynaip_batch_size", description="Requests generated together",
                                             boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 32])
        self._queue_depth = metrics.Gauge("dynaip_queue_depth", description="Requests waiting in this replica for "
                                          "a batch slot")
        self._cache_hit_rate = metrics.Gauge("dynaip_cache_hit_rate", description="Engine cache hits / lookups",
                                             tag_keys=("cache",))
        self._cache_bytes = metrics.Gauge("dynaip_cache_bytes", description="Bytes held by an engine cache",
                                          tag_keys=("cache",))
        self._waiting = 0
        self.engine = DynaIPEngine.from_dir(settings.engine_dir, backend=settings.backend, device=settings.device,
                                            precision=settings.precision, threads=settings.threads,
                                            cache_bytes=settings.cache_bytes)
        self.engine.sampler.stages = TimedStages(self.engine.stages, self._observe_stage)
        self.max_batch = max(1, min(settings.max_batch, self.engine.max_batch or settings.max_batch))
        self._batched.set_max_batch_size(self.max_batch)
        self._batched.set_batch_wait_timeout_s(settings.batch_wait_s)
        logger.info("model replica ready: %s (%s, %s, %d threads), batches of up to %d", settings.engine_dir,
                    settings.backend, settings.precision, settings.threads, self.max_batch)

    def _observe_stage(self, stage: str, seconds: float) -> None:
        self._stage_ms.observe(seconds * 1000.0, tags={"stage": stage})

    async def generate(self, request: GenerationRequest, request_id: str) -> Outcome:
        """Generate the image of one request (batched with concurrent same-shape requests)."""
        job = _Job(request, request_id, time.perf_counter())
        self._set_waiting(+1)
        try:
            return await self._batched(job)
        finally:
            if not job.started:  # cancelled (timeout, client gone) before its batch began
                self._set_waiting(-1)

    def _set_waiting(self, change: int) -> None:
        self._waiting += change
        self._queue_depth.set(self._waiting)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)  # both set from the settings in __init__
    async def _batched(self, jobs: list[_Job]) -> list[Outcome]:
        self._set_waiting(-len(jobs))
        now = time.perf_counter()
        for job in jobs:
            job.started = True
            self._observe_stage("queue", now - job.received)
        self._batch_size.observe(len(jobs))
        outcomes = await asyncio.to_thread(self._run, jobs)
        for cache, stats in self.engine.cache_stats().items():
            lookups = stats["hits"] + stats["misses"]
            self._cache_hit_rate.set(stats["hits"] / lookups if lookups else 0.0, tags={"cache": cache})
            self._cache_bytes.set(stats["bytes"], tags={"cache": cache})
        return outcomes

    def _run(self, jobs: list[_Job]) -> list[Outcome]:
        """Group ``jobs`` by batch key and generate each group; a request the engine refuses gets its own 4xx."""
        outcomes: dict[int, Outcome] = {}
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            try:
                groups.setdefault(self.engine.batch_key(job.request), []).append(i)
            except DynaIPError as e:
                outcomes[i] = _failure(e)
        for members in groups.values():
            for start in range(0, len(members), self.max_batch):
                chunk = members[start:start + self.max_batch]
                outcomes.update(zip(chunk, self._generate([jobs[i] for i in chunk])))
        return [outcomes[i] for i in range(len(jobs))]

    def _generate(self, jobs: Sequence[_Job]) -> list[Outcome]:
        """One engine batch; when the engine refuses it, each request alone (so only the bad one fails)."""
        token = _request_ids.set(",".join(j.request_id for j in jobs))
        try:
            start = time.perf_counter()
            try:
                images = self.engine.generate_batch([j.request for j in jobs])
            except InputError as e:
                if len(jobs) == 1:
                    return [_failure(e)]
                return [out for job in jobs for out in self._generate([job])]
            except DynaIPError as e:
                return [_failure(e)] * len(jobs)
            except Exception as e:  # a bug or a backend failure: the client gets 500, the log the traceback
                logger.exception("generation failed")
                return [Outcome(status=500, error=f"internal error ({type(e).__name__}); see the server log",
                                error_type="InternalError")] * len(jobs)
            self._observe_stage("generate", time.perf_counter() - start)
            start = time.perf_counter()
            pngs = [encode_png(im) for im in images]
            self._observe_stage("encode_png", time.perf_counter() - start)
            logger.info("generated %d image(s)", len(jobs))
            return [Outcome(png=p) for p in pngs]
        finally:
            _request_ids.reset(token)


def _failure(e: DynaIPError) -> Outcome:
    """The HTTP answer to an engine error: input errors 400, not enough memory 503, anything else 500."""
    status = 400 if isinstance(e, InputError) else 503 if isinstance(e, ResourceError) else 500
    return Outcome(status=status, error=str(e), error_type=type(e).__name__)


class BodyLimit:
    """ASGI middleware: a request body above ``limit`` bytes gets 413 (by Content-Length before it is read, or
    once a chunked body's bytes pass the limit). A declared body of at most :data:`DRAIN_FACTOR` x ``limit`` is read
    and dropped first, so the client, still sending, gets the answer; a larger one is answered at once."""

    def __init__(self, asgi: Any, limit: int):
        self.asgi = asgi
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.asgi(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            if int(length) <= DRAIN_FACTOR * self.limit:  # read it, so the client gets the 413, not a broken pipe
                await _drain(receive)
            return await self._reject(scope, receive, send, f"request body is {int(length)} bytes")
        received, started = 0, False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _TooLarge
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.asgi(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(scope, receive, send, f"request body is over {self.limit} bytes")

    async def _reject(self, scope: dict, receive: Callable, send: Callable, what: str) -> None:
        rid = dict(scope.get("headers") or ()).get(b"x-request-id", b"-").decode("latin-1")
        response = error_response(413, f"{what}; the limit is {self.limit} bytes (--max-body-mb of python -m "
                                  f"runtime.serve)", rid, "PayloadTooLarge")
        await response(scope, receive, send)


async def _drain(receive: Callable) -> None:
    """Read and drop a request body: a client still sending when the answer comes and the connection closes sees a
    broken pipe instead of the answer."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


class _TooLarge(Exception):
    """A streamed request body passed the size limit."""


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body that does not fit the schema: 422 with one line naming each bad field."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())[1:]) or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return error_response(422, "; ".join(parts), request.headers.get("x-request-id", "-"), "ValidationError")


def make_api(ingress: "DynaIPIngress") -> FastAPI:
    """The FastAPI app of an ingress replica (built per replica, so the body limit comes from its settings)."""
    api = FastAPI(
        title="DynaIP",
        description="Images of one or more reference subjects in the scene of a prompt (DynaIP image-prompt adapter "
                    "on a FLUX-class MM-DiT). Every response carries X-Request-ID; errors are "
                    "{\"error\": {\"message\", \"type\", \"request_id\"}}.",
        version="1",
    )
    api.add_middleware(BodyLimit, limit=ingress.settings.max_body_bytes)
    api.add_exception_handler(RequestValidationError, _validation_error)

    @api.post("/v1/generate", response_class=Response, summary="Generate an image of the reference subjects",
              responses={200: {"content": {"image/png": {}, "application/json": {}},
                               "description": "image/png, or {\"images\": [base64 PNG]} with b64_json"},
                         400: {"description": "invalid input (the Python API's message)"},
                         413: {"description": "body too large"}, 422: {"description": "body does not fit the schema"},
                         503: {"description": "overloaded or no replica (Retry-After)"},
                         504: {"description": "request timeout"}})
    async def generate(body: GenerateRequest, request: Request) -> Response:
        return await ingress.generate(body, request.headers.get("x-request-id", "-"))

    @api.get("/healthz", summary="200 once a model replica is ready, else 503")
    async def healthz() -> JSONResponse:
        return await ingress.healthz()

    @api.get("/v1/info", summary="The build's summary and the serving settings")
    async def info() -> dict[str, Any]:
        return ingress.info()

    return api


class DynaIPIngress:
    """The HTTP API (:func:`make_api`; the request schema is :mod:`runtime.http_api`'s)."""

    def __init__(self, model: DeploymentHandle, settings: ServeSettings, summary: dict[str, Any]):
        from ray.serve import metrics

        configure_logging(settings.log_level)
        self.model = model
        self.settings = settings
        self.summary = summary
        self._retry_after = {"Retry-After": str(max(1, math.ceil(settings.retry_after_s)))}
        self._latency_ms = _histogram("dynaip_request_latency_ms", "Latency of POST /v1/generate per stage (ms): "
                                      "decode (base64 + image checks), model (queue + generate), total", ("stage",))
        self._responses = metrics.Counter("dynaip_responses", description="Responses of POST /v1/generate by status",
                                          tag_keys=("status",))
        self._retries = metrics.Counter("dynaip_replica_retries", description="Requests retried on another replica "
                                        "after a replica died")

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self)

    async def generate(self, body: Any, rid: str) -> Response:
        """``POST /v1/generate``: decode and check the body, run it on a model replica, answer."""
        _request_ids.set(rid)
        start = time.perf_counter()
        response = await self._generate(body, rid, start)
        self._latency_ms.observe((time.perf_counter() - start) * 1000.0, tags={"stage": "total"})
        self._responses.inc(tags={"status": str(response.status_code)})
        return response

    async def _generate(self, body: Any, rid: str, start: float) -> Response:
        try:
            req, fmt = await asyncio.to_thread(to_generation_request, body)
        except DynaIPError as e:
            logger.info("refused: %s", e)
            return error_response(400, str(e), rid, type(e).__name__)
        decoded = time.perf_counter()
        self._latency_ms.observe((decoded - start) * 1000.0, tags={"stage": "decode"})
        outcome = await self._call_model(req, rid, start + self.settings.request_timeout_s)
        if isinstance(outcome, Response):
            return outcome
        self._latency_ms.observe((time.perf_counter() - decoded) * 1000.0, tags={"stage": "model"})
        if outcome.png is None:
            if outcome.status < 500:
                logger.info("refused: %s", outcome.error)
            return error_response(outcome.status, outcome.error, rid, outcome.error_type,
                                  self._retry_after if outcome.status == 503 else None)
        logger.info("answered (%s)", fmt)
        if fmt == "b64_json":
            return JSONResponse(b64_json(outcome.png))
        return Response(outcome.png, media_type="image/png")

    async def _call_model(self, req: GenerationRequest, rid: str, deadline: float) -> Outcome | Response:
        """Send ``req`` to a model replica; when the replica dies, retry on another (``settings.retries`` times)."""
        failures: list[str] = []
        for attempt in range(1 + self.settings.retries):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            response = self.model.generate.remote(req, rid)
            try:
                return await asyncio.wait_for(response, timeout=remaining)
            except asyncio.TimeoutError:
                response.cancel()
                break
            except BackPressureError as e:
                logger.warning("overloaded: %s", e)
                return error_response(503, f"the server is overloaded ({e}); retry later", rid, "Overloaded",
                                      self._retry_after)
            except DeploymentUnavailableError as e:
                return error_response(503, e.message, rid, "Unavailable", self._retry_after)
            except RayActorError as e:
                failures.append(type(e).__name__)
                self._retries.inc()
                logger.warning("model replica died during the request (attempt %d of %d): %s", attempt + 1,
                               1 + self.settings.retries, (str(e).splitlines() or [type(e).__name__])[0])
        if len(failures) == 1 + self.settings.retries:
            return error_response(503, f"no model replica could finish the request ({len(failures)} attempts, the "
                                  f"replica died each time); retry later", rid, "Unavailable", self._retry_after)
        logger.warning("timed out after %g s", self.settings.request_timeout_s)
        return error_response(504, f"the request was not answered within {self.settings.request_timeout_s:g} s "
                              f"(--request-timeout of python -m runtime.serve)", rid, "Timeout")

    async def healthz(self) -> JSONResponse:
        """``GET /healthz``: 200 once a model replica is running, else 503 with Retry-After."""
        ready = await asyncio.to_thread(_running_replicas, serve.get_replica_context().app_name)
        if ready:
            return JSONResponse({"status": "ok", "replicas_ready": ready})
        return JSONResponse({"status": "starting", "replicas_ready": 0}, status_code=503, headers=self._retry_after)

    def info(self) -> dict[str, Any]:
        """``GET /v1/info``: the build's summary, the serving settings (without paths) and the Ray version."""
        settings = dataclasses.asdict(self.settings)
        settings.pop("engine_dir")
        return {**self.summary, "serving": settings, "ray": ray.__version__}


def _running_replicas(app_name: str) -> int:
    """Model replicas in state RUNNING (asks the Serve controller: never queues behind generation requests)."""
    application = serve.status().applications.get(app_name)
    if application is None or MODEL_DEPLOYMENT not in application.deployments:
        return 0
    return int(application.deployments[MODEL_DEPLOYMENT].replica_states.get("RUNNING", 0))


def build_app(settings: ServeSettings, summary: dict[str, Any], replicas: int | None = None,
              min_replicas: int | None = None, max_replicas: int | None = None, ingress_replicas: int = 1
              ) -> serve.Application:
    """The application: ``replicas`` model replicas, or ``min_replicas..max_replicas`` autoscaled on ongoing
    requests (target: one full batch per replica). Each model replica takes ``settings.threads`` CPUs (one GPU
    with ``device="cuda"``); the ingress takes no CPU reservation."""
    gpu = (settings.device or "").startswith("cuda")
    scaling: dict[str, Any] = {"num_replicas": replicas or 1} if max_replicas is None else {
        "autoscaling_config": {"min_replicas": min_replicas or 1, "max_replicas": max_replicas,
                               "target_ongoing_requests": settings.max_batch}}
    backpressure = {"retry_after_s": settings.retry_after_s}
    # the deployments wrap the module's classes, so replicas import this module (the package must be installed on
    # every node) instead of unpickling copies of the classes
    model = serve.deployment(DynaIPModel, name=MODEL_DEPLOYMENT).options(
        **scaling,
        ray_actor_options={"num_cpus": 1 if gpu else max(1, settings.threads), "num_gpus": 1 if gpu else 0},
        max_ongoing_requests=2 * settings.max_batch,  # one batch running, the next one filling
        max_queued_requests=settings.max_queued,
        backpressure_config=backpressure,
        max_constructor_retry_count=2,  # a build that cannot load fails the deployment instead of looping
        graceful_shutdown_timeout_s=settings.request_timeout_s,
    ).bind(settings)
    # the proxies' queue in front of the (light, async) ingress only bounds a flood; overload is answered by the
    # ingress when the model replicas' queue is full (503 with the JSON error body)
    return serve.deployment(serve.ingress()(DynaIPIngress), name=INGRESS_DEPLOYMENT).options(
        num_replicas=ingress_replicas, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000,
        max_queued_requests=INGRESS_QUEUE_FACTOR * settings.max_queued + 100, backpressure_config=backpressure,
    ).bind(model, settings, summary)
