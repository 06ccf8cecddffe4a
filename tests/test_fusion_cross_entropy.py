"""Cross-entropy fusion: GPT-2's loss -> graphc.CrossEntropy, variants and non-matches."""

import numpy as np
import pytest

from graphc.ir.builder import GraphBuilder
from graphc.models.config import GPT2Config
from graphc.models.gpt2 import build_forward
from graphc.passes.fusions.cross_entropy import fuse_cross_entropy
from graphc.passes.manager import op_counts, run_passes
from graphc.compare import random_feeds, relative_errors

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=128)


def test_gpt2_loss_fuses_and_matches_onnxruntime():
    model = build_forward(SMALL)
    fused, report = run_passes(model, [fuse_cross_entropy()])
    assert report.fused["cross_entropy"] == 1
    ops = op_counts(fused)
    assert ops["graphc.CrossEntropy"] == 1 and "LogSoftmax" not in ops and "GatherElements" not in ops
    assert any(f.name == "CrossEntropy" and f.domain == "graphc" for f in fused.functions)
    errs = relative_errors(model, fused, random_feeds(model, {"B": 2, "T": 16}, int_high=SMALL.vocab_size))
    assert errs["loss"] <= 1e-6 and errs["logits"] == 0.0


def ce_graph(neg_first=False, keepdims=0, axis=1, rank=2):
    b = GraphBuilder("ce")
    z = b.input("z", np.float32, ["N", 10] if rank == 2 else ["B", "T", 10])
    t = b.input("t", np.int64, ["N", 1] if rank == 2 else ["B", "T", 1])
    logp = b.LogSoftmax(z, axis=-1)
    picked = b.GatherElements(logp, t, axis=axis if rank == 2 else 2)
    if neg_first:
        loss = b.ReduceMean(b.Neg(picked), keepdims=keepdims)
    else:
        loss = b.Neg(b.ReduceMean(picked, keepdims=keepdims))
    b.output(loss, "loss", np.float32)
    return b.model()


@pytest.mark.parametrize("kw", [{}, {"neg_first": True}, {"rank": 3}])
def test_variants_fuse(kw):
    model = ce_graph(**kw)
    fused, report = run_passes(model, [fuse_cross_entropy()])
    assert report.fused["cross_entropy"] == 1
    dims = {"N": 6, "B": 2, "T": 3}
    errs = relative_errors(model, fused, random_feeds(model, dims, int_high=10, scale=2.0))
    assert errs["loss"] <= 1e-6


@pytest.mark.parametrize("kw,reason", [({"keepdims": 1}, "keeps dims"), ({"axis": 0}, "class axis")])
def test_non_matches_say_why(kw, reason):
    model = ce_graph(**kw)
    p = fuse_cross_entropy()
    _, report = run_passes(model, [p])
    assert report.fused["cross_entropy"] == 0
    assert any(reason in r for r in p.explain(model)), p.explain(model)
