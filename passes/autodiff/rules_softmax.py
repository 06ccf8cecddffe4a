"""VJP rules of Softmax and LogSoftmax (the loss family: cross-entropy is LogSoftmax,
GatherElements, ReduceMean, Neg, each differentiated by its own rule)."""

from __future__ import annotations

from graphc.passes.autodiff.registry import vjp


@vjp("Softmax")
def softmax(ctx, node, grads):
    """y = softmax(x, axis):  dx = y * (g - sum_axis(g * y))."""
    y = node.output[0]
    g = grads[0]
    B = ctx.b
    axis = B.i64(ctx.attr(node, "axis", -1))
    dot = B.ReduceSum(B.Mul(g, y), axis, keepdims=1)
    return [B.Mul(y, B.Sub(g, dot))]


@vjp("LogSoftmax")
def log_softmax(ctx, node, grads):
    """y = log_softmax(x, axis):  dx = g - exp(y) * sum_axis(g).

    When g is a scatter of a few values into zeros along the same axis (the gradient of
    GatherElements: cross-entropy picking the target's log-probability), sum_axis(g) is
    the sum of the scattered values and dx = scatter_add(-exp(y) * sum, indices, values):
    one full-size pass fewer for each of the zeros, the reduction and the subtraction.
    """
    y = node.output[0]
    g = grads[0]
    B = ctx.b
    rank = ctx.rank(y)
    axis = ctx.attr(node, "axis", -1)
    if axis < 0 and rank is not None:
        axis += rank
    sparse = ctx.sparse.get(g)
    if sparse is not None and sparse[2] == axis:
        indices, updates, _ = sparse
        total = B.ReduceSum(updates, B.i64(axis), keepdims=1)
        dense = B.Mul(B.Exp(y), B.Neg(total))
        return [B.ScatterElements(dense, indices, updates, axis=axis, reduction="add")]
    total = B.ReduceSum(g, B.i64(axis), keepdims=1)
    return [B.Sub(g, B.Mul(B.Exp(y), total))]
