"""A lowered graph: storages (placed in one arena) and an ordered list of steps.

Lowering (``lower.py``) only *describes* work: kernel sources with their launch shapes
and arguments (tensors, resolved to pointers once the arena exists), cuBLAS GEMMs,
memsets and copies. :meth:`Program.finalize` lays out and allocates the arena, compiles
every kernel (NVRTC, disk cache) and resolves pointers; :meth:`Program.record` enqueues
everything on a stream -- eagerly, or inside a CUDA graph capture.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import numpy as np

from graphc.backends.cuda.tensor import Storage, Tensor


@dataclass
class KernelStep:
    src: str
    name: str
    grid: tuple
    block: tuple
    args: list            # Tensor | Storage | ("f32", x) | ("i64", x)
    node: str = ""
    shmem: int = 0
    _fn: object = None
    _args: tuple = ()

    def prepare(self, rt, modules) -> None:
        self._fn = modules.kernel(self.src, self.name)
        packed = []
        for a in self.args:
            if isinstance(a, Tensor):
                packed.append((a.ptr, ctypes.c_void_p))
            elif isinstance(a, Storage):
                packed.append((a.addr, ctypes.c_void_p))
            elif a[0] == "f32":
                packed.append((float(a[1]), ctypes.c_float))
            else:
                packed.append((int(a[1]), ctypes.c_longlong))
        self._args = tuple(packed)

    def record(self, stream: int) -> None:
        from graphc.runtime.cuda.modules import launch

        launch(self._fn, self.grid, self.block, self._args, stream, self.shmem)


@dataclass
class MemsetStep:
    tensor: Tensor
    node: str = ""

    def prepare(self, rt, modules) -> None:
        pass

    def record(self, stream: int) -> None:
        from cuda.bindings import driver

        from graphc.runtime.cuda.driver import check

        check(driver.cuMemsetD8Async(self.tensor.ptr, 0, self.tensor.size * self.tensor.dtype.itemsize, stream))


@dataclass
class CallStep:
    """A library call (cuBLAS, cuDNN): ``fn(stream)`` built by ``make()`` after the arena exists."""

    make: object
    node: str = ""
    _fn: object = None

    def prepare(self, rt, modules) -> None:
        self._fn = self.make(rt)

    def record(self, stream: int) -> None:
        self._fn(stream)


@dataclass
class Program:
    storages: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)     # graph input name -> Tensor
    outputs: dict = field(default_factory=dict)    # graph output name -> Tensor
    consts: list = field(default_factory=list)     # (Tensor, np.ndarray) uploaded once
    arena: object = None
    debug_values: dict = field(default_factory=dict)  # value name -> Tensor, kept from lowering
    overwritten: set = field(default_factory=set)     # values updated in place later (ScatterND)

    def storage(self, nbytes: int, kind: str, name: str) -> Storage:
        s = Storage(len(self.storages), int(nbytes), kind, name)
        self.storages.append(s)
        return s

    def arena_bytes(self) -> int:
        from graphc.runtime.cuda.driver import align

        return sum(align(s.nbytes) for s in self.storages if s.kind != "external")

    def external(self, buf, name: str) -> Tensor:
        """A tensor over memory this program does not own (a ``DeviceBuffer``)."""
        from graphc.backends.cuda.tensor import contiguous_strides

        s = self.storage(buf.nbytes, "external", name)
        s.addr = buf.ptr
        return Tensor(s, tuple(buf.shape), contiguous_strides(buf.shape), np.dtype(buf.dtype))

    def finalize(self, rt, modules) -> None:
        """Place every storage, allocate the arena, upload constants, compile, resolve."""
        from graphc.runtime.cuda.driver import Arena, align

        offset = 0
        placed = [s for s in self.storages if s.kind != "external"]
        for s in placed:
            s.offset = offset
            offset += align(s.nbytes)
        self.arena = Arena(offset)
        for s in placed:
            s.addr = self.arena.ptr(s.offset)
        from cuda.bindings import driver

        from graphc.runtime.cuda.driver import check

        for t, value in self.consts:
            a = np.ascontiguousarray(value, dtype=t.dtype)
            check(driver.cuMemcpyHtoD(t.ptr, a.ctypes.data, a.nbytes))
        for step in self.steps:
            step.prepare(rt, modules)

    def record(self, stream: int) -> None:
        for step in self.steps:
            step.record(stream)

    def sources(self) -> list[tuple[str, str]]:
        """(source, kernel name) of every kernel step (what CI compiles with NVRTC)."""
        return [(s.src, s.name) for s in self.steps if isinstance(s, KernelStep)]
