"""Static memory planning: liveness, buffer reuse in one arena, in-place updates.

:func:`plan` is a pure function of ``(graph, order, sizes)``:

* **liveness**: in the execution ``order`` (node indices, default the graph's order) a
  value is live from the step of its producer to the step of its last reader;
* **in-place / aliasing**: an output may take over an input's buffer

  - *in place*, for an elementwise op (``INPLACE_OPS``: Add, Mul, Gelu, ...) whose input
    has the output's size and dies at that node (its last reader), e.g. a residual Add
    whose incoming stream is not needed later, or an optimizer update
    ``p' = p - lr * m`` of a parameter (graph input -> graph output, both outside the
    arena: reported as an external in-place pair);
  - as a *view*, for a reshaping op (``VIEW_OPS``: Reshape, Squeeze, ...), which never
    writes, so the input need not die; the buffer lives as long as either does;

  aliased values form one buffer whose interval is the union of theirs;
* **assignment**: buffers are placed in one arena by *greedy best-fit by size*
  (largest first; each goes into the smallest gap between the buffers already placed
  whose lifetimes overlap its own, else on top), offsets aligned to ``alignment``;
* **report**: ``peak_bytes`` (the arena size), ``naive_bytes`` (every intermediate in
  its own allocation: the sum of their sizes), and graph inputs / initializers / graph
  outputs, which live outside the arena (the runtime owns parameters, tokens and the
  buffers it binds outputs into), separately.

:func:`value_sizes` binds the symbolic dims (``B``, ``T``) to the caller's ints and
returns bytes per value, from the shape engine shared with autodiff
(:mod:`graphc.ir.shapes`); :func:`plan_model` does both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnx.numpy_helper

from graphc.ir.builder import np_dtype
from graphc.ir.node import constant_value
from graphc.ir.shapes import SAME_SHAPE, Shapes, is_static
from graphc.ops import op_def

INPLACE_OPS = {   # graphc's fused ops (Gelu, the *Grad ops) state theirs in graphc.ops
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Relu", "Tanh", "Sigmoid", "Exp", "Log", "Sqrt", "Reciprocal",
    "Erf", "Pow", "Clip", "Where", "Max", "Min", "LeakyRelu", "Softmax", "LogSoftmax", "Identity",
}
VIEW_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


SCATTER_OPS = {"ScatterND", "ScatterElements", "TensorScatter"}


def _alias_kind(n: onnx.NodeProto, x: str, sizes: Mapping[str, int], consts: dict) -> str | None:
    """How output 0 of ``n`` may share the buffer of its input ``x``:

    * ``"view"``: a reshaping op, same bytes, nothing written;
    * ``"inplace"``: the op may write its output over ``x`` (same size): an elementwise op,
      a scatter into its data input, or a Pad that only appends rows (``x`` is then the
      prefix of the output's buffer; the op zero-fills the tail);
    * None otherwise.
    """
    if not n.output or not n.output[0]:
        return None
    o = n.output[0]
    same = sizes.get(o) is not None and sizes.get(x) == sizes.get(o)
    fused = op_def(n.domain, n.op_type)
    if fused is not None:     # a graphc op: its definition's in-place facts
        k = fused.inplace.get(0)
        return "inplace" if k is not None and k < len(n.input) and n.input[k] == x and same else None
    if n.domain:
        return None
    if n.op_type in VIEW_OPS and x == n.input[0] and same:
        return "view"
    if n.op_type in INPLACE_OPS and same:
        return "inplace"
    if n.op_type in SCATTER_OPS and x == n.input[0] and same:
        return "inplace"
    if n.op_type == "Pad" and x == n.input[0] and _tail_pad(n, consts):
        return "inplace"
    return None


def _tail_pad(n: onnx.NodeProto, consts: dict) -> bool:
    """A constant Pad adding rows at the end of axis 0 only."""
    mode = next((a.s for a in n.attribute if a.name == "mode"), b"constant")
    pads = consts.get(n.input[1]) if len(n.input) > 1 else None
    if mode != b"constant" or pads is None:
        return False
    pads = [int(v) for v in pads.reshape(-1)]
    axes = consts.get(n.input[3]) if len(n.input) > 3 and n.input[3] else None
    if axes is not None:
        axes = [int(v) for v in axes.reshape(-1)]
        if axes not in ([0],):
            return False
    r = len(pads) // 2
    begins, ends = pads[:r], pads[r:]
    return all(v == 0 for v in begins) and all(v == 0 for v in ends[1:]) and ends[0] >= 0


def _leading_slice(graph: onnx.GraphProto, n: onnx.NodeProto, consts: dict) -> bool:
    """A Slice of a contiguous block of rows (axis 0, step 1): a view of its input."""
    if n.op_type != "Slice" or n.domain:
        return False
    axes = consts.get(n.input[3]) if len(n.input) > 3 and n.input[3] else None
    steps = consts.get(n.input[4]) if len(n.input) > 4 and n.input[4] else None
    starts = consts.get(n.input[1])
    return (axes is not None and list(axes.reshape(-1)) == [0] and starts is not None and starts.size == 1
            and (steps is None or list(steps.reshape(-1)) == [1]))


@dataclass
class MemoryPlan:
    order: list[int]
    sizes: dict[str, int]                           # bytes of every arena value
    intervals: dict[str, tuple[int, int]]           # value -> (first step, last step)
    buffer_of: dict[str, str]                       # value -> the value owning its buffer
    offsets: dict[str, int]                         # buffer owner -> arena offset
    buffer_sizes: dict[str, int]                    # buffer owner -> bytes
    buffer_intervals: dict[str, tuple[int, int]]
    inplace: list[tuple[int, str, str, str]] = field(default_factory=list)   # (node, op, output, input)
    views: list[tuple[int, str, str, str]] = field(default_factory=list)
    external_inplace: list[tuple[int, str, str, str]] = field(default_factory=list)
    peak_bytes: int = 0
    naive_bytes: int = 0
    input_bytes: int = 0
    initializer_bytes: int = 0
    output_bytes: int = 0
    alignment: int = 1

    @property
    def num_buffers(self) -> int:
        return len(self.offsets)

    def offset(self, value: str) -> int:
        return self.offsets[self.buffer_of[value]]

    def live_bytes_at(self, step: int) -> int:
        return sum(self.buffer_sizes[b] for b, (s, e) in self.buffer_intervals.items() if s <= step <= e)

    def summary(self) -> dict:
        return {
            "peak_bytes": self.peak_bytes, "naive_bytes": self.naive_bytes,
            "values": len(self.sizes), "buffers": self.num_buffers,
            "inplace": len(self.inplace), "views": len(self.views), "external_inplace": len(self.external_inplace),
            "input_bytes": self.input_bytes, "initializer_bytes": self.initializer_bytes,
            "output_bytes": self.output_bytes,
        }

    def format(self) -> str:
        s = self.summary()
        return (f"memory plan: peak {mib(s['peak_bytes'])} in one arena vs naive {mib(s['naive_bytes'])} "
                f"({s['naive_bytes'] / max(s['peak_bytes'], 1):.1f}x); {s['values']} intermediates in "
                f"{s['buffers']} buffers, {s['inplace']} in-place, {s['views']} views; outside the arena: "
                f"inputs {mib(s['input_bytes'])}, initializers {mib(s['initializer_bytes'])}, "
                f"outputs {mib(s['output_bytes'])}")


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def place(buffers: Mapping, alignment: int = 1) -> tuple[dict, int]:
    """Offsets in one arena for ``buffers`` (key -> (bytes, first step, last step), steps
    inclusive): greedy best-fit by size -- largest first, each into the smallest gap between
    the buffers already placed whose lifetimes overlap its own, else on top. Returns
    (offsets, arena size). The one placement both the graph planner (:func:`plan`) and the
    CUDA backend's arena use."""
    placed: list[tuple[int, int, int, int]] = []       # (offset, size, start, end)
    offsets: dict = {}
    for key in sorted(buffers, key=lambda k: (-buffers[k][0], buffers[k][1], str(k))):
        size, s0, s1 = buffers[key]
        size = _align(size, alignment)
        if size == 0:
            offsets[key] = 0
            continue
        busy = sorted((o, o + sz) for o, sz, a, b in placed if a <= s1 and s0 <= b)
        best, best_gap, cursor = None, None, 0
        for lo, hi in busy:
            gap = lo - cursor
            if gap >= size and (best_gap is None or gap < best_gap):
                best, best_gap = cursor, gap
            cursor = max(cursor, hi)
        offset = best if best is not None else cursor
        offsets[key] = offset
        placed.append((offset, size, s0, s1))
    return offsets, max((o + sz for o, sz, _, _ in placed), default=0)


def plan(graph: onnx.GraphProto, order: Sequence[int] | None, sizes: Mapping[str, int], *,
         inplace: bool = True, alignment: int = 1) -> MemoryPlan:
    """Plan the arena for ``graph`` executed in ``order`` with ``sizes`` (bytes per value)."""
    nodes = list(graph.node)
    order = list(range(len(nodes))) if order is None else list(order)
    if sorted(order) != list(range(len(nodes))):
        raise ValueError("order must be a permutation of the node indices")
    graph_inputs = {v.name for v in graph.input}
    inits = {t.name for t in graph.initializer}
    outputs = {v.name for v in graph.output}
    external = graph_inputs | inits | outputs

    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for s, i in enumerate(order):
        n = nodes[i]
        for v in n.input:
            if v:
                if v not in first and v not in external:
                    raise ValueError(f"order is not topological: step {s} reads {v!r} before it is written")
                last[v] = s
        for o in n.output:
            if o:
                first[o] = s
                last.setdefault(o, s)
    # a row-block Slice of an input (the tied LM head's wte[:V]) is a view of memory the
    # runtime owns: outside the arena
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name not in graph_inputs}
    for n in nodes:
        if n.op_type == "Constant" and not n.domain and len(n.attribute) == 1:
            value = constant_value(n)
            if value is not None:
                consts[n.output[0]] = value
    external_views = []
    for s, i in enumerate(order):
        n = nodes[i]
        if inplace and n.input and n.input[0] in external and n.output[0] not in external \
                and _leading_slice(graph, n, consts):
            external_views.append((i, n.op_type, n.output[0], n.input[0]))
            external = external | {n.output[0]}
    # a value read only by an op that may write its output over it (a view, an in-place
    # elementwise op, a scatter, a tail Pad) whose output lives outside the arena is
    # written straight into that output's buffer: the logits before their final Reshape,
    # the tied wte gradient (LM-head Gemm -> Pad -> ScatterND of the embedding rows)
    readers: dict[str, int] = {}
    for n in nodes:
        for v in n.input:
            if v:
                readers[v] = readers.get(v, 0) + 1
    # first, outputs updated in place over a graph input that dies there (optimizer
    # updates p' = p - lr * u): their buffer is the input's, so nothing else goes there
    ext_pairs = []
    for s, i in enumerate(order):
        n = nodes[i]
        if not inplace or not n.output or n.output[0] not in outputs:
            continue
        for x in n.input:
            if (x in graph_inputs and last.get(x) == s and x not in outputs
                    and _alias_kind(n, x, sizes, consts) == "inplace"):
                ext_pairs.append((i, n.op_type, n.output[0], x))
                break
    taken_outputs = {o for _, _, o, _ in ext_pairs}
    for s in range(len(order) - 1, -1, -1):
        n = nodes[order[s]]
        if not inplace or not n.output or n.output[0] not in external or n.output[0] in taken_outputs:
            continue
        for x in n.input:
            if (x and x in first and x not in external and readers.get(x) == 1
                    and _alias_kind(n, x, sizes, consts) is not None):
                external_views.append((order[s], n.op_type, n.output[0], x))
                external = external | {x}
                break
    arena = [v for v in first if v not in external]
    missing = [v for v in arena if v not in sizes]
    if missing:
        raise ValueError(f"no size for {len(missing)} value(s): {missing[:5]}")
    vsize = {v: int(sizes[v]) for v in arena}
    intervals = {v: (first[v], last[v]) for v in arena}

    # -- aliasing: values sharing one buffer (owner -> members; the buffer dies with its
    #    last member)
    owner = {v: v for v in arena}
    members = {v: [v] for v in arena}
    group_last = {v: last[v] for v in arena}

    def join(o: str, x: str) -> None:
        r, ro = owner[x], owner[o]
        for v in members.pop(ro):
            owner[v] = r
            members[r].append(v)
        group_last[r] = max(group_last[r], group_last.pop(ro))

    inplace_pairs, view_pairs = [], list(external_views)
    for s, i in enumerate(order):
        n = nodes[i]
        if not inplace or not n.output or not n.output[0]:
            continue
        o = n.output[0]
        for x in n.input:
            kind = _alias_kind(n, x, sizes, consts) if x else None
            if kind == "view" and x in owner and o in owner:
                view_pairs.append((i, n.op_type, o, x))       # no write: x need not die
                join(o, x)
                break
            if kind != "inplace" or last.get(x) != s:
                continue
            if x in owner and o in owner:
                if group_last[owner[x]] > s:                   # a view of x lives on
                    continue
                inplace_pairs.append((i, n.op_type, o, x))
                join(o, x)
                break

    def root(v: str) -> str:
        return owner[v]

    groups: dict[str, list[str]] = {}
    for v in arena:
        groups.setdefault(root(v), []).append(v)
    buf_size = {r: _align(max(vsize[v] for v in vs), alignment) for r, vs in groups.items()}
    buf_iv = {r: (min(intervals[v][0] for v in vs), max(intervals[v][1] for v in vs)) for r, vs in groups.items()}

    # -- greedy best-fit by size
    offsets, peak = place({r: (buf_size[r], *buf_iv[r]) for r in groups})

    # naive: every value a node writes (except graph outputs) in its own allocation
    naive = int(sum(sizes[v] for v in first if v not in outputs and v in sizes))

    def nbytes(names) -> int:
        return int(sum(sizes.get(v, 0) for v in names))

    return MemoryPlan(
        order=order, sizes=vsize, intervals=intervals, buffer_of={v: root(v) for v in arena},
        offsets=offsets, buffer_sizes=buf_size, buffer_intervals=buf_iv,
        inplace=inplace_pairs, views=view_pairs, external_inplace=ext_pairs,
        peak_bytes=peak, naive_bytes=naive,
        input_bytes=nbytes(graph_inputs - inits), initializer_bytes=nbytes(inits),
        output_bytes=nbytes(outputs - graph_inputs), alignment=alignment)


# ----------------------------------------------------------------------------- sizes
def value_sizes(model: onnx.ModelProto, dims: Mapping[str, int]) -> dict[str, int]:
    """Bytes of every value (graph inputs, initializers, node outputs) for concrete dims:
    the symbolic shape engine (:mod:`graphc.ir.shapes`) with the dims bound."""
    shapes = Shapes.of_model(model, bind=dims)
    g = model.graph
    # What the engine cannot derive (a gradient Pad with run-time pads) the graph's declared
    # outputs may state; and backwards through same-shape ops, a Cast's output shape (that
    # gradient cast to fp32 by the BF16 pass) tells its input's shape too.
    for v in g.output:
        declared = [d.dim_value if d.HasField("dim_value") else dims.get(d.dim_param)
                    for d in v.type.tensor_type.shape.dim]
        if not is_static(shapes.shape.get(v.name)) and v.type.tensor_type.HasField("shape") and \
                all(isinstance(d, int) for d in declared):
            shapes.shape[v.name] = declared
    for n in reversed(g.node):
        if not n.domain and (n.op_type in SAME_SHAPE or n.op_type in ("Cast", "CastLike", "Identity")) and n.input and n.input[0] and \
                is_static(shapes.shape.get(n.output[0])) and not is_static(shapes.shape.get(n.input[0])):
            shapes.shape[n.input[0]] = shapes.shape[n.output[0]]
    names = [v.name for v in g.input] + [t.name for t in g.initializer] + [o for n in g.node for o in n.output if o]
    sizes: dict[str, int] = {}
    for v in names:
        shape, dtype = shapes.shape.get(v), shapes.dtype.get(v)
        if is_static(shape) and dtype:
            sizes[v] = int(np.prod(shape, dtype=np.int64)) * np_dtype(dtype).itemsize
    still = sorted({o for n in g.node for o in n.output if o and o not in sizes})
    if still:
        raise ValueError(f"cannot resolve the size of {len(still)} value(s) with dims {dict(dims)}: {still[:5]}")
    return sizes


def plan_model(model: onnx.ModelProto, dims: Mapping[str, int], order: Sequence[int] | None = None,
               **kw) -> MemoryPlan:
    """Plan ``model`` for concrete symbolic dims, e.g. ``{"B": 4, "T": 64}``."""
    return plan(model.graph, order, value_sizes(model, dims), **kw)
