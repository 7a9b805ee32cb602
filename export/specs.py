"""One declaration per exported model (as NVIDIA TensorRT's demo/Diffusion does): I/O names, dynamic axes,
concrete shapes for any request envelope, min/opt/max engine profiles, sample inputs and allowed precisions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dynaip_trt.configs import DynaIPConfig
from dynaip_trt.errors import ConfigError
from dynaip_trt.manifest import MODEL_IO
from dynaip_trt.models import DynaIPModels
from dynaip_trt.sampling import image_token_count, latent_image_ids, text_ids

from .wrappers import ClipLevels, DiTStep, FusionKV, TextEncoders, VaeDecode

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Envelope:
    """The range of requests an export/engine must serve.

    Attributes:
        batch: (min, opt, max) images per call.
        subjects: (min, opt, max) subjects per request.
        views: maximum reference images per subject (CLIP batch = batch * subjects * views).
        resolutions: (height, width) pairs; min/max are taken over them, opt is the first.
    """

    batch: tuple[int, int, int] = (1, 1, 4)
    subjects: tuple[int, int, int] = (1, 2, 4)
    views: int = 2
    resolutions: tuple[tuple[int, int], ...] = ((1024, 1024),)

    def __post_init__(self) -> None:
        for name in ("batch", "subjects"):
            lo, opt, hi = getattr(self, name)
            if not 1 <= lo <= opt <= hi:
                raise ConfigError(f"{name} range {getattr(self, name)} must satisfy 1 <= min <= opt <= max")
        if not self.resolutions:
            raise ConfigError("at least one resolution is needed")

    def points(self) -> dict[str, tuple[int, int, int, int]]:
        """(batch, subjects, height, width) at min, opt and max."""
        hs = [r[0] for r in self.resolutions]
        ws = [r[1] for r in self.resolutions]
        return {
            "min": (self.batch[0], self.subjects[0], min(hs), min(ws)),
            "opt": (self.batch[1], self.subjects[1], *self.resolutions[0]),
            "max": (self.batch[2], self.subjects[2], max(hs), max(ws)),
        }


class ModelSpec:
    """Base declaration. Subclasses define the module, dynamic axes and shapes of one model."""

    name: str = ""
    precisions: tuple[str, ...] = ("fp32", "fp16", "bf16")

    def __init__(self, models: DynaIPModels | DynaIPConfig):
        """``models``: the family to export, or only its config for a shape-only spec (profiles, sample inputs;
        :meth:`module` then raises)."""
        self._models = models if isinstance(models, DynaIPModels) else None
        self.cfg: DynaIPConfig = models.config if isinstance(models, DynaIPModels) else models

    @property
    def models(self) -> DynaIPModels:
        if self._models is None:
            raise ConfigError(f"the {self.name} spec was made from a config only: it has shapes, not modules")
        return self._models

    @property
    def input_names(self) -> tuple[str, ...]:
        return MODEL_IO[self.name][0]

    @property
    def output_names(self) -> tuple[str, ...]:
        return MODEL_IO[self.name][1]

    def module(self) -> nn.Module:
        raise NotImplementedError

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``{input: {axis: axis_name}}``; inputs with the same axis name share one dimension."""
        raise NotImplementedError

    def shapes(self, batch: int, subjects: int, height: int, width: int) -> dict[str, Shape]:
        """Concrete input shapes for a request of this size."""
        raise NotImplementedError

    def int_inputs(self) -> dict[str, int]:
        """Integer inputs and their exclusive upper bound (token ids)."""
        return {}

    def profile(self, env: Envelope) -> dict[str, dict[str, list[int]]]:
        """``{input: {"min": shape, "opt": shape, "max": shape}}`` for TensorRT optimization profiles."""
        pts = {k: self.shapes(*v) for k, v in env.points().items()}
        return {n: {k: list(pts[k][n]) for k in ("min", "opt", "max")} for n in self.input_names}

    def sample_inputs(self, batch: int = 2, subjects: int = 2, height: int | None = None, width: int | None = None,
                      seed: int = 0) -> dict[str, torch.Tensor]:
        """Valid random inputs. Defaults use sizes >= 2 on every dynamic axis (size-1 examples become static)."""
        height = height or self.cfg.height
        width = width or self.cfg.width - self.cfg.pixel_multiple  # non-square: distinct dynamic dims
        g = torch.Generator().manual_seed(seed)
        out = {}
        for name, shape in self.shapes(batch, subjects, height, width).items():
            if name in self.int_inputs():
                out[name] = torch.randint(0, self.int_inputs()[name], shape, generator=g)
            else:
                out[name] = torch.randn(shape, generator=g)
        return self.fix_inputs(out, height, width)

    def fix_inputs(self, inputs: dict[str, torch.Tensor], height: int, width: int) -> dict[str, torch.Tensor]:
        """Replace random values by meaningful ones where the model needs them (ids, scales, masks...)."""
        return inputs


class ClipSpec(ModelSpec):
    name = "clip"

    def module(self) -> nn.Module:
        return ClipLevels(self.models.vision, self.cfg.adapter.tap_layers)

    def dynamic_axes(self):
        return {"pixel_values": {0: "images"}}

    def shapes(self, batch, subjects, height, width):
        s = self.cfg.vision.image_size
        return {"pixel_values": (batch * subjects * 2, 3, s, s)}

    def profile(self, env: Envelope):
        prof = super().profile(env)  # images = every reference image of a call: 1 .. batch * subjects * views
        shapes = prof["pixel_values"]
        shapes["min"][0], shapes["opt"][0] = 1, env.batch[1] * env.subjects[1]
        shapes["max"][0] = env.batch[2] * env.subjects[2] * env.views
        return prof


class FusionSpec(ModelSpec):
    name = "fusion"

    def module(self) -> nn.Module:
        return FusionKV(self.models.adapter)

    def dynamic_axes(self):
        return {"levels": {0: "batch", 1: "subjects"}, "level_weights": {0: "batch", 1: "subjects"},
                "level_override": {0: "batch", 1: "subjects"}}

    def shapes(self, batch, subjects, height, width):
        v, a = self.cfg.vision, self.cfg.adapter
        return {"levels": (batch, subjects, a.num_levels, v.num_tokens, v.hidden_size),
                "level_weights": (batch, subjects, a.num_levels), "level_override": (batch, subjects)}

    def fix_inputs(self, inputs, height, width):
        inputs["level_weights"] = inputs["level_weights"].abs()
        inputs["level_override"] = (torch.arange(inputs["level_override"].numel()) % 2).float().reshape(
            inputs["level_override"].shape)
        return inputs


class TextSpec(ModelSpec):
    name = "text"
    precisions = ("fp32", "bf16")  # T5 overflows in fp16

    def module(self) -> nn.Module:
        return TextEncoders(self.models.clip_text, self.models.t5)

    def dynamic_axes(self):
        return {"clip_ids": {0: "batch"}, "t5_ids": {0: "batch"}}

    def shapes(self, batch, subjects, height, width):
        t = self.cfg.text
        return {"clip_ids": (batch, t.clip_max_length), "t5_ids": (batch, t.max_text_length)}

    def int_inputs(self):
        t = self.cfg.text
        return {"clip_ids": t.clip_vocab_size, "t5_ids": t.t5_vocab_size}


class DiTSpec(ModelSpec):
    name = "dit"
    precisions = ("fp32", "fp16", "bf16", "fp8")

    def module(self) -> nn.Module:
        return DiTStep(self.models.transformer, self.cfg.adapter.attention_mode)

    def dynamic_axes(self):
        bn = {0: "batch", 1: "image_tokens"}
        return {"latents": bn, "text_embeds": {0: "batch"}, "pooled": {0: "batch"}, "timestep": {0: "batch"},
                "guidance": {0: "batch"}, "img_ids": {0: "image_tokens"}, "img_k": {1: "batch", 2: "subjects"},
                "img_v": {1: "batch", 2: "subjects"}, "scales": {0: "batch", 1: "subjects"},
                "masks": {0: "batch", 1: "subjects", 2: "image_tokens"}}

    def shapes(self, batch, subjects, height, width):
        c, t = self.cfg, self.cfg.transformer
        n = image_token_count(height, width, c.vae.spatial_factor)
        blocks = t.num_layers + (t.num_single_layers if c.adapter.inject_single else 0)
        kv = (blocks, batch, subjects, c.adapter.num_tokens, t.inner_dim)
        return {"latents": (batch, n, t.in_channels), "text_embeds": (batch, c.text.max_text_length,
                t.joint_attention_dim), "pooled": (batch, t.pooled_projection_dim), "timestep": (batch,),
                "guidance": (batch,), "img_ids": (n, 3), "txt_ids": (c.text.max_text_length, 3), "img_k": kv,
                "img_v": kv, "scales": (batch, subjects), "masks": (batch, subjects, n)}

    def fix_inputs(self, inputs, height, width):
        b = inputs["latents"].shape[0]
        inputs["timestep"] = torch.linspace(0.9, 0.3, b)
        inputs["guidance"] = torch.full((b,), self.cfg.guidance)
        inputs["img_ids"] = latent_image_ids(height, width, self.cfg.vae.spatial_factor)
        inputs["txt_ids"] = text_ids(self.cfg.text.max_text_length)
        inputs["scales"] = inputs["scales"].abs()
        inputs["masks"] = (inputs["masks"] > -0.5).float()
        return inputs


class VaeSpec(ModelSpec):
    name = "vae"

    def module(self) -> nn.Module:
        return VaeDecode(self.models.vae)

    def dynamic_axes(self):
        return {"latents": {0: "batch", 2: "latent_height", 3: "latent_width"}}

    def shapes(self, batch, subjects, height, width):
        f = self.cfg.vae.spatial_factor
        return {"latents": (batch, self.cfg.vae.latent_channels, height // f, width // f)}


SPECS: dict[str, type[ModelSpec]] = {s.name: s for s in (ClipSpec, FusionSpec, TextSpec, DiTSpec, VaeSpec)}


def get_spec(name: str, models: DynaIPModels | DynaIPConfig) -> ModelSpec:
    if name not in SPECS:
        raise ConfigError(f"unknown model {name!r}; exportable models are {sorted(SPECS)}")
    return SPECS[name](models)
