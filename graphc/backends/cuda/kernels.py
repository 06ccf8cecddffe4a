"""CUDA C generated per shape and dtype: each function returns ``(source, kernel_name)``.

Shapes, strides and constants are baked into the source (the graphs are static once B
and T are bound), so the compiler folds every index computation; the module cache keys
the cubin by the source's hash. No headers are included (NVRTC then needs no CUDA
toolkit): bfloat16 is stored as ``unsigned short`` and converted with round-to-nearest-
even, exactly as ``ml_dtypes`` does on the host.

Every reduction runs in a fixed order (no float atomics), so results are bitwise
reproducible run to run: layer-norm weight gradients and bias gradients use a two-pass
column sum, the loss mean and the global gradient norm a fixed-tree block reduction, and
the embedding gradient gives each vocabulary row to one block that sums its positions in
position order (llm.c's bucketed encoder backward reaches the same with host sorting).
"""

from __future__ import annotations

import math

import numpy as np

try:
    from ml_dtypes import bfloat16 as BF16
except ImportError:  # pragma: no cover
    BF16 = None

PRELUDE = r"""
typedef long long i64;
typedef unsigned short bf16;
__device__ __forceinline__ float ld(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16* p, i64 i) { return __uint_as_float(((unsigned)p[i]) << 16); }
__device__ __forceinline__ i64 ld(const i64* p, i64 i) { return p[i]; }
__device__ __forceinline__ int ld(const int* p, i64 i) { return p[i]; }
__device__ __forceinline__ bool ld(const bool* p, i64 i) { return p[i]; }
__device__ __forceinline__ bf16 f2bf(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (bf16)(u >> 16);
}
__device__ __forceinline__ void st(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16* p, i64 i, float v) { p[i] = f2bf(v); }
__device__ __forceinline__ void st(i64* p, i64 i, i64 v) { p[i] = v; }
__device__ __forceinline__ void st(int* p, i64 i, i64 v) { p[i] = (int)v; }
__device__ __forceinline__ void st(bool* p, i64 i, bool v) { p[i] = v; }
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
"""

# numpy dtype -> (C storage type, C compute type)
CTYPES = {
    np.dtype(np.float32): ("float", "float"),
    np.dtype(np.int64): ("i64", "i64"),
    np.dtype(np.int32): ("int", "i64"),
    np.dtype(np.bool_): ("bool", "bool"),
}
if BF16 is not None:
    CTYPES[np.dtype(BF16)] = ("bf16", "float")

GELU_S = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


def ctype(dtype) -> str:
    return CTYPES[np.dtype(dtype)][0]


def ctype_compute(dtype) -> str:
    return CTYPES[np.dtype(dtype)][1]


def lit(value, dtype) -> str:
    """A C literal for a scalar of ``dtype``."""
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return "true" if bool(value) else "false"
    if dt.kind in "iu":
        return f"((i64){int(value)}LL)"
    v = float(value)
    if math.isnan(v):
        return "__int_as_float(0x7fc00000)"
    if math.isinf(v):
        return "__int_as_float(0x7f800000)" if v > 0 else "__int_as_float(0xff800000)"
    return f"{np.float32(v).item()!r}f"


def _index(shape, strides_list, var="i") -> str:
    """C statements turning linear index ``i`` over ``shape`` into offsets o0, o1, ..."""
    lines = [f"  i64 r = {var};"]
    for k in range(len(strides_list)):
        lines.append(f"  i64 o{k} = 0;")
    for axis in reversed(range(len(shape))):
        d = shape[axis]
        lines.append(f"  {{ i64 c = r % {d}LL; r /= {d}LL;")
        for k, strides in enumerate(strides_list):
            if strides[axis]:
                lines.append(f"    o{k} += c * {strides[axis]}LL;")
        lines.append("  }")
    return "\n".join(lines)


def elementwise(expr: str, shape, out, ins) -> tuple[str, str]:
    """``out[idx] = expr(a0, a1, ...)`` over ``shape``.

    ``out`` = (dtype, strides); ``ins`` = list of (dtype, strides) or ("lit", C literal).
    Inputs broadcast through zero strides; ``expr`` names inputs a0, a1, ... in their
    compute types (float for float32/bf16, i64 for integers).
    """
    n = int(np.prod(shape, dtype=np.int64))
    params = [f"{ctype(out[0])}* __restrict__ out"]
    strides, loads = [tuple(out[1])], []
    for k, spec in enumerate(ins):
        if spec[0] == "lit":
            loads.append(f"  const auto a{k} = {spec[1]};")
            continue
        dt, st_ = spec
        params.append(f"const {ctype(dt)}* __restrict__ in{k}")
        loads.append(f"  const {ctype_compute(dt)} a{k} = ld(in{k}, o{len(strides)});")
        strides.append(tuple(st_))
    body = _index(shape, strides)
    name = "ew"
    src = (PRELUDE + f'extern "C" __global__ void {name}({", ".join(params)}) {{\n'
           f"  i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;\n  if (i >= {n}LL) return;\n"
           f"{body}\n" + "\n".join(loads) + f"\n  st(out, o0, ({expr}));\n}}\n")
    return src, name


def layernorm_fwd(rows: int, C: int, x_dt, w_dt, y_dt, eps: float, x_ld: int, y_ld: int):
    """One warp per row: fp32 mean and variance (two passes over the row), y = xhat w + b."""
    src = PRELUDE + f"""
extern "C" __global__ void ln_fwd(const {ctype(x_dt)}* __restrict__ x, const {ctype(w_dt)}* __restrict__ w,
                                  const {ctype(w_dt)}* __restrict__ b, {ctype(y_dt)}* __restrict__ y) {{
  int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= {rows}) return;
  const i64 xo = (i64)row * {x_ld}LL, yo = (i64)row * {y_ld}LL;
  float s = 0.f;
  for (int c = lane; c < {C}; c += 32) s += ld(x, xo + c);
  const float mean = warp_sum(s) / {C}.f;
  float v = 0.f;
  for (int c = lane; c < {C}; c += 32) {{ float d = ld(x, xo + c) - mean; v += d * d; }}
  const float rstd = 1.f / sqrtf(warp_sum(v) / {C}.f + {lit(eps, np.float32)});
  for (int c = lane; c < {C}; c += 32) st(y, yo + c, (ld(x, xo + c) - mean) * rstd * ld(w, c) + ld(b, c));
}}
"""
    return src, "ln_fwd"


def layernorm_bwd(rows: int, C: int, dy_dt, x_dt, w_dt, dx_dt, eps: float, dy_ld: int, x_ld: int):
    """One warp per row: dX, and dY*xhat (fp32, [rows, C]) for the weight gradient's column sum."""
    src = PRELUDE + f"""
extern "C" __global__ void ln_bwd(const {ctype(dy_dt)}* __restrict__ dy, const {ctype(x_dt)}* __restrict__ x,
                                  const {ctype(w_dt)}* __restrict__ w, {ctype(dx_dt)}* __restrict__ dx,
                                  float* __restrict__ dyxhat) {{
  int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= {rows}) return;
  const i64 xo = (i64)row * {x_ld}LL, go = (i64)row * {dy_ld}LL, oo = (i64)row * {C}LL;
  float s = 0.f;
  for (int c = lane; c < {C}; c += 32) s += ld(x, xo + c);
  const float mean = warp_sum(s) / {C}.f;
  float v = 0.f;
  for (int c = lane; c < {C}; c += 32) {{ float d = ld(x, xo + c) - mean; v += d * d; }}
  const float rstd = 1.f / sqrtf(warp_sum(v) / {C}.f + {lit(eps, np.float32)});
  float m1 = 0.f, m2 = 0.f;
  for (int c = lane; c < {C}; c += 32) {{
    float xhat = (ld(x, xo + c) - mean) * rstd, g = ld(dy, go + c) * ld(w, c);
    m1 += g; m2 += g * xhat;
  }}
  m1 = warp_sum(m1) / {C}.f; m2 = warp_sum(m2) / {C}.f;
  for (int c = lane; c < {C}; c += 32) {{
    float xhat = (ld(x, xo + c) - mean) * rstd, d = ld(dy, go + c), g = d * ld(w, c);
    st(dx, oo + c, (g - m1 - xhat * m2) * rstd);
    dyxhat[oo + c] = d * xhat;
  }}
}}
"""
    return src, "ln_bwd"


LN_PARTIAL_MAX_C = 1536   # 8 warps x C fp32 in static shared memory (48 KB)


def layernorm_bwd_partials(rows: int, C: int, chunks: int, dy_dt, x_dt, w_dt, dx_dt, out_dt, eps: float,
                           dy_ld: int, x_ld: int):
    """Layer-norm backward with its weight and bias gradients, no [rows, C] scratch.

    ``ln_bwd_part`` (one block of 8 warps per chunk of rows, a warp per row): dX as
    :func:`layernorm_bwd`, while each lane accumulates dY*xhat and dY for its columns in
    registers; the 8 warps' sums are added in warp order and written as the chunk's
    partials [chunks, 2C]. ``ln_bwd_final`` adds the chunks in order into dW and dB. Fixed
    order throughout, so deterministic; the fp32 dY*xhat matrix (4 bytes x rows x C written
    and read back) of the two-pass version is gone."""
    nc = -(-C // 32)
    per = -(-rows // chunks)
    src = PRELUDE + f"""
extern "C" __global__ void ln_bwd_part(const {ctype(dy_dt)}* __restrict__ dy, const {ctype(x_dt)}* __restrict__ x,
                                       const {ctype(w_dt)}* __restrict__ w, {ctype(dx_dt)}* __restrict__ dx,
                                       float* __restrict__ part) {{
  __shared__ float red[8][{C}];
  const int wid = threadIdx.x / 32, lane = threadIdx.x % 32, chunk = blockIdx.x;
  const int r0 = chunk * {per}, r1 = min({rows}, r0 + {per});
  float aw[{nc}], ab[{nc}];
  #pragma unroll
  for (int k = 0; k < {nc}; ++k) {{ aw[k] = 0.f; ab[k] = 0.f; }}
  for (int row = r0 + wid; row < r1; row += 8) {{
    const i64 xo = (i64)row * {x_ld}LL, go = (i64)row * {dy_ld}LL, oo = (i64)row * {C}LL;
    float s = 0.f;
    for (int c = lane; c < {C}; c += 32) s += ld(x, xo + c);
    const float mean = warp_sum(s) / {C}.f;
    float v = 0.f;
    for (int c = lane; c < {C}; c += 32) {{ float d = ld(x, xo + c) - mean; v += d * d; }}
    const float rstd = 1.f / sqrtf(warp_sum(v) / {C}.f + {lit(eps, np.float32)});
    float m1 = 0.f, m2 = 0.f;
    for (int c = lane; c < {C}; c += 32) {{
      float xhat = (ld(x, xo + c) - mean) * rstd, g = ld(dy, go + c) * ld(w, c);
      m1 += g; m2 += g * xhat;
    }}
    m1 = warp_sum(m1) / {C}.f; m2 = warp_sum(m2) / {C}.f;
    #pragma unroll
    for (int k = 0; k < {nc}; ++k) {{
      const int c = lane + 32 * k;
      if (c < {C}) {{
        float xhat = (ld(x, xo + c) - mean) * rstd, d = ld(dy, go + c), g = d * ld(w, c);
        st(dx, oo + c, (g - m1 - xhat * m2) * rstd);
        aw[k] += d * xhat; ab[k] += d;
      }}
    }}
  }}
  #pragma unroll
  for (int k = 0; k < {nc}; ++k) {{ const int c = lane + 32 * k; if (c < {C}) red[wid][c] = aw[k]; }}
  __syncthreads();
  for (int c = threadIdx.x; c < {C}; c += blockDim.x) {{
    float t = red[0][c];
    for (int q = 1; q < 8; ++q) t += red[q][c];
    part[(i64)chunk * {2 * C} + c] = t;
  }}
  __syncthreads();
  #pragma unroll
  for (int k = 0; k < {nc}; ++k) {{ const int c = lane + 32 * k; if (c < {C}) red[wid][c] = ab[k]; }}
  __syncthreads();
  for (int c = threadIdx.x; c < {C}; c += blockDim.x) {{
    float t = red[0][c];
    for (int q = 1; q < 8; ++q) t += red[q][c];
    part[(i64)chunk * {2 * C} + {C} + c] = t;
  }}
}}
extern "C" __global__ void ln_bwd_final(const float* __restrict__ part, {ctype(out_dt)}* __restrict__ dw,
                                        {ctype(out_dt)}* __restrict__ db) {{
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= {2 * C}) return;
  float s = 0.f;
  for (int k = 0; k < {chunks}; ++k) s += part[(i64)k * {2 * C} + c];
  if (c < {C}) st(dw, c, s); else st(db, c - {C}, s);
}}
"""
    return src, ("ln_bwd_part", "ln_bwd_final")


COLSUM_CHUNKS = 64


def colsum(rows: int, cols: int, in_dt, out_dt, ld_: int, chunks: int = COLSUM_CHUNKS):
    """Deterministic sum over rows of a [rows, cols] matrix (row stride ``ld_``) in two passes:
    ``colsum_partial`` (grid: col tiles x chunks) writes fp32 partials [chunks, cols],
    ``colsum_final`` adds them in chunk order."""
    per = -(-rows // chunks)
    src = PRELUDE + f"""
extern "C" __global__ void colsum_partial(const {ctype(in_dt)}* __restrict__ x, float* __restrict__ part) {{
  int c = blockIdx.x * blockDim.x + threadIdx.x, k = blockIdx.y;
  if (c >= {cols}) return;
  int r0 = k * {per}, r1 = min({rows}, r0 + {per});
  float s = 0.f;
  for (int r = r0; r < r1; ++r) s += ld(x, (i64)r * {ld_}LL + c);
  part[(i64)k * {cols} + c] = s;
}}
extern "C" __global__ void colsum_final(const float* __restrict__ part, {ctype(out_dt)}* __restrict__ out) {{
  int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= {cols}) return;
  float s = 0.f;
  for (int k = 0; k < {chunks}; ++k) s += part[(i64)k * {cols} + c];
  st(out, c, s);
}}
"""
    return src, ("colsum_partial", "colsum_final")


COLSUM_ONE_PASS_ROWS = 2048


def colsum_one_pass(rows: int, cols: int, in_dt, out_dt, ld_: int):
    """The same column sum in one launch for few rows (launch-bound steps): a block of
    32 columns x 8 row groups; each thread sums its rows (r = group mod 8) in order, then the
    8 partials are added in group order. Fixed order, so deterministic."""
    src = PRELUDE + f"""
extern "C" __global__ void colsum_one(const {ctype(in_dt)}* __restrict__ x, {ctype(out_dt)}* __restrict__ out) {{
  __shared__ float part[8][33];
  const int c = blockIdx.x * 32 + threadIdx.x, g = threadIdx.y;
  float s = 0.f;
  if (c < {cols}) for (int r = g; r < {rows}; r += 8) s += ld(x, (i64)r * {ld_}LL + c);
  part[g][threadIdx.x] = s;
  __syncthreads();
  if (g == 0 && c < {cols}) {{
    float t = part[0][threadIdx.x];
    for (int k = 1; k < 8; ++k) t += part[k][threadIdx.x];
    st(out, c, t);
  }}
}}
"""
    return src, "colsum_one"


def gather_rows(n: int, C: int, table_dt, idx_dt, out_dt, rows: int):
    """out[i, :] = table[idx[i], :] (negative indices wrap, as ONNX Gather)."""
    src = PRELUDE + f"""
extern "C" __global__ void gather_rows(const {ctype(table_dt)}* __restrict__ table, const {ctype(idx_dt)}* __restrict__ idx,
                                       {ctype(out_dt)}* __restrict__ out) {{
  i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= {n}LL * {C}LL) return;
  i64 row = i / {C}, c = i % {C};
  i64 t = ld(idx, row); if (t < 0) t += {rows};
  st(out, i, ld(table, t * {C}LL + c));
}}
"""
    return src, "gather_rows"


def scatter_add_rows(n: int, C: int, upd_dt, idx_dt, out_dt, rows: int):
    """out[idx[i], :] += upd[i, :] without float atomics.

    One block per position i: if idx[i] occurs earlier, the block leaves; otherwise it owns
    that row and adds every matching position's update in position order (ordered block
    compaction, 256 positions at a time). Same result every run.
    """
    src = PRELUDE + f"""
extern "C" __global__ void scatter_add_rows(const {ctype(upd_dt)}* __restrict__ upd, const {ctype(idx_dt)}* __restrict__ idx,
                                            {ctype(out_dt)}* __restrict__ out) {{
  __shared__ int first;
  __shared__ int warp_counts[8];
  __shared__ int list[256];
  __shared__ int count;
  const int i = blockIdx.x, tid = threadIdx.x, lane = tid % 32, wid = tid / 32;
  i64 t = ld(idx, i); if (t < 0) t += {rows};
  if (tid == 0) first = 1;
  __syncthreads();
  for (int j = tid; j < i; j += 256) {{ i64 u = ld(idx, j); if (u < 0) u += {rows}; if (u == t) first = 0; }}
  __syncthreads();
  if (!first) return;
  float acc[{-(-C // 256)}];
  #pragma unroll
  for (int k = 0; k < {-(-C // 256)}; ++k) acc[k] = 0.f;
  for (int base = i; base < {n}; base += 256) {{
    int j = base + tid;
    bool hit = false;
    if (j < {n}) {{ i64 u = ld(idx, j); if (u < 0) u += {rows}; hit = (u == t); }}
    unsigned mask = __ballot_sync(0xffffffffu, hit);
    if (lane == 0) warp_counts[wid] = __popc(mask);
    __syncthreads();
    if (tid == 0) {{ int s = 0; for (int w = 0; w < 8; ++w) {{ int c = warp_counts[w]; warp_counts[w] = s; s += c; }} count = s; }}
    __syncthreads();
    if (hit) list[warp_counts[wid] + __popc(mask & ((1u << lane) - 1u))] = j;
    __syncthreads();
    for (int q = 0; q < count; ++q) {{
      const i64 src_row = (i64)list[q] * {C}LL;
      #pragma unroll
      for (int k = 0; k < {-(-C // 256)}; ++k) {{ int c = tid + 256 * k; if (c < {C}) acc[k] += ld(upd, src_row + c); }}
    }}
    __syncthreads();
  }}
  #pragma unroll
  for (int k = 0; k < {-(-C // 256)}; ++k) {{
    int c = tid + 256 * k;
    if (c < {C}) st(out, t * {C}LL + c, ld(out, t * {C}LL + c) + acc[k]);
  }}
}}
"""
    return src, "scatter_add_rows"


def cross_entropy(rows: int, V: int, z_dt, t_dt, z_ld: int):
    """Per-row loss (one block per row, fp32) into ``losses``, then the fixed-order mean."""
    src = PRELUDE + f"""
__device__ float block_reduce(float v, bool is_max) {{
  __shared__ float sh[32];
  v = is_max ? warp_max(v) : warp_sum(v);
  if (threadIdx.x % 32 == 0) sh[threadIdx.x / 32] = v;
  __syncthreads();
  int nw = blockDim.x / 32;
  v = threadIdx.x < nw ? sh[threadIdx.x] : (is_max ? -__int_as_float(0x7f800000) : 0.f);
  if (threadIdx.x < 32) v = is_max ? warp_max(v) : warp_sum(v);
  if (threadIdx.x == 0) sh[0] = v;
  __syncthreads();
  v = sh[0];
  __syncthreads();
  return v;
}}
extern "C" __global__ void ce_rows(const {ctype(z_dt)}* __restrict__ z, const {ctype(t_dt)}* __restrict__ tgt,
                                   float* __restrict__ losses, float* __restrict__ stats) {{
  const int row = blockIdx.x;
  const i64 zo = (i64)row * {z_ld}LL;
  float m = -__int_as_float(0x7f800000);
  for (int c = threadIdx.x; c < {V}; c += blockDim.x) m = fmaxf(m, ld(z, zo + c));
  m = block_reduce(m, true);
  float s = 0.f;
  for (int c = threadIdx.x; c < {V}; c += blockDim.x) s += expf(ld(z, zo + c) - m);
  s = block_reduce(s, false);
  if (threadIdx.x == 0) {{
    i64 t = ld(tgt, row);
    losses[row] = logf(s) + m - ld(z, zo + t);
    stats[2 * row] = m; stats[2 * row + 1] = s;
  }}
}}
extern "C" __global__ void ce_mean(const float* __restrict__ losses, float* __restrict__ loss) {{
  float s = 0.f;
  for (int r = threadIdx.x; r < {rows}; r += blockDim.x) s += losses[r];
  s = block_reduce(s, false);
  if (threadIdx.x == 0) loss[0] = s / {rows}.f;
}}
"""
    return src, ("ce_rows", "ce_mean")


def cross_entropy_grad(rows: int, V: int, z_dt, t_dt, dz_dt, z_ld: int, dz_ld: int, dz_cols: int, dloss_dt):
    """dZ = (softmax(z) - onehot(t)) * dloss / rows from the forward's row stats (max, sum);
    columns V..dz_cols of the output (the padded vocabulary) are written as zeros."""
    src = PRELUDE + f"""
extern "C" __global__ void ce_grad(const {ctype(dloss_dt)}* __restrict__ dloss, const {ctype(z_dt)}* __restrict__ z,
                                   const {ctype(t_dt)}* __restrict__ tgt, const float* __restrict__ stats,
                                   {ctype(dz_dt)}* __restrict__ dz) {{
  const int row = blockIdx.y;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= {dz_cols}) return;
  const i64 o = (i64)row * {dz_ld}LL + c;
  if (c >= {V}) {{ st(dz, o, 0.f); return; }}
  const float g = ld(dloss, 0) / {rows}.f;
  const float m = stats[2 * row], s = stats[2 * row + 1];
  float p = expf(ld(z, (i64)row * {z_ld}LL + c) - m) / s;
  if (c == (int)ld(tgt, row)) p -= 1.f;
  st(dz, o, p * g);
}}
"""
    return src, "ce_grad"


def attention_fwd(B, H, T, D, q_st, k_st, v_st, o_st, scale, causal, dt):
    """Y = softmax(scale Q K^T (+causal mask)) V, one block per (b, h, query row), fp32 math;
    also saves the row statistics (max, sum) for the backward. Strides are element strides
    of [B, H, T, D] views (Q, K, V may be views of one packed qkv buffer)."""
    src = PRELUDE + f"""
extern "C" __global__ void attn_fwd(const {ctype(dt)}* __restrict__ q, const {ctype(dt)}* __restrict__ k,
                                    const {ctype(dt)}* __restrict__ v, {ctype(dt)}* __restrict__ y,
                                    float* __restrict__ stats) {{
  __shared__ float p[{T}];
  __shared__ float qs[{D}];
  __shared__ float red[32];
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const i64 qo = (i64)b * {q_st[0]} + (i64)h * {q_st[1]} + (i64)i * {q_st[2]};
  for (int d = tid; d < {D}; d += blockDim.x) qs[d] = ld(q, qo + (i64)d * {q_st[3]});
  __syncthreads();
  const int nk = {"i + 1" if causal else T};
  float m = -__int_as_float(0x7f800000);
  for (int j = tid; j < nk; j += blockDim.x) {{
    const i64 ko = (i64)b * {k_st[0]} + (i64)h * {k_st[1]} + (i64)j * {k_st[2]};
    float s = 0.f;
    for (int d = 0; d < {D}; ++d) s += qs[d] * ld(k, ko + (i64)d * {k_st[3]});
    s *= {lit(scale, np.float32)};
    p[j] = s; m = fmaxf(m, s);
  }}
  m = warp_max(m);
  if (tid % 32 == 0) red[tid / 32] = m;
  __syncthreads();
  if (tid < 32) {{ float x = tid < blockDim.x / 32 ? red[tid] : -__int_as_float(0x7f800000); x = warp_max(x); if (tid == 0) red[0] = x; }}
  __syncthreads();
  m = red[0];
  __syncthreads();
  float s = 0.f;
  for (int j = tid; j < nk; j += blockDim.x) {{ float e = expf(p[j] - m); p[j] = e; s += e; }}
  s = warp_sum(s);
  if (tid % 32 == 0) red[tid / 32] = s;
  __syncthreads();
  if (tid < 32) {{ float x = tid < blockDim.x / 32 ? red[tid] : 0.f; x = warp_sum(x); if (tid == 0) red[0] = x; }}
  __syncthreads();
  s = red[0];
  for (int d = tid; d < {D}; d += blockDim.x) {{
    float acc = 0.f;
    for (int j = 0; j < nk; ++j)
      acc += p[j] * ld(v, (i64)b * {v_st[0]} + (i64)h * {v_st[1]} + (i64)j * {v_st[2]} + (i64)d * {v_st[3]});
    st(y, (i64)b * {o_st[0]} + (i64)h * {o_st[1]} + (i64)i * {o_st[2]} + (i64)d * {o_st[3]}, acc / s);
  }}
  if (tid == 0) {{ i64 r = ((i64)b * {H} + h) * {T} + i; stats[2 * r] = m; stats[2 * r + 1] = s; }}
}}
"""
    return src, "attn_fwd"


def attention_bwd(B, H, T, D, dy_st, q_st, k_st, v_st, y_st, dq_st, dk_st, dv_st, scale, causal, dt, ddt):
    """AttentionGrad in two deterministic kernels, both recomputing P from the saved stats:
    ``attn_bwd_q`` (one block per query row i): Di = dY_i . Y_i, dQ_i = scale sum_j dS_ij K_j;
    ``attn_bwd_kv`` (one block per key row j): dV_j = sum_i P_ij dY_i,
    dK_j = scale sum_i dS_ij Q_i, with dS_ij = P_ij (dY_i . V_j - Di)."""
    def off(st, b="b", h="h", t="i", d="d"):
        return f"(i64){b} * {st[0]} + (i64){h} * {st[1]} + (i64){t} * {st[2]} + (i64){d} * {st[3]}"

    sc = lit(scale, np.float32)
    src = PRELUDE + f"""
__device__ float block_sum(float v, float* red) {{
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {{ float x = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : 0.f; x = warp_sum(x); if (threadIdx.x == 0) red[0] = x; }}
  __syncthreads();
  v = red[0];
  __syncthreads();
  return v;
}}
extern "C" __global__ void attn_bwd_q(const {ctype(ddt)}* __restrict__ dy, const {ctype(dt)}* __restrict__ q,
                                      const {ctype(dt)}* __restrict__ k, const {ctype(dt)}* __restrict__ v,
                                      const {ctype(dt)}* __restrict__ y, const float* __restrict__ stats,
                                      float* __restrict__ dsum, {ctype(ddt)}* __restrict__ dq) {{
  __shared__ float ds[{T}];
  __shared__ float qs[{D}];
  __shared__ float dys[{D}];
  __shared__ float red[32];
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  float part = 0.f;
  for (int d = tid; d < {D}; d += blockDim.x) {{
    qs[d] = ld(q, {off(q_st)}); float g = ld(dy, {off(dy_st)}); dys[d] = g; part += g * ld(y, {off(y_st)});
  }}
  const float Di = block_sum(part, red);
  const i64 r = ((i64)b * {H} + h) * {T} + i;
  const float m = stats[2 * r], l = stats[2 * r + 1];
  if (tid == 0) dsum[r] = Di;
  const int nk = {"i + 1" if causal else T};
  for (int j = tid; j < nk; j += blockDim.x) {{
    float s = 0.f, dp = 0.f;
    for (int d = 0; d < {D}; ++d) {{ s += qs[d] * ld(k, {off(k_st, t="j")}); dp += dys[d] * ld(v, {off(v_st, t="j")}); }}
    float p = expf(s * {sc} - m) / l;
    ds[j] = p * (dp - Di);
  }}
  __syncthreads();
  for (int d = tid; d < {D}; d += blockDim.x) {{
    float acc = 0.f;
    for (int j = 0; j < nk; ++j) acc += ds[j] * ld(k, {off(k_st, t="j")});
    st(dq, {off(dq_st)}, acc * {sc});
  }}
}}
extern "C" __global__ void attn_bwd_kv(const {ctype(ddt)}* __restrict__ dy, const {ctype(dt)}* __restrict__ q,
                                       const {ctype(dt)}* __restrict__ k, const {ctype(dt)}* __restrict__ v,
                                       const float* __restrict__ stats, const float* __restrict__ dsum,
                                       {ctype(ddt)}* __restrict__ dk, {ctype(ddt)}* __restrict__ dv) {{
  __shared__ float ps[{T}];
  __shared__ float ds[{T}];
  __shared__ float ks[{D}];
  __shared__ float vs[{D}];
  const int j = blockIdx.x, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  for (int d = tid; d < {D}; d += blockDim.x) {{ ks[d] = ld(k, {off(k_st, t="j")}); vs[d] = ld(v, {off(v_st, t="j")}); }}
  __syncthreads();
  const int i0 = {"j" if causal else 0};
  for (int i = i0 + tid; i < {T}; i += blockDim.x) {{
    const i64 r = ((i64)b * {H} + h) * {T} + i;
    float s = 0.f, dp = 0.f;
    for (int d = 0; d < {D}; ++d) {{ s += ld(q, {off(q_st)}) * ks[d]; dp += ld(dy, {off(dy_st)}) * vs[d]; }}
    float p = expf(s * {sc} - stats[2 * r]) / stats[2 * r + 1];
    ps[i] = p; ds[i] = p * (dp - dsum[r]);
  }}
  __syncthreads();
  for (int d = tid; d < {D}; d += blockDim.x) {{
    float akv = 0.f, ak = 0.f;
    for (int i = i0; i < {T}; ++i) {{ akv += ps[i] * ld(dy, {off(dy_st)}); ak += ds[i] * ld(q, {off(q_st)}); }}
    st(dv, {off(dv_st, t="j")}, akv);
    st(dk, {off(dk_st, t="j")}, ak * {sc});
  }}
}}
"""
    return src, ("attn_bwd_q", "attn_bwd_kv")


def sumsq(n: int, blocks: int, dt=np.float32):
    """Deterministic sum of squares of a flat buffer: fixed partials, then one block (fp64)."""
    src = PRELUDE + f"""
extern "C" __global__ void sumsq_partial(const {ctype(dt)}* __restrict__ x, double* __restrict__ part) {{
  __shared__ double sh[256];
  double s = 0.0;
  for (i64 i = (i64)blockIdx.x * 256 + threadIdx.x; i < {n}LL; i += (i64){blocks} * 256) {{ double v = ld(x, i); s += v * v; }}
  sh[threadIdx.x] = s;
  __syncthreads();
  for (int o = 128; o > 0; o >>= 1) {{ if (threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o]; __syncthreads(); }}
  if (threadIdx.x == 0) part[blockIdx.x] = sh[0];
}}
extern "C" __global__ void sumsq_final(const double* __restrict__ part, float* __restrict__ norm) {{
  __shared__ double sh[256];
  double s = 0.0;
  for (int k = threadIdx.x; k < {blocks}; k += 256) s += part[k];
  sh[threadIdx.x] = s;
  __syncthreads();
  for (int o = 128; o > 0; o >>= 1) {{ if (threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o]; __syncthreads(); }}
  if (threadIdx.x == 0) norm[0] = (float)sqrt(sh[0]);
}}
"""
    return src, ("sumsq_partial", "sumsq_final")


def accumulate(n: int, scale: float, first: bool):
    """Gradient accumulation: ``acc = (first ? 0 : acc) + g * scale`` in float32 with two
    roundings (no FMA), as ``runtime.programs.accumulate`` does on the host."""
    f = lit(np.float32(scale), np.float32)
    body = f"__fmul_rn(g[i], {f})" if first else f"__fadd_rn(acc[i], __fmul_rn(g[i], {f}))"
    src = PRELUDE + f"""
extern "C" __global__ void accumulate_{'first' if first else 'add'}(float* __restrict__ acc, const float* __restrict__ g) {{
  i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < {n}LL) acc[i] = {body};
}}
"""
    return src, f"accumulate_{'first' if first else 'add'}"


def adamw(n: int, beta1: float, beta2: float, eps: float, weight_decay: float, grad_clip: float, masked: bool):
    """llm.c's AdamW over flat fp32 buffers, in numpy's operation order (runtime/optimizer.py).

    ``hyper`` (device memory) holds [lr, t, grad_norm]: changing the learning rate or the
    step writes 8 bytes and replays the same CUDA graph. With ``grad_clip`` > 0 the
    gradient is scaled by clip / norm when the norm exceeds clip. A non-finite norm (any
    NaN / inf gradient) skips the update, so the device keeps the last good weights and
    moments for the trainer's non-finite stop."""
    f = lambda x: lit(x, np.float32)  # noqa: E731
    src = PRELUDE + f"""
extern "C" __global__ void adamw(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                 float* __restrict__ v, const float* __restrict__ hyper, const float* __restrict__ mask) {{
  i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= {n}LL) return;
  const float lr = hyper[0], t = hyper[1];
  if (!isfinite(hyper[2])) return;  // a non-finite gradient: the weights and moments keep the last good step
  float gi = g[i];
  {f"const float norm = hyper[2]; if (norm > {f(grad_clip)}) gi = gi * ({f(grad_clip)} / norm);" if grad_clip > 0 else ""}
  const float bc1 = 1.f - powf({f(beta1)}, t), bc2 = 1.f - powf({f(beta2)}, t);
  float mi = __fadd_rn(__fmul_rn(m[i], {f(beta1)}), __fmul_rn(gi, {f(1.0 - np.float32(beta1))}));
  float vi = __fadd_rn(__fmul_rn(v[i], {f(beta2)}), __fmul_rn(__fmul_rn(gi, gi), {f(1.0 - np.float32(beta2))}));
  m[i] = mi; v[i] = vi;
  float s = __fdiv_rn(__fdiv_rn(mi, bc1), __fadd_rn(__fsqrt_rn(__fdiv_rn(vi, bc2)), {f(eps)}));
  {f"s = __fadd_rn(s, __fmul_rn(p[i], {f(weight_decay)}){' * mask[i]' if masked else ''});" if weight_decay != 0 else ""}
  p[i] = __fsub_rn(p[i], __fmul_rn(s, lr));
}}
"""
    return src, "adamw"


def cross_entropy_fused(rows: int, V: int, z_dt, t_dt, z_ld: int, dz_dt=None, dz_ld: int = 0, dz_cols: int = 0,
                        grad_scale: float = 0.0):
    """llm.c's fused classifier: one block per row reads the logits once for an online
    max / sum-of-exponentials (fp32), writes the row's loss, and -- when ``dz_dt`` is given
    -- writes dZ = (softmax - onehot) * grad_scale over the row (zeros over the padded
    columns V..dz_cols) while the row is still in L2. ``ce_mean`` (from
    :func:`cross_entropy`) then averages the row losses in a fixed order."""
    grad = dz_dt is not None
    src = PRELUDE + f"""
__device__ __forceinline__ void combine(float& m, float& s, float m2, float s2) {{
  float mm = fmaxf(m, m2);
  s = s * expf(m - mm) + s2 * expf(m2 - mm);
  m = mm;
}}
extern "C" __global__ void ce_fused(const {ctype(z_dt)}* __restrict__ z, const {ctype(t_dt)}* __restrict__ tgt,
                                    float* __restrict__ losses{f", {ctype(dz_dt)}* __restrict__ dz" if grad else ""}) {{
  __shared__ float sm[32], ss[32];
  const int row = blockIdx.x, tid = threadIdx.x, lane = tid % 32, wid = tid / 32, nw = blockDim.x / 32;
  const i64 zo = (i64)row * {z_ld}LL;
  float m = -3.0e38f, s = 0.f;
  for (int c = tid; c < {V}; c += blockDim.x) {{
    float x = ld(z, zo + c);
    if (x > m) {{ s = s * expf(m - x) + 1.f; m = x; }} else {{ s += expf(x - m); }}
  }}
  for (int o = 16; o > 0; o >>= 1) {{
    float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    combine(m, s, m2, s2);
  }}
  if (lane == 0) {{ sm[wid] = m; ss[wid] = s; }}
  __syncthreads();
  if (tid == 0) {{
    float M = sm[0], S = ss[0];
    for (int w = 1; w < nw; ++w) combine(M, S, sm[w], ss[w]);
    sm[0] = M; ss[0] = S;
    losses[row] = logf(S) + M - ld(z, zo + ld(tgt, row));
  }}
  __syncthreads();
  {"" if not grad else f'''const float M = sm[0], inv = 1.f / ss[0];
  const int t = (int)ld(tgt, row);
  const i64 go = (i64)row * {dz_ld}LL;
  for (int c = tid; c < {dz_cols}; c += blockDim.x) {{
    float g = 0.f;
    if (c < {V}) {{ g = expf(ld(z, zo + c) - M) * inv; if (c == t) g -= 1.f; g *= {lit(grad_scale, np.float32)}; }}
    st(dz, go + c, g);
  }}'''}
}}
"""
    return src, "ce_fused"


VEC_IO = r"""
struct alignas(16) V16 { unsigned w[4]; };
__device__ __forceinline__ void ldv(const bf16* p, i64 i, float* f) {
  V16 u = *reinterpret_cast<const V16*>(p + i);
  #pragma unroll
  for (int k = 0; k < 4; ++k) { f[2 * k] = __uint_as_float(u.w[k] << 16); f[2 * k + 1] = __uint_as_float(u.w[k] & 0xffff0000u); }
}
__device__ __forceinline__ void ldv(const float* p, i64 i, float* f) {
  V16 u = *reinterpret_cast<const V16*>(p + i);
  #pragma unroll
  for (int k = 0; k < 4; ++k) f[k] = __uint_as_float(u.w[k]);
}
__device__ __forceinline__ void stv(bf16* p, i64 i, const float* f) {
  V16 u;
  #pragma unroll
  for (int k = 0; k < 4; ++k) u.w[k] = (unsigned)f2bf(f[2 * k]) | ((unsigned)f2bf(f[2 * k + 1]) << 16);
  *reinterpret_cast<V16*>(p + i) = u;
}
__device__ __forceinline__ void stv(float* p, i64 i, const float* f) {
  V16 u;
  #pragma unroll
  for (int k = 0; k < 4; ++k) u.w[k] = __float_as_uint(f[k]);
  *reinterpret_cast<V16*>(p + i) = u;
}
"""


def cross_entropy_fused_vec(rows: int, V: int, z_dt, t_dt, z_ld: int, grad: bool, dz_cols: int = 0,
                            grad_scale: float = 0.0):
    """:func:`cross_entropy_fused` with 16-byte loads and stores (8 bf16 or 4 fp32 a thread):
    the scalar kernel's 2-byte loads left the classifier far below the memory bandwidth.
    Needs aligned rows whose storage extends a whole vector past ``V`` (the padded
    vocabulary), dZ of the logits' dtype with ``dz_cols`` a multiple of the vector and row
    stride ``dz_cols``. Each vector updates the running (max, sum) once: one rescale per
    vector instead of a branch per element."""
    vec = 16 // np.dtype(z_dt).itemsize
    zt = ctype(z_dt)
    grad_src = ""
    if grad:
        grad_src = f"""const float M = sm[0], inv = 1.f / ss[0];
  const int t = (int)ld(tgt, row);
  const i64 go = (i64)row * {dz_cols}LL;
  for (int c0 = tid * {vec}; c0 < {dz_cols}; c0 += blockDim.x * {vec}) {{
    float f[{vec}];
    if (c0 < {V}) ldv(z, zo + c0, f);
    #pragma unroll
    for (int k = 0; k < {vec}; ++k) {{
      const int c = c0 + k;
      float g = 0.f;
      if (c < {V}) {{ g = expf(f[k] - M) * inv; if (c == t) g -= 1.f; g *= {lit(grad_scale, np.float32)}; }}
      f[k] = g;
    }}
    stv(dz, go + c0, f);
  }}"""
    src = PRELUDE + VEC_IO + f"""
__device__ __forceinline__ void combine(float& m, float& s, float m2, float s2) {{
  float mm = fmaxf(m, m2);
  s = s * expf(m - mm) + s2 * expf(m2 - mm);
  m = mm;
}}
extern "C" __global__ void ce_fused_vec(const {zt}* __restrict__ z, const {ctype(t_dt)}* __restrict__ tgt,
                                        float* __restrict__ losses{f", {zt}* __restrict__ dz" if grad else ""}) {{
  __shared__ float sm[32], ss[32];
  const int row = blockIdx.x, tid = threadIdx.x, lane = tid % 32, wid = tid / 32, nw = blockDim.x / 32;
  const i64 zo = (i64)row * {z_ld}LL;
  float m = -3.0e38f, s = 0.f;
  for (int c0 = tid * {vec}; c0 < {V}; c0 += blockDim.x * {vec}) {{
    float f[{vec}];
    ldv(z, zo + c0, f);
    float lm = -3.0e38f;
    #pragma unroll
    for (int k = 0; k < {vec}; ++k) if (c0 + k < {V}) lm = fmaxf(lm, f[k]);
    const float nm = fmaxf(m, lm);
    float add = 0.f;
    #pragma unroll
    for (int k = 0; k < {vec}; ++k) if (c0 + k < {V}) add += expf(f[k] - nm);
    s = s * expf(m - nm) + add;
    m = nm;
  }}
  for (int o = 16; o > 0; o >>= 1) {{
    float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    combine(m, s, m2, s2);
  }}
  if (lane == 0) {{ sm[wid] = m; ss[wid] = s; }}
  __syncthreads();
  if (tid == 0) {{
    float M = sm[0], S = ss[0];
    for (int w = 1; w < nw; ++w) combine(M, S, sm[w], ss[w]);
    sm[0] = M; ss[0] = S;
    losses[row] = logf(S) + M - ld(z, zo + ld(tgt, row));
  }}
  __syncthreads();
  {grad_src}
}}
"""
    return src, "ce_fused_vec"


def attention_softmax(H: int, T: int, scale: float, causal: bool):
    """In place over S [H, T, T] (fp32, one batch element): P = softmax(scale S) with the
    causal mask (key j > query i gets 0). One block per (head, query) row."""
    src = PRELUDE + f"""
extern "C" __global__ void attn_softmax(float* __restrict__ s) {{
  __shared__ float red[32];
  const int r = blockIdx.x, i = r % {T}, tid = threadIdx.x;
  float* row = s + (i64)r * {T};
  const int n = {"i + 1" if causal else T};
  float m = -3.0e38f;
  for (int j = tid; j < n; j += blockDim.x) m = fmaxf(m, row[j] * {lit(scale, np.float32)});
  m = warp_max(m);
  if (tid % 32 == 0) red[tid / 32] = m;
  __syncthreads();
  if (tid < 32) {{ float x = tid < blockDim.x / 32 ? red[tid] : -3.0e38f; x = warp_max(x); if (tid == 0) red[0] = x; }}
  __syncthreads();
  m = red[0];
  __syncthreads();
  float sum = 0.f;
  for (int j = tid; j < n; j += blockDim.x) {{ float e = expf(row[j] * {lit(scale, np.float32)} - m); row[j] = e; sum += e; }}
  sum = warp_sum(sum);
  if (tid % 32 == 0) red[tid / 32] = sum;
  __syncthreads();
  if (tid < 32) {{ float x = tid < blockDim.x / 32 ? red[tid] : 0.f; x = warp_sum(x); if (tid == 0) red[0] = x; }}
  __syncthreads();
  const float inv = 1.f / red[0];
  for (int j = tid; j < {T}; j += blockDim.x) row[j] = j < n ? row[j] * inv : 0.f;
}}
"""
    return src, "attn_softmax"


def attention_dscores(H: int, T: int, D: int, dy_st, y_st, scale: float, dt, ddt):
    """In place over dP [H, T, T] (fp32, one batch element, whose Y/dY start at the
    pointers given): dS = scale * P (dP - rowsum(dY * Y)). One block per (head, query) row."""
    src = PRELUDE + f"""
extern "C" __global__ void attn_dscores(const float* __restrict__ p, float* __restrict__ dp,
                                        const {ctype(ddt)}* __restrict__ dy, const {ctype(dt)}* __restrict__ y) {{
  __shared__ float red[32];
  const int r = blockIdx.x, h = r / {T}, i = r % {T}, tid = threadIdx.x;
  float part = 0.f;
  for (int d = tid; d < {D}; d += blockDim.x)
    part += ld(dy, (i64)h * {dy_st[1]} + (i64)i * {dy_st[2]} + d) * ld(y, (i64)h * {y_st[1]} + (i64)i * {y_st[2]} + d);
  part = warp_sum(part);
  if (tid % 32 == 0) red[tid / 32] = part;
  __syncthreads();
  if (tid < 32) {{ float x = tid < blockDim.x / 32 ? red[tid] : 0.f; x = warp_sum(x); if (tid == 0) red[0] = x; }}
  __syncthreads();
  const float di = red[0];
  const i64 o = (i64)r * {T};
  for (int j = tid; j < {T}; j += blockDim.x) dp[o + j] = {lit(scale, np.float32)} * p[o + j] * (dp[o + j] - di);
}}
"""
    return src, "attn_dscores"
