"""A small flow-matching training step for the adapter (reference only: proves the modules learn).

Only adapter parameters (fusion + reference K/V projections) receive gradients; the base model is frozen. During
training both branches are injected (the image and the text branch), as DynaIP trains before DDS drops the text
branch at inference.

MM-Diff's attention constraint (``attention_weight > 0``, docs/dci-mmdiff.md): with each subject's region supplied
with the data (``TrainBatch.masks``), the image-to-reference attention of every injected double-stream block is
confined to the subject's own region. The layout is never an input of the attention (inference has none): the masks
enter the loss only. The loss is on each image token's attention mass per subject under one softmax over every
subject's reference tokens (:func:`~dynaip_trt.attention.subject_attention_mass`), which is what ``concat`` mode
attends with; in ``sum`` mode every subject has its own softmax and its output is added everywhere, so nothing the
constraint could shape decides where a subject lands: training with the constraint needs ``concat`` mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import ReferenceInputs
from .conditioning import ReferenceKV
from .errors import ConfigError
from .models import DynaIPModels, clip_levels, dit_forward, encode_text
from .sampling import latent_image_ids, text_ids


@dataclass
class TrainBatch:
    """One batch of training pairs (already encoded where the base model is frozen).

    latents: clean packed target latents ``[B, N, 64]``; pixels: reference CLIP pixels ``[B, 3, S, S]`` (one
    subject) or ``[B, K, 3, S, S]`` (``K`` subjects); clip_ids/t5_ids: caption token ids; noise ``[B, N, 64]`` and
    sigmas ``[B]`` (fixed for reproducibility); masks: each subject's region ``[B, K, N]`` (0/1 over the packed
    image tokens), needed by the attention constraint only.
    """

    latents: torch.Tensor
    pixels: torch.Tensor
    clip_ids: torch.Tensor
    t5_ids: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor
    height: int
    width: int
    masks: torch.Tensor | None = None

    @property
    def subject_pixels(self) -> torch.Tensor:
        """``[B, K, 3, S, S]``"""
        return self.pixels if self.pixels.ndim == 5 else self.pixels.unsqueeze(1)


def adapter_parameters(models: DynaIPModels) -> list[torch.nn.Parameter]:
    return [p for p in models.adapter.parameters() if p.requires_grad]


def flow_matching_loss(models: DynaIPModels, batch: TrainBatch, attention_weight: float = 0.0) -> torch.Tensor:
    """MSE between predicted and true velocity ``noise - x0`` at ``x_t = (1 - t) x0 + t noise``, plus
    ``attention_weight`` times :func:`attention_constraint_loss` (MM-Diff's constraint; needs ``batch.masks`` and
    ``concat`` mode)."""
    if attention_weight:
        check_constraint(models.config.adapter.attention_mode, batch)
    maps: list[torch.Tensor] | None = [] if attention_weight else None
    loss = F.mse_loss(predict_velocity(models, batch, maps), batch.noise - batch.latents)
    if attention_weight:
        loss = loss + attention_weight * attention_constraint_loss(maps, batch.masks)
    return loss


def predict_velocity(models: DynaIPModels, batch: TrainBatch, attention_maps: list[torch.Tensor] | None = None
                     ) -> torch.Tensor:
    """The DiT's velocity ``[B, N, 64]`` at ``x_t`` with every subject of the batch injected (no layout: the masks
    never enter the attention); ``attention_maps``: a list that receives each injected double-stream block's
    subject attention mass ``[B, H, N, K]``."""
    cfg = models.config
    pixels = batch.subject_pixels
    b, k = pixels.shape[:2]
    with torch.no_grad():
        text, pooled = encode_text(models.clip_text, models.t5, batch.clip_ids, batch.t5_ids)
        levels = clip_levels(models.vision, pixels.flatten(0, 1), cfg.adapter.tap_layers).unflatten(0, (b, k))
    a = models.adapter
    tokens = a.reference_tokens(levels)  # [B, K, N, W]
    img_k, img_v = a.image_kv(tokens)
    txt_k, txt_v = a.text_kv(tokens)
    ref = ReferenceInputs(kv=ReferenceKV(img_k, img_v, txt_k, txt_v), scales=torch.ones(b, k),
                          txt_block_scales=torch.ones(len(a.txt_kv)), mode=cfg.adapter.attention_mode,
                          image_tokens=batch.latents.shape[1], attention_maps=attention_maps)
    t = batch.sigmas[:, None, None]
    x_t = (1 - t) * batch.latents + t * batch.noise
    vf = cfg.vae.spatial_factor
    return dit_forward(models.transformer, x_t, text, pooled, batch.sigmas, torch.full((b,), cfg.guidance),
                       torch.from_numpy(latent_image_ids(batch.height, batch.width, vf)),
                       torch.from_numpy(text_ids(text.shape[1])), ref)


def check_constraint_mode(mode: str) -> None:
    """The attention constraint needs ``concat`` mode (:class:`ConfigError`)."""
    if mode != "concat":
        raise ConfigError(f"the attention constraint trains the attention of one softmax over every subject "
                          f"(attention_mode 'concat'); this config attends in {mode!r} mode, where each subject has "
                          f"its own softmax and nothing the constraint shapes decides where a subject lands")


def check_constraint(mode: str, batch: TrainBatch) -> None:
    """The attention constraint needs ``concat`` mode and every subject's region (:class:`ConfigError`)."""
    check_constraint_mode(mode)
    pixels = batch.subject_pixels
    if batch.masks is None or tuple(batch.masks.shape) != (pixels.shape[0], pixels.shape[1],
                                                            batch.latents.shape[1]):
        got = None if batch.masks is None else tuple(batch.masks.shape)
        raise ConfigError(f"the attention constraint needs each subject's region: TrainBatch.masks [B, K, N] = "
                          f"{(pixels.shape[0], pixels.shape[1], batch.latents.shape[1])}, got {got}")


def attention_constraint_loss(maps: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    """MM-Diff's cross-attention map constraint, balanced as FastComposer's localization loss: per injected block
    the attention mass of each subject ``A_k`` (``maps``: ``[B, H, N, K]`` each, averaged over heads) should lie
    inside its region ``M_k`` (``masks [B, K, N]``): ``mean_k(mean(A_k | outside M_k) - mean(A_k | inside M_k))``,
    averaged over the blocks; in [-1, 1], lower is better."""
    m = masks.float()
    losses = []
    for mass in maps:
        a = mass.float().mean(dim=1).transpose(1, 2)  # [B, K, N]
        inside = (a * m).sum(-1) / m.sum(-1).clamp_min(1.0)
        outside = (a * (1 - m)).sum(-1) / (1 - m).sum(-1).clamp_min(1.0)
        losses.append((outside - inside).mean())
    return torch.stack(losses).mean()


@torch.no_grad()
def attention_leakage(models: DynaIPModels, batch: TrainBatch) -> float:
    """What the constraint targets: the image tokens' attention mass on the *other* subjects' reference tokens
    inside each subject's region (per injected double-stream block, averaged over heads, blocks, subjects and
    rows; 0: every region attends to its own subject only; ``1 - 1/K`` for uniform attention over ``K`` subjects)."""
    check_constraint(models.config.adapter.attention_mode, batch)
    maps: list[torch.Tensor] = []
    predict_velocity(models, batch, maps)
    m = batch.masks.float()
    own = [(mass.mean(dim=1).transpose(1, 2) * m).sum(-1) / m.sum(-1).clamp_min(1.0) for mass in maps]  # [B, K]
    return float(1 - torch.stack(own).mean())


def train_step(models: DynaIPModels, batch: TrainBatch, optimizer: torch.optim.Optimizer,
               attention_weight: float = 0.0) -> float:
    """One optimisation step on the adapter; returns the loss before the update (``attention_weight``: MM-Diff's
    attention constraint, see :func:`flow_matching_loss`)."""
    models.adapter.train()
    optimizer.zero_grad(set_to_none=True)
    loss = flow_matching_loss(models, batch, attention_weight)
    loss.backward()
    optimizer.step()
    models.adapter.eval()
    return float(loss.detach())


def synthetic_batch(models: DynaIPModels, size: int = 4, seed: int = 0, subjects: int = 1) -> TrainBatch:
    """Pairs whose target latents are a function of the reference image (its colour), so a working adapter can
    lower the loss below what the frozen base model alone reaches. ``subjects > 1``: each subject a colour, the
    packed image split into vertical bands, one per subject (``masks``), each band's latents its subject's colour."""
    cfg = models.config
    g = torch.Generator().manual_seed(seed)
    h, w, vf = cfg.height, cfg.width, cfg.vae.spatial_factor
    rows, cols = h // vf // 2, w // vf // 2
    n = rows * cols
    colours = torch.rand(size, 3, generator=g) if subjects == 1 else torch.rand(size, subjects, 3, generator=g)
    s = cfg.vision.image_size
    pixels = (colours[..., None, None].expand(*colours.shape, s, s) - 0.5) / 0.25
    proj = torch.randn(3, 64, generator=g)
    masks = None
    if subjects == 1:
        latents = (colours @ proj)[:, None, :].expand(size, n, 64).contiguous()
    else:
        band = (torch.arange(cols) * subjects // cols).repeat(rows)  # [N]: the subject of each packed token
        masks = (band[None, :] == torch.arange(subjects)[:, None]).float().expand(size, -1, -1).contiguous()
        latents = torch.einsum("bkn,bkc->bnc", masks, colours @ proj).contiguous()
    ids = torch.randint(2, 200, (size, cfg.text.max_text_length), generator=g)
    return TrainBatch(latents=latents, pixels=pixels, clip_ids=ids[:, : cfg.text.clip_max_length], t5_ids=ids,
                      noise=torch.randn(size, n, 64, generator=g), sigmas=torch.rand(size, generator=g),
                      height=h, width=w, masks=masks)
