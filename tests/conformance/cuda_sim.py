"""A CUDA runtime simulated in host memory behind the real ``cuda.bindings.runtime`` API (no GPU needed).

:meth:`CudaSim.module` returns a stand-in for ``cuda.bindings.runtime``: its enums, handle types and constants are
the real ones; each function the runtime uses first calls the real function (without a driver it converts and
checks the arguments, then returns ``cudaErrorInsufficientDriver``: a wrong argument raises here as it would on a
GPU) and then does the work on host memory:

- device and pinned allocations are real host buffers (``ctypes``), so copies and memsets move real bytes and a
  fake TensorRT engine can compute on them (:meth:`CudaSim.view`); out-of-bounds copies return
  ``cudaErrorInvalidValue``; asynchronous copies from or to pageable host memory are recorded in ``pageable``;
- streams run their work at once, except while capturing: then work becomes the graph's nodes, and a graph launch
  replays them; synchronizing or allocating while a capture is open fails as CUDA does;
- :meth:`CudaSim.live` lists what was not released (leak checks).

The simulator refuses to start when a real driver answers (it must never hand host addresses to a real GPU).
"""

from __future__ import annotations

import ctypes
import itertools
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

Op = Callable[[], None]


@dataclass
class Alloc:
    buffer: Any
    size: int
    kind: str  # "device" | "pinned"
    device: int


@dataclass
class StreamState:
    device: int
    capture: list[tuple[Op, str]] | None = None


@dataclass
class Device:
    name: str = "NVIDIA H100 80GB HBM3"
    capability: tuple[int, int] = (9, 0)
    total: int = 80 << 30


@dataclass
class CudaSim:
    rt: Any  # the real cuda.bindings.runtime
    devices: list[Device] = field(default_factory=lambda: [Device()])
    current: int = 0
    free_override: int | None = None
    memory: dict[int, Alloc] = field(default_factory=dict)
    streams: dict[int, StreamState] = field(default_factory=dict)
    events: dict[int, int] = field(default_factory=dict)
    graphs: dict[int, list[tuple[Op, str]]] = field(default_factory=dict)
    execs: dict[int, list[tuple[Op, str]]] = field(default_factory=dict)
    pageable: list[str] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)  # descriptions of work executed, in order

    def __post_init__(self) -> None:
        err = self.rt.cudaGetDeviceCount()[0]
        if int(err) == 0:
            raise RuntimeError("a real CUDA driver answers: the simulator must not run here")
        self._ids = itertools.count(0x1000)

    # -- helpers ---------------------------------------------------------------------------------------------------
    def ok(self, *values: Any) -> tuple:
        return (self.rt.cudaError_t.cudaSuccess, *values)

    def err(self, name: str, n_values: int = 0) -> tuple:
        return (getattr(self.rt.cudaError_t, name), *([None] * n_values))

    def capturing(self) -> bool:
        return any(s.capture is not None for s in self.streams.values())

    def find(self, ptr: int, nbytes: int, kinds: tuple[str, ...]) -> Alloc | None:
        """The allocation of ``kinds`` holding ``[ptr, ptr + nbytes)``, or ``None``."""
        for base, alloc in self.memory.items():
            if alloc.kind in kinds and base <= ptr and ptr + nbytes <= base + alloc.size:
                return alloc
        return None

    def view(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A numpy view of device memory at ``ptr`` (must lie inside one device allocation)."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if self.find(ptr, nbytes, ("device",)) is None:
            raise AssertionError(f"device access of {nbytes} bytes at {ptr:#x} is outside every device allocation")
        raw = (ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr)
        return np.frombuffer(raw, np.uint8, count=nbytes).view(dtype).reshape(shape)

    def enqueue(self, stream: Any, op: Op, desc: str) -> tuple:
        sid = int(stream) if stream is not None else 0
        state = self.streams.get(sid)
        if sid and state is None:
            return self.err("cudaErrorInvalidResourceHandle")
        if state is not None and state.capture is not None:
            state.capture.append((op, desc))
        else:
            op()
            self.ops.append(desc)
        return self.ok()

    def live(self) -> dict[str, int]:
        """Resources not released: allocations, streams, events, graphs, graph execs."""
        return {k: v for k, v in {"memory": len(self.memory), "streams": len(self.streams), "events": len(self.events),
                                  "graphs": len(self.graphs), "execs": len(self.execs)}.items() if v}

    # -- device ------------------------------------------------------------------------------------------------------
    def cudaGetDeviceCount(self) -> tuple:
        return self.ok(len(self.devices))

    def cudaGetDevice(self) -> tuple:
        return self.ok(self.current)

    def cudaSetDevice(self, device: int) -> tuple:
        if not 0 <= device < len(self.devices):
            return self.err("cudaErrorInvalidDevice")
        self.current = device
        return self.ok()

    def cudaGetDeviceProperties(self, device: int) -> tuple:
        if not 0 <= device < len(self.devices):
            return self.err("cudaErrorInvalidDevice", 1)
        d = self.devices[device]
        props = self.rt.cudaDeviceProp()
        props.name = d.name.encode().ljust(256, b"\0")
        props.major, props.minor = d.capability
        props.totalGlobalMem = d.total
        return self.ok(props)

    def cudaMemGetInfo(self) -> tuple:
        total = self.devices[self.current].total
        used = sum(a.size for a in self.memory.values() if a.kind == "device" and a.device == self.current)
        free = self.free_override if self.free_override is not None else total - used
        return self.ok(free, total)

    # -- memory ------------------------------------------------------------------------------------------------------
    def _alloc(self, size: int, kind: str) -> tuple:
        if self.capturing():
            return self.err("cudaErrorStreamCaptureUnsupported", 1)
        buf = ctypes.create_string_buffer(max(int(size), 1))
        ptr = ctypes.addressof(buf)
        self.memory[ptr] = Alloc(buf, int(size), kind, self.current)
        return self.ok(ptr)

    def _free(self, ptr: int, kind: str) -> tuple:
        if self.capturing():
            return self.err("cudaErrorStreamCaptureUnsupported")
        alloc = self.memory.get(int(ptr))
        if alloc is None or alloc.kind != kind:
            return self.err("cudaErrorInvalidValue")
        del self.memory[int(ptr)]
        return self.ok()

    def cudaMalloc(self, size: int) -> tuple:
        return self._alloc(size, "device")

    def cudaFree(self, devPtr: int) -> tuple:
        return self._free(devPtr, "device")

    def cudaMallocHost(self, size: int) -> tuple:
        return self._alloc(size, "pinned")

    def cudaFreeHost(self, ptr: int) -> tuple:
        return self._free(ptr, "pinned")

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: Any, stream: Any) -> tuple:
        k = self.rt.cudaMemcpyKind
        dst, src, count = int(dst), int(src), int(count)
        if kind == k.cudaMemcpyHostToDevice:
            ends = ((dst, ("device",)),)
            if self.find(src, count, ("pinned",)) is None:
                self.pageable.append(f"H2D from pageable memory ({count} bytes)")
        elif kind == k.cudaMemcpyDeviceToHost:
            ends = ((src, ("device",)),)
            if self.find(dst, count, ("pinned",)) is None:
                self.pageable.append(f"D2H to pageable memory ({count} bytes)")
        elif kind == k.cudaMemcpyDeviceToDevice:
            ends = ((dst, ("device",)), (src, ("device",)))
        else:
            return self.err("cudaErrorInvalidMemcpyDirection")
        if any(self.find(p, count, kinds) is None for p, kinds in ends):
            return self.err("cudaErrorInvalidValue")
        name = {k.cudaMemcpyHostToDevice: "H2D", k.cudaMemcpyDeviceToHost: "D2H",
                k.cudaMemcpyDeviceToDevice: "D2D"}[kind]
        return self.enqueue(stream, lambda: ctypes.memmove(dst, src, count), f"{name} {count}")

    def cudaMemsetAsync(self, devPtr: int, value: int, count: int, stream: Any) -> tuple:
        ptr, count = int(devPtr), int(count)
        if self.find(ptr, count, ("device",)) is None:
            return self.err("cudaErrorInvalidValue")
        return self.enqueue(stream, lambda: ctypes.memset(ptr, value, count), f"memset {count}")

    # -- streams and events ------------------------------------------------------------------------------------------
    def cudaStreamCreateWithFlags(self, flags: int) -> tuple:
        sid = next(self._ids)
        self.streams[sid] = StreamState(self.current)
        return self.ok(self.rt.cudaStream_t(init_value=sid))

    def cudaStreamDestroy(self, stream: Any) -> tuple:
        state = self.streams.pop(int(stream), None)
        return self.err("cudaErrorInvalidResourceHandle") if state is None else self.ok()

    def cudaStreamSynchronize(self, stream: Any) -> tuple:
        state = self.streams.get(int(stream))
        if state is None:
            return self.err("cudaErrorInvalidResourceHandle")
        if self.capturing():
            return self.err("cudaErrorStreamCaptureUnsupported")
        return self.ok()

    def cudaEventCreateWithFlags(self, flags: int) -> tuple:
        eid = next(self._ids)
        self.events[eid] = 0
        return self.ok(self.rt.cudaEvent_t(init_value=eid))

    def cudaEventRecord(self, event: Any, stream: Any) -> tuple:
        if int(event) not in self.events:
            return self.err("cudaErrorInvalidResourceHandle")
        return self.enqueue(stream, lambda: self.events.__setitem__(int(event), self.events[int(event)] + 1),
                            "event record")

    def cudaEventSynchronize(self, event: Any) -> tuple:
        if int(event) not in self.events:
            return self.err("cudaErrorInvalidResourceHandle")
        if self.capturing():
            return self.err("cudaErrorStreamCaptureUnsupported")
        return self.ok()

    def cudaEventDestroy(self, event: Any) -> tuple:
        return self.ok() if self.events.pop(int(event), None) is not None else self.err(
            "cudaErrorInvalidResourceHandle")

    # -- graphs ------------------------------------------------------------------------------------------------------
    def cudaStreamBeginCapture(self, stream: Any, mode: Any) -> tuple:
        state = self.streams.get(int(stream))
        if state is None or state.capture is not None:
            return self.err("cudaErrorIllegalState")
        state.capture = []
        return self.ok()

    def cudaStreamEndCapture(self, stream: Any) -> tuple:
        state = self.streams.get(int(stream))
        if state is None or state.capture is None:
            return self.err("cudaErrorIllegalState", 1)
        gid = next(self._ids)
        self.graphs[gid], state.capture = state.capture, None
        return self.ok(self.rt.cudaGraph_t(init_value=gid))

    def cudaGraphInstantiate(self, graph: Any, flags: int) -> tuple:
        nodes = self.graphs.get(int(graph))
        if nodes is None:
            return self.err("cudaErrorInvalidValue", 1)
        xid = next(self._ids)
        self.execs[xid] = list(nodes)
        return self.ok(self.rt.cudaGraphExec_t(init_value=xid))

    def cudaGraphLaunch(self, graphExec: Any, stream: Any) -> tuple:
        nodes = self.execs.get(int(graphExec))
        if nodes is None:
            return self.err("cudaErrorInvalidValue")

        def replay() -> None:
            for op, desc in nodes:
                op()
                self.ops.append(f"graph: {desc}")

        return self.enqueue(stream, replay, f"graph launch ({len(nodes)} nodes)")

    def cudaGraphExecDestroy(self, graphExec: Any) -> tuple:
        return self.ok() if self.execs.pop(int(graphExec), None) is not None else self.err("cudaErrorInvalidValue")

    def cudaGraphDestroy(self, graph: Any) -> tuple:
        return self.ok() if self.graphs.pop(int(graph), None) is not None else self.err("cudaErrorInvalidValue")

    # -- the module ----------------------------------------------------------------------------------------------
    def module(self) -> types.ModuleType:
        """A ``cuda.bindings.runtime`` stand-in: real types and enums, simulated functions (checked by calling the
        real ones first); any other function raises ``AssertionError`` naming it (extend the simulator)."""
        mod = types.ModuleType(self.rt.__name__)
        for name in dir(self.rt):
            if name.startswith("__"):
                continue
            value = getattr(self.rt, name)
            if name.startswith("cuda") and callable(value) and not isinstance(value, type):
                mod.__dict__[name] = self._wrap(name, value)
            else:
                mod.__dict__[name] = value
        return mod

    def _wrap(self, name: str, real: Callable) -> Callable:
        sim = getattr(self, name, None)

        def call(*args: Any, **kwargs: Any) -> Any:
            result = real(*args, **kwargs)  # argument conversion and checks of the real binding
            if int(result[0]) == 0:
                raise AssertionError(f"the real {name} succeeded: a driver is present")
            if sim is None:
                raise AssertionError(f"the CUDA simulator lacks {name}, which the code under test calls")
            self.calls.append(name)
            return sim(*args, **kwargs)

        call.__name__ = name
        return call
