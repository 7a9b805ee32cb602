"""The TensorRT contract (``dynaip_trt/tensorrt_api.py``): install hints, CUDA error mapping. The calls into the real
bindings are tested in ``tests/test_tensorrt_conformance.py``."""

from __future__ import annotations

import enum
import sys

import pytest

from dynaip_trt.errors import BackendUnavailableError, ResourceError
from dynaip_trt.tensorrt_api import cuda_check, import_tensorrt


def test_without_tensorrt_the_message_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match=r"building needs TensorRT: pip install -e \.\[tensorrt\]"):
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
