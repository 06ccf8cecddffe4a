"""The infer/train pipelines end to end: onnxruntime equality, fused counts, d12 counts and
memory, and the pipeline registry."""

import numpy as np
import pytest

from graphc.models.config import GPT2Config, named_config
from graphc.models.gpt2 import build_forward
from graphc.passes.autodiff import differentiate
from graphc.passes.fusions.pattern import GraphIndex, reduce_axes
from graphc.passes.manager import op_counts
from graphc.passes.memory_plan import plan_model
from graphc.passes.pipelines import PASSES, PIPELINES, float_inputs, optimize, pipeline_for
from graphc.compare import random_feeds, relative_errors

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=128)
ALL_KINDS = ["attention", "layernorm", "gelu", "cross_entropy"]


def feeds(model, B=2, T=16, seed=0):
    return random_feeds(model, {"B": B, "T": T}, int_high=SMALL.vocab_size, seed=seed)


def unfused_layernorm_arith(model) -> int:
    """ReduceMean over the last axis whose result is subtracted from its input."""
    idx = GraphIndex(model)
    count = 0
    for n in idx.nodes:
        if n.op_type == "ReduceMean" and reduce_axes(idx, n) in ([-1], [1]):
            if any(idx.nodes[c].op_type == "Sub" for c in idx.uses(n.output[0])):
                count += 1
    return count


@pytest.mark.parametrize("loss,logits", [(True, True), (False, True), (True, False)])
def test_infer_pipeline_matches_onnxruntime(loss, logits):
    model = build_forward(SMALL, loss=loss, logits=logits)
    out, report = optimize(model, "infer")
    assert report.fused["attention"] == 2 and report.fused["layernorm"] == 5 and report.fused["gelu"] == 2
    assert report.fused["cross_entropy"] == int(loss)
    ops = op_counts(out)
    assert "Softmax" not in ops and "Tanh" not in ops and unfused_layernorm_arith(out) == 0
    assert report.nodes_after < report.nodes_before / 2
    for T in (1, 13):
        errs = relative_errors(model, out, feeds(model, T=T))
        assert max(errs.values()) <= 1e-5, errs


def test_train_pipeline_gradients_equal_unoptimised():
    fwd = build_forward(SMALL, loss=True, logits=False)
    wrt = float_inputs(fwd)
    reference = differentiate(fwd, "loss", wrt)
    out, report = optimize(fwd, "train")
    for kind in ALL_KINDS:
        expected = {"attention": 2, "layernorm": 5, "gelu": 2, "cross_entropy": 1}[kind]
        assert report.fused[kind] == expected and report.fused[f"{kind}_backward"] == expected, report.fused
    assert [o.name for o in out.graph.output] == [o.name for o in reference.graph.output]
    ops = op_counts(out)
    assert "Softmax" not in ops and "LogSoftmax" not in ops and unfused_layernorm_arith(out) == 0
    for seed in (0, 1):
        errs = relative_errors(reference, out, feeds(fwd, seed=seed))
        assert set(errs) == {"loss", *(f"grad.{w}" for w in wrt)}
        assert max(errs.values()) <= 1e-5, sorted(errs.items(), key=lambda kv: -kv[1])[:3]


def test_d12_train_fusion_counts():
    out, report = optimize(build_forward(named_config("d12"), loss=True, logits=False), "train")
    assert report.fused == {"attention": 12, "attention_backward": 12, "layernorm": 25, "layernorm_backward": 25,
                            "gelu": 12, "gelu_backward": 12, "cross_entropy": 1, "cross_entropy_backward": 1}
    ops = op_counts(out)
    assert ops["Attention"] == 12 and ops["graphc.AttentionGrad"] == 12
    assert ops["LayerNormalization"] == 25 and ops["graphc.LayerNormGrad"] == 25
    assert ops["Gelu"] == 12 and ops["graphc.GeluGrad"] == 12
    assert ops["graphc.CrossEntropy"] == 1 and ops["graphc.CrossEntropyGrad"] == 1
    for op in ("Softmax", "LogSoftmax", "Tanh", "Sqrt", "Reciprocal"):
        assert op not in ops, op
    assert unfused_layernorm_arith(out) == 0
    assert len([o for o in out.graph.output if o.name.startswith("grad.")]) == 12 * 12 + 4


@pytest.mark.parametrize("B,T", [(4, 64), (16, 1024)])
def test_d12_train_memory_plan_peak_below_half_naive(B, T):
    out, _ = optimize(build_forward(named_config("d12"), loss=True, logits=False), "train")
    plan = plan_model(out, {"B": B, "T": T})
    print(f"d12 train B={B} T={T}: {plan.format()}")
    assert plan.peak_bytes < plan.naive_bytes / 2
    # every intermediate of the forward is kept for the backward, so the peak is at least
    # the saved activations: the 12 layers' [B*T, 4C] GELU inputs alone
    assert plan.peak_bytes > 12 * B * T * 4 * 768 * 4


def test_registry():
    assert pipeline_for("infer", "tensorrt")[0] == "infer:tensorrt"
    assert pipeline_for("infer", "cuda")[0] == "infer"
    assert pipeline_for("train")[0] == "train"
    for names in PIPELINES.values():
        assert all(n in PASSES for n in names)
    with pytest.raises(KeyError, match="no pipeline"):
        pipeline_for("nope")


def test_train_on_a_differentiated_graph_keeps_gradients():
    fwd = build_forward(SMALL, loss=True, logits=False)
    trained = differentiate(fwd, "loss", float_inputs(fwd))
    out, report = optimize(trained, "train")
    assert report.pipeline == "train_graph"
    errs = relative_errors(trained, out, feeds(fwd))
    assert max(errs.values()) <= 1e-5
    assert np
