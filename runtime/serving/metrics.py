"""Prometheus text exposition for the server's /metrics: counters, gauges, histograms.

A few dozen lines instead of a dependency: the server needs only these three kinds, and
their text format is fixed (https://prometheus.io/docs/instrumenting/exposition_formats/).
Every metric is named ``graphc_*``.
"""

from __future__ import annotations

import bisect
import threading
from typing import Callable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help, labels
        self.values: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, *label_values: str) -> None:
        with self._lock:
            self.values[label_values] = self.values.get(label_values, 0.0) + amount

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        items = sorted(self.values.items())
        if not items and not self.labels:
            items = [((), 0.0)]
        for key, value in items:
            out.append(f"{self.name}{_labels(self.labels, key)} {value:g}")
        return out


class Gauge:
    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def lines(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {self.read():g}"]


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, count in zip(self.buckets + (float("inf"),), self.counts):
            total += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'{self.name}_bucket{{le="{le}"}} {total}')
        out += [f"{self.name}_sum {self.sum:g}", f"{self.name}_count {total}"]
        return out


def _labels(names: tuple[str, ...], values: tuple) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, values)) + "}"


def exposition(metrics) -> str:
    return "\n".join(line for m in metrics for line in m.lines()) + "\n"
