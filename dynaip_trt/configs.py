"""Model configurations as dataclasses.

Named configs: ``tiny`` (the embedded default: the same classes as FLUX.1-dev at toy sizes, with weights trained
on the synthetic world of :mod:`dynaip_trt.demo.world` and shipped as package data, see ``docs/model-card-tiny.md``),
``tiny-random`` (toy sizes with seeded random weights: seconds on a CPU, used by unit tests) and ``flux-dev`` (real
FLUX.1-dev sizes with CLIP ViT-L/14, used for GPU benchmarks with random weights); ``tiny-xlabs``/``flux-dev-xlabs``
and ``tiny-instantx``/``flux-dev-instantx`` are the same families with the public XLabs and InstantX FLUX
IP-Adapters' layouts (:data:`IP_ADAPTER_FORMATS`). Select them with :func:`get_config`; :data:`DEFAULT_CONFIG` is
what commands use when given no config or weights; :data:`EMBEDDED_CONFIGS` are the ones whose trained weights ship
with the package.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

ADAPTER_FORMAT = "dynaip-adapter"  # the 'format' field of an adapter file's header (dynaip_trt.weights)


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
    """Image encoder tower (transformers ``CLIPVisionConfig``/``SiglipVisionConfig`` fields) and preprocessing.

    Attributes:
        projection_dim: width of CLIP's ``image_embeds`` (the visual projection; used by the ``clip_embeds`` encoder).
        crop: preprocessing resizes the shorter side and centre-crops (CLIP); ``False`` resizes the whole image to
            the square input size (SigLIP's processor).
    """

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    projection_dim: int = 768
    crop: bool = True

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
    clip_pad_id: int = 49407  # FLUX's CLIP tokenizer pads with <|endoftext|>
    clip_eos_id: int = 49407  # CLIPTextModel pools the hidden state at the first EOS


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


ENCODERS = ("clip_levels", "clip_embeds", "siglip_pooled")
EXPERTS = ("resampler", "linear", "mlp")
INJECTIONS = ("after_out", "before_out", "after_block")
SINGLE_ROWS = ("image", "all")


@dataclass(frozen=True)
class AdapterConfig:
    """Image-prompt adapter: the image encoder's output -> reference tokens (the experts, fused by a router) -> K/V
    projections per injected block, and where the attention to them enters the MM-DiT. The defaults are DynaIP's;
    the public FLUX IP-Adapters are other settings of the same fields (:data:`IP_ADAPTER_FORMATS`).

    Attributes:
        tap_layers: CLIP hidden-state indices tapped per level (``hidden_states[i]`` is the output of layer ``i``;
            negative counts from the end, ``-2`` = penultimate); empty for the pooled encoders (one level).
        num_tokens: reference tokens per subject produced by each expert (N).
        expert_dim: width of the resampler experts.
        expert_depth: cross-attention layers per expert.
        expert_heads: attention heads of the experts.
        attention_mode: ``"sum"`` (attend to each subject separately, gate, sum) or ``"concat"`` (one softmax
            over all subjects' tokens).
        inject_single: also inject into single-stream blocks (off by default).
        encoder: the image encoder's output: ``"clip_levels"`` (CLIP hidden states at ``tap_layers``, ``[L, P, C]``
            per image), ``"clip_embeds"`` (CLIP's projected ``image_embeds``) or ``"siglip_pooled"`` (SigLIP's
            pooled output); the pooled ones are one level of one token.
        expert: per-level expert: ``"resampler"`` (Perceiver resampler), ``"linear"`` (XLabs' ``ImageProjModel``:
            Linear to ``num_tokens`` tokens + LayerNorm) or ``"mlp"`` (InstantX's ``MLPProjModel``: Linear-GELU-Linear
            + LayerNorm); the projection experts take a pooled encoder. One level has no router.
        token_dim: width of the reference tokens, the K/V projections' input (``None``: the MM-DiT's inner width).
        kv_bias: the K/V projections have biases.
        key_norm: ``"rms"``: a parameter-free RMSNorm over each head's features of the image-branch keys (eps 1e-5).
        injection: where a double-stream block adds the image-branch attention: ``"after_out"`` (after ``to_out``,
            inside the block's gated residual), ``"before_out"`` (before ``to_out``) or ``"after_block"`` (to the
            image stream after the block's feed-forward, outside its gates). Single-stream blocks add it to the
            attention output before their output projection.
        single_rows: rows of a single-stream block that get the injection: ``"image"`` tokens or ``"all"``.
        text_branch: the adapter has text-branch K/V (DynaIP's training and DDS schedules).
    """

    tap_layers: tuple[int, ...] = (10, 17, -2)
    num_tokens: int = 16
    expert_dim: int = 1024
    expert_depth: int = 2
    expert_heads: int = 16
    attention_mode: str = "sum"
    inject_single: bool = False
    encoder: str = "clip_levels"
    expert: str = "resampler"
    token_dim: int | None = None
    kv_bias: bool = False
    key_norm: str = "none"
    injection: str = "after_out"
    single_rows: str = "image"
    text_branch: bool = True

    def __post_init__(self) -> None:
        for name, allowed in (("attention_mode", ("sum", "concat")), ("encoder", ENCODERS), ("expert", EXPERTS),
                              ("key_norm", ("none", "rms")), ("injection", INJECTIONS), ("single_rows", SINGLE_ROWS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.encoder == "clip_levels" and len(self.tap_layers) < 1:
            raise ConfigError("tap_layers needs at least one CLIP layer")
        if self.encoder != "clip_levels" and self.tap_layers:
            raise ConfigError(f"encoder {self.encoder!r} gives one pooled embedding per image: tap_layers must be "
                              f"empty, got {self.tap_layers}")
        if self.expert != "resampler" and self.encoder == "clip_levels":
            raise ConfigError(f"expert {self.expert!r} projects a pooled embedding: use encoder 'clip_embeds' or "
                              f"'siglip_pooled'")

    @property
    def num_levels(self) -> int:
        return len(self.tap_layers) or 1


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

    @property
    def injected_blocks(self) -> int:
        """Blocks with image-branch injection (the length of ``block_scales``): every double-stream block, plus the
        single-stream blocks when the adapter injects there."""
        t = self.transformer
        return t.num_layers + (t.num_single_layers if self.adapter.inject_single else 0)

    @property
    def encoder_width(self) -> int:
        """Width of the image encoder's output (the experts' input): CLIP's ``projection_dim`` for
        ``clip_embeds``, its hidden size otherwise."""
        return self.vision.projection_dim if self.adapter.encoder == "clip_embeds" else self.vision.hidden_size

    @property
    def level_shape(self) -> tuple[int, int, int]:
        """``(L, P, C)`` of one image's encoder output: tapped levels x tokens x width (``(1, 1, C)`` pooled)."""
        pooled = self.adapter.encoder != "clip_levels"
        return self.adapter.num_levels, 1 if pooled else self.vision.num_tokens, self.encoder_width

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
            clip_max_length=77,
            t5_vocab_size=260,
            t5_d_model=32,
            t5_d_ff=64,
            t5_layers=2,
            t5_heads=2,
            t5_d_kv=16,
            max_text_length=77,
            clip_pad_id=0,  # the byte tokenizer (dynaip_trt.text.byte_tokenizer): pad 0, EOS 1
            clip_eos_id=1,
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
    scaling and shift are the ones the training measured (rounded). Its weights ship in ``dynaip_trt/data/tiny``."""
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
            clip_pad_id=0,  # the word-level tokenizer of dynaip_trt.demo.train: [PAD] 0, [EOS] 1
            clip_eos_id=1,
        ),
        vae=VaeConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, scaling_factor=6.1149,
                      shift_factor=-0.0011),
        # concat: several subjects compete in one softmax, so image tokens can take one subject and not the other
        adapter=AdapterConfig(tap_layers=(1, 2, -2), num_tokens=8, expert_dim=64, expert_depth=1, expert_heads=4,
                              attention_mode="concat"),
        height=32,
        width=32,
        steps=12,
        guidance=3.5,
        max_subjects=4,
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


# The public FLUX IP-Adapters as adapter settings (verified against their published code; docs/ip-adapters.md):
# - XLabs-AI flux-ip-adapter (x-flux ``IPDoubleStreamBlockProcessor`` + ``ImageProjModel``; diffusers'
#   ``FluxIPAdapterAttnProcessor``): CLIP ViT-L/14 ``image_embeds`` -> Linear + LayerNorm -> tokens; K/V with biases
#   in the double-stream blocks, added to the image stream after the block's feed-forward, outside its gates.
# - InstantX FLUX.1-dev-IP-Adapter (``IPAFluxAttnProcessor2_0`` + ``MLPProjModel``): SigLIP pooled output -> MLP +
#   LayerNorm -> tokens; bias-free K/V, RMS-normalised keys, added before ``to_out``; single-stream blocks too, on
#   every row (text and image tokens).
IP_ADAPTER_FORMATS: dict[str, dict[str, Any]] = {
    "xlabs": dict(tap_layers=(), encoder="clip_embeds", expert="linear", kv_bias=True, injection="after_block",
                  text_branch=False),
    "instantx": dict(tap_layers=(), encoder="siglip_pooled", expert="mlp", key_norm="rms", injection="before_out",
                     inject_single=True, single_rows="all", text_branch=False),
}
SIGLIP_NORM = (0.5, 0.5, 0.5)  # SigLIP's processor normalises to [-1, 1]


def ip_adapter_config(fmt: str, num_tokens: int, token_dim: int) -> AdapterConfig:
    """The :class:`AdapterConfig` of a public IP-Adapter format (``"xlabs"`` or ``"instantx"``)."""
    if fmt not in IP_ADAPTER_FORMATS:
        raise ConfigError(f"unknown IP-Adapter format {fmt!r}; choose one of {sorted(IP_ADAPTER_FORMATS)}")
    return AdapterConfig(num_tokens=num_tokens, token_dim=token_dim, **IP_ADAPTER_FORMATS[fmt])


def _tiny_ip(fmt: str) -> DynaIPConfig:
    """``tiny-random`` with an IP-Adapter layout: token width 48 (T5 and ``joint_attention_dim`` 48 too, as FLUX's
    4096 is both) against an inner width of 32, so that a mix-up of the two widths fails."""
    base = _tiny_random()
    vision = (dataclasses.replace(base.vision, projection_dim=16) if fmt == "xlabs" else VisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
        image_mean=SIGLIP_NORM, image_std=SIGLIP_NORM, crop=False))
    return dataclasses.replace(
        base, name=f"tiny-{fmt}", transformer=dataclasses.replace(base.transformer, joint_attention_dim=48),
        text=dataclasses.replace(base.text, t5_d_model=48), vision=vision,
        adapter=ip_adapter_config(fmt, num_tokens=4 if fmt == "xlabs" else 8, token_dim=48))


def _flux_dev_ip(fmt: str) -> DynaIPConfig:
    """FLUX.1-dev sizes with the real checkpoint's adapter: CLIP ViT-L/14 (XLabs) or SigLIP so400m-patch14-384
    (InstantX) as image encoder."""
    vision = VisionConfig() if fmt == "xlabs" else VisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
        patch_size=14, image_mean=SIGLIP_NORM, image_std=SIGLIP_NORM, crop=False)
    return dataclasses.replace(_flux_dev(), name=f"flux-dev-{fmt}", vision=vision,
                               adapter=ip_adapter_config(fmt, num_tokens=4 if fmt == "xlabs" else 128, token_dim=4096))


CONFIGS = {"tiny": _tiny, "tiny-random": _tiny_random, "flux-dev": _flux_dev,
           "tiny-xlabs": lambda: _tiny_ip("xlabs"), "tiny-instantx": lambda: _tiny_ip("instantx"),
           "flux-dev-xlabs": lambda: _flux_dev_ip("xlabs"), "flux-dev-instantx": lambda: _flux_dev_ip("instantx")}
DEFAULT_CONFIG = "tiny"
EMBEDDED_CONFIGS = ("tiny",)  # trained weights in dynaip_trt/data/<name>/ (dynaip_trt.weights.load_embedded)


def get_config(name: str) -> DynaIPConfig:
    """Return the named config (one of :data:`CONFIGS`)."""
    try:
        return CONFIGS[name]()
    except KeyError:
        raise ConfigError(f"unknown config {name!r}; choose one of {sorted(CONFIGS)}") from None
