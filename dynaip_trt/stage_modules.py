"""The five models of a build as ``nn.Module``\\ s with the flat tensor signature of
:data:`dynaip_trt.manifest.MODEL_IO` (no Python objects, no optional inputs): what ``export`` turns into ONNX graphs,
what calibration runs, and what the runtime's torch backend calls, so every path computes the same thing.

Each runs in a compute ``dtype`` (a converted copy of the caller's modules when it differs: the caller's models are
never changed); float inputs are cast in and outputs come back float32, token ids stay int64.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .adapter import DynaIPAdapter
from .attention import DBIMInputs, ReferenceInputs
from .conditioning import ReferenceKV
from .models import clip_levels, decode_latents, dit_forward, encode_text
from .sampling import euler_step


class FlatModule(nn.Module):
    """Base of the flat modules: owns its submodules in ``dtype`` (``None``: as given)."""

    def __init__(self, dtype: torch.dtype | None = None):
        super().__init__()
        self.dtype = dtype

    def own(self, module: nn.Module) -> nn.Module:
        """``module`` itself, or a copy converted to ``self.dtype`` when its dtype differs."""
        current = next(module.parameters()).dtype
        if self.dtype is None or self.dtype == current:
            return module
        return copy.deepcopy(module).to(self.dtype)

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.dtype is None or not x.is_floating_point() else x.to(self.dtype)


class ClipLevels(FlatModule):
    """pixel_values ``[M, 3, S, S]`` -> levels ``[M, L, P, C]``: tapped CLIP hidden states, or the pooled embedding
    of the IP-Adapter encoders as ``[M, 1, 1, C]`` (``encoder``, see :func:`~dynaip_trt.models.clip_levels`)."""

    def __init__(self, vision: nn.Module, tap_layers: tuple[int, ...], dtype: torch.dtype | None = None,
                 encoder: str = "clip_levels"):
        super().__init__(dtype)
        self.vision = self.own(vision)
        self.tap_layers = tuple(tap_layers)
        self.encoder = encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return clip_levels(self.vision, self.cast(pixel_values), self.tap_layers, self.encoder).float()


class FusionKV(FlatModule):
    """HMoE fusion + image-branch reference K/V projections of every injected block.

    levels ``[B, S, L, P, C]``, level_weights ``[B, S, L]``, level_override ``[B, S]`` (1 = use level_weights,
    0 = use the router) -> img_k, img_v ``[blocks, B, S, T, inner]``. The text branch is not exported (DDS).
    """

    def __init__(self, adapter: DynaIPAdapter, dtype: torch.dtype | None = None):
        super().__init__(dtype)
        self.adapter = self.own(adapter)

    def tokens(self, levels: torch.Tensor, level_weights: torch.Tensor, level_override: torch.Tensor
               ) -> torch.Tensor:
        """Fused reference tokens ``[B, S, T, inner]`` (in the compute dtype)."""
        levels, level_weights, level_override = self.cast(levels), self.cast(level_weights), self.cast(level_override)
        b, s = levels.shape[0], levels.shape[1]
        flat = levels.flatten(0, 1)  # [B*S, L, P, C]
        routed = self.adapter.fusion.route(flat)  # [B*S, L]
        o = level_override.flatten(0, 1).unsqueeze(-1)  # [B*S, 1]
        weights = o * level_weights.flatten(0, 1) + (1.0 - o) * routed
        tokens, _ = self.adapter.fusion(flat, weights)
        return tokens.unflatten(0, (b, s))

    def forward(self, levels: torch.Tensor, level_weights: torch.Tensor, level_override: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        img_k, img_v = self.adapter.image_kv(self.tokens(levels, level_weights, level_override))
        return img_k.float(), img_v.float()


class TextEncoders(FlatModule):
    """clip_ids ``[B, Lclip]``, t5_ids ``[B, Ltxt]`` (int64) -> text_embeds ``[B, Ltxt, D]``, pooled ``[B, Dp]``."""

    def __init__(self, clip_text: nn.Module, t5: nn.Module, dtype: torch.dtype | None = None):
        super().__init__(dtype)
        self.clip_text = self.own(clip_text)
        self.t5 = self.own(t5)

    def forward(self, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq, pooled = encode_text(self.clip_text, self.t5, clip_ids, t5_ids)
        return seq.float(), pooled.float()


class DiTStep(FlatModule):
    """One MM-DiT evaluation with the DynaIP image branch, followed by the flow-matching Euler step.

    Inputs as ``MODEL_IO["dit"]``: latents ``[B, N, 64]``, text_embeds, pooled, timestep/timestep_next ``[B]``,
    guidance ``[B]``, img_ids ``[N, 3]``, txt_ids ``[Ltxt, 3]``, img_k/img_v ``[blocks, B, S, T, inner]``, scales
    ``[B, S]``, masks ``[B, S, N]``, block_scales ``[blocks]`` -> velocity ``[B, N, 64]`` and latents_next
    ``latents + (timestep_next - timestep) * velocity`` (both float32; the step itself always runs in float32).
    Timestep and guidance reach the transformer in float32 (its time embedding computes ``* 1000`` there).
    """

    def __init__(self, transformer: nn.Module, mode: str, dtype: torch.dtype | None = None):
        super().__init__(dtype)
        self.transformer = self.own(transformer)
        self.mode = mode

    def forward(self, latents: torch.Tensor, text_embeds: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor,
                timestep_next: torch.Tensor, guidance: torch.Tensor, img_ids: torch.Tensor, txt_ids: torch.Tensor,
                img_k: torch.Tensor, img_v: torch.Tensor, scales: torch.Tensor, masks: torch.Tensor,
                block_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.step(latents, text_embeds, pooled, timestep, timestep_next, guidance, img_ids, txt_ids, img_k,
                         img_v, scales, masks, block_scales)

    def step(self, latents: torch.Tensor, text_embeds: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor,
             timestep_next: torch.Tensor, guidance: torch.Tensor, img_ids: torch.Tensor, txt_ids: torch.Tensor,
             img_k: torch.Tensor, img_v: torch.Tensor, scales: torch.Tensor, masks: torch.Tensor,
             block_scales: torch.Tensor, dbim: DBIMInputs | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward`, with DBIM's inputs when the batch is concept rows then auxiliary rows."""
        c = self.cast
        ref = ReferenceInputs(kv=ReferenceKV(c(img_k), c(img_v)), scales=c(scales), masks=c(masks),
                              block_scales=c(block_scales), mode=self.mode, image_tokens=latents.shape[1], dbim=dbim)
        velocity = dit_forward(self.transformer, c(latents), c(text_embeds), c(pooled), timestep, guidance,
                               img_ids, txt_ids, ref).float()
        latents_next = euler_step(latents.float(), velocity, timestep[:, None, None], timestep_next[:, None, None])
        return velocity, latents_next


class DiTDBIMStep(DiTStep):
    """The DiT step of DBIM's mixing steps (``MODEL_IO["dit_dbim"]``): the inputs of :class:`DiTStep` for ``2B``
    rows (``B`` concept rows, then their ``B`` auxiliary rows) plus prompt_tokens, map_tokens ``[2B, Ltxt]``,
    reference_map, dbim_lambda ``[2B]`` (:class:`~dynaip_trt.dbim.DBIMCondition`) -> velocity and latents_next
    ``[2B, N, 64]`` of both branches (each row steps its own latents). Every double-stream block mixes the concept
    rows' image-token attention output with the auxiliary rows' (:func:`~dynaip_trt.attention.dbim_mix`)."""

    def forward(self, latents: torch.Tensor, text_embeds: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor,
                timestep_next: torch.Tensor, guidance: torch.Tensor, img_ids: torch.Tensor, txt_ids: torch.Tensor,
                img_k: torch.Tensor, img_v: torch.Tensor, scales: torch.Tensor, masks: torch.Tensor,
                block_scales: torch.Tensor, prompt_tokens: torch.Tensor, map_tokens: torch.Tensor,
                reference_map: torch.Tensor, dbim_lambda: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dbim = DBIMInputs(prompt_tokens.float(), map_tokens.float(), reference_map.float(), dbim_lambda.float())
        return self.step(latents, text_embeds, pooled, timestep, timestep_next, guidance, img_ids, txt_ids, img_k,
                         img_v, scales, masks, block_scales, dbim)


class VaeDecode(FlatModule):
    """latents ``[B, C, h, w]`` -> images ``[B, 3, f*h, f*w]`` in [-1, 1]."""

    def __init__(self, vae: nn.Module, dtype: torch.dtype | None = None):
        super().__init__(dtype)
        self.vae = self.own(vae)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, self.cast(latents)).float()
