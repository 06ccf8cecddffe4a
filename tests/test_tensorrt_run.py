"""Running TensorRT engines and comparing them with onnxruntime (per-dtype tolerances).

Needs a GPU whose compute capability the installed TensorRT's engines run on (TensorRT-RTX:
8.0, 8.6, 8.9, 12.x; datacenter TensorRT: >= 7.5). No machine of this project has one (the
lent H200 is 9.0 and refuses TensorRT-RTX engines), so here these tests skip with the
backend's own reason; they are the check for the day a machine can run engines.
"""

import numpy as np
import pytest

from graphc.compare import compare_results
from graphc.backends.tensorrt import TensorRTBackend
from graphc.models.config import GPT2Config
from graphc.models.init import random_init
from graphc.compare import run_onnxruntime

RUNNABLE, WHY = TensorRTBackend.available()
pytestmark = pytest.mark.skipif(not RUNNABLE, reason=f"TensorRT engines cannot run here: {WHY}")

CFG = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=64)


def _feeds(model, params, B, T, seed=0):
    import ml_dtypes

    rng = np.random.default_rng(seed)
    feeds = {"tokens": rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int64),
             "targets": rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int64)}
    for v in model.graph.input:
        if v.name in params:
            bf16 = v.type.tensor_type.elem_type == 16
            feeds[v.name] = params[v.name].astype(ml_dtypes.bfloat16 if bf16 else np.float32)
    return {v.name: feeds[v.name] for v in model.graph.input}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_engine_matches_onnxruntime(mode, precision):
    """The engine against onnxruntime on the same graph (bf16: its float32 emulation)."""
    from graphc.backends.tensorrt.graphs import GRAPHS, engine_graph
    from graphc.backends.tensorrt.report import fused_attention_nodes, layers_from_inspector
    from graphc.passes.pipelines import optimize

    build, pipeline = GRAPHS[mode]
    model = engine_graph(CFG, mode, precision)
    reference_graph, _ = optimize(build(CFG), pipeline, precision=precision)   # onnxruntime: bf16 emulated
    params = random_init(CFG, 0).feeds()
    reference = run_onnxruntime(reference_graph, _feeds(reference_graph, params, 2, 16))
    backend = TensorRTBackend(max_batch=4, max_seq=64)
    prepared = backend.prepare(model)
    got = prepared.run(_feeds(model, params, 2, 16))
    result = compare_results(["onnxruntime", "tensorrt"], [reference, got],
                             dtype="bfloat16" if precision == "bf16" else "float32")
    assert result.diffs and result.ok, [d.line() for d in result.diffs]
    # the deserialized engine's inspector agrees with the builder's report on fused attention
    attention = [n.name for n in model.graph.node if n.op_type == "Attention"]
    fused = fused_attention_nodes(layers_from_inspector(backend.flavor, prepared.runner.engine), attention)
    assert len(fused) == (CFG.n_layer if precision == "bf16" else 0)
