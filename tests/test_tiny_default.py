"""The embedded ``tiny`` default: trained weights shipped as package data (hash-checked, config-checked), a
word-level tokenizer with 77-token prompts (what the images are worth: tests/test_quality_guard.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dynaip_trt.configs import get_config
from dynaip_trt.errors import WeightsError
from dynaip_trt.weights import EMBEDDED_ROOT, load_embedded, load_family


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_family("tiny")
    torch.set_num_threads(threads)


def test_tiny_is_the_trained_package(tiny):
    cfg = tiny.config
    assert (cfg.height, cfg.width, cfg.text.max_text_length) == (32, 32, 77)
    ids = tiny.t5_tokenizer.encode_batch(["an object on the left in a forest"])
    assert ids.shape == (1, 77) and (ids[0, :8] > 2).all() and list(ids[0, 8:10]) == [1, 0]  # 8 words, EOS, pad
    assert tiny.clip_tokenizer.max_length == cfg.text.clip_max_length
    kv = torch.cat([p.flatten() for p in tiny.adapter.img_kv.parameters()])
    assert kv.abs().mean() > 1e-3, "the reference K/V projections are trained, not zero-initialised"
    index = json.loads((EMBEDDED_ROOT / "tiny" / "weights.json").read_text())
    assert sum((EMBEDDED_ROOT / "tiny" / f).stat().st_size for f in index) < 25 * 2**20


def test_damaged_package_is_named(tmp_path):
    cfg = get_config("tiny")
    folder = tmp_path / "tiny"
    shutil.copytree(EMBEDDED_ROOT / "tiny", folder)
    data = bytearray((folder / "vae.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "vae.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"vae\.safetensors is missing or does not match its SHA-256"):
        load_embedded(cfg, folder)
    shutil.copy(EMBEDDED_ROOT / "tiny" / "vae.safetensors", folder / "vae.safetensors")
    other = json.loads((folder / "config.json").read_text())
    other["steps"] += 1
    (folder / "config.json").write_text(json.dumps(other))
    index = json.loads((folder / "weights.json").read_text())
    from dynaip_trt.manifest import sha256_file

    index["config.json"] = sha256_file(folder / "config.json")
    (folder / "weights.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="does not match the 'tiny' config"):
        load_embedded(cfg, folder)
    (folder / "weights.json").unlink()
    with pytest.raises(WeightsError, match="weights of the embedded 'tiny' config are missing"):
        load_embedded(cfg, folder)
