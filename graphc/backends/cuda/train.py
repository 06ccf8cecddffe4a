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
        self.program = program = Program()
        inputs = param_inputs(program, params)
        grads = program.fresh_flat = program.storage(n * 4, "grad", "grads")
        from graphc.backends.cuda.tensor import Tensor

        g = Tensor(grads, (n,), (1,), np.dtype(np.float32))
        self.grads = g
        targets = {grad_name(s.name): g.view(s.shape, _strides(s.shape), s.offset) for s in params.specs}
        lower(model, inputs=inputs, targets=targets, program=program, where="cuda")
        # optimizer state and step constants
        m = Tensor(program.storage(n * 4, "state", "adam.m"), (n,), (1,), np.dtype(np.float32))
        v = Tensor(program.storage(n * 4, "state", "adam.v"), (n,), (1,), np.dtype(np.float32))
        hyper = Tensor(program.storage(16, "state", "hyper"), (4,), (1,), np.dtype(np.float32))
        part = Tensor(program.storage(SUMSQ_BLOCKS * 8, "scratch", "sumsq"), (SUMSQ_BLOCKS,), (1,), np.dtype(np.float64))
        mask_np = decay_mask(cfg, spec.decay_matrices_only)
        mask = None
        if mask_np is not None and spec.adamw.weight_decay != 0:
            mask = Tensor(program.storage(n * 4, "const", "decay-mask"), (n,), (1,), np.dtype(np.float32))
            program.consts.append((mask, mask_np))
        self.m, self.v, self.hyper = m, v, hyper
        from graphc.backends.cuda.program import KernelStep

        src, (k1, k2) = K.sumsq(n, SUMSQ_BLOCKS)
        norm_view = hyper.view((1,), (1,), 2)
        program.steps.append(KernelStep(src, k1, (SUMSQ_BLOCKS,), (256,), [g, part], "grad-norm"))
        program.steps.append(KernelStep(src, k2, (1,), (256,), [part, norm_view], "grad-norm"))
        a = spec.adamw
        src = K.adamw(n, a.beta1, a.beta2, a.eps, a.weight_decay, a.grad_clip, mask is not None)
        flat = inputs[params.specs[0].name].view((n,), (1,), 0)
        program.steps.append(KernelStep(src[0], src[1], (-(-n // 256),), (256,),
                                        [flat, g, m, v, hyper, mask if mask is not None else hyper], "adamw"))
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
        self.buckets = grad_buckets(cfg)
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
        from graphc.backends.cuda import _dtoh

        self.backend.rt.synchronize()
        return {"m": _dtoh(self.m), "v": _dtoh(self.v)}

    def load_optimizer_state(self, state) -> None:
        from graphc.backends.cuda import _htod

        self.backend.rt.synchronize()
        for key, t in (("m", self.m), ("v", self.v)):
            a = np.ascontiguousarray(state[key], dtype=np.float32)
            if a.shape != t.shape:
                raise ValueError("optimizer state does not match the model's parameter count")
            _htod(t.ptr, a)

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
