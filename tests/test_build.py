"""``python -m export.build``: the command the user named, the engine plan as data and stale-engine detection.

The builder's calls to TensorRT are checked against the real TensorRT bindings in
``tests/test_tensorrt_conformance.py`` (fakes that accept only what the real API has)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from dynaip_trt.configs import DEFAULT_CONFIG
from dynaip_trt.errors import BackendUnavailableError, ConfigError, ManifestError
from dynaip_trt.manifest import PLAN_FILE, REQUIRED_MODELS, Manifest
from export import build
from export.engines import EngineBuilder, graph_precision, plan_engines, record_engines, required_variants
from export.envelope import Envelope
from dynaip_trt.manifest import check_engine_sources, check_tensorrt_section

from conftest import captured_logs, working_directory


@pytest.fixture(scope="module")
def literal_build(tmp_path_factory):
    """``python -m export.build --precision fp16`` run with no other argument in an empty working directory."""
    with working_directory(tmp_path_factory.mktemp("cwd")) as cwd, captured_logs("export.build") as messages:
        rc = build.main(["--precision", "fp16"])
    return rc, cwd / "build" / DEFAULT_CONFIG, messages


def test_literal_command_exports_checks_and_builds_or_exits_3(literal_build):
    """Exit 3 with what to install where the engine step cannot run (no TensorRT builder or GPU); exit 0 with the
    engines built where it can (a GPU machine with TensorRT)."""
    rc, out, messages = literal_build
    m = Manifest.load(out)
    m.verify(out)
    assert set(m.models) == set(REQUIRED_MODELS)
    for name, entry in m.models.items():
        assert set(entry.variants) == ({"fp16"} if graph_precision(name, "fp16") == "fp16" else set())
    plan = json.loads((out / PLAN_FILE).read_text())
    assert plan["precision"] == "fp16"
    assert [e["onnx"] for e in plan["engines"]] == [
        "clip.fp16.onnx", "fusion.fp16.onnx", "text.onnx", "dit.fp16.onnx", "vae.onnx"]
    reason = build.engine_step_unavailable("fp16")
    if reason is None:
        assert rc == 0 and m.tensorrt["precision"] == "fp16"
        assert sorted(f.name for f in out.glob("*.engine")) == sorted(f"{n}.fp16.engine" for n in REQUIRED_MODELS)
        return
    assert rc == build.EXIT_NEEDS_TENSORRT == 3
    error = [msg for msg in messages if "cannot run here" in msg]
    assert error and reason in error[0] and "--skip-export" in error[0]
    assert "pip install -e .[tensorrt-cu12]" in error[0] or "compute capability" in error[0]
    assert m.tensorrt is None and not list(out.glob("*.engine")), "no engine may be recorded when none was built"


def test_plan_is_plain_data_with_profiles_covering_the_envelope(tiny_build, tiny_cfg):
    m = Manifest.load(tiny_build)
    env = Envelope(batch=(1, 1, 3), subjects=(1, 2, 4), resolutions=((64, 64), (48, 80)))
    plans = {p.model: p for p in plan_engines(m, tiny_build, "fp16", env, optimization_level=4,
                                              workspace_bytes=2**30)}
    assert set(plans) == set(REQUIRED_MODELS)
    for p in plans.values():
        assert p.strongly_typed and p.optimization_level == 4 and p.workspace_bytes == 2**30
        assert p.onnx_sha256 == m.models[p.model].files[p.onnx] and p.engine == f"{p.model}.fp16.engine"
        assert json.loads(json.dumps(p.to_dict())) == p.to_dict(), "the plan must be JSON data"
    assert all(p.flags == () and p.tf32 for p in plans.values()), "TensorRT's defaults: TF32 on, nothing else"
    assert plans["text"].precision == "fp32", "T5 overflows in fp16"
    assert plans["vae"].precision == "fp32" and plans["vae"].onnx == "vae.onnx", "FLUX's VAE is inaccurate in fp16"
    assert all(plans[n].precision == "fp16" for n in ("clip", "fusion", "dit"))
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
    with pytest.raises(ConfigError, match=r"no bf16 graph of clip, needed for a fp8 engine"):
        plan_engines(m, tiny_build, "fp8")  # the default FP8 base is bf16
    with pytest.raises(ConfigError, match=r"no fp8-fp16 graph of dit.*export.build --precision fp8 --fp8-base fp16"):
        plan_engines(m, tiny_build, "fp8", fp8_base="fp16")
    with pytest.raises(ConfigError, match="unknown FP8 base precision 'fp32'"):
        plan_engines(m, tiny_build, "fp8", fp8_base="fp32")
    with pytest.raises(ConfigError, match="unknown precision 'int8'"):
        plan_engines(m, tiny_build, "int8")
    with pytest.raises(ConfigError, match="exceeds the config's maximum"):
        plan_engines(m, tiny_build, "fp16", Envelope(subjects=(1, 2, tiny_cfg.max_subjects + 1)))
    with pytest.raises(ConfigError, match="outside TensorRT's range"):
        plan_engines(m, tiny_build, "fp16", optimization_level=7)
    assert required_variants("fp8") == {"bf16": ("clip", "fusion", "text", "vae")}
    assert required_variants("fp8", fp8_base="fp16") == {"fp16": ("clip", "fusion")}
    assert required_variants("fp16") == {"fp16": ("clip", "fusion", "dit")}
    assert required_variants("bf16") == {"bf16": tuple(REQUIRED_MODELS)}


def test_fp8_plans_build_on_a_bf16_base_and_keep_the_vae_out_of_fp16(tiny_build):
    """fp8 (default base bf16, as NVIDIA's FLUX demo): the DiT from dit.fp8-bf16.onnx, everything else bf16;
    --fp8-base fp16: the fp16 plan with dit.fp8-fp16.onnx (the graph ONNX Runtime's CPU provider can run)."""
    m = Manifest.load(tiny_build)
    for name, entry in m.models.items():  # the graphs the plan asks for (plan_engines reads only the manifest)
        for key in ("bf16", "fp8-bf16", "fp8-fp16") if name == "dit" else ("bf16",):
            entry.variants[key] = f"{name}.{key}.onnx"
            entry.files[f"{name}.{key}.onnx"] = key.ljust(64, "0")
    plans = {p.model: p for p in plan_engines(m, tiny_build, "fp8")}
    assert {n: (p.precision, p.onnx) for n, p in plans.items()} == {
        "clip": ("bf16", "clip.bf16.onnx"), "fusion": ("bf16", "fusion.bf16.onnx"), "text": ("bf16", "text.bf16.onnx"),
        "dit": ("fp8-bf16", "dit.fp8-bf16.onnx"), "vae": ("bf16", "vae.bf16.onnx")}
    assert all(p.engine == f"{p.model}.fp8.engine" for p in plans.values())
    plans = {p.model: p for p in plan_engines(m, tiny_build, "fp8", fp8_base="fp16")}
    assert {n: p.onnx for n, p in plans.items()} == {"clip": "clip.fp16.onnx", "fusion": "fusion.fp16.onnx",
                                                    "text": "text.onnx", "dit": "dit.fp8-fp16.onnx", "vae": "vae.onnx"}


def test_cli_errors(tmp_path):
    assert build.main(["--precision", "int4", "--engine-dir", str(tmp_path / "b")]) == 2
    assert build.main(["--precision", "fp16", "--skip-export", "--engine-dir", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "b").exists(), "a rejected command writes nothing"


def engine_files(out: Path, plans) -> None:
    """Stand-in engine files (the build step itself runs in the conformance tests)."""
    for p in plans:
        (out / p.engine).write_bytes(f"engine:{p.onnx}".encode())


def test_engines_of_a_changed_graph_are_stale(tiny_build, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(tiny_build, out)
    m = Manifest.load(out)
    plans = plan_engines(m, out, "fp16", Envelope(subjects=(1, 2, 3)))
    engine_files(out, plans)
    system = {"version": "10.8.0.43", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]}
    m = record_engines(m, out, plans, system, "fp16")
    m = Manifest.load(out)
    m.verify(out)
    assert m.tensorrt["precision"] == "fp16" and set(m.tensorrt["engines"]) == set(REQUIRED_MODELS)
    assert m.tensorrt["version_compatible"] is False
    for p in plans:
        assert m.models[p.model].engine == p.engine and m.models[p.model].profile == p.profile
    check_tensorrt_section(m.tensorrt, "10.8.0.43", "NVIDIA H100 80GB HBM3", (9, 0), out)
    check_engine_sources(m, out)
    with pytest.raises(ManifestError, match="built with TensorRT 10.8.0.43 but TensorRT 10.9.0.34 is installed"):
        check_tensorrt_section(m.tensorrt, "10.9.0.34", "NVIDIA H100 80GB HBM3", (9, 0), out)
    m.models["dit"].files["dit.fp16.onnx"] = "0" * 64  # a graph re-exported after the build makes its engine stale
    with pytest.raises(ManifestError, match=r"dit engine is stale: its source graph dit.fp16.onnx changed"):
        check_engine_sources(m, out)


def test_builder_needs_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, installed or not
    with pytest.raises(BackendUnavailableError, match=r"building TensorRT engines needs TensorRT: pip install -e "
                                                      r"\.\[tensorrt-cu12\]"):
        EngineBuilder(tmp_path)
