"""The CUDA train step's scale features without a GPU: gradient accumulation and
recomputation lower and compile (NVRTC), and the GPU-memory estimate (what
``graphc compile --backend cuda`` prints) says what fits, up to GPT-2 d48 on one H200."""

from __future__ import annotations

import types

import numpy as np
import pytest

pytest.importorskip("cuda.core", reason="cuda-core (NVRTC) is not installed")

from graphc.models.config import named_config  # noqa: E402
from graphc.runtime.programs import TrainSpec  # noqa: E402

GiB = 2 ** 30


def _layout(cfg, spec):
    from graphc.backends.cuda.train import build_train_program
    from graphc.models.params import num_parameters

    n = num_parameters(cfg)
    return build_train_program(cfg, spec, types.SimpleNamespace(ptr=0, nbytes=4 * n, shape=(n,),
                                                                dtype=np.dtype(np.float32)))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_accumulation_and_recompute_kernels_compile(precision, tmp_path, monkeypatch):
    from graphc.backends.cuda.program import KernelStep
    from graphc.runtime.cuda.modules import compile_cubin

    monkeypatch.setenv("GRAPHC_KERNEL_CACHE", str(tmp_path))
    layout = _layout(named_config("L4H4C128"), TrainSpec(B=4, T=64, precision=precision, grad_accum=3,
                                                         recompute=True))
    steps = layout.program.steps
    assert [s.node for s in steps[layout.n_micro_steps:layout.n_accumulate_steps]] == ["grad-accumulate"]
    assert layout.accumulate_add is not None and layout.grads.storage.name == "grads.accumulated"
    kernels = {(s.src, s.name) for s in steps if isinstance(s, KernelStep)}
    kernels.add((layout.accumulate_add.src, layout.accumulate_add.name))
    for src, name in sorted(kernels):
        assert compile_cubin(src, "sm_90", use_cache=False)[:4] == b"\x7fELF", name
    # the recomputed GELU's GEMM keeps its GELU epilogue (the clone reads the kept pre-activation)
    assert sum("recomputed" in s.node for s in steps) >= 4 * 3


def test_memory_estimate_recompute_and_accumulation():
    from graphc.backends.cuda.train import memory_estimate
    from graphc.models.params import num_parameters

    cfg = named_config("d12")
    n = num_parameters(cfg)
    plain = memory_estimate(cfg, TrainSpec(B=16, T=1024, precision="bf16"))
    recomputed = memory_estimate(cfg, TrainSpec(B=16, T=1024, precision="bf16", recompute=True))
    accumulated = memory_estimate(cfg, TrainSpec(B=16, T=1024, precision="bf16", grad_accum=4))
    assert plain["params"] == 4 * n and plain["grad"] == 4 * n and plain["state"] >= 8 * n
    assert accumulated["grad"] == 8 * n                     # the micro-batch and the accumulated gradient
    # the GELU [B, T, 4C] and layer-norm [B, T, C] outputs no longer live through backward
    assert recomputed["total"] < plain["total"] - 1 * GiB


def test_d48_fits_one_h200():
    """GPT-2 d48 (1.56B parameters) at B16 T1024 bf16 with recomputation: weights, grads,
    Adam state and the shared activation arena within the H200's 139 GiB (with room for the
    CUDA context and libraries)."""
    from graphc.backends.cuda.train import memory_estimate

    est = memory_estimate(named_config("d48"), TrainSpec(B=16, T=1024, precision="bf16", recompute=True))
    assert est["params"] > 5.5 * GiB
    assert est["total"] < 100 * GiB, {k: v / GiB for k, v in est.items()}
