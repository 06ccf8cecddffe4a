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
    pdl: bool = False     # programmatic dependent launch (the kernel calls griddepcontrol.wait)
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

        launch(self._fn, self.grid, self.block, self._args, stream, self.shmem, pdl=self.pdl)


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
    tensors: list = field(default_factory=list)
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

    def finalize(self, rt, modules, *, reuse: bool = True) -> None:
        """Place every storage (sharing memory between activations whose lifetimes do not
        overlap, unless ``reuse`` is off), allocate the arena, upload constants, compile,
        resolve pointers."""
        from graphc.runtime.cuda.driver import Arena

        placed = [s for s in self.storages if s.kind != "external"]
        offset = plan_memory(self, placed, reuse)
        check_fits(self, offset, rt.mem_info()[0])
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


REUSABLE = {"act", "scratch"}


def step_storages(step) -> set:
    if isinstance(step, KernelStep):
        items = step.args
    elif isinstance(step, MemsetStep):
        items = [step.tensor]
    else:
        items = step.tensors
    out = set()
    for a in items:
        if isinstance(a, Tensor):
            out.add(a.storage.id)
        elif isinstance(a, Storage):
            out.add(a.id)
    return out


def lifetimes(program: "Program") -> dict[int, tuple[int, int]]:
    """Storage id -> (first step, last step) that touches it."""
    live: dict[int, list] = {}
    for i, step in enumerate(program.steps):
        for sid in step_storages(step):
            span = live.setdefault(sid, [i, i])
            span[1] = i
    return {k: (v[0], v[1]) for k, v in live.items()}


def plan_memory(program: "Program", storages: list, reuse: bool) -> int:
    """Byte offsets for ``storages``; returns the arena size. Activations and scratch whose
    step intervals do not overlap share memory (greedy best-fit by size: the
    graph planner's :func:`graphc.passes.memory_plan.place`); inputs, outputs, constants,
    gradients and optimizer state never do."""
    from graphc.passes.memory_plan import place
    from graphc.runtime.cuda.driver import align

    pinned = {t.storage.id for t in list(program.inputs.values()) + list(program.outputs.values())}
    pinned |= {t.storage.id for t, _ in program.consts}
    spans = lifetimes(program) if reuse else {}
    fixed, shared = [], []
    for s in storages:
        if reuse and s.kind in REUSABLE and s.id not in pinned and s.id in spans:
            shared.append(s)
        else:
            fixed.append(s)
    offset = 0
    for s in fixed:
        s.offset = offset
        offset += align(s.nbytes)
    base = offset
    offsets, top = place({s.id: (align(s.nbytes), *spans[s.id]) for s in shared})
    for s in shared:
        s.offset = base + offsets[s.id]
    return base + top


def check_fits(program: "Program", arena_bytes: int, free_bytes: int, where: str = "cuda") -> None:
    """A one-line error before anything is allocated when the arena cannot fit in the free
    GPU memory, naming what takes the room (by storage kind)."""
    from graphc.errors import GraphcError

    if arena_bytes <= free_bytes:
        return
    by_kind: dict[str, int] = {}
    for s in program.storages:
        if s.kind != "external":
            by_kind[s.kind] = by_kind.get(s.kind, 0) + s.nbytes
    parts = ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]))
    raise GraphcError(where, f"the program needs {arena_bytes / 2**30:.1f} GiB of GPU memory ({parts}; "
                      f"activations shared by liveness), only {free_bytes / 2**30:.1f} GiB is free: "
                      "lower -b or -t", "GPU memory")
