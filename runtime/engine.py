"""``DynaIPEngine``: the deployable entry point over any backend.

An engine composes a backend's :class:`~runtime.stages.Stages` with the sampling loop (:class:`~runtime.sampler.
Sampler`: validation, caches, noise, schedule) and a lock, so one engine can be shared by threads. The ONNX Runtime
and TensorRT backends load no torch, diffusers or transformers; the torch backend (``from_config``,
``from_weights``, ``from_models``) imports them on first use.

    engine = DynaIPEngine.from_dir("build/tiny", backend="onnxruntime")
    image = engine.generate("a photo of the two subjects on a beach", ["a.png", "b.png"], seed=1)[0]
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from dynaip_trt.conditioning import ReferenceKV
from dynaip_trt.configs import DEFAULT_CONFIG, DynaIPConfig
from dynaip_trt.errors import ConfigError, InputError
from dynaip_trt.images import ImageLike
from dynaip_trt.manifest import Manifest, max_batch_of
from dynaip_trt.request import GenerationRequest, batch_key, prompt_fields
from dynaip_trt.text import Tokenizer

from .sampler import Sampler
from .stages import Stages

logger = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "onnxruntime", "torch")
DEFAULT_CACHE_BYTES = 256 * 2**20
OUTPUT_TYPES = ("pil", "latent")


class DynaIPEngine:
    """DynaIP generation on the ``tensorrt``, ``onnxruntime`` or ``torch`` backend; safe to share across threads.

    Build one with :meth:`from_dir` (a build folder of ``export.onnx`` / ``export.build``), :meth:`from_config`
    (the embedded default or seeded reference models) or :meth:`from_weights` (local checkpoints). Calls are
    serialised by a re-entrant lock: concurrent callers wait, and get the results sequential calls give.

    Args:
        config: the model config; stages: the backend; tokenizers: the CLIP and T5 tokenizers.
        cache_bytes: budget of the reference K/V cache and of the prompt-embedding cache (each; 0 disables them).
        info: what :meth:`summary` reports besides the config (the build's precision and profiles).
    """

    def __init__(self, config: DynaIPConfig, stages: Stages, tokenizers: tuple[Tokenizer, Tokenizer],
                 cache_bytes: int = DEFAULT_CACHE_BYTES, info: dict[str, Any] | None = None):
        self.sampler = Sampler(config, stages, tokenizers, config.injected_blocks, cache_bytes)
        self.info = dict(info or {})
        self._lock = threading.RLock()

    @property
    def config(self) -> DynaIPConfig:
        return self.sampler.config

    @property
    def stages(self) -> Stages:
        return self.sampler.stages

    @property
    def backend(self) -> str:
        return self.stages.backend

    @property
    def max_subjects(self) -> int:
        return self.stages.max_subjects

    @property
    def max_batch(self) -> int | None:
        """The largest batch one call may have (the build's profile), or ``None`` (torch: memory permitting)."""
        return self.info.get("max_batch")

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_dir(cls, path: str | Path, backend: str = "onnxruntime", device: str | None = None,
                 precision: str = "fp32", providers: Sequence[str] | None = None, cuda_graphs: bool = True,
                 threads: int = 0, cache_bytes: int = DEFAULT_CACHE_BYTES) -> "DynaIPEngine":
        """Load a build folder (``manifest.json`` + the files it lists; hashes verified before loading).

        Args:
            backend: ``"onnxruntime"`` (the ONNX graphs) or ``"tensorrt"`` (the engines of ``export.build``).
            device: ONNX Runtime: ``"cpu"`` or ``"cuda[:N]"`` (default: CUDA when onnxruntime-gpu sees a GPU, else
                CPU). TensorRT: ``"cuda[:N]"`` (default the first GPU).
            precision: ONNX Runtime: ``"fp32"`` or a variant the build lists (``"fp16"``, ``"fp8"``); TensorRT
                engines have the precision they were built with.
            providers: ONNX Runtime execution providers, overriding ``device``.
            cuda_graphs: TensorRT: replay the denoising step from a CUDA graph per shape bucket.
            threads: ONNX Runtime intra-op threads per session (0: ONNX Runtime's default), so replicas sharing a
                machine can split its cores.
            cache_bytes: see the class.
        """
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
        if backend == "torch":
            raise ConfigError("backend 'torch' runs PyTorch weights, not a build folder: use "
                              "DynaIPEngine.from_config(name) or DynaIPEngine.from_weights(base, clip, adapter)")
        manifest = Manifest.load(path)
        cfg = manifest.dynaip_config
        if backend == "onnxruntime":
            from .ort_backend import OrtStages

            stages: Stages = OrtStages(path, manifest, device=device, providers=providers, precision=precision,
                                       threads=threads)
        else:
            from .trt_backend import TrtStages

            if precision != "fp32":
                raise ConfigError("the precision of TensorRT engines is fixed when they are built (export.build); "
                                  "precision= applies to the onnxruntime backend")
            stages = TrtStages(path, manifest, device=_cuda_index(device), cuda_graphs=cuda_graphs)
        tokenizers = (Tokenizer.load(Path(path) / "tokenizer", cfg.text.clip_max_length),
                      Tokenizer.load(Path(path) / "tokenizer_2", cfg.text.max_text_length))
        info = {"build": str(path), "precision": precision if backend == "onnxruntime" else
                (manifest.tensorrt or {}).get("precision"), "max_batch": max_batch_of(manifest),
                "profiles": {name: entry.profile for name, entry in manifest.models.items()}}
        return cls(cfg, stages, tokenizers, cache_bytes, info)

    @classmethod
    def from_models(cls, models, cuda_graphs: bool = True, fp8: bool = False,
                    cache_bytes: int = DEFAULT_CACHE_BYTES) -> "DynaIPEngine":
        """Torch backend over an in-memory :class:`~dynaip_trt.models.DynaIPModels` family (on its device). The
        caller's models are never modified.

        ``fp8``: run the DiT's block linear layers as FP8 GEMMs (``torch._scaled_mm``, dynamic per-tensor input
        scales) on a converted copy of the transformer; GPUs need FP8 tensor cores (compute capability 8.9+).
        """
        from .torch_backend import TorchStages

        stages = TorchStages(models, cuda_graphs=cuda_graphs, fp8=fp8)
        return cls(models.config, stages, (models.clip_tokenizer, models.t5_tokenizer), cache_bytes,
                   {"precision": f"torch {'fp8' if fp8 else str(models.dtype).removeprefix('torch.')}"})

    @classmethod
    def from_config(cls, name: str = DEFAULT_CONFIG, seed: int = 0, device: str = "cpu", dtype=None,
                    cuda_graphs: bool = True, fp8: bool = False, cache_bytes: int = DEFAULT_CACHE_BYTES
                    ) -> "DynaIPEngine":
        """Torch backend over a named config's weights (embedded, or seeded random for ``tiny-random`` and
        ``flux-dev``). On a CUDA ``device`` the denoising step replays from a CUDA graph per shape bucket unless
        ``cuda_graphs=False``; ``fp8``: see :meth:`from_models`."""
        from .torch_backend import load_models_on

        return cls.from_models(load_models_on(device, dtype, config=name, seed=seed), cuda_graphs, fp8, cache_bytes)

    @classmethod
    def from_weights(cls, base_dir: str | Path, clip_dir: str | Path, adapter_path: str | Path | None = None,
                     device: str = "cpu", dtype=None, cuda_graphs: bool = True, fp8: bool = False,
                     cache_bytes: int = DEFAULT_CACHE_BYTES) -> "DynaIPEngine":
        """Torch backend over local checkpoints (see :func:`dynaip_trt.weights.load_models`)."""
        from .torch_backend import load_models_on

        models = load_models_on(device, dtype, base=base_dir, clip=clip_dir, adapter=adapter_path)
        return cls.from_models(models, cuda_graphs, fp8, cache_bytes)

    # ------------------------------------------------------------------------------------------------- calls
    def generate(self, prompt: str | Sequence[str], references: Sequence[ImageLike | Sequence[ImageLike]] | ReferenceKV,
                 scales: float | Sequence[float] = 1.0, granularity=None, masks=None, block_scales=None,
                 steps: int | None = None, guidance: float | None = None, height: int | None = None,
                 width: int | None = None, seed: int | None = None, truncate_prompt: bool = True, text_branch=None,
                 negative_prompt: str | None = None, true_cfg_scale: float = 1.0, dbim_lambda: float | None = None,
                 dbim_steps: float | None = None, subject_word: str | None = None, aux_noun: str | None = None,
                 dbim_map: str | None = None, output_type: str = "pil", progress: bool = False
                 ) -> list[Image.Image] | np.ndarray:
        """Generate one image per prompt showing the reference subjects.

        The arguments are the fields of :class:`~dynaip_trt.request.GenerationRequest` (see there); a list of
        prompts shares the references and settings, and row ``i`` uses noise seed ``seed + i``. ``output_type``:
        ``"pil"`` for images, ``"latent"`` for the final packed latents ``[B, N, 64]``; ``progress``: a bar over
        the denoising steps.
        """
        fields = prompt_fields(prompt)
        prompts = [prompt] if isinstance(prompt, str) else prompt
        base = self.config.seed if seed is None else seed
        requests = [GenerationRequest(
            p, references, scales=scales, granularity=granularity, masks=masks, block_scales=block_scales,
            steps=steps, guidance=guidance, height=height, width=width,
            seed=base + i if type(base) is int else base, truncate_prompt=truncate_prompt, text_branch=text_branch,
            negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale, dbim_lambda=dbim_lambda,
            dbim_steps=dbim_steps, subject_word=subject_word, aux_noun=aux_noun, dbim_map=dbim_map)
            for i, p in enumerate(prompts)]
        return self._generate(requests, fields, output_type, progress)

    def generate_batch(self, requests: Sequence[GenerationRequest], output_type: str = "pil",
                       progress: bool = False) -> list[Image.Image] | np.ndarray:
        """One image per request, generated as one batch: the requests must share :meth:`batch_key` (steps, size,
        subject count, masks or not, block scales, DDS schedule, true CFG or not) and be at most :attr:`max_batch`
        (half of it with true CFG: each request adds its negative row); each keeps its
        own prompt, references, scales, masks, guidance and seed, and gets the image it would get alone."""
        if not isinstance(requests, (list, tuple)) or not requests:
            raise InputError("requests must be a non-empty list of GenerationRequest")
        return self._generate(requests, [f"requests[{i}].prompt" for i in range(len(requests))], output_type,
                              progress)

    def _generate(self, requests: Sequence[GenerationRequest], prompt_fields: list[str], output_type: str,
                  progress: bool) -> list[Image.Image] | np.ndarray:
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type={output_type!r} must be 'pil' or 'latent'")
        if self.max_batch is not None and len(requests) > self.max_batch:
            raise InputError(f"{len(requests)} requests in one batch; this build serves batches of 1..{self.max_batch} "
                             f"(rebuild with export.build --batch)")
        with self._lock:
            rows = [self.sampler.validate(r, f) for r, f in zip(requests, prompt_fields)]
            doubled = "true CFG" if rows[0].uses_true_cfg else "DBIM" if rows[0].dbim is not None else None
            if doubled and self.max_batch is not None and 2 * len(rows) > self.max_batch:
                extra = "negative row" if rows[0].uses_true_cfg else "auxiliary row"
                raise InputError(f"{len(rows)} request(s) with {doubled} run {2 * len(rows)} DiT rows (each with its "
                                 f"{extra}); this build serves batches of 1..{self.max_batch} (rebuild with "
                                 f"export.build --batch)")
            latents = self.sampler.run(rows, progress)
            if output_type == "latent":
                return latents
            return self.sampler.decode(latents, rows[0].height, rows[0].width)

    def batch_key(self, request: GenerationRequest) -> tuple:
        """What requests must share to be generated in one :meth:`generate_batch` call (validates ``request``)."""
        return batch_key(self.sampler.validate(request))

    def encode_references(self, references: Sequence[ImageLike | Sequence[ImageLike]], granularity=None,
                          text_branch: bool = False) -> ReferenceKV:
        """Encode reference images once (CLIP + fusion) to reuse across prompts: pass the result as
        ``references`` to :meth:`generate`. K/V ``[blocks, 1, S, T, inner]`` (numpy)."""
        with self._lock:
            return self.sampler.encode_references(references, granularity, text_branch)

    def cache_stats(self) -> dict[str, dict[str, int]]:
        """Hits, misses, bytes and entries of the reference and prompt caches."""
        return {"references": self.sampler.references.stats(), "prompts": self.sampler.prompts.stats()}

    def clear_caches(self) -> None:
        """Forget every cached reference encoding and prompt embedding."""
        self.sampler.references.clear()
        self.sampler.prompts.clear()

    def summary(self) -> dict[str, Any]:
        """What this engine serves: backend, config name, precision, subjects, batch, resolutions, options."""
        cfg = self.config
        fields = [f.name for f in dataclasses.fields(GenerationRequest)]
        return {"backend": self.backend, "config": cfg.name, "max_subjects": self.max_subjects,
                "default_size": [cfg.height, cfg.width], "pixel_multiple": cfg.pixel_multiple,
                "levels": cfg.adapter.num_levels, "blocks": cfg.injected_blocks, "options": fields, **self.info}


def _cuda_index(device: str | None) -> int:
    """``None``/``"cuda"`` -> 0, ``"cuda:N"`` -> N; anything else is a :class:`ConfigError`."""
    if device is None or device == "cuda":
        return 0
    head, _, index = str(device).partition(":")
    if head != "cuda" or not index.isdigit():
        raise ConfigError(f"the tensorrt backend runs on a CUDA device ('cuda' or 'cuda:N'), not {device!r}")
    return int(index)
