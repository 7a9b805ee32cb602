"""Parity harness (``python -m export.parity``): saved PyTorch references, ONNX Runtime rows, exit codes."""

from __future__ import annotations

import json
import logging
import shutil
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from dynaip_trt.manifest import MODEL_IO, REQUIRED_MODELS, Manifest, sha256_file
from dynaip_trt.tensorrt_api import GpuInfo
from export.envelope import Envelope
from export.parity import (BF16_REL_L2, FP8_REL_L2, FP16_REL_L2, FP32_REL_L2, TF32_REL_L2, TOLERANCES,
                           engine_precision, main, onnxruntime_rows, run_runner, select_graphs, tensorrt_unavailable,
                           tolerance_of)
from export.references import REFERENCE_SEED, reference_file, reference_point, save_references
from export.specs import get_spec


def load_npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def run_main(build, tmp_path, *args: str) -> tuple[int, dict]:
    """``main`` with a JSON report; returns the exit code and the report (``{}`` when none was written)."""
    report = tmp_path / "parity.json"
    code = main(["--engine-dir", str(build), "--json", str(report), *args])
    return code, json.loads(report.read_text()) if report.exists() else {}


def test_references_are_in_the_build_and_hashed(tiny_build):
    m = Manifest.load(tiny_build)
    m.verify(tiny_build)
    for name, entry in m.models.items():
        rel = reference_file(name)
        assert entry.files[rel] == sha256_file(tiny_build / rel)
        ref = load_npz(tiny_build / rel)
        assert set(ref) == {f"inputs/{n}" for n in MODEL_IO[name][0]} | {f"outputs/{n}" for n in MODEL_IO[name][1]}
        for n, spec in entry.outputs.items():
            assert ref[f"outputs/{n}"].dtype == np.float32 and ref[f"outputs/{n}"].ndim == len(spec["shape"])
    assert load_npz(tiny_build / reference_file("dit"))["inputs/masks"].shape[:2] == (2, 2)  # batch, subjects


def test_save_references_equal_a_fresh_pytorch_run(tiny_build, tiny_models, tmp_path):
    cfg = tiny_models.config
    env = Envelope(subjects=(1, 2, cfg.max_subjects), resolutions=((cfg.height, cfg.width),))
    names = ("fusion", "dit")
    files = save_references(tmp_path, tiny_models, names, env)
    assert files == {reference_file(n): sha256_file(tmp_path / reference_file(n)) for n in names}
    for name in names:
        spec = get_spec(name, tiny_models)
        ref = load_npz(tmp_path / reference_file(name))
        expected_inputs = spec.sample_inputs(*reference_point(env), seed=REFERENCE_SEED)
        with torch.no_grad():
            out = spec.module().eval()(*(torch.from_numpy(ref[f"inputs/{n}"]) for n in spec.input_names))
        out = out if isinstance(out, tuple) else (out,)
        for n, o in zip(spec.output_names, out):
            np.testing.assert_array_equal(ref[f"outputs/{n}"], o.numpy())
        for n in spec.input_names:
            np.testing.assert_array_equal(ref[f"inputs/{n}"], expected_inputs[n].numpy())
        built = load_npz(tiny_build / reference_file(name))  # export_all saved the same point and weights
        assert built.keys() == ref.keys() and all(np.array_equal(built[k], ref[k]) for k in ref)


def test_cli_passes_on_the_tiny_build(tiny_build, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="export.parity")
    code, report = run_main(tiny_build, tmp_path)
    assert code == 0 and report["passed"]
    rows = {(r["model"], r["precision"]): r for r in report["rows"] if r["backend"] == "onnxruntime"}
    graphs = {(name, p) for name, entry in Manifest.load(tiny_build).models.items() for p in entry.graphs()}
    assert set(rows) == graphs and ("dit", "fp16") in rows and all(r["result"] == "PASS" for r in rows.values())
    for name in REQUIRED_MODELS:
        row = rows[(name, "fp32")]
        assert row["vs"] == "pytorch-fp32" and row["result"] == "PASS" and row["tolerance"] == FP32_REL_L2
        assert row["rel_l2"] < FP32_REL_L2 and row["cosine"] > 1 - 1e-9, row
    fp16 = rows[("dit", "fp16")]
    assert 1e-6 < fp16["rel_l2"] < FP16_REL_L2 and fp16["tolerance"] == TOLERANCES["fp16"]
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["model", "precision", "backend", "vs", "rel_l2", "max_abs", "cosine", "tolerance",
                                "result"]
    assert any(line.split()[:3] == ["dit", "fp16", "onnxruntime"] and line.endswith("PASS") for line in table)
    if tensorrt_unavailable():
        assert "the TensorRT half needs TensorRT and an NVIDIA GPU" in caplog.text


def test_perturbed_reference_fails_and_tampered_one_is_refused(tiny_build, tmp_path):
    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    path = build / reference_file("dit")
    ref = load_npz(path)
    v = ref["outputs/velocity"]
    ref["outputs/velocity"] = v + 0.01 * np.random.default_rng(0).standard_normal(v.shape).astype(v.dtype) * v.std()
    with open(path, "wb") as f:
        np.savez(f, **ref)
    assert run_main(build, tmp_path, "--models", "dit")[0] == 2  # hash mismatch: refused before comparing
    m = Manifest.load(build)
    m.models["dit"].files[reference_file("dit")] = sha256_file(path)
    m.save(build)
    code, report = run_main(build, tmp_path, "--models", "dit")
    assert code == 1 and not report["passed"]
    rows = {r["precision"]: r for r in report["rows"] if r["backend"] == "onnxruntime"}
    assert rows["fp32"]["result"] == rows["fp16"]["result"] == "FAIL"
    assert 5e-3 < rows["fp32"]["rel_l2"] < 2e-2  # the 1% perturbation, not an unrelated failure


def test_bf16_graph_onnxruntime_cannot_run_is_skipped_with_reason(tmp_path):
    w = helper.make_tensor("w", TensorProto.BFLOAT16, [4, 4], np.eye(4).ravel().tolist())
    nodes = [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
             helper.make_node("MatMul", ["xb", "w"], ["yb"]), helper.make_node("Cast", ["yb"], ["y"], to=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "m.onnx")
    x = np.ones((2, 4), np.float32)
    rows, outputs = onnxruntime_rows(tmp_path, "clip", {"bf16": "m.onnx"}, ("bf16", "fp16"), {"x": x}, {"y": x})
    assert [(r.precision, r.result) for r in rows] == [("bf16", "SKIP"), ("fp16", "SKIP")] and not outputs
    assert "no bfloat16 kernels" in rows[0].note and "no fp16 graph" in rows[1].note


def test_tensorrt_rows_with_a_stand_in_engine(tiny_build, tmp_path, monkeypatch):
    """The TensorRT half on the CPU: "engines" that run their source graph on ONNX Runtime stand in for TrtRunner,
    so TensorRT must match ONNX Runtime exactly and PyTorch within the engine precision's tolerance."""
    import export.parity as parity

    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    m = Manifest.load(build)
    sources = {"dit": "dit.fp16.onnx", "vae": "vae.onnx", "clip": "clip.fp16.onnx"}
    for name, graph in sources.items():
        shutil.copy(build / graph, build / f"{name}.engine")
        m.models[name].engine = f"{name}.engine"
        m.models[name].files[f"{name}.engine"] = sha256_file(build / f"{name}.engine")
    m.models["clip"].profile["pixel_values"]["max"][0] = 1  # the reference batch is outside this engine's profile
    m.tensorrt = {"version": "10.8.0", "gpu": "NVIDIA H100", "compute_capability": [9, 0], "precision": "fp16",
                  "engines": {"dit": {"precision": "fp16", "flags": []}, "clip": {"precision": "fp16", "flags": []},
                              "vae": {"precision": "fp32", "flags": []}}}  # TF32 is TensorRT's default
    m.save(build)
    monkeypatch.setattr(parity, "tensorrt_unavailable", lambda: None)
    monkeypatch.setattr(parity, "import_tensorrt_gpu", lambda what: (
        types.SimpleNamespace(__version__="10.8.0"), GpuInfo(0, "NVIDIA H100", (9, 0), 80 << 30)))
    monkeypatch.setattr(parity, "run_tensorrt", lambda path, feeds: parity.run_onnxruntime(
        build / sources[path.stem], feeds))
    code, report = run_main(build, tmp_path, "--models", "dit,vae,clip,fusion")
    assert code == 0 and report["backends"] == ["onnxruntime", "tensorrt"]
    rows = {(r["model"], r["vs"]): r for r in report["rows"] if r["backend"] == "tensorrt"}
    assert set(rows) == {("dit", "pytorch-fp32"), ("dit", "onnxruntime"), ("vae", "pytorch-fp32"),
                         ("vae", "onnxruntime"), ("clip", "pytorch-fp32"), ("fusion", "pytorch-fp32")}
    ort = {(r["model"], r["precision"]): r for r in report["rows"] if r["backend"] == "onnxruntime"}
    assert rows[("dit", "pytorch-fp32")]["rel_l2"] == ort[("dit", "fp16")]["rel_l2"]
    assert rows[("dit", "onnxruntime")]["rel_l2"] == 0 and rows[("dit", "onnxruntime")]["result"] == "PASS"
    vae = rows[("vae", "pytorch-fp32")]
    assert vae["precision"] == "fp32" and vae["tolerance"] == TF32_REL_L2 and vae["result"] == "PASS"
    assert "outside the engine's profile" in rows[("clip", "pytorch-fp32")]["note"]
    assert "no TensorRT engine" in rows[("fusion", "pytorch-fp32")]["note"]
    assert run_main(build, tmp_path, "--models", "vae", "--precisions", "fp16")[1]["rows"][-1]["note"] == (
        "the engine is fp32, not among the requested precisions")
    m.tensorrt["compute_capability"] = [8, 0]
    m.save(build)
    assert run_main(build, tmp_path, "--models", "dit")[0] == 2  # engines built for another GPU: refused


def test_fp32_engines_get_the_tf32_tolerance_unless_built_without_it(tiny_build):
    """TensorRT's TF32 flag is on by default: an fp32 engine is compared with the TF32 tolerance whether or not its
    plan lists the flag; only --no-tf32 (plan tf32 false) gets the fp32 one."""
    m = Manifest.load(tiny_build)
    m.tensorrt = {"engines": {"vae": {"precision": "fp32", "flags": []},
                              "text": {"precision": "fp32", "flags": [], "tf32": False},
                              "dit": {"precision": "fp8-bf16", "flags": []}, "clip": {"precision": "fp16"}}}
    assert engine_precision(m, "vae") == ("fp32", TF32_REL_L2)
    assert engine_precision(m, "text") == ("fp32", FP32_REL_L2)
    assert engine_precision(m, "dit") == ("fp8-bf16", max(FP8_REL_L2, BF16_REL_L2))
    assert engine_precision(m, "clip") == ("fp16", FP16_REL_L2)
    assert tolerance_of("fp8-fp16") == FP8_REL_L2 > FP16_REL_L2


def test_fp8_graphs_are_selected_by_their_family():
    graphs = {"fp32": "dit.onnx", "fp16": "dit.fp16.onnx", "fp8-bf16": "dit.fp8-bf16.onnx",
              "fp8-fp16": "dit.fp8-fp16.onnx"}
    assert select_graphs(graphs, None) == ("fp32", "fp16", "fp8-bf16", "fp8-fp16")
    assert select_graphs(graphs, ("fp8",)) == ("fp8-bf16", "fp8-fp16")
    assert select_graphs(graphs, ("bf16", "fp16")) == ("bf16", "fp16"), "a missing precision stays (its row says so)"


class BF16Runner:
    """A polygraphy runner with a bfloat16 input and output, converting dtypes as polygraphy's TrtRunner does
    (numpy feeds -> numpy buffers, torch feeds -> torch tensors; numpy has no bfloat16)."""

    def __init__(self):
        from polygraphy.common import TensorMetadata
        from polygraphy.datatype import DataType

        self.meta = TensorMetadata().add("x", DataType.BFLOAT16, (2, 3))
        self.bf16 = DataType.BFLOAT16

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def get_input_metadata(self, use_numpy_dtypes=False):
        return self.meta

    def infer(self, feed):
        from polygraphy import util
        from polygraphy.datatype import DataType

        x = feed["x"]
        as_torch = util.array.is_torch(x)
        out_dtype = DataType.to_dtype(self.bf16, "torch" if as_torch else "numpy")  # numpy: raises, like TrtRunner
        return {"y": (x.float() * 2).to(out_dtype)}


def test_bf16_engine_outputs_are_compared_through_float32():
    from polygraphy.exception import PolygraphyException

    x = np.array([[1.0, 1.00390625, -2.5], [0.1, 3.0, 1e-3]], np.float32)
    with pytest.raises(PolygraphyException, match="bfloat16"):
        run_runner(BF16Runner(), {"x": x})  # numpy feeds cannot carry bfloat16
    y = run_runner(BF16Runner(), {"x": x}, as_torch=True)["y"]
    expected = (torch.from_numpy(x).to(torch.bfloat16).float() * 2).to(torch.bfloat16).float().numpy()
    assert y.dtype == np.float32 and y.shape == (2, 3)
    np.testing.assert_array_equal(y, expected)


@pytest.mark.skipif(tensorrt_unavailable() is None, reason="TensorRT and a GPU are present")
def test_tensorrt_requested_without_tensorrt_exits_3(tiny_build, tmp_path, caplog):
    assert run_main(tiny_build, tmp_path, "--backends", "tensorrt")[0] == 3
    assert "tensorrt" in caplog.text and "pip install" in caplog.text


@pytest.mark.parametrize("args, message", [
    (("--precisions", "fp64"), "unknown precisions ['fp64']"),
    (("--precisions", "bf16"), "has no ['bf16'] graphs"),
    (("--models", "unet"), "unknown models ['unet']"),
    (("--backends", "cuda"), "--backends 'cuda'"),
])
def test_bad_arguments_exit_2(tiny_build, tmp_path, caplog, args, message):
    assert run_main(tiny_build, tmp_path, *args) == (2, {})
    assert message in caplog.text
