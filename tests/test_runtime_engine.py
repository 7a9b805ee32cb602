"""Runtime engine on the torch backend (CPU) and backend-independent runtime pieces: the engine matches the reference
pipeline, serialises threads, never changes the caller's models, and checks TensorRT manifests, profiles and
memory."""

from __future__ import annotations

import logging
import sys
import threading
import time

import numpy as np
import pytest
import torch

from dynaip_trt.errors import BackendUnavailableError, ConfigError, InputError, ManifestError, ResourceError
from dynaip_trt.manifest import check_profile, check_tensorrt_section, max_subjects_of
from dynaip_trt.metrics import max_abs
from dynaip_trt.pipeline import DynaIPPipeline
from runtime import DynaIPEngine
from runtime.cuda_graphs import GraphCache, capture_graph, ensure_free_memory
from runtime.exported import select_files

TRT_SECTION = {"version": "10.8.0.43", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]}


@pytest.fixture(scope="module")
def torch_engine(tiny_models):
    return DynaIPEngine.from_models(tiny_models)


def test_torch_engine_equals_reference_pipeline(torch_engine, tiny_models, make_images):
    refs = make_images(2)
    ref = DynaIPPipeline(tiny_models)("a dog", refs, seed=5, output_type="latent", progress=False)
    out = torch_engine.generate("a dog", refs, seed=5, output_type="latent")
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert max_abs(out, ref) == 0.0, "the torch backend runs the same flat modules as the reference pipeline"
    assert torch_engine.backend == "torch" and torch_engine.stages.graphs is None  # no CUDA graphs on the CPU


def test_engine_never_changes_the_callers_models(tiny_models, make_images):
    before = {k: v.clone() for k, v in tiny_models.transformer.state_dict().items()}
    modules = dict(tiny_models.transformer.named_modules())
    engine = DynaIPEngine.from_models(tiny_models, fp8=True)
    engine.generate("a dog", make_images(1), seed=1, steps=1, output_type="latent")
    assert dict(tiny_models.transformer.named_modules()).keys() == modules.keys()
    assert all(type(m) is type(modules[n]) for n, m in tiny_models.transformer.named_modules())
    after = tiny_models.transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "fp8=True must work on a copy"
    assert any("FP8Linear" in type(m).__name__ for m in engine.stages.transformer.modules())


def test_encoded_references_are_reused_across_prompts(torch_engine, make_images):
    refs = make_images(2, seed=4)
    kv = torch_engine.encode_references(refs, granularity=[0.2, 0.3, 0.5])
    for prompt in ("a cat", "two cats"):
        direct = torch_engine.generate(prompt, refs, granularity=[0.2, 0.3, 0.5], seed=1, output_type="latent")
        reused = torch_engine.generate(prompt, kv, seed=1, output_type="latent")
        assert max_abs(direct, reused) == 0.0
    with pytest.raises(InputError, match="granularity"):
        torch_engine.generate("a cat", kv, granularity=[1, 0, 0])
    hits = torch_engine.cache_stats()["references"]["hits"]
    assert max_abs(torch_engine.encode_references(refs, granularity=[0.2, 0.3, 0.5]).img_k, kv.img_k) == 0.0
    assert torch_engine.cache_stats()["references"]["hits"] == hits + 2, "each subject is cached by image content"
    torch_engine.clear_caches()
    again = torch_engine.encode_references(refs, granularity=[0.2, 0.3, 0.5])
    assert torch_engine.cache_stats()["references"]["entries"] == 2 and max_abs(again.img_k, kv.img_k) == 0.0


def test_subject_limit_and_config_default(tiny_models, make_images):
    from runtime.torch_backend import TorchStages

    stages = TorchStages(tiny_models)
    stages.max_subjects = 2
    engine = DynaIPEngine(tiny_models.config, stages, (tiny_models.clip_tokenizer, tiny_models.t5_tokenizer))
    with pytest.raises(InputError, match="allows 1..2 subjects"):
        engine.generate("x", make_images(3))
    assert DynaIPEngine.from_models(tiny_models).max_subjects == tiny_models.config.max_subjects == 4


def test_threads_share_one_engine_serialised(tiny_models, make_images):
    """Concurrent callers get exactly the sequential results, and no two DiT steps ever overlap."""
    engine = DynaIPEngine.from_models(tiny_models)
    requests = [(f"prompt {i}", make_images(1 + i % 2, seed=i), i) for i in range(4)]
    expected = [engine.generate(p, r, seed=s, output_type="latent") for p, r, s in requests]

    active, peak, guard = 0, 0, threading.Lock()
    dit = engine.stages.dit

    def counting_dit(*args, **kwargs):  # stands in for the DiT module: called once per step
        nonlocal active, peak
        with guard:
            active += 1
            peak = max(peak, active)
        time.sleep(0.002)  # widen the window in which an unserialised call would overlap
        try:
            return dit(*args, **kwargs)
        finally:
            with guard:
                active -= 1

    engine.stages.dit = counting_dit
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            p, r, s = requests[i]
            results[i] = engine.generate(p, r, seed=s, output_type="latent")
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert peak == 1, f"{peak} DiT steps ran at the same time: the engine lock does not serialise calls"
    for i, exp in enumerate(expected):
        assert max_abs(results[i], exp) == 0.0, f"request {i} differs from its sequential result"




def test_from_dir_errors(tmp_path):
    with pytest.raises(ConfigError, match="from_config"):
        DynaIPEngine.from_dir(tmp_path, backend="torch")
    with pytest.raises(ConfigError, match="unknown backend"):
        DynaIPEngine.from_dir(tmp_path, backend="openvino")
    with pytest.raises(ManifestError, match="not a build folder: it has no manifest.json"):
        DynaIPEngine.from_dir(tmp_path, backend="onnxruntime")
    with pytest.raises(ManifestError, match="the build folder does not exist"):
        DynaIPEngine.from_dir(tmp_path / "nope", backend="onnxruntime")


def test_tensorrt_backend_without_tensorrt_says_what_to_install(tiny_build, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, installed or not
    with pytest.raises(BackendUnavailableError, match=r"pip install -e \.\[tensorrt-cu12\].*NVIDIA GPU"):
        DynaIPEngine.from_dir(tiny_build, backend="tensorrt")


def test_tensorrt_manifest_section_is_checked_against_the_system(caplog):
    check_tensorrt_section(TRT_SECTION, "10.8.0.43", "NVIDIA H100 80GB HBM3", (9, 0), "d")
    with pytest.raises(ManifestError, match="no TensorRT engines"):
        check_tensorrt_section(None, "10.8.0.43", "NVIDIA H100 80GB HBM3", (9, 0), "d")
    with pytest.raises(ManifestError, match="lacks \\['compute_capability'\\]"):
        check_tensorrt_section({"version": "10.8.0.43", "gpu": "x"}, "10.8.0.43", "x", (9, 0), "d")
    with pytest.raises(ManifestError, match="built with TensorRT 10.8.0.43 but TensorRT 10.9.0.34 is installed"):
        check_tensorrt_section(TRT_SECTION, "10.9.0.34", "NVIDIA H100 80GB HBM3", (9, 0), "d")
    with pytest.raises(ManifestError, match="compute capability 9.0.*compute capability 8.9"):
        check_tensorrt_section(TRT_SECTION, "10.8.0.43", "NVIDIA L40S", (8, 9), "d")
    with caplog.at_level(logging.WARNING, logger="dynaip_trt.manifest"):
        check_tensorrt_section(TRT_SECTION, "10.8.0.43", "NVIDIA H100 NVL", (9, 0), "d")
    assert "built on a NVIDIA H100 80GB HBM3 and run on a NVIDIA H100 NVL" in caplog.text


def test_version_compatible_engines_run_on_later_releases_of_the_same_major():
    compatible = {**TRT_SECTION, "version_compatible": True}
    for later in ("10.8.0.43", "10.9.0.34", "10.16.1.11"):
        check_tensorrt_section(compatible, later, "NVIDIA H100 80GB HBM3", (9, 0), "d")
    for other in ("10.7.0", "11.0.0.114"):
        with pytest.raises(ManifestError, match=f"built with TensorRT 10.8.0.43 but TensorRT {other} is installed"):
            check_tensorrt_section(compatible, other, "NVIDIA H100 80GB HBM3", (9, 0), "d")


def test_engine_profile_bounds_are_checked():
    profile = {"latents": {"min": [1, 16, 64], "opt": [1, 16, 64], "max": [2, 64, 64]}}
    check_profile("dit", profile, {"latents": (2, 64, 64), "not_profiled": (9,)})
    with pytest.raises(InputError, match=r"dit: input latents of shape \[3, 16, 64\] is outside.*max \[2, 64, 64\]"):
        check_profile("dit", profile, {"latents": (3, 16, 64)})
    with pytest.raises(InputError, match="outside"):
        check_profile("dit", profile, {"latents": (1, 16)})


def test_manifest_limits_and_precision_variants(tiny_build):
    from dynaip_trt.manifest import Manifest

    m = Manifest.load(tiny_build)
    assert max_subjects_of(m) == m.max_subjects == 4
    m.models["dit"].profile["scales"]["max"][1] = 3  # a DiT profile narrower than the manifest's limit wins
    assert max_subjects_of(m) == 3
    fp16 = select_files(m, "fp16")
    assert fp16["dit"] == m.models["dit"].variants["fp16"] and fp16["text"] == m.models["text"].onnx
    assert select_files(m, "fp32") == {n: e.onnx for n, e in m.models.items()}
    with pytest.raises(ConfigError, match="no bf16 graphs"):
        select_files(m, "bf16")
    m.models["dit"].variants.update({"fp8-bf16": "dit.fp8-bf16.onnx", "fp8-fp16": "dit.fp8-fp16.onnx"})
    assert select_files(m, "fp8")["dit"] == "dit.fp8-fp16.onnx", "fp8 on ONNX Runtime: the fp16-base graph"
    assert select_files(m, "fp8-bf16")["dit"] == "dit.fp8-bf16.onnx"


def test_resource_error_names_the_memory_needed(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: gib // 2)
    ensure_free_memory(torch.device("cuda", 0), gib + gib // 4, "the DiT buffers")  # 1.5 GiB usable
    with pytest.raises(ResourceError, match=r"the DiT buffers needs about 2\.00 GiB.*only 1\.50 GiB of 80\.00 GiB"):
        ensure_free_memory(torch.device("cuda", 0), 2 * gib, "the DiT buffers")
    ensure_free_memory(torch.device("cpu"), 10**15, "anything")  # host memory is not checked


def test_torch_cuda_graph_cache_is_lru():
    cache = GraphCache(max_graphs=2)
    for key in ("a", "b"):
        cache.put(key, key)  # type: ignore[arg-type]  # the cache only stores what it is given
    assert cache.get("a") == "a"  # "a" becomes the most recent
    cache.put("c", "c")  # type: ignore[arg-type]
    assert cache.get("b") is None and cache.get("a") == "a" and cache.get("c") == "c" and len(cache) == 2


# ------------------------------------------------------------------------------------------------------ GPU
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("subjects", [1, 2])
def test_torch_cuda_graph_replay_equals_eager(make_images, subjects):
    from dynaip_trt.request import TextBranchSchedule

    graphed = DynaIPEngine.from_config("tiny-random", device="cuda")
    eager = DynaIPEngine.from_config("tiny-random", device="cuda", cuda_graphs=False)
    refs = make_images(subjects)
    for seed in (0, 1):  # the second request replays the graph captured by the first
        a = graphed.generate("a photo", refs, seed=seed, output_type="latent")
        b = eager.generate("a photo", refs, seed=seed, output_type="latent")
        assert max_abs(a, b) < 1e-5, "graph replay must reproduce the eager DiT step"
    assert len(graphed.stages.graphs) == 1
    graphed.generate("a photo", refs, seed=0, height=64, width=48)  # a new resolution is a new bucket
    assert len(graphed.stages.graphs) == 2
    dds = TextBranchSchedule(steps=2)  # text-branch steps run eagerly, the rest from the graph
    a = graphed.generate("a photo", refs, seed=2, text_branch=dds, output_type="latent")
    b = eager.generate("a photo", refs, seed=2, text_branch=dds, output_type="latent")
    assert max_abs(a, b) < 1e-5


@pytest.mark.gpu
@requires_cuda
def test_captured_graph_writes_its_output_buffer():
    x = torch.randn(64, 32, device="cuda")
    w = torch.randn(32, 16, device="cuda")
    graph = capture_graph({"x": x}, lambda: torch.relu(x @ w))
    out, ptr = graph.output, graph.output.data_ptr()
    assert max_abs(out, torch.relu(x @ w)) < 1e-5
    new = torch.randn(64, 32, device="cuda")
    before = out.clone()
    graph.inputs["x"].copy_(new)
    graph.graph.replay()
    result = graph.output
    torch.cuda.synchronize()
    assert result.data_ptr() == ptr and not torch.equal(result, before), "replay must rewrite the output buffer"
    assert max_abs(result, torch.relu(new @ w)) < 1e-5

    stale = torch.zeros(4, device="cuda")
    with pytest.raises(BackendUnavailableError, match="did not write its output"):
        capture_graph({}, lambda: stale)  # an empty graph: its output is never written
