"""CI quality guard (issue 14, item 6): a small subset of the evaluation that fails when personalization breaks.

On the trained default (config ``tiny``, its weights in the package) it exports the model (fp32 + fp16
graphs), runs ``runtime.evaluate`` on a subset of the held-out scenes (:data:`SCENES`) with the baseline and backend
rows (torch fp32, torch-fp8, ONNX Runtime fp32 and fp16) and asserts :data:`GUARD`: issue 14's targets on the
reference row, or, where the trained model falls short of one, the figure its full evaluation reached minus a
stated margin; the subset compares reduced precisions with fp32 through paired verdicts and image differences
(:data:`PAIRED`) instead of the full evaluation's 0.03 rule; the scale-0 baseline stays at chance for colour and
shape. The guard itself is checked on ``tiny-random``: a model that does not personalize must fail it.
"""

from __future__ import annotations

import json
from pathlib import Path

from dynaip_trt.demo.verdicts import chance
from runtime.evaluate import main

SCENES = "24,12"  # one-subject scenes (every held-out subject twice), two-subject scenes
ROWS = "baseline,backends"

# Floors of the reference row's rates on the subset: issue 14's targets where the trained default meets them on the
# full evaluation, else the rate that evaluation reached minus MARGIN (docs/model-card-tiny.md: python -m
# runtime.evaluate --config tiny --engine-dir build/tiny, a build exported with --fp16 --fp8; one subject colour
# 0.889, shape 0.243, two subjects colour 0.525). The subset itself reaches colour 0.875, shape 0.333, pattern 0.625,
# setting and position 1.000, two-subject colour 0.625 (python -m runtime.evaluate --config tiny --engine-dir
# build/tiny --rows baseline,backends --scenes 24,12).
MARGIN = 0.05
GUARD: dict[tuple[str, str], float] = {
    ("one_subject", "colour"): round(0.889 - MARGIN, 3),
    ("one_subject", "shape"): round(0.243 - MARGIN, 3),
    ("one_subject", "pattern"): 0.60,
    ("one_subject", "setting"): 0.95,
    ("one_subject", "position"): 0.95,
    ("two_subjects", "colour"): round(0.525 - MARGIN, 3),
}
# Paired rows on the subset: (least share of images with identical verdicts, largest mean |pixel difference| in
# 0..255) against the row each is paired with (ONNX Runtime fp32 vs torch fp32; fp16 vs ONNX Runtime fp32; torch
# fp8 vs torch fp32).
PAIRED: dict[str, tuple[float, float]] = {
    "onnxruntime fp32": (0.95, 0.5),
    "onnxruntime fp16": (0.90, 2.0),
    "torch fp8": (0.85, 4.0),
}
BASELINE = "adapter scale 0"


def guard_failures(data: dict, guard: dict[tuple[str, str], float] = GUARD,
                   paired: dict[str, tuple[float, float]] = PAIRED) -> list[str]:
    """Every way an evaluation report misses the guard, one line each (empty when it passes)."""
    rows = {r["name"]: r for r in data["rows"]}
    ref = rows[data["reference_row"]]
    fails = [f"{data['reference_row']} {kind} {metric} {ref[kind][metric]['rate']:.3f} < {floor}"
             for (kind, metric), floor in guard.items() if ref[kind][metric]["rate"] < floor]
    for name, (agree, pixels) in paired.items():
        if name not in rows:
            fails.append(f"row {name} missing")
            continue
        for kind in ("one_subject", "two_subjects"):
            p = rows[name]["paired"][kind]
            if p["agreement"]["rate"] < agree:
                fails.append(f"{name} {kind}: verdicts agree with {rows[name]['paired']['vs']} on "
                             f"{p['agreement']['rate']:.3f} of images < {agree}")
            if p["mean_abs_pixel"] > pixels:
                fails.append(f"{name} {kind}: mean |pixel difference| {p['mean_abs_pixel']:.2f} > {pixels}")
    base = rows[BASELINE]["one_subject"]
    for attr in ("colour", "shape"):
        if not base[attr]["lo"] <= chance(attr) <= base[attr]["hi"]:
            fails.append(f"{BASELINE} {attr} {base[attr]['rate']:.3f} [{base[attr]['lo']:.3f}, "
                         f"{base[attr]['hi']:.3f}] excludes chance {chance(attr):.3f}")
    return fails


def run_guard(config: str, build: Path, out: Path, scenes: str = SCENES) -> dict:
    import torch

    threads = torch.get_num_threads()
    try:
        code = main(["--config", config, "--engine-dir", str(build), "--rows", ROWS, "--scenes", scenes,
                     "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return json.loads(out.read_text())


def test_the_guard_fails_a_model_that_does_not_personalize(tiny_build, tmp_path):
    """tiny-random's random weights give chance-level colour: the guard must say so, naming the metric."""
    data = run_guard("tiny-random", tiny_build, tmp_path / "guard.json", scenes="12,6")
    fails = guard_failures(data)
    assert any(f.startswith("torch fp32 one_subject colour") for f in fails), fails
    ref = {r["name"]: r for r in data["rows"]}["torch fp32"]
    reached = {key: ref[key[0]][key[1]]["rate"] for key in GUARD}  # floors at the reached rates: met exactly
    assert not [f for f in guard_failures(data, guard=reached, paired={}) if f.startswith("torch fp32")]
    # the paired rows of the same run are real comparisons: ONNX Runtime fp32 reproduces torch fp32
    assert not [f for f in fails if f.startswith("onnxruntime fp32")], fails


def test_trained_default_meets_the_quality_targets(trained_build, tmp_path):
    data = run_guard("tiny", trained_build, tmp_path / "guard.json")
    assert not guard_failures(data), guard_failures(data)
