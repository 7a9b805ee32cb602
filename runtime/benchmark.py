"""Latency benchmark: per-step and end-to-end latency, reference-encoding time and peak memory per backend and
subject count, against the diffusers-style eager PyTorch baseline measured in the same run, plus the compute floor.

    python -m runtime.benchmark --config flux-dev --backends torch-eager,torch-graphs,torch-fp8,tensorrt \\
        --subjects 1,2,4 --resolution 1024 --steps 28 --engine-dir build/flux-dev      # on a GPU
    python -m runtime.benchmark --engine-dir build/tiny-random     # CPU: tiny config, says it is a CPU figure

Full-size configs use random weights when no real ones are given (same cost as real weights). Every call ends with
its results on the host, so wall-clock ``time.perf_counter`` times every backend alike; every figure is the median
of ``--repeats`` runs after warm-up. The ONNX Runtime and TensorRT rows need no torch; the torch rows, the adapter
overhead and the GPU compute floor import it.
"""

from __future__ import annotations

import argparse
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
from PIL import Image

from dynaip_trt.cli import check_writable_file, cli_main, configure_logging, image_format, save_image, \
    write_json_report, written_image, written_json_report
from dynaip_trt.configs import DEFAULT_CONFIG, DynaIPConfig, get_config
from dynaip_trt.errors import ConfigError, DynaIPError
from dynaip_trt.request import MAX_TRUE_CFG, GenerationRequest
from dynaip_trt.sampling import image_token_count

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
    precomputed once per request): 4 R (S*T) D per injected block, R its injected rows (the image tokens; every row
    of a single-stream block with ``single_rows="all"``).
    """
    t, a = cfg.transformer, cfg.adapter
    d, length = t.inner_dim, cfg.text.max_text_length
    n = image_token_count(height, width, cfg.vae.spatial_factor)
    tokens = length + n
    attn = 4.0 * tokens * tokens * d
    double = 24.0 * tokens * d * d + attn
    single = 24.0 * tokens * d * d + attn
    embed = 2.0 * n * t.in_channels * d + 2.0 * length * t.joint_attention_dim * d + 2.0 * n * d * t.in_channels
    single_rows = (tokens if a.single_rows == "all" else n) if a.inject_single else 0
    adapter = (t.num_layers * n + t.num_single_layers * single_rows) * 4.0 * subjects * a.num_tokens * d
    total = t.num_layers * double + t.num_single_layers * single + embed + adapter
    return batch * total, batch * adapter


def matmul_rate(gpu: bool) -> float:
    """Measured dense fp32/bf16 matmul throughput in FLOP/s (the floor's denominator): numpy on the CPU, torch bf16
    on a GPU."""
    if gpu:
        import torch

        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        times = measure(lambda: (a @ b, torch.cuda.synchronize()), repeats=10, warmup=3)
    else:
        n = 1024
        a, b = np.random.default_rng(0).standard_normal((2, n, n), dtype=np.float32)
        times = measure(lambda: a @ b, repeats=10, warmup=3)
    return 2.0 * n**3 / statistics.median(times)


def measure(fn: Callable[[], object], repeats: int, warmup: int) -> list[float]:
    """Seconds per call of ``fn`` (which returns with its results on the host) after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def synthetic_references(subjects: int, size: int = 256) -> list[Image.Image]:
    rng = np.random.default_rng(subjects)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(subjects)]


def make_engine(backend: str, args: argparse.Namespace, gpu: bool) -> DynaIPEngine | str:
    """The engine for ``backend``, or a sentence saying why it is skipped."""
    try:
        if backend.startswith("torch"):
            if backend == "torch-graphs" and not gpu:
                return "CUDA graphs need a GPU"
            import torch

            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype] if gpu \
                else torch.float32
            opts = dict(device="cuda" if gpu else "cpu", dtype=dtype, cuda_graphs=backend != "torch-eager",
                        fp8=backend == "torch-fp8")
            if args.base:
                return DynaIPEngine.from_weights(args.base, args.clip, args.adapter, **opts)
            return DynaIPEngine.from_config(args.config, **opts)
        if not args.engine_dir:
            return "needs --engine-dir (python -m export.onnx / export.build output)"
        return DynaIPEngine.from_dir(args.engine_dir, backend=backend,
                                     device=None if backend == "tensorrt" else "cuda" if gpu else "cpu")
    except DynaIPError as e:
        return str(e)


def peak_memory_mib(engine: DynaIPEngine) -> float:
    """Peak GPU memory of the torch backend on a GPU; otherwise the process-wide peak RSS."""
    device = getattr(engine.stages, "device", None)
    if device is not None and getattr(device, "type", "") == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_backend(engine: DynaIPEngine, backend: str, args: argparse.Namespace, subjects: int,
                  floor_s: float) -> Row:
    h = w = args.resolution
    refs = synthetic_references(subjects)
    prompt = "subjects at the beach"
    request = GenerationRequest(prompt, refs, steps=args.steps, height=h, width=w, guidance=args.guidance,
                                negative_prompt="" if args.true_cfg_scale > 1 else None,
                                true_cfg_scale=args.true_cfg_scale)
    rows = [engine.sampler.validate(request) for _ in range(args.batch)]

    def encode():
        engine.clear_caches()
        return engine.encode_references(refs)

    encode()
    loop = measure(lambda: engine.sampler.run(rows), args.repeats, args.warmup)  # caches warm: the loop itself
    e2e = measure(lambda: (engine.clear_caches(), engine.generate_batch([request] * args.batch)), args.repeats,
                  args.warmup)
    enc = measure(encode, args.repeats, args.warmup)
    overhead = None
    if backend.startswith("torch"):
        base, adapter = engine.stages.step_times(args.batch, h, w, subjects, lambda fn: statistics.median(
            measure(fn, args.repeats, 1)))
        overhead = 100.0 * (adapter - base) / base
    return Row(backend, subjects, 1e3 * statistics.median(loop) / args.steps, 1e3 * statistics.median(e2e),
               1e3 * statistics.median(enc), peak_memory_mib(engine), 1e3 * floor_s, overhead)


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
    fig.canvas.draw()
    save_image(Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB"),
               path, "--plot")
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help=f"named config (default: flux-dev on a GPU, {DEFAULT_CONFIG} on CPU)")
    p.add_argument("--base", metavar="DIR", help="local diffusers-format FLUX folder (torch rows)")
    p.add_argument("--clip", metavar="DIR", help="local image-encoder folder (torch rows)")
    p.add_argument("--adapter", metavar="FILE", help="DynaIP adapter .safetensors (torch rows)")
    p.add_argument("--engine-dir", metavar="DIR", help="build folder for the onnxruntime / tensorrt rows")
    p.add_argument("--backends", default=None, help=f"comma list of {','.join(BACKENDS)}")
    p.add_argument("--subjects", default="1,2,4")
    p.add_argument("--resolution", type=int, default=None, help="square side in pixels (default: the config's)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--true-cfg-scale", type=float, default=1.0, metavar="S",
                   help="requests with true CFG (empty negative prompt): the DiT runs 2 rows per image (default 1: off)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="torch backends on a GPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if a GPU is visible")
    p.add_argument("--allow-cpu-full-size", action="store_true", help="run a full-size config on CPU anyway")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON here")
    p.add_argument("--plot", metavar="FILE", help="latency vs subject count PNG (matplotlib)")
    return p.parse_args(argv)


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    if args.json:
        check_writable_file(args.json, "--json", written_json_report)
    if args.plot:
        check_writable_file(args.plot, "--plot", written_image)
        image_format(Path(args.plot), "--plot")
    from dynaip_trt.tensorrt_api import cuda_device_count

    gpu = (args.device or ("cuda" if cuda_device_count() else "cpu")) == "cuda"
    args.config = args.config or ("flux-dev" if gpu else DEFAULT_CONFIG)
    cfg = get_config(args.config)
    if not gpu and not cfg.name.startswith("tiny") and not args.allow_cpu_full_size:  # tiny, tiny-random, tiny-<format>
        raise ConfigError(f"--config {args.config} on CPU needs ~60 GB of RAM and hours; run it on a GPU or pass "
                          f"--allow-cpu-full-size")
    args.resolution = args.resolution or cfg.height
    args.steps = args.steps or cfg.steps
    backends = (args.backends or ("torch-eager,torch-graphs,torch-fp8,tensorrt" if gpu else "torch-eager,onnxruntime")
                ).split(",")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ConfigError(f"--backends: unknown {unknown}; choose from {list(BACKENDS)}")
    subjects = [int(s) for s in args.subjects.split(",")]
    if not 1.0 <= args.true_cfg_scale <= MAX_TRUE_CFG:
        raise ConfigError(f"--true-cfg-scale {args.true_cfg_scale:g} must be in [1, {MAX_TRUE_CFG:g}] (1: off)")
    rate = matmul_rate(gpu)
    where = "GPU" if gpu else f"CPU ({platform.processor() or platform.machine()})"
    print(f"# {where}: {'GPU figure' if gpu else 'CPU figure (not representative of GPU latency)'}; config "
          f"{args.config}, {args.resolution}x{args.resolution}, {args.steps} steps, batch {args.batch}"
          f"{f', true CFG {args.true_cfg_scale:g}' if args.true_cfg_scale > 1 else ''}, "
          f"matmul rate {rate / 1e12:.2f} TFLOP/s ({args.dtype if gpu else 'fp32'})")
    rows: list[Row] = []
    for backend in backends:
        engine = make_engine(backend, args, gpu)
        if isinstance(engine, str):
            print(f"# skipped {backend}: {engine}")
            continue
        for s in subjects:
            if s > engine.max_subjects:
                print(f"# skipped {backend} with {s} subjects: engine allows {engine.max_subjects}")
                continue
            dit_batch = args.batch * (2 if args.true_cfg_scale > 1 else 1)  # true CFG: + the negative rows
            flops, _ = dit_step_flops(engine.config, dit_batch, args.resolution, args.resolution, s)
            rows.append(bench_backend(engine, backend, args, s, flops / rate))
            logger.info("%s, %d subject(s): %.2f ms/step", backend, s, rows[-1].step_ms)
        del engine
    base = {r.subjects: r.step_ms for r in rows if r.backend == BASELINE}
    for r in rows:
        r.vs_baseline = base[r.subjects] / r.step_ms if r.subjects in base else None
    print(format_table(rows))
    if args.json:
        write_json_report(args.json, {"device": where, "args": vars(args), "rows": [
            {**asdict(r), "vs_floor": r.vs_floor} for r in rows]})
    if args.plot and rows:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
