"""Which GPU is here, if any: the CUDA driver API through ctypes (no package needed).

``gpu_capability()`` returns ``(compute capability, name)`` of device 0, or raises
:class:`NoGpu` with the reason in words (no driver library, no device, driver error), so
the TensorRT backend can say exactly why an engine cannot run here.
"""

from __future__ import annotations

import ctypes

CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


class NoGpu(Exception):
    """No usable CUDA GPU; the message says why."""


def _driver():
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise NoGpu("no NVIDIA driver here (libcuda not found)")


def gpu_capability(device: int = 0) -> tuple[tuple[int, int], str]:
    cuda = _driver()
    if (rc := cuda.cuInit(0)) != 0:
        raise NoGpu(f"the CUDA driver does not initialise (CUresult {rc}): no usable GPU")
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= device:
        raise NoGpu("no CUDA GPU here")
    dev = ctypes.c_int(0)
    cuda.cuDeviceGet(ctypes.byref(dev), device)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, dev)
    return (major.value, minor.value), name.value.decode(errors="replace")
