"""Removing identity nodes, never a graph output."""

import numpy as np
from onnx import TensorProto

from graphc.ir.builder import GraphBuilder
from graphc.models.config import GPT2Config
from graphc.models.gpt2 import build_forward
from graphc.passes.manager import op_counts, run_passes
from graphc.passes.remove_identity import RemoveIdentity
from graphc.compare import random_feeds, relative_errors

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=128)


def test_removes_identities_and_keeps_output_names():
    b = GraphBuilder("g")
    x = b.input("x", np.float32, [3, 4])
    y = b.Identity(b.Relu(x))
    y = b.Cast(y, to=TensorProto.FLOAT)                      # float -> float
    y = b.Reshape(y, b.i64(3, 4))                            # same shape
    y = b.Transpose(y, perm=[0, 1])
    z = b.Cast(y, to=TensorProto.DOUBLE)                     # a real cast: kept
    b.output(y, "y", np.float32)                             # an Identity renaming to the output
    b.output(x, "x_again", np.float32)                       # output = input: must stay
    b.output(z, "z", np.float64)
    model = b.model()
    out, _ = run_passes(model, [RemoveIdentity()])
    ops = op_counts(out)
    assert ops == {"Relu": 1, "Cast": 1, "Identity": 1}       # x_again (output = input) stays
    assert [o.name for o in out.graph.output] == ["y", "x_again", "z"]
    relu = next(n for n in out.graph.node if n.op_type == "Relu")
    assert list(relu.output) == ["y"]                         # the producer now writes the output
    errs = relative_errors(model, out, random_feeds(model, {}))
    assert max(errs.values()) == 0.0


def test_gpt2_loss_identity_removed():
    model = build_forward(SMALL)
    out, report = run_passes(model, [RemoveIdentity()])
    assert "Identity" not in op_counts(out)
    assert [o.name for o in out.graph.output] == ["logits", "loss"]
    errs = relative_errors(model, out, random_feeds(model, {"B": 2, "T": 8}, int_high=SMALL.vocab_size))
    assert max(errs.values()) == 0.0
