"""TensorRT and CUDA as the build and the runtime both see them: the one place that imports ``tensorrt`` and
``cuda.bindings.runtime`` (cuda-python), says what to install when they are missing and finds the GPU without torch.

Contract level: standard library only at import time; ``tensorrt`` and cuda-python are imported when a function
here is called, through :func:`importlib.import_module` (so a test can put a stand-in in ``sys.modules``).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .errors import BackendUnavailableError, ConfigError, ResourceError

logger = logging.getLogger(__name__)


INSTALL_HINT = "pip install -e .[tensorrt] (needs an NVIDIA GPU with a CUDA driver)"
CUDA_SUCCESS = 0
CUDA_MEMORY_ERRORS = {2}  # cudaErrorMemoryAllocation
# Errors meaning "no usable GPU or driver here" (insufficient driver, no device, stub library, initialization).
CUDA_NO_GPU_ERRORS = {3, 34, 35, 100, 101}


# --- CUDA runtime (cuda-python) ------------------------------------------------------------------------------------

def import_cudart(what: str = "the tensorrt backend") -> ModuleType:
    """``cuda.bindings.runtime`` (cuda-python >= 12.6), or :class:`BackendUnavailableError` saying what to install."""
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError as e:
        raise BackendUnavailableError(f"{what} needs cuda-python (cuda.bindings.runtime): {INSTALL_HINT}") from e


def cuda_error(err: Any, what: str) -> BackendUnavailableError | ResourceError:
    """The exception for CUDA error ``err`` (a ``cudaError_t``) returned by ``what``: :class:`ResourceError` for an
    allocation failure, :class:`BackendUnavailableError` otherwise (naming the driver when it is the cause)."""
    name = getattr(err, "name", str(err))
    code = int(err)
    if code in CUDA_MEMORY_ERRORS:
        return ResourceError(f"{what}: out of GPU memory ({name}); use a smaller batch, resolution or subject count, "
                             f"turn CUDA graphs off, or free the GPU")
    if code in CUDA_NO_GPU_ERRORS:
        return BackendUnavailableError(f"{what}: no usable NVIDIA GPU and driver ({name}): {INSTALL_HINT}")
    return BackendUnavailableError(f"{what} failed: CUDA error {name} ({code})")


def cuda_check(result: tuple, what: str) -> Any:
    """Unpack a cuda-python result ``(cudaError_t, *values)``: the single value (or a tuple of them, ``None`` when
    there is none) on success; otherwise raise :func:`cuda_error`."""
    err, *values = result
    if int(err) != CUDA_SUCCESS:
        raise cuda_error(err, what)
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device: its index, name, compute capability and total memory (bytes)."""

    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int


def device_count(what: str = "the tensorrt backend") -> int:
    """Number of visible CUDA devices; :class:`BackendUnavailableError` without a usable driver."""
    return int(cuda_check(import_cudart(what).cudaGetDeviceCount(), f"{what}: cudaGetDeviceCount"))


def gpu_info(index: int, what: str = "the tensorrt backend") -> GpuInfo:
    """:class:`GpuInfo` of device ``index`` (which must exist)."""
    rt = import_cudart(what)
    props = cuda_check(rt.cudaGetDeviceProperties(index), f"{what}: cudaGetDeviceProperties({index})")
    name = props.name
    name = name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, bytes) else str(name)
    return GpuInfo(index, name, (int(props.major), int(props.minor)), int(props.totalGlobalMem))


def require_gpu(index: int = 0, what: str = "the tensorrt backend") -> GpuInfo:
    """The :class:`GpuInfo` of device ``index``, or :class:`BackendUnavailableError` naming what is missing
    (cuda-python, a driver, a GPU); :class:`ConfigError` for a device index that does not exist."""
    try:
        count = device_count(what)
    except BackendUnavailableError as e:
        raise BackendUnavailableError(f"{what} needs an NVIDIA GPU with a CUDA driver and none is usable here "
                                      f"({e})") from e
    if count == 0:
        raise BackendUnavailableError(f"{what} needs an NVIDIA GPU and none is visible: {INSTALL_HINT}")
    if not 0 <= index < count:
        raise ConfigError(f"CUDA device {index} does not exist ({count} visible: 0..{count - 1})")
    return gpu_info(index, what)


# --- TensorRT ------------------------------------------------------------------------------------------------------

def import_tensorrt(what: str = "the tensorrt backend") -> ModuleType:
    """The ``tensorrt`` module, or :class:`BackendUnavailableError` saying what to install."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as e:
        raise BackendUnavailableError(f"{what} needs TensorRT: {INSTALL_HINT}") from e


def import_tensorrt_gpu(device: int = 0, what: str = "the tensorrt backend") -> tuple[ModuleType, GpuInfo]:
    """``(tensorrt, GpuInfo of device)`` when TensorRT and that GPU are usable; otherwise
    :class:`BackendUnavailableError` naming what is missing (TensorRT first, then cuda-python, driver, GPU)."""
    trt = import_tensorrt(what)
    return trt, require_gpu(device, what)

