"""TensorRT stages: the engines ``python -m export.build`` lists in a build directory's manifest.

:class:`TrtEngine` is a thin wrapper of one deserialized engine (like TensorRT demo/Diffusion's ``Engine``):
preallocated device buffers per shape (torch CUDA tensors), ``set_input_shape`` / ``set_tensor_address`` /
``execute_async_v3`` on one CUDA stream. :class:`TrtStages` runs the DiT step from a CUDA graph per bucket of
input shapes (one execution context per graph) and everything else directly.

``tensorrt`` is imported lazily; without it (or without a GPU) the backend raises
:class:`~dynaip_trt.errors.BackendUnavailableError` naming what to install. Streams, buffers and graphs come
from torch, so no separate CUDA binding is needed.

The manifest's ``tensorrt`` section must describe the system the engines were built on::

    {"version": "10.8.0.43", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]}

A different TensorRT version or compute capability raises :class:`~dynaip_trt.errors.ManifestError` before any
engine is deserialized; another GPU model of the same compute capability only logs a warning (the engines run,
their tactics may be slower).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dynaip_trt.errors import BackendUnavailableError, ConfigError, InputError, ManifestError
from dynaip_trt.manifest import MODEL_IO, Manifest, check_engine_sources, check_profile, check_tensorrt_section, \
    max_subjects_of, safe_join

from .cuda_graphs import GraphCache, capture_graph, ensure_free_memory, shape_key, stream_scope, tensor_bytes
from .exported import ExportedStages, require_models

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e .[tensorrt] (needs an NVIDIA GPU with a CUDA driver)"


def import_tensorrt():
    """The ``tensorrt`` module, or :class:`BackendUnavailableError` saying what to install."""
    try:
        import tensorrt
    except ImportError as e:
        raise BackendUnavailableError(f"the tensorrt backend needs TensorRT: {INSTALL_HINT}") from e
    return tensorrt


def import_tensorrt_gpu():
    """``tensorrt`` when it and an NVIDIA GPU are present; otherwise :class:`BackendUnavailableError` naming what
    is missing."""
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"the tensorrt backend needs an NVIDIA GPU and none is visible: {INSTALL_HINT}")
    return trt


@dataclass
class Binding:
    """An execution context with input shapes set and device buffers bound to every I/O tensor."""

    context: Any
    buffers: dict[str, torch.Tensor]


class TrtEngine:
    """One deserialized TensorRT engine.

    Args:
        path: the serialized engine file.
        name: its model name in :data:`MODEL_IO` (I/O names are checked against it).
        profile: ``{input: {"min", "opt", "max"}}`` shapes the engine was built for (from the manifest).
        device: the CUDA device to deserialize on (and to run on).
    """

    MAX_BUFFER_SETS = 4  # input shape sets whose buffers stay allocated (uncaptured path, LRU)

    def __init__(self, path: Path, name: str, profile: dict[str, dict[str, list[int]]], device: torch.device):
        self.trt = import_tensorrt()
        self.name, self.path, self.profile, self.device = name, path, profile, device
        self.trt_logger = self.trt.Logger(self.trt.Logger.WARNING)
        with torch.cuda.device(device):
            self.engine = self.trt.Runtime(self.trt_logger).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ManifestError(f"{name}: TensorRT cannot deserialize {path} (corrupt, or built by another TensorRT "
                                f"version); rebuild it with python -m export.build")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = tuple(n for n in names if self.engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT)
        self.outputs = tuple(n for n in names if n not in self.inputs)
        if set(self.inputs) != set(MODEL_IO[name][0]) or set(self.outputs) != set(MODEL_IO[name][1]):
            raise ManifestError(f"{name}: engine {path.name} has inputs {self.inputs} and outputs {self.outputs}; "
                                f"the runtime expects {MODEL_IO[name]}")
        self.dtypes = {n: self._torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self._context = None
        self._buffers: OrderedDict[tuple, Binding] = OrderedDict()

    def _torch_dtype(self, dt) -> torch.dtype:
        trt = self.trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                 trt.int32: torch.int32, trt.int64: torch.int64, trt.int8: torch.int8, trt.uint8: torch.uint8,
                 trt.bool: torch.bool}
        if dt not in table:
            raise ManifestError(f"{self.name}: engine I/O type {dt} has no torch equivalent")
        return table[dt]

    @property
    def context_memory(self) -> int:
        """Device scratch memory one execution context needs (bytes)."""
        size = getattr(self.engine, "device_memory_size_v2", None)  # TensorRT >= 10.1
        return int(self.engine.device_memory_size if size is None else size)

    def new_context(self):
        """A fresh execution context (its scratch memory is checked against free GPU memory first)."""
        ensure_free_memory(self.device, self.context_memory, f"a TensorRT execution context of {self.name}")
        with torch.cuda.device(self.device):
            context = self.engine.create_execution_context()
        if context is None:
            raise BackendUnavailableError(f"{self.name}: TensorRT could not create an execution context")
        return context

    def bind(self, context, shapes: dict[str, tuple[int, ...]]) -> Binding:
        """Set ``shapes`` on ``context``, allocate a buffer for every I/O tensor and bind their addresses."""
        check_profile(self.name, self.profile, shapes)
        for name in self.inputs:
            if not context.set_input_shape(name, shapes[name]):
                raise InputError(f"{self.name}: TensorRT rejected input {name} of shape {list(shapes[name])}")
        all_shapes = dict(shapes)
        for name in self.outputs:
            all_shapes[name] = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in all_shapes[name]):
                raise ManifestError(f"{self.name}: output {name} has unresolved shape {all_shapes[name]}")
        needed = sum(tensor_bytes(s, self.dtypes[n]) for n, s in all_shapes.items())
        ensure_free_memory(self.device, needed, f"{self.name} buffers for shapes {shapes}")
        buffers = {n: torch.empty(s, dtype=self.dtypes[n], device=self.device) for n, s in all_shapes.items()}
        self.set_addresses(context, buffers)
        return Binding(context, buffers)

    @staticmethod
    def set_addresses(context, buffers: dict[str, torch.Tensor]) -> None:
        for name, buf in buffers.items():
            if not context.set_tensor_address(name, buf.data_ptr()):
                raise BackendUnavailableError(f"TensorRT rejected the address of tensor {name}")

    def enqueue(self, binding: Binding) -> None:
        """Enqueue one execution on the current CUDA stream; a failed enqueue (also under capture) raises."""
        if not binding.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise BackendUnavailableError(f"{self.name}: TensorRT execute_async_v3 failed (see the TensorRT log)")

    def load_inputs(self, binding: Binding, feeds: dict[str, torch.Tensor]) -> None:
        """Copy ``feeds`` into the binding's input buffers (cast to the engine's dtypes; asynchronous)."""
        for name in self.inputs:
            binding.buffers[name].copy_(feeds[name], non_blocking=True)

    def run(self, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """One uncaptured execution on the current stream -> outputs in ``MODEL_IO`` order (copies, float32)."""
        shapes = {n: tuple(feeds[n].shape) for n in self.inputs}
        key = tuple(sorted(shapes.items()))
        binding = self._buffers.get(key)
        if self._context is None:
            self._context = self.new_context()
        if binding is None:
            binding = self.bind(self._context, shapes)
            self._buffers[key] = binding
            if len(self._buffers) > self.MAX_BUFFER_SETS:
                self._buffers.popitem(last=False)
        else:
            for name in self.inputs:
                self._context.set_input_shape(name, shapes[name])
            self.set_addresses(self._context, binding.buffers)
        self._buffers.move_to_end(key)
        self.load_inputs(binding, feeds)
        self.enqueue(binding)
        return tuple(binding.buffers[n].to(torch.float32, copy=True) for n in MODEL_IO[self.name][1])


class TrtStages(ExportedStages):
    """:class:`~dynaip_trt.pipeline.Stages` backed by TensorRT engines on one CUDA device and one stream.

    Args:
        directory: build directory whose manifest lists an engine per model (``ModelEntry.engine``).
        manifest: the loaded manifest (read from ``directory`` when ``None``).
        device: CUDA device (``"cuda"`` = the current one).
        cuda_graphs: capture the DiT step once per bucket and replay it (``False``: plain enqueues).
        max_graphs: buckets kept captured at once (each holds an execution context; LRU).
    """

    def __init__(self, directory: str | Path, manifest: Manifest | None = None, device: str | torch.device = "cuda",
                 cuda_graphs: bool = True, max_graphs: int = 4):
        trt = import_tensorrt_gpu()
        device = torch.device(device)
        if device.type != "cuda":
            raise ConfigError(f"the tensorrt backend runs on a CUDA device, not {device}")
        self.device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        self.directory = Path(directory)
        self.manifest = manifest or Manifest.load(directory)
        require_models(self.manifest, directory)
        check_tensorrt_section(self.manifest.tensorrt, trt.__version__, torch.cuda.get_device_name(self.device),
                               torch.cuda.get_device_capability(self.device), directory)
        check_engine_sources(self.manifest, directory)
        for name in MODEL_IO:
            entry = self.manifest.models[name]
            if not entry.engine:
                raise ManifestError(f"{directory}: model {name} has no TensorRT engine; run python -m export.build")
            if entry.engine not in entry.files:
                raise ManifestError(f"{directory}: engine {entry.engine} has no hash in the manifest; rebuild it")
        self.manifest.verify(directory, list(MODEL_IO))
        self.max_subjects = max_subjects_of(self.manifest)
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(self.device)
            self.engines = {name: TrtEngine(safe_join(directory, self.manifest.models[name].engine), name,
                                            self.manifest.models[name].profile, self.device) for name in MODEL_IO}
        self.graphs = GraphCache(max_graphs) if cuda_graphs else None
        logger.info("tensorrt %s: loaded %s from %s on %s (CUDA graphs %s)", trt.__version__, sorted(self.engines),
                    directory, torch.cuda.get_device_name(self.device), "on" if cuda_graphs else "off")

    def run(self, model: str, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with stream_scope(self.device, self.stream) as caller:
            if model == "dit" and self.graphs is not None:
                outputs = (self._dit_graph(feeds),)
            else:
                outputs = self.engines[model].run(feeds)
            if caller != self.stream:
                for out in outputs:
                    out.record_stream(caller)
        return outputs

    def _dit_graph(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """Replay (capturing first if needed) the DiT graph of this bucket -> velocity ``[B, N, 64]`` (a copy)."""
        engine = self.engines["dit"]
        key = shape_key(feeds)
        graph = self.graphs.get(key)
        if graph is not None:
            return graph.replay(feeds).to(torch.float32, copy=True)
        binding = engine.bind(engine.new_context(), {n: tuple(feeds[n].shape) for n in engine.inputs})
        engine.load_inputs(binding, feeds)
        output = binding.buffers[MODEL_IO["dit"][1][0]]

        def step() -> torch.Tensor:
            engine.enqueue(binding)
            return output

        graph = capture_graph({n: binding.buffers[n] for n in engine.inputs}, step, self.stream, keepalive=binding)
        self.graphs.put(key, graph)
        logger.info("captured the TensorRT DiT step for bucket %s (%d bucket(s) cached)", key, len(self.graphs))
        return graph.output.to(torch.float32, copy=True)
