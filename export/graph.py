"""ONNX graph clean-up and TensorRT-readiness checks.

- :func:`optimize`: constant folding with the onnxscript optimizer (also rewrites the exporter's sequence
  splits, which TensorRT's parser rejects, into ``Split``).
- :func:`check_graph`: every op in the TensorRT ONNX parser's supported list, no float64 tensors, declared
  dynamic axes still symbolic.
"""

from __future__ import annotations

import csv
import logging
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import onnx

from dynaip_trt.errors import DynaIPError

logger = logging.getLogger(__name__)

OP_TABLE = Path(__file__).parent / "data" / "tensorrt-10.0-onnx-operators.tsv"
TWO_GIB = 2**31


class GraphCheckError(DynaIPError, RuntimeError):
    """An exported graph is not TensorRT-ready (unsupported ops, float64, baked dynamic axes, Q/DQ placement)."""


@lru_cache(maxsize=1)
def tensorrt_supported_ops(path: Path = OP_TABLE) -> dict[str, bool]:
    """``{op_type: supported}`` from the TensorRT ONNX parser's operator table kept in the repo (source and
    version in the file's header)."""
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    rows = csv.DictReader(lines, delimiter="\t")
    return {r["operator"]: r["supported"].strip() == "Y" for r in rows}


def optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and clean-up with the onnxscript optimizer.

    It also turns the exporter's ``SplitToSequence``/``SequenceAt`` pairs (from ``chunk``) into ``Split``, which
    TensorRT needs. polygraphy's ``fold_constants`` is faster at full depth but mistypes T5's relative-position
    bucket (a float Mul bound to an int64 constant), so it is not used.
    """
    from onnxscript import optimizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warnings while folding the T5 bucket's log(0) branch
        model = optimizer.optimize(model)
    for node in model.graph.node:  # the exporter's per-node stack traces are most of a small graph's bytes
        del node.metadata_props[:]
    return model


def model_bytes(model: onnx.ModelProto) -> int:
    return sum(t.ByteSize() for t in model.graph.initializer) + model.graph.ByteSize()


def save_model(model: onnx.ModelProto, path: Path, external_threshold: int = TWO_GIB - 2**28) -> list[Path]:
    """Save ``model`` to ``path``; above ``external_threshold`` bytes all tensors go to one ``<name>.data`` file
    (the 2 GiB protobuf limit). Returns the files written."""
    path = Path(path)
    if model_bytes(model) > external_threshold:
        data = path.with_name(path.name + ".data")
        if data.exists():
            data.unlink()
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)  # shape constants stay inline
        return [path, data]
    onnx.save_model(model, str(path))
    return [path]


@dataclass
class GraphReport:
    """Result of :func:`check_graph`; ``ok`` when there are no problems."""

    ops: set[str] = field(default_factory=set)
    unsupported: set[str] = field(default_factory=set)
    float64: list[str] = field(default_factory=list)
    static_axes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unsupported or self.float64 or self.static_axes)

    def problems(self) -> list[str]:
        out = []
        if self.unsupported:
            out.append(f"ops not supported by the TensorRT ONNX parser: {sorted(self.unsupported)}")
        if self.float64:
            out.append(f"float64 tensors (TensorRT has none): {self.float64[:5]}")
        if self.static_axes:
            out.append(f"dynamic axes baked to static sizes: {self.static_axes}")
        return out


def _all_nodes(model: onnx.ModelProto):
    stack = list(model.graph.node) + [n for f in model.functions for n in f.node]
    while stack:
        n = stack.pop()
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                stack.extend(a.g.node)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    stack.extend(sub.node)


def check_graph(model: onnx.ModelProto, dynamic_axes: dict[str, dict[int, str]]) -> GraphReport:
    """Check a graph (loaded without external data is fine) for TensorRT readiness."""
    supported = tensorrt_supported_ops()
    report = GraphReport()
    for n in _all_nodes(model):
        report.ops.add(n.op_type)
        if n.domain not in ("", "ai.onnx") or not supported.get(n.op_type, False):
            report.unsupported.add(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}")
        if n.op_type == "Cast":
            to = next((a.i for a in n.attribute if a.name == "to"), None)
            if to == onnx.TensorProto.DOUBLE:
                report.float64.append(f"Cast to double in {n.name}")
    g = model.graph
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE:
            report.float64.append(vi.name)
    for init in g.initializer:
        if init.data_type == onnx.TensorProto.DOUBLE:
            report.float64.append(init.name)
    inputs = {i.name: i for i in g.input}
    for name, axes in dynamic_axes.items():
        dims = inputs[name].type.tensor_type.shape.dim
        for axis, axis_name in axes.items():
            if not dims[axis].dim_param:
                report.static_axes.append(f"{name}[{axis}] ({axis_name}) = {dims[axis].dim_value}")
    return report


def io_signature(model: onnx.ModelProto) -> tuple[dict, dict]:
    """``({input: {dtype, shape}}, {output: {dtype, shape}})`` with symbolic dims as strings."""

    def sig(values):
        out = {}
        for v in values:
            t = v.type.tensor_type
            out[v.name] = {"dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                           "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}
        return out

    return sig(model.graph.input), sig(model.graph.output)
