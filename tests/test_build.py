"""``python -m export.build``: the command the user named, the engine plan as data, the builder's wiring (against a
recording stand-in for TensorRT, which cannot be installed on CI machines) and stale-engine detection."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from dynaip_trt.configs import DEFAULT_CONFIG
from dynaip_trt.errors import BackendUnavailableError, ConfigError, ManifestError
from dynaip_trt.manifest import MODEL_IO, PLAN_FILE, Manifest, sha256_file
from export import build, engines
from export.engines import EngineBuilder, EngineBuildError, graph_precision, plan_engines, required_variants
from export.envelope import Envelope
from dynaip_trt.manifest import check_engine_sources, check_tensorrt_section

from conftest import captured_logs, working_directory


@pytest.fixture(scope="module")
def literal_build(tmp_path_factory):
    """``python -m export.build --precision fp16`` run with no other argument in an empty working directory."""
    with working_directory(tmp_path_factory.mktemp("cwd")) as cwd, captured_logs("export.build") as messages:
        rc = build.main(["--precision", "fp16"])
    return rc, cwd / "build" / DEFAULT_CONFIG, messages


def test_literal_command_exports_checks_and_stops_with_exit_3(literal_build):
    rc, out, messages = literal_build
    assert rc == build.EXIT_NEEDS_TENSORRT == 3
    error = [m for m in messages if "cannot run here" in m]
    assert error and "TensorRT" in error[0] and "pip install -e .[tensorrt]" in error[0] and "--skip-export" in error[0]
    m = Manifest.load(out)
    m.verify(out)
    assert set(m.models) == set(MODEL_IO) and m.tensorrt is None, "no engine may be recorded when none was built"
    for name, entry in m.models.items():
        assert set(entry.variants) == ({"fp16"} if graph_precision(name, "fp16") == "fp16" else set())
    plan = json.loads((out / PLAN_FILE).read_text())
    assert plan["precision"] == "fp16"
    assert [e["onnx"] for e in plan["engines"]] == [
        "clip.fp16.onnx", "fusion.fp16.onnx", "text.onnx", "dit.fp16.onnx", "vae.fp16.onnx"]
    assert not list(out.glob("*.engine"))


def test_plan_is_plain_data_with_profiles_covering_the_envelope(tiny_build, tiny_cfg):
    m = Manifest.load(tiny_build)
    env = Envelope(batch=(1, 1, 3), subjects=(1, 2, 4), resolutions=((64, 64), (48, 80)))
    plans = {p.model: p for p in plan_engines(m, tiny_build, "fp16", env, optimization_level=4,
                                              workspace_bytes=2**30)}
    assert set(plans) == set(MODEL_IO)
    for p in plans.values():
        assert p.strongly_typed and p.optimization_level == 4 and p.workspace_bytes == 2**30
        assert p.onnx_sha256 == m.models[p.model].files[p.onnx] and p.engine == f"{p.model}.fp16.engine"
        assert json.loads(json.dumps(p.to_dict())) == p.to_dict(), "the plan must be JSON data"
    assert plans["text"].precision == "fp32" and plans["text"].flags == ("TF32",), "T5 stays fp32 (TF32 matmuls)"
    assert all(plans[n].precision == "fp16" and plans[n].flags == () for n in ("clip", "fusion", "dit", "vae"))
    dit = plans["dit"].profile
    tokens = {"min": (48 // 16) * (64 // 16), "opt": 16, "max": (64 // 16) * (80 // 16)}  # 2x2 packed latents
    for point, n in tokens.items():
        assert dit["latents"][point] == [{"min": 1, "opt": 1, "max": 3}[point], n, 64]
    assert [dit["scales"][k][1] for k in ("min", "opt", "max")] == [1, 2, 4], "subjects 1..max, opt 2"
    assert dit["img_k"]["max"][1:3] == [3, 4] and dit["masks"]["max"] == [3, 4, tokens["max"]]
    assert {dit["text_embeds"][k][1] for k in ("min", "opt", "max")} == {tiny_cfg.text.max_text_length}
    assert plans["clip"].profile["pixel_values"]["min"][0] == 1, "one reference image must fit"
    assert plans["clip"].profile["pixel_values"]["max"][0] == 3 * 4 * env.views
    vae = plans["vae"].profile["latents"]
    assert vae["min"][2:] == [6, 8] and vae["max"][2:] == [8, 10]


def test_plan_errors_name_what_is_missing(tiny_build, tiny_cfg):
    m = Manifest.load(tiny_build)
    with pytest.raises(ConfigError, match=r"no bf16 graph of clip.*python -m export.onnx --bf16"):
        plan_engines(m, tiny_build, "bf16")
    with pytest.raises(ConfigError, match=r"no fp8 graph of dit.*python -m export.onnx --fp8"):
        plan_engines(m, tiny_build, "fp8")
    with pytest.raises(ConfigError, match="unknown precision 'int8'"):
        plan_engines(m, tiny_build, "int8")
    with pytest.raises(ConfigError, match="exceeds the config's maximum"):
        plan_engines(m, tiny_build, "fp16", Envelope(subjects=(1, 2, tiny_cfg.max_subjects + 1)))
    with pytest.raises(ConfigError, match="outside TensorRT's range"):
        plan_engines(m, tiny_build, "fp16", optimization_level=7)
    assert required_variants("fp8") == {"fp16": ("clip", "fusion", "vae")}
    assert required_variants("bf16") == {"bf16": tuple(MODEL_IO)}


def test_cli_errors(tmp_path):
    assert build.main(["--precision", "int4", "--engine-dir", str(tmp_path / "b")]) == 2
    assert build.main(["--precision", "fp16", "--skip-export", "--engine-dir", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "b").exists(), "a rejected command writes nothing"


class _Recorder:
    """Records calls; attribute access returns nested recorders (enough of TensorRT's builder API)."""

    def __init__(self, log: list, name: str):
        self._log, self._name = log, name

    def __getattr__(self, attr):
        return _Recorder(self._log, f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        self._log.append((self._name, args))
        return _Recorder(self._log, f"{self._name}()")


def fake_tensorrt(log: list, fail_model: str | None = None) -> types.ModuleType:
    """A stand-in ``tensorrt`` module: the builder returns ``b"engine:<source graph>"`` and records every call."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0"
    trt.Logger = type("Logger", (), {"WARNING": 2, "VERBOSE": 4, "__init__": lambda self, s: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=3)
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

    class Parser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            log.append(("parse", (Path(path).name,)))
            self.network.source = Path(path).name
            return True

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            log.append(("create_network", (flags,)))
            return types.SimpleNamespace(source=None)

        def create_optimization_profile(self):
            return _Recorder(log, "profile")

        def create_builder_config(self):
            config = _Recorder(log, "config")
            config.get_timing_cache = lambda: types.SimpleNamespace(serialize=lambda: b"tactics")
            return config

        def build_serialized_network(self, network, config):
            if fail_model and network.source.startswith(fail_model):
                return None
            return f"engine:{network.source}".encode()

    trt.OnnxParser, trt.Builder = Parser, Builder
    return trt


@pytest.fixture()
def fake_gpu(monkeypatch):
    log: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(log))
    monkeypatch.setattr(engines, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(engines, "gpu_identity", lambda device=0: ("NVIDIA H100 80GB HBM3", (9, 0)))
    return log


def test_builder_wiring_manifest_and_stale_detection(tiny_build, tmp_path, fake_gpu):
    out = tmp_path / "b"
    shutil.copytree(tiny_build, out)
    plans = build.run(None, out, "fp16", Envelope(subjects=(1, 2, 3)), tmp_path / "calib", 18, skip_export=True,
                      progress=False)
    log = fake_gpu
    assert [a[0] for n, a in log if n == "parse"] == [p.onnx for p in plans]
    assert {a[0] for n, a in log if n == "create_network"} == {1 << 3}, "every network is strongly typed"
    assert [a[0] for n, a in log if n == "config.set_flag"] == ["TF32"], "TF32 only for the fp32 text graph"
    dit_shapes = [a for n, a in log if n == "profile.set_shape" and a[0] == "scales"]
    assert dit_shapes == [("scales", [1, 1], [1, 2], [4, 3])]
    assert (out / "timing.cache").read_bytes() == b"tactics"
    m = Manifest.load(out)
    m.verify(out)
    assert m.tensorrt["version"] == "10.99.0" and m.tensorrt["compute_capability"] == [9, 0]
    assert m.tensorrt["precision"] == "fp16" and set(m.tensorrt["engines"]) == set(MODEL_IO)
    for p in plans:
        assert (out / p.engine).read_bytes() == f"engine:{p.onnx}".encode()
        assert m.models[p.model].engine == p.engine and m.models[p.model].profile == p.profile
    assert not [f for f in out.iterdir() if f.name.startswith(".")], "staging left behind"
    check_tensorrt_section(m.tensorrt, "10.99.0", "NVIDIA H100 80GB HBM3", (9, 0), out)
    check_engine_sources(m, out)
    with pytest.raises(ManifestError, match="built with TensorRT 10.99.0 but TensorRT 10.8.0 is installed"):
        check_tensorrt_section(m.tensorrt, "10.8.0", "NVIDIA H100 80GB HBM3", (9, 0), out)
    # a graph re-exported after the build makes its engine stale
    m.models["dit"].files["dit.fp16.onnx"] = "0" * 64
    with pytest.raises(ManifestError, match=r"dit engine is stale: its source graph dit.fp16.onnx changed"):
        check_engine_sources(m, out)


def test_failed_build_leaves_previous_engines_and_manifest(tiny_build, tmp_path, fake_gpu, monkeypatch):
    out = tmp_path / "b"
    shutil.copytree(tiny_build, out)
    build.run(None, out, "fp16", None, tmp_path / "calib", 18, skip_export=True, progress=False)
    before = {f.name: sha256_file(f) for f in out.iterdir() if f.is_file()}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt([], fail_model="dit"))
    with pytest.raises(EngineBuildError, match="failed to build the dit engine"):  # forced: rebuild them all
        build.run(None, out, "fp16", None, tmp_path / "calib", 18, skip_export=True, progress=False, force=True)
    after = {f.name: sha256_file(f) for f in out.iterdir() if f.is_file() and f.name != PLAN_FILE}
    assert after == {k: v for k, v in before.items() if k != PLAN_FILE}
    assert not [f for f in out.iterdir() if f.name.startswith(".")]


def test_builder_needs_tensorrt_builder_and_gpu(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match=r"TensorRT's builder, which is not installed"):
        EngineBuilder(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.8.0"))  # tensorrt-lean
    with pytest.raises(BackendUnavailableError, match="has no builder"):
        EngineBuilder(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt([]))
    monkeypatch.setattr(engines, "cuda_device_count", lambda: 0)
    with pytest.raises(BackendUnavailableError, match="needs an NVIDIA GPU"):
        EngineBuilder(tmp_path)
