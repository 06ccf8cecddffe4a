"""NCCL for the CUDA train step, through NVIDIA's own Python bindings (``nccl4py``).

:class:`Nccl` is one communicator (one rank of a data-parallel group) and the three
collectives data-parallel training needs, each enqueued on a given stream so that it can
be captured in the step's CUDA graph (NCCL supports stream capture since 2.9):

* ``all_reduce`` (average) of gradient ranges, per bucket, in one NCCL group;
* ``reduce_scatter`` / ``all_gather`` in place (ZeRO-1: each rank reduces and updates its
  shard of the flat buffers, then the updated parameters are gathered).

:func:`data_parallel_steps` turns the seam's :class:`~graphc.runtime.programs.GradBucket`
list into program steps: for each bucket, the step index after which its gradients are
final is found from the lowered program itself (the last step whose tensors overlap the
bucket's ranges), and there an event is recorded on the compute stream; a second stream
waits for it and all-reduces the bucket, so a layer's all-reduce runs while the earlier
layers are still in backward. A join step makes the compute stream wait for the last
collective before the gradient norm and AdamW.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

FLOAT32, FLOAT64 = 7, 8         # ncclDataType_t
SUM, AVG = 0, 4                 # ncclRedOp_t
DTYPES = {np.dtype(np.float32): FLOAT32, np.dtype(np.float64): FLOAT64}


def new_unique_id() -> bytes:
    """A fresh ncclUniqueId (128 bytes) for rank 0 to share through the rendezvous."""
    from nccl.core import get_unique_id

    return bytes(get_unique_id())


class Nccl:
    """One rank of an NCCL communicator on the current CUDA device."""

    def __init__(self, rank: int, world: int, unique_id: bytes):
        from nccl.bindings import nccl as bindings
        from nccl.core import Communicator
        from nccl.core.utils import UniqueId

        self._b = bindings
        self.rank, self.world = rank, world
        self.comm = Communicator.init(world, rank, UniqueId.from_bytes(unique_id))
        self._handle = self.comm._comm  # what nccl4py's own collectives pass to the bindings

    @contextlib.contextmanager
    def group(self):
        """ncclGroupStart / ncclGroupEnd: the calls inside become one fused launch."""
        self._b.group_start()
        try:
            yield
        finally:
            self._b.group_end()

    def all_reduce(self, send: int, recv: int, count: int, dtype, op: int, stream: int) -> None:
        self._b.all_reduce(send, recv, count, DTYPES[np.dtype(dtype)], op, self._handle, stream)

    def reduce_scatter(self, send: int, recv: int, recvcount: int, dtype, op: int, stream: int) -> None:
        self._b.reduce_scatter(send, recv, recvcount, DTYPES[np.dtype(dtype)], op, self._handle, stream)

    def all_gather(self, send: int, recv: int, sendcount: int, dtype, stream: int) -> None:
        self._b.all_gather(send, recv, sendcount, DTYPES[np.dtype(dtype)], self._handle, stream)

    def close(self) -> None:
        if self.comm is not None:
            self.comm.destroy()
            self.comm = None


# ============================================================================ program steps
def touched_spans(step, storage_id: int) -> list[tuple[int, int]]:
    """Element spans [lo, hi) of storage ``storage_id`` that ``step`` may read or write, one
    per tensor argument (a whole-storage argument: everything)."""
    from graphc.backends.cuda.program import KernelStep, MemsetStep
    from graphc.backends.cuda.tensor import Storage, Tensor

    items = step.args if isinstance(step, KernelStep) else [step.tensor] if isinstance(step, MemsetStep) \
        else getattr(step, "tensors", [])
    spans = []
    for a in items:
        if isinstance(a, Storage) and a.id == storage_id:
            return [(0, 1 << 62)]
        if isinstance(a, Tensor) and a.storage.id == storage_id:
            lo = a.offset + sum(s * (d - 1) for d, s in zip(a.shape, a.strides) if s < 0)
            hi = a.offset + sum(s * (d - 1) for d, s in zip(a.shape, a.strides) if s > 0) + 1
            spans.append((lo, hi))
    return spans


def overlaps(spans, ranges) -> bool:
    return any(lo < off + size and off < hi for lo, hi in spans for off, size in ranges)


def ready_after(steps: list, storage_id: int, buckets) -> list[int]:
    """For each bucket: the index of the last step touching any of its ranges (-1: none)."""
    spans = [touched_spans(s, storage_id) for s in steps]
    out = []
    for b in buckets:
        last = -1
        for i, sp in enumerate(spans):
            if overlaps(sp, b.ranges):
                last = i
        out.append(last)
    return out


@dataclasses.dataclass
class BucketReduce:
    """Record an event on the compute stream; on the comm stream wait for it, then average
    the buckets' gradient ranges across ranks (one NCCL group). Captured like any step."""

    nccl: Nccl
    comm_stream: int
    event: int
    grads: object           # the flat float32 gradient Tensor (its address is known after finalize)
    ranges: list            # (offset, count) in elements
    node: str = "nccl-allreduce"
    tensors: list = dataclasses.field(default_factory=list)

    def prepare(self, rt, modules) -> None:
        pass

    def record(self, stream: int) -> None:
        from cuda.bindings import driver

        from graphc.runtime.cuda.driver import check

        check(driver.cuEventRecord(self.event, stream))
        check(driver.cuStreamWaitEvent(self.comm_stream, self.event, 0))
        base = self.grads.ptr
        with self.nccl.group():
            for offset, count in self.ranges:
                ptr = base + offset * 4
                self.nccl.all_reduce(ptr, ptr, count, np.float32, AVG, self.comm_stream)


@dataclasses.dataclass
class Join:
    """The compute stream waits for everything enqueued on the comm stream so far."""

    comm_stream: int
    event: int
    node: str = "nccl-join"
    tensors: list = dataclasses.field(default_factory=list)

    def prepare(self, rt, modules) -> None:
        pass

    def record(self, stream: int) -> None:
        from cuda.bindings import driver

        from graphc.runtime.cuda.driver import check

        check(driver.cuEventRecord(self.event, self.comm_stream))
        check(driver.cuStreamWaitEvent(stream, self.event, 0))


@dataclasses.dataclass
class Collective:
    """One collective on the compute stream itself: ``call(stream)``."""

    call: object
    node: str
    tensors: list = dataclasses.field(default_factory=list)

    def prepare(self, rt, modules) -> None:
        pass

    def record(self, stream: int) -> None:
        self.call(stream)


class CommStream:
    """A second stream and events for overlapping collectives with backward."""

    def __init__(self):
        from cuda.bindings import driver

        from graphc.runtime.cuda.driver import check

        self.stream = int(check(driver.cuStreamCreate(driver.CUstream_flags.CU_STREAM_NON_BLOCKING)))
        self._events = []

    def event(self) -> int:
        from cuda.bindings import driver

        from graphc.runtime.cuda.driver import check

        ev = check(driver.cuEventCreate(driver.CUevent_flags.CU_EVENT_DISABLE_TIMING))
        self._events.append(ev)
        return ev


def insert_bucket_reduces(steps: list, grads, buckets, nccl: Nccl, comm: CommStream, *, overlap: bool = True) -> list:
    """``steps`` with a :class:`BucketReduce` after the step that finishes each bucket (or, with
    ``overlap`` off, one after the last backward step) and a :class:`Join` at the end."""
    ready = ready_after(steps, grads.storage.id, buckets)
    if not overlap:
        ready = [max(ready)] * len(buckets)
    at: dict[int, list] = {}
    for b, i in zip(buckets, ready):
        at.setdefault(i, []).extend(b.ranges)
    out = []
    if -1 in at:  # parameters with no gradient step (cannot happen for GPT-2): reduce first
        out.append(BucketReduce(nccl, comm.stream, comm.event(), grads, merged(at[-1])))
    for i, step in enumerate(steps):
        out.append(step)
        if i in at:
            out.append(BucketReduce(nccl, comm.stream, comm.event(), grads, merged(at[i])))
    out.append(Join(comm.stream, comm.event()))
    return out


def merged(ranges) -> list[tuple[int, int]]:
    """(offset, count) ranges sorted, adjacent ones joined (fewer, larger collectives)."""
    out: list[list[int]] = []
    for off, n in sorted(ranges):
        if out and out[-1][0] + out[-1][1] == off:
            out[-1][1] += n
        else:
            out.append([off, n])
    return [(a, b) for a, b in out]
