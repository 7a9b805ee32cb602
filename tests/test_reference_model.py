"""PyTorch reference of DynaIP on the tiny FLUX-style MM-DiT: shapes, zero-init, DDS, scales, masks, fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel

import dynaip_trt.attention as attention_mod
from dynaip_trt.attention import FluxPosEmbedFP32, ReferenceInputs, reference_attention
from dynaip_trt.conditioning import ReferenceKV
from dynaip_trt.configs import ConfigError, get_config
from dynaip_trt.models import build_models
from dynaip_trt.pipeline import DynaIPPipeline
from dynaip_trt.request import TextBranchSchedule
from dynaip_trt.sampling import latent_image_ids, text_ids

from dynaip_trt.metrics import max_abs, rel_l2


def dit_inputs(cfg, batch=2, subjects=2, seed=0, height=64, width=64):
    """Random inputs of one MM-DiT step and matching reference K/V for ``subjects`` subjects."""
    g = torch.Generator().manual_seed(seed)
    vf = cfg.vae.spatial_factor
    n = (height // vf // 2) * (width // vf // 2)
    t = cfg.transformer
    blocks, tokens, inner = t.num_layers, cfg.adapter.num_tokens, t.inner_dim
    kv = lambda: torch.randn(blocks, batch, subjects, tokens, inner, generator=g)  # noqa: E731
    return dict(
        hidden_states=torch.randn(batch, n, 64, generator=g),
        encoder_hidden_states=torch.randn(batch, cfg.text.max_text_length, t.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, t.pooled_projection_dim, generator=g),
        timestep=torch.full((batch,), 0.7),
        guidance=torch.full((batch,), 3.5),
        img_ids=torch.from_numpy(latent_image_ids(height, width, vf)),
        txt_ids=torch.from_numpy(text_ids(cfg.text.max_text_length)),
    ), (kv(), kv(), kv(), kv())


def run_dit(transformer, inputs, ref=None):
    with torch.no_grad():
        kwargs = None if ref is None else {"dynaip": ref}
        return transformer(**inputs, joint_attention_kwargs=kwargs, return_dict=False)[0]


@pytest.mark.parametrize("subjects", [1, 2, 3])
def test_shapes_per_subject_count(tiny_models, make_images, subjects):
    cfg = tiny_models.config
    pipe = DynaIPPipeline(tiny_models)
    ref = pipe.encode_references(make_images(subjects))
    t = cfg.transformer
    assert ref.img_k.shape == (t.num_layers, 1, subjects, cfg.adapter.num_tokens, t.inner_dim)
    assert ref.img_v.shape == ref.img_k.shape and ref.txt_k is None
    levels = torch.randn(2, subjects, cfg.adapter.num_levels, cfg.vision.num_tokens, cfg.vision.hidden_size)
    tokens = tiny_models.adapter.reference_tokens(levels)
    assert tokens.shape == (2, subjects, cfg.adapter.num_tokens, t.inner_dim)
    latents = pipe("a photo", make_images(subjects), output_type="latent", progress=False)
    # 64x64 pixels, VAE factor 8, 2x2 packing: 16 tokens of 64 channels
    assert latents.shape == (1, 16, 64) and latents.dtype == torch.float32 and torch.isfinite(latents).all()
    images = pipe(["a photo", "another photo"], make_images(subjects), progress=False)
    assert [im.size for im in images] == [(cfg.width, cfg.height)] * 2 and images[0].mode == "RGB"


def test_zero_initialised_adapter_leaves_base_unchanged(tiny_cfg):
    models = build_models(tiny_cfg, seed=3, random_adapter_kv=False)
    torch.manual_seed(3)
    base = FluxTransformer2DModel(**tiny_cfg.transformer.diffusers_kwargs()).eval()  # stock processors, float64 RoPE
    base.load_state_dict(models.transformer.state_dict())
    inputs, _ = dit_inputs(tiny_cfg)
    levels = torch.randn(2, 2, tiny_cfg.adapter.num_levels, tiny_cfg.vision.num_tokens, tiny_cfg.vision.hidden_size)
    tokens = models.adapter.reference_tokens(levels)
    ref = ReferenceInputs(kv=ReferenceKV(*models.adapter.image_kv(tokens), *models.adapter.text_kv(tokens)),
                          scales=torch.ones(2, 2), txt_block_scales=torch.ones(2))
    out = run_dit(models.transformer, inputs, ref)
    expected = run_dit(base, inputs)
    assert max_abs(out, expected) < 1e-5, "FP32 RoPE + zero-init adapter must reproduce the base model"
    assert rel_l2(out, expected) < 1e-6


def test_fp32_rope_matches_diffusers_float64(tiny_cfg):
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = torch.from_numpy(np.concatenate([text_ids(8), latent_image_ids(128, 96, 8)]))
    ref_cos, ref_sin = FluxPosEmbed(10000, list(tiny_cfg.transformer.axes_dims_rope))(ids)
    cos, sin = FluxPosEmbedFP32(10000, tiny_cfg.transformer.axes_dims_rope)(ids)
    assert cos.dtype == torch.float32 and cos.shape == ref_cos.shape
    assert max_abs(cos, ref_cos) < 1e-5 and max_abs(sin, ref_sin) < 1e-5


def test_scale_zero_equals_base_model(tiny_models):
    inputs, (k, v, _, _) = dit_inputs(tiny_models.config)
    base = run_dit(tiny_models.transformer, inputs)
    off = run_dit(tiny_models.transformer, inputs, ReferenceInputs(kv=ReferenceKV(k, v), scales=torch.zeros(2, 2)))
    on = run_dit(tiny_models.transformer, inputs, ReferenceInputs(kv=ReferenceKV(k, v), scales=torch.ones(2, 2)))
    assert max_abs(off, base) == 0.0
    assert max_abs(on, base) > 1e-3, "non-zero scales must change the output"


def test_dds_inference_drops_text_branch_without_running_its_projections(tiny_models, make_images, monkeypatch):
    calls = {"txt_kv": 0, "img_queries": 0, "txt_queries": 0}
    for kv in tiny_models.adapter.txt_kv:
        kv.register_forward_hook(lambda *a: calls.__setitem__("txt_kv", calls["txt_kv"] + 1))
    original = attention_mod.reference_attention
    txt_len = tiny_models.config.text.max_text_length

    def counting(q, *args):
        key = "txt_queries" if q.shape[2] == txt_len else "img_queries"
        calls[key] += 1
        return original(q, *args)

    monkeypatch.setattr(attention_mod, "reference_attention", counting)
    pipe = DynaIPPipeline(tiny_models)
    pipe("a photo", make_images(2), output_type="latent", progress=False)
    steps, blocks = tiny_models.config.steps, tiny_models.config.transformer.num_layers
    assert calls["txt_kv"] == 0, "inference mode must not run the text-branch K/V projections"
    assert calls["txt_queries"] == 0, "inference mode must not compute the text-branch reference term"
    assert calls["img_queries"] == steps * blocks
    # A DDS schedule keeping the text branch for the first step runs it exactly there.
    calls.update(txt_kv=0, img_queries=0, txt_queries=0)
    pipe("a photo", make_images(2), output_type="latent", progress=False, text_branch=TextBranchSchedule(steps=1))
    assert calls["txt_kv"] == blocks * 2 and calls["txt_queries"] == blocks  # K/V once per subject
    for kv in tiny_models.adapter.txt_kv:
        kv._forward_hooks.clear()


def test_dds_training_injects_both_branches_with_gradients(tiny_cfg):
    models = build_models(tiny_cfg, seed=1)
    inputs, _ = dit_inputs(tiny_cfg, subjects=1)
    levels = torch.randn(2, 1, tiny_cfg.adapter.num_levels, tiny_cfg.vision.num_tokens, tiny_cfg.vision.hidden_size)
    a = models.adapter.train()
    tokens = a.reference_tokens(levels)
    (ik, iv), (tk, tv) = a.image_kv(tokens), a.text_kv(tokens)
    terms = {}
    proc = models.transformer.transformer_blocks[0].attn.processor
    orig_img, orig_txt = proc._image_term, proc._text_term
    proc._image_term = lambda q, r: terms.setdefault("img", orig_img(q, r))
    proc._text_term = lambda q, r: terms.setdefault("txt", orig_txt(q, r))
    try:
        ref = ReferenceInputs(kv=ReferenceKV(ik, iv, tk, tv), scales=torch.ones(2, 1), txt_block_scales=torch.ones(2))
        out = models.transformer(**inputs, joint_attention_kwargs={"dynaip": ref}, return_dict=False)[0]
        out.square().mean().backward()
    finally:
        del proc._image_term, proc._text_term
    assert terms["img"].abs().max() > 1e-4 and terms["txt"].abs().max() > 1e-4
    for branch in (a.img_kv[0], a.txt_kv[0]):
        assert branch.to_v.weight.grad is not None and branch.to_v.weight.grad.abs().max() > 0
    assert a.fusion.experts[0].proj_in.weight.grad.abs().max() > 0


def test_level_weight_override_changes_fused_tokens(tiny_models):
    cfg = tiny_models.config
    levels = torch.randn(2, 2, cfg.adapter.num_levels, cfg.vision.num_tokens, cfg.vision.hidden_size)
    routed = tiny_models.adapter.reference_tokens(levels)
    low = tiny_models.adapter.reference_tokens(levels, torch.tensor([1.0, 0.0, 0.0]).expand(2, 2, 3))
    high = tiny_models.adapter.reference_tokens(levels, torch.tensor([0.0, 0.0, 1.0]).expand(2, 2, 3))
    assert rel_l2(low, routed) > 1e-2 and rel_l2(low, high) > 1e-2
    _, w = tiny_models.adapter.fusion(levels.flatten(0, 1))
    assert w.shape == (4, 3) and torch.allclose(w.sum(-1), torch.ones(4))
    expert0 = tiny_models.adapter.fusion.experts[0](levels.flatten(0, 1)[:, 0]).unflatten(0, (2, 2))
    assert max_abs(low, expert0) < 1e-6, "a one-hot override must select exactly that level's expert"


def test_masks_confine_a_subject_to_its_region(tiny_models):
    cfg = tiny_models.config
    inputs, (k, v, _, _) = dit_inputs(cfg, batch=1, subjects=2)
    n = inputs["hidden_states"].shape[1]
    block = tiny_models.transformer.transformer_blocks[0]
    masks = torch.zeros(1, 2, n)
    masks[0, 0, : n // 2] = 1.0  # subject 0: first half of the image tokens
    masks[0, 1, n // 2 :] = 1.0  # subject 1: second half
    hs = torch.randn(1, n, cfg.transformer.inner_dim)
    ehs = torch.randn(1, cfg.text.max_text_length, cfg.transformer.inner_dim)
    rope = tiny_models.transformer.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))

    def img_out(scales, m):
        with torch.no_grad():
            r = ReferenceInputs(kv=ReferenceKV(k[:, :1], v[:, :1]), scales=scales, masks=m)
            return block.attn(hs, ehs, image_rotary_emb=rope, dynaip=r)[0]

    base = img_out(torch.zeros(1, 2), None)
    only_s0 = img_out(torch.tensor([[1.0, 0.0]]), masks) - base
    only_s1 = img_out(torch.tensor([[0.0, 1.0]]), masks) - base
    assert only_s0[0, n // 2 :].abs().max() == 0 and only_s0[0, : n // 2].abs().max() > 1e-4
    assert only_s1[0, : n // 2].abs().max() == 0 and only_s1[0, n // 2 :].abs().max() > 1e-4


def test_concat_and_sum_modes_agree_for_one_subject_and_differ_for_two():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 16, 8, generator=g)
    k, v = torch.randn(2, 1, 4, 16, generator=g), torch.randn(2, 1, 4, 16, generator=g)
    s = torch.tensor([[0.7], [1.3]])
    assert max_abs(reference_attention(q, k, v, s, None, "sum"), reference_attention(q, k, v, s, None, "concat")) < 1e-6
    k2, v2 = torch.randn(2, 2, 4, 16, generator=g), torch.randn(2, 2, 4, 16, generator=g)
    s2 = torch.ones(2, 2)
    assert rel_l2(reference_attention(q, k2, v2, s2, None, "sum"), reference_attention(q, k2, v2, s2, None, "concat")) > 1e-2
    with pytest.raises(ValueError, match="unknown reference attention mode"):
        reference_attention(q, k, v, s, None, "max")


def test_single_stream_injection_flag(tiny_cfg, make_images):
    import dataclasses

    cfg = dataclasses.replace(tiny_cfg, adapter=dataclasses.replace(tiny_cfg.adapter, inject_single=True))
    models = build_models(cfg, seed=0)
    pipe = DynaIPPipeline(models)
    ref = pipe.encode_references(make_images(2))
    assert ref.img_k.shape[0] == cfg.transformer.num_layers + cfg.transformer.num_single_layers
    on = pipe("a photo", make_images(2), output_type="latent", progress=False)
    off = pipe("a photo", make_images(2), scales=0.0, output_type="latent", progress=False)
    assert rel_l2(on, off) > 1e-4


def test_configs_by_name():
    dev = get_config("flux-dev")
    assert dev.transformer.num_layers == 19 and dev.transformer.num_single_layers == 38
    assert dev.transformer.inner_dim == 3072 and dev.vision.num_tokens == 257
    assert dev.adapter.tap_layers == (10, 17, -2)
    assert type(dev).from_dict(dev.to_dict()) == dev
    with pytest.raises(ConfigError, match="unknown config 'flux-schnell'"):
        get_config("flux-schnell")


def test_deterministic_on_cpu(tiny_models, make_images):
    pipe = DynaIPPipeline(tiny_models)
    a = pipe("a photo", make_images(2), output_type="latent", progress=False, seed=5)
    b = pipe("a photo", make_images(2), output_type="latent", progress=False, seed=5)
    c = pipe("a photo", make_images(2), output_type="latent", progress=False, seed=6)
    assert torch.equal(a, b) and max_abs(a, c) > 1e-2


def test_views_of_one_subject_are_averaged(tiny_models, make_images):
    pipe = DynaIPPipeline(tiny_models)
    imgs = make_images(2)
    both = pipe.encode_references([imgs])
    each = [pipe.encode_references([im]) for im in imgs]
    assert both.num_subjects == 1
    assert max_abs(both.img_v, (each[0].img_v + each[1].img_v) / 2) < 1e-6


def test_time_embedding_gets_float32_products_in_bf16(tiny_models):
    """diffusers computes ``guidance.to(bf16) * 1000`` (3.5 -> 3504); the installed hooks feed 3500.0 in float32."""
    import copy

    from dynaip_trt.adapter import install_processors

    t = copy.deepcopy(tiny_models.transformer).to(torch.bfloat16)
    install_processors(t, tiny_models.config.adapter)  # a second install adds nothing
    assert len(t._forward_pre_hooks) == 1 and len(t.time_text_embed._forward_pre_hooks) == 1
    seen = []
    t.time_text_embed.register_forward_pre_hook(lambda m, args: seen.append(args))
    cfg = tiny_models.config.transformer
    with torch.no_grad():
        t(hidden_states=torch.randn(1, 16, cfg.in_channels, dtype=torch.bfloat16),
          encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, dtype=torch.bfloat16),
          pooled_projections=torch.randn(1, cfg.pooled_projection_dim, dtype=torch.bfloat16),
          timestep=torch.tensor([0.7234]), guidance=torch.tensor([3.5]), img_ids=torch.zeros(16, 3),
          txt_ids=torch.zeros(8, 3), return_dict=False)
    timestep, guidance = seen[0][:2]
    assert timestep.dtype == guidance.dtype == torch.float32
    assert guidance.item() == 3500.0 and timestep.item() == pytest.approx(723.4, rel=1e-6)


def test_concat_mode_gives_a_zero_scale_subject_no_softmax_mass():
    """In ``concat`` mode one softmax spans every subject's tokens: a subject switched off (scale 0) must not dilute
    the others, so [s0=1, s1=0] equals subject 0 alone."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 16, 8, generator=g)
    k, v = torch.randn(2, 2, 4, 16, generator=g), torch.randn(2, 2, 4, 16, generator=g)
    both = reference_attention(q, k, v, torch.tensor([[1.0, 0.0]] * 2), None, "concat")
    alone = reference_attention(q, k[:, :1], v[:, :1], torch.ones(2, 1), None, "concat")
    assert max_abs(both, alone) < 1e-6
    masks = torch.ones(2, 2, 16)
    assert max_abs(reference_attention(q, k, v, torch.tensor([[1.0, 0.0]] * 2), masks, "concat"), alone) < 1e-6


def test_block_scales_weight_each_blocks_injection(tiny_models):
    inputs, (k, v, _, _) = dit_inputs(tiny_models.config)
    blocks = tiny_models.config.injected_blocks
    base = run_dit(tiny_models.transformer, inputs)

    def with_blocks(values):
        ref = ReferenceInputs(kv=ReferenceKV(k, v), scales=torch.ones(2, 2), block_scales=torch.tensor(values))
        return run_dit(tiny_models.transformer, inputs, ref)

    assert max_abs(with_blocks([0.0] * blocks), base) == 0.0, "all-zero block scales must give the base model"
    ones = run_dit(tiny_models.transformer, inputs, ReferenceInputs(kv=ReferenceKV(k, v), scales=torch.ones(2, 2)))
    assert max_abs(with_blocks([1.0] * blocks), ones) == 0.0
    first_only = with_blocks([1.0] + [0.0] * (blocks - 1))
    assert rel_l2(first_only, base) > 1e-4 and rel_l2(first_only, ones) > 1e-4
