"""graphc/ops: one definition per fused op, and the registries that refuse a second one."""

import onnx
import pytest
from onnx import TensorProto, helper

from graphc import OPSET
from graphc.ir.builder import GRAPHC_DOMAIN
from graphc.ir.shapes import SHAPE_RULES, Shapes, Sym
from graphc.ops import FUSED_KEYS, OPS, count_fused, ensure_functions, make_node, op_def, register_lowering
from graphc.ops import registry
from graphc.passes.autodiff.registry import VJP, vjp
from graphc.passes.memory_plan import plan

F = TensorProto.FLOAT

# op -> (inputs with static shapes, attributes): enough to run ONNX inference on the op
CALLS = {
    ("", "Attention"): ({"Q": [2, 3, 5, 4], "K": [2, 3, 7, 4], "V": [2, 3, 7, 6]}, {"is_causal": 0}),
    (GRAPHC_DOMAIN, "AttentionGrad"): ({"dY": [2, 3, 5, 4], "Q": [2, 3, 5, 4], "K": [2, 3, 5, 4], "V": [2, 3, 5, 4],
                                        "Y": [2, 3, 5, 4]}, {"scale": 0.5, "is_causal": 1}),
    ("", "LayerNormalization"): ({"X": [2, 5, 8], "W": [8], "B": [8]}, {"epsilon": 1e-5}),
    (GRAPHC_DOMAIN, "LayerNormGrad"): ({"dY": [2, 5, 8], "X": [2, 5, 8], "W": [8]}, {"epsilon": 1e-5}),
    ("", "Gelu"): ({"X": [3, 4]}, {"approximate": "tanh"}),
    (GRAPHC_DOMAIN, "GeluGrad"): ({"dY": [3, 4], "X": [3, 4]}, {}),
    (GRAPHC_DOMAIN, "CrossEntropy"): ({"Z": [6, 11], "T": [6, 1]}, {}),
    (GRAPHC_DOMAIN, "CrossEntropyGrad"): ({"dloss": [], "Z": [6, 11], "T": [6, 1]}, {}),
}
N_OUTPUTS = {"Attention": 1, "AttentionGrad": 3, "LayerNormalization": 1, "LayerNormGrad": 3, "Gelu": 1,
             "GeluGrad": 1, "CrossEntropy": 1, "CrossEntropyGrad": 1}


def test_every_fused_op_is_defined_once_with_all_its_parts():
    assert set(OPS) == set(CALLS)
    assert FUSED_KEYS == ["attention", "attention_backward", "layernorm", "layernorm_backward", "gelu",
                          "gelu_backward", "cross_entropy", "cross_entropy_backward"]
    for key, op in OPS.items():
        assert op.key == key and op_def(*key) is op
        assert SHAPE_RULES[key] is op.shape
        assert (op.function is not None) == (op.domain == GRAPHC_DOMAIN), key   # standard ops have no body
        if op.vjp is not None:
            assert VJP[key] is op.vjp
    backward = [k for k in OPS if k[1].endswith("Grad")]
    assert all(OPS[k].vjp is None for k in backward)
    assert all(OPS[k].vjp is not None for k in OPS if k not in backward)


def _call(key):
    inputs, attrs = CALLS[key]
    names = list(inputs)
    outs = [f"out{i}" for i in range(N_OUTPUTS[key[1]])]
    node = helper.make_node(key[1], names, outs, domain=key[0], **attrs)
    g = helper.make_graph([node], "t", [helper.make_tensor_value_info(n, TensorProto.INT64 if n == "T" else F, s)
                                        for n, s in inputs.items()],
                          [helper.make_empty_tensor_value_info(o) for o in outs])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    return ensure_functions(m), node


@pytest.mark.parametrize("key", list(CALLS), ids=lambda k: k[1])
def test_shape_rule_agrees_with_onnx_inference_of_the_op(key):
    """ONNX infers standard ops itself and graphc ops through their function bodies: an
    independent reference for each definition's shape rule."""
    m, node = _call(key)
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True, data_prop=True)
    types = {v.name: v.type.tensor_type for v in [*inferred.graph.output, *inferred.graph.value_info]}
    s = Shapes.of_model(m, fallback={})                   # the rules alone
    for o in node.output:
        assert s.shape[o] == [d.dim_value for d in types[o].shape.dim], o
        assert s.dtype[o] == types[o].elem_type, o


def test_symbolic_shapes_of_the_backward_ops_follow_their_inputs():
    m, node = _call((GRAPHC_DOMAIN, "LayerNormGrad"))
    for vi in m.graph.input:
        if vi.name in ("dY", "X"):
            vi.type.tensor_type.shape.dim[0].dim_param = "B"
    s = Shapes.of_model(m, fallback={})
    assert s.shape["out0"] == [Sym(1, ("B",)), 5, 8] and s.shape["out1"] == s.shape["out2"] == [8]


def test_count_fused():
    m, _ = _call((GRAPHC_DOMAIN, "GeluGrad"))
    counts = count_fused(m)
    assert list(counts) == FUSED_KEYS and counts["gelu_backward"] == 1 and sum(counts.values()) == 1


def test_a_second_definition_or_vjp_rule_is_refused():
    ops_before, vjp_before = dict(OPS), dict(VJP)
    with pytest.raises(ValueError, match="a definition for Gelu is already registered"):
        registry.define(OPS[("", "Gelu")])
    with pytest.raises(ValueError, match="already registered"):
        vjp("Gelu")(lambda ctx, node, grads: [None])      # the fused op's rule stays the only one
    with pytest.raises(ValueError, match="already registered"):
        vjp("Add")(lambda ctx, node, grads: [None, None])
    assert OPS == ops_before and VJP == vjp_before


def test_lowerings_are_registered_per_backend(monkeypatch):
    monkeypatch.setattr(registry, "LOWERINGS", {})

    @register_lowering("fake", GRAPHC_DOMAIN, "GeluGrad")
    def gelu_grad_kernel(node):
        return "kernel"

    register_lowering("fake", "", "MatMul")(lambda node: "gemm")
    assert OPS[(GRAPHC_DOMAIN, "GeluGrad")].lowerings == {"fake": gelu_grad_kernel}
    assert OPS[("", "Gelu")].lowerings == {}
    assert set(registry.lowerings("fake")) == {(GRAPHC_DOMAIN, "GeluGrad"), ("", "MatMul")}
    assert registry.lowerings("other") == {}
    with pytest.raises(ValueError, match="a fake lowering for graphc.GeluGrad is already registered"):
        register_lowering("fake", GRAPHC_DOMAIN, "GeluGrad")(lambda node: None)


@pytest.mark.parametrize("op_type,inputs,overwritten", [
    ("GeluGrad", ["dY", "X"], "dY"),
    ("LayerNormGrad", ["dY", "X", "W"], "dY"),
    ("CrossEntropyGrad", ["dloss", "Z", "T"], "Z"),
])
def test_memory_plan_uses_the_inplace_facts(op_type, inputs, overwritten):
    """Each input (a Neg output) dies at the op: the planner lets the op's first output
    take over the buffer of exactly the input its definition names."""
    pre = [helper.make_node("Neg", [f"in_{i}"], [i]) for i in inputs]
    node = make_node(op_type, inputs, ["r0"] + [f"r{k}" for k in range(1, N_OUTPUTS[op_type])])
    post = [helper.make_node("Transpose", [o], [f"y_{o}"]) for o in node.output]   # no aliasing
    g = helper.make_graph(pre + [node] + post, "t", [helper.make_tensor_value_info(f"in_{i}", F, None) for i in inputs],
                          [helper.make_tensor_value_info(f"y_{o}", F, None) for o in node.output])
    sizes = {v: 64 for n in g.node for v in n.output}
    p = plan(g, None, sizes)
    assert [(op, out, x) for _, op, out, x in p.inplace if op == op_type] == [(op_type, "r0", overwritten)]
    assert OPS[(GRAPHC_DOMAIN, op_type)].inplace == {0: inputs.index(overwritten)}
