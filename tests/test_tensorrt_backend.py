"""The TensorRT backend's seam: availability with a precise reason, the one-line error of
``--backend tensorrt`` where engines cannot run, flavour selection, the engine cache, the
layer-report reader and the output comparator."""

import numpy as np
import pytest

from graphc.backends import REGISTRY, get_backend
from graphc.compare import compare_results
from graphc.backends.tensorrt import backend as trt_backend
from graphc.backends.tensorrt.cache import EngineCache, EngineKey, graph_hash
from graphc.backends.tensorrt.flavor import Flavor, load_flavor, rtx_runs_on
from graphc.backends.tensorrt.report import fused_attention_nodes, layers_from_log
from graphc.cli.main import main
from graphc.errors import GraphcError
from graphc.models.config import GPT2Config
from graphc.models.gpt2 import build_forward
from graphc.models.init import random_init
from graphc.models.llmc import save_llmc
from tensorrt_helpers import require_builder

RUNNABLE, WHY = trt_backend.TensorRTBackend.available()


def test_registered_and_supports():
    require_builder()
    assert "tensorrt" in REGISTRY
    B = trt_backend.TensorRTBackend
    assert B.supports("Attention") and B.supports("LayerNormalization") and B.supports("TensorScatter")
    assert B.supports("AttentionGrad", "graphc") and B.supports("CrossEntropyGrad", "graphc")
    assert not B.supports("NoSuchOp") and not B.supports("Frobnicate", "graphc")


@pytest.mark.skipif(RUNNABLE, reason="a GPU here runs TensorRT engines")
def test_unavailable_reason_is_precise():
    require_builder()
    ok, why = trt_backend.TensorRTBackend.available()
    assert not ok and "compute capability" in why and "\n" not in why
    with pytest.raises(GraphcError, match="tensorrt: --backend: backend is not available here: "):
        get_backend("tensorrt")


def test_reason_names_the_gpu_compute_capability(monkeypatch):
    import graphc.backends.tensorrt.device as device

    rtx = Flavor("rtx", None, "1.7.1")
    monkeypatch.setattr(device, "gpu_capability", lambda device=0: ((9, 0), "NVIDIA H200"))
    why = trt_backend.why_cannot_run(rtx)
    assert "NVIDIA H200" in why and "compute capability 9.0" in why and "datacenter TensorRT" in why
    assert "8.0, 8.6, 8.9 or 12.x" in why
    assert rtx_runs_on((8, 6)) and rtx_runs_on((12, 0)) and not rtx_runs_on((9, 0)) and not rtx_runs_on((7, 5))
    dc = Flavor("tensorrt", None, "10.15")
    assert dc.runs_on((9, 0)) and not dc.runs_on((7, 0))
    monkeypatch.setattr(device, "gpu_capability", lambda device=0: ((7, 0), "Tesla V100"))
    assert "compute capability 7.0" in trt_backend.why_cannot_run(dc)


@pytest.mark.skipif(RUNNABLE, reason="a GPU here runs TensorRT engines")
@pytest.mark.parametrize("command", ["eval", "generate"])
def test_backend_flag_fails_in_one_line(tmp_path, capsys, command):
    from graphc.data.shards import write_shard

    require_builder()
    model, shard = tmp_path / "m.bin", tmp_path / "val.bin"
    save_llmc(random_init(GPT2Config(n_layer=1, n_head=2, n_embd=32, max_seq_len=16), 0), model)
    write_shard(shard, np.arange(100, dtype=np.uint16))
    argv = {"eval": ["--data", str(shard), "-b", "1", "-t", "8", "--batches", "1"],
            "generate": ["--prompt-ids", "1 2 3", "--max-new-tokens", "2"]}[command]
    assert main([command, "--model", str(model), *argv, "--backend", "tensorrt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: tensorrt: --backend:") and "compute capability" in err[0]


def test_flavor_selection():
    flavor = require_builder()
    assert load_flavor("auto").name == flavor.name
    with pytest.raises(GraphcError, match="--trt-flavor: unknown TensorRT flavour"):
        load_flavor("cuda")
    missing = [n for n in ("tensorrt", "rtx") if n != flavor.name]
    for name in missing:
        try:
            load_flavor(name)
        except GraphcError as e:
            assert "TensorRT is not installed: pip install" in str(e)


def test_graph_precision():
    require_builder()
    from graphc.backends.tensorrt.backend import graph_precision
    from graphc.backends.tensorrt.graphs import engine_graph

    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, max_seq_len=16)
    assert graph_precision(engine_graph(cfg, "infer", "fp32")) == "fp32"
    assert graph_precision(engine_graph(cfg, "infer", "bf16")) == "bf16"
    assert graph_precision(engine_graph(cfg, "train", "bf16")) == "bf16"


def test_engine_cache_key_and_roundtrip(tmp_path):
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, max_seq_len=16)
    g1, g2 = build_forward(cfg, loss=False), build_forward(GPT2Config(n_layer=2, n_head=2, n_embd=32), loss=False)
    assert graph_hash(g1) == graph_hash(build_forward(cfg, loss=False)) != graph_hash(g2)
    key = EngineKey(graph_hash(g1), "rtx", "1.7.1", "rtx-portable", "bf16", "tokens:((1, 1), (4, 16), (4, 16))")
    variants = [key.__class__(**{**key.__dict__, field: "other"}) for field in key.__dict__]
    assert len({k.digest() for k in [key, *variants]}) == len(variants) + 1   # every field matters
    cache = EngineCache(tmp_path)
    assert cache.load(key) is None
    path = cache.store(key, b"plan bytes", {"layers": 3})
    assert cache.load(key) == b"plan bytes" and path.with_suffix(".json").is_file()
    assert cache.load(variants[1]) is None


LOG = """Layers:
Name: __myl_Tran_myl0_14, LayerType: kgen, Inputs: [ { Name: a, Dimensions: [1] }], Outputs: [], TacticName: __myl_Tran_0xd3, StreamId: 0, Metadata: [ONNX Layer: h0/attn_bthd]
Name: _gemm_mha_v2_myl0_9, LayerType: kgen, Inputs: [ { Name: q, Dimensions: [-1,4] }], Outputs: [], TacticName: _gemm_mha_v2_0xef04, StreamId: 0, Metadata: [ONNX Layer: attention_1]
Name: __fc11589_myl0_8, LayerType: gemm, Inputs: [], Outputs: [], TacticName: __myelin_CASK_STUB, StreamId: 0, Metadata: [ONNX Layer: attention_0]
Name: __myl_SlicReshAddReshMaxrSubExpSum_myl0_26, LayerType: kgen, Inputs: [], Outputs: [], TacticName: __myl_x, StreamId: 0, Metadata: [ONNX Layer: attention_0]"""


def test_layer_report_reader():
    layers = layers_from_log(["Some other message", LOG])
    assert [l.layer_type for l in layers] == ["kgen", "kgen", "gemm", "kgen"]
    assert layers[1].onnx_nodes == ("attention_1",) and layers[1].fused_attention
    assert not any(l.fused_attention for l in layers[2:])
    assert fused_attention_nodes(layers, ["attention_0", "attention_1"]) == ["attention_1"]
    assert fused_attention_nodes(layers_from_log(["no report"]), ["attention_0"]) == []


def test_comparator_tolerances_for_engine_outputs():
    """What the engine comparison relies on: graphc.compare's per-precision tolerances, and
    integer outputs compared exactly."""
    import ml_dtypes

    def ok(actual, dtype="float32"):
        return {d.name: d.ok for d in compare_results(["ort", "trt"], [ref, actual], dtype=dtype).diffs}

    ref = {"x": np.linspace(1, 2, 100, dtype=np.float32), "ids": np.arange(3)}
    close = {"x": ref["x"] * (1 + 5e-5), "ids": np.arange(3)}
    bf16ish = {"x": ref["x"].astype(ml_dtypes.bfloat16).astype(np.float32) * (1 + 5e-3), "ids": np.arange(3)}
    assert ok(close) == {"x": True, "ids": True}
    assert not ok(bf16ish)["x"]                       # FP32 tolerance: too far
    assert ok(bf16ish, "bfloat16")["x"]               # BF16 tolerance: fine
    assert ok({"x": ref["x"] * np.nan, "ids": np.arange(1, 4)}) == {"x": False, "ids": False}


def test_runtime_tables():
    """What the (GPU-only) runner relies on and can be checked here: dtypes and cache aliasing."""
    import ml_dtypes

    from graphc.backends.tensorrt.runtime import cache_alias, numpy_dtype

    trt = require_builder().trt
    assert numpy_dtype(trt, trt.DataType.BF16) == np.dtype(ml_dtypes.bfloat16)
    assert numpy_dtype(trt, trt.DataType.INT64) == np.int64 and numpy_dtype(trt, trt.DataType.FLOAT) == np.float32
    assert cache_alias("present.3.key") == "past.3.key" and cache_alias("logits") is None
