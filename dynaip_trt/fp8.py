"""FP8 (E4M3, per-tensor) linear layers of the MM-DiT: which layers, and a real FP8 GEMM for the torch backend.

Which layers (shared by calibration, the ONNX Q/DQ export and the torch backend): every ``nn.Linear`` of the
double- and single-stream blocks except the AdaLayerNorm modulation projections (``norm*.linear``). The
embedders (``x_embedder``, ``context_embedder``, ``time_text_embed``), ``norm_out`` and the final ``proj_out`` stay
in the base precision.

:class:`ScaledMMLinear` stores the weight in ``float8_e4m3fn`` with a per-tensor scale and runs
``torch._scaled_mm`` (FP8 tensor cores on Hopper/Ada GPUs; a reference kernel on the CPU); the input is quantized
per call with a dynamic per-tensor scale (``amax / 448``, computed on the device: no host sync, CUDA-graph safe).
"""

from __future__ import annotations

import torch
from torch import nn

FP8_E4M3_MAX = 448.0  # largest finite float8 e4m3fn value: per-tensor scale = amax / FP8_E4M3_MAX
QUANTIZED_BLOCKS = ("transformer_blocks", "single_transformer_blocks")


def fp8_layers(transformer: nn.Module) -> dict[str, nn.Linear]:
    """``{name: layer}`` of the Linear layers run in FP8: inside the transformer blocks, not a norm's modulation
    projection. Everything else (embedders, norms, ``norm_out``, final ``proj_out``) stays higher."""
    return {name: m for name, m in transformer.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[0] in QUANTIZED_BLOCKS
            and not any(part.startswith("norm") for part in name.split("."))}


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``e4m3(clamp(x / scale, +-448))``: saturating per-tensor quantization (``scale`` a float32 scalar)."""
    return (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def amax_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale ``max|x| / 448`` as a float32 scalar tensor (never 0)."""
    return (x.detach().abs().amax().float() / FP8_E4M3_MAX).clamp_min(1e-12)


class ScaledMMLinear(nn.Module):
    """An ``nn.Linear`` ``[..., in] -> [..., out]`` computed as one FP8 GEMM (``torch._scaled_mm``).

    Buffers: ``weight_fp8`` ``[out, in]`` float8_e4m3fn, ``weight_scale`` (float32 scalar) and ``bias`` ``[out]`` in
    the compute dtype. The input is quantized with a dynamic per-tensor scale; the output has the input's dtype.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_scale", amax_scale(w))
        self.register_buffer("weight_fp8", to_fp8(w, self.weight_scale))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)  # [tokens, in]
        scale = amax_scale(x2d)
        out = torch._scaled_mm(to_fp8(x2d, scale), self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale,
                               bias=None, out_dtype=x.dtype)  # [tokens, out]
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 dynamic"


def quantize_fp8_(transformer: nn.Module) -> int:
    """Replace every :func:`fp8_layers` layer of ``transformer`` by a :class:`ScaledMMLinear` (in place, on the
    layers' device); returns how many were replaced. GPUs need FP8 tensor cores (compute capability >= 8.9) and
    layer widths that are multiples of 16."""
    layers = fp8_layers(transformer)
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(transformer.get_submodule(parent) if parent else transformer, child, ScaledMMLinear(layer))
    return len(layers)
