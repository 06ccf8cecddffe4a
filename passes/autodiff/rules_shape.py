"""VJP rules of data-movement ops, and the ops that have no gradient.

Movement ops route ``g`` back to where each element came from: Reshape-like ops reshape
it back, Transpose inverts its permutation, Concat/Split swap roles, Slice pads with
zeros, Gather/GatherElements scatter-*add* (duplicate indices accumulate).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from graphc.ir.node import axis_index
from graphc.passes.autodiff.registry import vjp

NO_GRADIENT_OPS = (
    "Constant", "Shape", "Size", "Range", "ConstantOfShape", "EyeLike",
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor",
    "IsNaN", "IsInf", "ArgMax", "ArgMin", "NonZero", "Floor", "Ceil", "Round", "Sign",
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot",
)


@vjp(*NO_GRADIENT_OPS)
def no_gradient(ctx, node, grads):
    """Integer/boolean results, or piecewise-constant ones: no gradient flows."""
    return [None] * len(node.input)


no_gradient.no_gradient = True  # the driver never differentiates through these


def _norm_axis(ctx, axis, v):
    if axis >= 0:
        return axis
    r = ctx.rank(v)
    if r is None:
        raise NotImplementedError(f"negative axis {axis} on {v!r} of unknown rank")
    return axis + r


@vjp("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(ctx, node, grads):
    """Only the shape changes:  dx = reshape(g, shape(x))."""
    x = node.input[0]
    return [ctx.b.Reshape(grads[0], ctx.shape_tensor(x))] + [None] * (len(node.input) - 1)


@vjp("Transpose")
def transpose(ctx, node, grads):
    """y = transpose(x, perm):  dx = transpose(g, inverse(perm))."""
    perm = ctx.attr(node, "perm")
    if perm is None:
        r = ctx.rank(node.input[0])
        if r is None:
            return [ctx.b.Transpose(grads[0])]   # the default (reversal) is its own inverse
        perm = list(range(r))[::-1]
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return [ctx.transpose(grads[0], inv)]


@vjp("Expand")
def expand(ctx, node, grads):
    """y = broadcast(x, shape):  dx = g summed over the broadcast axes."""
    return [ctx.reduce_to_shape(grads[0], node.input[0]), None]


@vjp("Concat")
def concat(ctx, node, grads):
    """y = concat(x1..xn, axis):  dxi = the i-th piece of g along axis (one Split)."""
    ins = list(node.input)
    axis = _norm_axis(ctx, ctx.attr(node, "axis"), ins[0])
    B = ctx.b
    if len(ins) == 1:
        return [grads[0]]
    sizes = [ctx.shape(x) for x in ins]
    if all(s is not None and isinstance(s[axis], int) for s in sizes):
        split = B.i64(*[s[axis] for s in sizes])
    else:
        split = B.Concat(*[ctx.dim_tensor(x, axis) for x in ins], axis=0)
    parts = B.Split(grads[0], split, axis=axis, outputs=len(ins))
    return [p if ctx.needs(x) else None for p, x in zip(parts, ins)]


@vjp("Split")
def split(ctx, node, grads):
    """ys = split(x, axis):  dx = concat(dys), zeros for outputs without a gradient."""
    x = node.input[0]
    axis = _norm_axis(ctx, ctx.attr(node, "axis", 0), x)
    pieces = [g if g is not None else ctx.zeros(y) for g, y in zip(grads, node.output)]
    dx = pieces[0] if len(pieces) == 1 else ctx.b.Concat(*pieces, axis=axis)
    return [dx] + [None] * (len(node.input) - 1)


def _int64(ctx, v):
    return v if ctx.dtype(v) == TensorProto.INT64 else ctx.b.Cast(v, to=TensorProto.INT64)


@vjp("Slice")
def slice_(ctx, node, grads):
    """y = x[starts:ends:steps] along axes:  dx = zeros with g written at the slice.

    Unit steps: one ``Pad`` whose pads are ``(start, dim - start - len)`` per axis, with
    starts and ends clamped exactly as Slice does (computed at run time when they are
    not constants, e.g. GPT-2's ``wpe[:T]``). Other steps: for each sliced axis, the
    selected indices are ``Slice(Range(dim))`` with the same parameters (so clamping
    and negative steps follow Slice's own semantics) and ``g`` is scattered there.
    """
    x, starts, ends = node.input[:3]
    axes_in = node.input[3] if len(node.input) > 3 and node.input[3] else None
    steps_in = node.input[4] if len(node.input) > 4 and node.input[4] else None
    g = grads[0]
    B = ctx.b
    rank = ctx.rank(x)
    n = None
    for v in (starts, ends):
        s = ctx.shape(v)
        if s is not None and isinstance(s[0], int):
            n = s[0]
    if axes_in is not None:
        axes = ctx.int_values(axes_in)
        if axes is None or any(not isinstance(a, int) for a in axes):
            raise NotImplementedError(f"Slice node {node.name!r}: gradient needs constant axes")
        if any(a < 0 for a in axes) and rank is None:
            raise NotImplementedError(f"Slice node {node.name!r}: negative axes on a tensor of unknown rank")
        axes = [axis_index(a, rank) for a in axes]
    elif n is not None:
        axes = list(range(n))
    else:
        raise NotImplementedError(f"Slice node {node.name!r}: cannot tell how many axes are sliced")
    steps = ctx.int_values(steps_in) if steps_in is not None else [1] * len(axes)
    none = [None] * (len(node.input) - 1)
    if steps is not None and all(s == 1 for s in steps):
        return [B.Pad(g, _pads(ctx, x, starts, ends, axes), None, B.i64(*axes))] + none
    return [_scatter_slices(ctx, node, g, axes)] + none


def _pads(ctx, x, starts, ends, axes):
    """int64 [2n] pads (befores, afters) placing a unit-step slice back into x."""
    B = ctx.b
    shape = ctx.shape(x)
    sv, ev = ctx.int_values(starts), ctx.int_values(ends)
    dims = [shape[a] if shape is not None else None for a in axes]
    if (all(isinstance(d, int) for d in dims) and sv is not None and ev is not None
            and all(isinstance(v, int) for v in sv + ev)):
        before, after = [], []
        for d, s, e in zip(dims, sv, ev):
            s, e, _ = slice(s, e, 1).indices(d)
            length = max(e - s, 0)
            before.append(s)
            after.append(d - s - length)
        return B.i64(*before, *after)
    if all(isinstance(d, int) for d in dims):
        dim = B.i64(*dims)
    else:
        dim = B.Concat(*[ctx.dim_tensor(x, a) for a in axes], axis=0)
    zero = B.i64(0)

    def clamp(v):  # Slice's rule for a unit step: v < 0 counts from the end, then clamp to [0, dim]
        v = _int64(ctx, v)
        v = B.Where(B.Less(v, zero), B.Add(v, dim), v)
        return B.Min(B.Max(v, zero), dim)

    s, e = clamp(starts), clamp(ends)
    length = B.Max(B.Sub(e, s), zero)
    return B.Concat(s, B.Sub(B.Sub(dim, s), length), axis=0)


def _scatter_slices(ctx, node, g, axes):
    """Undo a strided slice one axis at a time: scatter g's rows to the selected indices."""
    x, starts, ends = node.input[:3]
    steps_in = node.input[4]
    B = ctx.b
    rank = ctx.rank(x)
    if rank is None:
        raise NotImplementedError(f"Slice node {node.name!r}: strided gradient needs the rank of {x!r}")
    zero, one = B.const(np.array(0, np.int64)), B.const(np.array(1, np.int64))
    cur = g
    for j, a in enumerate(axes):
        jj = B.i64(j)
        dim = B.Squeeze(ctx.dim_tensor(x, a), B.i64(0))
        idx = B.Slice(B.Range(zero, dim, one), B.Gather(_int64(ctx, starts), jj), B.Gather(_int64(ctx, ends), jj),
                      B.i64(0), B.Gather(_int64(ctx, steps_in), jj))          # indices along axis a
        perm = [a] + [i for i in range(rank) if i != a]
        inv = [perm.index(i) for i in range(rank)]
        moved = ctx.transpose(cur, perm)                                       # axis a first
        rest = B.Shape(moved, start=1)
        zeros = B.ConstantOfShape(B.Concat(ctx.dim_tensor(x, a), rest, axis=0),
                                  value=_zero_tensor(ctx, x))
        placed = B.ScatterND(zeros, B.Unsqueeze(idx, B.i64(-1)), moved)
        cur = ctx.transpose(placed, inv)
    return cur


def _zero_tensor(ctx, like):
    from onnx import helper

    return helper.make_tensor("value", ctx.dtype(like), [1], [0])


@vjp("Gather")
def gather(ctx, node, grads):
    """y = take(x, idx, axis):  dx = zeros, then dx[idx[i]] += g[i] (ScatterND, add).

    Axis 0 (embeddings) is one ``ScatterND(reduction="add")`` of g's rows; other axes
    move the gathered axis first, scatter, and move it back. Negative indices are
    wrapped first.
    """
    x, idx = node.input
    g = grads[0]
    B = ctx.b
    axis = _norm_axis(ctx, ctx.attr(node, "axis", 0), x)
    idx = _int64(ctx, idx)
    c = ctx.const_value(node.input[1])
    if c is None or (c < 0).any():
        dim = ctx.dim_tensor(x, axis)
        if ctx.rank(idx) == 0:
            dim = B.Squeeze(dim, B.i64(0))
        zero = B.const(np.array(0, np.int64))
        idx = B.Where(B.Less(idx, zero), B.Add(idx, dim), idx)
    nd_idx = B.Unsqueeze(idx, B.i64(-1))
    if axis == 0:
        return [ctx.scatter_add(x, nd_idx, g), None]
    rx, ri = ctx.rank(x), ctx.rank(node.input[1])
    if rx is None or ri is None:
        raise NotImplementedError(f"Gather node {node.name!r}: gradient along axis {axis} needs known ranks")
    ry = rx - 1 + ri
    perm_g = list(range(axis, axis + ri)) + list(range(axis)) + list(range(axis + ri, ry))
    perm_x = [axis] + [i for i in range(rx) if i != axis]
    inv_x = [perm_x.index(i) for i in range(rx)]
    moved_x_shape = B.Concat(ctx.dim_tensor(x, axis), *[ctx.dim_tensor(x, i) for i in perm_x[1:]], axis=0) \
        if rx > 1 else ctx.dim_tensor(x, axis)
    zeros = B.ConstantOfShape(moved_x_shape, value=_zero_tensor(ctx, x))
    scattered = B.ScatterND(zeros, nd_idx, ctx.transpose(g, perm_g), reduction="add")
    return [ctx.transpose(scattered, inv_x), None]


@vjp("GatherElements")
def gather_elements(ctx, node, grads):
    """y[i][j] = x[idx[i][j]][j] (axis 0, likewise others):  dx = ScatterElements-add of g."""
    x, idx = node.input
    axis = _norm_axis(ctx, ctx.attr(node, "axis", 0), x)
    return [ctx.scatter_elements_add(x, idx, grads[0], axis), None]
