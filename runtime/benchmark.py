"""Latency benchmark: per-step and end-to-end latency, reference-encoding time and peak memory per backend and
subject count, against the diffusers-style eager PyTorch baseline measured in the same run, plus the compute floor.

    python -m runtime.benchmark --config flux-dev --backends torch-eager,torch-graphs,torch-fp8,tensorrt \\
        --subjects 1,2,4 --resolution 1024 --steps 28 --build-dir build/flux-dev      # on a GPU
    python -m runtime.benchmark                      # CPU: tiny config, says it is a CPU figure

Full-size configs use random weights when no real ones are given (same cost as real weights). GPU timings use
CUDA events, CPU timings ``time.perf_counter``; every figure is the median of ``--repeats`` runs after warm-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from dynaip_trt.attention import ReferenceInputs
from dynaip_trt.configs import DynaIPConfig, get_config
from dynaip_trt.errors import DynaIPError
from dynaip_trt.sampling import image_token_count, initial_noise, latent_image_ids, text_ids

from .engine import DynaIPEngine

logger = logging.getLogger("runtime.benchmark")

BACKENDS = ("torch-eager", "torch-graphs", "torch-fp8", "onnxruntime", "tensorrt")  # torch-fp8: graphs on a GPU
BASELINE = "torch-eager"


@dataclass
class Row:
    """One (backend, subject count) measurement; times in milliseconds, memory in MiB."""

    backend: str
    subjects: int
    step_ms: float
    e2e_ms: float
    encode_ms: float
    peak_mem_mib: float
    floor_ms: float
    adapter_overhead_pct: float | None = None
    vs_baseline: float | None = None

    @property
    def vs_floor(self) -> float:
        return self.step_ms / self.floor_ms


def dit_step_flops(cfg: DynaIPConfig, batch: int, height: int, width: int, subjects: int) -> tuple[float, float]:
    """Matmul FLOPs of one MM-DiT step (multiply-add = 2 FLOPs): ``(total, adapter part)``.

    Double block: 8 D^2 per token for Q/K/V/out + 16 D^2 (4x MLP) on both streams, joint attention 4 (L+N)^2 D;
    single block: 24 D^2 per token (fused QKV+MLP in 14, 5D->D out 10) + attention. Adapter (image branch, K/V
    precomputed once per request): 4 N (S*T) D per injected block.
    """
    t, a = cfg.transformer, cfg.adapter
    d, length = t.inner_dim, cfg.text.max_text_length
    n = image_token_count(height, width, cfg.vae.spatial_factor)
    tokens = length + n
    attn = 4.0 * tokens * tokens * d
    double = 24.0 * tokens * d * d + attn
    single = 24.0 * tokens * d * d + attn
    embed = 2.0 * n * t.in_channels * d + 2.0 * length * t.joint_attention_dim * d + 2.0 * n * d * t.in_channels
    injected = t.num_layers + (t.num_single_layers if a.inject_single else 0)
    adapter = injected * 4.0 * n * subjects * a.num_tokens * d
    total = t.num_layers * double + t.num_single_layers * single + embed + adapter
    return batch * total, batch * adapter


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul throughput in FLOP/s (the floor's denominator)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = measure(lambda: a @ b, device, repeats=10, warmup=3)
    return 2.0 * n**3 / statistics.median(times)


def measure(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds per call of ``fn`` (CUDA events on a GPU, perf_counter on CPU), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def synthetic_references(subjects: int, size: int = 256) -> list[Image.Image]:
    rng = np.random.default_rng(subjects)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(subjects)]


def make_engine(backend: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
                ) -> DynaIPEngine | str:
    """The engine for ``backend``, or a sentence saying why it is skipped."""
    if backend.startswith("torch"):
        if backend == "torch-graphs" and device.type != "cuda":
            return "CUDA graphs need a GPU"
        opts = dict(device=device, dtype=dtype, cuda_graphs=backend != "torch-eager", fp8=backend == "torch-fp8")
        try:
            if args.weights:
                base, clip, adapter = args.weights
                return DynaIPEngine.from_weights(base, clip, adapter, **opts)
            return DynaIPEngine.from_config(args.config, seed=0, **opts)
        except DynaIPError as e:
            return str(e)
    if not args.build_dir:
        return "needs --build-dir (python -m export.onnx / export.build output)"
    try:
        return DynaIPEngine.from_dir(args.build_dir, backend=backend, device=device)
    except DynaIPError as e:
        return str(e)


def adapter_overhead(engine: DynaIPEngine, batch: int, height: int, width: int, subjects: int,
                     repeats: int) -> float | None:
    """Percent of a DiT step the adapter adds (torch backends): step with S subjects vs the bare base model."""
    models = getattr(engine.stages, "models", None)
    if models is None:
        return None
    cfg, dev, dt = engine.config, engine.stages.device, models.dtype
    vf, t = cfg.vae.spatial_factor, cfg.transformer
    n, length = image_token_count(height, width, vf), cfg.text.max_text_length
    kw = dict(hidden_states=torch.randn(batch, n, t.in_channels, device=dev, dtype=dt),
              encoder_hidden_states=torch.randn(batch, length, t.joint_attention_dim, device=dev, dtype=dt),
              pooled_projections=torch.randn(batch, t.pooled_projection_dim, device=dev, dtype=dt),
              timestep=torch.full((batch,), 0.5, device=dev, dtype=dt),
              guidance=torch.full((batch,), cfg.guidance, device=dev, dtype=dt),
              img_ids=latent_image_ids(height, width, vf).to(dev), txt_ids=text_ids(length).to(dev),
              return_dict=False)
    kv = torch.randn(len(models.adapter.img_kv), batch, subjects, cfg.adapter.num_tokens, t.inner_dim,
                     device=dev, dtype=dt)
    ref = ReferenceInputs(kv, kv, torch.ones(batch, subjects, device=dev, dtype=dt), mode=cfg.adapter.attention_mode,
                          image_tokens=n)
    with torch.no_grad():
        base = statistics.median(measure(lambda: models.transformer(**kw), dev, repeats, 1))
        with_adapter = statistics.median(measure(
            lambda: models.transformer(**kw, joint_attention_kwargs={"dynaip": ref}), dev, repeats, 1))
    return 100.0 * (with_adapter - base) / base


def bench_backend(engine: DynaIPEngine, backend: str, args: argparse.Namespace, subjects: int,
                  floor_s: float) -> Row:
    dev = engine.stages.device
    h = w = args.resolution
    refs = synthetic_references(subjects)
    prompt = "subjects at the beach"  # fits the tiny config's 32-token text length

    def encode():
        engine.clear_reference_cache()
        return engine.encode_references(refs)

    ref = encode()
    text, pooled = engine.encode_prompt([prompt] * args.batch)
    noise = initial_noise(args.batch, h, w, engine.config.vae.spatial_factor, engine.config.vae.latent_channels, 0)
    scales = torch.ones(1, subjects)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    step = measure(lambda: engine.denoise(noise, text, pooled, ref, scales, None, h, w, args.steps, args.guidance,
                                          progress=False), dev, args.repeats, args.warmup)
    e2e = measure(lambda: (engine.clear_reference_cache(), engine.generate(
        [prompt] * args.batch, refs, steps=args.steps, height=h, width=w, guidance=args.guidance)),
        dev, args.repeats, args.warmup)
    enc = measure(encode, dev, args.repeats, args.warmup)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    else:  # process-wide peak RSS (Linux reports KiB)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    overhead = adapter_overhead(engine, args.batch, h, w, subjects, args.repeats) if backend.startswith("torch") \
        else None
    return Row(backend, subjects, 1e3 * statistics.median(step) / args.steps, 1e3 * statistics.median(e2e),
               1e3 * statistics.median(enc), peak, 1e3 * floor_s, overhead)


def format_table(rows: list[Row]) -> str:
    head = ("backend", "subj", "step ms", "e2e ms", "encode ms", "peak MiB", "floor ms", "step/floor",
            "adapter %", "x baseline")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(" | ".join([
            r.backend, str(r.subjects), f"{r.step_ms:.2f}", f"{r.e2e_ms:.1f}", f"{r.encode_ms:.1f}",
            f"{r.peak_mem_mib:.0f}", f"{r.floor_ms:.3f}", f"{r.vs_floor:.1f}",
            "-" if r.adapter_overhead_pct is None else f"{r.adapter_overhead_pct:+.1f}",
            "-" if r.vs_baseline is None else f"{r.vs_baseline:.2f}"]))
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    """Per-step latency vs subject count, one line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for backend in dict.fromkeys(r.backend for r in rows):
        pts = [(r.subjects, r.step_ms) for r in rows if r.backend == backend]
        ax.plot(*zip(*pts), marker="o", label=backend)
    ax.set_xlabel("subjects")
    ax.set_ylabel("DiT step latency (ms)")
    ax.set_xticks(sorted({r.subjects for r in rows}))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="tiny or flux-dev (default: flux-dev on a GPU, tiny on CPU)")
    p.add_argument("--weights", nargs=3, metavar=("BASE", "CLIP", "ADAPTER"), help="real local weights")
    p.add_argument("--backends", default=None, help=f"comma list of {','.join(BACKENDS)}")
    p.add_argument("--subjects", default="1,2,4")
    p.add_argument("--resolution", type=int, default=None, help="square side in pixels (default: the config's)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="torch backends on a GPU")
    p.add_argument("--build-dir", help="build directory for the onnxruntime / tensorrt backends")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--allow-cpu-full-size", action="store_true", help="run a full-size config on CPU anyway")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--plot", help="latency vs subject count PNG (matplotlib)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    args.config = args.config or ("flux-dev" if gpu else "tiny")
    try:
        cfg = get_config(args.config)
    except DynaIPError as e:
        logger.error("%s", e)
        return 2
    if not gpu and args.config != "tiny" and not args.allow_cpu_full_size:
        logger.error("%s on CPU needs ~%d GB of RAM and hours; run it on a GPU or pass --allow-cpu-full-size",
                     args.config, 60)
        return 2
    args.resolution = args.resolution or cfg.height
    args.steps = args.steps or cfg.steps
    backends = (args.backends or ("torch-eager,torch-graphs,torch-fp8,tensorrt" if gpu else "torch-eager,onnxruntime")
                ).split(",")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        logger.error("unknown backends %s; choose from %s", unknown, list(BACKENDS))
        return 2
    subjects = [int(s) for s in args.subjects.split(",")]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype] if gpu \
        else torch.float32
    rate = matmul_rate(device, dtype)
    where = torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.processor() or platform.machine()})"
    print(f"# {where}: {'GPU' if gpu else 'CPU figure (not representative of GPU latency)'}; config "
          f"{args.config}, {args.resolution}x{args.resolution}, {args.steps} steps, batch {args.batch}, "
          f"torch {torch.__version__}, matmul rate {rate / 1e12:.2f} TFLOP/s ({args.dtype if gpu else 'fp32'})")
    rows: list[Row] = []
    for backend in backends:
        engine = make_engine(backend, args, device, dtype)
        if isinstance(engine, str):
            print(f"# skipped {backend}: {engine}")
            continue
        for s in subjects:
            if s > engine.stages.max_subjects:
                print(f"# skipped {backend} with {s} subjects: engine allows {engine.stages.max_subjects}")
                continue
            flops, _ = dit_step_flops(engine.config, args.batch, args.resolution, args.resolution, s)
            rows.append(bench_backend(engine, backend, args, s, flops / rate))
            logger.info("%s, %d subject(s): %.2f ms/step", backend, s, rows[-1].step_ms)
        del engine
    base = {r.subjects: r.step_ms for r in rows if r.backend == BASELINE}
    for r in rows:
        r.vs_baseline = base[r.subjects] / r.step_ms if r.subjects in base else None
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": where, "args": vars(args), "rows": [
            {**asdict(r), "vs_floor": r.vs_floor} for r in rows]}, indent=1))
    if args.plot and rows:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
