"""Training checkpoints: written atomically, verified on resume, resumed bit for bit.

A checkpoint is a folder ``DIR/ckpt-SSSSSS`` holding

* ``model.bin``: the parameters as an llm.c version-3 (fp32) file, usable by llm.c itself,
* ``optimizer.npz``: AdamW's m and v (float32),
* ``state.json``: the next step, the data loader's position, the run's settings,
* ``checksums.sha256``: the SHA-256 of the three (``sha256sum -c`` reads it), checked on resume.

The folder is complete before ``DIR/latest`` (one line naming it) is atomically replaced,
so a crash at any moment leaves the previous checkpoint intact and ``latest`` never names a
partial one. ``DIR/model.bin`` is refreshed too (atomically) as the convenient "the model"
for users. The two newest ``ckpt-*`` folders are kept: when the newest is damaged (a
bit flip, a truncated file), the error names the previous one, which is still usable.
Non-finite parameters or optimizer state are never written over a good checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from graphc.errors import GraphcError
from graphc.fileio import atomic_write
from graphc.models.llmc import load_llmc, save_llmc
from graphc.models.params import Params

FILES = ("model.bin", "optimizer.npz", "state.json")
CHECKSUMS = "checksums.sha256"
KEEP = 2
"""Checkpoint folders kept: the newest and the one before it (usable if the newest is damaged)."""
_FOLDER = re.compile(r"^ckpt-(\d{6,})$")


# ----------------------------------------------------------------------------- writing
def save(out: Path, step: int, params: Params, m: np.ndarray, v: np.ndarray, state: dict) -> Path:
    for name, array in (("parameters", params.flat), ("optimizer m", m), ("optimizer v", v)):
        if not np.isfinite(array).all():
            raise GraphcError(out, f"the {name} are not finite at step {step}; nothing was written over the last "
                              "good checkpoint", "checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    folder = out / f"ckpt-{step:06d}"
    tmp = out / f".ckpt-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_llmc(params, tmp / "model.bin")
        with atomic_write(tmp / "optimizer.npz") as f:
            np.savez(f, m=m, v=v)
        with atomic_write(tmp / "state.json", "w") as f:
            json.dump({"step": step, **state}, f, indent=1)
        with atomic_write(tmp / CHECKSUMS, "w") as f:
            f.writelines(f"{sha256(tmp / name)}  {name}\n" for name in FILES)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint and 'latest' are untouched
        raise
    with atomic_write(out / "latest", "w") as f:
        f.write(folder.name + "\n")
    with atomic_write(out / "model.bin") as f, open(folder / "model.bin", "rb") as src:
        shutil.copyfileobj(src, f, 1 << 24)
    for old in folders(out)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def retract(out: Path, step: int) -> Path | None:
    """The weights of step ``step`` gave a non-finite loss: if ``latest`` names that step's
    checkpoint (finite weights, so it was written, but useless to resume from), point
    ``latest`` and ``DIR/model.bin`` back to the newest checkpoint before it. Returns the
    checkpoint a resume now starts from, or None when there is none (``latest`` and
    ``DIR/model.bin`` are then removed; the diverged folder stays, for inspection)."""
    try:
        current = latest_folder(out)
    except GraphcError:
        return None
    if current.name != f"ckpt-{step:06d}":
        return current                      # an earlier step's weights: their loss was finite
    earlier = [f for f in folders(out) if f.name < current.name]
    if not earlier:
        for name in ("latest", "model.bin"):
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
        return None
    good = earlier[-1]
    with atomic_write(out / "latest", "w") as f:
        f.write(good.name + "\n")
    with atomic_write(out / "model.bin") as f, open(good / "model.bin", "rb") as src:
        shutil.copyfileobj(src, f, 1 << 24)
    return good


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def folders(out: Path) -> list[Path]:
    """The ``ckpt-*`` folders in ``out``, oldest first."""
    if not out.is_dir():
        return []
    return sorted((p for p in out.iterdir() if _FOLDER.match(p.name) and p.is_dir()), key=lambda p: p.name)


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a training run that a new run would replace."""
    out = Path(out)
    return out.is_dir() and ((out / "latest").exists() or bool(folders(out)) or (out / "losses.tsv").exists())


def remove_run(out: Path) -> None:
    """Remove the run in ``out`` (``--overwrite``): its checkpoints, ``latest``, model and log,
    so that no checkpoint of the old run can be mistaken for one of the new."""
    for folder in folders(out):
        shutil.rmtree(folder, ignore_errors=True)
    for name in ("latest", "model.bin", "losses.tsv", "loss.png"):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()


# ----------------------------------------------------------------------------- reading
def load(out: Path) -> tuple[Params, np.ndarray, np.ndarray, dict]:
    """The newest checkpoint in ``out``, verified; a damaged one is an error naming a usable one."""
    folder = latest_folder(out)
    try:
        return load_folder(folder)
    except GraphcError as e:
        usable = next((f for f in reversed(folders(out)) if f != folder and _loads(f)), None)
        if usable is None:
            raise
        raise GraphcError(e.where, f"{e.message}; the previous checkpoint {usable} is usable: "
                          f"write '{usable.name}' into {out / 'latest'} to resume from it", e.field) from None


def latest_folder(out: Path) -> Path:
    latest = out / "latest"
    if not out.is_dir():
        raise GraphcError(out, "no such run directory to resume", "--resume")
    if not latest.exists():
        raise GraphcError(out, "no checkpoint to resume from (missing 'latest')", "--resume")
    try:
        name = latest.read_text(encoding="utf-8").strip()
    except (UnicodeDecodeError, OSError) as e:
        raise GraphcError(latest, f"unreadable ({type(e).__name__})", "--resume") from None
    if not name:
        raise GraphcError(latest, "is empty; it should name a checkpoint folder such as ckpt-000010", "--resume")
    if not _FOLDER.match(name):
        raise GraphcError(latest, f"names {name[:40]!r}, not a checkpoint folder (ckpt-NNNNNN)", "--resume")
    if not (out / name).is_dir():
        raise GraphcError(latest, f"names {name}, which does not exist", "--resume")
    return out / name


def _loads(folder: Path) -> bool:
    try:
        load_folder(folder)
    except GraphcError:
        return False
    return True


def load_folder(folder: Path) -> tuple[Params, np.ndarray, np.ndarray, dict]:
    for name in FILES:
        if not (folder / name).is_file():
            raise GraphcError(folder / name, "checkpoint file missing", "--resume")
    verify_checksums(folder)
    params = load_llmc(folder / "model.bin")
    m, v = _optimizer_state(folder / "optimizer.npz", params.flat.size)
    state = _state(folder / "state.json", folder)
    return params, m, v, state


def verify_checksums(folder: Path) -> None:
    """Compare each file with ``checksums.sha256`` (checkpoints written before it existed have none)."""
    path = folder / CHECKSUMS
    if not path.exists():
        return
    try:
        expected = dict(reversed(line.split("  ", 1)) for line in path.read_text(encoding="utf-8").splitlines())
    except (UnicodeDecodeError, ValueError):
        raise GraphcError(path, "unreadable checksum list", "--resume") from None
    for name in FILES:
        if name not in expected:
            raise GraphcError(path, f"has no checksum for {name}", "--resume")
        if sha256(folder / name) != expected[name].strip():
            raise GraphcError(folder / name, "checksum mismatch: the file changed after it was written "
                              "(corrupt or edited)", "--resume")


def _optimizer_state(path: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("not an .npz archive")
            missing = [k for k in ("m", "v") if k not in z.files]
            if missing:
                raise GraphcError(path, f"no {' or '.join(missing)} array", "--resume")
            m, v = z["m"], z["v"]
    except GraphcError:
        raise
    except Exception as e:  # noqa: BLE001 - BadZipFile, EOFError, zlib.error, ValueError ...: all mean damaged
        raise GraphcError(path, f"unreadable optimizer state ({type(e).__name__})", "--resume") from None
    for key, a in (("m", m), ("v", v)):
        if a.dtype != np.float32 or a.shape != (n,):
            raise GraphcError(path, f"{key} is {a.dtype}{list(a.shape)}, the model needs float32[{n}]", key)
        if not np.isfinite(a).all():
            raise GraphcError(path, f"{key} holds non-finite values", key)
    return m, v


# field -> (JSON types, check, what it must be)
_STATE_FIELDS = {
    "step": ((int,), lambda x: x >= 0, "an integer >= 0"),
    "loader": ((dict,), lambda x: True, "an object (the data loader's position)"),
    "config": ((dict,), lambda x: True, "an object (the run's settings)"),
    "log": ((list,), lambda x: all(_log_row(r) for r in x), "a list of {kind, step, loss, lr, ms} rows"),
}


def _log_row(row) -> bool:
    return (isinstance(row, dict) and row.get("kind") in ("train", "val")
            and isinstance(row.get("step"), int) and not isinstance(row.get("step"), bool)
            and all(isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)
                    for k in ("loss", "lr", "ms")))


def _state(path: Path, folder: Path) -> dict:
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise GraphcError(path, "unreadable: not UTF-8 text", "--resume") from None
    except json.JSONDecodeError as e:
        raise GraphcError(path, f"unreadable ({e.msg} at line {e.lineno})", "--resume") from None
    if not isinstance(state, dict):
        raise GraphcError(path, f"is a JSON {type(state).__name__}, expected an object", "--resume")
    for field, (types, ok, what) in _STATE_FIELDS.items():
        if field not in state:
            raise GraphcError(path, "missing", field)
        value = state[field]
        if not isinstance(value, types) or isinstance(value, bool) or not ok(value):
            raise GraphcError(path, f"must be {what}, got {json.dumps(value)[:40]}", field)
    number = int(_FOLDER.match(folder.name).group(1)) if _FOLDER.match(folder.name) else state["step"]
    if state["step"] != number:
        raise GraphcError(path, f"is {state['step']} in folder {folder.name}", "step")
    return state


@contextlib.contextmanager
def naming_files(out: Path):
    """Errors about the loader state (raised by the data loader on resume) name the file they came from."""
    try:
        yield
    except GraphcError as e:
        if e.where != "loader state":
            raise
        where = latest_folder(out) / "state.json"
        raise GraphcError(where, e.message, "loader" + (f".{e.field}" if e.field else "")) from None


# ----------------------------------------------------------------------------- settings
STEP_INDEPENDENT = "a constant schedule (--schedule constant, or --lr-final-frac 1)"


def settings_differ(saved: dict, now: dict) -> list[str]:
    """The settings a resumed run changes; ``steps`` may grow when the schedule does not depend on it."""
    diffs = [k for k in now if k in saved and saved[k] != now[k]]
    if "steps" in diffs and _step_independent(saved) and _step_independent(now):
        diffs.remove("steps")
    elif "steps" in diffs:
        diffs[diffs.index("steps")] = (f"steps ({saved.get('steps')} -> {now.get('steps')}: its cosine schedule "
                                       f"decays over --steps; only runs with {STEP_INDEPENDENT} can be extended)")
    return diffs


def _step_independent(settings: dict) -> bool:
    frac = settings.get("lr_final_frac")
    return settings.get("schedule") == "constant" or frac == 1.0
