"""Where the data-parallel all-reduces go in the lowered CUDA train step (no GPU needed):
each bucket right after the last step that writes its gradients, and in backward order."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("cuda.core", reason="cuda-core is not installed")


class FakeStream:
    stream = 1

    def event(self):
        return 0


def lowered_train_step(cfg_name, precision, early):
    from graphc.backends.cuda import bind_dims
    from graphc.backends.cuda.lower import lower
    from graphc.backends.cuda.program import Program
    from graphc.backends.cuda.tensor import Tensor, contiguous_strides
    from graphc.backends.cuda.train import casts_early
    from graphc.models.config import named_config
    from graphc.models.params import param_specs
    from graphc.passes.autodiff import grad_name
    from graphc.runtime.programs import grad_buckets, training_graph

    cfg = named_config(cfg_name)
    model = bind_dims(training_graph(cfg, backend="cuda", precision=precision), {"B": 2, "T": 16})
    if early:
        model = casts_early(model)
        onnx.checker.check_model(model)  # still topologically sorted
    specs = param_specs(cfg)
    n = sum(s.size for s in specs)
    program = Program()
    flat = Tensor(program.storage(n * 4, "external", "params"), (n,), (1,), np.dtype(np.float32))
    inputs = {s.name: flat.view(s.shape, contiguous_strides(s.shape), s.offset) for s in specs}
    g = Tensor(program.storage(n * 4, "grad", "grads"), (n,), (1,), np.dtype(np.float32))
    targets = {grad_name(s.name): g.view(s.shape, contiguous_strides(s.shape), s.offset) for s in specs}
    lower(model, inputs=inputs, targets=targets, program=program, where="cuda")
    return program, g, grad_buckets(cfg), n


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bucket_all_reduces_follow_their_last_gradient_write(precision):
    from graphc.backends.cuda.nccl import BucketReduce, Join, insert_bucket_reduces, overlaps, ready_after, touched_spans

    program, g, buckets, n = lowered_train_step("L2H2C32", precision, early=True)
    ready = ready_after(program.steps, g.storage.id, buckets)
    assert ready == sorted(ready) and min(ready) >= 0
    if precision == "fp32":  # backward finishes the buckets layer by layer: there is overlap to win
        assert len(set(ready)) == len(ready) and ready[0] < len(program.steps) // 2
    else:  # bf16: one flat cast of the bf16 gradients into the fp32 buffer ends backward (lower.py)
        assert len(set(ready)) == 1 and program.steps[ready[0]].node == "flat-cast:grads"
    steps = insert_bucket_reduces(program.steps, g, buckets, nccl=None, comm=FakeStream())
    assert isinstance(steps[-1], Join)
    reduces = [i for i, s in enumerate(steps) if isinstance(s, BucketReduce)]
    assert len(reduces) == len(set(ready))  # buckets final at the same step share one group
    covered = sorted(r for i in reduces for r in steps[i].ranges)
    assert sum(c for _, c in covered) == n  # every parameter exactly once
    for i in reduces:  # nothing after a bucket's all-reduce touches its gradients
        for later in steps[i + 1:]:
            assert not overlaps(touched_spans(later, g.storage.id), steps[i].ranges)


def test_no_overlap_reduces_everything_once_at_the_end():
    from graphc.backends.cuda.nccl import BucketReduce, insert_bucket_reduces, merged

    program, g, buckets, n = lowered_train_step("L2H2C32", "fp32", early=False)
    steps = insert_bucket_reduces(program.steps, g, buckets, nccl=None, comm=FakeStream(), overlap=False)
    reduces = [s for s in steps if isinstance(s, BucketReduce)]
    assert len(reduces) == 1 and reduces[0].ranges == [(0, n)]
    assert merged([(10, 5), (0, 10), (20, 1)]) == [(0, 15), (20, 1)]


@pytest.mark.parametrize("zero,accum", [(0, 1), (0, 2), (1, 1), (1, 2)])
def test_train_program_layout_for_data_parallel(zero, accum):
    """The whole step described for rank 1 of 2: which collectives, where, and the shard."""
    import types

    from graphc.backends.cuda.nccl import BucketReduce, Collective, Join
    from graphc.backends.cuda.train import build_train_program
    from graphc.models.config import named_config
    from graphc.models.params import num_parameters
    from graphc.runtime.programs import TrainSpec

    cfg = named_config("L2H2C32")
    n = num_parameters(cfg)
    flat = types.SimpleNamespace(ptr=0, nbytes=4 * n, shape=(n,), dtype=np.dtype(np.float32))
    dp = types.SimpleNamespace(zero=zero, world=2, rank=1, comm=None, overlap=True, comm_stream=FakeStream())
    layout = build_train_program(cfg, TrainSpec(2, 16, grad_accum=accum, parallel=dp), flat)
    steps = layout.program.steps
    kinds = [type(s).__name__ for s in steps if isinstance(s, (BucketReduce, Join, Collective))]
    nodes = [s.node for s in steps if isinstance(s, Collective)]
    half = n // 2
    if zero == 0:
        assert layout.shard == (0, n) and layout.m.size == n
        if accum == 1:  # per-bucket, inside the micro-batch's steps, joined before the norm
            assert kinds == ["BucketReduce"] * 4 + ["Join"]
            assert isinstance(steps[layout.n_micro_steps - 1], Join)
        else:  # accumulated gradients: one all-reduce after the last micro-batch
            assert nodes == ["nccl-allreduce"]
            assert steps.index(next(s for s in steps if isinstance(s, Collective))) == layout.n_accumulate_steps
    else:
        assert layout.shard == (half, n) and layout.m.size == half == layout.v.size
        assert nodes == ["nccl-reducescatter", "nccl-allreduce-norm", "nccl-allgather-params"]
    adamw = next(s for s in steps if s.node == "adamw")
    assert adamw.args[0].offset == layout.shard[0] and adamw.args[0].size == layout.shard[1] - layout.shard[0]
