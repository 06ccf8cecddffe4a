"""Constant folding of *small* constants.

A node is folded when every input is a constant (an initializer that is not a graph
input, or a ``Constant`` node's output) of at most ``MAX_ELEMENTS`` elements and its
results are that small too; it is evaluated once with ``onnx.reference`` and replaced by
initializers carrying its output names. Graph inputs (the model's parameters, tokens)
are never constants, so parameters are never folded; the size limit keeps an exported
model's weight initializers (and anything computed from them) out as well. ``Shape`` /
``Size`` of a value whose shape is fully static fold too. Nodes in non-standard domains,
with subgraphs, or random ones are left alone; so is a node writing a graph output.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from graphc.ir.node import with_graph
from graphc.passes.fusions.pattern import GraphIndex, attr

MAX_ELEMENTS = 1024
SKIP = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
        "Dropout", "Constant", "If", "Loop", "Scan"}


class ConstantFold:
    name = "constant_fold"

    def __init__(self, max_elements: int = MAX_ELEMENTS):
        self.max_elements = max_elements
        self.stats: dict[str, int] = {}

    def _static_shape_value(self, idx: GraphIndex, n: onnx.NodeProto):
        shp = idx.shape(n.input[0])
        if shp is None or any(not isinstance(d, int) for d in shp):
            return None
        if n.op_type == "Size":
            return [np.array(int(np.prod(shp)), dtype=np.int64)]
        start, end = attr(n, "start", 0), attr(n, "end", None)
        return [np.array(shp[start:end], dtype=np.int64)]

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        idx = GraphIndex(model)
        outputs = {v.name for v in model.graph.output}
        known: dict[str, np.ndarray] = {}

        def const(v: str):
            if v in known:
                return known[v]
            c = idx.const(v)
            return c if c is not None and c.size <= self.max_elements else None

        nodes, new_inits, folded = [], [], 0
        for n in idx.nodes:
            values = None
            if not n.domain and n.op_type not in SKIP and not any(o in outputs for o in n.output):
                if n.op_type in ("Shape", "Size"):
                    values = self._static_shape_value(idx, n)
                else:
                    ins = [const(i) if i else None for i in n.input]
                    if n.input and all(a is not None for i, a in zip(n.input, ins) if i):
                        try:
                            values = ReferenceEvaluator(n).run(None, {i: a for i, a in zip(n.input, ins) if i})
                        except Exception:
                            values = None
            if values is not None and all(np.asarray(v).size <= self.max_elements for v in values):
                for name, v in zip(n.output, values):
                    if name:
                        arr = np.asarray(v)
                        known[name] = arr
                        new_inits.append(numpy_helper.from_array(arr, name))
                folded += 1
                continue
            nodes.append(n)
        self.stats = {"folded": folded}
        if not folded:
            return model, False
        return with_graph(model, nodes=nodes, initializers=[*model.graph.initializer, *new_inits]), True


def constant_fold() -> ConstantFold:
    return ConstantFold()
