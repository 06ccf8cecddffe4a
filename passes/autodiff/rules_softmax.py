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
    """y = log_softmax(x, axis):  dx = g - exp(y) * sum_axis(g)."""
    y = node.output[0]
    g = grads[0]
    B = ctx.b
    axis = B.i64(ctx.attr(node, "axis", -1))
    total = B.ReduceSum(g, axis, keepdims=1)
    return [B.Sub(g, B.Mul(B.Exp(y), total))]
