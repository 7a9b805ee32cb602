"""What every backend over exported graphs (ONNX Runtime, TensorRT) shares: turning the driver's
:class:`~dynaip_trt.pipeline.Stages` calls into the flat inputs of :data:`dynaip_trt.manifest.MODEL_IO`, and the
limits a build directory's manifest imposes."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dynaip_trt.attention import ReferenceInputs
from dynaip_trt.errors import ConfigError, InputError, ManifestError
from dynaip_trt.manifest import MODEL_IO, Manifest, ModelEntry
from dynaip_trt.pipeline import ReferenceKV, dit_feeds
from dynaip_trt.text import ByteTokenizer, HFTokenizer, load_tokenizer

logger = logging.getLogger(__name__)

TEXT_BRANCH_MESSAGE = ("text-branch (DDS schedule) injection needs the torch backend: exported engines contain the "
                       "image branch only")


def model_file(entry: ModelEntry, name: str, precision: str) -> str:
    """The ONNX file of ``entry`` in ``precision``: the main graph, or a variant listed in the manifest."""
    if precision == entry.precision:
        return entry.onnx
    if precision in entry.variants:
        return entry.variants[precision]
    raise ConfigError(f"model {name} has no {precision} variant in this build (it has "
                      f"{sorted({entry.precision, *entry.variants})}); re-export with --{precision} or choose "
                      f"another precision")


def select_files(manifest: Manifest, precision: str) -> dict[str, str]:
    """``{model: onnx file}`` for ``precision``. Models without that variant (the text encoders have no fp16,
    T5 overflows in it) keep their main graph; a precision no model has raises :class:`ConfigError`."""
    files, fallback = {}, []
    for name, entry in manifest.models.items():
        try:
            files[name] = model_file(entry, name, precision)
        except ConfigError:
            files[name] = entry.onnx
            fallback.append(name)
    if fallback and len(fallback) == len(files):
        raise ConfigError(f"this build has no {precision} graphs; re-export with --{precision} or use "
                          f"precision='fp32'")
    if fallback:
        logger.info("no %s variant of %s: using their %s graphs", precision, fallback,
                    [manifest.models[n].precision for n in fallback])
    return files


def require_models(manifest: Manifest, directory: str | Path) -> None:
    """Every model of :data:`MODEL_IO` must be in the build directory."""
    missing = sorted(set(MODEL_IO) - set(manifest.models))
    if missing:
        raise ManifestError(f"the build directory {directory} lacks models {missing}; export all of "
                            f"{sorted(MODEL_IO)} (python -m export.onnx)")


def build_tokenizers(directory: str | Path) -> tuple[ByteTokenizer | HFTokenizer, ByteTokenizer | HFTokenizer]:
    """The (CLIP, T5) tokenizers of a build directory: its ``tokenizer/`` and ``tokenizer_2/`` folders when
    present (exports of real checkpoints), else the byte tokenizer that models with seeded weights use."""
    directory = Path(directory)
    if (directory / "tokenizer").is_dir():
        return load_tokenizer(directory / "tokenizer"), load_tokenizer(directory / "tokenizer_2")
    logger.info("%s has no tokenizer/ folder: using the byte tokenizer (models with seeded weights)", directory)
    tok = ByteTokenizer()
    return tok, tok


class ExportedStages:
    """:class:`~dynaip_trt.pipeline.Stages` over exported graphs; subclasses implement :meth:`run`.

    Maps each stage onto one model of :data:`MODEL_IO`: the level override of the fusion graph, the all-ones
    masks of a request without masks, and the image-branch-only contract of exported engines live here once.
    """

    supports_text_branch = False
    device: torch.device
    max_subjects: int

    def run(self, model: str, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Run ``model`` on ``feeds`` (every input of ``MODEL_IO[model]``) -> its outputs as float32 tensors on
        ``self.device``, in ``MODEL_IO`` order. The returned tensors belong to the caller."""
        raise NotImplementedError

    def clip_levels(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[M, 3, S, S]`` -> tapped CLIP hidden states ``[M, L, P, C]``."""
        return self.run("clip", {"pixel_values": pixels.to(self.device)})[0]

    def reference_kv(self, levels: torch.Tensor, level_weights: torch.Tensor | None, with_text: bool) -> ReferenceKV:
        """``[B, S, L, P, C]`` (+ user level weights ``[B, S, L]``) -> image-branch K/V
        ``[blocks, B, S, T, inner]``. Without user weights the router's are used (``level_override`` = 0)."""
        if with_text:
            raise InputError(TEXT_BRANCH_MESSAGE)
        b, s, n_levels = levels.shape[:3]
        if level_weights is None:
            weights = torch.full((b, s, n_levels), 1.0 / n_levels, device=self.device)
            override = torch.zeros(b, s, device=self.device)
        else:
            weights = level_weights.to(self.device, torch.float32)
            override = torch.ones(b, s, device=self.device)
        img_k, img_v = self.run("fusion", {"levels": levels.to(self.device), "level_weights": weights,
                                           "level_override": override})
        return ReferenceKV(img_k, img_v)

    def encode_text(self, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 ids ``[B, 77]``, ``[B, L]`` -> (``[B, L, t5_dim]``, pooled ``[B, clip_dim]``)."""
        seq, pooled = self.run("text", {"clip_ids": clip_ids.to(self.device), "t5_ids": t5_ids.to(self.device)})
        return seq, pooled

    def dit(self, latents: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor,
            guidance: torch.Tensor, img_ids: torch.Tensor, txt_ids: torch.Tensor, ref: ReferenceInputs
            ) -> torch.Tensor:
        """Packed latents ``[B, N, 64]`` -> velocity ``[B, N, 64]``; masks ``[B, S, N]`` default to ones."""
        if ref.txt_k is not None or ref.block_scales is not None:
            raise InputError(TEXT_BRANCH_MESSAGE + " (and per-block scales)")
        return self.run("dit", dit_feeds(latents, text, pooled, timestep, guidance, img_ids, txt_ids, ref))[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked latents ``[B, 16, h, w]`` -> images ``[B, 3, 8h, 8w]`` in [-1, 1]."""
        return self.run("vae", {"latents": latents.to(self.device)})[0]
