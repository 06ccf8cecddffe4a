"""VJP rules of the softmax/loss family: Softmax, LogSoftmax, SoftmaxCrossEntropyLoss and
NegativeLogLikelihoodLoss (what PyTorch exports for ``cross_entropy``/``nll_loss``).

GPT-2 spells its cross-entropy as LogSoftmax, GatherElements, ReduceMean and Neg, each
differentiated by its own rule; GatherElements' gradient is a *sparse* scatter into zeros
that LogSoftmax's rule consumes without materialising it (see ``log_softmax``).
"""

from __future__ import annotations

import numpy as np

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


def _loss_weights(ctx, node, labels, like):
    """Per-sample weights of a classification loss: ``weight[label]`` (if given) times
    ``label != ignore_index`` (if set); None when every weight is 1. Also returns the labels
    with ignored ones replaced by 0, safe to index with."""
    B = ctx.b
    ignore = ctx.attr(node, "ignore_index")
    weights = node.input[2] if len(node.input) > 2 and node.input[2] else None
    safe, w = labels, None
    if ignore is not None:
        keep = B.Not(B.Equal(labels, B.const(np.array(ignore, ctx.np_dtype(labels)))))
        safe = B.Where(keep, labels, B.const(np.array(0, ctx.np_dtype(labels))))
        w = B.Cast(keep, to=ctx.dtype(like))
    if weights is not None:
        picked = B.Gather(weights, safe, axis=0)
        w = picked if w is None else B.Mul(picked, w)
    return safe, w


def _per_sample_grad(ctx, node, g, labels, w, like):
    """dL/dl for every sample loss l (shape of labels) from the gradient g of the output."""
    B = ctx.b
    reduction = ctx.attr(node, "reduction", "mean")
    if reduction == "none":
        return g if w is None else B.Mul(g, w)
    if reduction == "mean":
        if w is None:
            static = ctx.static_shape(labels)
            count = (ctx.scalar(float(np.prod(static)), like) if static is not None
                     else B.Cast(B.Size(labels), to=ctx.dtype(like)))
            return B.Expand(B.Div(g, count), ctx.shape_tensor(labels))
        g = B.Div(g, B.ReduceSum(w, keepdims=0))
    return B.Expand(g, ctx.shape_tensor(labels)) if w is None else B.Mul(w, g)


@vjp("SoftmaxCrossEntropyLoss")
def softmax_cross_entropy(ctx, node, grads):
    """l = -w[c] log softmax(scores)[c] per sample (c the label), reduced by ``reduction``.

    dscores = gw * softmax(scores) - gw * onehot(c) along axis 1, with gw = dL/dl (weights,
    ignore_index and the mean folded in): one scatter of -gw into gw * exp(log_prob), where
    log_prob is the node's own second output (requested from it if unused).
    """
    scores, labels = node.input[:2]
    B = ctx.b
    if len(node.output) < 2 or not node.output[1]:
        while len(node.output) < 2:
            node.output.append("")
        node.output[1] = B.fresh(f"{node.name or 'sce'}/log_prob")
        ctx.shapes.infer(node, use_fallback=True)
    logp = node.output[1]
    out = [None] * len(node.input)
    parts = []
    if grads[0] is not None:
        safe, w = _loss_weights(ctx, node, labels, scores)
        gw = B.Unsqueeze(_per_sample_grad(ctx, node, grads[0], labels, w, scores), B.i64(1))
        dense = B.Mul(B.Exp(logp), gw)
        parts.append(B.ScatterElements(dense, B.Unsqueeze(safe, B.i64(1)), B.Neg(gw), axis=1, reduction="add"))
    if len(grads) > 1 and grads[1] is not None:
        g1 = grads[1]
        parts.append(B.Sub(g1, B.Mul(B.Exp(logp), B.ReduceSum(g1, B.i64(1), keepdims=1))))
    out[0] = ctx.sum(parts)
    return out


@vjp("NegativeLogLikelihoodLoss")
def negative_log_likelihood(ctx, node, grads):
    """l = -w[c] x[c] per sample (c the label), reduced by ``reduction``:
    dx = -gw scattered at the labels along axis 1 (a sparse gradient, see LogSoftmax)."""
    x, labels = node.input[:2]
    B = ctx.b
    safe, w = _loss_weights(ctx, node, labels, x)
    gw = B.Unsqueeze(_per_sample_grad(ctx, node, grads[0], labels, w, x), B.i64(1))
    out = [None] * len(node.input)
    out[0] = ctx.scatter_elements_add(x, B.Unsqueeze(safe, B.i64(1)), B.Neg(gw), 1)
    return out
