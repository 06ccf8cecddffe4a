"""VJP rules of reductions: ReduceSum, ReduceMean, ReduceMax/ReduceMin.

All take ``axes`` as an input (opset 18); no ``axes`` means every axis (unless
``noop_with_empty_axes``), ``keepdims`` 0 or 1. The gradient is ``g`` with the reduced
axes restored (``Unsqueeze`` when ``keepdims=0``) and broadcast back to ``x``'s shape.
"""

from __future__ import annotations

from graphc.passes.autodiff.registry import vjp


def _pad(node, dx):
    return [dx] + [None] * (len(node.input) - 1)


def _axes_input(node):
    return node.input[1] if len(node.input) > 1 and node.input[1] else None


def _restore_axes(ctx, node, g):
    """``g`` with the reduced axes as size-1 axes (the keepdims=1 shape), or None when the
    reduction was a no-op (empty axes with ``noop_with_empty_axes``)."""
    x = node.input[0]
    axes = _axes_input(node)
    keep = ctx.attr(node, "keepdims", 1)
    if axes is None and ctx.attr(node, "noop_with_empty_axes", 0):
        return None
    if keep:
        return g
    B = ctx.b
    if axes is None:                       # every axis: g is a scalar
        r = ctx.rank(x)
        if r is None:
            return g                       # a scalar broadcasts to any shape
        return B.Reshape(g, B.i64(*([1] * r))) if r else g
    return B.Unsqueeze(g, axes)


def _count(ctx, node):
    """Number of elements averaged by a ReduceMean, as a scalar of x's dtype."""
    x, y = node.input[0], node.output[0]
    xs, ys = ctx.shape(x), ctx.shape(y)
    if xs is not None and ys is not None:
        from graphc.ir.shapes import dim_div, dim_prod

        n = dim_div(dim_prod(xs), dim_prod(ys))
        if isinstance(n, int):
            return ctx.scalar(float(n), x)
    B = ctx.b
    return B.Cast(B.Div(B.Size(x), B.Size(y)), to=ctx.dtype(x))


@vjp("ReduceSum")
def reduce_sum(ctx, node, grads):
    """y = sum_axes x:  dx = broadcast(g) to x's shape."""
    x = node.input[0]
    g = _restore_axes(ctx, node, grads[0])
    if g is None:
        return _pad(node, grads[0])
    return _pad(node, ctx.broadcast_to(g, x))


@vjp("ReduceMean")
def reduce_mean(ctx, node, grads):
    """y = mean_axes x:  dx = broadcast(g / n) to x's shape, n = elements per mean."""
    x = node.input[0]
    g = _restore_axes(ctx, node, grads[0])
    if g is None:
        return _pad(node, grads[0])
    return _pad(node, ctx.broadcast_to(ctx.b.Div(g, _count(ctx, node)), x))


@vjp("ReduceMax", "ReduceMin")
def reduce_max(ctx, node, grads):
    """y = max_axes x:  dx = g / k where x equals the max (k = number of ties), else 0.

    Ties share the gradient evenly (as PyTorch's ``amax``); ReduceMin is the same.
    """
    x, y = node.input[0], node.output[0]
    B = ctx.b
    g = _restore_axes(ctx, node, grads[0])
    if g is None:
        return _pad(node, grads[0])
    y_keep = _restore_axes(ctx, node, y)
    hit = B.Equal(x, y_keep)
    axes = _axes_input(node)
    count = B.ReduceSum(B.Cast(hit, to=ctx.dtype(x)), *([axes] if axes else []), keepdims=1)
    return _pad(node, B.Where(hit, B.Div(g, count), ctx.scalar(0.0, x)))
