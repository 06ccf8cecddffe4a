"""Reverse-mode automatic differentiation of an ONNX graph.

:func:`differentiate` turns a forward model with a scalar loss into a *training* model
that computes the loss and the gradient of the loss with respect to chosen inputs or
initializers. It is a graph-to-graph pass: the backward nodes are ordinary ONNX ops
appended to the forward graph, so any backend that runs the forward graph runs the
training graph too.

How it works
------------
1. **Shapes.** ONNX shape inference loses track of dimensions after ``Reshape(x, [-1, C])``
   and after broadcasting two symbolic dims, which would force every broadcast gradient
   into a runtime reduction. The symbolic shape engine (:mod:`graphc.ir.shapes`: dims are
   ints or monomials such as ``B*T``, small integer tensors such as ``Shape(tokens)`` are
   tracked by value) runs over the forward graph and over every backward node as it is
   emitted; it falls back to ONNX's inferred types for ops it does not know.
2. **Activity.** A value is *active* when it is floating point and depends on a ``wrt``
   through differentiable ops; it is *needed* when it is active and the loss depends on
   it. Only nodes with a needed output and an active input get a backward rule: unrelated
   branches, integer/boolean subgraphs (``Shape``, ``Range``, comparisons, masks) and
   ``Constant`` nodes are never differentiated.
3. **Reverse walk.** Nodes are visited in reverse topological order. Each needed value
   collects gradient contributions from its consumers; they are summed with a single
   ``Sum`` node (fan-in) just before its producer's rule runs. A rule
   (:mod:`~graphc.passes.autodiff.registry`) maps output gradients to input gradients.
4. **Output.** One output ``grad.<name>`` per ``wrt`` with exactly the primal's dtype and
   declared shape (zeros, with a warning, when the loss does not depend on it).
   Dead nodes are removed, constants added by the pass become ``Constant`` nodes (the
   model keeps its inputs and initializers unchanged), and ONNX shape inference and the
   full checker run on the result.

Two cheap rewrites happen while summing fan-in: a contribution that is a broadcast
(``Expand`` from a reduction's gradient) is summed unexpanded when another contribution
already has the full shape (``Sum`` broadcasts), and a scatter-add into zeros (the
gradient of ``Gather``) is re-pointed to scatter into the sum of the other contributions
instead (so GPT-2's tied ``wte`` gradient is one ``ScatterND`` into the LM-head gradient).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphc import OPSET
from graphc.errors import GraphcError
from graphc.ir.builder import GraphBuilder, infer, np_dtype
from graphc.ir.node import attr, subgraph_reads
from graphc.ir.shapes import Shapes, is_static
from graphc.passes.autodiff.registry import VJP, lookup

GRAD_PREFIX = "grad."
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def grad_name(name: str) -> str:
    """Name of the gradient output for parameter ``name``: ``grad.<name>``."""
    return GRAD_PREFIX + name


# ============================================================================ context
class GradContext:
    """What a VJP rule sees: the builder, shapes, and shared gradient helpers.

    ``ctx.b`` is a :class:`GraphBuilder` appending to the training graph. Values a rule
    creates get their shapes inferred as they are emitted (``ctx.shape(v)``).
    """

    def __init__(self, b: GraphBuilder, shapes: Shapes, needed: set[str]):
        self.b = b
        self.shapes = shapes
        self.needed = needed
        self._seen_nodes = len(b.nodes)
        self._seen_inits = len(b.initializers)
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in b.nodes for o in n.output if o}
        self.contribs: dict[str, list[str]] = {}
        self.grads: dict[str, str | None] = {}
        self.lazy: dict[str, str] = {}             # Expand output -> unexpanded source
        self.scatter_into_zeros: dict[str, onnx.NodeProto] = {}  # scatter-add output -> its node
        # ScatterElements-add into zeros: output -> (indices, updates, axis), a sparse gradient
        self.sparse: dict[str, tuple[str, str, int]] = {}
        self.node: onnx.NodeProto | None = None    # the forward node whose rule is running

    # ------------------------------------------------------------------ queries
    def _sync(self) -> None:
        inits = self.b.initializers
        while self._seen_inits < len(inits):
            t = inits[self._seen_inits]
            self.shapes.set_const(t.name, t)
            self._seen_inits += 1
        nodes = self.b.nodes
        while self._seen_nodes < len(nodes):
            node = nodes[self._seen_nodes]
            self.shapes.infer(node)
            self.producer.update((o, node) for o in node.output if o)
            self._seen_nodes += 1

    def shape(self, v: str) -> list | None:
        """Dims of ``v`` (ints and :class:`Sym`), or None when the rank is unknown."""
        self._sync()
        return self.shapes.shape.get(v)

    def rank(self, v: str) -> int | None:
        s = self.shape(v)
        return None if s is None else len(s)

    def static_shape(self, v: str) -> tuple[int, ...] | None:
        s = self.shape(v)
        return tuple(s) if is_static(s) else None

    def dtype(self, v: str) -> int:
        self._sync()
        return self.shapes.dtype.get(v, TensorProto.UNDEFINED)

    def np_dtype(self, v: str) -> np.dtype:
        return np_dtype(self.dtype(v))

    def is_float(self, v: str) -> bool:
        return self.dtype(v) in FLOAT_TYPES

    def needs(self, v: str) -> bool:
        """Whether input ``v`` of the current node wants a gradient."""
        return bool(v) and v in self.needed

    def const_value(self, v: str) -> np.ndarray | None:
        """The value of ``v`` if it is an initializer or a ``Constant`` output."""
        self._sync()
        return self.shapes.const_value(v) if v else None

    def int_values(self, v: str) -> list | None:
        """The content of a small integer tensor when statically known (dims may be Sym)."""
        self._sync()
        return self.shapes.value.get(v)

    attr = staticmethod(attr)

    def same_shape(self, a: str, b: str) -> bool:
        sa, sb = self.shape(a), self.shape(b)
        return (sa is not None and sb is not None and len(sa) == len(sb)
                and all(self.shapes.same(x, y) for x, y in zip(sa, sb)))

    # ------------------------------------------------------------------ constants
    def const(self, value, like: str, hint: str = "c") -> str:
        """A constant with the dtype of ``like``."""
        return self.b.const(np.asarray(value, dtype=self.np_dtype(like)), hint)

    def scalar(self, value: float, like: str) -> str:
        return self.const(np.array(value), like)

    def shape_tensor(self, v: str) -> str:
        """int64 [rank] shape of ``v``: a constant when static, else ``Shape(v)``."""
        s = self.static_shape(v)
        return self.b.i64(*s) if s is not None else self.b.Shape(v)

    def dim_tensor(self, v: str, axis: int) -> str:
        """int64 [1]: dimension ``axis`` of ``v``."""
        s = self.shape(v)
        if s is not None and isinstance(s[axis], int):
            return self.b.i64(s[axis])
        r = len(s) if s is not None else None
        a = axis + r if (axis < 0 and r is not None) else axis
        return self.b.Shape(v, start=a, end=a + 1 if a != -1 else None)

    def zeros(self, like: str) -> str:
        """Zeros with the shape and dtype of ``like``."""
        value = helper.make_tensor("value", self.dtype(like), [1], [0])
        return self.b.ConstantOfShape(self.shape_tensor(like), value=value, name="zeros")

    # ------------------------------------------------------------------ helpers
    def transpose(self, x: str, perm: Sequence[int], compose: bool = True) -> str:
        """Transpose, cancelling against a producing Transpose (``T(T(x)) == x``) or, with
        ``compose``, merging into one Transpose of the producer's input."""
        perm = list(perm)
        if perm == sorted(perm):
            return x
        prod = self._producer(x)
        if prod is not None and prod.op_type == "Transpose":
            inner = self.attr(prod, "perm")
            if inner is not None and len(inner) == len(perm):
                composed = [inner[p] for p in perm]    # transpose(transpose(s, inner), perm)
                if composed == list(range(len(perm))):
                    return prod.input[0]
                if compose:
                    return self.b.Transpose(prod.input[0], perm=composed)
        return self.b.Transpose(x, perm=perm)

    def swap_last(self, x: str) -> str:
        """``x`` with its last two axes swapped (a MatMul operand: kept a plain swap, which
        onnxruntime folds into the product as ``FusedMatMul(transA/transB)``)."""
        r = self.rank(x)
        if r is None:
            raise NotImplementedError(f"rank of {x!r} is unknown")
        return self.transpose(x, list(range(r - 2)) + [r - 1, r - 2], compose=False)

    def _producer(self, v: str) -> onnx.NodeProto | None:
        self._sync()
        return self.producer.get(v)

    def broadcast_to(self, g: str, like: str) -> str:
        """``g`` broadcast to the shape of ``like``.

        The ``Expand`` is remembered: if the value it feeds is summed with a contribution
        that already has the full shape, the unexpanded ``g`` is summed instead.
        """
        if self.same_shape(g, like):
            return g
        out = self.b.Expand(g, self.shape_tensor(like))
        self.lazy[out] = g
        return out

    def unexpanded(self, g: str, partner: str, out: str) -> str:
        """``g`` before a pending broadcast, when multiplying it by ``partner`` (which has
        the full shape of ``out``) broadcasts it anyway; else ``g`` itself."""
        src = self.lazy.get(g)
        return src if src is not None and self.same_shape(partner, out) else g

    def scatter_add(self, like: str, indices: str, updates: str) -> str:
        """``ScatterND(zeros_like(like), indices, updates, reduction="add")``.

        Duplicate indices accumulate. When this is summed with other gradients of the same
        value, the scatter is re-pointed to add into their sum instead of into zeros.
        """
        out = self.b.ScatterND(self.zeros(like), indices, updates, reduction="add", name="scatter_add")
        self.scatter_into_zeros[out] = self.b.nodes[-1]
        return out

    def scatter_elements_add(self, like: str, indices: str, updates: str, axis: int) -> str:
        """``ScatterElements(zeros_like(like), indices, updates, axis, reduction="add")``.

        Like :meth:`scatter_add`, and remembered as a *sparse* gradient: a consumer's rule
        may use ``ctx.sparse[out] == (indices, updates, axis)`` instead of the dense tensor
        (LogSoftmax does, which makes the cross-entropy gradient one scatter into
        ``-softmax * sum(g)`` with no zeros, no full-size reduction and no subtraction).
        """
        out = self.b.ScatterElements(self.zeros(like), indices, updates, axis=axis, reduction="add",
                                     name="scatter_add")
        self.scatter_into_zeros[out] = self.b.nodes[-1]
        self.sparse[out] = (indices, updates, axis)
        return out

    def sum(self, values: Sequence[str]) -> str:
        values = list(values)
        return values[0] if len(values) == 1 else self.b.Sum(*values)

    # ------------------------------------------------------------------ broadcasting
    def reduce_to_shape(self, grad: str, like: str) -> str:
        """Sum ``grad`` over the axes along which ``like`` was broadcast.

        ``grad`` has the (broadcast) shape of an op's output, ``like`` is one of its
        inputs. Leading axes (rank difference) and axes where ``like`` is statically 1
        are reduced with constant axes; a symbolic ``like`` dim that could be 1 or the
        full size is handled by splitting that axis of ``grad`` into
        ``(like_dim, grad_dim / like_dim)`` and reducing the second part (still constant
        axes, one ``Reshape``); with unknown ranks, axes are computed at run time.
        """
        gs, ls = self.shape(grad), self.shape(like)
        if gs is None or ls is None or len(gs) < len(ls):
            return self._reduce_dynamic(grad, like)
        k = len(gs) - len(ls)
        axes, uncertain = list(range(k)), []
        for i, ld in enumerate(ls):
            gd = gs[k + i]
            if self.shapes.same(ld, gd):
                continue
            if ld == 1:
                axes.append(k + i)
            elif isinstance(ld, int) or gd == 1:
                continue  # a static dim > 1 is never broadcast; a 1 in grad means like is 1 too
            else:
                uncertain.append(k + i)
        b = self.b
        if not axes and not uncertain:
            return grad
        if not uncertain:
            if all(a < k for a in axes):
                return b.ReduceSum(grad, b.i64(*axes), keepdims=0)
            r = b.ReduceSum(grad, b.i64(*axes), keepdims=1)
            return b.Squeeze(r, b.i64(*range(k))) if k else r
        pieces, red = [], []
        for j in range(len(gs)):
            if j in uncertain:
                ld = self.dim_tensor(like, j - k)
                pieces += [ld, b.Div(self.dim_tensor(grad, j), ld)]
                red.append(len(pieces) - 1)
            else:
                pieces.append(self.dim_tensor(grad, j))
                if j in axes:
                    red.append(len(pieces) - 1)
        split = b.Reshape(grad, b.Concat(*pieces, axis=0))
        return b.Reshape(b.ReduceSum(split, b.i64(*red), keepdims=0), self.shape_tensor(like))

    def _reduce_dynamic(self, grad: str, like: str) -> str:
        b = self.b
        sg, sl = b.Shape(grad), b.Shape(like)
        k = b.Sub(b.Shape(sg), b.Shape(sl))
        ones = b.ConstantOfShape(k, value=helper.make_tensor("value", TensorProto.INT64, [1], [1]))
        padded = b.Concat(ones, sl, axis=0)
        rank = b.Squeeze(b.Shape(sg), b.i64(0))
        idx = b.Range(b.const(np.array(0, np.int64)), rank, b.const(np.array(1, np.int64)))
        axes = b.Compress(idx, b.Equal(padded, b.i64(1)))
        red = b.ReduceSum(grad, axes, keepdims=1, noop_with_empty_axes=1)
        return b.Reshape(red, sl)

    # ------------------------------------------------------------------ fan-in
    def grad_of(self, v: str) -> str | None:
        """The total gradient of ``v``: its contributions summed (once)."""
        if v in self.grads:
            return self.grads[v]
        cs = self.contribs.get(v, [])
        if not cs:
            g = None
        elif len(cs) == 1:
            g = cs[0]
        else:
            g = self._accumulate(v, cs)
        self.grads[v] = g
        return g

    def _accumulate(self, v: str, cs: list[str]) -> str:
        full = [c for c in cs if c not in self.lazy and self.same_shape(c, v)]
        if full:
            cs = [self.lazy.get(c, c) for c in cs]
        scatters = [c for c in cs if c in self.scatter_into_zeros]
        others = [c for c in cs if c not in self.scatter_into_zeros]
        if scatters and others and any(self.same_shape(c, v) for c in others):
            base = self.sum(others)
            self._sync()   # every node is processed before nodes move in the list
            for sc in scatters:
                node = self.scatter_into_zeros.pop(sc)
                self.sparse.pop(sc, None)
                node.input[0] = base
                self.b.nodes.remove(node)        # move it after the nodes computing base
                self.b.nodes.append(node)
                base = sc
            return base
        return self.b.Sum(*cs, name="grad_sum")


# ============================================================================ the pass
def _no_gradient(node: onnx.NodeProto) -> bool:
    rule = VJP.get((node.domain or "", node.op_type))
    return bool(getattr(rule, "no_gradient", False))


def _default_opset(model: onnx.ModelProto) -> int | None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return None


def _to_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    version = _default_opset(model)
    if version == OPSET or version is None:
        return model
    if version > OPSET:
        raise GraphcError(None, f"model uses opset {version}; graphc supports up to {OPSET}", "opset")
    try:
        from onnx import version_converter

        return version_converter.convert_version(model, OPSET)
    except Exception as e:  # noqa: BLE001
        raise GraphcError(None, f"cannot convert the model from opset {version} to {OPSET}: {e}", "opset") from None


def _topo_check(graph: onnx.GraphProto) -> None:
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        for i in node.input:
            if i not in known:
                raise GraphcError(None, f"node {node.name or node.op_type!r} uses {i!r} before it is defined "
                                        "(the graph is not topologically sorted)", "graph")
        known.update(node.output)


def _value_info(name: str, elem: int, dims) -> onnx.ValueInfoProto:
    if dims is None:
        return helper.make_tensor_value_info(name, elem, None)
    shape = [d if isinstance(d, int) else (d.names[0] if d.coef == 1 and len(d.names) == 1
                                            and not d.names[0].startswith("?") else None) for d in dims]
    return helper.make_tensor_value_info(name, elem, shape)


def differentiate(model: onnx.ModelProto, loss: str, wrt: Sequence[str], keep_outputs: bool = True) -> onnx.ModelProto:
    """The training model: forward + backward, with ``grad.<w>`` outputs for ``w`` in ``wrt``.

    The result has the same inputs and initializers as ``model``; its outputs are the
    loss, the original outputs (when ``keep_outputs``), then one gradient per ``wrt`` in
    order, each with its primal's dtype and shape. Raises :class:`GraphcError` for a bad
    loss or wrt name and ``NotImplementedError`` (naming the node) for an op on the path
    from a ``wrt`` to the loss that has no rule.
    """
    wrt = list(wrt)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m = _to_opset(m)
    _topo_check(m.graph)
    m = _inline_if_needed(m, loss, wrt)
    graph = m.graph

    shapes = Shapes.of_model(m)

    produced = {o for n in graph.node for o in n.output if o}
    input_names = [i.name for i in graph.input]
    init_names = {t.name for t in graph.initializer}
    all_values = set(input_names) | init_names | produced
    _check_loss(shapes, loss, all_values)
    _check_wrt(shapes, wrt, set(input_names) | init_names, all_values)

    # ---- activity: forward from wrt, backward from loss
    def is_float(v: str) -> bool:
        return shapes.dtype.get(v, TensorProto.UNDEFINED) in FLOAT_TYPES | {TensorProto.UNDEFINED}

    active = set(wrt)
    for node in graph.node:
        if not _no_gradient(node) and any(i in active for i in node.input if i):
            active.update(o for o in node.output if o and is_float(o))
    needed = {loss} if loss in active else set()
    path: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if _no_gradient(node) or not any(o in needed for o in node.output if o):
            continue
        ins = [i for i in node.input if i in active]
        if ins:
            path.append(node)
            needed.update(ins)
    rules = [lookup(node) for node in path]  # fail before emitting anything

    # ---- reverse walk
    b = GraphBuilder.wrap(graph, opset=OPSET)
    b.functions = {(f.domain, f.name): f for f in m.functions}
    b.reserve(grad_name(w) for w in wrt)
    n_forward = len(b.nodes)
    ctx = GradContext(b, shapes, needed)
    if loss in needed:
        ones = np.ones([d if isinstance(d, int) else 1 for d in (shapes.shape.get(loss) or [])],
                       dtype=np_dtype(shapes.dtype[loss]))
        seed = b.const(ones, "grad_seed")
        if not is_static(shapes.shape.get(loss)):
            seed = b.Expand(seed, b.Shape(loss), name="grad_seed")
        ctx.contribs[loss] = [seed]
    for node, rule in zip(path, rules):
        grads = [ctx.grad_of(o) if o in needed else None for o in node.output]
        if all(g is None for g in grads):
            continue
        ctx.node = node
        with b.scope(f"grad/{node.name or node.op_type}"):
            result = rule(ctx, node, grads)
        if len(result) > len(node.input):
            raise RuntimeError(f"rule for {node.op_type} returned {len(result)} gradients for {len(node.input)} inputs")
        for inp, g in zip(node.input, result):
            if g is None or not inp or inp not in needed:
                continue
            _check_grad_shape(ctx, node, inp, g)
            ctx.contribs.setdefault(inp, []).append(g)
    ctx.node = None

    # ---- gradient outputs
    outputs: list[onnx.ValueInfoProto] = []
    orig_outputs = {o.name: o for o in graph.output}
    outputs.append(orig_outputs.get(loss) or _value_info(loss, shapes.dtype[loss], shapes.shape.get(loss)))
    if keep_outputs:
        outputs += [o for o in graph.output if o.name != loss]
    inputs_by_name = {i.name: i for i in graph.input}
    inits_by_name = {t.name: t for t in graph.initializer}
    backward_out = {o: n for n in b.nodes[n_forward:] for o in n.output}
    output_names = {o.name for o in outputs}
    renamed: dict[str, str] = {}
    consumed_values = {i for n in b.nodes for i in n.input}
    for w in wrt:
        name = grad_name(w)
        g = ctx.grad_of(w) if w in needed else None
        if g is None:
            warnings.warn(f"the loss {loss!r} does not depend on {w!r}; its gradient is zero", stacklevel=2)
            value = helper.make_tensor("value", shapes.dtype[w], [1], [0])
            b.ConstantOfShape(ctx.shape_tensor(w), value=value, outputs=[name], name=f"{name}.zeros")
        else:
            g = renamed.get(g, g)
            producer = backward_out.get(g)
            if producer is not None and g not in consumed_values and g not in output_names:
                # the last backward node writes the output directly (no copy)
                producer.output[list(producer.output).index(g)] = name
                del backward_out[g]
                renamed[g] = name
            else:
                b.Identity(g, outputs=[name], name=name)
                consumed_values.add(g)
        output_names.add(name)
        if w in inputs_by_name:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(inputs_by_name[w])
            vi.name = name
            vi.ClearField("doc_string")
        else:
            t = inits_by_name[w]
            vi = helper.make_tensor_value_info(name, t.data_type, list(t.dims))
        outputs.append(vi)

    return _assemble(m, b, outputs, n_forward)


def _check_grad_shape(ctx: GradContext, node, inp: str, g: str) -> None:
    gs, ps = ctx.shape(g), ctx.shape(inp)
    if gs is None or ps is None:
        return
    if len(gs) != len(ps) or any(isinstance(a, int) and isinstance(c, int) and a != c for a, c in zip(gs, ps)):
        raise RuntimeError(f"gradient rule for {node.op_type} (node {node.name!r}) produced a gradient of shape "
                           f"{gs} for input {inp!r} of shape {ps}")
    if ctx.dtype(g) and ctx.dtype(inp) and ctx.dtype(g) != ctx.dtype(inp):
        raise RuntimeError(f"gradient rule for {node.op_type} (node {node.name!r}) produced a "
                           f"{helper.tensor_dtype_to_np_dtype(ctx.dtype(g))} gradient for {inp!r}")


def _dtype_name(dt: int) -> str:
    return TensorProto.DataType.Name(dt) if dt else "of unknown type"


def _check_loss(shapes: Shapes, loss: str, values: set[str]) -> None:
    if loss not in values:
        raise GraphcError(None, f"{loss!r} is not a value of the graph", "loss")
    dt = shapes.dtype.get(loss, TensorProto.UNDEFINED)
    if dt not in FLOAT_TYPES:
        raise GraphcError(None, f"{loss!r} is {_dtype_name(dt)}, expected a floating-point scalar",
                          "loss")
    s = shapes.shape.get(loss)
    if s is not None and (any(isinstance(d, int) and d != 1 for d in s)):
        raise GraphcError(None, f"{loss!r} has shape {s}, expected a scalar (or a 1-element tensor)", "loss")


def _check_wrt(shapes: Shapes, wrt: list[str], leaves: set[str], values: set[str]) -> None:
    seen = set()
    for w in wrt:
        if w in seen:
            raise GraphcError(None, f"{w!r} is listed twice", "wrt")
        seen.add(w)
        if w not in leaves:
            what = "an intermediate value" if w in values else "not a value of the graph"
            raise GraphcError(None, f"{w!r} is {what}; expected a graph input or initializer", "wrt")
        dt = shapes.dtype.get(w, TensorProto.UNDEFINED)
        if dt not in FLOAT_TYPES:
            raise GraphcError(None, f"{w!r} is {_dtype_name(dt)}, not floating point", "wrt")
        if grad_name(w) in values:
            raise GraphcError(None, f"the graph already has a value named {grad_name(w)!r}", "wrt")


def _inline_if_needed(m: onnx.ModelProto, loss: str, wrt: list[str]) -> onnx.ModelProto:
    """Inline local functions (e.g. fused ops) that have no gradient rule of their own."""
    local = {(f.domain, f.name) for f in m.functions}
    missing = {(n.domain or "", n.op_type) for n in m.graph.node
               if (n.domain or "", n.op_type) in local and (n.domain or "", n.op_type) not in VJP}
    if not missing:
        return m
    from onnx import inliner

    return inliner.inline_selected_functions(m, sorted(missing), exclude=False)


def _assemble(m: onnx.ModelProto, b: GraphBuilder, outputs: list[onnx.ValueInfoProto], n_forward: int) -> onnx.ModelProto:
    graph = m.graph
    n_inits = len(graph.initializer)
    new_consts = {t.name: t for t in b.initializers[n_inits:]}

    # dead-code elimination from the outputs
    live = {o.name for o in outputs}
    kept = []
    for node in reversed(b.nodes):
        if any(o in live for o in node.output if o):
            kept.append(node)
            live.update(i for i in node.input if i)
            live |= subgraph_reads(node)
    kept.reverse()

    const_nodes = [helper.make_node("Constant", [], [name], name=b.fresh_node(f"{name}_const"), value=t)
                   for name, t in new_consts.items() if name in live]
    nodes = const_nodes + kept
    value_info = [vi for vi in graph.value_info if vi.name in live and vi.name not in {o.name for o in outputs}]
    new_graph = helper.make_graph(nodes, graph.name, list(graph.input), outputs, list(graph.initializer),
                                  doc_string=graph.doc_string, value_info=value_info)
    out = onnx.ModelProto()
    out.CopyFrom(m)
    out.graph.CopyFrom(new_graph)
    if not any(o.domain in ("", "ai.onnx") for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("", OPSET))
    # local functions a rule added (fused backward ops), and their domains' opsets
    have = {(f.domain, f.name) for f in out.functions}
    used = {(n.domain or "", n.op_type) for n in nodes}
    for key, fn in b.functions.items():
        if key not in have and key in used:
            out.functions.append(fn)
    domains = {o.domain for o in out.opset_import}
    for domain, version in sorted(b.extra_opsets.items()):
        if domain not in domains and any(n.domain == domain for n in nodes):
            out.opset_import.append(helper.make_opsetid(domain, version))
    try:
        return infer(out)
    except onnx.shape_inference.InferenceError:
        # ONNX's data propagation can trip over small 1-D float tensors it mistakes for
        # shapes; plain strict inference (what the full checker runs) is what matters.
        return onnx.shape_inference.infer_shapes(out, strict_mode=True)
