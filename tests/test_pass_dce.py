"""Dead code elimination."""

import numpy as np
from onnx import helper

from graphc.ir.builder import GraphBuilder
from graphc.models.config import GPT2Config
from graphc.models.gpt2 import build_forward
from graphc.passes.dce import DeadCodeElimination
from graphc.ops import ensure_functions, make_node
from graphc.passes.manager import run_passes
from graphc.compare import random_feeds, relative_errors

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=128)


def test_removes_dead_chains_initializers_and_functions_keeps_inputs():
    b = GraphBuilder("g")
    x = b.input("x", np.float32, ["N", 4])
    unused = b.input("unused", np.float32, [4])
    y = b.Relu(x)
    dead = b.Exp(b.Mul(x, b.const(np.full(4, 3.0, np.float32), "three")))
    b.nodes.append(make_node("GeluGrad", [dead, x], ["dead_grad"]))
    b.output(y, "y", np.float32)
    model = ensure_functions(b.model(infer_shapes=False))
    p = DeadCodeElimination()
    out, report = run_passes(model, [p])
    assert [n.op_type for n in out.graph.node] == ["Relu", "Identity"]
    assert [v.name for v in out.graph.input] == ["x", "unused"]     # the interface stays
    assert not out.graph.initializer and not out.functions
    assert p.stats == {"removed_nodes": 3, "removed_initializers": 1, "removed_functions": 1}
    assert unused


def test_gpt2_logits_only_drops_the_loss_branch():
    full = build_forward(SMALL, loss=True, logits=True)
    # same graph, only the logits wanted: everything feeding only the loss is dead
    logits_only = build_forward(SMALL, loss=True, logits=True)
    keep = [o for o in logits_only.graph.output if o.name == "logits"]
    del logits_only.graph.output[:]
    logits_only.graph.output.extend(keep)
    out, report = run_passes(logits_only, [DeadCodeElimination()])
    ops = {n.op_type for n in out.graph.node}
    assert "LogSoftmax" not in ops and "GatherElements" not in ops
    # LogSoftmax, targets Reshape, GatherElements, ReduceMean, Neg, the loss Identity, and
    # the unused [B, T, C] shape Concat
    assert report.passes[0].nodes_before - report.passes[0].nodes_after == 7
    errs = relative_errors(full, out, random_feeds(full, {"B": 2, "T": 8}, int_high=SMALL.vocab_size))
    assert errs == {"logits": 0.0}


def test_nothing_dead_is_unchanged():
    model, changed = DeadCodeElimination()(build_forward(SMALL, loss=True, logits=True))
    assert changed
    out, changed = DeadCodeElimination()(model)
    assert not changed and out is model
    assert helper
