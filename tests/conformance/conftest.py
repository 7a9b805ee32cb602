"""Fixtures of the TensorRT conformance tests.

These tests run only inside a venv that holds the real TensorRT and cuda-python bindings (built and cached by
``tests/test_tensorrt_conformance.py``, which runs them with ``--confcutdir`` here and the path of a tiny ONNX build
in ``DYNAIP_CONFORMANCE_BUILD``); the main test run does not collect this folder (``tests/conftest.py``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for p in (str(HERE), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

from cuda_sim import CudaSim, Device  # noqa: E402
from trt_fakes import COMPUTE, TrtState, engine_bytes, make_tensorrt  # noqa: E402


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "lean: needs tensorrt_lean (deselected in venvs without it)")


def pytest_collection_modifyitems(config, items) -> None:
    """Deselect (visibly) the tensorrt_lean tests in a venv without it (only the TensorRT 11 venv has it)."""
    if importlib.util.find_spec("tensorrt_lean") is not None:
        return
    lean = [item for item in items if item.get_closest_marker("lean")]
    if lean:
        config.hook.pytest_deselected(items=lean)
        items[:] = [item for item in items if not item.get_closest_marker("lean")]


def dit_fn(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The synthetic DiT (the graph I/O of MODEL_IO["dit"]): a velocity depending on every input, and the Euler
    step."""
    lat = x["latents"]
    t, tn = x["timestep"][:, None, None], x["timestep_next"][:, None, None]
    cond = x["text_embeds"].mean(axis=(1, 2)) + x["pooled"].mean(axis=1) + 0.1 * x["guidance"]
    ids = x["img_ids"].mean() + x["txt_ids"].mean()
    inject = (x["scales"][:, :, None] * x["masks"]).sum(axis=1)[:, :, None] * (
        x["img_k"].mean() + x["img_v"].mean()) * x["block_scales"].mean()
    vel = np.tanh(lat) * (1 + 0.1 * cond[:, None, None]) - 0.5 * t * lat + 0.01 * (inject + ids)
    return {"velocity": vel.astype(np.float32), "latents_next": (lat + (tn - t) * vel).astype(np.float32)}


def dit_dbim_fn(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The synthetic DBIM DiT (the graph I/O of MODEL_IO["dit_dbim"]): the synthetic DiT's velocity, the B concept
    rows' mixed with their B auxiliary rows' by weights depending on every DBIM input, and the Euler step."""
    vel = dit_fn(x)["velocity"]
    b = vel.shape[0] // 2
    w = 1 / (1 + np.exp(-(x["dbim_lambda"][:b] * x["map_tokens"][:b].mean(axis=1) - x["prompt_tokens"][:b].mean(
        axis=1) + x["reference_map"][:b])))[:, None, None]
    vel = np.concatenate([(1 - w) * vel[:b] + w * vel[b:], vel[b:]])
    t, tn = x["timestep"][:, None, None], x["timestep_next"][:, None, None]
    return {"velocity": vel.astype(np.float32), "latents_next": (x["latents"] + (tn - t) * vel).astype(np.float32)}


def latents_shapes(s):
    return {"velocity": s["latents"], "latents_next": s["latents"]}


COMPUTE["dit_euler"] = (dit_fn, latents_shapes)
COMPUTE["dit_dbim_euler"] = (dit_dbim_fn, latents_shapes)


@pytest.fixture(scope="session")
def real_trt():
    """The real ``tensorrt`` module (bindings + stub libraries): imports, builds nothing."""
    import tensorrt

    return tensorrt


@pytest.fixture(scope="session")
def real_rt():
    """The real ``cuda.bindings.runtime`` (no driver here: calls return cudaErrorInsufficientDriver)."""
    return importlib.import_module("cuda.bindings.runtime")


@pytest.fixture()
def sim(real_rt, monkeypatch) -> CudaSim:
    """The simulated CUDA runtime in place of cuda.bindings.runtime (one H100, then whatever a test adds)."""
    s = CudaSim(real_rt, devices=[Device()])
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", s.module())
    return s


@pytest.fixture()
def fresh_loggers(monkeypatch):
    """Forget the process's TensorRT logger (a new fake module is a new TensorRT)."""
    from dynaip_trt import tensorrt_api

    monkeypatch.setattr(tensorrt_api, "_LOGGERS", {})


@pytest.fixture()
def trt_state(real_trt, sim, monkeypatch, fresh_loggers) -> TrtState:
    """Checked fakes of TensorRT in place of ``tensorrt`` (on the simulated GPU)."""
    state = TrtState(device_name=sim.devices[0].name)
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt(real_trt, sim, state))
    return state


@pytest.fixture(scope="session")
def onnx_build() -> Path:
    """The tiny ONNX build the main test run exported (read-only: copy it)."""
    path = os.environ.get("DYNAIP_CONFORMANCE_BUILD")
    if not path or not (Path(path) / "manifest.json").is_file():
        pytest.fail("DYNAIP_CONFORMANCE_BUILD must name a tiny ONNX build (tests/test_tensorrt_conformance.py sets it)")
    return Path(path)


@pytest.fixture()
def build_copy(onnx_build, tmp_path) -> Path:
    out = tmp_path / "build"
    shutil.copytree(onnx_build, out)
    return out


def synthetic_dit(manifest, dtype: str = "FLOAT", model: str = "dit") -> tuple[bytes, dict]:
    """A fake engine of the synthetic DiT (``model="dit_dbim"``: the synthetic DBIM DiT) with the profile of
    ``manifest``'s DiT (timestep_next like timestep, block_scales [blocks] from img_k; the DBIM inputs [B, Ltxt] and
    [B]), I/O in ``dtype``; returns the engine and its profile."""
    profile = dict(manifest.models["dit"].profile)
    profile["timestep_next"] = profile["timestep"]
    blocks = profile["img_k"]["min"][0]
    profile["block_scales"] = {k: [blocks] for k in ("min", "opt", "max")}
    if model == "dit_dbim":
        for name in ("prompt_tokens", "map_tokens"):
            profile[name] = {k: v[:2] for k, v in profile["text_embeds"].items()}
        for name in ("reference_map", "dbim_lambda"):
            profile[name] = profile["timestep"]
    from dynaip_trt.manifest import MODEL_IO

    inputs = [{"name": n, "dtype": dtype, "shape": [-1] * len(profile[n]["min"])} for n in MODEL_IO[model][0]]
    outputs = [{"name": n, "dtype": dtype, "shape": [-1, -1, 64]} for n in MODEL_IO[model][1]]
    kind = "dit_euler" if model == "dit" else "dit_dbim_euler"
    return engine_bytes({"model": model, "inputs": inputs, "outputs": outputs, "profile": profile,
                         "compute": {"kind": "fn", "name": kind}}), profile


def install_synthetic_dit(directory: Path, dtype: str = "FLOAT") -> None:
    """Replace the DiT engine of a built directory by the synthetic one (hash and profile in the manifest)."""
    from dynaip_trt.manifest import Manifest, sha256_file

    m = Manifest.load(directory)
    engine = directory / m.models["dit"].engine
    data, m.models["dit"].profile = synthetic_dit(m, dtype)
    engine.write_bytes(data)
    m.models["dit"].files[m.models["dit"].engine] = sha256_file(engine)
    m.save(directory)


def install_synthetic_dbim(directory: Path, engine: bool = True) -> None:
    """Add DBIM's graph to a built directory: the DiT's graph files under the name ``dit_dbim`` (what a build with
    ``--dbim`` records), with the synthetic DBIM DiT as its engine (``engine=False``: exported, never built)."""
    import copy

    from dynaip_trt.manifest import Manifest, sha256_file

    m = Manifest.load(directory)
    entry = m.models["dit_dbim"] = copy.deepcopy(m.models["dit"])
    entry.files.pop(entry.engine)
    entry.engine = None
    if engine:
        entry.engine = "dit_dbim.fp16.engine"
        data, entry.profile = synthetic_dit(m, model="dit_dbim")
        (directory / entry.engine).write_bytes(data)
        entry.files[entry.engine] = sha256_file(directory / entry.engine)
        m.tensorrt["engines"]["dit_dbim"] = dict(m.tensorrt["engines"]["dit"], engine=entry.engine)
    m.save(directory)


def fake_engine_build(directory: Path, **options) -> Path:
    """fp16 engines of every model from the fake builder (``export.build`` options), then the synthetic DiT."""
    from export import build

    build.run(None, directory, "fp16", None, directory / "calib", 18, skip_export=True, progress=False, **options)
    install_synthetic_dit(directory)
    return directory


@pytest.fixture()
def trt_build(build_copy, trt_state) -> Path:
    """A build with an fp16 engine plan built by the fake builder for every model, the DiT's engine replaced by the
    synthetic one."""
    return fake_engine_build(build_copy)


@contextlib.contextmanager
def captured(name: str, level: int | None = logging.DEBUG) -> Iterator[list[str]]:
    """Messages logged to ``name`` (and children) inside the block, with the logger set to ``level`` meanwhile
    (``None``: its level is left to the code under test)."""
    messages: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: messages.append(f"{record.levelname} {record.getMessage()}")
    lg = logging.getLogger(name)
    old = lg.level
    lg.addHandler(handler)
    if level is not None:
        lg.setLevel(level)
    try:
        yield messages
    finally:
        lg.removeHandler(handler)
        lg.setLevel(old)
