"""Evaluate generation quality on the synthetic world's held-out subjects, per backend, precision and option.

    python -m runtime.evaluate --config tiny --engine-dir build/tiny --json eval.json      # the full evaluation
    python -m runtime.evaluate --engine-dir build/tiny --no-torch --rows baseline,backends  # lean: ONNX Runtime only
    python -m runtime.evaluate --config tiny --scenes 24,12 --rows baseline,backends        # a quick subset
    python -m runtime.evaluate --config tiny --rows dbim --dbim-lambdas=-2,-1,0,1,2 --json dbim.json  # DCI's DBIM
    python -m runtime.plot_dbim --json dbim.json --out dbim.png                             # CP and PF vs lambda
    python -m runtime.evaluate --config tiny --rows constraint --constrained-adapter constrained.safetensors

Rows (``--rows``, groups of :data:`runtime.evaluation.GROUPS`): ``baseline`` (adapter scale 0), ``backends`` (torch
fp32, torch-fp8, and every graph precision of each ``--engine-dir`` with ONNX Runtime; ``--tensorrt`` adds its
engines), ``dds`` (text branch kept vs dropped; torch), ``scale`` (``--scales``), ``granularity`` (one CLIP level
only), ``blocks`` (one injected block only), ``dbim`` (DBIM at each of ``--dbim-lambdas``, the subject word the
prompt's generic noun; ``--aux-noun``), ``constraint`` (the torch rows with ``--constrained-adapter``, an adapter
trained with MM-Diff's attention constraint: compare its two-subject rates). The torch rows run ``--config`` (or
``--base``/``--clip``/``--adapter``); with ``--no-torch`` the first build's ONNX Runtime fp32 graphs are the
reference and torch is never imported.

Prints a table (rates; what each row computes; targets met or not) and writes ``--json``. ``--clip-model`` and
``--dino-model`` (local transformers folders) add CLIP-I, CLIP-T and DINO. Arguments, folders and the output path
are checked before any model is loaded; bad input prints one error line and exits with status 2; ``--strict``
exits 1 when a target is not met.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
from pathlib import Path
from typing import Any, Callable

from dynaip_trt.cli import add_source_args, check_source_args, check_writable_file, cli_main, configure_logging
from dynaip_trt.configs import DEFAULT_CONFIG, DynaIPConfig, get_config
from dynaip_trt.demo.world import World
from dynaip_trt.errors import ConfigError, InputError
from dynaip_trt.files import atomic_path
from dynaip_trt.manifest import PRECISIONS, Manifest, fp8_variant

from .engine import DynaIPEngine
from .evaluation import CONSTRAINED_SOURCE, DEFAULT_DBIM_LAMBDAS, DEFAULT_GROUPS, DEFAULT_SCALES, FULL_SCENES, \
    GROUPS, Evaluation, Plan, Source, check_targets, evaluation_set, plan_rows, report, table
from .scorer import WorldScorer

logger = logging.getLogger("runtime.evaluate")

TOOL = "dynaip-trt evaluate"
EXIT_TARGET_MISSED = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.evaluate", description=__doc__.split("\n\n")[0])
    add_source_args(p, DEFAULT_CONFIG)
    p.add_argument("--engine-dir", action="append", default=[], metavar="DIR",
                   help="build folder (export.onnx / export.build); repeat for several builds")
    p.add_argument("--no-torch", action="store_true", help="only the builds' rows (no torch rows, torch never loaded)")
    p.add_argument("--tensorrt", action="store_true", help="also run each build's TensorRT engines (GPU)")
    p.add_argument("--rows", help=f"comma list of row groups: {', '.join(GROUPS)} (default "
                   f"{','.join(DEFAULT_GROUPS)}; without torch, dds is left out)")
    p.add_argument("--scales", default=",".join(f"{s:g}" for s in DEFAULT_SCALES),
                   help="adapter scales of the scale rows (default %(default)s; 0 and 1 are the baseline and "
                        "reference rows)")
    p.add_argument("--dbim-lambdas", default=",".join(f"{v:g}" for v in DEFAULT_DBIM_LAMBDAS), metavar="L,...",
                   help="the dbim rows' lambdas (default %(default)s; a list starting with a negative value is "
                   "given as --dbim-lambdas=-2,2)")
    p.add_argument("--aux-noun", help="the dbim rows' auxiliary noun (default: the first default noun the model "
                   "knows; made plural for several subjects)")
    p.add_argument("--constrained-adapter", metavar="FILE", help="the constraint rows' adapter (.safetensors) "
                   "trained with the attention constraint")
    p.add_argument("--scenes", default=f"{FULL_SCENES['one_subject']},{FULL_SCENES['two_subjects']}",
                   metavar="N1,N2", help="one-subject and two-subject scenes (default %(default)s: the full set)")
    p.add_argument("--seed", type=int, default=0, help="seed of placements, reference views and noise")
    p.add_argument("--steps", type=int, help="denoising steps (default: the config's)")
    p.add_argument("--batch", type=int, default=16, help="requests per engine call (capped by a build's profile)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cpu for torch, the backend's choice otherwise)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of ONNX Runtime sessions and of torch (0: their "
                   "defaults; 1 is much faster on a busy machine)")
    p.add_argument("--scorer", metavar="DIR", help="scorer folder (scorer.onnx + scorer.json; default: the shipped "
                   "one)")
    p.add_argument("--clip-model", metavar="DIR", help="local transformers CLIP folder: adds CLIP-I and CLIP-T")
    p.add_argument("--dino-model", metavar="DIR", help="local transformers DINO / DINOv2 folder: adds DINO")
    p.add_argument("--json", metavar="FILE", help="write the report here (JSON)")
    p.add_argument("--strict", action="store_true", help=f"exit {EXIT_TARGET_MISSED} when a target is not met")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def parse_list(text: str, flag: str, kind: type, count: int | None = None) -> list:
    """``"a,b,c"`` -> values of ``kind``; :class:`InputError` naming ``flag`` otherwise."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{flag} {text!r}: expected comma-separated {kind.__name__} values") from None
    if not values or (count is not None and len(values) != count):
        raise InputError(f"{flag} {text!r}: expected {count or 'one or more'} comma-separated values")
    return values


def report_is_ours(path: Path) -> bool:
    """Whether ``path`` is a JSON report this command wrote (a later run may replace it)."""
    try:
        return json.loads(path.read_text()).get("tool") == TOOL
    except (OSError, ValueError, AttributeError):
        return False


def check_dbim_args(args: argparse.Namespace, groups: list[str]) -> list[float]:
    """The dbim and constraint rows' flags -> the lambdas."""
    from dynaip_trt.dbim import MAX_DBIM_LAMBDA

    lambdas = parse_list(args.dbim_lambdas, "--dbim-lambdas", float)
    if any(not math.isfinite(v) or abs(v) > MAX_DBIM_LAMBDA for v in lambdas):
        raise InputError(f"--dbim-lambdas {args.dbim_lambdas}: each lambda must be a finite number in "
                         f"[-{MAX_DBIM_LAMBDA:g}, {MAX_DBIM_LAMBDA:g}]")
    if args.aux_noun is not None and not args.aux_noun.strip().isalpha():
        raise InputError(f"--aux-noun {args.aux_noun!r} must be one common noun (letters only)")
    if "constraint" in groups:
        if args.constrained_adapter is None:
            raise InputError("--rows constraint needs --constrained-adapter FILE (an adapter trained with the "
                             "attention constraint)")
        if args.no_torch:
            raise InputError("--rows constraint runs --constrained-adapter on the torch backend: drop --no-torch")
        if not Path(args.constrained_adapter).is_file():
            raise InputError(f"--constrained-adapter {args.constrained_adapter}: no such file")
    elif args.constrained_adapter is not None:
        raise InputError("--constrained-adapter applies to the constraint rows: add constraint to --rows")
    return lambdas


def check_args(args: argparse.Namespace) -> tuple[list[str], list[float], tuple[int, int]]:
    """Every flag, in CLI terms, before any model is loaded -> (row groups, scales, scene counts)."""
    groups = parse_list(args.rows, "--rows", str) if args.rows is not None else list(DEFAULT_GROUPS)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise InputError(f"--rows: unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    scales = parse_list(args.scales, "--scales", float)
    if any(not math.isfinite(s) or not 0 <= s <= 10 for s in scales):
        raise InputError(f"--scales {args.scales}: each scale must be a finite number in [0, 10]")
    one, two = parse_list(args.scenes, "--scenes", int, 2)
    if one < 0 or two < 0 or one + two == 0:
        raise InputError(f"--scenes {args.scenes}: counts must be >= 0 and not both 0")
    if args.steps is not None and not 1 <= args.steps <= 1000:
        raise InputError(f"--steps {args.steps} must be in [1, 1000]")
    if args.batch < 1 or args.threads < 0 or args.seed < 0:
        raise InputError("--batch must be >= 1, --threads and --seed >= 0")
    if args.no_torch:
        if not args.engine_dir:
            raise InputError("--no-torch leaves no rows: give at least one --engine-dir")
        if "dds" in groups and args.rows is not None:
            raise InputError("--rows dds keeps the text branch, which only the torch backend runs: drop --no-torch")
        groups = [g for g in groups if g != "dds"]
    else:
        check_source_args(args)
    check_dbim_args(args, groups)
    for flag, value in (("--clip-model", args.clip_model), ("--dino-model", args.dino_model),
                        ("--scorer", args.scorer)):
        if value is not None and not Path(value).is_dir():
            raise InputError(f"{flag} {value}: no such folder")
    return groups, scales, (one, two)


def load_builds(args: argparse.Namespace) -> list[Manifest]:
    manifests = [Manifest.load(d, what=f"--engine-dir {d}") for d in args.engine_dir]
    for d, m in zip(args.engine_dir, manifests):
        if args.tensorrt and not m.tensorrt:
            raise ConfigError(f"--engine-dir {d} has no TensorRT engines (python -m export.build); leave out "
                              f"--tensorrt to evaluate its ONNX graphs")
    return manifests


def model_config(args: argparse.Namespace, manifests: list[Manifest]) -> DynaIPConfig:
    """The config every row shares: the builds' (all the same) and, for the torch rows, ``--config``'s."""
    names = {m.dynaip_config.name for m in manifests}
    if len(names) > 1:
        raise ConfigError(f"the --engine-dir builds come from different configs ({', '.join(sorted(names))}); "
                          f"evaluate one model at a time")
    if args.no_torch:
        return manifests[0].dynaip_config
    if args.base:
        if manifests:
            logger.warning("torch rows run --base/--clip weights: the builds are assumed to be exported from them")
            return manifests[0].dynaip_config
        raise InputError("--base/--clip rows need the config of an export of those weights: give its --engine-dir "
                         "(or evaluate --config NAME)")
    cfg = get_config(args.config)
    if names and names != {cfg.name}:
        raise ConfigError(f"--engine-dir builds were exported from config {names.pop()}, the torch rows run "
                          f"--config {cfg.name}: pass the build's config (or --no-torch)")
    return cfg


def runtime_precisions(manifest: Manifest) -> list[str]:
    """The ``--precision`` values ONNX Runtime can run on a build: each of :data:`PRECISIONS` it has a graph of, with
    ``fp8`` standing for the ``fp8-fp16`` DiT (an ``fp8-bf16`` one is for TensorRT engines only)."""
    have = {p for e in manifest.models.values() for p in e.graphs()}
    return [p for p in PRECISIONS if (fp8_variant("fp16") if p == "fp8" else p) in have]


def sources(args: argparse.Namespace, manifests: list[Manifest], groups: list[str]) -> dict[str, Source]:
    out: dict[str, Source] = {}
    if not args.no_torch:
        out["torch"] = Source("torch", "torch")
        if "backends" in groups:
            out["torch-fp8"] = Source("torch-fp8", "torch", precision="fp8")
    if args.constrained_adapter:
        out[CONSTRAINED_SOURCE] = Source(CONSTRAINED_SOURCE, "torch", adapter=args.constrained_adapter)
    for i, m in enumerate(manifests):
        for precision in runtime_precisions(m):
            if precision == "fp32" or "backends" in groups:
                key = f"onnxruntime:{i}:{precision}"
                out[key] = Source(key, "onnxruntime", i, precision)
        if args.tensorrt:
            out[f"tensorrt:{i}"] = Source(f"tensorrt:{i}", "tensorrt", i, str(m.tensorrt.get("precision", "?")))
    return out


def engine_factories(args: argparse.Namespace, srcs: dict[str, Source]) -> dict[str, Callable[[], DynaIPEngine]]:
    """``{source key: () -> engine}``; torch-fp8 reuses the torch rows' models (never modified)."""
    torch_engine: list[DynaIPEngine] = []

    def torch_models():
        if not torch_engine:
            device = args.device or "cpu"
            torch_engine.append(
                DynaIPEngine.from_weights(args.base, args.clip, args.adapter, device=device) if args.base else
                DynaIPEngine.from_config(args.config, seed=args.weights_seed, device=device))
            if args.threads:  # the torch backend has loaded torch by now; this module never imports it
                sys.modules["torch"].set_num_threads(args.threads)
        return torch_engine[0]

    def make(src: Source) -> Callable[[], DynaIPEngine]:
        if src.key == "torch":
            return torch_models
        if src.key == "torch-fp8":
            return lambda: DynaIPEngine.from_models(torch_models().stages.models, fp8=True)
        if src.key == CONSTRAINED_SOURCE:
            return lambda: constrained_engine(args)
        directory = args.engine_dir[src.build]
        if src.backend == "tensorrt":
            return lambda: DynaIPEngine.from_dir(directory, backend="tensorrt", device=args.device)
        return lambda: DynaIPEngine.from_dir(directory, backend="onnxruntime", device=args.device,
                                             precision=src.precision, threads=args.threads)

    return {key: make(src) for key, src in srcs.items()}


def constrained_engine(args: argparse.Namespace) -> DynaIPEngine:
    """The torch rows' model with ``--constrained-adapter`` as its adapter, attending in the mode it was trained in
    (the constraint trains ``concat`` mode; the adapter file's header says)."""
    from .torch_backend import load_models_on, with_adapter_file

    device = args.device or "cpu"
    models = load_models_on(device, None, base=args.base, clip=args.clip) if args.base else \
        load_models_on(device, None, config=args.config, seed=args.weights_seed)
    return DynaIPEngine.from_models(with_adapter_file(models, args.constrained_adapter))


def weights_label(args: argparse.Namespace) -> str:
    if args.no_torch:
        return "the builds' weights"
    if args.base:
        return f"--base {args.base} --clip {args.clip}" + (f" --adapter {args.adapter}" if args.adapter else "")
    return f"--config {args.config} (--weights-seed {args.weights_seed} where the config's weights are seeded)"


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose)
    groups, scales, (one, two) = check_args(args)
    out = check_writable_file(args.json, "--json", report_is_ours) if args.json else None
    manifests = load_builds(args)
    cfg = model_config(args, manifests)
    if cfg.height != cfg.width:
        raise ConfigError(f"config {cfg.name} makes {cfg.height}x{cfg.width} images; the world is square")
    steps = args.steps or cfg.steps
    srcs = sources(args, manifests, groups)
    reference = srcs["torch"] if "torch" in srcs else srcs["onnxruntime:0:fp32"]
    rows = plan_rows(Plan(srcs, reference, cfg, tuple(scales), steps, tuple(check_dbim_args(args, groups)),
                          args.aux_noun), groups)
    if "dbim" in groups and reference.backend == "onnxruntime" and "dit_dbim" not in manifests[0].models:
        raise ConfigError(f"--rows dbim on --engine-dir {args.engine_dir[0]} needs its DBIM graph: export it with "
                          f"python -m export.onnx --engine-dir {args.engine_dir[0]} --dbim (or run the torch rows)")
    scorer = WorldScorer(args.scorer, what=f"--scorer {args.scorer}" if args.scorer else None)
    similarity = None
    if args.clip_model or args.dino_model:
        from .similarity import Similarity

        similarity = Similarity(args.clip_model, args.dino_model, device=args.device or "cpu")
    world = World(size=cfg.height, reference_size=cfg.vision.image_size)
    items = evaluation_set(world, one, two, seed=args.seed)
    logger.info("evaluating %d rows on %d one-subject and %d two-subject scenes of held-out subjects (%s, %d steps)",
                len(rows), one, two, cfg.name, steps)
    results = Evaluation(world, items, scorer, engine_factories(args, srcs), batch=args.batch, steps=args.steps,
                         similarity=similarity).run(rows)
    targets = check_targets(results, reference.label)
    meta: dict[str, Any] = {
        "command": "python -m runtime.evaluate " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()} {platform.system()}, python {platform.python_version()}",
        "config": cfg.name, "weights": weights_label(args), "builds": list(args.engine_dir),
        "scenes": {"one_subject": one, "two_subjects": two, "seed": args.seed, "steps": steps,
                   "subjects": "held-out"},
        "reference_row": reference.label,
        "scorer": {"folder": str(scorer.folder), "sha256": scorer.sha256,
                   "accuracy_on_fresh_renders": scorer.metadata.get("accuracy_on_fresh_renders")},
    }
    data = report(results, targets, meta)
    print(table(data))
    if out is not None:
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(data, indent=1) + "\n")
        logger.info("wrote %s", out)
    missed = [t["target"] for t in targets if not t["met"]]
    if missed and args.strict:
        logger.error("%d target(s) not met: %s", len(missed), "; ".join(missed))
        return EXIT_TARGET_MISSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
