"""The lean runtime for real: a venv with only ``pip install -e .[runtime]`` (no torch, diffusers or transformers)
runs ``python -m runtime.generate`` on a build the main environment exported, and its image is the PyTorch reference
pipeline's for the same seed.

Tolerance: ONNX Runtime fp32 on the CPU against PyTorch fp32 differs by float reassociation only (final latents rel L2
< 1e-4, tests/test_runtime_ort.py); after decoding and 8-bit rounding that is at most 1 level per pixel channel.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynaip_trt.pipeline import DynaIPPipeline

from venv_cache import ROOT, pip, venv_python

MAX_PIXEL_DIFF = 1  # 8-bit levels


def runtime_requirements() -> list[str]:
    """The key of the lean venv: the project's dependency declarations and the checkout it installs in editable
    mode (a venv of another checkout would run that checkout's code)."""
    return [(ROOT / "pyproject.toml").read_text(), str(ROOT)]


@pytest.fixture(scope="session")
def lean_python() -> Path:
    return venv_python("runtime", runtime_requirements(), lambda py: pip(py, "-e", f"{ROOT}[runtime]"))


def test_lean_venv_has_no_torch(lean_python):
    code = "import importlib.util as u; print([m for m in ('torch', 'diffusers', 'transformers') if u.find_spec(m)])"
    run = subprocess.run([str(lean_python), "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


def test_lean_runtime_generates_the_reference_image(lean_python, tiny_build, tiny_models, tmp_path):
    refs = [str(ROOT / "examples" / "subject_a.png"), str(ROOT / "examples" / "subject_b.png")]
    prompt = "two friends playing with toys on a sunny beach"
    out = tmp_path / "lean.png"
    run = subprocess.run([str(lean_python), "-m", "runtime.generate", "--engine-dir", str(tiny_build),
                          "--prompt", prompt, "--ref", refs[0], "--ref", refs[1], "--seed", "3", "--scale", "0.8",
                          "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    expected = DynaIPPipeline(tiny_models)(prompt, refs, seed=3, scales=0.8, progress=False)[0]
    got = np.asarray(Image.open(out), dtype=np.int16)
    diff = np.abs(got - np.asarray(expected, dtype=np.int16))
    assert diff.max() <= MAX_PIXEL_DIFF, f"max pixel difference {diff.max()}"
