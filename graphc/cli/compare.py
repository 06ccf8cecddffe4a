"""``graphc compare``: run one GPT-2 graph on several backends with the same inputs.

    graphc compare --model PATH|NAME --mode infer|train|decode --backends onnxruntime,reference[,...]
                   [--precision fp32|bf16] [-b 2 -t 32] [--no-opt]

Prints, for every later backend and every output (``infer``: logits and loss; ``train``:
the loss and every ``grad.*``; ``decode``: one KV-cache decode step's logits and updated
caches), the max abs and max relative error against the first backend, then ``PASS``
(exit 0) when all are within the precision's tolerance (:data:`graphc.compare.TOLERANCES`),
else ``FAIL: <outputs>`` (exit 1).
"""

from __future__ import annotations

import argparse

from graphc.backends import REGISTRY
from graphc.cli.common import add_model_args, add_precision_arg, check_seq_len, positive
from graphc.errors import GraphcError

HELP = "run a GPT-2 graph on several backends with the same inputs and compare the outputs (PASS or FAIL)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from graphc.compare import MODES

    add_model_args(p)
    p.add_argument("--mode", required=True, choices=sorted(MODES),
                   help="infer: logits and loss; train: loss and every gradient; decode: one KV-cache step")
    p.add_argument("--backends", required=True, metavar="A,B[,...]",
                   help=f"comma-separated backends, the first is the reference (known: {', '.join(REGISTRY)})")
    add_precision_arg(p, "bf16: onnxruntime runs its float32 emulation of the BF16 graph; picks the tolerance")
    p.add_argument("-b", dest="B", type=positive("-b"), default=2, help="batch size (default 2)")
    p.add_argument("-t", dest="T", type=positive("-t"), default=32,
                   help="sequence length, or the cache capacity for decode (default 32)")
    p.add_argument("--no-opt", action="store_true", help="compare the unoptimised graphs (no fusion passes)")


def parse_backends(text: str) -> list[str]:
    from graphc.backends import get_backend

    names = [n.strip() for n in text.split(",") if n.strip()]
    if len(names) < 2:
        raise GraphcError(text, "name at least two backends, comma-separated (e.g. onnxruntime,reference)",
                          "--backends")
    for name in names:
        if names.count(name) > 1:
            raise GraphcError(name, "backend named twice", "--backends")
        if name not in REGISTRY:
            raise GraphcError(name, f"unknown backend (known: {', '.join(REGISTRY)})", "--backends")
        try:
            get_backend(name)  # usable here, or a one-line error saying why not
        except GraphcError as e:
            raise GraphcError(name, e.message, "--backends") from None
    return names


def run(args: argparse.Namespace) -> int:
    from graphc.compare import compare_gpt2, tolerance
    from graphc.models.load import load_model
    from graphc.precision import get_precision

    backends = parse_backends(args.backends)
    tol = tolerance(get_precision(args.precision).compute)   # bad input is reported before any work
    params = load_model(args.model, args.seed)
    check_seq_len(params.cfg, args.T)
    print(f"model: {params.cfg.describe()}; mode {args.mode}, B={args.B} T={args.T}, {args.precision}; "
          f"tolerance: max abs <= {tol.atol:.0e} + {tol.rtol:.0e} * max |{backends[0]}|")
    result = compare_gpt2(params, args.mode, backends, B=args.B, T=args.T, precision=args.precision,
                          opt=not args.no_opt, seed=args.seed)
    for d in result.diffs:
        print(d.line())
    if result.ok:
        print("PASS")
        return 0
    shown = result.failed[:5] + ([f"... {len(result.failed) - 5} more"] if len(result.failed) > 5 else [])
    print(f"FAIL: {', '.join(shown)} outside tolerance against {result.reference}")
    return 1

