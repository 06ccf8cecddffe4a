"""Running TensorRT engines and comparing them with onnxruntime (per-dtype tolerances).

Needs a GPU whose compute capability the installed TensorRT's engines run on (TensorRT-RTX:
8.0, 8.6, 8.9, 12.x; datacenter TensorRT: >= 7.5). No machine of this project has one (the
lent H200 is 9.0 and refuses TensorRT-RTX engines), so here these tests skip with the
backend's own reason; they are the check for the day a machine can run engines.
"""

import numpy as np
import pytest

from graphc.backends.compare import compare
from graphc.backends.tensorrt import TensorRTBackend
from graphc.models.config import GPT2Config
from graphc.models.init import random_init
from graphc.passes.verify import run_onnxruntime

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
    from graphc.backends.tensorrt.graphs import engine_graph

    model = engine_graph(CFG, mode, precision)
    params = random_init(CFG, 0).feeds()
    feeds = _feeds(model, params, 2, 16)
    fp32 = engine_graph(CFG, mode, "fp32")
    reference = run_onnxruntime(fp32, _feeds(fp32, params, 2, 16))
    prepared = TensorRTBackend(precision=precision, max_batch=4, max_seq=64).prepare(model)
    got = prepared.run(feeds)
    result = compare(got, reference, compute_dtype="bfloat16" if precision == "bf16" else "float32")
    assert result and all(ok for *_, ok in result.values()), result
