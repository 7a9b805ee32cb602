"""dynaip-trt runtime: DynaIP generation from a build directory (ONNX Runtime, TensorRT) or PyTorch weights.

Imports only :mod:`dynaip_trt` (never ``export``, ``calibration`` or training code); ONNX Runtime and TensorRT are
imported when a backend that needs them is created.

    from runtime import DynaIPEngine
    engine = DynaIPEngine.from_dir("build/tiny", backend="onnxruntime")
    images = engine.generate("a photo of the subject", references=["examples/subject_a.png"], seed=0)
"""

from .cuda_graphs import CapturedGraph, GraphCache, capture_graph, ensure_free_memory
from .engine import BACKENDS, DynaIPEngine
from .exported import ExportedStages
from .ort_backend import OrtStages
from .torch_backend import TorchGraphStages
from .trt_backend import TrtEngine, TrtStages

__all__ = [
    "BACKENDS", "CapturedGraph", "DynaIPEngine", "ExportedStages", "GraphCache", "OrtStages", "TorchGraphStages",
    "TrtEngine", "TrtStages", "capture_graph", "ensure_free_memory",
]
