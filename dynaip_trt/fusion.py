"""HMoE-FFM: Hierarchical Mixture-of-Experts Feature Fusion.

CLIP hidden states tapped at several depths (levels) each go through their own expert (a Perceiver resampler that
maps ``P`` CLIP tokens to ``N`` reference tokens of the MM-DiT width); a router gives per-level weights from the
features (softmax gating) and the fused reference tokens are ``R = sum_l w_l * E_l(h_l)``. The user may override
the level weights at inference ("granularity control").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import AdapterConfig


class PerceiverLayer(nn.Module):
    """Latents attend to ``[features; latents]`` then a feed-forward, both residual (IP-Adapter-Plus style)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_x = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.scale = (dim // heads) ** -0.5
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x: ``[M, P, dim]``, latents: ``[M, N, dim]`` -> ``[M, N, dim]``"""
        x = self.norm_x(x)
        lat = self.norm_latents(latents)
        q = self.to_q(lat).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [M, h, N, d]
        kv_in = torch.cat([x, lat], dim=1)  # [M, P+N, dim]
        k = self.to_k(kv_in).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [M, h, P+N, d]
        v = self.to_v(kv_in).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).flatten(2)  # [M, N, dim]
        latents = latents + self.to_out(out)
        return latents + self.ff(latents)


class LevelExpert(nn.Module):
    """Expert of one CLIP level: ``[M, P, clip_dim]`` -> ``[M, num_tokens, out_dim]``."""

    def __init__(self, clip_dim: int, dim: int, out_dim: int, num_tokens: int, depth: int, heads: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_tokens, dim) * dim**-0.5)
        self.proj_in = nn.Linear(clip_dim, dim)
        self.layers = nn.ModuleList([PerceiverLayer(dim, heads) for _ in range(depth)])
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(h)
        latents = self.latents.expand(h.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.norm_out(self.proj_out(latents))


class LevelRouter(nn.Module):
    """Softmax gate over levels from the mean-pooled features of every level: ``[M, L, P, C]`` -> ``[M, L]``."""

    def __init__(self, clip_dim: int, num_levels: int):
        super().__init__()
        self.norm = nn.LayerNorm(clip_dim)
        self.proj = nn.Linear(num_levels * clip_dim, num_levels)

    def forward(self, levels: torch.Tensor) -> torch.Tensor:
        pooled = self.norm(levels.mean(dim=2)).flatten(1)  # [M, L*C]
        return self.proj(pooled).softmax(dim=-1)


class HMoEFusion(nn.Module):
    """Fuse tapped CLIP levels into reference tokens.

    Forward:
        levels: ``[M, L, P, clip_dim]`` (M = batch * subjects, flattened)
        level_weights: optional override ``[M, L]`` (used as given instead of the router's weights)
    Returns:
        tokens ``[M, num_tokens, out_dim]`` and the weights used ``[M, L]``.
    """

    def __init__(self, cfg: AdapterConfig, clip_dim: int, out_dim: int):
        super().__init__()
        self.experts = nn.ModuleList(
            [
                LevelExpert(clip_dim, cfg.expert_dim, out_dim, cfg.num_tokens, cfg.expert_depth, cfg.expert_heads)
                for _ in range(cfg.num_levels)
            ]
        )
        self.router = LevelRouter(clip_dim, cfg.num_levels)

    def forward(
        self, levels: torch.Tensor, level_weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.router(levels) if level_weights is None else level_weights
        expert_out = torch.stack([e(levels[:, i]) for i, e in enumerate(self.experts)], dim=1)  # [M, L, N, W]
        tokens = (expert_out * weights[:, :, None, None]).sum(dim=1)
        return tokens, weights
