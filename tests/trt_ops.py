"""A static TensorRT-compatibility check for ONNX models, reusable by any test.

TensorRT's ONNX parser publishes an operator support matrix (``tensorrt_onnx_ops.txt`` in the
shared reference folder: ``NAME<TAB>supported|NOT supported<TAB>notes``). This module loads
it and walks a ``ModelProto`` -- the main graph, every subgraph (If/Loop/Scan bodies) and
every local function body (TensorRT inlines local functions, so their bodies are what it
parses; attributes a body binds from its caller, ``ref_attr_name``, are constants of
unknown value there) -- and reports

* any op marked NOT supported, or absent from the matrix, or from a foreign domain that
  is not a local function of the model;
* the documented restrictions that can be checked without running the model:

  - ``Reduce*``: ``axes`` must be an initializer (or a ``Constant``), not computed;
  - ``Attention``: no ``past_key`` / ``past_value`` / ``nonpad_kv_seqlen`` inputs, no
    ``present_key`` / ``present_value`` / ``qk_matmul_output`` outputs, no
    ``qk_matmul_output_mode`` / ``softcap`` attributes;
  - ``LayerNormalization``: only the first output ``Y`` may be used;
  - ``TensorScatter``: ``axis`` must be -2 and ``past_cache`` / ``update`` 4-D;
  - ``ScatterND``: ``reduction`` must be ``none``;
  - ``TopK``: ``sorted`` must be 1 and a constant ``K`` below 3840;
  - ``Squeeze`` / ``Unsqueeze``: ``axes`` resolvable to a constant;
  - ``CumSum``: ``axis`` a constant; ``Dropout``: ``is_training`` a constant False;
* an opset outside what the parser accepts (9 to 24).

Usage: ``assert_trt_compatible(model)`` or ``violations(model) -> list[str]``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

MATRIX = Path(__file__).resolve().parents[2] / "shared" / "reference" / "tensorrt_onnx_ops.txt"
OPSET_RANGE = (9, 24)
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                    "Bernoulli"}
REDUCE_OPS = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
              "ReduceProd", "ReduceSum", "ReduceSumSquare"}


@functools.lru_cache(maxsize=None)
def load_support_matrix(path: str | Path = MATRIX) -> dict[str, tuple[bool, str]]:
    """op type -> (supported?, notes) from the TensorRT support matrix file."""
    table = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        cols = line.split("\t")
        name, status = cols[0].strip(), cols[1].strip() if len(cols) > 1 else ""
        if status not in ("supported", "NOT supported"):
            raise ValueError(f"{path}: cannot parse support status in line {line!r}")
        table[name] = (status == "supported", cols[2].strip() if len(cols) > 2 else "")
    return table


class _Scope:
    """Names visible in one graph or function body: which are constants, and their values."""

    def __init__(self, parent: "_Scope | None" = None):
        self.parent = parent
        self.values: dict[str, np.ndarray | None] = {}  # constant name -> value (None: constant, value unknown)
        self.nonconst: set[str] = set()
        self.consumers: dict[str, int] = {}
        self.ranks: dict[str, int] = {}

    def is_const(self, name: str) -> bool:
        if not name:
            return False
        if name in self.values:
            return True
        if name in self.nonconst:
            return False
        return self.parent.is_const(name) if self.parent else False

    def value(self, name: str):
        if name in self.values:
            return self.values[name]
        return self.parent.value(name) if self.parent and name not in self.nonconst else None

    def rank(self, name: str) -> int | None:
        if name in self.ranks:
            return self.ranks[name]
        return self.parent.rank(name) if self.parent else None


class RefAttr(str):
    """An attribute of a function-body node bound from the caller (``ref_attr_name``): its
    value exists only at each call site (the fused backward ops' epsilon, scale, is_causal)."""


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return RefAttr(a.ref_attr_name) if a.ref_attr_name else onnx.helper.get_attribute_value(a)
    return default


def _has_input(node: onnx.NodeProto, i: int) -> bool:
    return len(node.input) > i and node.input[i] != ""


def _ranks_from(values) -> dict[str, int]:
    out = {}
    for v in values:
        t = v.type.tensor_type
        if v.type.HasField("tensor_type") and t.HasField("shape"):
            out[v.name] = len(t.shape.dim)
    return out


def violations(model: onnx.ModelProto, matrix: dict[str, tuple[bool, str]] | None = None) -> list[str]:
    """Every TensorRT incompatibility found statically, as readable strings (empty = OK)."""
    matrix = matrix if matrix is not None else load_support_matrix()
    problems: list[str] = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not OPSET_RANGE[0] <= imp.version <= OPSET_RANGE[1]:
            problems.append(f"opset {imp.version} is outside TensorRT's parser range {OPSET_RANGE}")
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - ranks are a best effort; the op checks still run
        inferred = model
    functions = {(f.domain, f.name): f for f in model.functions}
    g = inferred.graph
    root = _Scope()
    root.ranks.update(_ranks_from([*g.input, *g.output, *g.value_info]))
    graph_inputs = {i.name for i in g.input}
    for init in g.initializer:
        if init.name not in graph_inputs:  # an initializer that is also an input can be overridden
            root.values[init.name] = numpy_helper.to_array(init) if _small(init) else None
    root.nonconst.update(graph_inputs - set(root.values))
    _walk_nodes(g.node, root, f"graph {g.name!r}", {o.name for o in g.output}, functions, matrix, problems)
    for fn in model.functions:
        scope = _Scope()
        scope.nonconst.update(fn.input)
        _walk_nodes(fn.node, scope, f"function {fn.domain}:{fn.name}", set(fn.output), functions, matrix, problems)
    return problems


def _small(t: onnx.TensorProto) -> bool:
    return int(np.prod(t.dims)) <= 4096 and t.data_location != onnx.TensorProto.EXTERNAL


def _walk_nodes(nodes, scope: _Scope, where: str, outputs_used: set[str], functions, matrix, problems) -> None:
    for n in nodes:
        for name in n.input:
            scope.consumers[name] = scope.consumers.get(name, 0) + 1
        for a in n.attribute:  # names a subgraph reads from this scope count as used
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                for sn in sub.node:
                    for name in sn.input:
                        scope.consumers[name] = scope.consumers.get(name, 0) + 1
    for n in nodes:
        label = f"{where}: node {n.name or '?'} ({n.op_type})"
        if n.domain not in ("", "ai.onnx"):
            if (n.domain, n.op_type) not in functions:
                problems.append(f"{label}: domain {n.domain!r} is neither ONNX nor a local function of the model")
            _propagate(n, scope, const=False)
            continue
        supported = matrix.get(n.op_type)
        if supported is None:
            problems.append(f"{label}: not in TensorRT's operator support matrix")
        elif not supported[0]:
            problems.append(f"{label}: marked NOT supported by TensorRT")
        else:
            problems.extend(f"{label}: {p}" for p in _restrictions(n, scope, outputs_used))
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                inner = _Scope(scope)
                inner.nonconst.update(i.name for i in sub.input)
                for init in sub.initializer:
                    inner.values[init.name] = numpy_helper.to_array(init) if _small(init) else None
                inner.ranks.update(_ranks_from([*sub.input, *sub.output, *sub.value_info]))
                _walk_nodes(sub.node, inner, f"{label} / {a.name}", {o.name for o in sub.output}, functions, matrix,
                            problems)
        has_subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)
        foldable = n.op_type == "Constant" or (
            n.op_type not in NONDETERMINISTIC and not has_subgraph and len(n.input) > 0
            and all(scope.is_const(i) for i in n.input if i))
        _propagate(n, scope, const=foldable)


def _propagate(n: onnx.NodeProto, scope: _Scope, const: bool) -> None:
    for out in n.output:
        if not out:
            continue
        if const:
            value = None
            if n.op_type == "Constant":
                t = _attr(n, "value")
                if isinstance(t, RefAttr):
                    value = None   # a constant whose value each call site binds
                elif t is not None:
                    value = numpy_helper.to_array(t)
                else:
                    for key in ("value_int", "value_ints", "value_float", "value_floats"):
                        v = _attr(n, key)
                        if v is not None and not isinstance(v, RefAttr):
                            value = np.asarray(v)
            scope.values[out] = value
        else:
            scope.nonconst.add(out)


def _restrictions(n: onnx.NodeProto, scope: _Scope, outputs_used: set[str]) -> list[str]:
    p: list[str] = []
    op = n.op_type
    if op in REDUCE_OPS and _has_input(n, 1):
        if not scope.is_const(n.input[1]) or scope.value(n.input[1]) is None:
            p.append(f"axes {n.input[1]!r} must be an initializer/constant")
    elif op == "Attention":
        for i, what in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):
            if _has_input(n, i):
                p.append(f"input {what} is unsupported")
        for i, what in ((1, "present_key"), (2, "present_value"), (3, "qk_matmul_output")):
            if len(n.output) > i and n.output[i]:
                p.append(f"output {what} is unsupported")
        for a in ("qk_matmul_output_mode", "softcap"):
            if _attr(n, a) is not None:
                p.append(f"attribute {a} is unsupported")
        for i, what in ((0, "Q"), (1, "K"), (2, "V"), (3, "attn_mask")):
            r = scope.rank(n.input[i]) if _has_input(n, i) else None
            if r is not None and r != 4:
                p.append(f"{what} must be 4-D, is {r}-D")
    elif op == "LayerNormalization":
        for out in n.output[1:]:
            if out and (scope.consumers.get(out) or out in outputs_used):
                p.append(f"only the first output Y is supported; {out!r} is used")
    elif op == "TensorScatter":
        if _attr(n, "axis", -2) != -2:
            p.append(f"axis must be -2, is {_attr(n, 'axis')}")
        for i, what in ((0, "past_cache"), (1, "update")):
            r = scope.rank(n.input[i])
            if r is None:
                p.append(f"{what} rank unknown (must be 4-D)")
            elif r != 4:
                p.append(f"{what} must be 4-D, is {r}-D")
    elif op == "ScatterND":
        red = _attr(n, "reduction", b"none")
        red = red.decode() if isinstance(red, bytes) else red
        if red != "none":
            p.append(f"reduction must be none, is {red!r}")
    elif op == "TopK":
        if _attr(n, "sorted", 1) != 1:
            p.append("sorted must be 1")
        if not scope.is_const(n.input[1]):
            p.append("K must be a build-time constant")
        else:
            k = scope.value(n.input[1])
            if k is not None and int(np.asarray(k).reshape(-1)[0]) >= 3840:
                p.append(f"K must be < 3840, is {int(np.asarray(k).reshape(-1)[0])}")
    elif op in ("Squeeze", "Unsqueeze"):
        if _has_input(n, 1) and not scope.is_const(n.input[1]):
            p.append(f"axes {n.input[1]!r} must be resolvable to a constant")
    elif op == "CumSum":
        if not scope.is_const(n.input[1]):
            p.append("axis must be a build-time constant")
    elif op == "Dropout":
        if _has_input(n, 2):
            v = scope.value(n.input[2]) if scope.is_const(n.input[2]) else None
            if v is None or bool(np.asarray(v).reshape(-1)[0]):
                p.append("is_training must be an initializer that is False")
    elif op == "Constant":
        for a in ("sparse_value", "value_string", "value_strings"):
            if _attr(n, a) is not None:
                p.append(f"attribute {a} is unsupported")
    return p


def assert_trt_compatible(model: onnx.ModelProto, what: str = "model") -> None:
    """Fail (AssertionError listing every problem) unless ``model`` passes :func:`violations`."""
    problems = violations(model)
    assert not problems, f"{what} is not TensorRT-compatible:\n  " + "\n  ".join(problems)


def op_types(model: onnx.ModelProto) -> set[str]:
    """Every op type in the model, subgraphs and local function bodies included."""
    seen: set[str] = set()

    def walk(nodes):
        for n in nodes:
            seen.add(n.op_type)
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    walk(sub.node)

    walk(model.graph.node)
    for fn in model.functions:
        walk(fn.node)
    return seen
