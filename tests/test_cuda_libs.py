"""The CUDA backend's library wrappers: what can be checked without a GPU, plus device tests.

The GEMM module's row-major -> column-major mapping is checked by running the lowered
cuBLASLt problem through a tiny numpy emulation of cuBLASLt (column-major views of flat
buffers, its documented epilogue semantics) and comparing with the row-major math written
directly. The attention module's strided views are checked the same way with numpy strides.
Device tests (``-m gpu``) run the real plans against PyTorch on a GPU; ``bench/gpu_libcheck.py``
is the full device check and benchmark.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from graphc.backends.cuda import attention, gemm
from graphc.errors import GraphcError
from helpers import rel_err

GELU_C = np.sqrt(2.0 / np.pi)


def gelu(x):
    return 0.5 * x * (1.0 + np.tanh(GELU_C * (x + 0.044715 * x**3)))


def gelu_grad(x):
    t = np.tanh(GELU_C * (x + 0.044715 * x**3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * GELU_C * (1.0 + 3 * 0.044715 * x**2)


# --- a tiny cuBLASLt, column-major, on flat float64 buffers -------------------------------


def colmajor(flat: np.ndarray, layout: gemm.LtMatrix) -> np.ndarray:
    """The rows x cols column-major matrix with leading dimension ld that ``flat`` holds."""
    assert layout.ld >= layout.rows and flat.size >= layout.ld * (layout.cols - 1) + layout.rows
    s = flat.itemsize
    return np.lib.stride_tricks.as_strided(flat, (layout.rows, layout.cols), (s, layout.ld * s))


def lt_matmul(p: gemm.LtProblem, alpha, A, B, beta, C, D, bias=None, aux=None) -> None:
    """cuBLASLt's ``D = epilogue(alpha op(A) op(B) + beta C)`` as its documentation states it:
    BIAS adds a vector along D's rows (length m); *_AUX stores the pre-activation in a
    D-shaped column-major matrix with ld aux_ld; DGELU multiplies by gelu'(aux); DGELU_BGRAD
    writes D's row sums to the bias; BGRADB writes op(B)'s sums over k (length n)."""
    a = colmajor(A, p.a)
    b = colmajor(B, p.b)
    opa = a.T if p.trans_a else a
    opb = b.T if p.trans_b else b
    assert opa.shape == (p.m, p.k) and opb.shape == (p.k, p.n)
    acc = alpha * (opa @ opb)
    if beta:
        acc = acc + beta * colmajor(C, p.c)
    aux_m = colmajor(aux, gemm.LtMatrix(p.m, p.n, p.aux_ld, p.d.dtype)) if p.aux_ld else None
    e = p.epilogue
    if e in ("BIAS", "GELU_BIAS", "GELU_AUX_BIAS"):
        assert bias.shape == (p.bias_len,) == (p.m,)
        acc = acc + bias[:, None]
    if e.startswith("GELU"):
        if "AUX" in e:
            aux_m[...] = acc
        acc = gelu(acc)
    if e.startswith("DGELU"):
        acc = acc * gelu_grad(aux_m)
        if e == "DGELU_BGRAD":
            assert bias.shape == (p.bias_len,) == (p.m,)
            bias[...] = acc.sum(axis=1)
    if e == "BGRADB":
        assert bias.shape == (p.bias_len,) == (p.n,)
        bias[...] = opb.sum(axis=0)
    colmajor(D, p.d)[...] = acc


def run_emulated(spec: gemm.GemmSpec, A_rows, B_rows, C_rows=None, bias=None, aux=None, alpha=1.0, beta=0.0):
    """Run ``spec`` the way GemmPlan.run does (our A -> cuBLASLt's B and vice versa) on the
    row-major arrays' flat buffers; returns D as a row-major [m, n] array."""
    p = spec.lowering()
    D = np.full(spec.m * spec.n, np.nan)
    C = D.copy() if C_rows is None else np.ascontiguousarray(C_rows, dtype=np.float64).ravel().copy()
    lt_matmul(p, alpha, np.ascontiguousarray(B_rows).ravel(), np.ascontiguousarray(A_rows).ravel(), beta, C, D,
              bias=bias, aux=None if aux is None else aux.reshape(-1))
    return D.reshape(spec.m, spec.n)


# --- the mapping, against row-major numpy -------------------------------------------------

RNG = np.random.default_rng(0)
M, N, K = 24, 40, 16  # tokens, output features, input features: all different


def randn(*shape):
    return RNG.standard_normal(shape)


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_general_gemm_all_transposes(trans_a, trans_b):
    m, n, k = 6, 10, 8
    spec = gemm.GemmSpec(m, n, k, trans_a=trans_a, trans_b=trans_b)
    A = randn(k, m) if trans_a else randn(m, k)
    B = randn(n, k) if trans_b else randn(k, n)
    C = randn(m, n)
    ref = 0.5 * (A.T if trans_a else A) @ (B.T if trans_b else B) + 2.0 * C
    D = run_emulated(spec, A, B, C, alpha=0.5, beta=2.0)
    assert rel_err(D, ref) < 1e-13


@pytest.mark.parametrize("epilogue", ["default", "bias", "gelu", "gelu_bias", "gelu_aux", "gelu_aux_bias"])
def test_linear_forward(epilogue):
    x, W, b = randn(M, K), randn(N, K), randn(N)
    spec = gemm.linear_forward(M, N, K, epilogue=epilogue)
    pre = x @ W.T + (b if "bias" in epilogue else 0.0)
    kind = gemm.EPILOGUES[epilogue]
    aux = np.full((M, N), np.nan) if kind.aux else None
    y = run_emulated(spec, x, W, bias=b.copy() if kind.bias else None, aux=aux)
    assert rel_err(y, gelu(pre) if "gelu" in epilogue else pre) < 1e-13
    if kind.aux:  # the pre-activation, row-major [M, N], for the backward's dgelu
        assert rel_err(aux, pre) < 1e-13


@pytest.mark.parametrize("epilogue", ["default", "dgelu", "dgelu_bgrad"])
def test_linear_backward_input(epilogue):
    dy, W = randn(M, N), randn(N, K)
    pre = randn(M, K)  # the forward pre-activation of this layer's input (fc's output)
    spec = gemm.linear_backward_input(M, N, K, epilogue=epilogue)
    kind = gemm.EPILOGUES[epilogue]
    dbias = np.full(K, np.nan) if kind.bias else None
    dx = run_emulated(spec, dy, W, aux=pre if kind.aux else None, bias=dbias)
    ref = dy @ W
    if kind.aux:
        ref = ref * gelu_grad(pre)
    assert rel_err(dx, ref) < 1e-13
    if kind.bias:  # the fc bias gradient: column sums of the gelu-backward result
        assert rel_err(dbias, ref.sum(axis=0)) < 1e-13


@pytest.mark.parametrize("epilogue", ["default", "bgrad_a"])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_linear_backward_weight(epilogue, beta):
    dy, x, dW0 = randn(M, N), randn(M, K), randn(N, K)
    spec = gemm.linear_backward_weight(M, N, K, epilogue=epilogue)
    assert spec.out_dtype == "fp32"
    kind = gemm.EPILOGUES[epilogue]
    dbias = np.full(N, np.nan) if kind.bias else None
    dW = run_emulated(spec, dy, x, C_rows=dW0, beta=beta, bias=dbias)
    assert rel_err(dW, beta * dW0 + dy.T @ x) < 1e-13
    if kind.bias:  # written, not accumulated: cuBLASLt's BGRAD has no beta
        assert rel_err(dbias, dy.sum(axis=0)) < 1e-13


def test_gpt2_lowering_matches_the_anchor():
    """anchors.md: for y = gelu(x W^T + b), A = W and B = x^T; the result is y^T column-major."""
    p = gemm.linear_forward(16384, 3072, 768, "bf16", epilogue="gelu_aux_bias").lowering()
    assert (p.m, p.n, p.k) == (3072, 16384, 768)
    assert p.trans_a and not p.trans_b
    assert (p.a.rows, p.a.cols, p.a.ld) == (768, 3072, 768)  # W [3072, 768] row-major
    assert (p.b.rows, p.b.cols, p.b.ld) == (768, 16384, 768)  # x [16384, 768] row-major
    assert (p.d.rows, p.d.cols, p.d.ld) == (3072, 16384, 3072)  # y [16384, 3072] row-major
    assert p.bias_len == 3072 and p.aux_ld == 3072 and p.epilogue == "GELU_AUX_BIAS"
    pw = gemm.linear_backward_weight(16384, 3072, 768, "bf16", epilogue="bgrad_a").lowering()
    assert pw.epilogue == "BGRADB" and pw.bias_len == 3072 and pw.d.dtype == "fp32"


# --- plan keys ----------------------------------------------------------------------------


def test_gemm_spec_is_the_plan_key():
    a = gemm.linear_forward(64, 96, 32, "bf16", epilogue="bias")
    assert a == gemm.GemmSpec(64, 96, 32, trans_b=True, dtype="bf16", out_dtype="bf16", epilogue="bias")
    assert hash(a) == hash(gemm.GemmSpec(64, 96, 32, trans_b=True, dtype="bf16", epilogue="bias"))
    others = {a, gemm.linear_forward(64, 96, 32, "bf16", epilogue="gelu_bias"),
              gemm.linear_forward(64, 96, 32, "bf16", out_dtype="fp32", epilogue="bias"),
              gemm.linear_forward(64, 96, 32, "fp32", epilogue="bias"),
              gemm.linear_backward_input(64, 96, 32, "bf16"), gemm.linear_backward_weight(64, 96, 32, "bf16")}
    assert len(others) == 6
    assert a.flops == 2 * 64 * 96 * 32


@pytest.mark.parametrize("kwargs, message", [
    (dict(m=0, n=8, k=8), "positive"),
    (dict(m=8, n=8, k=8, dtype="fp8"), "dtype"),
    (dict(m=8, n=8, k=8, dtype="fp32", out_dtype="bf16"), "out_dtype"),
    (dict(m=8, n=8, k=8, epilogue="relu"), "epilogue"),
    (dict(m=8, n=12, k=8, epilogue="gelu_aux_bias"), "n % 8"),
    (dict(m=8, n=8, k=8, epilogue="default", bias_dtype="fp32"), "bias_dtype"),
    (dict(m=8, n=8, k=8, alignment=3), "alignment"),
])
def test_gemm_spec_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gemm.GemmSpec(**kwargs)


def test_sdpa_spec_is_the_plan_key():
    s = attention.gpt2_spec(16, 12, 1024, 64)
    assert s.q_strides == s.k_strides == s.v_strides == (1024 * 3 * 768, 64, 3 * 768, 1)
    assert s.o_strides == (1024 * 768, 64, 768, 1)
    assert s.dq_strides == s.q_strides and s.dv_strides == s.v_strides  # dqkv packed like qkv
    assert s.stats_strides == (12 * 1024, 1024, 1, 1)
    assert s.scale == pytest.approx(0.125) and s.causal and s.dtype == "bf16"
    assert s == attention.gpt2_spec(16, 12, 1024, 64) and hash(s) == hash(attention.gpt2_spec(16, 12, 1024, 64))
    assert s != attention.gpt2_spec(16, 12, 512, 64)
    with pytest.raises(ValueError, match="last"):
        attention.SdpaSpec(1, 1, 8, 8, (64, 64, 8, 2), (64, 64, 8, 1), (64, 64, 8, 1), (64, 64, 8, 1))
    with pytest.raises(ValueError, match="dtype"):
        attention.gpt2_spec(1, 1, 8, 8, dtype="fp32")


def test_packed_qkv_views_are_q_k_v():
    """The strides and base offsets select Q, K, V [B, H, T, D] out of qkv [B, T, 3, H, D],
    and bthd strides read O stored [B, T, H, D] as [B, H, T, D]."""
    B, H, T, D = 2, 3, 5, 4
    spec = attention.gpt2_spec(B, H, T, D)
    qkv = np.arange(B * T * 3 * H * D, dtype=np.float64)
    item = 2  # bf16 bytes: the pointer offsets are in bytes
    base = 1 << 20
    for j, ptr in enumerate(attention.packed_qkv_pointers(base, spec)):
        offset = (ptr - base) // item
        strides = (spec.q_strides, spec.k_strides, spec.v_strides)[j]
        view = np.lib.stride_tricks.as_strided(qkv[offset:], (B, H, T, D), tuple(8 * s for s in strides))
        expected = qkv.reshape(B, T, 3, H, D)[:, :, j].transpose(0, 2, 1, 3)
        assert np.array_equal(view, expected)
    o = np.arange(B * T * H * D, dtype=np.float64)
    view = np.lib.stride_tricks.as_strided(o, (B, H, T, D), tuple(8 * s for s in spec.o_strides))
    assert np.array_equal(view, o.reshape(B, T, H, D).transpose(0, 2, 1, 3))


# --- missing libraries: one line ----------------------------------------------------------


def test_missing_nvmath_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvmath.bindings.cublasLt", None)
    with pytest.raises(GraphcError) as e:
        gemm.GemmPlan(gemm.linear_forward(8, 8, 8))
    assert "nvmath-python is not installed" in str(e.value) and "\n" not in str(e.value)
    assert "pip install 'graphc[gpu]'" in str(e.value)


def test_missing_cudnn_frontend_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "cudnn", None)
    with pytest.raises(GraphcError) as e:
        attention.SdpaForwardPlan(attention.gpt2_spec(1, 1, 8, 8))
    assert "nvidia-cudnn-frontend is not installed" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("backward", [False, True])
def test_sdpa_graph_describes_every_operand(backward):
    """The cudnn graph (no GPU needed to describe and validate it) has each operand with the
    spec's dims, strides and dtypes."""
    cudnn = pytest.importorskip("cudnn")
    spec = attention.gpt2_spec(2, 3, 16, 8)
    t = attention.SdpaGraph(cudnn, spec, backward).tensors
    names = ["q", "k", "v", "o", "stats"] + (["dO", "dq", "dk", "dv"] if backward else [])
    assert sorted(t) == sorted(names)
    strides = dict(q=spec.q_strides, k=spec.k_strides, v=spec.v_strides, o=spec.o_strides, dO=spec.o_strides,
                   dq=spec.dq_strides, dk=spec.dk_strides, dv=spec.dv_strides, stats=spec.stats_strides)
    for name in names:
        assert tuple(t[name].get_stride()) == strides[name], name
        assert t[name].get_dim() == [2, 3, 16, 1 if name == "stats" else 8], name
        f32 = name == "stats"
        assert t[name].get_data_type() == (cudnn.data_type.FLOAT if f32 else cudnn.data_type.BFLOAT16), name


# --- device tests (-m gpu): the real plans against PyTorch ----------------------------------


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_linear_forward_gelu_aux_bias(dtype):
    torch = _torch_cuda()
    tdt = torch.float32 if dtype == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    x, W, b = (torch.randn(*s, device="cuda").to(tdt) for s in ((64, 32), (96, 32), (96,)))
    y, pre = (torch.full((64, 96), float("nan"), device="cuda", dtype=tdt) for _ in range(2))
    plan = gemm.get_plan(gemm.linear_forward(64, 96, 32, dtype, epilogue="gelu_aux_bias"))
    ws = torch.empty(max(plan.workspace_size, 1), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    plan.run(stream, x.data_ptr(), W.data_ptr(), None, y.data_ptr(), bias_ptr=b.data_ptr(), aux_ptr=pre.data_ptr(),
             workspace_ptr=ws.data_ptr(), workspace_size=ws.numel())
    ref_pre = x.double() @ W.double().T + b.double()
    ref = torch.nn.functional.gelu(ref_pre, approximate="tanh")
    tol = 1e-5 if dtype == "fp32" else 1e-2
    assert rel_err(pre.double().cpu(), ref_pre.cpu()) <= tol
    assert rel_err(y.double().cpu(), ref.cpu()) <= tol


@pytest.mark.gpu
def test_gpu_sdpa_forward_packed_qkv():
    torch = _torch_cuda()
    B, H, T, D = 2, 4, 128, 64
    spec = attention.gpt2_spec(B, H, T, D)
    torch.manual_seed(0)
    qkv = torch.randn(B, T, 3, H, D, device="cuda", dtype=torch.bfloat16)
    o = torch.full((B, T, H, D), float("nan"), device="cuda", dtype=torch.bfloat16)
    stats = torch.full((B, H, T, 1), float("nan"), device="cuda", dtype=torch.float32)
    plan = attention.get_forward_plan(spec)
    ws = torch.empty(max(plan.workspace_size, 1), dtype=torch.uint8, device="cuda")
    q, k, v = attention.packed_qkv_pointers(qkv.data_ptr(), spec)
    plan.run(torch.cuda.current_stream().cuda_stream, q, k, v, o.data_ptr(), stats.data_ptr(),
             workspace_ptr=ws.data_ptr())
    qd, kd, vd = (qkv[:, :, j].transpose(1, 2).double() for j in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True).transpose(1, 2)
    assert rel_err(o.double().cpu(), ref.cpu()) <= 1e-2
