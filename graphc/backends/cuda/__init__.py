"""The CUDA backend: graphc's own lowering of the optimised graphs to one H200 (or any sm_80+).

``prepare(model)`` lowers a graph (``lower.py``: one table from op to kernels / cuBLAS) for
the shapes of the first feeds, and runs it as a replayed CUDA graph. ``train_step`` keeps
parameters, gradients, AdamW state and activations in GPU memory and captures the whole
step -- batch copy-in, forward, backward, global norm, clip, AdamW, loss copy-out -- as
**one CUDA graph**; the learning rate and the step number are read from device memory, so
the graph is captured once and only replayed. ``evaluator`` shares the step's parameters.

Missing pieces (no driver, no GPU, no cuda-python, no nvmath) are reported by
``available()`` as one precise line.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx

from graphc.backends.base import Backend, Executable
from graphc.errors import GraphcError

REQUIRED = [("cuda.bindings", "cuda-bindings"), ("cuda.core", "cuda-core"), ("nvmath", "nvmath-python")]


def bind_dims(model: onnx.ModelProto, dims: dict[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` with symbolic input dims (``B``, ``T``) replaced by values."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in dims:
                d.dim_value = int(dims[d.dim_param])
    return m


def dims_from_feeds(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
    dims = {}
    for vi in model.graph.input:
        if vi.name in feeds:
            for d, n in zip(vi.type.tensor_type.shape.dim, np.shape(feeds[vi.name])):
                if d.HasField("dim_param"):
                    dims[d.dim_param] = int(n)
    return dims


class CudaBackend(Backend):
    name = "cuda"
    device = "cuda:0"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        import importlib

        for module, package in REQUIRED:
            try:
                importlib.import_module(module)
            except ImportError:
                return False, f"{package} is not installed (pip install .[gpu])"
        try:
            from cuda.bindings import driver

            err, = driver.cuInit(0)
            if int(err) != 0:
                return False, f"the CUDA driver did not initialise (error {int(err)})"
            err, count = driver.cuDeviceGetCount()
            if int(err) != 0 or count == 0:
                return False, "no CUDA GPU is visible"
        except Exception as e:  # libcuda.so missing
            return False, f"no CUDA driver: {str(e).splitlines()[0]}"
        return True, ""

    @classmethod
    def supports(cls, op_type: str, domain: str = "") -> bool:
        from graphc.backends.cuda.lower import HOST_ONLY, LOWER

        return (domain or "", op_type) in LOWER or (not domain and op_type in HOST_ONLY)

    def __init__(self):
        from graphc.runtime.cuda import ModuleCache, get_runtime

        self.rt = get_runtime()
        self.modules = ModuleCache(self.rt.arch)

    # ------------------------------------------------------------------ memory
    def alloc(self, shape, dtype):
        from graphc.runtime.cuda import DeviceBuffer

        return DeviceBuffer.allocate(shape, dtype, self.rt.stream)

    def upload(self, array: np.ndarray):
        buf = self.alloc(np.shape(array), np.asarray(array).dtype)
        buf.copy_from_numpy(array)
        return buf

    # ------------------------------------------------------------------ graphs
    def prepare(self, model: onnx.ModelProto) -> "CudaExecutable":
        from graphc.backends.cuda.lower import check_lowerable

        check_lowerable(model)
        return CudaExecutable(self, model)

    # ------------------------------------------------------------------ programs
    def train_step(self, params, spec):
        from graphc.backends.cuda.train import CudaTrainStep

        return CudaTrainStep(self, params, spec)

    def evaluator(self, params, B: int, T: int, *, precision: str = "fp32", opt: bool = True):
        from graphc.backends.cuda.train import CudaEvaluator

        return CudaEvaluator(self, params, B, T, precision=precision, opt=opt)

    # ------------------------------------------------------------------ data parallel
    def communicator_id(self) -> bytes:
        """Rank 0's NCCL unique id, for the rendezvous to share."""
        from graphc.backends.cuda.nccl import new_unique_id

        return new_unique_id()

    def communicator(self, rank: int, world: int, unique_id: bytes):
        """This rank's NCCL communicator on the runtime's device (``graphc.backends.cuda.nccl``)."""
        from graphc.backends.cuda.nccl import Nccl

        try:
            import nccl.core  # noqa: F401
        except ImportError:
            raise GraphcError("nccl4py", "not installed (pip install .[gpu])", "--gpus") from None
        self.rt  # the device is current before NCCL picks it up
        return Nccl(rank, world, unique_id)

    def decoder(self, params, spec):
        from graphc.backends.cuda.decode import CudaDecoder

        return CudaDecoder(self, params, spec)


class CudaExecutable(Executable):
    """A graph lowered per distinct input shapes; each lowering replayed as a CUDA graph.

    Bound inputs are uploaded on every run (the seam lends them: the caller may have
    changed them in place); device buffers (``DeviceBuffer``) are used where they are.
    """

    def __init__(self, backend: CudaBackend, model: onnx.ModelProto):
        self.backend, self.model = backend, model
        self.input_names = [i.name for i in model.graph.input]
        self.output_names = [o.name for o in model.graph.output]
        self._bound: dict[str, object] = {}
        self._programs: dict[tuple, tuple] = {}

    def bind(self, feeds) -> None:
        for name, value in feeds.items():
            if name in self.input_names:
                self._bound[name] = value

    def _program(self, feeds):
        from graphc.backends.cuda.lower import lower
        from graphc.backends.cuda.program import Program
        from graphc.runtime.cuda import Graph

        key = tuple((k, tuple(np.shape(v))) for k, v in sorted(feeds.items()))
        if key not in self._programs:
            model = bind_dims(self.model, dims_from_feeds(self.model, feeds))
            program = Program()
            inputs = {}
            for name, value in feeds.items():
                if getattr(value, "device", "cpu").startswith("cuda"):
                    inputs[name] = program.external(value, name)
            lower(model, inputs=inputs, program=program)
            program.finalize(self.backend.rt, self.backend.modules)
            graph = Graph(self.backend.rt.stream, program.record)
            self._programs[key] = (program, graph)
        return self._programs[key]

    def run(self, feeds, outputs=None) -> dict[str, np.ndarray]:
        all_feeds = {**self._bound, **feeds}
        program, graph = self._program(all_feeds)
        for name, value in all_feeds.items():
            t = program.inputs.get(name)
            if t is not None and t.storage.kind != "external":
                a = np.ascontiguousarray(np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value),
                                         dtype=t.dtype)
                _htod(t.ptr, a)
        graph.replay()
        self.backend.rt.synchronize()
        results = {}
        for name in self.output_names:
            t = program.outputs[name]
            host = _dtoh(t)
            if outputs and name in outputs:
                dst = outputs[name]
                if hasattr(dst, "copy_from_numpy"):
                    dst.copy_from_numpy(host)
                else:
                    dst[...] = host
                results[name] = dst
            else:
                results[name] = host
        return results


def _htod(ptr: int, a: np.ndarray) -> None:
    from cuda.bindings import driver

    from graphc.runtime.cuda import check

    if a.nbytes:
        check(driver.cuMemcpyHtoD(ptr, a.ctypes.data, a.nbytes))


def _dtoh(t) -> np.ndarray:
    """A host copy of a (possibly strided) device tensor."""
    from cuda.bindings import driver

    from graphc.runtime.cuda import check

    if t.is_contiguous():
        out = np.empty(t.shape, t.dtype)
        if out.nbytes:
            check(driver.cuMemcpyDtoH(out.ctypes.data, t.ptr, out.nbytes))
        return out
    # strided view: copy the spanned range, then view it with numpy strides
    lo = sum(s * (d - 1) for d, s in zip(t.shape, t.strides) if s < 0)
    hi = sum(s * (d - 1) for d, s in zip(t.shape, t.strides) if s > 0) + 1
    span = np.empty(hi - lo, t.dtype)
    check(driver.cuMemcpyDtoH(span.ctypes.data, t.ptr + lo * t.dtype.itemsize, span.nbytes))
    return np.lib.stride_tricks.as_strided(span[-lo:], t.shape, [s * t.dtype.itemsize for s in t.strides]).copy()
