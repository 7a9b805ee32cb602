"""ByteLRU: bounded in bytes, least recently used evicted first, thread-safe; checked against a plain model."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dynaip_trt.conditioning import ReferenceKV
from dynaip_trt.errors import ConfigError
from runtime.cache import ByteLRU, nbytes_of

KEYS = st.integers(0, 7)
SIZES = st.integers(0, 80)  # some larger than the 64-byte limit


class ByteLRUMachine(RuleBasedStateMachine):
    """Random get/put/clear sequences on a ByteLRU and on a reference model (an OrderedDict of sizes)."""

    def __init__(self):
        super().__init__()
        self.limit = 64
        self.cache = ByteLRU(self.limit, sizeof=len)
        self.model: OrderedDict[int, bytes] = OrderedDict()
        self.hits = self.misses = 0

    @rule(key=KEYS, size=SIZES, fill=st.integers(0, 255))
    def put(self, key, size, fill):
        value = bytes([fill]) * size
        stored = self.cache.put(key, value)
        self.model.pop(key, None)
        assert stored == (size <= self.limit)
        if stored:
            while sum(map(len, self.model.values())) + size > self.limit:
                self.model.popitem(last=False)  # least recently used first
            self.model[key] = value

    @rule(key=KEYS)
    def get(self, key):
        got = self.cache.get(key)
        if key in self.model:
            self.model.move_to_end(key)
            self.hits += 1
            assert got == self.model[key]
        else:
            self.misses += 1
            assert got is None

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def clear(self):
        self.cache.clear()
        self.model.clear()

    @invariant()
    def same_as_model(self):
        stats = self.cache.stats()
        assert stats["bytes"] == sum(map(len, self.model.values())) <= self.limit
        assert stats["entries"] == len(self.model) == len(self.cache)
        assert (stats["hits"], stats["misses"]) == (self.hits, self.misses)
        assert all(k in self.cache for k in self.model)


TestByteLRUModel = ByteLRUMachine.TestCase
TestByteLRUModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_evicts_least_recently_used_and_counts():
    cache = ByteLRU(300, name="references")
    a, b, c = (np.zeros(25, np.float32) for _ in range(3))  # 100 bytes each
    for key, value in zip("abc", (a, b, c)):
        assert cache.put(key, value)
    assert cache.get("a") is a  # a is now the most recent: b is the oldest
    assert cache.put("d", np.zeros(50, np.float32))  # 200 bytes: evicts b and c
    assert "a" in cache and "b" not in cache and "c" not in cache and "d" in cache
    assert cache.get("b") is None
    assert cache.stats() == {"hits": 1, "misses": 1, "evictions": 2, "bytes": 300, "entries": 2, "max_bytes": 300}


def test_value_larger_than_the_limit_is_not_cached_and_evicts_nothing():
    cache = ByteLRU(100)
    cache.put("small", np.zeros(10, np.float32))
    assert not cache.put("big", np.zeros(26, np.float32))  # 104 bytes > 100
    assert "big" not in cache and "small" in cache and cache.stats()["bytes"] == 40


def test_replacing_a_key_updates_its_size():
    cache = ByteLRU(100)
    cache.put("k", np.zeros(20, np.float32))
    cache.put("k", np.zeros(5, np.float32))
    assert cache.stats()["bytes"] == 20 and len(cache) == 1


def test_zero_bytes_disables_the_cache():
    cache = ByteLRU(0)
    assert not cache.put("k", np.zeros(1, np.float32))
    assert cache.get("k") is None and cache.stats()["misses"] == 1


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_limit_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="cache size .* must be an int >= 0"):
        ByteLRU(bad, name="prompts")


def test_nbytes_of_arrays_dataclasses_and_containers():
    k = np.zeros((2, 1, 3, 4, 8), np.float32)
    kv = ReferenceKV(k, k.copy())  # has an nbytes() method
    assert nbytes_of(kv) == 2 * k.nbytes
    assert nbytes_of((k, None, {"x": k[0]}, [b"abc"])) == k.nbytes + k[0].nbytes + 3
    with pytest.raises(TypeError, match="cannot size a object"):
        nbytes_of(object())


def test_threads_never_exceed_the_limit():
    cache = ByteLRU(1000, sizeof=len)
    over, gets = [], []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        n_get = 0
        for _ in range(2000):
            key = int(rng.integers(0, 50))
            if rng.random() < 0.5:
                cache.put(key, b"x" * int(rng.integers(1, 200)))
            else:
                cache.get(key)
                n_get += 1
            stats = cache.stats()
            if stats["bytes"] > 1000:
                over.append(stats)
        gets.append(n_get)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = cache.stats()
    assert not over
    assert stats["hits"] + stats["misses"] == sum(gets)
    assert 0 < stats["bytes"] <= 1000
    assert stats["bytes"] == sum(len(cache.get(k) or b"") for k in range(50) if k in cache)
