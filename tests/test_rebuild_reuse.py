"""No wasted rebuilds: exporting again into a build reuses every graph whose source (config, weights, opset,
precision, profile) did not change, re-exports only what did (or everything with ``force``), and keeps TensorRT
engines whose graph is unchanged so ``export.build`` rebuilds none of them."""

from __future__ import annotations

import copy
import shutil

import torch

from dynaip_trt.manifest import Manifest
from export import build, exporter

from conftest import captured_logs
from test_build import fake_gpu  # noqa: F401  (the fixture: TensorRT and a GPU stand-ins)

NAMES = ("fusion", "vae")


def exported(messages: list[str]) -> list[str]:
    return sorted(m.split(":")[0] for m in messages if "exported in" in m)


def reused(messages: list[str]) -> list[str]:
    return sorted(m.split(":")[0] for m in messages if "reused" in m)


def test_unchanged_graphs_are_reused_and_changed_ones_exported(tiny_models, tmp_path):
    out = tmp_path / "b"
    with captured_logs("export") as first:
        exporter.export_all(out, models=tiny_models, names=NAMES, variants={"fp16": ("vae",)}, progress=False)
    assert exported(first) == ["fusion (fp32)", "vae (fp16)", "vae (fp32)"] and not reused(first)
    before = Manifest.load(out)
    with captured_logs("export") as second:
        exporter.export_all(out, models=tiny_models, names=NAMES, variants={"fp16": ("vae",)}, progress=False)
    assert reused(second) == ["fusion (fp32)", "vae (fp16)", "vae (fp32)"] and not exported(second)
    after = Manifest.load(out)
    after.verify(out)
    assert {n: e.files for n, e in after.models.items()} == {n: e.files for n, e in before.models.items()}

    changed = copy.copy(tiny_models)
    changed.vae = copy.deepcopy(tiny_models.vae)
    with torch.no_grad():
        next(changed.vae.decoder.parameters()).add_(0.01)  # other VAE weights: its graphs are stale
    with captured_logs("export") as third:
        exporter.export_all(out, models=changed, names=NAMES, variants={"fp16": ("vae",)}, progress=False)
    assert exported(third) == ["vae (fp16)", "vae (fp32)"] and reused(third) == ["fusion (fp32)"]

    with captured_logs("export") as forced:
        exporter.export_all(out, models=changed, names=NAMES, progress=False, force=True)
    assert exported(forced) == ["fusion (fp32)", "vae (fp32)"] and not reused(forced)


def test_another_opset_or_profile_is_a_new_source(tiny_models, tmp_path):
    from export.envelope import Envelope

    out = tmp_path / "b"
    exporter.export_all(out, models=tiny_models, names=("fusion",), progress=False)
    with captured_logs("export") as messages:
        exporter.export_all(out, models=tiny_models, names=("fusion",), progress=False,
                            envelope=Envelope(subjects=(1, 2, 3)))
    assert exported(messages) == ["fusion (fp32)"]


def test_export_build_rebuilds_only_engines_whose_graph_changed(tiny_build, tiny_models, tmp_path, fake_gpu):
    out = tmp_path / "b"
    shutil.copytree(tiny_build, out)
    build.run(tiny_models, out, "fp16", None, tmp_path / "calib", 18, progress=False)
    parsed = [a[0] for n, a in fake_gpu if n == "parse"]
    assert len(parsed) == 5, "the first build builds every engine"
    fake_gpu.clear()
    with captured_logs("export") as messages:
        build.run(tiny_models, out, "fp16", None, tmp_path / "calib", 18, progress=False)
    assert not [n for n, _ in fake_gpu if n == "parse"], "nothing changed: no engine is rebuilt"
    assert not exported(messages) and any("are current: not rebuilt" in m for m in messages)
    Manifest.load(out).verify(out)
    fake_gpu.clear()
    build.run(None, out, "fp16", None, tmp_path / "calib", 18, skip_export=True, progress=False, force=True)
    assert len([n for n, _ in fake_gpu if n == "parse"]) == 5, "--force rebuilds every engine"
