"""Export every model the runtime needs to ONNX (TensorRT-ready) and write a manifest.

    python -m export.onnx --config tiny --out build/tiny [--fp16] [--bf16] [--models dit,fusion] [--opset 18]
    python -m export.onnx --base /path/FLUX.1-dev --clip /path/clip-vit-large-patch14 --adapter dynaip.safetensors \\
        --out build/flux-dev          # full depth: run on a big machine (see README), not in CI

Each model: ``torch.onnx.export(dynamo=True, optimize=False)`` with the dynamic axes its spec declares, then the
onnxscript optimizer (constant folding, sequence splits -> Split), graph checks (TensorRT op support, no float64, dynamic axes
still dynamic), external data above 2 GiB. Everything is written to a staging directory first and swapped in at
the end, so an interrupted export leaves the previous good build intact.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import torch
from tqdm.auto import tqdm

from dynaip_trt.configs import DynaIPConfig, get_config
from dynaip_trt.errors import ConfigError, DynaIPError, cli_main
from dynaip_trt.files import claim_dir
from dynaip_trt.manifest import MANIFEST_FILE, Manifest, ModelEntry, sha256_file
from dynaip_trt.models import DynaIPModels, build_models
from dynaip_trt.text import save_tokenizer
from dynaip_trt.weights import load_models

from .graph import TWO_GIB, GraphReport, check_graph, io_signature, optimize, save_model
from .specs import SPECS, Envelope, ModelSpec, get_spec

logger = logging.getLogger("export.onnx")
QUIET_LOGGERS = ("torch.onnx", "torch._export", "onnx_ir", "onnxscript", "polygraphy", "torch.fx")

DEFAULT_OPSET = 18
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VARIANT_PRECISIONS = ("fp16", "bf16")  # exported here; fp8 needs calibration (calibration.quantize)
FP16_MODELS = tuple(n for n, s in SPECS.items() if "fp16" in s.precisions)  # not text: T5 overflows in fp16
BF16_MODELS = tuple(n for n, s in SPECS.items() if "bf16" in s.precisions)


class GraphCheckError(DynaIPError, RuntimeError):
    """An exported graph is not TensorRT-ready (unsupported ops, float64, baked dynamic axes)."""


def export_model(spec: ModelSpec, path: Path, opset: int = DEFAULT_OPSET, dtype: torch.dtype = torch.float32,
                 keep_io_types: bool = True, external_threshold: int = TWO_GIB - 2**28, check: bool = True,
                 translation_table: dict | None = None) -> tuple[list[Path], GraphReport]:
    """Export one model to ``path``; returns the files written and the graph report.

    ``translation_table``: ONNX translations of custom torch ops (``torch.onnx.export``'s
    ``custom_translation_table``), e.g. the FP8 quantize-dequantize op of :mod:`calibration.quantize`.
    Raises :class:`GraphCheckError` if ``check`` and the graph is not TensorRT-ready.
    """
    from .wrappers import CastIO

    module = spec.module().eval()
    inputs = spec.sample_inputs()
    if dtype != torch.float32:
        module = CastIO(module, dtype, keep_io_types)
        if not keep_io_types:
            inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    dims: dict[str, torch.export.Dim] = {}
    dynamic_shapes = {}
    for name in spec.input_names:
        axes = spec.dynamic_axes().get(name)
        dynamic_shapes[name] = None if axes is None else {
            ax: dims.setdefault(n, torch.export.Dim(n, min=1, max=2**16)) for ax, n in axes.items()}
    if dtype != torch.float32:  # CastIO takes *args: one positional tuple of per-input specs
        dynamic_shapes = {"args": tuple(dynamic_shapes[n] for n in spec.input_names)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, tuple(inputs[n] for n in spec.input_names), dynamo=True, dynamic_shapes=dynamic_shapes,
            opset_version=opset, input_names=list(spec.input_names), output_names=list(spec.output_names),
            optimize=False, verbose=False, custom_translation_table=translation_table,
        )
    model = optimize(program.model_proto)
    model.producer_name = "dynaip-trt"
    report = check_graph(model, spec.dynamic_axes())
    if check and not report.ok:
        raise GraphCheckError(f"{spec.name}: exported graph is not TensorRT-ready: " + "; ".join(report.problems()))
    return save_model(model, path, external_threshold), report


def build_family(config: str | DynaIPConfig = "tiny", base: str | Path | None = None, clip: str | Path | None = None,
                 adapter: str | Path | None = None, seed: int = 0) -> DynaIPModels:
    """Models to export: local weights when ``base``/``clip`` are given, else seeded random weights."""
    if (base is None) != (clip is None):
        raise ConfigError("--base and --clip must be given together (a FLUX folder and a CLIP vision folder)")
    if base is not None:
        return load_models(base, clip, adapter)
    cfg = get_config(config) if isinstance(config, str) else config
    return build_models(cfg, seed=seed)


def variant_file(name: str, precision: str) -> str:
    """File name of a model's graph: ``dit.onnx`` (fp32 main graph) or ``dit.fp16.onnx`` (a variant)."""
    return f"{name}.onnx" if precision == "fp32" else f"{name}.{precision}.onnx"


def add_variant(entry: ModelEntry, precision: str, files: list[Path]) -> None:
    """Register exported variant ``files`` (graph first, then its external data) in a manifest entry."""
    entry.variants[precision] = files[0].name
    entry.files.update({f.name: sha256_file(f) for f in files})


def check_variants(variants: dict[str, tuple[str, ...]], names: tuple[str, ...]) -> None:
    """Every requested variant must be a precision exported here for a model of ``names`` that allows it."""
    for precision, models in variants.items():
        if precision not in VARIANT_PRECISIONS:
            hint = " (fp8 needs calibration: python -m calibration.quantize)" if precision == "fp8" else ""
            raise ConfigError(f"variant precision {precision!r} cannot be exported here; choose from "
                              f"{list(VARIANT_PRECISIONS)}{hint}")
        possible = [n for n in names if precision in SPECS[n].precisions]
        bad = [n for n in models if n not in possible]
        if bad:
            raise ConfigError(f"{precision} variants requested for {bad}; possible: {possible}")


def export_all(out_dir: str | Path, config: str | DynaIPConfig = "tiny", models: DynaIPModels | None = None,
               names: tuple[str, ...] = tuple(SPECS), opset: int = DEFAULT_OPSET,
               variants: dict[str, tuple[str, ...]] | None = None, keep_io_types: bool = True,
               envelope: Envelope | None = None, external_threshold: int = TWO_GIB - 2**28,
               progress: bool = True, what: str | None = None) -> Manifest:
    """Export ``names`` (plus the reduced-precision ``variants``, ``{"fp16": ("dit", ...), "bf16": (...)}``) to
    ``out_dir`` and write ``manifest.json``.

    ``out_dir`` must be new, empty or a previous build (only files its manifest lists): a folder holding anything
    else raises :class:`~dynaip_trt.errors.OutputError` naming it as ``what`` (default ``out_dir=...``) before any
    work. Everything is staged in a sibling temp directory and swapped in at the end (atomic for readers).
    """
    from .parity import save_references

    out_dir = claim_dir(out_dir, Manifest.owned_files, what or f"out_dir={str(out_dir)!r}")
    variants = variants or {}
    check_variants(variants, names)
    models = models or build_family(config)
    cfg = models.config
    env = envelope or Envelope(subjects=(1, min(2, cfg.max_subjects), cfg.max_subjects),
                               resolutions=((cfg.height, cfg.width),))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    staging.chmod(0o755)
    entries: dict[str, ModelEntry] = {}
    try:
        jobs = [(n, "fp32") for n in names] + [(n, p) for p, ns in variants.items() for n in ns]
        for name, precision in tqdm(jobs, desc="export", disable=not progress):
            spec = get_spec(name, models)
            fname = variant_file(name, precision)
            t0 = time.perf_counter()
            files, report = export_model(spec, staging / fname, opset, TORCH_DTYPES[precision], keep_io_types,
                                         external_threshold)
            logger.info("%s (%s): %d ops types, exported in %.1fs", name, precision, len(report.ops),
                        time.perf_counter() - t0)
            if precision == "fp32":
                inputs, outputs = io_signature(onnx.load(str(staging / fname), load_external_data=False))
                entries[name] = ModelEntry(onnx=fname, files={f.name: sha256_file(f) for f in files}, inputs=inputs,
                                           outputs=outputs, profile=spec.profile(env))
                entries[name].files.update(save_references(staging, models, (name,), env))
            else:
                add_variant(entries[name], precision, files)
        if "text" in names:  # the runtime tokenizes prompts with the exported text encoders' own tokenizers
            for tokenizer, folder in ((models.clip_tokenizer, "tokenizer"), (models.t5_tokenizer, "tokenizer_2")):
                save_tokenizer(tokenizer, staging / folder)
                entries["text"].files.update({f.relative_to(staging).as_posix(): sha256_file(f)
                                              for f in sorted((staging / folder).rglob("*")) if f.is_file()})
        manifest = Manifest(config=cfg.to_dict(), models=entries, opset=opset, max_subjects=env.subjects[2])
        manifest.save(staging)
        claim_dir(out_dir, Manifest.owned_files, what or f"out_dir={str(out_dir)!r}")  # still ours after the export
        _swap_in(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %s with %s", out_dir / MANIFEST_FILE, sorted(entries))
    return manifest


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``staging`` with renames only (the old build survives until the new one is whole)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def parse_resolutions(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple((int(h), int(w)) for h, w in (r.lower().split("x") for r in text.split(",")))
    except ValueError:
        raise ConfigError(f"--resolutions {text!r}: expected HxW[,HxW...], e.g. 1024x1024,768x1344") from None


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by ``export.onnx`` and ``export.build``."""
    p.add_argument("--config", default="tiny", help="named config when no weights are given (tiny, flux-dev)")
    p.add_argument("--base", help="local diffusers-format FLUX folder")
    p.add_argument("--clip", help="local transformers CLIP vision folder")
    p.add_argument("--adapter", "--weights", dest="adapter", help="DynaIP adapter .safetensors")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--max-subjects", type=int, help="largest subject count the engines accept")
    p.add_argument("--batch", type=int, default=None, help="largest batch the engines accept (default 4)")
    p.add_argument("--resolutions", help="HxW[,HxW...] the engines must serve (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")


def envelope_from_args(args: argparse.Namespace, cfg: DynaIPConfig) -> Envelope:
    max_s = args.max_subjects or cfg.max_subjects
    max_b = args.batch or 4
    res = parse_resolutions(args.resolutions) if args.resolutions else ((cfg.height, cfg.width),)
    for h, w in res:
        if h % cfg.pixel_multiple or w % cfg.pixel_multiple:
            raise ConfigError(f"--resolutions {h}x{w}: sides must be multiples of {cfg.pixel_multiple}")
    return Envelope(batch=(1, 1, max_b), subjects=(1, min(2, max_s), max_s), resolutions=res)


def configure_logging(verbose: bool) -> None:
    """INFO for this package; the exporter's and polygraphy's chatter only with ``--verbose``."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        from polygraphy.logger import G_LOGGER

        G_LOGGER.module_severity = G_LOGGER.ERROR


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--out", default=None, help="output directory (default build/<config>)")
    p.add_argument("--models", default=",".join(SPECS), help=f"subset of {','.join(SPECS)}")
    p.add_argument("--fp16", action="store_true", help=f"also export FP16 variants of {FP16_MODELS}")
    p.add_argument("--bf16", action="store_true", help=f"also export BF16 variants of {BF16_MODELS}")
    p.add_argument("--fp16-io", action="store_true", help="FP16/BF16 variants take/return fp16/bf16 tensors")
    args = p.parse_args(argv)
    configure_logging(args.verbose)
    names = tuple(n.strip() for n in args.models.split(",") if n.strip())
    for n in names:
        if n not in SPECS:
            raise ConfigError(f"--models: unknown model {n!r}; choose from {list(SPECS)}")
    if args.out:  # before loading any model: nothing of the user's may be replaced
        claim_dir(args.out, Manifest.owned_files, f"--out {args.out}")
    models = build_family(args.config, args.base, args.clip, args.adapter, args.seed)
    out = args.out or f"build/{models.config.name}"
    variants = {p: tuple(n for n in allowed if n in names)
                for p, allowed, wanted in (("fp16", FP16_MODELS, args.fp16), ("bf16", BF16_MODELS, args.bf16))
                if wanted}
    export_all(out, models=models, names=names, opset=args.opset, variants=variants,
               keep_io_types=not args.fp16_io, envelope=envelope_from_args(args, models.config), what=f"--out {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
