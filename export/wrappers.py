"""``nn.Module`` wrappers giving each exported model the flat tensor signature declared in
:data:`dynaip_trt.manifest.MODEL_IO` (no Python objects, no optional inputs)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dynaip_trt.adapter import DynaIPAdapter
from dynaip_trt.attention import ReferenceInputs
from dynaip_trt.models import clip_levels, decode_latents, encode_text


class ClipLevels(nn.Module):
    """pixel_values ``[M, 3, S, S]`` -> levels ``[M, L, P, C]`` (tapped CLIP hidden states)."""

    def __init__(self, vision: nn.Module, tap_layers: tuple[int, ...]):
        super().__init__()
        self.vision = vision
        self.tap_layers = tuple(tap_layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return clip_levels(self.vision, pixel_values, self.tap_layers)


class FusionKV(nn.Module):
    """HMoE fusion + image-branch reference K/V projections of every injected block.

    levels ``[B, S, L, P, C]``, level_weights ``[B, S, L]``, level_override ``[B, S]`` (1 = use level_weights,
    0 = use the router) -> img_k, img_v ``[blocks, B, S, T, inner]``. The text branch is not exported (DDS).
    """

    def __init__(self, adapter: DynaIPAdapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, levels: torch.Tensor, level_weights: torch.Tensor, level_override: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = levels.shape[0], levels.shape[1]
        flat = levels.flatten(0, 1)  # [B*S, L, P, C]
        routed = self.adapter.fusion.router(flat)  # [B*S, L]
        o = level_override.flatten(0, 1).unsqueeze(-1)  # [B*S, 1]
        weights = o * level_weights.flatten(0, 1) + (1.0 - o) * routed
        tokens, _ = self.adapter.fusion(flat, weights)
        return self.adapter.image_kv(tokens.unflatten(0, (b, s)))


class TextEncoders(nn.Module):
    """clip_ids ``[B, 77]``, t5_ids ``[B, L]`` (int64) -> text_embeds ``[B, L, D]``, pooled ``[B, Dp]``."""

    def __init__(self, clip_text: nn.Module, t5: nn.Module):
        super().__init__()
        self.clip_text = clip_text
        self.t5 = t5

    def forward(self, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_text(self.clip_text, self.t5, clip_ids, t5_ids)


class DiTStep(nn.Module):
    """One MM-DiT evaluation with the DynaIP image branch (inputs/outputs as in ``MODEL_IO["dit"]``)."""

    def __init__(self, transformer: nn.Module, mode: str):
        super().__init__()
        self.transformer = transformer
        self.mode = mode

    def forward(self, latents, text_embeds, pooled, timestep, guidance, img_ids, txt_ids, img_k, img_v, scales,
                masks) -> torch.Tensor:
        ref = ReferenceInputs(img_k=img_k, img_v=img_v, scales=scales, masks=masks, mode=self.mode,
                              image_tokens=latents.shape[1])
        return self.transformer(
            hidden_states=latents, encoder_hidden_states=text_embeds, pooled_projections=pooled, timestep=timestep,
            guidance=guidance, img_ids=img_ids, txt_ids=txt_ids, joint_attention_kwargs={"dynaip": ref},
            return_dict=False,
        )[0]


class VaeDecode(nn.Module):
    """latents ``[B, 16, h, w]`` -> images ``[B, 3, 8h, 8w]`` in [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, latents)


class CastIO(nn.Module):
    """Run ``module`` in ``dtype``; float inputs are cast in, outputs cast back to float32 if ``keep_io_types``."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, keep_io_types: bool = True):
        super().__init__()
        self.module = copy.deepcopy(module).to(dtype)  # never convert the caller's (shared) module
        self.dtype = dtype
        self.keep_io_types = keep_io_types

    def forward(self, *args: torch.Tensor):
        args = tuple(a.to(self.dtype) if a.is_floating_point() and self.keep_io_types else a for a in args)
        out = self.module(*args)
        if not self.keep_io_types:
            return out
        if isinstance(out, tuple):
            return tuple(o.float() for o in out)
        return out.float()
