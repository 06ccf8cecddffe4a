"""Folding Transposes into Gemm/MatMul flags and composing Transpose chains."""

import numpy as np

from graphc.ir.builder import GraphBuilder
from graphc.models.config import GPT2Config
from graphc.models.gpt2 import build_forward
from graphc.passes.dce import DeadCodeElimination
from graphc.passes.fold_transpose import FoldTranspose
from graphc.passes.manager import op_counts, run_passes
from graphc.compare import random_feeds, relative_errors

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=128)


def test_folds_into_gemm_matmul_and_composes():
    b = GraphBuilder("g")
    a = b.input("a", np.float32, [5, 3])
    w = b.input("w", np.float32, [4, 5])
    c = b.input("c", np.float32, [4])
    t4 = b.input("t4", np.float32, [2, 3, 4, 5])
    y1 = b.MatMul(b.Transpose(a, perm=[1, 0]), b.Transpose(w, perm=[1, 0]))        # [3, 4]
    y2 = b.Gemm(b.Transpose(a, perm=[1, 0]), w, c, transB=1, alpha=2.0)              # Gemm(a, w, transA=1)
    back = b.Transpose(b.Transpose(t4, perm=[0, 2, 1, 3]), perm=[0, 2, 1, 3])        # identity
    other = b.Transpose(b.Transpose(t4, perm=[0, 2, 1, 3]), perm=[0, 1, 3, 2])       # one transpose
    b.output(y1, "y1", np.float32)
    b.output(y2, "y2", np.float32)
    b.output(b.Add(back, t4), "y3", np.float32)
    b.output(other, "y4", np.float32)
    model = b.model()
    p = FoldTranspose()
    out, _ = run_passes(model, [p, DeadCodeElimination()])
    assert p.stats == {"gemm_transposes": 2, "composed_transposes": 2}
    ops = op_counts(out)
    assert ops["Gemm"] == 2 and "MatMul" not in ops and ops["Transpose"] == 1
    gemm = [n for n in out.graph.node if n.op_type == "Gemm"]
    flags = [{a.name: a.i for a in g.attribute if a.name.startswith("trans")} for g in gemm]
    assert flags == [{"transA": 1, "transB": 1}, {"transA": 1, "transB": 1}]
    errs = relative_errors(model, out, random_feeds(model, {}, scale=1.0))
    assert max(errs.values()) <= 1e-6, errs


def test_gpt2_training_graph_stays_equal():
    from graphc.passes.autodiff import differentiate
    from graphc.passes.pipelines import float_inputs

    fwd = build_forward(SMALL, loss=True, logits=False)
    model = differentiate(fwd, "loss", float_inputs(fwd))
    p = FoldTranspose()
    out, _ = run_passes(model, [p, DeadCodeElimination()])
    errs = relative_errors(model, out, random_feeds(model, {"B": 2, "T": 8}, int_high=SMALL.vocab_size))
    assert max(errs.values()) <= 1e-6
