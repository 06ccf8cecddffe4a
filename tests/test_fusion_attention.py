"""Attention fusion: GPT-2's L causal attentions -> ONNX Attention(is_causal=1), spelling
variants, and masks that must *not* become is_causal (KV-cache offsets, padding)."""

import math

import numpy as np
import pytest

from graphc.ir.builder import GraphBuilder
from graphc.models.config import GPT2Config
from graphc.models.gpt2 import build_forward, causal_mask
from graphc.models.kv_cache import build_decode, build_decoder_with_past, build_prefill
from graphc.passes.fusions.attention import fuse_attention
from graphc.passes.manager import op_counts, run_passes
from graphc.passes.pipelines import optimize
from graphc.compare import random_feeds, relative_errors

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=128)


def test_gpt2_attention_fuses_and_matches_onnxruntime():
    model = build_forward(SMALL)
    fused, report = run_passes(model, [fuse_attention()])
    assert report.fused["attention"] == SMALL.n_layer
    ops = op_counts(fused)
    assert ops["Attention"] == 2 and "Softmax" not in ops and "Where" not in ops
    att = next(n for n in fused.graph.node if n.op_type == "Attention")
    attrs = {a.name: (a.i if a.type == a.INT else a.f) for a in att.attribute}
    assert attrs["is_causal"] == 1 and abs(attrs["scale"] - 1 / math.sqrt(SMALL.head_dim)) < 1e-7
    assert list(att.input) == [i for i in att.input if i] and len(att.input) == 3   # no mask, no past (TensorRT)
    for T in (1, 16):
        feeds = random_feeds(model, {"B": 2, "T": T}, int_high=SMALL.vocab_size)
        errs = relative_errors(model, fused, feeds)
        assert max(errs.values()) <= 1e-5, errs


def attention_graph(scale="mul", mask="causal", fill=float("-inf"), perm=(0, 1, 3, 2), T=None):
    b = GraphBuilder("att")
    dims = ["B", 2, T or "T", 8]
    q, v = (b.input(n, np.float32, dims) for n in "qv")
    if perm is None:                             # K handed in already transposed
        kt = b.input("kt", np.float32, ["B", 2, 8, dims[2]])
    else:
        kt = b.Transpose(b.input("k", np.float32, dims), perm=list(perm))
    s = b.MatMul(q, kt)
    if scale == "mul":
        s = b.Mul(b.scalar(0.3), s)
    elif scale == "div":
        s = b.Div(s, b.scalar(math.sqrt(8)))
    if mask == "causal":
        t = b.Squeeze(b.Shape(q, start=2, end=3), b.i64(0))
        s = b.Where(causal_mask(b, t, t), s, b.scalar(fill))
    elif mask == "const":
        s = b.Where(b.const(np.tril(np.ones((T, T), bool))), s, b.scalar(fill))
    elif mask == "offset":                       # a KV-cache mask: queries start at position 1
        t = b.Squeeze(b.Shape(q, start=2, end=3), b.i64(0))
        s = b.Where(causal_mask(b, t, t, past=b.const(np.array(1, np.int64))), s, b.scalar(fill))
    elif mask == "input":
        s = b.Where(b.input("m", np.bool_, [dims[2], dims[2]]), s, b.scalar(fill))
    y = b.MatMul(b.Softmax(s, axis=-1), v)
    b.output(y, "y", np.float32)
    return b.model()


@pytest.mark.parametrize("kw,causal", [({}, 1), ({"scale": "div"}, 1), ({"scale": None}, 1),
                                       ({"mask": None}, 0), ({"mask": "const", "T": 6}, 1)])
def test_variants_fuse(kw, causal):
    model = attention_graph(**kw)
    fused, report = run_passes(model, [fuse_attention()])
    assert report.fused["attention"] == 1
    att = next(n for n in fused.graph.node if n.op_type == "Attention")
    assert next(a.i for a in att.attribute if a.name == "is_causal") == causal
    errs = relative_errors(model, fused, random_feeds(model, {"B": 2, "T": 6}, scale=1.0))
    assert max(errs.values()) <= 1e-5, errs


@pytest.mark.parametrize("kw,reason", [
    ({"mask": "offset"}, "do not start at 0"),
    ({"mask": "input"}, "not LessOrEqual"),
    ({"fill": -1e4}, "not -inf"),
    ({"perm": None}, "not produced by Transpose"),
])
def test_non_matches_say_why(kw, reason):
    model = attention_graph(**kw)
    p = fuse_attention()
    _, report = run_passes(model, [p])
    assert report.fused["attention"] == 0
    assert any(reason in r for r in p.explain(model)), p.explain(model)


CFG = GPT2Config(n_layer=2, n_head=2, n_embd=32, max_seq_len=64)


def _kv_feeds(model, B, T, cap, **ints):
    dims = {"B": B, "T": T, "S": T, "capacity": cap, "batch": B, "seq": T, "past_seq": cap,
            "past_seq + seq": cap + T}
    feeds = random_feeds(model, dims, int_high=CFG.vocab_size, seed=3)
    feeds.update(ints)
    return feeds


@pytest.mark.parametrize("kind", ["prefill", "decode", "decoder_with_past"])
def test_kv_cache_graphs_stay_correct(kind):
    """Prefill attends causally over its own prompt (fusable); decode and HF-style
    decoder-with-past see an offset/padded mask (must stay unfused)."""
    B, T, cap = 2, 3, 8
    if kind == "prefill":
        model = build_prefill(CFG, all_logits=True)
        feeds = _kv_feeds(model, B, T, cap)
    elif kind == "decode":
        model = build_decode(CFG)
        feeds = _kv_feeds(model, B, T, cap, past_len=np.array([2, 4], np.int64))
    else:
        model = build_decoder_with_past(CFG)
        feeds = _kv_feeds(model, B, T, cap, attention_mask=np.ones((B, cap + T), np.int64),
                          position_ids=np.tile(np.arange(cap, cap + T), (B, 1)).astype(np.int64))
    fused, report = optimize(model, "infer")
    assert report.fused["attention"] == (CFG.n_layer if kind == "prefill" else 0)
    errs = relative_errors(model, fused, feeds)
    assert max(errs.values()) <= 1e-5, errs
