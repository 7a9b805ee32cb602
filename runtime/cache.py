"""A thread-safe least-recently-used cache bounded in bytes (reference K/V and prompt embeddings of the engine)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, TypeVar

from dynaip_trt.errors import ConfigError

V = TypeVar("V")


def nbytes(value: Any) -> int:
    """Bytes held by ``value``: its ``nbytes()`` method or attribute (numpy arrays, :class:`ReferenceKV`), or the
    sum over a tuple/list of such values."""
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    n = getattr(value, "nbytes")
    return int(n() if callable(n) else n)


class ByteLRU(Generic[V]):
    """At most ``max_bytes`` of values (``size`` measures one); the least recently used go first. A value larger
    than the whole budget is not cached. ``stats()`` counts hits, misses, bytes and entries."""

    def __init__(self, max_bytes: int, size: Callable[[V], int] = nbytes):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ConfigError(f"cache size {max_bytes!r} must be an int >= 0 (bytes; 0 disables the cache)")
        self.max_bytes = max_bytes
        self._size = size
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self._misses += 1
                return None
            self._items.move_to_end(key)
            self._hits += 1
            return item[0]

    def put(self, key: Hashable, value: V) -> None:
        size = self._size(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                return
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self._hits, "misses": self._misses, "bytes": self._bytes, "entries": len(self._items)}
