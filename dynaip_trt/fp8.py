"""FP8 (E4M3, per-tensor) linear layers of the MM-DiT: which layers, and one module for both ways of running them.

Which layers (shared by calibration, the ONNX Q/DQ export and the torch backend): every ``nn.Linear`` of the
double- and single-stream blocks except the AdaLayerNorm modulation projections (``norm*.linear``). The
embedders (``x_embedder``, ``context_embedder``, ``time_text_embed``), ``norm_out`` and the final ``proj_out`` stay
in the base precision.

:class:`FP8Linear` runs such a layer in one of two kernels:

- ``"qdq"``: fake quantization of input and weight through the custom op ``dynaip::fp8_qdq`` (``float8_e4m3fn``
  casts, saturating), with calibrated static scales. The ONNX exporter turns it into
  ``QuantizeLinear``/``DequantizeLinear`` in front of the MatMul: the explicit-quantization pattern TensorRT builds
  FP8 GEMMs from (:mod:`export.fp8`), and what ONNX Runtime runs on the CPU as the FP8 oracle.
- ``"scaled_mm"``: a real FP8 GEMM (``torch._scaled_mm``: FP8 tensor cores on Hopper/Ada GPUs, a reference kernel
  on the CPU) with the weight stored in float8 and a dynamic per-tensor input scale computed on the device (no host
  sync, CUDA-graph safe): the torch backend's FP8 path.

:func:`quantize_fp8` returns a converted **copy** of a transformer; the caller's model is never changed.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .manifest import FP8_E4M3_MAX

QUANTIZED_BLOCKS = ("transformer_blocks", "single_transformer_blocks")
KERNELS = ("qdq", "scaled_mm")


def fp8_layers(transformer: nn.Module) -> dict[str, nn.Linear]:
    """``{name: layer}`` of the Linear layers run in FP8: inside the transformer blocks, not a norm's modulation
    projection. Everything else (embedders, norms, ``norm_out``, final ``proj_out``) stays higher."""
    return {name: m for name, m in transformer.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[0] in QUANTIZED_BLOCKS
            and not any(part.startswith("norm") for part in name.split("."))}


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``e4m3(clamp(x / scale, +-448))``: saturating per-tensor quantization (``scale`` a scalar tensor)."""
    return (x.float() / scale.float()).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def amax_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale ``max|x| / 448`` as a float32 scalar tensor (never 0)."""
    return (x.detach().abs().amax().float() / FP8_E4M3_MAX).clamp_min(1e-12)


def positive_scale(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` clamped to the smallest positive normal value of its dtype: a tiny amax would otherwise round to a
    scale of exactly 0 in fp16/bf16, which TensorRT's ONNX parser rejects (Q/DQ scales must be positive)."""
    return scale.clamp_min(torch.finfo(scale.dtype).tiny)


@torch.library.custom_op("dynaip::fp8_qdq", mutates_args=())
def fp8_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP8 E4M3 quantize-dequantize: ``e4m3(clamp(x / scale, +-448)) * scale`` in ``x``'s dtype."""
    return (to_fp8(x, scale).float() * scale.float()).to(x.dtype)


@fp8_qdq.register_fake
def _fp8_qdq_shape(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class FP8Linear(nn.Module):
    """An ``nn.Linear`` ``[..., in] -> [..., out]`` with FP8 E4M3 input and weight (see the module docstring).

    Args:
        linear: the layer to convert (its weight is copied, never modified).
        input_amax: calibrated ``max|input|`` (static scale ``input_amax / 448``); ``None``: a dynamic scale per call.
        weight_amax: ``max|weight|`` (default: measured from the weight).
        kernel: ``"qdq"`` (fake quantization, exportable) or ``"scaled_mm"`` (``torch._scaled_mm``).
    """

    def __init__(self, linear: nn.Linear, input_amax: float | None = None, weight_amax: float | None = None,
                 kernel: str = "qdq"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown FP8 kernel {kernel!r}; expected one of {KERNELS}")
        w = linear.weight.detach()
        self.kernel = kernel
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_scale", amax_scale(w) if weight_amax is None else
                             torch.tensor(max(weight_amax, 1e-12) / FP8_E4M3_MAX))
        self.register_buffer("input_scale", None if input_amax is None else
                             torch.tensor(max(input_amax, 1e-12) / FP8_E4M3_MAX))
        if kernel == "scaled_mm":
            self.register_buffer("weight_fp8", to_fp8(w, self.weight_scale))
            self.weight = None
        else:
            self.weight = nn.Parameter(w.clone(), requires_grad=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = amax_scale(x) if self.input_scale is None else self.input_scale
        if self.kernel == "qdq":
            w = fp8_qdq(self.weight, positive_scale(self.weight_scale.to(self.weight.dtype)))
            return F.linear(fp8_qdq(x, positive_scale(scale.to(x.dtype))), w, self.bias)
        x2d = x.reshape(-1, self.in_features)  # [tokens, in]
        out = torch._scaled_mm(to_fp8(x2d, scale), self.weight_fp8.t(), scale_a=scale.float(),
                               scale_b=self.weight_scale.float(), bias=None, out_dtype=x.dtype)  # [tokens, out]
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        scale = "dynamic" if self.input_scale is None else "static"
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 {self.kernel}, {scale} input"


def quantize_fp8(transformer: nn.Module, kernel: str = "qdq",
                 amax: dict[str, dict[str, float]] | None = None) -> nn.Module:
    """A copy of ``transformer`` whose :func:`fp8_layers` are :class:`FP8Linear` layers (the original is untouched).

    ``amax``: ``{layer name: {"input": float, "weight": float}}`` from calibration (static input scales); ``None``:
    dynamic input scales. GPUs need FP8 tensor cores (compute capability >= 8.9) for ``"scaled_mm"``.
    """
    q = copy.deepcopy(transformer)
    for name, layer in fp8_layers(q).items():
        a = (amax or {}).get(name, {})
        parent, _, child = name.rpartition(".")
        setattr(q.get_submodule(parent) if parent else q, child,
                FP8Linear(layer, a.get("input"), a.get("weight"), kernel))
    return q
