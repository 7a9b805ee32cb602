"""The contract between ``export`` (writer) and ``runtime`` (reader): model I/O names and the build manifest.

A build directory holds ``manifest.json`` plus the files it lists (ONNX graphs, external data, TensorRT engines),
each with its SHA-256. The runtime trusts nothing else: files are verified against their hashes, paths may not
leave the directory, and the TensorRT version / GPU an engine was built for are checked before deserializing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .configs import DynaIPConfig
from .errors import InputError, ManifestError
from .files import atomic_path
from .tensorrt_api import version_tuple

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
PLAN_FILE = "engine_plan.json"  # export.build: the builder configuration of every engine
TIMING_CACHE = "timing.cache"  # export.build: TensorRT's measured tactics, reused across builds
FP8_QUALITY_FILE = "fp8_quality.json"  # export.build --precision fp8: FP8's measured quality cost
BUILD_SIDE_FILES = (MANIFEST_FILE, PLAN_FILE, TIMING_CACHE, FP8_QUALITY_FILE)
MANIFEST_FORMAT = "dynaip-trt-manifest"
MANIFEST_VERSION = 2
DEFAULT_OPSET = 18  # ONNX opset of exported graphs: clear of newer fused ops (RMSNormalization, Attention)

# Input and output names of every exported model, in call order. Shapes (symbolic names are dynamic axes):
#   clip:   pixel_values [M, 3, S, S]                           -> levels [M, L, P, C]
#   fusion: levels [B, S, L, P, C], level_weights [B, S, L], level_override [B, S]
#                                                               -> img_k, img_v [blocks, B, S, T, inner]
#   text:   clip_ids [B, Lclip] int64, t5_ids [B, Ltxt] int64   -> text_embeds [B, Ltxt, D], pooled [B, Dp]
#   dit:    latents [B, N, 64], text_embeds, pooled, timestep [B], timestep_next [B], guidance [B], img_ids [N, 3],
#           txt_ids [Ltxt, 3], img_k, img_v, scales [B, S], masks [B, S, N], block_scales [blocks]
#                                                               -> velocity [B, N, 64], latents_next [B, N, 64]
#   vae:    latents [B, C, h, w]                                -> images [B, 3, f*h, f*w]
#   dit_dbim (optional, DBIM's mixing steps): the dit inputs for 2B rows (B concept rows, then their B auxiliary rows)
#           + prompt_tokens [2B, Ltxt], map_tokens [2B, Ltxt], reference_map [2B], dbim_lambda [2B]
#                                                               -> velocity [2B, N, 64], latents_next [2B, N, 64]
# The DiT includes the flow-matching Euler step: latents_next = latents + (timestep_next - timestep) * velocity.
MODEL_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "clip": (("pixel_values",), ("levels",)),
    "fusion": (("levels", "level_weights", "level_override"), ("img_k", "img_v")),
    "text": (("clip_ids", "t5_ids"), ("text_embeds", "pooled")),
    "dit": (("latents", "text_embeds", "pooled", "timestep", "timestep_next", "guidance", "img_ids", "txt_ids",
             "img_k", "img_v", "scales", "masks", "block_scales"), ("velocity", "latents_next")),
    "vae": (("latents",), ("images",)),
}
MODEL_IO["dit_dbim"] = (MODEL_IO["dit"][0] + ("prompt_tokens", "map_tokens", "reference_map", "dbim_lambda"),
                        MODEL_IO["dit"][1])
# Models a build may leave out: the runtime works without them and refuses only the requests that need them.
OPTIONAL_MODELS = ("dit_dbim",)
REQUIRED_MODELS = tuple(n for n in MODEL_IO if n not in OPTIONAL_MODELS)
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
FP8_BASES = ("fp16", "bf16")  # precision of the non-FP8 ops of an FP8 DiT graph
FP8_E4M3_MAX = 448.0  # largest finite float8 e4m3fn value: a per-tensor FP8 scale is amax / FP8_E4M3_MAX


def fp8_variant(base: str) -> str:
    """Manifest variant key (and file infix) of the FP8 DiT graph whose other ops are in ``base``: ``fp8-bf16``
    (``dit.fp8-bf16.onnx``) or ``fp8-fp16``."""
    return f"fp8-{base}"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_join(root: str | Path, rel: str) -> Path:
    """``root / rel`` if it stays inside ``root``; otherwise :class:`ManifestError` (no path escapes)."""
    root = Path(root).resolve()
    if os.path.isabs(rel) or rel.startswith("~"):
        raise ManifestError(f"manifest path {rel!r} must be relative to the build directory")
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise ManifestError(f"manifest path {rel!r} escapes the build directory {root}")
    return target


@dataclass
class ModelEntry:
    """One exported model in a build directory.

    Attributes:
        onnx: ONNX file name; files: every file of this model (``{relpath: sha256}``, external data included).
        inputs/outputs: ``{name: {"dtype": str, "shape": [int | str]}}`` (strings are dynamic axes).
        profile: TensorRT/shape profile ``{input: {"min": [...], "opt": [...], "max": [...]}}``.
        precision: numeric precision of the graph (``fp32``, ``fp16``, ``bf16``, ``fp8``).
        engine: TensorRT engine file (set by ``export.build``), or ``None``.
        variants: other ONNX files of the same model by precision (e.g. ``{"fp16": "dit.fp16.onnx"}``).
        sources: what each graph was exported from, by precision: a key over the config, the model's weights,
            the opset and the profile (``export.onnx`` reuses a graph whose key is unchanged).
    """

    onnx: str
    files: dict[str, str]
    inputs: dict[str, dict[str, Any]]
    outputs: dict[str, dict[str, Any]]
    profile: dict[str, dict[str, list[int]]]
    precision: str = "fp32"
    engine: str | None = None
    variants: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def graphs(self) -> dict[str, str]:
        """``{precision: ONNX file}`` of every graph of this model: the main graph and its variants."""
        return {self.precision: self.onnx, **self.variants}


@dataclass
class Manifest:
    """``manifest.json`` of a build directory."""

    config: dict[str, Any]
    models: dict[str, ModelEntry]
    opset: int
    max_subjects: int
    tensorrt: dict[str, Any] | None = None
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    @property
    def dynaip_config(self) -> DynaIPConfig:
        return DynaIPConfig.from_dict(self.config)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def save(self, directory: str | Path) -> Path:
        """Write ``manifest.json`` atomically (temp name, then rename)."""
        path = Path(directory) / MANIFEST_FILE
        with atomic_path(path) as tmp:
            tmp.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, directory: str | Path, what: str | None = None) -> "Manifest":
        """Read and check ``directory/manifest.json``. ``what`` names the folder in errors (e.g. ``"--engine-dir
        build/x"`` for a CLI user); a missing folder, a folder without a manifest and an invalid manifest each
        raise :class:`ManifestError` saying which."""
        label = what or str(directory)
        folder = Path(directory)
        path = folder / MANIFEST_FILE
        if not folder.exists():
            raise ManifestError(f"{label}: the build folder does not exist (create it with python -m export.onnx "
                                f"or python -m export.build)")
        if not folder.is_dir():
            raise ManifestError(f"{label} is not a folder")
        if not path.is_file():
            raise ManifestError(f"{label} is not a build folder: it has no {MANIFEST_FILE} (create one with "
                                f"python -m export.onnx or python -m export.build)")
        try:
            d = json.loads(path.read_text())
            if d.get("format") != MANIFEST_FORMAT:
                raise ManifestError(f"{path} is not a dynaip-trt manifest (format={d.get('format')!r})")
            if d.get("version") != MANIFEST_VERSION:
                raise ManifestError(f"{path} has manifest version {d.get('version')}; this package reads "
                                    f"version {MANIFEST_VERSION} (rebuild the directory)")
            models = {k: ModelEntry(**v) for k, v in d.pop("models").items()}
            m = cls(models=models, **d)
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
            raise ManifestError(f"{path} is not a valid manifest: {e}") from e
        for name, entry in m.models.items():
            if name not in MODEL_IO:
                raise ManifestError(f"{path}: unknown model {name!r}")
            if entry.precision not in PRECISIONS:
                raise ManifestError(f"{path}: model {name} has unknown precision {entry.precision!r}")
            for rel in [entry.onnx, *entry.files, *([entry.engine] if entry.engine else []),
                        *entry.variants.values()]:
                safe_join(directory, rel)
        return m

    def files(self) -> set[str]:
        """Every file of the build this manifest describes (relative paths), the build-side files included."""
        files = set(BUILD_SIDE_FILES)
        for entry in self.models.values():
            files |= {entry.onnx, *entry.files, *entry.variants.values(), *([entry.engine] if entry.engine else [])}
        return files

    @classmethod
    def owned_files(cls, directory: str | Path) -> set[str]:
        """The files dynaip-trt wrote in ``directory``: those of its manifest, or none when it has no valid one
        (for :func:`dynaip_trt.files.claim_dir`)."""
        try:
            return cls.load(directory).files()
        except ManifestError:
            return set()

    def verify(self, directory: str | Path, models: list[str] | None = None) -> None:
        """Check that every listed file exists and has its recorded SHA-256 (truncated/tampered files fail)."""
        for name in models or list(self.models):
            if name not in self.models:
                raise ManifestError(f"the build directory {directory} has no {name!r} model "
                                    f"(it has {sorted(self.models)})")
            for rel, digest in self.models[name].files.items():
                p = safe_join(directory, rel)
                if not p.is_file():
                    raise ManifestError(f"{name}: file {rel} listed in the manifest is missing from {directory}")
                if sha256_file(p) != digest:
                    raise ManifestError(f"{name}: file {rel} does not match its manifest hash (truncated, "
                                        f"tampered with, or from another build); re-run the export")


def max_subjects_of(manifest: Manifest) -> int:
    """Largest subject count the build serves: the manifest's ``max_subjects``, capped by the DiT profile."""
    limit = manifest.max_subjects
    dit = manifest.models.get("dit")
    if dit is not None and "scales" in dit.profile:
        limit = min(limit, int(dit.profile["scales"]["max"][1]))
    return limit


def max_batch_of(manifest: Manifest) -> int:
    """Largest batch the build's DiT profile accepts (``latents`` max batch; 1 when the manifest has no profile)."""
    dit = manifest.models.get("dit")
    if dit is None or "latents" not in dit.profile:
        return 1
    return int(dit.profile["latents"]["max"][0])


def check_tensorrt_section(section: dict[str, Any] | None, trt_version: str, gpu_name: str,
                           capability: tuple[int, int], directory: str | Path) -> None:
    """Compare a manifest's ``tensorrt`` section with the running system (see the module docstring).

    Raises :class:`ManifestError` when the section is missing or incomplete, or the TensorRT version or the
    GPU's compute capability differ from what the engines were built with. Engines built version-compatible
    (``"version_compatible": true``) also run on later TensorRT versions of the same major version.
    """
    if not section:
        raise ManifestError(f"{directory} has no TensorRT engines (its manifest has no 'tensorrt' section); build "
                            f"them with python -m export.build")
    missing = [k for k in ("version", "gpu", "compute_capability") if k not in section]
    if missing:
        raise ManifestError(f"{directory}: the manifest's tensorrt section lacks {missing}; rebuild the engines")
    if section.get("version_compatible") and _later_same_major(trt_version, str(section["version"])):
        logger.info("engines in %s were built version-compatible with TensorRT %s; running them on %s", directory,
                    section["version"], trt_version)
    elif str(section["version"]) != trt_version:
        raise ManifestError(f"{directory}: the engines were built with TensorRT {section['version']} but TensorRT "
                            f"{trt_version} is installed; rebuild them (python -m export.build) or install "
                            f"tensorrt=={section['version']}")
    built_cc = tuple(int(v) for v in section["compute_capability"])
    if built_cc != tuple(capability):
        raise ManifestError(f"{directory}: the engines were built for a {section['gpu']} (compute capability "
                            f"{built_cc[0]}.{built_cc[1]}) but this GPU is a {gpu_name} (compute capability "
                            f"{capability[0]}.{capability[1]}); rebuild them on this GPU")
    if section["gpu"] != gpu_name:
        logger.warning("engines in %s were built on a %s and run on a %s (same compute capability): they work, "
                       "but rebuilding on this GPU may be faster", directory, section["gpu"], gpu_name)


def _later_same_major(running: str, built: str) -> bool:
    """Whether TensorRT ``running`` is ``built`` or a later release of the same major version."""
    r, b = version_tuple(running), version_tuple(built)
    return bool(r) and r[:1] == b[:1] and r >= b


def check_engine_sources(manifest: Manifest, directory: str | Path) -> None:
    """Every engine must have been built from the graph the manifest lists now: the ``tensorrt.engines`` plan of
    each model records its source ONNX and hash (``export.build``). A graph re-exported or re-quantized after the
    build makes the engine stale: :class:`ManifestError` naming the model and what to rebuild."""
    plans = (manifest.tensorrt or {}).get("engines", {})
    for name, entry in manifest.models.items():
        if not entry.engine:
            continue
        plan = plans.get(name)
        if plan is None or "onnx" not in plan or "onnx_sha256" not in plan:
            raise ManifestError(f"{directory}: the manifest does not say which graph the {name} engine was built "
                                f"from; rebuild the engines (python -m export.build)")
        current = entry.files.get(plan["onnx"])
        if current != plan["onnx_sha256"]:
            state = "is no longer in the build" if current is None else "changed since"
            raise ManifestError(f"{directory}: the {name} engine is stale: its source graph {plan['onnx']} {state} "
                                f"the engine was built; rebuild the engines (python -m export.build)")


def check_profile(model: str, profile: dict[str, dict[str, list[int]]], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every input shape must lie within the engine's profile (min..max per axis); otherwise :class:`InputError`
    naming the model, the input, its shape and the allowed range."""
    for name, shape in shapes.items():
        prof = profile.get(name)
        if prof is None:
            continue
        lo, hi = prof["min"], prof["max"]
        if len(shape) != len(lo) or any(not a <= d <= b for d, a, b in zip(shape, lo, hi)):
            raise InputError(f"{model}: input {name} of shape {list(shape)} is outside the engine's profile "
                             f"(min {lo}, max {hi}); rebuild the engines for this batch/resolution "
                             f"(python -m export.build --batch/--resolutions/--max-subjects)")
