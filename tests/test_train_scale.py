"""What a trainer needs at scale, on the CPU reference: gradient accumulation (llm.c's
``-d`` total batch) through the TrainStep seam, and activation recomputation as a pass."""

from __future__ import annotations

import numpy as np
import pytest

from graphc.backends import get_backend
from graphc.models.config import named_config
from graphc.models.init import random_init
from graphc.passes.memory_plan import plan_model
from graphc.passes.recompute import SUFFIX
from graphc.runtime.optimizer import AdamWConfig
from graphc.runtime.programs import TrainSpec, training_graph

CFG = named_config("L2H2C64")


def _batches(k, B, T, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (k, B, T + 1))
    return tokens[..., :-1], tokens[..., 1:]


def test_grad_accumulation_equals_the_mean_of_micro_batch_gradients():
    """k micro-batches of B give the mean of their gradients (each scaled by 1/k as it is
    added) and the mean loss; with k = 2 (1/k exact) that equals one batch of 2B rows,
    whose loss is the mean over all 2B*T tokens, within float32 summation order."""
    backend = get_backend("onnxruntime")()
    k, B, T = 2, 2, 8
    tokens, targets = _batches(k, B, T)
    adamw = AdamWConfig(lr=1e-3, grad_clip=1.0)
    acc = backend.train_step(backend.upload_params(random_init(CFG, 0)), TrainSpec(B=B, T=T, adamw=adamw, grad_accum=k))
    one = backend.train_step(backend.upload_params(random_init(CFG, 0)), TrainSpec(B=B, T=T))  # no clip
    # the reference: each micro-batch alone through the plain step (lr 0), gradients averaged here
    micro = []
    losses = []
    for i in range(k):
        losses.append(one.run(tokens[i], targets[i], t=1, lr=0.0).loss)
        micro.append(one.grads.to_numpy().copy())
    want = (micro[0] * np.float32(0.5)) + (micro[1] * np.float32(0.5))
    seen = []  # the gradient hooks see the accumulated gradient (before clipping)
    acc.grad_hooks.append(lambda bucket: seen.append(acc.grads.to_numpy().copy()) if bucket.index == 0 else None)
    result = acc.run(tokens, targets, t=1, lr=1e-3)
    assert np.array_equal(seen[0], want)  # bit for bit: same scaling and order
    assert result.loss == pytest.approx((losses[0] + losses[1]) / 2, abs=0)
    norm = float(np.sqrt(np.sum(want.astype(np.float64) ** 2)))
    assert result.grad_norm == pytest.approx(norm, rel=1e-5)  # the optimizer sums in float32
    # one batch of 2B rows: the same gradient up to float32 rounding of the sums
    big = backend.train_step(backend.upload_params(random_init(CFG, 0)), TrainSpec(B=2 * B, T=T, adamw=adamw))
    big_seen = []
    big.grad_hooks.append(lambda bucket: big_seen.append(big.grads.to_numpy().copy()) if bucket.index == 0 else None)
    r_big = big.run(tokens.reshape(2 * B, T), targets.reshape(2 * B, T), t=1, lr=1e-3)
    assert r_big.loss == pytest.approx(result.loss, abs=1e-5)
    np.testing.assert_allclose(big_seen[0], want, rtol=1e-3, atol=1e-7)


def test_grad_accumulation_refuses_a_batch_of_the_wrong_shape():
    backend = get_backend("onnxruntime")()
    step = backend.train_step(backend.upload_params(random_init(CFG, 0)), TrainSpec(B=2, T=8, grad_accum=3))
    tokens, targets = _batches(2, 2, 8)
    with pytest.raises(ValueError, match="micro-batches"):
        step.run(tokens, targets, t=1, lr=0.0)


def test_recompute_clones_gelu_and_layernorm_for_backward():
    plain = training_graph(CFG, backend="onnxruntime")
    model = training_graph(CFG, backend="onnxruntime", recompute=True)
    clones = [n for n in model.graph.node if n.name.endswith(SUFFIX)]
    kinds = sorted(n.op_type for n in clones)
    # per layer: the GELU (read by the fc_proj weight gradient) and both layer norms (read
    # by the qkv / fc weight gradients); the final layer norm feeds the tied LM head
    assert kinds == ["Gelu"] * CFG.n_layer + ["LayerNormalization"] * (2 * CFG.n_layer + 1)
    assert len(model.graph.node) == len(plain.graph.node) + len(clones)
    # the forward outputs are no longer read by backward nodes: each original's output
    # has only forward readers now, and the planned peak drops
    dims = {"B": 4, "T": 64}
    assert plan_model(model, dims).peak_bytes < plan_model(plain, dims).peak_bytes


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_recompute_gives_the_same_gradients_on_onnxruntime(precision):
    backend = get_backend("onnxruntime")()
    tokens, targets = _batches(1, 2, 16, seed=3)
    params = random_init(CFG, 1)
    outs = []
    for recompute in (False, True):
        program = backend.prepare(training_graph(CFG, backend="onnxruntime", precision=precision,
                                                 recompute=recompute))
        program.bind(params.feeds())
        outs.append(program.run({"tokens": tokens[0], "targets": targets[0]}))
    assert outs[0].keys() == outs[1].keys()
    for name in outs[0]:
        assert np.array_equal(np.asarray(outs[0][name]), np.asarray(outs[1][name])), name


def _train_cli(capsys, tiny_shards, model, *extra):
    from graphc.cli.main import main

    code = main(["train", "--model", str(model), "--train-data", str(tiny_shards.train_path),
                 "--val-data", str(tiny_shards.val_path), "-t", "16", "--steps", "4", "--val-every", "2",
                 "--lr", "1e-3", *extra])
    out = capsys.readouterr()
    return code, [line.split(" (took")[0] for line in out.out.splitlines() if "loss" in line], out.err


def test_total_batch_size_accumulates_micro_batches(tmp_path, tiny_shards, capsys):
    """--total-batch-size 64 at -b 2 -t 16: two micro-batches per step, llm.c's data order,
    so the run tracks -b 4 (same tokens per step; val over the same tokens) within float32
    summation order;
    --recompute changes nothing on onnxruntime (the same ops, recomputed)."""
    from graphc.models.llmc import save_llmc

    model = tmp_path / "m.bin"
    save_llmc(random_init(CFG, seed=2), model)
    code, accum, _ = _train_cli(capsys, tiny_shards, model, "-b", "2", "--total-batch-size", "64",
                                  "--val-batches", "2")
    assert code == 0
    code, big, _ = _train_cli(capsys, tiny_shards, model, "-b", "4", "--val-batches", "1")
    assert code == 0
    code, recomputed, _ = _train_cli(capsys, tiny_shards, model, "-b", "2", "--total-batch-size", "64",
                                       "--val-batches", "2", "--recompute")
    assert code == 0 and recomputed == accum
    assert len(accum) == len(big) == 4 + 3  # 4 steps, val before 0 and 2, and at the end
    for a, b in zip(accum, big):
        assert a.split("loss")[0] == b.split("loss")[0]   # "val " / "step S: train "
        la, lb = float(a.split("loss ")[1].split()[0]), float(b.split("loss ")[1].split()[0])
        assert abs(la - lb) < 2e-4, (a, b)


def test_total_batch_size_must_be_a_multiple_of_the_batch(tmp_path, tiny_shards, capsys):
    code, _, err = _train_cli(capsys, tiny_shards, "L2H2C64", "-b", "2", "--total-batch-size", "48")
    assert code == 2
    assert err.strip() == "error: graphc train: --total-batch-size: 48 tokens is not a multiple of B*T = 2*16 = 32"
