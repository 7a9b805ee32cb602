"""The evaluation rows of DCI's DBIM (a lambda sweep, plotted by ``runtime.plot_dbim``) and of MM-Diff's attention
constraint (an adapter trained with it, in the mode it was trained in), on tiny-random with a few scenes."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from PIL import Image

from dynaip_trt.errors import InputError
from dynaip_trt.models import build_models
from dynaip_trt.training import adapter_parameters, synthetic_batch, train_step
from dynaip_trt.weights import save_adapter
from runtime.evaluate import main as evaluate_main
from runtime.evaluation import CONSTRAINED_SOURCE, Plan, Source, plan_rows
from runtime.plot_dbim import main as plot_main


def test_dbim_and_constraint_rows(tiny_cfg):
    torch_src = Source("torch", "torch")
    constrained = Source(CONSTRAINED_SOURCE, "torch", adapter="c.safetensors")
    plan = Plan({"torch": torch_src, CONSTRAINED_SOURCE: constrained}, torch_src, tiny_cfg, (), 4, (-1.0, 2.0), "toy")
    rows = {r.name: r for r in plan_rows(plan, ["dbim", "constraint"])}
    assert list(rows) == ["torch fp32", "DBIM lambda -1", "DBIM lambda 2", "torch fp32, constrained adapter"]
    assert rows["DBIM lambda 2"].options == {"dbim_lambda": 2.0, "aux_noun": "toy"}
    assert rows["torch fp32, constrained adapter"].source == CONSTRAINED_SOURCE
    assert all(r.paired_with == "torch fp32" for r in list(rows.values())[1:])
    with pytest.raises(InputError, match="--constrained-adapter FILE"):
        plan_rows(dataclasses.replace(plan, sources={"torch": torch_src}), ["constraint"])


@pytest.fixture(scope="module")
def constrained_adapter(tiny_cfg, tmp_path_factory):
    """tiny-random's adapter after a few steps with the attention constraint (concat mode, two subjects)."""
    cfg = dataclasses.replace(tiny_cfg, adapter=dataclasses.replace(tiny_cfg.adapter, attention_mode="concat"))
    models = build_models(cfg, seed=0)
    batch = synthetic_batch(models, size=2, seed=0, subjects=2)
    opt = torch.optim.Adam(adapter_parameters(models), lr=3e-3)
    for _ in range(5):
        train_step(models, batch, opt, attention_weight=1.0)
    return save_adapter(models.adapter, tmp_path_factory.mktemp("adapter") / "constrained.safetensors")


def test_evaluate_dbim_sweep_and_constraint_then_plot(constrained_adapter, tmp_path, caplog):
    out, png = tmp_path / "eval.json", tmp_path / "dbim.png"
    threads = torch.get_num_threads()
    try:
        code = evaluate_main(["--config", "tiny-random", "--rows", "dbim,constraint", "--dbim-lambdas=-2,2",
                              "--scenes", "2,2", "--steps", "2", "--threads", "1", "--constrained-adapter",
                              str(constrained_adapter), "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ["torch fp32", "DBIM lambda -2", "DBIM lambda 2", "torch fp32, constrained adapter"]
    assert rows["DBIM lambda 2"]["options"] == {"dbim_lambda": 2.0}
    assert rows["DBIM lambda 2"]["paired"]["one_subject"]["mean_abs_pixel"] > 0, "DBIM changed the images"
    assert rows["torch fp32, constrained adapter"]["two_subjects"]["colour"]["n"] == 4
    assert plot_main(["--json", str(out), "--out", str(png)]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300
    assert plot_main(["--json", str(out), "--out", str(png), "--kind", "two_subjects"]) == 0, "rewrites its own plot"
    caplog.set_level(logging.ERROR)
    no_dbim = tmp_path / "plain.json"
    no_dbim.write_text(json.dumps({**data, "rows": data["rows"][:1]}))
    assert plot_main(["--json", str(no_dbim), "--out", str(tmp_path / "p.png")]) == 2
    assert "has no DBIM rows" in caplog.text and not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--rows", "constraint"], "--rows constraint needs --constrained-adapter FILE"),
    (["--rows", "dbim", "--dbim-lambdas", "1,nan"], "--dbim-lambdas 1,nan: each lambda must be a finite number"),
    (["--rows", "dbim", "--aux-noun", "two words"], "--aux-noun 'two words' must be one common noun"),
    (["--constrained-adapter", "x.safetensors"], "--constrained-adapter applies to the constraint rows"),
])
def test_evaluate_method_flags_fail_fast(args, message, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="runtime.evaluate")
    assert evaluate_main(["--config", "tiny-random", *args]) == 2
    assert message in caplog.text


def test_plot_takes_a_rate_of_one_whose_upper_bound_is_float_noise(tmp_path):
    """Wilson's upper bound of 144/144 is 0.9999999999999999 (< the rate): the trained default's sweep hit it."""
    full = {"rate": 1.0, "lo": 0.974, "hi": 0.9999999999999999, "hits": 144, "n": 144}
    half = {"rate": 0.5, "lo": 0.42, "hi": 0.58, "hits": 72, "n": 144}
    stats = {"setting": full, "position": full, "colour": half, "shape": half, "pattern": half}
    rows = [{"name": f"DBIM lambda {lam:g}", "group": "dbim", "options": {"dbim_lambda": lam}, "one_subject": stats}
            for lam in (-1.0, 1.0)]
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"tool": "dynaip-trt evaluate", "config": "tiny", "scenes": {"one_subject": 144},
                                  "reference_row": "torch fp32", "rows": rows}))
    assert plot_main(["--json", str(report), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
