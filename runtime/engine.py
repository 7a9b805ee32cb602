"""``DynaIPEngine``: the deployable entry point over any backend.

The engine IS the reference sampling driver (:class:`~dynaip_trt.pipeline.DynaIPPipeline`: request validation,
schedule, noise, reference cache) with backend stages plugged in, plus a lock so one engine can be shared by
threads, and the device/stream scope GPU backends need around every call.

    engine = DynaIPEngine.from_dir("build/tiny", backend="onnxruntime")
    images = engine.generate("a photo of the two subjects on a beach", references=["a.png", "b.png"], seed=1)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import threading
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch
from PIL import Image

from dynaip_trt.configs import DynaIPConfig, get_config
from dynaip_trt.errors import BackendUnavailableError, ConfigError, InputError
from dynaip_trt.fp8 import quantize_fp8_
from dynaip_trt.images import ImageLike
from dynaip_trt.manifest import Manifest
from dynaip_trt.models import DynaIPModels, build_models
from dynaip_trt.pipeline import DynaIPPipeline, ReferenceKV, Stages
from dynaip_trt.request import (GenerationRequest, TextBranchSchedule, check_backend, normalize_granularity,
                                normalize_references, request_defaults)
from dynaip_trt.text import ByteTokenizer, HFTokenizer
from dynaip_trt.weights import load_models

from .build_info import max_batch_of
from .cache import ByteLRU
from .exported import build_tokenizers
from .torch_backend import TorchGraphStages, place_models

logger = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "onnxruntime", "torch")
DEFAULT_CACHE_BYTES = 256 << 20  # per cache (reference K/V, prompt embeddings)
F = TypeVar("F", bound=Callable)


def _locked(method: F) -> F:
    """Serialise ``method`` on the engine's lock and run it in the backend's device/stream scope."""

    @functools.wraps(method)
    def wrapper(self: "DynaIPEngine", *args, **kwargs):
        with self._lock, self._scope():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _cuda_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device} requested but CUDA is not available (no GPU, or a CPU "
                                      f"build of torch)")
    return device


class DynaIPEngine(DynaIPPipeline):
    """DynaIP generation on the ``torch``, ``onnxruntime`` or ``tensorrt`` backend; safe to share across threads.

    Build one with :meth:`from_dir` (a build directory of ``export.onnx`` / ``export.build``), :meth:`from_config`
    (seeded reference models, e.g. the embedded ``tiny`` default) or :meth:`from_weights` (local checkpoints).
    Calls are serialised by a re-entrant lock: concurrent callers wait, and get the results sequential calls give.
    """

    def __init__(self, config: DynaIPConfig, stages: Stages, clip_tokenizer: ByteTokenizer | HFTokenizer,
                 t5_tokenizer: ByteTokenizer | HFTokenizer, backend: str, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 identity: str = "", max_batch: int = 1):
        super().__init__(config, stages, clip_tokenizer, t5_tokenizer, cache_size=0)  # the ByteLRUs below cache
        self.backend = backend
        self.identity = identity or f"{backend}:{config.name}"  # in every cache key: the build these results are of
        self.max_batch = max_batch
        self._references: ByteLRU = ByteLRU(cache_bytes, "references")
        self._prompts: ByteLRU = ByteLRU(cache_bytes, "prompts")
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_dir(cls, path: str | Path, backend: str = "tensorrt", device: str | torch.device | None = None,
                 precision: str = "fp32", providers: Sequence[str] | None = None, cuda_graphs: bool = True,
                 threads: int = 0, cache_bytes: int = DEFAULT_CACHE_BYTES) -> "DynaIPEngine":
        """Load a build directory (``manifest.json`` + the files it lists; hashes verified before loading).

        Args:
            backend: ``"tensorrt"`` (the engines of ``export.build``) or ``"onnxruntime"`` (the ONNX graphs).
                ``"torch"`` needs weights, not a build directory: use :meth:`from_config` / :meth:`from_weights`.
            device: TensorRT: the CUDA device (default the current one). ONNX Runtime: ``"cpu"`` or ``"cuda"``
                picks the execution provider (default: CUDA when onnxruntime-gpu sees a GPU, else CPU).
            precision: ONNX Runtime: ``"fp32"`` or a variant the manifest lists (``"fp16"``).
            providers: ONNX Runtime execution providers, overriding ``device``.
            cuda_graphs: TensorRT: replay the DiT step from a CUDA graph per bucket.
            threads: ONNX Runtime intra-op threads per session (0: ONNX Runtime's default), so each replica of a
                server gets its own CPU budget.
            cache_bytes: byte budget of each cache (reference K/V, prompt embeddings).
        """
        check_backend(backend, BACKENDS)
        if backend == "torch":
            raise ConfigError("backend 'torch' runs PyTorch weights, not a build directory: use "
                              "DynaIPEngine.from_config(name) or DynaIPEngine.from_weights(base, clip, adapter)")
        manifest = Manifest.load(path)
        if backend == "onnxruntime":
            from .ort_backend import OrtStages

            if providers is None and device is not None:
                dev = torch.device(device)
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if dev.type == "cuda" else [
                    "CPUExecutionProvider"]
            stages: Stages = OrtStages(path, manifest, providers=providers, precision=precision, threads=threads)
        else:
            from .trt_backend import TrtStages

            if precision != "fp32":
                raise ConfigError("the precision of TensorRT engines is fixed when they are built (export.build); "
                                  "precision= applies to the onnxruntime backend")
            stages = TrtStages(path, manifest, device=device or "cuda", cuda_graphs=cuda_graphs)
        clip_tok, t5_tok = build_tokenizers(path)
        identity = hashlib.sha256(f"{backend}:{precision}:{manifest.to_json()}".encode()).hexdigest()[:16]
        return cls(manifest.dynaip_config, stages, clip_tok, t5_tok, backend, cache_bytes=cache_bytes,
                   identity=identity, max_batch=max_batch_of(manifest))

    @classmethod
    def from_models(cls, models: DynaIPModels, cuda_graphs: bool = True, fp8: bool = False) -> "DynaIPEngine":
        """Torch backend over an in-memory model family (on its current device).

        ``fp8``: replace the DiT's block linear layers, in place, by FP8 GEMMs (``torch._scaled_mm``, dynamic
        per-tensor input scales; see :mod:`dynaip_trt.fp8`). GPUs need FP8 tensor cores (compute capability 8.9+).
        """
        if fp8:
            if models.device.type == "cuda" and torch.cuda.get_device_capability(models.device) < (8, 9):
                raise BackendUnavailableError(f"fp8 needs FP8 tensor cores (compute capability 8.9+, e.g. L40S, "
                                              f"H100); {torch.cuda.get_device_name(models.device)} has none")
            logger.info("fp8: %d DiT linear layers now run torch._scaled_mm", quantize_fp8_(models.transformer))
        stages = TorchGraphStages(models, cuda_graphs=cuda_graphs)
        return cls(models.config, stages, models.clip_tokenizer, models.t5_tokenizer, "torch")

    @classmethod
    def from_config(cls, name: str = "tiny", seed: int = 0, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, cuda_graphs: bool = True, fp8: bool = False
                    ) -> "DynaIPEngine":
        """Torch backend over seeded reference models of a named config (``tiny`` is the embedded default).

        On a CUDA ``device`` the DiT step is replayed from a CUDA graph per bucket unless ``cuda_graphs=False``;
        ``fp8`` runs the DiT's block linears as FP8 GEMMs (see :meth:`from_models`).
        """
        device = _cuda_device(device)
        models = place_models(build_models(get_config(name), seed=seed), device, dtype)
        return cls.from_models(models, cuda_graphs=cuda_graphs, fp8=fp8)

    @classmethod
    def from_weights(cls, base_dir: str | Path, clip_dir: str | Path, adapter_path: str | Path | None = None,
                     device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                     cuda_graphs: bool = True, fp8: bool = False) -> "DynaIPEngine":
        """Torch backend over local checkpoints (see :func:`dynaip_trt.weights.load_models`; ``fp8``: see
        :meth:`from_models`)."""
        device = _cuda_device(device)
        models = place_models(load_models(base_dir, clip_dir, adapter_path), device, dtype)
        return cls.from_models(models, cuda_graphs=cuda_graphs, fp8=fp8)

    # ------------------------------------------------------------------------------------------------- calls
    def _scope(self) -> contextlib.AbstractContextManager:
        """GPU backends: the stages' device, and their stream if they own one (so the driver's tensor ops and the
        backend's kernels share one stream). CPU: nothing."""
        device = self.stages.device
        if device.type != "cuda":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(device))
        stream = getattr(self.stages, "stream", None)
        if stream is not None:
            stack.enter_context(torch.cuda.stream(stream))
        return stack

    __call__ = _locked(DynaIPPipeline.__call__)
    denoise = _locked(DynaIPPipeline.denoise)
    decode = _locked(DynaIPPipeline.decode)

    @_locked
    def encode_references(self, references: Sequence[ImageLike | Sequence[ImageLike]], granularity=None,
                          text_branch: bool = False) -> ReferenceKV:
        """:meth:`DynaIPPipeline.encode_references` behind a byte-bounded LRU keyed by the images' content, the
        level weights, the text branch and the build's identity."""
        subjects = normalize_references(references, self.stages.max_subjects)
        lw = normalize_granularity(granularity, len(subjects), self.config.adapter.num_levels)
        key = (self.identity, self._cache_key(subjects, lw, text_branch))
        ref = self._references.get(key)
        if ref is None:
            ref = DynaIPPipeline.encode_references(self, subjects, granularity, text_branch)
            self._references.put(key, ref)
        return ref

    @_locked
    def encode_prompt(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`DynaIPPipeline.encode_prompt` behind a byte-bounded LRU keyed by the prompts and the build."""
        key = (self.identity, (prompts,) if isinstance(prompts, str) else tuple(prompts))
        out = self._prompts.get(key)
        if out is None:
            out = DynaIPPipeline.encode_prompt(self, prompts)
            self._prompts.put(key, out)
        return out

    def cache_stats(self) -> dict[str, dict[str, int]]:
        """``{"references": {"hits", "misses", "bytes", "entries", ...}, "prompts": {...}}``."""
        return {"references": self._references.stats(), "prompts": self._prompts.stats()}

    def clear_reference_cache(self) -> None:
        """Forget every cached reference encoding (the next request runs CLIP and the fusion module again)."""
        self._references.clear()

    def batch_key(self, request: GenerationRequest) -> tuple:
        """What requests generated together must share: subject count, steps, guidance, height, width (defaults
        filled in and validated)."""
        steps, guidance, height, width = request_defaults(self.config, request.steps, request.guidance,
                                                          request.height, request.width)
        subjects = len(request.references) if isinstance(request.references, (list, tuple)) else 0
        return subjects, steps, guidance, height, width

    @_locked
    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Image.Image]:
        """One image per request; the requests must share :meth:`batch_key` (``InputError`` otherwise) and number
        at most :attr:`max_batch`. Each image equals ``generate`` of its request alone (same seed, same image)."""
        keys = {self.batch_key(r) for r in requests}
        if len(keys) > 1:
            raise InputError(f"generate_batch: requests differ in subjects/steps/guidance/height/width {sorted(keys)}; "
                             f"batch only requests with the same batch_key")
        if len(requests) > self.max_batch:
            raise InputError(f"generate_batch: {len(requests)} requests; this build batches at most {self.max_batch}")
        images = []
        for r in requests:
            options = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}
            if options.pop("block_scales") is not None:
                raise InputError("block_scales: per-block image scales are not supported by this engine")
            images.extend(self.generate(**options))
        return images

    def generate(self, prompt: str | Sequence[str],
                 references: Sequence[ImageLike | Sequence[ImageLike]] | ReferenceKV,
                 scales: float | Sequence[float] = 1.0, granularity=None, masks=None, steps: int | None = None,
                 guidance: float | None = None, height: int | None = None, width: int | None = None,
                 seed: int | None = None, text_branch: TextBranchSchedule | None = None,
                 output_type: str = "pil", progress: bool = False) -> list[Image.Image] | torch.Tensor:
        """Generate one image per prompt showing the reference subjects.

        Args:
            prompt: a prompt or a list of prompts (batch ``B``).
            references: one image (path or PIL) or a list of views per subject, or a :class:`ReferenceKV` from
                :meth:`encode_references` (encode once, reuse across prompts).
            scales: one scale for all subjects or one per subject, in [0, 10].
            granularity: CLIP level weights (``L`` values, or ``[S][L]``); ``None`` lets the router decide.
            masks: per-subject regions (``(H, W)`` pixels or ``(H/16, W/16)`` tokens, values in [0, 1]).
            steps, guidance, height, width, seed: sampling settings (defaults from the config).
            text_branch: DDS schedule keeping the text-branch injection for the first steps (torch backend only).
            output_type: ``"pil"`` for images, ``"latent"`` for the final packed latents ``[B, N, 64]``.
            progress: show a tqdm bar over the denoising steps.
        """
        return self(prompt, references, scales=scales, granularity=granularity, masks=masks, steps=steps,
                    guidance=guidance, height=height, width=width, seed=seed, text_branch=text_branch,
                    output_type=output_type, progress=progress)
