"""The training log: every printed loss, kept as a TSV and drawn as a loss curve.

``losses.tsv`` has one row per event (``train`` or ``val``) with step, loss, learning rate
and milliseconds; it is rewritten atomically with each checkpoint. ``loss.png`` (when
matplotlib is installed, ``pip install graphc[plot]``) plots train and val loss by step.
"""

from __future__ import annotations

import sys
from pathlib import Path

from graphc.fileio import atomic_write


class TrainLog:
    def __init__(self, rows: list[dict] | None = None):
        self.rows = rows or []

    def add(self, kind: str, step: int, loss: float, lr: float = float("nan"), ms: float = float("nan")) -> None:
        self.rows.append({"kind": kind, "step": step, "loss": loss, "lr": lr, "ms": ms})

    def until(self, step: int) -> "TrainLog":
        """The rows logged before ``step`` ran (what a checkpoint at ``step`` has seen)."""
        return TrainLog([r for r in self.rows if r["step"] < step or (r["kind"] == "val" and r["step"] == step)])

    def write(self, out: Path) -> None:
        with atomic_write(out / "losses.tsv", "w") as f:
            f.write("kind\tstep\tloss\tlr\tms\n")
            for r in self.rows:
                f.write(f"{r['kind']}\t{r['step']}\t{r['loss']:.6f}\t{r['lr']:.6g}\t{r['ms']:.1f}\n")
        self.plot(out / "loss.png")

    def plot(self, path: Path) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for kind, style in (("train", "-"), ("val", "o-")):
            pts = [(r["step"], r["loss"]) for r in self.rows if r["kind"] == kind]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{kind} loss", markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        try:
            with atomic_write(path) as f:
                fig.savefig(f, format="png")
        except OSError as e:  # a plot is a convenience; never fail a run over it
            print(f"warning: could not write {path}: {e}", file=sys.stderr)
        finally:
            plt.close(fig)

    @classmethod
    def read(cls, out: Path) -> "TrainLog":
        path = out / "losses.tsv"
        if not path.exists():
            return cls()
        rows = []
        for line in path.read_text().splitlines()[1:]:
            kind, step, loss, lr, ms = line.split("\t")
            rows.append({"kind": kind, "step": int(step), "loss": float(loss), "lr": float(lr), "ms": float(ms)})
        return cls(rows)
