"""llm.c token shards and the llm.c-order data loader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graphc.data.shards import (
    TokenLoader,
    read_shard,
    read_shard_header,
    shard_paths,
    validate_tokens,
    write_shard,
)
from graphc.errors import GraphcError


def _header(magic=20240520, version=1, ntok=0):
    h = np.zeros(256, dtype="<i4")
    h[:3] = [magic, version, ntok]
    return h.tobytes()


# --------------------------------------------------------------------------------------------
# One shard


def test_round_trip_and_exact_bytes(tmp_path):
    path = tmp_path / "s.bin"
    toks = [50256, 0, 1, 65535, 12345]
    write_shard(path, toks)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * len(toks)
    assert raw == _header(ntok=5) + np.array(toks, dtype="<u2").tobytes()
    got = read_shard(path)
    assert got.dtype == np.uint16 and got.tolist() == toks
    mm = read_shard(path, mmap=True)
    assert isinstance(mm, np.memmap) and mm.tolist() == toks
    assert read_shard_header(path) == 5


def test_write_accepts_numpy_and_overwrites_atomically(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(10, dtype=np.int64))
    write_shard(path, np.arange(3, dtype=np.uint16))
    assert read_shard(path).tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]


@pytest.mark.parametrize(
    "tokens, words",
    [
        ([1, 2, 65536], "token id 65536 at position 2"),
        ([-1, 2], "token id -1 at position 0"),
        ([], "empty shard"),
        (np.array([1.0, 2.0]), "integers"),
    ],
)
def test_write_rejects_bad_tokens(tmp_path, tokens, words):
    path = tmp_path / "bad.bin"
    with pytest.raises(GraphcError, match=words) as e:
        write_shard(path, tokens)
    assert "bad.bin" in str(e.value)
    assert not list(tmp_path.iterdir()), "nothing may be left behind"


@pytest.mark.parametrize(
    "content, field, words",
    [
        (_header(magic=20240801, ntok=2) + b"\0" * 4, "magic", "bad magic 20240801"),
        (_header(version=7, ntok=2) + b"\0" * 4, "version", "unknown version 7"),
        (_header(ntok=0), "ntok", "empty shard"),
        (_header(ntok=-3), "ntok", "negative"),
        (_header(ntok=10) + b"\0" * 19, "ntok", "truncated"),
        (_header(ntok=10) + b"\0" * 22, "ntok", "does not match"),
        (_header(ntok=10)[:100], "header", "truncated"),
        (b"", "header", "truncated"),
    ],
)
def test_read_rejects_bad_files(tmp_path, content, field, words):
    path = tmp_path / "broken_shard.bin"
    path.write_bytes(content)
    for reader in (read_shard, lambda p: read_shard(p, mmap=True), read_shard_header):
        with pytest.raises(GraphcError, match=words) as e:
            reader(path)
        assert str(path) in str(e.value) and e.value.field == field


def test_read_missing_and_directory(tmp_path):
    with pytest.raises(GraphcError, match="not found") as e:
        read_shard(tmp_path / "nope.bin")
    assert "nope.bin" in str(e.value)
    with pytest.raises(GraphcError, match="directory"):
        read_shard(tmp_path)


def test_validate_tokens(tmp_path):
    validate_tokens(np.array([0, 5, 50256], dtype=np.uint16), 50257, "x.bin")
    with pytest.raises(GraphcError) as e:
        validate_tokens(np.array([0, 50257, 3, 60000], dtype=np.uint16), 50257, tmp_path / "x.bin")
    msg = str(e.value)
    assert "x.bin" in msg and "50257 at position 1" in msg and "2 bad ids" in msg


# --------------------------------------------------------------------------------------------
# Globbing


def test_shard_paths(tmp_path):
    for name in ["train_002.bin", "train_000.bin", "train_001.bin", "val_000.bin"]:
        write_shard(tmp_path / name, [1, 2])
    got = shard_paths(str(tmp_path / "train_*.bin"))
    assert [p.name for p in got] == ["train_000.bin", "train_001.bin", "train_002.bin"]
    assert shard_paths(tmp_path / "val_000.bin") == [tmp_path / "val_000.bin"]
    assert [p.name for p in shard_paths(str(tmp_path / "train_00[02].bin"))] == ["train_000.bin", "train_002.bin"]
    with pytest.raises(GraphcError, match="no files match") as e:
        shard_paths(str(tmp_path / "fineweb_*.bin"))
    assert "fineweb_*.bin" in str(e.value)
    with pytest.raises(GraphcError, match="no files match"):
        shard_paths(tmp_path / "missing.bin")


# --------------------------------------------------------------------------------------------
# The loader, against a hand-computed llm.c order


@pytest.fixture
def two_shards(tmp_path):
    # Written out of order: the loader must use sorted glob order.
    write_shard(tmp_path / "train_001.bin", 200 + np.arange(15))  # (15-1)//6 = 2 samples
    write_shard(tmp_path / "train_000.bin", 100 + np.arange(23))  # (23-1)//6 = 3 samples, tail skipped
    return str(tmp_path / "train_*.bin")


def test_loader_order_shard_switch_and_epoch_wrap(two_shards):
    loader = TokenLoader(two_shards, B=2, T=3)
    assert [loader.shard_num_samples(i) for i in range(2)] == [3, 2]
    assert loader.batches_per_epoch() == 5 and loader.num_tokens == 38

    x, y = loader.next_batch()
    assert x.dtype == np.int64 and y.dtype == np.int64 and x.shape == y.shape == (2, 3)
    assert x.tolist() == [[100, 101, 102], [103, 104, 105]]
    assert y.tolist() == [[101, 102, 103], [104, 105, 106]]

    x, y = loader.next_batch()
    assert x.tolist() == [[106, 107, 108], [109, 110, 111]]
    assert y.tolist() == [[107, 108, 109], [110, 111, 112]]

    x, y = loader.next_batch()  # last sample of shard 0; tokens 119..122 are never read
    assert x.tolist() == [[112, 113, 114], [115, 116, 117]]
    assert y.tolist() == [[113, 114, 115], [116, 117, 118]]
    assert loader.epoch == 0 and loader.shard_idx == 0 and loader.sample_idx == 3  # lazy advance

    x, y = loader.next_batch()  # shard switch
    assert loader.current_path.name == "train_001.bin"
    assert x.tolist() == [[200, 201, 202], [203, 204, 205]]
    assert y.tolist() == [[201, 202, 203], [204, 205, 206]]

    x, y = loader.next_batch()
    assert x.tolist() == [[206, 207, 208], [209, 210, 211]]
    assert y.tolist() == [[207, 208, 209], [210, 211, 212]]

    x, y = loader.next_batch()  # epoch wrap back to shard 0
    assert loader.epoch == 1 and loader.current_path.name == "train_000.bin"
    assert x.tolist() == [[100, 101, 102], [103, 104, 105]]

    loader.reset()
    assert loader.epoch == 0
    assert loader.next_batch()[0][0, 0] == 100


def test_loader_single_shard_wraps(tmp_path):
    path = tmp_path / "one.bin"
    write_shard(path, np.arange(9))  # B*T = 4: (9-1)//4 = 2 samples
    loader = TokenLoader(path, B=1, T=4)
    starts = [int(loader.next_batch()[0][0, 0]) for _ in range(5)]
    assert starts == [0, 4, 0, 4, 0]
    assert loader.epoch == 2


def test_loader_multi_process_split(two_shards):
    # 2 processes: a sample is 12 tokens; rank r reads its B*T slice at offset r*6.
    r0 = TokenLoader(two_shards, B=2, T=3, process_rank=0, num_processes=2)
    r1 = TokenLoader(two_shards, B=2, T=3, process_rank=1, num_processes=2)
    assert [r0.shard_num_samples(i) for i in range(2)] == [1, 1]
    assert r0.next_batch()[0].tolist() == [[100, 101, 102], [103, 104, 105]]
    x, y = r1.next_batch()
    assert x.tolist() == [[106, 107, 108], [109, 110, 111]]
    assert y[-1, -1] == 112
    assert r1.next_batch()[0][0, 0] == 206


def test_loader_rejects_short_shard(tmp_path):
    write_shard(tmp_path / "a.bin", np.arange(100))
    write_shard(tmp_path / "b.bin", np.arange(24))  # needs B*T+1 = 25
    with pytest.raises(GraphcError, match="fewer than one batch needs") as e:
        TokenLoader(str(tmp_path / "*.bin"), B=4, T=6)
    assert "b.bin" in str(e.value)


def test_loader_vocab_check_and_bad_shard(tmp_path):
    write_shard(tmp_path / "ok.bin", np.arange(50))
    write_shard(tmp_path / "big_ids.bin", [1, 2, 3, 50257, 4, 5, 6, 7, 8])
    with pytest.raises(GraphcError, match="50257 at position 3") as e:
        TokenLoader([tmp_path / "big_ids.bin"], B=2, T=2, vocab_size=50257)
    assert "big_ids.bin" in str(e.value)
    (tmp_path / "trunc.bin").write_bytes(_header(ntok=100) + b"\0" * 10)
    with pytest.raises(GraphcError, match="truncated") as e:
        TokenLoader([tmp_path / "ok.bin", tmp_path / "trunc.bin"], B=2, T=2)
    assert "trunc.bin" in str(e.value)
    with pytest.raises(GraphcError, match="no files match"):
        TokenLoader(str(tmp_path / "nothing_*.bin"), B=2, T=2)


# --------------------------------------------------------------------------------------------
# Shuffling and resumption


@pytest.fixture
def many_shards(tmp_path):
    for s, n in enumerate([61, 45, 80, 33]):
        write_shard(tmp_path / f"d_{s}.bin", 1000 * (s + 1) + np.arange(n))
    return str(tmp_path / "d_*.bin")


def _starts(loader, n):
    return [int(loader.next_batch()[0][0, 0]) for _ in range(n)]


def test_shuffle_reproducible_and_a_permutation(many_shards):
    plain = TokenLoader(many_shards, B=2, T=4)
    per_epoch = plain.batches_per_epoch()
    assert per_epoch == 7 + 5 + 9 + 4
    unshuffled = _starts(plain, per_epoch)

    a = TokenLoader(many_shards, B=2, T=4, shuffle=True, seed=7)
    b = TokenLoader(many_shards, B=2, T=4, shuffle=True, seed=7)
    c = TokenLoader(many_shards, B=2, T=4, shuffle=True, seed=8)
    sa, sb, sc = _starts(a, 3 * per_epoch), _starts(b, 3 * per_epoch), _starts(c, 3 * per_epoch)
    assert sa == sb
    assert sa != sc
    for e in range(3):  # every epoch visits every sample exactly once, in a new order
        assert sorted(sa[e * per_epoch : (e + 1) * per_epoch]) == sorted(unshuffled)
    assert sa[:per_epoch] != unshuffled
    assert sa[:per_epoch] != sa[per_epoch : 2 * per_epoch]
    # samples of one shard stay together (shards are visited one at a time)
    shards_visited = [s // 1000 for s in sa[:per_epoch]]
    assert len([i for i in range(1, per_epoch) if shards_visited[i] != shards_visited[i - 1]]) == 3

    a.reset()
    assert _starts(a, per_epoch) == sa[:per_epoch]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("k", [0, 3, 7, 24, 25, 26, 40])
def test_state_restore_is_exact(many_shards, shuffle, k):
    src = TokenLoader(many_shards, B=2, T=4, shuffle=shuffle, seed=3)
    for _ in range(k):
        src.next_batch()
    state = json.loads(json.dumps(src.state()))  # must survive a JSON checkpoint
    expected = [src.next_batch() for _ in range(30)]

    dst = TokenLoader(many_shards, B=2, T=4, shuffle=shuffle, seed=3)
    dst.next_batch()  # arbitrary position before restoring
    dst.restore(state)
    assert dst.epoch == state["epoch"]
    for (ex, ey), (gx, gy) in zip(expected, (dst.next_batch() for _ in range(30))):
        np.testing.assert_array_equal(ex, gx)
        np.testing.assert_array_equal(ey, gy)


def test_restore_refuses_other_config_and_garbage(many_shards, two_shards):
    state = TokenLoader(many_shards, B=2, T=4, shuffle=True).state()
    with pytest.raises(GraphcError, match="different configuration.*T"):
        TokenLoader(many_shards, B=2, T=3, shuffle=True).restore(state)
    with pytest.raises(GraphcError, match="different configuration.*shards"):
        TokenLoader(two_shards, B=2, T=4, shuffle=True).restore(state)
    other = TokenLoader(many_shards, B=2, T=4, shuffle=True)
    with pytest.raises(GraphcError, match="malformed"):
        other.restore({"config": state["config"]})
    bad = dict(state, sample_idx=999)
    with pytest.raises(GraphcError, match="out of range"):
        other.restore(bad)
    assert other.state() == TokenLoader(many_shards, B=2, T=4, shuffle=True).state(), "failed restore must not change the loader"
