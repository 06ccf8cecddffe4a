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
    from graphc.backends.cuda.nccl import BucketReduce, Join, insert_bucket_reduces, ready_after, touched_range

    program, g, buckets, n = lowered_train_step("L2H2C32", precision, early=True)
    ready = ready_after(program.steps, g.storage.id, buckets)
    # backward finishes the buckets in order (bf16: because casts_early moved each fp32 cast
    # next to its bf16 gradient), and before the end of the step: there is overlap to win
    assert ready == sorted(ready) and len(set(ready)) == len(ready)
    assert ready[0] < len(program.steps) // 2
    steps = insert_bucket_reduces(program.steps, g, buckets, nccl=None, comm=FakeStream())
    assert isinstance(steps[-1], Join)
    reduces = [i for i, s in enumerate(steps) if isinstance(s, BucketReduce)]
    assert len(reduces) == len(buckets)
    covered = sorted(r for i in reduces for r in steps[i].ranges)
    assert sum(c for _, c in covered) == n  # every parameter exactly once
    for i in reduces:  # nothing after a bucket's all-reduce touches its gradients
        for later in steps[i + 1:]:
            span = touched_range(later, g.storage.id)
            assert span is None or not any(span[0] < o + c and o < span[1] for o, c in steps[i].ranges)


def test_bf16_casts_at_the_end_without_casts_early():
    from graphc.backends.cuda.nccl import ready_after

    program, g, buckets, _ = lowered_train_step("L2H2C32", "bf16", early=False)
    ready = ready_after(program.steps, g.storage.id, buckets)
    assert min(ready) > len(program.steps) * 3 // 4  # why casts_early exists


def test_no_overlap_reduces_everything_once_at_the_end():
    from graphc.backends.cuda.nccl import BucketReduce, insert_bucket_reduces, merged

    program, g, buckets, n = lowered_train_step("L2H2C32", "fp32", early=False)
    steps = insert_bucket_reduces(program.steps, g, buckets, nccl=None, comm=FakeStream(), overlap=False)
    reduces = [s for s in steps if isinstance(s, BucketReduce)]
    assert len(reduces) == 1 and reduces[0].ranges == [(0, n)]
    assert merged([(10, 5), (0, 10), (20, 1)]) == [(0, 15), (20, 1)]
