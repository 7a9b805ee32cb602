"""Convert a public FLUX IP-Adapter checkpoint into a DynaIP adapter file (its config in the safetensors header).

    python -m dynaip_trt.convert --format xlabs ip_adapter.safetensors --out xlabs.safetensors
    python -m dynaip_trt.convert --format instantx ip-adapter.bin --out instantx.safetensors

Every key and shape is checked against the format's published layout for the base model family of ``--config``
(default: the format's FLUX.1-dev family, ``flux-dev-xlabs`` or ``flux-dev-instantx``) before anything is written.
Pickled checkpoints (InstantX's ``ip-adapter.bin``) are read with ``torch.load(weights_only=True)`` only: nothing but
tensors and plain containers is ever unpickled. The output is written atomically and never replaces a file
dynaip-trt did not write. Bad input prints one line naming the problem and exits with status 2.

Layouts (``docs/ip-adapters.md``): XLabs ``ip_adapter_proj_model.{proj,norm}.*`` and
``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}``; InstantX ``image_proj.proj.{0,2}.*``,
``image_proj.norm.*`` and ``ip_adapter.{i}.to_{k,v}_ip.weight`` (double-stream blocks, then single-stream blocks),
either as one flat dict or nested as ``{"image_proj": {...}, "ip_adapter": {...}}`` (how ``torch.save`` wrote it).
"""

from __future__ import annotations

import argparse
import json
import logging
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any

from .cli import check_writable_file, cli_main, configure_logging, progress
from .configs import ADAPTER_FORMAT, CONFIGS, IP_ADAPTER_FORMATS, DynaIPConfig, get_config
from .errors import ConfigError, InputError, WeightsError

logger = logging.getLogger("dynaip_trt.convert")

Layout = dict[str, tuple[str, tuple[int, ...]]]  # public key -> (adapter key, shape)


def checkpoint_layout(fmt: str, cfg: DynaIPConfig) -> Layout:
    """Every tensor of a ``fmt`` checkpoint made for the models of ``cfg``: ``{public key: (key in
    :class:`~dynaip_trt.adapter.DynaIPAdapter`'s state dict, shape)}``."""
    check_config(fmt, cfg)
    a, t = cfg.adapter, cfg.transformer
    width, inner, emb = a.token_dim or t.inner_dim, t.inner_dim, cfg.encoder_width
    tokens = a.num_tokens * width
    norm = {".norm.weight": (width,), ".norm.bias": (width,)}
    if fmt == "xlabs":
        proj = {".proj.weight": (tokens, emb), ".proj.bias": (tokens,), **norm}
        layout = {f"ip_adapter_proj_model{k}": (f"fusion.experts.0{k}", s) for k, s in proj.items()}
        for i in range(t.num_layers):
            for kv in "kv":
                for p, shape in (("weight", (inner, width)), ("bias", (inner,))):
                    layout[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.{p}"] = (
                        f"img_kv.{i}.to_{kv}.{p}", shape)
        return layout
    proj = {".proj.0.weight": (2 * emb, emb), ".proj.0.bias": (2 * emb,), ".proj.2.weight": (tokens, 2 * emb),
            ".proj.2.bias": (tokens,), **norm}
    layout = {f"image_proj{k}": (f"fusion.experts.0{k}", s) for k, s in proj.items()}
    for i in range(cfg.injected_blocks):
        for kv in "kv":
            layout[f"ip_adapter.{i}.to_{kv}_ip.weight"] = (f"img_kv.{i}.to_{kv}.weight", (inner, width))
    return layout


def check_config(fmt: str, cfg: DynaIPConfig) -> None:
    """``cfg``'s adapter must have the ``fmt`` layout; :class:`ConfigError` naming the configs that do otherwise."""
    if fmt not in IP_ADAPTER_FORMATS:
        raise ConfigError(f"--format {fmt}: unknown; choose one of {sorted(IP_ADAPTER_FORMATS)}")
    if any(getattr(cfg.adapter, k) != v for k, v in IP_ADAPTER_FORMATS[fmt].items()):
        fitting = [n for n in CONFIGS if n.endswith(f"-{fmt}")]
        raise ConfigError(f"--config {cfg.name} does not have the {fmt} adapter layout; use one of {fitting}")


def safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file (read with the standard library), or ``None`` when ``path`` is not
    a safetensors file."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 1 << 27:
                return None
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError):
        return None
    return header.get("__metadata__") or {} if isinstance(header, dict) else None


def is_adapter_file(path: Path) -> bool:
    """Whether ``path`` is an adapter file dynaip-trt wrote (so ``--out`` may replace it)."""
    return (safetensors_metadata(path) or {}).get("format") == ADAPTER_FORMAT


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The tensors of a safetensors file or a ``torch.save`` pickle (``weights_only=True``, memory-mapped when the
    file is a zip archive), flattened to ``{"a.b.c": tensor}``. Raises :class:`WeightsError` for unreadable files
    and for pickles holding anything but tensors and plain containers."""
    import pickle

    import torch
    from safetensors import SafetensorError, safe_open

    if safetensors_metadata(path) is not None:
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: corrupt safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # the weights-only unpickler met a class or function to import
            raise WeightsError(f"{path}: torch.load(weights_only=True) refused it: it holds objects other than "
                               f"tensors, and dynaip-trt never unpickles those") from e
        raise WeightsError(f"{path} is neither a safetensors file nor a readable PyTorch checkpoint") from e
    except Exception as e:  # torch.load raises many types (EOFError, KeyError, RuntimeError...) on other files
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]  # one line
        raise WeightsError(f"{path} is neither a safetensors file nor a readable PyTorch checkpoint ({reason})") from e
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return _flatten(obj)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": x}}`` -> ``{"a.b": x}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def convert_state_dict(state: dict[str, Any], fmt: str, cfg: DynaIPConfig, source: str | Path) -> dict[str, Any]:
    """A ``fmt`` checkpoint's tensors -> the adapter's (renamed, contiguous), after checking every key, dtype, shape
    and value. Raises :class:`WeightsError` naming ``source``, the key and both shapes on a mismatch."""
    import torch

    from .weights import FLOAT_DTYPES, all_finite

    layout = checkpoint_layout(fmt, cfg)
    missing, unexpected = sorted(set(layout) - set(state)), sorted(set(state) - set(layout))
    if missing or unexpected:
        other = [f for f in IP_ADAPTER_FORMATS if f != fmt and set(checkpoint_layout(f, _family(f, cfg))) & set(state)]
        hint = f" (its keys look like the {other[0]} layout: try --format {other[0]})" if other else ""
        raise WeightsError(f"{source} is not an {fmt} checkpoint for {cfg.name}{hint}: missing keys {missing[:3]}"
                           f"{'...' if len(missing) > 3 else ''} ({len(missing)}), unexpected keys {unexpected[:3]}"
                           f"{'...' if len(unexpected) > 3 else ''} ({len(unexpected)})")
    out = {}
    for key in progress(sorted(layout), "convert"):
        target, shape = layout[key]
        t = state[key]
        if not isinstance(t, torch.Tensor):
            raise WeightsError(f"{source}: {key} is a {type(t).__name__}, not a tensor")
        if t.dtype not in FLOAT_DTYPES:
            raise WeightsError(f"{source}: {key} has dtype {t.dtype}; expected one of {FLOAT_DTYPES}")
        if tuple(t.shape) != shape:
            raise WeightsError(f"{source}: {key} has shape {tuple(t.shape)}; the {fmt} layout for {cfg.name} "
                               f"expects {shape}")
        if not all_finite(t):
            raise WeightsError(f"{source}: {key} contains NaN or Inf")
        out[target] = t.contiguous()
    return out


def _family(fmt: str, cfg: DynaIPConfig) -> DynaIPConfig:
    """``cfg``'s size class with the ``fmt`` layout (for the wrong-format hint)."""
    return get_config(f"{'tiny' if cfg.name.startswith('tiny') else 'flux-dev'}-{fmt}")


def convert(source: str | Path, fmt: str, out: str | Path, cfg: DynaIPConfig) -> Path:
    """Convert the ``fmt`` checkpoint ``source`` for the models of ``cfg`` into the adapter file ``out``."""
    from .weights import adapter_metadata, write_adapter_file

    check_config(fmt, cfg)
    tensors = convert_state_dict(read_checkpoint(Path(source)), fmt, cfg, source)
    t = cfg.transformer
    meta = adapter_metadata(cfg.adapter, cfg.encoder_width, t.inner_dim, t.num_layers, source_format=fmt,
                            checked_against=cfg.name)
    path = write_adapter_file(tensors, out, meta)
    logger.info("wrote %s: %d tensors of the %s layout for %s", path, len(tensors), fmt, cfg.name)
    return path


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynaip_trt.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", metavar="IN", help="the public checkpoint (.safetensors, or InstantX's .bin pickle)")
    p.add_argument("--format", required=True, choices=sorted(IP_ADAPTER_FORMATS), help="the checkpoint's layout")
    p.add_argument("--out", required=True, metavar="FILE", help="adapter .safetensors to write")
    p.add_argument("--config", metavar="NAME", help="base model family the checkpoint must fit (default: "
                   "flux-dev-<format>, the FLUX.1-dev sizes)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    configure_logging(args.verbose)
    source = Path(args.checkpoint)
    if not source.is_file():
        raise InputError(f"IN {source}: no such file")
    out = check_writable_file(args.out, "--out", is_adapter_file)
    if out.resolve() == source.resolve():
        raise InputError(f"--out {out} is the input checkpoint; give a new file name")
    cfg = get_config(args.config or f"flux-dev-{args.format}")
    check_config(args.format, cfg)
    convert(source, args.format, out, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
