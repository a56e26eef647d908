"""A server's numbers as its loop heartbeats carry them (``meta.stats``, the map
``Server.stats()`` returns), checked before the scheduler keeps them.

Under ``security: none`` anyone can send a heartbeat in any node's name (under CurveZMQ
only the server key may send stats: docs/design-decisions.md, decision 47), and what the
scheduler keeps is shown by every later ``psd status`` and read by its health verdict
and its metrics. So nothing in it is trusted: each field those read is checked for its
type and range (integers within 64 bits, finite numbers, ``memory.limit`` above zero,
short names), every map and list is bounded, and fields nobody reads are left out.
A heartbeat with a bad field is refused whole, with a ``bad_request`` naming the field;
nothing of it is kept. Every field is optional (a server of another version may send
fewer), but one that is there must be right. The bounds are above what a real server's
stats can reach within a 64 KiB heartbeat header (``Limits.max_header_bytes``), so only
forged ones meet them.

Pure: no I/O, no clock.
"""
from __future__ import annotations

import math

from psd.errors import BadRequestError, describe

#: longest name kept: table names (``TableSpec`` allows 200), node ids, counter and policy names
MAX_NAME = 200
#: tables one server may list (the cluster has at most limits.max_tables, but a server may
#: still hold some the cluster dropped while it did not answer)
MAX_TABLES = 8192
MAX_COUNTERS = 64
#: consistency policies of one server: the cluster's, plus one per distinct table setting
MAX_POLICIES = 64
#: worker clocks one policy lists
MAX_WORKERS = 4096
MAX_BUCKETS = 64
MAX_REPLICAS = 1024
#: ``metrics``: a HOST:PORT
MAX_ADDRESS = 256
_INT64 = 2**63

COUNTS = ("bytes_in", "bytes_out", "messages_in", "messages_out", "ring", "leads", "holds", "pending_acks",
          "copying_in", "seen_senders")


#: a table's numbers: every table's, then a bounded table's (psd.store.bounded)
TABLE_COUNTS = ("keys", "bytes", "refused", "evicted", "evicted_by_primary", "led_rows")


def _fail(path: str, expected: str, value):
    raise BadRequestError(f"heartbeat: meta.stats.{path}: expected {expected}, got {describe(value)}",
                          field=f"meta.stats.{path}")


def _int(value, path: str, lo: int | None = 0) -> int:
    if (not isinstance(value, int) or isinstance(value, bool) or not -_INT64 <= value < _INT64
            or (lo is not None and value < lo)):
        _fail(path, "an integer >= 0 (64-bit)" if lo == 0 else "a 64-bit integer", value)
    return value


def _maybe_int(value, path: str, lo: int | None = 0) -> int | None:
    return None if value is None else _int(value, path, lo)


def _number(value, path: str) -> float:
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or value < 0):
        _fail(path, "a finite number >= 0", value)
    return float(value)


def _maybe_number(value, path: str) -> float | None:
    return None if value is None else _number(value, path)


def _name(value, path: str, limit: int = MAX_NAME) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        _fail(path, f"a name of 1 to {limit} characters", value)
    return value


def _map(value, path: str, limit: int) -> dict:
    if not isinstance(value, dict):
        _fail(path, "a map", value)
    if len(value) > limit:
        _fail(path, f"at most {limit} entries", value)
    return value


def _names_to(value, path: str, limit: int, check) -> dict:
    """A bounded map of names to values ``check(value, path)`` accepts. (Every heartbeat
    carries one: the common right values are taken without building their paths.)"""
    out = {}
    for k, v in _map(value, path, limit).items():
        if type(k) is not str or not k or len(k) > MAX_NAME:
            _name(k, f"{path} (a key)")
        if check is _int and type(v) is int and 0 <= v < _INT64:
            out[k] = v
        elif check is _number and type(v) is float and 0.0 <= v < math.inf:
            out[k] = v
        else:
            out[k] = check(v, f"{path}.{k}")
    return out


def _table(value, path: str) -> dict:
    value = _map(value, path, 16)
    return {k: _int(value[k], f"{path}.{k}") for k in TABLE_COUNTS if k in value}


def _memory(value, path: str) -> dict:
    value = _map(value, path, 16)
    out = {k: _int(value[k], f"{path}.{k}") for k in ("bytes", "reserved") if k in value}
    if "limit" in value:
        limit = value["limit"]
        if limit is not None and (_int(limit, f"{path}.limit") < 1):
            _fail(f"{path}.limit", "an integer > 0 or nil", limit)
        out["limit"] = limit
    if "full_replicas" in value:
        replicas = value["full_replicas"]
        if not isinstance(replicas, list):
            _fail(f"{path}.full_replicas", "a list of node ids", replicas)
        if len(replicas) > MAX_REPLICAS:
            _fail(f"{path}.full_replicas", f"at most {MAX_REPLICAS} node ids", replicas)
        out["full_replicas"] = [_name(n, f"{path}.full_replicas[{i}]") for i, n in enumerate(replicas)]
    return out


def _waits(value, path: str) -> dict:
    value = _map(value, path, 16)
    out: dict = {}
    if "buckets" in value:
        out["buckets"] = _names_to(value["buckets"], f"{path}.buckets", MAX_BUCKETS, _int)
    if "count" in value:
        out["count"] = _int(value["count"], f"{path}.count")
    for k in ("sum", "max"):
        if k in value:
            out[k] = _number(value[k], f"{path}.{k}")
    for k in ("p50", "p99"):
        if k in value:
            out[k] = _maybe_number(value[k], f"{path}.{k}")
    return out


def _policy(value, path: str) -> dict:
    value = _map(value, path, 32)
    out: dict = {}
    if "consistency" in value:
        out["consistency"] = _name(value["consistency"], f"{path}.consistency", 32)
    if "max_delay" in value:
        delay = value["max_delay"]
        out["max_delay"] = delay if delay in (None, "auto") else _int(delay, f"{path}.max_delay")
    for k in ("tau", "held_pulls", "buffered_pushes"):
        if k in value:
            out[k] = _maybe_int(value[k], f"{path}.{k}")
    for k in ("min_clock", "max_clock"):
        if k in value:
            out[k] = _maybe_int(value[k], f"{path}.{k}", lo=None)
    if "clocks" in value:
        out["clocks"] = _names_to(value["clocks"], f"{path}.clocks", MAX_WORKERS,
                                  lambda c, p: _int(c, p, lo=None))
    if "waits" in value:
        out["waits"] = _waits(value["waits"], f"{path}.waits")
    return out


def check_stats(stats) -> dict:
    """The fields of a heartbeat's ``meta.stats`` that the scheduler reads, checked;
    raises ``BadRequestError`` naming the first bad field (``data.field``)."""
    if not isinstance(stats, dict):
        raise BadRequestError(f"heartbeat: meta.stats: expected a map, got {describe(stats)}", field="meta.stats")
    out: dict = {}
    if "tables" in stats:
        out["tables"] = _names_to(stats["tables"], "tables", MAX_TABLES, _table)
    if "counters" in stats:
        out["counters"] = _names_to(stats["counters"], "counters", MAX_COUNTERS, _int)
    for k in COUNTS:
        if k in stats:
            out[k] = _int(stats[k], k)
    if "memory" in stats:
        out["memory"] = _memory(stats["memory"], "memory")
    if "traffic" in stats:  # bytes after each stage, sent and received (psd.codec.traffic)
        out["traffic"] = {side: _names_to(v, f"traffic.{side}", 16, _int) for side, v in
                          _map(stats["traffic"], "traffic", 2).items() if side in ("sent", "received")}
    if "key_cache" in stats:  # the server's key cache (psd.core.keycache)
        out["key_cache"] = _names_to(stats["key_cache"], "key_cache", 16, _int)
    if "stripes" in stats:  # striped messages in and out (psd.transport.stripes)
        out["stripes"] = _names_to(stats["stripes"], "stripes", 16, _int)
    if "pull_filters" in stats:  # the server's pull filters (psd.filters.pull)
        out["pull_filters"] = _names_to(stats["pull_filters"], "pull_filters", 16, _int)
    if "consistency" in stats:
        out["consistency"] = _names_to(stats["consistency"], "consistency", MAX_POLICIES, _policy)
    if "uptime" in stats:
        out["uptime"] = _number(stats["uptime"], "uptime")
    if "peers" in stats:  # seconds since the server last heard from each other server (liveness)
        out["peers"] = _names_to(stats["peers"], "peers", MAX_REPLICAS, _number)
    if "serving" in stats:
        if not isinstance(stats["serving"], bool):
            _fail("serving", "true or false", stats["serving"])
        out["serving"] = stats["serving"]
    if "metrics" in stats:
        metrics = stats["metrics"]
        out["metrics"] = None if metrics is None else _name(metrics, "metrics", MAX_ADDRESS)
    return out
