"""The DynaIP adapter module and its installation into diffusers' ``FluxTransformer2DModel``.

``DynaIPAdapter`` = HMoE fusion + per-block reference K/V projections (image branch for every injected block,
text branch for double-stream blocks). Only the adapter is trained; the base model stays frozen. The public FLUX
IP-Adapters (XLabs, InstantX) are configurations of the same modules (:class:`~dynaip_trt.configs.AdapterConfig`):
token width, K/V biases, key norm, no text branch.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from .attention import DynaIPAttnProcessor, FluxPosEmbedFP32, FP32TimeEmbedding
from .configs import AdapterConfig, TransformerConfig
from .errors import ConfigError
from .fusion import HMoEFusion

KEY_NORM_EPS = 1e-5  # InstantX's RMSNorm(128, eps=1e-5, elementwise_affine=False) on the adapter keys


def rms_norm_heads(x: torch.Tensor, head_dim: int, eps: float = KEY_NORM_EPS) -> torch.Tensor:
    """Parameter-free RMSNorm over each head's features, in float32: ``[..., H*D] -> [..., H*D]`` (diffusers'
    ``RMSNorm(D, elementwise_affine=False)`` applied to ``[..., H, D]``)."""
    h = x.unflatten(-1, (-1, head_dim)).float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2).to(x.dtype)


class BlockKV(nn.Module):
    """Reference K/V projections of one block: ``[..., W] -> [..., inner_dim]`` (zero-initialised)."""

    def __init__(self, width: int, inner_dim: int, bias: bool = False):
        super().__init__()
        self.to_k = nn.Linear(width, inner_dim, bias=bias)
        self.to_v = nn.Linear(width, inner_dim, bias=bias)
        for lin in (self.to_k, self.to_v):
            nn.init.zeros_(lin.weight)
            if bias:
                nn.init.zeros_(lin.bias)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_k(tokens), self.to_v(tokens)


class DynaIPAdapter(nn.Module):
    """DynaIP adapter for a FLUX-style MM-DiT.

    Attributes:
        fusion: HMoE feature fusion (image encoder output -> reference tokens of width ``token_dim``).
        img_kv: image-branch K/V per injected block (double blocks, then single blocks if ``inject_single``).
        txt_kv: text-branch K/V per double-stream block (used in training and by DDS schedules only; empty when
            the adapter has no text branch).
    """

    def __init__(self, cfg: AdapterConfig, transformer: TransformerConfig, clip_dim: int):
        super().__init__()
        self.cfg = cfg
        self.clip_dim = clip_dim
        self.inner_dim = transformer.inner_dim
        self.head_dim = transformer.attention_head_dim
        self.token_dim = cfg.token_dim or self.inner_dim
        self.num_double = transformer.num_layers
        num_img_blocks = transformer.num_layers + (transformer.num_single_layers if cfg.inject_single else 0)
        num_txt_blocks = self.num_double if cfg.text_branch else 0
        self.fusion = HMoEFusion(cfg, clip_dim, self.token_dim)
        kv = lambda: BlockKV(self.token_dim, self.inner_dim, cfg.kv_bias)  # noqa: E731
        self.img_kv = nn.ModuleList([kv() for _ in range(num_img_blocks)])
        self.txt_kv = nn.ModuleList([kv() for _ in range(num_txt_blocks)])

    def reference_tokens(self, levels: torch.Tensor, level_weights: torch.Tensor | None = None) -> torch.Tensor:
        """levels ``[B, S, L, P, C]`` (+ override ``[B, S, L]``) -> reference tokens ``[B, S, N, token_dim]``."""
        b, s = levels.shape[:2]
        lw = None if level_weights is None else level_weights.flatten(0, 1)
        tokens, _ = self.fusion(levels.flatten(0, 1), lw)
        return tokens.unflatten(0, (b, s))

    @staticmethod
    def _project(kvs: nn.ModuleList, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ks, vs = zip(*(kv(tokens) for kv in kvs))
        return torch.stack(ks), torch.stack(vs)  # [blocks, B, S, N, inner_dim] each

    def image_kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-branch reference K/V ``[img_blocks, B, S, N, inner_dim]`` each, from tokens ``[B, S, N, W]``
        (keys RMS-normalised per head when ``key_norm="rms"``)."""
        k, v = self._project(self.img_kv, tokens)
        return (rms_norm_heads(k, self.head_dim) if self.cfg.key_norm == "rms" else k), v

    def text_kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-branch reference K/V ``[double_blocks, B, S, N, inner_dim]`` each."""
        if not self.cfg.text_branch:
            raise ConfigError("this adapter has no text branch (text_branch=False): DDS schedules and text-branch "
                              "encodings need a DynaIP adapter trained with one")
        return self._project(self.txt_kv, tokens)

    def randomize_kv(self, generator: torch.Generator, std: float = 0.02) -> None:
        """Give the zero-initialised K/V projections small random weights (and biases, if any: tests and the tiny
        defaults)."""
        with torch.no_grad():
            for kv in [*self.img_kv, *self.txt_kv]:
                for lin in (kv.to_k, kv.to_v):
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=generator) * std)
                    if lin.bias is not None:
                        lin.bias.copy_(torch.randn(lin.bias.shape, generator=generator) * std)


def install_processors(transformer: FluxTransformer2DModel, adapter_cfg: AdapterConfig) -> None:
    """Install DynaIP processors, FP32 RoPE and FP32 time embedding inputs into a diffusers
    ``FluxTransformer2DModel`` in place (idempotent).

    Without a ``dynaip`` joint-attention kwarg the processors compute exactly the base model (up to float32
    RoPE instead of float64).
    """
    pe = transformer.pos_embed
    if not isinstance(pe, FluxPosEmbedFP32):
        transformer.pos_embed = FluxPosEmbedFP32(pe.theta, pe.axes_dim)
        FP32TimeEmbedding(transformer)
    n_double = len(transformer.transformer_blocks)
    where = dict(injection=adapter_cfg.injection, single_rows=adapter_cfg.single_rows)
    for i, block in enumerate(transformer.transformer_blocks):
        block.attn.set_processor(DynaIPAttnProcessor(ref_index=i, txt_index=i if adapter_cfg.text_branch else None,
                                                     **where))
    for j, block in enumerate(transformer.single_transformer_blocks):
        ref = n_double + j if adapter_cfg.inject_single else None
        block.attn.set_processor(DynaIPAttnProcessor(ref_index=ref, txt_index=None, **where))
