"""VJP rule of LayerNormalization (opset 17: inputs X, Scale, optional B; output Y).

Not registered by itself: the op's one rule is that of its definition in
``graphc/ops/layernorm.py``, which emits ``graphc.LayerNormGrad`` where it applies and calls
this rule for every other form.

With xhat = (x - mean) * rstd over the normalized axes [axis, rank) and
y = xhat * scale + bias:

* dscale = sum over the leading axes of g * xhat,   dbias = sum of g,
* dxhat = g * scale,
* dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).

For float32 inputs the forward node is asked for its Mean and InvStdDev outputs (it
computes them anyway); for other dtypes, whose statistics LayerNormalization returns in
float32, they are recomputed in the input's dtype so the gradient keeps full precision.
"""

from __future__ import annotations

from onnx import TensorProto

from graphc.ir.node import axis_index


def _stats(ctx, node, x, axes):
    B = ctx.b
    eps = float(ctx.attr(node, "epsilon", 1e-5))
    stash = int(ctx.attr(node, "stash_type", 1))
    if ctx.dtype(x) == TensorProto.FLOAT and stash == 1:
        while len(node.output) < 3:
            node.output.append("")
        for k, hint in ((1, "ln_mean"), (2, "ln_rstd")):
            if not node.output[k]:
                node.output[k] = B.fresh(f"{node.name or 'layernorm'}/{hint}")
        ctx.shapes.infer(node, use_fallback=True)
        return node.output[1], node.output[2]
    mean = B.ReduceMean(x, axes, keepdims=1)
    xc = B.Sub(x, mean)
    var = B.ReduceMean(B.Mul(xc, xc), axes, keepdims=1)
    rstd = B.Reciprocal(B.Sqrt(B.Add(var, ctx.scalar(eps, x))))
    return mean, rstd


def layer_norm(ctx, node, grads):
    if any(g is not None for g in grads[1:]):
        raise NotImplementedError(f"LayerNormalization node {node.name!r}: gradients through its Mean/InvStdDev "
                                  "outputs are not supported")
    x, scale = node.input[:2]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    g = grads[0]
    B = ctx.b
    rank = ctx.rank(x)
    if rank is None:
        raise NotImplementedError(f"LayerNormalization node {node.name!r}: gradient needs the rank of {x!r}")
    axis = int(ctx.attr(node, "axis", -1))
    axis = axis_index(axis, rank)
    axes = B.i64(*range(axis, rank))
    mean, rstd = _stats(ctx, node, x, axes)
    xhat = B.Mul(B.Sub(x, mean), rstd)
    out = [None] * len(node.input)
    if ctx.needs(scale):
        out[1] = ctx.reduce_to_shape(B.Mul(g, xhat), scale)
    if bias is not None and ctx.needs(bias):
        out[2] = ctx.reduce_to_shape(g, bias)
    if ctx.needs(x):
        gx = B.Mul(g, scale)
        m1 = B.ReduceMean(gx, axes, keepdims=1)
        m2 = B.ReduceMean(B.Mul(gx, xhat), axes, keepdims=1)
        out[0] = B.Mul(B.Sub(B.Sub(gx, m1), B.Mul(xhat, m2)), rstd)
    return out
