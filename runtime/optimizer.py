"""AdamW over flat float32 buffers, as llm.c's ``gpt2_update`` computes it.

For every parameter element (t is the 1-based step)::

    m = beta1 m + (1 - beta1) g
    v = beta2 v + (1 - beta2) g^2
    p -= lr * ( (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + wd * p )

Weight decay is decoupled and, like llm.c's CPU trainer, applies to every parameter;
``decay_mask`` restricts it (PyTorch/nanoGPT's convention decays only 2-D weights).
Optional global-norm gradient clipping scales g by clip / ||g|| when ||g|| > clip.

The update is vectorised numpy, applied in cache-sized chunks with preallocated scratch
so that the ~10 elementwise passes over 124M parameters stay in L2 instead of streaming
the whole model through memory ten times; the chunks are shared among one worker thread
per core (numpy releases the GIL inside ufuncs). Optimizer state is always float32.

``shard=(start, stop)`` restricts the optimizer to that range of the flat buffers, with m
and v of just that size: the seam for ZeRO-1, where each data-parallel rank updates (and
stores the state of) its own slice and the slices are all-gathered afterwards.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

CHUNK = 1 << 16  # elements per chunk: 256 KiB per float32 array, a few arrays fit in L2


@dataclasses.dataclass
class AdamWConfig:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0


class AdamW:
    def __init__(self, n: int, config: AdamWConfig, decay_mask: np.ndarray | None = None,
                 shard: tuple[int, int] | None = None):
        self.config = config
        self.shard = shard if shard is not None else (0, n)
        start, stop = self.shard
        if not 0 <= start <= stop <= n:
            raise ValueError(f"shard {self.shard} outside the {n} parameters")
        self.m = np.zeros(stop - start, dtype=np.float32)
        self.v = np.zeros(stop - start, dtype=np.float32)
        # float32 {0,1} per element (of the shard), or None = decay everything
        self.decay_mask = decay_mask[start:stop] if decay_mask is not None else None
        self.workers = max(1, int(os.environ.get("GRAPHC_THREADS", "0")) or os.cpu_count() or 1)
        self._scratch = [(np.empty(CHUNK, np.float32), np.empty(CHUNK, np.float32)) for _ in range(self.workers)]
        self._pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    @staticmethod
    def grad_norm(grads: np.ndarray) -> float:
        """Global L2 norm, accumulated in float64 so it does not depend on chunking."""
        total = 0.0
        for i in range(0, grads.size, 1 << 22):
            g = grads[i:i + (1 << 22)]
            total += float(np.dot(g, g))
        return float(np.sqrt(total))

    def step(self, params: np.ndarray, grads: np.ndarray, t: int, lr: float, norm: float | None = None) -> float:
        """One update in place of the shard of ``params`` (flat, the whole model); returns the
        gradient norm (computed only when clipping).

        ``norm`` may be given when the gradients are sharded and the caller has reduced the
        norm over every rank."""
        c = self.config
        start, stop = self.shard
        params, grads = params[start:stop], grads[start:stop]
        if c.grad_clip > 0:
            norm = self.grad_norm(grads) if norm is None else norm
            if norm > c.grad_clip:
                grads *= np.float32(c.grad_clip / norm)
        else:
            norm = 0.0
        f32 = np.float32
        b1, b2 = f32(c.beta1), f32(c.beta2)
        consts = (b1, b2, f32(1.0) - b1, f32(1.0) - b2, f32(1.0) - b1 ** f32(t), f32(1.0) - b2 ** f32(t),
                  f32(lr), f32(c.eps), f32(c.weight_decay))
        # Contiguous ranges of whole chunks per worker: results do not depend on the count.
        n_chunks = -(-params.size // CHUNK)
        bounds = [n_chunks * w // self.workers * CHUNK for w in range(self.workers + 1)]
        jobs = [(params, grads, min(bounds[w], params.size), min(bounds[w + 1], params.size), self._scratch[w], consts)
                for w in range(self.workers)]
        if self._pool is None:
            self._update(*jobs[0])
        else:
            for future in [self._pool.submit(self._update, *job) for job in jobs]:
                future.result()
        return norm

    def _update(self, params, grads, start, stop, scratch, consts) -> None:
        b1, b2, one_m_b1, one_m_b2, bc1, bc2, lr32, eps, wd = consts
        for i in range(start, stop, CHUNK):
            j = min(i + CHUNK, stop)
            p, g, m, v = params[i:j], grads[i:j], self.m[i:j], self.v[i:j]
            s1, s2 = scratch[0][:j - i], scratch[1][:j - i]
            # m = b1 m + (1 - b1) g ; v = b2 v + (1 - b2) g^2
            m *= b1
            np.multiply(g, one_m_b1, out=s1)
            m += s1
            v *= b2
            np.multiply(g, g, out=s1)
            s1 *= one_m_b2
            v += s1
            # s1 = m_hat / (sqrt(v_hat) + eps)
            np.divide(v, bc2, out=s2)
            np.sqrt(s2, out=s2)
            s2 += eps
            np.divide(m, bc1, out=s1)
            s1 /= s2
            if wd != 0:
                np.multiply(p, wd, out=s2)
                if self.decay_mask is not None:
                    s2 *= self.decay_mask[i:j]
                s1 += s2
            s1 *= lr32
            p -= s1

    def state(self) -> dict[str, np.ndarray]:
        return {"m": self.m, "v": self.v}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if state["m"].shape != self.m.shape or state["v"].shape != self.v.shape:
            raise ValueError("optimizer state does not match the model's parameter count")
        self.m[...] = state["m"]
        self.v[...] = state["v"]
