"""ONNX export, graph checks and TensorRT engine builds for dynaip-trt.

``python -m export.onnx`` exports every model the runtime needs (declared once in :mod:`export.specs`);
``python -m export.build`` turns them into TensorRT engines; ``python -m export.parity`` compares backends.
"""
