"""HMoE-FFM: Hierarchical Mixture-of-Experts Feature Fusion.

CLIP hidden states tapped at several depths (levels) each go through their own expert (a Perceiver resampler that
maps ``P`` CLIP tokens to ``N`` reference tokens of the MM-DiT width); a router gives per-level weights from the
features (softmax gating) and the fused reference tokens are ``R = sum_l w_l * E_l(h_l)``. The user may override
the level weights at inference ("granularity control").

The public FLUX IP-Adapters are the one-level case: a pooled image embedding through a projection expert
(:class:`ProjectionExpert`), and no router.
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


class ProjectionExpert(nn.Module):
    """IP-Adapter image projection as the expert of one level: a pooled embedding ``[M, 1, C]`` ->
    ``[M, num_tokens, out_dim]``.

    ``kind="linear"``: XLabs' ``ImageProjModel`` (``proj``: Linear ``C -> num_tokens * out_dim``, then LayerNorm per
    token); ``kind="mlp"``: InstantX's ``MLPProjModel`` (``proj``: Linear ``C -> 2C``, GELU, Linear ``2C ->
    num_tokens * out_dim``, then LayerNorm). Parameter names follow the public checkpoints (``proj``, ``norm``).
    """

    def __init__(self, kind: str, in_dim: int, out_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens, self.out_dim = num_tokens, out_dim
        if kind == "linear":
            self.proj = nn.Linear(in_dim, num_tokens * out_dim)
        else:
            hidden = 2 * in_dim
            self.proj = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, num_tokens * out_dim))
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(h[:, 0]).unflatten(-1, (self.num_tokens, self.out_dim)))


def make_expert(cfg: AdapterConfig, clip_dim: int, out_dim: int) -> nn.Module:
    """The expert of one level for ``cfg.expert``."""
    if cfg.expert == "resampler":
        return LevelExpert(clip_dim, cfg.expert_dim, out_dim, cfg.num_tokens, cfg.expert_depth, cfg.expert_heads)
    return ProjectionExpert(cfg.expert, clip_dim, out_dim, cfg.num_tokens)


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

    One level has no router (its weight is 1).
    """

    def __init__(self, cfg: AdapterConfig, clip_dim: int, out_dim: int):
        super().__init__()
        self.experts = nn.ModuleList([make_expert(cfg, clip_dim, out_dim) for _ in range(cfg.num_levels)])
        self.router = LevelRouter(clip_dim, cfg.num_levels) if cfg.num_levels > 1 else None

    def route(self, levels: torch.Tensor) -> torch.Tensor:
        """The router's level weights ``[M, L]`` (ones for a single level)."""
        return self.router(levels) if self.router is not None else levels.new_ones(levels.shape[0], 1)

    def forward(
        self, levels: torch.Tensor, level_weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.route(levels) if level_weights is None else level_weights
        expert_out = torch.stack([e(levels[:, i]) for i, e in enumerate(self.experts)], dim=1)  # [M, L, N, W]
        tokens = (expert_out * weights[:, :, None, None]).sum(dim=1)
        return tokens, weights
