"""The CUDA backend without a GPU: lowering coverage and NVRTC compilation of every kernel.

Lowering describes work without touching a device, and NVRTC needs no GPU, so CI checks
that every op of GPT-2's optimised graphs (train and infer, fp32 and bf16) has a lowering,
that every kernel graphc generates for them compiles for sm_90, and the pieces of the
lowering that are plain arithmetic (no-copy reshapes, the bf16 rounding) against numpy.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from graphc.backends.cuda.tensor import contiguous_strides, reshape_strides

nvrtc = pytest.importorskip("cuda.core", reason="cuda-core (NVRTC) is not installed")


def lowered(cfg_name, mode, precision, B, T):
    from graphc.backends.cuda import bind_dims
    from graphc.backends.cuda.lower import lower
    from graphc.models.config import named_config
    from graphc.runtime.programs import forward_graph, training_graph

    cfg = named_config(cfg_name)
    if mode == "train":
        model = training_graph(cfg, backend="cuda", precision=precision)
    else:
        model = forward_graph(cfg, loss=True, logits=True, backend="cuda", precision=precision)
    return model, lower(bind_dims(model, {"B": B, "T": T}))


@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_gpt2_kernel_compiles(mode, precision, tmp_path, monkeypatch):
    """d12's graphs at B4 T64: every op lowered, every generated kernel compiles (sm_90)."""
    from graphc.runtime.cuda.modules import compile_cubin

    monkeypatch.setenv("GRAPHC_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("GRAPHC_CUDNN", "0")    # the own attention kernels are compiled too
    model, program = lowered("d12", mode, precision, 4, 64)
    sources = sorted(set(program.sources()))
    assert len(sources) >= 5
    for src, name in sources:
        cubin = compile_cubin(src, "sm_90", use_cache=False)
        assert cubin[:4] == b"\x7fELF", name
    # every graph output is produced on the device
    assert set(program.outputs) == {o.name for o in model.graph.output}


def test_missing_lowering_is_one_line_error():
    import onnx
    from onnx import TensorProto, helper

    from graphc.backends.cuda.lower import check_lowerable
    from graphc.errors import GraphcError

    g = helper.make_graph([helper.make_node("Einsum", ["x", "x"], ["y"], name="mystery", equation="ij,jk->ik")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    with pytest.raises(GraphcError) as e:
        check_lowerable(helper.make_model(g))
    assert "mystery (Einsum)" in str(e.value) and "\n" not in str(e.value)
    del onnx


def test_no_copy_reshape_matches_numpy():
    rng = np.random.default_rng(0)
    for _ in range(400):
        nd = int(rng.integers(1, 5))
        shape = tuple(int(x) for x in rng.integers(1, 4, nd))
        base = np.arange(int(np.prod(shape)))
        perm = rng.permutation(nd)
        view = base.reshape(shape).transpose(perm)
        strides = tuple(s // 8 for s in view.strides)
        size = view.size
        for new in {(size,), (1, size), tuple(sorted(shape)), tuple(view.shape[::-1])}:
            if int(np.prod(new)) != size:
                continue
            got = reshape_strides(view.shape, strides, new)
            if got is None:
                continue
            idx = [sum(i * s for i, s in zip(ix, got)) for ix in itertools.product(*[range(d) for d in new])]
            assert np.array_equal(base[idx], view.reshape(-1)), (shape, perm, new)
    assert reshape_strides((4, 6), contiguous_strides((4, 6)), (2, 12)) == (12, 1)
    assert reshape_strides((6, 4), (1, 6), (24,)) is None   # a transposed matrix cannot flatten


def test_cublas_operand_mapping():
    """The row-major -> column-major operand rule of blas.py, checked with numpy."""
    from graphc.backends.cuda.blas import operand
    from graphc.backends.cuda.tensor import Storage, Tensor

    st = Storage(0, 0, "act", "x")
    x = Tensor(st, (3, 5), (5, 1), np.dtype(np.float32))
    assert operand(x, False) == (False, 5) and operand(x, True) == (True, 5)
    xt = x.transpose((1, 0))        # [5, 3] stored column-major
    assert operand(xt, False) == (True, 5) and operand(xt, True) == (False, 5)
    assert operand(Tensor(st, (3, 5), (10, 2), np.dtype(np.float32)), False) is None


def test_memory_plan_never_overlaps_live_storages():
    """Arena reuse: two storages that are live at the same step never share bytes, and
    reuse makes the arena smaller than one slot per storage."""
    from graphc.backends.cuda.program import lifetimes, plan_memory

    _, program = lowered("L2H4C64", "train", "fp32", 4, 64)
    placed = [s for s in program.storages if s.kind != "external"]
    plain = plan_memory(program, placed, False)
    size = plan_memory(program, placed, True)
    assert size < plain
    spans = lifetimes(program)
    everything = (0, len(program.steps))
    boxes = [(s.offset, s.offset + s.nbytes, *spans.get(s.id, everything)) for s in placed if s.nbytes]
    for i, (a0, a1, f0, l0) in enumerate(boxes):
        assert a1 <= size
        for b0, b1, f1, l1 in boxes[i + 1:]:
            if a0 < b1 and b0 < a1:   # share bytes: then they must never be live together
                assert l0 < f1 or l1 < f0


def test_memory_estimate_is_one_line_error():
    from graphc.backends.cuda.program import check_fits
    from graphc.errors import GraphcError

    _, program = lowered("L2H4C64", "train", "fp32", 4, 64)
    with pytest.raises(GraphcError) as e:
        check_fits(program, 10 << 30, 1 << 30)
    assert "needs 10.0 GiB" in str(e.value) and "1.0 GiB is free" in str(e.value) and "\n" not in str(e.value)
    check_fits(program, 1 << 20, 1 << 30)


def test_mixed_precision_casts_are_two_flat_kernels():
    """BF16 training bound to a flat parameter buffer and flat gradient targets (as
    CudaTrainStep binds them): no per-parameter Cast kernels remain, one flat cast converts
    the masters on entry and one the gradients on exit, every bf16 parameter is a view of
    the entry copy at its master's offset and every gradient lands in its target."""
    from graphc.backends.cuda import bind_dims
    from graphc.backends.cuda.lower import lower
    from graphc.backends.cuda.program import KernelStep, Program
    from graphc.backends.cuda.tensor import Tensor
    from graphc.backends.cuda.train import param_inputs
    from graphc.models.config import named_config
    from graphc.passes.autodiff import grad_name
    from graphc.runtime.programs import param_specs, training_graph

    cfg = named_config("L2H4C64")
    specs = param_specs(cfg)
    n = max(s.offset + int(np.prod(s.shape)) for s in specs)

    class Flat:   # a DeviceBuffer's description is all lowering reads
        nbytes, ptr, shape, dtype = n * 4, 0, (n,), np.float32

    class Params:
        flat = Flat()

    Params.specs = specs
    program = Program()
    inputs = param_inputs(program, Params)
    grads = Tensor(program.storage(n * 4, "grad", "grads"), (n,), (1,), np.dtype(np.float32))
    targets = {grad_name(s.name): grads.view(s.shape, contiguous_strides(s.shape), s.offset) for s in specs}
    model = bind_dims(training_graph(cfg, backend="cuda", precision="bf16"), {"B": 2, "T": 16})
    lower(model, inputs=inputs, targets=targets, program=program)
    kernels = [s for s in program.steps if isinstance(s, KernelStep)]
    assert not [s for s in kernels if s.node.endswith("(Cast)")]
    flat = [s for s in kernels if s.node.startswith("flat-cast:")]
    assert [s.node for s in flat] == ["flat-cast:params", "flat-cast:grads"]
    assert program.steps[0] is flat[0] and program.steps[-1] is flat[1]
    assert flat[0].args[0].size == n and flat[1].args[0].storage is grads.storage
    for s in specs:
        low = program.debug_values[f"{s.name}/bf16"]
        assert low.storage is flat[0].args[0].storage and low.offset == s.offset
        assert program.outputs[grad_name(s.name)].storage is grads.storage
