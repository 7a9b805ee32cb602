"""CUDA-graph capture/replay of one DiT step per shape bucket with ``torch.cuda.CUDAGraph``, and GPU memory checks,
for the PyTorch backend (:mod:`runtime.torch_backend`; the TensorRT backend captures through cuda-python):

- A captured graph is valid for one set of shapes only, so graphs are keyed by a *bucket* (batch, resolution,
  subject count, ... = the shapes of every input) and kept in a small LRU :class:`GraphCache`.
- Capture follows the known-good recipe: the step runs once uncaptured on a side stream (lazy initialisation of
  cuBLAS/TensorRT happens there), is then captured, and the captured graph is replayed once with its output
  buffer filled with NaN: a graph that does not write its output (an empty capture, e.g. an engine loaded under
  another current device) raises instead of silently returning stale values.
- Every later call copies the new inputs into the graph's static input buffers (device-to-device, asynchronous)
  and replays; nothing in the replay path synchronises with the host.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from dynaip_trt.errors import BackendUnavailableError, ResourceError

logger = logging.getLogger(__name__)

GIB = float(2**30)


def tensor_bytes(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> int:
    """Bytes of a dense tensor of ``shape`` and ``dtype``."""
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def ensure_free_memory(device: torch.device, needed: int, what: str) -> None:
    """Raise :class:`ResourceError` if ``device`` cannot hold ``needed`` more bytes.

    Free memory counts what the driver reports plus what PyTorch's caching allocator holds but does not use.
    """
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if needed > free:
        raise ResourceError(
            f"{what} needs about {needed / GIB:.2f} GiB of GPU memory on {device}, but only {free / GIB:.2f} GiB "
            f"of {total / GIB:.2f} GiB is free; use a smaller batch, resolution or subject count, turn CUDA graphs "
            f"off, or free the GPU"
        )


@dataclass
class CapturedGraph:
    """One captured step: static input buffers, the graph, and its static output buffer.

    Attributes:
        graph: the captured ``torch.cuda.CUDAGraph``.
        inputs: ``{name: static input buffer}``; copy new values into them before ``graph.replay()``.
        output: the static output buffer the graph writes (overwritten by every replay).
    """

    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor


def capture_graph(inputs: dict[str, torch.Tensor], fn: Callable[[], torch.Tensor],
                  stream: torch.cuda.Stream | None = None) -> CapturedGraph:
    """Capture ``fn`` (which reads only ``inputs`` and returns one floating-point output tensor) as a CUDA graph.

    ``inputs`` must already hold the values of the current call: the returned graph has been replayed once, so
    its ``output`` holds this call's result. ``fn`` runs once uncaptured on ``stream`` (a side stream is created
    when ``None``), then is captured on that stream. Raises :class:`BackendUnavailableError` if the captured
    graph does not write its output.
    """
    caller = torch.cuda.current_stream()
    side = stream if stream is not None else torch.cuda.Stream()
    side.wait_stream(caller)
    with torch.cuda.stream(side):
        fn()  # uncaptured warm-up: lazy initialisation must not happen under capture
    caller.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        output = fn()
    output.fill_(float("nan"))
    graph.replay()
    if bool(torch.isnan(output).all()):  # one host sync per capture, never per step
        raise BackendUnavailableError(
            "the captured CUDA graph did not write its output (empty capture: was the model loaded under another "
            "CUDA device?); run with CUDA graphs turned off and report the problem"
        )
    return CapturedGraph(graph, inputs, output)


@dataclass
class GraphCache:
    """LRU cache of :class:`CapturedGraph` by bucket key (at most ``max_graphs``; the oldest is released)."""

    max_graphs: int = 8
    _graphs: OrderedDict[Hashable, CapturedGraph] = field(default_factory=OrderedDict)

    def __len__(self) -> int:
        return len(self._graphs)

    def get(self, key: Hashable) -> CapturedGraph | None:
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
        return graph

    def put(self, key: Hashable, graph: CapturedGraph) -> None:
        self._graphs[key] = graph
        if len(self._graphs) > self.max_graphs:
            old, _ = self._graphs.popitem(last=False)
            logger.info("released the CUDA graph of bucket %s (more than %d buckets)", old, self.max_graphs)

    def clear(self) -> None:
        self._graphs.clear()


def shape_key(feeds: dict[str, torch.Tensor | None]) -> tuple:
    """Bucket key of a call: every input's name and shape (``None`` inputs included as absent)."""
    return tuple((name, None if t is None else tuple(t.shape)) for name, t in sorted(feeds.items()))
