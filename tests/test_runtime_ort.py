"""ONNX Runtime backend: whole-request parity with the PyTorch reference on the CPU, manifest checks before any
session is created, subject limits from the manifest, precision variants."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime
import pytest

from dynaip_trt.errors import ConfigError, InputError, ManifestError, SubjectLimitError
from dynaip_trt.metrics import max_abs, psnr, rel_l2
from dynaip_trt.pipeline import DynaIPPipeline
from dynaip_trt.request import TextBranchSchedule
from runtime import DynaIPEngine

# Whole generate (4 steps, every stage), final packed latents, ONNX Runtime CPU fp32 vs PyTorch fp32.
FP32_REL_L2 = 1e-4
# The same with the fp16 DiT graph (measured ~4e-4 on the tiny family; a gate that still catches a wrong graph).
FP16_REL_L2 = 5e-3


@pytest.fixture(scope="module")
def ort_engine(tiny_build):
    return DynaIPEngine.from_dir(tiny_build, backend="onnxruntime", device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_models):
    return DynaIPPipeline(tiny_models)


def copy_build(src, dst, **manifest_changes):
    shutil.copytree(src, dst)
    if manifest_changes:
        path = dst / "manifest.json"
        d = json.loads(path.read_text())
        d.update(manifest_changes)
        path.write_text(json.dumps(d))
    return dst


@pytest.mark.parametrize("case", ["plain", "masks_granularity_batch"])
def test_generate_matches_torch_reference(ort_engine, reference, make_images, case):
    refs = make_images(2, seed=7)
    kw = dict(seed=11, scales=[0.8, 1.3])
    prompts = "a red bag on a table"
    if case == "masks_granularity_batch":
        left = np.zeros((4, 4))
        left[:, :2] = 1.0
        kw.update(masks=[left, 1.0 - left], granularity=[[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
        prompts = ["a red bag on a table", "two bags"]
    out = ort_engine.generate(prompts, refs, output_type="latent", **kw)
    exp = reference(prompts, refs, output_type="latent", progress=False, **kw)
    assert out.shape == exp.shape
    assert rel_l2(out, exp) < FP32_REL_L2, f"rel L2 {rel_l2(out, exp):.2e}, max abs {max_abs(out, exp):.2e}"
    images = ort_engine.generate(prompts, refs, **kw)
    ref_images = reference(prompts, refs, progress=False, **kw)
    for a, b in zip(images, ref_images):
        assert psnr(np.asarray(a), np.asarray(b)) > 40.0


def test_router_and_override_paths_differ(ort_engine, make_images):
    """level_override really switches the fusion graph between the router's and the user's weights."""
    refs = make_images(1, seed=3)
    routed = ort_engine.encode_references(refs)
    override = ort_engine.encode_references(refs, granularity=[1.0, 0.0, 0.0])
    assert rel_l2(override.img_k, routed.img_k) > 1e-3


def test_subject_limit_comes_from_the_manifest(tiny_build, tmp_path, make_images):
    build = copy_build(tiny_build, tmp_path / "b", max_subjects=2)
    engine = DynaIPEngine.from_dir(build, backend="onnxruntime", device="cpu")
    assert engine.max_subjects == 2
    engine.generate("x", make_images(2), steps=1, output_type="latent")
    with pytest.raises(SubjectLimitError, match="3 subjects given; this engine allows 1..2"):
        engine.generate("x", make_images(3), steps=1)


def test_tampered_file_fails_before_any_session(tiny_build, tmp_path, monkeypatch):
    build = copy_build(tiny_build, tmp_path / "b")
    with open(build / "vae.onnx", "ab") as f:
        f.write(b"\0")

    def no_session(*args, **kwargs):
        raise AssertionError("a session was created before the manifest hashes were verified")

    monkeypatch.setattr(onnxruntime, "InferenceSession", no_session)
    with pytest.raises(ManifestError, match="vae: file vae.onnx does not match its manifest hash"):
        DynaIPEngine.from_dir(build, backend="onnxruntime")


def test_missing_model_is_named(tiny_build, tmp_path):
    build = copy_build(tiny_build, tmp_path / "b")
    d = json.loads((build / "manifest.json").read_text())
    del d["models"]["vae"]
    (build / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=r"lacks models \['vae'\]"):
        DynaIPEngine.from_dir(build, backend="onnxruntime")


def test_fp16_variant_is_selectable(tiny_build, reference, make_images):
    engine = DynaIPEngine.from_dir(tiny_build, backend="onnxruntime", precision="fp16", device="cpu")
    assert engine.stages.files == {"clip": "clip.fp16.onnx", "fusion": "fusion.fp16.onnx", "text": "text.onnx",
                                   "dit": "dit.fp16.onnx", "vae": "vae.fp16.onnx"}, "text stays fp32 (T5 overflows)"
    refs = make_images(2, seed=1)
    out = engine.generate("a photo", refs, seed=2, output_type="latent")
    exp = reference("a photo", refs, seed=2, output_type="latent", progress=False)
    assert 0.0 < rel_l2(out, exp) < FP16_REL_L2, f"rel L2 {rel_l2(out, exp):.2e}"
    assert engine.summary()["precision"] == "fp16"
    with pytest.raises(ConfigError, match="no bf16 graphs"):
        DynaIPEngine.from_dir(tiny_build, backend="onnxruntime", precision="bf16")


def test_backend_options_and_limits(tiny_build, ort_engine, make_images):
    with pytest.raises(ConfigError, match=r"providers \['NoSuchExecutionProvider'\] are not available"):
        DynaIPEngine.from_dir(tiny_build, backend="onnxruntime", providers=["NoSuchExecutionProvider"])
    with pytest.raises(InputError, match="text_branch schedules need the torch backend"):
        ort_engine.generate("x", make_images(1), text_branch=TextBranchSchedule(steps=1))
    with pytest.raises(InputError, match="need the torch backend"):
        ort_engine.encode_references(make_images(1), text_branch=True)
    assert not ort_engine.stages.supports_text_branch and ort_engine.backend == "onnxruntime"


def test_batch_rows_get_the_images_they_get_alone(ort_engine, make_images):
    """generate_batch: rows with their own prompts, references, scales, guidance and seeds give what each gives
    alone (the serving path batches requests this way)."""
    from dynaip_trt.request import GenerationRequest

    a, b = make_images(2, seed=21), make_images(2, seed=22)
    requests = [GenerationRequest("a red bag", a, scales=[0.5, 1.0], guidance=3.0, seed=1),
                GenerationRequest("two bags on a table", b, scales=1.2, guidance=4.5, seed=9)]
    batch = ort_engine.generate_batch(requests, output_type="latent")
    alone = np.concatenate([ort_engine.generate_batch([r], output_type="latent") for r in requests])
    assert batch.shape == alone.shape == (2, 16, 64)
    assert rel_l2(batch, alone) < 1e-5
    with pytest.raises(InputError, match="cannot share a batch"):
        ort_engine.generate_batch([requests[0], GenerationRequest("x", a, steps=2)])
    with pytest.raises(InputError, match="this build serves batches of 1..4"):
        ort_engine.generate_batch(requests * 3)


def test_caches_count_hits_and_never_exceed_their_budget(tiny_build, make_images):
    engine = DynaIPEngine.from_dir(tiny_build, backend="onnxruntime", device="cpu", cache_bytes=40_000)
    refs = make_images(2, seed=4)
    engine.generate("a photo", refs, steps=1, output_type="latent")
    engine.generate("a photo", refs, steps=1, output_type="latent")
    stats = engine.cache_stats()
    assert stats["references"]["hits"] == 2 and stats["references"]["misses"] == 2
    assert stats["prompts"]["hits"] == 1 and stats["prompts"]["misses"] == 1
    for s in stats.values():
        assert 0 < s["bytes"] <= 40_000
    engine.clear_caches()
    assert engine.cache_stats()["references"]["entries"] == 0
