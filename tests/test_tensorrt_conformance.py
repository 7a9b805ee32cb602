"""The TensorRT code paths against the real Python bindings of TensorRT 10.x (CUDA 12) and 11.x (CUDA 13).

No GPU or TensorRT library runs here, but the real bindings import (:mod:`trt_venvs`: cached venvs with stub
libraries; a venv that cannot be built, e.g. without PyPI, fails the test with pip's last lines). For each
supported TensorRT line this runs ``tests/conformance`` in its venv: the engine build
(``export.build``) and the runtime backend (``runtime.trt_backend`` over ``runtime.cuda``) against fakes that are
checked call by call against the real ``tensorrt`` and ``cuda.bindings.runtime`` (see
``tests/conformance/api_check.py``), plus the real modules without a GPU (exit 3, clear errors).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from trt_venvs import SPECS, conformance_python

REPO = Path(__file__).resolve().parents[1]
CONFORMANCE = REPO / "tests" / "conformance"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_tensorrt_code_conforms_to_the_real_api(name, tiny_build):
    python = conformance_python(SPECS[name])
    env = {**os.environ, "PYTHONPATH": str(REPO), "DYNAIP_CONFORMANCE_BUILD": str(tiny_build)}
    r = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--confcutdir", str(CONFORMANCE),
                        str(CONFORMANCE)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"conformance tests failed in the {name} venv:\n{out[-12000:]}"
    summary = out.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and not re.search(r"skipped|xfail|error", summary), summary
