"""TEMPORARY: a stand-in for graphc's BF16 pass until ``graphc.passes.precision`` lands.

Used only when ``graphc.passes.precision.to_bf16`` cannot be imported (the precision pass
was being written in parallel). It is deliberately minimal: each GEMM, MatMul, Attention
and Gelu of the main graph runs in BF16 (its float inputs cast to BF16, its outputs cast
back to FP32); everything else -- layer norms, softmax, the loss, parameters, gradients --
stays FP32. Delete this file once the real pass is merged.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from graphc.ir.node import with_graph

BF16_OPS = {"Gemm", "MatMul", "Attention", "Gelu"}


def _float_values(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    vals = {v.name for v in (*g.input, *g.value_info, *g.output) if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    return vals | {t.name for t in g.initializer if t.data_type == TensorProto.FLOAT}


def to_bf16_temporary(model: onnx.ModelProto) -> onnx.ModelProto:
    floats = _float_values(model)
    nodes = []
    for n in model.graph.node:
        if n.op_type not in BF16_OPS or n.domain not in ("", "ai.onnx"):
            nodes.append(n)
            continue
        new = onnx.NodeProto()
        new.CopyFrom(n)
        for i, x in enumerate(n.input):
            if x in floats:
                cast = f"{x}__bf16_for_{n.name}"
                nodes.append(helper.make_node("Cast", [x], [cast], to=TensorProto.BFLOAT16, name=f"{cast}/cast"))
                new.input[i] = cast
        for i, y in enumerate(n.output):
            if y in floats:
                new.output[i] = f"{y}__bf16"
        nodes.append(new)
        for y, y16 in zip(n.output, new.output):
            if y != y16:
                nodes.append(helper.make_node("Cast", [y16], [y], to=TensorProto.FLOAT, name=f"{y}/cast_fp32"))
    out = with_graph(model, nodes=nodes, value_info=[])
    return onnx.shape_inference.infer_shapes(out)
