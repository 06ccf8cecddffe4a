"""Row-major GEMMs on cuBLAS (``cublasGemmEx`` through nvmath-python's bindings).

cuBLAS is column-major: a row-major Y[M, N] is the column-major Y^T, so
Y = op(A) op(B) is computed as Y^T = op(B)^T op(A)^T, i.e. cuBLAS's "A" is graphc's B.
A row-major operand X[r, c] with row stride ld is, to cuBLAS, X^T (c x r, ld): it needs
op N when op(X)^T = X^T and op T when op(X)^T = X; an operand stored column-major (unit
row stride: a transposed view) flips that. FP32 runs with CUBLAS_COMPUTE_32F (no TF32);
bf16 operands accumulate in fp32. The algorithm is cuBLAS's default for the shape, which
is fixed for a given shape, stream and workspace, so results repeat bit for bit.

This is the first version's GEMM path; the cuBLASLt plans with fused epilogues
(``graphc/backends/cuda/gemm.py``) replace it where they apply.
"""

from __future__ import annotations

import numpy as np

CUDA_R_32F, CUDA_R_16BF = 0, 14
WORKSPACE_BYTES = 32 << 20


def cuda_dtype(dtype) -> int:
    dt = np.dtype(dtype)
    if dt == np.float32:
        return CUDA_R_32F
    if dt.name == "bfloat16":
        return CUDA_R_16BF
    raise ValueError(f"no cuBLAS type for {dt}")


class Blas:
    """One cuBLAS handle bound to the program's stream, with a fixed workspace."""

    def __init__(self, stream: int, workspace_ptr: int, workspace_bytes: int = WORKSPACE_BYTES):
        from nvmath.bindings import cublas

        self.cublas = cublas
        self.handle = cublas.create()
        cublas.set_stream(self.handle, stream)
        cublas.set_workspace(self.handle, workspace_ptr, workspace_bytes)
        cublas.set_math_mode(self.handle, int(cublas.Math.DEFAULT_MATH))
        self._scalars = []

    def gemm(self, stream, *, transa, transb, m, n, k, a, lda, atype, b, ldb, btype, c, ldc, ctype,
             alpha=1.0, beta=0.0):
        cb = self.cublas
        scal = np.array([alpha, beta], np.float32)
        self._scalars.append(scal)  # host pointers must outlive the call (and a capture)
        cb.set_stream(self.handle, stream)
        cb.gemm_ex(self.handle, int(cb.Operation.T if transa else cb.Operation.N),
                   int(cb.Operation.T if transb else cb.Operation.N), m, n, k,
                   scal.ctypes.data, a, atype, lda, b, btype, ldb, scal.ctypes.data + 4, c, ctype, ldc,
                   int(cb.ComputeType.COMPUTE_32F), int(cb.GemmAlgo.DEFAULT))


    def gemm_batched(self, stream, *, transa, transb, m, n, k, a, lda, sa, atype, b, ldb, sb, btype, c, ldc, sc,
                     ctype, batch, alpha=1.0, beta=0.0):
        """``batch`` GEMMs whose operands are ``sa``/``sb``/``sc`` elements apart."""
        cb = self.cublas
        scal = np.array([alpha, beta], np.float32)
        self._scalars.append(scal)
        cb.set_stream(self.handle, stream)
        cb.gemm_strided_batched_ex(self.handle, int(cb.Operation.T if transa else cb.Operation.N),
                                   int(cb.Operation.T if transb else cb.Operation.N), m, n, k,
                                   scal.ctypes.data, a, atype, lda, sa, b, btype, ldb, sb, scal.ctypes.data + 4,
                                   c, ctype, ldc, sc, batch, int(cb.ComputeType.COMPUTE_32F), int(cb.GemmAlgo.DEFAULT))


def operand(t, trans: bool):
    """(cuBLAS op T?, ld) for the row-major ``op(t)`` given to cuBLAS as op(t)^T; None if the
    view has no unit stride (it needs a copy first)."""
    r, c = t.shape
    sr, sc = t.strides
    if c == 1 or sc == 1:          # row-major, ld = row stride
        ld = sr if r > 1 else c
        return (trans, max(ld, c, 1))
    if r == 1 or sr == 1:          # column-major storage (a transposed view)
        ld = sc if c > 1 else r
        return (not trans, max(ld, r, 1))
    return None
