#!/usr/bin/env python3
"""Step-for-step loss comparison of graphc's trainer against llm.c's CPU trainer.

Runs an already built llm.c ``train_gpt2`` binary (this script contains no llm.c code and
downloads nothing), then ``graphc train`` with the matching contract, parses both logs and
prints one table: step / llm.c loss / graphc loss / |diff|, the max abs diff, and PASS when
every loss printed by both is within ``--tol`` (default 2e-3), else FAIL (exit status 1).
It also prints each side's ms/step (median over steps 1..N-1, from their own "took" times).

``--llmc-dir DIR`` must be laid out the way llm.c's trainer expects its working directory::

    DIR/train_gpt2                                     the built binary
    DIR/gpt2_124M.bin                                  the model (llm.c v3 float32 checkpoint)
    DIR/gpt2_tokenizer.bin
    DIR/dev/data/tinyshakespeare/tiny_shakespeare_{train,val}.bin

(``graphc prepare --out D`` writes the shards and the tokenizer; ``graphc.models.llmc.save_llmc``
writes a model.)  By default graphc trains on the very same files.

The llm.c contract (train_gpt2.c, ``main``): ``for (step = 0; step <= 40; step++)``, i.e. 41
optimizer steps numbered 0..40; before the training step of every step with ``step % 10 == 0``
it prints ``val loss X`` (the mean of 5 per-batch mean losses over the first 5 val batches,
after ``dataloader_reset``); there is no val loss after the last step. graphc's ``--steps 41
--val-every 10 --val-batches 5`` gives the same schedule plus one extra val loss after the
last step, which has no llm.c counterpart: it is shown but not compared.

The published trainer shuffles the train loader; the comparison is specified with shuffling
off, so the binary must have been built with that one edit (graphc trains unshuffled by
default). A binary built with the optional LLMC_B / LLMC_T / LLMC_LAST_STEP environment
overrides honours ``-b``, ``-t`` and ``--steps``; an unedited binary always runs B=4, T=64
and steps 0..40, which this script detects from its output and reports.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

STEP_RE = re.compile(r"^step (\d+): train loss ([-+0-9.eEnaif]+) \(took ([0-9.]+) ms\)")
VAL_RE = re.compile(r"^val loss ([-+0-9.eEnaif]+)")
BATCHES_RE = re.compile(r"^train dataset num_batches: (\d+)")


def parse_log(text: str) -> dict:
    """Train losses by step, val losses by the step they precede, per-step ms."""
    train: dict[int, float] = {}
    ms: dict[int, float] = {}
    val: dict[int, float] = {}
    pending: list[float] = []  # val lines seen since the last step line
    train_batches = None
    for line in text.splitlines():
        line = line.strip()
        if m := STEP_RE.match(line):
            s = int(m.group(1))
            train[s] = float(m.group(2))
            ms[s] = float(m.group(3))
            for v in pending:  # a val loss is printed before the step it is computed at
                val[s] = v
            pending = []
        elif m := VAL_RE.match(line):
            pending.append(float(m.group(1)))
        elif m := BATCHES_RE.match(line):
            train_batches = int(m.group(1))
    if pending:  # val after the last step (graphc's final validation)
        val[(max(train) + 1) if train else 0] = pending[-1]
    return {"train": train, "val": val, "ms": ms, "train_batches": train_batches}


def median_ms(ms: dict[int, float], steps: int) -> float | None:
    xs = [ms[s] for s in range(1, steps) if s in ms]
    return statistics.median(xs) if xs else None


def run(cmd: list[str], cwd: Path | None, env: dict, log: Path | None) -> str:
    print(f"$ {'cd ' + str(cwd) + ' && ' if cwd else ''}{' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       errors="replace")
    dt = time.perf_counter() - t0
    if log:
        log.write_text(p.stdout)
    print(f"  (exit {p.returncode}, {dt:.1f} s wall{', log: ' + str(log) if log else ''})", flush=True)
    if p.returncode != 0:
        sys.stdout.write(p.stdout[-4000:])
        raise SystemExit(f"command failed with exit status {p.returncode}: {cmd[0]}")
    return p.stdout


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.6f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llmc-dir", required=True, type=Path,
                    help="working dir with a built llm.c train_gpt2 and its inputs (see above)")
    ap.add_argument("--model", help="model for graphc (default: LLMC_DIR/gpt2_124M.bin, the one llm.c reads)")
    ap.add_argument("--train-data", help="default: LLMC_DIR/dev/data/tinyshakespeare/tiny_shakespeare_train.bin")
    ap.add_argument("--val-data", help="default: LLMC_DIR/dev/data/tinyshakespeare/tiny_shakespeare_val.bin")
    ap.add_argument("--steps", type=int, default=41, help="optimizer steps (default 41 = llm.c's loop 0..40)")
    ap.add_argument("-b", type=int, default=4, help="batch size (default 4, llm.c's)")
    ap.add_argument("-t", type=int, default=64, help="sequence length (default 64, llm.c's)")
    ap.add_argument("--threads", type=int, default=2,
                    help="OMP_NUM_THREADS for llm.c, GRAPHC_THREADS/OMP_NUM_THREADS for graphc (default 2)")
    ap.add_argument("--tol", type=float, default=2e-3, help="max allowed |diff| per loss (default 2e-3)")
    ap.add_argument("--no-opt", action="store_true", help="run graphc train --no-opt (unoptimised graphs)")
    ap.add_argument("--llmc-log", type=Path, help="parse this existing llm.c log instead of running the binary")
    ap.add_argument("--graphc-log", type=Path, help="parse this existing graphc log instead of running graphc")
    ap.add_argument("--save-logs", type=Path, help="folder to write llmc.log / graphc.log into")
    ap.add_argument("--json", type=Path, help="also write the parsed results as JSON here")
    a = ap.parse_args(argv)

    d = a.llmc_dir.resolve()
    load_start = os.getloadavg()
    data = d / "dev" / "data" / "tinyshakespeare"
    model = a.model or str(d / "gpt2_124M.bin")
    train_data = a.train_data or str(data / "tiny_shakespeare_train.bin")
    val_data = a.val_data or str(data / "tiny_shakespeare_val.bin")
    if a.save_logs:
        a.save_logs.mkdir(parents=True, exist_ok=True)
    threads = str(a.threads)

    # ---------------------------------------------------------------- llm.c
    if a.llmc_log:
        llmc_text = a.llmc_log.read_text()
    else:
        binary = d / "train_gpt2"
        if not binary.exists():
            raise SystemExit(f"{binary}: no llm.c binary (build train_gpt2.c there first)")
        for f in ("gpt2_124M.bin", "gpt2_tokenizer.bin"):
            if not (d / f).exists():
                raise SystemExit(f"{d / f}: missing (llm.c reads it from its working directory)")
        env = dict(os.environ, OMP_NUM_THREADS=threads, LLMC_B=str(a.b), LLMC_T=str(a.t),
                   LLMC_LAST_STEP=str(a.steps - 1))
        llmc_text = run(["./train_gpt2"], d, env, a.save_logs / "llmc.log" if a.save_logs else None)
    llmc = parse_log(llmc_text)
    if not llmc["train"]:
        raise SystemExit("no 'step S: train loss X' lines in llm.c's output")
    llmc_steps = max(llmc["train"]) + 1
    if llmc_steps != a.steps:
        print(f"note: llm.c ran {llmc_steps} steps, not --steps {a.steps} (a binary without the "
              f"LLMC_LAST_STEP override always runs 0..40); comparing {min(llmc_steps, a.steps)}")
    if llmc["train_batches"] is not None:
        ntok = _shard_tokens(train_data)
        if ntok is not None and ntok // (a.b * a.t) != llmc["train_batches"]:
            print(f"warning: llm.c reports {llmc['train_batches']} train batches; with B*T={a.b * a.t} "
                  f"graphc's train data gives {ntok // (a.b * a.t)}: B/T or data differ")

    # ---------------------------------------------------------------- graphc
    if a.graphc_log:
        graphc_text = a.graphc_log.read_text()
    else:
        cmd = [sys.executable, "-m", "graphc", "train", "--model", model, "--train-data", train_data,
               "--val-data", val_data, "-b", str(a.b), "-t", str(a.t), "--steps", str(a.steps),
               "--lr", "1e-4", "--val-every", "10", "--val-batches", "5"]
        if a.no_opt:
            cmd.append("--no-opt")
        env = dict(os.environ, OMP_NUM_THREADS=threads, GRAPHC_THREADS=threads)
        graphc_text = run(cmd, None, env, a.save_logs / "graphc.log" if a.save_logs else None)
    gc = parse_log(graphc_text)
    if not gc["train"]:
        raise SystemExit("no 'step S: train loss X' lines in graphc's output")

    # ---------------------------------------------------------------- table
    n = min(a.steps, llmc_steps)
    rows = []  # (step, kind, llmc, graphc, diff or None)
    ok = True
    problems = []
    last = max(n, max(gc["train"]) + 1)
    for s in range(last + 1):
        for kind, src_l, src_g in (("val", llmc["val"], gc["val"]), ("train", llmc["train"], gc["train"])):
            lv, gv = src_l.get(s), src_g.get(s)
            if lv is None and gv is None:
                continue
            diff = abs(lv - gv) if lv is not None and gv is not None else None
            rows.append((s, kind, lv, gv, diff))
            if diff is not None:
                if not diff <= a.tol:  # also catches nan
                    ok = False
                    problems.append(f"{kind} loss at step {s}: |diff| {diff:.6f} > {a.tol}")
            elif lv is not None:  # llm.c printed it, graphc did not
                ok = False
                problems.append(f"{kind} loss at step {s}: graphc printed none")
            elif kind == "train" and s < n:
                ok = False
                problems.append(f"train loss at step {s}: llm.c printed none")
    diffs = [r[4] for r in rows if r[4] is not None]
    max_diff = max(diffs) if diffs else float("nan")

    print()
    print(f"model {model}  B={a.b} T={a.t}  steps {n}  threads {threads}"
          f"{'  graphc --no-opt' if a.no_opt else ''}")
    print(f"{'step':>5} {'':5} {'llm.c':>11} {'graphc':>11} {'|diff|':>10}")
    for s, kind, lv, gv, diff in rows:
        note = ""
        if diff is None:
            note = "  (graphc only: not compared)" if lv is None else "  (llm.c only)"
        print(f"{s:>5} {kind:5} {fmt(lv):>11} {fmt(gv):>11} {fmt(diff):>10}{note}")
    n_train = sum(1 for r in rows if r[1] == "train" and r[4] is not None)
    n_val = sum(1 for r in rows if r[1] == "val" and r[4] is not None)
    print(f"\ncompared {n_train} train and {n_val} val losses; max |diff| = {max_diff:.6f} (tol {a.tol})")
    lm, gm = median_ms(llmc["ms"], n), median_ms(gc["ms"], n)
    print(f"ms/step (median of steps 1..{n - 1}): llm.c {f'{lm:.1f}' if lm else '-'}  "
          f"graphc {f'{gm:.1f}' if gm else '-'}"
          + (f"  (graphc/llm.c = {gm / lm:.2f}x)" if lm and gm else ""))
    print(f"load average (1 min): {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end "
          f"({os.cpu_count()} CPUs; timings are only meaningful on an otherwise idle machine)")
    for p in problems:
        print("  " + p)
    print("PASS" if ok else "FAIL")

    if a.json:
        a.json.write_text(json.dumps({
            "model": model, "B": a.b, "T": a.t, "steps": n, "threads": a.threads, "no_opt": a.no_opt,
            "tol": a.tol, "max_abs_diff": max_diff, "pass": ok, "problems": problems,
            "llmc_ms_median": lm, "graphc_ms_median": gm,
            "rows": [{"step": s, "kind": k, "llmc": lv, "graphc": gv, "diff": df} for s, k, lv, gv, df in rows],
        }, indent=1))
    return 0 if ok else 1


def _shard_tokens(path: str) -> int | None:
    """Token count from an llm.c shard header (int32 magic 20240520, version, ntok)."""
    try:
        with open(path, "rb") as f:
            import struct
            magic, _version, ntok = struct.unpack("<3i", f.read(12))
        return ntok if magic == 20240520 else None
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
