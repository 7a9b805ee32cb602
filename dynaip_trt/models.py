"""Building the model family (base MM-DiT, CLIP vision, text encoders, VAE, adapter) from a config.

Every model is the real class (diffusers ``FluxTransformer2DModel``/``AutoencoderKL``, transformers
``CLIPVisionModel``/``CLIPTextModel``/``T5EncoderModel``); :func:`build_models` gives them deterministic seeded
weights (the tiny embedded default, and full-size random models for benchmarks). Loading real weights from local
folders is in :mod:`dynaip_trt.weights`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel, T5Config, T5EncoderModel

from .adapter import DynaIPAdapter, install_processors
from .configs import DynaIPConfig
from .text import ByteTokenizer, HFTokenizer


@dataclass
class DynaIPModels:
    """The full model family of one config. All modules are in eval mode with frozen base weights."""

    config: DynaIPConfig
    transformer: FluxTransformer2DModel
    vision: CLIPVisionModel
    clip_text: CLIPTextModel
    t5: T5EncoderModel
    vae: AutoencoderKL
    adapter: DynaIPAdapter
    clip_tokenizer: ByteTokenizer | HFTokenizer
    t5_tokenizer: ByteTokenizer | HFTokenizer

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "DynaIPModels":
        for m in (self.transformer, self.vision, self.clip_text, self.t5, self.vae, self.adapter):
            m.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype


def build_transformer(cfg: DynaIPConfig) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(**cfg.transformer.diffusers_kwargs())


def build_vision(cfg: DynaIPConfig) -> CLIPVisionModel:
    return CLIPVisionModel(CLIPVisionConfig(**cfg.vision.hf_kwargs(), attn_implementation="sdpa"))


def build_text_encoders(cfg: DynaIPConfig) -> tuple[CLIPTextModel, T5EncoderModel]:
    t = cfg.text
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=t.clip_vocab_size,
            hidden_size=t.clip_hidden_size,
            intermediate_size=t.clip_intermediate_size,
            num_hidden_layers=t.clip_layers,
            num_attention_heads=t.clip_heads,
            max_position_embeddings=t.clip_max_length,
            projection_dim=t.clip_hidden_size,
            pad_token_id=0 if cfg.name.startswith("tiny") else 1,
            eos_token_id=ByteTokenizer.eos_id if cfg.name.startswith("tiny") else 2,
            bos_token_id=0,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=t.t5_vocab_size,
            d_model=t.t5_d_model,
            d_ff=t.t5_d_ff,
            num_layers=t.t5_layers,
            num_heads=t.t5_heads,
            d_kv=t.t5_d_kv,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
        )
    )
    return clip, t5


def build_vae(cfg: DynaIPConfig) -> AutoencoderKL:
    v = cfg.vae
    n = len(v.block_out_channels)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=v.block_out_channels,
        layers_per_block=v.layers_per_block,
        latent_channels=v.latent_channels,
        norm_num_groups=v.norm_num_groups,
        scaling_factor=v.scaling_factor,
        shift_factor=v.shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_adapter(cfg: DynaIPConfig) -> DynaIPAdapter:
    return DynaIPAdapter(cfg.adapter, cfg.transformer, cfg.vision.hidden_size)


def finalize(models: DynaIPModels) -> DynaIPModels:
    """Install the DynaIP processors, freeze the base, switch everything to eval mode."""
    install_processors(models.transformer, models.config.adapter)
    for m in (models.transformer, models.vision, models.clip_text, models.t5, models.vae):
        m.eval().requires_grad_(False)
    models.adapter.eval()
    return models


def build_models(cfg: DynaIPConfig, seed: int = 0, random_adapter_kv: bool = True) -> DynaIPModels:
    """Build every model of ``cfg`` with deterministic seeded weights (float32, CPU); a config with embedded
    trained weights (``extra["embedded"]``, e.g. ``tiny``) loads them instead (``seed`` is then unused).

    Args:
        random_adapter_kv: give the (normally zero-initialised) reference K/V projections small random
            weights so the references visibly influence the output, as a trained adapter does.
    """
    if cfg.extra.get("embedded"):
        from .weights import load_embedded

        return load_embedded(cfg)
    torch.manual_seed(seed)
    transformer = build_transformer(cfg)
    vision = build_vision(cfg)
    clip_text, t5 = build_text_encoders(cfg)
    vae = build_vae(cfg)
    adapter = build_adapter(cfg)
    if random_adapter_kv:
        adapter.randomize_kv(torch.Generator().manual_seed(seed + 1))
    tok = ByteTokenizer()
    return finalize(DynaIPModels(cfg, transformer, vision, clip_text, t5, vae, adapter, tok, tok))


def clip_levels(vision: CLIPVisionModel, pixel_values: torch.Tensor, tap_layers: tuple[int, ...]) -> torch.Tensor:
    """CLIP hidden states at the tapped layers: pixels ``[M, 3, S, S]`` -> ``[M, L, P, clip_dim]``."""
    out = vision(pixel_values=pixel_values, output_hidden_states=True)
    return torch.stack([out.hidden_states[i] for i in tap_layers], dim=1)


def encode_text(clip_text: CLIPTextModel, t5: T5EncoderModel, clip_ids: torch.Tensor, t5_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX text conditioning: ids -> (T5 sequence ``[B, L, t5_dim]``, CLIP pooled ``[B, clip_dim]``)."""
    pooled = clip_text(input_ids=clip_ids).pooler_output
    seq = t5(input_ids=t5_ids).last_hidden_state
    return seq, pooled


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Unpacked latents ``[B, 16, h, w]`` -> images ``[B, 3, 8h, 8w]`` in [-1, 1] (FLUX scaling and shift)."""
    z = latents / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(z).sample
