"""The reference DynaIP pipeline in plain PyTorch: text encoders + CLIP + HMoE fusion + MM-DiT + flow-matching
sampler + VAE. It is the parity oracle of every backend: it shares only the contract with them (request validation,
tokenization, image preprocessing, the numpy noise and schedule) and runs the models directly, as diffusers'
``FluxPipeline`` does.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .attention import ReferenceInputs
from .cli import progress as progress_bar
from .conditioning import DiTCondition, ReferenceKV, dit_feeds
from .configs import DEFAULT_CONFIG
from .dbim import dbim_condition, dbim_feeds
from .errors import InputError
from .images import ImageLike, latents_to_pil, preprocess_clip
from .models import DynaIPModels, clip_levels, decode_latents, dit_forward, encode_text
from .request import GenerationRequest, ValidRequest, auxiliary_rows, check_batch, negative_rows, \
    normalize_granularity, normalize_references, prompt_fields, validate_request
from .sampling import euler_step, flux_sigmas, image_token_count, initial_noise, latent_image_ids, text_ids, \
    true_cfg_velocity, unpack_latents
from .stage_modules import DiTDBIMStep, DiTStep
from .text import normalize_prompts
from .weights import load_family

logger = logging.getLogger(__name__)


class DynaIPPipeline:
    """Personalized text-to-image generation for 1..N subjects with the PyTorch models of ``models``.

    Runs on the models' device and dtype; the caller's models are used as they are (never modified).

    Args:
        dit: the flat DiT step of image-branch steps (:class:`~dynaip_trt.stage_modules.DiTStep`, inputs of
            ``MODEL_IO["dit"]``); default: the fp32 step of ``models``. Quality comparisons pass a reduced-precision
            or FP8 copy. Steps that inject the text branch (DDS schedules) always run the full model.
        on_step: called with ``(step index, the DiT's flat inputs)`` before every image-branch step (calibration
            records them).
    """

    def __init__(self, models: DynaIPModels, dit: nn.Module | None = None,
                 on_step: Callable[[int, dict[str, torch.Tensor]], None] | None = None):
        self.models = models
        self.config = models.config
        self.tokenizers = (models.clip_tokenizer, models.t5_tokenizer)
        self.dit = dit if dit is not None else DiTStep(models.transformer, models.config.adapter.attention_mode)
        self.dbim_dit = DiTDBIMStep(models.transformer, models.config.adapter.attention_mode)  # DBIM's mixing steps
        self.on_step = on_step

    @classmethod
    def from_config(cls, name: str = DEFAULT_CONFIG, seed: int = 0) -> "DynaIPPipeline":
        """The reference models of a named config (the embedded trained weights, or seeded random ones)."""
        return cls(load_family(name, seed=seed))

    @property
    def device(self) -> torch.device:
        return self.models.device

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, self.models.dtype)

    @property
    def num_blocks(self) -> int:
        return len(self.models.adapter.img_kv)

    # ----------------------------------------------------------------------------------------------- stages
    @torch.no_grad()
    def encode_prompt(self, prompts: str | Sequence[str], truncate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (T5 sequence ``[B, Ltxt, D]``, CLIP pooled ``[B, Dp]``) float32."""
        return self._encode_texts(normalize_prompts(prompts, self.tokenizers, truncate))

    def _encode_texts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated prompts (an empty negative prompt included) -> T5 sequence and CLIP pooled, float32."""
        clip_ids = torch.from_numpy(self.models.clip_tokenizer.encode_batch(prompts)).to(self.device)
        t5_ids = torch.from_numpy(self.models.t5_tokenizer.encode_batch(prompts)).to(self.device)
        seq, pooled = encode_text(self.models.clip_text, self.models.t5, clip_ids, t5_ids)
        return seq.float(), pooled.float()

    @torch.no_grad()
    def encode_references(self, references: Sequence[ImageLike | Sequence[ImageLike]], granularity=None,
                          text_branch: bool = False) -> ReferenceKV:
        """Reference images (one image or a list of views per subject) -> :class:`ReferenceKV` of torch tensors
        ``[blocks, 1, S, T, inner]``. Several views of a subject are averaged after the K/V projection (linear)."""
        subjects = normalize_references(references, self.config.max_subjects)
        lw = normalize_granularity(granularity, len(subjects), self.config.adapter.num_levels)
        return self._encode_subjects(subjects, lw, text_branch)

    def _encode_subjects(self, subjects: list[list[Image.Image]], level_weights: np.ndarray | None,
                         text_branch: bool) -> ReferenceKV:
        a, cfg = self.models.adapter, self.config
        parts = []
        for s, views in enumerate(subjects):
            pixels = self._tensor(preprocess_clip(views, cfg.vision))
            levels = clip_levels(self.models.vision, pixels, cfg.adapter.tap_layers, cfg.adapter.encoder
                                 ).unsqueeze(1)  # [V, 1, L, P, C]
            lw = None if level_weights is None else self._tensor(level_weights[s]).expand(len(views), 1, -1)
            tokens = a.reference_tokens(levels, lw)  # [V, 1, T, inner]
            kv = [*a.image_kv(tokens), *(a.text_kv(tokens) if text_branch else (None, None))]
            parts.append([None if t is None else t.float().mean(dim=1, keepdim=True) for t in kv])  # views averaged
        stacked = [None if p[0] is None else torch.cat(list(p), dim=2) for p in zip(*parts)]  # [blocks, 1, S, T, C]
        return ReferenceKV(*stacked)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> list[Image.Image]:
        """Packed latents ``[B, N, 64]`` -> PIL images ``height x width``."""
        vf = self.config.vae.spatial_factor
        unpacked = self._tensor(unpack_latents(latents.float().cpu().numpy(), height, width, vf))
        return latents_to_pil(decode_latents(self.models.vae, unpacked).float().cpu().numpy())

    # ------------------------------------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], references, scales=1.0, granularity=None, masks=None,
                 block_scales=None, steps: int | None = None, guidance: float | None = None, height: int | None = None,
                 width: int | None = None, seed: int | None = None, truncate_prompt: bool = True, text_branch=None,
                 negative_prompt: str | None = None, true_cfg_scale: float = 1.0, dbim_lambda: float | None = None,
                 dbim_steps: float | None = None, subject_word: str | None = None, aux_noun: str | None = None,
                 dbim_map: str | None = None, output_type: str = "pil", progress: bool = True
                 ) -> list[Image.Image] | torch.Tensor:
        """Generate one image per prompt (row ``i`` of a prompt list uses ``seed + i``); the arguments are those of
        :class:`~dynaip_trt.request.GenerationRequest`. Returns PIL images, or the final packed latents
        ``[B, N, 64]`` with ``output_type="latent"``."""
        if output_type not in ("pil", "latent"):
            raise InputError(f"output_type={output_type!r} must be 'pil' or 'latent'")
        fields = prompt_fields(prompt)
        prompts = [prompt] if isinstance(prompt, str) else prompt
        base = self.config.seed if seed is None else seed
        rows = [validate_request(GenerationRequest(
            p, references, scales=scales, granularity=granularity, masks=masks, block_scales=block_scales,
            steps=steps, guidance=guidance, height=height, width=width, seed=base + i if type(base) is int else base,
            truncate_prompt=truncate_prompt, text_branch=text_branch, negative_prompt=negative_prompt,
            true_cfg_scale=true_cfg_scale, dbim_lambda=dbim_lambda, dbim_steps=dbim_steps, subject_word=subject_word,
            aux_noun=aux_noun, dbim_map=dbim_map), self.config, self.tokenizers,
            self.config.max_subjects, self.num_blocks, field) for i, (p, field) in enumerate(zip(prompts, fields))]
        check_batch(rows)
        latents = self.denoise(rows, progress)
        if output_type == "latent":
            return latents
        return self.decode(latents, rows[0].height, rows[0].width)

    @torch.no_grad()
    def denoise(self, rows: Sequence[ValidRequest], progress: bool = True) -> torch.Tensor:
        """The flow-matching loop over a batch of validated requests -> final packed latents ``[B, N, 64]`` float32.

        With true CFG every step runs the DiT on ``2B`` rows (the rows, then their negative rows, see
        :func:`~dynaip_trt.request.negative_rows`) and steps the ``B`` latents with the guided velocity. With DBIM
        the mixing steps run the DBIM step on the rows and their auxiliary rows
        (:func:`~dynaip_trt.request.auxiliary_rows`, the same noise), each row stepping its own latents; then the
        rows go on alone."""
        r0, cfg, dbim = rows[0], self.config, rows[0].dbim
        vf = cfg.vae.spatial_factor
        dit_rows = [*rows, *negative_rows(rows)] if r0.uses_true_cfg else [*rows, *auxiliary_rows(rows)] if dbim \
            else list(rows)
        cond, kv = self._condition(dit_rows)
        noise = np.concatenate([initial_noise(r0.height, r0.width, vf, cfg.vae.latent_channels, r.seed) for r in rows])
        sigmas = flux_sigmas(r0.steps, cond.image_tokens)
        b, b_dit = len(rows), len(dit_rows)
        true_cfg = self._f32([r.true_cfg_scale for r in rows])[:, None, None] if r0.uses_true_cfg else None
        txt_blocks = self._f32(r0.text_branch.block_array(len(self.models.adapter.txt_kv))) if r0.uses_text_branch \
            else None
        x = self._f32(noise)
        if dbim is not None:
            mixing = {k: self._f32(v) for k, v in dbim_feeds(dbim_condition([r.dbim for r in rows])).items()}
            x = torch.cat([x, x])
        logger.debug("generating %d image(s) %dx%d, %d subject(s), %d steps%s", b, r0.height, r0.width,
                     r0.num_subjects, r0.steps, ", true CFG" if true_cfg is not None else "")
        for i in progress_bar(range(r0.steps), "denoise", progress):
            if dbim is not None and i == dbim.steps:  # the mixing steps are over: the rows go on alone
                x, cond, b_dit = x[:b], cond.head(b), b
            t, t_next = self._f32(np.full(b_dit, sigmas[i])), self._f32(np.full(b_dit, sigmas[i + 1]))
            if dbim is not None and dbim.active(i):
                x = self.dbim_dit(**dit_feeds(x, t, t_next, cond), **mixing)[1]
                continue
            if r0.uses_text_branch and r0.text_branch.active(i):
                x = self._text_branch_step(x, t, t_next, cond, kv, txt_blocks)
                continue
            feeds = dit_feeds(x if true_cfg is None else torch.cat([x, x]), t, t_next, cond)
            if self.on_step is not None:
                self.on_step(i, feeds)
            velocity, latents_next = self.dit(**feeds)
            x = latents_next if true_cfg is None else euler_step(x, true_cfg_velocity(velocity, true_cfg),
                                                                 t[:b, None, None], t_next[:b, None, None])
        return x[:b]

    def _f32(self, a) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)

    def _condition(self, rows: Sequence[ValidRequest]) -> tuple[DiTCondition, ReferenceKV]:
        """The DiT inputs of a batch of rows (float32 tensors) and their reference K/V (text branch included when
        the rows use it)."""
        r0, vf = rows[0], self.config.vae.spatial_factor
        text, pooled = self._encode_texts([r.prompt for r in rows])
        kvs = [r.encoded if r.encoded is not None else self._encode_subjects(r.subjects, r.level_weights,
                                                                             r.uses_text_branch) for r in rows]
        kv = ReferenceKV(*(None if getattr(kvs[0], f) is None else torch.cat(
            [getattr(k, f).to(self.device, torch.float32) for k in kvs], dim=1)
            for f in ("img_k", "img_v", "txt_k", "txt_v")))  # [blocks, B, S, T, C]
        n = image_token_count(r0.height, r0.width, vf)
        masks = np.stack([r.masks for r in rows]) if r0.masks is not None else np.ones((len(rows), r0.num_subjects, n))
        cond = DiTCondition(
            text_embeds=text, pooled=pooled, guidance=self._f32([r.guidance for r in rows]),
            img_ids=self._f32(latent_image_ids(r0.height, r0.width, vf)), txt_ids=self._f32(text_ids(text.shape[1])),
            kv=kv.image_only(), scales=self._f32(np.stack([r.scales for r in rows])), masks=self._f32(masks),
            block_scales=self._f32(r0.block_scales))  # rows of a batch share block_scales (batch_key)
        return cond, kv

    def _text_branch_step(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cond: DiTCondition,
                          kv: ReferenceKV, txt_blocks: torch.Tensor) -> torch.Tensor:
        """A DDS step that injects both branches (the full model, in the models' dtype) -> latents_next."""
        c = lambda a: a.to(self.models.dtype)  # noqa: E731
        ref = ReferenceInputs(kv=ReferenceKV(*(None if a is None else c(a) for a in (kv.img_k, kv.img_v, kv.txt_k,
                                                                                        kv.txt_v))),
                              scales=c(cond.scales), masks=c(cond.masks), block_scales=c(cond.block_scales),
                              txt_block_scales=c(txt_blocks), mode=self.config.adapter.attention_mode,
                              image_tokens=x.shape[1])
        v = dit_forward(self.models.transformer, c(x), c(cond.text_embeds), c(cond.pooled), t, cond.guidance,
                        cond.img_ids, cond.txt_ids, ref).float()
        return euler_step(x, v, t[:, None, None], t_next[:, None, None])
