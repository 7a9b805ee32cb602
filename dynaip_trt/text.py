"""Tokenizers and the FLUX text encoding (CLIP-L pooled vector + T5 sequence).

Real checkpoints bring their own tokenizers (``tokenizer/`` and ``tokenizer_2/`` of a diffusers FLUX folder).
Models with seeded random weights use :class:`ByteTokenizer` (UTF-8 bytes, no vocabulary file, nothing to download);
the trained tiny default uses a :class:`WordLevelTokenizer` over its synthetic world's vocabulary (``tokenizer.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import InputError, WeightsError

BYTE_TOKENIZER_FILE = "dynaip_byte_tokenizer.json"
WORDLEVEL_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    def encode_batch(self, texts: list[str], max_length: int) -> np.ndarray:
        """Token ids ``[len(texts), max_length]`` int64, padded/truncated."""


class ByteTokenizer:
    """UTF-8 byte tokenizer: pad=0, eos=1, byte b -> b+2. Vocabulary size 258."""

    pad_id = 0
    eos_id = 1
    vocab_size = 258

    def encode_batch(self, texts: list[str], max_length: int) -> np.ndarray:
        ids = np.zeros((len(texts), max_length), dtype=np.int64)
        for i, t in enumerate(texts):
            toks = [b + 2 for b in t.encode("utf-8")][: max_length - 1] + [self.eos_id]
            ids[i, : len(toks)] = toks
        return ids

    def count(self, text: str) -> int:
        """Tokens the text needs including EOS."""
        return len(text.encode("utf-8")) + 1

    def save(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / BYTE_TOKENIZER_FILE).write_text(json.dumps({"type": "byte", "vocab_size": self.vocab_size}))


class WordLevelTokenizer:
    """A ``tokenizers.Tokenizer`` with a closed vocabulary (WordLevel, lower case, whitespace/punctuation
    pre-tokenizer, ``[EOS]`` appended): pad=0, eos=1, unknown words -> ``[UNK]``. Saved as ``tokenizer.json``."""

    pad_id = 0
    eos_id = 1

    def __init__(self, tok) -> None:
        if tok.token_to_id("[PAD]") != self.pad_id or tok.token_to_id("[EOS]") != self.eos_id:
            raise WeightsError("a word-level tokenizer needs [PAD] = 0 and [EOS] = 1 in its vocabulary")
        self.tok = tok

    @classmethod
    def from_file(cls, path: str | Path) -> "WordLevelTokenizer":
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a plain Exception for unreadable files
            raise WeightsError(f"cannot load a tokenizer from {path}: {e}") from e

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode_batch(self, texts: list[str], max_length: int) -> np.ndarray:
        ids = np.full((len(texts), max_length), self.pad_id, dtype=np.int64)
        for i, enc in enumerate(self.tok.encode_batch(texts)):
            toks = enc.ids if len(enc.ids) <= max_length else enc.ids[: max_length - 1] + [self.eos_id]
            ids[i, : len(toks)] = toks
        return ids

    def count(self, text: str) -> int:
        """Tokens the text needs including EOS."""
        return len(self.tok.encode(text).ids)

    def save(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.tok.save(str(Path(folder) / WORDLEVEL_FILE))


class HFTokenizer:
    """Wraps a transformers tokenizer loaded from a local folder."""

    def __init__(self, tok) -> None:
        self.tok = tok

    def encode_batch(self, texts: list[str], max_length: int) -> np.ndarray:
        out = self.tok(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
        return out["input_ids"].astype(np.int64)

    def count(self, text: str) -> int:
        return len(self.tok(text, truncation=False)["input_ids"])


def load_tokenizer(folder: str | Path) -> ByteTokenizer | WordLevelTokenizer | HFTokenizer:
    """Load the tokenizer saved in ``folder`` (byte tokenizer marker, a lone ``tokenizer.json`` of a
    :class:`WordLevelTokenizer`, or a transformers tokenizer)."""
    folder = Path(folder)
    if (folder / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    if (folder / WORDLEVEL_FILE).is_file() and not (folder / "tokenizer_config.json").is_file():
        return WordLevelTokenizer.from_file(folder / WORDLEVEL_FILE)
    if not folder.is_dir():
        raise WeightsError(f"tokenizer folder {folder} does not exist")
    try:
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot load a tokenizer from {folder}: {e}") from e


def save_tokenizer(tokenizer: ByteTokenizer | WordLevelTokenizer | HFTokenizer, folder: str | Path) -> Path:
    """Write ``tokenizer`` to ``folder`` in the form :func:`load_tokenizer` reads."""
    folder = Path(folder)
    if isinstance(tokenizer, (ByteTokenizer, WordLevelTokenizer)):
        tokenizer.save(folder)
    else:
        tokenizer.tok.save_pretrained(str(folder))
    return folder


def validate_prompt(prompt: str, tokenizer: ByteTokenizer | HFTokenizer, max_length: int,
                    field: str = "prompt") -> str:
    """Check a prompt: a non-empty string of valid Unicode whose tokens fit ``max_length`` (the engine's text
    length). :class:`InputError` names ``field`` otherwise."""
    if not isinstance(prompt, str):
        raise InputError(f"{field} must be a str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise InputError(f"{field} is empty; give at least one non-space character")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{field} is not valid Unicode text ({e.reason} at position {e.start})") from e
    n = tokenizer.count(prompt)
    if n > max_length:
        raise InputError(f"{field} is {n} tokens long; the text length is {max_length} tokens (shorten the prompt)")
    return prompt


def normalize_prompts(prompt: str | list[str] | tuple[str, ...], tokenizer: ByteTokenizer | HFTokenizer,
                      max_length: int) -> list[str]:
    """One prompt or a non-empty list/tuple of prompts -> list of prompts, each checked by :func:`validate_prompt`."""
    if isinstance(prompt, str):
        return [validate_prompt(prompt, tokenizer, max_length)]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise InputError(f"prompt must be a str or a non-empty list of str, got {prompt!r:.60}")
    return [validate_prompt(p, tokenizer, max_length, field=f"prompt[{i}]") for i, p in enumerate(prompt)]
