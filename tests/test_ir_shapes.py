"""The symbolic shape engine (graphc/ir/shapes.py) against ONNX shape inference, and its
symbolic facts ONNX cannot state."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphc.ir.builder import GraphBuilder
from graphc.ir.shapes import SHAPE_RULES, Shapes, Sym, bind_dims, dim_div, dim_mul, inferred_types, is_static, \
    shape_rule
from graphc.models.config import GPT2Config
from graphc.models.kv_cache import build_decode
from graphc.passes.pipelines import optimize
from graphc.runtime.programs import training_graph

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=128)


def engine_alone(model: onnx.ModelProto) -> Shapes:
    """The rules only: no ONNX types merged in."""
    s = Shapes()
    for vi in model.graph.input:
        s.set_type(vi.name, vi.type)
    for t in model.graph.initializer:
        s.set_const(t.name, t)
    for n in model.graph.node:
        s.infer(n)
    return s


@pytest.mark.parametrize("name,build,dims", [
    ("train_unfused", lambda: training_graph(SMALL, opt=False), {"B": 2, "T": 8}),
    ("train_fused", lambda: training_graph(SMALL), {"B": 2, "T": 8}),
    ("decode", lambda: optimize(build_decode(SMALL), "infer")[0], {"B": 2, "S": 1, "capacity": 16}),
])
def test_rules_agree_with_onnx_inference(name, build, dims):
    """With every dim bound, each node output the rules resolve has ONNX's type and, where
    ONNX resolves it, its static shape; all but a Pad whose pads are computed at run time
    are resolved."""
    m = bind_dims(build(), dims)
    s, ref = engine_alone(m), inferred_types(m)
    unresolved, checked = [], 0
    for n in m.graph.node:
        for o in n.output:
            dims_, t = s.shape.get(o), ref[o].tensor_type
            if not is_static(dims_):
                unresolved.append((n.op_type, o))
                continue
            assert s.dtype[o] == t.elem_type, (n.op_type, o)
            onnx_dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            if None not in onnx_dims:                      # ONNX lost some dims of a few values
                assert dims_ == onnx_dims, (n.op_type, o)
                checked += 1
    assert checked >= 25
    assert all(op == "Pad" for op, _ in unresolved), unresolved


def test_symbolic_dims_through_reshape_and_broadcast():
    b = GraphBuilder()
    x = b.input("x", np.float32, ["B", "T", 8])
    flat = b.Reshape(x, b.i64(-1, 8))                      # [B*T, 8]: ONNX loses B*T
    back = b.Reshape(flat, b.Concat(b.Shape(x, end=2), b.i64(8), axis=0))
    y = b.Add(back, b.Slice(x, b.i64(0), b.Shape(x, start=1, end=2), b.i64(1)))   # x[:, 0:T] along axis 1: T
    b.output(y, "y")
    m = b.model(infer_shapes=False)
    s = Shapes.of_model(m)
    B, T = Sym(1, ("B",)), Sym(1, ("T",))
    assert s.shape[flat] == [Sym(1, ("B", "T")), 8]
    assert s.shape[back] == [B, T, 8]
    assert s.shape[y] == [B, T, 8]                         # no broadcast: no reduction in its gradient
    shape_of_x = next(n.output[0] for n in b.nodes if n.op_type == "Shape")
    assert s.value[shape_of_x] == [B, T]                   # small int tensors are tracked by value
    assert dim_div(dim_mul(B, T), T) == B and dim_div(B, T) is None


def test_unknown_op_gives_unknown_shape_and_fallback_merges():
    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="custom")
    s = Shapes()
    s.set_type("x", helper.make_tensor_type_proto(TensorProto.FLOAT, [2, 3]))
    s.infer(node)
    assert s.shape["y"] is None
    s.fallback = {"y": helper.make_tensor_type_proto(TensorProto.FLOAT, [2, "N"])}
    s.infer(node, use_fallback=True)
    assert s.shape["y"] == [2, Sym(1, ("N",))] and s.dtype["y"] == TensorProto.FLOAT


def test_a_second_rule_for_an_op_is_refused():
    before = dict(SHAPE_RULES)
    with pytest.raises(ValueError, match="already registered"):
        shape_rule("MatMul")(lambda s, n: None)
    with pytest.raises(ValueError, match="already registered"):
        shape_rule("AttentionGrad", domain="graphc")(lambda s, n: None)
    assert SHAPE_RULES == before
