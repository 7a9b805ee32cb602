"""DCI's dual-branch integration (DBIM) at inference: the request fields and CLI flags, the token-set maps and the
pixel-wise mix, the ``dit_dbim`` graph against its torch module, and whole DBIM generations on the torch and ONNX
Runtime backends against the reference pipeline; a build without the DBIM graph refuses DBIM requests."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import captured_logs

from dynaip_trt.attention import DBIM, DBIMInputs, ReferenceInputs, dbim_mix
from dynaip_trt.conditioning import ReferenceKV
from dynaip_trt.dbim import check_dbim, default_aux_noun
from dynaip_trt.errors import InputError
from dynaip_trt.manifest import REQUIRED_MODELS
from dynaip_trt.metrics import max_abs, rel_l2
from dynaip_trt.pipeline import DynaIPPipeline
from dynaip_trt.request import GenerationRequest, TextBranchSchedule, check_batch, validate_request
from dynaip_trt.stage_modules import DiTStep
from dynaip_trt.weights import EMBEDDED_ROOT, load_tokenizer
from export.graph import check_graph
from export.specs import get_spec
from runtime import DynaIPEngine
from runtime.generate import main as generate_main

# The exported dit_dbim graphs vs its torch module (ONNX Runtime CPU, fp32 and fp16): the plain DiT's tolerances.
FP32_REL_L2, FP32_MAX_ABS, FP16_REL_L2 = 1e-5, 1e-4, 5e-3
# Whole generations vs the reference pipeline: the true-CFG tests' tolerances (torch engine, ONNX Runtime).
TORCH_REL_L2, ORT_REL_L2 = 1e-6, 1e-4

PROMPT = "a photo of a toy on a beach"


@pytest.fixture(scope="module")
def dbim_build(tiny_build, tmp_path_factory):
    """The tiny build plus the dit_dbim graph in fp32 and fp16, by the command line (``export.onnx --dbim --fp16``:
    the other graphs are unchanged, so they are reused from the shared build, not re-exported)."""
    from export.onnx import main as export_main

    out = tmp_path_factory.mktemp("dbim") / "tiny"
    shutil.copytree(tiny_build, out)
    with captured_logs("export") as messages:
        assert export_main(["--config", "tiny-random", "--engine-dir", str(out), "--dbim", "--fp16"]) == 0
    reused = [m for m in messages if "unchanged since the previous build, reused" in m]
    assert len(reused) == 2 * len(REQUIRED_MODELS) - 1, messages  # every graph but dit_dbim's (text has no fp16)
    return out


def tokenizers(models):
    return models.clip_tokenizer, models.t5_tokenizer


def test_token_sets_of_the_two_branches(tiny_models):
    """Concept map: the subject word's tokens; auxiliary prompt: the word replaced (any case, whole words only);
    auxiliary map: every prompt token but the auxiliary noun's (byte tokenizer: one token per character)."""
    plan = check_dbim("a toy, a Toy and a toys", 1.5, None, "toy", None, None, 8, tokenizers(tiny_models))
    assert plan.aux_prompt == "a object, a object and a toys" and plan.aux_noun == "object"
    assert np.flatnonzero(plan.concept_tokens).tolist() == [2, 3, 4, 9, 10, 11]
    assert plan.prompt_tokens.sum() == len("a toy, a Toy and a toys")
    noun = [i for s in (2, 12) for i in range(s, s + len("object"))]
    assert np.flatnonzero(plan.aux_prompt_tokens - plan.aux_map_tokens).tolist() == noun
    assert plan.steps == 2 and plan.active(1) and not plan.active(2)  # ceil(0.15 * 8): the first two steps mix
    assert check_dbim(PROMPT, 0, 1.0, "toy", "dog", "reference", 3, tokenizers(tiny_models)).steps == 3


def test_default_aux_noun_is_never_the_subject_nor_its_plural(tiny_models):
    """"object" never replaces "objects"; the trained default's word-level vocabulary (the world's 31 words) knows
    no other default noun, so the request must name one."""
    assert default_aux_noun("objects", tokenizers(tiny_models)) == "thing"
    assert default_aux_noun("Toy", tokenizers(tiny_models)) == "object"
    words = load_tokenizer(EMBEDDED_ROOT / "tiny", 77)
    with pytest.raises(InputError, match=r"none of the default auxiliary nouns .* give aux_noun"):
        default_aux_noun("objects", [words])


@pytest.mark.parametrize("fields,message", [
    (dict(dbim_lambda=float("nan"), subject_word="toy"), r"dbim_lambda=nan must be a finite number in \[-50, 50\]"),
    (dict(dbim_lambda=51, subject_word="toy"), r"dbim_lambda=51 must be a finite number"),
    (dict(dbim_lambda="1", subject_word="toy"), r"dbim_lambda='1' must be a finite number"),
    (dict(dbim_lambda=1, subject_word="toy", dbim_steps=0), r"dbim_steps=0 must be a fraction of the steps in \(0, 1"),
    (dict(dbim_lambda=1, subject_word="toy", dbim_steps=1.5), r"dbim_steps=1.5 must be a fraction"),
    (dict(dbim_lambda=1), r"dbim_lambda needs subject_word"),
    (dict(dbim_lambda=1, subject_word="cat"), r"subject_word 'cat' does not occur in the prompt"),
    (dict(dbim_lambda=1, subject_word="toy", aux_noun="TOY"), r"aux_noun 'TOY' must differ from subject_word"),
    (dict(dbim_lambda=1, subject_word="toy", dbim_map="pixels"), r"dbim_map='pixels' must be one of"),
    (dict(subject_word="toy", aux_noun="dog"), r"subject_word, aux_noun apply to DBIM, which is off"),
    (dict(dbim_lambda=1, subject_word="toy", negative_prompt="", true_cfg_scale=2.0),
     r"DBIM \(dbim_lambda\) cannot be combined with true CFG"),
    (dict(dbim_lambda=1, subject_word="toy", text_branch=TextBranchSchedule(steps=1)),
     r"cannot be combined with true CFG \(true_cfg_scale > 1\) or a text_branch schedule"),
])
def test_bad_dbim_fields_are_named(validated, fields, message):
    with pytest.raises(InputError, match=message):
        validated(PROMPT, **fields)


def test_a_batch_shares_the_mixing_steps(validated):
    rows = [validated(PROMPT, steps=8, dbim_lambda=1, subject_word="toy", dbim_steps=f) for f in (0.25, 0.5)]
    with pytest.raises(InputError, match="DBIM's mixing steps and true CFG must match"):
        check_batch(rows)


def mix_inputs(lam: float, b: int = 2, heads: int = 2, txt: int = 6, n: int = 12, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, out = (torch.randn(2 * b, heads, txt + n, d, generator=g) for _ in range(3))
    prompt = torch.zeros(2 * b, txt)
    prompt[:, :5] = 1
    members = torch.zeros(2 * b, txt)
    members[:b, 1:3] = 1  # the concept rows' subject tokens
    members[b:, :5] = 1
    members[b:, 2] = 0  # every auxiliary token but the noun's
    kv = ReferenceKV([torch.randn(2 * b, 2, 3, heads * d, generator=g)], [torch.randn(2 * b, 2, 3, heads * d)])
    dbim = DBIMInputs(prompt, members, torch.zeros(2 * b), torch.full((2 * b,), float(lam)))
    r = ReferenceInputs(kv=kv, scales=torch.ones(2 * b, 2), masks=None, dbim=dbim)
    return out, q, k, txt, r, q[:, :, txt:]


def test_mix_from_full_attention_probabilities():
    """The mix of the token-set maps equals DCI's formula written from the full joint-attention probabilities
    (renormalised over the prompt's own text tokens), and leaves text tokens and auxiliary rows untouched."""
    lam, b, txt = 1.5, 2, 6
    out, q, k, _, r, img_q = mix_inputs(lam)
    mixed = dbim_mix(out, q, k, txt, r, img_q, None)
    probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)[:, :, txt:, :txt]  # [2B, H, N, L] of all keys
    probs = probs * r.dbim.prompt_tokens[:, None, None] / (probs * r.dbim.prompt_tokens[:, None, None]).sum(-1,
                                                                                                             True)
    sharp = torch.where(r.dbim.prompt_tokens[:, None, None] > 0, DBIM.token_temperature * probs, -torch.inf).softmax(-1)
    maps = (sharp * r.dbim.map_tokens[:, None, None]).sum(-1)  # [2B, H, N]
    n = maps.shape[-1]
    spatial = DBIM.spatial_mean * n * (DBIM.spatial_temperature * maps).softmax(-1)
    w = torch.stack([spatial[:b], lam * spatial[b:]]).softmax(0)
    want = w[0, ..., None] * out[:b, :, txt:] + w[1, ..., None] * out[b:, :, txt:]
    assert max_abs(mixed[:b, :, txt:], want) < 1e-6
    assert torch.equal(mixed[:, :, :txt], out[:, :, :txt]) and torch.equal(mixed[b:], out[b:])


def test_larger_lambda_moves_the_concept_rows_toward_the_auxiliary_branch():
    b, txt = 2, 6
    dist = []
    for lam in (-2.0, 0.0, 2.0, 50.0):
        out, q, k, _, r, img_q = mix_inputs(lam)
        mixed = dbim_mix(out, q, k, txt, r, img_q, None)[:b, :, txt:]
        dist.append(float((mixed - out[b:, :, txt:]).norm() / (out[:b, :, txt:] - out[b:, :, txt:]).norm()))
    assert all(x > y for x, y in zip(dist, dist[1:])), dist
    # lambda 0: the concept branch weighs softmax(S_c, 0) >= 1/2 per pixel; lambda 50: the auxiliary output dominates
    assert 0.5 < dist[1] < 1 and dist[-1] < 0.3, dist


def test_reference_map_adds_the_reference_tokens():
    out, q, k, txt, r, img_q = mix_inputs(1.0)
    text_only = dbim_mix(out, q, k, txt, r, img_q, 0)
    r.dbim.reference_map[:] = 1
    both = dbim_mix(out, q, k, txt, r, img_q, 0)
    assert rel_l2(both[:2], text_only[:2]) > 1e-3 and torch.equal(both[2:], text_only[2:])


def test_auxiliary_rows_step_as_plain_rows(tiny_models):
    """The dit_dbim step's auxiliary rows get what the plain DiT step gives them alone; its concept rows differ."""
    spec = get_spec("dit_dbim", tiny_models)
    x = spec.sample_inputs(batch=4, subjects=2, seed=3)
    plain = {k: v for k, v in x.items() if k in get_spec("dit", tiny_models).input_names}
    per_row = {"latents", "text_embeds", "pooled", "timestep", "timestep_next", "guidance", "scales", "masks"}
    aux = {k: v[2:] if k in per_row else v[:, 2:] if k in ("img_k", "img_v") else v for k, v in plain.items()}
    step = DiTStep(tiny_models.transformer, tiny_models.config.adapter.attention_mode)
    with torch.no_grad():
        v_dbim, next_dbim = spec.module()(**x)
        v_aux, next_aux = step(**aux)
        v_alone, _ = step(**plain)
    assert rel_l2(v_dbim[2:], v_aux) < 1e-6 and rel_l2(next_dbim[2:], next_aux) < 1e-6
    assert rel_l2(v_dbim[:2], v_alone[:2]) > 1e-4, "the concept rows are mixed"


def test_exported_graph_matches_the_module(dbim_build, tiny_models):
    spec = get_spec("dit_dbim", tiny_models)
    model = onnx.load(str(dbim_build / "dit_dbim.onnx"), load_external_data=False)
    report = check_graph(model, spec.dynamic_axes())
    assert report.ok, report.problems()
    sess = ort.InferenceSession(str(dbim_build / "dit_dbim.onnx"), providers=["CPUExecutionProvider"])
    fp16 = ort.InferenceSession(str(dbim_build / "dit_dbim.fp16.onnx"), providers=["CPUExecutionProvider"])
    for batch, subjects, size in ((2, 1, (64, 64)), (4, 3, (96, 128))):
        x = spec.sample_inputs(batch=batch, subjects=subjects, height=size[0], width=size[1], seed=batch)
        out = sess.run(None, {k: v.numpy() for k, v in x.items()})
        with torch.no_grad():
            ref = spec.module().eval()(**x)
        for o, r in zip(out, ref):
            assert o.shape == tuple(r.shape) and o.dtype == np.float32
            assert rel_l2(o, r) < FP32_REL_L2 and max_abs(o, r) < FP32_MAX_ABS, (rel_l2(o, r), max_abs(o, r))
        velocity = fp16.run(None, {k: v.numpy() for k, v in x.items()})[0]
        assert 1e-6 < rel_l2(velocity, ref[0]) < FP16_REL_L2, rel_l2(velocity, ref[0])


def test_backends_match_the_pipeline(tiny_models, dbim_build, make_images):
    """Two DBIM requests (own lambda, subject word, auxiliary noun, concept map; 4 DiT rows in the mixing steps,
    the build's largest batch) on the torch and ONNX Runtime backends against the pipeline; 2 of 4 steps mix."""
    refs = make_images(2, seed=3)
    requests = [GenerationRequest(PROMPT, refs, scales=[0.8, 1.2], steps=4, seed=1, dbim_lambda=2.0,
                                  subject_word="toy", dbim_steps=0.5),
                GenerationRequest("two cats in the snow", refs, steps=4, seed=2, dbim_lambda=-1.0,
                                  subject_word="two cats", aux_noun="dog", dbim_steps=0.5, dbim_map="both")]
    pipe = DynaIPPipeline(tiny_models)
    rows = [validate_request(r, tiny_models.config, pipe.tokenizers, 4, pipe.num_blocks) for r in requests]
    want = pipe.denoise(rows, progress=False).numpy()
    plain = DynaIPPipeline(tiny_models)(PROMPT, refs, scales=[0.8, 1.2], steps=4, seed=1, output_type="latent",
                                        progress=False).numpy()
    assert rel_l2(want[0], plain[0]) > 1e-4, "DBIM changes the generation"
    torch_engine = DynaIPEngine.from_models(tiny_models)
    assert rel_l2(torch_engine.generate_batch(requests, output_type="latent"), want) < TORCH_REL_L2
    ort_engine = DynaIPEngine.from_dir(dbim_build, backend="onnxruntime", device="cpu")
    got = ort_engine.generate_batch(requests, output_type="latent")
    assert rel_l2(got, want) < ORT_REL_L2, rel_l2(got, want)
    alone = ort_engine.generate_batch(requests[1:], output_type="latent")
    assert rel_l2(alone, want[1:]) < ORT_REL_L2, "a row gets what it would get alone"
    with pytest.raises(InputError, match=r"3 request\(s\) with DBIM run 6 DiT rows .* batches of 1..4"):
        ort_engine.generate_batch(requests + requests[:1], output_type="latent")


def test_a_build_without_the_dbim_graph_refuses_dbim_requests(tiny_build, make_images):
    engine = DynaIPEngine.from_dir(tiny_build, backend="onnxruntime", device="cpu")
    with pytest.raises(InputError, match=r"no DBIM graph \(dit_dbim\): export it with python -m export.onnx --dbim"):
        engine.generate(PROMPT, make_images(1), steps=1, dbim_lambda=1.0, subject_word="toy")
    assert engine.generate(PROMPT, make_images(1), steps=1, output_type="latent").shape[0] == 1


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "subject_a.png"


def test_generate_cli_flags(tmp_path, tiny_build, dbim_build, caplog):
    out = tmp_path / "o.png"
    base = ["--prompt", "a toy on a beach", "--ref", str(EXAMPLE), "--out", str(out), "--steps", "2"]
    dbim = ["--dbim-lambda", "1", "--subject-word", "toy", "--dbim-steps", "0.5"]
    assert generate_main([*base, *dbim]) == 0 and out.is_file()  # torch backend, the embedded default
    out.unlink()
    assert generate_main([*base, *dbim, "--aux-noun", "dog", "--engine-dir", str(dbim_build)]) == 0 and out.is_file()
    for flags, message in (
            (["--dbim-lambda", "nan", "--subject-word", "toy"], "--dbim-lambda nan must be a finite number"),
            (["--dbim-lambda", "1", "--subject-word", "toy", "--dbim-steps", "2"],
             "--dbim-steps 2 must be a fraction of the steps in (0, 1]"),
            (["--dbim-lambda", "1"], "--dbim-lambda needs --subject-word"),
            (["--dbim-lambda", "1", "--subject-word", "cat"], "--subject-word 'cat' does not occur in --prompt"),
            (["--dbim-lambda", "1", "--subject-word", "toy", "--aux-noun", "toy"], "--aux-noun 'toy' must be"),
            (["--aux-noun", "dog"], "--aux-noun apply to DBIM: give --dbim-lambda too"),
            (["--dbim-lambda", "1", "--subject-word", "toy", "--engine-dir", str(tiny_build)],
             "has no DBIM graph (dit_dbim): export it with python -m export.onnx")):
        caplog.clear()
        assert generate_main([*base, *flags]) == 2, flags
        assert message in caplog.text, caplog.text


def test_engine_plans_include_the_dbim_graph_when_exported(dbim_build, tiny_build):
    """An fp16 engine build of a build with dit_dbim plans its engine (from its fp16 graph), one without does not."""
    from dynaip_trt.manifest import Manifest
    from export.engines import graph_precision, plan_engines, required_variants

    names = REQUIRED_MODELS + ("dit_dbim",)
    assert "dit_dbim" in required_variants("fp16", names)["fp16"]
    assert graph_precision("dit_dbim", "fp8", "fp16") == "fp16", "fp8 builds run the mixing steps on their base"
    plans = {p.model: p for p in plan_engines(Manifest.load(dbim_build), dbim_build, "fp16")}
    assert set(plans) == set(names) and plans["dit_dbim"].onnx == "dit_dbim.fp16.onnx"
    assert plans["dit_dbim"].engine == "dit_dbim.fp16.engine"
    assert "dit_dbim" not in {p.model for p in plan_engines(Manifest.load(tiny_build), tiny_build, "fp16")}
