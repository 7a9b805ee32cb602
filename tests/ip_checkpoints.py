"""Synthetic public FLUX IP-Adapter checkpoints with the exact published key names, generated on the fly (never
stored). The names are spelled here from the public code, independently of ``dynaip_trt.convert``'s layout:

- XLabs ``flux-ip-adapter`` (safetensors): what x-flux's ``XFluxPipeline.set_ip`` and diffusers'
  ``FluxIPAdapterMixin.load_ip_adapter`` read: ``ip_adapter_proj_model.{proj,norm}.{weight,bias}`` (x-flux
  ``ImageProjModel``) and ``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}`` (x-flux
  ``IPDoubleStreamBlockProcessor``).
- InstantX ``FLUX.1-dev-IP-Adapter`` (``ip-adapter.bin``, ``torch.save`` of ``{"image_proj": MLPProjModel state,
  "ip_adapter": ModuleList of the 19 + 38 IPAFluxAttnProcessor2_0 states}``): ``proj.0``/``proj.2``/``norm`` and
  ``{i}.to_k_ip.weight``/``{i}.to_v_ip.weight`` (no biases; the key RMSNorm has no parameters).

``values="random"``: seeded normal values for numerics (tiny sizes); ``"index"``: every tensor filled with
``(its index + 1) / 1024`` (exact in bf16; cheap at full sizes, and each tensor identifiable after conversion).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from dynaip_trt.configs import DynaIPConfig


def _tensors(shapes: dict[str, tuple[int, ...]], values: str, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (key, shape) in enumerate(shapes.items()):
        if values == "index":
            out[key] = torch.full(shape, (i + 1) / 1024, dtype=dtype)
        else:  # LayerNorm weights near 1, everything else small
            base = 1.0 if key.endswith("norm.weight") else 0.0
            out[key] = (base + 0.05 * torch.randn(shape, generator=g)).to(dtype)
    return out


def xlabs_state(cfg: DynaIPConfig, values: str = "random", dtype: torch.dtype = torch.bfloat16, seed: int = 0
                ) -> dict[str, torch.Tensor]:
    """An XLabs checkpoint for ``cfg``'s sizes (token width ``cfg.adapter.token_dim``, CLIP ``image_embeds``
    width, ``cfg.adapter.num_tokens`` tokens, one processor per double-stream block)."""
    t, width, emb = cfg.transformer, cfg.adapter.token_dim, cfg.vision.projection_dim
    tokens = cfg.adapter.num_tokens * width
    shapes = {"ip_adapter_proj_model.proj.weight": (tokens, emb), "ip_adapter_proj_model.proj.bias": (tokens,),
              "ip_adapter_proj_model.norm.weight": (width,), "ip_adapter_proj_model.norm.bias": (width,)}
    for i in range(t.num_layers):
        for kv in "kv":
            shapes[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.weight"] = (t.inner_dim, width)
            shapes[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.bias"] = (t.inner_dim,)
    return _tensors(shapes, values, dtype, seed)


def instantx_state(cfg: DynaIPConfig, values: str = "random", dtype: torch.dtype = torch.bfloat16, seed: int = 0
                   ) -> dict[str, dict[str, torch.Tensor]]:
    """An InstantX checkpoint (nested as ``torch.save`` wrote it) for ``cfg``'s sizes (SigLIP pooled width, one
    processor per double-stream block, then per single-stream block)."""
    t, width, emb = cfg.transformer, cfg.adapter.token_dim, cfg.vision.hidden_size
    tokens = cfg.adapter.num_tokens * width
    proj = {"proj.0.weight": (2 * emb, emb), "proj.0.bias": (2 * emb,), "proj.2.weight": (tokens, 2 * emb),
            "proj.2.bias": (tokens,), "norm.weight": (width,), "norm.bias": (width,)}
    blocks = {f"{i}.to_{kv}_ip.weight": (t.inner_dim, width) for i in range(t.num_layers + t.num_single_layers)
              for kv in "kv"}
    flat = _tensors({**{f"image_proj.{k}": s for k, s in proj.items()},
                     **{f"ip_adapter.{k}": s for k, s in blocks.items()}}, values, dtype, seed)
    return {part: {k.removeprefix(f"{part}."): v for k, v in flat.items() if k.startswith(f"{part}.")}
            for part in ("image_proj", "ip_adapter")}


def write_xlabs(path: Path, cfg: DynaIPConfig, **kw) -> dict[str, torch.Tensor]:
    state = xlabs_state(cfg, **kw)
    save_file(state, str(path))
    return state


def write_instantx(path: Path, cfg: DynaIPConfig, **kw) -> dict[str, dict[str, torch.Tensor]]:
    state = instantx_state(cfg, **kw)
    torch.save(state, path)
    return state
