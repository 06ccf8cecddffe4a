"""``graphc compare``: run one GPT-2 graph on several backends with the same inputs.

    graphc compare --model PATH|NAME --mode infer|train|decode --backends onnxruntime,reference[,...]
                   [--precision fp32|bf16] [-b 2 -t 32] [--no-opt] [--seed 0]
                   [--save-model FILE.onnx [--save-for BACKEND]] [--save-inputs FILE.json]
                   [--save-outputs FILE.json] [--load-outputs FILE.json ...]

Prints, for every later backend and every output (``infer``: logits and loss; ``train``:
the loss and every ``grad.*``; ``decode``: one KV-cache decode step's logits and updated
caches), the max abs and max relative error against the first backend, then ``PASS``
(exit 0) when all are within the precision's tolerance (:data:`graphc.compare.TOLERANCES`),
else ``FAIL: <outputs>`` (exit 1).

The ``--save-*`` / ``--load-outputs`` files are Polygraphy's (:mod:`graphc.polygraphy_io`):
``polygraphy run`` reads the saved graph and inputs, and its saved outputs come back here as
more runs, compared with the first backend like the others.
"""

from __future__ import annotations

import argparse
import itertools

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
    g = p.add_argument_group("Polygraphy files (polygraphy run reads the model and inputs; its --save-outputs "
                             "file comes back through --load-outputs)")
    g.add_argument("--save-model", metavar="FILE.onnx", help="write the graph built for --save-for")
    g.add_argument("--save-for", metavar="BACKEND",
                   help="the backend whose graph --save-model / --save-inputs write (default: the first of --backends; "
                        "any known backend, also one that cannot run here, e.g. tensorrt)")
    g.add_argument("--save-inputs", metavar="FILE.json",
                   help="write the inputs, in that graph's dtypes, as a Polygraphy inputs file (--load-inputs)")
    g.add_argument("--save-outputs", metavar="FILE.json",
                   help="write every backend's outputs as Polygraphy RunResults")
    g.add_argument("--load-outputs", metavar="FILE.json", action="extend", nargs="+", default=[],
                   help="Polygraphy RunResults (polygraphy run --save-outputs) to compare too, each runner one "
                        "more run against the first backend; repeatable")


def parse_backends(text: str, loaded: int = 0) -> list[str]:
    """The backends to run; with ``loaded`` runs from --load-outputs one backend is enough."""
    from graphc.backends import get_backend

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or len(names) + min(loaded, 1) < 2:
        raise GraphcError(text, "name at least two backends, comma-separated (e.g. onnxruntime,reference), "
                                "or one and --load-outputs", "--backends")
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
    from graphc.compare import compare_results, gpt2_case, run_gpt2, tolerance
    from graphc.models.load import load_model
    from graphc.precision import get_precision

    backends = parse_backends(args.backends, len(args.load_outputs))
    save_for = check_save_flags(args, backends)
    loaded = load_runs(args.load_outputs, backends)      # bad files are reported before any work
    dtype = get_precision(args.precision).compute
    tol = tolerance(dtype)
    params = load_model(args.model, args.seed)
    check_seq_len(params.cfg, args.T)
    case = gpt2_case(params, args.mode, args.B, args.T, seed=args.seed)
    graphs = {name: case.graph(backend=name, precision=args.precision, opt=not args.no_opt) for name in backends}
    if save_for not in graphs:
        try:
            graphs[save_for] = case.graph(backend=save_for, precision=args.precision, opt=not args.no_opt)
        except GraphcError as e:   # e.g. no decode graph for cuda: its decoder is graphc's own kernels
            raise GraphcError(save_for, f"has no {args.mode} graph to save ({e.message})", "--save-for") from None
    print(f"model: {params.cfg.describe()}; mode {args.mode}, B={args.B} T={args.T}, {args.precision}; "
          f"tolerance: max abs <= {tol.atol:.0e} + {tol.rtol:.0e} * max |{backends[0]}|")
    save_graph_files(args, graphs[save_for], case.feeds, save_for)
    results = run_gpt2(case, {name: graphs[name] for name in backends})
    if args.save_outputs:
        from graphc.polygraphy_io import save_results

        save_results(args.save_outputs, results)
        print(f"wrote {args.save_outputs}: the outputs of {', '.join(results)} (Polygraphy RunResults)")
    results.update(loaded)
    result = compare_results(list(results), list(results.values()), dtype=dtype, outputs=case.outputs)
    for d in result.diffs:
        print(d.line())
    if result.ok:
        print("PASS")
        return 0
    if any(d.run in loaded for d in result.diffs if not d.ok):
        print("note: runs from --load-outputs compare only when they ran on the same inputs: the same --model, "
              "--mode, -b, -t, --seed and --precision (and --save-for) as the --save-inputs that fed them")
    shown = result.failed[:5] + ([f"... {len(result.failed) - 5} more"] if len(result.failed) > 5 else [])
    print(f"FAIL: {', '.join(shown)} outside tolerance against {result.reference}")
    return 1


def check_save_flags(args: argparse.Namespace, backends: list[str]) -> str:
    """The backend whose graph ``--save-model`` / ``--save-inputs`` write; every output writable."""
    from graphc.outputs import check_output_file

    save_for = args.save_for or backends[0]
    if save_for not in REGISTRY:
        raise GraphcError(save_for, f"unknown backend (known: {', '.join(REGISTRY)})", "--save-for")
    if args.save_for and not (args.save_model or args.save_inputs):
        raise GraphcError(args.save_for, "says whose graph --save-model / --save-inputs write; give one of them",
                          "--save-for")
    for flag, path in (("--save-model", args.save_model), ("--save-inputs", args.save_inputs),
                       ("--save-outputs", args.save_outputs)):
        if path:
            check_output_file(path, flag)
    return save_for


def load_runs(paths: list[str], backends: list[str]) -> dict[str, dict]:
    """Every runner of every ``--load-outputs`` file, by a label unique among all runs: the
    runner's name, else ``FILE:runner``, else that with `` #2``, `` #3`` ..."""
    from graphc.polygraphy_io import load_results

    loaded: dict[str, dict] = {}
    taken = lambda name: name in loaded or name in backends   # noqa: E731
    for path in paths:
        for runner, outputs in load_results(path).items():
            label = runner if not taken(runner) else f"{path}:{runner}"
            if taken(label):
                label = next(f"{label} #{i}" for i in itertools.count(2) if not taken(f"{label} #{i}"))
            loaded[label] = outputs
    return loaded


def save_graph_files(args: argparse.Namespace, graph, feeds: dict, backend: str) -> None:
    """``--save-model`` / ``--save-inputs``: the graph built for ``backend`` and the shared
    feeds in its dtypes, ready for ``polygraphy run FILE.onnx --load-inputs FILE.json``."""
    from graphc.compare import feeds_for

    if args.save_model:
        from graphc.models.export import save_onnx

        save_onnx(graph, args.save_model)
        print(f"wrote {args.save_model}: the {args.mode} graph built for {backend}")
    if args.save_inputs:
        from graphc.polygraphy_io import save_inputs

        save_inputs(args.save_inputs, feeds_for(graph, feeds))
        print(f"wrote {args.save_inputs}: its inputs (Polygraphy --load-inputs)")
