"""Backward fusion of graphs differentiated before fusion: proof by structural hash, then
re-derivation from the fused forward; edited backwards are refused with a reason."""

import numpy as np
import onnx
from onnx import helper

from graphc.models.config import GPT2Config
from graphc.models.gpt2 import build_forward
from graphc.passes.autodiff import differentiate
from graphc.passes.fusions.backward import FuseBackward, structural_hashes
from graphc.passes.manager import op_counts, run_passes
from graphc.passes.pipelines import float_inputs, optimize
from graphc.compare import random_feeds, relative_errors

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=128)
EXPECTED = {"attention": 2, "attention_backward": 2, "layernorm": 5, "layernorm_backward": 5, "gelu": 2,
            "gelu_backward": 2, "cross_entropy": 1, "cross_entropy_backward": 1}


def trained():
    fwd = build_forward(SMALL, loss=True, logits=False)
    return fwd, differentiate(fwd, "loss", float_inputs(fwd))


def feeds(model):
    return random_feeds(model, {"B": 2, "T": 12}, int_high=SMALL.vocab_size)


def test_differentiated_gpt2_gets_every_fused_backward_op():
    fwd, model = trained()
    out, report = optimize(model, "train")
    assert report.pipeline == "train_graph"
    assert report.fused == EXPECTED
    ops = op_counts(out)
    assert "Softmax" not in ops and "LogSoftmax" not in ops and "Tanh" not in ops
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    errs = relative_errors(model, out, feeds(fwd))
    assert max(errs.values()) <= 1e-5, sorted(errs.items(), key=lambda kv: -kv[1])[:3]


def test_post_gradient_nodes_are_kept():
    """An in-graph SGD update reading the gradients survives the rebuild."""
    fwd, model = trained()
    for w in ("h0.ln1.w", "h1.mlp.fc.w"):
        lr = onnx.numpy_helper.from_array(np.array(0.1, np.float32), f"lr_{w}")
        model.graph.initializer.append(lr)
        model.graph.node.extend([helper.make_node("Mul", [f"grad.{w}", lr.name], [f"step.{w}"]),
                                 helper.make_node("Sub", [w, f"step.{w}"], [f"new.{w}"])])
        model.graph.output.append(helper.make_empty_tensor_value_info(f"new.{w}"))
    p = FuseBackward()
    out, report = run_passes(model, [p])
    assert p.stats["post_gradient_nodes"] == 4 and p.stats["post_outputs"] == 2
    assert report.fused == EXPECTED
    errs = relative_errors(model, out, feeds(fwd))
    assert errs["new.h0.ln1.w"] <= 1e-6 and max(errs.values()) <= 1e-5


def test_an_edited_gradient_is_refused_with_a_reason():
    fwd, model = trained()
    # scale one gradient before its output: no longer the plain autodiff gradient
    producer = next(n for n in model.graph.node if "grad.lnf.b" in n.output)
    producer.output[list(producer.output).index("grad.lnf.b")] = "raw_lnf_b"
    half = onnx.numpy_helper.from_array(np.array(0.5, np.float32), "half")
    model.graph.initializer.append(half)
    model.graph.node.append(helper.make_node("Mul", ["raw_lnf_b", "half"], ["grad.lnf.b"]))
    p = FuseBackward()
    out, changed = p(model)
    assert not changed and out is model
    assert "not the plain autodiff" in p.reasons[0] and "grad.lnf.b" in p.reasons[0]
    out, report = optimize(model, "train")
    assert report.fused["attention_backward"] == 0
    errs = relative_errors(model, out, feeds(fwd))
    assert max(errs.values()) <= 1e-5


def test_structural_hash_ignores_names_but_not_computation():
    fwd, model = trained()
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    mapping = {}
    for i, n in enumerate(renamed.graph.node):
        n.name = f"n{i}"
        for k, o in enumerate(n.output):
            if o and not o.startswith("grad.") and o != "loss":
                mapping[o] = f"v{i}_{k}"
                n.output[k] = mapping[o]
        for k, v in enumerate(n.input):
            n.input[k] = mapping.get(v, v)
    a, b = structural_hashes(model.graph), structural_hashes(renamed.graph)
    assert all(a[o.name] == b[o.name] for o in model.graph.output)
    assert a["grad.wte"] != a["grad.wpe"]


def test_not_a_training_graph():
    p = FuseBackward()
    out, changed = p(build_forward(SMALL))
    assert not changed and "no grad" in p.reasons[0]
