"""TensorRT and CUDA availability, shared by the engine build (``export``) and the TensorRT runtime backend: both
import ``tensorrt`` lazily through here, so a machine without it gets one message saying what to install.
No torch: the GPU is found through cuda-python (``cuda.bindings.runtime``)."""

from __future__ import annotations

from .errors import BackendUnavailableError, import_optional

INSTALL_HINT = "pip install -e .[tensorrt] (needs an NVIDIA GPU with a CUDA driver)"


def import_tensorrt():
    """The ``tensorrt`` module, or :class:`BackendUnavailableError` saying what to install."""
    return import_optional("tensorrt", "TensorRT engines", INSTALL_HINT)


def cuda_device_count() -> int:
    """Visible CUDA devices (0 without cuda-python, a driver or a GPU)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return 0
    err, count = cudart.cudaGetDeviceCount()
    return int(count) if err == cudart.cudaError_t.cudaSuccess else 0


def import_tensorrt_gpu():
    """``tensorrt`` when it and an NVIDIA GPU are present; otherwise :class:`BackendUnavailableError` naming what
    is missing."""
    trt = import_tensorrt()
    if cuda_device_count() == 0:
        raise BackendUnavailableError(f"TensorRT engines need an NVIDIA GPU and none is visible: {INSTALL_HINT}")
    return trt


def gpu_identity(device: int = 0) -> tuple[str, tuple[int, int]]:
    """``(name, (major, minor))`` of a CUDA device: what engines are built for and checked against."""
    from cuda.bindings import runtime as cudart

    err, props = cudart.cudaGetDeviceProperties(device)
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendUnavailableError(f"cannot query CUDA device {device}: {cudart.cudaGetErrorString(err)[1]}")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00"), (int(props.major), int(props.minor))
