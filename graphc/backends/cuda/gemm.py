"""cuBLASLt GEMMs with fused epilogues, through nvmath-python's low-level bindings.

Usage (device pointers are Python ints, ``stream`` is a ``cudaStream_t`` as an int; the
CUDA device must be current in this thread when a plan is built)::

    from graphc.backends.cuda import gemm

    # GPT-2's MLP up-projection, bf16: h = gelu(x @ W.T + b), keeping pre = x @ W.T + b
    plan = gemm.get_plan(gemm.linear_forward(M=16384, N=3072, K=768, dtype="bf16",
                                             epilogue="gelu_aux_bias"))
    plan.run(stream, x_ptr, w_ptr, None, h_ptr, bias_ptr=b_ptr, aux_ptr=pre_ptr,
             workspace_ptr=ws_ptr, workspace_size=ws_bytes)   # ws_bytes >= plan.workspace_size

A plan is built once per :class:`GemmSpec` (shape, transposes, dtypes, epilogue): it holds
the matmul descriptor, the four matrix layouts and the algorithm cuBLASLt's heuristic ranks
first, chosen once, so every run uses the same kernel (deterministic: the checks in
``bench/gpu_libcheck.py`` compare two runs bit for bit). ``run`` only sets the epilogue
pointers on the descriptor and enqueues ``cublasLtMatmul`` on ``stream``: no allocation, no
synchronisation, so it can be captured in a CUDA graph (the workspace is the caller's).

Row-major contract
------------------
Everything in graphc is row-major and contiguous, so a spec speaks row-major::

    D[m, n] = epilogue(alpha * op(A) @ op(B) + beta * C)
    A stored [m, k] (or [k, m] with trans_a), B stored [k, n] (or [n, k] with trans_b),
    C and D stored [m, n]; C may be D (in-place accumulation, beta=1).

Epilogues (row-major meaning; ``bias`` has length n unless said otherwise; ``aux`` is [m, n]):

=================  ==========================================================================
default            D = AB
bias               D = AB + bias
gelu / gelu_bias   D = gelu(AB (+ bias))                     (GELU: tanh approximation)
gelu_aux(_bias)    as gelu(_bias), and aux = AB (+ bias): the pre-activation for the backward
dgelu              D = AB * gelu'(aux)
dgelu_bgrad        as dgelu, and bias = column sums of D (sum over m), written
bgrad_a            D = AB, and bias[m] = row sums of op(A) (sum over k), written
=================  ==========================================================================

Bias gradients are *written*, never accumulated, whatever beta is (cuBLASLt's BGRAD
epilogues have no beta), and have D's dtype.

The column-major mapping
------------------------
cuBLASLt is column-major. A row-major [r, c] buffer is, read column-major, the [c, r]
matrix of its transpose with leading dimension c. So row-major D = op(A) op(B) is
column-major D^T = op(B)^T op(A)^T, and a spec is lowered with the operands swapped::

    cuBLASLt (m', n', k') = (n, m, k)
    cuBLASLt A' = our B: col-major [n, k] ld n, op N          (trans_b: [k, n] ld k, op T)
    cuBLASLt B' = our A: col-major [k, m] ld k, op N          (trans_a: [m, k] ld m, op T)
    cuBLASLt C', D'    : col-major [n, m] ld n
    bias (BIAS, GELU_BIAS, DGELU_BGRAD) runs along the rows of D' = our columns: length n
    aux: D's shape, col-major [n, m], ld n (cuBLASLt wants it a multiple of 8)
    bgrad_a = BGRADB: sums op(B') = op(A)^T over k, one value per column of D' = our row

GPT-2 (llm.c layout: activations x [M, K] row-major, weights W [N, K], bias [N]) needs three
GEMMs, made by the three helpers below:

* forward ``y = x W^T (+ b)``: A = x, B = W (trans_b), m, n, k = M, N, K. Lowered: A' = W
  as col-major [K, N] ld K with op T (= W, N x K), B' = x as col-major [K, M] ld K (= x^T),
  D' = y^T [N, M] ld N; the bias runs along D''s rows = y's columns, as it must.
* input gradient ``dx = dy W``: A = dy [M, N], B = W [N, K], m, n, k = M, K, N. With
  ``dgelu`` the aux is the forward's pre-activation of x, [M, K], which is D's shape.
* weight gradient ``dW (+)= dy^T x``: A = dy stored [M, N] with trans_a, B = x [M, K],
  m, n, k = N, K, M; ``bgrad_a`` writes dbias[N] = column sums of dy; beta=1 accumulates
  dW (gradient accumulation), C = D = dW.

Precision: A and B fp32 (then C/D fp32), or bf16/fp16 with C/D bf16/fp16 or fp32; the compute
type is always ``CUBLAS_COMPUTE_32F`` with fp32 scale: fp32 GEMMs never use TF32 (cuBLASLt
uses TF32 only when asked for ``CUBLAS_COMPUTE_32F_FAST_TF32``), 16-bit inputs accumulate in
fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphc.backends.cuda.libimport import import_gpu_library

ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
CUDA_DATA_TYPE = {"fp32": 0, "fp16": 2, "bf16": 14}  # cudaDataType_t: CUDA_R_32F, _16F, _16BF
CUBLAS_COMPUTE_32F = 68
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
DEFAULT_MAX_WORKSPACE = 32 << 20  # cuBLAS's recommendation for Hopper
HEURISTIC_CANDIDATES = 8


@dataclass(frozen=True)
class EpilogueKind:
    """One fused epilogue: its cuBLASLt name and which extra operands it touches."""

    lt_name: str  # member of nvmath.bindings.cublasLt.Epilogue
    bias: str | None = None  # "read": a bias to add; "write": a bias gradient
    bias_axis: str = "n"  # the row-major axis the bias runs along (its length)
    aux: str | None = None  # "write": pre-activation stored; "read": used by the gradient


EPILOGUES = {
    "default": EpilogueKind("DEFAULT"),
    "bias": EpilogueKind("BIAS", bias="read"),
    "gelu": EpilogueKind("GELU"),
    "gelu_bias": EpilogueKind("GELU_BIAS", bias="read"),
    "gelu_aux": EpilogueKind("GELU_AUX", aux="write"),
    "gelu_aux_bias": EpilogueKind("GELU_AUX_BIAS", bias="read", aux="write"),
    "dgelu": EpilogueKind("DGELU", aux="read"),
    "dgelu_bgrad": EpilogueKind("DGELU_BGRAD", bias="write", aux="read"),
    "bgrad_a": EpilogueKind("BGRADB", bias="write", bias_axis="m"),
}

# (A/B dtype) -> allowed C/D dtypes, with CUBLAS_COMPUTE_32F and an fp32 scale.
SUPPORTED_DTYPES = {"fp32": ("fp32",), "bf16": ("bf16", "fp32"), "fp16": ("fp16", "fp32")}


@dataclass(frozen=True)
class LtMatrix:
    """A cuBLASLt column-major matrix layout: rows x cols, leading dimension ld."""

    rows: int
    cols: int
    ld: int
    dtype: str


@dataclass(frozen=True)
class LtProblem:
    """A spec lowered to cuBLASLt's column-major terms (see the module docstring)."""

    m: int
    n: int
    k: int
    trans_a: bool  # op on cuBLASLt's A (our B)
    trans_b: bool  # op on cuBLASLt's B (our A)
    a: LtMatrix
    b: LtMatrix
    c: LtMatrix
    d: LtMatrix
    epilogue: str  # cuBLASLt epilogue name
    bias_len: int | None
    bias_dtype: str | None
    aux_ld: int | None


@dataclass(frozen=True)
class GemmSpec:
    """A row-major GEMM ``D[m, n] = epilogue(alpha op(A) op(B) + beta C)``; the plan key."""

    m: int
    n: int
    k: int
    trans_a: bool = False
    trans_b: bool = False
    dtype: str = "fp32"  # A and B
    out_dtype: str | None = None  # C and D; None: same as dtype
    epilogue: str = "default"
    bias_dtype: str | None = None  # a bias read by the epilogue; None: out_dtype
    alignment: int = 16  # bytes every pointer is promised to be aligned to

    def __post_init__(self):
        for name in ("m", "n", "k"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"GemmSpec.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"GemmSpec.dtype {self.dtype!r}: expected one of {sorted(SUPPORTED_DTYPES)}")
        if self.out_dtype is None:
            object.__setattr__(self, "out_dtype", self.dtype)
        if self.out_dtype not in SUPPORTED_DTYPES[self.dtype]:
            raise ValueError(f"GemmSpec.out_dtype {self.out_dtype!r} with {self.dtype} inputs: "
                             f"expected one of {SUPPORTED_DTYPES[self.dtype]}")
        if self.epilogue not in EPILOGUES:
            raise ValueError(f"GemmSpec.epilogue {self.epilogue!r}: expected one of {sorted(EPILOGUES)}")
        kind = EPILOGUES[self.epilogue]
        if self.bias_dtype is not None and kind.bias != "read":
            raise ValueError(f"GemmSpec.bias_dtype is only for epilogues that read a bias, not {self.epilogue!r}")
        if self.bias_dtype is not None and self.bias_dtype not in ITEMSIZE:
            raise ValueError(f"GemmSpec.bias_dtype {self.bias_dtype!r}: expected one of {sorted(ITEMSIZE)}")
        if kind.aux is not None and self.n % 8:
            raise ValueError(f"GemmSpec.n = {self.n}: the {self.epilogue} epilogue's aux needs n % 8 == 0")
        if self.alignment not in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            raise ValueError(f"GemmSpec.alignment {self.alignment}: expected a power of two <= 256")

    def lowering(self) -> LtProblem:
        """The cuBLASLt column-major problem that computes this row-major GEMM."""
        m, n, k = self.m, self.n, self.k
        kind = EPILOGUES[self.epilogue]
        a = LtMatrix(k, n, k, self.dtype) if self.trans_b else LtMatrix(n, k, n, self.dtype)
        b = LtMatrix(m, k, m, self.dtype) if self.trans_a else LtMatrix(k, m, k, self.dtype)
        cd = LtMatrix(n, m, n, self.out_dtype)
        bias_len = None if kind.bias is None else (n if kind.bias_axis == "n" else m)
        bias_dtype = None if kind.bias is None else (self.bias_dtype or self.out_dtype)
        return LtProblem(m=n, n=m, k=k, trans_a=self.trans_b, trans_b=self.trans_a, a=a, b=b, c=cd, d=cd,
                         epilogue=kind.lt_name, bias_len=bias_len, bias_dtype=bias_dtype,
                         aux_ld=n if kind.aux else None)

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k


def linear_forward(M: int, N: int, K: int, dtype: str = "fp32", out_dtype: str | None = None,
                   epilogue: str = "default", **kw) -> GemmSpec:
    """``y[M, N] = x[M, K] @ W[N, K]^T`` (+ bias[N], GELU...). run(stream, x, W, c, y, ...)."""
    return GemmSpec(M, N, K, trans_b=True, dtype=dtype, out_dtype=out_dtype, epilogue=epilogue, **kw)


def linear_backward_input(M: int, N: int, K: int, dtype: str = "fp32", out_dtype: str | None = None,
                          epilogue: str = "default", **kw) -> GemmSpec:
    """``dx[M, K] = dy[M, N] @ W[N, K]`` (``dgelu``: times gelu'(aux = pre-activation [M, K])).
    run(stream, dy, W, c, dx, aux_ptr=pre)."""
    return GemmSpec(M, K, N, dtype=dtype, out_dtype=out_dtype, epilogue=epilogue, **kw)


def linear_backward_weight(M: int, N: int, K: int, dtype: str = "fp32", out_dtype: str | None = "fp32",
                           epilogue: str = "default", **kw) -> GemmSpec:
    """``dW[N, K] (+)= dy[M, N]^T @ x[M, K]`` (``bgrad_a``: dbias[N] = column sums of dy).
    run(stream, dy, x, dW, dW, bias_ptr=dbias, beta=1 to accumulate)."""
    return GemmSpec(N, K, M, trans_a=True, dtype=dtype, out_dtype=out_dtype, epilogue=epilogue, **kw)


def _cublaslt():
    return import_gpu_library("nvmath.bindings.cublasLt", "nvmath-python", "cuBLASLt")


_HANDLE: list[int] = []


def default_handle() -> int:
    """This process's cuBLASLt handle (created on first use, on the current device)."""
    if not _HANDLE:
        _HANDLE.append(_cublaslt().create())
    return _HANDLE[0]


def _set_attribute(lt, setter, dtype_of, obj: int, attr, value) -> None:
    """Set one descriptor attribute from a Python value, typed as cuBLASLt declares it."""
    buf = np.asarray(value, dtype=dtype_of(attr)).reshape(1)
    setter(obj, attr, buf.ctypes.data, buf.itemsize)


class GemmPlan:
    """A cuBLASLt matmul built once for a :class:`GemmSpec`; ``run`` enqueues it."""

    def __init__(self, spec: GemmSpec, *, handle: int | None = None,
                 max_workspace: int = DEFAULT_MAX_WORKSPACE):
        lt = _cublaslt()
        self.spec = spec
        self.problem = p = spec.lowering()
        self._lt = lt
        self._handle = default_handle() if handle is None else handle
        self._desc = lt.matmul_desc_create(CUBLAS_COMPUTE_32F, CUDA_DATA_TYPE["fp32"])
        self._layouts = [lt.matrix_layout_create(CUDA_DATA_TYPE[x.dtype], x.rows, x.cols, x.ld)
                         for x in (p.a, p.b, p.c, p.d)]
        self._pref = lt.matmul_preference_create()
        self._scalars = np.zeros(2, dtype=np.float32)  # alpha, beta: host memory, read at enqueue
        D = lt.MatmulDescAttribute
        self._set_desc(D.TRANSA, CUBLAS_OP_T if p.trans_a else CUBLAS_OP_N)
        self._set_desc(D.TRANSB, CUBLAS_OP_T if p.trans_b else CUBLAS_OP_N)
        self._set_desc(D.EPILOGUE, int(getattr(lt.Epilogue, p.epilogue)))
        kind = EPILOGUES[spec.epilogue]
        if kind.bias is not None:
            if p.bias_dtype != p.d.dtype:
                self._set_desc(D.BIAS_DATA_TYPE, CUDA_DATA_TYPE[p.bias_dtype])
            self._set_desc(D.BIAS_POINTER, 256)  # any aligned non-null address, for the heuristic
        if kind.aux is not None:
            self._set_desc(D.EPILOGUE_AUX_LD, p.aux_ld)
            self._set_desc(D.EPILOGUE_AUX_POINTER, 256)
        P = lt.MatmulPreferenceAttribute
        self._set_pref(P.MAX_WORKSPACE_BYTES, max_workspace)
        for attr in (P.MIN_ALIGNMENT_A_BYTES, P.MIN_ALIGNMENT_B_BYTES, P.MIN_ALIGNMENT_C_BYTES,
                     P.MIN_ALIGNMENT_D_BYTES):
            self._set_pref(attr, spec.alignment)

        results = lt.MatmulHeuristicResult(HEURISTIC_CANDIDATES)
        count = np.zeros(1, dtype=np.int32)
        lt.matmul_algo_get_heuristic(self._handle, self._desc, *self._layouts, self._pref,
                                     HEURISTIC_CANDIDATES, results.ptr, count.ctypes.data)
        if count[0] == 0:
            raise RuntimeError(f"cuBLASLt has no algorithm for {spec}")
        self._results = results  # owns the algorithm struct the plan runs
        best = results[0]  # the heuristic's first choice, fixed for the plan's life
        self._algo_ptr = best["algo"].ctypes.data
        # nvmath-python adds 16 bytes when an epilogue is used ("workaround for library issue").
        ws = int(np.asarray(best["workspace_size"]).reshape(-1)[0])
        self.workspace_size = ws + (16 if ws and spec.epilogue != "default" else 0)

    def _set_desc(self, attr, value) -> None:
        lt = self._lt
        _set_attribute(lt, lt.matmul_desc_set_attribute, lt.get_matmul_desc_attribute_dtype, self._desc, attr, value)

    def _set_pref(self, attr, value) -> None:
        lt = self._lt
        _set_attribute(lt, lt.matmul_preference_set_attribute, lt.get_matmul_preference_attribute_dtype,
                       self._pref, attr, value)

    def run(self, stream: int, a_ptr: int, b_ptr: int, c_ptr: int | None, d_ptr: int, *,
            workspace_ptr: int, workspace_size: int, bias_ptr: int | None = None,
            aux_ptr: int | None = None, alpha: float = 1.0, beta: float = 0.0) -> None:
        """Enqueue ``D = epilogue(alpha op(A) op(B) + beta C)`` on ``stream`` (row-major
        operands, see the module docstring). ``c_ptr=None`` means C = D (only read if beta != 0).
        """
        kind = EPILOGUES[self.spec.epilogue]
        if (bias_ptr is not None) != (kind.bias is not None):
            raise ValueError(f"{self.spec.epilogue}: bias_ptr is {'required' if kind.bias else 'not used'}")
        if (aux_ptr is not None) != (kind.aux is not None):
            raise ValueError(f"{self.spec.epilogue}: aux_ptr is {'required' if kind.aux else 'not used'}")
        if workspace_size < self.workspace_size:
            raise ValueError(f"workspace of {workspace_size} bytes, the plan needs {self.workspace_size}")
        c_ptr = d_ptr if c_ptr is None else c_ptr
        for name, ptr in (("a", a_ptr), ("b", b_ptr), ("c", c_ptr), ("d", d_ptr), ("bias", bias_ptr),
                          ("aux", aux_ptr)):
            if ptr is not None and ptr % self.spec.alignment:
                raise ValueError(f"{name}_ptr {ptr:#x} is not aligned to {self.spec.alignment} bytes")
        D = self._lt.MatmulDescAttribute
        if bias_ptr is not None:
            self._set_desc(D.BIAS_POINTER, bias_ptr)
        if aux_ptr is not None:
            self._set_desc(D.EPILOGUE_AUX_POINTER, aux_ptr)
        self._scalars[0], self._scalars[1] = alpha, beta
        s = self._scalars.ctypes.data
        pa, pb, pc, pd = self._layouts
        # cuBLASLt's A is our B and its B our A: the swap of the column-major mapping.
        self._lt.matmul(self._handle, self._desc, s, b_ptr, pa, a_ptr, pb, s + 4, c_ptr, pc, d_ptr, pd,
                        self._algo_ptr, workspace_ptr or 0, workspace_size, stream)

    def close(self) -> None:
        """Destroy the descriptors (the handle is shared and stays)."""
        lt = getattr(self, "_lt", None)
        if lt is None:
            return
        for layout in getattr(self, "_layouts", []):
            lt.matrix_layout_destroy(layout)
        if getattr(self, "_pref", None):
            lt.matmul_preference_destroy(self._pref)
        if getattr(self, "_desc", None):
            lt.matmul_desc_destroy(self._desc)
        self._lt = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass


_PLANS: dict[GemmSpec, GemmPlan] = {}


def get_plan(spec: GemmSpec) -> GemmPlan:
    """The plan for ``spec``, built on first use and shared (GPT-2's 12 layers reuse 8 plans)."""
    if spec not in _PLANS:
        _PLANS[spec] = GemmPlan(spec)
    return _PLANS[spec]
