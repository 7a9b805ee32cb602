"""dynaip-trt: DynaIP (multi-subject image-prompt adapter for FLUX-class MM-DiTs), reference PyTorch code.

Model code lives here (configs, modules, attention processors, weights I/O, reference pipeline); ONNX export and
engine builds are in ``export``, FP8 calibration in ``calibration``, the deployable runtime in ``runtime``.
"""

from .adapter import DynaIPAdapter, install_processors
from .attention import DynaIPAttnProcessor, ReferenceInputs
from .configs import AdapterConfig, DynaIPConfig, get_config
from .errors import (
    BackendUnavailableError,
    ConfigError,
    DynaIPError,
    ImageError,
    InputError,
    ManifestError,
    ResourceError,
    SubjectLimitError,
    WeightsError,
)
from .fusion import HMoEFusion
from .models import DynaIPModels, build_models
from .pipeline import DynaIPPipeline, ReferenceKV, TorchStages
from .request import TextBranchSchedule
from .weights import load_adapter, load_models, save_adapter, save_models

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "BackendUnavailableError", "ConfigError", "DynaIPAdapter", "DynaIPAttnProcessor",
    "DynaIPConfig", "DynaIPError", "DynaIPModels", "DynaIPPipeline", "HMoEFusion", "ImageError", "InputError",
    "ManifestError", "ReferenceInputs", "ReferenceKV", "ResourceError", "SubjectLimitError", "TextBranchSchedule",
    "TorchStages", "WeightsError", "build_models", "get_config", "install_processors", "load_adapter",
    "load_models", "save_adapter", "save_models",
]
