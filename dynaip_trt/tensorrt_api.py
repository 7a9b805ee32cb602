"""TensorRT and CUDA as the build and the runtime both see them: the one place that imports ``tensorrt`` (or
``tensorrt_lean``) and ``cuda.bindings.runtime`` (cuda-python), says what to install when they are missing, finds
the GPU without torch, holds the process's single TensorRT logger and knows the supported TensorRT versions.

Contract level: standard library only at import time; ``tensorrt`` and cuda-python are imported when a function
here is called, through :func:`importlib.import_module` (so a test can put a stand-in in ``sys.modules``).

Supported TensorRT lines (each checked against the real Python bindings in CI, ``tests/test_tensorrt_conformance.py``):

    TensorRT      CUDA driver    extra                      cuda-python
    10.8 - 10.x   12.x           pip install .[tensorrt-cu12]   12.6 - 12.x
    11.0 - 11.x   13.x           pip install .[tensorrt-cu13]   13.x

TensorRT keeps one logger per process: the first ``ILogger`` handed to a builder or runtime is the one it uses. So
every builder, parser and runtime of this package gets :func:`tensorrt_logger`, which forwards TensorRT's messages
to the ``tensorrt`` Python logger (``--verbose`` sets that logger to DEBUG, where TensorRT's INFO and VERBOSE
messages go).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .errors import BackendUnavailableError, ConfigError, ResourceError

logger = logging.getLogger(__name__)
trt_log = logging.getLogger("tensorrt")  # where TensorRT's own messages go


@dataclass(frozen=True)
class TensorRTLine:
    """One supported TensorRT major version and what it needs."""

    major: int
    minimum: tuple[int, int]  # oldest supported (major, minor)
    cuda: int  # CUDA major version of its wheels (and of the matching cuda-python)
    extra: str  # the pyproject extra that installs it

    def describe(self) -> str:
        return f"TensorRT {self.minimum[0]}.{self.minimum[1]}-{self.major}.x with CUDA {self.cuda} (.[{self.extra}])"


SUPPORTED = (TensorRTLine(10, (10, 8), 12, "tensorrt-cu12"), TensorRTLine(11, (11, 0), 13, "tensorrt-cu13"))
INSTALL_HINT = ("pip install -e .[tensorrt-cu12] (TensorRT 10.x, CUDA 12 driver) or pip install -e .[tensorrt-cu13] "
                "(TensorRT 11.x, CUDA 13 driver), on a machine with an NVIDIA GPU")
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


def cuda_device_count() -> int:
    """Visible CUDA devices, 0 without cuda-python, a driver or a GPU (a probe that never raises)."""
    try:
        return device_count()
    except BackendUnavailableError:
        return 0


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

def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.8.0.43"`` -> ``(10, 8, 0, 43)`` (non-numeric parts end the tuple)."""
    out = []
    for part in version.split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)


def supported_line(version: str) -> TensorRTLine | None:
    """The :data:`SUPPORTED` line TensorRT ``version`` belongs to, or ``None``."""
    v = version_tuple(version)
    for line in SUPPORTED:
        if v[:1] == (line.major,) and v[:2] >= line.minimum:
            return line
    return None


def check_version(trt: ModuleType, what: str) -> TensorRTLine:
    """The supported line of the imported TensorRT module; :class:`BackendUnavailableError` for other versions.
    Warns when cuda-python's major version is not the one this TensorRT line is built for."""
    version = str(getattr(trt, "__version__", "?"))
    line = supported_line(version)
    if line is None:
        ranges = "; ".join(ln.describe() for ln in SUPPORTED)
        raise BackendUnavailableError(f"{what} supports {ranges}, but TensorRT {version} is installed: "
                                      f"{INSTALL_HINT}")
    try:
        bindings = importlib.import_module("cuda.bindings")
    except ImportError:
        return line
    cuda_major = version_tuple(str(getattr(bindings, "__version__", "")))[:1]
    if cuda_major and cuda_major != (line.cuda,):
        logger.warning("TensorRT %s is built for CUDA %d but cuda-python %s is installed; install the matching "
                       "cuda-python (pip install -e .[%s])", version, line.cuda, bindings.__version__, line.extra)
    return line


def import_tensorrt(what: str = "the tensorrt backend", lean: bool = False) -> ModuleType:
    """The ``tensorrt`` module (a supported version), or :class:`BackendUnavailableError` saying what to install.

    ``lean``: fall back to the lean runtime ``tensorrt_lean`` (pip ``tensorrt-lean-cu12``/``-cu13``) when the full
    ``tensorrt`` is absent; it runs only engines built version-compatible (``export.build --version-compatible``).
    """
    names = ("tensorrt", "tensorrt_lean") if lean else ("tensorrt",)
    for name in names:
        try:
            trt = importlib.import_module(name)
        except ImportError:
            continue
        check_version(trt, what)
        return trt
    raise BackendUnavailableError(f"{what} needs TensorRT: {INSTALL_HINT}")


def import_tensorrt_gpu(device: int = 0, what: str = "the tensorrt backend", lean: bool = False
                        ) -> tuple[ModuleType, GpuInfo]:
    """``(tensorrt, GpuInfo of device)`` when TensorRT and that GPU are usable; otherwise
    :class:`BackendUnavailableError` naming what is missing (TensorRT first, then cuda-python, driver, GPU)."""
    trt = import_tensorrt(what, lean)
    return trt, require_gpu(device, what)


def is_lean(trt: ModuleType) -> bool:
    """Whether ``trt`` is a lean (runtime-only) TensorRT module."""
    return trt.__name__.split(".")[0] == "tensorrt_lean" or not hasattr(trt, "Builder")


_LOGGERS: dict[str, Any] = {}


def tensorrt_logger(trt: ModuleType) -> Any:
    """The process's one TensorRT logger for module ``trt`` (an ``ILogger`` forwarding to the ``tensorrt`` Python
    logger: INTERNAL_ERROR/ERROR -> error, WARNING -> warning, INFO and VERBOSE -> debug).

    Every builder, ONNX parser and runtime gets this object, so raising the Python logger's level (``--verbose``)
    takes effect whichever of them TensorRT created first."""
    key = trt.__name__
    if key not in _LOGGERS:
        severity = trt.ILogger.Severity
        levels = {severity.INTERNAL_ERROR: logging.ERROR, severity.ERROR: logging.ERROR,
                  severity.WARNING: logging.WARNING, severity.INFO: logging.DEBUG, severity.VERBOSE: logging.DEBUG}

        class PythonLogger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, sev: Any, msg: str) -> None:
                level = levels.get(sev, logging.INFO)
                if trt_log.isEnabledFor(level):
                    trt_log.log(level, "%s", msg)

        _LOGGERS[key] = PythonLogger()
    return _LOGGERS[key]
