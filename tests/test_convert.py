"""``python -m dynaip_trt.convert``: public XLabs / InstantX FLUX IP-Adapter checkpoints -> adapter files, every key and
shape checked, pickles read with ``weights_only=True`` only, CLI rules (one line, exit 2, atomic, never replacing a
file dynaip-trt did not write).

The full-size XLabs checkpoint (~1 GB in bf16) is generated and converted here; the full-size InstantX one (~5.3 GB)
only with ``DYNAIP_SLOW=1``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dynaip_trt.configs import get_config
from dynaip_trt.convert import checkpoint_layout, main
from dynaip_trt.models import build_adapter
from dynaip_trt.weights import load_adapter, read_adapter_config, read_adapter_header

from ip_checkpoints import instantx_state, write_instantx, write_xlabs, xlabs_state

ROOT = Path(__file__).resolve().parents[1]
slow = pytest.mark.skipif(not os.environ.get("DYNAIP_SLOW"), reason="full-size InstantX checkpoint (~5.3 GB on disk "
                          "and in memory): set DYNAIP_SLOW=1")


def flat(state: dict) -> dict[str, torch.Tensor]:
    """A nested InstantX state as flat public keys (``image_proj.proj.0.weight``...)."""
    return {f"{p}.{k}": v for p, d in state.items() for k, v in d.items()} if "image_proj" in state else state


def check_converted(out: Path, state: dict, fmt: str, cfg) -> None:
    """Every public tensor is in ``out`` under its adapter name, unchanged; the file's names and shapes are exactly
    those of the adapter built for ``cfg`` (on the meta device: no memory), and its header carries ``cfg``'s adapter."""
    state = flat(state)
    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
        for public, (ours, _) in checkpoint_layout(fmt, cfg).items():
            t = f.get_tensor(ours)
            assert t.dtype == state[public].dtype and torch.equal(t, state[public]), (public, ours)
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_adapter(cfg).state_dict().items()}
    assert shapes == expected
    assert read_adapter_config(out) == cfg.adapter
    header = read_adapter_header(out)
    assert (header["source_format"], int(header["clip_dim"])) == (fmt, cfg.encoder_width)


def test_full_size_xlabs_checkpoint_converts_exactly(tmp_path):
    cfg = get_config("flux-dev-xlabs")
    src = tmp_path / "ip_adapter.safetensors"
    state = write_xlabs(src, cfg, values="index")
    assert state["ip_adapter_proj_model.proj.weight"].shape == (16384, 768)
    assert state["double_blocks.18.processor.ip_adapter_double_stream_v_proj.weight"].shape == (3072, 4096)
    out = tmp_path / "xlabs.safetensors"
    assert main(["--format", "xlabs", str(src), "--out", str(out)]) == 0
    check_converted(out, state, "xlabs", cfg)
    assert not list(tmp_path.glob(".*.tmp"))


@slow
def test_full_size_instantx_checkpoint_converts_exactly(tmp_path):
    cfg = get_config("flux-dev-instantx")
    src = tmp_path / "ip-adapter.bin"
    state = write_instantx(src, cfg, values="index")
    assert state["image_proj"]["proj.2.weight"].shape == (524288, 2304)
    assert state["ip_adapter"]["56.to_k_ip.weight"].shape == (3072, 4096)
    out = tmp_path / "instantx.safetensors"
    assert main(["--format", "instantx", str(src), "--out", str(out)]) == 0
    check_converted(out, state, "instantx", cfg)


@pytest.mark.parametrize("fmt,container", [("xlabs", "safetensors"), ("instantx", "pickle"),
                                           ("instantx", "safetensors")])
def test_tiny_checkpoint_loads_into_the_adapter(tmp_path, fmt, container):
    """Tiny random checkpoints (InstantX as its nested pickle, or flat in safetensors as diffusers also reads it)
    load into the adapter module with every value in place."""
    cfg = get_config(f"tiny-{fmt}")
    src = tmp_path / f"ckpt.{'bin' if container == 'pickle' else 'safetensors'}"
    state = xlabs_state(cfg) if fmt == "xlabs" else instantx_state(cfg)
    if container == "pickle":
        torch.save(state, src)
    else:
        save_file(flat(state), str(src))
    out = tmp_path / "adapter.safetensors"
    assert main(["--format", fmt, str(src), "--out", str(out), "--config", f"tiny-{fmt}"]) == 0
    check_converted(out, state, fmt, cfg)
    adapter = load_adapter(out, build_adapter(cfg))
    params = adapter.state_dict()
    for public, (ours, _) in checkpoint_layout(fmt, cfg).items():
        assert torch.equal(params[ours], flat(state)[public].float()), public


@pytest.fixture()
def tiny_xlabs_file(tmp_path):
    src = tmp_path / "ip_adapter.safetensors"
    write_xlabs(src, get_config("tiny-xlabs"))
    return src


def run_cli(caplog, *args: str) -> tuple[int, str]:
    with caplog.at_level(logging.ERROR, logger="dynaip_trt.convert"):
        caplog.clear()
        code = main(list(args))
    return code, " | ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def test_a_shape_mismatch_names_the_key_and_both_shapes(tmp_path, caplog):
    cfg = get_config("tiny-xlabs")
    state = xlabs_state(cfg)
    key = "double_blocks.1.processor.ip_adapter_double_stream_k_proj.weight"
    state[key] = state[key][:, :40].contiguous()
    save_file(state, str(tmp_path / "bad.safetensors"))
    out = tmp_path / "out.safetensors"
    code, msg = run_cli(caplog, "--format", "xlabs", str(tmp_path / "bad.safetensors"), "--out", str(out),
                        "--config", "tiny-xlabs")
    assert code == 2
    assert f"{key} has shape (32, 40); the xlabs layout for tiny-xlabs expects (32, 48)" in msg
    assert not out.exists() and not list(tmp_path.glob(".*.tmp")), "nothing half-written"


def test_the_default_config_is_the_flux_dev_family(tmp_path, caplog):
    """Without --config the checkpoint must fit FLUX.1-dev: a tiny one lacks 17 of the 19 double blocks."""
    src = tmp_path / "ip.safetensors"
    write_xlabs(src, get_config("tiny-xlabs"))
    code, msg = run_cli(caplog, "--format", "xlabs", str(src), "--out", str(tmp_path / "o.safetensors"))
    assert code == 2 and "is not an xlabs checkpoint for flux-dev-xlabs: missing keys" in msg and "(68)" in msg


def test_missing_keys_and_the_wrong_format_are_named(tmp_path, tiny_xlabs_file, caplog):
    code, msg = run_cli(caplog, "--format", "instantx", str(tiny_xlabs_file), "--out", str(tmp_path / "o.safetensors"),
                        "--config", "tiny-instantx")
    assert code == 2 and "is not an instantx checkpoint for tiny-instantx" in msg and "try --format xlabs" in msg
    state = xlabs_state(get_config("tiny-xlabs"))
    del state["ip_adapter_proj_model.norm.bias"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    code, msg = run_cli(caplog, "--format", "xlabs", str(tmp_path / "partial.safetensors"), "--out",
                        str(tmp_path / "o.safetensors"), "--config", "tiny-xlabs")
    assert code == 2 and "missing keys ['ip_adapter_proj_model.norm.bias'] (1), unexpected keys [] (0)" in msg


class Payload:
    """A pickle that would create a file if it were ever unpickled as an arbitrary object."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_are_read_with_weights_only(tmp_path, caplog):
    marker = tmp_path / "executed"
    state = instantx_state(get_config("tiny-instantx"))
    state["image_proj"]["proj.0.weight"] = Payload(marker)
    torch.save(state, tmp_path / "evil.bin")
    code, msg = run_cli(caplog, "--format", "instantx", str(tmp_path / "evil.bin"), "--out",
                        str(tmp_path / "o.safetensors"), "--config", "tiny-instantx")
    assert code == 2 and "weights_only=True" in msg and "never unpickles" in msg
    assert not marker.exists(), "the pickle's code must never run"


@pytest.mark.parametrize("problem", ["nan", "int", "truncated", "text", "not-a-dict"])
def test_bad_checkpoints_are_one_line_errors(tmp_path, caplog, problem):
    cfg = get_config("tiny-instantx")
    state = instantx_state(cfg)
    src = tmp_path / "ckpt.bin"
    if problem == "nan":
        state["ip_adapter"]["3.to_v_ip.weight"][0, 0] = float("nan")
    elif problem == "int":
        state["image_proj"]["norm.bias"] = torch.zeros(48, dtype=torch.int64)
    torch.save([1, 2] if problem == "not-a-dict" else state, src)
    if problem == "truncated":
        src.write_bytes(src.read_bytes()[:2000])
    elif problem == "text":
        src.write_text("not a checkpoint")
    code, msg = run_cli(caplog, "--format", "instantx", str(src), "--out", str(tmp_path / "o.safetensors"),
                        "--config", "tiny-instantx")
    expected = {"nan": "ip_adapter.3.to_v_ip.weight contains NaN or Inf", "int": "image_proj.norm.bias has dtype "
                "torch.int64", "truncated": "neither a safetensors file nor a readable PyTorch checkpoint",
                "text": "neither a safetensors file nor a readable PyTorch checkpoint",
                "not-a-dict": "expected a dict of tensors, got list"}[problem]
    assert code == 2 and expected in msg and "\n" not in msg


def test_output_is_checked_before_any_work(tmp_path, tiny_xlabs_file, caplog):
    foreign = tmp_path / "mine.safetensors"
    foreign.write_bytes(b"user data")
    code, msg = run_cli(caplog, "--format", "xlabs", str(tiny_xlabs_file), "--out", str(foreign),
                        "--config", "tiny-xlabs")
    assert code == 2 and "was not written by dynaip-trt" in msg and foreign.read_bytes() == b"user data"
    code, msg = run_cli(caplog, "--format", "xlabs", str(tiny_xlabs_file), "--out", str(tiny_xlabs_file))
    assert code == 2 and "was not written by dynaip-trt" in msg
    code, msg = run_cli(caplog, "--format", "xlabs", str(tiny_xlabs_file), "--out", str(tmp_path / "no" / "o.st"))
    assert code == 2 and "no such folder" in msg
    code, msg = run_cli(caplog, "--format", "xlabs", str(tiny_xlabs_file), "--out", str(tmp_path / "o.safetensors"),
                        "--config", "tiny-random")
    assert code == 2 and "--config tiny-random does not have the xlabs adapter layout" in msg
    out = tmp_path / "ours.safetensors"  # an adapter file we wrote may be replaced
    for _ in range(2):
        assert main(["--format", "xlabs", str(tiny_xlabs_file), "--out", str(out), "--config", "tiny-xlabs"]) == 0


def test_cli_is_lean_and_answers_in_one_line():
    """``--help`` and argument errors never import torch; an error is one line on stderr with exit status 2."""
    code = ("import sys, runpy\nsys.argv = ['convert', '--format', 'xlabs', 'missing.safetensors', '--out', 'o.st']\n"
            "try:\n    runpy.run_module('dynaip_trt.convert', run_name='__main__')\nexcept SystemExit as e:\n"
            "    print('exit', e.code, 'torch' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.stdout.strip() == "exit 2 False", run.stdout + run.stderr
    assert run.stderr.strip().splitlines() == ["ERROR dynaip_trt.convert: IN missing.safetensors: no such file"]
    run = subprocess.run([sys.executable, "-m", "dynaip_trt.convert", "--format", "ip-adapter-plus", "x", "--out", "y"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "invalid choice: 'ip-adapter-plus'" in run.stderr
