"""Tokenization (the ``tokenizers`` library: no torch, no transformers) and prompt validation.

A build folder holds each text encoder's tokenizer as ``tokenizer.json`` with its padding and truncation set to the
encoder's text length, so the runtime tokenizes exactly as the exporter did. Real checkpoints bring their own
tokenizers (``tokenizer/`` and ``tokenizer_2/`` of a diffusers FLUX folder; :mod:`dynaip_trt.weights` converts them);
the ``tiny-random`` config uses :func:`byte_tokenizer` (UTF-8 bytes, nothing to download).

Prompts longer than the text length are truncated, as diffusers does, with a warning naming what was dropped;
``truncate=False`` makes that an :class:`~dynaip_trt.errors.InputError` instead.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from .errors import InputError, WeightsError

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
BYTE_OFFSET = 2  # byte tokenizer: pad 0, EOS 1, byte b -> b + 2


class Tokenizer:
    """One text encoder's tokenizer: a ``tokenizers.Tokenizer`` padded and truncated to ``max_length`` tokens.

    Args:
        tokenizer: the ``tokenizers`` object (its special tokens, e.g. BOS/EOS, come from its post-processor).
        max_length: the encoder's text length (ids are always ``[B, max_length]``).
        pad_id: id used for padding.
    """

    def __init__(self, tokenizer: HFTokenizer, max_length: int, pad_id: int):
        self.max_length = max_length
        self.pad_id = pad_id
        self._tok = tokenizer
        self._tok.enable_padding(pad_id=pad_id, length=max_length)
        self._tok.enable_truncation(max_length)

    @classmethod
    def load(cls, folder: str | Path, max_length: int | None = None) -> "Tokenizer":
        """Read ``folder/tokenizer.json`` (as a build folder holds it); ``max_length`` must match the saved text
        length when given. Raises :class:`WeightsError` for a missing or invalid file."""
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise WeightsError(f"tokenizer file {path} does not exist")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception for malformed JSON
            raise WeightsError(f"{path} is not a valid tokenizer file: {e}") from e
        padding, truncation = tok.padding, tok.truncation
        if not padding or not truncation or padding.get("length") is None:
            raise WeightsError(f"{path} has no fixed padding/truncation length; re-export the build")
        saved = int(padding["length"])
        if max_length is not None and saved != max_length:
            raise WeightsError(f"{path} pads to {saved} tokens but the text encoder takes {max_length}")
        return cls(tok, saved, int(padding["pad_id"]))

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/tokenizer.json`` (padding and truncation included)."""
        path = Path(folder) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self._tok.to_str())
        return path

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids ``[len(texts), max_length]`` int64, truncated and padded."""
        return np.asarray([e.ids for e in self._tok.encode_batch(list(texts))], dtype=np.int64)

    def overflow(self, text: str) -> str:
        """The end of ``text`` that truncation drops (``""`` when the prompt fits)."""
        enc = self._tok.encode(text)
        if not enc.overflowing:
            return ""
        ends = [end for (_, end), sid in zip(enc.offsets, enc.special_tokens_mask) if not sid and end > 0]
        return text[max(ends, default=0):].strip()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_masks(self, text: str, spans: Sequence[tuple[int, int]] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Which of the ``max_length`` token positions of ``text`` hold its own tokens (no special or padding
        tokens, nothing truncated away), and which of those overlap a character span of ``spans``
        (``[start, end)``): two ``[max_length]`` float32 0/1 masks."""
        enc = self._tok.encode(text)
        own = np.array([m == 0 for m in enc.special_tokens_mask], dtype=np.float32)
        hit = np.array([any(s < end and start < e for s, e in spans) for start, end in enc.offsets], np.float32)
        return own, own * hit

    def knows(self, word: str) -> bool:
        """Whether ``word`` tokenizes without the unknown token (a closed word-level vocabulary lacks most words;
        byte-level tokenizers know every word)."""
        unk = getattr(self._tok.model, "unk_token", None)
        unk_id = None if unk is None else self._tok.token_to_id(unk)
        enc = self._tok.encode(word)
        return unk_id is None or unk_id not in [i for i, m in zip(enc.ids, enc.attention_mask) if m]


def word_spans(text: str, phrase: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of every occurrence of ``phrase`` in ``text`` as whole words, any case."""
    pattern = re.compile(rf"(?<!\w){re.escape(phrase.strip())}(?!\w)", re.IGNORECASE)
    return [m.span() for m in pattern.finditer(text)]


def replace_words(text: str, phrase: str, replacement: str) -> tuple[str, list[tuple[int, int]]]:
    """``text`` with every whole-word occurrence of ``phrase`` replaced by ``replacement``, and the character spans
    of the replacements in the new text."""
    out, spans, last = [], [], 0
    for start, end in word_spans(text, phrase):
        out.append(text[last:start])
        offset = sum(len(p) for p in out)
        spans.append((offset, offset + len(replacement)))
        out.append(replacement)
        last = end
    out.append(text[last:])
    return "".join(out), spans


def byte_tokenizer(max_length: int) -> Tokenizer:
    """UTF-8 byte tokenizer of the ``tiny-random`` config: pad 0, EOS 1 (appended), byte ``b`` -> ``b + 2``."""
    table = _bytes_to_unicode()
    vocab = {"<pad>": 0, "</s>": 1, **{table[b]: b + BYTE_OFFSET for b in range(256)}}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return Tokenizer(tok, max_length, pad_id=0)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the ``ByteLevel`` pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def validate_prompt(prompt: str, tokenizers: Sequence[Tokenizer], truncate: bool = True,
                    field: str = "prompt", allow_empty: bool = False) -> str:
    """Check a prompt: a non-empty (unless ``allow_empty``, e.g. a negative prompt) string of valid Unicode. Tokens
    beyond a tokenizer's text length are dropped with a warning naming them (``truncate=True``, as diffusers does)
    or refused with :class:`InputError`."""
    if not isinstance(prompt, str):
        raise InputError(f"{field} must be a str, got {type(prompt).__name__}")
    if not allow_empty and not prompt.strip():
        raise InputError(f"{field} is empty; give at least one non-space character")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{field} is not valid Unicode text ({e.reason} at position {e.start})") from e
    for tok in tokenizers:
        dropped = tok.overflow(prompt)
        if not dropped:
            continue
        if not truncate:
            raise InputError(f"{field} is longer than the text length of {tok.max_length} tokens; it would lose "
                             f"{dropped!r} (shorten it, or allow truncation)")
        logger.warning("%s is longer than the text length of %d tokens: %r was dropped", field, tok.max_length,
                       dropped)
    return prompt


def normalize_prompts(prompt: str | Sequence[str], tokenizers: Sequence[Tokenizer], truncate: bool = True
                      ) -> list[str]:
    """One prompt or a non-empty list/tuple of prompts -> list of prompts, each checked by :func:`validate_prompt`."""
    if isinstance(prompt, str):
        return [validate_prompt(prompt, tokenizers, truncate)]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise InputError(f"prompt must be a str or a non-empty list of str, got {prompt!r:.60}")
    return [validate_prompt(p, tokenizers, truncate, field=f"prompt[{i}]") for i, p in enumerate(prompt)]
