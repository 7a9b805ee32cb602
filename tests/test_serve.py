"""Serving on Ray Serve: the HTTP schema, the CLI's fail-fast checks, the ingress's error handling, and ONE real
local Ray Serve app on the tiny build (2 model replicas, loopback only) shared by the tests of its behaviour.

The server is ``python -m runtime.serve`` in a subprocess (its own Ray instance); the last test stops it with
SIGINT and checks that every process it started is gone.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray.serve", reason="needs the [serve] extra (ray[serve])")
psutil = pytest.importorskip("psutil")

from dynaip_trt.errors import ImageError, InputError  # noqa: E402
from dynaip_trt.request import GenerationRequest  # noqa: E402
from runtime.http_api import EXCLUDED_FIELDS, GenerateRequest, request_model, to_generation_request  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL_PROC = "ServeReplica:dynaip:DynaIPModel"
STARTUP_S = 180  # a local Ray instance + 2 replicas loading the tiny build; about 60 s on 2 busy cores


def png_b64(size: tuple[int, int] = (48, 40), seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


# ------------------------------------------------------------------------------------------------- schema, no Ray
def test_schema_has_every_generation_request_field_with_its_default():
    fields = {f.name: f for f in dataclasses.fields(GenerationRequest)}
    schema = GenerateRequest.model_fields
    assert set(schema) == set(fields) - set(EXCLUDED_FIELDS) | {"response_format"}
    for name in set(schema) - {"response_format"}:
        if fields[name].default is dataclasses.MISSING:
            assert schema[name].is_required(), name
        else:
            assert schema[name].default == fields[name].default, name
    assert schema["prompt"].is_required() and schema["references"].is_required()
    assert schema["response_format"].default == "png"


def test_schema_follows_new_dataclass_fields():
    @dataclasses.dataclass
    class Extended(GenerationRequest):
        """Attributes:
            negative_prompt: what the image must not show.
            true_cfg: classifier-free guidance scale.
        """

        negative_prompt: str | None = None
        true_cfg: float = 1.0

    model = request_model(Extended)
    assert model.model_fields["true_cfg"].default == 1.0
    assert model.model_fields["negative_prompt"].description == "what the image must not show."
    body = model.model_validate({"prompt": "p", "references": [png_b64()], "true_cfg": 4, "negative_prompt": "x"})
    assert body.true_cfg == 4.0

    @dataclasses.dataclass
    class Unservable(GenerationRequest):
        callback: object = None

    with pytest.raises(TypeError, match="GenerationRequest.callback has type"):
        request_model(Unservable)


@pytest.mark.parametrize("references, message", [
    (["!!!"], "references[0]: not valid base64"),
    ([base64.b64encode(b"just some text").decode()], "references[0]: the decoded bytes are not a readable image"),
    (["data:image/png,abc"], "references[0]: a data: URL must be base64-encoded"),
    ([png_b64(), [png_b64(), ""]], "references[1] view 1: empty image"),
    ([png_b64((8, 8))], "references[0]: image is 8x8; both sides must be at least 32 px"),
])
def test_bad_images_raise_image_errors_naming_the_subject(references, message):
    body = GenerateRequest.model_validate({"prompt": "p", "references": references})
    with pytest.raises(ImageError) as e:
        to_generation_request(body)
    assert str(e.value).startswith(message)


def test_images_decode_to_rgb_views_and_masks():
    body = GenerateRequest.model_validate({
        "prompt": "p", "references": [png_b64(), ["data:image/png;base64," + png_b64(seed=1), png_b64(seed=2)]],
        "masks": [png_b64((64, 64)), [[0.5] * 2] * 2], "seed": 3, "response_format": "b64_json"})
    req, fmt = to_generation_request(body)
    assert fmt == "b64_json" and req.seed == 3 and req.text_branch is None
    assert [len(s) for s in req.references] == [1, 2] and all(im.mode == "RGB" for s in req.references for im in s)
    assert req.masks[0].mode == "L" and req.masks[1] == [[0.5, 0.5], [0.5, 0.5]]


def test_schema_refuses_unknown_fields_and_coercions():
    from pydantic import ValidationError

    for bad in ({"prompt": "p", "references": [], "text_branch": {"steps": 2}}, {"prompt": "p", "references": [],
                                                                                  "steps": "4"},
                {"prompt": "p", "references": [], "response_format": "jpeg"}):
        with pytest.raises(ValidationError):
            GenerateRequest.model_validate(bad)


# ---------------------------------------------------------------------------------------------- CLI, before Ray
@pytest.mark.parametrize("args, message", [
    (["--engine-dir", "{missing}"], "--engine-dir {missing}: no such directory"),
    (["--engine-dir", "{empty}"], "has no manifest.json"),
    (["--engine-dir", "{build}", "--replicas", "2", "--max-replicas", "3"], "--replicas is a fixed count"),
    (["--engine-dir", "{build}", "--min-replicas", "3", "--max-replicas", "2"], "--min-replicas 3 is above"),
    (["--engine-dir", "{build}", "--min-replicas", "1"], "--min-replicas needs --max-replicas"),
    (["--engine-dir", "{build}", "--replicas", "0"], "--replicas 0: must be >= 1"),
    (["--engine-dir", "{build}", "--max-batch", "64"], "--max-batch 64: the build's batch profile allows at most 4"),
    (["--engine-dir", "{build}", "--backend", "tensorrt"], "--backend tensorrt needs --device cuda"),
    (["--engine-dir", "{build}", "--device", "cuda", "--backend", "tensorrt"], "has no TensorRT engines"),
    (["--engine-dir", "{build}", "--precision", "bf16"], "--precision bf16: the build has no such graphs"),
    (["--engine-dir", "{build}", "--port", "70000"], "--port 70000: must be in [1, 65535]"),
    (["--engine-dir", "{build}", "--port", "{busy}"], "cannot listen there"),
])
def test_cli_fails_fast_with_one_line(args, message, tiny_build, tmp_path, caplog):
    from runtime.serve import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        names = {"missing": str(tmp_path / "nope"), "empty": str(tmp_path), "build": str(tiny_build),
                 "busy": str(busy.getsockname()[1])}
        argv = [a.format(**names) for a in args]
        with caplog.at_level("ERROR", logger="runtime.serve"):
            assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message.format(**names) in errors[0], errors


def test_cli_checks_arguments_without_starting_ray(tmp_path):
    """A bad --engine-dir exits 2 with one line, and the process never imported Ray (nothing started)."""
    code = ("import sys, runtime.serve as s; rc = s.main(['--engine-dir', sys.argv[1]]); "
            "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY'); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "nope")], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "NO_RAY" in out.stdout
    assert [ln for ln in out.stderr.splitlines() if ln.startswith("ERROR")] == [
        f"ERROR runtime.serve: --engine-dir {tmp_path / 'nope'}: no such directory (create one with python -m "
        f"export.onnx)"]
    assert "Traceback" not in out.stderr
    help_out = subprocess.run([sys.executable, "-m", "runtime.serve", "--help"], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
    assert help_out.returncode == 0 and "--min-replicas" in help_out.stdout and "--request-timeout" in help_out.stdout


def test_loadtest_counts_errors_and_refuses_bad_arguments(tmp_path, capsys, caplog):
    from runtime.loadtest import main

    assert main(["--url", f"http://127.0.0.1:{_free_port()}", "--requests", "3", "--concurrency", "2",
                 "--timeout", "5"]) == 1  # nothing listens there
    printed = capsys.readouterr().out
    assert "requests: 3 sent, 0 ok, 3 failed" in printed and "statuses: 0 x3" in printed
    for argv, message in ((["--url", "ftp://x", "--requests", "1", "--concurrency", "1"], "--url ftp://x"),
                          (["--url", "http://x", "--requests", "0", "--concurrency", "1"], "--requests 0"),
                          (["--url", "http://x", "--requests", "1", "--concurrency", "1", "--ref",
                            str(tmp_path / "no.png")], "no such file"),
                          (["--url", "http://x", "--requests", "1", "--concurrency", "1", "--json",
                            str(tmp_path / "no" / "r.json")], "cannot write there (no such folder)")):
        caplog.clear()
        assert main(argv) == 2
        assert message in caplog.records[-1].getMessage()


def test_serve_benchmark_table_and_fail_fast(tmp_path, caplog):
    from runtime.loadtest import LoadResult
    from runtime.serve_benchmark import main, table

    rows = [(1, 2, LoadResult(10, 10, 5.0, [0.1] * 10, {200: 10})),
            (2, 1, LoadResult(10, 10, 2.5, [0.2] * 10, {200: 10}))]
    text = table(rows)
    assert "| 1 | 2 | 10 / 10 | 2.00 |" in text and text.endswith("| 2 | 1 | 10 / 10 | 4.00 | 0.200 | 0.200 | 0.200 "
                                                                   "| 2.00x |")
    for argv, message in ((["--engine-dir", str(tmp_path / "nope")], "no such directory"),
                          (["--engine-dir", str(tmp_path), "--replicas", "1,x"], "comma-separated counts")):
        caplog.clear()
        assert main(argv) == 2
        assert message in caplog.records[-1].getMessage()


def test_app_builder_for_serve_config_files(tiny_build):
    """``import_path: runtime.serve:app_builder`` with the command's flags as args (KubeRay's RayService)."""
    from ray.serve import Application

    from runtime.serve import app_builder

    app = app_builder({"engine_dir": str(tiny_build), "max-replicas": 3, "threads": 1, "verbose": True})
    assert isinstance(app, Application)
    with pytest.raises(InputError, match="args.port: set it in the Serve config file"):
        app_builder({"engine_dir": str(tiny_build), "port": 8000})
    with pytest.raises(InputError, match="--max-batch 9: the build's batch profile allows at most 4"):
        app_builder({"engine_dir": str(tiny_build), "max_batch": 9})
    with pytest.raises(InputError, match="not flags of python -m runtime.serve"):
        app_builder({"engine_dir": str(tiny_build), "colour": "blue"})


# ----------------------------------------------------------------------------- the ingress's failure handling
class _Metric:
    def observe(self, *a, **k): ...

    def inc(self, *a, **k): ...


class _FakeResponse:
    def __init__(self, outcome):
        self.outcome = outcome
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def __await__(self):
        if isinstance(self.outcome, float):  # a replica that takes this long
            yield from asyncio.sleep(self.outcome).__await__()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class _FakeHandle:
    """Stands in for the model's DeploymentHandle: answers each call with the next scripted outcome."""

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)
        self.calls: list[_FakeResponse] = []
        self.generate = self

    def remote(self, request, request_id):
        self.calls.append(_FakeResponse(self.outcomes.pop(0)))
        return self.calls[-1]


def _ingress(outcomes, **settings):
    from runtime.serve_app import DynaIPIngress, ServeSettings

    ingress = object.__new__(DynaIPIngress)  # no replica context: metrics replaced by no-ops
    ingress.model = _FakeHandle(outcomes)
    ingress.settings = ServeSettings(engine_dir="unused", **settings)
    ingress._retry_after = {"Retry-After": "2"}
    ingress._latency_ms = ingress._responses = ingress._retries = _Metric()
    return ingress


def _call(ingress) -> tuple[int, dict[str, str], Any]:
    from runtime.serve_app import Outcome

    out = asyncio.run(ingress._call_model(GenerationRequest("p", []), "rid-1", time.perf_counter()
                                          + ingress.settings.request_timeout_s))
    if isinstance(out, Outcome):
        return 200, {}, out
    return out.status_code, dict(out.headers), json.loads(out.body)["error"]


def test_dead_replica_is_retried_then_503():
    from ray.exceptions import ActorDiedError

    from runtime.serve_app import Outcome

    ok = Outcome(png=b"png")
    status, _, out = _call(_ingress([ActorDiedError(), ok], retries=2))
    assert status == 200 and out is ok
    status, headers, error = _call(_ingress([ActorDiedError()] * 3, retries=2))
    assert status == 503 and headers["retry-after"] == "2" and error["type"] == "Unavailable"
    assert "3 attempts" in error["message"] and error["request_id"] == "rid-1"


def test_overload_is_503_with_retry_after_and_timeout_is_504():
    from ray.serve.exceptions import BackPressureError

    status, headers, error = _call(_ingress([BackPressureError(num_queued_requests=8, max_queued_requests=8)]))
    assert status == 503 and headers["retry-after"] == "2" and "overloaded" in error["message"]
    ingress = _ingress([5.0], request_timeout_s=0.2)
    status, _, error = _call(ingress)
    assert status == 504 and "within 0.2 s (--request-timeout" in error["message"]
    assert ingress.model.calls[0].cancelled


# ------------------------------------------------------------------------------------ one real Ray Serve app
@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    pids: set[int]
    metrics_url: str | None = None

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _kill(pids: set[int]) -> None:
    """SIGKILL what is left of the processes the server started (only those: its tree and its session)."""
    for pid in _alive(pids):
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


def _in_session(sid: int) -> set[int]:
    """Processes of the session the server was started in (orphans that left the process tree included)."""
    pids = set()
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.pid != sid:
                pids.add(p.pid)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
    return pids


def _get(url: str, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _post(url: str, body: bytes | dict, headers: dict[str, str] | None = None, timeout: float = 120.0
          ) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "v1/generate", data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


@pytest.fixture(scope="module")
def server(tiny_build, tmp_path_factory):
    """``python -m runtime.serve`` on the tiny build: 2 model replicas of 1 thread on a 2-CPU local Ray instance,
    1 MiB body limit, 20 queued requests at most (a burst of 20 is accepted whole), 3 retries."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    port = _free_port()
    cmd = [sys.executable, "-m", "runtime.serve", "--engine-dir", str(tiny_build), "--replicas", "2",
           "--threads", "1", "--num-cpus", "2", "--port", str(port), "--max-body-mb", "1", "--max-queued", "20",
           "--retries", "3", "--request-timeout", "60", "--batch-wait-ms", "20"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    srv = Server(url=f"http://127.0.0.1:{port}/", proc=proc, log=log, pids=set())
    deadline = time.monotonic() + STARTUP_S
    while "DynaIP serving" not in srv.text():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(_descendants(proc.pid) | _in_session(proc.pid) | {proc.pid})
            pytest.fail(f"the server did not start (exit {proc.poll()}):\n{srv.text()[-3000:]}")
        time.sleep(0.5)
    while _get(srv.url + "healthz")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    m = re.search(r"Prometheus metrics of this node: (\S+)", srv.text())
    srv.metrics_url = m.group(1) if m else None
    srv.pids = _descendants(proc.pid)
    yield srv
    if proc.poll() is None:  # the shutdown test did not run or failed: leave nothing behind
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    _kill(srv.pids | _descendants(proc.pid) | _in_session(proc.pid))


@pytest.fixture(scope="module")
def engine(tiny_build):
    from runtime import DynaIPEngine

    return DynaIPEngine.from_dir(tiny_build, backend="onnxruntime")


@pytest.fixture(scope="module")
def refs():
    return [png_b64((48, 40), 0), [png_b64((40, 48), 1), png_b64((64, 64), 2)]]


def _pil(refs: list) -> list:
    """The HTTP references as the Python API takes them (PIL images per subject), decoded by PIL alone."""
    return [[Image.open(io.BytesIO(base64.b64decode(v))) for v in ([r] if isinstance(r, str) else r)] for r in refs]


def _expected(engine, refs, seed: int, **options) -> np.ndarray:
    """The in-process engine's image for the request the server got."""
    image = engine.generate("two toys", _pil(refs), seed=seed, **options)[0]
    return np.asarray(image, dtype=np.int16)


def test_healthz_info_and_docs(server, tiny_build):
    from dynaip_trt.manifest import Manifest

    status, _, body = _get(server.url + "healthz")
    assert status == 200 and json.loads(body) == {"status": "ok", "replicas_ready": 2}
    info = json.loads(_get(server.url + "v1/info")[2])
    config = Manifest.load(tiny_build).dynaip_config.name
    assert (info["config"], info["max_subjects"], info["max_batch"]) == (config, 4, 4)
    assert info["resolutions"]["max"] == "64x64" and set(info["models"]) == {"clip", "dit", "fusion", "text", "vae"}
    assert info["serving"]["threads"] == 1 and "engine_dir" not in info["serving"]
    assert _get(server.url + "docs")[0] == 200
    openapi = json.loads(_get(server.url + "openapi.json")[2])
    schema = openapi["components"]["schemas"]["GenerateRequest"]["properties"]
    assert set(schema) == set(GenerateRequest.model_fields)


def test_concurrent_requests_all_match_the_in_process_engine(server, engine, refs):
    """20 requests at once (half png, half b64_json) all succeed; each image equals the in-process engine's for
    the same seed (batched on the server: within 1 of 255 per channel, and in fact equal on this engine)."""

    def one(seed: int):
        fmt = "png" if seed % 2 else "b64_json"
        return seed, fmt, _post(server.url, {"prompt": "two toys", "references": refs, "seed": seed,
                                             "response_format": fmt})

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    ids = set()
    for seed, fmt, (status, headers, body) in results:
        assert status == 200, body[:300]
        ids.add(headers["x-request-id"])
        if fmt == "png":
            assert headers["content-type"] == "image/png"
            got = decode_png(body)
        else:
            got = decode_png(base64.b64decode(json.loads(body)["images"][0]))
        expected = _expected(engine, refs, seed)
        assert got.shape == expected.shape == (64, 64, 3)
        assert np.abs(got - expected).max() <= 1, f"seed {seed}"
    assert len(ids) == 20


def test_every_bad_request_gets_4xx_with_the_python_api_message(server, engine, refs):
    def python_error(**options) -> str:
        with pytest.raises(InputError) as e:
            _expected(engine, options.pop("references", refs), 0, **options)
        return str(e.value)

    cases = [  # (body changes, status, expected message or None for "any one line")
        ({"steps": 0}, 400, python_error(steps=0)),
        ({"scales": [1.0, -1.0]}, 400, python_error(scales=[1.0, -1.0])),
        ({"height": 50}, 400, python_error(height=50)),
        ({"granularity": [0, 0, 0]}, 400, python_error(granularity=[0, 0, 0])),
        ({"masks": [[[0.5]]]}, 400, python_error(masks=[[[0.5]]])),
        ({"references": [png_b64()] * 5}, 400, python_error(references=[png_b64()] * 5)),
        ({"references": []}, 400, python_error(references=[])),
        ({"references": [[]]}, 400, python_error(references=[[]])),
        ({"references": [png_b64((8, 8))]}, 400, python_error(references=[png_b64((8, 8))])),
        ({"references": ["%%%"]}, 400, None),
        ({"references": [base64.b64encode(b"GIF89a-not-really").decode()]}, 400, None),
        ({"steps": "4"}, 422, None),
        ({"text_branch": {"steps": 2}}, 422, None),
        ({"response_format": "jpeg"}, 422, None),
    ]
    for change, status, message in cases:
        got, headers, body = _post(server.url, {"prompt": "two toys", "references": refs, **change})
        error = json.loads(body)["error"]
        assert got == status, (change, body[:300])
        assert "\n" not in error["message"] and error["request_id"] == headers["x-request-id"]
        if message is not None:
            assert error["message"] == message, change
    for raw, status in ((b"not json", 422), (b"{}", 422), (b"x" * ((1 << 20) + 1), 413)):
        got, _, body = _post(server.url, raw)
        assert got == status and "error" in json.loads(body), body[:200]
    assert _get(server.url + "v1/generate")[0] == 405


def test_request_id_is_echoed_and_in_every_log_line_of_the_request(server, refs):
    status, headers, _ = _post(server.url, {"prompt": "two toys", "references": refs, "seed": 7},
                               headers={"X-Request-ID": "test-rid-42"})
    assert status == 200 and headers["x-request-id"] == "test-rid-42"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lines = [ln for ln in server.text().splitlines() if "test-rid-42" in ln]
        if any("DynaIPIngress" in ln and "answered" in ln for ln in lines) and any(
                "DynaIPModel" in ln and "generated" in ln for ln in lines):
            break
        time.sleep(0.5)
    assert any("DynaIPModel" in ln and re.search(r"\[request_id=[^]]*test-rid-42[^]]*\] generated", ln)
               for ln in lines), lines
    assert any("DynaIPIngress" in ln and "[request_id=test-rid-42] answered" in ln for ln in lines), lines


def test_overload_answers_503_with_retry_after_never_hangs(server, refs):
    """64 requests at once, each long (300 steps), against 2 replicas x 8 ongoing + 20 queued (requests waiting for
    a replica, being routed included): the first 20 are accepted, requests that find the queue full get 503 with
    Retry-After at once; every request is answered."""

    def one(seed: int):
        start = time.monotonic()
        status, headers, body = _post(server.url, {"prompt": "two toys", "references": refs, "seed": seed,
                                                   "steps": 300})
        return status, headers, body, time.monotonic() - start

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    statuses = sorted(r[0] for r in results)
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 1 and statuses.count(200) >= 20, statuses
    for status, headers, body, elapsed in results:
        if status == 503:
            assert headers["retry-after"] == "1" and elapsed < 30
            assert json.loads(body)["error"]["type"] == "Overloaded"


def test_killing_a_replica_mid_load_loses_no_request(server, engine, refs):
    """12 requests of 200 steps; once the first is answered, SIGKILL one model replica: every request is still
    answered 200 with the right image (retried on the other replica), and Serve restarts the dead replica."""
    replicas = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                if MODEL_PROC in " ".join(p.cmdline())]
    assert len(replicas) == 2
    before = server.text().count("model replica died during the request")

    def one(seed: int):
        return seed, _post(server.url, {"prompt": "two toys", "references": refs, "seed": seed, "steps": 200})

    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(one, 100 + i) for i in range(12)]
        while not any(f.done() for f in futures):
            time.sleep(0.05)
        replicas[0].kill()
        results = [f.result() for f in futures]
    for seed, (status, _, body) in results:
        assert status == 200, body[:300]
        assert np.abs(decode_png(body) - _expected(engine, refs, seed, steps=200)).max() <= 1
    deadline = time.monotonic() + 20
    while server.text().count("model replica died during the request") == before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.text().count("model replica died during the request") > before  # requests really were retried
    deadline = time.monotonic() + 120
    while json.loads(_get(server.url + "healthz")[2]).get("replicas_ready") != 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert json.loads(_get(server.url + "healthz")[2])["replicas_ready"] == 2
    server.pids |= _descendants(server.proc.pid)  # the restarted replica


def test_prometheus_metrics(server, refs):
    """Queue depth, batch size (a burst of same-shape requests was batched), cache hit rate and stage latencies
    reach Ray's Prometheus endpoint."""
    assert server.metrics_url
    with ThreadPoolExecutor(12) as pool:
        burst = list(pool.map(lambda seed: _post(server.url, {"prompt": "two toys", "references": refs,
                                                               "seed": seed, "steps": 50})[0], range(12)))
    assert burst == [200] * 12
    wanted = ["ray_dynaip_queue_depth", "ray_dynaip_batch_size_bucket", 'ray_dynaip_cache_hit_rate{',
              'stage="denoise_step"', 'stage="reference_kv"', 'stage="queue"', 'stage="encode_png"',
              "ray_dynaip_request_latency_ms_bucket", "ray_dynaip_responses"]
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        text = _get(server.metrics_url)[2].decode()
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    missing = [w for w in wanted if w not in text]
    assert not missing, missing
    batch = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'ray_dynaip_batch_size_bucket\{[^}]*le="([^"]+)"[^}]*\} (\S+)', text)}
    singles, total = batch.get("1.0", 0.0), batch.get("+Inf", 0.0)
    assert total > singles, batch  # some batches held several requests
    hits = [float(v) for v in re.findall(r'ray_dynaip_cache_hit_rate\{[^}]*cache="references"[^}]*\} (\S+)', text)]
    assert hits and max(hits) > 0.5  # the same references every request: encoded once per replica


def test_loadtest_cli_against_the_server(server, tmp_path, capsys):
    from runtime.loadtest import main

    out = tmp_path / "load.json"
    assert main(["--url", server.url, "--requests", "6", "--concurrency", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "requests: 6 sent, 6 ok, 0 failed" in printed and "latency of ok requests: p50" in printed
    result = json.loads(out.read_text())
    assert (result["ok"], result["statuses"], result["concurrency"]) == (6, {"200": 6}, 3)
    assert 0 < result["p50_s"] <= result["p95_s"] <= result["p99_s"] and result["throughput_rps"] > 0


def test_shutdown_leaves_no_ray_process(server):
    pids = server.pids | _descendants(server.proc.pid) | _in_session(server.proc.pid)
    assert len(pids) >= 5  # gcs_server, raylet, the Serve controller, the proxy, 3 replicas...
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(90) == 0, server.text()[-2000:]
    assert "runtime.serve: SIGINT received: shutting down" in server.text()
    assert server.text().rstrip().endswith("runtime.serve: stopped")
    deadline = time.monotonic() + 30
    while (_alive(pids) or _in_session(server.proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _alive(pids) | _in_session(server.proc.pid)
    assert not left, [psutil.Process(p).cmdline() for p in left]


@pytest.mark.parametrize("declared, chunks, read_all", [(3000, 3, True), (9000, 9, False)])
def test_body_limit_reads_a_modestly_oversized_body_before_answering_413(declared, chunks, read_all):
    """A client still sending when the 413 comes and the connection closes sees a broken pipe, not the answer: a body
    declared at most DRAIN_FACTOR x the limit is read (and dropped) first; a larger one is answered at once."""
    from runtime.serve_app import DRAIN_FACTOR, BodyLimit

    limit = 1000
    assert declared <= DRAIN_FACTOR * limit if read_all else declared > DRAIN_FACTOR * limit
    body = [{"type": "http.request", "body": b"x" * 1000, "more_body": i < chunks - 1} for i in range(chunks)]
    sent: list[dict] = []

    async def receive() -> dict:
        return body.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    async def app(scope, receive, send):  # never reached
        raise AssertionError("the app must not see an oversized body")

    scope = {"type": "http", "method": "POST", "path": "/v1/generate",
             "headers": [(b"content-length", str(declared).encode())]}
    asyncio.run(BodyLimit(app, limit)(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert (not body) == read_all, f"{len(body)} chunks left unread"
    assert b"the limit is 1000 bytes" in b"".join(m.get("body", b"") for m in sent)
