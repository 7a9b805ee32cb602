"""A thin, typed layer over cuda-python's runtime API (``cuda.bindings.runtime``) for the TensorRT backend: devices,
streams, events, device and pinned host buffers, asynchronous copies and CUDA graphs. No torch.

Every call goes through :func:`~dynaip_trt.tensorrt_api.cuda_check`: a failed call raises one clear
:class:`~dynaip_trt.errors.BackendUnavailableError` (or :class:`~dynaip_trt.errors.ResourceError` when out of
memory) naming the call and the CUDA error. Memory is released by ``close()`` or, failing that, when the Python
object is collected (:func:`weakref.finalize`; errors at that point are ignored).

Copies between the host and the device are asynchronous on a :class:`Stream` and go through pinned
(page-locked) :class:`HostBuffer` staging, which the caller must keep unchanged until the stream has passed the
copy (an :class:`Event`, or :meth:`Stream.synchronize`).
"""

from __future__ import annotations

import ctypes
import math
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np

from dynaip_trt.errors import ResourceError
from dynaip_trt.tensorrt_api import GpuInfo, cuda_check, device_count, gpu_info, import_cudart, require_gpu

__all__ = ["CudaGraph", "DeviceBuffer", "Event", "GpuInfo", "HostBuffer", "Stream", "current_device", "device_count",
           "device_scope", "ensure_free_memory", "gpu_info", "mem_get_info", "require_gpu", "set_device"]

GIB = float(2**30)


def _rt():
    return import_cudart()


def current_device() -> int:
    """Index of the calling thread's current CUDA device."""
    return int(cuda_check(_rt().cudaGetDevice(), "cudaGetDevice"))


def set_device(index: int) -> None:
    """Make device ``index`` current for the calling thread."""
    cuda_check(_rt().cudaSetDevice(index), f"cudaSetDevice({index})")


@contextmanager
def device_scope(index: int) -> Iterator[None]:
    """Run the block with device ``index`` current (restoring the previous device afterwards): engines are
    deserialized, execution contexts created and graphs captured under one current device."""
    previous = current_device()
    if previous != index:
        set_device(index)
    try:
        yield
    finally:
        if previous != index:
            set_device(previous)


def mem_get_info() -> tuple[int, int]:
    """``(free, total)`` bytes of the current device."""
    free, total = cuda_check(_rt().cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)


def ensure_free_memory(needed: int, what: str) -> None:
    """Raise :class:`ResourceError` when the current device cannot hold ``needed`` more bytes."""
    free, total = mem_get_info()
    if needed > free:
        raise ResourceError(
            f"{what} needs about {needed / GIB:.2f} GiB of GPU memory, but only {free / GIB:.2f} GiB of "
            f"{total / GIB:.2f} GiB is free; use a smaller batch, resolution or subject count, turn CUDA graphs off, "
            f"or free the GPU")


def _release(free: Callable[[Any], tuple], handle: Any) -> None:
    """Finalizer: release a CUDA resource, ignoring errors (the process may be shutting down)."""
    try:
        free(handle)
    except Exception:  # noqa: BLE001 - nothing can be done about a failed release at collection time
        pass


class Stream:
    """A non-blocking CUDA stream (it does not synchronize with the legacy default stream)."""

    def __init__(self) -> None:
        rt = _rt()
        self.handle = cuda_check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        self._finalizer = weakref.finalize(self, _release, rt.cudaStreamDestroy, self.handle)

    def __int__(self) -> int:
        """The ``cudaStream_t`` as an integer (what TensorRT's ``execute_async_v3`` takes)."""
        return int(self.handle)

    def synchronize(self) -> None:
        """Block the host until all work enqueued on this stream has finished."""
        cuda_check(_rt().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        self._finalizer()


class Event:
    """A CUDA event without timing: marks a point of a stream the host can wait for."""

    def __init__(self) -> None:
        rt = _rt()
        self.handle = cuda_check(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming), "cudaEventCreateWithFlags")
        self._finalizer = weakref.finalize(self, _release, rt.cudaEventDestroy, self.handle)

    def record(self, stream: Stream) -> None:
        cuda_check(_rt().cudaEventRecord(self.handle, stream.handle), "cudaEventRecord")

    def synchronize(self) -> None:
        """Block the host until the stream has passed the last :meth:`record`."""
        cuda_check(_rt().cudaEventSynchronize(self.handle), "cudaEventSynchronize")

    def close(self) -> None:
        self._finalizer()


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


class HostBuffer:
    """Pinned (page-locked) host memory of ``shape`` and ``dtype``, viewed as a numpy array (:attr:`array`)."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | type) -> None:
        rt = _rt()
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        self.nbytes = _nbytes(self.shape, self.dtype)
        self.ptr = int(cuda_check(rt.cudaMallocHost(max(self.nbytes, 1)),
                                  f"cudaMallocHost({self.nbytes} bytes of pinned host memory)"))
        self._finalizer = weakref.finalize(self, _release, rt.cudaFreeHost, self.ptr)
        raw = (ctypes.c_uint8 * max(self.nbytes, 1)).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=np.uint8, count=self.nbytes).view(self.dtype).reshape(self.shape)

    def close(self) -> None:
        self.array = None
        self._finalizer()


class DeviceBuffer:
    """Device memory of ``shape`` and ``dtype`` (``cudaMalloc``); copies are asynchronous on a :class:`Stream`."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | type) -> None:
        rt = _rt()
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        self.nbytes = _nbytes(self.shape, self.dtype)
        self.ptr = int(cuda_check(rt.cudaMalloc(max(self.nbytes, 1)), f"cudaMalloc({self.nbytes} bytes)"))
        self._finalizer = weakref.finalize(self, _release, rt.cudaFree, self.ptr)

    def _copy(self, dst: int, src: int, kind: str, stream: Stream, nbytes: int | None = None) -> None:
        rt = _rt()
        count = self.nbytes if nbytes is None else nbytes
        cuda_check(rt.cudaMemcpyAsync(dst, src, count, getattr(rt.cudaMemcpyKind, kind), stream.handle),
                   f"cudaMemcpyAsync ({kind}, {count} bytes)")

    def _check_match(self, other: HostBuffer | DeviceBuffer) -> None:
        if other.nbytes != self.nbytes:
            raise ValueError(f"buffer sizes differ: {other.shape} {other.dtype} vs {self.shape} {self.dtype}")

    def copy_from_host(self, host: HostBuffer, stream: Stream) -> None:
        """Enqueue ``host`` (pinned, same size) -> this buffer."""
        self._check_match(host)
        self._copy(self.ptr, host.ptr, "cudaMemcpyHostToDevice", stream)

    def copy_to_host(self, host: HostBuffer, stream: Stream) -> None:
        """Enqueue this buffer -> ``host`` (pinned, same size); valid on the host after the stream passes it."""
        self._check_match(host)
        self._copy(host.ptr, self.ptr, "cudaMemcpyDeviceToHost", stream)

    def copy_from(self, src: DeviceBuffer, stream: Stream) -> None:
        """Enqueue ``src`` (device, same size) -> this buffer."""
        self._check_match(src)
        self._copy(self.ptr, src.ptr, "cudaMemcpyDeviceToDevice", stream)

    def fill_bytes(self, value: int, stream: Stream) -> None:
        """Enqueue setting every byte to ``value`` (0xFF makes every float16/bfloat16/float32 element a NaN)."""
        cuda_check(_rt().cudaMemsetAsync(self.ptr, value, self.nbytes, stream.handle), "cudaMemsetAsync")

    def close(self) -> None:
        self._finalizer()


class CudaGraph:
    """An instantiated CUDA graph captured from the work ``record`` enqueues on ``stream``.

    Capture uses thread-local mode: other threads may keep using CUDA meanwhile. ``record`` must only enqueue work on
    ``stream`` (no synchronization, no allocation). The capture is always ended, also when ``record`` raises (the
    stream is never left capturing).
    """

    def __init__(self, stream: Stream, record: Callable[[], None]) -> None:
        rt = _rt()
        cuda_check(rt.cudaStreamBeginCapture(stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
                   "cudaStreamBeginCapture")
        try:
            record()
        except BaseException:
            err, *partial = rt.cudaStreamEndCapture(stream.handle)  # leave the stream usable, drop the partial graph
            if int(err) == 0 and partial and partial[0] is not None:
                _release(rt.cudaGraphDestroy, partial[0])
            raise
        self.graph = cuda_check(rt.cudaStreamEndCapture(stream.handle), "cudaStreamEndCapture")
        self._graph_finalizer = weakref.finalize(self, _release, rt.cudaGraphDestroy, self.graph)
        self.exec = cuda_check(rt.cudaGraphInstantiate(self.graph, 0), "cudaGraphInstantiate")
        self._exec_finalizer = weakref.finalize(self, _release, rt.cudaGraphExecDestroy, self.exec)

    def launch(self, stream: Stream) -> None:
        """Enqueue one replay of the graph on ``stream``."""
        cuda_check(_rt().cudaGraphLaunch(self.exec, stream.handle), "cudaGraphLaunch")

    def close(self) -> None:
        self._exec_finalizer()
        self._graph_finalizer()
