"""The whole training step on the GPU, captured once as one CUDA graph and replayed.

Memory: the parameters (``DeviceParams``, llm.c's flat fp32 layout), the flat gradient
buffer, AdamW's m and v, and every activation of the lowered training graph live in GPU
memory at fixed addresses. Each step the host writes tokens, targets, lr and t into
pinned memory and replays one graph: copy-in (async, from the pinned buffers), forward,
backward (gradients land straight in the flat gradient buffer), global gradient norm
(deterministic two-pass), AdamW (clipping by the norm on the device), copy-out of the loss
and the norm into pinned memory. Nothing is re-captured when lr or t change.

Gradient accumulation (``TrainSpec.grad_accum`` = k) is inside the same graph: the lowered
forward + backward is recorded k times, each with its micro-batch copied in from its slot
of the pinned buffer and followed by a kernel adding its gradient, scaled by 1/k, into the
accumulated buffer (a second n-float buffer) and a copy-out of its loss. Recomputation
(``TrainSpec.recompute``) is the graph pass ``passes/recompute.py``; the arena's liveness
planner then reuses the room of the GELU / layer-norm outputs it frees.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from graphc.backends.cuda import bind_dims
from graphc.backends.cuda import kernels as K
from graphc.backends.cuda.lower import lower
from graphc.backends.cuda.program import Program
from graphc.runtime.programs import (Evaluator, StepResult, TrainStep, decay_mask, forward_graph, grad_buckets,
                                     mean_loss_of, micro_batches, training_graph)

SUMSQ_BLOCKS = 264


def param_inputs(program: Program, params) -> dict:
    flat = program.external(params.flat, "params")
    return {s.name: flat.view(s.shape, _strides(s.shape), s.offset) for s in params.specs}


def _strides(shape):
    from graphc.backends.cuda.tensor import contiguous_strides

    return contiguous_strides(shape)


@dataclasses.dataclass
class TrainLayout:
    """The whole step described (no device touched yet): the program, its tensors, and
    which slice of ``program.steps`` is replayed per micro-batch."""

    program: Program
    grads: object            # Tensor: the step's gradient (norm and AdamW read it)
    m: object
    v: object
    hyper: object            # [lr, t, grad norm, -]
    n_micro_steps: int       # steps[:n_micro_steps]: the lowered forward + backward
    n_accumulate_steps: int  # steps[n_micro_steps:n_accumulate_steps]: the first accumulation
    accumulate_add: object   # the accumulation of micro-batches 1..k-1 (None when k == 1)
    shard: tuple = (0, 0)    # [start, stop) of the flat buffers this rank's AdamW updates (m, v: that size)


def build_train_program(cfg, spec, flat) -> TrainLayout:
    """Lower the training graph for ``spec`` around the flat parameter buffer ``flat`` (a
    ``DeviceBuffer``, or anything with ptr / nbytes / shape / dtype for an estimate)."""
    from graphc.backends.cuda.program import KernelStep
    from graphc.backends.cuda.tensor import Tensor
    from graphc.models.params import param_specs
    from graphc.passes.autodiff import grad_name

    specs = param_specs(cfg)
    n = int(np.prod(flat.shape))
    model = training_graph(cfg, opt=spec.opt, backend="cuda", precision=spec.precision, recompute=spec.recompute)
    model = bind_dims(model, {"B": spec.B, "T": spec.T})
    dp = spec.parallel
    if dp is not None and spec.grad_accum == 1 and dp.zero == 0:
        model = casts_early(model)  # so that buckets finish layer by layer (overlap)
    program = Program()
    flat_t = program.external(flat, "params")
    inputs = {s.name: flat_t.view(s.shape, _strides(s.shape), s.offset) for s in specs}
    f32 = np.dtype(np.float32)
    k = spec.grad_accum
    # the lowered graph writes each micro-batch's gradient into ``micro``; with k > 1 an
    # accumulation kernel adds it, scaled by 1/k, into ``g`` (what the norm and AdamW read)
    micro = Tensor(program.storage(n * 4, "grad", "grads"), (n,), (1,), f32)
    g = micro if k == 1 else Tensor(program.storage(n * 4, "grad", "grads.accumulated"), (n,), (1,), f32)
    targets = {grad_name(s.name): micro.view(s.shape, _strides(s.shape), s.offset) for s in specs}
    lower(model, inputs=inputs, targets=targets, program=program, where="cuda")
    n_micro = len(program.steps)
    accumulate_add = None
    if k > 1:
        grid = (-(-n // 256),)
        src, name = K.accumulate(n, 1.0 / k, first=True)
        program.steps.append(KernelStep(src, name, grid, (256,), [g, micro], "grad-accumulate"))
        src, name = K.accumulate(n, 1.0 / k, first=False)
        accumulate_add = KernelStep(src, name, grid, (256,), [g, micro], "grad-accumulate")
    lo, size = 0, n
    if dp is not None:
        lo, size = data_parallel_gradients(dp, program, g, n, cfg, overlap_steps=n_micro if k == 1 else None)
        if k == 1:
            n_micro = len(program.steps)
    n_acc = len(program.steps)
    if dp is not None and dp.zero == 0 and k > 1:  # one all-reduce of the accumulated gradients
        from graphc.backends.cuda.nccl import AVG, Collective

        program.steps.append(Collective(
            lambda stream: dp.comm.all_reduce(g.ptr, g.ptr, n, np.float32, AVG, stream), "nccl-allreduce", [g]))
    elif dp is not None and dp.zero == 1:  # llm.c's ZeRO-1: each rank gets the average of its shard
        from graphc.backends.cuda.nccl import AVG, Collective

        program.steps.append(Collective(
            lambda stream: dp.comm.reduce_scatter(g.ptr, g.ptr + lo * 4, size, np.float32, AVG, stream),
            "nccl-reducescatter", [g]))
    # optimizer state (of this rank's shard) and step constants
    m = Tensor(program.storage(size * 4, "state", "adam.m"), (size,), (1,), f32)
    v = Tensor(program.storage(size * 4, "state", "adam.v"), (size,), (1,), f32)
    hyper = Tensor(program.storage(16, "state", "hyper"), (4,), (1,), f32)
    part = Tensor(program.storage(SUMSQ_BLOCKS * 8, "scratch", "sumsq"), (SUMSQ_BLOCKS,), (1,), np.dtype(np.float64))
    mask_np = decay_mask(cfg, spec.decay_matrices_only)
    mask = None
    if mask_np is not None and spec.adamw.weight_decay != 0:
        mask = Tensor(program.storage(n * 4, "const", "decay-mask"), (n,), (1,), f32)
        program.consts.append((mask, mask_np))
    g_shard = g.view((size,), (1,), lo)
    src, (k1, k2) = K.sumsq(size, SUMSQ_BLOCKS)
    norm_view = hyper.view((1,), (1,), 2)
    program.steps.append(KernelStep(src, k1, (SUMSQ_BLOCKS,), (256,), [g_shard, part], "grad-norm"))
    if size < n:  # ZeRO-1: each rank summed its shard; add the partials of all (deterministic)
        from graphc.backends.cuda.nccl import SUM, Collective

        program.steps.append(Collective(
            lambda stream: dp.comm.all_reduce(part.ptr, part.ptr, SUMSQ_BLOCKS, np.float64, SUM, stream),
            "nccl-allreduce-norm", [part]))
    program.steps.append(KernelStep(src, k2, (1,), (256,), [part, norm_view], "grad-norm"))
    a = spec.adamw
    src = K.adamw(size, a.beta1, a.beta2, a.eps, a.weight_decay, a.grad_clip, mask is not None)
    flat_all = flat_t.view((n,), (1,), 0)
    p_shard = flat_t.view((size,), (1,), lo)
    program.steps.append(KernelStep(src[0], src[1], (-(-size // 256),), (256,),
                                    [p_shard, g_shard, m, v, hyper,
                                     mask.view((size,), (1,), lo) if mask is not None else hyper], "adamw"))
    if size < n:  # ZeRO-1: every rank gets the others' updated shards
        from graphc.backends.cuda.nccl import Collective

        program.steps.append(Collective(
            lambda stream: dp.comm.all_gather(p_shard.ptr, flat_all.ptr, size, np.float32, stream),
            "nccl-allgather-params", []))
    return TrainLayout(program, g, m, v, hyper, n_micro, n_acc, accumulate_add, (lo, lo + size))


def memory_estimate(cfg, spec) -> dict[str, int]:
    """Bytes of GPU memory the train step needs, by kind, without a GPU: the arena as
    ``Program.finalize`` lays it out (activations shared by liveness) plus the parameters
    (``params``) and the pinned staging's device side. cuBLAS / cuDNN handles, the CUDA
    context and compiled modules come on top (~1 GiB)."""
    import types

    from graphc.models.params import num_parameters
    from graphc.backends.cuda.program import plan_memory

    n = num_parameters(cfg)
    flat = types.SimpleNamespace(ptr=0, nbytes=4 * n, shape=(n,), dtype=np.dtype(np.float32))
    program = build_train_program(cfg, spec, flat).program
    placed = [s for s in program.storages if s.kind != "external"]
    arena = plan_memory(program, placed, True)
    by_kind = {"params": 4 * n}
    for s in placed:
        by_kind[s.kind] = by_kind.get(s.kind, 0) + s.nbytes
    fixed = sum(v for k, v in by_kind.items() if k not in ("params", "act", "scratch"))
    by_kind["act+scratch (shared)"] = arena - fixed
    by_kind.pop("act", None)
    by_kind.pop("scratch", None)
    by_kind["total"] = arena + 4 * n
    return by_kind


class CudaTrainStep(TrainStep):
    def __init__(self, backend, params, spec):
        from graphc.runtime.cuda import Graph, PinnedBuffer

        self.backend, self.params, self.spec = backend, params, spec
        rt = backend.rt
        cfg = params.cfg
        if getattr(params.flat, "device", "cpu") != "cuda:0":
            raise ValueError("CudaTrainStep needs parameters uploaded with CudaBackend.upload_params")
        t0 = time.perf_counter()
        layout = build_train_program(cfg, spec, params.flat)
        t1 = time.perf_counter()
        self.program = program = layout.program
        self.grads, self.m, self.v, self.hyper = layout.grads, layout.m, layout.v, layout.hyper
        self.n_micro_steps, self.n_accumulate_steps = layout.n_micro_steps, layout.n_accumulate_steps
        self.accumulate_add = layout.accumulate_add
        self.parallel, self.shard = spec.parallel, layout.shard
        m, v, k = self.m, self.v, spec.grad_accum
        # pinned staging: k micro-batches of tokens and targets (int64), hyper in; norm and k losses out
        B, T = spec.B, spec.T
        BT8 = B * T * 8
        self.pinned = PinnedBuffer(2 * k * BT8 + 32 + 4 * (k + 1))
        self.h_tokens = self.pinned.array(np.int64, (k, B, T), 0)
        self.h_targets = self.pinned.array(np.int64, (k, B, T), k * BT8)
        self.h_hyper = self.pinned.array(np.float32, (4,), 2 * k * BT8)
        self.h_out = self.pinned.array(np.float32, (k + 1,), 2 * k * BT8 + 32)   # norm, loss_0..loss_k-1
        self.loss_t = program.outputs["loss"]
        self.tokens_t, self.targets_t = program.inputs["tokens"], program.inputs["targets"]
        program.finalize(rt, backend.modules)
        if self.accumulate_add is not None:
            self.accumulate_add.prepare(rt, backend.modules)
        self._zero(m)
        self._zero(v)
        self.h_hyper[:] = 0
        t2 = time.perf_counter()
        self.graph = Graph(rt.stream, self._record)
        rt.synchronize()
        t3 = time.perf_counter()
        self.setup_seconds = {"graphs and lowering": t1 - t0, "arena, kernels (NVRTC or disk cache), plans": t2 - t1,
                              "CUDA graph capture": t3 - t2}
        self.buckets = grad_buckets(cfg)
        self.grad_hooks = []

    def _zero(self, t) -> None:
        from cuda.bindings import driver

        from graphc.runtime.cuda import check

        check(driver.cuMemsetD8Async(t.ptr, 0, t.size * t.dtype.itemsize, self.backend.rt.stream))

    def _record(self, stream: int) -> None:
        """Per micro-batch: copy its tokens and targets in (async, from pinned memory), the
        lowered forward + backward, accumulate, copy its loss out; then norm and AdamW."""
        from graphc.runtime.cuda.driver import memcpy_dtoh_async, memcpy_htod_async

        BT8 = self.h_tokens[0].nbytes
        steps = self.program.steps
        memcpy_htod_async(self.hyper.ptr, self.h_hyper.ctypes.data, 8, stream)  # lr, t (the norm is computed)
        for i in range(self.spec.grad_accum):
            memcpy_htod_async(self.tokens_t.ptr, self.h_tokens.ctypes.data + i * BT8, BT8, stream)
            memcpy_htod_async(self.targets_t.ptr, self.h_targets.ctypes.data + i * BT8, BT8, stream)
            for step in steps[:self.n_micro_steps]:
                step.record(stream)
            if i == 0:
                for step in steps[self.n_micro_steps:self.n_accumulate_steps]:
                    step.record(stream)
            else:
                self.accumulate_add.record(stream)
            if self.parallel is not None:  # the printed loss is the mean over ranks
                from graphc.backends.cuda.nccl import AVG

                self.parallel.comm.all_reduce(self.loss_t.ptr, self.loss_t.ptr, 1, np.float32, AVG, stream)
            memcpy_dtoh_async(self.h_out.ctypes.data + 4 * (i + 1), self.loss_t.ptr, 4, stream)
        for step in steps[self.n_accumulate_steps:]:
            step.record(stream)
        memcpy_dtoh_async(self.h_out.ctypes.data, self.hyper.ptr + 8, 4, stream)

    def run(self, tokens, targets, *, t: int, lr: float) -> StepResult:
        self.submit(tokens, targets, t=t, lr=lr)
        return self.wait()

    def submit(self, tokens, targets, *, t: int, lr: float) -> None:
        """Write the batch and lr/t into pinned memory and launch the graph (no wait): its
        first nodes copy them to the device asynchronously while the host goes on."""
        self.h_tokens[...] = micro_batches(tokens, self.spec)
        self.h_targets[...] = micro_batches(targets, self.spec)
        self.h_hyper[0], self.h_hyper[1] = lr, t
        self.graph.replay()

    def wait(self) -> StepResult:
        self.backend.rt.synchronize()
        for bucket in self.buckets if self.grad_hooks else ():
            for hook in self.grad_hooks:
                hook(bucket)
        norm = float(self.h_out[0])
        loss = mean_loss_of(self.h_out[1:])
        return StepResult(loss, norm if self.spec.adamw.grad_clip > 0 else None)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """AdamW's m and v of the whole model (ZeRO-1: gathered from every rank; collective)."""
        from graphc.backends.cuda import _dtoh

        self.backend.rt.synchronize()
        lo, hi = self.shard
        if hi - lo == self.params.flat.size:
            return {"m": _dtoh(self.m), "v": _dtoh(self.v)}
        full = self.backend.alloc((self.parallel.world * (hi - lo),), np.float32)
        out = {}
        for key, t in (("m", self.m), ("v", self.v)):
            self.parallel.comm.all_gather(t.ptr, full.ptr, hi - lo, np.float32, self.backend.rt.stream)
            out[key] = full.to_numpy()
        return out

    def load_optimizer_state(self, state) -> None:
        from graphc.backends.cuda import _htod

        self.backend.rt.synchronize()
        lo, hi = self.shard
        for key, t in (("m", self.m), ("v", self.v)):
            a = np.ascontiguousarray(state[key], dtype=np.float32)
            if a.shape != (self.params.flat.size,):
                raise ValueError("optimizer state does not match the model's parameter count")
            _htod(t.ptr, np.ascontiguousarray(a[lo:hi]))

    def profile(self, repeat: int = 3) -> list[tuple[str, float]]:
        """Milliseconds per lowered node (eager launches between events), summed by node."""
        from graphc.runtime.cuda.driver import EventTimer

        rt = self.backend.rt
        timer = EventTimer(rt)
        totals: dict[str, float] = {}
        for _ in range(repeat):
            for step in self.program.steps:
                timer.begin()
                step.record(rt.stream)
                totals[step.node] = totals.get(step.node, 0.0) + timer.end_ms() / repeat
        return sorted(totals.items(), key=lambda kv: -kv[1])


def casts_early(model):
    """A copy of ``model`` whose output Casts (the BF16 graph's fp32 ``grad.*``) run right
    after the node that makes their input, instead of together at the end of backward: then
    a layer's gradients are final (and all-reduced) while earlier layers are in backward."""
    import onnx

    outputs = {o.name for o in model.graph.output}
    nodes = list(model.graph.node)
    early = [n for n in nodes if n.op_type == "Cast" and len(n.input) == 1 and n.output[0] in outputs]
    early_ids = {id(n) for n in early}
    by_input: dict[str, list] = {}
    for n in early:
        by_input.setdefault(n.input[0], []).append(n)
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    order = []
    for n in early:
        if n.input[0] in available:
            order.append(n)
    for n in nodes:
        if id(n) in early_ids:
            continue
        order.append(n)
        for out in n.output:
            order.extend(by_input.get(out, []))
    if len(order) != len(nodes):  # an input made by an early cast itself: keep the given order
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.node[:]
    m.graph.node.extend(order)
    return m


def data_parallel_gradients(dp, program: Program, grads, n: int, cfg, overlap_steps: int | None) -> tuple[int, int]:
    """Where this rank's gradients get averaged across ranks; returns the (start, size) of the
    flat buffers its AdamW updates.

    Without ZeRO and without accumulation (``overlap_steps``: the lowered forward + backward
    are ``program.steps[:overlap_steps]``): each bucket is all-reduced on a second stream as
    soon as backward has written it, overlapping the rest of backward; a join follows. (With
    accumulation the caller all-reduces the accumulated buffer once.) ZeRO-1: the caller
    reduce-scatters after backward; this rank alone updates [rank * n/world, +n/world)."""
    from graphc.backends.cuda.nccl import CommStream, insert_bucket_reduces
    from graphc.errors import GraphcError

    if dp.zero == 0:
        if overlap_steps is not None:
            dp.comm_stream = dp.comm_stream or CommStream()
            steps = insert_bucket_reduces(program.steps[:overlap_steps], grads, grad_buckets(cfg), dp.comm,
                                          dp.comm_stream, overlap=dp.overlap)
            program.steps[:overlap_steps] = steps
        return 0, n
    if n % dp.world:
        raise GraphcError(None, f"ZeRO-1 shards the {n} parameters evenly; {n} is not divisible by "
                          f"{dp.world} GPUs", "--zero")
    size = n // dp.world
    return dp.rank * size, size


class CudaEvaluator(Evaluator):
    """Forward with loss on the device, sharing the parameters (no copy)."""

    def __init__(self, backend, params, B: int, T: int, *, precision: str = "fp32", opt: bool = True):
        from graphc.runtime.cuda import Graph

        self.backend = backend
        model = bind_dims(forward_graph(params.cfg, loss=True, logits=False, opt=opt, backend="cuda",
                                        precision=precision), {"B": B, "T": T})
        self.program = Program()
        lower(model, inputs=param_inputs(self.program, params), program=self.program, where="cuda")
        self.program.finalize(backend.rt, backend.modules)
        self.graph = Graph(backend.rt.stream, self.program.record)
        self.tokens_t, self.targets_t = self.program.inputs["tokens"], self.program.inputs["targets"]

    def loss(self, tokens, targets) -> float:
        from graphc.backends.cuda import _dtoh, _htod

        self.backend.rt.synchronize()
        _htod(self.tokens_t.ptr, np.ascontiguousarray(tokens, dtype=np.int64))
        _htod(self.targets_t.ptr, np.ascontiguousarray(targets, dtype=np.int64))
        self.graph.replay()
        self.backend.rt.synchronize()
        return float(_dtoh(self.program.outputs["loss"]))
