"""Model configurations as dataclasses.

Three named configs ship: ``tiny`` (the embedded default: the same classes as FLUX.1-dev at toy sizes, with weights
trained on the synthetic world of :mod:`dynaip_trt.demo.world` and shipped as package data; see
``docs/model-card-tiny.md``), ``tiny-random`` (toy sizes with seeded random weights: seconds on a CPU, for unit
tests) and ``flux-dev`` (real FLUX.1-dev sizes with CLIP ViT-L/14, used for GPU benchmarks with random weights).
Select them with :func:`get_config`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class TransformerConfig:
    """Arguments of diffusers' ``FluxTransformer2DModel``."""

    in_channels: int = 64
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)

    @property
    def inner_dim(self) -> int:
        return self.attention_head_dim * self.num_attention_heads

    def diffusers_kwargs(self) -> dict[str, Any]:
        kw = dataclasses.asdict(self)
        kw["axes_dims_rope"] = tuple(self.axes_dims_rope)
        kw["patch_size"] = 1
        return kw


@dataclass(frozen=True)
class VisionConfig:
    """CLIP vision tower (transformers ``CLIPVisionConfig`` fields) and preprocessing."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def hf_kwargs(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
        }


@dataclass(frozen=True)
class TextConfig:
    """The two FLUX text encoders: CLIP-L text (pooled vector) and T5 (sequence)."""

    clip_vocab_size: int = 49408
    clip_hidden_size: int = 768
    clip_intermediate_size: int = 3072
    clip_layers: int = 12
    clip_heads: int = 12
    clip_max_length: int = 77
    t5_vocab_size: int = 32128
    t5_d_model: int = 4096
    t5_d_ff: int = 10240
    t5_layers: int = 24
    t5_heads: int = 64
    t5_d_kv: int = 64
    max_text_length: int = 512


@dataclass(frozen=True)
class VaeConfig:
    """diffusers ``AutoencoderKL`` with FLUX's 16-channel latent space (spatial factor 8)."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class AdapterConfig:
    """DynaIP adapter: HMoE feature fusion and the reference K/V projections of the double-stream blocks.

    Attributes:
        tap_layers: CLIP hidden-state indices tapped per level (``hidden_states[i]`` is the output of layer ``i``;
            negative counts from the end, ``-2`` = penultimate).
        num_tokens: reference tokens per subject produced by each expert (N).
        expert_dim: width of the resampler experts.
        expert_depth: cross-attention layers per expert.
        expert_heads: attention heads of the experts.
        attention_mode: ``"sum"`` (attend to each subject separately, gate, sum) or ``"concat"`` (one softmax
            over all subjects' tokens).
        inject_single: also inject into single-stream blocks' image tokens (off by default).
    """

    tap_layers: tuple[int, ...] = (10, 17, -2)
    num_tokens: int = 16
    expert_dim: int = 1024
    expert_depth: int = 2
    expert_heads: int = 16
    attention_mode: str = "sum"
    inject_single: bool = False

    def __post_init__(self) -> None:
        if self.attention_mode not in ("sum", "concat"):
            raise ConfigError(f"attention_mode must be 'sum' or 'concat', got {self.attention_mode!r}")
        if len(self.tap_layers) < 1:
            raise ConfigError("tap_layers needs at least one CLIP layer")

    @property
    def num_levels(self) -> int:
        return len(self.tap_layers)


@dataclass(frozen=True)
class DynaIPConfig:
    """Everything needed to build a DynaIP model family, plus sampling defaults."""

    name: str
    transformer: TransformerConfig
    vision: VisionConfig
    text: TextConfig
    vae: VaeConfig
    adapter: AdapterConfig
    height: int = 1024
    width: int = 1024
    steps: int = 28
    guidance: float = 3.5
    max_subjects: int = 4
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pixel_multiple(self) -> int:
        """Height/width must be multiples of this (VAE factor x 2x2 packing)."""
        return self.vae.spatial_factor * 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DynaIPConfig":
        try:
            return cls(
                name=d["name"],
                transformer=TransformerConfig(**_tuples(d["transformer"])),
                vision=VisionConfig(**_tuples(d["vision"])),
                text=TextConfig(**d["text"]),
                vae=VaeConfig(**_tuples(d["vae"])),
                adapter=AdapterConfig(**_tuples(d["adapter"])),
                **{k: d[k] for k in ("height", "width", "steps", "guidance", "max_subjects", "seed") if k in d},
                extra=d.get("extra", {}),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"invalid DynaIP config dictionary: {e}") from e


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _tiny_random() -> DynaIPConfig:
    return DynaIPConfig(
        name="tiny-random",
        transformer=TransformerConfig(
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(4, 6, 6),
        ),
        vision=VisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32, patch_size=8
        ),
        text=TextConfig(
            clip_vocab_size=260,
            clip_hidden_size=32,
            clip_intermediate_size=64,
            clip_layers=2,
            clip_heads=2,
            clip_max_length=32,
            t5_vocab_size=260,
            t5_d_model=32,
            t5_d_ff=64,
            t5_layers=2,
            t5_heads=2,
            t5_d_kv=16,
            max_text_length=32,
        ),
        vae=VaeConfig(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8),
        adapter=AdapterConfig(tap_layers=(1, 2, -2), num_tokens=4, expert_dim=32, expert_depth=1, expert_heads=2),
        height=64,
        width=64,
        steps=4,
        guidance=3.5,
        max_subjects=4,
    )


def _tiny() -> DynaIPConfig:
    """The trained embedded default (``python -m dynaip_trt.demo.train``): 32x32 images, a factor-2 VAE (4x4-pixel
    tokens, 64 image tokens), a 2.7M-parameter MM-DiT (3 double + 3 single blocks, width 128), 77-token prompts over
    a word-level vocabulary, a 4-layer CLIP vision tower on 32x32 references (4x4 patches). The VAE's latent
    scaling and shift are the ones the training measured (rounded); ``extra["embedded"]`` names the package-data
    folder of the weights."""
    return DynaIPConfig(
        name="tiny",
        transformer=TransformerConfig(
            num_layers=3,
            num_single_layers=3,
            attention_head_dim=32,
            num_attention_heads=4,
            joint_attention_dim=64,
            pooled_projection_dim=64,
            axes_dims_rope=(8, 12, 12),
        ),
        vision=VisionConfig(
            hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, image_size=32, patch_size=4
        ),
        text=TextConfig(
            clip_vocab_size=64,
            clip_hidden_size=64,
            clip_intermediate_size=128,
            clip_layers=1,
            clip_heads=2,
            clip_max_length=77,
            t5_vocab_size=64,
            t5_d_model=64,
            t5_d_ff=128,
            t5_layers=1,
            t5_heads=2,
            t5_d_kv=32,
            max_text_length=77,
        ),
        vae=VaeConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, scaling_factor=1.0,
                      shift_factor=0.0),
        # concat: several subjects compete in one softmax, so image tokens can take one subject and not the other
        adapter=AdapterConfig(tap_layers=(1, 2, -2), num_tokens=8, expert_dim=64, expert_depth=1, expert_heads=4,
                              attention_mode="concat"),
        height=32,
        width=32,
        steps=12,
        guidance=3.5,
        max_subjects=4,
        extra={"embedded": "tiny"},
    )


def _flux_dev() -> DynaIPConfig:
    return DynaIPConfig(
        name="flux-dev",
        transformer=TransformerConfig(),
        vision=VisionConfig(),
        text=TextConfig(),
        vae=VaeConfig(),
        adapter=AdapterConfig(),
    )


CONFIGS = {"tiny": _tiny, "tiny-random": _tiny_random, "flux-dev": _flux_dev}


def get_config(name: str) -> DynaIPConfig:
    """Return the named config (``tiny``, ``tiny-random`` or ``flux-dev``)."""
    try:
        return CONFIGS[name]()
    except KeyError:
        raise ConfigError(f"unknown config {name!r}; choose one of {sorted(CONFIGS)}") from None
