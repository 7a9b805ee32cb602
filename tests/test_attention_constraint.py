"""MM-Diff's attention constraint as a training option (``dynaip_trt.training``): on a synthetic two-subject batch
(each subject a colour, each owning one half of the image) a few adapter steps with the constraint lower the
attention leakage (the image tokens' attention mass on the other subject inside each subject's region), steps
without it do not; the option refuses ``sum`` mode and batches without regions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dynaip_trt.errors import ConfigError
from dynaip_trt.models import build_models
from dynaip_trt.training import adapter_parameters, attention_constraint_loss, attention_leakage, synthetic_batch, \
    train_step


@pytest.fixture(scope="module")
def concat_cfg(tiny_cfg):
    return dataclasses.replace(tiny_cfg, adapter=dataclasses.replace(tiny_cfg.adapter, attention_mode="concat"))


def leakage_after(cfg, weight: float, steps: int = 15) -> tuple[float, float]:
    models = build_models(cfg, seed=0)
    batch = synthetic_batch(models, size=2, seed=0, subjects=2)
    opt = torch.optim.Adam(adapter_parameters(models), lr=3e-3)
    before = attention_leakage(models, batch)
    for _ in range(steps):
        train_step(models, batch, opt, attention_weight=weight)
    return before, attention_leakage(models, batch)


def test_the_constraint_lowers_the_leakage_it_targets(concat_cfg):
    before, plain = leakage_after(concat_cfg, 0.0)
    same, constrained = leakage_after(concat_cfg, 1.0)
    assert before == same and 0.4 < before < 0.6, "an untrained adapter attends to both subjects about equally"
    assert abs(plain - before) < 0.05, (before, plain)
    assert constrained < 0.25 and constrained < plain - 0.2, (before, plain, constrained)


def test_loss_is_balanced_and_bounded():
    masks = torch.tensor([[[1.0, 1, 0, 0], [0, 0, 1, 1]]])  # [B=1, K=2, N=4]
    confined = masks.transpose(1, 2)[:, None]  # [B, H=1, N, K]: each region attends to its own subject only
    swapped = confined.flip(-1)
    assert attention_constraint_loss([confined], masks) == -1.0
    assert attention_constraint_loss([swapped], masks) == 1.0
    assert attention_constraint_loss([torch.full_like(confined, 0.5)], masks) == 0.0


def test_sum_mode_and_missing_regions_are_refused(tiny_cfg, concat_cfg):
    models = build_models(tiny_cfg, seed=0)
    batch = synthetic_batch(models, size=2, seed=0, subjects=2)
    opt = torch.optim.Adam(adapter_parameters(models), lr=1e-3)
    with pytest.raises(ConfigError, match="attention_mode 'concat'"):
        train_step(models, batch, opt, attention_weight=1.0)
    models = build_models(concat_cfg, seed=0)
    with pytest.raises(ConfigError, match=r"needs each subject's region: TrainBatch.masks \[B, K, N\]"):
        train_step(models, dataclasses.replace(batch, masks=None), opt, attention_weight=1.0)
