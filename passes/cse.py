"""Common subexpression elimination.

Two nodes compute the same values when they have the same (domain, op type, attributes,
inputs) and the op is deterministic; the later one is dropped and its outputs' readers
read the earlier one's outputs. Visiting nodes in topological order while renaming makes
whole duplicated chains collapse in one pass. Identical small constant initializers
(same dtype, dims and bytes, not graph inputs) are merged first, so duplicated constants
do not hide duplicated nodes. A node whose output is a graph output is kept (its name is
the graph's interface), and nodes with subgraphs are never merged.
"""

from __future__ import annotations

import onnx

from graphc.ir.node import with_graph, with_inputs_renamed

NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                    "Bernoulli", "Dropout"}
MAX_CONST_BYTES = 1 << 16


def _has_subgraph(n: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)


class CommonSubexpressionElimination:
    name = "cse"

    def __init__(self):
        self.stats: dict[str, int] = {}

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        g = model.graph
        outputs = {v.name for v in g.output}
        graph_inputs = {v.name for v in g.input}
        rename: dict[str, str] = {}
        # identical constants
        seen_const: dict[tuple, str] = {}
        inits = []
        for t in g.initializer:
            if t.name not in graph_inputs and t.ByteSize() <= MAX_CONST_BYTES:
                key = (t.data_type, tuple(t.dims), _payload(t))
                if key in seen_const:
                    rename[t.name] = seen_const[key]
                    continue
                seen_const[key] = t.name
            inits.append(t)
        merged_consts = len(g.initializer) - len(inits)
        # identical nodes
        seen: dict[tuple, onnx.NodeProto] = {}
        nodes = []
        merged = 0
        for n in g.node:
            if any(i in rename for i in n.input):
                n = with_inputs_renamed(n, rename)
            if (n.op_type not in NONDETERMINISTIC and not _has_subgraph(n)
                    and not any(o in outputs for o in n.output)):
                key = (n.domain, n.op_type, tuple(n.input), len(n.output),
                       tuple(sorted(a.SerializeToString(deterministic=True) for a in n.attribute)))
                first = seen.get(key)
                if first is not None:
                    for a, b in zip(n.output, first.output):
                        if a:
                            rename[a] = b
                    merged += 1
                    continue
                seen[key] = n
            nodes.append(n)
        self.stats = {"merged_nodes": merged, "merged_constants": merged_consts}
        if not (merged or merged_consts):
            return model, False
        return with_graph(model, nodes=nodes, initializers=inits), True


def _payload(t: onnx.TensorProto) -> bytes:
    c = onnx.TensorProto()
    c.CopyFrom(t)
    c.name = ""
    c.doc_string = ""
    return c.SerializeToString(deterministic=True)


def cse() -> CommonSubexpressionElimination:
    return CommonSubexpressionElimination()
