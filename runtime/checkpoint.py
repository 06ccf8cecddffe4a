"""Training checkpoints: written atomically, resumed bit for bit.

A checkpoint is a folder ``DIR/ckpt-SSSSSS`` holding

* ``model.bin``: the parameters as an llm.c version-3 (fp32) file, usable by llm.c itself,
* ``optimizer.npz``: AdamW's m and v (float32),
* ``state.json``: the next step, the data loader's position, the run's settings.

The folder is complete before ``DIR/latest`` (one line naming it) is atomically replaced,
so a crash at any moment leaves the previous checkpoint intact and ``latest`` never names a
partial one. ``DIR/model.bin`` is refreshed too (atomically) as the convenient "the model"
for users; older ``ckpt-*`` folders are then removed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from graphc.errors import GraphcError
from graphc.fileio import atomic_write
from graphc.models.llmc import load_llmc, save_llmc
from graphc.models.params import Params


def save(out: Path, step: int, params: Params, m: np.ndarray, v: np.ndarray, state: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    folder = out / f"ckpt-{step:06d}"
    tmp = out / f".ckpt-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_llmc(params, tmp / "model.bin")
    with atomic_write(tmp / "optimizer.npz") as f:
        np.savez(f, m=m, v=v)
    with atomic_write(tmp / "state.json", "w") as f:
        json.dump({"step": step, **state}, f, indent=1)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    with atomic_write(out / "latest", "w") as f:
        f.write(folder.name + "\n")
    with atomic_write(out / "model.bin") as f, open(folder / "model.bin", "rb") as src:
        shutil.copyfileobj(src, f, 1 << 24)
    for old in out.glob("ckpt-*"):
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def load(out: Path) -> tuple[Params, np.ndarray, np.ndarray, dict]:
    latest = out / "latest"
    if not latest.exists():
        raise GraphcError(out, "no checkpoint to resume from (missing 'latest')", "--resume")
    folder = out / latest.read_text().strip()
    for name in ("model.bin", "optimizer.npz", "state.json"):
        if not (folder / name).exists():
            raise GraphcError(folder / name, "checkpoint file missing", "--resume")
    params = load_llmc(folder / "model.bin")
    try:
        with np.load(folder / "optimizer.npz") as z:
            m, v = z["m"], z["v"]
    except (OSError, KeyError, ValueError) as e:
        raise GraphcError(folder / "optimizer.npz", f"unreadable optimizer state ({e})") from None
    try:
        state = json.loads((folder / "state.json").read_text())
    except json.JSONDecodeError as e:
        raise GraphcError(folder / "state.json", f"unreadable ({e.msg})") from None
    n = params.flat.size
    if m.shape != (n,) or v.shape != (n,):
        raise GraphcError(folder / "optimizer.npz", f"m/v have {m.shape}/{v.shape}, model has {n} parameters")
    return params, m, v, state
