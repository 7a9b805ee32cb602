"""Exception types raised by dynaip-trt.

Every error a user can trigger with bad input or bad files derives from :class:`DynaIPError`, so a service can
catch one type. Input errors also derive from ``ValueError`` and file errors from ``OSError`` so existing
handlers keep working. Messages always name the offending field or file and the allowed range.
"""

from __future__ import annotations


class DynaIPError(Exception):
    """Base class of every error raised by dynaip-trt."""


class InputError(DynaIPError, ValueError):
    """A request argument (prompt, image, scale, mask, size, ...) is invalid. The message names the field."""


class ImageError(InputError):
    """A reference image cannot be decoded or is unusable (too small, corrupt, wrong mode)."""


class SubjectLimitError(InputError):
    """A request has no subject, or more subjects than the engine's optimization profile (or the config) allows."""


class ConfigError(DynaIPError, ValueError):
    """An unknown config, precision, backend or an inconsistent configuration."""


class WeightsError(DynaIPError, OSError):
    """A weights file or folder is missing, corrupt, tampered with, or does not match the model."""


class ManifestError(DynaIPError, OSError):
    """A build manifest is missing, invalid, or does not match the files/GPU/TensorRT version it describes."""


class OutputError(DynaIPError, OSError):
    """An output path cannot be written (missing or read-only folder, disk full, not a regular file) or writing it
    would replace something the user has (a folder holding files dynaip-trt did not write)."""


class BackendUnavailableError(DynaIPError, RuntimeError):
    """A backend (TensorRT, CUDA, ONNX Runtime) is not installed or has no usable device."""


class ResourceError(DynaIPError, RuntimeError):
    """Not enough device memory (or another resource) for the requested work."""


def import_optional(module: str, needed_for: str, install: str):
    """Import an optional dependency, or raise :class:`BackendUnavailableError` saying what needs it and how to
    install it (e.g. ``import_optional("onnxruntime", "the onnxruntime backend", "pip install onnxruntime")``)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailableError(f"{needed_for} needs {module}, which is not installed: {install}") from e
