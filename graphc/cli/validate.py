"""``graphc validate``: llm.c's debug-state check (what ``test_gpt2.c`` does), with graphc.

    graphc validate --model LLMC.bin --state DEBUG_STATE.bin [--backend onnxruntime] [--no-opt]

Prints one line per quantity (``logits max abs diff 1.2e-05 (tolerance 1e-02)``, ``loss
...``, one ``grad <tensor> ...`` line per llm.c parameter tensor), then ``OK`` (exit 0) when
everything is within llm.c's tolerances, else ``FAIL: <what>`` (exit 1). The gradients come
from the optimised training graph ``graphc train`` runs (``--no-opt``: the unoptimised one).
"""

from __future__ import annotations

import argparse

from graphc.cli.common import add_backend_args, add_model_args

HELP = "check graphc's logits, loss and gradients against an llm.c debug state (prints OK or FAIL)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--state", required=True, metavar="DEBUG_STATE.bin",
                   help="llm.c debug state (train_gpt2.py write_state: B, T, inputs, targets, logits, loss, grads)")
    add_backend_args(p)


def run(args: argparse.Namespace) -> int:
    from graphc.backends import get_backend
    from graphc.models.debug_state import read_debug_state
    from graphc.models.load import load_model
    from graphc.runtime.validate import validate

    get_backend(args.backend)            # an unusable backend is the only line, before any output
    params = load_model(args.model, args.seed)
    state = read_debug_state(args.state, params.cfg)
    print(f"state: B={state.B} T={state.T}; model: {params.cfg.describe()}")
    report = validate(params, state, backend=args.backend, opt=not args.no_opt)
    print(f"loss graphc {report.loss:.6f} reference {report.reference_loss:.6f}")
    for check in report.checks:
        print(check.line() + ("" if check.ok else "  <-- FAIL"))
    if report.ok:
        print("OK")
        return 0
    print(f"FAIL: {', '.join(report.failed)} outside tolerance")
    return 1
