"""The torch backend's FP8 path (``DynaIPEngine.from_config(..., fp8=True)``): real FP8 GEMMs through
``torch._scaled_mm`` (a reference kernel on the CPU, FP8 tensor cores on Hopper/Ada), checked on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dynaip_trt.fp8 import FP8_E4M3_MAX, FP8Linear, amax_scale, fp8_layers, positive_scale, quantize_fp8, to_fp8
from dynaip_trt.metrics import rel_l2
from dynaip_trt.models import build_models
from runtime import DynaIPEngine

# A whole 4-step tiny generation with every block linear in FP8 vs fp32 (measured ~2.3e-3; the static-scale FP8
# graph of calibration/ measures ~2.4e-3): a gate that still fails if quantization breaks a layer.
FP8_LATENT_REL_L2 = 2.5e-2


@pytest.mark.parametrize("bias", [True, False])
def test_scaled_mm_linear_is_the_fp8_product(bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=bias)
    x = torch.randn(2, 5, 64) * 3
    q = FP8Linear(linear, kernel="scaled_mm")
    assert q.weight_fp8.dtype == torch.float8_e4m3fn and q.weight_fp8.shape == (48, 64)
    assert float(q.weight_scale) == pytest.approx(float(linear.weight.detach().abs().max()) / FP8_E4M3_MAX)
    y = q(x)
    assert y.shape == (2, 5, 48) and y.dtype == torch.float32
    sx, sw = amax_scale(x), q.weight_scale
    expect = (to_fp8(x, sx).float() * sx) @ (to_fp8(linear.weight, sw).float() * sw).t()
    if bias:
        expect = expect + linear.bias
    assert rel_l2(y, expect) < 1e-6, "must equal the product of the dequantized FP8 operands"
    exact = linear(x)
    assert 1e-3 < rel_l2(y, exact.detach()) < 0.1, "FP8 rounding (3-bit mantissa) is visible but bounded"
    assert q(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("kernel", ["qdq", "scaled_mm"])
def test_quantize_replaces_exactly_the_fp8_layers_of_a_copy(tiny_cfg, kernel):
    t = build_models(tiny_cfg, seed=0).transformer
    names = set(fp8_layers(t))
    q = quantize_fp8(t, kernel)
    replaced = {n for n, m in q.named_modules() if isinstance(m, FP8Linear)}
    assert replaced == names and len(names) > 0 and not fp8_layers(q)
    assert set(fp8_layers(t)) == names, "the original transformer is untouched"
    assert isinstance(q.proj_out, nn.Linear) and isinstance(q.x_embedder, nn.Linear), "embedders/final stay"
    assert all(m.kernel == kernel for m in q.modules() if isinstance(m, FP8Linear))


def test_static_qdq_scales_agree_with_dynamic_and_stay_positive_in_fp16():
    torch.manual_seed(1)
    linear = nn.Linear(32, 16)
    x = torch.randn(3, 32)
    static = FP8Linear(linear, input_amax=float(x.abs().max()))
    assert torch.equal(static(x), FP8Linear(linear)(x)), "a calibrated amax equal to the batch's = dynamic scaling"
    tiny = FP8Linear(linear, input_amax=1e-12).half()
    assert float(tiny.input_scale) == 0.0, "1e-12 / 448 underflows fp16"
    assert float(positive_scale(tiny.input_scale)) > 0 and torch.isfinite(tiny(x.half())).all()


def test_fp8_engine_matches_fp32_within_tolerance(make_images):
    refs = make_images(2, seed=3)
    fp32 = DynaIPEngine.from_config("tiny-random")
    fp8 = DynaIPEngine.from_config("tiny-random", fp8=True)
    a = fp32.generate("two toys", refs, seed=5, output_type="latent")
    b = fp8.generate("two toys", refs, seed=5, output_type="latent")
    err = rel_l2(b, a)
    assert 1e-4 < err < FP8_LATENT_REL_L2, f"fp8 latent rel L2 {err:.2e}"
    assert np.isfinite(b).all()
