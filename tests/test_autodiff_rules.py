"""Every VJP rule on small random shapes, and the driver's pruning/fan-in/errors.

Which reference each op is checked against (helpers in tests/gradcheck.py):

* FD - central finite differences of the ONNX forward run in onnxruntime, float64,
  eps 1e-6, rtol 1e-6: Add, Sub, Mul, Div, Sum, Neg, Identity, Pow, Sqrt, Reciprocal, Exp,
  Log, Tanh, Sigmoid, Relu, Abs, Gelu(tanh), Where, MatMul, Gemm, ReduceSum/Mean/Max/Min,
  Transpose, Reshape, Flatten, Squeeze, Unsqueeze, Expand, Concat, Split, Slice, Gather,
  GatherElements, Softmax, LogSoftmax, SoftmaxCrossEntropyLoss, NegativeLogLikelihoodLoss,
  LayerNormalization (float64: statistics recomputed in float64);
* FD on the float64 reference backend (``graphc.backends.reference``, forward and
  training graphs in float64 numpy) - Erf, exact Gelu and Attention: onnxruntime has no
  float64 Erf kernel, and its float64 Attention is only accurate to ~1e-8 (float32
  inside), which would swamp eps = 1e-6; onnxruntime's and the reference's forwards are
  checked against an independent numpy attention first;
* DOT - the dot-product test <J^T c, t> == <c, J t> (float64) on larger batched MatMuls;
* TORCH - torch.autograd in float64 on the same inputs, for float32 graphs: Erf and exact
  Gelu (their float32 code paths), Gelu(tanh),
  and the float32 code paths of LayerNormalization (reuses the forward's Mean/InvStdDev)
  and Attention;
* EXACT - closed forms: Cast (a linear map), ReduceMax ties, Gather duplicates
  (np.add.at), and the run-time broadcast reductions (numpy).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from graphc.errors import GraphcError
from graphc.ir.builder import GraphBuilder
from graphc.passes.autodiff import differentiate, grad_name
from graphc.passes.autodiff import rules_attention, rules_elementwise, rules_normalization
from graphc.passes.autodiff.registry import VJP
from gradcheck import backward_nodes, check_dot, check_fd, check_torch, make_case, run

F64 = np.float64


@pytest.fixture(autouse=True)
def primitive_rules(monkeypatch):
    """Test the primitive decompositions even if a fused-rule module replaced them."""
    monkeypatch.setitem(VJP, ("", "Attention"), rules_attention.attention)
    monkeypatch.setitem(VJP, ("", "LayerNormalization"), rules_normalization.layer_norm)
    monkeypatch.setitem(VJP, ("", "Gelu"), rules_elementwise.gelu)


def rnd(*shape, seed=0, low=None, high=None, dtype=F64):
    rng = np.random.default_rng(seed + 7 * len(shape) + sum(shape))
    if low is not None:
        return rng.uniform(low, high, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def op(op_type, *names, outputs=1, **attrs):
    """A one-node build function: inputs by name ("" for a missing optional input)."""
    def fn(b, v):
        return b.op(op_type, *[v[n] if n else None for n in names], outputs=outputs, **attrs)
    return fn


# ----------------------------------------------------------------------------- elementwise (FD)
BINARY_SHAPES = [((3, 4), (4,)), ((2, 1, 4), (3, 1)), ((3, 4), (3, 4)), ((4,), (3, 4)), ((), (2, 3))]


@pytest.mark.parametrize("op_type", ["Add", "Sub", "Mul"])
@pytest.mark.parametrize("sa,sb", BINARY_SHAPES)
def test_binary_broadcast(op_type, sa, sb):
    check_fd(make_case(op(op_type, "a", "b"), {"a": rnd(*sa, seed=1), "b": rnd(*sb, seed=2)}))


@pytest.mark.parametrize("sa,sb", BINARY_SHAPES)
def test_div_broadcast(sa, sb):
    check_fd(make_case(op("Div", "a", "b"), {"a": rnd(*sa, seed=1), "b": rnd(*sb, seed=2, low=0.5, high=2.0)}))


def test_sum_variadic_broadcast():
    check_fd(make_case(op("Sum", "a", "b", "c"), {"a": rnd(3, 4), "b": rnd(4, seed=1), "c": rnd(2, 1, 1, seed=2)}))


def test_mul_same_input_twice():
    case = make_case(op("Mul", "x", "x"), {"x": rnd(3, 4)})
    check_fd(case)


def test_mul_by_constant_gets_no_gradient_for_the_constant():
    case = make_case(op("Mul", "x", "c"), {"x": rnd(3, 4)}, consts={"c": np.array(2.5)})
    check_fd(case)


@pytest.mark.parametrize("op_type,low,high", [
    ("Neg", None, None), ("Identity", None, None), ("Sqrt", 0.5, 2.0), ("Reciprocal", 0.5, 2.0),
    ("Exp", None, None), ("Log", 0.5, 2.0), ("Tanh", None, None), ("Sigmoid", None, None),
    ("Relu", None, None), ("Abs", None, None),
])
def test_unary(op_type, low, high):
    x = rnd(3, 5, low=low, high=high)
    if op_type in ("Relu", "Abs"):
        x[np.abs(x) < 1e-3] = 0.5  # away from the kink
    check_fd(make_case(op(op_type, "x"), {"x": x}))


@pytest.mark.parametrize("exponent", [2.0, 3.0, 0.5, -1.5, 1.0])
def test_pow_constant_exponent(exponent):
    case = make_case(op("Pow", "x", "e"), {"x": rnd(3, 4, low=0.5, high=2.0)}, consts={"e": np.array(exponent)})
    check_fd(case)


def test_pow_tensor_exponent_broadcast():
    check_fd(make_case(op("Pow", "x", "e"), {"x": rnd(3, 4, low=0.5, high=2.0), "e": rnd(4, seed=3)}))


def test_pow_integer_exponent_input():
    case = make_case(op("Pow", "x", "e"), {"x": rnd(3, 4, low=0.5, high=2.0)}, consts={"e": np.array(3, np.int64)})
    check_fd(case)


def test_gelu_tanh_fd():
    check_fd(make_case(op("Gelu", "x", approximate="tanh"), {"x": rnd(4, 6) * 2}))


def test_erf_float64_fd_on_the_reference_backend():
    check_fd(make_case(op("Erf", "x"), {"x": rnd(4, 6) * 1.5}, backend="reference"))


def test_gelu_exact_float64_fd_on_the_reference_backend():
    check_fd(make_case(op("Gelu", "x"), {"x": rnd(4, 6) * 2}, backend="reference"))


def test_erf_float32_vs_torch():
    # onnxruntime has no float64 Erf kernel: float32 graph against torch float64 (TORCH)
    x = rnd(4, 6, dtype=np.float32) * 1.5
    check_torch(make_case(op("Erf", "x"), {"x": x}), lambda x: torch.erf(x))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_float32_vs_torch(approximate):
    x = rnd(4, 6, dtype=np.float32) * 2
    case = make_case(op("Gelu", "x", approximate=approximate), {"x": x})
    check_torch(case, lambda x: torch.nn.functional.gelu(x, approximate=approximate))


def test_where_broadcast():
    cond = rnd(3, 4, seed=5) > 0
    case = make_case(op("Where", "c", "a", "b"), {"a": rnd(3, 1, seed=1), "b": rnd(4, seed=2)}, consts={"c": cond})
    check_fd(case)


def test_where_condition_from_graph_is_not_differentiated():
    def fn(b, v):
        return b.Where(b.Greater(v["x"], v["y"]), v["x"], v["y"])   # max(x, y)
    case = make_case(fn, {"x": rnd(3, 4, seed=1), "y": rnd(3, 4, seed=2)})
    check_fd(case)


def test_cast_gradient_is_cast_back_exactly():
    # EXACT: loss = sum(cast(x, f32) * c) is linear in x with gradient c (cast to float64)
    x = rnd(3, 4)
    case = make_case(op("Cast", "x", to=TensorProto.FLOAT), {"x": x})
    grads = case.grads()
    assert grads["x"].dtype == F64
    np.testing.assert_array_equal(grads["x"], case.cotangents[0].astype(F64))


def test_cast_from_int_has_no_gradient():
    def fn(b, v):
        return b.Mul(v["x"], b.Cast(v["i"], to=TensorProto.DOUBLE))
    case = make_case(fn, {"x": rnd(3, 4), "i": np.arange(12, dtype=np.int64).reshape(3, 4)})
    check_fd(case)


# ----------------------------------------------------------------------------- matmul / gemm (FD)
@pytest.mark.parametrize("sa,sb", [
    ((3, 4), (4, 5)), ((2, 3, 4, 5), (5, 6)), ((5,), (5, 6)), ((5,), (2, 5, 6)), ((2, 3, 4), (4,)),
    ((4,), (4,)), ((2, 1, 4, 5), (3, 5, 6)), ((4, 5), (2, 5, 3)), ((2, 3, 4), (2, 4, 5)), ((3, 4), (4,)),
])
def test_matmul(sa, sb):
    check_fd(make_case(op("MatMul", "a", "b"), {"a": rnd(*sa, seed=1), "b": rnd(*sb, seed=2)}))


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [None, (5,), (1, 5), (3, 1), (), (3, 5)])
def test_gemm(trans_a, trans_b, bias):
    a = rnd(*((4, 3) if trans_a else (3, 4)), seed=1)
    b = rnd(*((5, 4) if trans_b else (4, 5)), seed=2)
    inputs = {"a": a, "b": b}
    names = ["a", "b"]
    if bias is not None:
        inputs["c"] = rnd(*bias, seed=3)
        names.append("c")
    case = make_case(op("Gemm", *names, transA=trans_a, transB=trans_b, alpha=0.7, beta=1.3), inputs)
    check_fd(case)


def test_gemm_default_alpha_beta_bias_n():
    check_fd(make_case(op("Gemm", "x", "w", "b", transB=1), {"x": rnd(3, 4), "w": rnd(5, 4, seed=1), "b": rnd(5, seed=2)}))


@pytest.mark.parametrize("which", ["a", "b"])
@pytest.mark.parametrize("batch_x", [(2, 3), (1, 3)])
def test_matmul_with_transposed_operand(which, batch_x):
    # attention's q @ k^T: the gradient of k is computed directly (no transpose back and forth)
    def fn(b, v):
        t = b.Transpose(v["x"], perm=[0, 1, 3, 2])
        return b.MatMul(t, v["y"]) if which == "a" else b.MatMul(v["y"], t)
    x = rnd(*batch_x, 4, 5, seed=1)
    y = rnd(2, 3, 4, 6, seed=2) if which == "a" else rnd(2, 3, 6, 5, seed=2)
    case = make_case(fn, {"x": x, "y": y})
    check_fd(case)
    if batch_x == (2, 3):
        assert sum(n.op_type == "Transpose" for n in backward_nodes(case.train)) == 1   # fused by onnxruntime


def test_matmul_dot_product_larger():
    # DOT on shapes where per-element FD would be slow
    check_dot(make_case(op("MatMul", "a", "b"), {"a": rnd(2, 3, 16, 24, seed=1), "b": rnd(2, 3, 24, 16, seed=2)}))


# ----------------------------------------------------------------------------- reductions (FD)
@pytest.mark.parametrize("op_type", ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin"])
@pytest.mark.parametrize("axes,keepdims", [([1], 1), ([1], 0), ([-1, 0], 0), (None, 0), (None, 1), ([0, 2], 1)])
def test_reductions(op_type, axes, keepdims):
    def fn(b, v):
        return b.op(op_type, v["x"], b.i64(*axes) if axes is not None else None, keepdims=keepdims)
    check_fd(make_case(fn, {"x": rnd(2, 3, 4)}))


def test_reduce_noop_with_empty_axes():
    check_fd(make_case(op("ReduceSum", "x", noop_with_empty_axes=1), {"x": rnd(2, 3)}))


def test_reduce_max_ties_share_the_gradient():
    x = np.array([[1.0, 3.0, 3.0], [2.0, 0.0, -1.0]])
    case = make_case(lambda b, v: b.ReduceMax(v["x"], b.i64(1), keepdims=0), {"x": x},
                     cotangents=[np.array([1.0, 1.0])])
    np.testing.assert_allclose(case.grads()["x"], [[0, 0.5, 0.5], [1, 0, 0]])


# ----------------------------------------------------------------------------- shape ops (FD)
def test_transpose():
    check_fd(make_case(op("Transpose", "x", perm=[2, 0, 1]), {"x": rnd(2, 3, 4)}))
    check_fd(make_case(op("Transpose", "x"), {"x": rnd(2, 3, 4)}))


def test_reshape_flatten_squeeze_unsqueeze():
    def fn(b, v):
        x = b.Reshape(v["x"], b.i64(3, -1))                   # [3, 8]
        x = b.Unsqueeze(x, b.i64(0, -1))                      # [1, 3, 8, 1]
        x = b.Squeeze(x, b.i64(0))                            # [3, 8, 1]
        x = b.Flatten(b.Mul(x, x), axis=2)                    # [24, 1]
        return b.Squeeze(x)                                   # [24]
    check_fd(make_case(fn, {"x": rnd(2, 3, 4)}))


def test_expand():
    check_fd(make_case(lambda b, v: b.Expand(v["x"], b.i64(2, 3, 4)), {"x": rnd(3, 1)}))


def test_concat_with_constant_piece():
    case = make_case(op("Concat", "a", "c", "b", axis=1), {"a": rnd(3, 2, seed=1), "b": rnd(3, 4, seed=2)},
                     consts={"c": np.ones((3, 1))})
    check_fd(case)


def test_split_with_sizes_and_unused_output():
    def fn(b, v):
        p, q, r = b.Split(v["x"], b.i64(1, 3, 2), axis=1, outputs=3)
        return [b.Mul(p, p), r]                              # q gets no gradient: zeros
    check_fd(make_case(fn, {"x": rnd(3, 6)}))


def test_split_num_outputs_without_split_input():
    def fn(b, v):
        outs = b.Split(v["x"], axis=0, num_outputs=3, outputs=3)   # 7 rows -> 3, 3, 1
        return [outs[0], b.Exp(outs[2])]
    check_fd(make_case(fn, {"x": rnd(7, 2)}))


@pytest.mark.parametrize("starts,ends,axes,steps", [
    ([1], [3], [0], None),
    ([-3, 1], [100, -1], [1, 0], None),
    ([0, 4], [5, 0], [0, 1], [2, -1]),
    ([-1], [-6], [1], [-2]),
    ([1, 1], [2, 3], None, None),
])
def test_slice_static(starts, ends, axes, steps):
    def fn(b, v):
        return b.Slice(v["x"], b.i64(*starts), b.i64(*ends), b.i64(*axes) if axes else None,
                       b.i64(*steps) if steps else None)
    check_fd(make_case(fn, {"x": rnd(5, 6)}))


@pytest.mark.parametrize("end", [3, 5, 9, -2])
def test_slice_dynamic_end(end):
    # like GPT-2's wpe[:T]: the end is only known at run time (an int graph input)
    case = make_case(op("Slice", "x", "s", "e", "a"), {"x": rnd(5, 3), "e": np.array([end], np.int64)},
                     consts={"s": np.array([0], np.int64), "a": np.array([0], np.int64)})
    check_fd(case)


def test_slice_dynamic_end_from_shape():
    def fn(b, v):
        t = b.Shape(v["tok"], start=1, end=2)                        # [T]
        pos = b.Slice(v["wpe"], b.i64(0), t, b.i64(0))               # [T, C]
        return b.Add(v["emb"], pos)                                  # [B, T, C]
    case = make_case(fn, {"wpe": rnd(6, 3), "emb": rnd(2, 4, 3, seed=1), "tok": np.zeros((2, 4), np.int64)})
    check_fd(case)


def test_slice_dynamic_steps():
    case = make_case(op("Slice", "x", "s", "e", "a", "st"),
                     {"x": rnd(7, 3), "s": np.array([-1], np.int64), "e": np.array([-8], np.int64),
                      "st": np.array([-3], np.int64)}, consts={"a": np.array([0], np.int64)})
    check_fd(case)


def test_gather_axis0_duplicate_indices_accumulate():
    idx = np.array([[0, 2, 2], [4, 0, 2]], np.int64)
    case = make_case(op("Gather", "x", "i", axis=0), {"x": rnd(5, 3), "i": idx})
    grads = check_fd(case)
    expected = np.zeros((5, 3))
    np.add.at(expected, idx.reshape(-1), case.cotangents[0].reshape(-1, 3))
    np.testing.assert_allclose(grads["x"], expected, rtol=1e-12)


def test_gather_other_axis_and_negative_indices():
    idx = np.array([[1, -1], [3, 1]], np.int64)
    check_fd(make_case(op("Gather", "x", "i", axis=1), {"x": rnd(2, 4, 3), "i": idx}))


def test_gather_scalar_index_constant():
    check_fd(make_case(op("Gather", "x", "i", axis=0), {"x": rnd(4, 3)}, consts={"i": np.array(2, np.int64)}))


@pytest.mark.parametrize("axis", [0, 1])
def test_gather_elements_duplicates(axis):
    idx = np.array([[0, 1, 1], [1, 1, 0]], np.int64) if axis == 0 else np.array([[2, 2], [0, 0]], np.int64)
    check_fd(make_case(op("GatherElements", "x", "i", axis=axis), {"x": rnd(2, 3), "i": idx}))


# ----------------------------------------------------------------------------- softmax family (FD)
@pytest.mark.parametrize("op_type", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax(op_type, axis):
    check_fd(make_case(op(op_type, "x", axis=axis), {"x": rnd(3, 5)}))


def test_cross_entropy_chain():
    def fn(b, v):
        logp = b.LogSoftmax(v["z"], axis=-1)
        picked = b.GatherElements(logp, b.Reshape(v["t"], b.i64(-1, 1)), axis=1)
        return b.Neg(b.ReduceMean(picked, keepdims=0))
    case = make_case(fn, {"z": rnd(6, 5), "t": np.array([0, 4, 4, 1, 0, 0], np.int64)}, cotangents=[np.array(1.0)])
    check_fd(case)
    # the sparse path: one scatter into -softmax * sum(g), no zeros and no full-size reduction
    ops = [n.op_type for n in backward_nodes(case.train)]
    assert ops.count("ScatterElements") == 1 and "ConstantOfShape" not in ops and "Sub" not in ops


def test_gather_elements_gradient_summed_with_dense_one():
    def fn(b, v):
        logp = b.LogSoftmax(v["z"], axis=1)
        picked = b.GatherElements(logp, v["t"], axis=1)                  # sparse gradient into logp
        return [picked, b.Mul(logp, logp)]                              # plus a dense one
    case = make_case(fn, {"z": rnd(4, 5), "t": np.array([[0, 0], [4, 1], [2, 2], [3, 0]], np.int64)})
    check_fd(case)
    ops = [n.op_type for n in backward_nodes(case.train)]
    assert "ConstantOfShape" not in ops        # the scatter adds into the dense gradient instead of zeros


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weights,ignore", [(False, None), (True, None), (False, 2), (True, 0)])
@pytest.mark.parametrize("op_type", ["SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss"])
def test_classification_losses(op_type, reduction, weights, ignore):
    labels = np.array([[0, 2, 1], [2, 3, 0]], np.int64)                 # N=2, d1=3 (K-dimensional)
    inputs = {"x": rnd(2, 4, 3) if op_type == "SoftmaxCrossEntropyLoss" else -rnd(2, 4, 3, low=0.1, high=3.0),
              "t": labels}
    names = ["x", "t"]
    if weights:
        inputs["w"] = rnd(4, low=0.5, high=2.0, seed=4)
        names.append("w")
    case = make_case(op(op_type, *names, reduction=reduction, ignore_index=ignore), inputs,
                     wrt=["x"])
    check_fd(case)


def test_softmax_cross_entropy_log_prob_output_too():
    def fn(b, v):
        loss, logp = b.SoftmaxCrossEntropyLoss(v["x"], v["t"], outputs=2)
        return [loss, logp]
    check_fd(make_case(fn, {"x": rnd(3, 5), "t": np.array([4, 0, 4], np.int64)}, wrt=["x"]))


def test_nll_after_log_softmax_is_sparse():
    def fn(b, v):
        return b.NegativeLogLikelihoodLoss(b.LogSoftmax(v["x"], axis=1), v["t"])
    case = make_case(fn, {"x": rnd(3, 5), "t": np.array([4, 0, 4], np.int64)})
    check_fd(case)
    assert "ConstantOfShape" not in [n.op_type for n in backward_nodes(case.train)]


# ----------------------------------------------------------------------------- layer norm
@pytest.mark.parametrize("shape,axis,bias", [((4, 6), -1, True), ((2, 3, 4), 1, True), ((3, 5), -1, False)])
def test_layernorm_fd(shape, axis, bias):
    norm = shape[axis:] if axis >= 0 else shape[axis:]
    inputs = {"x": rnd(*shape) * 2 + 1, "w": rnd(*norm, seed=1), "b": rnd(*norm, seed=2)}
    if not bias:
        del inputs["b"]
    names = ["x", "w", "b"] if bias else ["x", "w"]
    check_fd(make_case(op("LayerNormalization", *names, axis=axis, epsilon=1e-5), inputs))


def test_layernorm_float32_vs_torch():
    # the float32 path reuses the forward node's Mean/InvStdDev outputs (TORCH)
    x = rnd(8, 16, dtype=np.float32) * 3 + 1
    w, bb = rnd(16, seed=1, dtype=np.float32), rnd(16, seed=2, dtype=np.float32)
    case = make_case(op("LayerNormalization", "x", "w", "b", epsilon=1e-5), {"x": x, "w": w, "b": bb})
    check_torch(case, lambda x, w, b: torch.nn.functional.layer_norm(x, (16,), w, b, 1e-5))
    ln = next(n for n in case.train.graph.node if n.op_type == "LayerNormalization")
    assert len([o for o in ln.output if o]) == 3


# ----------------------------------------------------------------------------- attention
def torch_attention(q, k, v, causal, scale=None):
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if causal:
        tq, tk = s.shape[-2:]
        s = s.masked_fill(torch.ones(tq, tk, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def numpy_attention(q, k, v, causal, scale=None):
    s = (q @ np.swapaxes(k, -1, -2)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if causal:
        tq, tk = s.shape[-2:]
        s = np.where(np.tril(np.ones((tq, tk), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("tq,tk,scale", [(4, 4, None), (3, 5, 0.3), (5, 5, 0.7)])
def test_attention_fd(causal, tq, tk, scale):
    # onnxruntime's float64 Attention is only accurate to ~1e-8 (float32 inside), so the
    # case runs on the float64 reference backend; onnxruntime's forward (1e-6) and the
    # reference's (1e-12) must agree with an independent numpy attention (and so with the
    # top-left causal convention the rule assumes).
    inputs = {"q": rnd(2, 2, tq, 3, seed=1), "k": rnd(2, 2, tk, 3, seed=2), "v": rnd(2, 2, tk, 4, seed=3)}
    build = op("Attention", "q", "k", "v", is_causal=causal, scale=scale)
    case = make_case(build, inputs, backend="reference")
    graph_scale = None if scale is None else float(np.float32(scale))   # ONNX float attributes are float32
    expected = case.loss_fn(lambda q, k, v: numpy_attention(q, k, v, causal, graph_scale))(inputs)
    np.testing.assert_allclose(case.loss_fn()(inputs), expected, rtol=1e-12)
    on_ort = make_case(build, inputs, cotangents=case.cotangents)
    np.testing.assert_allclose(on_ort.loss_fn()(inputs), expected, rtol=1e-6)
    check_fd(case)


def test_attention_float32_vs_torch():
    inputs = {n: rnd(2, 3, 8, 4, seed=i, dtype=np.float32) for i, n in enumerate("qkv")}
    case = make_case(op("Attention", "q", "k", "v", is_causal=1), inputs)
    check_torch(case, lambda q, k, v: torch_attention(q, k, v, True))


def test_attention_unsupported_forms_raise():
    inputs = {n: rnd(1, 2, 3, 4, seed=i) for i, n in enumerate("qkv")}
    inputs["m"] = np.ones((3, 3), bool)
    case = make_case(op("Attention", "q", "k", "v", "m"), inputs)
    with pytest.raises(NotImplementedError, match="mask"):
        case.grads()


# ----------------------------------------------------------------------------- driver
def test_missing_rule_names_node_and_op():
    def fn(b, v):
        return b.Sin(v["x"], name="my_sine")
    case = make_case(fn, {"x": rnd(3)})
    with pytest.raises(NotImplementedError, match=r"Sin.*my_sine"):
        case.grads()


def test_missing_rule_off_the_path_is_fine():
    def fn(b, v):
        return [b.Mul(v["x"], v["x"]), b.Sin(v["c"])]
    case = make_case(fn, {"x": rnd(3), "c": rnd(3, seed=1)}, wrt=["x"])
    check_fd(case)


def test_pruning_unrelated_branch_gets_no_backward_nodes():
    def fn(b, v):
        y = b.Mul(v["x"], v["w"], name="main")
        side = b.Exp(b.Tanh(v["u"], name="side_tanh"), name="side_exp")   # loss depends on u, not on w
        return [y, side]
    case = make_case(fn, {"x": rnd(3, 4), "w": rnd(4, seed=1), "u": rnd(3, seed=2)}, wrt=["w"])
    check_fd(case)
    names = [n.name for n in backward_nodes(case.train)]
    assert not any("side" in n for n in names), names
    assert any("main" in n for n in names)


def test_fan_in_is_one_sum():
    def fn(b, v):
        h = b.Tanh(v["x"], name="h")                    # used three times
        return b.Add(b.Mul(h, v["w"]), b.Add(b.Exp(h), b.Sigmoid(h)))
    case = make_case(fn, {"x": rnd(3, 4), "w": rnd(3, 4, seed=1)})
    check_fd(case)
    sums = [n for n in backward_nodes(case.train) if n.op_type == "Sum"]
    assert len(sums) == 1 and len(sums[0].input) == 3
    tanh_rule = [n for n in case.train.graph.node if n.name.startswith("grad/h/")]   # consumes dL/dh
    assert any(sums[0].output[0] in n.input for n in tanh_rule)
    assert not any(n.op_type == "Add" and n.name.startswith("grad") for n in case.train.graph.node)


def test_integer_subgraph_not_differentiated():
    def fn(b, v):
        n = b.Shape(v["x"], start=1, end=2)                                   # [4]
        r = b.Cast(b.Range(b.const(np.array(0, np.int64)), b.Squeeze(n, b.i64(0)),
                           b.const(np.array(1, np.int64))), to=TensorProto.DOUBLE)
        return b.Mul(v["x"], r)
    case = make_case(fn, {"x": rnd(3, 4)})
    check_fd(case)
    ops = {n.op_type for n in backward_nodes(case.train)}
    assert "Range" not in ops


def test_unused_wrt_gets_zeros_with_a_warning():
    case = make_case(op("Exp", "x"), {"x": rnd(3), "unused": rnd(2, 5, seed=1)})
    with pytest.warns(UserWarning, match="unused"):
        grads = case.grads()
    assert grads["unused"].shape == (2, 5) and not grads["unused"].any()


def test_wrt_initializer_and_outputs_order():
    b = GraphBuilder("g")
    x = b.input("x", F64, [2, 3])
    w = b.const(rnd(3, 4, seed=1), "w")
    y = b.MatMul(x, w)
    b.output(y, "y")
    b.output(b.ReduceSum(b.Mul(y, y), keepdims=0), "loss")
    model = b.model()
    before = model.SerializeToString()
    train = differentiate(model, "loss", [w, "x"])
    assert model.SerializeToString() == before          # the input model is left alone
    onnx.checker.check_model(train, full_check=True)
    assert [o.name for o in train.graph.output] == ["loss", "y", grad_name(w), "grad.x"]
    assert [i.name for i in train.graph.input] == ["x"]
    assert [t.name for t in train.graph.initializer] == [t.name for t in model.graph.initializer]
    dims = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in train.graph.output[2:]]
    assert dims == [[3, 4], [2, 3]]
    xv = rnd(2, 3, seed=2)
    out = run(train, {"x": xv})
    wv = onnx.numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_allclose(out[grad_name(w)], xv.T @ (2 * xv @ wv), rtol=1e-12)
    train2 = differentiate(model, "loss", ["x"], keep_outputs=False)
    assert [o.name for o in train2.graph.output] == ["loss", "grad.x"]


def test_symbolic_dims_that_may_broadcast():
    # x [N, 4] + y [M, 4]: M is 1 or N only at run time (the split-axis reduction)
    b = GraphBuilder("g")
    x, y = b.input("x", F64, ["N", 4]), b.input("y", F64, ["M", 4])
    c = b.input("c", F64, ["N", 4])
    b.output(b.ReduceSum(b.Mul(b.Add(x, y), c), keepdims=0), "loss")
    train = differentiate(b.model(), "loss", ["x", "y"])
    onnx.checker.check_model(train, full_check=True)
    for m in (1, 3):
        feeds = {"x": rnd(3, 4), "y": rnd(m, 4, seed=1), "c": rnd(3, 4, seed=2)}
        out = run(train, feeds)
        np.testing.assert_allclose(out["grad.y"], feeds["c"].sum(0, keepdims=True) if m == 1 else feeds["c"])
        np.testing.assert_allclose(out["grad.x"], feeds["c"])


def unbroadcast(g, shape):
    g = g.sum(axis=tuple(range(g.ndim - len(shape))))
    return g.sum(axis=tuple(i for i, d in enumerate(shape) if d == 1), keepdims=True)


def test_unknown_rank_uses_runtime_reduction():
    b = GraphBuilder("g")
    x, y = b.input("x", F64, None), b.input("y", F64, None)
    b.output(b.ReduceSum(b.Mul(b.Mul(x, y), x), keepdims=0), "loss")
    train = differentiate(b.model(), "loss", ["x", "y"])   # (rank-less inputs: the checker rejects even the forward)
    assert any(n.op_type == "Compress" for n in train.graph.node)   # axes computed at run time
    for sx, sy in [((3, 4), (4,)), ((2, 1, 4), (3, 1)), ((3,), (2, 3)), ((2, 3), (2, 3))]:
        feeds = {"x": rnd(*sx), "y": rnd(*sy, seed=1)}
        out = run(train, feeds)
        full = np.broadcast_shapes(sx, sy)
        np.testing.assert_allclose(out["grad.y"], unbroadcast(np.broadcast_to(feeds["x"] ** 2, full), sy), rtol=1e-12)
        np.testing.assert_allclose(out["grad.x"], unbroadcast(2 * feeds["x"] * feeds["y"], sx), rtol=1e-12)


@pytest.mark.parametrize("loss,wrt,match", [
    ("nope", ["x"], "not a value"),
    ("y", ["x"], "scalar"),
    ("loss", ["zz"], "not a value"),
    ("loss", ["y"], "intermediate"),
    ("loss", ["i"], "not floating point"),
    ("loss", ["x", "x"], "twice"),
])
def test_bad_loss_or_wrt(loss, wrt, match):
    b = GraphBuilder("g")
    x = b.input("x", F64, [3])
    i = b.input("i", np.int64, [3])
    y = b.Mul(x, b.Cast(i, to=TensorProto.DOUBLE))
    b.output(y, "y")
    b.output(b.ReduceSum(y, keepdims=0), "loss")
    with pytest.raises(GraphcError, match=match):
        differentiate(b.model(), loss, wrt)


def test_int_loss_rejected():
    b = GraphBuilder("g")
    x = b.input("x", np.int64, [3])
    b.output(b.ReduceSum(x, keepdims=0), "loss")
    with pytest.raises(GraphcError, match="floating-point"):
        differentiate(b.model(), "loss", [])


def test_older_opset_model_is_converted():
    x = helper.make_tensor_value_info("x", TensorProto.DOUBLE, [3, 4])
    loss = helper.make_tensor_value_info("loss", TensorProto.DOUBLE, [])
    nodes = [helper.make_node("Softmax", ["x"], ["s"], axis=1),
             helper.make_node("ReduceSum", ["s"], ["r"], axes=[1], keepdims=0),
             helper.make_node("Mul", ["r", "r"], ["r2"]),
             helper.make_node("ReduceSum", ["r2"], ["loss"], keepdims=0)]
    model = helper.make_model(helper.make_graph(nodes, "old", [x], [loss]), opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    train = differentiate(model, "loss", ["x"])
    out = run(train, {"x": rnd(3, 4)})
    assert out["grad.x"].shape == (3, 4)


def test_dtype_float32_everywhere():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = rnd(3, 4, dtype=np.float32)
        case = make_case(lambda b, v: b.Div(b.Sqrt(b.Add(b.Mul(v["x"], v["x"]), b.scalar(1.0))), b.scalar(3.0)),
                         {"x": x})
        g = case.grads()["x"]
    assert g.dtype == np.float32
    np.testing.assert_allclose(g, (x / np.sqrt(x * x + 1) / 3) * case.cotangents[0], rtol=1e-6)
