"""Generate an image of one or more subjects from the command line.

    python -m runtime.generate --prompt "two friends on a beach" --ref examples/subject_a.png \\
        --ref examples/subject_b.png --view examples/subject_b_side.png --out out.png [--engine-dir build/tiny]
    python -m runtime.generate --prompt "a toy on a beach" --ref examples/subject_a.png --out out.png \\
        --dbim-lambda 1 --subject-word toy [--aux-noun object] [--dbim-steps 0.15]      # DCI's DBIM

``--ref`` starts a subject, ``--view`` adds another view of the last one. With ``--engine-dir`` the ONNX Runtime
(default) or TensorRT backend runs the build; without it the torch backend runs the embedded default (``--config``)
or local checkpoints (``--base``/``--clip``/``--adapter``). Arguments, files and the output path are checked before
any model is loaded; bad input prints one error line and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

from dynaip_trt.cli import add_source_args, check_source_args, check_writable_file, cli_main, configure_logging, \
    image_format, save_image, written_image
from dynaip_trt.configs import DEFAULT_CONFIG, DynaIPConfig, get_config
from dynaip_trt.dbim import DBIM_MAPS, DEFAULT_AUX_NOUNS, DEFAULT_DBIM_STEPS, MAX_DBIM_LAMBDA
from dynaip_trt.errors import ConfigError, InputError
from dynaip_trt.images import load_image
from dynaip_trt.manifest import Manifest
from dynaip_trt.request import MAX_SCALE, MAX_SEED, MAX_SIDE, MAX_TRUE_CFG
from dynaip_trt.text import word_spans

logger = logging.getLogger("runtime.generate")

EXPORTED_BACKENDS = ("onnxruntime", "tensorrt")


class AddSubject(argparse.Action):
    """``--ref IMAGE``: a new subject."""

    def __call__(self, parser, namespace, value, option_string=None):
        getattr(namespace, self.dest).append([value])


class AddView(argparse.Action):
    """``--view IMAGE``: one more view of the subject of the last ``--ref``."""

    def __call__(self, parser, namespace, value, option_string=None):
        subjects = getattr(namespace, self.dest)
        if not subjects:
            parser.error("--view adds a view to the subject of the previous --ref; give --ref first")
        subjects[-1].append(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", required=True)
    p.add_argument("--ref", dest="subjects", action=AddSubject, default=[], metavar="IMAGE",
                   help="reference image of a new subject (repeat per subject)")
    p.add_argument("--view", dest="subjects", action=AddView, metavar="IMAGE",
                   help="another view of the subject of the previous --ref")
    p.add_argument("--out", required=True, metavar="FILE", help="output image (format from the suffix: .png, .jpg)")
    p.add_argument("--engine-dir", metavar="DIR", help="build folder (export.onnx / export.build); without it the "
                   "torch backend runs --config or --base/--clip")
    p.add_argument("--backend", choices=EXPORTED_BACKENDS, help="with --engine-dir (default onnxruntime)")
    add_source_args(p, DEFAULT_CONFIG)
    p.add_argument("--device", help="cpu or cuda[:N] (default: cpu for torch, the backend's choice otherwise)")
    p.add_argument("--precision", default="fp32", help="onnxruntime: fp32 or a graph the build has (fp16, fp8)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="GPU: run the denoising step without CUDA graphs")
    p.add_argument("--scale", type=float, action="append",
                   help="subject scale; once for all subjects or once per subject (default 1.0)")
    p.add_argument("--granularity", help="CLIP level weights, e.g. 0.2,0.3,0.5 (default: the router decides)")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=int, help="noise seed (default: the config's)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--no-truncate", action="store_true", help="refuse a prompt longer than the text length "
                   "(default: truncate it with a warning)")
    p.add_argument("--negative-prompt", metavar="TEXT", help="negative prompt of true CFG (\"\" for an empty one)")
    p.add_argument("--true-cfg-scale", type=float, default=1.0, metavar="S",
                   help="true CFG scale in [1, 100] (default 1: off); above 1 needs --negative-prompt")
    p.add_argument("--dbim-lambda", type=float, metavar="L",
                   help="DCI's dual-branch integration (DBIM): the auxiliary branch's weight in [-50, 50] (the paper "
                   "uses -2..2; larger follows the prompt more); needs --subject-word and a build with DBIM's graph")
    p.add_argument("--dbim-steps", type=float, metavar="F", help="fraction of the steps that mix, in (0, 1] "
                   f"(default {DEFAULT_DBIM_STEPS:g})")
    p.add_argument("--subject-word", metavar="WORD", help="the word or phrase of --prompt that names the subject "
                   "(DBIM's auxiliary prompt replaces it by --aux-noun)")
    p.add_argument("--aux-noun", metavar="NOUN", help="the auxiliary prompt's common noun (default: the first of "
                   f"{', '.join(DEFAULT_AUX_NOUNS)} the model knows)")
    p.add_argument("--dbim-map", choices=DBIM_MAPS, help="DBIM's concept map: the subject word's tokens (text, "
                   "default), the reference tokens, or both")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if not args.subjects:
        p.error("give at least one --ref IMAGE")
    return args


def parse_granularity(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"--granularity {text!r}: expected comma-separated numbers, e.g. 0.2,0.3,0.5") from None


def check_numbers(args: argparse.Namespace, cfg: DynaIPConfig | None) -> None:
    """The numeric flags, in CLI terms, before any model is loaded (with the config when it is known)."""
    for value in args.scale or []:
        if not math.isfinite(value) or not 0 <= value <= MAX_SCALE:
            raise InputError(f"--scale {value:g} must be a finite number in [0, {MAX_SCALE:g}]")
    if args.scale and len(args.scale) not in (1, len(args.subjects)):
        raise InputError(f"--scale given {len(args.scale)} times for {len(args.subjects)} subjects: give it once "
                         f"for all subjects or once per subject")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise InputError(f"--seed {args.seed} must be in [0, 2**63 - 1]")
    if not math.isfinite(args.true_cfg_scale) or not 1 <= args.true_cfg_scale <= MAX_TRUE_CFG:
        raise InputError(f"--true-cfg-scale {args.true_cfg_scale:g} must be a finite number in [1, {MAX_TRUE_CFG:g}] "
                         f"(1: off)")
    if args.true_cfg_scale > 1 and args.negative_prompt is None:
        raise InputError("--true-cfg-scale above 1 needs --negative-prompt (\"\" for an empty one)")
    check_dbim_flags(args)
    if args.threads < 0:
        raise InputError(f"--threads {args.threads} must be >= 0")
    if args.steps is not None and not 1 <= args.steps <= 1000:
        raise InputError(f"--steps {args.steps} must be in [1, 1000]")
    if args.guidance is not None and not (math.isfinite(args.guidance) and 0 <= args.guidance <= 100):
        raise InputError(f"--guidance {args.guidance:g} must be a finite number in [0, 100]")
    levels = parse_granularity(args.granularity)
    if cfg is None:
        return
    m = cfg.pixel_multiple
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and (value < m or value > MAX_SIDE or value % m):
            raise InputError(f"{flag} {value} must be a multiple of {m} in [{m}, {MAX_SIDE}]")
    if levels is not None and len(levels) != cfg.adapter.num_levels:
        raise InputError(f"--granularity has {len(levels)} values; this model has {cfg.adapter.num_levels} levels "
                         f"(e.g. {','.join(['1'] * cfg.adapter.num_levels)})")


def check_dbim_flags(args: argparse.Namespace) -> None:
    """DBIM's flags in CLI terms (what needs no tokenizer: the token masks are checked with the request)."""
    dbim_flags = {"--dbim-steps": args.dbim_steps, "--subject-word": args.subject_word, "--aux-noun": args.aux_noun,
                  "--dbim-map": args.dbim_map}
    if args.dbim_lambda is None:
        given = [f for f, v in dbim_flags.items() if v is not None]
        if given:
            raise InputError(f"{', '.join(given)} apply to DBIM: give --dbim-lambda too (e.g. 0)")
        return
    if not math.isfinite(args.dbim_lambda) or abs(args.dbim_lambda) > MAX_DBIM_LAMBDA:
        raise InputError(f"--dbim-lambda {args.dbim_lambda:g} must be a finite number in [-{MAX_DBIM_LAMBDA:g}, "
                         f"{MAX_DBIM_LAMBDA:g}] (the paper uses -2..2)")
    if args.dbim_steps is not None and not (math.isfinite(args.dbim_steps) and 0 < args.dbim_steps <= 1):
        raise InputError(f"--dbim-steps {args.dbim_steps:g} must be a fraction of the steps in (0, 1]")
    if args.true_cfg_scale > 1:
        raise InputError("--dbim-lambda cannot be combined with --true-cfg-scale above 1")
    if not args.subject_word or not args.subject_word.strip():
        raise InputError("--dbim-lambda needs --subject-word: the word of --prompt that names the subject")
    if not word_spans(args.prompt, args.subject_word):
        raise InputError(f"--subject-word {args.subject_word!r} does not occur in --prompt as a whole word")
    if args.aux_noun is not None and (not args.aux_noun.strip()
                                      or args.aux_noun.strip().lower() == args.subject_word.strip().lower()):
        raise InputError(f"--aux-noun {args.aux_noun!r} must be a common noun other than --subject-word")


def check_build(args: argparse.Namespace) -> Manifest:
    """``--engine-dir`` with ``--backend``/``--precision``: the folder is a build that has what they ask for."""
    label = f"--engine-dir {args.engine_dir}"
    manifest = Manifest.load(args.engine_dir, what=label)
    backend = args.backend or "onnxruntime"
    if backend == "onnxruntime":
        have = sorted({p for e in manifest.models.values() for p in e.graphs()})
        if args.precision not in have:
            raise ConfigError(f"--precision {args.precision}: {label} has no {args.precision} graphs (it has "
                              f"{', '.join(have)}); use --precision fp32 or re-export with python -m export.onnx "
                              f"--{args.precision}")
    else:
        if args.precision != "fp32":
            raise ConfigError("--precision applies to the onnxruntime backend: TensorRT engines have the precision "
                              "they were built with (python -m export.build --precision ...)")
        if not manifest.tensorrt:
            raise ConfigError(f"{label} has no TensorRT engines: build them with python -m export.build "
                              f"--engine-dir {args.engine_dir} --skip-export on a GPU machine, or leave out "
                              f"--backend to use ONNX Runtime")
    if args.dbim_lambda is not None:
        dbim = manifest.models.get("dit_dbim")
        if dbim is None:
            raise ConfigError(f"--dbim-lambda: {label} has no DBIM graph (dit_dbim): export it with python -m "
                              f"export.onnx --engine-dir {args.engine_dir} --dbim (TensorRT: python -m export.build "
                              f"--dbim), or leave out --dbim-lambda")
        if backend == "tensorrt" and not dbim.engine:
            raise ConfigError(f"--dbim-lambda: {label} has no TensorRT engine of the DBIM graph (dit_dbim): build it "
                              f"with python -m export.build --engine-dir {args.engine_dir} --skip-export")
    return manifest


def load_engine(args: argparse.Namespace):
    from .engine import DynaIPEngine

    graphs = not args.no_cuda_graphs
    if args.engine_dir:
        return DynaIPEngine.from_dir(args.engine_dir, backend=args.backend or "onnxruntime", device=args.device,
                                     precision=args.precision, cuda_graphs=graphs, threads=args.threads)
    device = args.device or "cpu"
    if args.base:
        return DynaIPEngine.from_weights(args.base, args.clip, args.adapter, device=device, cuda_graphs=graphs)
    return DynaIPEngine.from_config(args.config, seed=args.weights_seed, device=device, cuda_graphs=graphs)


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose)
    out = check_writable_file(args.out, "--out", written_image)
    image_format(out, "--out")
    if args.engine_dir:
        for flag in ("base", "clip", "adapter"):
            if getattr(args, flag):
                raise InputError(f"--{flag} selects weights for the torch backend; a build folder (--engine-dir) "
                                 f"already holds its weights: leave out one or the other")
        cfg = check_build(args).dynaip_config
    else:
        if args.backend:
            raise InputError(f"--backend {args.backend} runs a build folder: give --engine-dir, or leave out "
                             f"--backend to use the torch backend on {args.config if not args.base else '--base'}")
        if args.precision != "fp32":
            raise InputError("--precision applies to a build folder (--engine-dir) run with ONNX Runtime")
        check_source_args(args)
        cfg = None if args.base else get_config(args.config)
    check_numbers(args, cfg)
    subjects = [[load_image(v, field=f"--{'ref' if j == 0 else 'view'} {v}") for j, v in enumerate(views)]
                for views in args.subjects]
    engine = load_engine(args)
    scales = 1.0 if not args.scale else args.scale[0] if len(args.scale) == 1 else args.scale
    images = engine.generate(args.prompt, subjects, scales=scales, granularity=parse_granularity(args.granularity),
                             steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
                             seed=args.seed, truncate_prompt=not args.no_truncate,
                             negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg_scale,
                             dbim_lambda=args.dbim_lambda, dbim_steps=args.dbim_steps, subject_word=args.subject_word,
                             aux_noun=args.aux_noun, dbim_map=args.dbim_map, progress=True)
    save_image(images[0], out)
    logger.info("wrote %s (%s backend)", out, engine.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
