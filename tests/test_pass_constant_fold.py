"""Constant folding: small constants only, never parameters (graph inputs)."""

import numpy as np

from graphc.ir.builder import GraphBuilder
from graphc.models.config import GPT2Config
from graphc.models.gpt2 import build_forward
from graphc.passes.constant_fold import ConstantFold
from graphc.passes.manager import op_counts, run_passes
from graphc.compare import random_feeds, relative_errors

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=128)


def test_folds_small_constant_chains_and_static_shapes():
    b = GraphBuilder("g")
    x = b.input("x", np.float32, [3, 4])
    w = b.input("w", np.float32, [4])                               # a parameter: never folded
    k = b.Mul(b.Add(b.scalar(1.0), b.scalar(2.0)), b.scalar(0.5))   # 1.5
    shape = b.Shape(x)                                               # static: [3, 4]
    flat = b.Reshape(x, b.Concat(b.Slice(shape, b.i64(0), b.i64(1)), b.i64(-1), axis=0))
    big = b.Tile(b.const(np.ones((1, 1), np.float32)), b.i64(64, 64))  # 4096 elements: too big
    wk = b.Mul(w, b.Neg(b.scalar(2.0)))
    b.output(b.Mul(b.Mul(flat, k), wk), "y", np.float32)
    b.output(b.ReduceSum(big, keepdims=0), "s", np.float32)
    model = b.model()
    p = ConstantFold()
    out, _ = run_passes(model, [p])
    ops = op_counts(out)
    assert "Shape" not in ops and "Concat" not in ops and "Slice" not in ops and "Neg" not in ops
    assert ops["Tile"] == 1                                           # output too large to fold
    assert ops["Mul"] == 3                                            # w * (-2) stays: w is an input
    assert p.stats["folded"] == 6                              # Add, Mul, Shape, Slice, Concat, Neg
    errs = relative_errors(model, out, random_feeds(model, {}))
    assert max(errs.values()) <= 1e-7


def test_gpt2_has_nothing_to_fold_and_stays_equal():
    model = build_forward(SMALL)
    out, _ = run_passes(model, [ConstantFold()])
    errs = relative_errors(model, out, random_feeds(model, {"B": 2, "T": 8}, int_high=SMALL.vocab_size))
    assert max(errs.values()) == 0.0
