"""cuDNN fused scaled-dot-product attention (forward and backward), through cudnn-frontend.

Usage (device pointers are Python ints, ``stream`` a ``cudaStream_t`` as an int; the CUDA
device must be current when a plan is built)::

    from graphc.backends.cuda import attention

    # GPT-2: q, k, v are views of the qkv GEMM's output [B, T, 3, H, D]; O and dO are
    # [B, T, H, D] (what the output projection reads); stats [B, H, T] fp32.
    spec = attention.gpt2_spec(B=16, H=12, T=1024, D=64)
    fwd = attention.get_forward_plan(spec)
    q, k, v = attention.packed_qkv_pointers(qkv_ptr, spec)
    fwd.run(stream, q, k, v, o_ptr, stats_ptr, workspace_ptr=ws_ptr)  # ws >= fwd.workspace_size
    bwd = attention.get_backward_plan(spec)
    dq, dk, dv = attention.packed_qkv_pointers(dqkv_ptr, spec)         # dqkv: same layout as qkv
    bwd.run(stream, q, k, v, o_ptr, do_ptr, stats_ptr, dq, dk, dv, workspace_ptr=ws_ptr)

Tensors are described to cuDNN as [B, H, T, D] with arbitrary element strides, so Q, K, V
(and dQ, dK, dV) can be strided views of one packed buffer: for qkv stored [B, T, 3, H, D]
(GPT-2's qkv GEMM writes y[B*T, 3C] with C = H*D) the strides of Q, K and V are
(T*3C, D, 3C, 1) and K, V start C and 2C elements after Q. O and dO in [B, T, H, D] have
strides (T*C, D, C, 1). The softmax statistics (log-sum-exp per row, written by the forward,
read by the backward) are fp32 [B, H, T, 1], contiguous.

Each plan is a cudnn graph built once per :class:`SdpaSpec` with cuDNN's own engines only
(never cudnn-frontend's Python engines, which would JIT-compile through CuTe DSL and torch),
taking the first plan of cuDNN's heuristics that builds; the backward asks for cuDNN's
deterministic algorithm (``use_deterministic_algorithm``: no atomics in dQ). ``run`` sets
the handle's stream and calls ``graph.execute`` with raw device pointers and the caller's
workspace: no allocation, no synchronisation, capturable in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from graphc.backends.cuda.libimport import import_gpu_library
from graphc.errors import GraphcError

ITEMSIZE = {"bf16": 2, "fp16": 2}

Strides = tuple[int, int, int, int]


def packed_qkv_strides(T: int, H: int, D: int) -> Strides:
    """[B, H, T, D] strides of Q, K or V inside a packed [B, T, 3, H, D] buffer."""
    C = H * D
    return (T * 3 * C, D, 3 * C, 1)


def bthd_strides(T: int, H: int, D: int) -> Strides:
    """[B, H, T, D] strides of a tensor stored [B, T, H, D] (O, dO: rows of [B*T, C])."""
    C = H * D
    return (T * C, D, C, 1)


@dataclass(frozen=True)
class SdpaSpec:
    """One attention shape and layout; the plan key. Strides are in elements, for [B, H, T, D]."""

    B: int
    H: int
    T: int
    D: int
    q_strides: Strides
    k_strides: Strides
    v_strides: Strides
    o_strides: Strides  # O and dO
    scale: float | None = None  # None: 1/sqrt(D)
    causal: bool = True
    dtype: str = "bf16"
    # The gradients' layouts; None: the same as Q, K, V (a packed dqkv buffer like qkv).
    dq_strides: Strides | None = None
    dk_strides: Strides | None = None
    dv_strides: Strides | None = None

    def __post_init__(self):
        for name in ("B", "H", "T", "D"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"SdpaSpec.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.dtype not in ITEMSIZE:
            raise ValueError(f"SdpaSpec.dtype {self.dtype!r}: expected one of {sorted(ITEMSIZE)}")
        for name in ("q", "k", "v", "o", "dq", "dk", "dv"):
            strides = getattr(self, f"{name}_strides")
            if strides is None:
                object.__setattr__(self, f"{name}_strides", getattr(self, f"{name[1:]}_strides"))
                continue
            strides = tuple(int(s) for s in strides)
            if len(strides) != 4 or strides[3] != 1:
                raise ValueError(f"SdpaSpec.{name}_strides {strides}: four strides, the last (D) 1")
            object.__setattr__(self, f"{name}_strides", strides)
        if self.scale is None:
            object.__setattr__(self, "scale", 1.0 / math.sqrt(self.D))

    @property
    def stats_strides(self) -> Strides:
        return (self.H * self.T, self.T, 1, 1)

    def forward_flops(self) -> int:
        """Matmul FLOPs of the forward (QK^T and PV), halved when causal."""
        f = 4 * self.B * self.H * self.T * self.T * self.D
        return f // 2 if self.causal else f


def gpt2_spec(B: int, H: int, T: int, D: int, dtype: str = "bf16") -> SdpaSpec:
    """GPT-2's layout: Q, K, V in the packed qkv buffer, O and dO [B, T, H, D], causal."""
    qkv = packed_qkv_strides(T, H, D)
    return SdpaSpec(B, H, T, D, qkv, qkv, qkv, bthd_strides(T, H, D), dtype=dtype)


def packed_qkv_pointers(qkv_ptr: int, spec: SdpaSpec) -> tuple[int, int, int]:
    """Q, K and V's base addresses inside a packed [B, T, 3, H, D] buffer."""
    step = spec.H * spec.D * ITEMSIZE[spec.dtype]
    return qkv_ptr, qkv_ptr + step, qkv_ptr + 2 * step


def _cudnn():
    cudnn = import_gpu_library("cudnn", "nvidia-cudnn-frontend", "cuDNN SDPA")
    try:
        cudnn.backend_version()
    except Exception as e:  # the frontend is there, libcudnn.so.9 is not
        raise GraphcError("cuda backend", f"the cuDNN library (libcudnn.so.9) cannot be loaded: {e}",
                          "cuDNN SDPA") from None
    return cudnn


_HANDLE: list = []


def default_handle():
    """This process's cuDNN handle (created on first use, on the current device)."""
    if not _HANDLE:
        _HANDLE.append(_cudnn().create_handle())
    return _HANDLE[0]


def _build_with_cudnn_engines(cudnn, graph, what: str) -> int:
    """Plan ``graph`` and build the first of cuDNN's own plans that builds (heuristics A,
    then FALLBACK), skipping cudnn-frontend's Python engines; returns its index."""
    from cudnn.engines.engine_ids import is_python_engine

    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    declined = []
    for index, plan in enumerate(graph.plans):
        if is_python_engine(plan.engine_id):
            continue
        try:
            graph.build_plan_at_index(index)
            return index
        except cudnn.cudnnGraphNotSupportedError as e:
            declined.append(f"[{index}] {e}")
    raise RuntimeError(f"cuDNN has no plan for {what}: " + ("; ".join(declined) or "no cuDNN engine proposed one"))


class SdpaGraph:
    """The cudnn graph of one SDPA direction, described but not built (no GPU needed):
    ``tensors`` maps operand names (q, k, v, o, stats, dO, dq, dk, dv) to graph tensors."""

    def __init__(self, cudnn, spec: SdpaSpec, backward: bool, handle=None):
        self.spec = spec
        io = cudnn.data_type.BFLOAT16 if spec.dtype == "bf16" else cudnn.data_type.HALF
        f32 = cudnn.data_type.FLOAT
        g = self.graph = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32,
                                       handle=handle)
        s = spec
        dims = [s.B, s.H, s.T, s.D]
        stats_dims = [s.B, s.H, s.T, 1]
        mask = {}
        if s.causal:
            mask = {"diagonal_alignment": cudnn.diagonal_alignment.TOP_LEFT, "diagonal_band_right_bound": 0}
        t = self.tensors = {name: g.tensor(name=name, dim=dims, stride=list(strides), data_type=io)
                            for name, strides in (("q", s.q_strides), ("k", s.k_strides), ("v", s.v_strides))}
        if not backward:
            t["o"], t["stats"] = g.sdpa(name="sdpa", q=t["q"], k=t["k"], v=t["v"], generate_stats=True,
                                        attn_scale=s.scale, **mask)
            t["o"].set_output(True).set_dim(dims).set_stride(list(s.o_strides)).set_data_type(io)
            t["stats"].set_output(True).set_dim(stats_dims).set_stride(list(s.stats_strides)).set_data_type(f32)
        else:
            t["o"] = g.tensor(name="o", dim=dims, stride=list(s.o_strides), data_type=io)
            t["dO"] = g.tensor(name="dO", dim=dims, stride=list(s.o_strides), data_type=io)
            t["stats"] = g.tensor(name="stats", dim=stats_dims, stride=list(s.stats_strides), data_type=f32)
            t["dq"], t["dk"], t["dv"] = g.sdpa_backward(
                name="sdpa_backward", q=t["q"], k=t["k"], v=t["v"], o=t["o"], dO=t["dO"], stats=t["stats"],
                attn_scale=s.scale, use_deterministic_algorithm=True, **mask)
            for name in ("dq", "dk", "dv"):
                strides = getattr(s, f"{name}_strides")
                t[name].set_output(True).set_dim(dims).set_stride(list(strides)).set_data_type(io)
        g.validate()


class _SdpaPlan:
    """A built :class:`SdpaGraph` and its execution with raw pointers."""

    backward = False

    def __init__(self, spec: SdpaSpec, handle=None):
        self._cudnn = _cudnn()
        self.spec = spec
        self._handle = default_handle() if handle is None else handle
        self._sdpa = SdpaGraph(self._cudnn, spec, self.backward, self._handle)
        self.graph, self._t = self._sdpa.graph, self._sdpa.tensors
        index = _build_with_cudnn_engines(self._cudnn, self.graph, f"{type(self).__name__} {spec}")
        self.plan_name = self.graph.get_plan_name_at_index(index)
        self.workspace_size = int(self.graph.get_workspace_size())

    def _execute(self, stream: int, pointers: dict, workspace_ptr: int | None) -> None:
        if self.workspace_size and not workspace_ptr:
            raise ValueError(f"this plan needs a workspace of {self.workspace_size} bytes")
        self._cudnn.set_stream(self._handle, stream)
        pack = {self._t[name]: ptr for name, ptr in pointers.items()}
        self.graph.execute(pack, workspace_ptr or None, handle=self._handle)


class SdpaForwardPlan(_SdpaPlan):
    """``O = softmax(scale Q K^T + causal mask) V`` and the softmax stats, for the backward."""

    def run(self, stream: int, q_ptr: int, k_ptr: int, v_ptr: int, o_ptr: int, stats_ptr: int, *,
            workspace_ptr: int | None) -> None:
        """Enqueue the forward on ``stream``: writes O and the stats (fp32 [B, H, T, 1])."""
        self._execute(stream, {"q": q_ptr, "k": k_ptr, "v": v_ptr, "o": o_ptr, "stats": stats_ptr},
                      workspace_ptr)


class SdpaBackwardPlan(_SdpaPlan):
    """dQ, dK, dV from Q, K, V, O, dO and the forward's stats (cuDNN's deterministic kernel)."""

    backward = True

    def run(self, stream: int, q_ptr: int, k_ptr: int, v_ptr: int, o_ptr: int, do_ptr: int, stats_ptr: int,
            dq_ptr: int, dk_ptr: int, dv_ptr: int, *, workspace_ptr: int | None) -> None:
        """Enqueue the backward on ``stream``: writes (not accumulates) dQ, dK and dV."""
        self._execute(stream, {"q": q_ptr, "k": k_ptr, "v": v_ptr, "o": o_ptr, "dO": do_ptr, "stats": stats_ptr,
                               "dq": dq_ptr, "dk": dk_ptr, "dv": dv_ptr}, workspace_ptr)


_FORWARD: dict[SdpaSpec, SdpaForwardPlan] = {}
_BACKWARD: dict[SdpaSpec, SdpaBackwardPlan] = {}


def get_forward_plan(spec: SdpaSpec) -> SdpaForwardPlan:
    """The forward plan for ``spec``, built on first use and shared by every layer."""
    if spec not in _FORWARD:
        _FORWARD[spec] = SdpaForwardPlan(spec)
    return _FORWARD[spec]


def get_backward_plan(spec: SdpaSpec) -> SdpaBackwardPlan:
    """The backward plan for ``spec``, built on first use and shared by every layer."""
    if spec not in _BACKWARD:
        _BACKWARD[spec] = SdpaBackwardPlan(spec)
    return _BACKWARD[spec]
