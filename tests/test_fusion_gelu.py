"""tanh-GELU fusion: GPT-2's L GELUs, product orderings, and why non-matches fail."""

import math

import numpy as np
import pytest

from graphc.ir.builder import GraphBuilder
from graphc.models.config import GPT2Config
from graphc.models.gpt2 import build_forward
from graphc.passes.fusions.gelu import fuse_gelu
from graphc.passes.manager import op_counts, run_passes
from graphc.compare import random_feeds, relative_errors

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=128)
S = math.sqrt(2 / math.pi)


def test_gpt2_gelus_fuse_and_match_onnxruntime():
    model = build_forward(SMALL)
    fused, report = run_passes(model, [fuse_gelu()])
    assert report.fused["gelu"] == SMALL.n_layer
    ops = op_counts(fused)
    assert ops["Gelu"] == 2 and "Tanh" not in ops
    gelu = next(n for n in fused.graph.node if n.op_type == "Gelu")
    assert gelu.attribute[0].s == b"tanh"
    # bias + GELU stays Gemm(bias) -> Gelu (see graphc/ops/gelu.py): the Gelu reads the Gemm
    producer = next(n for n in fused.graph.node if gelu.input[0] in n.output)
    assert producer.op_type == "Gemm" and len(producer.input) == 3
    errs = relative_errors(model, fused, random_feeds(model, {"B": 2, "T": 16}, int_high=SMALL.vocab_size))
    assert max(errs.values()) <= 1e-5, errs


def gelu_graph(variant="llmc", a=0.044715, s=S, leak=False):
    b = GraphBuilder("gelu")
    x = b.input("x", np.float32, ["N", 16])
    if variant == "llmc":
        cube = b.Mul(b.Mul(b.Mul(x, x), x), b.scalar(a))
        inner = b.Mul(b.Add(x, cube), b.scalar(s))
        y = b.Mul(b.Mul(x, b.scalar(0.5)), b.Add(b.Tanh(inner), b.scalar(1.0)))
    elif variant == "pow":       # 0.5 * (x * (1 + tanh(s * (x + a * x^3))))
        cube = b.Mul(b.scalar(a), b.Pow(x, b.scalar(3.0)))
        t = b.Tanh(b.Mul(b.scalar(s), b.Add(cube, x)))
        y = b.Mul(b.scalar(0.5), b.Mul(x, b.Add(b.scalar(1.0), t)))
    else:                        # (x * 0.5) ... with the halves split: x * (1 + t) * 0.25 * 2
        cube = b.Mul(x, b.Mul(x, b.Mul(x, b.scalar(a))))
        t = b.Tanh(b.Mul(b.Add(x, cube), b.scalar(s)))
        y = b.Mul(b.Mul(b.Mul(x, b.Add(t, b.scalar(1.0))), b.scalar(0.25)), b.scalar(2.0))
        if leak:
            b.output(t, "t", np.float32)
    b.output(y, "y", np.float32)
    return b.model()


@pytest.mark.parametrize("variant", ["llmc", "pow", "split"])
def test_orderings_fuse(variant):
    model = gelu_graph(variant)
    fused, report = run_passes(model, [fuse_gelu()])
    assert report.fused["gelu"] == 1
    assert [n.op_type for n in fused.graph.node if n.op_type != "Identity"] == ["Gelu"]
    errs = relative_errors(model, fused, random_feeds(model, {"N": 4}, scale=2.0))
    assert max(errs.values()) <= 1e-5, errs


@pytest.mark.parametrize("kw,reason", [
    ({"a": 0.05}, "cubic coefficient"),
    ({"s": 0.8}, "sqrt(2/pi)"),
    ({"variant": "split", "leak": True}, "used elsewhere"),
])
def test_non_matches_say_why(kw, reason):
    model = gelu_graph(**kw)
    p = fuse_gelu()
    _, report = run_passes(model, [p])
    assert report.fused["gelu"] == 0
    assert any(reason in r for r in p.explain(model)), p.explain(model)
