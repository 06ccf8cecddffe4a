"""Shape inference as a pass: fresh annotations, stale ones dropped, graph unchanged."""

import numpy as np
from onnx import helper

from graphc.models.config import GPT2Config
from graphc.models.gpt2 import build_forward
from graphc.passes.shape_inference import ShapeInference

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=128)


def test_annotates_every_value_and_drops_stale_info():
    model = build_forward(SMALL)
    model.graph.value_info.append(helper.make_tensor_value_info("gone", 1, [7]))
    out, changed = ShapeInference()(model)
    assert not changed
    names = {v.name for v in out.graph.value_info}
    assert "gone" not in names
    produced = {o for n in out.graph.node for o in n.output} - {o.name for o in out.graph.output}
    assert produced <= names
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in out.graph.value_info}
    assert dims["h0/attn_qk_out"] == ["B", SMALL.n_head, "T", "T"]
    assert [n.SerializeToString() for n in out.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert np
