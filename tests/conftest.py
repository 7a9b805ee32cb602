"""Shared fixtures: the tiny model family (seeded) and synthetic reference images."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from dynaip_trt.configs import get_config
from dynaip_trt.models import build_models

logging.getLogger("diffusers").setLevel(logging.ERROR)
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_cfg():
    return get_config("tiny")


@pytest.fixture(scope="session")
def tiny_models(tiny_cfg):
    """Tiny family with random (non-zero) reference K/V so the adapter has a visible effect. Do not mutate."""
    return build_models(tiny_cfg, seed=0)


@pytest.fixture()
def make_images():
    def make(n: int, size: tuple[int, int] = (48, 40), seed: int = 0) -> list[Image.Image]:
        rng = np.random.default_rng(seed)
        return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]

    return make


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory, tiny_models):
    """One ONNX export of the tiny family (all models fp32 + an fp16 DiT), shared by every test that needs it.

    Read-only for tests: copy it before modifying files.
    """
    from export.onnx import export_all

    out = tmp_path_factory.mktemp("build") / "tiny"
    export_all(out, models=tiny_models, fp16=("dit",), progress=False)
    return out
