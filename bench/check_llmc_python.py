#!/usr/bin/env python3
"""Check graphc against the files llm.c's own PyTorch reference, ``train_gpt2.py``, writes.

    python bench/check_llmc_python.py --llmc-py PATH/train_gpt2.py --work DIR [--config small|d12]

You provide llm.c's ``train_gpt2.py`` (this script contains no llm.c code and downloads
nothing). The script:

1. tokenizes Tiny Shakespeare with ``graphc prepare`` into ``DIR/data`` (llm.c shard format
   and graphc's own ``gpt2_tokenizer.bin``);
2. runs ``train_gpt2.py --model d12 --write_tensors 1 --device cpu --dtype float32
   --compile 0 --num_iterations 0 --val_loss_every 1`` in ``DIR/run_<config>``. It trains
   nothing: it writes ``gpt2_d12.bin`` (fp32, version 3), ``gpt2_d12_bf16.bin`` (bf16, version
   5), ``gpt2_d12_debug_state.bin`` and ``gpt2_tokenizer.bin`` from the freshly initialised
   model, then prints the step-0 val loss of those same weights;
3. checks every file with graphc (see the check names printed) and prints ``PASS``/``FAIL``
   for each and overall (exit status 0/1).

``--config d12`` runs the file unedited (124M parameters). ``--config small`` (the default,
far cheaper on a CPU) runs a copy with one line edited: the ``"d12": GPTConfig(...)`` entry
gets ``n_layer/n_head/n_embd`` from ``--layers/--heads/--embd`` (default 4/4/128). Nothing else
changes (vocabulary 50257, block size 1024); the output files keep the ``gpt2_d12`` names.
The diff of the edit is printed.

The val-loss comparison is meaningful: ``train_gpt2.py`` evaluates, before any optimizer
step, the mean of the per-batch mean losses of the first ``--val_max_steps`` sequential
B x T batches of the val shard after a reset, exactly what ``graphc eval -b B -t T --batches
N`` computes. It differs only when N exceeds the batches in the shard: ``train_gpt2.py``
then wraps around to the start, while graphc refuses; the script then skips the comparison.

The bf16 model is validated too, as information only: its weights are the fp32 ones
rounded to bf16, so its logits differ from the fp32 debug state by more than llm.c's fp32
tolerance (llm.c's own bf16 test uses a logit tolerance of 25).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_TEXT = "/work/shared/data/tinyshakespeare.txt"
DEFAULT_TIKTOKEN_CACHE = "/work/shared/data/tiktoken_cache"
VAL_TOL = 2e-4

# the one line the small config edits: the "d12" entry of train_gpt2.py's model_config dict
D12_LINE = re.compile(r'^(\s*"d12"\s*:\s*GPTConfig\()(.*)(\),?\s*)$', re.M)


class Checks:
    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []

    def add(self, name: str, status: str, detail: str = "") -> None:
        self.rows.append((name, status, detail))
        print(f"[{status}] {name}" + (f": {detail}" if detail else ""), flush=True)

    def ok(self, name, cond, detail=""):
        self.add(name, "PASS" if cond else "FAIL", detail)
        return cond

    @property
    def passed(self) -> bool:
        return all(s != "FAIL" for _, s, _ in self.rows)


def make_script(src: Path, dst: Path, config: str, L: int, H: int, C: int) -> str:
    text = src.read_text()
    if config == "d12":
        dst.write_text(text)
        return "unedited"
    matches = list(D12_LINE.finditer(text))
    if len(matches) != 1:
        raise SystemExit(f"{src}: expected exactly one '\"d12\": GPTConfig(...)' line to edit, found {len(matches)}")
    m = matches[0]
    args = m.group(2)
    for key, value in (("n_layer", L), ("n_head", H), ("n_embd", C)):
        args, n = re.subn(rf"\b{key}\s*=\s*\d+", f"{key}={value}", args)
        if n != 1:
            raise SystemExit(f"{src}: the d12 line has no single {key}=... to edit: {m.group(0).strip()}")
    new = text[: m.start()] + m.group(1) + args + m.group(3) + text[m.end():]
    dst.write_text(new)
    return "".join(difflib.unified_diff(text.splitlines(True), new.splitlines(True), str(src), str(dst), n=0))


def run(cmd, *, cwd=None, env=None, log: Path | None = None) -> subprocess.CompletedProcess:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    t0 = time.time()
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    out = p.stdout + p.stderr
    if log is not None:
        log.write_text(out)
    print(out.rstrip())
    print(f"(exit {p.returncode}, {time.time() - t0:.1f}s)", flush=True)
    return p


def header(path: Path, n: int = 8) -> list[int]:
    return [int(x) for x in np.fromfile(path, dtype="<i4", count=n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llmc-py", required=True, type=Path, help="llm.c's train_gpt2.py (you provide it)")
    ap.add_argument("--work", required=True, type=Path, help="work directory (created)")
    ap.add_argument("--config", choices=["small", "d12"], default="small")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--embd", type=int, default=128)
    ap.add_argument("-b", dest="B", type=int, default=4)
    ap.add_argument("-t", dest="T", type=int, default=64)
    ap.add_argument("--val-steps", type=int, default=20, help="train_gpt2.py --val_max_steps = graphc eval --batches")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="Tiny Shakespeare text for graphc prepare")
    ap.add_argument("--tiktoken-cache", default=os.environ.get("TIKTOKEN_CACHE_DIR", DEFAULT_TIKTOKEN_CACHE))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the (large, for d12) model/state files")
    a = ap.parse_args(argv)

    from graphc.data.tokenizer import read_llmc_tokenizer
    from graphc.models.config import padded
    from graphc.models.debug_state import read_debug_state, write_debug_state
    from graphc.models.llmc import load_llmc, save_llmc
    import ml_dtypes

    work = a.work.resolve()
    data = work / "data"
    rundir = work / f"run_{a.config}"
    rundir.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=a.tiktoken_cache, OMP_NUM_THREADS=str(a.threads),
               GRAPHC_THREADS=str(a.threads))
    graphc = [sys.executable, "-m", "graphc"]
    checks = Checks()
    L, H, C = (12, 12, 768) if a.config == "d12" else (a.layers, a.heads, a.embd)
    V, Vp, maxT = 50257, padded(50257), 1024

    # 1. data
    p = run(graphc + ["prepare", "--input", a.text, "--out", data], env=env)
    if p.returncode:
        checks.add("graphc prepare", "FAIL", "see output")
        return 1
    train_bin, val_bin = data / "tiny_shakespeare_train.bin", data / "tiny_shakespeare_val.bin"

    # 2. train_gpt2.py
    script = rundir / "train_gpt2.py"
    diff = make_script(a.llmc_py.resolve(), script, a.config, L, H, C)
    print(f"train_gpt2.py edit ({a.config}):\n{diff}")
    for f in rundir.glob("gpt2_*.bin"):
        f.unlink()
    p = run([sys.executable, script, "--model", "d12", "--input_bin", train_bin, "--input_val_bin", val_bin,
             "--device", "cpu", "--dtype", "float32", "--compile", "0", "--flash", "0", "--tensorcores", "0",
             "--write_tensors", "1", "--batch_size", a.B, "--sequence_length", a.T, "--total_batch_size", a.B * a.T,
             "--num_iterations", "0", "--val_loss_every", "1", "--val_max_steps", a.val_steps],
            cwd=rundir, env=env, log=rundir / "train_gpt2.log")
    model32, model16 = rundir / "gpt2_d12.bin", rundir / "gpt2_d12_bf16.bin"
    state, tok = rundir / "gpt2_d12_debug_state.bin", rundir / "gpt2_tokenizer.bin"
    missing = [f.name for f in (model32, model16, state, tok) if not f.exists()]
    if not checks.ok("train_gpt2.py ran and wrote its files", p.returncode == 0 and not missing,
                     f"exit {p.returncode}" + (f", missing {missing}" if missing else "")):
        return 1
    val_lines = re.findall(r"^val loss (\S+)$", p.stdout, re.M)

    # 3. headers, as train_gpt2.py's write_model / write_state document them
    want = [20240326, 3, maxT, V, L, H, C, Vp]
    h32, h16 = header(model32), header(model16)
    checks.ok("fp32 model header (magic, v3, maxT, V, L, NH, C, Vp)", h32 == want, str(h32))
    checks.ok("bf16 model header (magic, v5, ...)", h16 == want[:1] + [5] + want[2:], str(h16))
    hs = header(state, 4)
    checks.ok("debug state header (magic, v2, B, T)", hs == [20240327, 2, a.B, a.T], str(hs))

    # 4. graphc reads both model files
    p32 = load_llmc(model32)
    p16 = load_llmc(model16)
    cfg = p32.cfg
    checks.ok("graphc reads the fp32 model", (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size,
                                              cfg.padded_vocab_size, cfg.max_seq_len) == (L, H, C, V, Vp, maxT),
              cfg.describe())
    wte = p32.tensor("wte")
    checks.ok("wte's padded rows are zero", wte.shape == (Vp, C) and not wte[V:].any(), f"wte {wte.shape}")
    rne = p32.flat.astype(ml_dtypes.bfloat16).astype(np.float32)
    checks.ok("graphc reads the bf16 model = the fp32 weights rounded to bf16", np.array_equal(rne, p16.flat),
              f"{p16.cfg.describe()}, max |bf16 - fp32| {float(np.abs(p16.flat - p32.flat).max()):.3e}")
    tmp = rundir / "graphc_rewrite.bin"
    for version, src in ((3, model32), (5, model16)):
        save_llmc(p32, tmp, version=version)
        same = tmp.read_bytes() == src.read_bytes()
        checks.ok(f"graphc save_llmc(version={version}) is byte-identical to {src.name}", same)
    st = read_debug_state(state, cfg)
    write_debug_state(tmp, st.inputs, st.targets, st.logits, st.loss, st.grads)
    checks.ok("graphc read+write of the debug state is byte-identical", tmp.read_bytes() == state.read_bytes(),
              f"B={st.B} T={st.T} loss {st.loss:.6f}")
    tmp.unlink()
    del p32, p16, rne, st, wte

    # 5. graphc validate
    p = run(graphc + ["validate", "--model", model32, "--state", state], env=env, log=rundir / "validate_fp32.log")
    checks.ok("graphc validate (fp32 model) says OK", p.returncode == 0 and p.stdout.rstrip().endswith("OK"))
    p = run(graphc + ["validate", "--model", model16, "--state", state], env=env, log=rundir / "validate_bf16.log")
    last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else f"exit {p.returncode}"
    checks.add("graphc validate (bf16 model), information only", "INFO", last)

    # 6. tokenizer
    ours = data / "gpt2_tokenizer.bin"
    t = read_llmc_tokenizer(tok)
    checks.ok("read_llmc_tokenizer reads train_gpt2.py's tokenizer", t.vocab_size == V and t.eot == 50256,
              f"{t.vocab_size} tokens, eot {t.eot}")
    checks.ok("train_gpt2.py's gpt2_tokenizer.bin == graphc prepare's, byte for byte",
              tok.read_bytes() == ours.read_bytes())

    # 7. val loss
    ntok = header(val_bin, 3)[2]
    available = (ntok - 1) // (a.B * a.T)
    if not val_lines:
        checks.add("val loss", "FAIL", "train_gpt2.py printed no 'val loss' line")
    elif a.val_steps > available:
        checks.add("val loss", "SKIP", f"--val-steps {a.val_steps} > {available} batches in the shard: train_gpt2.py "
                   "wraps around, graphc eval refuses; not the same quantity")
    else:
        ref = float(val_lines[0])
        p = run(graphc + ["eval", "--model", model32, "--data", val_bin, "-b", a.B, "-t", a.T,
                          "--batches", a.val_steps], env=env, log=rundir / "eval.log")
        m = re.search(r"^val loss (\S+)$", p.stdout, re.M)
        if p.returncode or not m:
            checks.add("graphc eval = train_gpt2.py step-0 val loss", "FAIL", "graphc eval failed")
        else:
            ours_v = float(m.group(1))
            checks.ok(f"graphc eval = train_gpt2.py step-0 val loss (within {VAL_TOL:g})",
                      abs(ours_v - ref) <= VAL_TOL,
                      f"graphc {ours_v:.6f}, train_gpt2.py {ref!r}, |diff| {abs(ours_v - ref):.2e}")

    if not a.keep:
        for f in (model32, model16, state):
            f.unlink(missing_ok=True)
    print()
    for name, status, detail in checks.rows:
        print(f"{status:4s}  {name}" + (f"  ({detail})" if detail else ""))
    print("PASS" if checks.passed else "FAIL")
    return 0 if checks.passed else 1


if __name__ == "__main__":
    sys.exit(main())
