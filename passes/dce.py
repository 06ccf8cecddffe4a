"""Dead code elimination: drop nodes, initializers and local functions nothing needs.

A node is live if one of its outputs is a graph output or is read by a live node
(walked backwards from the graph outputs, so whole dead chains go in one pass). Graph
inputs are the graph's interface and are never removed, even when unused. Initializers
no live node reads (and that are not graph inputs) are dropped; so are model-local
functions no live node (or live function) calls, and value_info of removed values.
"""

from __future__ import annotations

import onnx

from graphc.ir.node import subgraph_reads, with_graph


class DeadCodeElimination:
    name = "dce"

    def __init__(self):
        self.stats: dict[str, int] = {}

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        g = model.graph
        live = {v.name for v in g.output}
        keep = []
        for n in reversed(g.node):
            if any(o and o in live for o in n.output):
                keep.append(n)
                live.update(i for i in n.input if i)
                live.update(subgraph_reads(n))
        keep.reverse()
        graph_inputs = {v.name for v in g.input}
        inits = [t for t in g.initializer if t.name in live or t.name in graph_inputs]
        fns = _live_functions(model, keep)
        removed_nodes = len(g.node) - len(keep)
        removed_inits = len(g.initializer) - len(inits)
        removed_fns = len(model.functions) - len(fns)
        self.stats = {"removed_nodes": removed_nodes, "removed_initializers": removed_inits,
                      "removed_functions": removed_fns}
        if not (removed_nodes or removed_inits or removed_fns):
            return model, False
        produced = {o for n in keep for o in n.output}
        vi = [v for v in g.value_info if v.name in produced]
        return with_graph(model, nodes=keep, initializers=inits, value_info=vi, functions=fns), True


def _live_functions(model: onnx.ModelProto, nodes) -> list[onnx.FunctionProto]:
    by_key = {(f.domain, f.name): f for f in model.functions}
    todo = [(n.domain, n.op_type) for n in nodes if (n.domain, n.op_type) in by_key]
    seen: set = set()
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        seen.add(key)
        todo += [(n.domain, n.op_type) for n in by_key[key].node if (n.domain, n.op_type) in by_key]
    return [f for f in model.functions if (f.domain, f.name) in seen]


def dce() -> DeadCodeElimination:
    return DeadCodeElimination()
