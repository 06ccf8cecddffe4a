"""The float64 reference backend's operator table: ``OPS[(domain, op_type)] = numpy_impl``.

One small numpy function per ONNX operator graphc's graphs use (the forward, training,
prefill, decode and decoder-with-past graphs, optimised or not, plus the ops the
autodiff tests build), written from the ONNX specification, not from onnxruntime. Each
takes the node's attributes (a dict, strings decoded) and its inputs (``None`` for an
omitted optional input) and returns one array or a tuple of arrays.

Floating-point values arrive as float64 and stay float64: a ``Cast`` or ``CastLike`` to
any floating type keeps float64, so the interpreter computes the exact math of the
graph (a BF16 graph's rounding casts included, which is the point of a reference).
Local functions (domain ``graphc``) are not here: the interpreter runs their bodies.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from onnx import helper

from graphc.ops.registry import lowering_table, register_lowering

OPS: dict[tuple[str, str], Callable] = lowering_table("reference")   # graphc.ops' registry of lowerings


def op(*op_types: str, domain: str = ""):
    """Register ``fn`` for each ONNX ``op_type`` in ``domain``."""
    def register(fn):
        for t in op_types:
            register_lowering("reference", domain, t)(fn)
        return fn
    return register


def as_float(x: np.ndarray) -> np.ndarray:
    """float64 for every floating dtype (bf16/fp16/fp32 included); other dtypes unchanged."""
    x = np.asarray(x)
    return x.astype(np.float64) if _is_float(x.dtype) else x


def _is_float(dtype) -> bool:
    return np.dtype(dtype).kind == "f" or np.dtype(dtype).name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def _axes(x: np.ndarray, axes) -> tuple[int, ...]:
    return tuple(int(a) % x.ndim for a in np.asarray(axes).reshape(-1))


# ----------------------------------------------------------------------------- elementwise
def _binary(fn):
    return lambda attrs, a, b: fn(a, b)


def _unary(fn):
    return lambda attrs, x: fn(x)


for _name, _fn in {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Pow": np.power,
                   "Equal": np.equal, "Less": np.less, "LessOrEqual": np.less_equal,
                   "Greater": np.greater, "GreaterOrEqual": np.greater_equal,
                   "And": np.logical_and, "Or": np.logical_or, "Xor": np.logical_xor}.items():
    op(_name)(_binary(_fn))

for _name, _fn in {"Neg": np.negative, "Exp": np.exp, "Log": np.log, "Sqrt": np.sqrt, "Tanh": np.tanh,
                   "Abs": np.abs, "Not": np.logical_not, "Floor": np.floor, "Ceil": np.ceil,
                   "Sin": np.sin, "Cos": np.cos, "Sign": np.sign,
                   "Reciprocal": lambda x: 1.0 / x,
                   "Relu": lambda x: np.maximum(x, 0).astype(x.dtype),
                   "Sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
                   "Erf": lambda x: np.vectorize(math.erf, otypes=[np.float64])(x) if x.size else x,
                   "Identity": lambda x: x}.items():
    op(_name)(_unary(_fn))


@op("Div")
def div(attrs, a, b):
    if a.dtype.kind in "iu":  # ONNX integer division truncates toward zero
        return (np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))).astype(a.dtype)
    return a / b


op("Max")(lambda attrs, *xs: _fold(np.maximum, xs))
op("Min")(lambda attrs, *xs: _fold(np.minimum, xs))
op("Sum")(lambda attrs, *xs: _fold(np.add, xs))
op("Mean")(lambda attrs, *xs: _fold(np.add, xs) / len(xs))


def _fold(fn, xs):
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return out


@op("Where")
def where(attrs, cond, a, b):
    return np.where(cond, a, b)


# ----------------------------------------------------------------------------- types and constants
@op("Cast")
def cast(attrs, x):
    target = helper.tensor_dtype_to_np_dtype(attrs["to"])
    return as_float(x) if _is_float(target) else x.astype(target)


@op("CastLike")
def cast_like(attrs, x, like):
    return as_float(x) if _is_float(like.dtype) else x.astype(like.dtype)


@op("Constant")
def constant(attrs):
    from onnx import numpy_helper

    (name, value), = attrs.items()
    if name == "value":
        return as_float(numpy_helper.to_array(value))
    kinds = {"value_float": np.float64, "value_floats": np.float64, "value_int": np.int64,
             "value_ints": np.int64}
    if name not in kinds:
        raise NotImplementedError(f"Constant with attribute {name}")
    return np.array(value, dtype=kinds[name])


@op("Shape")
def shape(attrs, x):
    dims = np.array(x.shape, dtype=np.int64)
    return dims[attrs.get("start", 0):attrs.get("end", None)]


@op("Size")
def size(attrs, x):
    return np.array(x.size, dtype=np.int64)


@op("Range")
def range_(attrs, start, limit, delta):
    dtype = np.result_type(start, limit, delta)
    return np.arange(start.reshape(-1)[0], limit.reshape(-1)[0], delta.reshape(-1)[0]).astype(dtype)


# ----------------------------------------------------------------------------- reductions
def _reduction(fn):
    def reduce(attrs, x, axes=None):
        keepdims = bool(attrs.get("keepdims", 1))
        if axes is None and "axes" in attrs:  # opsets before 18 (13 for ReduceSum)
            axes = np.array(attrs["axes"])
        if axes is None or axes.size == 0:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            return fn(x, axis=None, keepdims=keepdims)
        return fn(x, axis=_axes(x, axes), keepdims=keepdims)
    return reduce


for _name, _fn in {"ReduceSum": np.sum, "ReduceMean": np.mean, "ReduceProd": np.prod,
                   "ReduceMax": np.max, "ReduceMin": np.min}.items():
    op(_name)(_reduction(_fn))


# ----------------------------------------------------------------------------- shapes and indexing
@op("Reshape")
def reshape(attrs, x, shape_):
    dims = [int(d) for d in shape_]
    if not attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@op("Transpose")
def transpose(attrs, x):
    return np.transpose(x, attrs.get("perm"))


@op("Squeeze")
def squeeze(attrs, x, axes=None):
    return np.squeeze(x) if axes is None else np.squeeze(x, axis=_axes(x, axes))


@op("Unsqueeze")
def unsqueeze(attrs, x, axes):
    rank = x.ndim + axes.size
    out = x
    for a in sorted(int(a) % rank for a in axes.reshape(-1)):
        out = np.expand_dims(out, a)
    return out


@op("Concat")
def concat(attrs, *xs):
    return np.concatenate(xs, axis=attrs["axis"])


@op("Split")
def split(attrs, x, sizes=None):
    axis = attrs.get("axis", 0) % x.ndim
    if sizes is None:
        n = attrs["num_outputs"]
        chunk = -(-x.shape[axis] // n)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(n)]
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


@op("Slice")
def slice_(attrs, x, starts, ends, axes=None, steps=None):
    axes = range(len(starts)) if axes is None else [int(a) % x.ndim for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * x.ndim
    for a, s, e, st in zip(axes, starts, ends, steps):
        index[a] = slice(int(s), int(e), int(st))   # ONNX clamps starts/ends as Python does
    return x[tuple(index)]


@op("Expand")
def expand(attrs, x, shape_):
    return np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(int(d) for d in shape_))).copy()


@op("Gather")
def gather(attrs, x, indices):
    axis = attrs.get("axis", 0) % x.ndim
    return np.take(x, np.where(indices < 0, indices + x.shape[axis], indices), axis=axis)


@op("GatherElements")
def gather_elements(attrs, x, indices):
    axis = attrs.get("axis", 0) % x.ndim
    return np.take_along_axis(x, np.where(indices < 0, indices + x.shape[axis], indices), axis=axis)


@op("GatherND")
def gather_nd(attrs, x, indices):
    b = attrs.get("batch_dims", 0)
    batch = x.shape[:b]
    k = indices.shape[-1]
    xs = x.reshape((-1, *x.shape[b:]))
    idx = indices.reshape((xs.shape[0], -1, k))
    out = np.stack([xs[i][tuple(idx[i].T)] for i in range(xs.shape[0])])
    return out.reshape((*batch, *indices.shape[b:-1], *x.shape[b + k:]))


_REDUCE_AT = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


@op("ScatterND")
def scatter_nd(attrs, x, indices, updates):
    out = x.copy()
    where = tuple(np.moveaxis(indices, -1, 0))
    reduction = attrs.get("reduction", "none")
    if reduction == "none":
        out[where] = updates
    else:
        _REDUCE_AT[reduction].at(out, where, updates)  # repeated indices accumulate
    return out


@op("ScatterElements")
def scatter_elements(attrs, x, indices, updates):
    axis = attrs.get("axis", 0) % x.ndim
    out = x.copy()
    indices = np.where(indices < 0, indices + x.shape[axis], indices)
    grid = list(np.indices(indices.shape, sparse=True))
    grid[axis] = indices
    reduction = attrs.get("reduction", "none")
    if reduction == "none":
        out[tuple(grid)] = updates
    else:
        _REDUCE_AT[reduction].at(out, tuple(grid), updates)
    return out


@op("Pad")
def pad(attrs, x, pads, value=None, axes=None):
    mode = attrs.get("mode", "constant")
    if mode != "constant":
        raise NotImplementedError(f"Pad mode {mode!r}")
    axes = list(range(x.ndim)) if axes is None else [int(a) % x.ndim for a in axes]
    width = [(0, 0)] * x.ndim
    n = len(axes)
    for i, a in enumerate(axes):
        width[a] = (int(pads[i]), int(pads[i + n]))
    if any(lo < 0 or hi < 0 for lo, hi in width):
        raise NotImplementedError("Pad with negative pads")
    fill = 0 if value is None or value.size == 0 else value.reshape(()).item()
    return np.pad(x, width, constant_values=fill)


@op("TensorScatter")
def tensor_scatter(attrs, cache, update, write_indices=None):
    """Write ``update`` into a copy of ``cache`` along ``axis`` at each batch row's index."""
    if attrs.get("mode", "linear") != "linear":
        raise NotImplementedError("TensorScatter mode 'circular'")
    axis = attrs.get("axis", -2) % cache.ndim
    out = cache.copy()
    starts = np.zeros(cache.shape[0], np.int64) if write_indices is None else write_indices
    n = update.shape[axis]
    for batch, start in enumerate(starts):
        index = [slice(None)] * cache.ndim
        index[0], index[axis] = batch, slice(int(start), int(start) + n)
        upd = [slice(None)] * cache.ndim
        upd[0] = batch
        out[tuple(index)] = update[tuple(upd)]
    return out


# ----------------------------------------------------------------------------- matrices and nn
@op("MatMul")
def matmul(attrs, a, b):
    return np.matmul(a, b)


@op("Gemm")
def gemm(attrs, a, b, c=None):
    a = a.T if attrs.get("transA", 0) else a
    b = b.T if attrs.get("transB", 0) else b
    y = attrs.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + attrs.get("beta", 1.0) * c


def softmax_(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax that maps a fully masked row (all -inf) to zeros, as ONNX Attention does."""
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - np.where(np.isneginf(m), 0.0, m))
    s = np.sum(e, axis=axis, keepdims=True)
    return e / np.where(s == 0, 1.0, s)


@op("Softmax")
def softmax(attrs, x):
    return softmax_(x, attrs.get("axis", -1))


@op("LogSoftmax")
def log_softmax(attrs, x):
    axis = attrs.get("axis", -1)
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


@op("LayerNormalization")
def layer_norm(attrs, x, scale, bias=None):
    """Y, Mean, InvStdDev; statistics over the axes from ``axis`` to the last."""
    axis = attrs.get("axis", -1) % x.ndim
    axes = tuple(range(axis, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    inv_std = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + attrs.get("epsilon", 1e-5))
    y = (x - mean) * inv_std * scale
    return (y if bias is None else y + bias), mean, inv_std


@op("Gelu")
def gelu(attrs, x):
    if attrs.get("approximate", "none") == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1.0 + OPS[("", "Erf")]({}, x / math.sqrt(2.0)))


@op("Attention")
def attention(attrs, q, k, v, mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None):
    """ONNX Attention (opset 23/24): Y, present_key, present_value.

    4-D inputs are [B, heads, seq, head_size]; 3-D ones [B, seq, heads * head_size] with
    ``q_num_heads``/``kv_num_heads``. Grouped K/V heads are repeated; ``is_causal`` is
    aligned to the end of the past (query i attends key j <= i + past length).
    """
    if attrs.get("qk_matmul_output_mode", 0) or nonpad_kv_seqlen is not None:
        raise NotImplementedError("Attention with qk_matmul_output_mode or nonpad_kv_seqlen")
    three_d = q.ndim == 3
    if three_d:
        def heads(x, n):
            return x.reshape(x.shape[0], x.shape[1], n, -1).transpose(0, 2, 1, 3)
        q, k, v = heads(q, attrs["q_num_heads"]), heads(k, attrs["kv_num_heads"]), heads(v, attrs["kv_num_heads"])
    past = 0
    if past_key is not None:
        past = past_key.shape[2]
        k, v = np.concatenate([past_key, k], axis=2), np.concatenate([past_value, v], axis=2)
    present_k, present_v = k, v
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scale = attrs.get("scale", 1.0 / math.sqrt(q.shape[-1]))
    scores = (q @ np.swapaxes(k, -1, -2)) * scale
    if mask is not None:
        scores = scores + (np.where(mask, 0.0, -np.inf) if mask.dtype == np.bool_ else mask)
    if attrs.get("is_causal", 0):
        tq, tk = scores.shape[-2:]
        allowed = np.arange(tk)[None, :] <= np.arange(tq)[:, None] + past
        scores = np.where(allowed, scores, -np.inf)
    softcap = attrs.get("softcap", 0.0)
    if softcap > 0:
        scores = softcap * np.tanh(scores / softcap)
    y = softmax_(scores, -1) @ v
    if three_d:
        y = y.transpose(0, 2, 1, 3).reshape(y.shape[0], y.shape[2], -1)
    return y, present_k, present_v
