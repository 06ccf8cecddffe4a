"""Fold Transposes into the GEMMs that read them, and compose Transpose chains.

* ``Gemm(Transpose(A), B)`` -> ``Gemm(A, B, transA=1 - transA)`` (same for B): Gemm's
  transA/transB flags say which operand is read transposed, so a 2-D Transpose feeding
  it is free;
* ``MatMul(Transpose(A), B)`` with both operands 2-D -> ``Gemm(A, B, transA=1)`` (and
  for B), so the backward of a linear layer (dW = dY^T X) needs no transposed copy;
* ``Transpose(Transpose(x, p), q)`` -> ``Transpose(x, p o q)``, or plain x when the
  composition is the identity permutation (a reader of a graph output is left alone).

Transposes left without readers are removed by DCE.
"""

from __future__ import annotations

import onnx

from onnx import helper

from graphc.ir.node import with_graph
from graphc.passes.fusions.pattern import GraphIndex, attr


def _perm2(idx: GraphIndex, v: str):
    """If v = Transpose(x, [1, 0]) of a 2-D x, return x."""
    n = idx.node_of(v)
    if n is None or n.op_type != "Transpose" or n.domain:
        return None
    perm = attr(n, "perm")
    if perm is None:
        perm = list(range(idx.rank(n.input[0]) or 0))[::-1]
    return n.input[0] if list(perm) == [1, 0] else None


class FoldTranspose:
    name = "fold_transpose"

    def __init__(self):
        self.stats: dict[str, int] = {}

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        idx = GraphIndex(model)
        outputs = {v.name for v in model.graph.output}
        rename: dict[str, str] = {}
        nodes, gemm, composed = [], 0, 0
        for n in idx.nodes:
            if n.domain:
                nodes.append(n)
                continue
            if n.op_type in ("Gemm", "MatMul") and (n.op_type == "Gemm" or (idx.rank(n.input[0]) == 2
                                                                           and idx.rank(n.input[1]) == 2)):
                a, b = _perm2(idx, n.input[0]), _perm2(idx, n.input[1])
                if a is not None or b is not None:
                    ta, tb = (attr(n, "transA", 0), attr(n, "transB", 0)) if n.op_type == "Gemm" else (0, 0)
                    kw = {k: attr(n, k) for k in ("alpha", "beta") if attr(n, k) is not None}
                    ins = [a if a is not None else n.input[0], b if b is not None else n.input[1], *n.input[2:]]
                    new = helper.make_node("Gemm", ins, list(n.output), name=n.name,
                                           transA=(1 - ta) if a is not None else ta,
                                           transB=(1 - tb) if b is not None else tb, **kw)
                    nodes.append(new)
                    gemm += 1
                    continue
            if n.op_type == "Transpose":
                inner = idx.node_of(n.input[0])
                if inner is not None and inner.op_type == "Transpose" and not inner.domain:
                    p, q = attr(inner, "perm"), attr(n, "perm")
                    if p is not None and q is not None:
                        comp = [p[i] for i in q]
                        composed += 1
                        if comp == list(range(len(comp))) and n.output[0] not in outputs:
                            rename[n.output[0]] = inner.input[0]
                            continue
                        nodes.append(helper.make_node("Transpose", [inner.input[0]], list(n.output), name=n.name,
                                                      perm=comp))
                        continue
            nodes.append(n)
        self.stats = {"gemm_transposes": gemm, "composed_transposes": composed}
        if not (gemm or composed):
            return model, False
        if rename:
            for j, n in enumerate(nodes):
                if any(v in rename for v in n.input):
                    c = onnx.NodeProto()
                    c.CopyFrom(n)          # never mutate the input model's nodes
                    for k, v in enumerate(c.input):
                        while v in rename:
                            v = rename[v]
                        c.input[k] = v
                    nodes[j] = c
        return with_graph(model, nodes=nodes), True


def fold_transpose() -> FoldTranspose:
    return FoldTranspose()
