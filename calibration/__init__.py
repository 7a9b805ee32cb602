"""FP8 calibration and quantization of the MM-DiT's linear layers.

``python -m calibration.collect`` runs the PyTorch reference pipeline on the shipped prompts
(``calibration/data/prompts.txt``) with deterministic synthetic reference images and saves the DiT inputs it sees
(``dit_inputs.npz``) plus every FP8 layer's activation amax (``amax.json``). ``python -m calibration.quantize``
recalibrates with NVIDIA ModelOpt when it is installed, reports FP8's quality cost against fp16/bf16 and fp32,
and exports ``dit.fp8.onnx`` (QuantizeLinear/DequantizeLinear in front of every quantized MatMul) into a build
directory. ``python -m export.build --precision fp8`` runs both when needed.
"""
