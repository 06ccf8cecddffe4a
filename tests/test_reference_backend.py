"""The float64 reference backend (graphc/backends/reference.py): every graph graphc builds
runs on it and agrees with onnxruntime, its op table covers them all, single ops agree with
onnxruntime's independent kernels, and the optimised (fused) training graph computed in
float64 equals PyTorch's float64 autograd far below float32 noise."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper

from graphc.backends import get_backend
from graphc.backends.reference import OPS, ReferenceBackend, unsupported_nodes
from graphc.compare import Run, compare, decode_case, run_model
from graphc.errors import GraphcError
from graphc.models.config import GPT2Config
from graphc.models.gpt2 import build_forward
from graphc.models.init import random_init
from graphc.models.kv_cache import build_decode, build_decoder_with_past, build_prefill, cache_shape, hf_past_name, past_name
from graphc.passes.pipelines import optimize
from graphc.runtime.programs import forward_graph, training_graph
from helpers import random_batch, rel_err
from torch_gpt2 import TorchGPT2

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=64)
B, T = 2, 12


@pytest.fixture(scope="module")
def params():
    return random_init(SMALL, 0)


def _tokens(rng, shape):
    return rng.integers(0, SMALL.vocab_size, shape, dtype=np.int64)


def batch_feeds(rng):
    return {"tokens": _tokens(rng, (B, T)), "targets": _tokens(rng, (B, T))}


def prefill_feeds(rng, capacity=16):
    feeds = {"tokens": _tokens(rng, (B, T)), "lengths": np.array([T, T - 3], np.int64)}
    for layer in range(SMALL.n_layer):
        for kind in ("key", "value"):
            feeds[past_name(layer, kind)] = np.zeros(cache_shape(SMALL, B, capacity), np.float32)
    return feeds


def decoder_with_past_feeds(rng, past=5, seq=2):
    feeds = {"input_ids": _tokens(rng, (B, seq)), "attention_mask": np.ones((B, past + seq), np.int64),
             "position_ids": np.tile(np.arange(past, past + seq, dtype=np.int64), (B, 1))}
    feeds["attention_mask"][1, :2] = 0            # a left-padded sequence
    for layer in range(SMALL.n_layer):
        for kind in ("key", "value"):
            feeds[hf_past_name(layer, kind)] = rng.standard_normal(cache_shape(SMALL, B, past)).astype(np.float32)
    return feeds


GRAPHS = {
    "forward": (lambda: build_forward(SMALL), batch_feeds),
    "forward optimised": (lambda: forward_graph(SMALL, loss=True, logits=True), batch_feeds),
    "training optimised": (lambda: training_graph(SMALL), batch_feeds),
    "training unoptimised": (lambda: training_graph(SMALL, opt=False), batch_feeds),
    "prefill": (lambda: build_prefill(SMALL), prefill_feeds),
    "prefill all logits": (lambda: build_prefill(SMALL, all_logits=True), prefill_feeds),
    "prefill optimised": (lambda: optimize(build_prefill(SMALL), "infer")[0], prefill_feeds),
    "decoder with past": (lambda: build_decoder_with_past(SMALL), decoder_with_past_feeds),
}


@pytest.mark.parametrize("name", list(GRAPHS))
def test_graphs_agree_with_onnxruntime(params, name):
    build, feeds = GRAPHS[name]
    model = build()
    assert unsupported_nodes(model.graph.node, {(f.domain, f.name): f for f in model.functions}) == []
    result = compare([Run("onnxruntime", "onnxruntime", model), Run("reference", "reference", model)],
                     {**feeds(np.random.default_rng(0)), **params.feeds()})
    assert len(result.diffs) == len(model.graph.output)
    assert result.ok, [d.line() for d in result.diffs if not d.ok]


@pytest.mark.parametrize("opt", [True, False])
def test_decode_step_agrees_with_onnxruntime(params, opt):
    case = decode_case(params, B, 16, seed=1)
    model = case.graph(opt=opt)
    result = compare([Run("onnxruntime", "onnxruntime", model), Run("reference", "reference", model)], case.feeds)
    assert len(result.diffs) == 1 + 2 * SMALL.n_layer   # logits and every present.*
    assert result.ok, [d.line() for d in result.diffs if not d.ok]


def test_fused_training_graph_in_float64_equals_pytorch_float64():
    """The fused backward ops' function bodies, run in float64, give PyTorch's float64
    gradients: agreement limited only by graphc's float32 attributes/constants (1e-5
    epsilon, GELU's 0.044715), far below the 1e-4 that float32 execution needs."""
    params = random_init(SMALL, 1)
    tokens, targets = random_batch(SMALL, B, T, seed=2)
    model = training_graph(SMALL)
    prepared = ReferenceBackend(keep_float64=True).prepare(model)
    prepared.bind(params.feeds())
    out = prepared.run({"tokens": tokens, "targets": targets})
    assert out["loss"].dtype == np.float64 and out["grad.wte"].dtype == np.float64
    ref = TorchGPT2(params, dtype=torch.float64)
    _, loss = ref(torch.from_numpy(tokens), torch.from_numpy(targets))
    loss.backward()
    ref_loss = float(loss.detach())
    assert abs(float(out["loss"]) - ref_loss) <= 1e-9 * abs(ref_loss)
    ref_grads = ref.grads()
    errors = {}
    for spec in params.specs:
        expected = ref_grads[spec.tensor] if spec.layer is None else ref_grads[spec.tensor][spec.layer]
        errors[spec.name] = rel_err(out[f"grad.{spec.name}"], expected)
    print(f"worst float64 gradient error vs PyTorch: {max(errors.values()):.2e}")
    bad = {k: e for k, e in errors.items() if not e <= 1e-7}
    assert not bad, bad


# ----------------------------------------------------------------------------- the backend's contract
def test_registered_and_supports_answers_from_the_table():
    backend = get_backend("reference")
    assert backend is ReferenceBackend and backend.available() == (True, "")
    assert backend.supports("MatMul") and backend.supports("TensorScatter") and backend.supports("Attention")
    assert backend.supports("AttentionGrad", "graphc")          # a local function: its body runs
    assert not backend.supports("Unique") and not backend.supports("Foo", "com.example")
    assert all(backend.supports(op, domain) for domain, op in OPS)


def one_node(op_type, inputs, outputs, domain="", **attrs):
    g = helper.make_graph([helper.make_node(op_type, [i.name for i in inputs], [o.name for o in outputs],
                                            domain=domain or None, **attrs)], "one", inputs, outputs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 24)])
    m.ir_version = 10
    return m


def vi(name, shape, t=TP.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def test_unsupported_op_is_a_one_line_error_before_running():
    m = one_node("Unique", [vi("x", [4])], [vi("y", None)])
    with pytest.raises(GraphcError, match=r"cannot run node .*Unique") as e:
        ReferenceBackend().prepare(m)
    assert "\n" not in str(e.value)


def test_outputs_in_declared_dtype_or_float64_and_bound_inputs_are_borrowed():
    m = one_node("MatMul", [vi("a", [2, 3]), vi("w", [3, 2])], [vi("y", [2, 2])])
    a = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    w = np.ones((3, 2), np.float32)
    p = ReferenceBackend().prepare(m)
    p.bind({"w": w})
    y = p.run({"a": a})["y"]
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, a.astype(np.float64) @ w.astype(np.float64), rtol=1e-7)
    w *= 2                                                   # in place, as the optimizer updates params
    out = np.empty((2, 2), np.float32)
    assert p.run({"a": a}, outputs={"y": out})["y"] is out
    np.testing.assert_allclose(out, 2 * y, rtol=1e-7)
    y64 = ReferenceBackend(keep_float64=True).prepare(m).run({"a": a, "w": w})["y"]
    assert y64.dtype == np.float64
    assert np.array_equal(y64, a.astype(np.float64) @ w.astype(np.float64))


# ----------------------------------------------------------------------------- single ops vs onnxruntime
def _rng_array(shape, dtype=np.float64, seed=0, high=None):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind in "iu":
        return rng.integers(0, high, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


ATT = [vi(n, [2, 4, 3, 8], TP.DOUBLE) for n in "qkv"]
OP_CASES = {
    "ScatterND add, repeated rows": (
        one_node("ScatterND", [vi("x", [5, 3], TP.DOUBLE), vi("i", [4, 1], TP.INT64), vi("u", [4, 3], TP.DOUBLE)],
                 [vi("y", [5, 3], TP.DOUBLE)], reduction="add"),
        {"x": _rng_array((5, 3)), "i": np.array([[1], [3], [1], [1]], np.int64), "u": _rng_array((4, 3), seed=1)}),
    "ScatterElements add": (
        one_node("ScatterElements", [vi("x", [4, 3], TP.DOUBLE), vi("i", [2, 3], TP.INT64),
                                     vi("u", [2, 3], TP.DOUBLE)], [vi("y", [4, 3], TP.DOUBLE)], axis=0,
                 reduction="add"),
        {"x": _rng_array((4, 3)), "i": np.array([[0, 1, 0], [0, 3, 2]], np.int64), "u": _rng_array((2, 3), seed=2)}),
    "GatherND batch_dims=1": (
        one_node("GatherND", [vi("x", [2, 5, 3], TP.DOUBLE), vi("i", [2, 1], TP.INT64)],
                 [vi("y", None, TP.DOUBLE)], batch_dims=1),
        {"x": _rng_array((2, 5, 3)), "i": np.array([[4], [1]], np.int64)}),
    "TensorScatter per-batch index": (
        one_node("TensorScatter", [vi("c", [2, 2, 6, 3]), vi("u", [2, 2, 2, 3]), vi("i", [2], TP.INT64)],
                 [vi("y", [2, 2, 6, 3])], axis=-2),
        {"c": _rng_array((2, 2, 6, 3), np.float32), "u": _rng_array((2, 2, 2, 3), np.float32, seed=3),
         "i": np.array([1, 4], np.int64)}),
    "Attention causal scale": (
        one_node("Attention", ATT, [vi("y", None, TP.DOUBLE)], is_causal=1, scale=0.3),
        {n: _rng_array((2, 4, 3, 8), seed=i) for i, n in enumerate("qkv")}),
    "Attention with past, causal, bool mask": (
        one_node("Attention", [*ATT, vi("m", [3, 5], TP.BOOL), vi("pk", [2, 4, 2, 8], TP.DOUBLE),
                               vi("pv", [2, 4, 2, 8], TP.DOUBLE)],
                 [vi("y", None, TP.DOUBLE), vi("k2", None, TP.DOUBLE), vi("v2", None, TP.DOUBLE)], is_causal=1),
        {**{n: _rng_array((2, 4, 3, 8), seed=i) for i, n in enumerate("qkv")},
         "m": np.array([[1, 1, 0, 1, 1]] * 3, bool), "pk": _rng_array((2, 4, 2, 8), seed=7),
         "pv": _rng_array((2, 4, 2, 8), seed=8)}),
    "Attention 3-D, grouped KV heads, float mask": (
        one_node("Attention", [vi("q", [2, 3, 16], TP.DOUBLE), vi("k", [2, 5, 8], TP.DOUBLE),
                               vi("v", [2, 5, 8], TP.DOUBLE), vi("m", [3, 5], TP.DOUBLE)],
                 [vi("y", None, TP.DOUBLE)], q_num_heads=4, kv_num_heads=2),
        {"q": _rng_array((2, 3, 16)), "k": _rng_array((2, 5, 8), seed=1), "v": _rng_array((2, 5, 8), seed=2),
         "m": _rng_array((3, 5), seed=3)}),
    "LayerNormalization 3 outputs": (
        one_node("LayerNormalization", [vi("x", [3, 4, 6], TP.DOUBLE), vi("w", [4, 6], TP.DOUBLE),
                                        vi("b", [4, 6], TP.DOUBLE)],
                 [vi("y", None, TP.DOUBLE), vi("mean", None), vi("rstd", None)], axis=1,
                 epsilon=1e-3),
        {"x": _rng_array((3, 4, 6)), "w": _rng_array((4, 6), seed=1), "b": _rng_array((4, 6), seed=2)}),
    "Div int64 truncates": (
        one_node("Div", [vi("a", [4], TP.INT64), vi("b", [4], TP.INT64)], [vi("y", [4], TP.INT64)]),
        {"a": np.array([7, -7, 7, -7], np.int64), "b": np.array([2, 2, -2, -2], np.int64)}),
    "Split num_outputs uneven": (
        one_node("Split", [vi("x", [7, 2], TP.DOUBLE)], [vi(n, None, TP.DOUBLE) for n in "abc"], axis=0,
                 num_outputs=3),
        {"x": _rng_array((7, 2))}),
    "Pad with axes": (
        one_node("Pad", [vi("x", [2, 3], TP.DOUBLE), vi("p", [2], TP.INT64), vi("c", [], TP.DOUBLE),
                         vi("ax", [1], TP.INT64)], [vi("y", None, TP.DOUBLE)]),
        {"x": _rng_array((2, 3)), "p": np.array([1, 2], np.int64), "c": np.array(0.5), "ax": np.array([1], np.int64)}),
    "Slice negative step": (
        one_node("Slice", [vi("x", [5, 4], TP.DOUBLE), vi("s", [1], TP.INT64), vi("e", [1], TP.INT64),
                           vi("ax", [1], TP.INT64), vi("st", [1], TP.INT64)], [vi("y", None, TP.DOUBLE)]),
        {"x": _rng_array((5, 4)), "s": np.array([-1]), "e": np.array([-10**9]), "ax": np.array([0]),
         "st": np.array([-2])}),
}


@pytest.mark.parametrize("name", list(OP_CASES))
def test_single_ops_agree_with_onnxruntime(name):
    model, feeds = OP_CASES[name]
    ours = run_model(model, feeds, "reference")
    theirs = run_model(model, feeds, "onnxruntime")
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-6, atol=1e-7, err_msg=f"{name}: {k}")


def test_generic_train_step_runs_on_the_reference_backend_as_on_onnxruntime():
    """The seam: the base class's TrainStep (bind params once, gradients into the flat
    buffer, numpy AdamW updating it in place) works on a second backend unchanged."""
    from graphc.runtime.optimizer import AdamWConfig
    from graphc.runtime.programs import TrainSpec

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, SMALL.vocab_size, (B, T))
    losses, finals = {}, {}
    for name in ("onnxruntime", "reference"):
        backend = get_backend(name)()
        step = backend.train_step(backend.upload_params(random_init(SMALL, 0)),
                                  TrainSpec(B=B, T=T, adamw=AdamWConfig(lr=1e-3, grad_clip=1.0)))
        results = [step.run(tokens, np.roll(tokens, -1, 1), t=t, lr=1e-3) for t in (1, 2, 3)]
        losses[name] = [r.loss for r in results]
        finals[name] = step.read_params()
        assert all(r.grad_norm is not None and r.grad_norm > 0 for r in results)
    assert losses["reference"][2] < losses["reference"][0]              # it trains
    np.testing.assert_allclose(losses["reference"], losses["onnxruntime"], rtol=1e-5)
    assert rel_err(finals["reference"], finals["onnxruntime"]) <= 1e-5
