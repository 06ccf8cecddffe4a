"""Shared machinery of the fusion passes: a graph index, constant and shape queries,
structural matching helpers, and the pattern / check / rewrite driver.

A fusion is written like an onnxscript-rewriter rule, on graph *structure* only (op
types, attributes, constants, shapes, which value feeds which node), never on node or
value names:

* :meth:`Fusion.match` starts at an *anchor* node (the pattern's last node, its root),
  walks producers upwards and raises :class:`NoMatch` with a reason at the first check
  that fails; the matched nodes are collected in a :class:`Match`;
* the driver (:class:`FusionPass`) then checks that no intermediate value of the
  pattern escapes it (used by a node outside the match, or a graph output), so removing
  the matched nodes cannot change anything else;
* :meth:`Fusion.rewrite` returns the replacement nodes, which write the root's output
  values under their original names, so no consumer needs rewiring.

Anchors are visited in *reverse* topological order, so that the largest pattern claims
its nodes first (a layer norm with a bias is matched at its final Add before the inner
Mul could be taken for a bias-less one), and a node belongs to at most one match.

``FusionPass.explain(model)`` runs the matcher alone and returns, for every candidate
anchor that did not match, the reason: the "why didn't it fuse?" debug list.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from graphc.ir.node import attr  # noqa: F401 - the fusion passes import it from here
from graphc.ir.node import constant_value
from graphc.ir.shapes import Shapes


class NoMatch(Exception):
    """A candidate failed one check; the message says which and why."""


def expect(condition: bool, reason: str) -> None:
    if not condition:
        raise NoMatch(reason)


# ----------------------------------------------------------------------------- index
class GraphIndex:
    """Who produces and who consumes every value of a graph, plus constants and shapes.

    Nodes are referred to by their position in ``graph.node`` (protobuf messages are not
    hashable). Dtypes come from the graph's ``value_info`` (the pass manager refreshes
    shape inference after every pass); shapes from the symbolic shape engine
    (:mod:`graphc.ir.shapes`, the one autodiff and the memory planner use), with those
    types merged in.
    """

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.graph = g
        self.nodes: list[onnx.NodeProto] = list(g.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for i, n in enumerate(self.nodes):
            for o in n.output:
                if o:
                    self.producer[o] = i
            for v in n.input:
                if v:
                    self.consumers[v].append(i)
        self.graph_inputs = {v.name for v in g.input}
        self.graph_outputs = {v.name for v in g.output}
        self.initializers = {t.name: t for t in g.initializer}
        self.types: dict[str, onnx.TypeProto] = {}
        for v in [*g.input, *g.value_info, *g.output]:
            if v.type.HasField("tensor_type"):
                self.types[v.name] = v.type
        self._const_cache: dict[str, np.ndarray | None] = {}
        self._shapes: Shapes | None = None

    # -- structure
    def node_of(self, value: str) -> onnx.NodeProto | None:
        i = self.producer.get(value)
        return None if i is None else self.nodes[i]

    def uses(self, value: str) -> list[int]:
        return self.consumers.get(value, [])

    def is_output(self, value: str) -> bool:
        return value in self.graph_outputs

    # -- constants
    def const(self, value: str) -> np.ndarray | None:
        """The value of a constant: an initializer that is not a (overridable) graph
        input, or the output of a ``Constant`` node; ``None`` otherwise."""
        if value in self._const_cache:
            return self._const_cache[value]
        arr = None
        if value in self.initializers and value not in self.graph_inputs:
            arr = numpy_helper.to_array(self.initializers[value])
        else:
            n = self.node_of(value)
            if n is not None and n.op_type == "Constant" and not n.domain and len(n.attribute) == 1:
                arr = constant_value(n)
        self._const_cache[value] = arr
        return arr

    def scalar(self, value: str) -> float | None:
        """A constant with exactly one element, as a Python float (``None`` otherwise)."""
        arr = self.const(value)
        if arr is None or arr.size != 1:
            return None
        return float(arr.reshape(()))

    def ints(self, value: str) -> list[int] | None:
        arr = self.const(value)
        if arr is None or arr.dtype.kind not in "iu":
            return None
        return [int(x) for x in arr.reshape(-1)]

    # -- types and shapes
    def dtype(self, value: str) -> int | None:
        t = self.types.get(value)
        if t is None:
            init = self.initializers.get(value)
            return init.data_type if init is not None else None
        return t.tensor_type.elem_type or None

    def shape(self, value: str) -> list | None:
        """Dims as ints (static) or :class:`~graphc.ir.shapes.Sym` (symbolic: equal only
        when provably equal); None if the rank is unknown."""
        if self._shapes is None:
            self._shapes = Shapes.of_model(self.model, fallback=self.types)
        dims = self._shapes.shape.get(value)
        return None if dims is None else list(dims)

    def rank(self, value: str) -> int | None:
        s = self.shape(value)
        return None if s is None else len(s)


def close(value: float | None, target: float, rtol: float = 1e-5) -> bool:
    return value is not None and abs(value - target) <= rtol * abs(target)


def describe(idx: GraphIndex, value: str) -> str:
    n = idx.node_of(value)
    if n is not None:
        return f"{value!r} (output of {n.op_type})"
    if value in idx.graph_inputs:
        return f"{value!r} (graph input)"
    if value in idx.initializers:
        return f"{value!r} (initializer)"
    return repr(value)


# ----------------------------------------------------------------------------- matches
@dataclass
class Match:
    """The nodes of one candidate pattern, collected while matching."""

    idx: GraphIndex
    root: int
    nodes: set[int] = field(default_factory=set)
    values: dict = field(default_factory=dict)   # what rewrite needs: inputs, attributes

    def __post_init__(self):
        self.nodes.add(self.root)

    def fork(self) -> "Match":
        """A copy to try one alternative on (commuted operands) without polluting this one."""
        return Match(self.idx, self.root, set(self.nodes), dict(self.values))

    @property
    def root_node(self) -> onnx.NodeProto:
        return self.idx.nodes[self.root]

    def take(self, value: str, op_types: str | Sequence[str], what: str = "") -> onnx.NodeProto:
        """The node producing ``value``, which must be one of ``op_types`` (default domain);
        it joins the match."""
        if isinstance(op_types, str):
            op_types = (op_types,)
        i = self.idx.producer.get(value)
        label = f"{what} " if what else ""
        if i is None:
            raise NoMatch(f"{label}{describe(self.idx, value)} is not produced by {'/'.join(op_types)}")
        n = self.idx.nodes[i]
        if n.op_type not in op_types or n.domain not in ("", "ai.onnx"):
            raise NoMatch(f"{label}{describe(self.idx, value)} is produced by {n.op_type}, not {'/'.join(op_types)}")
        self.nodes.add(i)
        return n

    def try_take(self, value: str, op_types: str | Sequence[str]) -> onnx.NodeProto | None:
        try:
            return self.take(value, op_types)
        except NoMatch:
            return None

    def escaping(self) -> list[str]:
        """Intermediate values (outputs of matched nodes other than the root) that are
        used outside the match or are graph outputs."""
        out = []
        for i in self.nodes:
            if i == self.root:
                continue
            for v in self.idx.nodes[i].output:
                if not v:
                    continue
                if self.idx.is_output(v) or any(c not in self.nodes for c in self.idx.uses(v)):
                    out.append(v)
        return out


def commuted(node: onnx.NodeProto) -> list[tuple[str, str]]:
    """Both operand orders of a commutative binary node (Add, Mul)."""
    a, b = node.input[0], node.input[1]
    return [(a, b), (b, a)]


def one_of(m: Match, options: Iterable, attempt) -> Match:
    """Try ``attempt(m.fork(), option)`` for each option; return the first match that
    succeeds. If none does, raise NoMatch joining every option's reason."""
    reasons = []
    for opt in options:
        try:
            return attempt(m.fork(), opt)
        except NoMatch as e:
            if str(e) not in reasons:
                reasons.append(str(e))
    raise NoMatch(" | ".join(reasons) if reasons else "no option")


def flatten_product(m: Match, value: str, *, root: bool = False) -> list[str]:
    """The factors of a tree of Mul nodes ending at ``value``.

    An interior Mul is followed only while its output has exactly one consumer and is not
    a graph output (so that removing it is safe); its node joins the match. A value that
    is not such a Mul is a leaf factor. ``root`` marks ``value`` as the pattern root
    (already in the match, followed even if it has several consumers).
    """
    idx = m.idx
    i = idx.producer.get(value)
    n = idx.nodes[i] if i is not None else None
    if n is None or n.op_type != "Mul" or n.domain:
        return [value]
    if not root and (len(idx.uses(value)) != 1 or idx.is_output(value)):
        return [value]
    m.nodes.add(i)
    return flatten_product(m, n.input[0]) + flatten_product(m, n.input[1])


def split_constants(idx: GraphIndex, factors: list[str]) -> tuple[float, list[str]]:
    """(product of the scalar-constant factors, the other factors)."""
    c, rest = 1.0, []
    for f in factors:
        s = idx.scalar(f)
        if s is None:
            rest.append(f)
        else:
            c *= s
    return c, rest


def last_axis(idx: GraphIndex, value: str, axis: int) -> bool:
    """``axis`` is the last axis of ``value`` (-1, or rank - 1 when the rank is known)."""
    if axis == -1:
        return True
    r = idx.rank(value)
    return r is not None and axis == r - 1


def reduce_axes(idx: GraphIndex, node: onnx.NodeProto) -> list[int] | None:
    """Axes of a Reduce* node (opset 18+: second input; older: attribute); None = all."""
    if len(node.input) > 1 and node.input[1]:
        return idx.ints(node.input[1])
    axes = attr(node, "axes")
    return list(axes) if axes is not None else None


# ----------------------------------------------------------------------------- driver
@dataclass
class Rewrite:
    """What replaces a match: new nodes (writing the root's outputs), new initializers,
    and graphc local functions the new nodes call."""

    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    functions: list[onnx.FunctionProto] = field(default_factory=list)


class Fusion:
    """One pattern. Subclasses set ``name``, ``anchors`` and implement match/rewrite."""

    name: str = "?"
    anchors: tuple[str, ...] = ()      # op types (default domain) a match may be rooted at
    anchor_domain: str = ""

    def match(self, idx: GraphIndex, root: int) -> Match:
        raise NotImplementedError

    def rewrite(self, m: Match) -> Rewrite:
        raise NotImplementedError

    # the interior check is on by default; a fusion may allow intermediate values that
    # escape if its rewrite recomputes or reproduces them.
    allow_escaping = False


class FusionPass:
    """A pass running one fusion over a whole graph: ``(model) -> (model, changed)``."""

    def __init__(self, fusion: Fusion):
        self.fusion = fusion
        self.name = f"fuse_{fusion.name}"
        self.stats: dict[str, int] = {}
        self.reasons: list[str] = []

    def find(self, model: onnx.ModelProto) -> tuple[GraphIndex, list[Match], list[str]]:
        idx = GraphIndex(model)
        taken: set[int] = set()
        matches, reasons = [], []
        f = self.fusion
        for i in range(len(idx.nodes) - 1, -1, -1):
            n = idx.nodes[i]
            if n.op_type not in f.anchors or (n.domain or "") != f.anchor_domain or i in taken:
                continue
            where = f"{n.op_type} node {n.name or i!r}"
            try:
                m = f.match(idx, i)
                if not f.allow_escaping:
                    esc = m.escaping()
                    expect(not esc, "intermediate value(s) used outside the pattern: " + ", ".join(sorted(esc)))
                overlap = m.nodes & taken
                expect(not overlap, "overlaps a pattern matched already")
            except NoMatch as e:
                reasons.append(f"{where}: {e}")
                continue
            taken |= m.nodes
            matches.append(m)
        return idx, matches, reasons

    def explain(self, model: onnx.ModelProto) -> list[str]:
        """Why each candidate anchor did not match (empty when everything fused)."""
        return self.find(model)[2]

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        idx, matches, reasons = self.find(model)
        self.reasons = reasons
        self.stats = {self.fusion.name: len(matches)}
        if not matches:
            return model, False
        return apply_rewrites(model, idx, [(m, self.fusion.rewrite(m)) for m in matches], self.fusion.name), True


def apply_rewrites(model: onnx.ModelProto, idx: GraphIndex, rewrites: list[tuple[Match, Rewrite]],
                   tag: str) -> onnx.ModelProto:
    """Remove every matched node and put its replacement where the root was.

    The root is the last node of its pattern in topological order and the replacement
    reads only the pattern's inputs (defined before any pattern node), so the order stays
    topological.
    """
    from graphc.ops import ensure_functions

    removed: set[int] = set()
    at_root: dict[int, list[onnx.NodeProto]] = {}
    names = {n.name for n in idx.nodes if n.name}
    counter = 0
    new_inits, new_fns = [], []
    for m, rw in rewrites:
        removed |= m.nodes
        for n in rw.nodes:
            if not n.name or n.name in names:
                while f"{tag}_{counter}" in names:
                    counter += 1
                n.name = f"{tag}_{counter}"
            names.add(n.name)
        at_root[m.root] = rw.nodes
        new_inits += rw.initializers
        new_fns += rw.functions
    out_nodes = []
    for i, n in enumerate(idx.nodes):
        if i in at_root:
            out_nodes.extend(at_root[i])
        elif i not in removed:
            out_nodes.append(n)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.node[:]
    result.graph.node.extend(out_nodes)
    have = {t.name for t in result.graph.initializer}
    result.graph.initializer.extend(t for t in new_inits if t.name not in have)
    return ensure_functions(result)
