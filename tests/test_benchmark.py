"""Benchmark plumbing: the analytic FLOP count behind the compute floor, and the CLI on the tiny CPU config.

No timing is asserted here (timings belong in benchmark output, not in pass/fail tests)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dynaip_trt.attention import ReferenceInputs
from dynaip_trt.conditioning import ReferenceKV
from dynaip_trt.configs import get_config
from dynaip_trt.sampling import latent_image_ids, text_ids
from runtime.benchmark import dit_step_flops, main


@pytest.mark.parametrize("batch,height,width,subjects", [(1, 64, 64, 1), (2, 128, 96, 3)])
def test_flop_count_matches_torch_flop_counter(tiny_models, batch, height, width, subjects):
    cfg = tiny_models.config
    t = cfg.transformer
    n, length = (height // 16) * (width // 16), cfg.text.max_text_length
    kv = torch.randn(t.num_layers, batch, subjects, cfg.adapter.num_tokens, t.inner_dim)
    ref = ReferenceInputs(kv=ReferenceKV(kv, kv), scales=torch.ones(batch, subjects), image_tokens=n)
    kw = dict(hidden_states=torch.randn(batch, n, t.in_channels),
              encoder_hidden_states=torch.randn(batch, length, t.joint_attention_dim),
              pooled_projections=torch.randn(batch, t.pooled_projection_dim), timestep=torch.rand(batch),
              guidance=torch.rand(batch), img_ids=torch.from_numpy(latent_image_ids(height, width, 8)),
              txt_ids=torch.from_numpy(text_ids(length)),
              return_dict=False)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        tiny_models.transformer(**kw, joint_attention_kwargs={"dynaip": ref})
    total, adapter = dit_step_flops(cfg, batch, height, width, subjects)
    # the formula leaves out the timestep/guidance MLPs and AdaLN modulations (one vector per image): < 5%
    assert abs(total - counter.get_total_flops()) / counter.get_total_flops() < 0.05
    assert 0 < adapter < total


def test_flux_dev_step_flops_order_of_magnitude():
    total, adapter = dit_step_flops(get_config("flux-dev"), 1, 1024, 1024, 4)
    assert 7.0e13 < total < 8.0e13  # ~74 TFLOP per 1024x1024 step (12B params x 4608 tokens x 2, + attention)
    assert adapter / total < 0.01  # the reference attention is < 1% of a step's FLOPs with 4 subjects


def test_cli_on_tiny_cpu(tiny_build, tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(["--config", "tiny-random", "--backends", "torch-eager,torch-fp8,onnxruntime,tensorrt", "--subjects",
               "1,2", "--steps", "2", "--repeats", "1", "--warmup", "0", "--engine-dir", str(tiny_build),
               "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "CPU figure" in text and "skipped tensorrt" in text
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["backend"], r["subjects"]) for r in rows] == [
        ("torch-eager", 1), ("torch-eager", 2), ("torch-fp8", 1), ("torch-fp8", 2), ("onnxruntime", 1),
        ("onnxruntime", 2)]
    for r in rows:
        assert r["step_ms"] > 0 and r["e2e_ms"] > 0 and r["encode_ms"] > 0 and r["floor_ms"] > 0
        assert r["vs_baseline"] > 0
    assert rows[0]["vs_baseline"] == 1.0 and rows[0]["adapter_overhead_pct"] is not None
    assert out_png.stat().st_size > 1000


def test_cli_rejects_bad_arguments(capsys):
    assert main(["--config", "flux-schnell"]) == 2
    assert main(["--config", "tiny-random", "--backends", "torch-compiled"]) == 2
    assert main(["--config", "flux-dev", "--device", "cpu"]) == 2
