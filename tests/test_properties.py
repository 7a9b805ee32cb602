"""Property tests (hypothesis): random subject counts, batch sizes, token counts and resolutions through the HMoE
fusion, the reference attention (``sum`` and ``concat``, with and without masks) and one DynaIP attention
processor call on a block of the tiny transformer. Outputs are finite with the right shapes, and a zero scale adds
exactly nothing."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaip_trt.attention import ReferenceInputs, reference_attention
from dynaip_trt.conditioning import ReferenceKV
from dynaip_trt.sampling import latent_image_ids, text_ids

SETTINGS = settings(max_examples=25, deadline=None)

batches = st.integers(1, 3)
subjects = st.integers(1, 4)
modes = st.sampled_from(["sum", "concat"])
seeds = st.integers(0, 2**31 - 1)


def _masks(g: torch.Generator, b: int, s: int, n: int, kind: str) -> torch.Tensor | None:
    """``None``, soft masks in [0, 1], or hard 0/1 masks (rows may be all zero)."""
    if kind == "none":
        return None
    m = torch.rand(b, s, n, generator=g)
    return m if kind == "soft" else (m > 0.5).float()


mask_kinds = st.sampled_from(["none", "soft", "hard"])


@SETTINGS
@given(b=batches, s=subjects, clip_tokens=st.integers(1, 40), override=st.booleans(), seed=seeds)
def test_fusion_reference_tokens(tiny_models, b, s, clip_tokens, override, seed):
    cfg = tiny_models.config
    g = torch.Generator().manual_seed(seed)
    levels_n = cfg.adapter.num_levels
    levels = torch.randn(b, s, levels_n, clip_tokens, cfg.vision.hidden_size, generator=g)
    weights = torch.rand(b, s, levels_n, generator=g) + 1e-3 if override else None
    with torch.no_grad():
        tokens = tiny_models.adapter.reference_tokens(levels, weights)
        flat_weights = None if weights is None else weights.flatten(0, 1)
        fused, used = tiny_models.adapter.fusion(levels.flatten(0, 1), flat_weights)
    assert tokens.shape == (b, s, cfg.adapter.num_tokens, cfg.transformer.inner_dim)
    assert torch.isfinite(tokens).all()
    assert torch.allclose(tokens.flatten(0, 1), fused, atol=1e-6)  # subject axis folds into the batch, nothing mixes
    assert used.shape == (b * s, levels_n)
    if weights is None:
        assert torch.allclose(used.sum(-1), torch.ones(b * s), atol=1e-5) and (used >= 0).all()
    else:
        assert torch.equal(used, weights.flatten(0, 1))


@SETTINGS
@given(b=batches, s=subjects, heads=st.integers(1, 3), head_dim=st.sampled_from([4, 8, 16]), n=st.integers(1, 64),
       t=st.integers(1, 8), mode=modes, mask_kind=mask_kinds, seed=seeds)
def test_reference_attention(b, s, heads, head_dim, n, t, mode, mask_kind, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, n, head_dim, generator=g)
    k = torch.randn(b, s, t, heads * head_dim, generator=g)
    v = torch.randn(b, s, t, heads * head_dim, generator=g)
    scales = torch.rand(b, s, generator=g) * 2
    masks = _masks(g, b, s, n, mask_kind)
    out = reference_attention(q, k, v, scales, masks, mode)
    assert out.shape == (b, n, heads * head_dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    zero = reference_attention(q, k, v, torch.zeros(b, s), masks, mode)
    assert torch.equal(zero, torch.zeros_like(zero)), "scale 0 must give exactly no reference term"
    doubled = reference_attention(q, k, v, 2 * scales, masks, mode)
    assert torch.allclose(doubled, 2 * out, atol=1e-5, rtol=1e-5), "the reference term is linear in the scales"
    if masks is not None and mask_kind == "hard":
        uncovered = masks.amax(dim=1) == 0  # [B, N]: tokens no subject's mask covers get nothing
        assert torch.equal(out[uncovered], torch.zeros_like(out[uncovered]))


@SETTINGS
@given(b=batches, s=subjects, gh=st.integers(1, 6), gw=st.integers(1, 6), txt_len=st.integers(1, 32), mode=modes,
       mask_kind=mask_kinds, text_branch=st.booleans(), seed=seeds)
def test_attention_processor_on_a_tiny_block(tiny_models, b, s, gh, gw, txt_len, mode, mask_kind, text_branch, seed):
    """One call of the DynaIP processor of double-stream block 0 at a random ``(16*gh) x (16*gw)`` resolution."""
    cfg = tiny_models.config
    g = torch.Generator().manual_seed(seed)
    inner, tokens = cfg.transformer.inner_dim, cfg.adapter.num_tokens
    blocks = cfg.transformer.num_layers
    height, width = 16 * gh, 16 * gw
    n = gh * gw
    attn = tiny_models.transformer.transformer_blocks[0].attn
    hs = torch.randn(b, n, inner, generator=g)
    ehs = torch.randn(b, txt_len, inner, generator=g)
    ids = torch.from_numpy(np.concatenate([text_ids(txt_len), latent_image_ids(height, width, cfg.vae.spatial_factor)]))
    rope = tiny_models.transformer.pos_embed(ids)

    def kv() -> torch.Tensor:
        return torch.randn(blocks, b, s, tokens, inner, generator=g)

    img_k, img_v, txt_k, txt_v = kv(), kv(), kv(), kv()
    masks = _masks(g, b, s, n, mask_kind)

    def call(scales: torch.Tensor, txt_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        kv = ReferenceKV(img_k, img_v, txt_k, txt_v) if text_branch else ReferenceKV(img_k, img_v)
        ref = ReferenceInputs(kv=kv, scales=scales, masks=masks, mode=mode,
                              txt_block_scales=torch.full((blocks,), txt_scale) if text_branch else None)
        with torch.no_grad():
            return attn(hs, ehs, image_rotary_emb=rope, dynaip=ref)

    with torch.no_grad():
        base_img, base_txt = attn(hs, ehs, image_rotary_emb=rope)
    img, txt = call(torch.rand(b, s, generator=g) + 0.5, 1.0)
    assert img.shape == (b, n, inner) and txt.shape == (b, txt_len, inner)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    if masks is None or bool((masks > 0).any()):
        assert not torch.allclose(img, base_img, atol=1e-6), "reference K/V at scale >= 0.5 must change the output"
    img0, txt0 = call(torch.zeros(b, s), 0.0)
    assert torch.equal(img0, base_img) and torch.equal(txt0, base_txt), "scale 0 must add exactly nothing"
