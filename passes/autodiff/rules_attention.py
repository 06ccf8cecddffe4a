"""VJP rule of the standard Attention op (opset 23), decomposed into primitive ops.

Not registered by itself: Attention's one rule is that of its definition in
``graphc/ops/attention.py``, which emits ``graphc.AttentionGrad`` where it applies and calls
this rule for every other form.

Supported: 4-D Q [B, H, Tq, D], K [B, H, Tk, D], V [B, H, Tk, Dv] with as many K/V heads
as Q heads, no attention mask, no past key/value, no softcap; ``is_causal`` (top-left
aligned when there is no cache: query i sees keys j <= i) and ``scale`` (default
1/sqrt(D)). Only the gradient of output Y is supported.

With S = scale * Q K^T (masked), P = softmax(S), Y = P V and G = dL/dY:

* dV = P^T G
* dP = G V^T
* dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(G * Y), a [B, H, Tq, 1]
  reduction of D-sized rows instead of Tk-sized ones (as FlashAttention does)
* dQ = scale * dS K,   dK = scale * dS^T Q

P is recomputed from Q and K (one MatMul and a Softmax): the forward op does not keep it.
"""

from __future__ import annotations

import math

import numpy as np


def _unsupported(node, what):
    return NotImplementedError(f"Attention node {node.name!r}: gradient with {what} is not supported")


def attention(ctx, node, grads):
    q, k, v = node.input[:3]
    if any(i for i in node.input[3:]):
        raise _unsupported(node, "an attention mask, past key/value or nonpad_kv_seqlen")
    if any(g is not None for g in grads[1:]):
        raise _unsupported(node, "gradients through present_key/present_value/qk_matmul_output")
    if float(ctx.attr(node, "softcap", 0.0)) != 0.0:
        raise _unsupported(node, "softcap")
    shapes = [ctx.shape(t) for t in (q, k, v)]
    if any(s is None or len(s) != 4 for s in shapes):
        raise _unsupported(node, "3-D (or unknown-rank) inputs")
    hq, hk = shapes[0][1], shapes[1][1]
    if not ctx.shapes.same(hq, hk) or not ctx.shapes.same(hk, shapes[2][1]):
        raise _unsupported(node, f"{hq} query heads and {hk} key/value heads (grouped-query attention)")
    g = grads[0]
    y = node.output[0]
    B = ctx.b

    scale = ctx.attr(node, "scale")
    if scale is not None:
        scale = ctx.scalar(float(scale), q)
    elif isinstance(shapes[0][3], int):
        scale = ctx.scalar(1.0 / math.sqrt(shapes[0][3]), q)
    else:
        d = B.Cast(B.Squeeze(ctx.dim_tensor(q, 3), B.i64(0)), to=ctx.dtype(q))
        scale = B.Reciprocal(B.Sqrt(d))

    s = B.Mul(B.MatMul(q, ctx.swap_last(k)), scale)                     # [B, H, Tq, Tk]
    if int(ctx.attr(node, "is_causal", 0)):
        zero, one = B.const(np.array(0, np.int64)), B.const(np.array(1, np.int64))
        tq = B.Squeeze(ctx.dim_tensor(q, 2), B.i64(0))
        tk = B.Squeeze(ctx.dim_tensor(k, 2), B.i64(0))
        rows = B.Unsqueeze(B.Range(zero, tq, one), B.i64(1))             # [Tq, 1]
        cols = B.Unsqueeze(B.Range(zero, tk, one), B.i64(0))             # [1, Tk]
        s = B.Where(B.LessOrEqual(cols, rows), s, ctx.scalar(float("-inf"), q))
    p = B.Softmax(s, axis=-1)                                            # [B, H, Tq, Tk]

    out = [None] * len(node.input)
    if ctx.needs(v):
        out[2] = B.MatMul(ctx.swap_last(p), g)                           # [B, H, Tk, Dv]
    if ctx.needs(q) or ctx.needs(k):
        dp = B.MatMul(g, ctx.swap_last(v))                               # [B, H, Tq, Tk]
        delta = B.ReduceSum(B.Mul(g, y), B.i64(-1), keepdims=1)          # [B, H, Tq, 1]
        ds = B.Mul(p, B.Sub(dp, delta))
        if ctx.needs(q):
            out[0] = B.Mul(B.MatMul(ds, k), scale)                       # [B, H, Tq, D]
        if ctx.needs(k):
            out[1] = B.Mul(B.MatMul(ctx.swap_last(ds), q), scale)        # [B, H, Tk, D]
    return out
