"""Symbolic shapes of ONNX values: one small shape rule per op, in a table.

ONNX shape inference loses track of dimensions after ``Reshape(x, [-1, C])`` and after
broadcasting two symbolic dims, and it cannot say that ``B*T / T == B``. graphc's passes
need those facts (the autodiff driver to know which gradients need a broadcast reduction,
the memory planner to size every value, the fusions to compare dims), so
:class:`Shapes` propagates its own:

* a dim is an ``int`` or a :class:`Sym`, a monomial such as ``B*T`` or ``3*?4``;
* small integer tensors (``Shape(tokens)``, axes, starts/ends) are tracked by *value*,
  element by element, so a ``Reshape`` to ``Concat(Shape(x)[:1], [-1])`` is understood;
* :data:`SHAPE_RULES` maps ``(domain, op_type)`` to a rule ``rule(shapes, n)`` that
  fills ``n.outs`` / ``n.dts`` / ``n.vals`` (shape, dtype and value of each output) from
  ``n.S`` / ``n.V`` / ``n.A`` (input shapes, input values, attributes). Rules are grouped
  by family below; graphc's fused ops (Attention, LayerNormalization, Gelu and the
  ``graphc.*`` local functions) register theirs from their definitions in
  :mod:`graphc.ops`;
* an op without a rule (or one whose rule fails on odd input) gets unknown outputs;
  :meth:`Shapes.infer` can then fall back to ONNX's inferred types
  (:func:`inferred_types`), and merges them in wherever they know more.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphc.ir.node import attrs, axis_index, constant_value
from graphc.ir.table import add_unique

INT_TYPES = {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8,
             TensorProto.UINT64, TensorProto.UINT32, TensorProto.UINT16, TensorProto.UINT8}
STANDARD_DOMAINS = ("", "ai.onnx")


# ============================================================================ symbolic dims
@dataclass(frozen=True)
class Sym:
    """A symbolic dimension: ``coef`` times a product of named symbols (``B*T``, ``3*?4``).

    Names come from ``dim_param`` of graph inputs (``B``), from ONNX inference
    (``unk__3``) or are fresh (``?7``) for a dimension nothing is known about. Two dims are
    proven equal when their monomials are equal.
    """

    coef: int
    names: tuple[str, ...]

    def __repr__(self) -> str:
        return "*".join(([str(self.coef)] if self.coef != 1 else []) + list(self.names))


Dim = int | Sym


def _mono(d: Dim) -> tuple[int, tuple[str, ...]]:
    return (d, ()) if isinstance(d, int) else (d.coef, d.names)


def _make(coef: int, names) -> Dim:
    return coef if not names or coef == 0 else Sym(coef, tuple(sorted(names)))


def dim_mul(a: Dim | None, b: Dim | None) -> Dim | None:
    if a is None or b is None:
        return None
    (ca, na), (cb, nb) = _mono(a), _mono(b)
    return _make(ca * cb, na + nb)


def dim_div(a: Dim | None, b: Dim | None) -> Dim | None:
    """``a / b`` when it is exact as monomials, else None."""
    if a is None or b is None:
        return None
    (ca, na), (cb, nb) = _mono(a), _mono(b)
    if cb == 0 or ca % cb:
        return None
    rest = list(na)
    for n in nb:
        if n not in rest:
            return None
        rest.remove(n)
    return _make(ca // cb, rest)


def dim_add(a: Dim | None, b: Dim | None) -> Dim | None:
    if a is None or b is None:
        return None
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    if a == 0:
        return b
    if b == 0:
        return a
    return None


def dim_prod(dims) -> Dim | None:
    out: Dim | None = 1
    for d in dims:
        out = dim_mul(out, d)
    return out


def is_static(dims) -> bool:
    return dims is not None and all(isinstance(d, int) for d in dims)


# ============================================================================ the engine
class Shapes:
    """Symbolic shapes, dtypes and small integer values of graph values.

    ``shape[v]`` is a list of dims (``int`` or :class:`Sym`) or None when even the rank is
    unknown; ``value[v]`` is the flattened content of a small integer tensor (shape
    vectors, axes, starts/ends) whose elements are dims or None where unknown;
    ``const[v]`` is the numpy value of an initializer or ``Constant`` output.
    """

    def __init__(self):
        self.shape: dict[str, list | None] = {}
        self.dtype: dict[str, int] = {}
        self.value: dict[str, list] = {}
        self.const: dict[str, object] = {}
        self.fallback: dict[str, onnx.TypeProto] = {}
        # Sym c -> (E, D): c is the length of a slice [0:E] of an axis of static length D.
        self.min_of: dict[Sym, tuple[Dim, int]] = {}
        self._fresh = itertools.count()

    # ------------------------------------------------------------------ dims
    def fresh(self) -> Sym:
        return Sym(1, (f"?{next(self._fresh)}",))

    def same(self, a: Dim | None, b: Dim | None) -> bool:
        """Are dims ``a`` and ``b`` equal whenever the forward graph runs?

        Besides equal monomials, ``E`` and ``len(x[0:E])`` for an axis of static length
        ``D >= 2`` are the same: they differ only when ``E > D``, and then the slice (of
        length ``D``, neither 1 nor ``E``) cannot broadcast against anything of length ``E``.
        That is how GPT-2's ``wpe[:T] + wte[tokens]`` is known to need no reduction.
        """
        if a is None or b is None:
            return False
        if a == b:
            return True
        for x, y in ((a, b), (b, a)):
            m = self.min_of.get(y) if isinstance(y, Sym) else None
            if m is not None and m[0] == x and m[1] >= 2:
                return True
        return False

    def dims_from_type(self, tp: onnx.TypeProto) -> tuple[int, list | None]:
        if not tp.HasField("tensor_type"):
            return TensorProto.UNDEFINED, None
        tt = tp.tensor_type
        if not tt.HasField("shape"):
            return tt.elem_type, None
        dims = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.dim_param:
                dims.append(Sym(1, (d.dim_param,)))
            else:
                dims.append(self.fresh())
        return tt.elem_type, dims

    def set_type(self, name: str, tp: onnx.TypeProto) -> None:
        self.dtype[name], self.shape[name] = self.dims_from_type(tp)

    def set_const(self, name: str, arr) -> None:
        """Record an initializer (TensorProto) or constant (numpy array)."""
        if isinstance(arr, onnx.TensorProto):
            self.dtype[name] = arr.data_type
            self.shape[name] = [int(d) for d in arr.dims]
            size = int(np.prod(arr.dims)) if arr.dims else 1
            self.const[name] = arr
            if arr.data_type in INT_TYPES and size <= 64 and arr.data_location != TensorProto.EXTERNAL:
                self.value[name] = [int(v) for v in numpy_helper.to_array(arr).ravel()]
        else:
            arr = np.asarray(arr)
            self.dtype[name] = helper.np_dtype_to_tensor_dtype(arr.dtype)
            self.shape[name] = list(arr.shape)
            self.const[name] = arr
            if arr.dtype.kind in "iu" and arr.size <= 64:
                self.value[name] = [int(v) for v in arr.ravel()]

    def const_value(self, name: str) -> np.ndarray | None:
        c = self.const.get(name)
        if isinstance(c, onnx.TensorProto):
            if c.data_location == TensorProto.EXTERNAL:
                return None
            c = numpy_helper.to_array(c)
            self.const[name] = c
        return c

    # ------------------------------------------------------------------ rules
    def bcast(self, shapes: list) -> list | None:
        if any(s is None for s in shapes):
            return None
        rank = max((len(s) for s in shapes), default=0)
        out = []
        for i in range(rank):
            col = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
            ds = [d for d in col if d != 1]
            uniq: list = []
            for d in ds:
                if not any(self.same(d, u) for u in uniq):
                    uniq.append(d)
                elif isinstance(d, int) or (isinstance(d, Sym) and d not in self.min_of):
                    # prefer the more informative representative of an equal pair
                    uniq = [d if self.same(d, u) else u for u in uniq]
            if not uniq:
                out.append(1)
            elif len(uniq) == 1:
                out.append(uniq[0])
            else:
                ints = [d for d in uniq if isinstance(d, int)]
                out.append(ints[0] if ints else self.fresh())
        return out

    def _axes(self, node, A, V, rank, index=1):
        """Axes from input ``index`` (or the ``axes`` attribute); None if not constant,
        [] if absent."""
        if len(node.input) > index and node.input[index]:
            v = V[index]
            if v is None or any(not isinstance(a, int) for a in v):
                return None
            axes = v
        elif "axes" in A:
            axes = list(A["axes"])
        else:
            return []
        return [axis_index(a, rank) for a in axes]

    def _dims_or_fresh(self, v: list | None, n: int | None = None) -> list | None:
        if v is None:
            return None if n is None else [self.fresh() for _ in range(n)]
        return [d if d is not None else self.fresh() for d in v]

    @classmethod
    def of_model(cls, model: onnx.ModelProto, bind: Mapping[str, int] | None = None,
                 fallback: Mapping[str, onnx.TypeProto] | None = None) -> "Shapes":
        """The shapes of every value of ``model``'s graph, ONNX's types merged in.

        ``bind`` gives symbolic input dims a value (``{"B": 4, "T": 64}``); ``fallback``
        are the types to merge (default: ONNX shape inference of the (bound) model).
        """
        if bind:
            model = bind_dims(model, bind)
        shapes = cls()
        shapes.fallback = dict(fallback) if fallback is not None else inferred_types(model)
        graph = model.graph
        for vi in graph.input:
            shapes.set_type(vi.name, vi.type)
        for t in graph.initializer:
            shapes.set_const(t.name, t)
        for node in graph.node:
            shapes.infer(node, use_fallback=True)
        return shapes

    def infer(self, node: onnx.NodeProto, use_fallback: bool = False) -> None:
        """Set shape, dtype and value of every output of ``node`` (its rule, then the
        fallback types when ``use_fallback``)."""
        n = NodeFacts(self, node)
        standard = node.domain in STANDARD_DOMAINS
        if standard and node.op_type in OUTPUT_DTYPE:
            n.dts[0] = OUTPUT_DTYPE[node.op_type]
        rule = shape_rule_for(node.domain, node.op_type)
        if rule is not None:
            try:
                rule(self, n)
            except (IndexError, KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError):
                n.reset()
        first = next((self.dtype.get(i) for i in node.input if i and self.dtype.get(i)), TensorProto.UNDEFINED)
        for k, o in enumerate(node.output):
            if not o:
                continue
            shape, dt = n.outs[k], n.dts[k]
            if dt is None and standard and node.op_type not in ("If", "Loop", "Scan"):
                dt = first
            if use_fallback and o in self.fallback:
                fdt, fdims = self.dims_from_type(self.fallback[o])
                if fdt:
                    dt = fdt
                shape = self._merge(shape, fdims)
            self.shape[o] = shape
            self.dtype[o] = dt or TensorProto.UNDEFINED
            if n.vals[k] is not None and len(n.vals[k]) <= 64:
                self.value[o] = n.vals[k]

    def _merge(self, mine, theirs):
        if mine is None:
            return theirs
        if theirs is None or len(theirs) != len(mine):
            return mine
        out = []
        for m, t in zip(mine, theirs):
            if isinstance(t, int) and not isinstance(m, int):
                out.append(t)
            elif (isinstance(m, Sym) and len(m.names) == 1 and m.coef == 1 and m.names[0].startswith("?")
                  and m not in self.min_of and isinstance(t, Sym) and not t.names[0].startswith("?")):
                out.append(t)
            else:
                out.append(m)
        return out

    def _concat_dims(self, S, a, out):
        # the non-concatenated dims of a Concat are equal across inputs; keep the best known
        for s in S:
            for i, d in enumerate(s):
                if i != a and isinstance(d, int):
                    out[i] = d
        return out

    def _arith(self, op, a, b):
        if len(a) != len(b):
            if len(a) == 1:
                a = a * len(b)
            elif len(b) == 1:
                b = b * len(a)
            else:
                return None
        out = []
        for x, y in zip(a, b):
            if x is None or y is None:
                out.append(None)
            elif isinstance(x, int) and isinstance(y, int):
                if op == "Add":
                    out.append(x + y)
                elif op == "Sub":
                    out.append(x - y)
                elif op == "Mul":
                    out.append(x * y)
                elif op == "Div":
                    out.append(int(x / y) if y else None)
                elif op == "Max":
                    out.append(max(x, y))
                else:
                    out.append(min(x, y))
            elif op == "Add":
                out.append(dim_add(x, y))
            elif op == "Sub":
                out.append(x if y == 0 else (0 if x == y else None))
            elif op == "Mul":
                out.append(dim_mul(x, y))
            elif op == "Div":
                out.append(dim_div(x, y))
            else:
                out.append(x if x == y else None)
        return out

    def _slice(self, node, S, V):
        x = S[0]
        if x is None:
            return None, None
        r = len(x)
        starts, ends = V[1], V[2]
        n = len(starts) if starts is not None else (len(ends) if ends is not None else None)
        if n is None:
            return [self.fresh() for _ in x], None
        axes = V[3] if len(node.input) > 3 and node.input[3] else list(range(n))
        steps = V[4] if len(node.input) > 4 and node.input[4] else [1] * n
        if axes is None or any(not isinstance(a, int) for a in axes):
            return [self.fresh() for _ in x], None
        out = list(x)
        val = None
        for j, a in enumerate(axes):
            a = axis_index(a, r)
            d = x[a]
            s = starts[j] if starts is not None else None
            e = ends[j] if ends is not None else None
            st = steps[j] if steps is not None else None
            if isinstance(d, int) and all(isinstance(t, int) for t in (s, e, st)) and st != 0:
                out[a] = len(range(*slice(s, e, st).indices(d)))
            elif s == 0 and st == 1 and isinstance(e, int) and e >= 2**62:
                out[a] = d
            elif s == 0 and st == 1 and e is not None and self.same(e, d):
                out[a] = d
            elif s == 0 and st == 1 and isinstance(e, Sym) and isinstance(d, int) and d >= 2:
                c = self.fresh()
                self.min_of[c] = (e, d)
                out[a] = c
            else:
                out[a] = self.fresh()
        if V[0] is not None and r == 1 and starts is not None and ends is not None and steps is not None:
            s, e, st = starts[0], ends[0], steps[0]
            if all(isinstance(t, int) for t in (s, e, st)) and st != 0:
                val = V[0][slice(s, e, st)]
        return out, val


# ============================================================================ the rule table
class NodeFacts:
    """One node under inference: what is known of its inputs, and its output slots.

    ``S[i]`` / ``V[i]``: shape and value of input i (None when unknown or absent);
    ``A``: attributes by name; a rule sets ``outs[k]`` (dims), ``dts[k]`` (element type;
    None = that of the first typed input, for standard ops) and ``vals[k]`` (the content
    of a small integer output).
    """

    def __init__(self, shapes: "Shapes", node: onnx.NodeProto):
        self.node = node
        self.op = node.op_type
        self.ins = list(node.input)
        self.S = [shapes.shape.get(i) if i else None for i in self.ins]
        self.V = [shapes.value.get(i) if i else None for i in self.ins]
        self.A = attrs(node)
        self.reset()

    def reset(self) -> None:
        k = len(self.node.output)
        self.outs: list = [None] * k
        self.dts: list = [None] * k
        self.vals: list = [None] * k

    @property
    def x(self):
        """The shape of the first input."""
        return self.S[0] if self.S else None


ShapeRule = Callable[["Shapes", NodeFacts], None]
SHAPE_RULES: dict[tuple[str, str], ShapeRule] = {}


def shape_rule(*op_types: str, domain: str = "") -> Callable[[ShapeRule], ShapeRule]:
    """Register a rule for one or more op types; a second rule for an op is an error."""

    def register(rule: ShapeRule) -> ShapeRule:
        for op_type in op_types:
            add_unique(SHAPE_RULES, (domain, op_type), rule, "a shape rule")
        return rule

    return register


def shape_rule_for(domain: str, op_type: str) -> ShapeRule | None:
    """The rule of an op, or None. graphc's fused ops register theirs in :mod:`graphc.ops`,
    imported here on first use (graphc.ops builds on this module, not the reverse)."""
    import graphc.ops  # noqa: F401 - registers the fused ops' shape rules

    return SHAPE_RULES.get(("" if domain in STANDARD_DOMAINS else domain, op_type))


SAME_SHAPE = {
    "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Tanh", "Erf", "Relu", "Sigmoid",
    "Sign", "Floor", "Ceil", "Round", "Softmax", "LogSoftmax", "Not", "IsNaN", "IsInf",
    "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "LeakyRelu",
    "Elu", "Selu", "Celu", "Softplus", "Softsign", "HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu",
    "Shrink", "Clip", "Trilu", "CumSum", "LpNormalization", "Hardmax", "BitwiseNot",
}
ARITHMETIC = {"Add", "Sub", "Mul", "Div", "Max", "Min"}   # also computed on small integer values
BROADCAST = {
    "Pow", "Sum", "Mean", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "And", "Or", "Xor", "PRelu", "Mod", "BitShift", "BitwiseAnd", "BitwiseOr",
    "BitwiseXor",
}
REDUCE = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
# element types fixed by the op (standard domain), set before its rule runs
OUTPUT_DTYPE = {
    **dict.fromkeys(["Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Not",
                     "IsNaN", "IsInf"], TensorProto.BOOL),
    **dict.fromkeys(["Shape", "Size", "NonZero", "ArgMax", "ArgMin"], TensorProto.INT64),
}


# ---------------------------------------------------------------- elementwise
@shape_rule(*SAME_SHAPE)
def same_shape(s: "Shapes", n: NodeFacts) -> None:
    """Output 0 has the shape of input 0 (elementwise unary ops, softmax, ...)."""
    n.outs[0] = n.x
    if n.op == "Neg" and n.V[0] is not None and all(isinstance(d, int) for d in n.V[0]):
        n.vals[0] = [-d for d in n.V[0]]


@shape_rule("Identity")
def _identity(s, n):
    n.outs[0], n.vals[0] = n.x, n.V[0]


@shape_rule("Cast")
def _cast(s, n):
    n.outs[0], n.dts[0], n.vals[0] = n.x, n.A["to"], n.V[0]


@shape_rule("CastLike")
def _cast_like(s, n):
    n.outs[0], n.dts[0], n.vals[0] = n.x, s.dtype.get(n.ins[1]), n.V[0]


@shape_rule("Dropout")
def _dropout(s, n):
    n.outs[0] = n.x
    if len(n.outs) > 1:
        n.outs[1], n.dts[1] = n.x, TensorProto.BOOL


@shape_rule(*BROADCAST)
def _broadcast(s, n):
    n.outs[0] = s.bcast(n.S)


@shape_rule(*ARITHMETIC)
def _arithmetic(s, n):
    n.outs[0] = s.bcast(n.S)
    if n.V[0] is not None and n.V[1] is not None:
        n.vals[0] = s._arith(n.op, n.V[0], n.V[1])


@shape_rule("Where")
def _where(s, n):
    n.outs[0], n.dts[0] = s.bcast(n.S[:3]), s.dtype.get(n.ins[1])


# ---------------------------------------------------------------- reductions
@shape_rule(*REDUCE)
def _reduce(s, n):
    x = n.x
    if x is not None:
        keep = n.A.get("keepdims", 1)
        axes = s._axes(n.node, n.A, n.V, len(x))
        if axes is None:
            n.outs[0] = [s.fresh() for _ in x] if keep else None
        elif not axes:
            n.outs[0] = x if n.A.get("noop_with_empty_axes", 0) else ([1] * len(x) if keep else [])
        else:
            n.outs[0] = [1 if i in axes else d for i, d in enumerate(x) if keep or i not in axes]


@shape_rule("ArgMax", "ArgMin")
def _arg_reduce(s, n):
    x = n.x
    if x is not None:
        a = n.A.get("axis", 0) % max(len(x), 1)
        n.outs[0] = [1 if i == a else d for i, d in enumerate(x) if n.A.get("keepdims", 1) or i != a]


# ---------------------------------------------------------------- matrix products
@shape_rule("MatMul")
def _matmul(s, n):
    a, b = n.S[0], n.S[1]
    if a is not None and b is not None:
        if len(a) == 1 and len(b) == 1:
            n.outs[0] = []
        else:
            a2 = [1] + a if len(a) == 1 else a
            b2 = b + [1] if len(b) == 1 else b
            out = s.bcast([a2[:-2], b2[:-2]]) + [a2[-2], b2[-1]]
            if len(b) == 1:
                out.pop(-1)
            if len(a) == 1:
                out.pop(-2 if len(b) != 1 else -1)
            n.outs[0] = out


@shape_rule("Gemm")
def _gemm(s, n):
    a, b = n.S[0], n.S[1]
    if a is not None and b is not None:
        n.outs[0] = [a[1] if n.A.get("transA", 0) else a[0], b[0] if n.A.get("transB", 0) else b[1]]


# ---------------------------------------------------------------- layout
@shape_rule("Transpose")
def _transpose(s, n):
    x = n.x
    if x is not None:
        perm = n.A.get("perm", list(range(len(x)))[::-1])
        n.outs[0] = [x[p] for p in perm]


@shape_rule("Reshape")
def _reshape(s, n):
    x, t = n.x, n.V[1]
    if t is None:
        s1 = n.S[1]
        n.outs[0] = [s.fresh() for _ in range(s1[0])] if is_static(s1) and len(s1) == 1 else None
    else:
        allowzero = n.A.get("allowzero", 0)
        out, neg = [], None
        for i, d in enumerate(t):
            if d is None:
                out.append(s.fresh())
            elif d == 0 and not allowzero:
                out.append(x[i] if x is not None and i < len(x) else s.fresh())
            elif d == -1:
                neg = i
                out.append(None)
            else:
                out.append(d)
        if neg is not None:
            total = dim_prod(x) if x is not None else None
            known = dim_prod(d for i, d in enumerate(out) if i != neg)
            q = dim_div(total, known)
            out[neg] = q if q is not None else s.fresh()
        n.outs[0] = out
    n.vals[0] = n.V[0]


@shape_rule("Flatten")
def _flatten(s, n):
    x = n.x
    if x is not None:
        a = axis_index(n.A.get("axis", 1), len(x))
        n.outs[0] = [dim_prod(x[:a]), dim_prod(x[a:])]


@shape_rule("Squeeze")
def _squeeze(s, n):
    x = n.x
    if x is not None:
        axes = s._axes(n.node, n.A, n.V, len(x))
        if axes is None:
            n.outs[0] = None
        elif axes:
            n.outs[0] = [d for i, d in enumerate(x) if i not in axes]
        elif is_static(x):
            n.outs[0] = [d for d in x if d != 1]
    n.vals[0] = n.V[0]


@shape_rule("Unsqueeze")
def _unsqueeze(s, n):
    x = n.x
    if x is not None:
        r = len(x) + len(n.V[1] or n.A.get("axes", []))
        axes = s._axes(n.node, n.A, n.V, r)
        if axes is not None and axes:
            it = iter(x)
            n.outs[0] = [1 if i in axes else next(it) for i in range(r)]
    n.vals[0] = n.V[0]


@shape_rule("Concat")
def _concat(s, n):
    S, V = n.S, n.V
    if all(d is not None for d in S):
        r = len(S[0])
        a = axis_index(n.A["axis"], r)
        tot = 0
        for d in S:
            tot = dim_add(tot, d[a])
        out = list(S[0])
        out[a] = tot if tot is not None else s.fresh()
        n.outs[0] = s._concat_dims(S, a, out)
    if all(v is not None for v in V) and V:
        n.vals[0] = [d for v in V for d in v]


@shape_rule("Split")
def _split(s, n):
    x = n.x
    if x is not None:
        a = axis_index(n.A.get("axis", 0), len(x))
        k = len(n.node.output)
        if len(n.ins) > 1 and n.ins[1]:
            sizes = n.V[1] if n.V[1] is not None else [None] * k
        elif isinstance(x[a], int):
            c = -(-x[a] // k)
            sizes = [min(c, x[a] - c * i) for i in range(k)]
        elif k == 1:
            sizes = [x[a]]
        else:
            sizes = [None] * k
        for i in range(k):
            out = list(x)
            out[a] = sizes[i] if sizes[i] is not None else s.fresh()
            n.outs[i] = out


@shape_rule("Slice")
def _slice(s, n):
    n.outs[0], n.vals[0] = s._slice(n.node, n.S, n.V)


@shape_rule("Pad")
def _pad(s, n):
    x = n.x
    if x is not None:
        pads = n.V[1]
        axes = (s._axes(n.node, n.A, n.V, len(x), index=3) if len(n.ins) > 3 and n.ins[3]
                else list(range(len(x))))
        if pads is None or axes is None:
            n.outs[0] = [s.fresh() for _ in x]
        else:
            out = list(x)
            k = len(axes)
            for j, a in enumerate(axes):
                v = dim_add(dim_add(out[a], pads[j]), pads[j + k])
                out[a] = v if v is not None else s.fresh()
            n.outs[0] = out


@shape_rule("Expand")
def _expand(s, n):
    x = n.x
    if n.V[1] is not None:
        n.outs[0] = s.bcast([x, s._dims_or_fresh(n.V[1])])
    elif is_static(n.S[1]) and len(n.S[1]) == 1:
        n.outs[0] = s.bcast([x, [s.fresh() for _ in range(n.S[1][0])]])


@shape_rule("Tile")
def _tile(s, n):
    x = n.x
    if x is not None and n.V[1] is not None and all(isinstance(r, int) for r in n.V[1]):
        n.outs[0] = [dim_mul(d, r) for d, r in zip(x, n.V[1])]


# ---------------------------------------------------------------- indexing
@shape_rule("Gather")
def _gather(s, n):
    d, idx = n.S[0], n.S[1]
    if d is not None and idx is not None:
        a = axis_index(n.A.get("axis", 0), len(d))
        n.outs[0] = d[:a] + idx + d[a + 1:]
    if n.V[0] is not None and n.V[1] is not None and d is not None and len(d) == 1:
        try:
            n.vals[0] = [n.V[0][i] for i in n.V[1]]
        except (IndexError, TypeError):
            pass


@shape_rule("GatherElements")
def _gather_elements(s, n):
    n.outs[0] = n.S[1]


@shape_rule("ScatterND", "ScatterElements", "Scatter", "TensorScatter")
def _scatter(s, n):
    """The data (TensorScatter: the cache) with some elements replaced."""
    n.outs[0] = n.x


# ---------------------------------------------------------------- shape computations
@shape_rule("Constant")
def _constant(s, n):
    arr = constant_value(n.node)
    if arr is not None:
        o = n.node.output[0]
        s.set_const(o, arr)
        n.outs[0], n.dts[0] = s.shape[o], s.dtype[o]
        n.vals[0] = s.value.get(o)


@shape_rule("Shape")
def _shape(s, n):
    x = n.x
    if x is not None:
        picked = x[n.A.get("start", 0):n.A.get("end", len(x))]
        n.outs[0] = [len(picked)]
        n.vals[0] = list(picked)


@shape_rule("Size")
def _size(s, n):
    n.outs[0] = []
    if n.x is not None:
        n.vals[0] = [dim_prod(n.x)]


@shape_rule("ConstantOfShape")
def _constant_of_shape(s, n):
    n.outs[0] = s._dims_or_fresh(n.V[0], n.S[0][0] if is_static(n.S[0]) and len(n.S[0]) == 1 else None)
    n.dts[0] = n.A["value"].data_type if "value" in n.A else TensorProto.FLOAT


@shape_rule("Range")
def _range(s, n):
    start, limit, delta = (v[0] if v is not None and len(v) == 1 else None for v in n.V[:3])
    if all(isinstance(t, int) for t in (start, limit, delta)) and delta != 0:
        k = max(math.ceil((limit - start) / delta), 0)
        n.outs[0] = [k]
        if k <= 64:
            n.vals[0] = list(range(start, limit, delta))
    elif start == 0 and delta == 1 and limit is not None:
        n.outs[0] = [limit]
    else:
        n.outs[0] = [s.fresh()]


# ---------------------------------------------------------------- losses
@shape_rule("SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss")
def _loss(s, n):
    n.outs[0] = n.S[1] if n.A.get("reduction", b"mean") in (b"none", "none") else []
    if len(n.outs) > 1:
        n.outs[1] = n.x


# ============================================================================ fallback types
def inferred_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """ONNX's inferred type of every value (a hint: {} when inference fails or the model
    is too large to serialise)."""
    if model.ByteSize() > 1_800_000_000:
        return {}
    for kwargs in ({"strict_mode": True, "data_prop": True}, {"strict_mode": False}):
        try:
            m = onnx.shape_inference.infer_shapes(model, **kwargs)
            break
        except Exception:  # noqa: BLE001 - inference is only a hint here
            continue
    else:
        return {}
    return {vi.name: vi.type for vi in [*m.graph.value_info, *m.graph.output, *m.graph.input]}


def bind_dims(model: onnx.ModelProto, bind: Mapping[str, int]) -> onnx.ModelProto:
    """A copy whose graph inputs and outputs have the symbolic dims in ``bind`` set."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for v in [*m.graph.input, *m.graph.output]:
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in bind:
                d.dim_value = int(bind[d.dim_param])
    return m
