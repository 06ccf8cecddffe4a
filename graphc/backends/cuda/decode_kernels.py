"""CUDA C for the decode program: fused row kernels whose results never depend on the batch.

Every kernel works on *rows*: one row is one token of one sequence, with its cache slot
and position read from device memory (``row_slot``, ``row_pos``), so the same kernels run a
decode step (one row per live sequence), a prefill chunk (one row per prompt token) or a
mix of both, and a CUDA graph captured once per row count is replayed with new positions.

**Batch invariance** is by construction: a row's arithmetic (which lanes add which
products, in which order) is fixed by the model's shapes alone, never by the number of
rows, the other rows, or a split-K heuristic:

* :func:`gemv` -- ``y[m] = epilogue(LN?(x[m]) @ W^T)``: one warp per output column (or
  ``COLS`` columns), lanes stride over K with 8-wide loads, a fixed butterfly reduction.
  Layer norm is fused as a prologue (each block recomputes its rows' mean / rstd, two-pass),
  and the epilogues fuse bias, GELU, the residual add, or the QKV split with the K/V write
  straight into the cache at (slot, position).
* :func:`decode_attention` -- one query against its sequence's cache rows ``0..pos``,
  split over the cache length in chunks of ``CHUNK`` keys (flash-decoding); the split count
  depends on the position only, and the last block of a (row, head) combines the chunks in
  chunk order (an atomic counter elects it; no float atomics).
* :func:`sample` -- greedy / temperature / top-k / top-p on the device: thresholds found by
  bisection over the float bit patterns (exact k-th value, exact nucleus boundary), the draw
  by inverting the cumulative mass in vocabulary order with one counter-based random number
  per (sequence seed, token index), so a sequence's draws do not depend on the batch.

Weights are ``float`` or ``bf16`` (``unsigned short``, as in ``kernels.py``); activations,
statistics and accumulation stay fp32; the cache is fp32 or bf16.
"""

from __future__ import annotations

import math

import numpy as np

from graphc.backends.cuda.kernels import GELU_A, GELU_S, PRELUDE, ctype

WARPS = 8            # warps per gemv block
ROWS = 8             # rows per gemv block (also one row's statistics per warp)
CHUNK = 128          # cache positions per attention block (= its threads)
SAMPLE_THREADS = 1024

EPILOGUES = ("qkv", "bias", "gelu", "residual", "plain")

# Programmatic dependent launch: every decode kernel is launched so it may start while its
# predecessor runs; before this point it may read only the weights (never written in a pass),
# after it everything the previous kernels wrote is visible. Then it lets its own successor
# start its prologue. Both are no-ops for a kernel launched without the attribute.
PDL_WAIT = 'asm volatile("griddepcontrol.wait;" ::: "memory"); asm volatile("griddepcontrol.launch_dependents;");'

_LOAD8 = r"""
__device__ __forceinline__ void load8(const float* p, float* v) {
  const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void load8(const bf16* p, float* v) {
  const uint4 a = *reinterpret_cast<const uint4*>(p);
  const unsigned w[4] = {a.x, a.y, a.z, a.w};
  #pragma unroll
  for (int i = 0; i < 4; ++i) { v[2 * i] = __uint_as_float(w[i] << 16); v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u); }
}
__device__ __forceinline__ float gelu_tanh(float x) {
  return 0.5f * x * (1.0f + tanhf(%(S)r * (x + %(A)r * x * x * x)));
}
""" % {"S": float(np.float32(GELU_S)), "A": float(np.float32(GELU_A))}


def epilogue_code(epilogue: str, N: int, heads: int, capacity: int, CT: str) -> tuple[str, str]:
    """(store statement, bias term) of a row kernel's epilogue for output (row ``m``, column
    ``n``) with value ``v``: the one definition the CUDA-core GEMV and the tensor-core GEMM share.
    ``qkv`` writes columns [0, C) to ``out`` [M, C] and the K / V columns into the caches at
    (row_slot[m], row_pos[m])."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"unknown epilogue {epilogue!r}")
    C = N // 3 if epilogue == "qkv" else N
    D = C // heads if heads else 0
    if epilogue == "qkv":
        store = f"""
          if (n < {C}) out[m * {C}LL + n] = v;
          else {{
            const i64 nn = (n - {C}) % {C}, h = nn / {D}, d = nn % {D};
            {CT}* cache = n < {2 * C} ? k_cache : v_cache;
            st(cache, (((i64)row_slot[m] * {heads} + h) * {capacity} + row_pos[m]) * {D} + d, v);
          }}"""
    elif epilogue == "residual":
        store = f"out[m * {N}LL + n] += v;"
    elif epilogue == "gelu":
        store = f"out[m * {N}LL + n] = gelu_tanh(v);"
    else:
        store = f"out[m * {N}LL + n] = v;"
    return store, ("" if epilogue == "plain" else " + bias[n]")


def gemv_shape(N: int, M: int) -> tuple[int, int, tuple, tuple]:
    """(rows per block, columns per warp, grid, block) for ``M`` rows of an ``N``-column GEMV.

    Only the work split changes with M; a row's arithmetic never does (lanes always cover K
    as ``k = it*256 + lane*8 + i``, then the same butterfly), so results stay batch-invariant.
    Wide outputs (the LM head) loop over the row blocks inside one block, so a block's weight
    columns are read from DRAM once and reused from L1/L2 for every row block."""
    rows = min(ROWS, 1 << max(0, (M - 1).bit_length()))
    cols = 4 if (N >= 8192 or M > 16) else 2 if M > 4 else 1
    row_blocks = 1 if N >= 8192 else (M + rows - 1) // rows
    return rows, cols, ((N + WARPS * cols - 1) // (WARPS * cols), row_blocks), (32 * WARPS,)


def gemv(K: int, N: int, wdtype, *, ln: bool, epilogue: str, eps: float = 1e-5, heads: int = 0,
         capacity: int = 0, cache_dtype=np.float32, rows: int = ROWS, cols: int = 1) -> tuple[str, str]:
    """``out[m, n] (+)= epi(sum_k xn[row(m), k] * W[n, k] + bias[n])``; W is [N, K] row-major.

    Arguments (all pointers passed as 64-bit integers): x [*, K] fp32, rowmap int32 [M] or 0
    (input row of output row m), ln_w, ln_b (fp32 [K] or 0), W, bias (fp32 [N] or 0), out,
    M, and for ``qkv``: row_slot, row_pos (int32 [M]), k_cache, v_cache ([slots, H, cap, D]).
    ``qkv`` writes columns [0, C) to ``out`` [M, C] and the K / V columns into the caches.
    ``rows`` / ``cols`` come from :func:`gemv_shape`.
    """
    if K % 8:
        raise ValueError(f"gemv needs K % 8 == 0, got K={K}")
    if epilogue not in EPILOGUES:
        raise ValueError(f"unknown epilogue {epilogue!r}")
    W, CT = ctype(wdtype), ctype(cache_dtype)
    store, add_bias = epilogue_code(epilogue, N, heads, capacity, CT)
    name = f"gemv_{epilogue}{'_ln' if ln else ''}_r{rows}c{cols}"
    src = PRELUDE + _LOAD8 + f"""
extern "C" __global__ void __launch_bounds__({32 * WARPS}) {name}(
    const float* __restrict__ x, const int* __restrict__ rowmap, const float* __restrict__ ln_w,
    const float* __restrict__ ln_b, const {W}* __restrict__ w, const float* __restrict__ bias,
    float* __restrict__ out, i64 M, const int* __restrict__ row_slot, const int* __restrict__ row_pos,
    {CT}* __restrict__ k_cache, {CT}* __restrict__ v_cache) {{
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const i64 n0 = ((i64)blockIdx.x * {WARPS} + warp) * {cols};
  {PDL_WAIT}
  __shared__ int s_row[{rows}];
  __shared__ float s_mean[{rows}], s_rstd[{rows}];
  for (i64 m0 = (i64)blockIdx.y * {rows}; m0 < M; m0 += (i64)gridDim.y * {rows}) {{
    __syncthreads();
    if (threadIdx.x < {rows}) {{
      const i64 m = m0 + threadIdx.x;
      s_row[threadIdx.x] = m < M ? (rowmap ? rowmap[m] : (int)m) : -1;
    }}
    __syncthreads();
    if ({int(ln)}) {{
      for (int r = warp; r < {rows}; r += {WARPS}) {{
        const int row = s_row[r];
        if (row < 0) continue;
        const float* xr = x + (i64)row * {K};
        float s = 0.f;
        #pragma unroll
        for (int k = lane; k < {K}; k += 32) s += xr[k];
        const float mean = warp_sum(s) / {K}.f;
        float q = 0.f;
        #pragma unroll
        for (int k = lane; k < {K}; k += 32) {{ const float d = xr[k] - mean; q += d * d; }}
        const float var = warp_sum(q) / {K}.f;
        if (lane == 0) {{ s_mean[r] = mean; s_rstd[r] = 1.0f / sqrtf(var + {float(np.float32(eps))!r}f); }}
      }}
      __syncthreads();
    }}
    if (n0 >= {N}) continue;
    float acc[{rows}][{cols}];
    #pragma unroll
    for (int r = 0; r < {rows}; ++r)
      #pragma unroll
      for (int c = 0; c < {cols}; ++c) acc[r][c] = 0.f;
    #pragma unroll
    for (int it = 0; it < {(K + 255) // 256}; ++it) {{
      const int k = it * 256 + lane * 8;
      if (k >= {K}) break;
      float wv[{cols}][8];
      #pragma unroll
      for (int c = 0; c < {cols}; ++c) {{
        if (n0 + c < {N}) load8(w + (n0 + c) * {K}LL + k, wv[c]);
        else {{
          #pragma unroll
          for (int i = 0; i < 8; ++i) wv[c][i] = 0.f;
        }}
      }}
      float g[8], b[8];
      if ({int(ln)}) {{ load8(ln_w + k, g); load8(ln_b + k, b); }}
      #pragma unroll
      for (int r = 0; r < {rows}; ++r) {{
        const int row = s_row[r];
        if (row < 0) continue;
        float xv[8];
        load8(x + (i64)row * {K} + k, xv);
        if ({int(ln)}) {{
          #pragma unroll
          for (int i = 0; i < 8; ++i) xv[i] = (xv[i] - s_mean[r]) * s_rstd[r] * g[i] + b[i];
        }}
        #pragma unroll
        for (int c = 0; c < {cols}; ++c)
          #pragma unroll
          for (int i = 0; i < 8; ++i) acc[r][c] = fmaf(xv[i], wv[c][i], acc[r][c]);
      }}
    }}
    #pragma unroll
    for (int r = 0; r < {rows}; ++r) {{
      const i64 m = m0 + r;
      if (m >= M) break;
      #pragma unroll
      for (int c = 0; c < {cols}; ++c) {{
        const float total = warp_sum(acc[r][c]);
        const i64 n = n0 + c;
        if (lane == 0 && n < {N}) {{
          const float v = total{add_bias};
          {store}
        }}
      }}
    }}
  }}
}}
"""
    return src, name


def embed(C: int, wdtype) -> tuple[str, str]:
    """``x[m] = wte[token(m)] + wpe[pos(m)]``; token(m) = row_tok[m], or the slot's last
    sampled token (``last_token[row_slot[m]]``) where row_tok[m] < 0. Grid (M,), block 256."""
    W = ctype(wdtype)
    name = "embed_rows"
    src = PRELUDE + f"""
extern "C" __global__ void {name}(const {W}* __restrict__ wte, const float* __restrict__ wpe,
    const int* __restrict__ row_tok, const int* __restrict__ row_slot, const int* __restrict__ row_pos,
    const int* __restrict__ last_token, float* __restrict__ x) {{
  {PDL_WAIT}
  const i64 m = blockIdx.x;
  const int t = row_tok[m];
  const i64 tok = t >= 0 ? t : last_token[row_slot[m]];
  const i64 pos = row_pos[m];
  for (int c = threadIdx.x; c < {C}; c += blockDim.x)
    x[m * {C} + c] = ld(wte, tok * {C} + c) + wpe[pos * {C} + c];
}}
"""
    return src, name


def attention_splits(capacity: int) -> int:
    return (capacity + CHUNK - 1) // CHUNK


def decode_attention(heads: int, D: int, capacity: int, cache_dtype) -> tuple[str, str]:
    """Row m's query (``q[m, h*D:(h+1)*D]``) against cache rows ``0..row_pos[m]`` of its slot.

    Grid (M, H, splits), block CHUNK. A split covers CHUNK positions; a row uses
    ``pos // CHUNK + 1`` splits (one: the result is written directly). Partials (unnormalised
    output, max, sum) go to ``part_o`` / ``part_ml``; the block that finishes last (per-(row,
    head) counter, reset by it) merges them in split order into ``out`` [M, C]."""
    C, CT = heads * D, ctype(cache_dtype)
    splits = attention_splits(capacity)
    if D % 32:
        raise ValueError(f"decode attention needs head_dim % 32 == 0, got {D}")
    NW = CHUNK // 32
    scale = float(np.float32(1.0 / math.sqrt(D)))
    name = "decode_attention"
    src = PRELUDE + _LOAD8 + f"""
__device__ __forceinline__ float block_reduce(float v, float* s_red, bool is_max) {{
  v = is_max ? warp_max(v) : warp_sum(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) s_red[warp] = v;
  __syncthreads();
  float r = s_red[0];
  for (int i = 1; i < {CHUNK // 32}; ++i) r = is_max ? fmaxf(r, s_red[i]) : r + s_red[i];
  return r;
}}
extern "C" __global__ void __launch_bounds__({CHUNK}) {name}(const float* __restrict__ q,
    const {CT}* __restrict__ k_cache, const {CT}* __restrict__ v_cache, const int* __restrict__ row_slot,
    const int* __restrict__ row_pos, float* __restrict__ part_o, float* __restrict__ part_ml,
    int* __restrict__ counters, float* __restrict__ out) {{
  {PDL_WAIT}
  const i64 m = blockIdx.x;
  const int h = blockIdx.y, sp = blockIdx.z, t = threadIdx.x;
  const int pos = row_pos[m];
  const int used = pos / {CHUNK} + 1;
  if (sp >= used) return;
  __shared__ float s_q[{D}], s_p[{CHUNK}], s_o[{NW}][{D}], s_red[{CHUNK // 32}];
  __shared__ int s_last;
  for (int d = t; d < {D}; d += {CHUNK}) s_q[d] = q[m * {C} + h * {D} + d];
  __syncthreads();
  const i64 base = ((i64)row_slot[m] * {heads} + h) * {capacity};
  const int j = sp * {CHUNK} + t;
  float s = -__int_as_float(0x7f800000);
  if (j <= pos) {{
    const {CT}* kr = k_cache + (base + j) * {D};
    float a = 0.f;
    #pragma unroll
    for (int d0 = 0; d0 < {D}; d0 += 8) {{
      float kv[8];
      load8(kr + d0, kv);
      #pragma unroll
      for (int i = 0; i < 8; ++i) a = fmaf(s_q[d0 + i], kv[i], a);
    }}
    s = a * {scale!r}f;
  }}
  const float mx = block_reduce(s, s_red, true);
  const float p = j <= pos ? expf(s - mx) : 0.f;
  s_p[t] = p;
  const float l = block_reduce(p, s_red, false);
  const int n_here = min({CHUNK}, pos + 1 - sp * {CHUNK});
  {{  // warp w takes keys w, w + NW, ...; lane takes dims lane, lane + 32, ...
    const int warp = t >> 5, lane = t & 31;
    float o[{D // 32}];
    #pragma unroll
    for (int i = 0; i < {D // 32}; ++i) o[i] = 0.f;
    #pragma unroll 4
    for (int jj = warp; jj < n_here; jj += {NW}) {{
      const float pj = s_p[jj];
      const {CT}* vr = v_cache + (base + sp * {CHUNK} + jj) * {D};
      #pragma unroll
      for (int i = 0; i < {D // 32}; ++i) o[i] = fmaf(pj, ld(vr, lane + 32 * i), o[i]);
    }}
    #pragma unroll
    for (int i = 0; i < {D // 32}; ++i) s_o[warp][lane + 32 * i] = o[i];
  }}
  __syncthreads();
  const i64 ph = m * {heads} + h;
  if (used == 1) {{
    for (int d = t; d < {D}; d += {CHUNK}) {{
      float o = 0.f;
      for (int g = 0; g < {NW}; ++g) o += s_o[g][d];
      out[m * {C} + h * {D} + d] = o / l;
    }}
    return;
  }}
  for (int d = t; d < {D}; d += {CHUNK}) {{
    float o = 0.f;
    for (int g = 0; g < {NW}; ++g) o += s_o[g][d];
    part_o[(ph * {splits} + sp) * {D} + d] = o;
  }}
  if (t == 0) {{ part_ml[(ph * {splits} + sp) * 2] = mx; part_ml[(ph * {splits} + sp) * 2 + 1] = l; }}
  __threadfence();
  __syncthreads();
  if (t == 0) {{
    const int done = atomicAdd(counters + ph, 1);
    s_last = done == used - 1;
    if (s_last) counters[ph] = 0;
  }}
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  float gm = -__int_as_float(0x7f800000);
  for (int i = 0; i < used; ++i) gm = fmaxf(gm, __ldcg(part_ml + (ph * {splits} + i) * 2));
  float L = 0.f;
  for (int i = 0; i < used; ++i)
    L += __ldcg(part_ml + (ph * {splits} + i) * 2 + 1) * expf(__ldcg(part_ml + (ph * {splits} + i) * 2) - gm);
  for (int d = t; d < {D}; d += {CHUNK}) {{
    float o = 0.f;
    for (int i = 0; i < used; ++i)
      o += __ldcg(part_o + (ph * {splits} + i) * {D} + d) * expf(__ldcg(part_ml + (ph * {splits} + i) * 2) - gm);
    out[m * {C} + h * {D} + d] = o / L;
  }}
}}
"""
    return src, name


def sample(V: int) -> tuple[str, str]:
    """One token per sampled row s of ``logits`` [S, V]; grid (S,), block SAMPLE_THREADS.

    Per-row settings (int32 / float32 arrays of length S): ``temp`` (0 = greedy: the first
    maximum), ``top_k`` (0 = off), ``top_p`` (1 = off), ``seed`` (two uint32 per row: lo, hi)
    and ``counter`` (the sequence's token index). Writes ``out_tok[s]`` and
    ``last_token[slot[s]]``. Semantics of ``runtime/sampling.py``: temperature, then the k
    largest, then the smallest most-likely set whose mass reaches p, then inversion of the
    cumulative distribution (in vocabulary order) at one uniform draw."""
    T = SAMPLE_THREADS
    per = (V + T - 1) // T
    name = "sample_rows"
    src = PRELUDE + f"""
__device__ __forceinline__ unsigned okey(float f) {{
  const unsigned u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}}
__device__ __forceinline__ unsigned long long splitmix(unsigned long long z) {{
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}}
__device__ float bsum(float v, float* s_red) {{
  v = warp_sum(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) s_red[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = 0.f;
  for (int i = 0; i < {T // 32}; ++i) r += s_red[i];
  return r;
}}
extern "C" __global__ void __launch_bounds__({T}) {name}(const float* __restrict__ logits,
    const float* __restrict__ temp, const int* __restrict__ top_k, const float* __restrict__ top_p,
    const unsigned* __restrict__ seed, const int* __restrict__ counter, const int* __restrict__ slot,
    int* __restrict__ out_tok, int* __restrict__ last_token) {{
  {PDL_WAIT}
  const i64 s = blockIdx.x;
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const float* z = logits + s * {V}LL;
  __shared__ float s_red[{T // 32}], s_best[{T // 32}], s_prefix[{T}];
  __shared__ int s_bidx[{T // 32}], s_tok;
  // argmax, first index on ties (also the fallback of the draw)
  float best = -__int_as_float(0x7f800000);
  int bi = 0x7fffffff;
  for (int i = t; i < {V}; i += {T}) if (z[i] > best) {{ best = z[i]; bi = i; }}
  for (int o = 16; o > 0; o >>= 1) {{
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ob > best || (ob == best && oi < bi)) {{ best = ob; bi = oi; }}
  }}
  if (lane == 0) {{ s_best[warp] = best; s_bidx[warp] = bi; }}
  __syncthreads();
  if (t == 0) {{
    float b = s_best[0]; int i0 = s_bidx[0];
    for (int w = 1; w < {T // 32}; ++w)
      if (s_best[w] > b || (s_best[w] == b && s_bidx[w] < i0)) {{ b = s_best[w]; i0 = s_bidx[w]; }}
    s_tok = i0;
  }}
  __syncthreads();
  const float tau = temp[s];
  if (tau > 0.f) {{
    const float inv = 1.0f / tau, zmax = z[s_tok] * inv;
    // top-k: the largest key T with count(key >= T) >= k
    unsigned lo = 0u;
    const int k = top_k[s];
    if (k > 0 && k < {V}) {{
      for (int bit = 31; bit >= 0; --bit) {{
        const unsigned cand = lo | (1u << bit);
        float c = 0.f;
        for (int i = t; i < {V}; i += {T}) c += okey(z[i] * inv) >= cand ? 1.f : 0.f;
        if (bsum(c, s_red) >= (float)k) lo = cand;
      }}
    }}
    // top-p: the largest key T with mass(key >= T, kept by top-k) >= p * mass(kept)
    const float p = top_p[s];
    if (p < 1.f) {{
      float e = 0.f;
      for (int i = t; i < {V}; i += {T}) {{ const float zi = z[i] * inv; if (okey(zi) >= lo) e += expf(zi - zmax); }}
      const float need = p * bsum(e, s_red);
      unsigned lp = 0u;
      for (int bit = 31; bit >= 0; --bit) {{
        const unsigned cand = lp | (1u << bit);
        float c = 0.f;
        for (int i = t; i < {V}; i += {T}) {{
          const float zi = z[i] * inv;
          const unsigned ki = okey(zi);
          if (ki >= cand && ki >= lo) c += expf(zi - zmax);
        }}
        if (bsum(c, s_red) >= need) lp = cand;
      }}
      lo = max(lo, lp);
    }}
    // inverse CDF in vocabulary order: thread t owns [t*per, (t+1)*per)
    float mine = 0.f;
    for (int i = t * {per}; i < min({V}, (t + 1) * {per}); ++i) {{
      const float zi = z[i] * inv;
      if (okey(zi) >= lo) mine += expf(zi - zmax);
    }}
    s_prefix[t] = mine;
    __syncthreads();
    if (t == 0) {{ float run = 0.f; for (int i = 0; i < {T}; ++i) {{ const float v = s_prefix[i]; s_prefix[i] = run; run += v; }}
                  s_red[0] = run; }}
    __syncthreads();
    const float total = s_red[0];
    const unsigned long long key = ((unsigned long long)seed[2 * s + 1] << 32) | seed[2 * s];
    const unsigned long long r = splitmix(key ^ splitmix((unsigned long long)(unsigned)counter[s]));
    const float target = (float)((double)(r >> 11) * (1.0 / 9007199254740992.0)) * total;
    __syncthreads();
    const float start = s_prefix[t];
    if (start <= target && target < start + mine) {{
      float run = start;
      for (int i = t * {per}; i < min({V}, (t + 1) * {per}); ++i) {{
        const float zi = z[i] * inv;
        if (okey(zi) < lo) continue;
        const float pi = expf(zi - zmax);
        if (pi > 0.f && target < run + pi) {{ s_tok = i; break; }}
        run += pi;
      }}
    }}
    __syncthreads();
  }}
  if (t == 0) {{ out_tok[s] = s_tok; last_token[slot[s]] = s_tok; }}
}}
"""
    return src, name
