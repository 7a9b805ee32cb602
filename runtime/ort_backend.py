"""ONNX Runtime stages: one ``InferenceSession`` per model of a build folder (``python -m export.onnx``).

The denoising loop uses IOBinding: the constant DiT inputs are bound once as OrtValues on the session's device (CPU,
or CUDA with onnxruntime-gpu), the latents ping-pong between two device buffers, and only ``timestep`` and
``timestep_next`` are written per step. With true CFG the graph's ``velocity`` comes back to the host every step for
the guided Euler step, and the new latents go back in. DBIM's mixing steps run the ``dit_dbim`` session the same way
(:class:`~runtime.stages.DBIMDenoiseSession`). Other models run once per request through plain ``run`` calls on numpy
arrays. onnxruntime is imported lazily: the rest of the runtime works without it. No torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from dynaip_trt.conditioning import DiTCondition, dit_feeds
from dynaip_trt.sampling import euler_step, true_cfg_velocity
from dynaip_trt.errors import ConfigError, InputError, ManifestError, import_optional
from dynaip_trt.manifest import MODEL_IO, Manifest, safe_join

from .exported import ExportedStages, select_files

logger = logging.getLogger(__name__)

INSTALL = "pip install -e .[runtime] (onnxruntime-gpu instead of onnxruntime for the CUDA execution provider)"
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"


def import_onnxruntime():
    """The ``onnxruntime`` module, or :class:`~dynaip_trt.errors.BackendUnavailableError` saying what to install."""
    return import_optional("onnxruntime", "the onnxruntime backend", INSTALL)


def providers_for(device: str | None, available: Sequence[str]) -> list:
    """Execution providers for ``device``: ``"cpu"``; ``"cuda"``/``"cuda:N"`` (onnxruntime-gpu); ``None``: CUDA
    when onnxruntime-gpu is installed, else the CPU."""
    if device is None:
        return [CUDA_EP, CPU_EP] if CUDA_EP in available else [CPU_EP]
    head, _, index = str(device).partition(":")
    if head == "cpu" and not index:
        return [CPU_EP]
    if head == "cuda" and (not index or index.isdigit()):
        if CUDA_EP not in available:
            raise ConfigError(f"device {device!r} needs onnxruntime-gpu (this onnxruntime has {list(available)})")
        return [(CUDA_EP, {"device_id": int(index or 0)}), CPU_EP]
    raise ConfigError(f"device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")


class OrtStages(ExportedStages):
    """:class:`~runtime.stages.Stages` backed by ONNX Runtime sessions.

    Args:
        directory: build folder with ``manifest.json``; every model's files are checked against their SHA-256
            before any session is created.
        manifest: the loaded manifest (read from ``directory`` when ``None``).
        device: ``"cpu"``, ``"cuda[:N]"`` or ``None`` (see :func:`providers_for`); ``providers`` overrides it.
        precision: ``"fp32"`` or a graph precision the build lists (``"fp16"``, ``"fp8"``); models without that
            graph keep their main one.
        threads: intra-op threads per session (0 = ONNX Runtime's default).
    """

    backend = "onnxruntime"

    def __init__(self, directory: str | Path, manifest: Manifest | None = None, device: str | None = None,
                 providers: Sequence | None = None, precision: str = "fp32", threads: int = 0):
        ort = import_onnxruntime()
        super().__init__(directory, manifest)
        self.ort = ort
        self.manifest.verify(directory, list(self.models))
        available = ort.get_available_providers()
        self.providers = list(providers) if providers is not None else providers_for(device, available)
        names = [p[0] if isinstance(p, tuple) else p for p in self.providers]
        unknown = sorted(set(names) - set(available))
        if unknown:
            raise ConfigError(f"ONNX Runtime providers {unknown} are not available; this installation has "
                              f"{available}")
        if not isinstance(threads, int) or threads < 0:
            raise ConfigError(f"threads={threads!r} must be an int >= 0 (0: ONNX Runtime's default)")
        cuda = names[0] == CUDA_EP
        self.device_type = "cuda" if cuda else "cpu"
        self.device_id = int(self.providers[0][1].get("device_id", 0)) if cuda and isinstance(self.providers[0],
                                                                                                tuple) else 0
        self.precision = precision
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1 if threads else 0
        options.log_severity_level = 3
        self.files = select_files(self.manifest, precision)  # {model: ONNX file used}
        self.sessions = {}
        self.input_types: dict[str, dict[str, type]] = {}
        for name, rel in self.files.items():
            try:
                sess = ort.InferenceSession(str(safe_join(directory, rel)), sess_options=options,
                                            providers=self.providers)
            except Exception as e:  # onnxruntime raises its own exception types for bad graphs
                raise ManifestError(f"{name}: ONNX Runtime cannot load {rel}: {e}") from e
            self._check_io(name, rel, sess)
            self.sessions[name] = sess
            self.input_types[name] = {i.name: ORT_TYPES[i.type] for i in sess.get_inputs()}
        logger.info("onnxruntime %s: loaded %s from %s (%s, %s)", ort.__version__, sorted(self.sessions), directory,
                    precision, self.device_type)

    @staticmethod
    def _check_io(name: str, rel: str, sess) -> None:
        inputs = tuple(i.name for i in sess.get_inputs())
        outputs = tuple(o.name for o in sess.get_outputs())
        if set(inputs) != set(MODEL_IO[name][0]) or set(outputs) != set(MODEL_IO[name][1]):
            raise ManifestError(f"{name}: {rel} has inputs {inputs} and outputs {outputs}; the runtime expects "
                                f"{MODEL_IO[name]} (re-export with this version of dynaip-trt)")
        for i in sess.get_inputs():
            if i.type not in ORT_TYPES:
                raise ManifestError(f"{name}: input {i.name} of {rel} has unsupported type {i.type}")

    def cast(self, model: str, name: str, value: np.ndarray) -> np.ndarray:
        """``value`` as the contiguous dtype the graph declares for input ``name``."""
        return np.ascontiguousarray(value, dtype=self.input_types[model][name])

    def run(self, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {n: self.cast(model, n, feeds[n]) for n in MODEL_IO[model][0]}
        outputs = self.sessions[model].run(list(MODEL_IO[model][1]), arrays)
        return {n: np.asarray(o, dtype=np.float32) for n, o in zip(MODEL_IO[model][1], outputs)}

    def open_session(self, noise: np.ndarray, cond: DiTCondition, true_cfg: np.ndarray | None = None,
                     model: str = "dit", extra: dict[str, np.ndarray] | None = None) -> "OrtDenoiseSession":
        return OrtDenoiseSession(self, noise, cond, true_cfg, model, extra)


class OrtDenoiseSession:
    """A denoising loop on a DiT session with IOBinding (see the module docstring); ``true_cfg``: see
    :meth:`runtime.stages.Stages.denoise_session`; ``model``: ``dit``, or ``dit_dbim`` with its ``extra`` inputs."""

    def __init__(self, stages: OrtStages, noise: np.ndarray, cond: DiTCondition, true_cfg: np.ndarray | None = None,
                 model: str = "dit", extra: dict[str, np.ndarray] | None = None):
        ort, dev, idx = stages.ort, stages.device_type, stages.device_id
        self.session = stages.sessions[model]
        self.true_cfg = None if true_cfg is None else np.asarray(true_cfg, np.float32)[:, None, None]
        self.x = None if true_cfg is None else np.array(noise, dtype=np.float32)  # the guided latents [B, N, C]
        latents = noise if true_cfg is None else np.concatenate([noise, noise])
        batch = latents.shape[0]
        # two buffers: on the CPU an OrtValue shares its numpy array, and each is rewritten every step
        feeds = {**dit_feeds(latents, np.zeros(batch, np.float32), np.zeros(batch, np.float32), cond), **(extra or {})}
        self.values = {n: ort.OrtValue.ortvalue_from_numpy(stages.cast(model, n, a), dev, idx)
                       for n, a in feeds.items()}
        self.current = self.values.pop("latents")
        self.next = ort.OrtValue.ortvalue_from_shape_and_type(list(latents.shape), np.float32, dev, idx)
        self.velocity = ort.OrtValue.ortvalue_from_shape_and_type(list(latents.shape), np.float32, dev, idx)
        self.binding = self.session.io_binding()
        for name, value in self.values.items():
            self.binding.bind_ortvalue_input(name, value)
        self.binding.bind_ortvalue_output("velocity", self.velocity)
        self.batch = batch

    def step(self, timestep: float, timestep_next: float, text_branch: bool = False) -> None:
        if text_branch:
            raise InputError("text-branch steps need the torch backend")
        self.values["timestep"].update_inplace(np.full(self.batch, timestep, dtype=np.float32))
        self.values["timestep_next"].update_inplace(np.full(self.batch, timestep_next, dtype=np.float32))
        self.binding.bind_ortvalue_input("latents", self.current)
        self.binding.bind_ortvalue_output("latents_next", self.next)
        self.session.run_with_iobinding(self.binding)
        if self.true_cfg is None:
            self.current, self.next = self.next, self.current
            return
        v = true_cfg_velocity(self.velocity.numpy(), self.true_cfg)
        self.x = euler_step(self.x, v, np.float32(timestep), np.float32(timestep_next))
        self.current.update_inplace(np.concatenate([self.x, self.x]))

    def latents(self) -> np.ndarray:
        if self.x is not None:
            return self.x.copy()
        return np.array(self.current.numpy(), dtype=np.float32)
