"""TensorRT engine builds: the builder configuration as plain data, and the (lazily imported) builder.

Every engine is built from a **strongly typed** network: the ONNX graph's tensor types are the engine's types
(TensorRT 10.12 deprecated weak typing and TensorRT 11 removed the FP16/BF16/FP8 builder flags). So the precision
of an engine is chosen by the graph it is built from, and ONNX Runtime on that same graph is an exact oracle for
parity (``python -m export.parity``):

    precision         clip, fusion           text (CLIP-L + T5)       dit                  vae
    fp16              <name>.fp16.onnx       text.onnx (T5 overflows  dit.fp16.onnx        vae.onnx (fp32: FLUX's
                                             in fp16: fp32)                                VAE is inaccurate in fp16)
    bf16              <name>.bf16.onnx       text.bf16.onnx           dit.bf16.onnx        vae.bf16.onnx
    fp8 (base bf16)   <name>.bf16.onnx       text.bf16.onnx           dit.fp8-bf16.onnx    vae.bf16.onnx
    fp8 --fp8-base fp16: the fp16 row, with dit.fp8-fp16.onnx

FP8 quantizes the DiT's block GEMMs (Q/DQ nodes, :mod:`calibration.quantize`); everything else runs in the *base*
precision, bf16 by default as in NVIDIA's FLUX demo (bf16 has fp32's range: no fp16 overflow on real FLUX
weights). ONNX Runtime's CPU provider has no bf16 kernels, so an fp8 build also keeps the fp16-base FP8 DiT graph
(``dit.fp8-fp16.onnx``) as the CPU parity and quality oracle.

TF32: TensorRT enables ``BuilderFlag.TF32`` by default, so the fp32 layers of every engine (the text encoders and
VAE of fp16 builds, fp32 islands of reduced-precision graphs) may round GEMM/convolution inputs to TF32 (10-bit
mantissa); ``export.parity`` compares fp32 engines with the TF32 tolerance. ``--no-tf32`` clears the flag (strict
fp32; slower).

One optimization profile per engine spans the envelope: batch 1..max, subjects 1..max (opt 2), every requested
resolution (opt: the first). A timing cache (``timing.cache`` in the build directory) is loaded before and saved
after every build, so rebuilding after a re-export (or another precision) reuses measured tactics; a cache made on
another GPU or TensorRT version is replaced by a fresh one (with a warning), never fatal.

``--version-compatible`` builds engines that later TensorRT versions of the same major version (and the lean runtime
``tensorrt_lean``) can run (``BuilderFlag.VERSION_COMPATIBLE``; possibly slower).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dynaip_trt.configs import DynaIPConfig
from dynaip_trt.errors import BackendUnavailableError, ConfigError, DynaIPError, ManifestError
from dynaip_trt.files import atomic_path
from dynaip_trt.manifest import FP8_BASES, MODEL_IO, REQUIRED_MODELS, TIMING_CACHE, Manifest, fp8_variant, \
    safe_join, sha256_file
from dynaip_trt.tensorrt_api import GpuInfo, import_tensorrt, require_gpu, tensorrt_logger, trt_log

from .envelope import Envelope
from .specs import SPECS, get_spec

logger = logging.getLogger("export.engines")

ENGINE_PRECISIONS = ("fp16", "bf16", "fp8")
DEFAULT_FP8_BASE = "bf16"  # of FP8_BASES: as NVIDIA's FLUX demo (bf16 has fp32's range; fp16 overflows on FLUX)
FP16_UNSAFE = ("vae",)  # FLUX's VAE decodes inaccurately in fp16 (NVIDIA's demo keeps it fp32/bf16)
# Oldest compute capability with tensor-core support for a graph precision (bf16: Ampere; fp8: Ada/Hopper).
MIN_COMPUTE_CAPABILITY = {"bf16": (8, 0), "fp8": (8, 9)}
WHAT = "building TensorRT engines"


class EngineBuildError(DynaIPError, RuntimeError):
    """TensorRT could not parse a graph or build an engine."""


def graph_precision(model: str, precision: str, fp8_base: str = DEFAULT_FP8_BASE) -> str:
    """Precision of the ONNX graph ``model``'s engine is built from for an engine build in ``precision`` (see the
    module docstring): fp8 quantizes only the DiT and builds the rest in ``fp8_base``; fp16 keeps the VAE
    (:data:`FP16_UNSAFE`) and the models that do not allow fp16 (the text encoders) in fp32."""
    if precision not in ENGINE_PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from {list(ENGINE_PRECISIONS)}")
    if fp8_base not in FP8_BASES:
        raise ConfigError(f"unknown FP8 base precision {fp8_base!r}; choose from {list(FP8_BASES)}")
    allowed = SPECS[model].precisions
    if precision == "fp8":
        return fp8_variant(fp8_base) if "fp8" in allowed else graph_precision(model, fp8_base)
    if precision == "fp16" and model in FP16_UNSAFE:
        return "fp32"
    return precision if precision in allowed else "fp32"


def required_variants(precision: str, names: tuple[str, ...] = REQUIRED_MODELS, fp8_base: str = DEFAULT_FP8_BASE
                      ) -> dict[str, tuple[str, ...]]:
    """The fp16/bf16 ONNX variants (``export_all(variants=...)``) an engine build in ``precision`` needs
    (the fp8 DiT graphs come from calibration, not from the plain export)."""
    out: dict[str, list[str]] = {}
    for name in names:
        g = graph_precision(name, precision, fp8_base)
        if g in ("fp16", "bf16"):
            out.setdefault(g, []).append(name)
    return {p: tuple(ns) for p, ns in out.items()}


def base_precision(graph: str) -> str:
    """The precision of a graph's non-quantized ops: ``bf16`` for ``fp8-bf16``, else the graph's own."""
    return graph.split("-", 1)[1] if graph.startswith("fp8-") else graph


@dataclass(frozen=True)
class EnginePlan:
    """The complete builder configuration of one engine (plain data: tested without TensorRT, stored in the
    manifest next to the engine).

    Attributes:
        model: name in :data:`MODEL_IO`; onnx: source graph in the build directory; onnx_sha256: its hash.
        precision: the source graph's precision (``fp32``, ``fp16``, ``bf16``, ``fp8-bf16``, ``fp8-fp16``);
            engine: output file name.
        strongly_typed: network created with ``STRONGLY_TYPED`` (types from the graph).
        flags: ``trt.BuilderFlag`` names to set (e.g. ``VERSION_COMPATIBLE``).
        tf32: keep TensorRT's default ``TF32`` flag (fp32 GEMMs may use TF32); ``False`` clears it (strict fp32).
        profile: ``{input: {"min": shape, "opt": shape, "max": shape}}``; one optimization profile.
        optimization_level: ``builder_optimization_level`` (0-5; 3 is TensorRT's default).
        workspace_bytes: workspace memory pool limit (``None``: TensorRT's default, all device memory).
    """

    model: str
    onnx: str
    onnx_sha256: str
    precision: str
    engine: str
    strongly_typed: bool
    flags: tuple[str, ...]
    profile: dict[str, dict[str, list[int]]]
    tf32: bool = True
    optimization_level: int = 3
    workspace_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flags"] = list(self.flags)
        return d


def plan_engines(manifest: Manifest, directory: str | Path, precision: str, envelope: Envelope | None = None,
                 names: tuple[str, ...] | None = None, optimization_level: int = 3,
                 workspace_bytes: int | None = None, fp8_base: str = DEFAULT_FP8_BASE, tf32: bool = True,
                 version_compatible: bool = False) -> list[EnginePlan]:
    """One :class:`EnginePlan` per model of ``names`` (default: every model the build has, DBIM's optional
    ``dit_dbim`` included when exported) for an engine build in ``precision``.

    Profiles come from ``envelope`` (default: the profiles recorded at export). Raises :class:`ConfigError` when a
    graph the plan needs is missing from the build (re-export with the variant, or calibrate for fp8).
    """
    cfg = DynaIPConfig.from_dict(manifest.config)
    if not 0 <= optimization_level <= 5:
        raise ConfigError(f"optimization level {optimization_level} is outside TensorRT's range 0..5")
    if envelope is not None and envelope.subjects[2] > cfg.max_subjects:
        raise ConfigError(f"--max-subjects {envelope.subjects[2]} exceeds the config's maximum {cfg.max_subjects}")
    flags = ("VERSION_COMPATIBLE",) if version_compatible else ()
    names = names or tuple(n for n in MODEL_IO if n in manifest.models)
    plans = []
    for name in names:
        if name not in manifest.models:
            raise ConfigError(f"{directory} has no {name} graph; export it first (python -m export.onnx)")
        entry = manifest.models[name]
        g = graph_precision(name, precision, fp8_base)
        onnx_file = entry.graphs().get(g)
        if onnx_file is None:
            how = (f"python -m export.build --precision fp8 --fp8-base {base_precision(g)} exports and calibrates it"
                   if g.startswith("fp8") else f"python -m export.onnx --{g}")
            raise ConfigError(f"{directory} has no {g} graph of {name}, needed for a {precision} engine ({how})")
        profile = get_spec(name, cfg).profile(envelope) if envelope is not None else entry.profile
        plans.append(EnginePlan(
            model=name, onnx=onnx_file, onnx_sha256=entry.files[onnx_file], precision=g,
            engine=f"{name}.{precision}.engine", strongly_typed=True, flags=flags, profile=profile, tf32=tf32,
            optimization_level=optimization_level, workspace_bytes=workspace_bytes))
    return plans


def check_gpu_supports(gpu: GpuInfo, graphs: dict[str, str]) -> None:
    """Every graph precision of ``graphs`` (``{model: precision}``, e.g. from the plans) must have tensor-core
    support on ``gpu`` (:data:`MIN_COMPUTE_CAPABILITY`); otherwise :class:`BackendUnavailableError` naming the
    precision, the GPU and what it needs (checked before anything is built)."""
    for model, graph in graphs.items():
        for p in dict.fromkeys((graph.split("-")[0], base_precision(graph))):
            need = MIN_COMPUTE_CAPABILITY.get(p)
            if need and gpu.compute_capability < need:
                have = gpu.compute_capability
                raise BackendUnavailableError(
                    f"{p} engines need a GPU of compute capability {need[0]}.{need[1]} or newer ("
                    f"{'Ada or Hopper' if p == 'fp8' else 'Ampere'} and later), but {gpu.name} has {have[0]}."
                    f"{have[1]} (the {model} engine); build another precision here (--precision fp16) or build "
                    f"on a newer GPU")


def import_tensorrt_builder(device: int = 0) -> tuple[Any, GpuInfo]:
    """``(tensorrt, GpuInfo)`` with TensorRT's builder and a usable GPU, or :class:`BackendUnavailableError` naming
    what is missing (TensorRT tunes tactics on the GPU the engines will run on)."""
    trt = import_tensorrt(WHAT)
    return trt, require_gpu(device, WHAT)


def system_section(trt: Any, gpu: GpuInfo) -> dict[str, Any]:
    """The manifest's ``tensorrt`` description of this system (what the runtime compares at load)."""
    return {"version": trt.__version__, "gpu": gpu.name, "compute_capability": list(gpu.compute_capability)}


class EngineBuilder:
    """Builds :class:`EnginePlan` engines into a build directory with TensorRT (on CUDA device ``device``).

    Every builder, parser and runtime of the process share one TensorRT logger
    (:func:`~dynaip_trt.tensorrt_api.tensorrt_logger`); ``verbose`` shows TensorRT's INFO and VERBOSE messages.
    """

    def __init__(self, directory: str | Path, verbose: bool = False, device: int = 0):
        self.trt, self.gpu = import_tensorrt_builder(device)
        self.directory = Path(directory)
        if verbose:
            trt_log.setLevel(logging.DEBUG)
        self.logger = tensorrt_logger(self.trt)
        try:
            self.builder = self.trt.Builder(self.logger)
        except TypeError as e:  # pybind11: the factory returned nullptr (no usable GPU or CUDA for TensorRT)
            raise BackendUnavailableError(f"TensorRT could not create a builder on {self.gpu.name} ({e}); see the "
                                          f"TensorRT log (--verbose)") from e
        self.cache_path = self.directory / TIMING_CACHE

    def _network(self, plan: EnginePlan) -> tuple[Any, Any]:
        trt = self.trt
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
        network = self.builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        source = safe_join(self.directory, plan.onnx)
        if sha256_file(source) != plan.onnx_sha256:
            raise ManifestError(f"{plan.onnx} does not match its manifest hash; re-export before building")
        if not parser.parse_from_file(str(source)):  # resolves external data next to the graph
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(f"TensorRT's ONNX parser rejected {plan.onnx}: {errors}")
        return network, parser

    def _profile(self, plan: EnginePlan) -> Any:
        profile = self.builder.create_optimization_profile()
        for name, shapes in plan.profile.items():
            try:
                profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
            except ValueError as e:
                raise EngineBuildError(f"{plan.model}: TensorRT rejected the profile of input {name} (min "
                                       f"{shapes['min']}, opt {shapes['opt']}, max {shapes['max']}): {e}") from e
        return profile

    def _timing_cache(self, config: Any) -> Any:
        """Attach the build's timing cache to ``config``; one made on another GPU or TensorRT version (rejected by
        ``set_timing_cache``) is replaced by a fresh cache, with a warning."""
        cache_bytes = self.cache_path.read_bytes() if self.cache_path.is_file() else b""
        cache = config.create_timing_cache(cache_bytes)
        if config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
        logger.warning("the timing cache %s was made on another GPU or TensorRT version: starting a fresh one "
                       "(it is replaced after the build)", self.cache_path)
        cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise EngineBuildError("TensorRT rejected a fresh timing cache (see the TensorRT log)")
        return cache

    def _config(self, plan: EnginePlan) -> Any:
        trt = self.trt
        config = self.builder.create_builder_config()
        for flag in plan.flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        if not plan.tf32:
            config.clear_flag(trt.BuilderFlag.TF32)
        config.builder_optimization_level = plan.optimization_level
        if plan.workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
        if config.add_optimization_profile(self._profile(plan)) < 0:
            raise EngineBuildError(f"{plan.model}: TensorRT rejected the optimization profile {plan.profile} (an "
                                   f"input missing or shapes inconsistent with {plan.onnx}; see the TensorRT log)")
        self._timing_cache(config)
        return config

    def build(self, plan: EnginePlan, into: Path) -> Path:
        """Build one engine into the folder ``into`` (a staging folder: the caller moves it into the build) and
        update the build's timing cache; both written atomically. Returns the engine's path."""
        network, _parser = self._network(plan)  # the parser owns weights the network refers to: keep it alive
        config = self._config(plan)
        t0 = time.perf_counter()
        serialized = self.builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineBuildError(f"TensorRT failed to build the {plan.model} engine from {plan.onnx} (see the "
                                   f"TensorRT log above; run with --verbose for details)")
        path = into / plan.engine
        with atomic_path(path) as tmp:
            tmp.write_bytes(bytes(serialized))
        self._save_timing_cache(config)
        logger.info("%s: %s engine (%s) built in %.1fs, %.1f MB", plan.model, plan.precision, plan.engine,
                    time.perf_counter() - t0, path.stat().st_size / 2**20)
        return path

    def _save_timing_cache(self, config: Any) -> None:
        """Write the config's timing cache over the build's (atomically); a missing cache only warns: the engine is
        what matters."""
        cache = config.get_timing_cache()
        if cache is None:
            logger.warning("TensorRT returned no timing cache; %s is left as it was", self.cache_path)
            return
        with atomic_path(self.cache_path) as tmp:
            tmp.write_bytes(bytes(cache.serialize()))


def record_engines(manifest: Manifest, directory: str | Path, plans: list[EnginePlan], system: dict[str, Any],
                   precision: str) -> Manifest:
    """Point the manifest's entries at the built engines (hashed) and write its ``tensorrt`` section: the system
    they were built on, the requested precision, whether the engines are version-compatible, and each engine's
    plan (source graph hash included, so the runtime can tell an engine built from an older graph). Saved
    atomically."""
    for plan in plans:
        entry = manifest.models[plan.model]
        entry.engine = plan.engine
        entry.files[plan.engine] = sha256_file(safe_join(directory, plan.engine))
        entry.profile = plan.profile
    manifest.tensorrt = {**system, "precision": precision,
                         "version_compatible": all("VERSION_COMPATIBLE" in p.flags for p in plans),
                         "engines": {p.model: p.to_dict() for p in plans}}
    manifest.save(directory)
    return manifest
