"""Fuse the loss (log-softmax, gather of the target, mean, negation) into ``graphc.CrossEntropy``.

Math, logits z [N, V] (any rank, classes on the last axis), targets t [N, 1] int64::

    logp   = LogSoftmax(z, axis=-1)
    picked = GatherElements(logp, t, axis=-1)       # [N, 1] = logp[i, t_i]
    loss   = Neg(ReduceMean(picked))                 # mean over *all* elements, keepdims=0
                                                     # (or ReduceMean(Neg(picked)))
      ==> graphc.CrossEntropy(z, t)                  # local function, body = the above

TensorRT has no SoftmaxCrossEntropyLoss, hence a graphc function (see ``graphc/ops/cross_entropy.py``); its
gradient ``graphc.CrossEntropyGrad`` is (softmax(z) - onehot(t)) * dloss / N.
"""

from __future__ import annotations

from graphc.ops import make_node
from graphc.passes.fusions.pattern import (
    Fusion, FusionPass, GraphIndex, Match, Rewrite, attr, expect, last_axis, reduce_axes,
)


class CrossEntropyFusion(Fusion):
    name = "cross_entropy"
    anchors = ("Neg", "ReduceMean")

    def match(self, idx: GraphIndex, root: int) -> Match:
        m = Match(idx, root)
        n = idx.nodes[root]
        if n.op_type == "Neg":
            mean = m.take(n.input[0], "ReduceMean", "negated value")
            picked = mean.input[0]
        else:
            mean = n
            neg = m.take(n.input[0], "Neg", "averaged value")
            picked = neg.input[0]
        axes = reduce_axes(idx, mean)
        expect(axes is None or (idx.rank(mean.input[0]) is not None
                                and sorted(a % idx.rank(mean.input[0]) for a in axes) == list(range(idx.rank(mean.input[0])))),
               f"the mean is not over every axis (axes {axes})")
        expect(attr(mean, "keepdims", 1) == 0, "the mean keeps dims (the loss is not a scalar)")
        expect(attr(mean, "noop_with_empty_axes", 0) == 0, "the mean is a no-op")
        gather = m.take(picked, "GatherElements", "averaged value")
        logp, target = gather.input
        lsm = m.take(logp, "LogSoftmax", "gathered value")
        z = lsm.input[0]
        expect(last_axis(idx, z, attr(lsm, "axis", -1)), "the log-softmax is not over the last axis")
        expect(last_axis(idx, z, attr(gather, "axis", 0)), "the gather is not along the class axis")
        ts = idx.shape(target)
        expect(ts is not None and len(ts) == idx.rank(z) and ts[-1] == 1,
               f"the target index has shape {ts}, not [..., 1] of the logits' rank")
        m.values.update(z=z, t=target)
        return m

    def rewrite(self, m: Match) -> Rewrite:
        node = make_node("CrossEntropy", [m.values["z"], m.values["t"]], [m.root_node.output[0]])
        return Rewrite([node])


def fuse_cross_entropy() -> FusionPass:
    return FusionPass(CrossEntropyFusion())
