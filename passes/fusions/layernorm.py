"""Fuse a decomposed layer norm into the standard ``LayerNormalization`` op.

Math (over the last axis, C elements)::

    mean = ReduceMean(x, [-1])                 # [..., 1]
    xc   = x - mean                            # Sub
    var  = ReduceMean(xc * xc, [-1])           # Mul(xc, xc) or Pow(xc, 2)
    rstd = 1 / Sqrt(var + eps)                 # Reciprocal(Sqrt(Add)) ; or xc / Sqrt(...)
    y    = (xc * rstd) * w + b                 # Mul, Mul, Add (bias optional)
      ==> LayerNormalization(x, w, b, axis=-1, epsilon=eps)

Checks: both reductions are over the last axis with keepdims=1 and reduce the same x /
the same xc; eps is a scalar constant; w (and b) are 1-D of length C (the last dim of x),
so they match LayerNormalization's Scale/B; Add and Mul are matched in either operand
order. The interior check (no intermediate value used elsewhere) is the driver's.
"""

from __future__ import annotations

from onnx import helper

from graphc.passes.fusions.pattern import (
    Fusion, FusionPass, GraphIndex, Match, Rewrite, attr, commuted, expect, last_axis, one_of,
    reduce_axes,
)


def same_dim(a, b) -> bool:
    return a is not None and a == b


class LayerNormFusion(Fusion):
    name = "layernorm"
    anchors = ("Add", "Mul")

    def match(self, idx: GraphIndex, root: int) -> Match:
        m = Match(idx, root)
        n = idx.nodes[root]
        if n.op_type == "Add":   # y = (norm * w) + b
            return one_of(m, commuted(n), lambda mm, ab: self._scaled(mm, ab[0], ab[1]))
        return self._scaled(m, n.output[0], None)  # y = norm * w (no bias)

    def _scaled(self, m: Match, scaled: str, bias: str | None) -> Match:
        mul = m.take(scaled, "Mul", "scaled value")
        return one_of(m, commuted(mul), lambda mm, nw: self._norm(mm, nw[0], nw[1], bias))

    def _norm(self, m: Match, norm: str, w: str, bias: str | None) -> Match:
        idx = m.idx
        node = m.take(norm, ("Mul", "Div"), "normalised value")
        if node.op_type == "Div":                  # xc / sqrt(var + eps)
            xc, std = node.input
            sqrt = m.take(std, "Sqrt", "divisor")
        else:                                      # xc * 1/sqrt(var + eps)
            def rstd_side(mm, pair):
                xc_, rstd_ = pair
                rec = mm.take(rstd_, "Reciprocal", "inverse std")
                sq = mm.take(rec.input[0], "Sqrt", "std")
                mm.values["xc"], mm.values["sqrt"] = xc_, sq
                return mm
            m = one_of(m, commuted(node), rstd_side)
            xc, sqrt = m.values["xc"], m.values["sqrt"]
        add = m.take(sqrt.input[0], "Add", "variance + eps")
        eps = None
        var = None
        for a, b in commuted(add):
            if idx.scalar(b) is not None and idx.node_of(a) is not None:
                var, eps = a, idx.scalar(b)
                break
        expect(var is not None, "the Add under Sqrt is not (variance + scalar constant eps)")
        var_mean = m.take(var, "ReduceMean", "variance")
        sq = m.take(var_mean.input[0], ("Mul", "Pow"), "squared deviation")
        if sq.op_type == "Mul":
            expect(sq.input[0] == sq.input[1], "the squared deviation is not xc * xc")
        else:
            expect(idx.scalar(sq.input[1]) == 2.0, "the squared deviation is not Pow(xc, 2)")
        expect(sq.input[0] == xc, "the variance does not square the centred value")
        sub = m.take(xc, "Sub", "centred value")
        x, mean = sub.input
        mean_node = m.take(mean, "ReduceMean", "mean")
        expect(mean_node.input[0] == x, "the mean is not of the value it is subtracted from")
        for r, what in ((mean_node, "mean"), (var_mean, "variance")):
            axes = reduce_axes(idx, r)
            expect(axes is not None and len(axes) == 1 and last_axis(idx, r.input[0], axes[0]),
                   f"the {what} does not reduce over the last axis only (axes {axes})")
            expect(attr(r, "keepdims", 1) == 1, f"the {what} does not keep dims")
        # parameters: 1-D of the normalised length
        xs = idx.shape(x)
        expect(xs is not None and len(xs) >= 1, "rank of x unknown")
        for p, what in ((w, "scale"), (bias, "bias")):
            if p is None:
                continue
            ps = idx.shape(p)
            expect(ps is not None and len(ps) == 1 and same_dim(ps[0], xs[-1]),
                   f"the {what} {p!r} has shape {ps}, not [C] with C = {xs[-1]}")
            expect(p not in {o for i in m.nodes for o in idx.nodes[i].output}, f"the {what} is computed in the pattern")
        m.values.update(x=x, w=w, b=bias, eps=eps)
        return m

    def rewrite(self, m: Match) -> Rewrite:
        v = m.values
        inputs = [v["x"], v["w"]] + ([v["b"]] if v["b"] is not None else [])
        node = helper.make_node("LayerNormalization", inputs, [m.root_node.output[0]], axis=-1, epsilon=v["eps"])
        return Rewrite([node])


def fuse_layernorm() -> FusionPass:
    return FusionPass(LayerNormFusion())
