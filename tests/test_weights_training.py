"""Weights I/O (adapter safetensors, local diffusers/transformers folders) and the training step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from dynaip_trt.errors import WeightsError
from dynaip_trt.models import build_adapter, build_models
from dynaip_trt.pipeline import DynaIPPipeline
from dynaip_trt.training import adapter_parameters, synthetic_batch, train_step
from dynaip_trt.weights import load_adapter, load_models, read_adapter_config, save_adapter, save_models

from dynaip_trt.metrics import max_abs


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tiny_models):
    d = tmp_path_factory.mktemp("weights")
    save_models(tiny_models, d / "flux", d / "clip", d / "adapter.safetensors")
    return d


def test_adapter_round_trip_is_bit_exact(tiny_models, tmp_path):
    path = save_adapter(tiny_models.adapter, tmp_path / "a.safetensors")
    fresh = build_adapter(tiny_models.config)
    load_adapter(path, fresh)
    original = tiny_models.adapter.state_dict()
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, original[k]), k
    assert read_adapter_config(path) == tiny_models.config.adapter
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file may remain"


def test_load_local_folders_matches_in_memory_models(tiny_models, saved_tiny, make_images):
    loaded = load_models(saved_tiny / "flux", saved_tiny / "clip", saved_tiny / "adapter.safetensors")
    assert loaded.config == tiny_models.config
    refs = make_images(2)
    a = DynaIPPipeline(tiny_models)("a photo", refs, output_type="latent", progress=False)
    b = DynaIPPipeline(loaded)("a photo", refs, output_type="latent", progress=False)
    assert max_abs(a, b) < 1e-5


def test_missing_base_component_is_named(saved_tiny, tmp_path):
    import shutil

    broken = tmp_path / "flux"
    shutil.copytree(saved_tiny / "flux", broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(WeightsError, match=r"lacks components \['vae'\]"):
        load_models(broken, saved_tiny / "clip")
    with pytest.raises(WeightsError, match="does not exist"):
        load_models(tmp_path / "nowhere", saved_tiny / "clip")


def test_corrupt_adapter_file(tiny_models, tmp_path):
    path = save_adapter(tiny_models.adapter, tmp_path / "a.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupt"):
        load_adapter(tmp_path / "cut.safetensors", build_adapter(tiny_models.config))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="corrupt|not a safetensors"):
        load_adapter(tmp_path / "junk.safetensors", build_adapter(tiny_models.config))
    with pytest.raises(WeightsError, match="does not exist"):
        load_adapter(tmp_path / "missing.safetensors", build_adapter(tiny_models.config))


def _rewrite(path, out, fn):
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = fn(tensors)
    save_file(tensors, str(out), metadata=meta)
    return out


def test_adapter_key_shape_dtype_errors(tiny_models, tmp_path):
    path = save_adapter(tiny_models.adapter, tmp_path / "a.safetensors")
    key = "img_kv.0.to_k.weight"
    missing = _rewrite(path, tmp_path / "m.safetensors", lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(WeightsError, match=r"missing \['img_kv.0.to_k.weight'\]"):
        load_adapter(missing, build_adapter(tiny_models.config))
    shape = _rewrite(path, tmp_path / "s.safetensors", lambda t: {**t, key: torch.zeros(3, 3)})
    with pytest.raises(WeightsError, match=r"img_kv.0.to_k.weight has shape \(3, 3\)"):
        load_adapter(shape, build_adapter(tiny_models.config))
    dtype = _rewrite(path, tmp_path / "d.safetensors", lambda t: {**t, key: t[key].to(torch.int32)})
    with pytest.raises(WeightsError, match="dtype torch.int32"):
        load_adapter(dtype, build_adapter(tiny_models.config))
    nan = _rewrite(path, tmp_path / "n.safetensors", lambda t: {**t, key: torch.full_like(t[key], float("nan"))})
    with pytest.raises(WeightsError, match="NaN"):
        load_adapter(nan, build_adapter(tiny_models.config))


def test_mismatched_image_encoder_width(tiny_models, tmp_path):
    cfg = tiny_models.config
    other = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, hidden_size=48))
    path = save_adapter(build_adapter(other), tmp_path / "wide.safetensors")
    with pytest.raises(WeightsError, match="image encoder of width 48"):
        load_adapter(path, build_adapter(cfg))


def test_training_step_reduces_loss(tiny_cfg):
    models = build_models(tiny_cfg, seed=0, random_adapter_kv=False)
    base_params = {k: v.clone() for k, v in models.transformer.state_dict().items()}
    batch = synthetic_batch(models, size=4, seed=0)
    opt = torch.optim.Adam(adapter_parameters(models), lr=3e-3)
    losses = [train_step(models, batch, opt) for _ in range(30)]
    assert losses[-1] < 0.85 * losses[0], f"loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}"
    for k, v in models.transformer.state_dict().items():
        assert torch.equal(v, base_params[k]), f"base weight {k} changed"
