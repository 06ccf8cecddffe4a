"""Every graph graphc builds for inference or export uses only TensorRT-supported ONNX ops,
within TensorRT's documented restrictions (tests/trt_ops.py); the training graphs (optimised
and not) are walked too, and their one finding is the embedding gradient's
``ScatterND(reduction="add")``, which the TensorRT backend must legalise; and the checker
itself catches what it claims to."""

import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper

from graphc.models.config import GPT2Config
from graphc.models.export import bind, export_onnx, plain_model
from graphc.models.gpt2 import build_forward
from graphc.models.init import random_init
from graphc.models.kv_cache import build_decode, build_decoder_with_past, build_prefill
from trt_ops import MATRIX, assert_trt_compatible, load_support_matrix, op_types, violations

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=64)

pytestmark = pytest.mark.skipif(not MATRIX.exists(), reason=f"TensorRT support matrix not available: {MATRIX}")


# ----------------------------------------------------------------------------- graphc's graphs
GRAPHS = {
    "forward+loss": lambda: build_forward(SMALL, loss=True, logits=True),
    "forward logits only": lambda: build_forward(SMALL, loss=False),
    "forward loss only": lambda: build_forward(SMALL, loss=True, logits=False),
    "prefill (last logits)": lambda: build_prefill(SMALL),
    "prefill (all logits)": lambda: build_prefill(SMALL, all_logits=True),
    "decode": lambda: build_decode(SMALL),
    "decoder with past": lambda: build_decoder_with_past(SMALL),
}


@pytest.mark.parametrize("name", list(GRAPHS))
def test_graphc_graphs_are_trt_compatible(name):
    model = GRAPHS[name]()
    assert_trt_compatible(model, name)
    if "prefill" in name or name == "decode":
        assert "TensorScatter" in op_types(model)


def test_optimised_forward_graphs_are_trt_compatible():
    from graphc.passes import pipelines

    for loss in (False, True):
        model, _ = pipelines.optimize(build_forward(SMALL, loss=loss), "infer")
        assert_trt_compatible(model, f"optimised forward (loss={loss})")


@pytest.mark.parametrize("opt", [True, False], ids=["optimised", "unoptimised"])
def test_training_graphs_report_only_the_embedding_scatter_add(opt):
    """The checker walks training graphs without crashing on the fused backward functions'
    ``ref_attr_name`` attributes, and finds exactly one problem: wte's gradient."""
    from graphc.ops import count_fused
    from graphc.runtime.programs import training_graph

    model = training_graph(SMALL, opt=opt)
    assert (count_fused(model)["attention_backward"] == SMALL.n_layer) == opt
    problems = violations(model)
    assert len(problems) == 1, problems
    assert "ScatterND" in problems[0] and "reduction must be none, is 'add'" in problems[0]


def test_reference_attributes_in_function_bodies_are_call_site_constants():
    # as in graphc.LayerNormGrad: Constant(value_float <- the caller's epsilon)
    body = [helper.make_node("Constant", [], ["eps"]), helper.make_node("Add", ["a", "eps"], ["b"])]
    body[0].attribute.append(onnx.AttributeProto(name="value_float", ref_attr_name="epsilon",
                                                 type=onnx.AttributeProto.FLOAT))
    fn = helper.make_function("graphc", "AddEps", ["a"], ["b"], body, [helper.make_opsetid("", 24)],
                              attributes=["epsilon"])
    m = make([helper.make_node("AddEps", ["x"], ["y"], domain="graphc", epsilon=1e-5)], [vi("x", [2, 4])],
             [vi("y", None)], functions=[fn])
    assert violations(m) == []
    m.functions[0].node[1].op_type = "Unique"     # and the body is still checked
    assert any("AddEps" in p and "Unique" in p for p in violations(m))


@pytest.fixture(scope="module")
def params():
    return random_init(SMALL, 0)


@pytest.mark.parametrize("kv", [False, True])
@pytest.mark.parametrize("opset", [18, 20, 24])
def test_exported_models_are_trt_compatible(params, tmp_path, kv, opset):
    path = tmp_path / "m.onnx"
    export_onnx(params, path, kv_cache=kv, opset=opset)
    assert_trt_compatible(onnx.load(str(path)), f"export kv={kv} opset={opset}")


def test_exported_models_with_external_data_are_checked_without_loading_weights(params, tmp_path):
    path = tmp_path / "ext.onnx"
    export_onnx(params, path, kv_cache=True, external_threshold=1024)
    assert_trt_compatible(onnx.load(str(path), load_external_data=False), "external-data export")


# ----------------------------------------------------------------------------- the checker
def test_matrix_loads():
    m = load_support_matrix()
    assert len(m) > 150
    assert m["TensorScatter"][0] and m["MatMul"][0]
    assert not m["Unique"][0] and not m["NegativeLogLikelihoodLoss"][0]


def make(nodes, inputs, outputs, inits=(), functions=(), opset=24):
    g = helper.make_graph(nodes, "t", inputs, outputs, list(inits))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(f.domain, 1) for f in functions]
    m = helper.make_model(g, opset_imports=imports, functions=list(functions))
    m.ir_version = 10
    return m


def vi(name, shape, t=TP.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def axes(name="axes", values=(-1,)):
    return helper.make_tensor(name, TP.INT64, [len(values)], list(values))


def test_flags_unsupported_and_unknown_ops():
    m = make([helper.make_node("Unique", ["x"], ["y"])], [vi("x", [4])], [vi("y", None)])
    assert any("NOT supported" in p for p in violations(m))
    m = make([helper.make_node("Foo", ["x"], ["y"])], [vi("x", [4])], [vi("y", [4])])
    assert any("not in TensorRT's operator support matrix" in p for p in violations(m))
    m = make([helper.make_node("Foo", ["x"], ["y"], domain="com.example")], [vi("x", [4])], [vi("y", [4])])
    assert any("neither ONNX nor a local function" in p for p in violations(m))
    m = make([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [4])], [vi("y", [4])], opset=8)
    assert any("opset 8" in p for p in violations(m))


def test_walks_local_function_bodies_and_subgraphs():
    fn = helper.make_function("graphc", "Bad", ["a"], ["b"], [helper.make_node("Unique", ["a"], ["b"])],
                              [helper.make_opsetid("", 24)])
    m = make([helper.make_node("Bad", ["x"], ["y"], domain="graphc")], [vi("x", [4])], [vi("y", None)], functions=[fn])
    assert any("function graphc:Bad" in p and "Unique" in p for p in violations(m))
    then = helper.make_graph([helper.make_node("Unique", ["x"], ["t"])], "then", [], [vi("t", None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [vi("e", [4])])
    m = make([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
             [vi("x", [4]), vi("c", [], TP.BOOL)], [vi("y", None)])
    assert any("then_branch" in p and "Unique" in p for p in violations(m))


def test_reduce_axes_must_be_initializers():
    ok = make([helper.make_node("ReduceMean", ["x", "axes"], ["y"])], [vi("x", [2, 4])], [vi("y", None)], [axes()])
    assert violations(ok) == []
    constant = make([helper.make_node("Constant", [], ["axes"], value=axes("v")),
                     helper.make_node("ReduceSum", ["x", "axes"], ["y"])], [vi("x", [2, 4])], [vi("y", None)])
    assert violations(constant) == []
    dynamic = make([helper.make_node("ReduceMean", ["x", "a"], ["y"])], [vi("x", [2, 4]), vi("a", [1], TP.INT64)],
                   [vi("y", None)])
    assert any("axes" in p for p in violations(dynamic))
    no_axes = make([helper.make_node("ReduceMean", ["x"], ["y"], keepdims=0)], [vi("x", [2, 4])], [vi("y", [])])
    assert violations(no_axes) == []


def test_squeeze_axes_must_be_constant():
    folded = make([helper.make_node("Neg", ["axes"], ["n"]), helper.make_node("Neg", ["n"], ["a"]),
                   helper.make_node("Unsqueeze", ["x", "a"], ["y"])], [vi("x", [4])], [vi("y", None)],
                  [axes(values=(1,))])
    assert violations(folded) == []                                 # resolvable to a constant
    dynamic = make([helper.make_node("Squeeze", ["x", "a"], ["y"])], [vi("x", [4, 1]), vi("a", [1], TP.INT64)],
                   [vi("y", None)])
    assert any("axes" in p for p in violations(dynamic))


def test_attention_restrictions():
    q = [vi(n, [1, 2, 3, 4]) for n in ("q", "k", "v", "pk", "pv")]
    ok = make([helper.make_node("Attention", ["q", "k", "v"], ["y"])], q[:3], [vi("y", None)])
    assert violations(ok) == []
    past = make([helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "prk", "prv"])], q,
                [vi("y", None), vi("prk", None), vi("prv", None)])
    problems = violations(past)
    for what in ("past_key", "past_value", "present_key", "present_value"):
        assert any(what in p for p in problems)
    softcap = make([helper.make_node("Attention", ["q", "k", "v"], ["y"], softcap=1.0)], q[:3], [vi("y", None)])
    assert any("softcap" in p for p in violations(softcap))


def test_layernorm_only_first_output():
    inputs = [vi("x", [2, 4]), vi("w", [4]), vi("b", [4])]
    ok = make([helper.make_node("LayerNormalization", ["x", "w", "b"], ["y", "m", "r"])], inputs, [vi("y", None)])
    assert violations(ok) == []
    used = make([helper.make_node("LayerNormalization", ["x", "w", "b"], ["y", "m", "r"]),
                 helper.make_node("Neg", ["r"], ["z"])], inputs, [vi("y", None), vi("z", None)])
    assert any("only the first output" in p for p in violations(used))
    output = make([helper.make_node("LayerNormalization", ["x", "w", "b"], ["y", "m"])], inputs,
                  [vi("y", None), vi("m", None)])
    assert any("only the first output" in p for p in violations(output))


def test_tensorscatter_restrictions():
    ins = [vi("c", [1, 2, 8, 4]), vi("u", [1, 2, 1, 4]), vi("i", [1], TP.INT64)]
    ok = make([helper.make_node("TensorScatter", ["c", "u", "i"], ["y"], axis=-2)], ins, [vi("y", None)])
    assert violations(ok) == []
    axis = make([helper.make_node("TensorScatter", ["c", "u", "i"], ["y"], axis=2)], ins, [vi("y", None)])
    assert any("axis must be -2" in p for p in violations(axis))
    ins3 = [vi("c", [1, 8, 4]), vi("u", [1, 1, 4]), vi("i", [1], TP.INT64)]
    rank3 = make([helper.make_node("TensorScatter", ["c", "u", "i"], ["y"])], ins3, [vi("y", None)])
    assert any("4-D" in p for p in violations(rank3))


def test_scatternd_topk_cumsum_dropout_restrictions():
    ins = [vi("x", [4, 3]), vi("idx", [2, 1], TP.INT64), vi("u", [2, 3])]
    ok = make([helper.make_node("ScatterND", ["x", "idx", "u"], ["y"])], ins, [vi("y", None)])
    assert violations(ok) == []
    add = make([helper.make_node("ScatterND", ["x", "idx", "u"], ["y"], reduction="add")], ins, [vi("y", None)])
    assert any("reduction" in p for p in violations(add))
    k = helper.make_tensor("k", TP.INT64, [1], [2])
    topk_ok = make([helper.make_node("TopK", ["x", "k"], ["v", "i"])], [vi("x", [4, 3])], [vi("v", None), vi("i", None)],
                   [k])
    assert violations(topk_ok) == []
    unsorted = make([helper.make_node("TopK", ["x", "k"], ["v", "i"], sorted=0)], [vi("x", [4, 3])],
                    [vi("v", None), vi("i", None)], [k])
    assert any("sorted" in p for p in violations(unsorted))
    big = helper.make_tensor("k", TP.INT64, [1], [5000])
    topk_big = make([helper.make_node("TopK", ["x", "k"], ["v", "i"])], [vi("x", [4, 6000])],
                    [vi("v", None), vi("i", None)], [big])
    assert any("3840" in p for p in violations(topk_big))
    cumsum = make([helper.make_node("CumSum", ["x", "a"], ["y"])], [vi("x", [4]), vi("a", [], TP.INT64)], [vi("y", None)])
    assert any("axis" in p for p in violations(cumsum))


def test_graphc_graph_with_a_violation_is_reported():
    """A graphc graph altered to break a rule is caught (the checker is not vacuous on real graphs)."""
    model = build_decode(SMALL)
    for n in model.graph.node:
        if n.op_type == "TensorScatter":
            n.attribute[0].i = 2
            break
    assert any("axis must be -2" in p for p in violations(model))
    model = bind(plain_model(random_init(SMALL, 0)), random_init(SMALL, 0))
    model.graph.node.append(helper.make_node("Unique", ["input_ids"], ["u"]))
    assert any("Unique" in p for p in violations(model))
