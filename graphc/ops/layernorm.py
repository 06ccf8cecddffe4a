"""Layer norm: the standard ``LayerNormalization`` op (opset 17) forward,
``graphc.LayerNormGrad`` backward.

The fusion (``passes/fusions/layernorm.py``) emits ``LayerNormalization(X, W, B)`` over the
last axis. Its gradient is one ``graphc.LayerNormGrad(dY, X, W) -> dX, dW, dB``, which
**recomputes mean and 1/std** from X (one reduction over C) rather than taking
LayerNormalization's optional Mean/InvStdDev outputs: TensorRT supports only the first
output, so the forward op stays the same in inference and training graphs.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from graphc.ir.builder import GRAPHC_DOMAIN
from graphc.ir.node import attr, axis_index
from graphc.ops.body import Body
from graphc.ops.registry import OpDef, define, emit, is_float32


def layernorm_shape(s, n) -> None:
    """Y like X; Mean and InvStdDev keep the leading axes (float32 when stash_type=1)."""
    x = n.x
    if x is not None:
        a = axis_index(n.A.get("axis", -1), len(x))
        n.outs[0] = x
        stat = [d if i < a else 1 for i, d in enumerate(x)]
        for k in (1, 2):
            if k < len(n.outs):
                n.outs[k] = stat
                n.dts[k] = TensorProto.FLOAT if n.A.get("stash_type", 1) == 1 else s.dtype.get(n.ins[0])


def _not_fused(ctx, node, grads) -> str | None:
    """Why LayerNormGrad does not cover this node (None: it does)."""
    if not is_float32(ctx, node.input[0]):
        return "not float32"
    if any(g is not None for g in grads[1:]):
        return "gradient into the Mean/InvStdDev outputs"
    axis = attr(node, "axis", -1)
    if axis != -1:
        shape = ctx.shape(node.input[0])
        if shape is None or axis != len(shape) - 1:
            return f"normalisation over axis {axis}, graphc fuses the last axis only"
    return None


def layernorm_vjp(ctx, node, grads):
    """``graphc.LayerNormGrad`` for a float32 layer norm over the last axis; other forms
    go to the primitive rule (``rules_normalization.layer_norm``)."""
    if _not_fused(ctx, node, grads) is not None:
        from graphc.passes.autodiff.rules_normalization import layer_norm   # graphc.ops does not import autodiff

        return layer_norm(ctx, node, grads)
    dy = grads[0]
    if dy is None:
        return [None] * len(node.input)
    x, w = node.input[:2]
    dx, dw, db = emit(ctx, "LayerNormGrad", [dy, x, w], 3, epsilon=float(attr(node, "epsilon", 1e-5)))
    has_bias = len(node.input) > 2 and bool(node.input[2])
    return [dx, dw, db] if has_bias else [dx, dw] + [None] * (len(node.input) - 2)


def layernorm_grad_shape(s, n) -> None:
    """dX like X (input 1); dW and dB like W (input 2)."""
    for k, src in enumerate((1, 2, 2)):
        n.outs[k] = list(n.S[src]) if n.S[src] is not None else None
        n.dts[k] = s.dtype.get(n.ins[src])


def layernorm_grad_fn() -> onnx.FunctionProto:
    """Backward of y = xhat * W + B over the last axis, xhat = (X - mean) * rstd.

    dX = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dY * W;
    dW = sum over rows of dY * xhat; dB = sum over rows of dY. mean/rstd are recomputed.
    """
    b = Body()
    axes = b.ints(-1)
    mean = b.op("ReduceMean", "X", axes, keepdims=1)
    xc = b.op("Sub", "X", mean)
    var = b.op("ReduceMean", b.op("Mul", xc, xc), axes, keepdims=1)
    eps = b.op("CastLike", b.ref(onnx.AttributeProto.FLOAT, "value_float", "epsilon"), "X")
    rstd = b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, eps)))
    xhat = b.op("Mul", xc, rstd)
    g = b.op("Mul", "dY", "W")
    m1 = b.op("ReduceMean", g, axes, keepdims=1)
    m2 = b.op("ReduceMean", b.op("Mul", g, xhat), axes, keepdims=1)
    b.op("Mul", b.op("Sub", b.op("Sub", g, m1), b.op("Mul", xhat, m2)), rstd, outputs=["dX"])
    rows = b.op("Concat", b.ints(-1), b.op("Shape", "W"), axis=0)                 # [-1, C]
    b.op("ReduceSum", b.op("Reshape", b.op("Mul", "dY", xhat), rows), b.ints(0), keepdims=0, outputs=["dW"])
    b.op("ReduceSum", b.op("Reshape", "dY", rows), b.ints(0), keepdims=0, outputs=["dB"])
    return b.function("LayerNormGrad", ["dY", "X", "W"], ["dX", "dW", "dB"],
                      attributes=["epsilon"], doc=layernorm_grad_fn.__doc__)


LAYERNORM = define(OpDef("", "LayerNormalization", "layernorm", shape=layernorm_shape, vjp=layernorm_vjp))
# dX may overwrite dY (row-local: each row of dY is read completely before that row of dX)
LAYERNORM_GRAD = define(OpDef(GRAPHC_DOMAIN, "LayerNormGrad", "layernorm_backward", shape=layernorm_grad_shape,
                              function=layernorm_grad_fn, inplace={0: 0}))
