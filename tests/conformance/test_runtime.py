"""``runtime.trt_backend`` and ``runtime.cuda`` against checked fakes of TensorRT's runtime and the simulated CUDA
runtime: I/O discovery, shapes, buffers, host dtype conversion, the device-resident denoising loop and its CUDA
graphs (capture recipe, LRU of buckets, empty-graph detection), resource release; and the real modules without a
GPU."""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import pytest

from conftest import dit_dbim_fn, dit_fn, fake_engine_build, install_synthetic_dbim, install_synthetic_dit
from cuda_sim import Device
from dynaip_trt.conditioning import DiTCondition, ReferenceKV
from dynaip_trt.errors import BackendUnavailableError, InputError, ManifestError, ResourceError
from dynaip_trt.manifest import Manifest
from trt_fakes import onnx_run


def condition(manifest: Manifest, batch: int, subjects: int, seed: int = 0) -> tuple[np.ndarray, DiTCondition]:
    """Noise ``[B, N, 64]`` and a DiT condition with the shapes of the tiny DiT's profile."""
    rng = np.random.default_rng(seed)
    p = {n: s["opt"] for n, s in manifest.models["dit"].profile.items()}
    n_tok, blocks, tokens, inner = p["latents"][1], p["img_k"][0], p["img_k"][3], p["img_k"][4]
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    kv = ReferenceKV(f(blocks, batch, subjects, tokens, inner), f(blocks, batch, subjects, tokens, inner))
    cond = DiTCondition(
        text_embeds=f(batch, *p["text_embeds"][1:]), pooled=f(batch, p["pooled"][1]),
        guidance=np.full(batch, 3.5, np.float32), img_ids=f(*p["img_ids"]), txt_ids=f(*p["txt_ids"]), kv=kv,
        scales=rng.uniform(0.5, 1, (batch, subjects)).astype(np.float32),
        masks=rng.uniform(0, 1, (batch, subjects, n_tok)).astype(np.float32),
        block_scales=np.linspace(0.5, 1, blocks, dtype=np.float32))
    return f(batch, n_tok, 64), cond


def euler_reference(noise: np.ndarray, cond: DiTCondition, sigmas: list[float]) -> np.ndarray:
    from dynaip_trt.conditioning import dit_feeds

    x = noise
    for t, tn in zip(sigmas[:-1], sigmas[1:]):
        b = x.shape[0]
        x = dit_fn(dit_feeds(x, np.full(b, t, np.float32), np.full(b, tn, np.float32), cond))["latents_next"]
    return x


SIGMAS = [1.0, 0.75, 0.5, 0.25, 0.0]


def test_every_model_runs_through_its_engine_like_onnx_runtime(trt_build, sim, trt_state):
    from runtime.trt_backend import TrtStages

    stages = TrtStages(trt_build, cuda_graphs=False)
    m = stages.manifest
    rng = np.random.default_rng(1)
    feeds = {"vae": {"latents": rng.standard_normal(m.models["vae"].profile["latents"]["opt"]).astype(np.float32)},
             "clip": {"pixel_values": rng.standard_normal(m.models["clip"].profile["pixel_values"]["opt"]).astype(
                 np.float32)},
             "text": {"clip_ids": rng.integers(0, 200, m.models["text"].profile["clip_ids"]["opt"]),
                      "t5_ids": rng.integers(0, 200, m.models["text"].profile["t5_ids"]["opt"])}}
    for model, feed in feeds.items():
        out = stages.run(model, feed)
        expected = onnx_run(str(trt_build / m.tensorrt["engines"][model]["onnx"]), {}, feed)
        assert set(out) == set(expected)
        for name, value in out.items():
            assert value.dtype == np.float32 and value.shape == expected[name].shape
            np.testing.assert_array_equal(value, expected[name].astype(np.float32))
    np.testing.assert_array_equal(stages.decode(feeds["vae"]["latents"]), stages.run("vae", feeds["vae"])["images"])
    assert sim.pageable == [], "host <-> device copies must go through pinned staging"
    assert stages.backend == "tensorrt" and stages.max_subjects == 4
    stages.close()
    assert sim.live() == {}, "every buffer, context stream and graph must be released"


@pytest.mark.parametrize("graphs", [True, False])
def test_denoising_session_matches_the_numpy_euler_loop(trt_build, sim, trt_state, graphs):
    from runtime.trt_backend import TrtStages

    stages = TrtStages(trt_build, cuda_graphs=graphs, max_graphs=2)
    noise, cond = condition(stages.manifest, batch=2, subjects=3)
    session = stages.denoise_session(noise, cond)
    calls_before = len(sim.ops)
    for t, tn in zip(SIGMAS[:-1], SIGMAS[1:]):
        session.step(t, tn)
    np.testing.assert_allclose(session.latents(), euler_reference(noise, cond, SIGMAS), rtol=1e-6, atol=1e-6)
    steps = sim.ops[calls_before:]
    if graphs:
        # step 1: 2 timestep copies, event, NaN fill, launch (execute + D2D), read-back; then 2 copies, event, launch
        assert [o for o in steps if o.startswith("graph launch")] == ["graph launch (2 nodes)"] * 4
        assert sum(o.startswith("graph: execute") for o in steps) == 4 and "memset" in " ".join(steps)
        assert len(sim.graphs) == len(sim.execs) == 1
        executions = trt_state.executions
        stages.denoise_session(noise, cond).step(1.0, 0.5)  # same bucket: replayed, not captured again
        assert len(sim.graphs) == 1 and trt_state.executions == executions + 1
    else:
        assert sum(o.startswith("execute dit") for o in steps) == 4 and not sim.graphs
    per_step = [o for o in steps[-4:]]
    assert sum(o.startswith("H2D") for o in per_step) <= 2, "only the two timesteps are copied in per step"
    assert sim.pageable == []
    stages.close()
    assert sim.live() == {}


def dbim_inputs(rows: int, length: int, mixing_steps: int):
    """DBIM's per-row inputs for ``rows`` concept rows and their auxiliary rows (:class:`DBIMCondition`)."""
    from dynaip_trt.dbim import DBIMCondition

    rng = np.random.default_rng(5)
    tokens = (rng.uniform(size=(2 * rows, length)) < 0.5).astype(np.float32)
    return DBIMCondition(prompt_tokens=tokens, map_tokens=tokens * (rng.uniform(size=tokens.shape) < 0.5),
                         reference_map=np.array([1, 0] * rows, np.float32),
                         dbim_lambda=np.linspace(-2, 2, 2 * rows, dtype=np.float32), mixing_steps=mixing_steps)


@pytest.mark.parametrize("graphs", [True, False])
def test_dbim_session_switches_from_the_dbim_engine_to_the_dit(trt_build, sim, trt_state, graphs):
    """DBIM: the first mixing steps run the dit_dbim engine on the 2B concept and auxiliary rows (its own bucket and
    CUDA graph), then the B concept rows go on with the plain DiT engine (its own bucket and CUDA graph)."""
    from dynaip_trt.conditioning import dit_feeds
    from dynaip_trt.dbim import dbim_feeds
    from runtime.trt_backend import TrtStages

    install_synthetic_dbim(trt_build)
    stages = TrtStages(trt_build, cuda_graphs=graphs)
    assert stages.dbim_unavailable is None and "dit_dbim" in stages.engines
    noise, cond = condition(stages.manifest, batch=4, subjects=2)  # 2 rows + their 2 auxiliary rows
    noise = noise[:2]
    dbim = dbim_inputs(2, cond.text_embeds.shape[1], mixing_steps=2)
    session = stages.denoise_session(noise, cond, dbim=dbim)
    x = np.concatenate([noise, noise])
    for i, (t, tn) in enumerate(zip(SIGMAS[:-1], SIGMAS[1:])):
        session.step(t, tn)
        b = x.shape[0] if i < 2 else 2
        feeds = dit_feeds(x[:b], np.full(b, t, np.float32), np.full(b, tn, np.float32), cond.head(b))
        x = dit_dbim_fn({**feeds, **dbim_feeds(dbim)})["latents_next"] if i < 2 else dit_fn(feeds)["latents_next"]
    np.testing.assert_allclose(session.latents(), x, rtol=1e-5, atol=1e-6)
    assert sorted(k[0] for k in stages._dit_buckets) == ["dit", "dit_dbim"], "one bucket per engine"
    if graphs:
        assert len(sim.graphs) == 2, "one CUDA graph per engine"
        again = stages.denoise_session(noise, cond, dbim=dbim)
        for t, tn in zip(SIGMAS[:-1], SIGMAS[1:]):
            again.step(t, tn)
        assert len(sim.graphs) == 2, "replayed, not captured again"
        np.testing.assert_allclose(again.latents(), x, rtol=1e-5, atol=1e-6)
    assert sim.pageable == []
    stages.close()
    assert sim.live() == {}


def test_builds_without_the_dbim_engine_say_how_to_get_it(trt_build, sim, trt_state):
    from runtime.trt_backend import TrtStages

    stages = TrtStages(trt_build, cuda_graphs=False)
    assert "dit_dbim" not in stages.engines and "export.build --dbim" in stages.dbim_unavailable
    stages.close()
    install_synthetic_dbim(trt_build, engine=False)  # exported after the build: no engine yet
    stages = TrtStages(trt_build, cuda_graphs=False)
    assert "dit_dbim" not in stages.engines and "has no TensorRT engine" in stages.dbim_unavailable
    stages.close()


@pytest.mark.parametrize("graphs", [True, False])
def test_true_cfg_session_matches_the_guided_numpy_loop(trt_build, sim, trt_state, graphs):
    """True CFG: the DiT runs the B rows and their B negative rows on the same latents; the guided velocity
    v_neg + s * (v - v_neg) moves the B latents (diffusers' semantics, as the ONNX Runtime backend)."""
    from dynaip_trt.conditioning import dit_feeds
    from dynaip_trt.sampling import euler_step, true_cfg_velocity
    from runtime.trt_backend import TrtStages

    stages = TrtStages(trt_build, cuda_graphs=graphs)
    noise, cond = condition(stages.manifest, batch=4, subjects=2)  # 2 rows + their 2 negative rows
    noise, scales = noise[:2], np.array([3.0, 1.5], np.float32)
    session = stages.denoise_session(noise, cond, scales)
    x = noise
    for t, tn in zip(SIGMAS[:-1], SIGMAS[1:]):
        session.step(t, tn)
        feeds = dit_feeds(np.concatenate([x, x]), np.full(4, t, np.float32), np.full(4, tn, np.float32), cond)
        v = true_cfg_velocity(dit_fn(feeds)["velocity"], scales[:, None, None])
        x = euler_step(x, v, np.float32(t), np.float32(tn))
    np.testing.assert_allclose(session.latents(), x, rtol=1e-5, atol=1e-6)
    plain = stages.denoise_session(*condition(stages.manifest, batch=4, subjects=2))  # the same shapes, unguided
    plain.step(1.0, 0.5)
    assert len(stages._dit_buckets) == 2, "guided and plain steps are different graphs"
    assert sim.pageable == []
    stages.close()
    assert sim.live() == {}


def test_buckets_are_an_lru_of_max_graphs_with_one_context_each(trt_build, sim, trt_state):
    from runtime.trt_backend import TrtStages

    stages = TrtStages(trt_build, max_graphs=2)
    contexts = len(trt_state.contexts)
    sessions = {}
    for batch, subjects in [(1, 1), (2, 2), (1, 1), (3, 1)]:
        noise, cond = condition(stages.manifest, batch, subjects, seed=batch)
        sessions[(batch, subjects)] = s = stages.denoise_session(noise, cond)
        s.step(1.0, 0.5)
        np.testing.assert_allclose(s.latents(), euler_reference(noise, cond, [1.0, 0.5]), rtol=1e-6, atol=1e-6)
    assert len(trt_state.contexts) - contexts == 3, "one execution context per captured bucket"
    assert len(sim.graphs) == 2 and len(stages._dit_buckets) == 2, "the least recently used bucket was released"
    with pytest.raises(InputError, match="buffers were released"):
        sessions[(2, 2)].step(0.5, 0.25)
    with pytest.raises(InputError, match="outside the engine's profile"):
        stages.denoise_session(*condition(stages.manifest, batch=5, subjects=1))
    with pytest.raises(InputError, match="text_branch schedules need the torch backend"):
        sessions[(3, 1)].step(0.5, 0.25, text_branch=True)
    stages.close()
    assert sim.live() == {}


def test_an_empty_capture_is_detected(trt_build, sim, trt_state, monkeypatch):
    """The engine's context lives on device 1 but the capture runs under device 0 (what a missing device switch
    does): the graph records no kernel, and its first replay must raise instead of returning stale latents."""
    import runtime.cuda as cuda
    from runtime.trt_backend import TrtStages

    sim.devices.append(Device("NVIDIA H100 80GB HBM3"))
    stages = TrtStages(trt_build, device=1)
    monkeypatch.setattr(cuda, "device_scope", lambda index: contextlib.nullcontext())
    sim.current = 0
    monkeypatch.setattr(stages.engines["dit"], "new_context", _context_on(stages.engines["dit"], sim, 1))
    session = stages.denoise_session(*condition(stages.manifest, 1, 1))
    with pytest.raises(BackendUnavailableError, match="did not write its output"):
        session.step(1.0, 0.5)


def _context_on(engine, sim, device):
    def new_context():
        current, sim.current = sim.current, device
        try:
            return engine.engine.create_execution_context()
        finally:
            sim.current = current
    return new_context


def test_a_failed_enqueue_under_capture_raises_and_ends_the_capture(trt_build, sim, trt_state, monkeypatch):
    from runtime.trt_backend import TrtStages

    stages = TrtStages(trt_build)
    calls = []
    original = stages.engines["dit"].enqueue

    def enqueue(binding, stream):
        calls.append(sim.streams[int(stream)].capture is not None)
        if calls[-1]:
            binding.context._addresses.pop("latents")  # execute_async_v3 returns False under capture
        original(binding, stream)

    monkeypatch.setattr(stages.engines["dit"], "enqueue", enqueue)
    with pytest.raises(BackendUnavailableError, match="execute_async_v3 failed"):
        stages.denoise_session(*condition(stages.manifest, 1, 1))
    assert calls == [False, True], "one uncaptured enqueue, then the captured one"
    assert all(s.capture is None for s in sim.streams.values()) and not sim.graphs, "capture ended, graph dropped"


@pytest.mark.parametrize("kind", ["HALF", "BF16"])
def test_reduced_precision_io_is_converted_on_the_host(trt_build, sim, trt_state, kind):
    from runtime.trt_backend import TrtStages, bfloat16_bits_to_float32, float32_to_bfloat16_bits

    install_synthetic_dit(trt_build, kind)
    m = Manifest.load(trt_build)
    stages = TrtStages(trt_build, cuda_graphs=False)
    noise, cond = condition(m, 1, 2)
    session = stages.denoise_session(noise, cond)
    session.step(1.0, 0.5)

    def rounded(x):
        x = np.asarray(x, np.float32)
        return x.astype(np.float16).astype(np.float32) if kind == "HALF" else bfloat16_bits_to_float32(
            float32_to_bfloat16_bits(x))

    from dynaip_trt.conditioning import dit_feeds

    feeds = {n: rounded(v) for n, v in dit_feeds(noise, np.ones(1, np.float32), np.full(1, 0.5, np.float32),
                                                 cond).items()}
    expected = rounded(dit_fn(feeds)["latents_next"])
    np.testing.assert_array_equal(session.latents(), expected)
    stages.close()


def test_bfloat16_rounds_to_nearest_even():
    from runtime.trt_backend import bfloat16_bits_to_float32, float32_to_bfloat16_bits

    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -2.5, np.inf, 3.4e38, 1e-40, np.nan], np.float32)
    bits = float32_to_bfloat16_bits(x)
    assert bits[:8].tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC020, 0x7F80, 0x7F80, 0x0001]
    assert np.isnan(bfloat16_bits_to_float32(bits[8:])).all()
    np.testing.assert_array_equal(bfloat16_bits_to_float32(bits[:5]), [1.0, 1.0, 1.015625, 1.0078125, -2.5])


def test_engine_io_is_checked_against_the_runtime(trt_build, sim, trt_state, monkeypatch):
    from dynaip_trt.manifest import MODEL_IO
    from runtime.trt_backend import TrtStages

    monkeypatch.setitem(MODEL_IO, "vae", (("latents",), ("pixels",)))
    with pytest.raises(ManifestError, match=r"vae: engine vae.fp16.engine has inputs \['latents'\] and outputs "
                                            r"\['images'\]; this runtime expects"):
        TrtStages(trt_build)


def test_out_of_memory_is_a_resource_error(trt_build, sim, trt_state):
    from runtime.trt_backend import TrtStages

    stages = TrtStages(trt_build)
    sim.free_override = 1 << 10
    with pytest.raises(ResourceError, match="needs about .* GiB of GPU memory, but only 0.00 GiB"):
        stages.run("vae", {"latents": np.zeros(stages.manifest.models["vae"].profile["latents"]["opt"], np.float32)})


def test_without_a_driver_the_backend_says_so(trt_build, trt_state, real_rt, monkeypatch):
    """The real cuda-python (no driver): one clear BackendUnavailableError, no traceback from cuda-python."""
    from runtime.trt_backend import TrtStages

    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", real_rt)
    with pytest.raises(BackendUnavailableError, match=r"needs an NVIDIA GPU with a CUDA driver and none is usable "
                                                      r"here .*cudaErrorInsufficientDriver"):
        TrtStages(trt_build)


def test_without_tensorrt_or_cuda_python_the_backend_says_what_to_install(trt_build, monkeypatch):
    from runtime.trt_backend import TrtStages

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_lean", None)
    with pytest.raises(BackendUnavailableError, match=r"needs TensorRT: pip install -e \.\[tensorrt-cu12\]"):
        TrtStages(trt_build)
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    with pytest.raises(BackendUnavailableError, match=r"needs cuda-python"):
        TrtStages(trt_build)


@pytest.mark.lean
def test_the_lean_runtime_runs_version_compatible_engines_only(build_copy, sim, trt_state, monkeypatch):
    """tensorrt_lean (real classes, checked fakes) instead of the full tensorrt: engines built with
    --version-compatible load (with engine host code allowed) and run; others are refused with what to do."""
    import importlib

    from runtime.trt_backend import TrtStages
    from trt_fakes import make_tensorrt

    real_lean = importlib.import_module("tensorrt_lean")
    fake_engine_build(build_copy, version_compatible=True)
    m = Manifest.load(build_copy)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_lean", make_tensorrt(real_lean, sim, trt_state))
    stages = TrtStages(build_copy)
    assert stages.trt.__name__ == "tensorrt_lean" and trt_state.runtimes[-1].engine_host_code_allowed is True
    noise, cond = condition(m, 1, 2)
    session = stages.denoise_session(noise, cond)
    session.step(1.0, 0.5)
    np.testing.assert_allclose(session.latents(), euler_reference(noise, cond, [1.0, 0.5]), rtol=1e-6, atol=1e-6)
    stages.close()
    m.tensorrt["version_compatible"] = False
    m.save(build_copy)
    with pytest.raises(BackendUnavailableError, match="only the lean TensorRT runtime .* --version-compatible"):
        TrtStages(build_copy)


def test_cuda_calls_are_checked_by_the_real_binding(sim):
    """The simulated runtime hands every call to the real cuda.bindings.runtime first: what it rejects fails."""
    rt = sys.modules["cuda.bindings.runtime"]
    with pytest.raises(TypeError):
        rt.cudaMalloc("16 bytes")
    with pytest.raises(TypeError):
        rt.cudaStreamBeginCapture(rt.cudaStream_t(init_value=1))  # the capture mode is missing
    with pytest.raises(AssertionError, match="the CUDA simulator lacks cudaDeviceReset"):
        rt.cudaDeviceReset()
    import runtime.cuda as cuda

    buf = cuda.DeviceBuffer((4, 8), np.float16)
    host = cuda.HostBuffer((4, 8), np.float16)
    stream = cuda.Stream()
    host.array[...] = np.arange(32, dtype=np.float16).reshape(4, 8)
    buf.copy_from_host(host, stream)
    host.array[...] = 0
    buf.copy_to_host(host, stream)
    stream.synchronize()
    np.testing.assert_array_equal(host.array, np.arange(32, dtype=np.float16).reshape(4, 8))
    assert sim.calls[-3:] == ["cudaMemcpyAsync", "cudaMemcpyAsync", "cudaStreamSynchronize"]
    assert [c for c in sim.calls if c.startswith("cuda")][:3] == ["cudaMalloc", "cudaMallocHost",
                                                                  "cudaStreamCreateWithFlags"]
    for r in (buf, host, stream):
        r.close()
    assert sim.live() == {}
