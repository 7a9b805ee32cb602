"""Smoke test of the tiny default's training (``dynaip_trt.demo.train``): every stage for a few steps on the real
``tiny`` architecture, a package that loads and samples, and an interrupted-and-resumed run that ends bit-identical
to an uninterrupted one."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dynaip_trt.configs import get_config
from dynaip_trt.demo.train import STAGES, Recipe, StageRecipe, main, trained_config, train
from dynaip_trt.errors import ConfigError
from dynaip_trt.pipeline import DynaIPPipeline
from dynaip_trt.text import Tokenizer
from dynaip_trt.weights import load_embedded

STEP = StageRecipe(steps=3, batch=2, lr=1e-3, warmup=1, ema=0.9, checkpoint_every=1, log_every=1)
RECIPE = Recipe(vae=STEP, vision=STEP, base=STEP, adapter=STEP, measure_samples=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoders_run(tmp_path_factory, one_thread):
    """A run folder with the text, vae and vision stages finished (a few steps each)."""
    out = tmp_path_factory.mktemp("train") / "run"
    train(out, stages=("text", "vae", "vision"), recipe=RECIPE, progress=False)
    return out


def _files(folder):
    return {p.name: load_file(str(p)) for p in folder.glob("*.safetensors")}


def test_every_stage_writes_its_output_and_a_loadable_package(encoders_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(encoders_run, out)
    run = train(out, recipe=RECIPE, progress=False)
    for stage in STAGES:
        assert run.done(stage), stage
    assert not list((out / "checkpoints").glob("*.safetensors")), "finished stages drop their checkpoints"
    for stage in ("vae", "vision", "base", "adapter"):
        log = [json.loads(line) for line in (out / "logs" / f"{stage}.jsonl").read_text().splitlines()]
        assert [e["step"] for e in log] == [1, 2, 3] and all(np.isfinite(e["loss"]) for e in log)
    cfg = trained_config(run)
    assert cfg.vae.scaling_factor > 0 and cfg.vae.scaling_factor != get_config("tiny-random").vae.scaling_factor
    models = load_embedded(cfg, out / "package")
    index = json.loads((out / "package" / "weights.json").read_text())
    assert set(index) == {"transformer.safetensors", "vae.safetensors", "clip_text.safetensors", "t5.safetensors",
                          "vision.safetensors", "adapter.safetensors", "tokenizer.json", "config.json"}
    trained_adapter = load_file(str(out / "adapter.safetensors"))
    assert all(torch.equal(v, trained_adapter[k]) for k, v in models.adapter.state_dict().items())
    ref = run.world.reference(run.world.subjects[0], np.random.default_rng(0))
    from PIL import Image

    image = DynaIPPipeline(models)("an object on the left in a forest", [Image.fromarray(ref)], steps=2,
                                   progress=False)[0]
    assert image.size == (32, 32)
    ids = models.t5_tokenizer.encode_batch(["An object on the LEFT, in a forest!"])
    assert ids.shape == (1, 77) and (ids[0, :9] > 2).all() and list(ids[0, 9:12]) == [2, 1, 0]  # "!" unknown
    models.t5_tokenizer.save(tmp_path / "tok")  # what an export writes for the runtime
    again = Tokenizer.load(tmp_path / "tok", 77)
    assert np.array_equal(again.encode_batch(["an object, two objects"]),
                          models.t5_tokenizer.encode_batch(["an object, two objects"]))


def test_interrupted_run_resumes_bit_identical(encoders_run, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    shutil.copytree(encoders_run, whole)
    shutil.copytree(encoders_run, parts)
    stages = ("base", "adapter")
    train(whole, stages=stages, recipe=RECIPE, progress=False)
    calls = 0
    while not all((parts / f"{s}.safetensors").is_file() for s in stages):
        train(parts, stages=stages, recipe=RECIPE, progress=False, stop_after=1)  # one step per call at most
        calls += 1
        assert calls < 10
    assert calls >= 4, "each stage must have been interrupted and resumed"
    a, b = _files(whole), _files(parts)
    for name in ("base.safetensors", "adapter.safetensors"):
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    for stage in stages:
        la = [json.loads(x)["loss"] for x in (whole / "logs" / f"{stage}.jsonl").read_text().splitlines()]
        lb = [json.loads(x)["loss"] for x in (parts / "logs" / f"{stage}.jsonl").read_text().splitlines()]
        assert la == lb


def test_a_finished_stage_is_skipped_and_rerun_alone(encoders_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(encoders_run, out)
    before = load_file(str(out / "vision.safetensors"))
    train(out, stages=("vision",), recipe=RECIPE, progress=False)  # finished: skipped
    assert all(torch.equal(v, load_file(str(out / "vision.safetensors"))[k]) for k, v in before.items())
    other = dataclasses.replace(RECIPE, vision=dataclasses.replace(STEP, steps=2))
    with pytest.raises(ConfigError, match="another recipe"):
        train(out, stages=("vision",), recipe=other, progress=False)
    train(out, stages=("vision",), recipe=RECIPE, progress=False, rerun=True)  # same recipe and seed: same weights
    assert all(torch.equal(v, load_file(str(out / "vision.safetensors"))[k]) for k, v in before.items())


def test_cli_errors_are_one_line(tmp_path, capsys, caplog):
    assert main(["--out", str(tmp_path / "empty"), "--stage", "adapter", "--no-progress"]) == 2
    assert "needs the stages ['text', 'vae', 'vision', 'base'] finished first" in caplog.text
    caplog.clear()
    assert main(["--out", str(tmp_path / "empty"), "--stage", "base", "--no-progress"]) == 2
    assert "needs the stages ['text', 'vae'] finished first" in caplog.text
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    caplog.clear()
    assert main(["--out", str(blocker / "run"), "--no-progress"]) == 2
    assert "--out" in caplog.text and "cannot write there" in caplog.text
    assert "Traceback" not in capsys.readouterr().err


def test_token_weights_follow_the_packed_token_order():
    """Weights of image token i must describe the pixels that packed latent token i holds (FLUX's 2x2 packing of a
    factor-2 VAE latent: 4x4 pixels per token, row-major)."""
    from dynaip_trt.demo.train import token_weights
    from dynaip_trt.sampling import pack_latents

    rng = np.random.default_rng(0)
    mask = (rng.random((1, 32, 32)) > 0.7).astype(np.float32)
    w = token_weights([mask], patch=4, subject_weight=3.0)
    assert w.shape == (1, 64)
    latent = torch.from_numpy(mask).reshape(1, 1, 16, 2, 16, 2).mean((3, 5)).expand(1, 16, 16, 16)
    coverage = torch.from_numpy(pack_latents(latent.contiguous().numpy())).mean(-1)  # [1, 64]
    assert torch.allclose(w, 1.0 + 3.0 * coverage, atol=1e-6)
