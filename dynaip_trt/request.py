"""Validation of generation requests, shared by the reference pipeline and every runtime backend (numpy only).

:func:`validate_request` turns a :class:`GenerationRequest` into a :class:`ValidRequest` (defaults filled in, images
decoded, arrays shaped); each check raises an :class:`~dynaip_trt.errors.InputError` subclass whose message names the
field and the allowed range (the README's error table lists them). Requests batched together must share
:func:`batch_key`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .conditioning import ReferenceKV
from .configs import DynaIPConfig
from .dbim import DBIMPlan, check_dbim
from .errors import ConfigError, InputError, SubjectLimitError
from .images import ImageLike, load_image
from .text import Tokenizer, validate_prompt

MAX_SIDE = 4096
MAX_SCALE = 10.0
MAX_SEED = 2**63 - 1
MAX_TRUE_CFG = 100.0
# The reference of a true-CFG negative row: a black image, as diffusers' FluxPipeline and x-flux use when no negative
# image is given (any size: preprocessing makes every black image the same pixels)
NEGATIVE_IMAGE = Image.new("RGB", (64, 64))


@dataclass
class GenerationRequest:
    """One generation request: what :meth:`runtime.DynaIPEngine.generate` takes, as data (the HTTP API's schema
    follows these fields, so an option added here appears there too).

    Attributes:
        prompt: the text prompt.
        references: one image (path or PIL image) or a list of views per subject; or the
            :class:`~dynaip_trt.conditioning.ReferenceKV` of an earlier ``encode_references`` call (reused).
        scales: one scale for every subject or one per subject, each in [0, 10].
        granularity: CLIP level weights (``L`` values, or ``[S][L]``), renormalised to sum 1 per subject; ``None``
            lets the router decide.
        masks: per-subject regions (``(H, W)`` pixels or ``(H/16, W/16)`` tokens, values in [0, 1]) or ``None``.
        block_scales: image-branch multiplier per injected block, each in [0, 10] (``None``: ones).
        steps, guidance, height, width, seed: sampling settings (``None``: the config's defaults).
        truncate_prompt: drop the tokens of a prompt beyond the text length with a warning (``False``: refuse).
        text_branch: DDS schedule keeping the text-branch injection for the first steps (torch backend only).
        negative_prompt: the prompt of true classifier-free guidance's negative pass (``""`` for an empty one).
        true_cfg_scale: true CFG scale in [1, 100] (diffusers' ``true_cfg_scale``): above 1, with a
            ``negative_prompt``, every step also runs the DiT on the negative prompt with a black image as every
            subject's reference (same scales and masks) and uses ``v_neg + true_cfg_scale * (v - v_neg)``; 1 turns it
            off.
        dbim_lambda: DCI's dual-branch integration (DBIM, :mod:`dynaip_trt.dbim`) in [-50, 50]: the weight of the
            auxiliary branch's map in the per-pixel softmax across the branches (larger: the prompt's content wins
            more pixels); ``None`` (default) turns DBIM off.
        dbim_steps: the fraction of the denoising steps that mix, in (0, 1] (default 0.15, the paper's T_a).
        subject_word: the word or phrase of the prompt that names the subject (needed by DBIM): its tokens form the
            concept map, and the auxiliary prompt replaces it by ``aux_noun``.
        aux_noun: the common noun of the auxiliary prompt (default: the first of
            :data:`~dynaip_trt.dbim.DEFAULT_AUX_NOUNS` the model knows that is not the subject word).
        dbim_map: the concept map's tokens: ``"text"`` (the subject word's, default), ``"reference"`` (the
            reference tokens: the image-to-reference attention) or ``"both"``.
    """

    prompt: str
    references: Sequence[ImageLike | Sequence[ImageLike]] | ReferenceKV
    scales: float | Sequence[float] = 1.0
    granularity: Sequence[float] | Sequence[Sequence[float]] | None = None
    masks: Sequence[Any] | None = None
    block_scales: Sequence[float] | None = None
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    truncate_prompt: bool = True
    text_branch: "TextBranchSchedule | None" = None
    negative_prompt: str | None = None
    true_cfg_scale: float = 1.0
    dbim_lambda: float | None = None
    dbim_steps: float | None = None
    subject_word: str | None = None
    aux_noun: str | None = None
    dbim_map: str | None = None


@dataclass(frozen=True)
class ValidRequest:
    """A validated :class:`GenerationRequest` (``S`` subjects, ``L`` levels, ``N`` image tokens).

    Attributes:
        subjects: decoded RGB views per subject, or ``None`` when ``encoded`` is given.
        encoded: reference K/V encoded earlier (``[blocks, 1, S, T, inner]``), or ``None``.
        level_weights: ``[S, L]`` summing to 1 per subject, or ``None`` (the router decides).
        scales: ``[S]``; masks: ``[S, N]`` or ``None``; block_scales: ``[blocks]``.
        negative_prompt, true_cfg_scale: true CFG (:attr:`uses_true_cfg`).
        dbim: the DBIM plan (:class:`~dynaip_trt.dbim.DBIMPlan`), or ``None`` (off).
    """

    prompt: str
    subjects: list[list[Image.Image]] | None
    encoded: ReferenceKV | None
    level_weights: np.ndarray | None
    scales: np.ndarray
    masks: np.ndarray | None
    block_scales: np.ndarray
    steps: int
    guidance: float
    height: int
    width: int
    seed: int
    text_branch: "TextBranchSchedule | None"
    negative_prompt: str | None = None
    true_cfg_scale: float = 1.0
    dbim: DBIMPlan | None = None

    @property
    def num_subjects(self) -> int:
        return len(self.scales)

    @property
    def uses_text_branch(self) -> bool:
        return self.text_branch is not None and self.text_branch.steps > 0

    @property
    def uses_true_cfg(self) -> bool:
        """True CFG is on: a negative prompt and a scale above 1 (diffusers' rule)."""
        return self.negative_prompt is not None and self.true_cfg_scale > 1.0


def negative_rows(rows: Sequence[ValidRequest]) -> list[ValidRequest]:
    """The true-CFG negative row of each row: its negative prompt, a black image as every subject's reference
    (the router decides its level weights), the row's scales, masks, guidance and sizes."""
    return [replace(r, prompt=r.negative_prompt, subjects=[[NEGATIVE_IMAGE]] * r.num_subjects, encoded=None,
                    level_weights=None, negative_prompt=None, true_cfg_scale=1.0) for r in rows]


def auxiliary_rows(rows: Sequence[ValidRequest]) -> list[ValidRequest]:
    """DBIM's auxiliary row of each row: its auxiliary prompt (the subject phrase replaced by the auxiliary noun),
    the same references with every scale 0 (no reference content), the row's guidance, masks and sizes."""
    return [replace(r, prompt=r.dbim.aux_prompt, scales=np.zeros_like(r.scales), dbim=None) for r in rows]


def validate_request(request: GenerationRequest, config: DynaIPConfig, tokenizers: Sequence[Tokenizer],
                     max_subjects: int, num_blocks: int, prompt_field: str = "prompt") -> ValidRequest:
    """Check every field of ``request`` against ``config`` (sizes, levels), the engine's subject limit and its
    number of injected blocks; fill defaults from the config. Raises an :class:`InputError` subclass naming the
    field (the prompt as ``prompt_field``, e.g. ``prompt[1]`` for the second of a list)."""
    if not isinstance(request, GenerationRequest):
        raise InputError(f"expected a GenerationRequest, got {type(request).__name__}")
    steps, guidance, height, width = request_defaults(config, request.steps, request.guidance, request.height,
                                                      request.width)
    seed = check_seed(config.seed if request.seed is None else request.seed)
    prompt = validate_prompt(request.prompt, tokenizers, truncate=bool(request.truncate_prompt), field=prompt_field)
    text_branch = request.text_branch
    if text_branch is not None and not isinstance(text_branch, TextBranchSchedule):
        raise InputError(f"text_branch must be a TextBranchSchedule or None, got {type(text_branch).__name__}")
    if text_branch is not None and text_branch.steps > 0 and not config.adapter.text_branch:
        raise InputError("text_branch: this adapter has no text branch (an IP-Adapter layout); leave it out")
    negative, true_cfg = check_true_cfg(request.negative_prompt, request.true_cfg_scale, tokenizers,
                                        bool(request.truncate_prompt))
    if negative is not None and true_cfg > 1.0 and text_branch is not None and text_branch.steps > 0:
        raise InputError("true CFG (true_cfg_scale > 1) and text_branch schedules cannot be combined")
    dbim = check_dbim(prompt, request.dbim_lambda, request.dbim_steps, request.subject_word, request.aux_noun,
                      request.dbim_map, steps, tokenizers, bool(request.truncate_prompt))
    if dbim is not None and ((negative is not None and true_cfg > 1.0) or (text_branch is not None and
                                                                          text_branch.steps > 0)):
        raise InputError("DBIM (dbim_lambda) cannot be combined with true CFG (true_cfg_scale > 1) or a "
                         "text_branch schedule")
    if isinstance(request.references, ReferenceKV):  # encoded once by encode_references(), reused
        if request.granularity is not None:
            raise InputError("granularity applies when references are encoded: pass it to encode_references()")
        if text_branch is not None and text_branch.steps > 0 and not request.references.has_text_branch:
            raise InputError("text_branch needs references encoded with encode_references(text_branch=True)")
        check_subject_count(request.references.num_subjects, max_subjects)
        subjects, encoded, num_subjects, lw = None, request.references, request.references.num_subjects, None
    else:
        subjects = normalize_references(request.references, max_subjects)
        encoded, num_subjects = None, len(subjects)
        lw = normalize_granularity(request.granularity, num_subjects, config.adapter.num_levels)
    return ValidRequest(
        prompt=prompt, subjects=subjects, encoded=encoded, level_weights=lw,
        scales=normalize_scales(request.scales, num_subjects),
        masks=normalize_masks(request.masks, num_subjects, height, width, config.vae.spatial_factor),
        block_scales=normalize_block_scales(request.block_scales, num_blocks),
        steps=steps, guidance=guidance, height=height, width=width, seed=seed, text_branch=text_branch,
        negative_prompt=negative, true_cfg_scale=true_cfg, dbim=dbim)


def check_true_cfg(negative_prompt: str | None, true_cfg_scale: float, tokenizers: Sequence[Tokenizer],
                   truncate: bool = True) -> tuple[str | None, float]:
    """``true_cfg_scale``: a finite number in [1, 100]; above 1 it needs a ``negative_prompt`` (a str, ``""``
    allowed, checked like a prompt). Returns both, the scale as a float."""
    if (isinstance(true_cfg_scale, bool) or not isinstance(true_cfg_scale, (int, float))
            or not math.isfinite(true_cfg_scale) or not 1.0 <= true_cfg_scale <= MAX_TRUE_CFG):
        raise InputError(f"true_cfg_scale={true_cfg_scale!r} must be a finite number in [1, {MAX_TRUE_CFG:g}] "
                         f"(1: no true CFG)")
    if negative_prompt is None:
        if true_cfg_scale > 1.0:
            raise InputError(f"true_cfg_scale={true_cfg_scale:g} needs a negative_prompt (\"\" for an empty one)")
        return None, float(true_cfg_scale)
    negative = validate_prompt(negative_prompt, tokenizers, truncate, field="negative_prompt", allow_empty=True)
    return negative, float(true_cfg_scale)


def prompt_fields(prompt) -> list[str]:
    """How the prompts of a ``generate(prompt, ...)`` call are named in errors: ``prompt``, or ``prompt[i]`` for a
    list. Raises :class:`InputError` when ``prompt`` is neither a str nor a non-empty list/tuple."""
    if isinstance(prompt, str):
        return ["prompt"]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise InputError(f"prompt must be a str or a non-empty list of str, got {prompt!r:.60}")
    return [f"prompt[{i}]" for i in range(len(prompt))]


def batch_key(request: ValidRequest) -> tuple:
    """Requests generated in one batch must agree on this: steps, size, subject count, masks or not, per-block
    scales, DDS schedule, true CFG or not, and DBIM's mixing steps or DBIM off (each row keeps its own prompt,
    references, scales, masks, guidance, seed, negative prompt, true-CFG scale and DBIM lambda, words and map)."""
    return (request.steps, request.height, request.width, request.num_subjects, request.masks is not None,
            tuple(request.block_scales.tolist()), request.text_branch if request.uses_text_branch else None,
            request.uses_true_cfg, None if request.dbim is None else request.dbim.steps)


def check_batch(requests: Sequence[ValidRequest]) -> None:
    """Every request of a batch has the first one's :func:`batch_key`; :class:`InputError` otherwise."""
    if not requests:
        raise InputError("a batch needs at least one request")
    first = batch_key(requests[0])
    for i, r in enumerate(requests[1:], start=1):
        if batch_key(r) != first:
            raise InputError(f"requests[{i}] cannot share a batch with requests[0]: steps, height, width, subject "
                             f"count, masks, text_branch, DBIM's mixing steps and true CFG must match ({batch_key(r)} "
                             f"vs {first})")


@dataclass(frozen=True)
class TextBranchSchedule:
    """Dynamic Decoupling Strategy schedule for the text-branch injection at inference.

    The default (``steps=0``) drops the text branch at every step and block (the paper's DDS). ``steps=k`` keeps
    it for the first ``k`` denoising steps with multiplier ``scale`` (or per-block ``block_scales``).
    """

    steps: int = 0
    scale: float = 1.0
    block_scales: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise InputError(f"text_branch.steps={self.steps!r} must be an int >= 0")
        scale = _as_float_array(self.scale, "text_branch.scale")
        blocks = _as_float_array(() if self.block_scales is None else self.block_scales, "text_branch.block_scales")
        values = np.append(blocks, scale)
        if scale.ndim != 0 or blocks.ndim != 1 or not np.isfinite(values).all() or not (
                (values >= 0) & (values <= MAX_SCALE)).all():
            raise InputError(f"text_branch: scale={self.scale!r} and block_scales={self.block_scales!r} must be "
                             f"finite numbers in [0, {MAX_SCALE:g}] (block_scales: one per double block)")

    def active(self, step: int) -> bool:
        return step < self.steps

    def block_array(self, num_blocks: int) -> np.ndarray:
        """Per-block text-branch multipliers ``[num_blocks]`` float32."""
        if self.block_scales is None:
            return np.full((num_blocks,), float(self.scale), dtype=np.float32)
        if len(self.block_scales) != num_blocks:
            raise InputError(f"text_branch.block_scales has {len(self.block_scales)} values; expected {num_blocks}")
        return np.asarray(self.block_scales, dtype=np.float32)


def check_size(height: int, width: int, multiple: int) -> None:
    """Height/width must be positive multiples of ``multiple`` (16 for FLUX) and at most ``MAX_SIDE``."""
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise InputError(f"{name} must be an int, got {type(v).__name__}")
        if v < multiple or v > MAX_SIDE or v % multiple:
            raise InputError(f"{name}={v} must be a multiple of {multiple} in [{multiple}, {MAX_SIDE}]")


def check_steps_guidance(steps: int, guidance: float) -> None:
    """``steps``: int in [1, 1000]; ``guidance``: finite number in [0, 100]."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 1000:
        raise InputError(f"steps={steps!r} must be an int in [1, 1000]")
    if (isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance)
            or not 0.0 <= guidance <= 100.0):
        raise InputError(f"guidance={guidance!r} must be a finite number in [0, 100]")


def check_seed(seed: int) -> int:
    """The noise seed must be an int in [0, 2**63 - 1]."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed={seed!r} must be an int in [0, 2**63 - 1]")
    return seed


def check_subject_count(num_subjects: int, max_subjects: int) -> None:
    """A request has 1..``max_subjects`` subjects; :class:`SubjectLimitError` otherwise."""
    if not 1 <= num_subjects <= max_subjects:
        raise SubjectLimitError(
            f"references: {num_subjects} subjects given; this engine allows 1..{max_subjects} subjects "
            f"(one image or list of images per subject)"
        )


def normalize_references(references: Sequence[ImageLike | Sequence[ImageLike]], max_subjects: int
                         ) -> list[list[Image.Image]]:
    """``[img | [img, ...] per subject]`` -> ``[[RGB image, ...] per subject]``, validated.

    ``references`` must be a list or tuple (a lone image or path is refused: wrap it in a list); a subject given
    as a list or tuple holds several views, anything else is one image (checked by :func:`load_image`).
    """
    if not isinstance(references, (list, tuple)):
        raise InputError(f"references must be a list with one image (or list of images) per subject, got "
                         f"{type(references).__name__}")
    check_subject_count(len(references), max_subjects)
    subjects = []
    for s, ref in enumerate(references):
        imgs = list(ref) if isinstance(ref, (list, tuple)) else [ref]
        if not imgs:
            raise InputError(f"references[{s}]: empty list; give at least one image per subject")
        subjects.append([load_image(im, field=f"references[{s}]") for im in imgs])
    return subjects


def _as_float_array(value, field: str) -> np.ndarray:
    """Numbers / nested sequences / arrays -> float64 array; :class:`InputError` naming ``field`` otherwise."""
    if value is None or isinstance(value, (str, bytes)):
        raise InputError(f"{field} must be numbers, got {type(value).__name__}")
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"{field} must be numbers (a number or a rectangular list/array), got {value!r:.80}") from e


def normalize_scales(scales: float | Sequence[float], num_subjects: int) -> np.ndarray:
    """Scalar or one value per subject -> ``[S]`` float32; finite values in [0, 10]."""
    arr = _as_float_array(scales, "scales")
    if arr.ndim == 0:
        arr = np.full(num_subjects, float(arr))
    if arr.shape != (num_subjects,):
        raise InputError(f"scales has shape {arr.shape}; expected one number or {num_subjects} numbers (one per "
                         f"subject)")
    return _scale_values(arr, "scales")


def _scale_values(arr: np.ndarray, name: str) -> np.ndarray:
    """``arr`` as float32 after checking every value is finite and in [0, :data:`MAX_SCALE`]."""
    if not np.isfinite(arr).all() or (arr < 0).any() or (arr > MAX_SCALE).any():
        raise InputError(f"{name}={arr.tolist()} must be finite numbers in [0, {MAX_SCALE:g}]")
    return arr.astype(np.float32)


def normalize_block_scales(block_scales: Sequence[float] | None, num_blocks: int) -> np.ndarray:
    """``None`` (ones) or one multiplier per injected block -> ``[blocks]`` float32; finite values in [0, 10]."""
    if block_scales is None:
        return np.ones(num_blocks, dtype=np.float32)
    arr = _as_float_array(block_scales, "block_scales")
    if arr.shape != (num_blocks,):
        raise InputError(f"block_scales has shape {arr.shape}; expected ({num_blocks},): one number per injected "
                         f"block")
    return _scale_values(arr, "block_scales")


def normalize_granularity(granularity, num_subjects: int, num_levels: int) -> np.ndarray | None:
    """Level-weight override: ``None`` (router decides), ``L`` weights for all subjects or ``[S][L]``.

    Returns ``[S, L]`` float32 or ``None``. Weights must be finite, >= 0 and not all zero; they are renormalised
    to sum 1 per subject, like the router's softmax weights (so ``[1, 1, 1]`` means equal levels, not three times
    the reference tokens).
    """
    if granularity is None:
        return None
    arr = _as_float_array(granularity, "granularity")
    if arr.ndim == 1:
        arr = np.broadcast_to(arr, (num_subjects, arr.shape[0]))
    if arr.shape != (num_subjects, num_levels):
        raise InputError(
            f"granularity has shape {tuple(np.shape(granularity))}; expected ({num_levels},) or "
            f"({num_subjects}, {num_levels}) level weights"
        )
    if not np.isfinite(arr).all() or (arr < 0).any() or (arr.sum(-1) <= 0).any():
        raise InputError(f"granularity={arr.tolist()}: level weights must be finite and >= 0, with a positive sum "
                         f"for every subject")
    return (arr / arr.sum(-1, keepdims=True)).astype(np.float32)


def normalize_masks(masks, num_subjects: int, height: int, width: int, vae_factor: int) -> np.ndarray | None:
    """Per-subject masks (PIL or arrays of shape ``(H, W)`` in pixels or ``(H/16, W/16)`` in tokens, values in
    [0, 1] or 0..255 for 8-bit images) -> ``[S, N]`` float32 over image tokens (area-averaged), or ``None``."""
    if masks is None:
        return None
    if not isinstance(masks, (list, tuple, np.ndarray)) and not hasattr(masks, "__array__") or \
            getattr(masks, "ndim", 1) == 0:
        raise InputError(f"masks must be a list with one mask per subject, got {type(masks).__name__}")
    if len(masks) != num_subjects:
        raise InputError(f"masks has {len(masks)} entries for {num_subjects} subjects; give one per subject")
    gh, gw = height // vae_factor // 2, width // vae_factor // 2
    out = []
    for s, m in enumerate(masks):
        if isinstance(m, Image.Image):
            arr = np.asarray(m.convert("L"), dtype=np.float64) / 255.0
        else:
            arr = _as_float_array(m, f"masks[{s}]")
        if arr.shape == (height, width):
            arr = arr.reshape(gh, height // gh, gw, width // gw).mean(axis=(1, 3))
        elif arr.shape != (gh, gw):
            raise InputError(
                f"masks[{s}] has shape {arr.shape}; expected ({height}, {width}) pixels or ({gh}, {gw}) tokens"
            )
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise InputError(f"masks[{s}] values must be finite and in [0, 1] (8-bit PIL masks: 0..255), got "
                             f"min {arr.min():g}, max {arr.max():g}")
        out.append(arr.reshape(-1))
    return np.stack(out).astype(np.float32)


def check_backend(name: str, allowed: Sequence[str]) -> str:
    if name not in allowed:
        raise ConfigError(f"unknown backend {name!r}; choose one of {list(allowed)}")
    return name


def request_defaults(cfg: DynaIPConfig, steps, guidance, height, width) -> tuple[int, float, int, int]:
    """Fill ``None`` arguments from the config and validate them."""
    steps = cfg.steps if steps is None else steps
    guidance = cfg.guidance if guidance is None else guidance
    height = cfg.height if height is None else height
    width = cfg.width if width is None else width
    check_size(height, width, cfg.pixel_multiple)
    check_steps_guidance(steps, guidance)
    return steps, float(guidance), height, width
