"""Flow-matching sampling helpers shared by the reference pipeline and the runtime (numpy only).

FLUX packs latents ``[B, C, h, w]`` into 2x2 patches ``[B, (h/2)*(w/2), C*4]`` and samples with an Euler
flow-matching schedule whose sigmas are shifted by ``mu``, a linear function of the image token count. The seeded
initial noise is drawn with numpy, so every backend (and the PyTorch reference) starts from the same latents.
"""

from __future__ import annotations

import math

import numpy as np


def pack_latents(latents: np.ndarray) -> np.ndarray:
    """``[B, C, h, w]`` -> ``[B, (h/2)*(w/2), C*4]``"""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(x.reshape(b, (h // 2) * (w // 2), c * 4))


def unpack_latents(packed: np.ndarray, height: int, width: int, vae_factor: int) -> np.ndarray:
    """``[B, N, C*4]`` -> ``[B, C, H/vae_factor, W/vae_factor]``"""
    b, _, c4 = packed.shape
    h, w = height // vae_factor, width // vae_factor
    x = packed.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(x.reshape(b, c4 // 4, h, w))


def latent_image_ids(height: int, width: int, vae_factor: int) -> np.ndarray:
    """Position ids of the packed image tokens ``[N, 3]`` float32: (0, row, col)."""
    h, w = height // vae_factor // 2, width // vae_factor // 2
    ids = np.zeros((h, w, 3), dtype=np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def text_ids(text_len: int) -> np.ndarray:
    """Position ids of the text tokens ``[L, 3]`` float32 (all zeros in FLUX)."""
    return np.zeros((text_len, 3), dtype=np.float32)


def image_token_count(height: int, width: int, vae_factor: int) -> int:
    return (height // vae_factor // 2) * (width // vae_factor // 2)


def flux_mu(image_tokens: int, base_len: int = 256, max_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift ``mu`` (linear in the image token count)."""
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_tokens * m + (base_shift - m * base_len)


def flux_sigmas(steps: int, image_tokens: int) -> np.ndarray:
    """Shifted sigmas ``[steps + 1]`` from 1 down to 0 (float32), as FLUX.1-dev's scheduler computes them."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sigmas = np.linspace(1.0, 1.0 / steps, steps, dtype=np.float64)
    mu = flux_mu(image_tokens)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    return np.append(shifted, 0.0).astype(np.float32)


def initial_noise(height: int, width: int, vae_factor: int, channels: int, seed: int) -> np.ndarray:
    """Seeded Gaussian latents of one image, packed: ``[1, N, channels*4]`` float32 (numpy's PCG64 generator:
    the same on every backend and machine)."""
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((1, channels, height // vae_factor, width // vae_factor), dtype=np.float32)
    return pack_latents(lat)


def euler_step(latents, velocity, sigma, sigma_next):
    """One flow-matching Euler step ``x_next = x + (sigma_next - sigma) * v`` (numpy arrays or torch tensors;
    ``sigma`` may be per row ``[B, 1, 1]``). The exported DiT graph computes exactly this after its velocity."""
    return latents + (sigma_next - sigma) * velocity


def true_cfg_velocity(velocity, scales):
    """diffusers' true classifier-free guidance: ``velocity`` ``[2B, N, C]`` (the B rows, then their B negative rows)
    and ``scales`` ``[B, 1, 1]`` -> ``v_neg + scales * (v - v_neg)`` ``[B, N, C]`` (numpy arrays or torch tensors)."""
    b = velocity.shape[0] // 2
    positive, negative = velocity[:b], velocity[b:]
    return negative + scales * (positive - negative)
