"""Long-running use of the reference pipeline: process memory stays flat over many requests, the reference cache is
bounded by ``cache_size``, and it never returns an encoding made for other images, level weights or text-branch
setting."""

from __future__ import annotations

import gc

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from dynaip_trt.pipeline import DynaIPPipeline, TorchStages

WARMUP_CALLS = 5
MEASURED_CALLS = 25
RSS_MARGIN_MB = 30.0


def new_pipeline(models, cache_size: int = 32) -> DynaIPPipeline:
    return DynaIPPipeline(models.config, TorchStages(models), models.clip_tokenizer, models.t5_tokenizer,
                          cache_size=cache_size)


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def test_rss_stays_flat_over_many_generate_calls(tiny_models, make_images):
    """30 full generate calls (4 steps + VAE decode) with different seeds and the same two references: after 5
    warm-up calls, resident memory may grow by less than 30 MB over the remaining 25 (a per-call leak of the
    latents, the decoded image or a cache entry per seed would exceed it), and the cache holds one encoding."""
    pipe = new_pipeline(tiny_models)
    refs = make_images(2)
    for seed in range(WARMUP_CALLS):
        pipe("a photo", refs, seed=seed, progress=False)
    before = rss_mb()
    for seed in range(WARMUP_CALLS, WARMUP_CALLS + MEASURED_CALLS):
        images = pipe("a photo", refs, seed=seed, progress=False)
        assert len(images) == 1 and images[0].size == (64, 64)
    growth = rss_mb() - before
    assert growth < RSS_MARGIN_MB, f"RSS grew by {growth:.1f} MB over {MEASURED_CALLS} calls"
    assert len(pipe._cache) == 1


@pytest.fixture()
def counting(tiny_models, monkeypatch):
    """A pipeline factory whose CLIP stage counts its calls (each call = one reference encoding that missed the
    cache)."""
    calls = []

    def make(cache_size: int) -> DynaIPPipeline:
        pipe = new_pipeline(tiny_models, cache_size)
        run = pipe.stages.clip_levels
        monkeypatch.setattr(pipe.stages, "clip_levels", lambda pixels: calls.append(1) or run(pixels))
        return pipe

    return make, calls


def test_cache_is_bounded_lru(counting, make_images):
    make, calls = counting
    pipe = make(cache_size=2)
    a, b, c = ([im] for im in make_images(3))
    for refs in (a, b, c):
        pipe.encode_references(refs)
    assert len(calls) == 3 and len(pipe._cache) == 2
    pipe.encode_references(c)  # most recent: hit
    pipe.encode_references(b)  # hit, becomes most recent
    assert len(calls) == 3
    pipe.encode_references(a)  # evicted first (least recently used): recomputed, evicts c
    assert len(calls) == 4 and len(pipe._cache) == 2
    pipe.encode_references(c)
    assert len(calls) == 5
    pipe.cache_size = 1  # lowering the bound trims the cache at the next insert
    pipe.encode_references([make_images(1, seed=9)[0]])
    assert len(pipe._cache) == 1


def test_cache_size_zero_disables_the_cache(counting, make_images):
    make, calls = counting
    pipe = make(cache_size=0)
    refs = make_images(1)
    first, second = pipe.encode_references(refs), pipe.encode_references(refs)
    assert len(calls) == 2 and len(pipe._cache) == 0
    assert torch.equal(first.img_k, second.img_k)


def test_cache_is_keyed_by_granularity(tiny_models, make_images):
    """The same images with different level weights must not share a cache entry; equal weights written in either
    accepted form do share one."""
    pipe = new_pipeline(tiny_models)
    refs = make_images(2)
    routed = pipe.encode_references(refs)
    low = pipe.encode_references(refs, granularity=[1.0, 0.0, 0.0])
    high = pipe.encode_references(refs, granularity=[0.0, 0.0, 1.0])
    assert not torch.allclose(low.img_k, high.img_k, atol=1e-4)
    assert not torch.allclose(routed.img_k, low.img_k, atol=1e-4)
    assert pipe.encode_references(refs, granularity=[[1.0, 0.0, 0.0]] * 2) is low
    assert pipe.encode_references(refs) is routed
    fresh = new_pipeline(tiny_models)  # nothing cached: the cached results equal a fresh computation
    for gran, cached in ((None, routed), ([1.0, 0.0, 0.0], low), ([0.0, 0.0, 1.0], high)):
        assert torch.equal(fresh.encode_references(refs, granularity=gran).img_k, cached.img_k)
    per_subject = pipe.encode_references(refs, granularity=[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert torch.equal(per_subject.img_k[:, :, 0], low.img_k[:, :, 0])
    assert torch.equal(per_subject.img_k[:, :, 1], high.img_k[:, :, 1])
    out_low = pipe("a photo", refs, granularity=[1.0, 0.0, 0.0], steps=1, output_type="latent", progress=False)
    out_high = pipe("a photo", refs, granularity=[0.0, 0.0, 1.0], steps=1, output_type="latent", progress=False)
    assert not torch.allclose(out_low, out_high, atol=1e-5)


def test_cache_is_keyed_by_content_subjects_and_text_branch(tiny_models, make_images):
    pipe = new_pipeline(tiny_models)
    a, b = make_images(2)
    ab = pipe.encode_references([a, b])
    ba = pipe.encode_references([b, a])
    assert torch.equal(ab.img_k[:, :, 0], ba.img_k[:, :, 1]) and not torch.equal(ab.img_k, ba.img_k)
    views = pipe.encode_references([[a, b]])  # one subject with two views is not two subjects
    assert views.num_subjects == 1
    corner = a.copy()
    corner.putpixel((0, 0), tuple(255 - v for v in a.getpixel((0, 0))))  # cropped away by CLIP preprocessing
    assert pipe.encode_references([corner, b]) is not ab  # different content, different entry
    centre = a.copy()
    centre.paste((255, 0, 0), (16, 12, 32, 28))
    assert not torch.allclose(pipe.encode_references([centre, b]).img_k, ab.img_k, atol=1e-6)
    same_pixels = Image.fromarray(np.asarray(a).copy())  # another object, same content: a hit
    assert pipe.encode_references([same_pixels, b]) is ab
    with_text = pipe.encode_references([a, b], text_branch=True)
    assert with_text.txt_k is not None and ab.txt_k is None
    assert torch.equal(with_text.img_k, ab.img_k)
