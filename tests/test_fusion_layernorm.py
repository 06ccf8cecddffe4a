"""Layer-norm fusion: GPT-2's 2L+1 layer norms, spelling variants, and why non-matches fail."""

import numpy as np
import pytest

from graphc.ir.builder import GraphBuilder
from graphc.models.config import GPT2Config
from graphc.models.gpt2 import build_forward
from graphc.passes.fusions.layernorm import fuse_layernorm
from graphc.passes.manager import op_counts, run_passes
from graphc.compare import random_feeds, relative_errors

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=128)


def test_gpt2_layernorms_fuse_and_match_onnxruntime():
    model = build_forward(SMALL)
    fused, report = run_passes(model, [fuse_layernorm()])
    assert report.fused["layernorm"] == 2 * SMALL.n_layer + 1
    ops = op_counts(fused)
    assert ops["LayerNormalization"] == 5
    assert "Sqrt" not in ops and "Reciprocal" not in ops and "Sub" not in ops
    assert ops["ReduceMean"] == 1          # the loss's mean, not a layer norm's
    errs = relative_errors(model, fused, random_feeds(model, {"B": 2, "T": 16}, int_high=SMALL.vocab_size))
    assert max(errs.values()) <= 1e-5, errs


def ln_graph(*, div=False, pow_=False, swap=False, bias=True, axis=-1, w_shape=(8,), leak=False, rank=3):
    b = GraphBuilder("ln")
    shape = ["N", 5, 8][-rank:]
    x = b.input("x", np.float32, shape)
    w = b.input("w", np.float32, list(w_shape))
    bb = b.input("b", np.float32, [8]) if bias else None
    mean = b.ReduceMean(x, b.i64(axis), keepdims=1)
    xc = b.Sub(x, mean)
    sq = b.Pow(xc, b.scalar(2.0)) if pow_ else b.Mul(xc, xc)
    var = b.ReduceMean(sq, b.i64(axis), keepdims=1)
    std = b.Sqrt(b.Add(b.scalar(1e-3), var) if swap else b.Add(var, b.scalar(1e-3)))
    if div:
        norm = b.Div(xc, std)
    else:
        rstd = b.Reciprocal(std)
        norm = b.Mul(rstd, xc) if swap else b.Mul(xc, rstd)
        if leak:
            b.output(rstd, "rstd", np.float32)
    y = b.Mul(w, norm) if swap else b.Mul(norm, w)
    if bias:
        y = b.Add(bb, y) if swap else b.Add(y, bb)
    b.output(y, "y", np.float32)
    return b.model()


@pytest.mark.parametrize("kw", [{}, {"div": True}, {"pow_": True}, {"swap": True}, {"bias": False},
                                {"rank": 2}, {"div": True, "pow_": True, "swap": True}])
def test_spelling_variants_fuse(kw):
    model = ln_graph(**kw)
    fused, report = run_passes(model, [fuse_layernorm()])
    assert report.fused["layernorm"] == 1
    assert [n.op_type for n in fused.graph.node if n.op_type != "Identity"] == ["LayerNormalization"]
    ln = fused.graph.node[0]
    assert abs(next(a.f for a in ln.attribute if a.name == "epsilon") - 1e-3) < 1e-9
    errs = relative_errors(model, fused, random_feeds(model, {"N": 3}, scale=1.0, seed=1))
    assert max(errs.values()) <= 1e-5, errs


@pytest.mark.parametrize("kw,reason", [
    ({"axis": 1}, "last axis"),
    ({"leak": True}, "used outside the pattern"),
    ({"w_shape": (1, 8)}, "not [C]"),
])
def test_non_matches_say_why(kw, reason):
    model = ln_graph(**kw)
    p = fuse_layernorm()
    fused, report = run_passes(model, [p])
    assert report.fused["layernorm"] == 0
    assert any(reason in r for r in p.explain(model)), p.explain(model)
