"""Remove nodes that compute their input unchanged.

* ``Identity``;
* ``Cast`` to the dtype its input already has;
* ``Reshape`` whose output shape equals its input shape (both fully known: static ints or
  the same symbolic dims) and ``Transpose`` with the identity permutation.

Readers of the output read the input instead. Graph outputs are never removed: when the
output is a graph output, the *producer* of the input is made to write the graph output
name directly (if the input is an ordinary intermediate value); otherwise the node stays.
"""

from __future__ import annotations

import onnx


from graphc.ir.node import with_graph
from graphc.passes.fusions.pattern import GraphIndex, attr


def is_identity(idx: GraphIndex, n: onnx.NodeProto) -> bool:
    if n.domain or len(n.output) != 1 or not n.input or not n.input[0]:
        return False
    x, y = n.input[0], n.output[0]
    if n.op_type == "Identity":
        return True
    if n.op_type == "Cast":
        return idx.dtype(x) is not None and idx.dtype(x) == attr(n, "to")
    if n.op_type == "Transpose":
        perm = attr(n, "perm")
        return perm is not None and list(perm) == list(range(len(perm)))
    if n.op_type == "Reshape":
        sx, sy = idx.shape(x), idx.shape(y)
        return sx is not None and sy is not None and None not in sx and sx == sy
    return False


class RemoveIdentity:
    name = "remove_identity"

    def __init__(self):
        self.stats: dict[str, int] = {}

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        idx = GraphIndex(model)
        g = model.graph
        outputs = {v.name for v in g.output}
        rename: dict[str, str] = {}        # reader-side: value -> replacement
        rename_out: dict[str, str] = {}    # producer-side: a node's output -> graph output name
        drop: set[int] = set()

        def resolve(v: str) -> str:
            while v in rename:
                v = rename[v]
            return v

        for i, n in enumerate(idx.nodes):
            if not is_identity(idx, n):
                continue
            x, y = resolve(n.input[0]), n.output[0]
            if y not in outputs:
                rename[y] = x
                drop.add(i)
            elif (x in idx.producer and x not in outputs and x not in rename_out
                  and x not in idx.graph_inputs and x not in rename_out.values()):
                rename_out[x] = y
                drop.add(i)
        self.stats = {"removed": len(drop)}
        if not drop:
            return model, False
        nodes = []
        for i, n in enumerate(idx.nodes):
            if i in drop:
                continue
            c = onnx.NodeProto()
            c.CopyFrom(n)
            for k, v in enumerate(c.input):
                v2 = resolve(v) if v else v
                c.input[k] = rename_out.get(v2, v2)
            for k, v in enumerate(c.output):
                c.output[k] = rename_out.get(v, v)
            nodes.append(c)
        return with_graph(model, nodes=nodes), True


def remove_identity() -> RemoveIdentity:
    return RemoveIdentity()
