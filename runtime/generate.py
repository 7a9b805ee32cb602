"""Generate an image of one or more subjects from the command line.

    python -m runtime.generate --prompt "two friends on a beach" --ref examples/subject_a.png \\
        --ref examples/subject_b.png --out out.png [--engine-dir build/tiny --backend onnxruntime]

Without ``--engine-dir`` the torch backend runs the embedded tiny default (``--config``) or local checkpoints
(``--base``/``--clip``/``--adapter``). Bad input prints one error line and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from PIL import Image

from dynaip_trt.errors import InputError, cli_main
from dynaip_trt.files import atomic_path

from .engine import BACKENDS, DynaIPEngine

logger = logging.getLogger("runtime.generate")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", required=True)
    p.add_argument("--ref", action="append", required=True, metavar="IMAGE",
                   help="reference image of one subject; repeat per subject; SUBJ_VIEW1,SUBJ_VIEW2 gives a "
                        "subject several views")
    p.add_argument("--out", required=True, help="output image (format from the suffix, e.g. .png)")
    p.add_argument("--engine-dir", help="build directory (export.onnx / export.build); default: torch backend")
    p.add_argument("--backend", choices=BACKENDS, help="default: onnxruntime with --engine-dir, else torch")
    p.add_argument("--config", default="tiny", help="torch backend: named config with seeded weights")
    p.add_argument("--base", help="torch backend: local diffusers-format FLUX folder")
    p.add_argument("--clip", help="torch backend: local CLIP vision folder")
    p.add_argument("--adapter", help="torch backend: DynaIP adapter .safetensors")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cpu for torch, the backend's choice otherwise)")
    p.add_argument("--precision", default="fp32", help="onnxruntime: fp32 or a variant the build lists (fp16)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="GPU: run the DiT step without CUDA graphs")
    p.add_argument("--scale", type=float, action="append",
                   help="subject scale; once for all subjects or once per subject (default 1.0)")
    p.add_argument("--granularity", help="CLIP level weights low,mid,high (default: the router decides)")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def load_engine(args: argparse.Namespace) -> DynaIPEngine:
    backend = args.backend or ("onnxruntime" if args.engine_dir else "torch")
    graphs = not args.no_cuda_graphs
    if args.engine_dir:
        return DynaIPEngine.from_dir(args.engine_dir, backend=backend, device=args.device, precision=args.precision,
                                     cuda_graphs=graphs)
    if backend != "torch":
        raise InputError(f"--backend {backend} needs --engine-dir (a build directory from export.onnx/export.build)")
    if (args.base is None) != (args.clip is None):
        raise InputError("--base and --clip must be given together")
    device = args.device or "cpu"
    if args.base:
        return DynaIPEngine.from_weights(args.base, args.clip, args.adapter, device=device, cuda_graphs=graphs)
    return DynaIPEngine.from_config(args.config, device=device, cuda_graphs=graphs)


def parse_granularity(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"--granularity {text!r}: expected comma-separated numbers, e.g. 0.2,0.3,0.5") from None


def output_format(path: Path) -> str:
    """The PIL format of ``--out`` (checked before any work is done)."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"--out {path}: unknown image suffix {path.suffix!r}; use e.g. .png or .jpg")
    if path.is_dir():
        raise InputError(f"--out {path} is a directory; give an image file name")
    return fmt


def save_image(image: Image.Image, path: Path, fmt: str) -> None:
    """Write ``image`` atomically (temporary name beside ``path``, then rename)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    out = Path(args.out)
    fmt = output_format(out)
    engine = load_engine(args)
    refs = [r.split(",") if "," in r else r for r in args.ref]
    scales = 1.0 if not args.scale else args.scale[0] if len(args.scale) == 1 else args.scale
    images = engine.generate(args.prompt, refs, scales=scales, granularity=parse_granularity(args.granularity),
                             steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
                             seed=args.seed, progress=True)
    save_image(images[0], out, fmt)
    logger.info("wrote %s (%s backend)", out, engine.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
