"""Device, stream, arena allocator, pinned host buffers, events and CUDA graphs.

* :class:`Runtime` -- the current device's primary context and one stream; every launch
  of a program goes to that stream, so a whole training step can be captured as one graph.
* :class:`Arena` -- one ``cuMemAlloc`` split by offsets (256-byte aligned): a program's
  parameters, gradients, optimizer state and activations live at fixed addresses, which
  is what lets a captured CUDA graph be replayed without rebinding anything.
* :class:`DeviceBuffer` -- a typed view (dtype, shape, pointer) into an arena; it satisfies
  the backend seam's ``Buffer`` (``to_numpy`` / ``copy_from_numpy``).
* :class:`PinnedBuffer` -- page-locked host memory for asynchronous batch copies.
* :class:`Graph` -- stream capture -> instantiated executable graph -> ``replay``.
"""

from __future__ import annotations

import numpy as np

from graphc.backends.buffer import Buffer

ALIGN = 256


def check(result):
    """Unwrap a ``cuda.bindings`` call's (err, *values); raise on any error."""
    from cuda.bindings import driver

    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        _, name = driver.cuGetErrorName(err)
        raise RuntimeError(f"CUDA error {int(err)} ({name.decode() if name else '?'})")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


class Runtime:
    """The device (primary context made current) and the stream programs run on."""

    def __init__(self, device_id: int = 0):
        from cuda.core import Device

        self.device_id = int(device_id)
        self.device = Device(device_id)
        self.device.set_current()
        self.stream_obj = self.device.create_stream()
        self.stream = int(self.stream_obj.handle)
        self.arch = "sm_{}{}".format(*self.device.compute_capability)
        self.name = self.device.name

    def synchronize(self) -> None:
        self.stream_obj.sync()

    def mem_info(self) -> tuple[int, int]:
        from cuda.bindings import driver

        free, total = check(driver.cuMemGetInfo())
        return int(free), int(total)

    def event_timer(self):
        return EventTimer(self)


_RUNTIME: Runtime | None = None
_DEVICE_ID = 0


def select_device(index: int) -> None:
    """The GPU this process's runtime uses (a data-parallel worker's local rank); call it
    before anything creates the runtime."""
    global _DEVICE_ID
    if _RUNTIME is not None and _RUNTIME.device_id != index:
        raise RuntimeError(f"the CUDA runtime already runs on device {_RUNTIME.device_id}")
    _DEVICE_ID = int(index)


def get_runtime() -> Runtime:
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = Runtime(_DEVICE_ID)
    return _RUNTIME


class Arena:
    """One device allocation handed out by offsets; freed as a whole."""

    def __init__(self, nbytes: int):
        from cuda.bindings import driver

        self.nbytes = max(ALIGN, int(nbytes))
        self.base = int(check(driver.cuMemAlloc(self.nbytes)))

    def ptr(self, offset: int) -> int:
        return self.base + offset

    def free(self) -> None:
        from cuda.bindings import driver

        if self.base:
            check(driver.cuMemFree(self.base))
            self.base = 0

    def __del__(self):
        try:
            self.free()
        except Exception:
            pass


def align(n: int, a: int = ALIGN) -> int:
    return (int(n) + a - 1) // a * a


class DeviceBuffer(Buffer):
    """Typed device memory (the seam's ``Buffer`` on ``cuda:0``); views share the memory.

    ``owner`` keeps the allocation (an :class:`Arena`) alive as long as any view exists."""

    device = "cuda:0"

    def __init__(self, ptr: int, dtype, shape, stream: int, owner=None):
        self._ptr, self.dtype, self.shape, self.stream = int(ptr), np.dtype(dtype), tuple(int(d) for d in shape), stream
        self.owner = owner

    @classmethod
    def allocate(cls, shape, dtype, stream: int) -> "DeviceBuffer":
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        arena = Arena(n)
        buf = cls(arena.base, dtype, shape, stream, owner=arena)
        buf.fill_zero()
        return buf

    @property
    def ptr(self) -> int:
        return self._ptr

    def view(self, offset: int, shape) -> "DeviceBuffer":
        return DeviceBuffer(self._ptr + int(offset) * self.dtype.itemsize, self.dtype, shape, self.stream, self.owner)

    def to_numpy(self) -> np.ndarray:
        from cuda.bindings import driver

        out = np.empty(self.shape, self.dtype)
        if out.nbytes:
            check(driver.cuStreamSynchronize(self.stream))
            check(driver.cuMemcpyDtoH(out.ctypes.data, self._ptr, out.nbytes))
        return out

    def copy_from_numpy(self, array: np.ndarray) -> None:
        from cuda.bindings import driver

        a = np.ascontiguousarray(array, dtype=self.dtype)
        if a.size != self.size:
            raise ValueError(f"copy of {a.shape} into a buffer of shape {self.shape}")
        if a.nbytes:
            check(driver.cuStreamSynchronize(self.stream))
            check(driver.cuMemcpyHtoD(self._ptr, a.ctypes.data, a.nbytes))

    def fill_zero(self) -> None:
        from cuda.bindings import driver

        check(driver.cuMemsetD8Async(self._ptr, 0, self.nbytes, self.stream))
        check(driver.cuStreamSynchronize(self.stream))


class PinnedBuffer:
    """Page-locked host memory viewed as a numpy array (async host<->device copies)."""

    def __init__(self, nbytes: int):
        from cuda.bindings import driver

        self.nbytes = max(8, int(nbytes))
        self.ptr = int(check(driver.cuMemAllocHost(self.nbytes)))
        import ctypes

        self._raw = (ctypes.c_byte * self.nbytes).from_address(self.ptr)

    def array(self, dtype, shape, offset: int = 0) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self._raw, dtype=dtype, count=n, offset=offset).reshape(shape)

    def free(self) -> None:
        from cuda.bindings import driver

        if self.ptr:
            check(driver.cuMemFreeHost(self.ptr))
            self.ptr = 0


def memcpy_htod_async(dst: int, src: int, nbytes: int, stream: int) -> None:
    from cuda.bindings import driver

    check(driver.cuMemcpyHtoDAsync(dst, src, nbytes, stream))


def memcpy_dtoh_async(dst: int, src: int, nbytes: int, stream: int) -> None:
    from cuda.bindings import driver

    check(driver.cuMemcpyDtoHAsync(dst, src, nbytes, stream))


class Graph:
    """Everything ``record(stream)`` enqueues, captured once, replayed with one launch."""

    def __init__(self, stream: int, record):
        from cuda.bindings import driver

        self.stream = stream
        check(driver.cuStreamBeginCapture(stream, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL))
        try:
            record(stream)
        except BaseException:
            try:
                driver.cuStreamEndCapture(stream)
            finally:
                raise
        self.graph = check(driver.cuStreamEndCapture(stream))
        self.exec = check(driver.cuGraphInstantiate(self.graph, 0))

    def replay(self) -> None:
        from cuda.bindings import driver

        check(driver.cuGraphLaunch(self.exec, self.stream))


class EventTimer:
    """Elapsed device time between two points on the runtime's stream (CUDA events)."""

    def __init__(self, rt: Runtime):
        from cuda.bindings import driver

        self.stream = rt.stream
        self.start = check(driver.cuEventCreate(0))
        self.stop = check(driver.cuEventCreate(0))

    def begin(self) -> None:
        from cuda.bindings import driver

        check(driver.cuEventRecord(self.start, self.stream))

    def end_ms(self) -> float:
        from cuda.bindings import driver

        check(driver.cuEventRecord(self.stop, self.stream))
        check(driver.cuEventSynchronize(self.stop))
        return float(check(driver.cuEventElapsedTime(self.start, self.stop)))
