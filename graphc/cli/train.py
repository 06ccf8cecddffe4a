"""``graphc train``: train GPT-2 with the compiled training runner."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from graphc.cli.common import add_backend_args, add_model_args, check_seq_len, int_at_least, number, positive
from graphc.errors import GraphcError

HELP = "train GPT-2 (forward + autodiff backward + AdamW) on llm.c token shards"


def add_arguments(p):
    add_model_args(p)
    p.add_argument("--train-data", required=True, help="train shard or glob (llm.c format)")
    p.add_argument("--val-data", help="val shard or glob; omit to skip validation")
    p.add_argument("-b", dest="B", type=positive("-b"), default=4, help="batch size (default 4)")
    p.add_argument("-t", dest="T", type=positive("-t"), default=64, help="sequence length (default 64)")
    p.add_argument("--steps", type=positive("--steps"), required=True, help="optimizer steps, numbered 0..N-1")
    p.add_argument("--total-batch-size", type=int_at_least("--total-batch-size", 0), default=0, metavar="TOKENS",
                   help="tokens per optimizer step, a multiple of B*T: gradients of TOKENS/(B*T) micro-batches "
                        "are averaged (llm.c's -d; default 0: B*T, no accumulation)")
    p.add_argument("--recompute", action="store_true",
                   help="recompute GELU and layer-norm outputs in backward instead of keeping them (less memory)")
    o = p.add_argument_group("optimizer (AdamW as llm.c)")
    o.add_argument("--lr", type=number(0, low_open=True), default=1e-4, help="peak learning rate (default 1e-4)")
    o.add_argument("--beta1", type=number(0, 1, high_open=True), default=0.9)
    o.add_argument("--beta2", type=number(0, 1, high_open=True), default=0.999)
    o.add_argument("--eps", type=number(0, low_open=True), default=1e-8)
    o.add_argument("--weight-decay", type=number(0), default=0.0, help="decoupled weight decay (default 0)")
    o.add_argument("--decay-matrices-only", action="store_true",
                   help="decay only 2-D weights (PyTorch/nanoGPT convention); llm.c's CPU trainer decays all")
    o.add_argument("--grad-clip", type=number(0), default=0.0, help="global-norm clip, 0 = off (default)")
    o.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="cosine: linear warmup then cosine decay to lr*lr-final-frac (constant with the defaults)")
    o.add_argument("--warmup", type=int_at_least("--warmup", 0), default=0, help="warmup steps (default 0)")
    o.add_argument("--lr-final-frac", type=number(0, 1), default=1.0, help="final lr as a fraction of --lr (default 1.0)")
    r = p.add_argument_group("run")
    r.add_argument("--val-every", type=int_at_least("--val-every", 0), default=10, help="val loss before every Kth step (default 10)")
    r.add_argument("--val-batches", type=positive("--val-batches"), default=5, help="val batches (default 5)")
    r.add_argument("--sample-every", type=int_at_least("--sample-every", 0), default=0, help="print a sample every K steps (default 0: never)")
    r.add_argument("--sample-tokens", type=positive("--sample-tokens"), default=64, help="tokens per sample")
    r.add_argument("--shuffle", action="store_true", help="seeded shuffle of shards and batches")
    r.add_argument("--out", type=Path, help="folder for checkpoints, the loss log and plot")
    r.add_argument("--checkpoint-every", type=int_at_least("--checkpoint-every", 0), default=0, help="checkpoint every K steps (and at the end)")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --out bit for bit (also to more --steps when the schedule allows)")
    r.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that holds one (its checkpoints are replaced)")
    d = p.add_argument_group("data parallel (CUDA backend, NCCL)")
    d.add_argument("--gpus", type=positive("--gpus"), default=1,
                   help="GPUs on this host, one worker process each, -b rows per GPU (default 1); under "
                        "torchrun or mpirun the launcher's ranks are used instead")
    d.add_argument("--zero", type=int, choices=[0, 1], default=0,
                   help="1: shard AdamW state across GPUs (reduce-scatter, all-gather), as llm.c's ZeRO-1")
    add_backend_args(p)


def run(args) -> int:
    from graphc.runtime import distributed

    ranks = distributed.ranks_from_env()
    world = ranks.world if ranks is not None else args.gpus
    if world > 1 and args.backend != "cuda":
        raise GraphcError(None, f"data-parallel training needs --backend cuda (NCCL); {args.backend} runs on "
                          "one device", "--gpus")
    if ranks is not None and args.gpus > 1 and args.gpus != ranks.world:
        raise GraphcError(None, f"{args.gpus} disagrees with the world size {ranks.world} that {ranks.launcher} "
                                "gives", "--gpus")
    if args.zero and world == 1:
        raise GraphcError(None, "ZeRO-1 shards the optimizer state across GPUs: it needs --gpus 2 or more",
                          "--zero")
    if ranks is None and world > 1:  # this process is the launcher: one worker per GPU
        from graphc.backends import get_backend

        get_backend(args.backend)    # what every worker would find wrong, said once, before any starts
        check_outputs(args)
        return distributed.supervise([sys.executable, "-m", "graphc", *args.argv], world)
    parallel = None
    if ranks is not None and ranks.world > 1:
        from graphc.runtime.cuda.driver import select_device

        os.environ.update({k: v for k, v in distributed.NCCL_ENV.items() if k not in os.environ})
        select_device(ranks.local_rank)
        parallel = distributed.DataParallel(ranks, zero=args.zero)
    return train(args, parallel)


def train(args, parallel) -> int:
    from graphc.models.load import load_model
    from graphc.outputs import check_output_dir
    from graphc.runtime import checkpoint
    from graphc.runtime.optimizer import AdamWConfig
    from graphc.runtime.trainer import TrainConfig, Trainer

    check_outputs(args)
    grad_accum = grad_accum_steps(args.total_batch_size, args.B, args.T, parallel.world if parallel else 1)
    params = load_model(args.model, args.seed)
    check_seq_len(params.cfg, args.T)
    if args.out is not None:  # a checkpoint: model, m, v, the model copy, and the previous checkpoint
        check_output_dir(args.out, "--out", needed=4 * params.flat.size * 5)
    config = TrainConfig(
        B=args.B, T=args.T, steps=args.steps,
        adamw=AdamWConfig(lr=args.lr, beta1=args.beta1, beta2=args.beta2, eps=args.eps,
                          weight_decay=args.weight_decay, grad_clip=args.grad_clip),
        schedule=args.schedule, warmup=args.warmup, lr_final_frac=args.lr_final_frac,
        decay_matrices_only=args.decay_matrices_only, val_every=args.val_every, val_batches=args.val_batches,
        sample_every=args.sample_every, sample_tokens=args.sample_tokens, seed=args.seed, shuffle=args.shuffle,
        checkpoint_every=args.checkpoint_every, backend=args.backend, precision=args.precision,
        opt=not args.no_opt, grad_accum=grad_accum, recompute=args.recompute, zero=args.zero,
    )
    sampler = make_sampler(config) if args.sample_every > 0 else None
    trainer = Trainer(params, args.train_data, args.val_data, config, out=args.out, sampler=sampler,
                      parallel=parallel)
    if args.resume:
        with checkpoint.naming_files(args.out):
            trainer.resume()
    elif args.overwrite and args.out is not None:
        checkpoint.remove_run(args.out)  # every input checked: now the old run goes, not before
    if parallel is not None:  # ranks stop together: the launcher stops every worker (SIGTERM)
        trainer.run()
        return 0

    def request_stop(signum, frame):
        trainer.stop_requested = True

    previous = signal.signal(signal.SIGINT, request_stop), signal.signal(signal.SIGTERM, request_stop)
    try:
        trainer.run()
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
    if trainer.stop_requested and trainer.step < config.steps:
        where = f"; resume with --resume --out {args.out}" if args.out else ""
        print(f"stopped after step {trainer.step - 1}{where}", flush=True)
        return 130
    return 0


def check_outputs(args) -> None:
    """Before any work: --out can be written, holds no other run (unless --resume or
    --overwrite), and leftovers of a killed checkpoint write are cleaned away."""
    from graphc.fileio import remove_leftovers
    from graphc.outputs import check_output_dir
    from graphc.runtime import checkpoint

    if args.resume and args.overwrite:
        raise GraphcError(None, "--resume continues the run in --out; --overwrite starts a new one: choose one",
                          "--overwrite")
    if args.out is None:
        if args.resume:
            raise GraphcError(None, "needs --out DIR holding the run to continue", "--resume")
        return
    check_output_dir(args.out, "--out")
    if args.resume:
        checkpoint.load(Path(args.out))  # a damaged checkpoint is reported before any graph is built
    if not args.resume and not args.overwrite and checkpoint.holds_run(args.out):
        raise GraphcError(args.out, "holds a training run already; continue it with --resume, or use a new "
                          "directory (or --overwrite to replace it)", "--out")
    remove_leftovers(args.out)


def grad_accum_steps(total_batch_size: int, B: int, T: int, gpus: int = 1) -> int:
    """Micro-batches per step for ``--total-batch-size`` tokens (0: one), as llm.c's ``-d``
    (the tokens of all GPUs together: each of ``gpus`` ranks reads B*T per micro-batch)."""
    if total_batch_size == 0:
        return 1
    if total_batch_size % (B * T * gpus):
        per = f"B*T = {B}*{T}" if gpus == 1 else f"B*T*GPUs = {B}*{T}*{gpus}"
        raise GraphcError(None, f"{total_batch_size} tokens is not a multiple of {per} = {B * T * gpus}",
                          "--total-batch-size")
    return total_batch_size // (B * T * gpus)


def make_sampler(config):
    """Samples from the current weights, seeded per step so a resumed run prints the same."""
    from graphc.runtime.generate import sample_text

    def sample(params, seed: int) -> str:
        return sample_text(params, max_new_tokens=config.sample_tokens, seed=seed, backend=config.backend,
                           precision=config.precision)

    return sample
