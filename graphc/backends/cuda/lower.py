"""Lowering an optimised ONNX graph to CUDA work: one table, one small function per op.

``LOWER[(domain, op_type)] = fn(ctx, node)``. A function reads its inputs as device
tensors (strided views) or host constants, and defines its outputs: a *view* of an input
(Reshape, Transpose, Split, Slice, ...: no work), or a fresh tensor written by kernels
it emits (CUDA C from ``kernels.py``) or by a cuBLAS GEMM. Nodes whose inputs are all
known on the host (shape arithmetic: Shape, Concat of shapes, Slice of shapes, ...) are
evaluated at lowering time with onnx's reference evaluator, since B and T are fixed.
:func:`check_lowerable` names the first node without a lowering before any work starts.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphc.backends.cuda import kernels as K
from graphc.backends.cuda.blas import WORKSPACE_BYTES, cuda_dtype, operand
from graphc.backends.cuda.program import CallStep, KernelStep, MemsetStep, Program
from graphc.backends.cuda.tensor import Tensor, broadcast_strides, contiguous_strides
from graphc.errors import GraphcError
from graphc.ir.node import attr
from graphc.ops.registry import lowering_table, register_lowering

LOWER: dict[tuple[str, str], Callable] = lowering_table("cuda")   # graphc.ops' registry of lowerings
HOST_ONLY = {"Shape", "Constant", "ConstantOfShape", "Range", "Size"}

try:
    from ml_dtypes import bfloat16
except ImportError:  # pragma: no cover
    bfloat16 = None

NP_OF_ONNX = {TensorProto.FLOAT: np.dtype(np.float32), TensorProto.INT64: np.dtype(np.int64),
              TensorProto.INT32: np.dtype(np.int32), TensorProto.BOOL: np.dtype(np.bool_)}
if bfloat16 is not None:
    NP_OF_ONNX[TensorProto.BFLOAT16] = np.dtype(bfloat16)


def lowering(*keys):
    """Register ``fn`` as the CUDA lowering of each key (an op type, or (domain, op type))."""
    def register(fn):
        for key in keys:
            register_lowering("cuda", *(key if isinstance(key, tuple) else ("", key)))(fn)
        return fn
    return register


def node_label(node: onnx.NodeProto) -> str:
    return f"{node.name or node.output[0]} ({(node.domain + '.') if node.domain else ''}{node.op_type})"


def check_lowerable(model: onnx.ModelProto, where: str = "model") -> None:
    """One-line GraphcError naming the first node the CUDA backend cannot run."""
    for node in model.graph.node:
        if (node.domain or "", node.op_type) not in LOWER and node.op_type not in HOST_ONLY:
            raise GraphcError(where, f"node {node_label(node)}: no CUDA lowering for this op", "--backend")


class Ctx:
    """What a lowering function sees: values by name, allocation, and the step list."""

    def __init__(self, model: onnx.ModelProto, program: Program, *, arch: str = "sm_90"):
        self.model, self.program, self.arch = model, program, arch
        self.values: dict[str, object] = {}       # name -> Tensor | np.ndarray (host constant)
        self.consumers: dict[str, list] = {}
        for n in model.graph.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.graph_outputs = {o.name for o in model.graph.output}
        self.targets: dict[str, Tensor] = {}      # output name -> where it must land
        self.aliases: dict[str, str] = {}         # value -> value whose storage it shares
        self.reserved: dict[str, Tensor] = {}
        self.skip: set[int] = set()
        self.node: onnx.NodeProto | None = None
        self._uploaded: dict[int, Tensor] = {}
        self._shared: dict[str, Tensor] = {}
        self.workspace = None
        self.declared: dict[str, np.dtype] = {}
        for vi in list(model.graph.value_info) + list(model.graph.output):
            et = vi.type.tensor_type.elem_type
            if et in NP_OF_ONNX:
                self.declared[vi.name] = NP_OF_ONNX[et]

    # ---------------------------------------------------------------- values
    def host(self, name: str):
        v = self.values.get(name)
        return v if isinstance(v, np.ndarray) else None

    def tensor(self, name: str) -> Tensor:
        v = self.values[name]
        if isinstance(v, Tensor):
            return v
        key = id(v)
        if key not in self._uploaded:   # a host constant a kernel reads: upload once
            arr = np.ascontiguousarray(v)
            t = self.fresh(arr.shape, arr.dtype, "const", f"const:{name}")
            self.program.consts.append((t, arr))
            self._uploaded[key] = t
        return self._uploaded[key]

    def shape(self, name: str) -> tuple:
        v = self.values[name]
        return tuple(v.shape)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self.values[name].dtype)

    def define(self, name: str, value) -> None:
        self.values[name] = value

    # ---------------------------------------------------------------- allocation
    def fresh(self, shape, dtype, kind="act", label="") -> Tensor:
        shape = tuple(int(d) for d in shape)
        dtype = np.dtype(dtype)
        s = self.program.storage(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, kind, label)
        return Tensor(s, shape, contiguous_strides(shape), dtype)

    def out(self, name: str, shape, dtype) -> Tensor:
        """The contiguous tensor a kernel writes value ``name`` into (its bound target, the
        storage of the value it aliases, or fresh memory)."""
        shape, dtype = tuple(int(d) for d in shape), np.dtype(self.declared.get(name, dtype))
        if name in self.reserved:
            return self.reserved[name]
        t = None
        if name in self.aliases:
            t = self.out(self.aliases[name], shape, dtype)
        elif name in self.targets:
            t = self.targets[name]
            if t.shape != shape or t.dtype != dtype or not t.is_contiguous():
                t = None  # a copy into the target at the end
        if t is None:
            t = self.fresh(shape, dtype, "act", name)
        self.reserved[name] = t
        return t

    def scratch(self, shape, dtype=np.float32, label="scratch") -> Tensor:
        return self.fresh(shape, dtype, "scratch", label)

    def shared_scratch(self, key: str, shape, dtype=np.float32) -> Tensor:
        """One buffer for every node that asks with ``key``: safe because the steps run in
        order on one stream and the buffer is dead between nodes (attention's scores)."""
        t = self._shared.get(key)
        if t is None or t.shape != tuple(shape):
            t = self._shared[key] = self.fresh(shape, dtype, "scratch", key)
        return t

    # ---------------------------------------------------------------- work
    def launch(self, src_name, grid, block, args, shmem=0, name=None) -> None:
        src, kname = src_name if name is None else (src_name[0], name)
        grid = tuple(int(g) for g in grid)
        self.program.steps.append(KernelStep(src, kname, grid, tuple(block), list(args),
                                             node_label(self.node) if self.node else "", shmem))

    def memset0(self, t: Tensor) -> None:
        assert t.is_contiguous()
        self.program.steps.append(MemsetStep(t, node_label(self.node) if self.node else ""))

    def copy(self, src: Tensor, dst: Tensor) -> None:
        """dst[...] = src (any strides, broadcasting, dtype conversion)."""
        self.elementwise("a0", dst, [src])

    def elementwise(self, expr: str, out: Tensor, ins: list) -> None:
        specs = []
        for x in ins:
            if isinstance(x, tuple):
                specs.append(x)
            else:
                specs.append((x.dtype, broadcast_strides(x.shape, x.strides, out.shape)))
        n = out.size
        if n == 0:
            return
        src = K.elementwise(expr, out.shape, (out.dtype, out.strides), specs)
        args = [out] + [x for x in ins if not isinstance(x, tuple)]
        self.launch(src, [-(-n // 256)], [256], args)

    def contiguous(self, t: Tensor) -> Tensor:
        if t.is_contiguous():
            return t
        c = self.fresh(t.shape, t.dtype, "act", "contiguous")
        self.copy(t, c)
        return c

    def rows(self, t: Tensor) -> tuple[Tensor, int]:
        """``t`` as [rows, cols] with unit inner stride, and its row stride (copies if needed)."""
        cols = t.shape[-1] if t.shape else 1
        lead = int(np.prod(t.shape[:-1], dtype=np.int64)) if len(t.shape) > 1 else 1
        if len(t.shape) >= 1 and (t.strides[-1] == 1 or cols == 1):
            v = t.reshape((lead, cols)) if len(t.shape) != 2 else t
            if v is not None and v.row_stride() is not None:
                return v, v.row_stride()
        c = self.contiguous(t).reshape((lead, cols))
        return c, cols

    def call(self, make, tensors) -> None:
        """A library call built after the arena exists; ``tensors``: every tensor it touches
        (the memory planner needs them to know what is live)."""
        self.program.steps.append(CallStep(make, node_label(self.node) if self.node else "", list(tensors)))

    def cublas_workspace(self) -> Tensor:
        if self.workspace is None:
            self.workspace = self.fresh((WORKSPACE_BYTES,), np.uint8, "scratch", "cublas-workspace")
        return self.workspace


# ============================================================================ host evaluation
def eval_on_host(node: onnx.NodeProto, inputs: list) -> list[np.ndarray]:
    """Evaluate a node whose inputs are host constants (onnx's reference implementation)."""
    from onnx.reference import ReferenceEvaluator

    names = [f"i{k}" if x is not None else "" for k, x in enumerate(inputs)]
    n = helper.make_node(node.op_type, names, [f"o{k}" for k in range(len(node.output))], domain=node.domain)
    n.attribute.extend(node.attribute)
    g = helper.make_graph([n], "g", [helper.make_tensor_value_info(nm, helper.np_dtype_to_tensor_dtype(x.dtype), x.shape)
                                     for nm, x in zip(names, inputs) if nm],
                          [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in n.output])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 24)])
    feeds = {nm: x for nm, x in zip(names, inputs) if nm}
    return [np.asarray(v) for v in ReferenceEvaluator(m).run(None, feeds)]


# ============================================================================ views
@lowering("Shape")
def lower_shape(ctx, node):
    shape = np.array(ctx.shape(node.input[0]), np.int64)
    start, end = attr(node, "start", 0), attr(node, "end", None)
    ctx.define(node.output[0], shape[start:end])


def _view_or_copy(ctx, node, x, shape) -> None:
    """Define the node's output as ``x`` reshaped: a host constant reshaped on the host, a
    device tensor as a view when its strides allow, else a copy."""
    if isinstance(x, np.ndarray):
        return ctx.define(node.output[0], x.reshape(shape))
    v = x.reshape(shape)
    if v is None:
        v = ctx.out(node.output[0], shape, x.dtype)
        _copy_reshaped(ctx, x, v)
    ctx.define(node.output[0], v)


def _copy_reshaped(ctx, x: Tensor, out: Tensor) -> None:
    """out (contiguous, new shape) <- x's elements in row-major order."""
    tmp = out.view(x.shape, contiguous_strides(x.shape))
    ctx.copy(x, tmp)


@lowering("Reshape")
def lower_reshape(ctx, node):
    x = ctx.values[node.input[0]]
    spec = [int(d) for d in ctx.host(node.input[1])]
    shape = list(x.shape)
    out = []
    for k, d in enumerate(spec):
        out.append(shape[k] if d == 0 and not attr(node, "allowzero", 0) else d)
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1], dtype=np.int64))
        out[out.index(-1)] = int(np.prod(shape, dtype=np.int64)) // max(known, 1)
    _view_or_copy(ctx, node, x, out)


@lowering("Flatten")
def lower_flatten(ctx, node):
    x = ctx.values[node.input[0]]
    axis = attr(node, "axis", 1) % (len(x.shape) + 1) if x.shape else 0
    shape = [int(np.prod(x.shape[:axis], dtype=np.int64)), int(np.prod(x.shape[axis:], dtype=np.int64))]
    _view_or_copy(ctx, node, x, shape)


@lowering("Unsqueeze", "Squeeze")
def lower_squeeze(ctx, node):
    x = ctx.values[node.input[0]]
    axes = ctx.host(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "axes", None)
    shape = list(x.shape)
    if node.op_type == "Unsqueeze":
        rank = len(shape) + len(axes)
        for a in sorted(int(a) % rank for a in axes):
            shape.insert(a, 1)
    else:
        drop = {int(a) % len(shape) for a in axes} if axes is not None else {k for k, d in enumerate(shape) if d == 1}
        shape = [d for k, d in enumerate(shape) if k not in drop]
    _view_or_copy(ctx, node, x, shape)


@lowering("Transpose")
def lower_transpose(ctx, node):
    x = ctx.values[node.input[0]]
    perm = attr(node, "perm", None) or list(reversed(range(len(x.shape))))
    if isinstance(x, np.ndarray):
        return ctx.define(node.output[0], np.transpose(x, perm))
    ctx.define(node.output[0], x.transpose(perm))


@lowering("Identity")
def lower_identity(ctx, node):
    ctx.define(node.output[0], ctx.values[node.input[0]])


@lowering("Split")
def lower_split(ctx, node):
    x = ctx.values[node.input[0]]
    axis = attr(node, "axis", 0) % len(x.shape)
    if len(node.input) > 1 and node.input[1]:
        sizes = [int(s) for s in ctx.host(node.input[1])]
    else:
        n = len(node.output)
        sizes = [-(-x.shape[axis] // n)] * n
        sizes[-1] = x.shape[axis] - sum(sizes[:-1])
    start = 0
    for name, size in zip(node.output, sizes):
        shape = list(x.shape)
        shape[axis] = size
        ctx.define(name, x.view(shape, x.strides, x.offset + start * x.strides[axis]))
        start += size


@lowering("Slice")
def lower_slice(ctx, node):
    x = ctx.values[node.input[0]]
    if isinstance(x, np.ndarray):
        inputs = [ctx.host(i) if i else None for i in node.input]
        return ctx.define(node.output[0], eval_on_host(node, inputs)[0])
    starts, ends = ctx.host(node.input[1]), ctx.host(node.input[2])
    axes = ctx.host(node.input[3]) if len(node.input) > 3 and node.input[3] else np.arange(len(starts))
    steps = ctx.host(node.input[4]) if len(node.input) > 4 and node.input[4] else np.ones(len(starts), np.int64)
    shape, strides, offset = list(x.shape), list(x.strides), x.offset
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = int(a) % len(shape)
        d = shape[a]
        if st <= 0:
            raise GraphcError("model", f"node {node_label(node)}: negative slice steps are not lowered", "--backend")
        s = min(max(int(s) + d if s < 0 else int(s), 0), d)
        e = min(max(int(e) + d if e < 0 else int(e), 0), d)
        n = max(0, -(-(e - s) // int(st)))
        offset += s * strides[a]
        shape[a] = n
        strides[a] *= int(st)
    ctx.define(node.output[0], x.view(shape, strides, offset))


# ============================================================================ elementwise
EXPR = {
    "Add": "a0 + a1", "Sub": "a0 - a1", "Mul": "a0 * a1", "Div": "a0 / a1",
    "Less": "(a0 < a1)", "Greater": "(a0 > a1)", "LessOrEqual": "(a0 <= a1)", "Equal": "(a0 == a1)",
    "Where": "(a0 ? a1 : a2)", "Max": "(a0 > a1 ? a0 : a1)", "Min": "(a0 < a1 ? a0 : a1)",
    "Neg": "-a0", "Sqrt": "sqrtf(a0)", "Tanh": "tanhf(a0)", "Exp": "expf(a0)", "Reciprocal": "1.f / a0",
    "Not": "!a0", "And": "(a0 && a1)", "Or": "(a0 || a1)",
    "Gelu": f"0.5f * a0 * (1.f + tanhf({K.GELU_S!r}f * (a0 + {K.GELU_A!r}f * a0 * a0 * a0)))",
    ("graphc", "GeluGrad"): (
        f"a0 * (0.5f * (1.f + tanhf({K.GELU_S!r}f * (a1 + {K.GELU_A!r}f * a1 * a1 * a1))) + "
        f"0.5f * a1 * (1.f - tanhf({K.GELU_S!r}f * (a1 + {K.GELU_A!r}f * a1 * a1 * a1)) * "
        f"tanhf({K.GELU_S!r}f * (a1 + {K.GELU_A!r}f * a1 * a1 * a1))) * {K.GELU_S!r}f * "
        f"(1.f + {3 * K.GELU_A!r}f * a1 * a1))"),
}
BOOL_OUT = {"Less", "Greater", "LessOrEqual", "Equal", "Not", "And", "Or"}


def _elementwise_inputs(ctx, node, first=0):
    ins, shapes, dtypes = [], [], []
    for name in node.input[first:]:
        v = ctx.values[name]
        shapes.append(tuple(v.shape))
        dtypes.append(np.dtype(v.dtype))
        if isinstance(v, np.ndarray) and v.size == 1:
            ins.append(("lit", K.lit(v.reshape(()).item(), v.dtype)))
        else:
            ins.append(ctx.tensor(name))
    return ins, tuple(np.broadcast_shapes(*shapes)), dtypes


def lower_elementwise(ctx, node):
    key = (node.domain or "", node.op_type)
    if all(isinstance(ctx.values.get(i), np.ndarray) for i in node.input if i) and not node.domain:
        outs = eval_on_host(node, [ctx.values[i] for i in node.input])
        return ctx.define(node.output[0], outs[0])
    expr = EXPR[node.op_type] if key[0] == "" else EXPR[key]
    ins, shape, dtypes = _elementwise_inputs(ctx, node)
    if node.op_type in BOOL_OUT:
        out_dt = np.dtype(np.bool_)
    elif node.op_type == "Where":
        out_dt = dtypes[1]
    else:
        out_dt = dtypes[0]
    out = ctx.out(node.output[0], shape, out_dt)
    ctx.elementwise(expr, out, ins)
    ctx.define(node.output[0], out)


lowering(*EXPR)(lower_elementwise)


@lowering("Sum")
def lower_sum(ctx, node):
    ins, shape, dtypes = _elementwise_inputs(ctx, node)
    out = ctx.out(node.output[0], shape, dtypes[0])
    ctx.elementwise(" + ".join(f"a{k}" for k in range(len(ins))), out, ins)
    ctx.define(node.output[0], out)


@lowering("Cast")
def lower_cast(ctx, node):
    to = NP_OF_ONNX[attr(node, "to")]
    x = ctx.values[node.input[0]]
    if isinstance(x, np.ndarray):
        return ctx.define(node.output[0], x.astype(to))
    if x.dtype == to:
        return ctx.define(node.output[0], x)
    out = ctx.out(node.output[0], x.shape, to)
    ctx.copy(x, out)
    ctx.define(node.output[0], out)


@lowering("Concat")
def lower_concat(ctx, node):
    vals = [ctx.values[i] for i in node.input]
    if all(isinstance(v, np.ndarray) for v in vals):
        return ctx.define(node.output[0], np.concatenate(vals, axis=attr(node, "axis")))
    axis = attr(node, "axis") % len(vals[0].shape)
    shape = list(vals[0].shape)
    shape[axis] = sum(v.shape[axis] for v in vals)
    out = ctx.out(node.output[0], shape, vals[0].dtype)
    start = 0
    for name, v in zip(node.input, vals):
        part_shape = list(out.shape)
        part_shape[axis] = v.shape[axis]
        part = out.view(part_shape, out.strides, out.offset + start * out.strides[axis])
        src = ctx.tensor(name)
        if not (src.storage is part.storage and src.offset == part.offset and src.shape == part.shape
                and src.strides == part.strides and src.dtype == part.dtype):   # else written in place already
            ctx.copy(src, part)
        start += v.shape[axis]
    ctx.define(node.output[0], out)


@lowering("Pad")
def lower_pad(ctx, node):
    x = ctx.tensor(node.input[0])
    pads = [int(p) for p in ctx.host(node.input[1])]
    mode = attr(node, "mode", "constant")
    value = ctx.host(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    axes = ([int(a) % len(x.shape) for a in ctx.host(node.input[3])] if len(node.input) > 3 and node.input[3]
            else list(range(len(x.shape))))
    if mode != "constant" or (value is not None and float(value.reshape(-1)[0]) != 0.0) or min(pads) < 0:
        raise GraphcError("model", f"node {node_label(node)}: only zero constant padding is lowered", "--backend")
    before, after = [0] * len(x.shape), [0] * len(x.shape)
    for k, a in enumerate(axes):
        before[a], after[a] = pads[k], pads[k + len(axes)]
    shape = [d + b + e for d, b, e in zip(x.shape, before, after)]
    out = ctx.out(node.output[0], shape, x.dtype)
    ctx.memset0(out)
    inner = out.view(x.shape, out.strides, out.offset + sum(b * s for b, s in zip(before, out.strides)))
    ctx.copy(x, inner)
    ctx.define(node.output[0], out)


# ============================================================================ reductions
@lowering("ReduceSum")
def lower_reduce_sum(ctx, node):
    x = ctx.tensor(node.input[0])
    axes = ctx.host(node.input[1]) if len(node.input) > 1 and node.input[1] else np.arange(len(x.shape))
    axes = sorted(int(a) % len(x.shape) for a in axes)
    keep = attr(node, "keepdims", 1)
    if axes != list(range(len(axes))):
        raise GraphcError("model", f"node {node_label(node)}: ReduceSum over axes {axes} (only leading axes "
                          "are lowered)", "--backend")
    rows = int(np.prod(x.shape[:len(axes)], dtype=np.int64))
    rest = x.shape[len(axes):]
    cols = int(np.prod(rest, dtype=np.int64))
    shape = ([1] * len(axes) + list(rest)) if keep else list(rest)
    out = ctx.out(node.output[0], shape, x.dtype)
    column_sum(ctx, x.reshape((rows, cols)) or ctx.contiguous(x).reshape((rows, cols)), out)
    ctx.define(node.output[0], out)


def column_sum(ctx, x: Tensor, out: Tensor) -> None:
    """out[c] = sum_r x[r, c], deterministic (two passes, fixed chunks)."""
    if x.row_stride() is None:
        x = ctx.contiguous(x)
    rows, cols = x.shape
    if rows <= K.COLSUM_ONE_PASS_ROWS:
        ctx.launch(K.colsum_one_pass(rows, cols, x.dtype, out.dtype, x.row_stride()), [-(-cols // 32)], [32, 8], [x, out])
        return
    chunks = max(1, min(K.COLSUM_CHUNKS, rows))
    src, (k1, k2) = K.colsum(rows, cols, x.dtype, out.dtype, x.row_stride(), chunks)
    part = ctx.scratch((chunks, cols), np.float32, "colsum-partial")
    ctx.launch((src, k1), [-(-cols // 256), chunks], [256], [x, part])
    ctx.launch((src, k2), [-(-cols // 256)], [256], [part, out])


# ============================================================================ fused ops
@lowering("LayerNormalization")
def lower_layernorm(ctx, node):
    x, ld = ctx.rows(ctx.tensor(node.input[0]))
    w, b = ctx.contiguous(ctx.tensor(node.input[1])), ctx.contiguous(ctx.tensor(node.input[2]))
    full = ctx.shape(node.input[0])
    if attr(node, "axis", -1) not in (-1, len(full) - 1):
        raise GraphcError("model", f"node {node_label(node)}: layer norm over axis != -1", "--backend")
    out_dt = x.dtype
    y = ctx.out(node.output[0], full, out_dt)
    rows, C = x.shape
    src = K.layernorm_fwd(rows, C, x.dtype, w.dtype, y.dtype, attr(node, "epsilon", 1e-5), ld, C)
    ctx.launch(src, [-(-rows // 8)], [256], [x, w, b, y])
    ctx.define(node.output[0], y)


LN_CHUNKS = 512   # row chunks of the layer-norm backward's partial sums (enough blocks for 132 SMs)


@lowering(("graphc", "LayerNormGrad"))
def lower_layernorm_grad(ctx, node):
    dy, dy_ld = ctx.rows(ctx.tensor(node.input[0]))
    x, x_ld = ctx.rows(ctx.tensor(node.input[1]))
    w = ctx.contiguous(ctx.tensor(node.input[2]))
    rows, C = x.shape
    dx = ctx.out(node.output[0], ctx.shape(node.input[1]), x.dtype)
    eps = attr(node, "epsilon", 1e-5)
    if len(node.output) == 3 and node.output[1] and node.output[2] and C <= K.LN_PARTIAL_MAX_C:
        dw, db = (ctx.out(name, (C,), w.dtype) for name in node.output[1:3])
        if dw.dtype == db.dtype:
            chunks = max(1, min(LN_CHUNKS, -(-rows // 8)))
            src, (k1, k2) = K.layernorm_bwd_partials(rows, C, chunks, dy.dtype, x.dtype, w.dtype, dx.dtype, dw.dtype,
                                                     eps, dy_ld, x_ld)
            part = ctx.scratch((chunks, 2 * C), np.float32, "ln-partials")
            ctx.launch((src, k1), [chunks], [256], [dy, x, w, dx, part])
            ctx.launch((src, k2), [-(-2 * C // 256)], [256], [part, dw, db])
            for name, t in zip(node.output, (dx, dw, db)):
                ctx.define(name, t)
            return
    dyxhat = ctx.scratch((rows, C), np.float32, "ln-dyxhat")
    src = K.layernorm_bwd(rows, C, dy.dtype, x.dtype, w.dtype, dx.dtype, attr(node, "epsilon", 1e-5), dy_ld, x_ld)
    ctx.launch(src, [-(-rows // 8)], [256], [dy, x, w, dx, dyxhat])
    ctx.define(node.output[0], dx)
    for name, src_t in ((node.output[1], dyxhat), (node.output[2], dy)):
        if name:
            out = ctx.out(name, (C,), w.dtype)
            column_sum(ctx, src_t, out)
            ctx.define(name, out)


@lowering("Gather")
def lower_gather(ctx, node):
    table = ctx.contiguous(ctx.tensor(node.input[0]))
    idx = ctx.contiguous(ctx.tensor(node.input[1]))
    if attr(node, "axis", 0) != 0 or len(table.shape) != 2:
        raise GraphcError("model", f"node {node_label(node)}: only row gathers of a matrix are lowered", "--backend")
    rows, C = table.shape
    out = ctx.out(node.output[0], tuple(idx.shape) + (C,), table.dtype)
    n = idx.size
    src = K.gather_rows(n, C, table.dtype, idx.dtype, out.dtype, rows)
    ctx.launch(src, [-(-(n * C) // 256)], [256], [table, idx, out])
    ctx.define(node.output[0], out)


@lowering("ScatterND")
def lower_scatter_nd(ctx, node):
    """data with rows added at indices [..., 1] (reduction=add): the embedding gradient."""
    if attr(node, "reduction", "none") != "add":
        raise GraphcError("model", f"node {node_label(node)}: only ScatterND(reduction=add) is lowered", "--backend")
    data = ctx.tensor(node.input[0])
    idx = ctx.contiguous(ctx.tensor(node.input[1]))
    upd = ctx.contiguous(ctx.tensor(node.input[2]))
    if idx.shape[-1] != 1 or len(data.shape) != 2:
        raise GraphcError("model", f"node {node_label(node)}: ScatterND of whole rows of a matrix only", "--backend")
    out = ctx.out(node.output[0], data.shape, data.dtype)
    if out.storage is not data.storage or out.offset != data.offset:
        ctx.copy(data, out)
    rows, C = data.shape
    n = idx.size
    src = K.scatter_add_rows(n, C, upd.dtype, idx.dtype, out.dtype, rows)
    ctx.launch(src, [n], [256], [upd, idx, out])
    ctx.define(node.output[0], out)


@lowering(("graphc", "CrossEntropy"))
def lower_cross_entropy(ctx, node):
    """Row losses and their mean; when the graph also has this loss's CrossEntropyGrad with
    a constant seed (training), one fused kernel writes the gradient too (llm.c's fused
    classifier: the logits are read once from memory)."""
    z, z_ld = ctx.rows(ctx.tensor(node.input[0]))
    t = ctx.contiguous(ctx.tensor(node.input[1]))
    rows, V = z.shape
    losses = ctx.scratch((rows,), np.float32, "ce-losses")
    loss = ctx.out(node.output[0], (), np.float32)
    grad = _fusable_ce_grad(ctx, node)
    if grad is None:
        src = (K.cross_entropy_fused_vec(rows, V, z.dtype, t.dtype, z_ld, False) if _vec_rows_ok(z, z_ld, V)
               else K.cross_entropy_fused(rows, V, z.dtype, t.dtype, z_ld))
        ctx.launch(src, [rows], [1024], [z, t, losses])
    else:
        g, dloss = grad
        dz, cols, pad = _ce_grad_destination(ctx, g, rows, V, z.dtype)
        if _vec_rows_ok(z, z_ld, V) and _vec_rows_ok(dz, cols, cols) and dz.dtype == z.dtype and dz.is_contiguous():
            src = K.cross_entropy_fused_vec(rows, V, z.dtype, t.dtype, z_ld, True, cols, dloss / rows)
        else:
            src = K.cross_entropy_fused(rows, V, z.dtype, t.dtype, z_ld, dz.dtype, cols, cols, dloss / rows)
        ctx.launch(src, [rows], [1024], [z, t, losses, dz])
        _define_ce_grad(ctx, g, dz, pad, rows, V, cols)
        ctx.skip.add(id(g))
    src, (_, k2) = K.cross_entropy(rows, V, z.dtype, t.dtype, z_ld)
    ctx.launch((src, k2), [1], [1024], [losses, loss])
    ctx.define(node.output[0], loss)


def _vec_rows_ok(t: Tensor, ld: int, cols: int) -> bool:
    """Rows of ``t`` (row stride ``ld``) can be read in 16-byte vectors up to ``cols``
    rounded up to a whole vector: aligned rows, and the last row's vector tail inside the
    storage (the padded vocabulary columns)."""
    if t.dtype.name not in ("float32", "bfloat16"):
        return False
    vec = 16 // t.dtype.itemsize
    tail = -(-cols // vec) * vec
    end = t.offset + (t.shape[0] - 1) * ld + tail
    return ld % vec == 0 and _aligned16(t) and tail <= ld and end * t.dtype.itemsize <= t.storage.nbytes


def _fusable_ce_grad(ctx, node):
    """(CrossEntropyGrad node, dloss) of the same logits and targets with a host-constant seed."""
    for u in ctx.consumers.get(node.input[0], []):
        if u.op_type == "CrossEntropyGrad" and u.domain == "graphc" and list(u.input[1:3]) == list(node.input[:2]):
            seed = ctx.host(u.input[0])
            if seed is not None and seed.size == 1:
                return u, float(seed.reshape(()))
    return None


def _ce_grad_destination(ctx, g, rows, V, dtype):
    """Where dZ goes: straight into the padded buffer when a zero Pad of the vocabulary
    axis is its only consumer (then the kernel writes the pad's zeros too)."""
    pad = _padded_consumer(ctx, g.output[0], 2)
    cols = V
    name = g.output[0]
    if pad is not None:
        cols = V + int(ctx.host(pad.input[1])[-1])
        name = pad.output[0]
    return ctx.out(name, (rows, cols), dtype), cols, pad


def _define_ce_grad(ctx, g, dz, pad, rows, V, cols):
    if pad is not None:
        ctx.skip.add(id(pad))
        ctx.define(pad.output[0], dz)
        ctx.define(g.output[0], dz.view((rows, V), (cols, 1)))
    else:
        ctx.define(g.output[0], dz)


def _padded_consumer(ctx, name, rank):
    """The Pad node that only zero-pads ``name``'s last axis at its end (the padded vocab)."""
    users = ctx.consumers.get(name, [])
    if len(users) != 1 or users[0].op_type != "Pad" or name in ctx.graph_outputs:
        return None
    pad = users[0]
    pads = ctx.host(pad.input[1])
    if pads is None or attr(pad, "mode", "constant") != "constant":
        return None
    value = ctx.host(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else None
    if value is not None and float(value.reshape(-1)[0]) != 0.0:
        return None
    axes = ([int(a) % rank for a in ctx.host(pad.input[3])] if len(pad.input) > 3 and pad.input[3]
            else list(range(rank)))
    n = len(axes)
    for k, a in enumerate(axes):
        if pads[k] != 0 or (a != rank - 1 and pads[k + n] != 0) or pads[k + n] < 0:
            return None
    return pad


@lowering(("graphc", "CrossEntropyGrad"))
def lower_cross_entropy_grad(ctx, node):
    """Standalone (no fusable forward in the graph): one block per row, seed read from memory."""
    dloss = ctx.tensor(node.input[0])
    z, z_ld = ctx.rows(ctx.tensor(node.input[1]))
    t = ctx.contiguous(ctx.tensor(node.input[2]))
    rows, V = z.shape
    stats = ctx.fresh((rows, 2), np.float32, "act", "ce-stats")
    src, (k1, _) = K.cross_entropy(rows, V, z.dtype, t.dtype, z_ld)
    ctx.launch((src, k1), [rows], [512], [z, t, ctx.scratch((rows,), np.float32), stats])
    dz, cols, pad = _ce_grad_destination(ctx, node, rows, V, z.dtype)
    src = K.cross_entropy_grad(rows, V, z.dtype, t.dtype, dz.dtype, z_ld, cols, cols, dloss.dtype)
    ctx.launch(src, [-(-cols // 256), rows], [256], [dloss, z, t, stats, dz])
    _define_ce_grad(ctx, node, dz, pad, rows, V, cols)


def _attention_shapes(ctx, q: Tensor, node):
    if len(q.shape) != 4:
        raise GraphcError("model", f"node {node_label(node)}: attention needs 4-D [B, H, T, D] inputs", "--backend")
    return q.shape


def _bthd(ctx, name, B, H, T, D, dtype) -> Tensor:
    """A [B, H, T, D] view of fresh [B, T, H, D] memory (what the projections read as [BT, C])."""
    phys = ctx.out(name, (B, T, H, D), dtype)
    return phys.transpose((0, 2, 1, 3))


def _packed_grads(ctx, node, B, H, T, D, dtype):
    """dQ, dK, dV as [B, H, T, D] views of the packed [B*T, 3C] gradient when each goes
    Transpose(0, 2, 1, 3) -> Reshape -> one Concat along the last axis (the qkv split's
    backward): the attention backward writes straight into it and the Concat copies nothing
    (:func:`lower_concat` skips parts already in place). None when the graph differs."""
    concat = None
    for k, name in enumerate(node.output[:3]):
        tr = _sole_consumer(ctx, name, "Transpose")
        if tr is None or list(attr(tr, "perm", [])) != [0, 2, 1, 3]:
            return None
        rs = _sole_consumer(ctx, tr.output[0], "Reshape")
        cat = _sole_consumer(ctx, rs.output[0], "Concat") if rs is not None else None
        if cat is None or (concat is not None and cat is not concat) or list(cat.input).index(rs.output[0]) != k:
            return None
        concat = cat
    if len(concat.input) != 3 or attr(concat, "axis", 0) not in (1, -1):
        return None
    C = H * D
    packed = ctx.out(concat.output[0], (B * T, 3 * C), dtype)
    if packed.dtype != np.dtype(dtype) or not packed.is_contiguous():
        return None
    return [packed.view((B, H, T, D), (T * 3 * C, D, 3 * C, 1), packed.offset + k * C) for k in range(3)]


def _library_on(switch: str, module: str) -> bool:
    """A library path is taken when ``module`` imports and the environment variable
    ``switch`` is not ``0`` (the switch compares graphc's own kernels with the library's)."""
    import importlib
    import os

    if os.environ.get(switch, "1") == "0":
        return False
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _cudnn_ok(dtype) -> bool:
    """cuDNN's fused SDPA serves bf16 (it has no fp32 kernel); off with GRAPHC_CUDNN=0."""
    return np.dtype(dtype).name == "bfloat16" and _library_on("GRAPHC_CUDNN", "cudnn")


def _library_workspace(nbytes: int):
    """Device memory for a library plan's workspace, allocated when the plan is built
    (before any capture), kept alive by the returned buffer."""
    from graphc.runtime.cuda import DeviceBuffer, get_runtime

    return DeviceBuffer.allocate((max(int(nbytes), 1),), np.uint8, get_runtime().stream) if nbytes else None


def _gemm_attention_ok(q, k, v, *more) -> bool:
    """FP32 attention as batched cuBLAS GEMMs + row kernels (cuDNN has no fp32 SDPA)."""
    import os

    return (os.environ.get("GRAPHC_ATTN_GEMM", "1") != "0" and q.dtype == np.float32
            and all(t.dtype == np.float32 and t.strides[3] == 1 for t in (q, k, v, *more)))


def _head(t: Tensor, b: int) -> Tensor:
    """Batch element b, head 0 of a [B, H, T, D] view, as a 2-D [T, D] view."""
    return t.view(t.shape[2:], t.strides[2:], t.offset + b * t.strides[0])


def _batched_gemm(ctx, a, ta, b, tb, y, batch, sa, sb, sy, alpha=1.0) -> None:
    """y[i] = alpha op(a[i]) op(b[i]), i < batch; a, b, y are 2-D views of element 0 and the
    elements are sa, sb, sy apart (cublasGemmStridedBatchedEx, fp32 compute)."""
    M = a.shape[1] if ta else a.shape[0]
    K_ = a.shape[0] if ta else a.shape[1]
    N = b.shape[0] if tb else b.shape[1]
    opa, opb = operand(a, ta), operand(b, tb)
    assert opa is not None and opb is not None and y.strides[1] == 1, (a, b, y)
    ws = ctx.cublas_workspace()
    types = cuda_dtype(b.dtype), cuda_dtype(a.dtype), cuda_dtype(y.dtype)

    def make(rt):
        blas = blas_for(rt, ws)
        args = dict(transa=opb[0], transb=opa[0], m=N, n=M, k=K_, a=b.ptr, lda=opb[1], sa=sb, atype=types[0],
                    b=a.ptr, ldb=opa[1], sb=sa, btype=types[1], c=y.ptr, ldc=y.strides[0], sc=sy, ctype=types[2],
                    batch=batch, alpha=alpha)
        return lambda stream: blas.gemm_batched(stream, **args)

    ctx.call(make, [a, b, y, ws])


def _scores(ctx, q, k, b, scale, causal) -> Tensor:
    """P = softmax(scale Q K^T, causal) for batch element b, all heads: [H, T, T] fp32."""
    _, H, T, _ = q.shape
    s = ctx.shared_scratch("attn-scores", (H, T, T))
    s2 = s.view((T, T), (T, 1), s.offset)
    _batched_gemm(ctx, _head(q, b), False, _head(k, b), True, s2, H, q.strides[1], k.strides[1], T * T)
    ctx.launch(K.attention_softmax(H, T, float(scale), causal), [H * T], [256], [s])
    return s


@lowering("Attention")
def lower_attention(ctx, node):
    if len([i for i in node.input if i]) != 3 or len([o for o in node.output if o]) != 1:
        raise GraphcError("model", f"node {node_label(node)}: only Attention(Q, K, V) -> Y is lowered", "--backend")
    q, k, v = (ctx.tensor(i) for i in node.input[:3])
    B, H, T, D = _attention_shapes(ctx, q, node)
    scale = attr(node, "scale", None) or 1.0 / np.sqrt(D)
    causal = bool(attr(node, "is_causal", 0))
    y = _bthd(ctx, node.output[0], B, H, T, D, q.dtype)
    if _cudnn_ok(q.dtype) and all(t.strides[3] == 1 for t in (q, k, v)):
        from graphc.backends.cuda import attention

        spec = attention.SdpaSpec(B, H, T, D, q.strides, k.strides, v.strides, y.strides, scale=float(scale),
                                  causal=causal, dtype="bf16")
        stats = ctx.fresh((B, H, T, 1), np.float32, "act", "sdpa-stats")
        ctx.values[f"__attn_stats__{node.output[0]}"] = ("cudnn", stats)

        def make(rt, q=q, k=k, v=v, y=y, stats=stats, spec=spec):
            plan = attention.get_forward_plan(spec)
            ws = _library_workspace(plan.workspace_size)
            wsp = ws.ptr if ws is not None else None
            return lambda stream: (plan.run(stream, q.ptr, k.ptr, v.ptr, y.ptr, stats.ptr, workspace_ptr=wsp), ws)

        ctx.call(make, [q, k, v, y, stats])
    elif _gemm_attention_ok(q, k, v):
        ctx.values[f"__attn_stats__{node.output[0]}"] = ("gemm", None)
        for b in range(B):
            p = _scores(ctx, q, k, b, scale, causal)
            _batched_gemm(ctx, p.view((T, T), (T, 1), p.offset), False, _head(v, b), False, _head(y, b), H,
                          T * T, v.strides[1], y.strides[1])
    else:
        stats = ctx.fresh((B, H, T, 2), np.float32, "act", "attn-stats")
        ctx.values[f"__attn_stats__{node.output[0]}"] = ("own", stats)
        src = K.attention_fwd(B, H, T, D, q.strides, k.strides, v.strides, y.strides, scale, causal, q.dtype)
        ctx.launch(src, [T, H, B], [128], [q, k, v, y, stats])
    ctx.define(node.output[0], y)


@lowering(("graphc", "AttentionGrad"))
def lower_attention_grad(ctx, node):
    dy, q, k, v, y = (ctx.tensor(i) for i in node.input[:5])
    B, H, T, D = _attention_shapes(ctx, q, node)
    scale = attr(node, "scale", None) or 1.0 / np.sqrt(D)
    causal = bool(attr(node, "is_causal", 0))
    saved = ctx.values.get(f"__attn_stats__{node.input[4]}")
    if saved is None:
        raise GraphcError("model", f"node {node_label(node)}: AttentionGrad needs its forward Attention in the "
                          "same graph", "--backend")
    kind, stats = saved
    dq, dk, dv = _packed_grads(ctx, node, B, H, T, D, dy.dtype) or \
        (_bthd(ctx, o, B, H, T, D, dy.dtype) for o in node.output[:3])
    if kind == "cudnn" and dy.strides == y.strides:
        from graphc.backends.cuda import attention

        spec = attention.SdpaSpec(B, H, T, D, q.strides, k.strides, v.strides, y.strides, scale=float(scale),
                                  causal=causal, dtype="bf16", dq_strides=dq.strides, dk_strides=dk.strides,
                                  dv_strides=dv.strides)

        def make(rt, spec=spec, ts=(q, k, v, y, dy, stats, dq, dk, dv)):
            plan = attention.get_backward_plan(spec)
            ws = _library_workspace(plan.workspace_size)
            wsp = ws.ptr if ws is not None else None
            ptrs = [t.ptr for t in ts]
            return lambda stream: (plan.run(stream, *ptrs, workspace_ptr=wsp), ws)

        ctx.call(make, [q, k, v, y, dy, stats, dq, dk, dv])
    elif kind == "gemm" and _gemm_attention_ok(q, k, v, y, dy):
        dp = ctx.shared_scratch("attn-dscores", (H, T, T))
        dp2 = dp.view((T, T), (T, 1), dp.offset)
        for b in range(B):
            p = _scores(ctx, q, k, b, scale, causal)
            p2 = p.view((T, T), (T, 1), p.offset)
            _batched_gemm(ctx, p2, True, _head(dy, b), False, _head(dv, b), H, T * T, dy.strides[1], dv.strides[1])
            _batched_gemm(ctx, _head(dy, b), False, _head(v, b), True, dp2, H, dy.strides[1], v.strides[1], T * T)
            src = K.attention_dscores(H, T, D, dy.strides, y.strides, float(scale), y.dtype, dy.dtype)
            dy_b = dy.view(dy.shape, dy.strides, dy.offset + b * dy.strides[0])
            y_b = y.view(y.shape, y.strides, y.offset + b * y.strides[0])
            ctx.launch(src, [H * T], [256], [p, dp, dy_b, y_b])
            _batched_gemm(ctx, dp2, False, _head(k, b), False, _head(dq, b), H, T * T, k.strides[1], dq.strides[1])
            _batched_gemm(ctx, dp2, True, _head(q, b), False, _head(dk, b), H, T * T, q.strides[1], dk.strides[1])
    else:
        if kind != "own":
            raise GraphcError("model", f"node {node_label(node)}: dY's layout differs from Y's (cuDNN needs one)",
                              "--backend")
        dsum = ctx.scratch((B, H, T), np.float32, "attn-dsum")
        src, (k1, k2) = K.attention_bwd(B, H, T, D, dy.strides, q.strides, k.strides, v.strides, y.strides,
                                        dq.strides, dk.strides, dv.strides, scale, causal, q.dtype, dy.dtype)
        ctx.launch((src, k1), [T, H, B], [128], [dy, q, k, v, y, stats, dsum, dq])
        ctx.launch((src, k2), [T, H, B], [128], [dy, q, k, v, stats, dsum, dk, dv])
    for name, t in zip(node.output, (dq, dk, dv)):
        ctx.define(name, t)


# ============================================================================ GEMM
LT_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}


def _lt_ok() -> bool:
    """cuBLASLt plans (graphc/backends/cuda/gemm.py) with fused epilogues; off with GRAPHC_CUBLASLT=0."""
    return _library_on("GRAPHC_CUBLASLT", "nvmath.bindings.cublasLt")


def _sole_consumer(ctx, name, op_type, domain=""):
    users = ctx.consumers.get(name, [])
    if name in ctx.graph_outputs or len(users) != 1:
        return None
    u = users[0]
    return u if u.op_type == op_type and (u.domain or "") == domain else None


def _gelu_epilogue(ctx, name):
    """(Gelu node, keeps aux?) when the GEMM output feeds a tanh Gelu (and otherwise at most
    the GeluGrad that needs the pre-activation, or the Gelu that ``passes/recompute.py``
    clones for the backward, which reads it too): cuBLASLt's GELU(_AUX)(_BIAS) epilogue
    for the first Gelu, the others then reading the kept pre-activation (aux)."""
    users = ctx.consumers.get(name, [])
    if name in ctx.graph_outputs:
        return None
    gelus = [u for u in users if u.op_type == "Gelu" and not u.domain and attr(u, "approximate", "none") == "tanh"]
    if not gelus:
        return None
    others = [u for u in users if u is not gelus[0]]
    if any(not ((u.op_type == "GeluGrad" and u.input[1] == name) or u in gelus) for u in others):
        return None
    return gelus[0], bool(others)


@lowering("Gemm", "MatMul")
def lower_gemm(ctx, node):
    a, b = ctx.tensor(node.input[0]), ctx.tensor(node.input[1])
    if len(a.shape) != 2 or len(b.shape) != 2:
        if node.op_type == "MatMul" and len(b.shape) == 2 and len(a.shape) > 2:
            lead = int(np.prod(a.shape[:-1], dtype=np.int64))
            a = a.reshape((lead, a.shape[-1])) or ctx.contiguous(a).reshape((lead, a.shape[-1]))
        else:
            raise GraphcError("model", f"node {node_label(node)}: only 2-D GEMMs are lowered", "--backend")
    is_gemm = node.op_type == "Gemm"
    ta = bool(attr(node, "transA", 0)) if is_gemm else False
    tb = bool(attr(node, "transB", 0)) if is_gemm else False
    alpha = float(attr(node, "alpha", 1.0)) if is_gemm else 1.0
    beta = float(attr(node, "beta", 1.0)) if is_gemm else 0.0
    M, Ka = (a.shape[1], a.shape[0]) if ta else a.shape
    Kb, N = (b.shape[1], b.shape[0]) if tb else b.shape
    assert Ka == Kb, (node.name, a.shape, b.shape)
    out_shape = (M, N) if is_gemm else tuple(ctx.shape(node.input[0])[:-1]) + (N,)
    c = ctx.tensor(node.input[2]) if is_gemm and len(node.input) > 2 and node.input[2] and beta != 0.0 else None
    if _lt_ok() and _lower_gemm_lt(ctx, node, a, b, c, ta, tb, M, N, Ka, alpha, beta, out_shape):
        return
    y = ctx.out(node.output[0], out_shape, a.dtype)
    y2 = y.reshape((M, N))
    gemm_beta = 0.0
    if c is not None:
        if beta != 1.0:
            ctx.elementwise(f"a0 * {K.lit(beta, np.float32)}", y2, [c])
        else:
            ctx.copy(c, y2)
        gemm_beta = 1.0
    opa, opb = operand(a, ta), operand(b, tb)
    if opa is None:
        a = ctx.contiguous(a)
        opa = operand(a, ta)
    if opb is None:
        b = ctx.contiguous(b)
        opb = operand(b, tb)
    ws = ctx.cublas_workspace()
    atype, btype, ctype_ = cuda_dtype(b.dtype), cuda_dtype(a.dtype), cuda_dtype(y.dtype)

    def make(rt, a=a, b=b, y2=y2, opa=opa, opb=opb):
        blas = blas_for(rt, ws)
        args = dict(transa=opb[0], transb=opa[0], m=N, n=M, k=Ka, a=b.ptr, lda=opb[1], atype=atype,
                    b=a.ptr, ldb=opa[1], btype=btype, c=y2.ptr, ldc=N, ctype=ctype_, alpha=alpha, beta=gemm_beta)
        return lambda stream: blas.gemm(stream, **args)

    ctx.call(make, [a, b, y2, ws])
    ctx.define(node.output[0], y)


def _aligned16(t: Tensor) -> bool:
    """Storage starts are 256-byte aligned (arena slots, cuMemAlloc), so the offset decides."""
    return (t.offset * t.dtype.itemsize) % 16 == 0


def _lower_gemm_lt(ctx, node, a, b, c, ta, tb, M, N, K_, alpha, beta, out_shape) -> bool:
    """The GEMM as one cuBLASLt plan, fusing its bias, a following GELU (keeping the
    pre-activation for the backward as the epilogue's aux) or a following GeluGrad (DGELU
    epilogue). False when the operands do not fit (non-contiguous, odd dtypes)."""
    from graphc.backends.cuda import gemm

    dt = LT_DTYPES.get(a.dtype.name)
    if dt is None or a.dtype != b.dtype or not (a.is_contiguous() and b.is_contiguous()):
        return False
    out_dt = ctx.declared.get(node.output[0], a.dtype)
    epilogue, bias, aux, dest_name, skip = "default", None, None, node.output[0], None
    if c is not None:
        if beta != 1.0 or c.shape not in ((N,), (1, N)) or not c.is_contiguous() or c.dtype.name not in LT_DTYPES:
            return False
        epilogue, bias = "bias", c
    gelu = _gelu_epilogue(ctx, node.output[0])
    if gelu is not None and (not gelu[1] or N % 8 == 0):
        g, keep_aux = gelu
        epilogue = ("gelu_aux" if keep_aux else "gelu") + ("_bias" if bias is not None else "")
        dest_name, skip = g.output[0], g
    elif bias is None:
        gg = _sole_consumer(ctx, node.output[0], "GeluGrad", "graphc")
        if gg is not None and gg.input[0] == node.output[0] and N % 8 == 0:
            x = ctx.values.get(gg.input[1])
            if isinstance(x, Tensor) and x.is_contiguous() and x.size == M * N and x.dtype == np.dtype(out_dt):
                epilogue, aux, dest_name, skip = "dgelu", x, gg.output[0], gg
    if np.dtype(out_dt).name not in LT_DTYPES or LT_DTYPES[np.dtype(out_dt).name] not in gemm.SUPPORTED_DTYPES[dt]:
        return False
    spec = gemm.GemmSpec(M, N, K_, trans_a=ta, trans_b=tb, dtype=dt, out_dtype=LT_DTYPES[np.dtype(out_dt).name],
                         epilogue=epilogue, bias_dtype=LT_DTYPES[bias.dtype.name] if bias is not None else None)
    if not all(_aligned16(t) for t in (a, b, bias, aux) if t is not None):
        return False
    d = ctx.out(dest_name, out_shape, out_dt)
    if epilogue.startswith("gelu_aux"):
        aux = ctx.out(node.output[0], out_shape, out_dt)
    if not all(_aligned16(t) for t in (d, aux) if t is not None):
        raise AssertionError("fresh storage is 256-byte aligned")
    ws = ctx.cublas_workspace()

    def make(rt, a=a, b=b, d=d, bias=bias, aux=aux, spec=spec):
        plan = gemm.get_plan(spec)
        args = dict(workspace_ptr=ws.ptr, workspace_size=WORKSPACE_BYTES, alpha=alpha, beta=0.0,
                    bias_ptr=bias.ptr if bias is not None else None, aux_ptr=aux.ptr if aux is not None else None)
        ptrs = (a.ptr, b.ptr, None, d.ptr)
        return lambda stream: plan.run(stream, *ptrs, **args)

    ctx.call(make, [t for t in (a, b, d, bias, aux, ws) if t is not None])
    if skip is not None:
        ctx.skip.add(id(skip))
        ctx.define(skip.output[0], d)
        if epilogue.startswith("gelu_aux"):
            ctx.define(node.output[0], aux)
    else:
        ctx.define(node.output[0], d)
    return True


_BLAS = {}


def blas_for(rt, ws: Tensor):
    from graphc.backends.cuda.blas import Blas

    key = (id(rt), ws.ptr)
    if key not in _BLAS:
        _BLAS[key] = Blas(rt.stream, ws.ptr)
    return _BLAS[key]


# ============================================================================ flat casts
def _flat_groups(tensors: list[Tensor]):
    """The storage that ``tensors`` (contiguous, one dtype, disjoint) tile exactly, or None."""
    if not tensors or any(not t.is_contiguous() for t in tensors):
        return None
    s, dt = tensors[0].storage, tensors[0].dtype
    if any(t.storage is not s or t.dtype != dt for t in tensors):
        return None
    spans = sorted((t.offset, t.offset + t.size) for t in tensors)
    if spans[0][0] != 0 or any(a[1] != b[0] for a, b in zip(spans, spans[1:])) or spans[-1][1] * dt.itemsize != s.nbytes:
        return None
    return s, dt, spans[-1][1]


def _flat_casts(ctx, where) -> list:
    """Mixed precision's per-parameter casts as two kernels over flat buffers.

    The bf16 training graph casts every fp32 master to bf16 on entry and every bf16 gradient
    to fp32 on exit: ~300 small kernels, which dominate a launch-bound step (B4 T64). When
    the casts' fp32 sides tile one flat buffer exactly (the parameters; the gradient
    targets), one kernel converts the whole buffer into a flat low-precision twin at the start
    (entry) and one at the end (exit); each Cast is then a view (entry) or writes its input
    straight into the twin (exit). Returns the exit groups for :func:`lower` to finish."""
    inputs = {vi.name for vi in ctx.model.graph.input}
    entry: dict[int, list] = {}
    exit_: dict[int, list] = {}
    for node in ctx.model.graph.node:
        if node.op_type != "Cast" or node.domain:
            continue
        to = NP_OF_ONNX.get(attr(node, "to"))
        x = ctx.values.get(node.input[0])
        if node.input[0] in inputs and isinstance(x, Tensor) and to is not None and to != x.dtype:
            entry.setdefault(id(x.storage), []).append((node, x, to))
        target = ctx.targets.get(node.output[0])
        if target is not None and len(ctx.consumers.get(node.input[0], [])) == 1 \
                and node.input[0] not in ctx.graph_outputs and node.input[0] not in inputs:
            exit_.setdefault(id(target.storage), []).append((node, target))
    for group in entry.values():
        found = _flat_groups([x for _, x, _ in group])
        tos = {to for _, _, to in group}
        if found is None or len(tos) != 1:
            continue
        storage, dt, n = found
        to = tos.pop()
        src = Tensor(storage, (n,), (1,), dt)
        low = ctx.fresh((n,), to, "low-precision", f"{storage.name}:{to.name}")
        ctx.copy(src, low)
        ctx.program.steps[-1].node = f"flat-cast:{storage.name}"
        for node, x, _ in group:
            ctx.define(node.output[0], low.view(x.shape, x.strides, x.offset))
            ctx.skip.add(id(node))
    done = []
    for group in exit_.values():
        found = _flat_groups([t for _, t in group])
        lows = {ctx.declared.get(node.input[0]) for node, _ in group}
        if found is None or len(lows) != 1 or None in lows:
            continue
        storage, dt, n = found
        low_dt = lows.pop()
        flat = ctx.fresh((n,), low_dt, "low-precision", f"{storage.name}:{low_dt.name}")
        pairs = []
        for node, t in group:
            low = flat.view(t.shape, t.strides, t.offset)
            ctx.targets[node.input[0]] = low
            ctx.skip.add(id(node))
            ctx.define(node.output[0], t)
            pairs.append((node.input[0], low))
        done.append((flat, Tensor(storage, (n,), (1,), dt), pairs))
    return done


# ============================================================================ driver
def lower(model: onnx.ModelProto, *, inputs: dict[str, Tensor] | None = None,
          targets: dict[str, Tensor] | None = None, program: Program | None = None,
          where: str = "model") -> Program:
    """Lower ``model`` (static shapes) into ``program``.

    ``inputs``: device tensors for graph inputs (parameters as views of a flat buffer, the
    batch); inputs not given get their own storage from the graph's declared shapes.
    ``targets``: where graph outputs must land (gradients into the flat gradient buffer).
    """
    check_lowerable(model, where)
    program = program or Program()
    ctx = Ctx(model, program)
    ctx.targets = dict(targets or {})
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for name, arr in inits.items():
        ctx.define(name, np.asarray(arr))
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if inputs and vi.name in inputs:
            t = inputs[vi.name]
            want = NP_OF_ONNX.get(vi.type.tensor_type.elem_type, t.dtype)
            if t.dtype != want:  # e.g. bf16 parameters of an inference graph from fp32 masters
                converted = ctx.fresh(t.shape, want, "act", f"{vi.name}:{want.name}")
                ctx.copy(t, converted)
                t = converted
        else:
            tt = vi.type.tensor_type
            shape = [d.dim_value for d in tt.shape.dim]
            if any(d <= 0 for d in shape):
                raise GraphcError(where, f"input {vi.name}: shape {shape} is not static (bind B and T first)",
                                  "--backend")
            t = ctx.fresh(shape, NP_OF_ONNX[tt.elem_type], "input", vi.name)
        ctx.define(vi.name, t)
        program.inputs[vi.name] = t
    flat_out = _flat_casts(ctx, where)
    # in-place: ScatterND(add) writes into its data input when nothing else reads it
    for node in model.graph.node:
        if node.op_type == "ScatterND" and len(ctx.consumers.get(node.input[0], [])) == 1 \
                and node.input[0] not in ctx.values and node.input[0] not in ctx.graph_outputs:
            ctx.aliases[node.input[0]] = node.output[0]
    for node in model.graph.node:
        if id(node) in ctx.skip:
            continue
        ctx.node = node
        key = (node.domain or "", node.op_type)
        ins = [ctx.values.get(i) if i else None for i in node.input]
        if key[0] == "" and (node.op_type in HOST_ONLY and node.op_type != "Shape") or (
                key[0] == "" and node.input and all(isinstance(x, np.ndarray) or x is None for x in ins)
                and any(x is not None for x in ins)):
            outs = eval_on_host(node, ins)
            for name, value in zip(node.output, outs):
                ctx.define(name, value)
            continue
        LOWER[key](ctx, node)
    ctx.node = None
    for src_flat, dst_flat, pairs in flat_out:
        for low_name, low in pairs:   # a low-precision value not written in place: copy it there
            v = ctx.values[low_name]
            if not (isinstance(v, Tensor) and v.storage is low.storage and v.offset == low.offset
                    and v.strides == low.strides):
                ctx.copy(ctx.tensor(low_name), low)
        ctx.copy(src_flat, dst_flat)
        ctx.program.steps[-1].node = f"flat-cast:{dst_flat.storage.name}"
    for out in model.graph.output:
        v = ctx.values[out.name]
        if isinstance(v, np.ndarray):
            v = ctx.tensor(out.name)
        target = ctx.targets.get(out.name)
        if target is not None and v is not target:
            ctx.copy(v, target)
            v = target
        program.outputs[out.name] = v
    program.debug_values = ctx.values
    program.overwritten = set(ctx.aliases)   # values whose memory a later op updates in place
    return program
