"""Metrics in the Prometheus text exposition format (version 0.0.4), without a dependency.

Two kinds of things feed a scrape:

* **collectors**: functions called at scrape time that read the counters a role already
  keeps for ``psd status`` and return :class:`Family` objects. Most metrics are made
  this way, so the status and the metrics have one source of truth.
* **instruments** updated on a hot path: :class:`Timings` (a histogram with fixed
  buckets per label set). Recording is one dict lookup, one bisect and two additions.

This module knows the format, not what a metric means; ``psd/roles/metrics.py`` says
what each role exports, and ``metrics_http.py`` serves it.
"""
from __future__ import annotations

import bisect
import math
import re
from typing import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
KINDS = ("counter", "gauge", "histogram")
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

#: request handling times: 50 us .. 10 s
LATENCY_BUCKETS = (5e-05, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0)


def format_value(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


class Family:
    """One metric: name, type, help text and its samples (label set -> value)."""

    __slots__ = ("name", "kind", "help", "samples")

    def __init__(self, name: str, kind: str, help: str):
        if not _NAME.match(name) or kind not in KINDS:
            raise ValueError(f"bad metric {name!r} of type {kind!r}")
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"counter {name!r} must end in _total")
        self.name, self.kind, self.help = name, kind, help
        self.samples: list[tuple[str, tuple[tuple[str, str], ...], float]] = []

    @staticmethod
    def _labels(labels: dict) -> tuple[tuple[str, str], ...]:
        for k in labels:
            if not _LABEL.match(k) or k == "le":
                raise ValueError(f"bad label name {k!r}")
        return tuple((k, str(v)) for k, v in labels.items())

    def add(self, value: float, **labels) -> "Family":
        """A counter's or gauge's value for one label set."""
        if self.kind == "histogram":
            raise ValueError("use add_histogram for a histogram")
        self.samples.append((self.name, self._labels(labels), value))
        return self

    def add_histogram(self, bounds: Iterable[float], counts: Iterable[int], total: float, **labels) -> "Family":
        """One label set of a histogram from its per-bucket (not cumulative) counts:
        one per bound, then the count above the last bound."""
        if self.kind != "histogram":
            raise ValueError(f"{self.name} is a {self.kind}, not a histogram")
        base = self._labels(labels)
        bounds, counts = list(bounds), list(counts)
        if len(counts) != len(bounds) + 1:
            raise ValueError(f"{len(bounds)} bucket bounds need {len(bounds) + 1} counts, got {len(counts)}")
        running = 0
        for bound, n in zip([*bounds, math.inf], counts):
            running += n
            self.samples.append((self.name + "_bucket", (*base, ("le", format_value(float(bound)))), running))
        self.samples.append((self.name + "_sum", base, total))
        self.samples.append((self.name + "_count", base, running))
        return self

    def render(self) -> str:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for name, labels, value in self.samples:
            if labels:
                inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
                lines.append(f"{name}{{{inner}}} {format_value(value)}")
            else:
                lines.append(f"{name} {format_value(value)}")
        return "\n".join(lines) + "\n"


def counter(name: str, help: str) -> Family:
    return Family(name, "counter", help)


def gauge(name: str, help: str) -> Family:
    return Family(name, "gauge", help)


def histogram(name: str, help: str) -> Family:
    return Family(name, "histogram", help)


class _Cell:
    __slots__ = ("counts", "total")

    def __init__(self, n: int):
        self.counts = [0] * n
        self.total = 0.0


class Timings:
    """Durations per label tuple (e.g. (op, outcome)) in fixed buckets.

    ``observe`` is the only call on a hot path. ``histogram`` sums the cells over the
    label positions it keeps (the latency of each op, whatever the outcome);
    ``counts`` gives how many were observed per full label tuple (requests by op and
    outcome), so one recording feeds both."""

    def __init__(self, labels: tuple[str, ...], bounds: tuple[float, ...] = LATENCY_BUCKETS):
        self.labels = labels
        self.bounds = tuple(bounds)
        self._cells: dict[tuple, _Cell] = {}

    def observe(self, key: tuple, seconds: float) -> None:
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = _Cell(len(self.bounds) + 1)
        cell.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        cell.total += seconds

    def counts(self) -> dict[tuple, int]:
        return {key: sum(cell.counts) for key, cell in self._cells.items()}

    def histogram(self, family: Family, keep: tuple[str, ...]) -> Family:
        """Add to ``family`` one histogram per value of the ``keep`` labels."""
        idx = [self.labels.index(k) for k in keep]
        merged: dict[tuple, _Cell] = {}
        for key, cell in sorted(self._cells.items()):
            sub = tuple(key[i] for i in idx)
            into = merged.get(sub)
            if into is None:
                into = merged[sub] = _Cell(len(self.bounds) + 1)
            into.counts = [a + b for a, b in zip(into.counts, cell.counts)]
            into.total += cell.total
        for sub, cell in merged.items():
            family.add_histogram(self.bounds, cell.counts, cell.total, **dict(zip(keep, sub)))
        return family


Collector = Callable[[], Iterable[Family]]


class Registry:
    """The collectors of one daemon; ``render`` is one scrape."""

    def __init__(self) -> None:
        self.collectors: list[Collector] = []

    def add(self, collector: Collector) -> None:
        self.collectors.append(collector)

    def collect(self) -> list[Family]:
        families: dict[str, Family] = {}
        for collector in self.collectors:
            for fam in collector():
                if fam.name in families:
                    raise ValueError(f"metric {fam.name} exported twice")
                families[fam.name] = fam
        return list(families.values())

    def render(self) -> str:
        return "".join(f.render() for f in self.collect())
