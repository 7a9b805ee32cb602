"""Building the model family (base MM-DiT, CLIP vision, text encoders, VAE, adapter) from a config.

Every model is the real class (diffusers ``FluxTransformer2DModel``/``AutoencoderKL``, transformers
``CLIPVisionModel``/``CLIPTextModel``/``T5EncoderModel``; the image encoder is ``CLIPVisionModelWithProjection`` or
``SiglipVisionModel`` for the IP-Adapter encoders); :func:`build_models` gives them deterministic seeded weights (the tiny embedded default, and full-size random models for benchmarks). Loading real weights from local
folders is in :mod:`dynaip_trt.weights`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch import nn
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel,
                          CLIPVisionModelWithProjection, SiglipVisionConfig, SiglipVisionModel, T5Config, T5EncoderModel)

from .adapter import DynaIPAdapter, install_processors
from .attention import ReferenceInputs
from .configs import DynaIPConfig
from .text import Tokenizer, byte_tokenizer


@dataclass
class DynaIPModels:
    """The full model family of one config. All modules are in eval mode with frozen base weights."""

    config: DynaIPConfig
    transformer: FluxTransformer2DModel
    vision: nn.Module  # CLIPVisionModel, CLIPVisionModelWithProjection or SiglipVisionModel (AdapterConfig.encoder)
    clip_text: CLIPTextModel
    t5: T5EncoderModel
    vae: AutoencoderKL
    adapter: DynaIPAdapter
    clip_tokenizer: Tokenizer
    t5_tokenizer: Tokenizer

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


VISION_CLASSES = {"clip_levels": CLIPVisionModel, "clip_embeds": CLIPVisionModelWithProjection,
                  "siglip_pooled": SiglipVisionModel}


def build_vision(cfg: DynaIPConfig) -> nn.Module:
    """The image encoder of ``cfg.adapter.encoder`` (random weights)."""
    encoder = cfg.adapter.encoder
    if encoder == "siglip_pooled":
        return SiglipVisionModel(SiglipVisionConfig(**cfg.vision.hf_kwargs(), attn_implementation="sdpa"))
    return VISION_CLASSES[encoder](CLIPVisionConfig(**cfg.vision.hf_kwargs(), projection_dim=cfg.vision.projection_dim,
                                                    attn_implementation="sdpa"))


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
            pad_token_id=t.clip_pad_id,
            eos_token_id=t.clip_eos_id,
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
    return DynaIPAdapter(cfg.adapter, cfg.transformer, cfg.encoder_width)


def finalize(models: DynaIPModels) -> DynaIPModels:
    """Install the DynaIP processors, freeze the base, switch everything to eval mode."""
    install_processors(models.transformer, models.config.adapter)
    for m in (models.transformer, models.vision, models.clip_text, models.t5, models.vae):
        m.eval().requires_grad_(False)
    models.adapter.eval()
    return models


def build_models(cfg: DynaIPConfig, seed: int = 0, random_adapter_kv: bool = True) -> DynaIPModels:
    """Build every model of ``cfg`` with deterministic seeded weights (float32, CPU). The configs whose trained
    weights ship with the package (``tiny``) load through :func:`dynaip_trt.weights.load_family` instead.

    Args:
        random_adapter_kv: give the (normally zero-initialised) reference K/V projections small random
            weights so the references visibly influence the output, as a trained adapter does.
    """
    torch.manual_seed(seed)
    transformer = build_transformer(cfg)
    vision = build_vision(cfg)
    clip_text, t5 = build_text_encoders(cfg)
    vae = build_vae(cfg)
    adapter = build_adapter(cfg)
    if random_adapter_kv:
        adapter.randomize_kv(torch.Generator().manual_seed(seed + 1))
    return finalize(DynaIPModels(cfg, transformer, vision, clip_text, t5, vae, adapter,
                                 byte_tokenizer(cfg.text.clip_max_length), byte_tokenizer(cfg.text.max_text_length)))


def clip_levels(vision: nn.Module, pixel_values: torch.Tensor, tap_layers: tuple[int, ...],
                encoder: str = "clip_levels") -> torch.Tensor:
    """The image encoder's output as levels: pixels ``[M, 3, S, S]`` -> ``[M, L, P, C]``.

    ``encoder`` (:class:`~dynaip_trt.configs.AdapterConfig`): ``"clip_levels"``: CLIP hidden states at the tapped
    layers; ``"clip_embeds"``: CLIP's projected ``image_embeds`` (``[M, 1, 1, projection_dim]``);
    ``"siglip_pooled"``: SigLIP's pooled output (``[M, 1, 1, hidden]``).
    """
    if encoder == "clip_levels":
        out = vision(pixel_values=pixel_values, output_hidden_states=True)
        return torch.stack([out.hidden_states[i] for i in tap_layers], dim=1)
    out = vision(pixel_values=pixel_values)
    pooled = out.image_embeds if encoder == "clip_embeds" else out.pooler_output
    return pooled[:, None, None, :]


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


def dit_forward(transformer: FluxTransformer2DModel, latents: torch.Tensor, text_embeds: torch.Tensor,
                pooled: torch.Tensor, timestep: torch.Tensor, guidance: torch.Tensor, img_ids: torch.Tensor,
                txt_ids: torch.Tensor, dynaip: ReferenceInputs | None) -> torch.Tensor:
    """One MM-DiT evaluation with the DynaIP inputs (``None``: the bare base model): the only place that calls
    diffusers' FLUX transformer.

    latents ``[B, N, 64]``, text_embeds ``[B, Ltxt, D]``, pooled ``[B, Dp]``, timestep/guidance ``[B]`` (sigma in
    [0, 1] and the distilled guidance; diffusers scales both by 1000), img_ids ``[N, 3]``, txt_ids ``[Ltxt, 3]``
    -> velocity ``[B, N, 64]`` in the transformer's dtype.
    """
    return transformer(
        hidden_states=latents, encoder_hidden_states=text_embeds, pooled_projections=pooled, timestep=timestep,
        guidance=guidance, img_ids=img_ids, txt_ids=txt_ids,
        joint_attention_kwargs=None if dynaip is None else {"dynaip": dynaip}, return_dict=False,
    )[0]
