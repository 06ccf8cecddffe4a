"""llm.c model checkpoints: ``gpt2_124M.bin`` (version 3, fp32) and version 5 (bf16).

Layout (llm.c ``train_gpt2.c`` / ``train_gpt2.py:write_model``): a header of 256 int32
little-endian values, then the 16 parameter tensors in llm.c's order as one flat array.

==========  ==========================================
header[0]   magic 20240326
header[1]   version: 3 = float32 weights, 5 = bfloat16
header[2]   max sequence length (maxT)
header[3]   vocabulary size (V, 50257)
header[4]   number of layers (L)
header[5]   number of heads (NH)
header[6]   channels (C)
header[7]   padded vocabulary size (Vp, 50304)
==========  ==========================================

graphc always computes with float32 masters: a bf16 file is widened on read, and writing
version 5 rounds to nearest even (what PyTorch's ``.to(torch.bfloat16)`` does).
"""

from __future__ import annotations

import dataclasses
import os

import ml_dtypes
import numpy as np

from graphc.errors import GraphcError
from graphc.fileio import atomic_write, open_input, read_array
from graphc.models.config import GPT2Config
from graphc.models.params import Params, num_parameters, require_finite

MAGIC = 20240326
HEADER_INTS = 256
VERSION_DTYPES = {3: np.dtype(np.float32), 5: np.dtype(ml_dtypes.bfloat16)}


def read_header(path, f) -> tuple[GPT2Config, int]:
    head = f.read(4)
    if len(head) < 4 or int.from_bytes(head, "little") != MAGIC:
        found = f"bad magic {int.from_bytes(head, 'little')}" if len(head) == 4 else f"only {len(head)} bytes"
        raise GraphcError(path, f"{found}, expected magic {MAGIC} (not an llm.c model file)", "header.magic")
    f.seek(0)
    header = read_array(f, np.int32, HEADER_INTS, path, "header")
    version = int(header[1])
    if version not in VERSION_DTYPES:
        raise GraphcError(path, f"unknown version {version}, expected 3 (fp32) or 5 (bf16)", "header.version")
    maxT, V, L, NH, C, Vp = (int(x) for x in header[2:8])
    for field, value in (("maxT", maxT), ("vocab_size", V), ("num_layers", L), ("num_heads", NH),
                         ("channels", C), ("padded_vocab_size", Vp)):
        if value <= 0:
            raise GraphcError(path, f"{field} must be positive, got {value}", f"header.{field}")
    if Vp < V:
        raise GraphcError(path, f"padded vocab {Vp} < vocab {V}", "header.padded_vocab_size")
    if C % NH:
        raise GraphcError(path, f"channels {C} not divisible by heads {NH}", "header.num_heads")
    cfg = GPT2Config(n_layer=L, n_head=NH, n_embd=C, vocab_size=V, padded_vocab_size=Vp, max_seq_len=maxT)
    return cfg, version


def load_llmc(path: str | os.PathLike) -> Params:
    """Read an llm.c model file into float32 :class:`Params`."""
    with open_input(path, "llm.c model file") as f:
        cfg, version = read_header(path, f)
        n = num_parameters(cfg)
        dtype = VERSION_DTYPES[version]
        expected = HEADER_INTS * 4 + n * dtype.itemsize
        actual = os.fstat(f.fileno()).st_size
        if actual < expected:
            raise GraphcError(path, f"file is truncated: header describes {n} parameters "
                              f"({expected} bytes) but the file has {actual} bytes", "parameters")
        if actual > expected:
            raise GraphcError(path, f"file has {actual - expected} bytes past the {n} parameters the header describes",
                              "parameters")
        raw = read_array(f, dtype, n, path, "parameters")
    flat = raw if dtype == np.float32 else raw.astype(np.float32)
    return require_finite(Params(cfg, np.ascontiguousarray(flat)), path)


def save_llmc(params: Params, path: str | os.PathLike, version: int = 3) -> None:
    """Write an llm.c model file atomically (version 3 fp32 or 5 bf16)."""
    if version not in VERSION_DTYPES:
        raise GraphcError(path, f"cannot write version {version}; use 3 (fp32) or 5 (bf16)", "version")
    cfg = params.cfg
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:8] = [MAGIC, version, cfg.max_seq_len, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
                  cfg.padded_vocab_size]
    data = params.flat if version == 3 else params.flat.astype(VERSION_DTYPES[version])
    with atomic_write(path) as f:
        f.write(header.tobytes())
        f.write(np.ascontiguousarray(data).tobytes())


def llmc_model_name(cfg: GPT2Config) -> str:
    """llm.c's file stem for a model, by parameter count without vocab padding: ``gpt2_124M``.

    That gives llm.c's own names for OpenAI's sizes (124M, 355M, 774M, 1558M); smaller models
    count in thousands (``gpt2_44K``).
    """
    n = num_parameters(dataclasses.replace(cfg, padded_vocab_size=cfg.vocab_size))
    return f"gpt2_{round(n / 1e6)}M" if n >= 1_000_000 else f"gpt2_{round(n / 1e3)}K"


def is_llmc_file(path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and int.from_bytes(head, "little") == MAGIC
