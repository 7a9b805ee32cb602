"""``export.build`` / ``export.engines`` against checked fakes of TensorRT's builder (network, ONNX parser, config,
profile, timing cache, serialization) on the simulated GPU, and against the real modules without a GPU."""

from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, captured
from cuda_sim import Device
from dynaip_trt.errors import BackendUnavailableError
from dynaip_trt.manifest import (PLAN_FILE, REQUIRED_MODELS, TIMING_CACHE, Manifest, check_engine_sources,
                                 check_tensorrt_section)
from export import build
from export.engines import EngineBuilder, EngineBuildError, plan_engines
from export.envelope import Envelope


def run_build(out, precision="fp16", **kw):
    return build.run(None, out, precision, kw.pop("envelope", None), out / "calib", 18, skip_export=True,
                     progress=False, **kw)


def test_engine_build_calls_the_real_api(build_copy, trt_state, real_trt):
    plans = run_build(build_copy, envelope=Envelope(subjects=(1, 2, 3)), optimization_level=4,
                      workspace_bytes=2**30)
    builds = {b["source"]: b for b in trt_state.builds}
    assert list(builds) == [p.onnx for p in plans] == ["clip.fp16.onnx", "fusion.fp16.onnx", "text.onnx",
                                                       "dit.fp16.onnx", "vae.onnx"]
    for b in builds.values():
        assert b["strongly_typed"] and b["level"] == 4 and b["pools"] == {"WORKSPACE": 2**30}
        assert b["flags"] == ["TF32"], "TensorRT's default flags, nothing else"
    assert builds["dit.fp16.onnx"]["profile"]["scales"] == {"min": [1, 1], "opt": [1, 2], "max": [4, 3]}
    m = Manifest.load(build_copy)
    m.verify(build_copy)
    section = m.tensorrt
    assert section["version"] == real_trt.__version__ and section["gpu"] == "NVIDIA H100 80GB HBM3"
    assert section["compute_capability"] == [9, 0] and section["version_compatible"] is False
    check_tensorrt_section(section, real_trt.__version__, "NVIDIA H100 80GB HBM3", (9, 0), build_copy)
    check_engine_sources(m, build_copy)
    assert json.loads((build_copy / "timing.cache").read_bytes().split(b"\n", 1)[1])["entries"] == len(REQUIRED_MODELS)
    assert not [f for f in build_copy.iterdir() if f.name.startswith(".")], "staging left behind"


def test_a_failed_engine_leaves_the_previous_build(build_copy, trt_state):
    """Engines and manifest stay as they were (the timing cache may grow: its tactics stay valid)."""
    keep = (PLAN_FILE, TIMING_CACHE)
    run_build(build_copy)
    before = {f.name: f.read_bytes() for f in build_copy.iterdir() if f.is_file() and f.name not in keep}
    trt_state.fail_model = "dit"
    with pytest.raises(EngineBuildError, match="failed to build the dit engine"):
        run_build(build_copy, force=True)
    after = {f.name: f.read_bytes() for f in build_copy.iterdir() if f.is_file() and f.name not in keep}
    assert after == before and not [f for f in build_copy.iterdir() if f.name.startswith(".")]


def test_only_engines_whose_plan_or_graph_changed_are_rebuilt(build_copy, trt_state):
    run_build(build_copy)
    assert len(trt_state.builds) == len(REQUIRED_MODELS), "the first build builds every engine"
    with captured("export", logging.INFO) as messages:
        run_build(build_copy)
    assert len(trt_state.builds) == len(REQUIRED_MODELS), "nothing changed: no engine is rebuilt"
    assert any("are current: not rebuilt" in m for m in messages)
    Manifest.load(build_copy).verify(build_copy)
    run_build(build_copy, tf32=False)  # another plan: every engine again
    assert len(trt_state.builds) == 2 * len(REQUIRED_MODELS)
    run_build(build_copy, tf32=False, force=True)
    assert len(trt_state.builds) == 3 * len(REQUIRED_MODELS), "force rebuilds every engine"


def test_a_misspelled_tensorrt_attribute_fails_the_build(build_copy, trt_state, monkeypatch):
    """The fakes accept only what the real bindings have: a typo in the builder code fails like on a GPU."""
    source = textwrap.dedent(inspect.getsource(EngineBuilder._config)).replace(
        "config.set_memory_pool_limit(", "config.set_memory_pool_limt(")
    namespace: dict = {}
    exec(compile(source, "<typo>", "exec"), vars(sys.modules[EngineBuilder.__module__]), namespace)
    monkeypatch.setattr(EngineBuilder, "_config", namespace["_config"])
    with pytest.raises(AttributeError, match="'IBuilderConfig' object has no attribute 'set_memory_pool_limt'"):
        run_build(build_copy, workspace_bytes=2**30)


def test_the_fakes_reject_what_the_real_api_rejects(trt_state, real_trt):
    trt = sys.modules["tensorrt"]
    from dynaip_trt.tensorrt_api import tensorrt_logger

    builder = trt.Builder(tensorrt_logger(trt))
    config = builder.create_builder_config()
    cache = config.create_timing_cache(b"")
    with pytest.raises(TypeError, match="unexpected keyword argument 'ignore_mismatches'"):
        config.set_timing_cache(cache, ignore_mismatches=False)
    with pytest.raises(TypeError, match="missing argument 'ignore_mismatch'"):
        config.set_timing_cache(cache)
    with pytest.raises(TypeError, match="is not a tensorrt_bindings.tensorrt.BuilderFlag"):
        config.set_flag("TF32")
    with pytest.raises(AttributeError):
        trt.BuilderFlag.TF23
    with pytest.raises(AttributeError, match="not writable"):
        config.num_optimization_profiles = 2
    with pytest.raises(TypeError, match="matches no signature"):
        trt.Builder()
    config.builder_optimization_level = 5
    assert config.get_flag(trt.BuilderFlag.TF32), "TensorRT enables TF32 by default"


def test_verbose_reaches_the_one_tensorrt_logger(build_copy, trt_state):
    """TensorRT keeps one logger per process: every builder, parser and runtime gets the same object, and a later
    --verbose still shows TensorRT's verbose messages."""
    EngineBuilder(build_copy)  # an earlier, quiet builder in the same process
    try:
        with captured("tensorrt", None) as quiet:
            run_build(build_copy)
        with captured("tensorrt", None) as verbose:
            run_build(build_copy, verbose=True, force=True)
    finally:
        logging.getLogger("tensorrt").setLevel(logging.NOTSET)
    assert len({id(lg) for lg in trt_state.loggers}) == 1 and len(trt_state.loggers) >= 2 * len(REQUIRED_MODELS) + 1
    assert quiet == [], "TensorRT's INFO and VERBOSE messages only with --verbose"
    assert sum("fake builder: building" in m for m in verbose) == len(REQUIRED_MODELS), verbose[:5]


def test_a_timing_cache_from_another_gpu_is_replaced_not_fatal(build_copy, trt_state):
    (build_copy / "timing.cache").write_bytes(b"FAKE-TRT-TIMING-CACHE\n" + json.dumps(
        {"device": "NVIDIA A100-SXM4-80GB", "entries": 7}).encode())
    with captured("export.engines", logging.WARNING) as warnings:
        run_build(build_copy)
    assert any("made on another GPU or TensorRT version: starting a fresh one" in w for w in warnings)
    assert len(list(build_copy.glob("*.engine"))) == len(REQUIRED_MODELS), "the engines are kept"
    cache = json.loads((build_copy / "timing.cache").read_bytes().split(b"\n", 1)[1])
    assert cache == {"device": "NVIDIA H100 80GB HBM3", "entries": len(REQUIRED_MODELS)}


def test_a_missing_timing_cache_only_warns(build_copy, trt_state):
    trt_state.timing_cache_none = True
    with captured("export.engines", logging.WARNING) as warnings:
        run_build(build_copy)
    assert any("returned no timing cache" in w for w in warnings)
    assert len(list(build_copy.glob("*.engine"))) == len(REQUIRED_MODELS) and not (build_copy / "timing.cache").exists()


def test_tf32_is_the_default_and_no_tf32_clears_it(build_copy, trt_state):
    plans = run_build(build_copy, tf32=False)
    assert all(not p.tf32 for p in plans)
    assert all("TF32" not in b["flags"] for b in trt_state.builds), "strict fp32: TF32 cleared"
    assert Manifest.load(build_copy).tensorrt["engines"]["vae"]["tf32"] is False


def test_profile_errors_are_build_errors(build_copy, trt_state):
    m = Manifest.load(build_copy)
    plan = plan_engines(m, build_copy, "fp16", names=("vae",))[0]
    builder = EngineBuilder(build_copy)
    bad = {"latents": {"min": [2, 16, 8, 8], "opt": [1, 16, 8, 8], "max": [4, 16, 8, 8]}}
    with pytest.raises(EngineBuildError, match=r"vae: TensorRT rejected the profile of input latents \(min "
                                               r"\[2, 16, 8, 8\], opt \[1, 16, 8, 8\]"):
        builder.build(plan.__class__(**{**plan.__dict__, "profile": bad}), build_copy)
    with pytest.raises(EngineBuildError, match="vae: TensorRT rejected the optimization profile {}"):
        builder.build(plan.__class__(**{**plan.__dict__, "profile": {}}), build_copy)


def test_fp8_needs_compute_capability_8_9_checked_before_building(build_copy, trt_state, sim):
    sim.devices[0] = Device("NVIDIA A100-SXM4-80GB", (8, 0))
    trt_state.device_name = sim.devices[0].name
    m = Manifest.load(build_copy)
    plans = plan_engines(m, build_copy, "fp16")
    fp8 = [p.__class__(**{**p.__dict__, "precision": "fp8-fp16"}) if p.model == "dit" else p for p in plans]
    with pytest.raises(BackendUnavailableError, match=r"fp8 engines need a GPU of compute capability 8.9 or newer "
                                                      r"\(Ada or Hopper and later\), but NVIDIA A100-SXM4-80GB has "
                                                      r"8.0"):
        build.build_engines(build_copy, fp8, "fp8", progress=False)
    assert trt_state.builds == [], "nothing may be built first"
    assert build.engine_step_unavailable("fp8", "fp16").startswith("fp8 engines need a GPU of compute capability")
    assert build.engine_step_unavailable("bf16") is None and build.engine_step_unavailable("fp16") is None
    sim.devices[0] = Device("Tesla T4", (7, 5))
    assert "bf16 engines need a GPU of compute capability 8.0" in build.engine_step_unavailable("bf16")


def test_version_compatible_engines_are_flagged_and_recorded(build_copy, trt_state):
    plans = run_build(build_copy, version_compatible=True)
    assert all(p.flags == ("VERSION_COMPATIBLE",) for p in plans)
    assert all(b["flags"] == ["TF32", "VERSION_COMPATIBLE"] for b in trt_state.builds)
    section = Manifest.load(build_copy).tensorrt
    assert section["version_compatible"] is True
    major = section["version"].split(".")[0]
    check_tensorrt_section(section, f"{major}.99.0.0", section["gpu"], (9, 0), build_copy)  # a later minor: fine


def test_on_a_gpu_machine_the_literal_command_builds_and_exits_0(build_copy, trt_state):
    """What tests/test_build.py expects of the literal command follows the machine (defect 1): here TensorRT and a
    GPU are present (fakes), so the engines are built and the exit code is 0, not 3."""
    assert build.engine_step_unavailable("fp16") is None
    assert build.main(["--precision", "fp16", "--skip-export", "--engine-dir", str(build_copy)]) == 0
    assert Manifest.load(build_copy).tensorrt["precision"] == "fp16"
    assert len(list(build_copy.glob("*.fp16.engine"))) == len(REQUIRED_MODELS)


def test_real_tensorrt_without_a_gpu_exits_3_with_a_clear_message(build_copy):
    """The real (stubbed) tensorrt module and the real cuda-python without a driver: python -m export.build ends
    with exit 3 and one clear line, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "export.build", "--precision", "fp16", "--skip-export", "--engine-dir",
                        str(build_copy)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "TypeError" not in r.stderr
    assert "the engine step cannot run here" in r.stderr and "no usable NVIDIA GPU and driver" in r.stderr
    assert "cudaErrorInsufficientDriver" in r.stderr and "--skip-export" in r.stderr
    assert build.engine_step_unavailable("fp16") is not None


def test_real_builder_factory_failure_is_backend_unavailable(build_copy, sim, real_trt, fresh_loggers, monkeypatch):
    """A GPU is visible but TensorRT's builder factory returns nullptr (pybind11 TypeError): exit 3, not a
    traceback."""
    monkeypatch.setitem(sys.modules, "tensorrt", real_trt)
    with pytest.raises(BackendUnavailableError, match="TensorRT could not create a builder on NVIDIA H100"):
        EngineBuilder(build_copy)
