"""Running a TensorRT engine through the cuda-python runtime (written against the API).

NOT RUN on any machine of this project: TensorRT-RTX engines refuse the lent H200
(compute capability 9.0), datacenter TensorRT does not install here, and the CPU machine has
no GPU. The backend's ``available()`` keeps every caller away from this module until a GPU
that can run the engine exists; the code follows TensorRT's Python samples and Polygraphy's
TrtRunner:

* deserialize the plan (``Runtime.deserialize_cuda_engine``), one execution context;
* device buffers (:class:`CudaBuffer`: device, dtype, shape, ptr, nbytes, ``to_numpy``,
  ``copy_from_numpy``), bound by address with ``set_tensor_address``; a KV-cache output
  ``present.*`` is bound to the buffer of its ``past.*`` input, so TensorRT's KV-cache
  update layer writes the cache in place;
* ``execute_async_v3`` on one stream; once the shapes of a call have run, the launch is
  captured into a CUDA graph (where ``is_stream_capturable`` allows) and replayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np


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


@dataclass
class CudaBuffer:
    """Device memory of one tensor (cudaMalloc), with host copies in and out."""

    shape: tuple[int, ...]
    dtype: np.dtype
    ptr: int
    device: str = "cuda:0"

    @classmethod
    def alloc(cls, shape, dtype) -> "CudaBuffer":
        dtype = np.dtype(dtype)
        nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
        return cls(tuple(shape), dtype, int(_check(_cudart().cudaMalloc(nbytes))))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def copy_from_numpy(self, array: np.ndarray) -> None:
        cudart = _cudart()
        array = np.ascontiguousarray(array, dtype=self.dtype)
        assert array.shape == self.shape, (array.shape, self.shape)
        _check(cudart.cudaMemcpy(self.ptr, array.ctypes.data, self.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))

    def to_numpy(self) -> np.ndarray:
        cudart = _cudart()
        out = np.empty(self.shape, self.dtype)
        _check(cudart.cudaMemcpy(out.ctypes.data, self.ptr, self.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        return out

    def free(self) -> None:
        if self.ptr:
            _check(_cudart().cudaFree(self.ptr))
            self.ptr = 0


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
        self._graphs: dict[tuple, object] = {}      # input shapes -> instantiated CUDA graph

    def dtype(self, name: str) -> np.dtype:
        return numpy_dtype(self.trt, self.engine.get_tensor_dtype(name))

    def _buffer(self, name: str, shape) -> CudaBuffer:
        buf = self.buffers.get(name)
        if buf is None or buf.shape != tuple(shape):
            if buf is not None:
                buf.free()
            buf = self.buffers[name] = CudaBuffer.alloc(shape, self.dtype(name))
            self._graphs.clear()                     # addresses changed: recapture
        return buf

    def upload(self, feeds: Mapping[str, np.ndarray]) -> None:
        for name, array in feeds.items():
            if name in self.input_names:
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
        if not self.context.is_stream_capturable(self.stream) or shapes not in getattr(self, "_seen", set()):
            self._seen = getattr(self, "_seen", set()) | {shapes}
            return False
        _check(cudart.cudaStreamBeginCapture(self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
        ok = self.context.execute_async_v3(self.stream)
        graph = _check(cudart.cudaStreamEndCapture(self.stream))
        if not ok:
            raise RuntimeError("TensorRT execute_async_v3 failed during CUDA graph capture")
        self._graphs[shapes] = _check(cudart.cudaGraphInstantiate(graph, 0))
        _check(cudart.cudaGraphLaunch(self._graphs[shapes], self.stream))
        return True

    def run(self, feeds: Mapping[str, np.ndarray], outputs=None) -> dict[str, np.ndarray]:
        self.upload(feeds)
        self.execute()
        return {n: self.buffers[n].to_numpy() for n in (outputs or self.output_names)}
