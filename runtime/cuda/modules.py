"""NVRTC compilation with an on-disk cubin cache keyed by the hash of the source.

Kernels are CUDA C generated per shape and dtype (``graphc/backends/cuda/kernels.py``);
the same source always gives the same cubin, so ``~/.cache/graphc/kernels/<sha>.cubin``
(or ``$GRAPHC_KERNEL_CACHE``) makes the second start of a program compile nothing.
Compiling needs no GPU (NVRTC is a library), which is how CI checks every kernel.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

NVRTC_OPTIONS = dict(std="c++17", use_fast_math=False)


def cache_dir() -> Path:
    return Path(os.environ.get("GRAPHC_KERNEL_CACHE", Path.home() / ".cache" / "graphc" / "kernels"))


def source_key(src: str, arch: str) -> str:
    return hashlib.sha256(f"{arch}\n{sorted(NVRTC_OPTIONS.items())}\n{src}".encode()).hexdigest()[:32]


def compile_cubin(src: str, arch: str = "sm_90", *, use_cache: bool = True) -> bytes:
    """The cubin for ``src`` (from the disk cache, or NVRTC then cached atomically)."""
    path = cache_dir() / f"{source_key(src, arch)}.cubin"
    if use_cache and path.exists():
        return path.read_bytes()
    from cuda.core import Program, ProgramOptions

    prog = Program(src, code_type="c++", options=ProgramOptions(arch=arch, **NVRTC_OPTIONS))
    try:
        cubin = bytes(prog.compile("cubin").code)
    except Exception as e:  # NVRTC's log is the useful part: keep it with the source
        raise RuntimeError(f"NVRTC failed: {e}\n--- source ---\n{src}") from None
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(cubin)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs compile time
    return cubin


class ModuleCache:
    """Loaded kernels (``CUfunction``) by (source, name); one module per distinct source."""

    def __init__(self, arch: str):
        self.arch = arch
        self._modules: dict[str, object] = {}
        self._functions: dict[tuple[str, str], object] = {}

    def kernel(self, src: str, name: str):
        from cuda.bindings import driver

        from graphc.runtime.cuda.driver import check

        key = source_key(src, self.arch)
        if key not in self._modules:
            self._modules[key] = check(driver.cuModuleLoadData(compile_cubin(src, self.arch)))
        if (key, name) not in self._functions:
            self._functions[key, name] = check(driver.cuModuleGetFunction(self._modules[key], name.encode()))
        return self._functions[key, name]


def launch(function, grid, block, args, stream: int, shmem: int = 0, *, pdl: bool = False) -> None:
    """cuLaunchKernel with ``args`` as (value, ctypes type) pairs.

    ``pdl``: programmatic dependent launch -- the kernel may start while the previous kernel
    in the stream still runs (once every block of that one has executed
    ``griddepcontrol.launch_dependents``); it must execute ``griddepcontrol.wait`` before
    touching anything the previous kernels write or read. Captured into CUDA graphs as a
    programmatic edge."""
    from cuda.bindings import driver

    from graphc.runtime.cuda.driver import check

    grid = tuple(grid) + (1,) * (3 - len(grid))
    block = tuple(block) + (1,) * (3 - len(block))
    values = tuple(v for v, _ in args)
    types = tuple(t for _, t in args)
    if not pdl:
        check(driver.cuLaunchKernel(function, *grid, *block, shmem, stream, (values, types), 0))
        return
    config = driver.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = grid
    config.blockDimX, config.blockDimY, config.blockDimZ = block
    config.sharedMemBytes, config.hStream = shmem, stream
    attr = driver.CUlaunchAttribute()
    attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = 1
    config.attrs, config.numAttrs = [attr], 1
    check(driver.cuLaunchKernelEx(config, function, (values, types), 0))
