"""Data-parallel training speed: graphc (CUDA backend + NCCL) and PyTorch DDP on 1 and 2 GPUs.

GPT-2 124M, random init, B16 T1024 bf16 per GPU (the global batch grows with the GPUs).
Every configuration runs as fresh worker processes started by graphc's own launcher
(``graphc.runtime.distributed.supervise``), so each has its GPUs to itself; rank 0 times
steps after warm-up (wall clock of ``run()``, which waits for the step, median of N) and
writes a JSON line. Scaling = 2-GPU tokens/s / 1-GPU tokens/s of the same framework.

    python bench/gpu_multi.py [--steps 20] [--configs graphc:1,graphc:2,...] [--B 16 --T 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DEFAULT = "graphc:1,graphc:2,graphc:2:zero1,graphc:2:no-overlap,ddp:1,ddp:2"


def worker_graphc(args, variant: str) -> dict:
    from graphc.backends import get_backend
    from graphc.models.config import named_config
    from graphc.models.init import random_init
    from graphc.runtime import distributed
    from graphc.runtime.cuda.driver import select_device
    from graphc.runtime.optimizer import AdamWConfig
    from graphc.runtime.programs import TrainSpec

    ranks = distributed.ranks_from_env()
    select_device(ranks.local_rank)
    cfg = named_config("d12")
    backend = get_backend("cuda")()
    parallel = None
    if ranks.world > 1:
        parallel = distributed.DataParallel(ranks, zero=1 if "zero1" in variant else 0,
                                            overlap="no-overlap" not in variant)
        parallel.connect(backend)
    params = backend.upload_params(random_init(cfg, seed=0))
    step = backend.train_step(params, TrainSpec(args.B, args.T, precision=args.precision,
                                                adamw=AdamWConfig(lr=1e-4), parallel=parallel))
    rng = np.random.default_rng(ranks.rank)
    x = rng.integers(0, cfg.vocab_size, (args.B, args.T))
    y = rng.integers(0, cfg.vocab_size, (args.B, args.T))
    return time_steps(lambda t: step.run(x, y, t=t, lr=1e-4).loss, args.steps)


def time_steps(step, steps: int) -> dict:
    for t in range(1, 4):
        loss = step(t)
    times = []
    for t in range(4, 4 + steps):
        t0 = time.perf_counter()
        loss = step(t)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": float(np.median(times)), "loss": float(loss)}


def worker_ddp(args, variant: str) -> dict:
    import torch
    import torch.distributed as dist
    from gpu_train import torch_model

    from graphc.models.config import named_config

    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    torch.cuda.set_device(local)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if world > 1:
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    cfg = named_config("d12")
    torch.manual_seed(0)
    model = torch_model(cfg, args.precision)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    g = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randint(0, cfg.vocab_size, (args.B, args.T), device="cuda", generator=g)
    y = torch.randint(0, cfg.vocab_size, (args.B, args.T), device="cuda", generator=g)

    def step(t):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return loss.item()

    out = time_steps(step, args.steps)
    if world > 1:
        dist.destroy_process_group()
    return out


def worker(args) -> None:
    kind, _, variant = args.worker.partition(":")
    result = (worker_graphc if kind == "graphc" else worker_ddp)(args, variant)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.result, "a") as f:
            f.write(json.dumps({"config": args.worker, **result}) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=DEFAULT, help="comma-separated kind:gpus[:variant]")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from graphc.runtime import distributed

    result = Path(os.environ.get("OUT", "/tmp")) / "gpu_multi.jsonl"
    result.unlink(missing_ok=True)
    rows = {}
    for config in args.configs.split(","):
        kind, gpus, *variant = config.split(":")
        tag = f"{kind}:{':'.join(variant)}"
        cmd = [sys.executable, __file__, "--worker", tag, "--result", str(result), "--steps", str(args.steps),
               "--B", str(args.B), "--T", str(args.T), "--precision", args.precision]
        t0 = time.perf_counter()
        code = distributed.supervise(cmd, int(gpus))
        lines = [json.loads(s) for s in result.read_text().splitlines()] if result.exists() else []
        if code != 0 or not lines or lines[-1].get("done"):
            print(f"{config}: failed (status {code})", flush=True)
            continue
        r = lines[-1]
        with open(result, "a") as f:
            f.write(json.dumps({"done": True}) + "\n")
        tok = int(gpus) * args.B * args.T / r["ms"] * 1e3
        rows[config] = (int(gpus), r["ms"], tok, r["loss"])
        print(f"{config}: {r['ms']:.2f} ms/step, {tok:,.0f} tok/s, loss {r['loss']:.4f} "
              f"({time.perf_counter() - t0:.0f} s with start-up)", flush=True)
    print(f"\n| config ({args.precision} B{args.B} T{args.T} per GPU) | GPUs | ms/step | tokens/s | scaling vs 1 GPU |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for config, (gpus, ms, tok, _) in rows.items():
        base = rows.get(f"{config.split(':')[0]}:1")
        scale = f"{tok / base[2]:.3f}x" if base else "-"
        print(f"| {config} | {gpus} | {ms:.2f} | {tok:,.0f} | {scale} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
