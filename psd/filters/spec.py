"""Filter settings as a job file or ``kv.table(filters=...)`` gives them, checked once.

An entry is a name (``kkt``), a one-key map (``significant: {threshold: 1e-4}``) or a
map with ``name`` (``{name: quantize, to: int8}``). Every problem names its key
(``filters[1].threshold``) and what was expected; nothing is half accepted.
"""
from __future__ import annotations

import math

from psd.errors import ConfigError


def _num(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    def ok(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return hi is None or (v < hi if hi_open else v <= hi)
    return ok


def _int(lo: int, hi: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


_BOOL = (lambda v: isinstance(v, bool), "true or false")

#: name -> option -> (default, (accepts, expected)); a default of None means "required"
#: or "chosen from the table" as the filter says (psd.filters.chain)
FILTERS: dict[str, dict[str, tuple]] = {
    "significant": {
        "threshold": (None, (_num(0.0), "a number >= 0")),
        "relative": (False, _BOOL),
        "keep_keys": (False, _BOOL),
    },
    "kkt": {
        "l1": (None, (_num(0.0, lo_open=True), "a number > 0 (default: the table's updater l1)")),
        "delta": (None, (_num(0.0), "a number >= 0 and below l1 (default: l1 / 10)")),
        "gradient": (None, (lambda v: v in ("pulled", "pushed"), "pulled or pushed")),
        "column": (0, (_int(0, 1 << 20), "a column index >= 0")),
        "scale": (1.0, (_num(0.0, lo_open=True), "a number > 0")),
        "recheck": (8, (_int(0, 1 << 30), "an integer >= 0: most skips in a row (0: never skip)")),
    },
    "quantize": {
        "to": ("float16", (lambda v: v in ("float16", "int8"), "float16 or int8")),
        "feedback": (True, _BOOL),
    },
    "random_skip": {
        "p": (None, (_num(0.0, 1.0, hi_open=True), "a probability in [0, 1)")),
        "seed": (0, (_int(0, 2**63 - 1), "an integer >= 0")),
        "keep_keys": (False, _BOOL),
    },
    "zstd": {
        "level": (1, (_int(0, 22), "an integer in [0, 22] (0: off for this table)")),
        "threshold": (4096, (_int(0, 1 << 30), "a byte count >= 0")),
    },
}
#: options that must be given
REQUIRED = {"significant": ("threshold",), "random_skip": ("p",)}


def _threshold(v) -> bool:
    """A number >= 0, or one per column (a list of them)."""
    if isinstance(v, list):
        return 1 <= len(v) <= 1 << 16 and all(_num(0.0)(x) for x in v)
    return _num(0.0)(v)


#: the filters of pull replies (the server runs them; psd.filters.pull), in the same form
PULL_FILTERS: dict[str, dict[str, tuple]] = {
    "significant": {
        "threshold": (None, (_threshold, "a number >= 0, or a list of one per column")),
        "relative": (False, (lambda v: isinstance(v, bool) or (
            isinstance(v, list) and 1 <= len(v) <= 1 << 16 and all(isinstance(x, bool) for x in v)),
            "true or false, or a list of one per column")),
    },
    "quantize": {
        "to": ("bfloat16", (lambda v: v == "bfloat16", "bfloat16")),
    },
    "sparse": {},
}
PULL_REQUIRED = {"significant": ("threshold",)}


def _entry(i: int, entry, where: str) -> tuple[str | None, dict, list[str]]:
    key = f"{where}[{i}]"
    if isinstance(entry, str):
        return entry, {}, []
    if isinstance(entry, dict) and "name" in entry:
        return entry["name"], {k: v for k, v in entry.items() if k != "name"}, []
    if isinstance(entry, dict) and len(entry) == 1:
        (name, opts), = entry.items()
        if opts is None:
            opts = {}
        if not isinstance(opts, dict):
            return None, {}, [f"{key}.{name}: expected a map of options, got {type(opts).__name__}"]
        return name, dict(opts), []
    return None, {}, [f"{key}: expected a filter name or a map naming one (e.g. significant: {{threshold: 0.01}}), "
                      f"got {entry!r}"[:200]]


def parse_filters(entries, where: str = "filters", registry: dict | None = None,
                  required: dict | None = None) -> list[tuple[str, dict]]:
    """``[(name, options with defaults), ...]`` in the order given; ConfigError listing
    every problem, each naming its key, when anything is wrong. ``registry``: the
    filters known (FILTERS, the push side, by default; PULL_FILTERS for pulls)."""
    registry = FILTERS if registry is None else registry
    required = (REQUIRED if registry is FILTERS else {}) if required is None else required
    if entries is None:
        return []
    if not isinstance(entries, (list, tuple)):
        raise ConfigError(f"{where}: expected a list of filters, got {type(entries).__name__}")
    out, problems, seen = [], [], set()
    for i, entry in enumerate(entries):
        name, opts, bad = _entry(i, entry, where)
        problems += bad
        if name is None:
            continue
        key = f"{where}[{i}]"
        if name not in registry:
            problems.append(f"{key}: unknown filter {name!r}; expected one of {', '.join(registry)}")
            continue
        if name in seen:
            problems.append(f"{key}: filter {name!r} is listed twice")
        seen.add(name)
        spec = registry[name]
        for opt in opts:
            if opt not in spec:
                problems.append(f"{key}.{opt}: unknown option of filter {name!r}; expected one of {', '.join(spec)}")
        for opt in required.get(name, ()):
            if opt not in opts:
                problems.append(f"{key}.{opt}: missing; filter {name!r} needs it ({spec[opt][1][1]})")
        full = {}
        for opt, (default, (accepts, expected)) in spec.items():
            value = opts.get(opt, default)
            if opt in opts and not accepts(value):
                problems.append(f"{key}.{opt}: expected {expected}, got {value!r}"[:200])
            full[opt] = value
        out.append((name, full))
    if problems:
        raise ConfigError("; ".join(problems), problems=problems)
    return out
