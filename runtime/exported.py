"""What every backend over exported graphs (ONNX Runtime, TensorRT) shares: the stages as calls of the models of
:data:`dynaip_trt.manifest.MODEL_IO`, the checks a build folder's manifest imposes, and which graph of a model a
precision means. numpy only."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dynaip_trt.conditioning import DiTCondition, ReferenceKV
from dynaip_trt.errors import ConfigError, ManifestError
from dynaip_trt.dbim import DBIMCondition
from dynaip_trt.manifest import MODEL_IO, REQUIRED_MODELS, Manifest, fp8_variant, max_subjects_of

from .stages import DBIM_MISSING, DBIMDenoiseSession, DenoiseSession

logger = logging.getLogger(__name__)


def select_files(manifest: Manifest, precision: str) -> dict[str, str]:
    """``{model: ONNX file}`` for ``precision``. A model without that graph (the text encoders have no fp16: T5
    overflows in it; fp8 quantizes only the DiT) keeps its main graph; a precision no model has raises
    :class:`ConfigError`. ``"fp8"`` means the FP8 DiT on an fp16 base (``fp8-fp16``: the one ONNX Runtime's CPU
    provider runs; ``fp8-bf16`` is for TensorRT)."""
    key = fp8_variant("fp16") if precision == "fp8" else precision
    files, fallback = {}, []
    for name, entry in manifest.models.items():
        graph = entry.graphs().get(key)
        files[name] = graph or entry.onnx
        if graph is None:
            fallback.append(name)
    if len(fallback) == len(files):
        raise ConfigError(f"this build has no {precision} graphs (it has "
                          f"{sorted({p for e in manifest.models.values() for p in e.graphs()})}); re-export with "
                          f"--{precision} or choose another precision")
    if fallback:
        logger.info("no %s graph of %s: using their %s graphs", precision, fallback,
                    [manifest.models[n].precision for n in fallback])
    return files


class ExportedStages:
    """:class:`~runtime.stages.Stages` over the models of a build folder; subclasses implement :meth:`run` and
    :meth:`denoise_session`.

    Maps each stage onto one model of :data:`MODEL_IO` (the fusion graph's level override, the image-branch-only
    contract of exported graphs) once for every backend.
    """

    backend = ""
    supports_text_branch = False

    def __init__(self, directory: str | Path, manifest: Manifest | None = None):
        self.directory = Path(directory)
        self.manifest = manifest or Manifest.load(directory)
        missing = sorted(set(REQUIRED_MODELS) - set(self.manifest.models))
        if missing:
            raise ManifestError(f"the build folder {directory} lacks models {missing}; export all of "
                                f"{sorted(REQUIRED_MODELS)} (python -m export.onnx)")
        self.max_subjects = max_subjects_of(self.manifest)
        self.models = tuple(n for n in MODEL_IO if n in self.manifest.models)  # the required ones, and dit_dbim if any

    @property
    def dbim_unavailable(self) -> str | None:
        """Why DBIM requests cannot run on this build (it has no ``dit_dbim`` graph), or ``None``."""
        return None if "dit_dbim" in self.models else DBIM_MISSING

    def run(self, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One execution of ``model`` on ``feeds`` (every input of ``MODEL_IO[model]``) -> every output by name,
        float32 numpy arrays owned by the caller."""
        raise NotImplementedError

    def denoise_session(self, noise: np.ndarray, cond: DiTCondition, true_cfg: np.ndarray | None = None,
                        dbim: DBIMCondition | None = None) -> DenoiseSession:
        """See :meth:`runtime.stages.Stages.denoise_session`: a :class:`DBIMDenoiseSession` over two of
        :meth:`open_session`'s sessions with ``dbim``, else one session of the ``dit`` graph."""
        if dbim is not None:
            return DBIMDenoiseSession(noise, cond, dbim, lambda x, c, model, extra: self.open_session(x, c, None,
                                                                                                     model, extra))
        return self.open_session(noise, cond, true_cfg)

    def open_session(self, noise: np.ndarray, cond: DiTCondition, true_cfg: np.ndarray | None = None,
                     model: str = "dit", extra: dict[str, np.ndarray] | None = None) -> DenoiseSession:
        """A denoising loop on one DiT graph: ``model`` (``dit``, or ``dit_dbim`` with its ``extra`` inputs)."""
        raise NotImplementedError

    def clip_levels(self, pixels: np.ndarray) -> np.ndarray:
        """``[M, 3, S, S]`` -> tapped CLIP hidden states ``[M, L, P, C]``."""
        return self.run("clip", {"pixel_values": pixels})["levels"]

    def reference_kv(self, levels: np.ndarray, level_weights: np.ndarray | None, text_branch: bool
                     ) -> ReferenceKV:
        """``[B, S, L, P, C]`` (+ user level weights ``[B, S, L]``) -> image-branch K/V ``[blocks, B, S, T, inner]``.
        Without user weights the router's are used (``level_override`` = 0)."""
        b, s, n_levels = levels.shape[:3]
        if level_weights is None:
            weights = np.full((b, s, n_levels), 1.0 / n_levels, dtype=np.float32)
            override = np.zeros((b, s), dtype=np.float32)
        else:
            weights = np.ascontiguousarray(level_weights, dtype=np.float32)
            override = np.ones((b, s), dtype=np.float32)
        out = self.run("fusion", {"levels": levels, "level_weights": weights, "level_override": override})
        return ReferenceKV(out["img_k"], out["img_v"])

    def encode_text(self, clip_ids: np.ndarray, t5_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int64 ids ``[B, Lclip]``, ``[B, Ltxt]`` -> T5 sequence ``[B, Ltxt, D]``, CLIP pooled ``[B, Dp]``."""
        out = self.run("text", {"clip_ids": clip_ids, "t5_ids": t5_ids})
        return out["text_embeds"], out["pooled"]

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Unpacked latents ``[B, C, h, w]`` -> images ``[B, 3, f*h, f*w]`` in [-1, 1]."""
        return self.run("vae", {"latents": latents})["images"]
