"""Fuse multi-head causal attention into the standard ``Attention`` op (opset 23/24).

Math, with Q [B, H, Tq, D], K and V [B, H, Tk, D]::

    kT = Transpose(K, perm=[0, 1, 3, 2])        # [B, H, D, Tk]
    s  = MatMul(Q, kT) * scale                   # Mul or Div by a scalar constant (or none)
    s  = Where(causal, s, -inf)                  # optional; causal[i, j] = j <= i
    p  = Softmax(s, axis=-1)
    y  = MatMul(p, V)                            # [B, H, Tq, D]
      ==> Attention(Q, K, V, scale=scale, is_causal=1 (0 without the Where))

``is_causal=1`` means ONNX's *upper-left* causal mask (query i sees keys j <= i), which
is the plain causal mask only when Tq == Tk; TensorRT supports exactly this form (no past
inputs, no attn_mask). So the Where's condition must be *proved* to be that mask, by
structure, one of:

* ``LessOrEqual(Unsqueeze(Range(0, E, 1), [0]), Unsqueeze(Range(0, E', 1), [1]))`` (or the
  mirrored ``GreaterOrEqual``), where both range lengths are the same sequence length:
  each is a dim read from a ``Shape`` (``Slice``/``Gather``/``Shape(start,end)``, through
  ``Add(0, .)``/``Squeeze``/``Cast``) whose symbolic or static value equals *both* of the
  scores' last two dims (so Tq == Tk == T);
* a constant boolean lower-triangular [T, T] mask with T equal to the scores' static dims.

A KV-cache mask (query positions offset by the cache length) fails the first check
("the query positions do not start at 0") and stays unfused, as it must.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from graphc.passes.fusions.pattern import (
    Fusion, FusionPass, GraphIndex, Match, NoMatch, Rewrite, attr, commuted, expect, last_axis,
)

FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


def _strip(idx: GraphIndex, value: str) -> str:
    """Follow value-preserving wrappers: Add(0, v), Squeeze, Reshape to the same size, Cast."""
    while True:
        n = idx.node_of(value)
        if n is None or n.domain:
            return value
        if n.op_type == "Add":
            a, b = n.input
            if idx.scalar(a) == 0 and idx.scalar(b) is None:
                value = b
                continue
            if idx.scalar(b) == 0 and idx.scalar(a) is None:
                value = a
                continue
            return value
        if n.op_type in ("Squeeze", "Unsqueeze", "Cast", "Identity") or (
                n.op_type == "Reshape" and idx.const(n.input[1]) is not None and idx.const(n.input[1]).size <= 1):
            value = n.input[0]
            continue
        return value


def shape_dim(idx: GraphIndex, value: str):
    """If ``value`` is one dim read off a tensor's shape, that dim (int or symbol); else None."""
    value = _strip(idx, value)
    n = idx.node_of(value)
    if n is None or n.domain:
        return None
    if n.op_type == "Shape":
        src, start, end = n.input[0], attr(n, "start", 0), attr(n, "end", None)
        shp = idx.shape(src)
        if shp is None:
            return None
        dims = shp[start:end]
        return dims[0] if len(dims) == 1 else None
    if n.op_type in ("Slice", "Gather"):
        sh = idx.node_of(n.input[0])
        if sh is None or sh.op_type != "Shape":
            return None
        shp = idx.shape(sh.input[0])
        if shp is None:
            return None
        dims = shp[attr(sh, "start", 0):attr(sh, "end", None)]
        if n.op_type == "Gather":
            i = idx.ints(n.input[1])
            return dims[i[0]] if i is not None and len(i) == 1 and -len(dims) <= i[0] < len(dims) else None
        starts, ends = idx.ints(n.input[1]), idx.ints(n.input[2])
        axes = idx.ints(n.input[3]) if len(n.input) > 3 and n.input[3] else [0]
        steps = idx.ints(n.input[4]) if len(n.input) > 4 and n.input[4] else [1]
        if None in (starts, ends, axes, steps) or axes != [0] or steps != [1] or len(starts) != 1:
            return None
        sel = dims[starts[0]:ends[0]]
        return sel[0] if len(sel) == 1 else None
    return None


class AttentionFusion(Fusion):
    name = "attention"
    anchors = ("MatMul",)

    def match(self, idx: GraphIndex, root: int) -> Match:
        m = Match(idx, root)
        p, v = idx.nodes[root].input
        sm = m.take(p, "Softmax", "attention probabilities")
        expect(last_axis(idx, sm.input[0], attr(sm, "axis", -1)), "the softmax is not over the last axis")
        s = sm.input[0]
        causal = 0
        where = m.try_take(s, "Where")
        if where is not None:
            cond, s, fill = where.input
            f = idx.const(fill)
            expect(f is not None and f.size == 1 and float(f.reshape(())) == -np.inf,
                   "the masked fill value is not -inf")
            m.values["mask"] = cond
            causal = 1
        scale = 1.0
        scaled = idx.node_of(s)
        if scaled is not None and scaled.op_type in ("Mul", "Div") and not scaled.domain:
            m.take(s, ("Mul", "Div"))
            if scaled.op_type == "Div":
                c = idx.scalar(scaled.input[1])
                expect(c is not None and c != 0, "the scores are divided by a non-constant")
                scale, s = 1.0 / c, scaled.input[0]
            else:
                for a, b in commuted(scaled):
                    if idx.scalar(b) is not None:
                        scale, s = idx.scalar(b), a
                        break
                else:
                    raise NoMatch("the scores are multiplied by a non-constant")
        qk = m.take(s, "MatMul", "scores")
        q, kt = qk.input
        tr = m.take(kt, "Transpose", "K^T")
        expect(list(attr(tr, "perm", [])) == [0, 1, 3, 2], f"K^T's perm is {attr(tr, 'perm')}, not [0, 1, 3, 2]")
        k = tr.input[0]
        for t, what in ((q, "Q"), (k, "K"), (v, "V")):
            expect(idx.rank(t) == 4, f"{what} is not 4-D [B, H, T, D] (rank {idx.rank(t)})")
            expect(idx.dtype(t) in FLOATS, f"{what} is not floating point")
        scores = idx.shape(qk.output[0])
        expect(scores is not None and len(scores) == 4, "the scores' shape is unknown")
        if causal:
            self._check_causal(m, m.values["mask"], scores[2], scores[3])
        m.values.update(q=q, k=k, v=v, scale=float(scale), causal=causal)
        return m

    def _check_causal(self, m: Match, mask: str, tq, tk) -> None:
        idx = m.idx
        expect(tq is not None and tq == tk, f"the scores are not square (Tq={tq}, Tk={tk}): not the plain causal mask")
        c = idx.const(mask)
        if c is not None:
            expect(c.dtype == np.bool_ and c.ndim == 2 and c.shape[0] == c.shape[1] == tq
                   and np.array_equal(c, np.tril(np.ones(c.shape, bool))),
                   "the constant mask is not lower-triangular of the scores' size")
            return
        cmp = idx.node_of(mask)
        expect(cmp is not None and cmp.op_type in ("LessOrEqual", "GreaterOrEqual") and not cmp.domain,
               "the mask is not LessOrEqual(key positions, query positions) nor a constant")
        kr, qc = cmp.input if cmp.op_type == "LessOrEqual" else cmp.input[::-1]
        k_pos = self._positions(idx, kr, row=True, what="key")
        q_pos = self._positions(idx, qc, row=False, what="query")
        for pos, what in ((k_pos, "key"), (q_pos, "query")):
            d = shape_dim(idx, pos)
            expect(d is not None, f"the {what} range length is not read from a tensor's shape")
            expect(d == tq, f"the {what} range length ({d}) is not the scores' sequence length ({tq})")

    @staticmethod
    def _positions(idx: GraphIndex, value: str, row: bool, what: str) -> str:
        """value = Unsqueeze(Range(0, E, 1), [0] for a row / [1] for a column); returns E."""
        un = idx.node_of(value)
        expect(un is not None and un.op_type == "Unsqueeze", f"the {what} positions are not an Unsqueeze")
        axes = idx.ints(un.input[1])
        expect(axes in (([0], [-2]) if row else ([1], [-1])), f"the {what} positions are unsqueezed on axes {axes}")
        rg = idx.node_of(un.input[0])
        expect(rg is not None and rg.op_type == "Range", f"the {what} positions are not a Range")
        start, limit, delta = rg.input
        expect(idx.scalar(start) == 0, f"the {what} positions do not start at 0")
        expect(idx.scalar(delta) == 1, f"the {what} positions do not step by 1")
        return limit

    def rewrite(self, m: Match) -> Rewrite:
        v = m.values
        node = helper.make_node("Attention", [v["q"], v["k"], v["v"]], [m.root_node.output[0]],
                                is_causal=v["causal"], scale=v["scale"])
        return Rewrite([node])


def fuse_attention() -> FusionPass:
    return FusionPass(AttentionFusion())
