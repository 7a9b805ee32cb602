"""TensorRT stages: the engines ``python -m export.build`` lists in a build directory's manifest, run with
cuda-python (:mod:`runtime.cuda`); no torch.

- :class:`TrtEngine` is a thin wrapper of one deserialized engine (like TensorRT demo/Diffusion's ``Engine``): I/O
  discovered with ``num_io_tensors`` / ``get_tensor_name`` / ``get_tensor_mode`` / ``get_tensor_dtype`` and checked
  against :data:`~dynaip_trt.manifest.MODEL_IO`; per set of input shapes a :class:`Binding` (``set_input_shape``,
  one device buffer per I/O tensor bound with ``set_tensor_address``, pinned host staging); ``execute_async_v3``
  on one stream.
- :class:`TrtStages` runs every model but the DiT once per call (:meth:`TrtStages.run`: host arrays in and out).
  The denoising loop is a :class:`TrtDenoiseSession`: the latents stay on the device, and a step copies only
  ``timestep``/``timestep_next`` in and launches one CUDA graph per bucket of input shapes (an LRU of
  ``max_graphs``, one execution context each) that captured ``execute_async_v3`` plus the device-to-device copy
  ``latents_next -> latents`` (the DiT graph contains the Euler step). With true CFG the DiT runs the ``2B`` rows
  (the rows, then their negative rows) and its ``velocity`` comes back each step for the guided Euler step on the
  host (as the ONNX Runtime backend does); the graph then captures the enqueue alone. DBIM's mixing steps run the
  ``dit_dbim`` engine (built with ``python -m export.build --dbim``) with its own buckets and CUDA graphs, then the
  plain DiT's (:class:`~runtime.stages.DBIMDenoiseSession`).

Capture follows the known-good recipe: one uncaptured enqueue first (TensorRT's lazy initialization must not happen
under capture), ``execute_async_v3``'s result checked under capture, engines deserialized and contexts created and
captured under one current device, and the first replay of every graph runs with its output filled with NaN bytes:
an empty graph (the failure mode of an engine loaded under another current device) raises instead of silently
returning stale latents.

Host I/O types: float32, float16, int32, int64, bool and bfloat16 (numpy has none: its bits travel as uint16,
rounded to nearest even on the way in). Outputs come back as float32.

``tensorrt`` and cuda-python are imported when :class:`TrtStages` is created; without them (or without a GPU) it
raises :class:`~dynaip_trt.errors.BackendUnavailableError` naming what to install. The lean runtime
(``tensorrt_lean``) is used when the full ``tensorrt`` is not installed, for engines built with
``python -m export.build --version-compatible``. The manifest's ``tensorrt`` section must describe the system the
engines were built on (:func:`~dynaip_trt.manifest.check_tensorrt_section`)::

    {"version": "10.8.0.43", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0], ...}
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from dynaip_trt.conditioning import DiTCondition, dit_feeds
from dynaip_trt.errors import BackendUnavailableError, ConfigError, InputError, ManifestError
from dynaip_trt.manifest import (MODEL_IO, Manifest, check_engine_sources, check_profile, check_tensorrt_section,
                                 safe_join)
from dynaip_trt.sampling import euler_step, true_cfg_velocity
from dynaip_trt.tensorrt_api import import_tensorrt_gpu, is_lean, tensorrt_logger

import runtime.cuda as cuda
from .exported import ExportedStages
from .sampler import TEXT_BRANCH_MESSAGE

logger = logging.getLogger(__name__)

# The DiT tensors a denoising session moves (names of MODEL_IO["dit"]; checked when a session starts).
DIT_LATENTS, DIT_LATENTS_NEXT, DIT_TIMESTEPS = "latents", "latents_next", ("timestep", "timestep_next")
DIT_VELOCITY = "velocity"

# Host (numpy) storage of each TensorRT I/O type, by DataType name. numpy has no bfloat16: its bits travel as uint16.
HOST_DTYPES: dict[str, np.dtype] = {"FLOAT": np.dtype(np.float32), "HALF": np.dtype(np.float16),
                                    "BF16": np.dtype(np.uint16), "INT32": np.dtype(np.int32),
                                    "INT64": np.dtype(np.int64), "BOOL": np.dtype(np.bool_)}


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even; NaN stays a (quiet) NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_host_storage(array: np.ndarray, kind: str) -> np.ndarray:
    """``array`` as the host storage of TensorRT type ``kind`` (see :data:`HOST_DTYPES`)."""
    if kind == "BF16":
        return float32_to_bfloat16_bits(np.asarray(array, dtype=np.float32))
    return np.asarray(array, dtype=HOST_DTYPES[kind])


def from_host_storage(raw: np.ndarray, kind: str) -> np.ndarray:
    """A float32 copy of host storage ``raw`` of TensorRT type ``kind``."""
    if kind == "BF16":
        return bfloat16_bits_to_float32(raw)
    return np.array(raw, dtype=np.float32)


@dataclass
class Binding:
    """An execution context with input shapes set, a device buffer per I/O tensor bound to it, and pinned host
    staging of the same sizes.

    Attributes:
        context: the ``IExecutionContext``; shapes: every I/O tensor's shape (outputs resolved by TensorRT).
        device: ``{tensor: DeviceBuffer}``; host: ``{tensor: HostBuffer}`` (pinned, in the engine's I/O types).
    """

    context: Any
    shapes: dict[str, tuple[int, ...]]
    device: dict[str, cuda.DeviceBuffer]
    host: dict[str, cuda.HostBuffer]

    def close(self) -> None:
        for buf in [*self.device.values(), *self.host.values()]:
            buf.close()
        self.device, self.host = {}, {}


def shape_key(shapes: dict[str, tuple[int, ...]]) -> tuple:
    """Bucket key of a call: every input's name and shape."""
    return tuple(sorted((n, tuple(int(d) for d in s)) for n, s in shapes.items()))


class TrtEngine:
    """One deserialized TensorRT engine of model ``name`` (:data:`MODEL_IO`), used on the current CUDA device.

    Args:
        trt: the TensorRT module; runtime: its ``Runtime`` (shared by the engines of a build).
        path: the serialized engine; name: the model; profile: ``{input: {"min", "opt", "max"}}`` from the manifest.
    """

    MAX_BUFFER_SETS = 4  # input shape sets whose buffers stay allocated for run() (LRU)

    def __init__(self, trt: ModuleType, runtime: Any, path: Path, name: str, profile: dict[str, dict[str, list[int]]]):
        self.trt, self.name, self.path, self.profile = trt, name, path, profile
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ManifestError(f"{name}: TensorRT cannot deserialize {path} (corrupt, built by another TensorRT "
                                f"version or for another GPU; see the TensorRT log); rebuild it with "
                                f"python -m export.build")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode
        self.inputs = tuple(n for n in names if self.engine.get_tensor_mode(n) == mode.INPUT)
        self.outputs = tuple(n for n in names if self.engine.get_tensor_mode(n) == mode.OUTPUT)
        if set(self.inputs) != set(MODEL_IO[name][0]) or set(self.outputs) != set(MODEL_IO[name][1]):
            raise ManifestError(f"{name}: engine {path.name} has inputs {list(self.inputs)} and outputs "
                                f"{list(self.outputs)}; this runtime expects {MODEL_IO[name]}: rebuild the engines "
                                f"from a fresh export")
        self.kinds = {n: self.engine.get_tensor_dtype(n).name for n in names}
        unsupported = {n: k for n, k in self.kinds.items() if k not in HOST_DTYPES}
        if unsupported:
            raise ManifestError(f"{name}: engine {path.name} has I/O types {unsupported} the runtime cannot feed "
                                f"(supported: {sorted(HOST_DTYPES)})")
        self._context: Any = None
        self._bindings: OrderedDict[tuple, Binding] = OrderedDict()

    @property
    def context_memory(self) -> int:
        """Device scratch memory one execution context needs (bytes)."""
        if hasattr(self.engine, "device_memory_size_v2"):  # TensorRT >= 10.1 (the only one in 11.x)
            return int(self.engine.device_memory_size_v2)
        return int(self.engine.device_memory_size)

    def new_context(self) -> Any:
        """A fresh execution context (its scratch memory is checked against free GPU memory first)."""
        cuda.ensure_free_memory(self.context_memory, f"a TensorRT execution context of {self.name}")
        context = self.engine.create_execution_context()
        if context is None:
            raise BackendUnavailableError(f"{self.name}: TensorRT could not create an execution context (see the "
                                          f"TensorRT log)")
        return context

    def shared_context(self) -> Any:
        """The engine's context for uncaptured executions (created on first use)."""
        if self._context is None:
            self._context = self.new_context()
        return self._context

    def set_shapes(self, context: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Set the input ``shapes`` on ``context`` -> the shapes of every I/O tensor (outputs resolved)."""
        check_profile(self.name, self.profile, shapes)
        for name in self.inputs:
            if not context.set_input_shape(name, tuple(int(d) for d in shapes[name])):
                raise InputError(f"{self.name}: TensorRT rejected input {name} of shape {list(shapes[name])} (see "
                                 f"the TensorRT log)")
        resolved = {n: tuple(int(d) for d in shapes[n]) for n in self.inputs}
        for name in self.outputs:
            resolved[name] = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in resolved[name]):
                raise ManifestError(f"{self.name}: output {name} has unresolved shape {list(resolved[name])}")
        return resolved

    def bind(self, context: Any, shapes: dict[str, tuple[int, ...]]) -> Binding:
        """Set ``shapes`` on ``context``, allocate a device buffer and pinned staging per I/O tensor, bind them."""
        resolved = self.set_shapes(context, shapes)
        dtypes = {n: HOST_DTYPES[self.kinds[n]] for n in resolved}
        needed = sum(math.prod(s) * dtypes[n].itemsize for n, s in resolved.items())
        cuda.ensure_free_memory(needed, f"{self.name} buffers for input shapes {shapes}")
        binding = Binding(context, resolved, {}, {})
        try:
            for n, s in resolved.items():
                binding.device[n] = cuda.DeviceBuffer(s, dtypes[n])
                binding.host[n] = cuda.HostBuffer(s, dtypes[n])
            self.set_addresses(binding)
        except BaseException:
            binding.close()
            raise
        return binding

    def set_addresses(self, binding: Binding) -> None:
        """Point every I/O tensor of ``binding.context`` at its device buffer."""
        for name, buf in binding.device.items():
            if not binding.context.set_tensor_address(name, buf.ptr):
                raise BackendUnavailableError(f"{self.name}: TensorRT rejected the address of tensor {name}")

    def rebind(self, binding: Binding) -> None:
        """Re-apply ``binding``'s input shapes and addresses to its context (after another binding used it)."""
        self.set_shapes(binding.context, {n: binding.shapes[n] for n in self.inputs})
        self.set_addresses(binding)

    def load(self, binding: Binding, feeds: dict[str, np.ndarray], stream: cuda.Stream) -> None:
        """Enqueue host ``feeds`` -> the binding's input buffers (through its pinned staging, converted to the
        engine's I/O types). The staging must be free: the stream has passed the previous copies out of it."""
        for name, value in feeds.items():
            value = np.asarray(value)
            if tuple(value.shape) != binding.shapes[name]:
                raise InputError(f"{self.name}: input {name} has shape {list(value.shape)}, the bound buffer "
                                 f"{list(binding.shapes[name])}")
            binding.host[name].array[...] = to_host_storage(value, self.kinds[name])
            binding.device[name].copy_from_host(binding.host[name], stream)

    def read(self, binding: Binding, names: tuple[str, ...], stream: cuda.Stream) -> dict[str, np.ndarray]:
        """Copy tensors ``names`` of ``binding`` to the host (waits for the stream) -> float32 copies."""
        for name in names:
            binding.device[name].copy_to_host(binding.host[name], stream)
        stream.synchronize()
        return {n: from_host_storage(binding.host[n].array, self.kinds[n]) for n in names}

    def enqueue(self, binding: Binding, stream: cuda.Stream) -> None:
        """Enqueue one execution on ``stream``; a failed enqueue (also under capture) raises."""
        if not binding.context.execute_async_v3(int(stream)):
            raise BackendUnavailableError(f"{self.name}: TensorRT execute_async_v3 failed (see the TensorRT log)")

    def run(self, feeds: dict[str, np.ndarray], stream: cuda.Stream) -> dict[str, np.ndarray]:
        """One uncaptured execution of host ``feeds`` (every input) -> ``{output: float32 array}``. Buffers stay
        allocated per set of input shapes (LRU of :attr:`MAX_BUFFER_SETS`)."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise InputError(f"{self.name}: inputs {missing} are missing (it takes {list(self.inputs)})")
        shapes = {n: tuple(np.shape(feeds[n])) for n in self.inputs}
        key = shape_key(shapes)
        context = self.shared_context()
        binding = self._bindings.get(key)
        if binding is None:
            binding = self._bindings[key] = self.bind(context, shapes)
            if len(self._bindings) > self.MAX_BUFFER_SETS:
                self._bindings.popitem(last=False)[1].close()
        else:
            self.rebind(binding)
        self._bindings.move_to_end(key)
        self.load(binding, {n: feeds[n] for n in self.inputs}, stream)
        self.enqueue(binding, stream)
        return self.read(binding, self.outputs, stream)

    def close(self) -> None:
        for binding in self._bindings.values():
            binding.close()
        self._bindings.clear()
        self._context = None


@dataclass
class DitBucket:
    """The DiT state of one bucket of input shapes: a binding (its own execution context when CUDA graphs are on)
    and the CUDA graph of one step, checked on its first replay."""

    binding: Binding
    graph: cuda.CudaGraph | None = None
    checked: bool = False
    closed: bool = field(default=False)

    def close(self) -> None:
        if self.graph is not None:
            self.graph.close()
        self.binding.close()
        self.closed = True


@dataclass
class StagingRing:
    """Pinned staging slots for the per-step timestep copies of batch size ``B``: a slot is reused only after the
    stream has passed the copies out of it (its event), so the host waits only when it is ``len(slots)`` steps
    ahead of the GPU."""

    slots: list[dict[str, cuda.HostBuffer]]
    events: list[cuda.Event]
    pending: list[bool]
    position: int = 0

    @classmethod
    def create(cls, batch: int, kinds: dict[str, str], size: int = 8) -> StagingRing:
        slots = [{n: cuda.HostBuffer((batch,), HOST_DTYPES[k]) for n, k in kinds.items()} for _ in range(size)]
        return cls(slots, [cuda.Event() for _ in range(size)], [False] * size)

    def next(self) -> tuple[dict[str, cuda.HostBuffer], cuda.Event]:
        """The next free slot and the event to record once its copies are enqueued."""
        i = self.position % len(self.slots)
        self.position += 1
        if self.pending[i]:
            self.events[i].synchronize()
        self.pending[i] = True
        return self.slots[i], self.events[i]

    def close(self) -> None:
        for slot in self.slots:
            for buf in slot.values():
                buf.close()
        for event in self.events:
            event.close()


class TrtStages(ExportedStages):
    """The runtime stages on TensorRT engines, one CUDA device and one stream.

    Args:
        directory: build directory whose manifest lists an engine per model (``ModelEntry.engine``).
        manifest: the loaded manifest (read from ``directory`` when ``None``).
        device: CUDA device index.
        cuda_graphs: replay each denoising step from a CUDA graph per bucket (``False``: plain enqueues).
        max_graphs: DiT buckets kept at once (each holds an execution context, buffers and a graph; LRU).
    """

    backend = "tensorrt"

    def __init__(self, directory: str | Path, manifest: Manifest | None = None, device: int = 0,
                 cuda_graphs: bool = True, max_graphs: int = 4) -> None:
        trt, gpu = import_tensorrt_gpu(device, lean=True)
        super().__init__(directory, manifest)
        if max_graphs < 1:
            raise ConfigError(f"max_graphs must be >= 1, not {max_graphs}")
        m, directory = self.manifest, self.directory
        check_tensorrt_section(m.tensorrt, trt.__version__, gpu.name, gpu.compute_capability, directory)
        version_compatible = bool(m.tensorrt.get("version_compatible"))
        if is_lean(trt) and not version_compatible:
            raise BackendUnavailableError(f"{directory}: only the lean TensorRT runtime (tensorrt_lean) is installed, "
                                          f"which runs engines built with python -m export.build "
                                          f"--version-compatible; install the full tensorrt or rebuild")
        check_engine_sources(m, directory)
        # an exported dit_dbim graph without an engine (exported after the build) only leaves DBIM out
        self.models = tuple(n for n in self.models if n != "dit_dbim" or m.models[n].engine)
        for name in self.models:
            entry = m.models[name]
            if not entry.engine:
                raise ManifestError(f"{directory}: model {name} has no TensorRT engine; run python -m export.build")
            if entry.engine not in entry.files:
                raise ManifestError(f"{directory}: engine {entry.engine} has no hash in the manifest; rebuild it")
        m.verify(directory, list(self.models))
        self.trt, self.gpu, self.device = trt, gpu, device
        self.cuda_graphs, self.max_graphs = cuda_graphs, max_graphs
        self._dit_buckets: OrderedDict[tuple, DitBucket] = OrderedDict()
        self._staging: dict[tuple[str, int], StagingRing] = {}
        with cuda.device_scope(device):
            self.stream = cuda.Stream()
            runtime = trt.Runtime(tensorrt_logger(trt))
            if version_compatible:  # such plans embed their lean runtime; the manifest's hashes vouch for them
                runtime.engine_host_code_allowed = True
            self.engines = {name: TrtEngine(trt, runtime, safe_join(directory, m.models[name].engine), name,
                                            m.models[name].profile) for name in self.models}
        logger.info("tensorrt %s: loaded %s from %s on %s (device %d, CUDA graphs %s)", trt.__version__,
                    sorted(self.engines), directory, gpu.name, device, "on" if cuda_graphs else "off")

    def run(self, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One execution of ``model`` on host ``feeds`` -> every output by name (float32)."""
        with cuda.device_scope(self.device):
            return self.engines[model].run(feeds, self.stream)

    @property
    def dbim_unavailable(self) -> str | None:
        """Why DBIM requests cannot run here: no ``dit_dbim`` graph, or one without an engine; ``None`` otherwise."""
        if "dit_dbim" in self.models:
            return None
        if "dit_dbim" in self.manifest.models:
            return ("this build's DBIM graph (dit_dbim) has no TensorRT engine: build it with python -m export.build "
                    "--skip-export, or leave out dbim_lambda")
        return super().dbim_unavailable

    def open_session(self, noise: np.ndarray, cond: DiTCondition[np.ndarray], true_cfg: np.ndarray | None = None,
                     model: str = "dit", extra: dict[str, np.ndarray] | None = None) -> TrtDenoiseSession:
        """A denoising loop from packed ``noise`` ``[B, N, 64]`` under ``cond``, resident on the device; ``true_cfg``:
        per-row true-CFG scales ``[B]`` with ``cond`` of ``2B`` rows (:meth:`runtime.stages.Stages.denoise_session`);
        ``model``: ``dit``, or ``dit_dbim`` with its ``extra`` inputs."""
        return TrtDenoiseSession(self, noise, cond, true_cfg, model, extra)

    def dit_bucket(self, shapes: dict[str, tuple[int, ...]], guided: bool = False, model: str = "dit") -> DitBucket:
        """The :class:`DitBucket` of these input shapes of DiT graph ``model`` and step kind (``guided``: true CFG,
        the graph holds the enqueue alone), created, and the oldest released, as needed."""
        key = (model, shape_key(shapes), guided)
        bucket = self._dit_buckets.get(key)
        if bucket is None:
            engine = self.engines[model]
            context = engine.new_context() if self.cuda_graphs else engine.shared_context()
            bucket = self._dit_buckets[key] = DitBucket(engine.bind(context, shapes))
            if len(self._dit_buckets) > self.max_graphs:
                old_key, old = self._dit_buckets.popitem(last=False)
                old.close()
                logger.info("released the DiT bucket %s (more than %d buckets)", old_key, self.max_graphs)
        elif not self.cuda_graphs:
            self.engines[model].rebind(bucket.binding)  # the shared context may have been set to other shapes
        self._dit_buckets.move_to_end(key)
        return bucket

    def staging(self, batch: int, model: str = "dit") -> StagingRing:
        """The timestep staging ring of batch size ``batch`` for DiT graph ``model`` (created on first use)."""
        if (model, batch) not in self._staging:
            dit = self.engines[model]
            self._staging[model, batch] = StagingRing.create(batch, {n: dit.kinds[n] for n in DIT_TIMESTEPS})
        return self._staging[model, batch]

    def capture(self, bucket: DitBucket, guided: bool = False, model: str = "dit") -> None:
        """Capture one denoising step of ``bucket`` of DiT graph ``model`` (``execute_async_v3``, then ``latents_next
        -> latents`` unless ``guided``) after one uncaptured enqueue. The bucket's inputs must be loaded; its latents
        are not changed."""
        engine, binding = self.engines[model], bucket.binding
        engine.enqueue(binding, self.stream)  # lazy initialization happens here, not under capture

        def record() -> None:
            engine.enqueue(binding, self.stream)
            if not guided:
                binding.device[DIT_LATENTS].copy_from(binding.device[DIT_LATENTS_NEXT], self.stream)

        bucket.graph = cuda.CudaGraph(self.stream, record)
        logger.info("captured the TensorRT DiT step for bucket %s (%d bucket(s) cached)",
                    shape_key({n: binding.shapes[n] for n in engine.inputs}), len(self._dit_buckets))

    def close(self) -> None:
        """Release every buffer, graph, context and the stream (the stages are unusable afterwards)."""
        with cuda.device_scope(self.device):
            self.stream.synchronize()
            for bucket in self._dit_buckets.values():
                bucket.close()
            self._dit_buckets.clear()
            for ring in self._staging.values():
                ring.close()
            self._staging.clear()
            for engine in self.engines.values():
                engine.close()
            self.stream.close()


class TrtDenoiseSession:
    """The denoising loop of one request on the device (see the module docstring).

    A step copies the two timesteps in through the stages' :class:`StagingRing` and launches the bucket's graph (or
    enqueues the step uncaptured). With ``true_cfg`` (scales ``[B]``, ``cond`` of ``2B`` rows) the DiT runs both
    halves on the same latents and the guided Euler step happens on the host
    (:func:`~dynaip_trt.sampling.true_cfg_velocity`, :func:`~dynaip_trt.sampling.euler_step`).
    """

    def __init__(self, stages: TrtStages, noise: np.ndarray, cond: DiTCondition[np.ndarray],
                 true_cfg: np.ndarray | None = None, model: str = "dit", extra: dict[str, np.ndarray] | None = None
                 ) -> None:
        io = set(MODEL_IO[model][0]) | set(MODEL_IO[model][1])
        absent = [n for n in (DIT_LATENTS, DIT_LATENTS_NEXT, DIT_VELOCITY, *DIT_TIMESTEPS) if n not in io]
        if absent:
            raise ManifestError(f"the DiT graph of this build has no {absent}: a device-resident denoising loop needs "
                                f"the Euler step inside the graph; re-export and rebuild the engines")
        self.stages, self.engine = stages, stages.engines[model]
        noise = np.asarray(noise, np.float32)
        guided = true_cfg is not None
        self.scales = np.asarray(true_cfg, np.float32)[:, None, None] if guided else None  # [B, 1, 1]
        self.x = noise.copy() if guided else None  # the guided latents [B, N, 64], on the host
        latents = np.concatenate([noise, noise]) if guided else noise
        self.output = DIT_VELOCITY if guided else DIT_LATENTS_NEXT  # what a step's graph must write
        self.batch = int(latents.shape[0])  # rows the DiT runs
        placeholder = np.zeros(self.batch, np.float32)
        feeds = {**dit_feeds(latents, placeholder, placeholder, cond), **(extra or {})}
        with cuda.device_scope(stages.device):
            stages.stream.synchronize()  # the staging of the previous session is free again
            self.bucket = stages.dit_bucket({n: tuple(np.shape(feeds[n])) for n in self.engine.inputs}, guided, model)
            self.engine.load(self.bucket.binding, feeds, stages.stream)
            if stages.cuda_graphs and self.bucket.graph is None:
                stages.capture(self.bucket, guided, model)
            self.ring = stages.staging(self.batch, model)

    def _binding(self) -> Binding:
        if self.bucket.closed:
            raise InputError(f"this denoising session's buffers were released (more than {self.stages.max_graphs} "
                             f"DiT buckets were used since it started, or the stages were closed); start a new "
                             f"session (or raise max_graphs)")
        return self.bucket.binding

    def step(self, timestep: float, timestep_next: float, text_branch: bool = False) -> None:
        """One Euler step from ``timestep`` to ``timestep_next`` (on the device, no host synchronization; with true
        CFG the velocity comes back and the guided latents go in)."""
        if text_branch:
            raise InputError(TEXT_BRANCH_MESSAGE)
        binding, stream = self._binding(), self.stages.stream
        with cuda.device_scope(self.stages.device):
            slot, event = self.ring.next()
            for name, value in zip(DIT_TIMESTEPS, (timestep, timestep_next)):
                slot[name].array[...] = to_host_storage(np.full(self.batch, value, np.float32), self.engine.kinds[name])
                binding.device[name].copy_from_host(slot[name], stream)
            event.record(stream)
            if self.bucket.graph is None:
                self.engine.enqueue(binding, stream)
                if self.x is None:
                    binding.device[DIT_LATENTS].copy_from(binding.device[DIT_LATENTS_NEXT], stream)
            elif self.bucket.checked:
                self.bucket.graph.launch(stream)
            else:
                self._first_replay(binding, stream)
            if self.x is not None:
                velocity = self.engine.read(binding, (DIT_VELOCITY,), stream)[DIT_VELOCITY]  # [2B, N, 64]
                self.x = euler_step(self.x, true_cfg_velocity(velocity, self.scales), np.float32(timestep),
                                    np.float32(timestep_next))
                self.engine.load(binding, {DIT_LATENTS: np.concatenate([self.x, self.x])}, stream)

    def _first_replay(self, binding: Binding, stream: cuda.Stream) -> None:
        """Replay a fresh graph with its output filled with NaN bytes; an output left all-NaN means the graph did
        not write it (empty capture) and raises. One host synchronization per captured graph."""
        out = binding.device[self.output]
        out.fill_bytes(0xFF, stream)
        self.bucket.graph.launch(stream)
        if np.isnan(self.engine.read(binding, (self.output,), stream)[self.output]).all():
            raise BackendUnavailableError(
                "the captured CUDA graph of the TensorRT DiT step did not write its output (an empty capture: was the "
                "engine loaded under another current CUDA device?); run with CUDA graphs turned off and report the "
                "problem")
        self.bucket.checked = True

    def latents(self) -> np.ndarray:
        """The current packed latents ``[B, N, 64]`` (float32 host copy; waits for the device)."""
        if self.x is not None:
            return self.x.copy()
        binding = self._binding()
        with cuda.device_scope(self.stages.device):
            return self.engine.read(binding, (DIT_LATENTS,), self.stages.stream)[DIT_LATENTS]
