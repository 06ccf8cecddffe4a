"""The CUDA backend on a GPU (``-m gpu``; run on the lent H200, see README "Testing").

References are independent of the CUDA backend: onnxruntime (CPU) runs the same optimised
graphs in the same test, with the same batches; BF16 is checked against the FP32 run.
Data: ``$GRAPHC_GPU_DATA`` (a folder with ``tiny_shakespeare_{train,val}.bin`` from
``graphc prepare``), else the shared data folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

SMALL = "L4H4C128"


def data_dir() -> Path:
    env = os.environ.get("GRAPHC_GPU_DATA")
    for d in [Path(env)] if env else []:
        if (d / "tiny_shakespeare_train.bin").exists():
            return d
    pytest.skip("no token shards: set GRAPHC_GPU_DATA")


@pytest.fixture(scope="module")
def cuda():
    from graphc.backends import get_backend

    return get_backend("cuda")()


def batches(B, T, n, split="train"):
    from graphc.data.shards import TokenLoader

    loader = TokenLoader(str(data_dir() / f"tiny_shakespeare_{split}.bin"), B, T, vocab_size=50257)
    return [loader.next_batch() for _ in range(n)]


def trajectory(backend, cfg_name, steps, B, T, precision="fp32", lr=1e-4, val_every=10, grad_clip=0.0):
    """Train and val losses of ``steps`` steps (llm.c's order), as the trainer prints them."""
    from graphc.models.config import named_config
    from graphc.models.init import random_init
    from graphc.runtime.optimizer import AdamWConfig
    from graphc.runtime.programs import TrainSpec

    cfg = named_config(cfg_name)
    params = random_init(cfg, seed=0)
    dev = backend.upload_params(params)
    spec = TrainSpec(B, T, precision=precision, adamw=AdamWConfig(lr=lr, grad_clip=grad_clip))
    step = backend.train_step(dev, spec)
    ev = backend.evaluator(dev, B, T, precision=precision) if val_every else None
    val = batches(B, T, 5, "val") if val_every else []
    train = batches(B, T, steps)
    out = []
    for s in range(steps):
        if ev is not None and s % val_every == 0:
            out.append(("val", s, float(np.mean([ev.loss(x, y) for x, y in val]))))
        r = step.run(*train[s], t=s + 1, lr=lr)
        out.append(("train", s, r.loss))
    return out


def test_every_value_matches_onnxruntime(cuda):
    """Every value the lowered FP32 training graph computes, against onnxruntime's."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from graphc.backends.cuda import _dtoh, bind_dims
    from graphc.backends.cuda.lower import lower
    from graphc.backends.cuda.program import Program
    from graphc.backends.cuda.tensor import Tensor
    from graphc.models.config import named_config
    from graphc.models.init import random_init
    from graphc.runtime.programs import training_graph

    cfg = named_config(SMALL)
    params = random_init(cfg, seed=0)
    B, T = 4, 64
    model = bind_dims(training_graph(cfg, backend="cuda"), {"B": B, "T": T})
    x, y = batches(B, T, 1)[0]
    feeds = {"tokens": x.astype(np.int64), "targets": y.astype(np.int64), **params.feeds()}
    program = Program()
    lower(model, program=program)
    program.finalize(cuda.rt, cuda.modules, reuse=False)   # every value kept for the comparison
    from graphc.backends.cuda import _htod

    for name, t in program.inputs.items():
        _htod(t.ptr, np.ascontiguousarray(feeds[name], dtype=t.dtype))
    program.record(cuda.rt.stream)
    cuda.rt.synchronize()
    # onnxruntime with every intermediate exposed
    ref_model = onnx.ModelProto()
    ref_model.CopyFrom(model)
    names = [o for n in model.graph.node for o in n.output if o and n.op_type not in ("Constant", "Shape")]
    have = {o.name for o in ref_model.graph.output}
    for o in names:
        if o not in have:
            ref_model.graph.output.append(helper.make_empty_tensor_value_info(o))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(ref_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    worst = []
    values = program.debug_values
    for name in names:
        t = values.get(name)
        if not isinstance(t, Tensor) or name in program.overwritten:
            continue
        got = _dtoh(t).astype(np.float64)
        ref = np.asarray(outs[name]).astype(np.float64)
        assert got.shape == ref.shape, (name, got.shape, ref.shape)
        err = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
        worst.append((err, name))
    worst.sort(reverse=True)
    print("\nworst relative errors:", *[f"{e:.2e} {n}" for e, n in worst[:15]], sep="\n  ")
    assert worst and worst[0][0] < 1e-4, worst[:5]


def test_fp32_trajectory_matches_onnxruntime(cuda):
    from graphc.backends import get_backend

    ref = trajectory(get_backend("onnxruntime")(), SMALL, 41, 4, 64)
    got = trajectory(cuda, SMALL, 41, 4, 64)
    diffs = [(abs(a[2] - b[2]), a) for a, b in zip(ref, got)]
    print("\nmax |cuda - onnxruntime| loss difference:", max(diffs)[0])
    for (kind, s, loss), (_, _, l2) in zip(ref[:6] + ref[-3:], got[:6] + got[-3:]):
        print(f"  {kind} {s}: onnxruntime {loss:.6f} cuda {l2:.6f}")
    assert all(np.isfinite(g[2]) for g in got)
    assert max(diffs)[0] < 2e-3, max(diffs)


def test_d12_first_20_steps_match_onnxruntime(cuda):
    from graphc.backends import get_backend

    ref = trajectory(get_backend("onnxruntime")(), "d12", 20, 4, 64, val_every=0)
    got = trajectory(cuda, "d12", 20, 4, 64, val_every=0)
    diff = max(abs(a[2] - b[2]) for a, b in zip(ref, got))
    print("\nd12 max loss difference over 20 steps:", diff)
    assert diff < 2e-3


def test_training_is_deterministic(cuda):
    a = trajectory(cuda, SMALL, 8, 4, 64, val_every=0, grad_clip=1.0)
    b = trajectory(cuda, SMALL, 8, 4, 64, val_every=0, grad_clip=1.0)
    assert [x[2] for x in a] == [x[2] for x in b]


def test_bf16_tracks_fp32(cuda):
    fp32 = trajectory(cuda, SMALL, 41, 4, 64)
    bf16 = trajectory(cuda, SMALL, 41, 4, 64, precision="bf16")
    assert all(np.isfinite(x[2]) for x in bf16)
    diff = max(abs(a[2] - b[2]) for a, b in zip(fp32, bf16))
    print("\nbf16 vs fp32 max loss difference over 41 steps:", diff)
    assert diff < 3e-2
