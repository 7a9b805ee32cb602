"""A thread-safe least-recently-used cache bounded in bytes (reference K/V and prompt embeddings of the engine).

    cache = ByteLRU(max_bytes=256 << 20, name="references")
    kv = cache.get(key)
    if kv is None:
        kv = encode(...)
        cache.put(key, kv)
    cache.stats()  # {"hits": ..., "misses": ..., "bytes": ..., "entries": ..., "max_bytes": ..., "evictions": ...}

The size of a value is :func:`nbytes_of`: numpy arrays (and torch tensors) by their ``nbytes``, objects with an
``nbytes()`` method by its result, dataclasses, tuples, lists and dicts by the sum of their parts. Standard library
only, so the lean runtime can use it.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, TypeVar

from dynaip_trt.errors import ConfigError

V = TypeVar("V")


def nbytes_of(value: Any) -> int:
    """Bytes held by ``value``: an ``nbytes`` attribute (numpy, torch) or method (``ReferenceKV.nbytes()``), else the
    sum over a dataclass's fields or a tuple/list/dict's items; ``None``, numbers and strings count 0 (their arrays
    are what matters)."""
    n = getattr(value, "nbytes", None)
    if n is not None:
        return int(n() if callable(n) else n)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes_of(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, (tuple, list)):
        return sum(nbytes_of(v) for v in value)
    if isinstance(value, dict):
        return sum(nbytes_of(v) for v in value.values())
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if value is None or isinstance(value, (bool, int, float, complex, str)):
        return 0
    raise TypeError(f"cannot size a {type(value).__name__} for the cache: give it an nbytes() method")


class ByteLRU(Generic[V]):
    """Least-recently-used cache that never holds more than ``max_bytes``.

    ``put`` evicts the least recently used entries until the new one fits; a value larger than ``max_bytes`` is not
    cached (and evicts nothing). ``max_bytes=0`` disables caching. ``get`` counts a hit or a miss. Every method
    takes one lock, so a cache can be shared by threads.

    Args:
        max_bytes: the byte budget (an int >= 0).
        name: shown in messages and :meth:`stats`.
        sizeof: bytes of a value (default :func:`nbytes_of`).
    """

    def __init__(self, max_bytes: int, name: str = "cache", sizeof: Callable[[Any], int] = nbytes_of):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ConfigError(f"{name} cache size {max_bytes!r} must be an int >= 0 (bytes)")
        self.max_bytes = max_bytes
        self.name = name
        self._sizeof = sizeof
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        """The value stored under ``key`` (now the most recently used), or ``None``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry[0]

    def put(self, key: Hashable, value: V) -> bool:
        """Store ``value`` under ``key`` (replacing an older value); returns whether it was cached (``False`` when it
        alone exceeds ``max_bytes``)."""
        size = self._sizeof(value)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                return False
            while self._bytes + size > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
                self._evictions += 1
            self._entries[key] = (value, size)
            self._bytes += size
            return True

    def clear(self) -> None:
        """Forget every entry (the counters stay)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is cached (counts neither a hit nor a miss, and does not refresh it)."""
        with self._lock:
            return key in self._entries

    def stats(self) -> dict[str, int]:
        """``{"hits", "misses", "evictions", "bytes", "entries", "max_bytes"}`` at this moment."""
        with self._lock:
            return {"hits": self._hits, "misses": self._misses, "evictions": self._evictions, "bytes": self._bytes,
                    "entries": len(self._entries), "max_bytes": self.max_bytes}
