"""Common subexpression elimination."""

import numpy as np
from onnx import numpy_helper

from graphc.ir.builder import GraphBuilder
from graphc.models.config import GPT2Config
from graphc.models.gpt2 import build_forward
from graphc.passes.cse import CommonSubexpressionElimination
from graphc.passes.dce import DeadCodeElimination
from graphc.passes.manager import op_counts, run_passes
from graphc.compare import random_feeds, relative_errors

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=128)


def dup_graph(random=False):
    b = GraphBuilder("g")
    x = b.input("x", np.float32, ["N", 4])
    c1 = b.const(np.arange(4, dtype=np.float32), "c1")
    b.initializers.append(numpy_helper.from_array(np.arange(4, dtype=np.float32), "c2"))
    c2 = "c2"                                                        # same value, another name
    a1 = b.Tanh(b.Mul(x, c1))
    a2 = b.Tanh(b.Mul(x, c2))                                        # the same chain again
    if random:
        r1 = b.RandomNormal(shape=[2], dtype=1)
        r2 = b.RandomNormal(shape=[2], dtype=1)                      # random: never merged
        b.output(b.Sub(r1, r2), "r", np.float32)
    b.output(b.Add(a1, a2), "y", np.float32)
    b.output(b.Tanh(b.Mul(x, c1)), "y2", np.float32)                 # feeds an output: kept
    return b.model()


def test_merges_constants_and_chains_not_random_ops():
    model = dup_graph()
    p = CommonSubexpressionElimination()
    out, _ = run_passes(model, [p, DeadCodeElimination()])
    assert p.stats["merged_constants"] == 1
    ops = op_counts(out)
    assert ops["Tanh"] == 1 and ops["Mul"] == 1
    feeds = random_feeds(model, {"N": 3})
    errs = relative_errors(model, out, feeds)
    assert errs["y"] <= 1e-7 and errs["y2"] <= 1e-7


def test_random_ops_are_never_merged():
    out, _ = run_passes(dup_graph(random=True), [CommonSubexpressionElimination()])
    assert op_counts(out)["RandomNormal"] == 2


def test_gpt2_shared_shape_constants_and_onnxruntime():
    model = build_forward(SMALL)
    out, report = run_passes(model, [CommonSubexpressionElimination(), DeadCodeElimination()])
    assert report.nodes_after <= report.nodes_before
    errs = relative_errors(model, out, random_feeds(model, {"B": 2, "T": 8}, int_high=SMALL.vocab_size))
    assert max(errs.values()) <= 1e-6
