"""DCI's dual-branch integration (DBIM) at inference, as request data (numpy only; docs/dci-mmdiff.md).

DCI ("Divide, Conquer, then Integrate", ECCV 2024) samples two branches of one model in the early denoising steps:
the **concept** branch (the prompt, with the reference subjects) and the **auxiliary** branch (the prompt with the
subject phrase replaced by another common noun, here with adapter scale 0). In every double-stream block of the
MM-DiT each branch's image queries give a token-set attention map (concept row: the subject's text tokens, and
optionally the reference tokens; auxiliary row: every prompt token but the auxiliary noun); each map is normalised by
a spatial softmax, a per-pixel softmax across the two branches with ``dbim_lambda`` weighs them, and the concept
row's image-token attention output becomes the pixel-wise mix of both rows' outputs. After the mixing steps the
auxiliary row is dropped and the concept rows continue alone on the plain DiT graph.

This module validates the request fields (:func:`check_dbim` -> :class:`DBIMPlan`) and turns a batch's plans into
the per-row inputs of the ``dit_dbim`` graph (:class:`DBIMCondition`, :func:`dbim_condition`). The maps themselves
are computed in :mod:`dynaip_trt.attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generic, Sequence, TypeVar

import numpy as np

from .errors import InputError
from .text import Tokenizer, replace_words, validate_prompt, word_spans

A = TypeVar("A")  # np.ndarray in the runtime, torch.Tensor in the model code

# The paper's T_a = 0.15 T (the authors' code defaults to 0.3): the fraction of the denoising steps that mix.
DEFAULT_DBIM_STEPS = 0.15
MAX_DBIM_LAMBDA = 50.0  # the paper sweeps -2..2; the authors' first code version hard-coded -50
# Common nouns tried in order when a request gives no aux_noun: the first that differs from the subject word and
# that the model's tokenizers know (a closed vocabulary may know none: then aux_noun must be given).
DEFAULT_AUX_NOUNS = ("object", "thing", "item", "toy", "figure", "animal", "person")
DBIM_MAPS = ("text", "reference", "both")  # the concept map: subject tokens, reference tokens, or both


@dataclass(frozen=True)
class DBIMPlan:
    """The validated DBIM fields of one request (``L`` text tokens).

    Attributes:
        lam: ``dbim_lambda``, the auxiliary map's weight in the per-pixel softmax across the branches.
        fraction: ``dbim_steps``; steps: the mixing steps, ``ceil(fraction * total steps)`` (the first ones).
        subject_word, aux_noun: the subject phrase and the noun that replaces it in ``aux_prompt``.
        concept_map: ``"text"``, ``"reference"`` or ``"both"`` (which tokens form the concept map).
        prompt_tokens, concept_tokens: ``[L]`` 0/1: the prompt's own tokens and the subject phrase's tokens.
        aux_prompt_tokens, aux_map_tokens: ``[L]`` 0/1: the auxiliary prompt's own tokens, and those but the
            auxiliary noun's.
    """

    lam: float
    fraction: float
    steps: int
    subject_word: str
    aux_noun: str
    aux_prompt: str
    concept_map: str
    prompt_tokens: np.ndarray
    concept_tokens: np.ndarray
    aux_prompt_tokens: np.ndarray
    aux_map_tokens: np.ndarray

    def active(self, step: int) -> bool:
        """Whether denoising step ``step`` (0-based) mixes the branches."""
        return step < self.steps


def check_dbim(prompt: str, lam, fraction, subject_word, aux_noun, concept_map, steps: int,
               tokenizers: Sequence[Tokenizer], truncate: bool = True) -> DBIMPlan | None:
    """The DBIM fields of a request (``dbim_lambda``, ``dbim_steps``, ``subject_word``, ``aux_noun``, ``dbim_map``)
    checked against its validated ``prompt`` and ``steps``; ``None`` when ``dbim_lambda`` is ``None`` (DBIM off, and
    then the other fields must be left out). The token masks come from the T5 tokenizer (``tokenizers[-1]``), whose
    tokens the DiT attends to. Raises :class:`InputError` naming the field."""
    if lam is None:
        given = [n for n, v in (("dbim_steps", fraction), ("subject_word", subject_word), ("aux_noun", aux_noun),
                                ("dbim_map", concept_map)) if v is not None]
        if given:
            raise InputError(f"{', '.join(given)} apply to DBIM, which is off: set dbim_lambda too (e.g. 0)")
        return None
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) \
            or abs(lam) > MAX_DBIM_LAMBDA:
        raise InputError(f"dbim_lambda={lam!r} must be a finite number in [-{MAX_DBIM_LAMBDA:g}, "
                         f"{MAX_DBIM_LAMBDA:g}] (the paper uses -2..2; None turns DBIM off)")
    fraction = DEFAULT_DBIM_STEPS if fraction is None else fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction) \
            or not 0 < fraction <= 1:
        raise InputError(f"dbim_steps={fraction!r} must be a fraction of the steps in (0, 1] (default "
                         f"{DEFAULT_DBIM_STEPS:g}: the first 15% of the steps mix)")
    concept_map = "text" if concept_map is None else concept_map
    if concept_map not in DBIM_MAPS:
        raise InputError(f"dbim_map={concept_map!r} must be one of {list(DBIM_MAPS)} (the concept map: the subject "
                         f"word's tokens, the reference tokens, or both)")
    if subject_word is None:
        raise InputError("dbim_lambda needs subject_word: the word or phrase of the prompt that names the subject "
                         "(the auxiliary prompt replaces it by aux_noun)")
    if not isinstance(subject_word, str) or not subject_word.strip():
        raise InputError(f"subject_word must be a non-empty str, got {subject_word!r}")
    t5 = tokenizers[-1]
    spans = word_spans(prompt, subject_word)
    if not spans:
        raise InputError(f"subject_word {subject_word!r} does not occur in the prompt {prompt!r} (matched as whole "
                         f"words, any case)")
    prompt_tokens, concept_tokens = t5.token_masks(prompt, spans)
    if not concept_tokens.any():
        raise InputError(f"subject_word {subject_word!r} lies beyond the text length of {t5.max_length} tokens: "
                         f"shorten the prompt")
    aux_noun = default_aux_noun(subject_word, tokenizers) if aux_noun is None else aux_noun
    if not isinstance(aux_noun, str) or not aux_noun.strip():
        raise InputError(f"aux_noun must be a non-empty str, got {aux_noun!r}")
    if aux_noun.strip().lower() == subject_word.strip().lower():
        raise InputError(f"aux_noun {aux_noun!r} must differ from subject_word: the auxiliary prompt names "
                         f"another common noun")
    aux_prompt, aux_spans = replace_words(prompt, subject_word, aux_noun.strip())
    aux_prompt = validate_prompt(aux_prompt, tokenizers, truncate, field="the auxiliary prompt (aux_noun)")
    aux_prompt_tokens, noun_tokens = t5.token_masks(aux_prompt, aux_spans)
    return DBIMPlan(lam=float(lam), fraction=float(fraction), steps=math.ceil(fraction * steps - 1e-9),
                    subject_word=subject_word, aux_noun=aux_noun.strip(), aux_prompt=aux_prompt,
                    concept_map=concept_map, prompt_tokens=prompt_tokens,
                    concept_tokens=concept_tokens if concept_map != "reference" else np.zeros_like(concept_tokens),
                    aux_prompt_tokens=aux_prompt_tokens, aux_map_tokens=aux_prompt_tokens * (1 - noun_tokens))


def default_aux_noun(subject_word: str, tokenizers: Sequence[Tokenizer]) -> str:
    """The first of :data:`DEFAULT_AUX_NOUNS` that every tokenizer knows and that is not the subject word, nor its
    plural or singular (``"object"`` never replaces ``"objects"``: the auxiliary prompt would name the subject)."""
    subject = subject_word.strip().lower()
    for noun in DEFAULT_AUX_NOUNS:
        if subject not in (noun, noun + "s", noun + "es") and all(t.knows(noun) for t in tokenizers):
            return noun
    raise InputError(f"none of the default auxiliary nouns {list(DEFAULT_AUX_NOUNS)} is in this model's vocabulary "
                     f"(or each is the subject word): give aux_noun, a common noun the model knows")


@dataclass(frozen=True)
class DBIMCondition(Generic[A]):
    """The per-row DBIM inputs of the ``dit_dbim`` graph for ``2B`` rows: the ``B`` concept rows, then their ``B``
    auxiliary rows (``L`` text tokens).

    Attributes:
        prompt_tokens: ``[2B, L]`` 1 on the row's own prompt tokens (the tokens its map's softmax runs over).
        map_tokens: ``[2B, L]`` 1 on the tokens whose attention forms the row's map (concept rows: the subject
            phrase, or nothing with ``dbim_map="reference"``; auxiliary rows: every prompt token but the noun).
        reference_map: ``[2B]`` 1 where the concept map also counts the reference tokens (``"reference"``,
            ``"both"``); auxiliary rows 0.
        dbim_lambda: ``[2B]`` each concept row's lambda (repeated on its auxiliary row, which ignores it).
        mixing_steps: how many of the first denoising steps run the ``dit_dbim`` graph (the rows' plan's).
    """

    prompt_tokens: A
    map_tokens: A
    reference_map: A
    dbim_lambda: A
    mixing_steps: int = 0


def dbim_condition(plans: Sequence[DBIMPlan]) -> DBIMCondition[np.ndarray]:
    """The :class:`DBIMCondition` (float32 numpy) of a batch's plans, concept rows first."""
    f32 = lambda rows: np.stack(rows).astype(np.float32)  # noqa: E731
    return DBIMCondition(
        prompt_tokens=f32([p.prompt_tokens for p in plans] + [p.aux_prompt_tokens for p in plans]),
        map_tokens=f32([p.concept_tokens for p in plans] + [p.aux_map_tokens for p in plans]),
        reference_map=np.asarray([float(p.concept_map != "text") for p in plans] + [0.0] * len(plans), np.float32),
        dbim_lambda=np.asarray([p.lam for p in plans] * 2, np.float32), mixing_steps=plans[0].steps)


def dbim_feeds(cond: DBIMCondition[A]) -> dict[str, A]:
    """The DBIM inputs of the ``dit_dbim`` graph by name (added to :func:`~dynaip_trt.conditioning.dit_feeds`)."""
    return {"prompt_tokens": cond.prompt_tokens, "map_tokens": cond.map_tokens, "reference_map": cond.reference_map,
            "dbim_lambda": cond.dbim_lambda}
