"""Per-request conditioning of the MM-DiT, as plain arrays: the one definition every backend and the reference
model code share.

- :class:`ReferenceKV`: the reference keys/values of a request (computed once, fed to every denoising step).
- :class:`DiTCondition`: everything the DiT needs besides the latents and the timestep (text, reference K/V, scales,
  masks, per-block scales), constant over the denoising loop.
- :func:`dit_feeds`: a step as the flat inputs of the exported DiT graph (:data:`~dynaip_trt.manifest.MODEL_IO`).

Arrays are numpy arrays in the runtime and torch tensors in the model code: both dataclasses are generic over the
array type and never import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

A = TypeVar("A")  # np.ndarray in the runtime, torch.Tensor in the model code


@dataclass(frozen=True)
class ReferenceKV(Generic[A]):
    """Reference keys/values of the subjects of a request.

    Attributes:
        img_k, img_v: image branch ``[img_blocks, B, S, T, inner]`` (one slice per injected block: double-stream
            blocks first, then single-stream blocks when the adapter injects there).
        txt_k, txt_v: text branch ``[double_blocks, B, S, T, inner]``, or ``None`` (the Dynamic Decoupling Strategy
            drops the text branch at inference; only training and DDS schedules of the torch backend use it).
    """

    img_k: A
    img_v: A
    txt_k: A | None = None
    txt_v: A | None = None

    @property
    def num_subjects(self) -> int:
        return int(self.img_k.shape[2])

    @property
    def num_blocks(self) -> int:
        return int(self.img_k.shape[0])

    @property
    def has_text_branch(self) -> bool:
        return self.txt_k is not None

    def image_only(self) -> "ReferenceKV[A]":
        """The same K/V without the text branch."""
        return replace(self, txt_k=None, txt_v=None)

    def nbytes(self) -> int:
        """Bytes held (cache accounting)."""
        return sum(_nbytes(a) for a in (self.img_k, self.img_v, self.txt_k, self.txt_v) if a is not None)


@dataclass(frozen=True)
class DiTCondition(Generic[A]):
    """The DiT inputs that stay constant over a denoising loop (batch ``B``, ``N`` image tokens).

    Attributes:
        text_embeds: T5 sequence ``[B, Ltxt, D]``; pooled: CLIP pooled ``[B, Dp]``; guidance: ``[B]``.
        img_ids: image token positions ``[N, 3]``; txt_ids: text token positions ``[Ltxt, 3]``.
        kv: reference K/V ``[blocks, B, S, T, inner]``.
        scales: per-subject scales ``[B, S]``; masks: per-subject regions over image tokens ``[B, S, N]`` in [0, 1].
        block_scales: image-branch multiplier per injected block ``[blocks]``.
        txt_block_scales: text-branch multiplier per double block ``[double_blocks]`` while a DDS schedule keeps
            the text branch (torch backend only), else ``None``.
    """

    text_embeds: A
    pooled: A
    guidance: A
    img_ids: A
    txt_ids: A
    kv: ReferenceKV[A]
    scales: A
    masks: A
    block_scales: A
    txt_block_scales: A | None = None

    @property
    def batch(self) -> int:
        return int(self.text_embeds.shape[0])

    @property
    def image_tokens(self) -> int:
        return int(self.img_ids.shape[0])

    def head(self, rows: int) -> "DiTCondition[A]":
        """The condition of the first ``rows`` rows (DBIM's concept rows once the auxiliary rows are dropped)."""
        kv = self.kv
        return replace(self, text_embeds=self.text_embeds[:rows], pooled=self.pooled[:rows],
                       guidance=self.guidance[:rows], scales=self.scales[:rows], masks=self.masks[:rows],
                       kv=ReferenceKV(*(None if a is None else a[:, :rows] for a in (kv.img_k, kv.img_v, kv.txt_k,
                                                                                      kv.txt_v))))


def dit_feeds(latents: A, timestep: A, timestep_next: A, cond: DiTCondition[A]) -> dict[str, A]:
    """One denoising step as the flat inputs of the exported DiT graph (``MODEL_IO["dit"]``, image branch only).

    ``latents`` ``[B, N, 64]``; ``timestep`` and ``timestep_next`` ``[B]`` (FLUX sigmas in [0, 1]).
    """
    return {"latents": latents, "text_embeds": cond.text_embeds, "pooled": cond.pooled, "timestep": timestep,
            "timestep_next": timestep_next, "guidance": cond.guidance, "img_ids": cond.img_ids,
            "txt_ids": cond.txt_ids, "img_k": cond.kv.img_k, "img_v": cond.kv.img_v, "scales": cond.scales,
            "masks": cond.masks, "block_scales": cond.block_scales}


def _nbytes(a: Any) -> int:
    n = getattr(a, "nbytes", None)  # numpy
    if n is None:  # torch
        n = a.numel() * a.element_size()
    return int(n)
