"""Running a TensorRT engine through the cuda-python runtime (written against the API).

NOT RUN on any machine of this project: TensorRT-RTX engines refuse the lent H200
(compute capability 9.0), datacenter TensorRT does not install here, and the CPU machine has
no GPU. The backend's ``available()`` keeps every caller away from this module until a GPU
that can run the engine exists; the code follows TensorRT's Python samples and Polygraphy's
TrtRunner:

* deserialize the plan (``Runtime.deserialize_cuda_engine``), one execution context;
* device buffers (:class:`CudaBuffer`, the seam's :class:`~graphc.backends.buffer.Buffer`),
  bound by address with ``set_tensor_address``; a KV-cache output ``present.*`` is bound to
  the buffer of its ``past.*`` input: TensorScatter becomes TensorRT's IKVCacheUpdateLayer,
  whose output *must* share the cache input's device address (an in-place update; the
  cache must also be a network input with a static sequence length, hence the engine's
  fixed capacity);
* ``execute_async_v3`` on one stream; once the shapes of a call have run, the launch is
  captured into a CUDA graph (where ``is_stream_capturable`` allows) and replayed.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from graphc.backends.buffer import Buffer


def _cudart():
    try:
        from cuda.bindings import runtime as cudart    # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart                       # older cuda-python
    return cudart


def _check(result):
    """cuda-python returns (error, *values): raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values


def numpy_dtype(trt, dtype) -> np.dtype:
    import ml_dtypes

    table = {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16, trt.DataType.BF16: ml_dtypes.bfloat16,
             trt.DataType.INT32: np.int32, trt.DataType.INT64: np.int64, trt.DataType.BOOL: np.bool_,
             trt.DataType.INT8: np.int8, trt.DataType.UINT8: np.uint8}
    return np.dtype(table[dtype])


class CudaBuffer(Buffer):
    """Device memory of one tensor (cudaMalloc, or a view into another CudaBuffer)."""

    def __init__(self, shape, dtype, ptr: int, owner: "CudaBuffer | None" = None, device: str = "cuda:0"):
        self.shape, self.dtype, self._ptr, self.owner, self.device = tuple(shape), np.dtype(dtype), ptr, owner, device

    @classmethod
    def alloc(cls, shape, dtype) -> "CudaBuffer":
        """A zero-filled device buffer."""
        cudart = _cudart()
        nbytes = max(1, math.prod(shape) * np.dtype(dtype).itemsize)
        ptr = int(_check(cudart.cudaMalloc(nbytes)))
        _check(cudart.cudaMemset(ptr, 0, nbytes))
        return cls(shape, dtype, ptr)

    @property
    def ptr(self) -> int:
        return self._ptr

    def copy_from_numpy(self, array: np.ndarray) -> None:
        cudart = _cudart()
        array = np.ascontiguousarray(np.asarray(array).reshape(self.shape), dtype=self.dtype)
        _check(cudart.cudaMemcpy(self.ptr, array.ctypes.data, self.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))

    def to_numpy(self) -> np.ndarray:
        cudart = _cudart()
        out = np.empty(self.shape, self.dtype)
        _check(cudart.cudaMemcpy(out.ctypes.data, self.ptr, self.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        return out

    def view(self, offset: int, shape) -> "CudaBuffer":
        return CudaBuffer(shape, self.dtype, self.ptr + offset * self.dtype.itemsize, owner=self.owner or self)

    def free(self) -> None:
        if self._ptr and self.owner is None:
            _check(_cudart().cudaFree(self._ptr))
        self._ptr = 0


def cache_alias(name: str) -> str | None:
    """The ``past.*`` input whose buffer the ``present.*`` output ``name`` updates in place."""
    return "past." + name[len("present."):] if name.startswith("present.") else None


class EngineRunner:
    """One deserialized engine, its context, stream and buffers."""

    def __init__(self, flavor, plan: bytes, logger=None):
        trt = flavor.trt
        self.trt = trt
        self.cudart = _cudart()
        self.logger = logger or trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine on this GPU")
        self.context = self.engine.create_execution_context()
        self.stream = _check(self.cudart.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.buffers: dict[str, CudaBuffer] = {}
        self._borrowed: set[str] = set()            # buffers the caller owns (never freed here)
        self._graphs: dict[tuple, object] = {}      # input shapes -> instantiated CUDA graph
        self._seen: set[tuple] = set()              # input shapes run once (capture on the second call)

    def dtype(self, name: str) -> np.dtype:
        return numpy_dtype(self.trt, self.engine.get_tensor_dtype(name))

    def _buffer(self, name: str, shape) -> CudaBuffer:
        """The device buffer of ``name`` with ``shape``: kept if it fits, else (re)allocated."""
        buf = self.buffers.get(name)
        if buf is not None and buf.shape == tuple(shape):
            return buf
        if name in self._borrowed:
            raise ValueError(f"buffer bound to {name} has shape {buf.shape}, the engine needs {tuple(shape)}")
        if buf is not None:
            buf.free()
        buf = self.buffers[name] = CudaBuffer.alloc(shape, self.dtype(name))
        self._graphs.clear()                         # addresses changed: recapture
        return buf

    def upload(self, feeds: Mapping[str, "np.ndarray | Buffer"]) -> None:
        """Host arrays are copied to the device; device buffers are bound as they are (borrowed)."""
        for name, value in feeds.items():
            if name not in self.input_names:
                continue
            if isinstance(value, CudaBuffer):
                if self.buffers.get(name) is not value:
                    self.buffers[name] = value
                    self._borrowed.add(name)
                    self._graphs.clear()
                continue
            array = value.to_numpy() if isinstance(value, Buffer) else np.asarray(value)
            self._buffer(name, array.shape).copy_from_numpy(array)

    def execute(self) -> None:
        """Run on the resident input buffers; outputs land in ``self.buffers``."""
        shapes = tuple((n, self.buffers[n].shape) for n in self.input_names)
        for name, shape in shapes:
            self.context.set_input_shape(name, shape)
            self.context.set_tensor_address(name, self.buffers[name].ptr)
        for name in self.output_names:
            alias = cache_alias(name)
            if alias in self.buffers:
                buf = self.buffers[name] = self.buffers[alias]     # in-place KV cache
            else:
                buf = self._buffer(name, tuple(self.context.get_tensor_shape(name)))
            self.context.set_tensor_address(name, buf.ptr)
        graph = self._graphs.get(shapes)
        if graph is not None:
            _check(self.cudart.cudaGraphLaunch(graph, self.stream))
        elif not self._capture(shapes):
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
        _check(self.cudart.cudaStreamSynchronize(self.stream))

    def _capture(self, shapes) -> bool:
        """Capture one launch into a CUDA graph (after a first plain run); False if not allowed."""
        cudart = self.cudart
        if not self.context.is_stream_capturable(self.stream) or shapes not in self._seen:
            self._seen.add(shapes)
            return False
        _check(cudart.cudaStreamBeginCapture(self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
        ok = self.context.execute_async_v3(self.stream)
        graph = _check(cudart.cudaStreamEndCapture(self.stream))
        if not ok:
            raise RuntimeError("TensorRT execute_async_v3 failed during CUDA graph capture")
        self._graphs[shapes] = _check(cudart.cudaGraphInstantiate(graph, 0))
        _check(cudart.cudaGraphLaunch(self._graphs[shapes], self.stream))
        return True

    def bind_outputs(self, outputs: Mapping[str, "CudaBuffer"]) -> None:
        """Write these outputs into the caller's device buffers (a flat gradient buffer's views)."""
        for name, buf in outputs.items():
            self.buffers[name] = buf
            self._borrowed.add(name)
        self._graphs.clear()

    def run(self, feeds: Mapping[str, "np.ndarray | Buffer"], outputs=None) -> dict[str, np.ndarray]:
        self.upload(feeds)
        self.execute()
        return {n: self.buffers[n].to_numpy() for n in (outputs or self.output_names)}
