"""dynaip-trt: DynaIP (multi-subject image-prompt adapter for FLUX-class MM-DiTs), reference PyTorch code and the
build contract.

Two layers live here (see ``docs/architecture.md``):

- the **contract** (lean: numpy, PIL, ``tokenizers``): configs, errors, files, the manifest and model I/O, request
  validation, images, sampling schedule, conditioning arrays, tokenization, metrics, CLI helpers. The runtime
  imports only these.
- the **model code** (torch, diffusers, transformers): modules, attention processors, weights I/O, the reference
  pipeline, training.

Importing this package is lazy (PEP 562): ``import dynaip_trt.manifest`` never loads torch. The names below are
imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # contract
    "AdapterConfig": "configs", "DynaIPConfig": "configs", "get_config": "configs",
    "DynaIPError": "errors", "BackendUnavailableError": "errors", "ConfigError": "errors", "ImageError": "errors",
    "InputError": "errors", "ManifestError": "errors", "OutputError": "errors", "ResourceError": "errors",
    "SubjectLimitError": "errors", "WeightsError": "errors",
    "GenerationRequest": "request", "TextBranchSchedule": "request",
    "ReferenceKV": "conditioning", "DiTCondition": "conditioning",
    # model code (torch)
    "DynaIPAdapter": "adapter", "install_processors": "adapter",
    "DynaIPAttnProcessor": "attention", "ReferenceInputs": "attention",
    "HMoEFusion": "fusion",
    "DynaIPModels": "models", "build_models": "models",
    "DynaIPPipeline": "pipeline",
    "load_adapter": "weights", "load_models": "weights", "save_adapter": "weights", "save_models": "weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dynaip_trt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
