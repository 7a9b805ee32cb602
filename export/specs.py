"""One declaration per exported model (as NVIDIA TensorRT's demo/Diffusion does): I/O names, dynamic axes,
concrete shapes for any request envelope, min/opt/max engine profiles, sample inputs and allowed precisions."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynaip_trt.configs import DynaIPConfig
from dynaip_trt.errors import ConfigError
from dynaip_trt.manifest import MODEL_IO, REQUIRED_MODELS
from dynaip_trt.sampling import image_token_count, latent_image_ids, text_ids

from .envelope import Envelope

if TYPE_CHECKING:  # the declarations are lean: torch and the model code load when a module or input is built
    import torch
    from torch import nn

    from dynaip_trt.models import DynaIPModels

Shape = tuple[int, ...]


class ModelSpec:
    """Base declaration. Subclasses define the module, dynamic axes and shapes of one model."""

    name: str = ""
    precisions: tuple[str, ...] = ("fp32", "fp16", "bf16")

    def __init__(self, models: DynaIPModels | DynaIPConfig):
        """``models``: the family to export, or only its config for a shape-only spec (profiles, sample inputs;
        :meth:`module` then raises)."""
        self._models = None if isinstance(models, DynaIPConfig) else models
        self.cfg: DynaIPConfig = models if isinstance(models, DynaIPConfig) else models.config

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

    def module(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The flat module (:mod:`dynaip_trt.stage_modules`) computing in ``dtype`` (default float32), float32 in
        and out."""
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
        import torch

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

    def module(self, dtype: torch.dtype | None = None) -> nn.Module:
        from dynaip_trt.stage_modules import ClipLevels

        return ClipLevels(self.models.vision, self.cfg.adapter.tap_layers, dtype, self.cfg.adapter.encoder)

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

    def module(self, dtype: torch.dtype | None = None) -> nn.Module:
        from dynaip_trt.stage_modules import FusionKV

        return FusionKV(self.models.adapter, dtype)

    def dynamic_axes(self):
        return {"levels": {0: "batch", 1: "subjects"}, "level_weights": {0: "batch", 1: "subjects"},
                "level_override": {0: "batch", 1: "subjects"}}

    def shapes(self, batch, subjects, height, width):
        levels, tokens, width = self.cfg.level_shape
        return {"levels": (batch, subjects, levels, tokens, width),
                "level_weights": (batch, subjects, levels), "level_override": (batch, subjects)}

    def fix_inputs(self, inputs, height, width):
        import torch

        inputs["level_weights"] = inputs["level_weights"].abs()
        inputs["level_override"] = (torch.arange(inputs["level_override"].numel()) % 2).float().reshape(
            inputs["level_override"].shape)
        return inputs


class TextSpec(ModelSpec):
    name = "text"
    precisions = ("fp32", "bf16")  # T5 overflows in fp16

    def module(self, dtype: torch.dtype | None = None) -> nn.Module:
        from dynaip_trt.stage_modules import TextEncoders

        return TextEncoders(self.models.clip_text, self.models.t5, dtype)

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

    def module(self, dtype: torch.dtype | None = None) -> nn.Module:
        from dynaip_trt.stage_modules import DiTStep

        return DiTStep(self.models.transformer, self.cfg.adapter.attention_mode, dtype)

    def dynamic_axes(self):
        bn = {0: "batch", 1: "image_tokens"}
        return {"latents": bn, "text_embeds": {0: "batch"}, "pooled": {0: "batch"}, "timestep": {0: "batch"},
                "timestep_next": {0: "batch"}, "guidance": {0: "batch"}, "img_ids": {0: "image_tokens"},
                "img_k": {1: "batch", 2: "subjects"}, "img_v": {1: "batch", 2: "subjects"},
                "scales": {0: "batch", 1: "subjects"}, "masks": {0: "batch", 1: "subjects", 2: "image_tokens"}}

    def shapes(self, batch, subjects, height, width):
        c, t = self.cfg, self.cfg.transformer
        n = image_token_count(height, width, c.vae.spatial_factor)
        blocks = c.injected_blocks
        kv = (blocks, batch, subjects, c.adapter.num_tokens, t.inner_dim)
        return {"latents": (batch, n, t.in_channels), "text_embeds": (batch, c.text.max_text_length,
                t.joint_attention_dim), "pooled": (batch, t.pooled_projection_dim), "timestep": (batch,),
                "timestep_next": (batch,), "guidance": (batch,), "img_ids": (n, 3),
                "txt_ids": (c.text.max_text_length, 3), "img_k": kv, "img_v": kv, "scales": (batch, subjects),
                "masks": (batch, subjects, n), "block_scales": (blocks,)}

    def fix_inputs(self, inputs, height, width):
        import torch

        b = inputs["latents"].shape[0]
        inputs["timestep"] = torch.linspace(0.9, 0.3, b)
        inputs["timestep_next"] = inputs["timestep"] - 0.2
        inputs["guidance"] = torch.full((b,), self.cfg.guidance)
        inputs["img_ids"] = torch.from_numpy(latent_image_ids(height, width, self.cfg.vae.spatial_factor))
        inputs["txt_ids"] = torch.from_numpy(text_ids(self.cfg.text.max_text_length))
        inputs["scales"] = inputs["scales"].abs()
        inputs["masks"] = (inputs["masks"] > -0.5).float()
        inputs["block_scales"] = 0.5 + inputs["block_scales"].abs()
        return inputs


class DiTDBIMSpec(DiTSpec):
    """DBIM's mixing-step DiT (:class:`~dynaip_trt.stage_modules.DiTDBIMStep`): the DiT's inputs and profile, on
    ``2B`` rows (concept rows, then their auxiliary rows: the batch axis must be even), plus the per-row DBIM
    inputs. No FP8 variant: the mixing steps are few, an fp8 build runs them on its base precision's graph."""

    name = "dit_dbim"
    precisions = ("fp32", "fp16", "bf16")

    def module(self, dtype: torch.dtype | None = None) -> nn.Module:
        from dynaip_trt.stage_modules import DiTDBIMStep

        return DiTDBIMStep(self.models.transformer, self.cfg.adapter.attention_mode, dtype)

    def dynamic_axes(self):
        per_row = {0: "batch"}
        return {**super().dynamic_axes(), "prompt_tokens": per_row, "map_tokens": per_row, "reference_map": per_row,
                "dbim_lambda": per_row}

    def shapes(self, batch, subjects, height, width):
        length = self.cfg.text.max_text_length
        return {**super().shapes(batch, subjects, height, width), "prompt_tokens": (batch, length),
                "map_tokens": (batch, length), "reference_map": (batch,), "dbim_lambda": (batch,)}

    def fix_inputs(self, inputs, height, width):
        import torch

        inputs = super().fix_inputs(inputs, height, width)
        b, length = inputs["prompt_tokens"].shape
        own = (torch.arange(length)[None, :] < torch.tensor([length // 2 + i for i in range(b)])[:, None]).float()
        inputs["prompt_tokens"] = own  # each row's own tokens: a prefix, as real prompts have
        inputs["map_tokens"] = own * (inputs["map_tokens"] > 0).float()
        inputs["map_tokens"][:, 0] = 1.0  # never an empty token set
        inputs["reference_map"] = (torch.arange(b) % 2 == 0).float()
        inputs["dbim_lambda"] = torch.linspace(-2.0, 2.0, b)
        return inputs


class VaeSpec(ModelSpec):
    name = "vae"

    def module(self, dtype: torch.dtype | None = None) -> nn.Module:
        from dynaip_trt.stage_modules import VaeDecode

        return VaeDecode(self.models.vae, dtype)

    def dynamic_axes(self):
        return {"latents": {0: "batch", 2: "latent_height", 3: "latent_width"}}

    def shapes(self, batch, subjects, height, width):
        f = self.cfg.vae.spatial_factor
        return {"latents": (batch, self.cfg.vae.latent_channels, height // f, width // f)}


SPECS: dict[str, type[ModelSpec]] = {s.name: s for s in (ClipSpec, FusionSpec, TextSpec, DiTSpec, VaeSpec,
                                                         DiTDBIMSpec)}
# the required models with each variant (DBIM's optional dit_dbim has both too: variants_of)
FP16_MODELS = tuple(n for n in REQUIRED_MODELS if "fp16" in SPECS[n].precisions)  # not text: T5 overflows in fp16
BF16_MODELS = tuple(n for n in REQUIRED_MODELS if "bf16" in SPECS[n].precisions)


def variants_of(precision: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """The models of ``names`` that have a ``precision`` graph (``fp16``, ``bf16``)."""
    return tuple(n for n in names if precision in SPECS[n].precisions)


def get_spec(name: str, models: DynaIPModels | DynaIPConfig) -> ModelSpec:
    if name not in SPECS:
        raise ConfigError(f"unknown model {name!r}; exportable models are {sorted(SPECS)}")
    return SPECS[name](models)
