"""Real-image metrics of the quality evaluation, DreamBench-style: CLIP-I, CLIP-T and DINO from local model folders.

- **CLIP-I**: cosine similarity of the CLIP image embeddings of a generated image and of its subject's reference
  (averaged over the subjects of the image), **CLIP-T**: of the generated image and its prompt (CLIP text
  embedding); both from a transformers ``CLIPModel`` folder (``--clip-model``). DreamBooth used ViT-B/32:
  ``openai/clip-vit-base-patch32``; ``openai/clip-vit-large-patch14`` (the image tower DynaIP's FLUX setup uses) works
  the same.
- **DINO**: cosine similarity of the self-supervised ViT's CLS embeddings (``last_hidden_state[:, 0]``) of the
  generated image and the reference, from a transformers ``AutoModel`` folder (``--dino-model``): DreamBooth's
  ``facebook/dino-vits16``, or DINOv2 (``facebook/dinov2-small`` / ``-base``).

Download those with ``huggingface-cli download <name> --local-dir DIR`` on a machine with hub access; models are
only read from local folders here (``local_files_only``). torch and transformers are imported when a
:class:`Similarity` is created, never by the rest of the runtime: these metrics run PyTorch on purpose (they are
optional judges, not part of serving, and an ONNX export of each would need the export tool chain for no gain).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from dynaip_trt.errors import ConfigError, InputError, import_optional

logger = logging.getLogger(__name__)

INSTALL = "pip install -e .[torch] (torch and transformers)"


class Similarity:
    """CLIP-I / CLIP-T (``clip_dir``) and DINO (``dino_dir``) scorers; at least one folder.

    Args:
        clip_dir: a transformers ``CLIPModel`` folder with its tokenizer and image processor.
        dino_dir: a transformers vision backbone folder (ViT / DINOv2) with its image processor.
        device: torch device.
    """

    def __init__(self, clip_dir: str | Path | None = None, dino_dir: str | Path | None = None, device: str = "cpu"):
        if clip_dir is None and dino_dir is None:
            raise InputError("Similarity needs a CLIP folder, a DINO folder or both")
        self.torch = import_optional("torch", "the CLIP-I / CLIP-T / DINO metrics", INSTALL)
        transformers = import_optional("transformers", "the CLIP-I / CLIP-T / DINO metrics", INSTALL)
        transformers.utils.logging.disable_progress_bar()
        self.device = self.torch.device(device)
        self.clip = self.clip_tokenizer = self.clip_images = self.dino = self.dino_images = None
        if clip_dir is not None:
            kind = _model_type(transformers, clip_dir, "--clip-model")
            if kind != "clip":
                raise ConfigError(f"--clip-model {clip_dir}: holds a {kind!r} model, not a CLIP model (e.g. "
                                  f"openai/clip-vit-base-patch32)")
            self.clip = _load(transformers.CLIPModel, clip_dir, "--clip-model", "a CLIPModel").to(self.device)
            self.clip_tokenizer = _load(transformers.AutoTokenizer, clip_dir, "--clip-model", "a CLIP tokenizer")
            self.clip_images = _load(transformers.AutoImageProcessor, clip_dir, "--clip-model", "an image processor")
        if dino_dir is not None:
            kind = _model_type(transformers, dino_dir, "--dino-model")
            if kind == "clip" or not hasattr(transformers.AutoConfig.from_pretrained(str(dino_dir)), "image_size"):
                raise ConfigError(f"--dino-model {dino_dir}: holds a {kind!r} model, not a self-supervised vision "
                                  f"backbone (e.g. facebook/dino-vits16 or facebook/dinov2-small)")
            self.dino = _load(transformers.AutoModel, dino_dir, "--dino-model", "a vision model").to(self.device)
            self.dino_images = _load(transformers.AutoImageProcessor, dino_dir, "--dino-model", "an image processor")

    @property
    def metrics(self) -> tuple[str, ...]:
        return (("clip_i", "clip_t") if self.clip is not None else ()) + (("dino",) if self.dino is not None else ())

    def _pixels(self, processor, images: Sequence[np.ndarray | Image.Image]):
        pil = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images]
        return processor(images=[im.convert("RGB") for im in pil], return_tensors="pt")["pixel_values"].to(self.device)

    def clip_image_embeddings(self, images: Sequence[np.ndarray | Image.Image]) -> np.ndarray:
        """Unit-norm CLIP image embeddings ``[N, D]``."""
        with self.torch.no_grad():
            e = self.clip.get_image_features(pixel_values=self._pixels(self.clip_images, images))
        return _unit(_tensor(e).float().cpu().numpy())

    def clip_text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm CLIP text embeddings ``[N, D]``."""
        tokens = self.clip_tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        with self.torch.no_grad():
            e = self.clip.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return _unit(_tensor(e).float().cpu().numpy())

    def dino_embeddings(self, images: Sequence[np.ndarray | Image.Image]) -> np.ndarray:
        """Unit-norm CLS embeddings ``[N, D]`` of the DINO backbone."""
        with self.torch.no_grad():
            out = self.dino(pixel_values=self._pixels(self.dino_images, images))
        return _unit(out.last_hidden_state[:, 0].float().cpu().numpy())

    def scores(self, images: Sequence[np.ndarray | Image.Image], references: Sequence[Sequence[np.ndarray]],
               prompts: Sequence[str]) -> dict[str, float]:
        """Mean CLIP-I, CLIP-T and DINO over ``images`` (each with its subjects' reference images and its prompt)."""
        if not len(images) == len(references) == len(prompts):
            raise InputError(f"{len(images)} images, {len(references)} reference lists and {len(prompts)} prompts: "
                             f"give one of each per image")
        flat = [r for refs in references for r in refs]
        owner = np.repeat(np.arange(len(images)), [len(refs) for refs in references])
        out: dict[str, float] = {}
        if self.clip is not None:
            gen, ref = self.clip_image_embeddings(images), self.clip_image_embeddings(flat)
            out["clip_i"] = _mean_per_image((gen[owner] * ref).sum(-1), owner, len(images))
            out["clip_t"] = float((gen * self.clip_text_embeddings(prompts)).sum(-1).mean())
        if self.dino is not None:
            gen, ref = self.dino_embeddings(images), self.dino_embeddings(flat)
            out["dino"] = _mean_per_image((gen[owner] * ref).sum(-1), owner, len(images))
        return out


def _model_type(transformers, folder: str | Path, flag: str) -> str:
    """The ``model_type`` of the transformers folder ``folder`` (read from its config)."""
    config = _load(transformers.AutoConfig, folder, flag, "a transformers config")
    return str(getattr(config, "model_type", "?"))


def _load(cls, folder: str | Path, flag: str, what: str):
    if not Path(folder).is_dir():
        raise InputError(f"{flag} {folder}: no such folder")
    try:
        obj = cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{flag} {folder}: cannot load {what} from this folder ({first})") from None
    return obj.eval() if hasattr(obj, "eval") else obj


def _tensor(x):
    """transformers >= 5 may return a model output instead of a tensor from ``get_*_features``."""
    return x if hasattr(x, "float") else x.pooler_output


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _mean_per_image(values: np.ndarray, owner: np.ndarray, n: int) -> float:
    """Mean over images of the mean over each image's references."""
    sums, counts = np.bincount(owner, values, minlength=n), np.bincount(owner, minlength=n)
    return float((sums / np.maximum(counts, 1)).mean())
