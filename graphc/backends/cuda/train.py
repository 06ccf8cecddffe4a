"""The whole training step on the GPU, captured once as one CUDA graph and replayed.

Memory: the parameters (``DeviceParams``, llm.c's flat fp32 layout), the flat gradient
buffer, AdamW's m and v, and every activation of the lowered training graph live in GPU
memory at fixed addresses. Each step the host writes tokens, targets, lr and t into
pinned memory and replays one graph: copy-in (async, from the pinned buffers), forward,
backward (gradients land straight in the flat gradient buffer), global gradient norm
(deterministic two-pass), AdamW (clipping by the norm on the device), copy-out of the loss
and the norm into pinned memory. Nothing is re-captured when lr or t change.
"""

from __future__ import annotations

import numpy as np

from graphc.backends.cuda import bind_dims
from graphc.backends.cuda import kernels as K
from graphc.backends.cuda.lower import lower
from graphc.backends.cuda.program import CallStep, Program
from graphc.runtime.programs import (Evaluator, StepResult, TrainStep, decay_mask, forward_graph, grad_buckets,
                                     training_graph)

SUMSQ_BLOCKS = 264


def param_inputs(program: Program, params) -> dict:
    flat = program.external(params.flat, "params")
    return {s.name: flat.view(s.shape, _strides(s.shape), s.offset) for s in params.specs}


def _strides(shape):
    from graphc.backends.cuda.tensor import contiguous_strides

    return contiguous_strides(shape)


class CudaTrainStep(TrainStep):
    def __init__(self, backend, params, spec):
        from graphc.passes.autodiff import grad_name
        from graphc.runtime.cuda import Graph, PinnedBuffer

        self.backend, self.params, self.spec = backend, params, spec
        rt = backend.rt
        cfg = params.cfg
        n = params.flat.size
        if getattr(params.flat, "device", "cpu") != "cuda:0":
            raise ValueError("CudaTrainStep needs parameters uploaded with CudaBackend.upload_params")
        model = training_graph(cfg, opt=spec.opt, backend="cuda", precision=spec.precision)
        model = bind_dims(model, {"B": spec.B, "T": spec.T})
        if spec.parallel is not None:
            model = casts_early(model)
        self.program = program = Program()
        inputs = param_inputs(program, params)
        grads = program.fresh_flat = program.storage(n * 4, "grad", "grads")
        from graphc.backends.cuda.tensor import Tensor

        g = Tensor(grads, (n,), (1,), np.dtype(np.float32))
        self.grads = g
        targets = {grad_name(s.name): g.view(s.shape, _strides(s.shape), s.offset) for s in params.specs}
        lower(model, inputs=inputs, targets=targets, program=program, where="cuda")
        self.buckets = grad_buckets(cfg)
        dp = self.parallel = spec.parallel
        # the shard of the flat buffers this rank's AdamW updates (all of them without ZeRO-1)
        lo, size = 0, n
        if dp is not None:
            lo, size = data_parallel_gradients(self, program, g, n)
        self.shard = (lo, lo + size)
        # optimizer state (of the shard) and step constants
        m = Tensor(program.storage(size * 4, "state", "adam.m"), (size,), (1,), np.dtype(np.float32))
        v = Tensor(program.storage(size * 4, "state", "adam.v"), (size,), (1,), np.dtype(np.float32))
        hyper = Tensor(program.storage(16, "state", "hyper"), (4,), (1,), np.dtype(np.float32))
        part = Tensor(program.storage(SUMSQ_BLOCKS * 8, "scratch", "sumsq"), (SUMSQ_BLOCKS,), (1,), np.dtype(np.float64))
        mask_np = decay_mask(cfg, spec.decay_matrices_only)
        mask = None
        if mask_np is not None and spec.adamw.weight_decay != 0:
            mask = Tensor(program.storage(n * 4, "const", "decay-mask"), (n,), (1,), np.dtype(np.float32))
            program.consts.append((mask, mask_np))
        self.m, self.v, self.hyper = m, v, hyper
        from graphc.backends.cuda.program import KernelStep

        g_shard = g.view((size,), (1,), lo)
        src, (k1, k2) = K.sumsq(size, SUMSQ_BLOCKS)
        norm_view = hyper.view((1,), (1,), 2)
        program.steps.append(KernelStep(src, k1, (SUMSQ_BLOCKS,), (256,), [g_shard, part], "grad-norm"))
        if dp is not None and size < n:  # ZeRO-1: each rank summed its shard; add the partials of all
            from graphc.backends.cuda.nccl import SUM, Collective

            comm = dp.comm
            program.steps.append(Collective(
                lambda stream: comm.all_reduce(part.ptr, part.ptr, SUMSQ_BLOCKS, np.float64, SUM, stream),
                "nccl-allreduce-norm", [part]))
        program.steps.append(KernelStep(src, k2, (1,), (256,), [part, norm_view], "grad-norm"))
        a = spec.adamw
        src = K.adamw(size, a.beta1, a.beta2, a.eps, a.weight_decay, a.grad_clip, mask is not None)
        flat = inputs[params.specs[0].name].view((n,), (1,), 0)
        p_shard = flat.view((size,), (1,), lo)
        mask_shard = mask.view((size,), (1,), lo) if mask is not None else hyper
        program.steps.append(KernelStep(src[0], src[1], (-(-size // 256),), (256,),
                                        [p_shard, g_shard, m, v, hyper, mask_shard], "adamw"))
        if dp is not None and size < n:  # ZeRO-1: every rank gets the others' updated shards
            from graphc.backends.cuda.nccl import Collective

            comm = dp.comm
            program.steps.append(Collective(
                lambda stream: comm.all_gather(p_shard.ptr, flat.ptr, size, np.float32, stream),
                "nccl-allgather-params", []))
        # pinned staging: tokens, targets (int64), hyper in; loss, norm out
        B, T = spec.B, spec.T
        self.pinned = PinnedBuffer(2 * B * T * 8 + 64)
        self.h_tokens = self.pinned.array(np.int64, (B, T), 0)
        self.h_targets = self.pinned.array(np.int64, (B, T), B * T * 8)
        self.h_hyper = self.pinned.array(np.float32, (4,), 2 * B * T * 8)
        self.h_out = self.pinned.array(np.float32, (2,), 2 * B * T * 8 + 32)
        self.loss_t = program.outputs["loss"]
        self.tokens_t, self.targets_t = program.inputs["tokens"], program.inputs["targets"]
        program.finalize(rt, backend.modules)
        self._zero(m)
        self._zero(v)
        self.h_hyper[:] = 0
        self.graph = Graph(rt.stream, self._record)
        self.grad_hooks = []

    def _zero(self, t) -> None:
        from cuda.bindings import driver

        from graphc.runtime.cuda import check

        check(driver.cuMemsetD8Async(t.ptr, 0, t.size * t.dtype.itemsize, self.backend.rt.stream))

    def _record(self, stream: int) -> None:
        from graphc.runtime.cuda.driver import memcpy_dtoh_async, memcpy_htod_async

        BT8 = self.h_tokens.nbytes
        memcpy_htod_async(self.tokens_t.ptr, self.h_tokens.ctypes.data, BT8, stream)
        memcpy_htod_async(self.targets_t.ptr, self.h_targets.ctypes.data, BT8, stream)
        memcpy_htod_async(self.hyper.ptr, self.h_hyper.ctypes.data, 8, stream)  # lr, t (the norm is computed)
        self.program.record(stream)
        if self.parallel is not None:  # the printed loss is the mean over ranks
            from graphc.backends.cuda.nccl import AVG

            self.parallel.comm.all_reduce(self.loss_t.ptr, self.loss_t.ptr, 1, np.float32, AVG, stream)
        memcpy_dtoh_async(self.h_out.ctypes.data, self.loss_t.ptr, 4, stream)
        memcpy_dtoh_async(self.h_out.ctypes.data + 4, self.hyper.ptr + 8, 4, stream)

    def run(self, tokens, targets, *, t: int, lr: float) -> StepResult:
        self.h_tokens[...] = tokens
        self.h_targets[...] = targets
        self.h_hyper[0], self.h_hyper[1] = lr, t
        self.graph.replay()
        self.backend.rt.synchronize()
        for bucket in self.buckets if self.grad_hooks else ():
            for hook in self.grad_hooks:
                hook(bucket)
        norm = float(self.h_out[1])
        return StepResult(float(self.h_out[0]), norm if self.spec.adamw.grad_clip > 0 else None)

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

    def read_grads(self) -> np.ndarray:
        from graphc.backends.cuda import _dtoh

        self.backend.rt.synchronize()
        return _dtoh(self.grads)

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


def data_parallel_gradients(step: CudaTrainStep, program: Program, grads, n: int) -> tuple[int, int]:
    """Average the gradients across ranks inside the step's graph; returns the (start, size)
    of the flat buffers this rank's AdamW updates.

    Without ZeRO: each bucket is all-reduced on a second stream as soon as backward has
    written it (overlapping the rest of backward); every rank then updates everything.
    ZeRO-1: one reduce-scatter after backward leaves each rank the average of its shard
    (llm.c), which it alone updates; the parameters are all-gathered after AdamW."""
    from graphc.backends.cuda.nccl import AVG, Collective, CommStream, insert_bucket_reduces
    from graphc.errors import GraphcError

    dp = step.parallel
    comm = dp.comm
    if dp.zero == 0:
        step.comm_stream = CommStream()
        program.steps = insert_bucket_reduces(program.steps, grads, step.buckets, comm, step.comm_stream,
                                              overlap=dp.overlap)
        return 0, n
    if n % dp.world:
        raise GraphcError("--zero", f"ZeRO-1 shards the {n} parameters evenly; {n} is not divisible by "
                          f"{dp.world} GPUs", "--gpus")
    size = n // dp.world
    lo = dp.rank * size
    program.steps.append(Collective(
        lambda stream: comm.reduce_scatter(grads.ptr, grads.ptr + lo * 4, size, np.float32, AVG, stream),
        "nccl-reducescatter", []))
    return lo, size


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
