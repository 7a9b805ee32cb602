"""ONNX export of every model the runtime needs (TensorRT-ready) into a build folder with its manifest.

Each model: ``torch.onnx.export(dynamo=True, optimize=False)`` of its flat module (declared in :mod:`export.specs`)
with the dynamic axes its spec declares, then the onnxscript optimizer (constant folding, sequence splits -> Split),
graph checks (TensorRT op support, no float64, dynamic axes still dynamic), external data above 2 GiB. Everything is
written to a staging folder first and swapped in at the end, so an interrupted export leaves the previous good
build intact; a folder holding anything but a previous build of ours is refused before any work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import torch

from dynaip_trt.cli import progress as progress_bar
from dynaip_trt.configs import DEFAULT_CONFIG, DynaIPConfig
from dynaip_trt.errors import ConfigError
from dynaip_trt.files import claim_dir
from dynaip_trt.manifest import DEFAULT_OPSET, MANIFEST_FILE, MODEL_IO, REQUIRED_MODELS, Manifest, ModelEntry, \
    sha256_file
from dynaip_trt.models import DynaIPModels
from dynaip_trt.weights import load_family

from .graph import TWO_GIB, GraphCheckError, GraphReport, check_graph, io_signature, optimize, save_model
from .references import save_references
from .envelope import Envelope
from .specs import SPECS, ModelSpec, get_spec

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VARIANT_PRECISIONS = ("fp16", "bf16")  # exported here; fp8 needs calibration (export.fp8)


def export_model(spec: ModelSpec, path: Path, opset: int = DEFAULT_OPSET, dtype: torch.dtype = torch.float32,
                 external_threshold: int = TWO_GIB - 2**28, check: bool = True, module: torch.nn.Module | None = None,
                 translation_table: dict | None = None) -> tuple[list[Path], GraphReport]:
    """Export one model to ``path`` (inputs and outputs float32, computing in ``dtype``); returns the files written
    and the graph report.

    ``module``: the flat module to export instead of ``spec.module(dtype)`` (e.g. the FP8 DiT of
    :mod:`export.fp8`); ``translation_table``: ONNX translations of custom torch ops (``torch.onnx.export``'s
    ``custom_translation_table``). Raises :class:`GraphCheckError` if ``check`` and the graph is not TensorRT-ready.
    """
    module = (module if module is not None else spec.module(dtype)).eval()
    inputs = spec.sample_inputs()
    dims: dict[str, torch.export.Dim] = {}
    dynamic_shapes = {}
    for name in spec.input_names:
        axes = spec.dynamic_axes().get(name)
        dynamic_shapes[name] = None if axes is None else {
            ax: dims.setdefault(n, torch.export.Dim(n, min=1, max=2**16)) for ax, n in axes.items()}
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
            hint = " (fp8 needs calibration: python -m export.build --precision fp8)" if precision == "fp8" else ""
            raise ConfigError(f"variant precision {precision!r} cannot be exported here; choose from "
                              f"{list(VARIANT_PRECISIONS)}{hint}")
        possible = [n for n in names if precision in SPECS[n].precisions]
        bad = [n for n in models if n not in possible]
        if bad:
            raise ConfigError(f"{precision} variants requested for {bad}; possible: {possible}")


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over a module's parameters and buffers (names, dtypes, shapes, bytes): what its graph is made of."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def source_key(spec: ModelSpec, weights: str, opset: int, precision: str, env: Envelope) -> str:
    """The source of one exported graph: config, the model's weights, opset, precision, profile and the package's
    I/O contract. Equal keys give the same graph, so a previous build's graph with this key is reused."""
    from dynaip_trt import __version__

    blob = json.dumps({"config": spec.cfg.to_dict(), "weights": weights, "opset": opset, "precision": precision,
                       "profile": spec.profile(env), "io": MODEL_IO[spec.name], "version": __version__},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def graph_files(entry: ModelEntry, fname: str) -> list[str]:
    """The files of graph ``fname`` in a manifest entry: the graph and its external data, if any."""
    return [f for f in (fname, f"{fname}.data") if f in entry.files]


def reuse_graph(previous: tuple[Path, Manifest] | None, name: str, precision: str, key: str, staging: Path
                ) -> list[Path] | None:
    """Link (or copy) the graph of ``name``/``precision`` from the previous build into ``staging`` when it was
    exported from the same source (``key``) and its files still match their hashes; else ``None``."""
    if previous is None:
        return None
    directory, manifest = previous
    entry = manifest.models.get(name)
    if entry is None or entry.sources.get(precision) != key:
        return None
    names = graph_files(entry, variant_file(name, precision))
    if not names or any(sha256_file(directory / f) != entry.files[f] for f in names):
        return None
    for f in names:
        try:
            os.link(directory / f, staging / f)
        except OSError:
            shutil.copy2(directory / f, staging / f)
    return [staging / f for f in names]


def carry_engines(previous: tuple[Path, Manifest] | None, manifest: Manifest, staging: Path) -> None:
    """Keep the previous build's TensorRT engines whose source graph is in the new build unchanged (same file, same
    hash): linked into ``staging`` and recorded in ``manifest`` with their plans, so ``export.build`` rebuilds only
    engines whose graph changed."""
    if previous is None or not previous[1].tensorrt:
        return
    directory, old = previous
    plans = old.tensorrt.get("engines", {})
    kept = {}
    for name, entry in manifest.models.items():
        before, plan = old.models.get(name), plans.get(name)
        if before is None or not before.engine or plan is None or entry.files.get(plan["onnx"]) != plan["onnx_sha256"]:
            continue
        if sha256_file(directory / before.engine) != before.files.get(before.engine):
            continue
        try:
            os.link(directory / before.engine, staging / before.engine)
        except OSError:
            shutil.copy2(directory / before.engine, staging / before.engine)
        entry.engine, entry.files[before.engine] = before.engine, before.files[before.engine]
        entry.profile = plan["profile"]
        kept[name] = plan
    if kept:
        manifest.tensorrt = {**old.tensorrt, "engines": kept}
        logger.info("kept the TensorRT engines of %s (their graphs did not change)", sorted(kept))


def default_envelope(cfg: DynaIPConfig) -> Envelope:
    """The config's own size, subjects 1..max (opt 2), batch 1..4."""
    return Envelope(subjects=(1, min(2, cfg.max_subjects), cfg.max_subjects), resolutions=((cfg.height, cfg.width),))


def export_all(out_dir: str | Path, config: str | DynaIPConfig = DEFAULT_CONFIG, models: DynaIPModels | None = None,
               names: tuple[str, ...] = REQUIRED_MODELS, opset: int = DEFAULT_OPSET,
               variants: dict[str, tuple[str, ...]] | None = None, envelope: Envelope | None = None,
               external_threshold: int = TWO_GIB - 2**28, progress: bool = True, what: str | None = None,
               force: bool = False) -> Manifest:
    """Export ``names`` (default: every required model; add ``"dit_dbim"`` for DBIM's mixing-step graph) plus the
    reduced-precision ``variants``, ``{"fp16": ("dit", ...), "bf16": (...)}``, to ``out_dir`` and write
    ``manifest.json``.

    ``out_dir`` must be new, empty or a previous build (only files its manifest lists): a folder holding anything
    else raises :class:`~dynaip_trt.errors.OutputError` naming it as ``what`` (default ``out_dir=...``) before any
    work. A graph of the previous build exported from the same source (config, weights, opset, precision, profile:
    :func:`source_key`) is reused, not exported again, unless ``force``. Everything is staged in a sibling temp
    folder and swapped in at the end (atomic for readers).
    """
    what = what or f"out_dir={str(out_dir)!r}"
    out_dir = claim_dir(out_dir, Manifest.owned_files, what)
    previous = None if force or not Manifest.owned_files(out_dir) else (out_dir, Manifest.load(out_dir))
    variants = variants or {}
    check_variants(variants, names)
    models = models or load_family(config)
    cfg = models.config
    env = envelope or default_envelope(cfg)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    staging.chmod(0o755)
    entries: dict[str, ModelEntry] = {}
    try:
        jobs = [(n, "fp32") for n in names] + [(n, p) for p, ns in variants.items() for n in ns]
        weights: dict[str, str] = {}
        for name, precision in progress_bar(jobs, "export", progress):
            spec = get_spec(name, models)
            fname = variant_file(name, precision)
            if name not in weights:
                weights[name] = weights_sha256(spec.module())
            key = source_key(spec, weights[name], opset, precision, env)
            files = reuse_graph(previous, name, precision, key, staging)
            if files is not None:
                logger.info("%s (%s): unchanged since the previous build, reused", name, precision)
            else:
                t0 = time.perf_counter()
                files, report = export_model(spec, staging / fname, opset, TORCH_DTYPES[precision],
                                             external_threshold)
                logger.info("%s (%s): %d op types, exported in %.1fs", name, precision, len(report.ops),
                            time.perf_counter() - t0)
            if precision == "fp32":
                inputs, outputs = io_signature(onnx.load(str(staging / fname), load_external_data=False))
                entries[name] = ModelEntry(onnx=fname, files={f.name: sha256_file(f) for f in files}, inputs=inputs,
                                           outputs=outputs, profile=spec.profile(env))
                entries[name].files.update(save_references(staging, models, (name,), env))
            else:
                add_variant(entries[name], precision, files)
            entries[name].sources[precision] = key
        if "text" in names:  # the runtime tokenizes prompts with the exported text encoders' own tokenizers
            for tokenizer, folder in ((models.clip_tokenizer, "tokenizer"), (models.t5_tokenizer, "tokenizer_2")):
                path = tokenizer.save(staging / folder)
                entries["text"].files[path.relative_to(staging).as_posix()] = sha256_file(path)
        manifest = Manifest(config=cfg.to_dict(), models=entries, opset=opset, max_subjects=env.subjects[2])
        carry_engines(previous, manifest, staging)
        manifest.save(staging)
        claim_dir(out_dir, Manifest.owned_files, what)  # still ours after the export
        _swap_in(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %s with %s", out_dir / MANIFEST_FILE, sorted(entries))
    return manifest


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` (new, empty or a build of ours: :func:`claim_dir`) by ``staging`` with renames only, so
    the old build survives until the new one is whole."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
