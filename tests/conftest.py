"""Shared fixtures: the tiny model family (seeded) and synthetic reference images."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from dynaip_trt.configs import get_config
from dynaip_trt.models import build_models

logging.getLogger("diffusers").setLevel(logging.ERROR)
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_cfg():
    return get_config("tiny-random")


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
    """One ONNX export of the tiny family (all models fp32 + the fp16 variants an fp16 engine build needs), shared
    by every test that needs it.

    Read-only for tests: copy it before modifying files.
    """
    from export.exporter import export_all
    from export.specs import FP16_MODELS

    out = tmp_path_factory.mktemp("build") / "tiny"
    export_all(out, models=tiny_models, variants={"fp16": FP16_MODELS}, progress=False)
    return out


@pytest.fixture(scope="session")
def trained_build(tmp_path_factory):
    """One ONNX export (fp32 + fp16 variants) of the embedded trained default ``tiny``: what the README's set-up
    command 1 makes. Read-only for tests."""
    from export.exporter import export_all
    from export.specs import FP16_MODELS

    out = tmp_path_factory.mktemp("trained") / "tiny"
    export_all(out, config="tiny", variants={"fp16": FP16_MODELS}, progress=False)
    return out


@contextlib.contextmanager
def captured_logs(name: str) -> Iterator[list[str]]:
    """Messages logged to ``name`` (and its children) inside the block; usable in module-scoped fixtures, which
    cannot use pytest's function-scoped ``caplog``."""
    messages: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[Path]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)


# tests/conformance runs inside the TensorRT conformance venvs only (tests/test_tensorrt_conformance.py).
collect_ignore = ["conformance"]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model training tests: fastest for such models, and a shared CI machine
    is not oversubscribed (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def validated(tiny_models, make_images):
    """``validated(prompt, **fields)``: a one-reference :class:`GenerationRequest` validated for the tiny-random
    family (4 subjects at most), as the pipeline validates it."""
    from dynaip_trt.pipeline import DynaIPPipeline
    from dynaip_trt.request import GenerationRequest, validate_request

    pipe = DynaIPPipeline(tiny_models)

    def validate(prompt: str, **fields):
        return validate_request(GenerationRequest(prompt, make_images(1), **fields), tiny_models.config,
                                pipe.tokenizers, 4, pipe.num_blocks)

    return validate
