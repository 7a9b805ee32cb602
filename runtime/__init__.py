"""dynaip-trt runtime: DynaIP generation from a build folder (ONNX Runtime, TensorRT) or PyTorch weights.

Lean: importing it (and generating with the ONNX Runtime or TensorRT backend) loads no torch, diffusers or
transformers; it imports only the contract modules of :mod:`dynaip_trt`. The torch backend is imported on first use.

    from runtime import DynaIPEngine
    engine = DynaIPEngine.from_dir("build/tiny", backend="onnxruntime")
    images = engine.generate("a photo of the subject", ["examples/subject_a.png"], seed=0)
"""

from dynaip_trt.request import GenerationRequest

from .engine import BACKENDS, DynaIPEngine

__all__ = ["BACKENDS", "DynaIPEngine", "GenerationRequest"]
