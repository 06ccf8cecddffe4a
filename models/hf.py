"""Hugging Face GPT-2 weights (``GPT2LMHeadModel``) to and from graphc's parameters.

Hugging Face stores GPT-2's linear layers as ``Conv1D`` with weights shaped (in, out), the
transpose of llm.c's (out, in); names are ``h.{i}.attn.c_attn.weight`` and so on, with or
without a ``transformer.`` prefix. ``lm_head.weight`` is tied to ``wte`` and ignored on
read. ``config.json`` beside the weights supplies the sizes; without it they are inferred
from the tensor shapes (heads as C / 64, GPT-2's head size at every size).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from graphc.errors import GraphcError
from graphc.models.config import GPT2Config, padded
from graphc.models.params import Params, require_finite
from graphc.models.safetensors_io import read_safetensors, write_safetensors

# llm.c tensor -> (HF per-layer suffix, transpose?)
LAYER_MAP = {
    "ln1w": ("ln_1.weight", False), "ln1b": ("ln_1.bias", False),
    "qkvw": ("attn.c_attn.weight", True), "qkvb": ("attn.c_attn.bias", False),
    "attprojw": ("attn.c_proj.weight", True), "attprojb": ("attn.c_proj.bias", False),
    "ln2w": ("ln_2.weight", False), "ln2b": ("ln_2.bias", False),
    "fcw": ("mlp.c_fc.weight", True), "fcb": ("mlp.c_fc.bias", False),
    "fcprojw": ("mlp.c_proj.weight", True), "fcprojb": ("mlp.c_proj.bias", False),
}
GLOBAL_MAP = {"wte": "wte.weight", "wpe": "wpe.weight", "lnfw": "ln_f.weight", "lnfb": "ln_f.bias"}


def resolve(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a file or a folder holding model.safetensors."""
    path = Path(path)
    if path.is_dir():
        weights = path / "model.safetensors"
        if not weights.exists():
            raise GraphcError(path, "folder has no model.safetensors", "--model")
        cfg = path / "config.json"
        return weights, cfg if cfg.exists() else None
    cfg = path.parent / "config.json"
    return path, cfg if cfg.exists() else None


def gpt2_config_problem(meta: dict) -> str | None:
    """Why a ``config.json`` does not describe GPT-2 (``GPT2LMHeadModel``), or None.

    Keys that are absent are not held against it (graphc's own older exports and hand-written
    configs carry only sizes); a ``model_type`` or ``architectures`` naming something else is.
    """
    model_type = meta.get("model_type", "gpt2")
    if model_type != "gpt2":
        return f"model_type {model_type!r} is not GPT-2 (graphc loads GPT2LMHeadModel checkpoints)"
    architectures = meta.get("architectures") or ["GPT2LMHeadModel"]
    if not any(str(a).startswith("GPT2") for a in architectures):
        return f"architectures {architectures} are not GPT-2 (graphc loads GPT2LMHeadModel checkpoints)"
    activation = meta.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        return f"activation {activation!r} is not GPT-2's tanh GELU"
    return None


def read_gpt2_config(cfg_path: Path) -> dict:
    """``config.json`` as a dict, or a one-line error if unreadable or not GPT-2's."""
    try:
        meta = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GraphcError(cfg_path, f"unreadable ({e.__class__.__name__})", "config") from None
    if not isinstance(meta, dict):
        raise GraphcError(cfg_path, f"is a JSON {type(meta).__name__}, expected an object", "config")
    problem = gpt2_config_problem(meta)
    if problem:
        raise GraphcError(cfg_path, problem, "config")
    return meta


def _config(tensors: dict[str, np.ndarray], meta: dict | None, cfg_path: Path | None, where) -> GPT2Config:
    def get(key):
        if key not in tensors:
            raise GraphcError(where, "missing tensor (not a GPT-2 checkpoint?)", key)
        return tensors[key]

    V, C = get("wte.weight").shape
    maxT = get("wpe.weight").shape[0]
    layers = {int(k.split(".")[1]) for k in tensors if k.startswith("h.")}
    L = max(layers) + 1 if layers else 0
    H = C // 64
    eps = 1e-5
    if meta is not None:
        L = _number(meta, "n_layer", L, int, cfg_path)
        H = _number(meta, "n_head", H, int, cfg_path)
        if _number(meta, "n_embd", C, int, cfg_path) != C:
            raise GraphcError(cfg_path, f"n_embd {meta['n_embd']} does not match wte.weight's {C}", "n_embd")
        if _number(meta, "vocab_size", V, int, cfg_path) != V:
            raise GraphcError(cfg_path, f"vocab_size {meta['vocab_size']} does not match wte.weight's {V}", "vocab_size")
        eps = _number(meta, "layer_norm_epsilon", eps, float, cfg_path)
        for key, value in (("n_layer", L), ("n_head", H), ("layer_norm_epsilon", eps)):
            if value <= 0:
                raise GraphcError(cfg_path, f"must be positive, got {value}", key)
        if C % H:
            raise GraphcError(cfg_path, f"n_embd {C} is not divisible by n_head {H}", "n_head")
    if L == 0:
        raise GraphcError(where, "no transformer layers (h.0.*) found", "h.0")
    return GPT2Config(n_layer=L, n_head=H, n_embd=C, vocab_size=V, padded_vocab_size=padded(V), max_seq_len=maxT,
                      ln_eps=eps)


def _number(meta: dict, key: str, default, kind, where):
    """``meta[key]`` as an int (or float), or a one-line error naming the field: ``"n_head": "four"``."""
    value = meta.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise GraphcError(where, f"must be {'an integer' if kind is int else 'a number'}, got {json.dumps(value)}", key)
    return kind(value)


def load_hf(path: str | os.PathLike) -> Params:
    weights, cfg_path = resolve(path)
    meta = read_gpt2_config(cfg_path) if cfg_path is not None else None  # before reading gigabytes
    raw, _ = read_safetensors(weights)
    tensors = {k.removeprefix("transformer."): v for k, v in raw.items()}
    cfg = _config(tensors, meta, cfg_path, weights)
    params = Params(cfg)

    def fetch(key, shape):
        if key not in tensors:
            raise GraphcError(weights, "missing tensor", key)
        arr = tensors[key]
        if arr.shape != shape:
            raise GraphcError(weights, f"shape {list(arr.shape)}, expected {list(shape)}", key)
        return np.asarray(arr, dtype=np.float32)

    C, V = cfg.n_embd, cfg.vocab_size
    params.tensor("wte")[:V] = fetch("wte.weight", (V, C))
    params.tensor("wpe")[...] = fetch("wpe.weight", (cfg.max_seq_len, C))
    params.tensor("lnfw")[...] = fetch("ln_f.weight", (C,))
    params.tensor("lnfb")[...] = fetch("ln_f.bias", (C,))
    for tensor, (suffix, transpose) in LAYER_MAP.items():
        block = params.tensor(tensor)
        for layer in range(cfg.n_layer):
            shape = block.shape[1:]
            hf_shape = shape[::-1] if transpose else shape
            value = fetch(f"h.{layer}.{suffix}", hf_shape)
            block[layer] = value.T if transpose else value
    return require_finite(params, weights)


def hf_tensors(params: Params, dtype=np.float32) -> dict[str, np.ndarray]:
    """graphc parameters in Hugging Face GPT2LMHeadModel naming and layout."""
    cfg = params.cfg
    out = {
        "wte.weight": params.tensor("wte")[:cfg.vocab_size],
        "wpe.weight": params.tensor("wpe"),
    }
    for layer in range(cfg.n_layer):
        for tensor, (suffix, transpose) in LAYER_MAP.items():
            value = params.tensor(tensor)[layer]
            out[f"h.{layer}.{suffix}"] = value.T if transpose else value
    out["ln_f.weight"] = params.tensor("lnfw")
    out["ln_f.bias"] = params.tensor("lnfb")
    return {k: np.ascontiguousarray(v).astype(dtype, copy=False) for k, v in out.items()}


def hf_config(cfg: GPT2Config) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_positions": cfg.max_seq_len,
        "n_ctx": cfg.max_seq_len, "vocab_size": cfg.vocab_size, "layer_norm_epsilon": cfg.ln_eps,
        "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True,
    }


def save_hf(params: Params, folder: str | os.PathLike, dtype=np.float32) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``folder`` (atomically each)."""
    from graphc.fileio import atomic_write

    folder = Path(folder)
    write_safetensors(folder / "model.safetensors", hf_tensors(params, dtype), {"format": "pt"})
    with atomic_write(folder / "config.json", "w") as f:
        json.dump(hf_config(params.cfg), f, indent=2)
    return folder
