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
from .configs import (ADAPTER_FORMAT, DEFAULT_CONFIG, EMBEDDED_CONFIGS, SIGLIP_NORM, AdapterConfig, DynaIPConfig, TextConfig, TransformerConfig,
                      VaeConfig, VisionConfig, get_config)
from .errors import ConfigError, WeightsError
from .files import atomic_path
from .cli import WEIGHTS_CONFIG_FILE, family_name
from .manifest import sha256_file
from .models import (VISION_CLASSES, DynaIPModels, build_adapter, build_models, build_text_encoders, build_transformer,
                     build_vae, build_vision, finalize)
from .text import TOKENIZER_FILE, Tokenizer

logger = logging.getLogger(__name__)

ADAPTER_VERSION = "1"
BASE_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# config.json model types an image-encoder folder may have, per AdapterConfig.encoder (a full CLIP or SigLIP model
# folder holds the vision tower too)
ENCODER_MODEL_TYPES = {"clip_levels": ("clip", "clip_vision_model"), "clip_embeds": ("clip", "clip_vision_model"),
                       "siglip_pooled": ("siglip", "siglip_vision_model")}


def adapter_metadata(cfg: AdapterConfig, clip_dim: int, inner_dim: int, num_double: int, **extra: str
                     ) -> dict[str, str]:
    """The safetensors header of an adapter file: its config and the widths it was made for (``extra``: more
    string fields, e.g. the format a converted checkpoint came from)."""
    return {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "adapter_config": json.dumps(dataclasses.asdict(cfg)),
            "clip_dim": str(clip_dim), "inner_dim": str(inner_dim), "num_double": str(num_double), **extra}


def write_adapter_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write adapter tensors (names as :class:`DynaIPAdapter`'s state dict) with ``metadata`` atomically."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def save_adapter(adapter: DynaIPAdapter, path: str | Path) -> Path:
    """Save the adapter's weights and config (in the safetensors header) atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    return write_adapter_file(tensors, path, adapter_metadata(adapter.cfg, adapter.clip_dim, adapter.inner_dim,
                                                              adapter.num_double))


def all_finite(t: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """Whether every value of ``t`` is finite, checked ``chunk`` values at a time (a 2.4 GB tensor never needs a
    2.4 G-element mask)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


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
                if not all_finite(t):
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
    models.clip_tokenizer.save(base_dir / "tokenizer")
    models.t5_tokenizer.save(base_dir / "tokenizer_2")
    (base_dir / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (base_dir / WEIGHTS_CONFIG_FILE).write_text(json.dumps(models.config.to_dict(), indent=1))
    models.vision.save_pretrained(clip_dir, safe_serialization=True)
    if adapter_path is not None:
        save_adapter(models.adapter, adapter_path)


def _vision_config(vision, encoder: str) -> VisionConfig:
    """The :class:`VisionConfig` of a loaded image encoder (preprocessing: CLIP's, or SigLIP's for SigLIP)."""
    vc = vision.config
    preprocessing = dict(image_mean=SIGLIP_NORM, image_std=SIGLIP_NORM, crop=False) if encoder == "siglip_pooled" \
        else {}
    return VisionConfig(hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
                        num_hidden_layers=vc.num_hidden_layers, num_attention_heads=vc.num_attention_heads,
                        image_size=vc.image_size, patch_size=vc.patch_size,
                        projection_dim=getattr(vc, "projection_dim", VisionConfig.projection_dim), **preprocessing)


def _derive_config(base_dir: Path, transformer, vision, clip_text, t5, vae, adapter_cfg: AdapterConfig
                   ) -> DynaIPConfig:
    """A :class:`DynaIPConfig` describing loaded models (sampling defaults from ``dynaip_config.json`` if any)."""
    saved_file = base_dir / WEIGHTS_CONFIG_FILE
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}
    saved["name"] = family_name("", base_dir)
    tc = transformer.config
    text_saved = saved.get("text", {})
    cfg = dict(
        name=saved["name"],
        transformer=TransformerConfig(
            in_channels=tc.in_channels, num_layers=tc.num_layers, num_single_layers=tc.num_single_layers,
            attention_head_dim=tc.attention_head_dim, num_attention_heads=tc.num_attention_heads,
            joint_attention_dim=tc.joint_attention_dim, pooled_projection_dim=tc.pooled_projection_dim,
            guidance_embeds=tc.guidance_embeds, axes_dims_rope=tuple(tc.axes_dims_rope)),
        vision=_vision_config(vision, adapter_cfg.encoder),
        text=TextConfig(
            clip_vocab_size=clip_text.config.vocab_size, clip_hidden_size=clip_text.config.hidden_size,
            clip_intermediate_size=clip_text.config.intermediate_size,
            clip_layers=clip_text.config.num_hidden_layers, clip_heads=clip_text.config.num_attention_heads,
            clip_max_length=clip_text.config.max_position_embeddings, t5_vocab_size=t5.config.vocab_size,
            t5_d_model=t5.config.d_model, t5_d_ff=t5.config.d_ff, t5_layers=t5.config.num_layers,
            t5_heads=t5.config.num_heads, t5_d_kv=t5.config.d_kv,
            max_text_length=text_saved.get("max_text_length", 512),
            clip_pad_id=clip_text.config.pad_token_id, clip_eos_id=clip_text.config.eos_token_id),
        vae=VaeConfig(block_out_channels=tuple(vae.config.block_out_channels),
                      layers_per_block=vae.config.layers_per_block, latent_channels=vae.config.latent_channels,
                      norm_num_groups=vae.config.norm_num_groups, scaling_factor=vae.config.scaling_factor,
                      shift_factor=vae.config.shift_factor),
        adapter=adapter_cfg,
    )
    cfg.update({k: saved[k] for k in ("height", "width", "steps", "guidance", "max_subjects", "seed") if k in saved})
    return DynaIPConfig(**cfg)


def load_tokenizer(folder: Path, max_length: int) -> Tokenizer:
    """A local tokenizer folder as a :class:`~dynaip_trt.text.Tokenizer` padded/truncated to ``max_length``: a
    ``tokenizer.json`` saved by dynaip-trt is read directly; any other (e.g. FLUX's CLIP ``vocab.json`` +
    ``merges.txt``) is converted by transformers' fast tokenizer."""
    if not folder.is_dir():
        raise WeightsError(f"tokenizer folder {folder} does not exist")
    ours = folder / TOKENIZER_FILE
    if ours.is_file() and json.loads(ours.read_text()).get("padding"):
        return Tokenizer.load(folder, max_length)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot load a tokenizer from {folder}: {e}") from e
    if not tok.is_fast:
        raise WeightsError(f"{folder}: transformers has no fast tokenizer for it, so it cannot be converted")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return Tokenizer(tok.backend_tokenizer, max_length, int(pad_id or 0))


def _from_pretrained(cls, folder: Path, what: str):
    if not folder.is_dir():
        raise WeightsError(f"{what}: folder {folder} does not exist")
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise WeightsError(f"{what}: cannot load {cls.__name__} from {folder}: {e}") from e


def load_models(base_dir: str | Path, clip_dir: str | Path, adapter_path: str | Path | None = None,
                adapter_config: AdapterConfig | None = None) -> DynaIPModels:
    """Load a local diffusers-format FLUX folder, a local image-encoder folder and (optionally) an adapter file.

    The adapter's config (from its header) says which image encoder the folder must hold: a CLIP vision model (with
    its visual projection for ``clip_embeds``) or a SigLIP one. Without ``adapter_path`` a fresh zero-initialised
    adapter (``adapter_config`` or defaults) is attached, which leaves the base model's output unchanged.
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

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
    acfg = read_adapter_config(adapter_path) if adapter_path is not None else (adapter_config or AdapterConfig())
    check_encoder_folder(clip_dir, acfg.encoder)
    vision = _from_pretrained(VISION_CLASSES[acfg.encoder], clip_dir, "image encoder")
    if max((abs(i) for i in acfg.tap_layers), default=0) > vision.config.num_hidden_layers:
        raise WeightsError(f"adapter taps CLIP layers {acfg.tap_layers} but the encoder in {clip_dir} has "
                           f"{vision.config.num_hidden_layers} layers")
    cfg = _derive_config(base_dir, transformer, vision, clip_text, t5, vae, acfg)
    adapter = build_adapter(cfg)
    if adapter_path is not None:
        load_adapter(adapter_path, adapter)
    models = DynaIPModels(cfg, transformer, vision, clip_text, t5, vae, adapter,
                          load_tokenizer(base_dir / "tokenizer", cfg.text.clip_max_length),
                          load_tokenizer(base_dir / "tokenizer_2", cfg.text.max_text_length))
    logger.info("loaded %s from %s (+ image encoder %s, adapter %s)", cfg.name, base_dir, clip_dir, adapter_path)
    return finalize(models)


def check_encoder_folder(folder: Path, encoder: str) -> None:
    """The image-encoder folder must hold the kind of model the adapter was trained with (a SigLIP folder loaded as
    CLIP would silently get random weights): :class:`WeightsError` naming both otherwise."""
    config = folder / "config.json"
    if not config.is_file():
        return  # _from_pretrained names the missing folder or file
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, OSError, AttributeError) as e:
        raise WeightsError(f"image encoder: {config} is not a valid config file: {e}") from e
    allowed = ENCODER_MODEL_TYPES[encoder]
    if model_type not in allowed:
        raise WeightsError(f"image encoder: {folder} holds a {model_type!r} model, but the adapter's encoder "
                           f"{encoder!r} needs a {' or '.join(repr(a) for a in allowed)} model")


def load_family(config: str | DynaIPConfig = DEFAULT_CONFIG, base: str | Path | None = None,
                clip: str | Path | None = None, adapter: str | Path | None = None, seed: int = 0) -> DynaIPModels:
    """The models a command runs: local weights when ``base``/``clip`` are given (``adapter`` optional), else the
    named config's: the trained weights shipped with the package for :data:`~dynaip_trt.configs.EMBEDDED_CONFIGS`
    (``tiny``), seeded random ones for the others."""
    if (base is None) != (clip is None):
        raise ConfigError("base and clip must be given together (a FLUX folder and an image-encoder folder)")
    if base is not None:
        return load_models(base, clip, adapter)
    if adapter is not None:
        raise ConfigError("an adapter file needs its base model: give base and clip too")
    cfg = get_config(config) if isinstance(config, str) else config
    if cfg.name in EMBEDDED_CONFIGS:
        return load_embedded(cfg)
    return build_models(cfg, seed=seed)


# ------------------------------------------------------------------------------------------ embedded defaults
EMBEDDED_ROOT = Path(__file__).parent / "data"
EMBEDDED_COMPONENTS = ("transformer", "vae", "clip_text", "t5", "vision")
EMBEDDED_INDEX = "weights.json"


def save_embedded(models: DynaIPModels, folder: str | Path) -> Path:
    """Write a trained family as an embedded default: ``config.json``, one safetensors per component
    (:data:`EMBEDDED_COMPONENTS` + ``adapter.safetensors`` with its header), the tokenizer, and
    ``weights.json`` (SHA-256 of every file). What :func:`load_embedded` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name in EMBEDDED_COMPONENTS:
        with atomic_path(folder / f"{name}.safetensors") as tmp:
            save_model(getattr(models, name), str(tmp))  # tied weights (T5's embeddings) stored once
        files.append(f"{name}.safetensors")
    save_adapter(models.adapter, folder / "adapter.safetensors")
    models.t5_tokenizer.save(folder)  # one word-level tokenizer serves both text encoders
    with atomic_path(folder / "config.json") as tmp:
        tmp.write_text(json.dumps(models.config.to_dict(), indent=1, sort_keys=True))
    files += ["adapter.safetensors", TOKENIZER_FILE, "config.json"]
    with atomic_path(folder / EMBEDDED_INDEX) as tmp:
        tmp.write_text(json.dumps({f: sha256_file(folder / f) for f in files}, indent=1))
    return folder


def load_embedded(cfg: DynaIPConfig, folder: str | Path | None = None) -> DynaIPModels:
    """The trained family of an embedded config (:data:`~dynaip_trt.configs.EMBEDDED_CONFIGS`: its weights are in
    ``dynaip_trt/data/<name>``, or in ``folder``). Every file is checked against ``weights.json`` and the saved
    config must equal ``cfg``; :class:`WeightsError` names the file otherwise."""
    folder = Path(folder) if folder is not None else EMBEDDED_ROOT / cfg.name
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
    clip_tok = Tokenizer.load(folder, cfg.text.clip_max_length)
    t5_tok = Tokenizer.load(folder, cfg.text.max_text_length)
    models = DynaIPModels(cfg, modules["transformer"], modules["vision"], clip_text, t5, modules["vae"], adapter,
                          clip_tok, t5_tok)
    logger.info("loaded the embedded %r weights from %s", cfg.name, folder)
    return finalize(models)
