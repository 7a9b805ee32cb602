"""The embedded ``tiny`` default: trained weights shipped as package data (hash-checked, config-checked), a
word-level tokenizer with 77-token prompts, and images that follow the reference (not only the prompt)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dynaip_trt.configs import get_config
from dynaip_trt.demo.world import COLOURS, World
from dynaip_trt.errors import WeightsError
from dynaip_trt.models import build_models
from dynaip_trt.pipeline import DynaIPPipeline
from dynaip_trt.text import WordLevelTokenizer
from dynaip_trt.weights import EMBEDDED_ROOT, load_embedded


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_models(get_config("tiny"))
    torch.set_num_threads(threads)


def test_tiny_is_the_trained_package(tiny):
    cfg = tiny.config
    assert (cfg.height, cfg.width, cfg.text.max_text_length) == (32, 32, 77)
    assert isinstance(tiny.t5_tokenizer, WordLevelTokenizer)
    assert tiny.t5_tokenizer.count("an object on the left in a forest") == 9  # 8 words + EOS
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


def _subject_hue(image: Image.Image) -> float | None:
    """Mean hue (0..1, circular) of the saturated pixels of an image on snow (the subject's), or None."""
    hsv = np.asarray(image.convert("HSV"), dtype=np.float64) / 255.0
    sat = hsv[..., 1] > 0.45
    if sat.sum() < 8:
        return None
    angle = hsv[..., 0][sat] * 2 * np.pi
    return float(np.angle(np.exp(1j * angle).mean()) / (2 * np.pi) % 1.0)


def _hue(rgb: tuple[int, int, int]) -> float:
    return float(np.asarray(Image.new("RGB", (1, 1), rgb).convert("HSV"))[0, 0, 0] / 255.0)


def test_the_reference_decides_the_colour(tiny):
    """Held-out subjects of three colours, on snow: at adapter scale 1 the subject takes the reference's hue; at
    scale 0 every reference gives the same image (the base model alone)."""
    world = World(size=32, reference_size=32)
    pipe = DynaIPPipeline.from_models(tiny)
    subjects = [s for s in world.split("heldout") if s.pattern == "solid"]
    assert {s.colour for s in subjects} == {"red", "yellow", "green", "cyan"}
    hits, baselines = 0, []
    for s in subjects:
        ref = Image.fromarray(world.reference(s, np.random.default_rng(0), augment=False))
        image = pipe("an object in the middle in the snow", [ref], seed=1, progress=False)[0]
        baselines.append(np.asarray(pipe("an object in the middle in the snow", [ref], scales=0.0, seed=1,
                                         progress=False)[0]))
        hue = _subject_hue(image)
        target = _hue(COLOURS[s.colour])
        hits += hue is not None and min(abs(hue - target), 1 - abs(hue - target)) < 1 / 12
    assert all(np.array_equal(b, baselines[0]) for b in baselines)
    assert hits >= 3, f"{hits} of 4 held-out subjects came out in their reference's colour"
