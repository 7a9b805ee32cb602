"""Quality evaluation on the synthetic world: does the model personalize, and what do backends, precisions and
inference options cost? (The command line is :mod:`runtime.evaluate`.)

**Evaluation set** (:func:`evaluation_set`): held-out subjects of :mod:`dynaip_trt.demo.world` only (zero-shot).
One subject: every held-out subject on every setting and position (144 scenes; a prefix of the list has every
subject equally often). Two subjects: the 60 pairs of held-out subjects of different colours, settings in turn.
Each scene has its generic prompt, one augmented reference view per subject and its own noise seed, the same for
every row, so rows are paired.

**Rows** (:func:`plan_rows`), each a :class:`Row`: a source (an engine: ``torch``, ``torch-fp8``, ONNX Runtime on
a build's fp32 / fp16 / fp8 graphs, TensorRT engines) and request options (any field of
:class:`~dynaip_trt.request.GenerationRequest`, e.g. ``scales``, ``granularity``, ``block_scales``; plus
``text_branch_steps``). Groups: ``baseline`` (adapter scale 0), ``backends``, ``dds`` (text branch kept at every
step vs dropped, torch only), ``scale`` (adapter scale sweep), ``granularity`` (one CLIP level only: low, mid,
high), ``blocks`` (image-branch injection in one block only), ``dbim`` (DCI's dual-branch integration at several
lambda; the subject word is the prompt's generic noun), ``constraint`` (the torch rows with an adapter trained with
MM-Diff's attention constraint, for two-subject CP). A new row kind is a function in :data:`GROUPS`.

**Verdicts** (:mod:`dynaip_trt.demo.verdicts`, read by the shipped scorer, :class:`~runtime.scorer.WorldScorer`):
subject fidelity (colour, shape, pattern of each referenced subject: the CP analogue) and prompt following
(setting, position: the PF analogue), subject count, and for several subjects whether each is present and not
blended (``all_present``). Rates carry 95% Wilson intervals. Each row is also compared with the row it is paired
with (agreement of per-image verdicts, pixel differences, rate differences).

**Targets** (:data:`TARGETS`, issue 14): on the reference row (torch fp32, or ONNX Runtime fp32 without torch),
one subject colour >= 0.9, shape >= 0.6, pattern >= 0.6, setting and position >= 0.95; two subjects colour >= 0.75
(each subject); reduced-precision rows within :data:`PRECISION_TOLERANCE` of their fp32 row on those metrics; the
scale-0 baseline at chance for colour and shape (chance inside its interval).

Optional real metrics (CLIP-I, CLIP-T, DINO) come from :mod:`runtime.similarity` (torch, imported only when asked).
No torch is imported here: the torch rows load it through the torch backend.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from dynaip_trt.cli import progress as progress_bar
from dynaip_trt.configs import DynaIPConfig
from dynaip_trt.demo.verdicts import chance, judge, rate
from dynaip_trt.demo.world import GENERIC_NOUN, LAYOUTS, SETTINGS, Scene, World
from dynaip_trt.errors import ConfigError, InputError
from dynaip_trt.request import GenerationRequest, TextBranchSchedule

from .engine import DynaIPEngine
from .scorer import WorldScorer

logger = logging.getLogger(__name__)

KINDS = {"one_subject": 1, "two_subjects": 2}
FULL_SCENES = {"one_subject": 144, "two_subjects": 60}
PRECISION_TOLERANCE = 0.03
REFERENCE_ROW_GROUP = "backends"
BASELINE_ROW = "adapter scale 0"


# --------------------------------------------------------------------------------------------- evaluation set
@dataclass(frozen=True)
class Item:
    """One generation of the evaluation: the scene to show, its prompt, one reference view per subject (``uint8
    [R, R, 3]``, in reference order) and the noise seed."""

    scene: Scene
    prompt: str
    references: tuple[np.ndarray, ...]
    seed: int


def evaluation_set(world: World, one_subject: int = FULL_SCENES["one_subject"],
                   two_subjects: int = FULL_SCENES["two_subjects"], seed: int = 0) -> dict[str, list[Item]]:
    """The held-out scenes (see the module docstring), ``{"one_subject": [...], "two_subjects": [...]}``.

    Counts beyond the full lists (144 and 60) repeat them with new placements, references and noise; smaller counts
    take a prefix, in which (one subject) every held-out subject occurs equally often when the count is a multiple
    of 12. Deterministic for ``seed``."""
    held = world.split("heldout")
    order = np.random.default_rng([seed, 1])
    combos_of = {s.index: [(st, pos) for st in SETTINGS for pos in LAYOUTS[1]] for s in held}
    for combos in combos_of.values():
        order.shuffle(combos)
    singles = [(s, *combos_of[s.index][r]) for r in range(len(SETTINGS) * len(LAYOUTS[1])) for s in held]
    pairs = [(a, b) for i, a in enumerate(held) for b in held[i + 1:] if a.colour != b.colour]
    pairs = [pairs[i] for i in np.random.default_rng([seed, 2]).permutation(len(pairs))]
    settings = list(SETTINGS)
    out: dict[str, list[Item]] = {"one_subject": [], "two_subjects": []}
    for k in range(one_subject):
        subject, setting, position = singles[k % len(singles)]
        rng = np.random.default_rng([seed, 1, k])
        scene = world.sample_scene(rng, subjects=[subject], setting=setting, positions=[position])
        out["one_subject"].append(_item(world, scene, rng, seed + k))
    for k in range(two_subjects):
        a, b = pairs[k % len(pairs)]
        rng = np.random.default_rng([seed, 2, k])
        scene = world.sample_scene(rng, subjects=[a, b], setting=settings[(k + k // len(pairs)) % len(settings)])
        out["two_subjects"].append(_item(world, scene, rng, seed + 100_000 + k))
    return out


def _item(world: World, scene: Scene, rng: np.random.Generator, seed: int) -> Item:
    refs = tuple(world.reference(s, rng) for s in scene.subjects)
    return Item(scene, world.prompt(scene), refs, seed)


# ----------------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Source:
    """An engine rows run on. ``key``: ``"torch"``, ``"torch-fp8"``, ``"onnxruntime:<build>:<precision>"`` or
    ``"tensorrt:<build>"`` (``<build>`` indexes the build folders)."""

    key: str
    backend: str
    build: int | None = None
    precision: str = "fp32"
    adapter: str | None = None  # torch: an adapter file replacing the model's adapter (the constraint rows)

    @property
    def label(self) -> str:
        if self.backend == "torch":
            name = "torch fp8" if self.precision == "fp8" else "torch fp32"
            return f"{name}, constrained adapter" if self.adapter else name
        suffix = f" (build {self.build})" if self.build else ""
        return f"{self.backend} {self.precision}{suffix}"


@dataclass(frozen=True)
class Row:
    """One row of the evaluation: ``source`` (a :attr:`Source.key`) with request ``options`` (GenerationRequest
    fields, plus ``text_branch_steps``). ``paired_with``: the row it is compared with; ``precision_of``: the fp32
    row a reduced-precision row must stay within :data:`PRECISION_TOLERANCE` of."""

    name: str
    group: str
    source: str
    options: dict[str, Any] = field(default_factory=dict)
    paired_with: str | None = None
    precision_of: str | None = None


@dataclass(frozen=True)
class Plan:
    """What :data:`GROUPS` functions see: the sources, the reference source and row name, the model config, the
    adapter scales to sweep and the number of denoising steps."""

    sources: dict[str, Source]
    reference: Source
    config: DynaIPConfig
    scales: tuple[float, ...]
    steps: int
    dbim_lambdas: tuple[float, ...] = ()
    aux_noun: str | None = None

    @property
    def reference_row(self) -> str:
        return self.reference.label


def _baseline(plan: Plan) -> list[Row]:
    return [Row(BASELINE_ROW, "baseline", plan.reference.key, {"scales": 0.0}, plan.reference_row)]


def _backends(plan: Plan) -> list[Row]:
    """Every source at default options: torch fp32 (the reference when present), torch-fp8 against it, each
    build's ONNX Runtime fp32 against the reference and its fp16 / fp8 graphs and TensorRT engines against that."""
    rows = []
    for src in plan.sources.values():
        if src.key == plan.reference.key:
            rows.append(Row(src.label, "backends", src.key))
            continue
        if src.backend == "torch":
            fp32 = plan.sources["torch"].label
            rows.append(Row(src.label, "backends", src.key, paired_with=fp32, precision_of=fp32))
        elif src.precision == "fp32" and src.backend == "onnxruntime":
            rows.append(Row(src.label, "backends", src.key, paired_with=plan.reference_row))
        else:
            fp32 = Source(f"onnxruntime:{src.build}:fp32", "onnxruntime", src.build).label
            reduced = src.precision not in ("fp32", "tf32")
            rows.append(Row(src.label, "backends", src.key, paired_with=fp32, precision_of=fp32 if reduced else None))
    return rows


def _dds(plan: Plan) -> list[Row]:
    if "torch" not in plan.sources:
        raise InputError("the dds rows keep the text branch, which only the torch backend runs: drop --no-torch or "
                         "leave dds out of --rows")
    return [Row("text branch kept (no DDS)", "dds", "torch", {"text_branch_steps": plan.steps}, plan.reference_row)]


def _scale(plan: Plan) -> list[Row]:
    return [Row(f"adapter scale {s:g}", "scale", plan.reference.key, {"scales": float(s)}, plan.reference_row)
            for s in plan.scales if s not in (0.0, 1.0)]


LEVEL_NAMES = {3: ("low", "mid", "high")}


def _granularity(plan: Plan) -> list[Row]:
    n = plan.config.adapter.num_levels
    names = LEVEL_NAMES.get(n, tuple(f"level {i}" for i in range(n)))
    return [Row(f"granularity {name} only", "granularity", plan.reference.key,
                {"granularity": [float(i == j) for j in range(n)]}, plan.reference_row) for i, name in enumerate(names)]


def _blocks(plan: Plan) -> list[Row]:
    n = plan.config.injected_blocks
    return [Row(f"image branch in block {i} only", "blocks", plan.reference.key,
                {"block_scales": [float(i == j) for j in range(n)]}, plan.reference_row) for i in range(n)]


def _dbim(plan: Plan) -> list[Row]:
    aux = {} if plan.aux_noun is None else {"aux_noun": plan.aux_noun}
    return [Row(f"DBIM lambda {lam:g}", "dbim", plan.reference.key, {"dbim_lambda": float(lam), **aux},
                plan.reference_row) for lam in plan.dbim_lambdas]


CONSTRAINED_SOURCE = "torch-constrained"


def _constraint(plan: Plan) -> list[Row]:
    src = plan.sources.get(CONSTRAINED_SOURCE)
    if src is None:
        raise InputError("the constraint rows run an adapter trained with the attention constraint: give its file "
                         "(--constrained-adapter FILE, torch rows)")
    return [Row(src.label, "constraint", src.key, paired_with=plan.reference_row)]


GROUPS: dict[str, Callable[[Plan], list[Row]]] = {
    "baseline": _baseline, "backends": _backends, "dds": _dds, "scale": _scale, "granularity": _granularity,
    "blocks": _blocks, "dbim": _dbim, "constraint": _constraint,
}
DEFAULT_GROUPS = ("baseline", "backends", "dds", "scale", "granularity")
DEFAULT_SCALES = (0.0, 0.5, 1.0, 1.5, 2.0)
DEFAULT_DBIM_LAMBDAS = (-2.0, -1.0, 0.0, 1.0, 2.0)  # the paper's range


def plan_rows(plan: Plan, groups: Sequence[str]) -> list[Row]:
    """The rows of ``groups`` (names of :data:`GROUPS`), the reference row always included, names unique."""
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise InputError(f"unknown row group(s) {unknown}; choose from {sorted(GROUPS)}")
    rows = [Row(plan.reference_row, REFERENCE_ROW_GROUP, plan.reference.key)]
    for g in groups:
        rows += [r for r in GROUPS[g](plan) if r.name != plan.reference_row]
    names = [r.name for r in rows]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise InputError(f"rows {duplicated} would be evaluated twice; name each build once")
    return rows


# -------------------------------------------------------------------------------------------------- running
def request_options(options: dict[str, Any]) -> dict[str, Any]:
    """Row options -> :class:`GenerationRequest` keyword arguments (``text_branch_steps`` -> a
    :class:`TextBranchSchedule`)."""
    kw = dict(options)
    steps = kw.pop("text_branch_steps", None)
    if steps is not None:
        kw["text_branch"] = TextBranchSchedule(steps=int(steps))
    return kw


def dbim_words(item: Item, options: dict[str, Any]) -> dict[str, Any]:
    """DBIM's subject word of an item's generic prompt (``"object"``, or ``"objects"`` with several subjects, the
    auxiliary noun made plural too) when the row uses DBIM; ``{}`` otherwise."""
    if options.get("dbim_lambda") is None or "subject_word" in options:
        return {}
    if len(item.scene.placements) == 1:
        return {"subject_word": GENERIC_NOUN}
    aux = options.get("aux_noun")
    return {"subject_word": f"{GENERIC_NOUN}s", **({} if aux is None else {"aux_noun": f"{aux}s"})}


def generate(engine: DynaIPEngine, items: Sequence[Item], options: dict[str, Any], batch: int, steps: int | None,
             desc: str, progress: bool = True) -> list[np.ndarray]:
    """One image (``uint8 [H, W, 3]``) per item, ``batch`` requests per engine call."""
    kw = request_options(options)
    requests = [GenerationRequest(it.prompt, [Image.fromarray(r) for r in it.references], seed=it.seed, steps=steps,
                                  **{**kw, **dbim_words(it, options)}) for it in items]
    batch = max(1, min(batch, engine.max_batch or batch))
    images: list[np.ndarray] = []
    for i in progress_bar(range(0, len(requests), batch), desc, progress, total=math.ceil(len(requests) / batch)):
        images += [np.asarray(im.convert("RGB")) for im in engine.generate_batch(requests[i:i + batch])]
    return images


def summarize(verdicts: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    """Per metric: the rate over images (per-image verdicts) or over subjects (per-subject lists), with its Wilson
    interval."""
    keys = list(verdicts[0]) if verdicts else []
    return {k: rate([x for v in verdicts for x in (v[k] if isinstance(v[k], list) else [v[k]])]) for k in keys}


@dataclass
class RowResult:
    """A row's images and verdicts per kind (``one_subject``, ``two_subjects``), its summary, and timing."""

    row: Row
    computes: str
    images: dict[str, list[np.ndarray]]
    verdicts: dict[str, list[dict[str, Any]]]
    seconds: float
    similarity: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, dict[str, float | int]]]:
        return {kind: summarize(v) for kind, v in self.verdicts.items()}


def compare(a: RowResult, b: RowResult) -> dict[str, Any]:
    """Row ``a`` against the row it is paired with: per kind, the share of images whose verdicts all agree, the mean
    and max absolute pixel difference (0..255) and each metric's rate difference (``a - b``)."""
    out: dict[str, Any] = {"vs": b.row.name}
    sa, sb = a.summary(), b.summary()
    for kind in a.verdicts:
        agree = [va == vb for va, vb in zip(a.verdicts[kind], b.verdicts[kind])]
        diffs = [np.abs(x.astype(np.int16) - y.astype(np.int16)) for x, y in zip(a.images[kind], b.images[kind])]
        out[kind] = {"agreement": rate(agree),
                     "mean_abs_pixel": float(np.mean([d.mean() for d in diffs])) if diffs else math.nan,
                     "max_abs_pixel": int(max(d.max() for d in diffs)) if diffs else 0,
                     "delta": {m: sa[kind][m]["rate"] - sb[kind][m]["rate"] for m in sa[kind]}}
    return out


class Evaluation:
    """Runs rows on engines and scores them.

    Args:
        world: the world at the model's image size (references at the vision tower's size).
        items: :func:`evaluation_set`.
        scorer: reads the generated images.
        engines: ``{source key: () -> DynaIPEngine}``: each engine is created on first use and released after its
            last row.
        computes: ``{source key: what the engine actually computes}`` (filled from the engines when missing).
        batch: requests per engine call (capped by a build's profile); steps: denoising steps (config default).
        similarity: optional :class:`runtime.similarity.Similarity` for CLIP-I / CLIP-T / DINO.
    """

    def __init__(self, world: World, items: dict[str, list[Item]], scorer: WorldScorer,
                 engines: dict[str, Callable[[], DynaIPEngine]], batch: int = 16, steps: int | None = None,
                 similarity=None, progress: bool = True):
        self.world, self.items, self.scorer = world, items, scorer
        self.engines = engines
        self.batch, self.steps, self.similarity, self.progress = batch, steps, similarity, progress

    def run(self, rows: Sequence[Row]) -> list[RowResult]:
        """Every row, grouped by source (one engine alive at a time), results in the order of ``rows``."""
        first_use = {src: i for i, src in reversed(list(enumerate(r.source for r in rows)))}
        order = sorted(range(len(rows)), key=lambda i: first_use[rows[i].source])  # stable: row order per source
        results: dict[int, RowResult] = {}
        engine, current = None, None
        for i in order:
            row = rows[i]
            if row.source != current:
                engine = None  # release the previous engine before loading the next
                if row.source not in self.engines:
                    raise ConfigError(f"row {row.name!r} needs source {row.source!r}, which is not available")
                engine, current = self.engines[row.source](), row.source
            results[i] = self.run_row(engine, row)
        return [results[i] for i in range(len(rows))]

    def run_row(self, engine: DynaIPEngine, row: Row) -> RowResult:
        start = time.perf_counter()
        images, verdicts = {}, {}
        for kind, items in self.items.items():
            if not items:
                continue
            images[kind] = generate(engine, items, row.options, self.batch, self.steps, f"{row.name} ({kind})",
                                    self.progress)
            readings = self.scorer.read(images[kind], KINDS[kind])
            verdicts[kind] = [judge(it.scene, r) for it, r in zip(items, readings)]
        result = RowResult(row, computes_label(engine), images, verdicts, time.perf_counter() - start)
        if self.similarity is not None:
            result.similarity = {kind: self.similarity.scores(images[kind], [self.canonical(it) for it in items],
                                                              [it.prompt for it in items])
                                 for kind, items in self.items.items() if items}
        logger.info("%s: %s (%.0f s)", row.name, brief(result), result.seconds)
        return result

    def canonical(self, item: Item) -> list[np.ndarray]:
        """The canonical (unaugmented) reference view of each subject of ``item``: what CLIP-I and DINO compare the
        generated image with (DreamBench compares with real photos of the subject, not the conditioning image)."""
        return [self.world.reference(s, np.random.default_rng(0), augment=False) for s in item.scene.subjects]


def computes_label(engine: DynaIPEngine) -> str:
    """What an engine actually computes, in words (the precision a graph is stored in is not always the one its
    arithmetic runs in)."""
    st = engine.stages
    if engine.backend == "torch":
        dtype = str(st.dtype).removeprefix("torch.")
        device = st.device.type
        if st.transformer is not st.models.transformer:
            kernel = "CPU reference kernel" if device == "cpu" else "FP8 tensor cores"
            return (f"PyTorch on {device}: DiT block linears as FP8 E4M3 GEMMs (torch._scaled_mm, {kernel}, dynamic "
                    f"per-tensor input scales), everything else {dtype}")
        return f"PyTorch {dtype} on {device}"
    if engine.backend == "onnxruntime":
        graphs = {m: st.manifest.models[m].graphs() for m in st.files}
        used = {m: next(p for p, f in graphs[m].items() if f == st.files[m]) for m in st.files}
        parts = ", ".join(f"{m} {p}" for m, p in used.items())
        note = ""
        if st.device_type == "cpu" and any(p != "fp32" for p in used.values()):
            # measured on onnxruntime 1.32: its CPU provider has no fp16 kernels for MatMul, Gemm, LayerNormalization
            # and more, and inserts casts around them (the optimized graph shows them)
            note = ("; the CPU provider runs the fp16 graphs' MatMul/Gemm/LayerNorm (and other ops without an fp16 "
                    "CPU kernel) in fp32 between inserted casts: fp16 rounding between ops, fp32 arithmetic")
            if "fp8" in used.values():
                note += "; the fp8 DiT (an fp16 graph) rounds GEMM inputs and weights to E4M3 (Q/DQ), GEMMs in fp32"
        return f"ONNX Runtime {st.device_type.upper()} graphs: {parts}{note}"
    precision = (st.manifest.tensorrt or {}).get("precision", "?")
    return f"TensorRT engines ({precision}, strongly typed) on the GPU"


def brief(result: RowResult) -> str:
    s = result.summary()
    parts = [f"{k}: " + ", ".join(f"{m} {v['rate']:.2f}" for m, v in s[k].items() if m in TABLE_METRICS[k])
             for k in s]
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """A rate of the reference row that must reach ``threshold``."""

    kind: str
    metric: str
    threshold: float

    @property
    def name(self) -> str:
        return f"{self.kind.replace('_', ' ')}: {self.metric} >= {self.threshold:g}"


TARGETS = (Target("one_subject", "colour", 0.90), Target("one_subject", "shape", 0.60),
           Target("one_subject", "pattern", 0.60), Target("one_subject", "setting", 0.95),
           Target("one_subject", "position", 0.95), Target("two_subjects", "colour", 0.75))
CHANCE_ATTRIBUTES = ("colour", "shape")


def check_targets(results: Sequence[RowResult], reference_row: str) -> list[dict[str, Any]]:
    """Every target of issue 14 that the rows evaluated allow to check: ``{"target", "row", "value", "lo", "hi",
    "threshold", "met"}`` (``value`` is a rate, a rate difference or, for the baseline, the chance level)."""
    by_name = {r.row.name: r for r in results}
    out = []
    ref = by_name[reference_row].summary()
    for t in TARGETS:
        if t.kind in ref and t.metric in ref[t.kind]:
            v = ref[t.kind][t.metric]
            out.append({"target": t.name, "row": reference_row, "value": v["rate"], "lo": v["lo"], "hi": v["hi"],
                        "threshold": t.threshold, "met": bool(v["rate"] >= t.threshold)})
    base = by_name.get(BASELINE_ROW)
    if base is not None and "one_subject" in base.verdicts:
        s = base.summary()["one_subject"]
        for attr in CHANCE_ATTRIBUTES:
            c, v = chance(attr), s[attr]
            out.append({"target": f"baseline one subject: {attr} at chance ({c:.3f} inside the 95% interval)",
                        "row": BASELINE_ROW, "value": v["rate"], "lo": v["lo"], "hi": v["hi"], "threshold": c,
                        "met": bool(v["lo"] <= c <= v["hi"])})
    for r in results:
        if r.row.precision_of is None or r.row.precision_of not in by_name:
            continue
        mine, theirs = r.summary(), by_name[r.row.precision_of].summary()
        for t in TARGETS:
            if t.kind in mine and t.metric in mine[t.kind]:
                d = mine[t.kind][t.metric]["rate"] - theirs[t.kind][t.metric]["rate"]
                out.append({"target": f"{t.kind.replace('_', ' ')}: {t.metric} within {PRECISION_TOLERANCE:g} of "
                                      f"{r.row.precision_of}", "row": r.row.name, "value": d, "lo": None, "hi": None,
                            "threshold": PRECISION_TOLERANCE, "met": bool(abs(d) <= PRECISION_TOLERANCE)})
    return out


# ------------------------------------------------------------------------------------------------- reporting
TABLE_METRICS = {"one_subject": ("colour", "shape", "pattern", "setting", "position", "all_present"),
                 "two_subjects": ("colour", "shape", "pattern", "all_present")}
SHORT = {"one_subject": "1", "two_subjects": "2", "all_present": "present", "position": "pos", "pattern": "pattern",
         "setting": "setting"}


def report(results: Sequence[RowResult], targets: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON report: ``meta`` (command, config, scenes, scorer...), one entry per row (source, what it computes,
    options, rates with intervals, the paired comparison, real metrics), the targets."""
    by_name = {r.row.name: r for r in results}
    rows = []
    for r in results:
        entry = {"name": r.row.name, "group": r.row.group, "source": r.row.source, "computes": r.computes,
                 "options": r.row.options, "seconds": round(r.seconds, 2), **r.summary()}
        if r.row.paired_with in by_name:
            entry["paired"] = compare(r, by_name[r.row.paired_with])
        if r.similarity:
            entry["similarity"] = r.similarity
        rows.append(entry)
    return {"tool": "dynaip-trt evaluate", "version": 1, **meta, "rows": rows, "targets": targets}


def table(data: dict[str, Any]) -> str:
    """The JSON report as plain-text tables: rates per row (1 = one subject, 2 = two subjects), the paired
    comparison, real metrics when measured, then the targets and what each row computes."""
    cols = [(k, m) for k, ms in TABLE_METRICS.items() for m in ms]
    heads = [f"{SHORT[k]}:{SHORT.get(m, m)}" for k, m in cols]
    width = max(len(r["name"]) for r in data["rows"]) + 2
    sim = sorted({m for r in data["rows"] for kind in r.get("similarity", {}).values() for m in kind})
    lines = [f"{'row':<{width}}" + "".join(f"{h:>11}" for h in heads) + f"{'agree':>8}{'|dpx|':>7}"
             + "".join(f"{m:>8}" for m in sim)]
    for r in data["rows"]:
        cells = "".join(f"{r[k][m]['rate']:>11.3f}" if k in r and m in r[k] else f"{'-':>11}" for k, m in cols)
        paired = r.get("paired")
        if paired:
            agree = [paired[k]["agreement"]["rate"] for k in KINDS if k in paired]
            px = [paired[k]["mean_abs_pixel"] for k in KINDS if k in paired]
            cells += f"{min(agree):>8.3f}{max(px):>7.2f}"
        else:
            cells += f"{'-':>8}{'-':>7}"
        for m in sim:
            vals = [v[m] for v in r.get("similarity", {}).values() if m in v]
            cells += f"{np.mean(vals):>8.3f}" if vals else f"{'-':>8}"
        lines.append(f"{r['name']:<{width}}" + cells)
    lines += ["", "agree: share of images whose verdicts all match the paired row's (the lower of 1 and 2 subjects); "
              "|dpx|: mean absolute pixel difference to it (0..255)", "", "Targets:"]
    for t in data["targets"]:
        ci = f" [{t['lo']:.3f}, {t['hi']:.3f}]" if t["lo"] is not None else ""
        lines.append(f"  {'met    ' if t['met'] else 'NOT MET'}  {t['target']:<58} {t['row']}: {t['value']:+.3f}{ci}")
    lines += ["", "What each row computes:"]
    seen = {}
    for r in data["rows"]:
        seen.setdefault(r["computes"], []).append(r["name"])
    lines += [f"  {', '.join(names)}: {what}" for what, names in seen.items()]
    return "\n".join(lines)
