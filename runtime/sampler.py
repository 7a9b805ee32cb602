"""The sampling loop of the runtime over any :class:`~runtime.stages.Stages` (numpy on the host; the denoising
loop itself runs on the backend's device inside a :class:`~runtime.stages.DenoiseSession`).

Per request: validation (:func:`dynaip_trt.request.validate_request`), reference encoding (CLIP + fusion, cached per
subject), prompt encoding (cached per prompt), seeded numpy noise per row, FLUX's shifted schedule, the denoising
loop, and decoding. Rows of a batch may have different prompts, references, scales, masks, guidance and seeds; they
share :func:`~dynaip_trt.request.batch_key`. With DBIM the DiT also runs each row's auxiliary row (its auxiliary
prompt, adapter scale 0, the row's noise) during the mixing steps.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Sequence

import numpy as np
from PIL import Image

from dynaip_trt.cli import progress as progress_bar
from dynaip_trt.conditioning import DiTCondition, ReferenceKV
from dynaip_trt.configs import DynaIPConfig
from dynaip_trt.dbim import dbim_condition
from dynaip_trt.errors import InputError
from dynaip_trt.images import image_hash, latents_to_pil, preprocess_clip
from dynaip_trt.request import GenerationRequest, ValidRequest, auxiliary_rows, check_batch, negative_rows, \
    normalize_granularity, normalize_references, validate_request
from dynaip_trt.sampling import flux_sigmas, image_token_count, initial_noise, latent_image_ids, text_ids, \
    unpack_latents
from dynaip_trt.text import Tokenizer

from .cache import ByteLRU
from .stages import Stages

logger = logging.getLogger(__name__)

TEXT_BRANCH_MESSAGE = ("text_branch schedules need the torch backend: exported graphs and engines hold the image "
                       "branch only (the text branch is dropped at inference, DDS)")


class Sampler:
    """Generation over ``stages``: what :class:`~runtime.engine.DynaIPEngine` runs under its lock.

    Args:
        config: the model config (sizes, defaults, levels).
        stages: the backend.
        tokenizers: the CLIP and T5 tokenizers (ids ``[B, Lclip]`` and ``[B, Ltxt]``).
        num_blocks: injected blocks of the DiT (length of ``block_scales``).
        cache_bytes: budget of each cache (reference K/V per subject, prompt embeddings per prompt); 0 disables.
    """

    def __init__(self, config: DynaIPConfig, stages: Stages, tokenizers: tuple[Tokenizer, Tokenizer],
                 num_blocks: int, cache_bytes: int = 256 * 2**20):
        self.config = config
        self.stages = stages
        self.tokenizers = tokenizers
        self.num_blocks = num_blocks
        self.references: ByteLRU[ReferenceKV] = ByteLRU(cache_bytes)
        self.prompts: ByteLRU[tuple[np.ndarray, np.ndarray]] = ByteLRU(cache_bytes)

    # --------------------------------------------------------------------------------------------- requests
    def validate(self, request: GenerationRequest, prompt_field: str = "prompt") -> ValidRequest:
        row = validate_request(request, self.config, self.tokenizers, self.stages.max_subjects, self.num_blocks,
                               prompt_field)
        if row.uses_text_branch and not self.stages.supports_text_branch:
            raise InputError(TEXT_BRANCH_MESSAGE)
        if row.dbim is not None and self.stages.dbim_unavailable:
            raise InputError(self.stages.dbim_unavailable)
        return row

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> T5 sequence ``[B, Ltxt, D]`` and CLIP pooled ``[B, Dp]`` (each prompt cached)."""
        out = []
        for prompt in prompts:
            hit = self.prompts.get(prompt)
            if hit is None:
                clip_tok, t5_tok = self.tokenizers
                hit = self.stages.encode_text(clip_tok.encode_batch([prompt]), t5_tok.encode_batch([prompt]))
                self.prompts.put(prompt, hit)
            out.append(hit)
        return np.concatenate([t for t, _ in out]), np.concatenate([p for _, p in out])

    def encode_subjects(self, subjects: list[list[Image.Image]], level_weights: np.ndarray | None,
                        text_branch: bool = False) -> ReferenceKV:
        """Views per subject -> reference K/V ``[blocks, 1, S, T, inner]``; the views of a subject are averaged
        after the K/V projection (linear). Each subject is cached by its images' content, its level weights and
        the branches encoded."""
        parts = []
        for s, views in enumerate(subjects):
            lw = None if level_weights is None else level_weights[s]
            key = self._subject_key(views, lw, text_branch)
            kv = self.references.get(key)
            if kv is None:
                levels = self.stages.clip_levels(preprocess_clip(views, self.config.vision))  # [V, L, P, C]
                lws = None if lw is None else np.broadcast_to(lw, (len(views), 1, len(lw))).copy()  # [V, 1, L]
                per_view = self.stages.reference_kv(levels[:, None], lws, text_branch)  # [blocks, V, 1, T, C]
                kv = ReferenceKV(*(None if a is None else a.mean(axis=1, keepdims=True)
                                   for a in (per_view.img_k, per_view.img_v, per_view.txt_k, per_view.txt_v)))
                self.references.put(key, kv)
            parts.append(kv)
        return concat_kv(parts, axis=2)

    def encode_references(self, references, granularity=None, text_branch: bool = False) -> ReferenceKV:
        """Public form of :meth:`encode_subjects` (validates ``references`` and ``granularity``)."""
        subjects = normalize_references(references, self.stages.max_subjects)
        lw = normalize_granularity(granularity, len(subjects), self.config.adapter.num_levels)
        if text_branch and not self.stages.supports_text_branch:
            raise InputError(TEXT_BRANCH_MESSAGE)
        return self.encode_subjects(subjects, lw, text_branch)

    @staticmethod
    def _subject_key(views: list[Image.Image], level_weights: np.ndarray | None, text_branch: bool) -> str:
        h = hashlib.sha256(b"text" if text_branch else b"image")
        for im in views:
            h.update(image_hash(im).encode())
        if level_weights is not None:
            h.update(np.ascontiguousarray(level_weights, dtype=np.float32).tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------------------------------------ loop
    def condition(self, rows: Sequence[ValidRequest]) -> DiTCondition:
        """The DiT inputs that stay constant over the loop, for a batch of compatible rows."""
        r0, cfg = rows[0], self.config
        vf = cfg.vae.spatial_factor
        n = image_token_count(r0.height, r0.width, vf)
        text, pooled = self.encode_prompts([r.prompt for r in rows])
        kv = concat_kv([r.encoded if r.encoded is not None else
                        self.encode_subjects(r.subjects, r.level_weights, r.uses_text_branch) for r in rows], axis=1)
        masks = np.stack([r.masks if r.masks is not None else np.ones((r.num_subjects, n), np.float32) for r in rows])
        return DiTCondition(
            text_embeds=text, pooled=pooled, guidance=np.asarray([r.guidance for r in rows], np.float32),
            img_ids=latent_image_ids(r0.height, r0.width, vf), txt_ids=text_ids(text.shape[1]),
            kv=kv if r0.uses_text_branch else kv.image_only(), scales=np.stack([r.scales for r in rows]),
            masks=masks, block_scales=r0.block_scales,
            txt_block_scales=r0.text_branch.block_array(kv.txt_k.shape[0]) if r0.uses_text_branch else None)

    def run(self, rows: Sequence[ValidRequest], progress: bool = False) -> np.ndarray:
        """Denoise a batch of compatible rows -> final packed latents ``[B, N, 64]`` float32."""
        check_batch(rows)
        r0, cfg = rows[0], self.config
        vf = cfg.vae.spatial_factor
        noise = np.concatenate([initial_noise(r0.height, r0.width, vf, cfg.vae.latent_channels, r.seed)
                                for r in rows])
        logger.debug("generating %d image(s) %dx%d, %d subject(s), %d steps on %s%s", len(rows), r0.height, r0.width,
                     r0.num_subjects, r0.steps, self.stages.backend, " with true CFG" if r0.uses_true_cfg else "")
        if r0.uses_true_cfg:  # the DiT runs the rows, then their negative rows
            cond = self.condition([*rows, *negative_rows(rows)])
            session = self.stages.denoise_session(noise, cond, np.asarray([r.true_cfg_scale for r in rows],
                                                                          np.float32))
        elif r0.dbim is not None:  # the mixing steps run the rows, then their auxiliary rows
            cond = self.condition([*rows, *auxiliary_rows(rows)])
            session = self.stages.denoise_session(noise, cond, dbim=dbim_condition([r.dbim for r in rows]))
        else:
            cond = self.condition(rows)
            session = self.stages.denoise_session(noise, cond)
        sigmas = flux_sigmas(r0.steps, cond.image_tokens)
        for i in progress_bar(range(r0.steps), "denoise", progress):
            session.step(float(sigmas[i]), float(sigmas[i + 1]),
                         text_branch=r0.uses_text_branch and r0.text_branch.active(i))
        return session.latents()

    def decode(self, latents: np.ndarray, height: int, width: int) -> list[Image.Image]:
        """Packed latents ``[B, N, 64]`` -> PIL images ``height x width``."""
        unpacked = unpack_latents(latents, height, width, self.config.vae.spatial_factor)
        return latents_to_pil(self.stages.decode(unpacked))


def concat_kv(parts: Sequence[ReferenceKV], axis: int) -> ReferenceKV:
    """Concatenate reference K/V along the batch (1) or subject (2) axis; the text branch only if all have it."""
    def cat(field: str):
        arrays = [getattr(p, field) for p in parts]
        return None if any(a is None for a in arrays) else np.concatenate(arrays, axis=axis)

    return ReferenceKV(cat("img_k"), cat("img_v"), cat("txt_k"), cat("txt_v"))
