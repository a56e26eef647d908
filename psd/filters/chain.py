"""A table's filters, in order, with the bytes after each: what a worker's push runs through.

Built once when a table is opened (:func:`build_chain` checks the filters against the
table and raises ConfigError naming the key), then ``apply`` per push, ``observe`` per
pull, ``residual`` at a flush. Pure: no I/O; the client calls it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from psd.errors import ConfigError
from psd.filters.lossy import CLASSES, F64
from psd.filters.spec import parse_filters
from psd.keysets import unique

#: filters that hold rows back: an updater that waits for every worker's part of a key
#: (prox_l1 with aggregate) would wait for ever, and ``assign`` is not a sum of pushes
_DROPPING = ("significant", "random_skip")
#: filters that send integer rows as they are: zstd, and significant, which holds a key's
#: accumulated change back whole and later sends it whole (an integer table's counts stay
#: integers; quantize, random_skip and kkt would round or rescale them)
EXACT_ON_INTEGERS = ("zstd", "significant")
#: updaters to which a pushed row of zeros changes nothing (``keep_keys``)
ZERO_IS_NOTHING = ("sum", "sgd")


@dataclass(frozen=True)
class TableInfo:
    """What a chain needs to know of its table (a TableSpec's fields)."""

    name: str
    dtype: str
    width: int
    updater: str
    options: dict = field(default_factory=dict)

    @property
    def aggregates(self) -> bool:
        return self.updater == "prox_l1" and bool(self.options.get("aggregate"))


def _defaults(name: str, opts: dict, info: TableInfo, key: str) -> list[str]:
    """Fill the options a filter takes from its table; the problems found."""
    problems = []
    if name not in EXACT_ON_INTEGERS and not info.dtype.startswith("float"):
        problems.append(f"{key}: filter {name!r} changes values; table {info.name!r} holds {info.dtype}, "
                        f"expected float32 or float64 (only {' and '.join(EXACT_ON_INTEGERS)} apply to "
                        f"integer tables)")
    if name in _DROPPING and info.aggregates:
        problems.append(f"{key}: filter {name!r} holds rows back, but table {info.name!r} uses prox_l1 with "
                        f"aggregate: true, which steps a key once every worker's part arrived; use kkt or quantize")
    if name in _DROPPING and info.updater == "assign":
        problems.append(f"{key}: filter {name!r} adds up what it holds back; table {info.name!r} uses 'assign', "
                        f"expected an updater that adds pushes up (sum, sgd, adagrad, ...)")
    if opts.get("keep_keys") and info.updater not in ZERO_IS_NOTHING:
        problems.append(f"{key}.keep_keys: sends zeros for the rows it holds back, which only {', '.join(ZERO_IS_NOTHING)} "
                        f"leave(s) unchanged; table {info.name!r} uses {info.updater!r}")
    if name == "kkt":
        if opts["l1"] is None:
            l1 = info.options.get("l1")
            if not isinstance(l1, (int, float)) or isinstance(l1, bool) or not l1 > 0:
                problems.append(f"{key}.l1: missing, and table {info.name!r} has no updater option l1 > 0 to take "
                                f"it from; expected the L1 weight lambda")
                return problems
            opts["l1"] = float(l1)
        if opts["delta"] is None:
            opts["delta"] = opts["l1"] / 10
        if not opts["delta"] < opts["l1"]:
            problems.append(f"{key}.delta: expected a number below l1 ({opts['l1']}), got {opts['delta']}")
        if opts["gradient"] is None:
            opts["gradient"] = "pulled" if info.aggregates else "pushed"
        if opts["gradient"] == "pushed" and info.aggregates:
            problems.append(f"{key}.gradient: 'pushed' lets workers skip a key apart, but table {info.name!r} "
                            f"(prox_l1, aggregate) waits for every worker's part; expected 'pulled'")
        if opts["gradient"] == "pulled" and info.width < 2:
            problems.append(f"{key}.gradient: 'pulled' reads the gradient from column 1 of the pulled rows; "
                            f"table {info.name!r} has width {info.width}")
        if opts["column"] >= info.width:
            problems.append(f"{key}.column: table {info.name!r} has width {info.width}, got {opts['column']}")
    return problems


def build_chain(entries, info: TableInfo, where: str = "filters") -> "FilterChain | None":
    """The chain for ``entries`` on table ``info``, or None when there are none."""
    parsed = parse_filters(entries, where)
    problems = []
    for i, (name, opts) in enumerate(parsed):
        problems += _defaults(name, opts, info, f"{where}[{i}]")
    if problems:
        raise ConfigError("; ".join(problems), problems=problems)
    return FilterChain(parsed, info) if parsed else None


class FilterChain:
    def __init__(self, parsed: list[tuple[str, dict]], info: TableInfo):
        self.info = info
        self.dtype = np.dtype(info.dtype)
        self.names = [n for n, _ in parsed]
        self.zstd: tuple[int, int] | None = None
        self.filters = []
        for name, opts in parsed:
            if name == "zstd":
                self.zstd = (int(opts["level"]), int(opts["threshold"]))
            else:
                self.filters.append(CLASSES[name](opts, info.width, self.dtype))
        if any(f.name == "quantize" for f in self.filters[:-1]):
            raise ConfigError(f"{where_of(parsed, 'quantize')}: quantize must be the last filter that changes "
                              f"values (it sends int8 or float16 rows the others cannot read)")
        #: bytes of keys + values: given to the chain, and after each filter (by name)
        self.counters = {"raw": 0, "out": 0, "pushes": 0, "rows_in": 0, "rows_out": 0, "flushed": 0,
                         **{f"after_{f.name}": 0 for f in self.filters}}
        self.table_spec = None  # the client's TableSpec of the table (what a flush pushes to)

    def get(self, name: str):
        return next((f for f in self.filters if f.name == name), None)

    def apply(self, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """The rows to send for a push of ``keys`` (sorted, unique) and ``values`` (checked,
        the table's dtype): keys, values (the table's dtype, or quantized), header fields."""
        c = self.counters
        c["raw"] += keys.nbytes + values.nbytes
        c["pushes"] += 1
        c["rows_in"] += keys.size
        if not self.filters:
            c["rows_out"] += keys.size
            c["out"] += keys.nbytes + values.nbytes
            return keys, values, {}
        meta: dict = {}
        vals = values.astype(F64)
        for f in self.filters:
            keys, vals, extra = f.apply(keys, vals)
            meta.update(extra)
            c[f"after_{f.name}"] += keys.nbytes + (vals.shape[0] * vals.shape[1] * (
                vals.itemsize if vals.dtype != F64 else self.dtype.itemsize))
        c["rows_out"] += keys.size
        if "q" in meta:
            meta["q"].append(self.dtype.name)
        else:
            vals = vals.astype(self.dtype)
        meta["flt"] = [f.name for f in self.filters]
        c["out"] += keys.nbytes + vals.nbytes
        return keys, vals, meta

    def observe(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Rows a pull of ``keys`` returned (the weights filters judge by)."""
        if keys is None or rows is None or not keys.size:
            return
        rows = np.asarray(rows, F64).reshape(keys.size, -1)
        for f in self.filters:
            f.observe(keys, rows)

    def residual(self) -> tuple[np.ndarray, np.ndarray]:
        """Every filter's held-back rows, summed per key, in the table's dtype; cleared."""
        parts = [f.residual() for f in self.filters]
        if self.info.aggregates:  # every row pushed there is a worker's part of a step: none to add
            parts = []
        parts = [(k, v) for k, v in parts if k.size]
        if not parts:
            return np.empty(0, np.uint64), np.zeros((0, self.info.width), self.dtype)
        keys = unique(np.concatenate([k for k, _ in parts]))
        vals = np.zeros((keys.size, self.info.width), F64)
        for k, v in parts:
            vals[np.searchsorted(keys, k)] += v
        self.counters["flushed"] += int(keys.size)
        return keys, vals.astype(self.dtype)

    def stats(self) -> dict:
        return {"filters": list(self.names), **self.counters}


def where_of(parsed, name: str) -> str:
    return f"filters[{[n for n, _ in parsed].index(name)}]"
