"""The TensorRT contract (``dynaip_trt/tensorrt_api.py``): supported versions as stated in ``pyproject.toml`` and the
README, version checks, CUDA error mapping. The calls into the real bindings are tested in
``tests/test_tensorrt_conformance.py``."""

from __future__ import annotations

import enum
import re
import sys
import tomllib
import types
from pathlib import Path

import pytest

from dynaip_trt.errors import BackendUnavailableError, ResourceError
from dynaip_trt.tensorrt_api import (INSTALL_HINT, SUPPORTED, check_version, cuda_check, import_tensorrt,
                                     supported_line)

REPO = Path(__file__).resolve().parents[1]


def test_extras_pin_each_supported_tensorrt_line_with_its_cuda_python():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "tensorrt" not in extras, "an unpinned tensorrt extra resolves to the newest major version"
    for line in SUPPORTED:
        reqs = extras[line.extra]
        assert f"tensorrt-cu{line.cuda}>={line.minimum[0]}.{line.minimum[1]},<{line.major + 1}" in reqs, reqs
        cuda = [r for r in reqs if r.startswith("cuda-python")]
        assert cuda and re.search(rf">={line.cuda}\.\d+,<{line.cuda + 1}$", cuda[0]), cuda
        assert f"pip install -e .[{line.extra}]" in INSTALL_HINT
    for name, reqs in extras.items():
        assert not any(r.startswith("nvidia-modelopt[") for r in reqs), f"{name}: ModelOpt's [torch,onnx] extras pin " \
                                                                        f"their own onnx/onnxruntime-gpu"


def test_readme_states_the_supported_ranges():
    readme = (REPO / "README.md").read_text()
    for line in SUPPORTED:
        row = f"| {line.minimum[0]}.{line.minimum[1]} - {line.major}.x | CUDA {line.cuda}"
        assert row in readme and f".[{line.extra}]" in readme


@pytest.mark.parametrize("version, major", [("10.8.0.43", 10), ("10.16.1.11", 10), ("11.0.0.114", 11),
                                            ("11.4.0.106", 11), ("10.7.0", None), ("9.3.0", None), ("12.0.1", None)])
def test_supported_versions(version, major):
    line = supported_line(version)
    assert (line.major if line else None) == major


def test_an_unsupported_tensorrt_is_refused_with_the_ranges():
    with pytest.raises(BackendUnavailableError, match=r"supports TensorRT 10.8-10.x with CUDA 12 "
                                                      r"\(.\[tensorrt-cu12\]\); TensorRT 11.0-11.x with CUDA 13 .* "
                                                      r"but TensorRT 12.0.1 is installed"):
        check_version(types.SimpleNamespace(__version__="12.0.1"), "the tensorrt backend")


def test_without_tensorrt_the_message_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match=r"building needs TensorRT: pip install -e \.\[tensorrt-cu12\] "
                                                      r"\(TensorRT 10.x, CUDA 12 driver\) or pip install -e "
                                                      r"\.\[tensorrt-cu13\]"):
        import_tensorrt("building")


class FakeError(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorLaunchFailure = 719


def test_cuda_results_are_unpacked_or_raise_one_clear_error():
    assert cuda_check((FakeError.cudaSuccess,), "x") is None
    assert cuda_check((FakeError.cudaSuccess, 7), "x") == 7
    assert cuda_check((FakeError.cudaSuccess, 1, 2), "x") == (1, 2)
    with pytest.raises(ResourceError, match="cudaMalloc: out of GPU memory"):
        cuda_check((FakeError.cudaErrorMemoryAllocation, None), "cudaMalloc")
    with pytest.raises(BackendUnavailableError, match=r"no usable NVIDIA GPU and driver \(cudaErrorInsufficientDriver\)"
                                                      r": pip install"):
        cuda_check((FakeError.cudaErrorInsufficientDriver, None), "cudaGetDeviceCount")
    with pytest.raises(BackendUnavailableError, match=r"cudaGraphLaunch failed: CUDA error cudaErrorLaunchFailure"):
        cuda_check((FakeError.cudaErrorLaunchFailure,), "cudaGraphLaunch")
