"""True classifier-free guidance (``negative_prompt``, ``true_cfg_scale``; diffusers' semantics): the DiT runs the rows
and their negative rows (negative prompt, a black image as every subject's reference, same scales) as one batch
through the same graph, and the latents move with ``v_neg + s * (v - v_neg)``. Validation, the semantics, and every
backend against the reference pipeline (tiny DynaIP family; the IP-Adapter layouts in ``test_ip_adapters.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynaip_trt.errors import InputError
from dynaip_trt.metrics import rel_l2
from dynaip_trt.pipeline import DynaIPPipeline
from dynaip_trt.request import NEGATIVE_IMAGE, GenerationRequest, TextBranchSchedule, check_batch, validate_request
from runtime import DynaIPEngine
from runtime.generate import main as generate_main


def test_one_step_is_the_guided_combination(tiny_models, make_images):
    """One Euler step from sigma 1 to 0 is ``x0 - v``, linear in ``v``: the guided result must be
    ``neg + s * (pos - neg)`` of two unguided runs, the negative one with a black image per subject."""
    pipe = DynaIPPipeline(tiny_models)
    refs = make_images(2)
    kw = dict(steps=1, scales=[0.8, 1.2], seed=5, output_type="latent", progress=False)
    pos = pipe("a photo", refs, **kw)
    neg = pipe("blurry", [NEGATIVE_IMAGE] * 2, **kw)
    guided = pipe("a photo", refs, negative_prompt="blurry", true_cfg_scale=4.0, **kw)
    assert rel_l2(guided, neg + 4.0 * (pos - neg)) < 1e-5
    assert rel_l2(guided, pos) > 1e-2


def test_scale_one_or_no_negative_prompt_is_the_plain_path(tiny_models, make_images):
    pipe = DynaIPPipeline(tiny_models)
    refs = make_images(1)
    kw = dict(steps=2, output_type="latent", progress=False)
    plain = pipe("a photo", refs, **kw)
    assert torch.equal(pipe("a photo", refs, negative_prompt="blurry", true_cfg_scale=1.0, **kw), plain)


def test_backends_match_the_pipeline(tiny_models, tiny_build, make_images):
    """Two requests with their own negative prompts and scales (4 DiT rows: the build's largest batch) on the torch
    and ONNX Runtime backends against the pipeline; a third request does not fit the build's batch profile."""
    refs = make_images(2, seed=3)
    requests = [GenerationRequest("a photo", refs, scales=[0.8, 1.2], steps=3, seed=1, negative_prompt="",
                                  true_cfg_scale=3.0),
                GenerationRequest("a toy", refs, scales=0.6, steps=3, seed=2, negative_prompt="blurry",
                                  true_cfg_scale=5.5)]
    pipe = DynaIPPipeline(tiny_models)
    rows = [validate_request(r, tiny_models.config, pipe.tokenizers, 4, pipe.num_blocks) for r in requests]
    want = pipe.denoise(rows, progress=False).numpy()
    torch_engine = DynaIPEngine.from_models(tiny_models)
    assert rel_l2(torch_engine.generate_batch(requests, output_type="latent"), want) < 1e-6
    ort_engine = DynaIPEngine.from_dir(tiny_build, backend="onnxruntime", device="cpu")
    assert rel_l2(ort_engine.generate_batch(requests, output_type="latent"), want) < 1e-4
    alone = ort_engine.generate_batch(requests[1:], output_type="latent")
    assert rel_l2(alone, want[1:]) < 1e-4, "a row gets what it would get alone"
    with pytest.raises(InputError, match=r"3 request\(s\) with true CFG run 6 DiT rows .* batches of 1..4"):
        ort_engine.generate_batch(requests + requests[:1], output_type="latent")


@pytest.mark.parametrize("fields,message", [
    (dict(true_cfg_scale=0.5, negative_prompt=""), r"true_cfg_scale=0.5 must be a finite number in \[1, 100\]"),
    (dict(true_cfg_scale=float("nan"), negative_prompt=""), r"true_cfg_scale=nan must be a finite number"),
    (dict(true_cfg_scale=101, negative_prompt=""), r"true_cfg_scale=101 must be a finite number"),
    (dict(true_cfg_scale="4", negative_prompt=""), r"true_cfg_scale='4' must be a finite number"),
    (dict(true_cfg_scale=True, negative_prompt=""), r"true_cfg_scale=True must be a finite number"),
    (dict(true_cfg_scale=4.0), r"true_cfg_scale=4 needs a negative_prompt \(\"\" for an empty one\)"),
    (dict(true_cfg_scale=4.0, negative_prompt=3), r"negative_prompt must be a str, got int"),
    (dict(true_cfg_scale=4.0, negative_prompt="x" * 200, truncate_prompt=False),
     r"negative_prompt is longer than the text length of 77 tokens"),
    (dict(true_cfg_scale=4.0, negative_prompt="", text_branch=TextBranchSchedule(steps=2)),
     r"true CFG \(true_cfg_scale > 1\) and text_branch schedules cannot be combined"),
])
def test_bad_true_cfg_fields_are_named(validated, fields, message):
    with pytest.raises(InputError, match=message):
        validated("a photo", **fields)


def test_a_batch_is_all_guided_or_all_plain(validated):
    rows = [validated("a photo", **kw) for kw in ({}, dict(negative_prompt="", true_cfg_scale=2.0))]
    with pytest.raises(InputError, match="true CFG must match"):
        check_batch(rows)


def test_generate_cli_flags(tmp_path, caplog):
    out = tmp_path / "o.png"
    ref = Path(__file__).resolve().parents[1] / "examples" / "subject_a.png"
    base = ["--prompt", "a toy", "--ref", str(ref), "--out", str(out), "--steps", "1"]
    assert generate_main([*base, "--negative-prompt", "", "--true-cfg-scale", "2.5"]) == 0 and out.is_file()
    for flags, message in ((["--true-cfg-scale", "0.5"], "--true-cfg-scale 0.5 must be a finite number in [1, 100]"),
                           (["--true-cfg-scale", "3"], "--true-cfg-scale above 1 needs --negative-prompt")):
        caplog.clear()
        assert generate_main([*base, *flags]) == 2
        assert message in caplog.text
