"""ONNX export: dynamic axes really dynamic, TensorRT-ready graphs, parity with PyTorch on ONNX Runtime."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dynaip_trt.errors import ConfigError, ManifestError
from dynaip_trt.manifest import MODEL_IO, REQUIRED_MODELS, Manifest
from dynaip_trt.metrics import max_abs, rel_l2
from export.graph import check_graph, tensorrt_supported_ops
from export.onnx import main
from export.envelope import Envelope
from export.specs import get_spec

# Parity tolerances vs PyTorch fp32 (ONNX Runtime CPU).
FP32_REL_L2 = 1e-5
FP16_REL_L2 = 5e-3
FP32_MAX_ABS = 1e-4


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def torch_outputs(spec, inputs):
    with torch.no_grad():
        out = spec.module().eval()(**inputs)
    return out if isinstance(out, tuple) else (out,)


def test_manifest_lists_every_model_with_hashes_and_signature(tiny_build, tiny_models):
    m = Manifest.load(tiny_build)
    m.verify(tiny_build)
    assert set(m.models) == set(REQUIRED_MODELS) and m.opset == 18
    assert m.dynaip_config == tiny_models.config
    for name, entry in m.models.items():
        assert tuple(entry.inputs) == MODEL_IO[name][0] and tuple(entry.outputs) == MODEL_IO[name][1]
        assert all(len(h) == 64 for h in entry.files.values())
    assert {n: e.variants for n, e in m.models.items()} == {
        "clip": {"fp16": "clip.fp16.onnx"}, "fusion": {"fp16": "fusion.fp16.onnx"}, "text": {},
        "dit": {"fp16": "dit.fp16.onnx"}, "vae": {"fp16": "vae.fp16.onnx"}}
    assert {"tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json"} <= set(m.models["text"].files)
    assert not [p for p in tiny_build.parent.iterdir() if p.name.startswith(".")], "staging dirs left behind"


@pytest.mark.parametrize("name", REQUIRED_MODELS)  # dit_dbim: tests/test_dbim.py
def test_dynamic_axes_stay_dynamic(tiny_build, tiny_models, name):
    spec = get_spec(name, tiny_models)
    model = onnx.load(str(tiny_build / f"{name}.onnx"), load_external_data=False)
    inputs = {i.name: i for i in model.graph.input}
    for inp, axes in spec.dynamic_axes().items():
        dims = inputs[inp].type.tensor_type.shape.dim
        for axis, axis_name in axes.items():
            assert dims[axis].dim_param, f"{inp}[{axis}] ({axis_name}) was baked to {dims[axis].dim_value}"
    # and really dynamic: the graph runs at sizes other than the export example (1 and 3 subjects/batch)
    sess = session(tiny_build / f"{name}.onnx")
    for b, s in ((1, 1), (3, 3)):
        x = spec.sample_inputs(batch=b, subjects=s, seed=b)
        out = sess.run(None, {k: v.numpy() for k, v in x.items()})
        ref = torch_outputs(spec, x)
        assert [o.shape for o in out] == [tuple(r.shape) for r in ref]


@pytest.mark.parametrize("name", REQUIRED_MODELS)  # dit_dbim: tests/test_dbim.py
def test_graph_is_tensorrt_ready(tiny_build, tiny_models, name):
    model = onnx.load(str(tiny_build / f"{name}.onnx"), load_external_data=False)
    report = check_graph(model, get_spec(name, tiny_models).dynamic_axes())
    assert report.ok, report.problems()
    supported = tensorrt_supported_ops()
    assert report.ops and all(supported[op] for op in report.ops)
    assert not any(n.op_type in ("Attention", "RMSNormalization") for n in model.graph.node)


def test_graph_check_catches_problems(tiny_models):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, 3])
    bad = helper.make_model(helper.make_graph([helper.make_node("Bernoulli", ["x"], ["y"])], "g", [x], [y]))
    report = check_graph(bad, {"x": {0: "batch"}})
    assert not report.ok
    assert report.unsupported == {"Bernoulli"} and "x" in report.float64
    assert report.static_axes == ["x[0] (batch) = 2"]


@pytest.mark.parametrize("name", REQUIRED_MODELS)  # dit_dbim: tests/test_dbim.py
@pytest.mark.parametrize("subjects", [1, 2, 4])
@pytest.mark.parametrize("resolution", [(64, 64), (96, 128)])
def test_parity_fp32(tiny_build, tiny_models, name, subjects, resolution):
    spec = get_spec(name, tiny_models)
    x = spec.sample_inputs(batch=2, subjects=subjects, height=resolution[0], width=resolution[1], seed=subjects)
    out = session(tiny_build / f"{name}.onnx").run(None, {k: v.numpy() for k, v in x.items()})
    for o, r in zip(out, torch_outputs(spec, x)):
        assert o.dtype == np.float32 and o.shape == tuple(r.shape)
        assert rel_l2(o, r) < FP32_REL_L2, f"{name}: rel L2 {rel_l2(o, r):.2e}"
        assert max_abs(o, r) < FP32_MAX_ABS, f"{name}: max abs {max_abs(o, r):.2e}"


@pytest.mark.parametrize("subjects", [1, 4])
def test_parity_fp16_dit(tiny_build, tiny_models, subjects):
    spec = get_spec("dit", tiny_models)
    x = spec.sample_inputs(batch=2, subjects=subjects, seed=7)
    sess = session(tiny_build / "dit.fp16.onnx")
    assert {i.type for i in sess.get_inputs()} == {"tensor(float)"}, "fp16 graphs take and return float32"
    velocity, latents_next = sess.run(None, {k: v.numpy() for k, v in x.items()})
    ref_v, ref_next = torch_outputs(spec, x)
    err = rel_l2(velocity, ref_v)
    assert err < FP16_REL_L2, f"fp16 DiT rel L2 {err:.2e}"
    assert err > 1e-6, "an fp16 graph identical to fp32 means the variant was not converted"
    # the Euler step runs in float32 outside the fp16 part: its error is the velocity's error times dt
    expected_next = x["latents"].numpy() + (x["timestep_next"] - x["timestep"]).numpy()[:, None, None] * velocity
    assert max_abs(latents_next, expected_next) < 1e-6
    fp16_inits = [i for i in onnx.load(str(tiny_build / "dit.fp16.onnx")).graph.initializer
                  if i.data_type == onnx.TensorProto.FLOAT16]
    assert fp16_inits


def test_envelope_profiles(tiny_models):
    env = Envelope(batch=(1, 1, 3), subjects=(1, 2, 4), resolutions=((64, 64), (96, 128)))
    prof = get_spec("dit", tiny_models).profile(env)
    assert prof["latents"] == {"min": [1, 16, 64], "opt": [1, 16, 64], "max": [3, 48, 64]}
    assert prof["masks"]["max"] == [3, 4, 48] and prof["img_k"]["min"][2] == 1
    assert get_spec("clip", tiny_models).profile(env)["pixel_values"]["max"][0] == 3 * 4 * env.views
    with pytest.raises(ConfigError, match="subjects range"):
        Envelope(subjects=(2, 1, 4))


def test_external_data_round_trip(tiny_models, tmp_path):
    from export.exporter import export_model

    spec = get_spec("vae", tiny_models)
    files, _ = export_model(spec, tmp_path / "vae.onnx", external_threshold=0)
    assert [f.name for f in files] == ["vae.onnx", "vae.onnx.data"]
    assert (tmp_path / "vae.onnx").stat().st_size < (tmp_path / "vae.onnx.data").stat().st_size
    graph = onnx.load(str(tmp_path / "vae.onnx"), load_external_data=False).graph
    weights = [i for i in graph.initializer if i.name.startswith("vae.")]
    assert weights and all(i.data_location == onnx.TensorProto.EXTERNAL for i in weights if len(i.dims) == 4)
    x = spec.sample_inputs(seed=3)
    out = session(tmp_path / "vae.onnx").run(None, {k: v.numpy() for k, v in x.items()})[0]
    assert rel_l2(out, torch_outputs(spec, x)[0]) < FP32_REL_L2


def test_cli_exports_subset_and_rejects_unknown_model(tmp_path, caplog):
    assert main(["--engine-dir", str(tmp_path / "b"), "--models", "fusion"]) == 0
    m = Manifest.load(tmp_path / "b")
    assert list(m.models) == ["fusion"]
    assert main(["--engine-dir", str(tmp_path / "c"), "--models", "unet"]) == 2
    assert "unknown model ['unet']" in caplog.text and not (tmp_path / "c").exists()
    assert main(["--config", "nope", "--engine-dir", str(tmp_path / "d")]) == 2


def test_tampered_and_truncated_files_are_detected(tiny_build, tmp_path):
    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    data = (build / "vae.onnx").read_bytes()
    (build / "vae.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError, match="vae.onnx does not match its manifest hash"):
        Manifest.load(build).verify(build)
    (build / "vae.onnx").unlink()
    with pytest.raises(ManifestError, match="vae.onnx listed in the manifest is missing"):
        Manifest.load(build).verify(build)
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["models"]["clip"]["files"] = {"../../etc/passwd": "0" * 64}
    (build / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="escapes the build directory"):
        Manifest.load(build)
    (build / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not a valid manifest"):
        Manifest.load(build)


def test_interrupted_export_keeps_previous_build(tiny_build, tmp_path):
    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)

    def contents() -> dict[str, bytes]:
        return {str(p.relative_to(build)): p.read_bytes() for p in build.rglob("*") if p.is_file()}

    before = contents()
    # --force: the copied build is current, so without it every graph would be linked from it in a blink
    proc = subprocess.Popen([sys.executable, "-m", "export.onnx", "--engine-dir", str(build), "--force"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it once the first model has been written to the staging dir
        staged = [p for p in tmp_path.glob(".b.staging-*/clip.onnx")]
        if staged:
            break
        time.sleep(0.2)
    assert staged, "export never reached the staging step"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert contents() == before, "previous build was modified"
    Manifest.load(build).verify(build)
