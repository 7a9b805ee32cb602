"""No wasted rebuilds: exporting again into a build reuses every graph whose source (config, weights, opset,
precision, profile) did not change, re-exports only what did (or everything with ``force``). That ``export.build``
keeps TensorRT engines whose graph is unchanged is tested against the checked TensorRT fakes
(``tests/conformance/test_builder.py``)."""

from __future__ import annotations

import copy

import torch

from dynaip_trt.manifest import Manifest
from export import exporter

from conftest import captured_logs

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

