"""The public FLUX IP-Adapters (XLabs, InstantX) through our modules, ONNX graphs and runtime, against independent
implementations loaded with the same synthetic checkpoints (exact public key names, tiny sizes):

- XLabs: diffusers' own FLUX IP-Adapter path: ``FluxIPAdapterMixin.load_ip_adapter`` reads the checkpoint file
  (diffusers' key mapping), ``ImageProjection`` projects CLIP ``image_embeds``, ``FluxIPAdapterAttnProcessor`` and
  ``FluxTransformerBlock`` add the IP attention after the feed-forward. Two subjects = two diffusers adapters
  (diffusers sums their outputs).
- InstantX: a plain re-implementation, written here, of its published ``IPAFluxAttnProcessor2_0`` and
  ``MLPProjModel`` (RMS-normalised adapter keys, the IP attention added before ``to_out``, single-stream blocks on every
  row), installed into a stock diffusers ``FluxTransformer2DModel``.

Tolerances (float32 on CPU): our PyTorch modules vs the reference rel L2 < 1e-5 (measured 0.9-1.7e-7: only FLUX RoPE
in float32 instead of float64 differs), ONNX Runtime vs the reference < 1e-4 (measured 3.0-3.7e-6).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from diffusers.loaders.ip_adapter import FluxIPAdapterMixin
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor, apply_rotary_emb
from torch import nn

from dynaip_trt.configs import get_config
from dynaip_trt.convert import convert
from dynaip_trt.metrics import rel_l2
from dynaip_trt.models import build_models, build_transformer
from dynaip_trt.sampling import latent_image_ids, text_ids
from dynaip_trt.stage_modules import ClipLevels, DiTStep, FusionKV
from dynaip_trt.weights import load_adapter

from ip_checkpoints import write_instantx, write_xlabs

TORCH_TOL, ORT_TOL = 1e-5, 1e-4
HEIGHT, WIDTH = 64, 48  # 12 image tokens


# ------------------------------------------------------------------------ InstantX, re-implemented from its code
class MLPProjModel(nn.Module):
    """InstantX's image projection (as published): SigLIP pooled ``[B, C]`` -> ``[B, num_tokens, dim]``."""

    def __init__(self, cross_attention_dim: int, id_embeddings_dim: int, num_tokens: int):
        super().__init__()
        self.cross_attention_dim, self.num_tokens = cross_attention_dim, num_tokens
        self.proj = nn.Sequential(nn.Linear(id_embeddings_dim, id_embeddings_dim * 2), nn.GELU(),
                                  nn.Linear(id_embeddings_dim * 2, cross_attention_dim * num_tokens))
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, id_embeds):
        x = self.proj(id_embeds)
        x = x.reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(x)


class IPAFluxAttnProcessor(nn.Module):
    """InstantX's ``IPAFluxAttnProcessor2_0`` as published, with one change: ``image_emb`` moves to the end of the
    signature, because diffusers' ``FluxAttention`` now passes ``encoder_hidden_states`` positionally."""

    def __init__(self, hidden_size, cross_attention_dim=None, scale=1.0, num_tokens=4, head_dim=128):
        super().__init__()
        self.scale = scale
        self.to_k_ip = nn.Linear(cross_attention_dim or hidden_size, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim or hidden_size, hidden_size, bias=False)
        self.norm_added_k = RMSNorm(head_dim, eps=1e-5, elementwise_affine=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 image_emb=None):
        batch_size, _, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        query, key = attn.norm_q(query), attn.norm_k(key)
        ip_key = self.to_k_ip(image_emb).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        ip_value = self.to_v_ip(image_emb).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        ip_key = self.norm_added_k(ip_key)  # keys only: the values are not normalised
        ip_hidden_states = F.scaled_dot_product_attention(query, ip_key, ip_value, dropout_p=0.0, is_causal=False)
        ip_hidden_states = ip_hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        ip_hidden_states = ip_hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            eq = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ek = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ev = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            query, key, value = torch.cat([eq, query], dim=2), torch.cat([ek, key], dim=2), torch.cat([ev, value], 2)
        if image_rotary_emb is not None:
            query, key = apply_rotary_emb(query, image_rotary_emb), apply_rotary_emb(key, image_rotary_emb)
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = (hidden_states[:, :encoder_hidden_states.shape[1]],
                                                    hidden_states[:, encoder_hidden_states.shape[1]:])
            hidden_states = hidden_states + self.scale * ip_hidden_states  # before to_out
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
            return hidden_states, attn.to_add_out(encoder_hidden_states)
        return hidden_states + self.scale * ip_hidden_states  # single-stream blocks: every row


# ------------------------------------------------------------------------------------------------- fixtures
def ip_family(fmt: str, directory: Path):
    """The tiny ``fmt`` family with the adapter converted from a synthetic checkpoint (``directory/<file>``)."""
    cfg = get_config(f"tiny-{fmt}")
    src = directory / ("ip_adapter.safetensors" if fmt == "xlabs" else "ip-adapter.bin")
    state = (write_xlabs if fmt == "xlabs" else write_instantx)(src, cfg, dtype=torch.float32, seed=3)
    models = build_models(cfg, seed=0)
    load_adapter(convert(src, fmt, directory / "adapter.safetensors", cfg), models.adapter)
    return models, src, state


@pytest.fixture(scope="module")
def xlabs(tmp_path_factory):
    return ip_family("xlabs", tmp_path_factory.mktemp("xlabs"))


@pytest.fixture(scope="module")
def instantx(tmp_path_factory):
    return ip_family("instantx", tmp_path_factory.mktemp("instantx"))


def dit_inputs(cfg, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random DiT inputs (diffusers' argument names)."""
    g = torch.Generator().manual_seed(seed)
    t, n, length = cfg.transformer, (HEIGHT // 16) * (WIDTH // 16), cfg.text.max_text_length
    return dict(hidden_states=torch.randn(batch, n, t.in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, length, t.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, t.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.7, 0.4])[:batch], guidance=torch.full((batch,), 3.5),
                img_ids=torch.from_numpy(latent_image_ids(HEIGHT, WIDTH, 8)),
                txt_ids=torch.from_numpy(text_ids(length)))


def pixels(cfg, count: int, seed: int = 1) -> torch.Tensor:
    s = cfg.vision.image_size
    return torch.randn(count, 3, s, s, generator=torch.Generator().manual_seed(seed))


def reference_transformer(models) -> FluxTransformer2DModel:
    """A stock diffusers transformer with our base weights (diffusers' own RoPE and attention processors)."""
    ref = build_transformer(models.config)
    ref.load_state_dict(models.transformer.state_dict())
    return ref.eval()


def our_velocity(models, inputs: dict[str, torch.Tensor], levels: torch.Tensor, scales: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Our flat modules: fusion (levels ``[B, S, 1, 1, C]`` -> K/V) then the DiT step -> velocity, and the flat
    inputs of both graphs (for ONNX Runtime)."""
    b, s = levels.shape[:2]
    fusion_in = {"levels": levels, "level_weights": torch.ones(b, s, 1), "level_override": torch.zeros(b, s)}
    img_k, img_v = FusionKV(models.adapter)(**fusion_in)
    dit_in = {"latents": inputs["hidden_states"], "text_embeds": inputs["encoder_hidden_states"],
              "pooled": inputs["pooled_projections"], "timestep": inputs["timestep"],
              "timestep_next": inputs["timestep"] - 0.1, "guidance": inputs["guidance"], "img_ids": inputs["img_ids"],
              "txt_ids": inputs["txt_ids"], "img_k": img_k, "img_v": img_v, "scales": scales,
              "masks": torch.ones(b, s, inputs["hidden_states"].shape[1]),
              "block_scales": torch.ones(models.config.injected_blocks)}
    velocity, _ = DiTStep(models.transformer, models.config.adapter.attention_mode)(**dit_in)
    arrays = {k: v.numpy() for k, v in {**fusion_in, **dit_in}.items() if k not in ("img_k", "img_v")}
    return velocity, arrays


def ort_velocity(build: Path, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The exported fusion and DiT graphs on ONNX Runtime (CPU)."""
    import onnxruntime as ort

    fusion = ort.InferenceSession(str(build / "fusion.onnx"), providers=["CPUExecutionProvider"])
    dit = ort.InferenceSession(str(build / "dit.onnx"), providers=["CPUExecutionProvider"])
    img_k, img_v = fusion.run(None, {n: arrays[n] for n in ("levels", "level_weights", "level_override")})
    feeds = {i.name: arrays.get(i.name) for i in dit.get_inputs()}
    feeds.update(img_k=img_k, img_v=img_v)
    return dit.run(["velocity"], feeds)[0]


# ---------------------------------------------------------------------------------------------------- XLabs
def diffusers_xlabs(models, checkpoint: Path, adapters: int, scales: list[float]) -> FluxTransformer2DModel:
    """diffusers' transformer with ``adapters`` copies of the XLabs checkpoint loaded by diffusers' own loader."""

    class Loader(FluxIPAdapterMixin):  # the FluxPipeline mixin, on nothing but a transformer
        def __init__(self, transformer):
            self.transformer = transformer

    ref = reference_transformer(models)
    Loader(ref).load_ip_adapter([str(checkpoint.parent)] * adapters, weight_name=[checkpoint.name] * adapters,
                                image_encoder_pretrained_model_name_or_path=None)
    processors = [p for p in ref.attn_processors.values() if isinstance(p, FluxIPAdapterAttnProcessor)]
    assert len(processors) == models.config.transformer.num_layers  # double-stream blocks only
    for p in processors:
        p.scale = list(scales)
    return ref


@pytest.mark.parametrize("subjects", [1, 2])
def test_xlabs_matches_diffusers(xlabs, subjects, tmp_path_factory):
    models, checkpoint, _ = xlabs
    cfg = models.config
    scales = [0.7, 0.4][:subjects]
    inputs = dit_inputs(cfg, batch=2)
    images = pixels(cfg, 2 * subjects)
    with torch.no_grad():
        embeds = models.vision(pixel_values=images).image_embeds  # CLIP image_embeds [2*S, E]
        levels = ClipLevels(models.vision, (), encoder="clip_embeds")(images)  # our image-encoder stage
        assert torch.equal(levels[:, 0, 0], embeds)
        per_subject = embeds.view(2, subjects, -1)
        ref = diffusers_xlabs(models, checkpoint, subjects, scales)
        projections = ref.encoder_hid_proj(list(per_subject.unbind(1)[i][:, None] for i in range(subjects)))
        ours_tokens = models.adapter.fusion.experts[0](embeds[:, None])
        assert rel_l2(ours_tokens.view(2, subjects, *ours_tokens.shape[1:]),
                      torch.stack([p[:, 0] for p in projections], dim=1)) < TORCH_TOL  # ImageProjection
        expected = ref(**inputs, joint_attention_kwargs={"ip_adapter_image_embeds": [
            per_subject[:, i][:, None] for i in range(subjects)]}, return_dict=False)[0]
        velocity, arrays = our_velocity(models, inputs, levels.view(2, subjects, 1, 1, -1),
                                        torch.tensor([scales] * 2))
        bare = reference_transformer(models)(**inputs, return_dict=False)[0]  # the adapter must change the output
    assert rel_l2(expected, bare) > 1e-2
    assert rel_l2(velocity, expected) < TORCH_TOL


# ------------------------------------------------------------------------------------------------- InstantX
def instantx_reference(models, state) -> tuple[FluxTransformer2DModel, MLPProjModel]:
    """The re-implementation with the checkpoint's weights (strict ``load_state_dict``: the published names)."""
    cfg = models.config
    t, a = cfg.transformer, cfg.adapter
    ref = reference_transformer(models)
    procs = [IPAFluxAttnProcessor(t.inner_dim, a.token_dim, scale=0.6, num_tokens=a.num_tokens,
                                  head_dim=t.attention_head_dim) for _ in range(t.num_layers + t.num_single_layers)]
    nn.ModuleList(procs).load_state_dict(state["ip_adapter"], strict=True)
    ref.set_attn_processor(dict(zip(ref.attn_processors, procs)))  # double blocks first, then single blocks
    proj = MLPProjModel(a.token_dim, cfg.vision.hidden_size, a.num_tokens)
    proj.load_state_dict(state["image_proj"], strict=True)
    return ref, proj


def test_instantx_matches_its_published_processor(instantx):
    models, _, state = instantx
    cfg = models.config
    inputs = dit_inputs(cfg, batch=2)
    images = pixels(cfg, 2)
    with torch.no_grad():
        pooled = models.vision(pixel_values=images).pooler_output  # SigLIP pooled [2, C]
        levels = ClipLevels(models.vision, (), encoder="siglip_pooled")(images)
        assert torch.equal(levels[:, 0, 0], pooled)
        ref, proj = instantx_reference(models, state)
        tokens = proj(pooled)
        assert rel_l2(models.adapter.fusion.experts[0](pooled[:, None]), tokens) < TORCH_TOL  # MLPProjModel
        expected = ref(**inputs, joint_attention_kwargs={"image_emb": tokens}, return_dict=False)[0]
        velocity, _ = our_velocity(models, inputs, levels.view(2, 1, 1, 1, -1), torch.full((2, 1), 0.6))
        for p in list(ref.attn_processors.values())[cfg.transformer.num_layers:]:
            p.scale = 0.0  # without the single-stream injection the output must differ
        double_only = ref(**inputs, joint_attention_kwargs={"image_emb": tokens}, return_dict=False)[0]
        bare = reference_transformer(models)(**inputs, return_dict=False)[0]
    assert rel_l2(expected, double_only) > 1e-3 and rel_l2(double_only, bare) > 1e-3
    assert rel_l2(velocity, expected) < TORCH_TOL


# ------------------------------------------------------------------------------ ONNX, runtime, plan, benchmark
@pytest.fixture(scope="module")
def xlabs_build(xlabs, tmp_path_factory):
    """``export.build --precision fp16 --plan-only --max-subjects 4`` of the tiny XLabs family: fp32 and fp16 graphs,
    the manifest and the engine plan."""
    from export.build import run
    from export.envelope import Envelope

    out = tmp_path_factory.mktemp("xlabs-build") / "build"
    env = Envelope(subjects=(1, 2, 4), resolutions=((64, 64), (HEIGHT, WIDTH)))
    run(xlabs[0], out, "fp16", env, out.parent / "calib", opset=18, plan_only=True, progress=False)
    return out


@pytest.fixture(scope="module")
def instantx_build(instantx, tmp_path_factory):
    from export.exporter import export_all

    out = tmp_path_factory.mktemp("instantx-build") / "build"
    export_all(out, models=instantx[0], progress=False)
    return out


def test_xlabs_onnx_matches_diffusers(xlabs, xlabs_build):
    models, checkpoint, _ = xlabs
    cfg = models.config
    for subjects, scales in ((1, [0.7]), (2, [0.7, 0.4])):  # the subject axis at two sizes
        inputs = dit_inputs(cfg, batch=2, seed=subjects)
        images = pixels(cfg, 2 * subjects, seed=subjects)
        with torch.no_grad():
            embeds = models.vision(pixel_values=images).image_embeds.view(2, subjects, -1)
            expected = diffusers_xlabs(models, checkpoint, subjects, scales)(
                **inputs, joint_attention_kwargs={"ip_adapter_image_embeds": [
                    embeds[:, i][:, None] for i in range(subjects)]}, return_dict=False)[0]
            _, arrays = our_velocity(models, inputs, embeds[:, :, None, None], torch.tensor([scales] * 2))
        assert rel_l2(ort_velocity(xlabs_build, arrays), expected) < ORT_TOL, subjects


def test_instantx_onnx_matches_its_published_processor(instantx, instantx_build):
    models, _, state = instantx
    cfg = models.config
    inputs = dit_inputs(cfg, batch=2)
    with torch.no_grad():
        pooled = models.vision(pixel_values=pixels(cfg, 2)).pooler_output
        ref, proj = instantx_reference(models, state)
        expected = ref(**inputs, joint_attention_kwargs={"image_emb": proj(pooled)}, return_dict=False)[0]
        _, arrays = our_velocity(models, inputs, pooled.view(2, 1, 1, 1, -1), torch.full((2, 1), 0.6))
    assert rel_l2(ort_velocity(instantx_build, arrays), expected) < ORT_TOL


@pytest.mark.parametrize("fmt,subjects", [("xlabs", 4), ("instantx", 3)])
def test_onnx_runtime_generates_what_the_pipeline_does(fmt, subjects, request, make_images):
    """The lean runtime on the exported graphs, several subjects (XLabs: the profile's 4), with true CFG, against the
    PyTorch reference pipeline on the same weights."""
    from dynaip_trt.pipeline import DynaIPPipeline
    from runtime import DynaIPEngine

    models = request.getfixturevalue(fmt)[0]
    build = request.getfixturevalue(f"{fmt}_build")
    engine = DynaIPEngine.from_dir(build, backend="onnxruntime", device="cpu")
    refs = make_images(subjects, seed=7)
    kw = dict(scales=[1.0, 0.5, 0.8, 1.2][:subjects], steps=2, height=HEIGHT, width=WIDTH, seed=3,
              negative_prompt="", true_cfg_scale=3.5, output_type="latent")
    got = engine.generate("two toys", refs, **kw)
    want = DynaIPPipeline(models)("two toys", refs, progress=False, **kw).numpy()
    plain = engine.generate("two toys", refs, **{**kw, "true_cfg_scale": 1.0})
    assert rel_l2(got, want) < ORT_TOL and rel_l2(got, plain) > 1e-2


def test_xlabs_engine_plan_spans_the_subject_axis(xlabs_build):
    import json

    from dynaip_trt.manifest import PLAN_FILE

    plan = json.loads((xlabs_build / PLAN_FILE).read_text())
    engines = {e["model"]: e for e in plan["engines"]}
    assert plan["precision"] == "fp16" and engines["dit"]["onnx"] == "dit.fp16.onnx"
    dit, fusion = engines["dit"]["profile"], engines["fusion"]["profile"]
    assert [dit["img_k"][k][2] for k in ("min", "opt", "max")] == [1, 2, 4]  # [blocks, B, S, T, inner]
    assert dit["img_k"]["max"] == [2, 4, 4, 4, 32] and fusion["levels"]["max"] == [4, 4, 1, 1, 16]


@pytest.mark.parametrize("name,blocks,tokens,width,size", [("flux-dev-xlabs", 19, 4, 768, 224),
                                                           ("flux-dev-instantx", 57, 128, 1152, 384)])
def test_full_size_profiles(name, blocks, tokens, width, size):
    """The engine profiles of the real checkpoints' families (shapes only: nothing is built)."""
    from export.envelope import Envelope
    from export.specs import get_spec

    cfg = get_config(name)
    env = Envelope(batch=(1, 1, 2), subjects=(1, 2, 4))
    assert get_spec("dit", cfg).profile(env)["img_k"]["max"] == [blocks, 2, 4, tokens, 3072]
    assert get_spec("fusion", cfg).profile(env)["levels"]["max"] == [2, 4, 1, 1, width]
    assert get_spec("clip", cfg).profile(env)["pixel_values"]["max"][2:] == [size, size]


def test_benchmark_runs_on_the_xlabs_build(xlabs_build, tmp_path, capsys):
    import json

    from runtime.benchmark import main

    out = tmp_path / "bench.json"
    assert main(["--config", "tiny-xlabs", "--backends", "onnxruntime", "--engine-dir", str(xlabs_build),
                 "--subjects", "1,4", "--steps", "1", "--repeats", "1", "--warmup", "0", "--true-cfg-scale", "3",
                 "--json", str(out)]) == 0
    assert "true CFG 3" in capsys.readouterr().out
    assert [(r["backend"], r["subjects"]) for r in json.loads(out.read_text())["rows"]] == [
        ("onnxruntime", 1), ("onnxruntime", 4)]


@pytest.mark.parametrize("fmt", ["xlabs", "instantx"])
def test_local_folders_load_with_the_adapters_encoder(fmt, request, tmp_path, make_images):
    """``load_models(base, clip, adapter)`` reads the converted adapter's config and loads the image encoder it
    needs (CLIP with its projection, or SigLIP); a folder holding the other encoder is refused by name."""
    from dynaip_trt.errors import WeightsError
    from dynaip_trt.pipeline import DynaIPPipeline
    from dynaip_trt.weights import load_models, save_models

    models = request.getfixturevalue(fmt)[0]
    save_models(models, tmp_path / "flux", tmp_path / "encoder", tmp_path / "adapter.safetensors")
    loaded = load_models(tmp_path / "flux", tmp_path / "encoder", tmp_path / "adapter.safetensors")
    assert loaded.config.adapter == models.config.adapter and loaded.config.vision == models.config.vision
    refs = make_images(2)
    kw = dict(steps=1, height=HEIGHT, width=WIDTH, output_type="latent", progress=False)
    assert rel_l2(DynaIPPipeline(loaded)("a photo", refs, **kw), DynaIPPipeline(models)("a photo", refs, **kw)) < 1e-6
    other = request.getfixturevalue("instantx" if fmt == "xlabs" else "xlabs")[0]
    other.vision.save_pretrained(tmp_path / "other")
    with pytest.raises(WeightsError, match="image encoder: .* holds a 'siglip_vision_model' model|image encoder: .* "
                                           "holds a 'clip_vision_model' model"):
        load_models(tmp_path / "flux", tmp_path / "other", tmp_path / "adapter.safetensors")
