#!/usr/bin/env python3
"""CPU training speed: ms/step of GPT-2 (default d12, B=4, T=64) for several backends.

Backends, each timed over the same batches (llm.c's unshuffled order) with the same
thread count, warm-up steps excluded, median of the timed steps:

* ``graphc``        graphc.runtime.trainer.Trainer (onnxruntime CPU), optimised graphs
* ``graphc-noopt``  the same with ``opt=False`` (no fusion passes)
* ``torch``         PyTorch eager, the nanoGPT-style model of tests/torch_gpt2.py, AdamW(fused=False)
* ``llmc``          llm.c's CPU trainer binary, when ``--llmc-dir`` is given: its own "took" times

One step is what each trainer times itself: next batch, forward, backward, AdamW update.
llm.c's binary is run as a subprocess after the in-process backends (never concurrently);
its val loss and sampling run outside its timed region and are not counted. llm.c's steps
are numbered from 0, so with ``--warmup W --steps N`` its steps W..W+N-1 are used (a
binary built with the LLMC_LAST_STEP override stops at W+N-1; an unedited one runs to 40).

Threads: OMP_NUM_THREADS, MKL_NUM_THREADS and GRAPHC_THREADS are set before numpy, torch or
onnxruntime are imported, and torch.set_num_threads is called.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="d12",
                    help="llm.c .bin / safetensors / size name (default d12, seeded random init); "
                         "with --llmc-dir and no --model, LLMC_DIR/gpt2_124M.bin")
    ap.add_argument("--train-data", help="train shard (default: LLMC_DIR's tiny_shakespeare_train.bin, "
                                         "else data/tinyshakespeare/tiny_shakespeare_train.bin)")
    ap.add_argument("-b", type=int, default=4)
    ap.add_argument("-t", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default 2)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    ap.add_argument("--threads", type=int, default=2, help="threads for every backend (default 2)")
    ap.add_argument("--backends", default="graphc,graphc-noopt,torch,llmc",
                    help="comma-separated subset of graphc,graphc-noopt,torch,llmc")
    ap.add_argument("--llmc-dir", help="working dir with a built llm.c train_gpt2 and its inputs "
                                       "(see bench/compare_llmc.py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results as JSON here")
    return ap.parse_args(argv)


ARGS = parse_args()
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GRAPHC_THREADS"):
    os.environ[_var] = str(ARGS.threads)

import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_graphc(params, train_data: str, a, opt: bool) -> list[float]:
    from graphc.runtime.trainer import TrainConfig, Trainer

    cfg = TrainConfig(B=a.b, T=a.t, steps=a.warmup + a.steps, schedule="constant", val_every=0, opt=opt)
    t0 = time.perf_counter()
    trainer = Trainer(params.copy(), train_data, None, cfg, emit=lambda line: None)
    log(f"  graphc{'' if opt else ' (opt=False)'}: compiled in {time.perf_counter() - t0:.1f} s")
    ms = [trainer.train_step() for _ in range(a.warmup + a.steps)]
    return ms[a.warmup:]


def bench_torch(params, train_data: str, a) -> list[float]:
    import torch

    from graphc.data.shards import TokenLoader

    torch.set_num_threads(a.threads)
    spec = importlib.util.spec_from_file_location("torch_gpt2", REPO / "tests" / "torch_gpt2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.TorchGPT2(params)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            fused=False)
    loader = TokenLoader(train_data, a.b, a.t)
    ms = []
    for _ in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        x, y = loader.next_batch()
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.detach().item()
        ms.append((time.perf_counter() - t0) * 1000)
    return ms[a.warmup:]


STEP_RE = re.compile(r"^step (\d+): train loss \S+ \(took ([0-9.]+) ms\)", re.M)


def bench_llmc(a) -> list[float]:
    d = Path(a.llmc_dir)
    last = a.warmup + a.steps - 1
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), LLMC_B=str(a.b), LLMC_T=str(a.t),
               LLMC_LAST_STEP=str(last))
    p = subprocess.run(["./train_gpt2"], cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"llm.c exited with {p.returncode}: {p.stdout[-2000:]}")
    took = {int(s): float(ms) for s, ms in STEP_RE.findall(p.stdout)}
    ms = [took[s] for s in range(a.warmup, last + 1) if s in took]
    if len(ms) != a.steps:
        raise RuntimeError(f"llm.c printed {len(took)} steps; needed steps {a.warmup}..{last}")
    return ms


def main() -> int:
    a = ARGS
    from graphc.models.load import load_model

    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    unknown = set(backends) - {"graphc", "graphc-noopt", "torch", "llmc"}
    if unknown:
        raise SystemExit(f"unknown backend(s): {', '.join(sorted(unknown))}")
    model = a.model
    if a.llmc_dir and model == "d12" and "--model" not in sys.argv:
        model = str(Path(a.llmc_dir) / "gpt2_124M.bin")
    train_data = a.train_data
    if train_data is None:
        base = Path(a.llmc_dir) if a.llmc_dir else REPO
        train_data = str(base / "dev" / "data" / "tinyshakespeare" / "tiny_shakespeare_train.bin") if a.llmc_dir \
            else str(REPO / "data" / "tinyshakespeare" / "tiny_shakespeare_train.bin")
    params = load_model(model, a.seed)
    log(f"model {model}: {params.cfg}")

    load_start = os.getloadavg()
    results: dict[str, dict] = {}
    for name in backends:
        log(f"running {name} ...")
        try:
            if name == "graphc":
                ms = bench_graphc(params, train_data, a, opt=True)
            elif name == "graphc-noopt":
                ms = bench_graphc(params, train_data, a, opt=False)
            elif name == "torch":
                ms = bench_torch(params, train_data, a)
            else:
                if not a.llmc_dir:
                    log("  skipped: no --llmc-dir")
                    continue
                ms = bench_llmc(a)
        except Exception as e:  # report and go on with the other backends
            log(f"  {name} failed: {type(e).__name__}: {e}")
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        med = statistics.median(ms)
        results[name] = {"ms": med, "min_ms": min(ms), "max_ms": max(ms), "all_ms": ms,
                         "tokens_per_s": a.b * a.t / (med / 1000)}
        log(f"  {name}: median {med:.1f} ms/step (min {min(ms):.1f}, max {max(ms):.1f})")

    ref = results.get("llmc", {}).get("ms")
    print(f"\nGPT-2 {params.cfg.n_layer}L/{params.cfg.n_head}H/{params.cfg.n_embd}C, B={a.b} T={a.t}, "
          f"{a.threads} threads, median of {a.steps} steps after {a.warmup} warm-up; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"load average (1 min) {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end\n")
    print("| backend | ms/step | tokens/s | time vs llm.c |")
    print("|---|---:|---:|---:|")
    for name in backends:
        r = results.get(name)
        if r is None:
            continue
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:80]} | | |")
            continue
        ratio = f"{r['ms'] / ref:.2f}x" if ref else "-"
        print(f"| {name} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | {ratio} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": model, "B": a.b, "T": a.t, "threads": a.threads,
                                            "warmup": a.warmup, "steps": a.steps, "results": results,
                                            "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
                                           indent=1))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
