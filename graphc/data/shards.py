"""llm.c token shards and the data loader that walks them.

A shard is llm.c's ``.bin`` token file (``dev/data/data_common.py`` ``write_datafile``,
read by ``llmc/dataloader.h``): a header of 256 little-endian int32 ``[20240520, 1, ntok]``
followed by ``ntok`` uint16 token ids. graphc reads and writes the same bytes, so shards
made by llm.c's scripts train graphc models and vice versa.

:class:`TokenLoader` reproduces llm.c's ``DataLoader`` batch for batch (shuffling off), which
is what lets a graphc training run be compared step by step against llm.c's.
"""

from __future__ import annotations

import glob as _glob
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from graphc.errors import GraphcError
from graphc.fileio import atomic_write

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


# ----------------------------------------------------------------------------------------------
# Reading and writing one shard


def write_shard(path: str | os.PathLike, tokens) -> None:
    """Write ``tokens`` as an llm.c shard (atomically, so a crash never leaves half a shard).

    Ids must fit uint16, as llm.c's format stores them; an id outside ``[0, 65536)`` would be
    silently wrapped by a plain cast, so it is an error instead. Empty shards are refused
    because llm.c (and :func:`read_shard`) reject them.
    """
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size == 0:
        raise GraphcError(path, "refusing to write an empty shard (llm.c requires at least one token)", "ntok")
    if not np.issubdtype(arr.dtype, np.integer):
        raise GraphcError(path, f"token ids must be integers, got dtype {arr.dtype}", "tokens")
    if arr.size >= 2**31:
        raise GraphcError(path, f"{arr.size} tokens do not fit the int32 token count", "ntok")
    bad = np.flatnonzero((arr < 0) | (arr >= 2**16))
    if bad.size:
        pos = int(bad[0])
        raise GraphcError(path, f"token id {int(arr[pos])} at position {pos} does not fit uint16", "tokens")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = arr.size
    with atomic_write(path) as f:
        f.write(header.tobytes())
        f.write(arr.astype("<u2").tobytes())


def read_shard_header(path: str | os.PathLike) -> int:
    """Validate a shard's header against its file size and return its token count.

    These are the checks llm.c's ``dataloader_load_shard_`` makes (magic, version,
    ``ntok > 0``, ``size == 1024 + 2*ntok``), each reported with the file and field instead
    of an ``exit(1)``. Only the header is read, so checking a large dataset is cheap.
    """
    path = Path(path)
    if not path.exists():
        raise GraphcError(path, "not found", "token shard")
    if path.is_dir():
        raise GraphcError(path, "is a directory, expected a file", "token shard")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise GraphcError(path, f"file is truncated: {size} bytes is shorter than the {HEADER_BYTES}-byte header", "header")
    header = np.frombuffer(raw, dtype="<i4")
    if int(header[0]) != SHARD_MAGIC:
        raise GraphcError(path, f"bad magic {int(header[0])}, expected {SHARD_MAGIC} (not an llm.c token shard?)", "magic")
    if int(header[1]) != SHARD_VERSION:
        raise GraphcError(path, f"unknown version {int(header[1])}, expected {SHARD_VERSION}", "version")
    ntok = int(header[2])
    if ntok < 0:
        raise GraphcError(path, f"negative token count {ntok}", "ntok")
    if ntok == 0:
        raise GraphcError(path, "empty shard: the header says 0 tokens", "ntok")
    expected = HEADER_BYTES + 2 * ntok
    if size < expected:
        raise GraphcError(path, f"file is truncated: header says {ntok} tokens ({expected} bytes), file has {size} bytes", "ntok")
    if size > expected:
        raise GraphcError(path, f"file size {size} does not match the header's {ntok} tokens ({expected} bytes)", "ntok")
    return ntok


def read_shard(path: str | os.PathLike, *, mmap: bool = False) -> np.ndarray:
    """The tokens of an llm.c shard as uint16, after :func:`read_shard_header`'s checks.

    With ``mmap=True`` the tokens stay on disk (an ``np.memmap``), which is what the loader
    uses: FineWeb-sized shards are 200 MB each and only ``B*T+1`` tokens are needed per step.
    """
    path = Path(path)
    ntok = read_shard_header(path)
    if mmap:
        return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(ntok,))
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        data = f.read(2 * ntok)
    if len(data) != 2 * ntok:  # the file shrank after the size check
        raise GraphcError(path, f"file is truncated: expected {2 * ntok} token bytes, read {len(data)}", "tokens")
    return np.frombuffer(data, dtype="<u2").copy()


def shard_paths(glob_or_path: str | os.PathLike) -> list[Path]:
    """The shard files named by a glob pattern (sorted, as C's ``glob()``) or a single path.

    llm.c takes its data as a pattern like ``data/fineweb_train_*.bin``; keeping the same
    convention (and ordering: byte-wise sorted names) means the same argument selects the
    same shards in the same order in both programs.
    """
    text = os.fspath(glob_or_path)
    if re.search(r"[*?\[]", text) and not Path(text).exists():
        matches = sorted(_glob.glob(text))
        if not matches:
            raise GraphcError(text, "no files match", "token shards")
        return [Path(m) for m in matches]
    path = Path(text)
    if not path.exists():
        raise GraphcError(path, "no files match", "token shards")
    return [path]


def validate_tokens(tokens, vocab_size: int, where) -> None:
    """Raise if any token id is outside ``[0, vocab_size)``, naming ``where`` and the first bad position.

    uint16 shards can hold ids up to 65535, beyond GPT-2's 50257; an embedding lookup with
    such an id would read out of bounds (or be clamped silently by some backends), so it is
    caught at load time instead.
    """
    arr = np.asarray(tokens).reshape(-1)
    if arr.size == 0:
        return
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        pos = int(bad[0])
        raise GraphcError(
            where,
            f"token id {int(arr[pos])} at position {pos} is outside the vocabulary (vocab_size {vocab_size}); "
            f"{bad.size} bad ids in all",
            "tokens",
        )


# ----------------------------------------------------------------------------------------------
# The loader


class TokenLoader:
    """Batches of ``(inputs, targets)`` from token shards, in llm.c's ``DataLoader`` order.

    For each shard, ``shard_num_samples = (ntok - 1) // (num_processes*B*T)``; sample ``i``
    reads ``tokens[i*N + rank*B*T : ... + B*T + 1]`` (``N = num_processes*B*T``); inputs are
    the first ``B*T`` of those as ``(B, T)``, targets the same shifted by one. Like llm.c the
    position is advanced lazily: :meth:`next_batch` moves to the next shard only when the
    current one is used up, and after the last shard wraps to shard 0 (a new epoch). The
    tail of each shard that does not fill a sample is skipped, exactly as llm.c does.

    ``shuffle=True`` draws, from ``numpy.random.default_rng(seed + process_rank)``, a fresh
    permutation of the shard order at the start of each epoch and a permutation of sample
    order each time a shard is entered. This mirrors the *structure* of llm.c's shuffling but
    is graphc's own order: llm.c's mt19937-based permutation is not reproduced bit for bit.
    :meth:`state` / :meth:`restore` capture everything needed to resume exactly.

    ``process_rank`` / ``num_processes`` split each sample between data-parallel workers the
    way llm.c does; the defaults (0 / 1) are the single-process case.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        B: int,
        T: int,
        *,
        shuffle: bool = False,
        seed: int = 42,
        process_rank: int = 0,
        num_processes: int = 1,
        vocab_size: int | None = None,
    ):
        if B <= 0 or T <= 0:
            raise GraphcError(None, f"batch size B={B} and sequence length T={T} must be positive", "-b/-t")
        if not 0 <= process_rank < num_processes:
            raise GraphcError(None, f"process_rank {process_rank} must be in [0, {num_processes})", "rank")
        if isinstance(shards, (str, os.PathLike)):
            self.paths = shard_paths(shards)
        else:
            self.paths = [Path(p) for p in shards]
            if not self.paths:
                raise GraphcError(None, "no token shards given", "token shards")
        self.B, self.T = int(B), int(T)
        self.process_rank, self.num_processes = int(process_rank), int(num_processes)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.vocab_size = vocab_size

        # Validate every shard up front (as llm.c's dataloader_init does) so that a bad shard
        # fails at startup rather than hours into training.
        need = self.num_processes * self.B * self.T + 1
        self._tokens: list[np.ndarray] = []
        self.shard_ntok: list[int] = []
        for p in self.paths:
            toks = read_shard(p, mmap=True)
            if toks.size < need:
                raise GraphcError(
                    p, f"shard has {toks.size} tokens, fewer than one batch needs (B*T+1 = {need})", "ntok"
                )
            if vocab_size is not None:
                validate_tokens(toks, vocab_size, p)
            self._tokens.append(toks)
            self.shard_ntok.append(int(toks.size))
        self.num_tokens = sum(self.shard_ntok)
        self.reset()

    # -- llm.c's dataloader_reset / dataloader_advance_ ------------------------------------------

    def shard_num_samples(self, shard: int) -> int:
        """Samples in file ``shard`` (an index into :attr:`paths`): llm.c's formula."""
        return (self.shard_ntok[shard] - 1) // (self.num_processes * self.B * self.T)

    def _enter_shard(self, shard_idx: int) -> None:
        self.shard_idx = shard_idx
        self.sample_idx = 0
        if self.shuffle:
            n = self.shard_num_samples(self._file_index())
            self.sample_order = [int(i) for i in self._rng.permutation(n)]

    def _start_epoch(self) -> None:
        if self.shuffle:
            self.shard_order = [int(i) for i in self._rng.permutation(len(self.paths))]
        self._enter_shard(0)

    def reset(self) -> None:
        """Rewind to the very beginning, as if just constructed (epoch 0, same shuffle seed).

        This differs from llm.c's ``dataloader_reset`` only with shuffling on, where llm.c keeps
        drawing from its generator; rewinding fully makes e.g. repeated evaluation passes
        identical. Epoch wrap-around inside :meth:`next_batch` does keep drawing.
        """
        self.epoch = 0
        self._rng = np.random.default_rng(self.seed + self.process_rank)
        self.shard_order = list(range(len(self.paths)))
        self.sample_order: list[int] | None = None
        self._start_epoch()

    def _file_index(self) -> int:
        return self.shard_order[self.shard_idx]

    def _advance(self) -> None:
        if self.shard_idx == len(self.paths) - 1:
            self.epoch += 1
            self._start_epoch()
        else:
            self._enter_shard(self.shard_idx + 1)

    # -- batches ----------------------------------------------------------------------------

    @property
    def current_path(self) -> Path:
        """The shard file the next batch comes from (before any lazy advance)."""
        return self.paths[self._file_index()]

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The next ``(inputs, targets)``, each int64 of shape ``(B, T)``."""
        if self.sample_idx >= self.shard_num_samples(self._file_index()):
            self._advance()
        file_idx = self._file_index()
        idx = self.sample_order[self.sample_idx] if self.shuffle else self.sample_idx
        BT = self.B * self.T
        start = idx * self.num_processes * BT + self.process_rank * BT
        buf = np.asarray(self._tokens[file_idx][start : start + BT + 1], dtype=np.int64)
        self.sample_idx += 1
        inputs = buf[:-1].reshape(self.B, self.T)
        targets = buf[1:].reshape(self.B, self.T)
        return inputs, targets

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        return self.next_batch()

    def batches_per_epoch(self) -> int:
        """Batches in one full pass over all shards."""
        return sum(self.shard_num_samples(i) for i in range(len(self.paths)))

    # -- resumable state --------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "B": self.B,
            "T": self.T,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "process_rank": self.process_rank,
            "num_processes": self.num_processes,
            "shards": [[p.name, n] for p, n in zip(self.paths, self.shard_ntok)],
        }

    def state(self) -> dict[str, Any]:
        """Position and generator state as a plain JSON-able dict (for checkpoints).

        The current permutations are stored, not just the generator, because they were drawn
        earlier and cannot be re-derived from the generator's present state. A fingerprint of
        the configuration (B, T, shuffle, seed, shard names and sizes) is included so that
        restoring onto different data is refused rather than silently misaligned.
        """
        return {
            "shard_idx": self.shard_idx,
            "sample_idx": self.sample_idx,
            "epoch": self.epoch,
            "shard_order": list(self.shard_order),
            "sample_order": list(self.sample_order) if self.sample_order is not None else None,
            "rng": _jsonable(self._rng.bit_generator.state),
            "config": self._fingerprint(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state` dict; the following batches equal those the saved loader would give."""
        try:
            config = state["config"]
            mine = self._fingerprint()
            if config != mine:
                diff = [k for k in mine if config.get(k) != mine[k]]
                raise GraphcError("loader state", f"saved for a different configuration (differs in: {', '.join(diff)})")
            shard_idx, sample_idx = int(state["shard_idx"]), int(state["sample_idx"])
            shard_order = [int(i) for i in state["shard_order"]]
            sample_order = None if state["sample_order"] is None else [int(i) for i in state["sample_order"]]
            epoch = int(state["epoch"])
            rng = np.random.default_rng()
            rng.bit_generator.state = state["rng"]
        except (KeyError, TypeError, ValueError) as e:
            raise GraphcError("loader state", f"malformed ({type(e).__name__}: {e})") from None
        if sorted(shard_order) != list(range(len(self.paths))) or not 0 <= shard_idx < len(self.paths):
            raise GraphcError("loader state", "shard order/index does not fit the shards", "shard_idx")
        n = self.shard_num_samples(shard_order[shard_idx])
        if not 0 <= sample_idx <= n:
            raise GraphcError("loader state", f"sample index {sample_idx} out of range [0, {n}]", "sample_idx")
        if self.shuffle and (sample_order is None or sorted(sample_order) != list(range(n))):
            raise GraphcError("loader state", "sample order does not fit the current shard", "sample_order")
        self.shard_order, self.shard_idx, self.sample_idx = shard_order, shard_idx, sample_idx
        self.sample_order, self.epoch, self._rng = sample_order, epoch, rng


def _jsonable(obj):
    """Deep-copy numpy scalars/arrays in a generator state into plain Python values."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


__all__ = [
    "HEADER_BYTES",
    "SHARD_MAGIC",
    "SHARD_VERSION",
    "TokenLoader",
    "read_shard",
    "read_shard_header",
    "shard_paths",
    "validate_tokens",
    "write_shard",
]
