"""VJP rules of MatMul (numpy semantics: 1-D promotion, batched, broadcast) and Gemm.

Formulations are chosen for onnxruntime: 2-D weight gradients are one ``Gemm`` with
``transA``/``transB`` (no materialised transpose), an N-D activation times a 2-D weight
gets its weight gradient from one ``Gemm`` over the flattened batch (no per-batch
products summed afterwards), and batched products use ``MatMul`` with a transposed
operand, which onnxruntime fuses into one ``FusedMatMul``.
"""

from __future__ import annotations

from graphc.passes.autodiff.registry import vjp


def _rank(ctx, v):
    r = ctx.rank(v)
    if r is None:
        raise NotImplementedError(f"MatMul gradient needs the rank of {v!r}, which is unknown")
    return r


@vjp("MatMul")
def matmul(ctx, node, grads):
    """Y = A @ B:  dA = G @ B^T,  dB = A^T @ G  (batch axes summed where broadcast).

    1-D operands are promoted as numpy does: a [K] vector A acts as [1, K], a [K]
    vector B acts as [K, 1].
    """
    a, b = node.input
    g = grads[0]
    B = ctx.b
    ra, rb = _rank(ctx, a), _rank(ctx, b)
    need_a, need_b = ctx.needs(a), ctx.needs(b)
    ga = gb = None

    if ra == 1 and rb == 1:                      # y = <a, b>
        return [B.Mul(g, b) if need_a else None, B.Mul(g, a) if need_b else None]

    if ra == 1:                                  # y[..., n] = sum_k a[k] B[..., k, n]
        if need_a:
            if rb == 2:
                ga = B.MatMul(b, g)                                  # [K, N] @ [N] -> [K]
            else:
                col = B.MatMul(b, B.Unsqueeze(g, B.i64(-1)))        # [..., K, 1]
                ga = B.Reshape(ctx.reduce_to_shape(col, B.Unsqueeze(a, B.i64(-1))), ctx.shape_tensor(a))
        if need_b:
            outer = B.Mul(B.Unsqueeze(a, B.i64(-1)), B.Unsqueeze(g, B.i64(-2)))  # [..., K, N]
            gb = ctx.reduce_to_shape(outer, b)
        return [ga, gb]

    if rb == 1:                                  # y[..., m] = sum_k A[..., m, k] b[k]
        if need_a:
            outer = B.Mul(B.Unsqueeze(g, B.i64(-1)), b)             # [..., M, K]
            ga = ctx.reduce_to_shape(outer, a)
        if need_b:
            if ra == 2:
                gb = B.MatMul(g, a)                                  # [M] @ [M, K] -> [K]
            else:
                row = B.MatMul(B.Unsqueeze(g, B.i64(-2)), a)        # [..., 1, K]
                gb = B.Reshape(ctx.reduce_to_shape(row, B.Unsqueeze(b, B.i64(0))), ctx.shape_tensor(b))
        return [ga, gb]

    if ra == 2 and rb == 2:
        if need_a:
            ga = B.Gemm(g, b, transB=1)                              # G @ B^T
        if need_b:
            gb = B.Gemm(a, g, transA=1)                              # A^T @ G
        return [ga, gb]

    if rb == 2:                                  # activations [..., M, K] @ weight [K, N]
        if need_a:
            ga = ctx.reduce_to_shape(B.MatMul(g, ctx.swap_last(b)), a)
        if need_b:
            k, n = ctx.dim_tensor(a, -1), ctx.dim_tensor(g, -1)
            a2 = B.Reshape(a, B.Concat(B.i64(-1), k, axis=0))
            g2 = B.Reshape(g, B.Concat(B.i64(-1), n, axis=0))
            gb = B.Gemm(a2, g2, transA=1)                            # sum over the batch of A^T G
        return [ga, gb]

    if need_a:
        if _is_swap(ctx, a) and ctx.rank(a) == ctx.rank(node.output[0]):
            # A = transpose(X): dA^T = (G B^T)^T = B G^T; the Transpose rule of A cancels the swap
            ga = ctx.reduce_to_shape(ctx.swap_last(B.MatMul(b, ctx.swap_last(g))), a)
        else:
            ga = ctx.reduce_to_shape(B.MatMul(g, ctx.swap_last(b)), a)
    if need_b:
        if _is_swap(ctx, b) and ctx.rank(b) == ctx.rank(node.output[0]):
            # B = transpose(X) (attention's K^T): dX = (A^T G)^T = G^T A, computed directly
            gb = ctx.reduce_to_shape(ctx.swap_last(B.MatMul(ctx.swap_last(g), a)), b)
        else:
            gb = ctx.reduce_to_shape(B.MatMul(ctx.swap_last(a), g), b)
    return [ga, gb]


def _is_swap(ctx, v):
    """Is ``v`` a Transpose swapping the last two axes of its input?"""
    prod = ctx._producer(v)
    if prod is None or prod.op_type != "Transpose":
        return False
    perm = ctx.attr(prod, "perm")
    r = ctx.rank(v)
    return perm is not None and r is not None and r >= 2 and list(perm) == list(range(r - 2)) + [r - 1, r - 2]


@vjp("Gemm")
def gemm(ctx, node, grads):
    """Y = alpha A' B' + beta C with A' = A^T if transA, B' = B^T if transB.

    dA' = alpha G B'^T and dB' = alpha A'^T G, transposed back when the operand was;
    each is one Gemm:

    * dA = alpha G B'^T  = Gemm(G, B, transB=!transB)          (transA = 0)
    * dA = alpha B' G^T  = Gemm(B, G, transA=transB, transB=1) (transA = 1)
    * dB = alpha A'^T G  = Gemm(A, G, transA=!transA)          (transB = 0)
    * dB = alpha G^T A'  = Gemm(G, A, transA=1, transB=transA) (transB = 1)
    * dC = beta G summed over the axes C was broadcast along.
    """
    a, b = node.input[:2]
    c = node.input[2] if len(node.input) > 2 and node.input[2] else None
    g = grads[0]
    B = ctx.b
    alpha = float(ctx.attr(node, "alpha", 1.0))
    beta = float(ctx.attr(node, "beta", 1.0))
    ta, tb = int(ctx.attr(node, "transA", 0)), int(ctx.attr(node, "transB", 0))
    al = alpha if alpha != 1.0 else None
    out = [None] * len(node.input)
    if ctx.needs(a):
        out[0] = (B.Gemm(g, b, alpha=al, transB=1 - tb) if not ta
                  else B.Gemm(b, g, alpha=al, transA=tb, transB=1))
    if ctx.needs(b):
        out[1] = (B.Gemm(a, g, alpha=al, transA=1 - ta) if not tb
                  else B.Gemm(g, a, alpha=al, transA=1, transB=ta))
    if c is not None and ctx.needs(c):
        gc = ctx.reduce_to_shape(g, c)
        out[2] = gc if beta == 1.0 else B.Mul(gc, ctx.scalar(beta, c))
    return out
