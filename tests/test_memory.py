"""Long-running use of an engine: process memory stays flat over many requests, the reference and prompt caches are
bounded in bytes, and a cache never returns an encoding made for other images, level weights or branches."""

from __future__ import annotations

import gc

import numpy as np
import psutil
from PIL import Image

from dynaip_trt.metrics import max_abs
from runtime import DynaIPEngine

WARMUP_CALLS = 5
MEASURED_CALLS = 25
RSS_MARGIN_MB = 30.0


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def misses(engine: DynaIPEngine) -> int:
    return engine.cache_stats()["references"]["misses"]


def test_rss_stays_flat_over_many_generate_calls(tiny_models, make_images):
    """30 full generate calls (4 steps + VAE decode) with different seeds and the same two references: after 5
    warm-up calls, resident memory may grow by less than 30 MB over the remaining 25 (a per-call leak of the
    latents, the decoded image or a cache entry per seed would exceed it), and the caches hold one entry per
    subject and prompt."""
    engine = DynaIPEngine.from_models(tiny_models)
    refs = make_images(2)
    for seed in range(WARMUP_CALLS):
        engine.generate("a photo", refs, seed=seed)
    before = rss_mb()
    for seed in range(WARMUP_CALLS, WARMUP_CALLS + MEASURED_CALLS):
        images = engine.generate("a photo", refs, seed=seed)
        assert len(images) == 1 and images[0].size == (64, 64)
    growth = rss_mb() - before
    assert growth < RSS_MARGIN_MB, f"RSS grew by {growth:.1f} MB over {MEASURED_CALLS} calls"
    stats = engine.cache_stats()
    assert stats["references"]["entries"] == 2 and stats["prompts"]["entries"] == 1
    assert stats["references"]["misses"] == 2 and stats["prompts"]["misses"] == 1


def test_cache_budget_in_bytes_evicts_least_recent(tiny_models, make_images):
    one = DynaIPEngine.from_models(tiny_models).encode_references(make_images(1)).nbytes()
    engine = DynaIPEngine.from_models(tiny_models, cache_bytes=2 * one)  # room for two subjects
    a, b, c = make_images(3, seed=5)
    engine.encode_references([a, b])
    engine.encode_references([c])  # evicts a, the least recently used
    assert engine.cache_stats()["references"]["bytes"] <= 2 * one and misses(engine) == 3
    engine.encode_references([b])
    assert misses(engine) == 3, "b stayed cached"
    engine.encode_references([a])
    assert misses(engine) == 4, "a was evicted"
    off = DynaIPEngine.from_models(tiny_models, cache_bytes=0)
    first, second = off.encode_references([a]), off.encode_references([a])
    assert misses(off) == 2 and off.cache_stats()["references"]["entries"] == 0
    assert max_abs(first.img_k, second.img_k) == 0.0


def test_cache_is_keyed_by_granularity(tiny_models, make_images):
    """The same images with different level weights must not share a cache entry; equal weights written in any
    accepted form (one row for all subjects, per subject, scaled) do share one."""
    engine = DynaIPEngine.from_models(tiny_models)
    refs = make_images(2)
    routed = engine.encode_references(refs)
    low = engine.encode_references(refs, granularity=[1.0, 0.0, 0.0])
    high = engine.encode_references(refs, granularity=[0.0, 0.0, 1.0])
    assert misses(engine) == 6
    assert max_abs(low.img_k, high.img_k) > 1e-4 and max_abs(routed.img_k, low.img_k) > 1e-4
    again = engine.encode_references(refs, granularity=[[2.0, 0.0, 0.0]] * 2)
    assert misses(engine) == 6 and max_abs(again.img_k, low.img_k) == 0.0
    fresh = DynaIPEngine.from_models(tiny_models)  # nothing cached: the cached results equal a fresh computation
    for gran, cached in ((None, routed), ([1.0, 0.0, 0.0], low), ([0.0, 0.0, 1.0], high)):
        assert max_abs(fresh.encode_references(refs, granularity=gran).img_k, cached.img_k) == 0.0
    per_subject = engine.encode_references(refs, granularity=[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert max_abs(per_subject.img_k[:, :, 0], low.img_k[:, :, 0]) == 0.0
    assert max_abs(per_subject.img_k[:, :, 1], high.img_k[:, :, 1]) == 0.0


def test_cache_is_keyed_by_content_subjects_and_text_branch(tiny_models, make_images):
    engine = DynaIPEngine.from_models(tiny_models)
    a, b = make_images(2)
    ab = engine.encode_references([a, b])
    ba = engine.encode_references([b, a])
    assert np.array_equal(ab.img_k[:, :, 0], ba.img_k[:, :, 1]) and not np.array_equal(ab.img_k, ba.img_k)
    assert misses(engine) == 2, "subjects are cached one by one"
    views = engine.encode_references([[a, b]])  # one subject with two views is not two subjects
    assert views.num_subjects == 1 and misses(engine) == 3
    corner = a.copy()
    corner.putpixel((0, 0), tuple(255 - v for v in a.getpixel((0, 0))))  # cropped away by CLIP preprocessing
    engine.encode_references([corner])
    assert misses(engine) == 4, "different content, different entry"
    same_pixels = Image.fromarray(np.asarray(a).copy())  # another object, same content: a hit
    engine.encode_references([same_pixels, b])
    assert misses(engine) == 4
    with_text = engine.encode_references([a, b], text_branch=True)
    assert with_text.txt_k is not None and ab.txt_k is None and misses(engine) == 6
    assert np.array_equal(with_text.img_k, ab.img_k)
