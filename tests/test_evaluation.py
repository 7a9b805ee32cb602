"""The quality evaluation (``runtime.evaluate``): the shipped scorer reads world renders, verdicts and intervals are
right, the evaluation set is balanced and deterministic, rows are planned as documented, the CLI runs end to end on
the tiny-random family (torch, ONNX Runtime fp32 and fp16) with paired comparisons and targets, checks its
arguments before any work, and stays off torch on the lean path; CLIP-I / CLIP-T / DINO work on tiny random models
saved to disk. (Numbers on random weights are meaningless; the mechanics are real.)"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dynaip_trt.configs import get_config
from dynaip_trt.demo.verdicts import SCORER_DIR, SCORER_FILE, SCORER_METADATA, Reading, RegionReading, chance, \
    judge, regions, wilson
from dynaip_trt.demo.world import COLOURS, LAYOUTS, World
from dynaip_trt.errors import ConfigError, InputError, WeightsError
from runtime.evaluate import main
from runtime.evaluation import DEFAULT_GROUPS, Plan, Source, evaluation_set, plan_rows, table
from runtime.scorer import WorldScorer

ROOT = Path(__file__).resolve().parents[1]
WORLD = World(size=32, reference_size=32)
# the shipped scorer's accuracy on fresh exact renders of held-out subjects is ~0.99 per verdict (scorer.json);
# these floors leave room for the sampling noise of 96 scenes
SCORER_FLOORS = {"setting": 0.95, "position": 0.95, "count": 0.9, "colour": 0.95, "shape": 0.9, "pattern": 0.9}


# ------------------------------------------------------------------------------------------- verdicts, scorer
def test_wilson_interval_known_values():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == 1.0
    assert all(np.isnan(wilson(0, 0)))


def test_regions_split_the_columns_by_layout_position():
    assert [r.nonzero()[0].tolist() for r in regions(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [r.nonzero()[0].tolist() for r in regions(3)] == [[0, 1, 2], [3, 4], [5, 6, 7]]
    assert regions(1)[0].all()


def _region(subject, present=True, **changes):
    names = {"shape": subject.shape, "colour": subject.colour, "pattern": subject.pattern, **changes}
    return RegionReading(present, 4.0 if present else 0.1, **names)


def test_judge_assigns_subjects_to_regions_and_catches_blends_and_absences():
    rng = np.random.default_rng(0)
    a, b = [s for s in WORLD.split("heldout") if s.colour in ("red", "blue")][:2]
    scene = WORLD.sample_scene(rng, subjects=[a, b], setting="beach")
    left_to_right = tuple(_region(p.subject) for p in sorted(scene.placements, key=lambda p: p.cx))
    v = judge(scene, Reading("beach", "left", 2, left_to_right))
    assert v == {"setting": True, "count": True, "all_present": True, "shape": [True, True],
                 "colour": [True, True], "pattern": [True, True]}
    blended = judge(scene, Reading("beach", "left", 2, (_region(a), _region(a))))  # both regions show subject a
    assert blended["colour"] == [True, False] and not blended["all_present"]
    absent = judge(scene, Reading("snow", "left", 1, (_region(a), _region(b, present=False))))
    assert not absent["setting"] and not absent["count"] and not absent["all_present"]
    assert absent["colour"].count(False) == 1 and absent["shape"].count(False) == 1
    one = WORLD.sample_scene(rng, subjects=[a], setting="night", positions=["right"])
    wrong = judge(one, Reading("night", "left", 1, (_region(a, colour="green"),)))
    assert wrong["position"] is False and wrong["colour"] == [False] and wrong["shape"] == [True]
    with pytest.raises(InputError, match="num_subjects=1"):
        judge(one, Reading("night", "left", 1, (_region(a), _region(b))))


@pytest.fixture(scope="module")
def scorer():
    return WorldScorer()


@pytest.mark.parametrize("size", [32, 64])
def test_shipped_scorer_reads_fresh_renders_of_heldout_subjects(scorer, size):
    """The shipped ONNX scorer, through the evaluation's reading code, on exact renders it never saw (held-out
    subjects, new seed), at the tiny default's 32 px and at tiny-random's 64 px (area-resized)."""
    world = World(size=size, reference_size=32)
    rng = np.random.default_rng(2024)
    for n in (1, 2):
        scenes = [world.sample_scene(rng, n, split="heldout") for _ in range(48)]
        readings = scorer.read([world.render(s)[0] for s in scenes], n)
        verdicts = [judge(s, r) for s, r in zip(scenes, readings)]
        for metric, floor in SCORER_FLOORS.items():
            if metric == "position" and n == 2:
                continue
            hits = [x for v in verdicts for x in (v[metric] if isinstance(v[metric], list) else [v[metric]])]
            assert np.mean(hits) >= floor, (n, metric, np.mean(hits))


def test_scorer_metadata_records_training_and_accuracy():
    meta = json.loads((SCORER_DIR / SCORER_METADATA).read_text())
    assert meta["command"].startswith("python -m dynaip_trt.demo.scorer")
    held = meta["accuracy_on_fresh_renders"]["heldout"]
    assert held["1"]["colour"]["rate"] >= 0.95 and held["2"]["all_present"]["rate"] >= 0.9
    assert (SCORER_DIR / SCORER_FILE).stat().st_size < 2 * 2**20


def test_scorer_integrity_is_checked(tmp_path):
    folder = tmp_path / "scorer"
    shutil.copytree(SCORER_DIR, folder)
    data = bytearray((folder / SCORER_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / SCORER_FILE).write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match the SHA-256"):
        WorldScorer(folder)
    (folder / SCORER_METADATA).unlink()
    with pytest.raises(WeightsError, match="needs scorer.onnx and scorer.json"):
        WorldScorer(folder)


def test_chance_levels():
    assert chance("colour") == pytest.approx(1 / len(COLOURS)) and chance("shape") == 0.25


# ------------------------------------------------------------------------------------------ set and row plans
def test_evaluation_set_is_heldout_balanced_and_deterministic():
    items = evaluation_set(WORLD, 24, 10, seed=3)
    held = {s.index for s in WORLD.split("heldout")}
    ones, twos = items["one_subject"], items["two_subjects"]
    assert len(ones) == 24 and len(twos) == 10
    counts = np.bincount([it.scene.subjects[0].index for it in ones], minlength=72)
    assert set(np.nonzero(counts)[0]) == held and set(counts[list(held)]) == {2}  # every held-out subject twice
    for it in twos:
        a, b = it.scene.subjects
        assert {a.index, b.index} <= held and a.colour != b.colour
        assert it.prompt.startswith("two objects") and len(it.references) == 2
    assert len({it.seed for it in ones + twos}) == 34
    assert {it.scene.positions[0] for it in ones} == set(LAYOUTS[1])
    again = evaluation_set(WORLD, 24, 10, seed=3)
    assert all(a.scene == b.scene and a.seed == b.seed and all(np.array_equal(x, y) for x, y in
                                                                 zip(a.references, b.references))
               for a, b in zip(ones + twos, again["one_subject"] + again["two_subjects"]))
    other = evaluation_set(WORLD, 24, 0, seed=4)["one_subject"]
    assert any(a.scene != b.scene for a, b in zip(ones, other))
    full = evaluation_set(WORLD, 144, 60)
    assert len({(it.scene.subjects[0].index, it.scene.setting, it.scene.positions[0]) for it in full["one_subject"]}) \
        == 144
    assert len({frozenset(s.index for s in it.scene.subjects) for it in full["two_subjects"]}) == 60


def _plan(torch: bool = True, precisions=("fp32", "fp16", "fp8")) -> Plan:
    srcs = {}
    if torch:
        srcs = {"torch": Source("torch", "torch"), "torch-fp8": Source("torch-fp8", "torch", precision="fp8")}
    for p in precisions:
        srcs[f"onnxruntime:0:{p}"] = Source(f"onnxruntime:0:{p}", "onnxruntime", 0, p)
    ref = srcs["torch"] if torch else srcs["onnxruntime:0:fp32"]
    return Plan(srcs, ref, get_config("tiny-random"), (0.0, 0.5, 1.0, 2.0), 4)


def test_plan_rows_pairs_each_row_with_its_reference():
    rows = {r.name: r for r in plan_rows(_plan(), [*DEFAULT_GROUPS, "blocks"])}
    assert list(rows)[:2] == ["torch fp32", "adapter scale 0"]
    assert rows["adapter scale 0"].options == {"scales": 0.0} and rows["adapter scale 0"].paired_with == "torch fp32"
    assert rows["onnxruntime fp32"].paired_with == "torch fp32" and rows["onnxruntime fp32"].precision_of is None
    assert rows["onnxruntime fp16"].precision_of == rows["onnxruntime fp8"].precision_of == "onnxruntime fp32"
    assert rows["torch fp8"].precision_of == "torch fp32"
    assert rows["text branch kept (no DDS)"].options == {"text_branch_steps": 4}
    assert [n for n in rows if n.startswith("adapter scale")] == ["adapter scale 0", "adapter scale 0.5",
                                                                   "adapter scale 2"]
    assert rows["granularity mid only"].options == {"granularity": [0.0, 1.0, 0.0]}
    assert rows["image branch in block 1 only"].options == {"block_scales": [0.0, 1.0]}  # tiny-random: 2 blocks
    lean = {r.name: r for r in plan_rows(_plan(torch=False), ["baseline", "backends", "scale"])}
    assert lean["adapter scale 0"].source == "onnxruntime:0:fp32" and "torch fp32" not in lean
    with pytest.raises(InputError, match="only the torch backend"):
        plan_rows(_plan(torch=False), ["dds"])
    with pytest.raises(InputError, match="unknown row group"):
        plan_rows(_plan(), ["speed"])


# ---------------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def similarity_models(tmp_path_factory):
    """Tiny random CLIP (with a character-level tokenizer) and DINO (ViT) models saved as local folders."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, Dinov2Config, Dinov2Model, \
        BitImageProcessor

    out = tmp_path_factory.mktemp("similarity")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in map(chr, range(33, 127)):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0,
                                                 eos_token_id=1, pad_token_id=1, intermediate_size=64, **small),
                                vision_config=dict(image_size=32, patch_size=8, intermediate_size=64, **small),
                                projection_dim=16))
    clip.save_pretrained(out / "clip")
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(out / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out / "clip")
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, mlp_ratio=2, **small)).save_pretrained(out / "dino")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out / "dino")
    return out


@pytest.fixture(scope="module")
def evaluated(tiny_build, similarity_models, tmp_path_factory):
    """One CLI run on tiny-random: torch fp32 (reference), scale 0, torch-fp8, ONNX Runtime fp32 and fp16, the
    text branch kept, scale 2; 6 one-subject and 3 two-subject scenes; CLIP-I / CLIP-T / DINO on. (``--threads 1``:
    two torch threads crawl on a busy 2-core machine; the test process's setting is restored.)"""
    import torch

    out = tmp_path_factory.mktemp("eval") / "eval.json"
    threads = torch.get_num_threads()
    try:
        code = main(["--config", "tiny-random", "--engine-dir", str(tiny_build), "--rows",
                     "baseline,backends,dds,scale", "--scales", "2", "--scenes", "6,3", "--threads", "1", "--json",
                     str(out), "--clip-model", str(similarity_models / "clip"), "--dino-model",
                     str(similarity_models / "dino")])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return json.loads(out.read_text()), out


def test_onnxruntime_rows_run_the_fp8_graph_onnxruntime_can_run(tiny_build):
    """A build exported with --fp8 holds dit.fp8-bf16.onnx (for TensorRT; ONNX Runtime's CPU provider has no bf16
    MatMul) and dit.fp8-fp16.onnx: the fp8 row is the --precision fp8 of runtime.generate, the fp16-based graph."""
    from dynaip_trt.manifest import Manifest
    from runtime.evaluate import runtime_precisions

    m = Manifest.load(tiny_build)
    assert runtime_precisions(m) == ["fp32", "fp16"]
    m.models["dit"].variants.update({"fp8-bf16": "dit.fp8-bf16.onnx", "fp8-fp16": "dit.fp8-fp16.onnx"})
    assert runtime_precisions(m) == ["fp32", "fp16", "fp8"]
    del m.models["dit"].variants["fp8-fp16"]
    assert runtime_precisions(m) == ["fp32", "fp16"]


def test_evaluate_reports_every_row_with_rates_and_intervals(evaluated):
    data, _ = evaluated
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ["torch fp32", "adapter scale 0", "torch fp8", "onnxruntime fp32", "onnxruntime fp16",
                          "text branch kept (no DDS)", "adapter scale 2"]
    assert data["reference_row"] == "torch fp32" and data["config"] == "tiny-random"
    assert data["scenes"] == {"one_subject": 6, "two_subjects": 3, "seed": 0, "steps": 4, "subjects": "held-out"}
    for r in rows.values():
        one, two = r["one_subject"], r["two_subjects"]
        assert one["colour"]["n"] == 6 and one["setting"]["n"] == 6 and two["colour"]["n"] == 6
        assert two["all_present"]["n"] == 3 and "position" not in two
        for v in [*one.values(), *two.values()]:
            assert 0 <= v["lo"] <= v["rate"] <= v["hi"] <= 1 and v["rate"] == v["hits"] / v["n"]
        assert set(r["similarity"]["one_subject"]) == {"clip_i", "clip_t", "dino"}
        assert all(-1 <= x <= 1 for k in r["similarity"].values() for x in k.values())
    assert "fp32" in rows["onnxruntime fp16"]["computes"] and "fp16" in rows["onnxruntime fp16"]["computes"]
    assert "_scaled_mm" in rows["torch fp8"]["computes"]


def test_evaluate_pairs_backends_verdict_by_verdict(evaluated):
    """ONNX Runtime fp32 reproduces torch fp32 image for image (same verdicts, < 0.1/255 mean pixel difference);
    fp16 stays close to fp32; scale 0 differs from scale 1 (the adapter acts, even with random weights)."""
    rows = {r["name"]: r for r in evaluated[0]["rows"]}
    for name, vs, px, agree in (("onnxruntime fp32", "torch fp32", 0.1, 1.0),
                                ("onnxruntime fp16", "onnxruntime fp32", 1.0, 0.6)):
        paired = rows[name]["paired"]
        assert paired["vs"] == vs
        for kind in ("one_subject", "two_subjects"):
            assert paired[kind]["agreement"]["rate"] >= agree, (name, kind)
            assert paired[kind]["mean_abs_pixel"] < px, (name, kind, paired[kind]["mean_abs_pixel"])
            for metric, d in paired[kind]["delta"].items():
                assert d == rows[name][kind][metric]["rate"] - rows[vs][kind][metric]["rate"]
    assert rows["adapter scale 0"]["paired"]["one_subject"]["max_abs_pixel"] > 0
    assert "paired" not in rows["torch fp32"]


def test_evaluate_checks_the_targets(evaluated):
    data, _ = evaluated
    targets = {(t["row"], t["target"]): t for t in data["targets"]}
    ref = targets[("torch fp32", "one subject: colour >= 0.9")]
    rate = {r["name"]: r for r in data["rows"]}["torch fp32"]["one_subject"]["colour"]["rate"]
    assert ref["value"] == rate and ref["met"] == (rate >= 0.9)
    base = [t for t in data["targets"] if t["row"] == "adapter scale 0"]
    assert len(base) == 2 and all(t["met"] == (t["lo"] <= t["threshold"] <= t["hi"]) for t in base)
    rows = {r["name"]: r for r in data["rows"]}
    fp16 = [t for t in data["targets"] if t["row"] == "onnxruntime fp16"]
    assert len(fp16) == 6 and all(t["met"] == (abs(t["value"]) <= 0.03) for t in fp16)
    colour = next(t for t in fp16 if t["target"].startswith("one subject: colour"))
    assert colour["value"] == (rows["onnxruntime fp16"]["one_subject"]["colour"]["rate"]
                               - rows["onnxruntime fp32"]["one_subject"]["colour"]["rate"])
    text = table(data)
    assert text.count("NOT MET") == sum(not t["met"] for t in data["targets"]) and "What each row computes" in text


def test_evaluate_rewrites_its_own_report_but_nothing_else(evaluated, tiny_build, tmp_path, caplog):
    _, out = evaluated
    base = ["--config", "tiny-random", "--engine-dir", str(tiny_build), "--no-torch", "--rows", "baseline",
            "--scenes", "2,0", "--threads", "1"]
    assert main([*base, "--json", str(out)]) == 0  # a report of ours: replaced
    assert [r["name"] for r in json.loads(out.read_text())["rows"]] == ["onnxruntime fp32", "adapter scale 0"]
    assert main([*base, "--json", str(out), "--strict"]) == 1  # random weights miss the targets
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    caplog.clear()
    assert main([*base, "--json", str(foreign)]) == 2
    assert foreign.read_text() == '{"mine": 1}' and "--json" in caplog.records[-1].getMessage()


@pytest.mark.parametrize("args, message", [
    (["--rows", "baseline,speed"], "--rows: unknown group(s) speed"),
    (["--scenes", "a,b"], "--scenes 'a,b'"),
    (["--scenes", "4"], "expected 2 comma-separated values"),
    (["--scenes", "0,0"], "not both 0"),
    (["--scales", "1,nan"], "--scales"),
    (["--no-torch"], "--no-torch leaves no rows"),
    (["--no-torch", "--engine-dir", "x", "--rows", "dds"], "only the torch backend runs"),
    (["--engine-dir", "{tmp}/none"], "the build folder does not exist"),
    (["--json", "{tmp}"], "is a folder"),
    (["--json", "{tmp}/missing/e.json"], "cannot write there (no such folder)"),
    (["--clip-model", "{tmp}/none"], "--clip-model"),
    (["--config", "nope"], "unknown config"),
    (["--base", "{tmp}"], "--base and --clip must be given together"),
])
def test_evaluate_bad_input_is_one_line_before_any_work(args, message, tmp_path, caplog):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    caplog.set_level(logging.ERROR, logger="runtime.evaluate")
    assert main(args) == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and message in errors[0].getMessage(), [r.getMessage() for r in errors]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_evaluate_builds_from_another_config_are_refused(tiny_build, caplog):
    assert main(["--config", "flux-dev", "--engine-dir", str(tiny_build), "--scenes", "1,0"]) == 2
    assert "exported from config tiny-random" in caplog.records[-1].getMessage()


def test_lean_evaluation_loads_no_torch(tiny_build, tmp_path):
    """With --no-torch the evaluation (ONNX Runtime rows, ONNX scorer) never imports torch or transformers."""
    code = ("import sys, runpy\n"
            f"sys.argv = ['runtime.evaluate', '--engine-dir', {str(tiny_build)!r}, '--no-torch', '--rows', "
            f"'baseline', '--scenes', '2,1', '--threads', '1', '--json', {str(tmp_path / 'e.json')!r}]\n"
            "try:\n    runpy.run_module('runtime.evaluate', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print('loaded:', ','.join(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("loaded:"), run.stdout[-500:]
    assert "Targets:" in run.stdout and (tmp_path / "e.json").is_file()


# -------------------------------------------------------------------------------------------- real metrics
def test_similarity_on_tiny_random_models(similarity_models):
    from runtime.similarity import Similarity

    sim = Similarity(similarity_models / "clip", similarity_models / "dino")
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(3))
    same = sim.scores([a, b], [[a], [b]], ["a red circle", "two objects"])
    assert same["clip_i"] == pytest.approx(1.0, abs=1e-5) and same["dino"] == pytest.approx(1.0, abs=1e-5)
    other = sim.scores([a, b], [[b], [c]], ["a red circle", "two objects"])
    assert other["clip_i"] < 1 - 1e-4 and other["dino"] < 1 - 1e-4
    mixed = sim.scores([a], [[a, b]], ["x"])  # the mean over an image's subjects
    expected = (1 + float((sim.clip_image_embeddings([a]) * sim.clip_image_embeddings([b])).sum())) / 2
    assert mixed["clip_i"] == pytest.approx(expected, abs=1e-5)
    t1, t2 = sim.clip_text_embeddings(["a red circle", "blue stars at night"])
    assert abs(float(np.linalg.norm(t1)) - 1) < 1e-5 and float(t1 @ t2) < 1 - 1e-4
    assert sim.metrics == ("clip_i", "clip_t", "dino")
    with pytest.raises(ConfigError, match="--clip-model .*holds a 'dinov2' model, not a CLIP model"):
        Similarity(clip_dir=similarity_models / "dino")
    with pytest.raises(ConfigError, match="--dino-model .*holds a 'clip' model"):
        Similarity(dino_dir=similarity_models / "clip")
    with pytest.raises(ConfigError, match="--dino-model .*cannot load a transformers config"):
        Similarity(dino_dir=similarity_models)  # a folder, but no model in it
    with pytest.raises(InputError, match="no such folder"):
        Similarity(dino_dir=similarity_models / "missing")
