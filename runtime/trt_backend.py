"""TensorRT stages (interim: the cuda-python implementation is being merged; see docs/architecture.md)."""

from __future__ import annotations

from pathlib import Path

from dynaip_trt.errors import BackendUnavailableError
from dynaip_trt.manifest import Manifest
from dynaip_trt.tensorrt_api import import_tensorrt_gpu

from .exported import ExportedStages


class TrtStages(ExportedStages):
    backend = "tensorrt"

    def __init__(self, directory: str | Path, manifest: Manifest | None = None, device: int = 0,
                 cuda_graphs: bool = True, max_graphs: int = 4):
        import_tensorrt_gpu()
        raise BackendUnavailableError("the TensorRT backend of this checkout is being rewritten on cuda-python")
