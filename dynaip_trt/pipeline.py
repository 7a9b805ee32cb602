"""The reference DynaIP pipeline: text encoders + CLIP + HMoE fusion + MM-DiT + flow-matching sampler + VAE.

The sampling driver (:class:`DynaIPPipeline`) is written against the small :class:`Stages` interface; the PyTorch
reference stages live here (:class:`TorchStages`), and the runtime supplies ONNX Runtime / TensorRT stages to the
same driver, so every backend samples with exactly the same schedule, noise and request validation.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from .attention import ReferenceInputs
from .configs import DynaIPConfig, get_config
from .errors import ConfigError, InputError
from .images import ImageLike, image_hash, latents_to_pil, preprocess_clip
from .models import DynaIPModels, build_models, clip_levels, decode_latents, encode_text
from .request import (
    TextBranchSchedule,
    check_seed,
    check_subject_count,
    normalize_granularity,
    normalize_masks,
    normalize_references,
    normalize_scales,
    request_defaults,
)
from .sampling import euler_step, flux_sigmas, image_token_count, initial_noise, latent_image_ids, text_ids, \
    unpack_latents
from .text import ByteTokenizer, HFTokenizer, normalize_prompts

logger = logging.getLogger(__name__)


@dataclass
class ReferenceKV:
    """Per-request reference keys/values, computed once and reused at every step.

    ``img_k``/``img_v``: ``[img_blocks, 1, S, N, inner]``; ``txt_k``/``txt_v``: ``[double_blocks, 1, S, N, inner]``
    or ``None`` (text branch dropped, DDS default).
    """

    img_k: torch.Tensor
    img_v: torch.Tensor
    txt_k: torch.Tensor | None = None
    txt_v: torch.Tensor | None = None

    @property
    def num_subjects(self) -> int:
        return self.img_k.shape[2]


def dit_feeds(latents: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor,
              guidance: torch.Tensor, img_ids: torch.Tensor, txt_ids: torch.Tensor, ref: ReferenceInputs
              ) -> dict[str, torch.Tensor]:
    """A :meth:`Stages.dit` call as the flat inputs of the exported DiT (``MODEL_IO["dit"]``): the image-branch
    K/V, scales and masks of ``ref``; masks ``[B, S, N]`` default to ones (on ``latents``' device)."""
    masks = ref.masks
    if masks is None:
        b, s = ref.scales.shape
        masks = torch.ones(b, s, latents.shape[1], device=latents.device)
    return {"latents": latents, "text_embeds": text, "pooled": pooled, "timestep": timestep, "guidance": guidance,
            "img_ids": img_ids, "txt_ids": txt_ids, "img_k": ref.img_k, "img_v": ref.img_v, "scales": ref.scales,
            "masks": masks}


class Stages(Protocol):
    """What a backend provides. Tensors are torch tensors on ``device`` (float32 unless stated)."""

    device: torch.device
    supports_text_branch: bool
    max_subjects: int

    def clip_levels(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[M, 3, S, S]`` -> tapped CLIP hidden states ``[M, L, P, C]``."""

    def reference_kv(self, levels: torch.Tensor, level_weights: torch.Tensor | None, with_text: bool) -> ReferenceKV:
        """``[1, S, L, P, C]`` (+ override ``[1, S, L]``) -> reference K/V for every injected block."""

    def encode_text(self, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 ids ``[B, 77]``, ``[B, L]`` -> (``[B, L, t5_dim]``, pooled ``[B, clip_dim]``)."""

    def dit(self, latents: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor,
            guidance: torch.Tensor, img_ids: torch.Tensor, txt_ids: torch.Tensor, ref: ReferenceInputs
            ) -> torch.Tensor:
        """One MM-DiT evaluation: packed latents ``[B, N, 64]`` -> velocity ``[B, N, 64]``."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked latents ``[B, 16, h, w]`` -> images ``[B, 3, 8h, 8w]`` in [-1, 1]."""


class TorchStages:
    """PyTorch reference stages over a :class:`DynaIPModels` family."""

    supports_text_branch = True

    def __init__(self, models: DynaIPModels, max_subjects: int | None = None):
        self.models = models
        self.device = models.device
        self.max_subjects = max_subjects or models.config.max_subjects

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.models.dtype)

    @torch.no_grad()
    def clip_levels(self, pixels: torch.Tensor) -> torch.Tensor:
        return clip_levels(self.models.vision, self._cast(pixels), self.models.config.adapter.tap_layers).float()

    @torch.no_grad()
    def reference_kv(self, levels: torch.Tensor, level_weights: torch.Tensor | None, with_text: bool) -> ReferenceKV:
        a = self.models.adapter
        lw = None if level_weights is None else self._cast(level_weights)
        tokens = a.reference_tokens(self._cast(levels), lw)
        img_k, img_v = a.image_kv(tokens)
        txt_k, txt_v = a.text_kv(tokens) if with_text else (None, None)
        return ReferenceKV(img_k, img_v, txt_k, txt_v)

    @torch.no_grad()
    def encode_text(self, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq, pooled = encode_text(self.models.clip_text, self.models.t5, clip_ids.to(self.device),
                                  t5_ids.to(self.device))
        return seq.float(), pooled.float()

    @torch.no_grad()
    def dit(self, latents, text, pooled, timestep, guidance, img_ids, txt_ids, ref: ReferenceInputs) -> torch.Tensor:
        c = self._cast
        ref = ReferenceInputs(
            img_k=c(ref.img_k), img_v=c(ref.img_v), scales=c(ref.scales),
            masks=None if ref.masks is None else c(ref.masks),
            block_scales=None if ref.block_scales is None else c(ref.block_scales),
            txt_k=None if ref.txt_k is None else c(ref.txt_k), txt_v=None if ref.txt_v is None else c(ref.txt_v),
            txt_block_scales=None if ref.txt_block_scales is None else c(ref.txt_block_scales),
            mode=ref.mode, image_tokens=ref.image_tokens,
        )
        out = self.models.transformer(
            hidden_states=c(latents), encoder_hidden_states=c(text), pooled_projections=c(pooled),
            timestep=c(timestep), guidance=c(guidance), img_ids=img_ids.to(self.device),
            txt_ids=txt_ids.to(self.device), joint_attention_kwargs={"dynaip": ref}, return_dict=False,
        )[0]
        return out.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.models.vae, self._cast(latents)).float()


class DynaIPPipeline:
    """Personalized text-to-image generation for 1..N subjects.

    Args:
        config: the model config (sizes, defaults).
        stages: the backend (PyTorch reference here; ONNX Runtime / TensorRT in :mod:`runtime`).
        clip_tokenizer, t5_tokenizer: tokenizers of the two text encoders.
        cache_size: reference encodings kept (an int >= 0; 0 disables the cache), keyed by image content hash,
            level weights and whether the text branch was encoded.
    """

    def __init__(self, config: DynaIPConfig, stages: Stages, clip_tokenizer: ByteTokenizer | HFTokenizer,
                 t5_tokenizer: ByteTokenizer | HFTokenizer, cache_size: int = 32):
        self.config = config
        self.stages = stages
        self.clip_tokenizer = clip_tokenizer
        self.t5_tokenizer = t5_tokenizer
        if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 0:
            raise ConfigError(f"cache_size={cache_size!r} must be an int >= 0")
        self._cache: OrderedDict[str, ReferenceKV] = OrderedDict()
        self.cache_size = cache_size

    @classmethod
    def from_models(cls, models: DynaIPModels) -> "DynaIPPipeline":
        return cls(models.config, TorchStages(models), models.clip_tokenizer, models.t5_tokenizer)

    @classmethod
    def from_config(cls, name: str = "tiny", seed: int = 0) -> "DynaIPPipeline":
        """The embedded default: real model classes at the named config's sizes with seeded random weights."""
        return cls.from_models(build_models(get_config(name), seed=seed))

    # ----------------------------------------------------------------------------------------------- stages
    def encode_prompt(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (T5 sequence ``[B, L, t5_dim]``, CLIP pooled ``[B, clip_dim]``)."""
        t = self.config.text
        prompts = normalize_prompts(prompts, self.t5_tokenizer, t.max_text_length)
        clip_ids = torch.from_numpy(self.clip_tokenizer.encode_batch(prompts, t.clip_max_length))
        t5_ids = torch.from_numpy(self.t5_tokenizer.encode_batch(prompts, t.max_text_length))
        return self.stages.encode_text(clip_ids, t5_ids)

    def encode_references(self, references: Sequence[ImageLike | Sequence[ImageLike]], granularity=None,
                          text_branch: bool = False) -> ReferenceKV:
        """Reference images (one image or a list of views per subject) -> :class:`ReferenceKV`.

        Runs CLIP and the fusion module once per request; several views of a subject are averaged at the
        reference-token level (after the K/V projection, which is linear). Cached by image content.
        """
        subjects = normalize_references(references, self.stages.max_subjects)
        lw = normalize_granularity(granularity, len(subjects), self.config.adapter.num_levels)
        key = self._cache_key(subjects, lw, text_branch)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        flat = [im for views in subjects for im in views]
        levels = self.stages.clip_levels(torch.from_numpy(preprocess_clip(flat, self.config.vision)))
        per_subject, start = [], 0
        for s, views in enumerate(subjects):  # average the views of each subject
            lws = None if lw is None else lw[:, s : s + 1].expand(len(views), -1, -1)  # [views, 1, L]
            kv = self.stages.reference_kv(levels[start : start + len(views)].unsqueeze(1), lws, text_branch)
            per_subject.append(kv)
            start += len(views)
        ref = ReferenceKV(*(self._stack_subjects([getattr(kv, f) for kv in per_subject])
                            for f in ("img_k", "img_v", "txt_k", "txt_v")))
        self._cache[key] = ref
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return ref

    @staticmethod
    def _stack_subjects(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
        """Per subject ``[blocks, views, 1, N, C]`` -> ``[blocks, 1, S, N, C]`` (views averaged)."""
        if parts[0] is None:
            return None
        return torch.cat([p.mean(dim=1) for p in parts], dim=1).unsqueeze(1)

    @staticmethod
    def _cache_key(subjects: list[list[Image.Image]], lw: torch.Tensor | None, text_branch: bool) -> str:
        h = hashlib.sha256(str(text_branch).encode())
        for views in subjects:
            for im in views:
                h.update(image_hash(im).encode())
            h.update(b"|")
        if lw is not None:
            h.update(lw.numpy().tobytes())
        return h.hexdigest()

    def denoise(self, latents: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, ref: ReferenceKV,
                scales: torch.Tensor, masks: torch.Tensor | None, height: int, width: int, steps: int,
                guidance: float, text_branch: TextBranchSchedule | None = None, progress: bool = True
                ) -> torch.Tensor:
        """The flow-matching loop. latents ``[B, N, 64]`` -> denoised latents ``[B, N, 64]`` (float32)."""
        dev = self.stages.device
        b = latents.shape[0]
        vf = self.config.vae.spatial_factor
        n_img = image_token_count(height, width, vf)
        sigmas = flux_sigmas(steps, n_img)
        # everything constant across steps goes to the device once, so the loop itself never copies from the host
        img_ids, txt_ids = latent_image_ids(height, width, vf).to(dev), text_ids(text.shape[1]).to(dev)
        g = torch.full((b,), float(guidance), device=dev)
        expand = (lambda t: None if t is None else t.expand(-1, b, -1, -1, -1))  # noqa: E731
        scales_b = scales.expand(b, -1).to(dev)
        masks_b = None if masks is None else masks.expand(b, -1, -1).to(dev)
        has_txt = text_branch is not None and ref.txt_k is not None
        txt_blocks = text_branch.block_tensor(ref.txt_k.shape[0]).to(dev) if has_txt else None
        x = latents.to(dev)
        for i in tqdm(range(steps), desc="denoise", disable=not progress, leave=False):
            use_txt = has_txt and text_branch.active(i)
            inputs = ReferenceInputs(
                img_k=expand(ref.img_k), img_v=expand(ref.img_v), scales=scales_b, masks=masks_b,
                txt_k=expand(ref.txt_k) if use_txt else None, txt_v=expand(ref.txt_v) if use_txt else None,
                txt_block_scales=txt_blocks if use_txt else None,
                mode=self.config.adapter.attention_mode, image_tokens=n_img,
            )
            t = torch.full((b,), float(sigmas[i]), device=dev)
            v = self.stages.dit(x, text, pooled, t, g, img_ids, txt_ids, inputs)
            x = euler_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
        return x

    def decode(self, latents: torch.Tensor, height: int, width: int) -> list[Image.Image]:
        """Packed latents ``[B, N, 64]`` -> PIL images ``height x width``."""
        unpacked = unpack_latents(latents, height, width, self.config.vae.spatial_factor)
        return latents_to_pil(self.stages.decode(unpacked).cpu().numpy())

    # ------------------------------------------------------------------------------------------------ call
    def __call__(self, prompt: str | Sequence[str],
                 references: Sequence[ImageLike | Sequence[ImageLike]] | ReferenceKV,
                 scales: float | Sequence[float] = 1.0, granularity=None, masks=None, steps: int | None = None,
                 guidance: float | None = None, height: int | None = None, width: int | None = None,
                 seed: int | None = None, text_branch: TextBranchSchedule | None = None,
                 output_type: str = "pil", progress: bool = True) -> list[Image.Image] | torch.Tensor:
        """Generate one image per prompt showing the reference subjects.

        ``references``: one image (or list of views) per subject, or a :class:`ReferenceKV` from
        :meth:`encode_references` to reuse one encoding across prompts. Returns PIL images, or the final packed
        latents ``[B, N, 64]`` with ``output_type="latent"``.
        """
        if output_type not in ("pil", "latent"):
            raise InputError(f"output_type={output_type!r} must be 'pil' or 'latent'")
        steps, guidance, height, width = request_defaults(self.config, steps, guidance, height, width)
        seed = check_seed(self.config.seed if seed is None else seed)
        prompts = normalize_prompts(prompt, self.t5_tokenizer, self.config.text.max_text_length)
        if text_branch is not None and not isinstance(text_branch, TextBranchSchedule):
            raise InputError(f"text_branch must be a TextBranchSchedule or None, got {type(text_branch).__name__}")
        use_txt = text_branch is not None and text_branch.steps > 0
        if use_txt and not self.stages.supports_text_branch:
            raise InputError("text_branch schedules need the torch backend (exported engines drop the text branch)")
        if isinstance(references, ReferenceKV):  # encoded once with encode_references(), reused across prompts
            if granularity is not None:
                raise InputError("granularity applies when references are encoded: pass it to encode_references()")
            if use_txt and references.txt_k is None:
                raise InputError("text_branch needs references encoded with encode_references(text_branch=True)")
            check_subject_count(references.num_subjects, self.stages.max_subjects)
            ref = references
        else:
            ref = self.encode_references(references, granularity, text_branch=use_txt)
        s = ref.num_subjects
        scale_t = normalize_scales(scales, s)
        mask_t = normalize_masks(masks, s, height, width, self.config.vae.spatial_factor)
        text, pooled = self.encode_prompt(prompts)
        vf = self.config.vae.spatial_factor
        noise = initial_noise(len(prompts), height, width, vf, self.config.vae.latent_channels, seed)
        logger.info("generating %d image(s) %dx%d, %d subject(s), %d steps", len(prompts), height, width, s, steps)
        x = self.denoise(noise, text, pooled, ref, scale_t, mask_t, height, width, steps, guidance, text_branch,
                         progress)
        if output_type == "latent":
            return x
        return self.decode(x, height, width)
