"""The CUDA backend: library wrappers (``gemm``: cuBLASLt, ``attention``: cuDNN SDPA) and,
beside them, the runtime and the lowering. Nothing here imports a GPU library at import time.
"""
