"""GPT-2 124M training step on one GPU: graphc's CUDA backend vs PyTorch eager and torch.compile.

One process, one device call: every row times graphc (the whole step replayed as one CUDA
graph) and a nanoGPT-style PyTorch model (F.scaled_dot_product_attention, fused AdamW,
bf16 autocast; TF32 off for fp32) on the same random-init weights and data shapes, with
CUDA events after warm-up, and prints ms/step, tokens/s, the ratio and peak GPU memory.

    python bench/gpu_train.py [--rows bf16:16:1024,bf16:4:64,fp32:16:1024] [--steps 20]
        [--no-compile] [--profile]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np


def torch_model(cfg, precision):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self, C, H):
            super().__init__()
            self.H = H
            self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.fc, self.fc_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, self.H, C // self.H).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
            x = x + self.proj(y)
            return x + self.fc_proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            C = cfg.n_embd
            self.wte = nn.Embedding(cfg.padded_vocab_size, C)
            self.wpe = nn.Embedding(cfg.max_seq_len, C)
            self.blocks = nn.ModuleList(Block(C, cfg.n_head) for _ in range(cfg.n_layer))
            self.lnf = nn.LayerNorm(C)

        def forward(self, idx, targets):
            T = idx.shape[1]
            x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
            for b in self.blocks:
                x = b(x)
            logits = self.lnf(x) @ self.wte.weight.T
            return F.cross_entropy(logits[..., :cfg.vocab_size].float().flatten(0, 1), targets.flatten())

    return GPT().cuda()


def time_torch(cfg, precision, B, T, steps, compile_):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = torch_model(cfg, precision)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    fwd = torch.compile(model) if compile_ else model
    x = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    y = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(steps):
        start.record()
        step()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    peak = torch.cuda.max_memory_allocated()
    del model, opt, fwd
    torch.cuda.empty_cache()
    return float(np.median(times)), peak


def time_graphc(cfg, precision, B, T, steps, profile=False):
    from graphc.backends import get_backend
    from graphc.models.init import random_init
    from graphc.runtime.cuda.driver import EventTimer
    from graphc.runtime.optimizer import AdamWConfig
    from graphc.runtime.programs import TrainSpec

    backend = get_backend("cuda")()
    free0, _ = backend.rt.mem_info()
    t0 = time.perf_counter()
    params = backend.upload_params(random_init(cfg, seed=0))
    step = backend.train_step(params, TrainSpec(B, T, precision=precision, adamw=AdamWConfig(lr=1e-4)))
    first = time.perf_counter() - t0
    free1, _ = backend.rt.mem_info()
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (B, T))
    y = rng.integers(0, cfg.vocab_size, (B, T))
    for t in range(1, 4):
        r = step.run(x, y, t=t, lr=1e-4)
    timer = EventTimer(backend.rt)
    times = []
    for t in range(4, 4 + steps):
        timer.begin()
        r = step.run(x, y, t=t, lr=1e-4)
        times.append(timer.end_ms())
    assert math.isfinite(r.loss), r.loss
    prof = step.profile() if profile else None
    out = float(np.median(times)), free0 - free1, first, r.loss, prof
    del step, params
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="bf16:16:1024,bf16:4:64,fp32:16:1024")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-rows", default="bf16:16:1024")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)
    from graphc.models.config import named_config

    cfg = named_config("d12")
    table = []
    for row in args.rows.split(","):
        precision, B, T = row.split(":")
        B, T = int(B), int(T)
        g_ms, g_mem, first, loss, prof = time_graphc(cfg, precision, B, T, args.steps, args.profile)
        print(f"graphc {row}: {g_ms:.2f} ms/step, {B * T / g_ms * 1e3:,.0f} tok/s, mem {g_mem / 2**30:.1f} GiB, "
              f"first step after {first:.1f} s, loss {loss:.4f}", flush=True)
        if prof:
            total = sum(ms for _, ms in prof)
            print(f"  eager per-node profile (sum {total:.2f} ms):")
            for node, ms in prof[:25]:
                print(f"    {ms:8.3f} ms  {node}")
        e_ms = e_mem = c_ms = c_mem = float("nan")
        if not args.no_torch:
            e_ms, e_mem = time_torch(cfg, precision, B, T, args.steps, False)
            print(f"torch eager {row}: {e_ms:.2f} ms", flush=True)
            if not args.no_compile and row in args.compile_rows.split(","):
                c_ms, c_mem = time_torch(cfg, precision, B, T, args.steps, True)
                print(f"torch.compile {row}: {c_ms:.2f} ms", flush=True)
        table.append((row, g_ms, e_ms, c_ms, g_mem, e_mem, c_mem, B * T))
    print("\n| work | graphc ms | tok/s | PyTorch eager ms | torch.compile ms | vs eager | vs compile "
          "| peak GiB graphc / eager / compile |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for row, g, e, c, gm, em, cm, tok in table:
        print(f"| train {row} | {g:.2f} | {tok / g * 1e3:,.0f} | {e:.2f} | {c:.2f} | {e / g:.2f}x | {c / g:.2f}x "
              f"| {gm / 2**30:.1f} / {em / 2**30:.1f} / {cm / 2**30:.1f} |")


if __name__ == "__main__":
    main()
