"""Weights I/O: the DynaIP adapter as ``.safetensors`` with a config header, and loading base models from local
diffusers/transformers folders. Only safetensors are read (never pickle); every write is atomic.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file, save_model

from .adapter import DynaIPAdapter
from .configs import AdapterConfig, DynaIPConfig, TextConfig, TransformerConfig, VaeConfig, VisionConfig
from .errors import WeightsError
from .files import atomic_path
from .models import DynaIPModels, build_adapter, finalize
from .text import load_tokenizer, save_tokenizer

logger = logging.getLogger(__name__)

ADAPTER_FORMAT = "dynaip-adapter"
ADAPTER_VERSION = "1"
BASE_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
CONFIG_FILE = "dynaip_config.json"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def save_adapter(adapter: DynaIPAdapter, path: str | Path) -> Path:
    """Save the adapter's weights and config (in the safetensors header) atomically."""
    meta = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "adapter_config": json.dumps(dataclasses.asdict(adapter.cfg)),
        "clip_dim": str(adapter.clip_dim),
        "inner_dim": str(adapter.inner_dim),
        "num_double": str(adapter.num_double),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def read_adapter_header(path: str | Path) -> dict[str, str]:
    """The metadata header of an adapter file; raises :class:`WeightsError` if missing/corrupt/not an adapter."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"adapter file {path} is corrupt or not a safetensors file: {e}") from e
    if meta.get("format") != ADAPTER_FORMAT:
        raise WeightsError(f"{path} is not a DynaIP adapter (header format={meta.get('format')!r})")
    return meta


def read_adapter_config(path: str | Path) -> AdapterConfig:
    meta = read_adapter_header(path)
    try:
        d = json.loads(meta["adapter_config"])
        return AdapterConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: invalid adapter_config in header: {e}") from e


def load_adapter(path: str | Path, adapter: DynaIPAdapter) -> DynaIPAdapter:
    """Load weights from ``path`` into ``adapter`` (in place), checking keys, shapes and dtypes.

    Raises :class:`WeightsError` naming missing/unexpected keys, shape mismatches (e.g. an adapter trained for
    another image encoder width) or non-float tensors.
    """
    meta = read_adapter_header(path)
    if int(meta.get("clip_dim", adapter.clip_dim)) != adapter.clip_dim:
        raise WeightsError(
            f"{path} was trained for an image encoder of width {meta['clip_dim']}; this model's CLIP width is "
            f"{adapter.clip_dim} (mismatched image encoder)"
        )
    expected = adapter.state_dict()
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
            if missing or unexpected:
                raise WeightsError(
                    f"{path}: key mismatch: missing {missing[:5]}{'...' if len(missing) > 5 else ''} "
                    f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
                )
            loaded = {}
            for k in sorted(keys):
                t = f.get_tensor(k)
                if t.dtype not in FLOAT_DTYPES:
                    raise WeightsError(f"{path}: tensor {k} has dtype {t.dtype}; expected one of {FLOAT_DTYPES}")
                if t.shape != expected[k].shape:
                    raise WeightsError(f"{path}: tensor {k} has shape {tuple(t.shape)}; the model expects "
                                       f"{tuple(expected[k].shape)}")
                if not torch.isfinite(t).all():
                    raise WeightsError(f"{path}: tensor {k} contains NaN or Inf")
                loaded[k] = t.to(expected[k].dtype)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"adapter file {path} is corrupt: {e}") from e
    adapter.load_state_dict(loaded, strict=True)
    return adapter


def save_models(models: DynaIPModels, base_dir: str | Path, clip_dir: str | Path,
                adapter_path: str | Path | None = None) -> None:
    """Write the family as local folders: a diffusers-format FLUX folder, a transformers CLIP folder and the
    adapter file (what :func:`load_models` reads; used to test real loading on tiny models)."""
    base_dir, clip_dir = Path(base_dir), Path(clip_dir)
    models.transformer.save_pretrained(base_dir / "transformer", safe_serialization=True)
    models.vae.save_pretrained(base_dir / "vae", safe_serialization=True)
    models.clip_text.save_pretrained(base_dir / "text_encoder", safe_serialization=True)
    models.t5.save_pretrained(base_dir / "text_encoder_2", safe_serialization=True)
    save_tokenizer(models.clip_tokenizer, base_dir / "tokenizer")
    save_tokenizer(models.t5_tokenizer, base_dir / "tokenizer_2")
    (base_dir / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (base_dir / CONFIG_FILE).write_text(json.dumps(models.config.to_dict(), indent=1))
    models.vision.save_pretrained(clip_dir, safe_serialization=True)
    if adapter_path is not None:
        save_adapter(models.adapter, adapter_path)


def _derive_config(base_dir: Path, transformer, vision, clip_text, t5, vae, adapter_cfg: AdapterConfig
                   ) -> DynaIPConfig:
    """A :class:`DynaIPConfig` describing loaded models (sampling defaults from ``dynaip_config.json`` if any)."""
    saved = json.loads((base_dir / CONFIG_FILE).read_text()) if (base_dir / CONFIG_FILE).is_file() else {}
    tc = transformer.config
    vc = vision.config
    text_saved = saved.get("text", {})
    cfg = dict(
        name=saved.get("name", base_dir.name),
        transformer=TransformerConfig(
            in_channels=tc.in_channels, num_layers=tc.num_layers, num_single_layers=tc.num_single_layers,
            attention_head_dim=tc.attention_head_dim, num_attention_heads=tc.num_attention_heads,
            joint_attention_dim=tc.joint_attention_dim, pooled_projection_dim=tc.pooled_projection_dim,
            guidance_embeds=tc.guidance_embeds, axes_dims_rope=tuple(tc.axes_dims_rope)),
        vision=VisionConfig(hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
                            num_hidden_layers=vc.num_hidden_layers, num_attention_heads=vc.num_attention_heads,
                            image_size=vc.image_size, patch_size=vc.patch_size),
        text=TextConfig(
            clip_vocab_size=clip_text.config.vocab_size, clip_hidden_size=clip_text.config.hidden_size,
            clip_intermediate_size=clip_text.config.intermediate_size,
            clip_layers=clip_text.config.num_hidden_layers, clip_heads=clip_text.config.num_attention_heads,
            clip_max_length=clip_text.config.max_position_embeddings, t5_vocab_size=t5.config.vocab_size,
            t5_d_model=t5.config.d_model, t5_d_ff=t5.config.d_ff, t5_layers=t5.config.num_layers,
            t5_heads=t5.config.num_heads, t5_d_kv=t5.config.d_kv,
            max_text_length=text_saved.get("max_text_length", 512)),
        vae=VaeConfig(block_out_channels=tuple(vae.config.block_out_channels),
                      layers_per_block=vae.config.layers_per_block, latent_channels=vae.config.latent_channels,
                      norm_num_groups=vae.config.norm_num_groups, scaling_factor=vae.config.scaling_factor,
                      shift_factor=vae.config.shift_factor),
        adapter=adapter_cfg,
    )
    cfg.update({k: saved[k] for k in ("height", "width", "steps", "guidance", "max_subjects", "seed") if k in saved})
    return DynaIPConfig(**cfg)


def _from_pretrained(cls, folder: Path, what: str):
    if not folder.is_dir():
        raise WeightsError(f"{what}: folder {folder} does not exist")
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise WeightsError(f"{what}: cannot load {cls.__name__} from {folder}: {e}") from e


def load_models(base_dir: str | Path, clip_dir: str | Path, adapter_path: str | Path | None = None,
                adapter_config: AdapterConfig | None = None) -> DynaIPModels:
    """Load a local diffusers-format FLUX folder, a local CLIP vision folder and (optionally) an adapter file.

    Without ``adapter_path`` a fresh zero-initialised adapter (``adapter_config`` or defaults) is attached, which
    leaves the base model's output unchanged.
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPVisionModel, T5EncoderModel

    base_dir, clip_dir = Path(base_dir), Path(clip_dir)
    if not base_dir.is_dir():
        raise WeightsError(f"base model folder {base_dir} does not exist")
    missing = [c for c in BASE_COMPONENTS if not (base_dir / c).is_dir()]
    if missing:
        raise WeightsError(f"base model folder {base_dir} lacks components {missing} (a diffusers FLUX folder has "
                           f"{list(BASE_COMPONENTS)})")
    transformer = _from_pretrained(FluxTransformer2DModel, base_dir / "transformer", "transformer")
    vae = _from_pretrained(AutoencoderKL, base_dir / "vae", "vae")
    clip_text = _from_pretrained(CLIPTextModel, base_dir / "text_encoder", "text_encoder")
    t5 = _from_pretrained(T5EncoderModel, base_dir / "text_encoder_2", "text_encoder_2")
    vision = _from_pretrained(CLIPVisionModel, clip_dir, "CLIP vision encoder")
    acfg = read_adapter_config(adapter_path) if adapter_path is not None else (adapter_config or AdapterConfig())
    if max(abs(i) for i in acfg.tap_layers) > vision.config.num_hidden_layers:
        raise WeightsError(f"adapter taps CLIP layers {acfg.tap_layers} but the encoder in {clip_dir} has "
                           f"{vision.config.num_hidden_layers} layers")
    cfg = _derive_config(base_dir, transformer, vision, clip_text, t5, vae, acfg)
    adapter = build_adapter(cfg)
    if adapter_path is not None:
        load_adapter(adapter_path, adapter)
    models = DynaIPModels(cfg, transformer, vision, clip_text, t5, vae, adapter,
                          load_tokenizer(base_dir / "tokenizer"), load_tokenizer(base_dir / "tokenizer_2"))
    logger.info("loaded %s from %s (+ CLIP %s, adapter %s)", cfg.name, base_dir, clip_dir, adapter_path)
    return finalize(models)


# ------------------------------------------------------------------------------------------ embedded defaults
EMBEDDED_ROOT = Path(__file__).parent / "data"
EMBEDDED_COMPONENTS = ("transformer", "vae", "clip_text", "t5", "vision")
EMBEDDED_INDEX = "weights.json"


def save_embedded(models: DynaIPModels, folder: str | Path) -> Path:
    """Write a trained family as an embedded default: ``config.json``, one safetensors per component
    (:data:`EMBEDDED_COMPONENTS` + ``adapter.safetensors`` with its header), the tokenizer, and
    ``weights.json`` (SHA-256 of every file). What :func:`load_embedded` reads."""
    from .manifest import sha256_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name in EMBEDDED_COMPONENTS:
        with atomic_path(folder / f"{name}.safetensors") as tmp:
            save_model(getattr(models, name), str(tmp))  # tied weights (T5's embeddings) stored once
        files.append(f"{name}.safetensors")
    save_adapter(models.adapter, folder / "adapter.safetensors")
    save_tokenizer(models.t5_tokenizer, folder)
    with atomic_path(folder / "config.json") as tmp:
        tmp.write_text(json.dumps(models.config.to_dict(), indent=1, sort_keys=True))
    files += ["adapter.safetensors", "tokenizer.json", "config.json"]
    with atomic_path(folder / EMBEDDED_INDEX) as tmp:
        tmp.write_text(json.dumps({f: sha256_file(folder / f) for f in files}, indent=1))
    return folder


def load_embedded(cfg: DynaIPConfig, folder: str | Path | None = None) -> DynaIPModels:
    """The trained family of an embedded config (``cfg.extra["embedded"]`` names its folder under
    ``dynaip_trt/data``). Every file is checked against ``weights.json`` and the saved config must equal ``cfg``;
    :class:`WeightsError` names the file otherwise."""
    from .manifest import sha256_file
    from .models import build_text_encoders, build_transformer, build_vae, build_vision
    from .text import WordLevelTokenizer

    folder = Path(folder) if folder is not None else EMBEDDED_ROOT / cfg.extra["embedded"]
    index_path = folder / EMBEDDED_INDEX
    if not index_path.is_file():
        raise WeightsError(f"the weights of the embedded {cfg.name!r} config are missing ({index_path}); reinstall "
                           f"the package or train them: python -m dynaip_trt.demo.train --out DIR")
    index = json.loads(index_path.read_text())
    for name, digest in index.items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != digest:
            raise WeightsError(f"{path} is missing or does not match its SHA-256 in {index_path} (corrupt or "
                               f"modified)")
    saved = json.loads((folder / "config.json").read_text())
    if saved != json.loads(json.dumps(cfg.to_dict())):
        raise WeightsError(f"{folder / 'config.json'} does not match the {cfg.name!r} config in "
                           f"dynaip_trt/configs.py (weights trained for another config)")
    clip_text, t5 = build_text_encoders(cfg)
    modules = {"transformer": build_transformer(cfg), "vae": build_vae(cfg), "clip_text": clip_text, "t5": t5,
               "vision": build_vision(cfg)}
    for name, module in modules.items():
        path = folder / f"{name}.safetensors"
        try:
            load_model(module, str(path), strict=True)
        except (RuntimeError, SafetensorError) as e:
            raise WeightsError(f"{path} does not fit the {cfg.name!r} {name}: {e}") from e
    adapter = load_adapter(folder / "adapter.safetensors", build_adapter(cfg))
    tok = WordLevelTokenizer.from_file(folder / "tokenizer.json")
    models = DynaIPModels(cfg, modules["transformer"], modules["vision"], clip_text, t5, modules["vae"], adapter,
                          tok, tok)
    logger.info("loaded the embedded %r weights from %s", cfg.name, folder)
    return finalize(models)
