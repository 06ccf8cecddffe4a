"""``graphc eval``: validation loss of a model on token shards, printed as llm.c prints it."""

from __future__ import annotations

from graphc.cli.common import add_backend_args, add_model_args, check_seq_len, positive

HELP = "mean validation loss over the first N batches of a token shard (prints 'val loss X.XXXXXX')"


def add_arguments(p):
    add_model_args(p)
    p.add_argument("--data", required=True, help="token shard or glob of shards (llm.c format)")
    p.add_argument("-b", dest="B", type=positive("-b"), required=True, help="batch size")
    p.add_argument("-t", dest="T", type=positive("-t"), required=True, help="sequence length")
    p.add_argument("--batches", type=positive("--batches"), required=True, help="number of batches")
    add_backend_args(p)


def run(args) -> int:
    from graphc.backends import get_backend
    from graphc.data.shards import TokenLoader
    from graphc.models.load import load_model
    from graphc.runtime.evaluate import check_batches, mean_loss

    backend = get_backend(args.backend)()
    params = load_model(args.model, args.seed)
    check_seq_len(params.cfg, args.T)
    loader = TokenLoader(args.data, args.B, args.T, vocab_size=params.cfg.vocab_size)
    check_batches(loader, args.batches, args.data)
    evaluator = backend.evaluator(backend.upload_params(params), args.B, args.T, precision=args.precision,
                                  opt=not args.no_opt)
    print(f"val loss {mean_loss(evaluator, loader, args.batches):.6f}")
    return 0
