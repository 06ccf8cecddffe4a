"""GPU decode benchmark (one device call): graphc's CudaDecoder vs gpt-fast-style PyTorch.

GPT-2 124M (random init: speed does not depend on the weights), bf16, greedy, a 16-token
prompt then 256 decode steps; a cache of 1024 positions per sequence (the anchor's) and a
right-sized one (16 + 256); batch 1 / 16 / 64; plus the prefill of 1023 tokens (a 1024-position
cache: one position stays free for the first new token). Figures are
ms per decode step (one token for every sequence), CUDA events after warm-up:

* graphc ``step()``: the seam's call (metadata in, one graph replay, ids out, host sync);
* graphc ``replay``: back-to-back replays of the captured step graph (device time);
* PyTorch gpt-fast style (static cache updated with ``index_copy_``, SDPA over the masked
  cache, argmax on the device): eager, the step in a CUDA graph, and with ``--compile``
  torch.compile(max-autotune-no-cudagraphs) + CUDA graph (40-60 s of warm-up per shape);
* Hugging Face ``generate`` when transformers is importable.

``python bench/gpu_decode.py [--batches 1,16,64] [--compile] [--steps 256]``
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np


def graphc_rows(batch: int, capacity: int, steps: int, params):
    from graphc.backends import get_backend
    from graphc.runtime.cuda.driver import EventTimer
    from graphc.runtime.decode import DecodeSpec
    from graphc.runtime.sampling import Sampler

    be = get_backend("cuda")()
    dev = params if getattr(params.flat, "device", "") == "cuda:0" else be.upload_params(params)
    dec = be.decoder(dev, DecodeSpec(batch, capacity, "bf16"))
    rng = np.random.default_rng(0)
    for _ in range(batch):
        dec.add([int(t) for t in rng.integers(0, 50257, 16)], Sampler(0.0))
    for _ in range(3):
        dec.step()
    timer = EventTimer(be.rt)
    t0 = time.perf_counter()
    for _ in range(steps - 3):
        dec.step()
    step_ms = (time.perf_counter() - t0) * 1e3 / (steps - 3)
    graph = dec._graphs[batch]
    timer.begin()
    for _ in range(100):
        graph.replay()
    replay_ms = timer.end_ms() / 100
    return step_ms, replay_ms, dec, be


def graphc_profile(dec, be, batch: int):
    """Device ms per kernel kind of one step (eager launches between events)."""
    from graphc.runtime.cuda.driver import EventTimer

    timer = EventTimer(be.rt)
    totals: dict[str, float] = {}
    for _ in range(3):
        for step in dec._kernel_steps(batch, batch):
            timer.begin()
            step.record(be.rt.stream)
            totals[step.node] = totals.get(step.node, 0.0) + timer.end_ms() / 3
    return totals


def graphc_prefill(params, n: int = 1023):
    from graphc.backends import get_backend
    from graphc.runtime.decode import DecodeSpec
    from graphc.runtime.sampling import Sampler

    be = get_backend("cuda")()
    dev = be.upload_params(params)
    dec = be.decoder(dev, DecodeSpec(1, n + 1, "bf16"))
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, 50257, n)]
    slot, _ = dec.add(prompt, Sampler(0.0))
    dec.remove(slot)
    be.rt.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        slot, _ = dec.add(prompt, Sampler(0.0))
        dec.remove(slot)
    return (time.perf_counter() - t0) * 1e3 / 3


# ----------------------------------------------------------------------------- PyTorch
def torch_model(cap: int, batch: int):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    C, H, L, V, D = 768, 12, 12, 50257, 64

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.fc, self.fcp = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
            self.register_buffer("k", torch.zeros(batch, H, cap, D))
            self.register_buffer("v", torch.zeros(batch, H, cap, D))

        def forward(self, x, pos, mask):
            B = x.shape[0]
            q, k, v = self.qkv(self.ln1(x)).view(B, 1, 3, H, D).permute(2, 0, 3, 1, 4)
            self.k.index_copy_(2, pos, k)
            self.v.index_copy_(2, pos, v)
            y = F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=mask)
            x = x + self.proj(y.transpose(1, 2).reshape(B, 1, C))
            return x + self.fcp(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(1024, C)
            self.blocks = nn.ModuleList(Block() for _ in range(L))
            self.lnf = nn.LayerNorm(C)

        def forward(self, tok, pos):
            mask = torch.arange(cap, device=tok.device)[None, None, None, :] <= pos
            x = self.wte(tok) + self.wpe(pos)[None]
            for b in self.blocks:
                x = b(x, pos, mask)
            return torch.argmax(self.lnf(x) @ self.wte.weight.T, dim=-1)

    return GPT().cuda().to(torch.bfloat16).eval()


def torch_rows(batch: int, steps: int, compile_: bool):
    import torch

    cap = 1024
    model = torch_model(cap, batch)
    tok = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    pos = torch.tensor([16], device="cuda")
    out = {}

    def step():
        with torch.no_grad():
            tok.copy_(model(tok, pos))
            pos.add_(1)

    def timed(fn):
        for _ in range(5):
            fn()
        pos.fill_(16)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        s.record()
        for _ in range(steps):
            fn()
        e.record()
        torch.cuda.synchronize()
        pos.fill_(16)
        return s.elapsed_time(e) / steps

    out["eager"] = timed(step)

    def graphed(fn):
        st = torch.cuda.Stream()
        st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(st)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay

    out["graph"] = timed(graphed(step))
    if compile_:
        model.forward = torch.compile(model.forward, mode="max-autotune-no-cudagraphs")
        out["compile+graph"] = timed(graphed(step))
    return out


def hf_rows(batch: int, steps: int):
    try:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    model = GPT2LMHeadModel(GPT2Config()).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, 50257, (batch, 16), device="cuda")
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--graphc-only", action="store_true", help="skip PyTorch and HF (their figures: earlier runs)")
    args = ap.parse_args(argv)
    from graphc.models.config import named_config
    from graphc.models.init import random_init

    params = random_init(named_config("d12"), seed=0)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        step_ms, replay_ms, dec, be = graphc_rows(batch, 1024, args.steps, params)
        if args.profile:
            prof = graphc_profile(dec, be, batch)
            print(f"profile batch {batch} (eager launches, ms): " +
                  ", ".join(f"{k} {v:.4f}" for k, v in sorted(prof.items(), key=lambda kv: -kv[1])), flush=True)
        del dec
        step_rs, replay_rs, dec, be = graphc_rows(batch, 16 + args.steps, args.steps, params)
        del dec
        t = {} if args.graphc_only else torch_rows(batch, args.steps, args.compile)
        hf = hf_rows(batch, args.steps) if batch <= 16 and not args.graphc_only else None
        rows.append((batch, step_ms, replay_ms, step_rs, replay_rs, t, hf))
        print(f"batch {batch}: graphc step {step_ms:.3f} replay {replay_ms:.3f} | right-sized step {step_rs:.3f} "
              f"replay {replay_rs:.3f} | torch {t} | hf {hf}", flush=True)
    pre = graphc_prefill(params)
    print()
    print("| decode, ms/step | graphc step() cache 1024 | graphc graph replay | graphc step() cache 272 "
          "| PyTorch eager | PyTorch + CUDA graph | + torch.compile | HF generate |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
    for batch, s, r, srs, rrs, t, hf in rows:
        print(f"| batch {batch} | {s:.3f} | {r:.3f} | {srs:.3f} | {fmt(t.get('eager'))} | {fmt(t.get('graph'))} "
              f"| {fmt(t.get('compile+graph'))} | {fmt(hf)} |")
    print(f"\nprefill of 1023 tokens into a 1024-position cache (graphc, bf16): {pre:.2f} ms")


if __name__ == "__main__":
    main()
