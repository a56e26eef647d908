"""What a client and a server agree on before any message: table specs, namespaces, and
the checks of a request's keys and values. The client, the scheduler and every server
validate with the same code, so a bad table or request is refused the same way
everywhere, before anything is sent or stored."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from psd.cluster.ranges import KEY_SPACE_END, as_keys
from psd.errors import BadRequestError, KeysError, MessageTooLargeError, ValuesError
from psd.store.updaters import make_updater

DTYPE_NAMES = {"float32": np.float32, "float64": np.float64, "int32": np.int32, "int64": np.int64}
#: a table named ``NS/NAME`` is in namespace ``NS``; a name without it is in the default one
NAMESPACE_SEP = "/"


def namespace_of(name: str) -> str | None:
    """The namespace of a table name (None: the default namespace)."""
    ns, sep, _ = name.partition(NAMESPACE_SEP)
    return ns if sep else None


def qualified(namespace: str | None, name: str) -> str:
    """``name`` in ``namespace`` (unchanged in the default namespace)."""
    return f"{namespace}{NAMESPACE_SEP}{name}" if namespace else name


def check_namespace(namespace) -> str:
    if (not isinstance(namespace, str) or not namespace or NAMESPACE_SEP in namespace
            or len(namespace) > 64):
        raise BadRequestError(f"a namespace must be 1 to 64 characters without {NAMESPACE_SEP!r}, "
                              f"got {namespace!r}")
    return namespace


#: pulls of fewer keys than this take the direct lookup (Table.pull)
SMALL_PULL = 64
#: bounds of a table's options (TableSpec.validate)
MAX_OPTIONS = 16
MAX_OPTION_TEXT = 64
#: counters per row of an admission sketch: default, and the bounds accepted
ADMIT_SKETCH = 1 << 18
ADMIT_SKETCH_RANGE = (1 << 6, 1 << 26)


@dataclass(frozen=True)
class TableBounds:
    """A table's bounded-memory options (docs/jobs.md, "Bounded tables"); 0 or None: off.

    ``admit_after`` K: a key gets a row at its K-th push (counted in a count-min sketch of
    ``admit_sketch`` counters a row); ``max_rows``: the most rows a server keeps of the
    ranges it leads (least recently pushed go first); ``ttl_pushes`` / ``ttl_seconds``:
    rows not pushed for that many pushes to the table on the server, or seconds, go."""
    admit_after: int = 1
    admit_sketch: int = ADMIT_SKETCH
    max_rows: int = 0
    ttl_pushes: int = 0
    ttl_seconds: float | None = None

    @property
    def evicting(self) -> bool:
        return bool(self.max_rows or self.ttl_pushes or self.ttl_seconds)

    @property
    def active(self) -> bool:
        return self.admit_after > 1 or self.evicting


def _int_option(table: str, options: dict, key: str, lo: int, hi: int | None = None) -> int | None:
    value = options.get(key)
    if value is None:
        return None
    if (not isinstance(value, int) or isinstance(value, bool) or value < lo
            or (hi is not None and value > hi)):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise BadRequestError(f"table {table!r}: option {key!r} must be an integer {bound}, got {value!r:.60}",
                              option=key)
    return value


def table_bounds(table: str, options: dict) -> TableBounds:
    """The bounded-memory options of a table, checked; the error names the option."""
    admit = _int_option(table, options, "admit_after", 1)
    sketch = _int_option(table, options, "admit_sketch", *ADMIT_SKETCH_RANGE)
    if sketch is not None and sketch & (sketch - 1):
        raise BadRequestError(f"table {table!r}: option 'admit_sketch' must be a power of two, got {sketch}",
                              option="admit_sketch")
    if sketch is not None and admit is None:
        raise BadRequestError(f"table {table!r}: option 'admit_sketch' sizes the sketch of admit_after; "
                              f"set admit_after too", option="admit_sketch")
    cap = _int_option(table, options, "max_rows", 1)
    ttl = _int_option(table, options, "ttl_pushes", 1)
    secs = options.get("ttl_seconds")
    if secs is not None and (not isinstance(secs, (int, float)) or isinstance(secs, bool)
                             or not 0 < secs < float("inf")):
        raise BadRequestError(f"table {table!r}: option 'ttl_seconds' must be a number > 0, got {secs!r:.60}",
                              option="ttl_seconds")
    if ttl is not None and secs is not None:
        raise BadRequestError(f"table {table!r}: options 'ttl_pushes' and 'ttl_seconds' exclude each other; "
                              f"set one", option="ttl_seconds")
    return TableBounds(admit_after=admit or 1, admit_sketch=sketch or ADMIT_SKETCH, max_rows=cap or 0,
                       ttl_pushes=ttl or 0, ttl_seconds=None if secs is None else float(secs))

@dataclass(frozen=True)
class TableSpec:
    name: str
    width: int
    dtype: str
    updater: str = "sum"
    options: dict = field(default_factory=dict)

    def validate(self) -> "TableSpec":
        if not isinstance(self.name, str) or not self.name or len(self.name) > 200:
            raise BadRequestError(f"table name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.width, int) or isinstance(self.width, bool) or self.width < 1:
            raise BadRequestError(f"table {self.name!r}: width must be an integer >= 1, got {self.width!r}")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPE_NAMES:
            raise BadRequestError(f"table {self.name!r}: dtype must be one of {sorted(DTYPE_NAMES)}, got {self.dtype!r}")
        if not isinstance(self.options, dict):
            raise BadRequestError(f"table {self.name!r}: options must be a map")
        self._check_option_sizes()
        make_updater(self.updater, self.np_dtype, self.options, self.width)  # raises on a bad name/option/width
        consistency = self.options.get("consistency")
        if consistency is not None and consistency not in ("sequential", "bounded", "eventual"):
            raise BadRequestError(f"table {self.name!r}: consistency must be sequential, bounded or "
                                  f"eventual, got {consistency!r}")
        delay = self.options.get("max_delay")
        if delay is not None and delay != "auto" and (not isinstance(delay, int) or isinstance(delay, bool)
                                                      or delay < 0):
            raise BadRequestError(f"table {self.name!r}: max_delay must be an integer >= 0 or 'auto', "
                                  f"got {delay!r}")
        group = self.options.get("num_workers")
        if group is not None and (not isinstance(group, int) or isinstance(group, bool) or group < 0):
            raise BadRequestError(f"table {self.name!r}: num_workers must be an integer >= 0, got {group!r}")
        if table_bounds(self.name, self.options).evicting and consistency == "sequential":
            raise BadRequestError(f"table {self.name!r}: eviction (max_rows, ttl_pushes, ttl_seconds) needs "
                                  f"consistency eventual or bounded, not sequential (copies apply a sequential "
                                  f"push at the clock boundary, each at its own time: an eviction between "
                                  f"pushes would fall at different points on each copy)", option="consistency")
        return self

    @cached_property
    def bounds(self) -> TableBounds:
        """Admission and eviction options (checked by ``validate``)."""
        return table_bounds(self.name, self.options)

    def _check_option_sizes(self) -> None:
        """Options are a few named scalars: a spec is in every status reply and every
        server's memory, so its size is bounded whatever the updater accepts."""
        if len(self.options) > MAX_OPTIONS:
            raise BadRequestError(f"table {self.name!r}: at most {MAX_OPTIONS} options, got {len(self.options)}")
        for key, value in self.options.items():
            if not isinstance(key, str) or not 0 < len(key) <= MAX_OPTION_TEXT:
                raise BadRequestError(f"table {self.name!r}: option names must be strings of 1 to "
                                      f"{MAX_OPTION_TEXT} characters, got {key!r:.80}")
            if not (value is None or isinstance(value, (bool, int, float))
                    or (isinstance(value, str) and len(value) <= MAX_OPTION_TEXT)):
                raise BadRequestError(f"table {self.name!r}: option {key!r} must be a number, true/false or a "
                                      f"string of at most {MAX_OPTION_TEXT} characters, got {type(value).__name__} "
                                      f"{value!r:.80}")

    @cached_property  # (asked on every request; a spec never changes)
    def consistency_override(self) -> dict:
        """The table's own consistency setting, if it has one (a job's: its model, and
        how many workers its group waits for before the first clock)."""
        return {k: self.options[k] for k in ("consistency", "max_delay", "num_workers") if k in self.options}

    @cached_property  # (asked several times per request)
    def np_dtype(self) -> np.dtype:
        return np.dtype(DTYPE_NAMES[self.dtype])

    def to_wire(self) -> dict:
        return {"name": self.name, "width": self.width, "dtype": self.dtype,
                "updater": self.updater, "options": self.options}

    @classmethod
    def from_wire(cls, d: dict) -> "TableSpec":
        if not isinstance(d, dict):
            raise BadRequestError("table spec must be a map")
        try:
            return cls(name=d["name"], width=d["width"], dtype=d["dtype"],
                       updater=d.get("updater", "sum"), options=d.get("options") or {}).validate()
        except KeyError as e:
            raise BadRequestError(f"table spec is missing {e.args[0]!r}") from None



def check_keys(keys, max_keys: int) -> np.ndarray:
    keys = as_keys(keys)
    if keys.size > max_keys:
        raise MessageTooLargeError(f"{keys.size} keys in one request, limit is {max_keys}; split the request")
    return keys


def check_values(spec: TableSpec, values, n: int) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype != spec.np_dtype:
        raise ValuesError(f"table {spec.name!r} holds {spec.dtype}, values are {values.dtype.name}; "
                          f"convert with values.astype(np.{spec.dtype})")
    if values.ndim == 1 and spec.width == 1:
        values = values.reshape(-1, 1)
    if values.shape != (n, spec.width):
        raise ValuesError(f"table {spec.name!r}: values must have shape ({n}, {spec.width}), got {values.shape}")
    return values


def check_span(lo: int, count: int) -> None:
    if not (isinstance(lo, (int, np.integer)) and isinstance(count, (int, np.integer))):
        raise KeysError("a span needs integer lo and count")
    lo, count = int(lo), int(count)  # np.uint64 sums wrap around instead of passing 2**64
    if lo < 0 or count < 0 or lo + count > KEY_SPACE_END:
        raise KeysError(f"span [{lo}, {lo + count}) is outside the key space [0, 2**64)")


def too_large(size: int, limit: int) -> MessageTooLargeError:
    return MessageTooLargeError(f"request is {size} bytes, over the cluster's max_message_bytes {limit}; "
                                f"push fewer keys at a time")
