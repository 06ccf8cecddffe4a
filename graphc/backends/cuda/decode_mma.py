"""Tensor-core row GEMM for the bf16 decode program: ``mma.sync`` tiles with a fixed K order.

Same contract as :func:`decode_kernels.gemv` (arguments, layer-norm prologue, epilogues),
but the products run on the tensor cores (``mma.sync.m16n8k16`` bf16 x bf16 -> fp32), so a
batch of 16 or 64 rows costs about what one row does instead of 16x / 64x the CUDA-core FMAs.

**Batch invariance.** A row's result depends only on the model's shapes:

* rows are taken 16 at a time (rows past ``M`` are zeros); an ``mma`` computes each output
  from its own row of A and column of B, so the other rows of the tile never enter it;
* the K split is fixed by K alone: warp ``w`` of a block owns the K chunks
  ``[w*CPW, (w+1)*CPW)`` of 32, walks them in order (two ``mma`` per chunk), and the block adds
  the warps' partials in warp order (no atomics, no split-K heuristic, no dependence on M);
* the columns per block (``8*NT``) depend on N only; the row tiles a block walks (grid.y)
  change with M, but a tile's arithmetic does not.

The activation row (after the layer norm) is rounded to bf16 for the ``mma`` -- the usual
bf16 mixed-precision contract (the weights are bf16 already); accumulation stays fp32.

**K permutation.** Any bijection between physical and logical K inside a chunk leaves the dot
product unchanged, so each thread loads 8 contiguous weights (16 bytes) of its column per
chunk and feeds them as the fragment elements ``{2t, 2t+1, 2t+8, 2t+9}`` of two k16 steps;
the activations use the same mapping. A quad of lanes reads 64 contiguous bytes of a weight
row: full sectors, no shared-memory staging, the warp's weights stay in registers for all row
tiles (each weight is read from DRAM once per step).
"""

from __future__ import annotations

import numpy as np

from graphc.backends.cuda.decode_kernels import _LOAD8, EPILOGUES, PDL_WAIT, epilogue_code
from graphc.backends.cuda.kernels import PRELUDE, ctype

KCHUNK = 32           # K per chunk: two m16n8k16 steps
TILE_M = 16           # rows per mma tile
MAX_WARPS = 8
TILES_PER_BLOCK = 4   # row tiles a block walks before another block (grid.y) takes over


def mma_warps(K: int) -> int:
    """Warps per block = the K split: the largest of 8, 4, 2, 1 dividing K's chunk count."""
    if K % KCHUNK:
        raise ValueError(f"the tensor-core GEMM needs K % {KCHUNK} == 0, got K={K}")
    chunks = K // KCHUNK
    return next(w for w in (8, 4, 2, 1) if chunks % w == 0)


def mma_tiles_n(N: int) -> int:
    """n8 tiles per warp (columns per block / 8): four for the LM head, two for the wide
    layer outputs (fewer blocks re-reading the same activation rows and recomputing their
    layer-norm statistics), one for the narrow projections (more blocks in flight)."""
    return 4 if N >= 8192 else 2 if N >= 2304 else 1


def mma_shape(K: int, N: int, M: int) -> tuple[tuple, tuple]:
    """(grid, block) for ``M`` rows; only grid.y (row tiles split across blocks) depends on M."""
    tiles = (M + TILE_M - 1) // TILE_M
    cols = 8 * mma_tiles_n(N)
    return ((N + cols - 1) // cols, max(1, (tiles + TILES_PER_BLOCK - 1) // TILES_PER_BLOCK)), (32 * mma_warps(K),)


def mma_gemm(K: int, N: int, *, ln: bool, epilogue: str, eps: float = 1e-5, heads: int = 0,
             capacity: int = 0, cache_dtype=np.float32) -> tuple[str, str]:
    """``out[m, n] (+)= epi(sum_k bf16(LN?(x[row(m)]))[k] * W[n, k] + bias[n])``; W bf16 [N, K].

    Arguments as :func:`decode_kernels.gemv`: x, rowmap, ln_w, ln_b, W, bias, out, M,
    row_slot, row_pos, k_cache, v_cache. Launch with :func:`mma_shape`."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"unknown epilogue {epilogue!r}")
    NW, NT = mma_warps(K), mma_tiles_n(N)
    CPW = K // KCHUNK // NW
    COLS = 8 * NT
    CT = ctype(cache_dtype)
    store, add_bias = epilogue_code(epilogue, N, heads, capacity, CT)
    name = f"mma_{epilogue}{'_ln' if ln else ''}"
    epsf = float(np.float32(eps))
    src = PRELUDE + _LOAD8 + f"""
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {{
  return (unsigned)f2bf(lo) | ((unsigned)f2bf(hi) << 16);
}}
__device__ __forceinline__ void mma16816(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                         unsigned b0, unsigned b1) {{
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
               "{{%0,%1,%2,%3}}, {{%4,%5,%6,%7}}, {{%8,%9}}, {{%0,%1,%2,%3}};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}}
extern "C" __global__ void __launch_bounds__({32 * NW}) {name}(
    const float* __restrict__ x, const int* __restrict__ rowmap, const float* __restrict__ ln_w,
    const float* __restrict__ ln_b, const bf16* __restrict__ w, const float* __restrict__ bias,
    float* __restrict__ out, i64 M, const int* __restrict__ row_slot, const int* __restrict__ row_pos,
    {CT}* __restrict__ k_cache, {CT}* __restrict__ v_cache) {{
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const i64 n0 = (i64)blockIdx.x * {COLS};
  __shared__ int s_row[{TILE_M}];
  __shared__ float s_mean[{TILE_M}], s_rstd[{TILE_M}];
  __shared__ float s_part[{NW}][{TILE_M}][{COLS}];
  // this warp's weights for all its K chunks, loaded once, kept for every row tile
  uint4 wr[{NT}][{CPW}];
  #pragma unroll
  for (int nt = 0; nt < {NT}; ++nt) {{
    const i64 n = n0 + nt * 8 + g;
    #pragma unroll
    for (int c = 0; c < {CPW}; ++c) {{
      const int k = (warp * {CPW} + c) * {KCHUNK} + t * 8;
      wr[nt][c] = n < {N} ? *reinterpret_cast<const uint4*>(w + n * {K}LL + k) : make_uint4(0u, 0u, 0u, 0u);
    }}
  }}
  {PDL_WAIT}   // the weights above are in flight while the previous kernel finishes
  const i64 tiles = (M + {TILE_M - 1}) / {TILE_M};
  for (i64 tile = blockIdx.y; tile < tiles; tile += gridDim.y) {{
    const i64 m0 = tile * {TILE_M};
    __syncthreads();
    if (threadIdx.x < {TILE_M}) {{
      const i64 m = m0 + threadIdx.x;
      s_row[threadIdx.x] = m < M ? (rowmap ? rowmap[m] : (int)m) : -1;
    }}
    __syncthreads();
    if ({int(ln)}) {{
      for (int r = warp; r < {TILE_M}; r += {NW}) {{
        const int row = s_row[r];
        if (row < 0) continue;
        const float* xr = x + (i64)row * {K};
        float xv[{K // 32}];   // the row read once, both passes from registers
        float s = 0.f;
        #pragma unroll
        for (int i = 0; i < {K // 32}; ++i) {{ xv[i] = xr[lane + 32 * i]; s += xv[i]; }}
        const float mean = warp_sum(s) / {K}.f;
        float q = 0.f;
        #pragma unroll
        for (int i = 0; i < {K // 32}; ++i) {{ const float d = xv[i] - mean; q += d * d; }}
        const float var = warp_sum(q) / {K}.f;
        if (lane == 0) {{ s_mean[r] = mean; s_rstd[r] = 1.0f / sqrtf(var + {epsf!r}f); }}
      }}
      __syncthreads();
    }}
    const int ra = s_row[g], rb = s_row[g + 8];
    float acc[{NT}][4];
    #pragma unroll
    for (int nt = 0; nt < {NT}; ++nt)
      #pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
    #pragma unroll
    for (int c = 0; c < {CPW}; ++c) {{
      const int k = (warp * {CPW} + c) * {KCHUNK} + t * 8;
      float xa[8], xb[8];
      if (ra >= 0) load8(x + (i64)ra * {K} + k, xa); else {{
        #pragma unroll
        for (int i = 0; i < 8; ++i) xa[i] = 0.f;
      }}
      if (rb >= 0) load8(x + (i64)rb * {K} + k, xb); else {{
        #pragma unroll
        for (int i = 0; i < 8; ++i) xb[i] = 0.f;
      }}
      if ({int(ln)}) {{
        float gw[8], gb[8];
        load8(ln_w + k, gw); load8(ln_b + k, gb);
        if (ra >= 0) {{
          const float mu = s_mean[g], rs = s_rstd[g];
          #pragma unroll
          for (int i = 0; i < 8; ++i) xa[i] = (xa[i] - mu) * rs * gw[i] + gb[i];
        }}
        if (rb >= 0) {{
          const float mu = s_mean[g + 8], rs = s_rstd[g + 8];
          #pragma unroll
          for (int i = 0; i < 8; ++i) xb[i] = (xb[i] - mu) * rs * gw[i] + gb[i];
        }}
      }}
      #pragma unroll
      for (int j = 0; j < 2; ++j) {{
        const unsigned a0 = pack_bf16(xa[4 * j], xa[4 * j + 1]), a1 = pack_bf16(xb[4 * j], xb[4 * j + 1]);
        const unsigned a2 = pack_bf16(xa[4 * j + 2], xa[4 * j + 3]), a3 = pack_bf16(xb[4 * j + 2], xb[4 * j + 3]);
        #pragma unroll
        for (int nt = 0; nt < {NT}; ++nt) {{
          const unsigned b0 = j == 0 ? wr[nt][c].x : wr[nt][c].z, b1 = j == 0 ? wr[nt][c].y : wr[nt][c].w;
          mma16816(acc[nt], a0, a1, a2, a3, b0, b1);
        }}
      }}
    }}
    #pragma unroll
    for (int nt = 0; nt < {NT}; ++nt) {{
      s_part[warp][g][nt * 8 + 2 * t] = acc[nt][0];
      s_part[warp][g][nt * 8 + 2 * t + 1] = acc[nt][1];
      s_part[warp][g + 8][nt * 8 + 2 * t] = acc[nt][2];
      s_part[warp][g + 8][nt * 8 + 2 * t + 1] = acc[nt][3];
    }}
    __syncthreads();
    for (int i = threadIdx.x; i < {TILE_M * COLS}; i += {32 * NW}) {{
      const int r = i / {COLS}, cc = i % {COLS};
      const i64 m = m0 + r, n = n0 + cc;
      if (m >= M || n >= {N}) continue;
      float total = 0.f;
      #pragma unroll
      for (int q = 0; q < {NW}; ++q) total += s_part[q][r][cc];
      const float v = total{add_bias};
      {store}
    }}
  }}
}}
"""
    return src, name
