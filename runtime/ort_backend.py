"""ONNX Runtime stages: one ``InferenceSession`` per model of a build directory (``python -m export.onnx``).

Tensors cross the boundary as numpy arrays (torch on the driver's side, always on the CPU); each input is cast to
the dtype its graph declares, so FP16 variants with FP16 I/O work too. onnxruntime is imported lazily: the rest of
the runtime works without it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dynaip_trt.errors import BackendUnavailableError, ConfigError, ManifestError
from dynaip_trt.manifest import MODEL_IO, Manifest, safe_join

from dynaip_trt.manifest import max_subjects_of

from .exported import ExportedStages, require_models, select_files

logger = logging.getLogger(__name__)

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def import_onnxruntime():
    """The ``onnxruntime`` module, or :class:`BackendUnavailableError` saying what to install."""
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailableError("the onnxruntime backend needs ONNX Runtime: pip install -e .[onnx] "
                                      "(or .[onnx-gpu] for the CUDA execution provider)") from e
    return onnxruntime


def default_providers() -> list[str]:
    """CUDA execution provider first when onnxruntime-gpu is installed and a GPU is visible, else the CPU one."""
    available = import_onnxruntime().get_available_providers()
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtStages(ExportedStages):
    """:class:`~dynaip_trt.pipeline.Stages` backed by ONNX Runtime sessions.

    Args:
        directory: build directory with ``manifest.json``; every model's files are checked against their
            SHA-256 before any session is created.
        manifest: the loaded manifest (read from ``directory`` when ``None``).
        providers: ONNX Runtime execution providers (default :func:`default_providers`).
        precision: ``"fp32"`` or a variant the manifest lists (e.g. ``"fp16"``); models without it keep fp32.
        threads: intra-op threads per session (0 = ONNX Runtime's default).
    """

    def __init__(self, directory: str | Path, manifest: Manifest | None = None,
                 providers: Sequence[str] | None = None, precision: str = "fp32", threads: int = 0):
        ort = import_onnxruntime()
        self.directory = Path(directory)
        self.manifest = manifest or Manifest.load(directory)
        require_models(self.manifest, directory)
        self.manifest.verify(directory, list(MODEL_IO))
        self.providers = list(providers) if providers is not None else default_providers()
        unknown = sorted(set(self.providers) - set(ort.get_available_providers()))
        if unknown:
            raise ConfigError(f"ONNX Runtime providers {unknown} are not available; this installation has "
                              f"{ort.get_available_providers()}")
        self.device = torch.device("cpu")
        self.max_subjects = max_subjects_of(self.manifest)
        self.precision = precision
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.files = select_files(self.manifest, precision)  # {model: ONNX file used}
        self.sessions = {}
        self.input_types: dict[str, dict[str, type]] = {}
        for name, rel in self.files.items():
            path = safe_join(directory, rel)
            try:
                sess = ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
            except Exception as e:  # onnxruntime raises its own exception types for bad graphs
                raise ManifestError(f"{name}: ONNX Runtime cannot load {rel}: {e}") from e
            self._check_io(name, rel, sess)
            self.sessions[name] = sess
            self.input_types[name] = {i.name: ORT_TYPES[i.type] for i in sess.get_inputs()}
        logger.info("onnxruntime %s: loaded %s from %s (%s, providers %s)", ort.__version__, sorted(self.sessions),
                    directory, precision, self.providers)

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

    def run(self, model: str, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        types = self.input_types[model]
        arrays = {n: np.ascontiguousarray(feeds[n].detach().cpu().numpy(), dtype=types[n]) for n in MODEL_IO[model][0]}
        outputs = self.sessions[model].run(list(MODEL_IO[model][1]), arrays)
        return tuple(torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in outputs)
