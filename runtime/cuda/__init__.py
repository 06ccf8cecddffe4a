"""The cuda-python runtime: device, stream, arena, pinned staging, kernels, CUDA graphs.

Small on purpose (like tinygrad's ``ops_cuda``): everything above it (lowering, programs)
speaks device pointers as Python ints and a stream as an int handle, so cuBLASLt, cuDNN
and NVRTC kernels share one stream and one CUDA graph. ``cuda.bindings.driver`` is the
driver layer; ``cuda.core`` compiles (NVRTC) and launches kernels.
"""

from graphc.runtime.cuda.driver import (Arena, DeviceBuffer, Graph, PinnedBuffer, Runtime, check,  # noqa: F401
                                        get_runtime)
from graphc.runtime.cuda.modules import ModuleCache, compile_cubin, launch  # noqa: F401
