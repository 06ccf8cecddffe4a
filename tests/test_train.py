"""`graphc train` against an independent PyTorch re-implementation of llm.c's CPU trainer.

The reference uses tests/torch_gpt2.py for forward/backward, llm.c's AdamW formula written
out in torch, and llm.c's data order computed here by slicing the shard directly.
"""

import re

import numpy as np
import pytest
import torch

from graphc.cli.main import main
from graphc.data.shards import read_shard
from graphc.errors import GraphcError
from graphc.models.config import GPT2Config
from graphc.models.init import random_init
from graphc.models.llmc import load_llmc, save_llmc
from graphc.runtime.optimizer import AdamWConfig
from graphc.runtime.trainer import TrainConfig, Trainer
from torch_gpt2 import TorchGPT2

CFG = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=128)
STEP = re.compile(r"step (\d+): train loss (\d+\.\d{6}) \(took \d+\.\d ms\)")
VAL = re.compile(r"val loss (\d+\.\d{6})")


def parse(out: str):
    events = []
    for line in out.splitlines():
        if m := STEP.fullmatch(line):
            events.append(("train", int(m.group(1)), float(m.group(2))))
        elif m := VAL.fullmatch(line):
            events.append(("val", None, float(m.group(1))))
    return events


def reference_run(params, train_path, val_path, B, T, steps, val_every, val_batches, lr=1e-4, b1=0.9, b2=0.999,
                  eps=1e-8, wd=0.0):
    """llm.c train_gpt2.c's loop (shuffling off), in PyTorch."""
    train = read_shard(train_path).astype(np.int64)
    val = read_shard(val_path).astype(np.int64)
    model = TorchGPT2(params)
    ps = list(model.parameters())
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    events = []

    def batch(tokens, i):
        span = torch.from_numpy(tokens[i * B * T: i * B * T + B * T + 1])
        return span[:-1].view(B, T), span[1:].view(B, T)

    def val_loss():
        with torch.no_grad():
            return float(np.float32(np.mean([float(model(*batch(val, i))[1]) for i in range(val_batches)])))

    n_train = (len(train) - 1) // (B * T)
    for step in range(steps):
        if step % val_every == 0:
            events.append(("val", None, val_loss()))
        for p in ps:
            p.grad = None
        _, loss = model(*batch(train, step % n_train))
        loss.backward()
        t = step + 1
        with torch.no_grad():
            for p, m, v in zip(ps, ms, vs):
                g = p.grad
                m.mul_(b1).add_((1 - b1) * g)
                v.mul_(b2).add_((1 - b2) * g * g)
                m_hat = m / (1 - b1 ** t)
                v_hat = v / (1 - b2 ** t)
                p.sub_(lr * (m_hat / (v_hat.sqrt() + eps) + wd * p))
        events.append(("train", step, float(loss.detach())))
    events.append(("val", None, val_loss()))
    return events


def test_train_matches_llmc_reference(tmp_path, tiny_shards, capsys):
    model = tmp_path / "m.bin"
    save_llmc(random_init(CFG, seed=7), model)
    B, T, steps = 2, 32, 12
    code = main(["train", "--model", str(model), "--train-data", str(tiny_shards.train_path),
                 "--val-data", str(tiny_shards.val_path), "-b", str(B), "-t", str(T), "--steps", str(steps),
                 "--val-every", "5", "--val-batches", "2", "--lr", "1e-3"])
    assert code == 0
    got = parse(capsys.readouterr().out)
    expected = reference_run(load_llmc(model), tiny_shards.train_path, tiny_shards.val_path, B, T, steps, 5, 2,
                             lr=1e-3)
    assert [(k, s) for k, s, _ in got] == [(k, s) for k, s, _ in expected]
    for (kind, step, a), (_, _, b) in zip(got, expected):
        assert abs(a - b) <= 1e-4, (kind, step, a, b)
    # training did something
    train_losses = [x for k, _, x in got if k == "train"]
    assert train_losses[-1] < train_losses[0]


def make_trainer(tmp_path, tiny_shards, out, steps=6, **kw):
    params = random_init(CFG, seed=1)
    config = TrainConfig(B=2, T=16, steps=steps, val_every=3, val_batches=1,
                         adamw=AdamWConfig(lr=1e-3, weight_decay=0.1, grad_clip=1.0), warmup=2, lr_final_frac=0.1,
                         **kw)
    lines = []
    trainer = Trainer(params, str(tiny_shards.train_path), str(tiny_shards.val_path), config, out=out,
                      emit=lines.append)
    return trainer, lines


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_is_bit_for_bit(tmp_path, tiny_shards, shuffle):
    full, full_lines = make_trainer(tmp_path, tiny_shards, tmp_path / "full", shuffle=shuffle)
    full.run()
    first, first_lines = make_trainer(tmp_path, tiny_shards, tmp_path / "split", shuffle=shuffle)
    first.run(stop_after=3)  # "interrupted" after step 3 (a checkpoint at step 4 is written)
    second, second_lines = make_trainer(tmp_path, tiny_shards, tmp_path / "split", shuffle=shuffle)
    second.resume()
    assert second.step == 4
    second.run()
    losses = lambda ls: [l.split(" (took")[0] for l in ls if l.startswith("step")]  # noqa: E731
    assert losses(first_lines) + losses(second_lines) == losses(full_lines)
    assert np.array_equal(full.params.flat, second.params.flat)
    assert (tmp_path / "full" / "model.bin").read_bytes() == (tmp_path / "split" / "model.bin").read_bytes()
    assert (tmp_path / "full" / "losses.tsv").exists() and (tmp_path / "full" / "loss.png").exists()


def train_until_nan_at(step: int, tmp_path, tiny_shards, monkeypatch) -> GraphcError:
    """A checkpoint every step, and the loss of ``step`` made NaN: the error training stops with."""
    from graphc.runtime import trainer as trainer_module

    original = trainer_module.require_finite_loss
    monkeypatch.setattr(trainer_module, "require_finite_loss",
                        lambda loss, s, out: original(float("nan") if s == step else loss, s, out))
    first, _ = make_trainer(tmp_path, tiny_shards, tmp_path / "run", checkpoint_every=1)
    with pytest.raises(GraphcError) as e:
        first.run()
    monkeypatch.setattr(trainer_module, "require_finite_loss", original)
    return e.value


def test_a_nan_loss_leaves_resume_a_checkpoint_whose_weights_give_a_finite_loss(tmp_path, tiny_shards, monkeypatch):
    """The checkpoint of step s holds the weights whose loss is step s's: when that loss is
    NaN, that checkpoint is useless to resume from, so ``latest`` and ``model.bin`` go back to
    the one before (whose loss was finite), and a resume from there trains on."""
    out = tmp_path / "run"
    error = train_until_nan_at(3, tmp_path, tiny_shards, monkeypatch)
    assert error.message.startswith("the loss became nan at step 3; training stopped; the last good "
                                    f"checkpoint is {out / 'ckpt-000002'} (--resume starts there)")
    assert (out / "latest").read_text() == "ckpt-000002\n"
    assert (out / "model.bin").read_bytes() == (out / "ckpt-000002" / "model.bin").read_bytes()
    assert (out / "ckpt-000003").is_dir()     # the diverged weights stay, for inspection
    second, _ = make_trainer(tmp_path, tiny_shards, out, checkpoint_every=1)
    second.resume()
    assert second.step == 2
    second.run()
    assert second.step == 6 and all(np.isfinite(second.params.flat))


def test_a_nan_loss_at_the_first_checkpoint_leaves_nothing_to_resume(tmp_path, tiny_shards, monkeypatch):
    out = tmp_path / "run"
    error = train_until_nan_at(1, tmp_path, tiny_shards, monkeypatch)
    assert "no checkpoint of this run gives a finite loss" in error.message
    assert not (out / "latest").exists() and not (out / "model.bin").exists() and (out / "ckpt-000001").is_dir()


def test_resume_refuses_different_settings(tmp_path, tiny_shards):
    first, _ = make_trainer(tmp_path, tiny_shards, tmp_path / "run")
    first.run(stop_after=1)
    other, _ = make_trainer(tmp_path, tiny_shards, tmp_path / "run", steps=9)
    from graphc.errors import GraphcError

    with pytest.raises(GraphcError, match="steps"):
        other.resume()


def test_train_bad_inputs(tmp_path, tiny_shards, capsys):
    base = ["train", "--model", "L2H4C64", "--train-data", str(tiny_shards.train_path), "--steps", "1"]
    assert main([*base, "-t", "2000"]) == 2
    assert "2000" in capsys.readouterr().err
    assert main([*base[:4], str(tmp_path / "none*.bin"), "--steps", "1"]) == 2
    assert "no files" in capsys.readouterr().err
    assert main([*base, "--resume"]) == 2
    assert "--out" in capsys.readouterr().err


def test_progress_on_stderr_when_not_a_terminal(tmp_path, tiny_shards, capsys):
    trainer, lines = make_trainer(tmp_path, tiny_shards, None, steps=20)
    trainer.run()
    err = capsys.readouterr().err.splitlines()
    progress = [l for l in err if l.startswith("progress: ")]
    assert len(progress) == 10 and progress[-1].startswith("progress: [20/20]")
    assert all(re.search(r"\d tok/s, ETA \d+:\d\d:\d\d$", l) for l in progress)
    assert not any(l.startswith("progress") for l in lines)  # stdout lines stay the contract's
