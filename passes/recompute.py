"""Activation recomputation: backward reads a recomputed copy of cheap forward outputs.

A training graph keeps every forward value the backward reads alive from the forward until
its backward use; for GPT-2 the largest of those are the GELU outputs ``[B, T, 4C]`` (the
input of the MLP's second GEMM, read again by its weight gradient) and the layer-norm
outputs ``[B, T, C]`` (read again by the weight gradients of the GEMMs they feed). Both are
cheap to compute from values the backward keeps anyway (the GELU's pre-activation is
GeluGrad's input; the layer norm's input, scale and bias are LayerNormGrad's), so this pass
gives each backward reader a clone of the producing node, placed just before the first
backward reader: the forward output now dies after its last forward use, and the memory
planners (``passes/memory_plan.py``, the CUDA arena) reuse its room.

*Forward* is structural: the nodes the loss depends on (ancestors of the loss output);
every other reader is a backward reader. The clones compute exactly what the originals
did (same op, attributes and inputs), so the gradients are bit for bit the same.

Run it after the last CSE of the pipeline (CSE would merge each clone back into its
original); ``optimize(..., recompute=True)`` appends it after the train cleanup, before
the precision passes, which then treat the clones like the originals.
"""

from __future__ import annotations

import onnx

from graphc.ir.node import with_graph, with_inputs_renamed

# (domain, op) -> how many leading outputs the clone keeps (LayerNormalization: Y only,
# not the mean / inverse std its backward does not read from the clone)
RECOMPUTABLE: dict[tuple[str, str], int] = {
    ("", "Gelu"): 1,
    ("", "LayerNormalization"): 1,
}
SUFFIX = ".recomputed"


def loss_ancestors(graph: onnx.GraphProto, loss: str) -> set[int]:
    """Indices of the nodes the loss depends on (the forward part of a training graph)."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    todo = [loss]
    seen: set[int] = set()
    while todo:
        i = producer.get(todo.pop())
        if i is None or i in seen:
            continue
        seen.add(i)
        todo.extend(x for x in graph.node[i].input if x)
    return seen


class Recompute:
    name = "recompute"
    fuses = False   # its clones are copies, not new fusions (the pass report does not count them)

    def __init__(self, loss: str = "loss"):
        self.loss = loss
        self.stats: dict[str, int] = {}

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        g = model.graph
        forward = loss_ancestors(g, self.loss)
        outputs = {o.name for o in g.output}
        readers: dict[str, list[int]] = {}
        for i, n in enumerate(g.node):
            for x in n.input:
                if x:
                    readers.setdefault(x, []).append(i)
        clones: dict[int, list[onnx.NodeProto]] = {}   # insert before node index -> clones
        renames: dict[int, dict[str, str]] = {}        # node index -> {old input: clone output}
        value_info = {v.name: v for v in g.value_info}
        new_vi = []
        counts: dict[str, int] = {}
        for i in sorted(forward):
            n = g.node[i]
            keep = RECOMPUTABLE.get((n.domain or "", n.op_type))
            if keep is None:
                continue
            for y in n.output[:keep]:
                late = [j for j in readers.get(y, []) if j not in forward]
                if not y or y in outputs or not late:
                    continue
                name = y + SUFFIX
                clone = onnx.NodeProto()
                clone.CopyFrom(n)
                clone.name = (n.name or n.op_type) + SUFFIX
                del clone.output[:]
                clone.output.extend([name])
                first = min(late)
                clones.setdefault(first, []).append(clone)
                for j in late:
                    renames.setdefault(j, {})[y] = name
                if y in value_info:
                    vi = onnx.ValueInfoProto()
                    vi.CopyFrom(value_info[y])
                    vi.name = name
                    new_vi.append(vi)
                counts[n.op_type] = counts.get(n.op_type, 0) + 1
        self.stats = {f"recomputed_{op}": c for op, c in sorted(counts.items())}
        if not clones:
            return model, False
        nodes = []
        for i, n in enumerate(g.node):
            nodes.extend(clones.get(i, []))
            if i in renames:
                n = with_inputs_renamed(n, renames[i])
            nodes.append(n)
        return with_graph(model, nodes=nodes, value_info=list(g.value_info) + new_vi), True


def recompute(loss: str = "loss") -> Recompute:
    return Recompute(loss)
