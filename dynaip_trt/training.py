"""A small flow-matching training step for the adapter (reference only: proves the modules learn).

Only adapter parameters (fusion + reference K/V projections) receive gradients; the base model is frozen. During
training both branches are injected (the image and the text branch), as DynaIP trains before DDS drops the text
branch at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import ReferenceInputs
from .conditioning import ReferenceKV
from .models import DynaIPModels, clip_levels, dit_forward, encode_text
from .sampling import latent_image_ids, text_ids


@dataclass
class TrainBatch:
    """One batch of single-subject training pairs (already encoded where the base model is frozen).

    latents: clean packed target latents ``[B, N, 64]``; pixels: reference CLIP pixels ``[B, 3, S, S]``;
    clip_ids/t5_ids: caption token ids; noise ``[B, N, 64]`` and sigmas ``[B]`` (fixed for reproducibility).
    """

    latents: torch.Tensor
    pixels: torch.Tensor
    clip_ids: torch.Tensor
    t5_ids: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor
    height: int
    width: int


def adapter_parameters(models: DynaIPModels) -> list[torch.nn.Parameter]:
    return [p for p in models.adapter.parameters() if p.requires_grad]


def flow_matching_loss(models: DynaIPModels, batch: TrainBatch) -> torch.Tensor:
    """MSE between predicted and true velocity ``noise - x0`` at ``x_t = (1 - t) x0 + t noise``."""
    cfg = models.config
    with torch.no_grad():
        text, pooled = encode_text(models.clip_text, models.t5, batch.clip_ids, batch.t5_ids)
        levels = clip_levels(models.vision, batch.pixels, cfg.adapter.tap_layers).unsqueeze(1)  # [B, 1, L, P, C]
    a = models.adapter
    tokens = a.reference_tokens(levels)  # [B, 1, N, W]
    img_k, img_v = a.image_kv(tokens)
    txt_k, txt_v = a.text_kv(tokens)
    b = batch.latents.shape[0]
    ref = ReferenceInputs(kv=ReferenceKV(img_k, img_v, txt_k, txt_v), scales=torch.ones(b, 1),
                          txt_block_scales=torch.ones(len(a.txt_kv)), mode=cfg.adapter.attention_mode,
                          image_tokens=batch.latents.shape[1])
    t = batch.sigmas[:, None, None]
    x_t = (1 - t) * batch.latents + t * batch.noise
    vf = cfg.vae.spatial_factor
    pred = dit_forward(models.transformer, x_t, text, pooled, batch.sigmas, torch.full((b,), cfg.guidance),
                       torch.from_numpy(latent_image_ids(batch.height, batch.width, vf)),
                       torch.from_numpy(text_ids(text.shape[1])), ref)
    return F.mse_loss(pred, batch.noise - batch.latents)


def train_step(models: DynaIPModels, batch: TrainBatch, optimizer: torch.optim.Optimizer) -> float:
    """One optimisation step on the adapter; returns the loss before the update."""
    models.adapter.train()
    optimizer.zero_grad(set_to_none=True)
    loss = flow_matching_loss(models, batch)
    loss.backward()
    optimizer.step()
    models.adapter.eval()
    return float(loss.detach())


def synthetic_batch(models: DynaIPModels, size: int = 4, seed: int = 0) -> TrainBatch:
    """Pairs whose target latents are a function of the reference image (its colour), so a working adapter can
    lower the loss below what the frozen base model alone reaches."""
    cfg = models.config
    g = torch.Generator().manual_seed(seed)
    h, w, vf = cfg.height, cfg.width, cfg.vae.spatial_factor
    n = (h // vf // 2) * (w // vf // 2)
    colours = torch.rand(size, 3, generator=g)
    s = cfg.vision.image_size
    pixels = (colours[:, :, None, None].expand(size, 3, s, s) - 0.5) / 0.25
    proj = torch.randn(3, 64, generator=g)
    latents = (colours @ proj)[:, None, :].expand(size, n, 64).contiguous()
    ids = torch.randint(2, 200, (size, cfg.text.max_text_length), generator=g)
    return TrainBatch(latents=latents, pixels=pixels, clip_ids=ids[:, : cfg.text.clip_max_length], t5_ids=ids,
                      noise=torch.randn(size, n, 64, generator=g), sigmas=torch.rand(size, generator=g),
                      height=h, width=w)
