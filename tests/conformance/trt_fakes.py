"""Fakes of TensorRT's builder and runtime, checked against the real bindings (:mod:`api_check`), that work.

:func:`make_tensorrt` returns a stand-in for the ``tensorrt`` (or ``tensorrt_lean``) module: every attribute is the
real one (enums, ``Logger``, ``ILogger``, ``Dims``, ``DataType``...: a misspelled member raises as it does for
real) except the classes whose factories need a GPU (``Builder``, ``OnnxParser``, ``Runtime``) and the objects
they return, which are :class:`~api_check.Checked` fakes:

- the builder parses the ONNX file for real (``onnx``), checks the profile against the network's inputs, starts
  every config with ``TF32`` set (TensorRT's default), rejects a timing cache from another device
  (``set_timing_cache`` returns ``False``) and serializes a JSON "engine" naming its source graph;
- the runtime deserializes those engines; an execution context checks shapes against the profile, resolves output
  shapes, and ``execute_async_v3`` enqueues on the simulated CUDA stream (:mod:`cuda_sim`) a computation on the
  bound device memory: ONNX Runtime on the source graph, or a numpy function registered in :data:`COMPUTE`.
  Captured under another current device than its context's, it records nothing (the empty-graph pitfall).
"""

from __future__ import annotations

import functools
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from api_check import Checked
from cuda_sim import CudaSim

ENGINE_MAGIC = b"FAKE-TRT-ENGINE\n"
CACHE_MAGIC = b"FAKE-TRT-TIMING-CACHE\n"
ONNX_TYPES = {1: "FLOAT", 10: "HALF", 16: "BF16", 7: "INT64", 6: "INT32", 9: "BOOL"}  # onnx.TensorProto -> DataType
NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "BF16": np.uint16, "INT64": np.int64, "INT32": np.int32,
         "BOOL": np.bool_}

# name -> fn(inputs: {name: float32/int array}) -> {output: array}; shapes: fn(input shapes) -> output shapes
COMPUTE: dict[str, tuple[Callable, Callable]] = {}


def to_f32(raw: np.ndarray, kind: str) -> np.ndarray:
    if kind == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32) if kind in ("HALF", "FLOAT") else raw.copy()


def from_f32(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "BF16":  # round to nearest even (the runtime's own conversion is tested separately)
        u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.asarray(x).astype(NUMPY[kind])


def engine_bytes(spec: dict[str, Any]) -> bytes:
    """Serialize a fake engine: ``{"inputs": [{"name", "dtype", "shape"}], "outputs": [...], "profile": {...},
    "compute": {"kind": "onnx", "path": ...} | {"kind": "fn", "name": ...}, ...}``."""
    return ENGINE_MAGIC + json.dumps(spec).encode()


@dataclass
class TrtState:
    """What the fakes saw and how they behave (tests read and set it)."""

    device_name: str = "NVIDIA H100 80GB HBM3"
    loggers: list[Any] = field(default_factory=list)
    builds: list[dict[str, Any]] = field(default_factory=list)
    configs: list[Any] = field(default_factory=list)
    runtimes: list[Any] = field(default_factory=list)
    contexts: list[Any] = field(default_factory=list)
    fail_model: str | None = None  # build_serialized_network returns None for graphs whose file starts with it
    timing_cache_none: bool = False  # get_timing_cache returns None
    executions: int = 0


def make_tensorrt(real: types.ModuleType, sim: CudaSim, state: TrtState) -> types.ModuleType:
    """The checked stand-in of the real TensorRT module ``real`` (see the module docstring)."""
    lean = not hasattr(real, "Builder")
    mod = types.ModuleType(real.__name__)
    mod.__dict__.update({k: v for k, v in vars(real).items() if not k.startswith("__") or k == "__version__"})
    severity = real.ILogger.Severity

    def log(logger: Any, sev: Any, msg: str) -> None:
        logger.log(sev, msg)

    class HostMemory(Checked):
        REAL, MODULE = real.IHostMemory, real

        def __init__(self, data: bytes):
            self._data = data

        def __bytes__(self) -> bytes:
            return self._data

        @property
        def nbytes(self) -> int:
            return len(self._data)

    class Engine(Checked):
        REAL, MODULE = real.ICudaEngine, real

        def __init__(self, spec: dict[str, Any]):
            self._spec = spec
            self._io = {t["name"]: (t, "INPUT") for t in spec["inputs"]}
            self._io.update({t["name"]: (t, "OUTPUT") for t in spec["outputs"]})
            self._names = list(self._io)

        @property
        def num_io_tensors(self) -> int:
            return len(self._names)

        def get_tensor_name(self, index: int) -> str:
            return self._names[index]

        def get_tensor_mode(self, name: str) -> Any:
            return getattr(real.TensorIOMode, self._io[name][1]) if name in self._io else real.TensorIOMode.NONE

        def get_tensor_dtype(self, name: str) -> Any:
            return getattr(real.DataType, self._io[name][0]["dtype"])

        @property
        def device_memory_size_v2(self) -> int:
            return 1 << 20

        def create_execution_context(self, strategy: Any = None) -> Any:
            ctx = Context(self)
            state.contexts.append(ctx)
            return ctx

    if hasattr(real.ICudaEngine, "device_memory_size"):  # TensorRT 10 has both; 11 only the _v2
        Engine.device_memory_size = property(lambda self: 1 << 20)

    class Context(Checked):
        REAL, MODULE = real.IExecutionContext, real

        def __init__(self, engine: Engine):
            self._engine, self._device = engine, sim.current
            self._shapes: dict[str, tuple[int, ...]] = {}
            self._addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: Any) -> bool:
            spec = self._engine._spec
            prof = spec["profile"].get(name)
            shape = tuple(int(d) for d in shape)
            if name not in [t["name"] for t in spec["inputs"]] or prof is None or len(shape) != len(prof["min"]):
                return False
            if any(not a <= d <= b for d, a, b in zip(shape, prof["min"], prof["max"])):
                return False
            self._shapes[name] = shape
            return True

        def _output_shapes(self) -> dict[str, tuple[int, ...]] | None:
            spec = self._engine._spec
            if any(t["name"] not in self._shapes for t in spec["inputs"]):
                return None
            return output_shapes(spec, {t["name"]: self._shapes[t["name"]] for t in spec["inputs"]})

        def get_tensor_shape(self, name: str) -> Any:
            if name in self._shapes:
                return real.Dims(list(self._shapes[name]))
            outs = self._output_shapes()
            t = self._engine._io[name][0]
            return real.Dims(list(outs[name]) if outs else [-1] * len(t["shape"]))

        def set_tensor_address(self, name: str, memory: int) -> bool:
            if name not in self._engine._io:
                return False
            self._addresses[name] = int(memory)
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            spec = self._engine._spec
            outs = self._output_shapes()
            if outs is None or set(self._addresses) != set(self._engine._io):
                return False
            shapes = {**{t["name"]: self._shapes[t["name"]] for t in spec["inputs"]}, **outs}
            addresses = dict(self._addresses)  # a captured graph keeps the addresses of capture time
            capturing = sim.streams.get(int(stream_handle))
            if capturing is not None and capturing.capture is not None and sim.current != self._device:
                return True  # the pitfall: enqueued under another device, the capture records no kernel

            def run() -> None:
                state.executions += 1
                execute(spec, {n: sim.view(addresses[n], shapes[n], NUMPY[self._engine._io[n][0]["dtype"]])
                               for n in shapes})

            sim.enqueue(stream_handle, run, f"execute {spec.get('model', '?')}")
            return True

    class Runtime(Checked):
        REAL, MODULE, CONSTRUCTED = real.Runtime, real, True

        def __init__(self, logger: Any):
            state.loggers.append(logger)
            state.runtimes.append(self)
            self._logger = logger

        @property
        def engine_host_code_allowed(self) -> bool:
            return self.__dict__.get("_host_code", False)

        @engine_host_code_allowed.setter
        def engine_host_code_allowed(self, value: bool) -> None:
            self._host_code = value

        def deserialize_cuda_engine(self, serialized_engine: Any) -> Any:
            data = bytes(serialized_engine)
            if not data.startswith(ENGINE_MAGIC):
                log(self._logger, severity.ERROR, "deserialization failed: not an engine")
                return None
            spec = json.loads(data[len(ENGINE_MAGIC):])
            if spec.get("version_compatible") and not self.engine_host_code_allowed:
                log(self._logger, severity.ERROR, "version-compatible engine: engine host code not allowed")
                return None
            return Engine(spec)

    mod.Runtime = Runtime
    if lean:
        return mod

    class Network(Checked):
        REAL, MODULE = real.INetworkDefinition, real

        def __init__(self, flags: int):
            self._flags, self._inputs, self._outputs, self._source = flags, [], [], None

    class ParserError:
        def __init__(self, desc: str):
            self._desc = desc

        def __str__(self) -> str:
            return self._desc

    class Parser(Checked):
        REAL, MODULE, CONSTRUCTED = real.OnnxParser, real, True

        def __init__(self, network: Network, logger: Any):
            state.loggers.append(logger)
            self._network, self._errors = network, []

        def parse_from_file(self, model: str) -> bool:
            import onnx

            path = Path(model)
            if not path.is_file():
                self._errors.append(ParserError(f"file {model} not found"))
                return False
            graph = onnx.load(str(path), load_external_data=False).graph
            inits = {i.name for i in graph.initializer}

            def io(v: Any) -> dict[str, Any]:
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
                return {"name": v.name, "dtype": ONNX_TYPES[v.type.tensor_type.elem_type], "shape": dims}

            net = self._network
            net._inputs = [io(v) for v in graph.input if v.name not in inits]
            net._outputs = [io(v) for v in graph.output]
            net._source = str(path)
            return True

        @property
        def num_errors(self) -> int:
            return len(self._errors)

        def get_error(self, index: int) -> Any:
            return self._errors[index]

    class Profile(Checked):
        REAL, MODULE = real.IOptimizationProfile, real

        def __init__(self) -> None:
            self._shapes: dict[str, dict[str, list[int]]] = {}

        def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - real names
            lo, mid, hi = (list(int(d) for d in s) for s in (min, opt, max))
            if not len(lo) == len(mid) == len(hi) or any(not 0 <= a <= b <= c for a, b, c in zip(lo, mid, hi)):
                raise ValueError(f"inconsistent shapes for {input}: min {lo}, opt {mid}, max {hi}")
            self._shapes[input] = {"min": lo, "opt": mid, "max": hi}

    class TimingCache(Checked):
        REAL, MODULE = real.ITimingCache, real

        def __init__(self, device: str, entries: int):
            self._device, self._entries = device, entries

        def serialize(self) -> HostMemory:
            return HostMemory(CACHE_MAGIC + json.dumps({"device": self._device, "entries": self._entries}).encode())

    class Config(Checked):
        REAL, MODULE = real.IBuilderConfig, real

        def __init__(self) -> None:
            self._flags = {real.BuilderFlag.TF32}  # TensorRT's default
            self._level, self._pools, self._profiles, self._cache = 3, {}, [], None

        def set_flag(self, flag: Any) -> None:
            self._flags.add(flag)

        def clear_flag(self, flag: Any) -> None:
            self._flags.discard(flag)

        def get_flag(self, flag: Any) -> bool:
            return flag in self._flags

        @property
        def builder_optimization_level(self) -> int:
            return self._level

        @builder_optimization_level.setter
        def builder_optimization_level(self, value: int) -> None:
            self._level = value

        def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
            self._pools[pool] = pool_size

        def add_optimization_profile(self, profile: Profile) -> int:
            if not profile._shapes:
                return -1
            self._profiles.append(profile)
            return len(self._profiles) - 1

        def create_timing_cache(self, serialized_timing_cache: Any) -> TimingCache:
            data = bytes(serialized_timing_cache)
            if data.startswith(CACHE_MAGIC):
                d = json.loads(data[len(CACHE_MAGIC):])
                return TimingCache(d["device"], d["entries"])
            return TimingCache(state.device_name, 0)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            if cache._device != state.device_name and not ignore_mismatch:
                return False
            self._cache = cache
            return True

        def get_timing_cache(self) -> Any:
            return None if state.timing_cache_none else self._cache

    class Builder(Checked):
        REAL, MODULE, CONSTRUCTED = real.Builder, real, True

        def __init__(self, logger: Any):
            state.loggers.append(logger)
            self._logger = logger

        def create_network(self, flags: int = 0) -> Network:
            return Network(flags)

        def create_builder_config(self) -> Config:
            config = Config()
            state.configs.append(config)
            return config

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> Any:
            log(self._logger, severity.VERBOSE, f"fake builder: building {network._source}")
            log(self._logger, severity.INFO, "fake builder: done")
            source = Path(network._source or "")
            if state.fail_model and source.name.startswith(state.fail_model):
                log(self._logger, severity.ERROR, "fake builder: failure requested by the test")
                return None
            profile = config._profiles[0]._shapes if config._profiles else {}
            dynamic = [t["name"] for t in network._inputs if -1 in t["shape"]]
            if any(n not in profile for n in dynamic) or any(n not in [t["name"] for t in network._inputs]
                                                              for n in profile):
                log(self._logger, severity.ERROR, "fake builder: the profile does not match the network's inputs")
                return None
            if config._cache is not None:
                config._cache._entries += 1
            strongly_typed = bool(network._flags & (1 << int(real.NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
            flags = sorted(f.name for f in config._flags)
            state.builds.append({"source": source.name, "flags": flags, "strongly_typed": strongly_typed,
                                 "profile": profile, "level": config._level,
                                 "pools": {p.name: v for p, v in config._pools.items()}})
            return HostMemory(engine_bytes({
                "version": real.__version__, "model": source.name.split(".")[0], "inputs": network._inputs,
                "outputs": network._outputs, "profile": profile, "compute": {"kind": "onnx", "path": str(source)},
                "version_compatible": "VERSION_COMPATIBLE" in flags}))

    mod.Builder, mod.OnnxParser = Builder, Parser
    return mod


def output_shapes(spec: dict[str, Any], inputs: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Output shapes of a fake engine for these input shapes."""
    compute = spec["compute"]
    if compute["kind"] == "fn":
        return COMPUTE[compute["name"]][1](inputs)
    feeds = {t["name"]: np.zeros(inputs[t["name"]], NUMPY[t["dtype"]] if t["dtype"] != "BF16" else np.float32)
             for t in spec["inputs"]}
    return {n: tuple(v.shape) for n, v in onnx_run(compute["path"], spec, feeds).items()}


@functools.lru_cache(maxsize=16)
def onnx_session(path: str) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def onnx_run(path: str, spec: dict[str, Any], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = onnx_session(path)
    types_ = {i.name: i.type for i in session.get_inputs()}
    cast = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
            "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
    outs = session.run(None, {n: np.asarray(v).astype(cast[types_[n]]) for n, v in feeds.items()})
    return {o.name: v for o, v in zip(session.get_outputs(), outs)}


def execute(spec: dict[str, Any], views: dict[str, np.ndarray]) -> None:
    """Compute a fake engine on device memory ``views`` (inputs read, outputs written, in the engine's types)."""
    kinds = {t["name"]: t["dtype"] for t in [*spec["inputs"], *spec["outputs"]]}
    inputs = {t["name"]: to_f32(views[t["name"]], t["dtype"]) for t in spec["inputs"]}
    compute = spec["compute"]
    if compute["kind"] == "fn":
        outs = COMPUTE[compute["name"]][0](inputs)
    else:
        outs = onnx_run(compute["path"], spec, inputs)
    for t in spec["outputs"]:
        views[t["name"]][...] = from_f32(np.asarray(outs[t["name"]], np.float32), kinds[t["name"]])
