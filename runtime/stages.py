"""The interface every runtime backend implements (ONNX Runtime, TensorRT, PyTorch): numpy arrays in and out.

Per-request work (reference encoding, text encoding, decoding) crosses the host boundary once per request; only the
denoising loop is device-resident, inside a :class:`DenoiseSession`. The sampling loop (:mod:`runtime.sampler`)
drives any :class:`Stages`, so every backend samples with the same schedule, noise and request validation.
Arrays are float32 unless stated.

DBIM (:mod:`dynaip_trt.dbim`) runs two graphs in one loop, the same way on every backend
(:class:`DBIMDenoiseSession`): its mixing steps on the ``dit_dbim`` graph over the concept and auxiliary rows, then
the plain ``dit`` graph over the concept rows, as fast as without DBIM.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from dynaip_trt.conditioning import DiTCondition, ReferenceKV
from dynaip_trt.dbim import DBIMCondition, dbim_feeds

DBIM_MISSING = ("this build has no DBIM graph (dit_dbim): export it with python -m export.onnx --dbim (TensorRT: "
                "python -m export.build --dbim), or leave out dbim_lambda")


class DenoiseSession(Protocol):
    """The denoising loop of one request on a backend's device: the latents stay there between steps."""

    def step(self, timestep: float, timestep_next: float, text_branch: bool = False) -> None:
        """One flow-matching Euler step from ``timestep`` to ``timestep_next`` (FLUX sigmas, 1 -> 0).
        ``text_branch``: inject the text branch too this step (a DDS schedule; torch backend only)."""

    def latents(self) -> np.ndarray:
        """The current packed latents ``[B, N, 64]`` (a host copy)."""


class Stages(Protocol):
    """What a backend provides to the sampling loop."""

    backend: str  # "onnxruntime" | "tensorrt" | "torch"
    max_subjects: int  # the build's subject limit (profile) or the config's
    supports_text_branch: bool  # DDS text-branch schedules (torch only: exported graphs hold the image branch)
    dbim_unavailable: str | None  # why DBIM requests cannot run here (no dit_dbim graph or engine), or None

    def clip_levels(self, pixels: np.ndarray) -> np.ndarray:
        """CLIP pixels ``[M, 3, S, S]`` -> tapped hidden states ``[M, L, P, C]``."""

    def reference_kv(self, levels: np.ndarray, level_weights: np.ndarray | None, text_branch: bool
                     ) -> ReferenceKV[np.ndarray]:
        """Levels ``[B, S, L, P, C]`` and level weights ``[B, S, L]`` (``None``: the router decides) -> reference
        K/V ``[blocks, B, S, T, inner]`` (with the text branch only when ``text_branch``)."""

    def encode_text(self, clip_ids: np.ndarray, t5_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int64 ids ``[B, Lclip]``, ``[B, Ltxt]`` -> T5 sequence ``[B, Ltxt, D]``, CLIP pooled ``[B, Dp]``."""

    def denoise_session(self, noise: np.ndarray, cond: DiTCondition[np.ndarray], true_cfg: np.ndarray | None = None,
                        dbim: DBIMCondition[np.ndarray] | None = None) -> DenoiseSession:
        """Start a denoising loop from packed ``noise`` ``[B, N, 64]`` under ``cond`` (batch ``B``).

        ``true_cfg``: per-row true-CFG scales ``[B]``; ``cond`` then has ``2B`` rows (the rows, then their negative
        rows) and each step runs the DiT on ``2B`` rows fed the same latents twice and moves the ``B`` latents with
        :func:`~dynaip_trt.sampling.true_cfg_velocity` (the graph's ``velocity`` output, an Euler step outside it).
        ``dbim``: DBIM's inputs; ``cond`` then has ``2B`` rows (the rows, then their auxiliary rows, each starting
        from the row's noise) and the session is a :class:`DBIMDenoiseSession`.
        Without either the loop is unchanged: the graph's ``latents_next`` is fed back."""

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Unpacked latents ``[B, C, h, w]`` -> images ``[B, 3, f*h, f*w]`` in [-1, 1]."""


# (latents [R, N, 64], cond of R rows, model "dit" | "dit_dbim", the graph's extra inputs or None) -> a session
OpenSession = Callable[[np.ndarray, DiTCondition, str, "dict[str, np.ndarray] | None"], DenoiseSession]


class DBIMDenoiseSession:
    """DBIM's loop over two of a backend's sessions: the first ``mixing_steps`` steps run the ``dit_dbim`` graph on
    the ``2B`` concept and auxiliary rows (each row steps its own latents); at the first later step the concept
    rows' latents move (one host round trip) into a session of the plain ``dit`` graph on the ``B`` concept rows,
    which runs the remaining steps exactly as a request without DBIM does (its own CUDA graph on TensorRT and
    torch)."""

    def __init__(self, noise: np.ndarray, cond: DiTCondition, dbim: DBIMCondition, open_session: OpenSession):
        self.rows, self.remaining = int(noise.shape[0]), int(dbim.mixing_steps)
        self.cond, self.open = cond, open_session
        self.mixing: DenoiseSession | None = open_session(np.concatenate([noise, noise]), cond, "dit_dbim",
                                                          dbim_feeds(dbim))
        self.main: DenoiseSession | None = None

    def step(self, timestep: float, timestep_next: float, text_branch: bool = False) -> None:
        if self.remaining > 0:
            self.mixing.step(timestep, timestep_next)
            self.remaining -= 1
            return
        if self.main is None:
            self.main = self.open(self.mixing.latents()[:self.rows], self.cond.head(self.rows), "dit", None)
            self.mixing = None
        self.main.step(timestep, timestep_next, text_branch)

    def latents(self) -> np.ndarray:
        return self.main.latents() if self.main is not None else self.mixing.latents()[:self.rows]
