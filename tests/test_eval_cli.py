"""`graphc eval` against an independent PyTorch computation of llm.c's val loss."""

import re

import numpy as np
import pytest
import torch

from graphc.cli.main import main
from graphc.data.shards import read_shard, write_shard
from graphc.models.config import GPT2Config
from graphc.models.init import random_init
from graphc.models.llmc import save_llmc
from torch_gpt2 import TorchGPT2

CFG = GPT2Config(n_layer=2, n_head=4, n_embd=64, max_seq_len=128)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "small.bin"
    save_llmc(random_init(CFG, seed=3), path)
    return path


def reference_val_loss(params, shard, B, T, n):
    """llm.c's val loss: batch i = tokens[i*B*T : i*B*T + B*T + 1], mean of batch means."""
    tokens = read_shard(shard).astype(np.int64)
    model = TorchGPT2(params)
    losses = []
    with torch.no_grad():
        for i in range(n):
            span = torch.from_numpy(tokens[i * B * T: i * B * T + B * T + 1])
            _, loss = model(span[:-1].view(B, T), span[1:].view(B, T))
            losses.append(float(loss))
    return float(np.mean(losses))


@pytest.mark.parametrize("opt", [[], ["--no-opt"]])
def test_eval_matches_reference(model_file, tiny_shards, capsys, opt):
    B, T, n = 2, 32, 3
    assert main(["eval", "--model", str(model_file), "--data", str(tiny_shards.val_path), "-b", str(B), "-t", str(T),
                 "--batches", str(n), *opt]) == 0
    out = capsys.readouterr().out
    m = re.fullmatch(r"val loss (\d+\.\d{6})\n", out)
    assert m, out
    from graphc.models.llmc import load_llmc

    expected = reference_val_loss(load_llmc(model_file), tiny_shards.val_path, B, T, n)
    assert abs(float(m.group(1)) - expected) <= 2e-5


def run_error(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_eval_bad_inputs(model_file, tiny_shards, tmp_path, capsys):
    data = str(tiny_shards.val_path)
    base = ["eval", "--data", data, "-b", "1", "-t", "8", "--batches", "1"]
    # missing model file
    assert "nothere.bin" in run_error(["eval", "--model", str(tmp_path / "nothere.bin"), *base[1:]], capsys)
    # wrong magic
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\0" * 2048)
    assert "magic" in run_error(["eval", "--model", str(bad), *base[1:]], capsys)
    # truncated
    trunc = tmp_path / "trunc.bin"
    trunc.write_bytes(model_file.read_bytes()[:5000])
    assert "truncated" in run_error(["eval", "--model", str(trunc), *base[1:]], capsys)
    # sequence longer than the model allows
    msg = run_error(["eval", "--model", str(model_file), "--data", data, "-b", "1", "-t", "129", "--batches", "1"],
                    capsys)
    assert "129" in msg and "128" in msg
    # token id out of range
    oob = tmp_path / "oob.bin"
    write_shard(oob, np.array([1, 2, 50257, 4] * 10, dtype=np.uint16))
    msg = run_error(["eval", "--model", str(model_file), "--data", str(oob), "-b", "1", "-t", "8", "--batches", "1"],
                    capsys)
    assert "oob.bin" in msg and "50257" in msg
    # missing data
    assert "no files" in run_error(["eval", "--model", str(model_file), "--data", str(tmp_path / "x*.bin"),
                                    "-b", "1", "-t", "8", "--batches", "1"], capsys)
    # more batches than the data holds
    assert "--batches" in run_error(["eval", "--model", str(model_file), "--data", data, "-b", "8", "-t", "128",
                                     "--batches", "1000"], capsys)
