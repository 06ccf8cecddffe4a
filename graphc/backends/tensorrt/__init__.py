"""The TensorRT backend (datacenter TensorRT or TensorRT for RTX).

flavor.py    which TensorRT module (``--trt-flavor auto|tensorrt|rtx``)
graphs.py    the graph of each engine mode (infer, prefill, decode, train) at a precision
legalize.py  TensorRT legalisation: inline graphc's functions, ScatterND-add -> one-hot GEMM
network.py   strongly typed network, FP32 attention decomposable, optimisation profiles
builder.py   build_engine -> EngineBuild (plan, layer count, fused attention from the report)
report.py    the builder's / inspector's layer report, fused-MHA detection
cache.py     engine cache keyed by graph hash, flavour, version, target, precision, profile
device.py    the GPU's compute capability (CUDA driver via ctypes)
runtime.py   engine execution through cuda-python (execute_async_v3, CUDA graphs)
backend.py   TensorRTBackend: available(), supports(), prepare()
"""

from graphc.backends.tensorrt.backend import TensorRTBackend

__all__ = ["TensorRTBackend"]
