"""TensorRT legalisation and the masked-attention fusion, checked on onnxruntime: the same
outputs before and after, and what is left is what TensorRT's parser takes."""

import numpy as np
import pytest
from onnx import TensorProto as TP
from onnx import helper

from graphc.backends.tensorrt.legalize import LegalizeForTensorRT, scatter_add_to_onehot_matmul
from graphc.models.config import GPT2Config
from graphc.models.gpt2 import build_forward
from graphc.models.kv_cache import build_decode, build_decoder_with_past
from graphc.passes.manager import op_counts
from graphc.passes.pipelines import optimize
from graphc.compare import random_feeds, relative_errors, run_onnxruntime
from graphc.passes.verify import verify
from tensorrt_helpers import require_builder
from trt_ops import MATRIX, assert_trt_compatible

CFG = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=64)


@pytest.fixture(scope="module")
def train_graph():
    return optimize(build_forward(CFG, loss=True, logits=False), "train")[0]


def test_training_graph_legalised_same_outputs(train_graph):
    legal_pass = LegalizeForTensorRT()
    legal, changed = legal_pass(train_graph)
    legal = verify(legal, legal_pass.name)
    assert changed and legal_pass.stats == {"functions_inlined": 5, "scatter_add_to_matmul": 1, "attributes_dropped": 0}
    ops = op_counts(legal)
    assert not legal.functions and not any(n.domain for n in legal.graph.node)
    assert "ScatterND" not in ops and ops["Attention"] == CFG.n_layer
    if MATRIX.exists():
        assert_trt_compatible(legal, "legalised training graph")
    for B, T in ((2, 8), (1, 17)):
        # few distinct tokens: many repeats, so the scatter-add really sums rows
        feeds = random_feeds(train_graph, {"B": B, "T": T}, int_high={"tokens": 7, "targets": CFG.vocab_size},
                             seed=B)
        errs = relative_errors(train_graph, legal, feeds)
        assert set(errs) == {o.name for o in train_graph.graph.output}
        assert max(errs.values()) <= 1e-6, errs


def scatter_model(data_shape, idx_shape, upd_shape):
    g = helper.make_graph(
        [helper.make_node("ScatterND", ["data", "idx", "upd"], ["out"], reduction="add", name="sc")], "g",
        [helper.make_tensor_value_info("data", TP.FLOAT, data_shape),
         helper.make_tensor_value_info("idx", TP.INT64, idx_shape),
         helper.make_tensor_value_info("upd", TP.FLOAT, upd_shape)],
        [helper.make_tensor_value_info("out", TP.FLOAT, data_shape)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 24)])


def test_scatter_add_matches_numpy_with_repeats_and_negative_indices():
    model = scatter_model([6, 3], ["B", "T", 1], ["B", "T", 3])
    out, n = scatter_add_to_onehot_matmul(model)
    out = verify(out, "onehot")
    assert n == 1 and "ScatterND" not in op_counts(out)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((6, 3)).astype(np.float32)
    idx = np.array([[[0], [5], [-1], [2]], [[0], [0], [-6], [3]]], np.int64)     # -1 == 5, -6 == 0
    upd = rng.standard_normal((2, 4, 3)).astype(np.float32)
    expected = data.astype(np.float64)
    np.add.at(expected, idx[..., 0] % 6, upd.astype(np.float64))
    got = run_onnxruntime(out, {"data": data, "idx": idx, "upd": upd})["out"]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    ref = run_onnxruntime(model, {"data": data, "idx": idx, "upd": upd})["out"]
    np.testing.assert_allclose(ref, expected, rtol=1e-6, atol=1e-6)   # onnxruntime agrees with numpy too


def test_scatter_add_outside_the_rewrite_is_left_alone():
    model = scatter_model([4, 3, 2], [5, 2], [5, 2])                  # indices address elements, not rows
    out, n = scatter_add_to_onehot_matmul(model)
    assert n == 0 and op_counts(out)["ScatterND"] == 1


def test_refused_attention_attribute_is_dropped():
    from graphc.backends.tensorrt.legalize import drop_refused_attributes

    g = helper.make_graph(
        [helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=1, softmax_precision=TP.FLOAT, name="att")],
        "g", [helper.make_tensor_value_info(n, TP.FLOAT, [1, 2, 3, 4]) for n in "qkv"],
        [helper.make_tensor_value_info("y", TP.FLOAT, [1, 2, 3, 4])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 24)])
    out, n = drop_refused_attributes(model)
    assert n == 1 and [a.name for a in out.graph.node[0].attribute] == ["is_causal"]
    assert [a.name for a in model.graph.node[0].attribute] == ["is_causal", "softmax_precision"]  # input untouched
    feeds = random_feeds(model, {})
    assert relative_errors(model, out, feeds)["y"] == 0.0   # fp32 in, fp32 softmax either way


def test_decode_attention_fuses_with_mask_for_tensorrt():
    require_builder()        # optimize(backend="tensorrt") asks TensorRT's parser what it supports
    model = build_decode(CFG)
    fused, report = optimize(model, "infer", backend="tensorrt")
    atts = [n for n in fused.graph.node if n.op_type == "Attention"]
    assert len(atts) == CFG.n_layer and all(len(n.input) == 4 and n.input[3] for n in atts)
    assert "Softmax" not in op_counts(fused)
    if MATRIX.exists():
        assert_trt_compatible(fused, "decode for tensorrt")
    for past_len in ([0, 5], [3, 7]):
        feeds = random_feeds(model, {"B": 2, "S": 1, "capacity": 8}, int_high=CFG.vocab_size, seed=past_len[0])
        feeds["past_len"] = np.array(past_len, np.int64)
        errs = relative_errors(model, fused, feeds)
        assert max(errs.values()) <= 1e-5, errs
    # the generic pipeline leaves the decode mask alone (onnxruntime keeps the primitive ops)
    assert "Attention" not in op_counts(optimize(model, "infer")[0])


def test_masked_fusion_keeps_causal_and_fuses_padding_masks():
    require_builder()
    causal, _ = optimize(build_forward(CFG, loss=False), "infer", backend="tensorrt")
    atts = [n for n in causal.graph.node if n.op_type == "Attention"]
    assert len(atts) == CFG.n_layer and all(len(n.input) == 3 for n in atts)   # is_causal, no mask input
    hf, _ = optimize(build_decoder_with_past(CFG), "infer", backend="tensorrt")
    assert op_counts(hf)["Attention"] == CFG.n_layer                       # [B, 1, seq, kv] bool mask
