"""MM-Diff's attention constraint in the demo training (demo.train's adapter stage, demo.finetune_constraint) and the
method pictures' command-line errors: a few steps on the embedded tiny default (seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dynaip_trt.demo import finetune_constraint, method_figures
from dynaip_trt.demo import train as demo_train
from dynaip_trt.demo.finetune_constraint import finetune, finetune_recipe
from dynaip_trt.demo.train import token_coverage, token_weights
from dynaip_trt.errors import ConfigError
from dynaip_trt.weights import EMBEDDED_ROOT


pytestmark = pytest.mark.usefixtures("one_thread")


def test_token_coverage_is_per_subject_and_sums_to_the_loss_weights():
    rng = np.random.default_rng(0)
    masks = [(rng.random((2, 32, 32)) > 0.6).astype(np.float32) for _ in range(3)]
    cover = token_coverage(masks, patch=4)
    assert cover.shape == (3, 2, 64) and 0 <= float(cover.min()) and float(cover.max()) <= 1
    assert float(cover[1, 0, 0]) == pytest.approx(float(masks[1][0, :4, :4].mean()))
    assert torch.allclose(token_weights(masks, 4, 2.0), 1 + 2.0 * cover.sum(1))


def test_finetune_with_and_without_the_constraint(tmp_path):
    """Same seed and batches: the constraint changes the loss and the weights; each folder keeps its recipe."""
    shipped = load_file(str(EMBEDDED_ROOT / "tiny" / "adapter.safetensors"))
    runs = {}
    for w in (1.0, 0.0):
        path = finetune(tmp_path / f"w{w:g}", finetune_recipe(2, 2, 1e-3, w, 1), seed=1, progress=False)
        log = [json.loads(line) for line in (tmp_path / f"w{w:g}" / "logs" / "adapter.jsonl").read_text().splitlines()]
        runs[w] = (load_file(str(path)), log[-1]["loss"])
        assert not (tmp_path / f"w{w:g}" / "checkpoints" / "adapter.safetensors").exists()
    (c, c_loss), (u, u_loss) = runs[1.0], runs[0.0]
    assert c.keys() == u.keys() == shipped.keys()
    assert all(torch.isfinite(v).all() for v in c.values())
    assert any(not torch.equal(c[k], shipped[k]) for k in c) and any(not torch.equal(c[k], u[k]) for k in c)
    assert abs(c_loss - u_loss) > 1e-4  # the constraint term is in the loss (in [-1, 1] times the weight)
    with pytest.raises(ConfigError, match="another recipe"):
        finetune(tmp_path / "w1", finetune_recipe(2, 2, 1e-3, 0.0, 1), seed=1, progress=False)


def test_world_leakage_is_seeded_and_in_range():
    from dynaip_trt.demo.finetune_constraint import world_leakage
    from dynaip_trt.weights import load_family

    models = load_family("tiny")
    first = world_leakage(models, scenes=3)
    assert 0.0 < first < 1.0 and world_leakage(models, scenes=3) == pytest.approx(first, abs=1e-7)


@pytest.mark.parametrize("module,argv,message", [
    (demo_train, ["--attention-weight", "-1"], "--attention-weight -1 must be a finite number >= 0"),
    (finetune_constraint, ["--attention-weight", "nan"], "--attention-weight nan must be a finite number >= 0"),
    (finetune_constraint, ["--attention-weight", "1", "--steps", "0"], "--steps 0, --batch 16"),
    (finetune_constraint, ["--leakage", "nope.safetensors"], "--leakage: no such adapter file(s) ['nope.safetensors']"),
    (method_figures, [], "give --dbim PNG and/or --constraint PNG"),
    (method_figures, ["--constraint", "c.png"], "--constraint needs --constrained-adapter FILE"),
    (method_figures, ["--constraint", "c.png", "--constrained-adapter", "nope.safetensors"],
     "--constrained-adapter nope.safetensors: no such file"),
    (method_figures, ["--dbim", "d.png", "--lambdas", "a,b"], "--lambdas 'a,b' must be a comma list of numbers"),
])
def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, caplog, module, argv, message):
    monkeypatch.chdir(tmp_path)
    out = ["--out", str(tmp_path / "run")] if module is not method_figures and "--leakage" not in argv else []
    assert module.main(out + argv) == 2
    assert message in caplog.text and "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("*.png"))


def test_finetune_needs_out_and_weight(caplog):
    assert finetune_constraint.main(["--attention-weight", "1"]) == 2
    assert "give --out DIR and --attention-weight W (or --leakage ADAPTER...)" in caplog.text


def test_run_folders_from_before_the_option_resume_without_the_constraint(tmp_path):
    """A recipe.json written before ``attention_weight`` existed is a run without the constraint."""
    import dataclasses

    from dynaip_trt.configs import get_config
    from dynaip_trt.demo.train import FULL, Run, _check_recipe
    from dynaip_trt.demo.world import World

    def run(recipe):
        return Run(tmp_path, get_config("tiny"), recipe, 0, World(size=32, reference_size=32), progress=False)

    _check_recipe(run(FULL))
    old = json.loads((tmp_path / "recipe.json").read_text())
    del old["recipe"]["attention_weight"]
    (tmp_path / "recipe.json").write_text(json.dumps(old))
    _check_recipe(run(FULL))
    with pytest.raises(ConfigError, match="another recipe"):
        _check_recipe(run(dataclasses.replace(FULL, attention_weight=1.0)))


def test_dbim_picture_has_one_column_per_lambda_and_dbim_changes_it():
    from dynaip_trt.demo.figure import GAP, LABEL, ONE_SUBJECTS, TWO_SUBJECTS
    from dynaip_trt.pipeline import DynaIPPipeline

    pipe = DynaIPPipeline.from_config("tiny")
    picture = np.asarray(method_figures.dbim_figure(pipe, lambdas=(2.0,)))
    tile, rows = 32 * 4, len(ONE_SUBJECTS) + len(TWO_SUBJECTS)
    assert picture.shape == (LABEL + rows * (tile + GAP + LABEL) + GAP, 4 * (tile + GAP) + GAP, 3)
    y = 2 * LABEL  # the first row's tiles: references, (blank), no DBIM, lambda 2
    plain, dbim = (picture[y:y + tile, GAP + c * (tile + GAP):GAP + c * (tile + GAP) + tile] for c in (2, 3))
    assert np.abs(plain.astype(int) - dbim.astype(int)).max() > 0, "DBIM left the image unchanged"
