"""The pass manager: run named passes in order, verify after each, dump, report.

In the style of onnx-ir's pass infrastructure:

* a **pass** is any callable ``(model) -> (model, changed)`` with a ``name`` attribute
  (one file, one job, in ``passes/``); it may expose ``stats`` (a dict filled by its last
  call: what it matched, removed, folded) which the report keeps;
* a **pipeline** is a named list of passes (``passes/pipelines.py``);
* after every pass the **verifier** (``passes/verify.py``) checks the graph, refreshes
  its shape annotations and names the pass if the graph is broken;
* with ``dump_dir`` (or ``$GRAPHC_DUMP_DIR``) the graph is written after every pass as
  ``NN_passname.onnx`` with a text listing ``NN_passname.txt`` (``00_input`` is the
  graph handed in), so stages can be diffed;
* the **report** has, per pass, nodes before/after, which fused ops it created and how
  many, its own stats and the time it took.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import onnx
from onnx import helper

from graphc.ops import FUSED_KEYS, count_fused
from graphc.passes.verify import VerificationError, verify

DUMP_ENV = "GRAPHC_DUMP_DIR"


class Pass(Protocol):
    name: str

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]: ...


class FunctionPass:
    """Make a plain function ``(model) -> (model, changed)`` a named pass."""

    def __init__(self, name: str, fn: Callable[[onnx.ModelProto], tuple[onnx.ModelProto, bool]]):
        self.name, self.fn, self.stats = name, fn, {}

    def __call__(self, model):
        return self.fn(model)


def graph_pass(name: str):
    """Decorator form of :class:`FunctionPass`."""
    return lambda fn: FunctionPass(name, fn)


@dataclass
class PassRecord:
    index: int
    name: str
    nodes_before: int
    nodes_after: int
    changed: bool
    fused: dict[str, int]          # fused ops this pass created, by kind (only non-zero)
    stats: dict                    # the pass's own numbers
    seconds: float                 # the pass alone
    verify_seconds: float

    def line(self) -> str:
        delta = self.nodes_after - self.nodes_before
        what = ", ".join(f"{k} x{v}" for k, v in self.fused.items())
        extra = ", ".join(f"{k}={v}" for k, v in self.stats.items() if v and k not in self.fused)
        notes = "; ".join(x for x in (what and f"fused {what}", extra) if x)
        return (f"{self.index:3d} {self.name:<22} {self.nodes_before:6d} -> {self.nodes_after:6d} "
                f"({delta:+6d})  {self.seconds * 1e3:8.1f} ms  {notes}")


@dataclass
class Report:
    pipeline: str
    nodes_before: int
    nodes_after: int
    passes: list[PassRecord] = field(default_factory=list)
    fused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FUSED_KEYS, 0))
    seconds: float = 0.0
    op_counts: dict[str, int] = field(default_factory=dict)   # of the final graph

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def format(self) -> str:
        head = f"pipeline {self.pipeline!r}: {self.nodes_before} -> {self.nodes_after} nodes in {self.seconds:.2f} s"
        cols = f"{'#':>3} {'pass':<22} {'before':>6}    {'after':>6} {'(delta)':>8}  {'time':>11}  notes"
        fused = ", ".join(f"{k}={v}" for k, v in self.fused.items())
        return "\n".join([head, cols, *(p.line() for p in self.passes), f"fused: {fused}"])

    def extend(self, other: "Report") -> "Report":
        """Concatenate another pipeline run (numbering continues)."""
        self.passes.extend(other.passes)
        self.nodes_after = other.nodes_after
        self.seconds += other.seconds
        for k, v in other.fused.items():
            self.fused[k] = self.fused.get(k, 0) + v
        self.op_counts = other.op_counts
        return self


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.node))


def listing(model: onnx.ModelProto) -> str:
    """A short text form of a graph, one node per line (for diffing dumps)."""
    g = model.graph

    def vi(v):
        t = v.type.tensor_type
        dims = ",".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
        return f"{v.name}: {helper.tensor_dtype_to_np_dtype(t.elem_type) if t.elem_type else '?'}[{dims}]"

    lines = [f"# {g.name}: {len(g.node)} nodes, {len(g.initializer)} initializers, {len(model.functions)} functions"]
    lines += [f"input  {vi(v)}" for v in g.input]
    lines += [f"output {vi(v)}" for v in g.output]
    for i, n in enumerate(g.node):
        attrs = []
        for a in n.attribute:
            val = helper.get_attribute_value(a)
            if isinstance(val, bytes):
                val = val.decode()
            if isinstance(val, onnx.TensorProto):
                val = f"tensor{list(val.dims)}"
            attrs.append(f"{a.name}={val}")
        op = f"{n.domain}.{n.op_type}" if n.domain else n.op_type
        lines.append(f"{i:5d} {op}({', '.join(n.input)}) -> {', '.join(n.output)}"
                     + (f"  [{', '.join(attrs)}]" if attrs else ""))
    return "\n".join(lines) + "\n"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class PassManager:
    """Run ``passes`` in order on a model; see the module docstring."""

    def __init__(self, passes: Iterable[Pass], *, name: str = "pipeline", verify: bool = True,
                 full_check: bool = True, dump_dir: str | os.PathLike | None = None, start_index: int = 1):
        self.passes = list(passes)
        self.name = name
        self.verify = verify
        self.full_check = full_check
        dump_dir = dump_dir if dump_dir is not None else os.environ.get(DUMP_ENV) or None
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.start_index = start_index

    def _dump(self, model: onnx.ModelProto, index: int, name: str) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        stem = self.dump_dir / f"{index:02d}_{_slug(name)}"
        onnx.save(model, str(stem) + ".onnx")
        Path(str(stem) + ".txt").write_text(listing(model))

    def _check(self, model: onnx.ModelProto, pass_name: str) -> onnx.ModelProto:
        if self.verify:
            return verify(model, pass_name, full_check=self.full_check)
        from graphc.passes.verify import infer_shapes

        try:
            return infer_shapes(model)   # passes rely on fresh shape annotations
        except Exception as e:
            raise VerificationError(pass_name, [f"shape inference failed: {e}"]) from e

    def run(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, Report]:
        t_start = time.perf_counter()
        fused_start = count_fused(model)
        report = Report(self.name, len(model.graph.node), len(model.graph.node))
        if self.start_index <= 1:
            self._dump(model, 0, "input")
        model = self._check(model, "<input>")
        copies = dict.fromkeys(FUSED_KEYS, 0)  # fused ops a pass copied (``fuses = False``: recompute)
        for k, p in enumerate(self.passes):
            index = self.start_index + k
            before_n, before_f = len(model.graph.node), count_fused(model)
            t0 = time.perf_counter()
            model, changed = p(model)
            t1 = time.perf_counter()
            if changed:
                model = self._check(model, p.name)
            t2 = time.perf_counter()
            after_f = count_fused(model)
            fused = {key: after_f[key] - before_f[key] for key in FUSED_KEYS if after_f[key] > before_f[key]}
            if not getattr(p, "fuses", True):
                for key, v in fused.items():
                    copies[key] += v
                fused = {}
            report.passes.append(PassRecord(index, p.name, before_n, len(model.graph.node), bool(changed), fused,
                                            dict(getattr(p, "stats", {}) or {}), t1 - t0, t2 - t1))
            self._dump(model, index, p.name)
        end = count_fused(model)
        report.fused = {k: max(0, end[k] - fused_start[k] - copies[k]) for k in FUSED_KEYS}
        report.nodes_after = len(model.graph.node)
        report.seconds = time.perf_counter() - t_start
        report.op_counts = op_counts(model)
        return model, report


def run_passes(model: onnx.ModelProto, passes: Iterable[Pass], **kw) -> tuple[onnx.ModelProto, Report]:
    return PassManager(passes, **kw).run(model)
