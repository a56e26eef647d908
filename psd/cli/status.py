"""``psd status``: the scheduler's view of the cluster, as a table or as JSON, once or
refreshed (``--watch``). The first line is the health at a glance: OK, DEGRADED or DOWN
and why (``psd/cluster/health.py``)."""
from __future__ import annotations

import json
import sys
import time

from psd.cli.ctrl_c import CtrlC
from psd.client import admin
from psd.cluster.health import assess
from psd.errors import PsdTimeoutError


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [headers, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def health_line(st: dict) -> str:
    """``OK: ...`` / ``DEGRADED: reason; reason`` / ``DOWN: reason``."""
    verdict = st.get("health") or assess(st)
    if verdict["reasons"]:
        return f"{verdict['state'].upper()}: " + "; ".join(verdict["reasons"])
    nodes = st.get("nodes") or []
    servers = sum(n["role"] == "server" and n["state"] == "active" for n in nodes)
    workers = sum(n["role"] == "worker" and n["state"] == "active" for n in nodes)
    return (f"OK: {servers} server{'s' if servers != 1 else ''} and {workers} worker{'s' if workers != 1 else ''} "
            f"active, every key range has {st.get('replication', 1)} live "
            f"cop{'ies' if st.get('replication', 1) != 1 else 'y'}, ring v{st['ring_version']} stable")


def render(st: dict) -> str:
    metrics = f"  metrics {st['metrics']}" if st.get("metrics") else ""
    standby = (f"  leader at epoch {st.get('epoch')}, standby {', '.join(st['standby'])}"
               if st.get("standby") else "")
    out = [health_line(st), "",
           f"scheduler {st['scheduler']}  up {st['uptime']:.0f} s  ring v{st['ring_version']}{metrics}{standby}", ""]
    nodes = st["nodes"]
    health = sum(n["state"] == "active" for n in nodes)
    out.append(f"nodes ({health}/{len(nodes)} active)")
    with_metrics = any(n.get("metrics") for n in nodes)
    out.append(_table(["id", "role", "state", "address", "heartbeat", "requests", "in", "out"]
                      + (["metrics"] if with_metrics else []), [
        [n["id"], n["role"], n["state"], n["address"] or "-", f"{n['last_heartbeat']:.1f}s ago",
         sum(v for k, v in n["counters"].items() if k in ("push", "pull", "pushpull")),
         _size(n["bytes_in"]), _size(n["bytes_out"])] + ([n.get("metrics") or "-"] if with_metrics else [])
        for n in nodes]))
    out += ["", "key ranges"]
    out.append(_table(["begin", "last", "owners"], [
        [f"{r['begin']:#018x}", f"{r['last']:#018x}", ",".join(r["owners"])] for r in st["ranges"]]))
    out += ["", "tables"]
    bounded = any("evicted" in t for t in st["tables"].values())
    out.append(_table(["name", "width", "dtype", "updater", "keys", "memory"]
                      + (["refused", "evicted"] if bounded else []), [
        [name, t["width"], t["dtype"], t["updater"], t["keys"], _size(t["bytes"])]
        + ([t.get("refused", "-"), t.get("evicted", "-")] if bounded else [])
        for name, t in st["tables"].items()]))
    out += _memory(st)
    out += _traffic(st)
    out += _workers(st)
    if st.get("jobs"):
        out += ["", "jobs (tables: the job's namespace, <id>/<name>; at end: keep or drop them)"]
        out.append(_table(["id", "name", "app", "state", "progress", "workers", "tables", "keys", "memory",
                           "at end"], [
            [j["id"], j.get("name") or "-", j["app"], j["state"], f"{100 * j['progress']:.0f}%", j["num_workers"],
             _names(j.get("tables") or {}), sum(t["keys"] for t in (j.get("tables") or {}).values()),
             _size(sum(t["bytes"] for t in (j.get("tables") or {}).values())),
             "dropped" if j.get("tables_dropped") else "keep" if j.get("keep_tables") else "drop"]
            for j in st["jobs"]]))
    return "\n".join(out)


def _names(tables: dict) -> str:
    names = [n.partition("/")[2] or n for n in tables]
    return ",".join(names[:4]) + (f",+{len(names) - 4}" if len(names) > 4 else "") if names else "-"


def _memory(st: dict) -> list[str]:
    """Table storage per server against its limits.max_memory_bytes (replicas included)."""
    rows = []
    for n in st["nodes"]:
        m = n.get("memory") or {}
        if n["role"] != "server" or "bytes" not in m:
            continue
        limit = m.get("limit")
        rows.append([n["id"], _size(m["bytes"]), "-" if limit is None else _size(limit),
                     "-" if limit is None else f"{100 * m['bytes'] / limit:.0f}%",
                     ",".join(m.get("full_replicas") or []) or "-"])
    if not rows:
        return []
    return ["", "memory per server (table storage, replicas included; limit: limits.max_memory_bytes)",
            _table(["server", "holds", "limit", "used", "full replicas"], rows)]


def _saved(side: dict) -> str:
    raw = side.get("raw", 0)
    return f"{100 * (1 - side.get('after_zstd', 0) / raw):.0f}%" if raw else "-"


def _traffic(st: dict) -> list[str]:
    """Bytes per server after each stage (received: requests and forwards; sent: replies,
    forwards), and its key cache."""
    rows = []
    for n in st["nodes"]:
        t = n.get("traffic") or {}
        if n["role"] != "server" or not t:
            continue
        r, s = t.get("received", {}), t.get("sent", {})
        kc = n.get("key_cache") or {}
        rows.append([n["id"], _size(r.get("raw", 0)), _size(r.get("after_kc", 0)), _size(r.get("after_zstd", 0)),
                     _saved(r), _size(s.get("raw", 0)), _size(s.get("after_zstd", 0)), _saved(s),
                     f"{kc.get('hits', 0)}/{kc.get('misses', 0)}" if kc else "-",
                     _size(kc.get("bytes", 0)) if kc else "-"])
    if not rows:
        return []
    return ["", "traffic per server (payload bytes: raw, after key caching, after zstd; saved = 1 - after zstd / "
                "raw; key cache: hits/misses, held)",
            _table(["server", "in raw", "in after kc", "in after zstd", "in saved", "out raw", "out after zstd",
                    "out saved", "kc hits/misses", "kc held"], rows)]


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{1000 * s:.1f} ms" if s < 1 else f"{s:.2f} s"


def _workers(st: dict) -> list[str]:
    """Each worker's clock and straggler flag, then each server's consistency gate."""
    clocks = st.get("clocks") or {}
    workers = clocks.get("workers") or {}
    model = clocks.get("consistency", "?")
    if model == "bounded":
        model += f", max_delay {clocks.get('max_delay')}"
    slowest, fastest = clocks.get("slowest"), clocks.get("fastest")
    out = ["", f"workers ({model}): slowest clock {'-' if slowest is None else slowest}, "
               f"fastest {'-' if fastest is None else fastest}"]
    flagged = set(clocks.get("stragglers") or [])
    if workers:
        out.append(_table(["id", "clock", "straggler"], [
            [w, c, "yes" if w in flagged else ""]
            for w, c in sorted(workers.items(), key=lambda wc: (wc[1], wc[0]))]))
    else:
        out.append("(no live workers)")
    rows = []
    for n in st["nodes"]:
        if n["role"] != "server":
            continue
        for name, p in sorted((n.get("consistency") or {}).items()):
            waits = p.get("waits") or {}
            rows.append([n["id"], name, "-" if p.get("tau") is None else p["tau"],
                         "-" if p.get("min_clock") is None else p["min_clock"],
                         "-" if p.get("max_clock") is None else p["max_clock"],
                         p.get("held_pulls", 0), p.get("buffered_pushes", 0), waits.get("count", 0),
                         _seconds(waits.get("p50")), _seconds(waits.get("p99")),
                         _seconds(waits.get("max") if waits.get("count") else None)])
    if rows:
        out += ["", "consistency per server (pull wait: time a pull was held, over all pulls)"]
        out.append(_table(["server", "policy", "tau", "min clock", "max clock", "held pulls",
                           "buffered pushes", "pulls", "pull wait p50", "p99", "max"], rows))
    return out


def show_status(scheduler: str, as_json: bool = False, watch: float | None = None,
                count: int | None = None, out=None, config=None) -> int:
    """Print the status once, or (``watch`` seconds, or ``count`` refreshes) again and
    again: in place on a terminal, as separated snapshots otherwise, one JSON line per
    refresh with ``as_json``. Ctrl-C ends a watch with 0; after ``count`` refreshes the
    code is 1 if the last one could not reach the scheduler. While watching, a scheduler
    that does not answer is shown as ``DOWN: ...`` and the watch goes on; other errors
    (keys refused, say) end the command with the error, as without ``--watch``."""
    out = out or sys.stdout
    if watch is None and count is None:
        st = admin.call(scheduler, "status", config=config)
        print(json.dumps(st, indent=2, sort_keys=True) if as_json else render(st), file=out)
        return 0
    interval = 2.0 if watch is None else watch
    if interval <= 0 or (count is not None and count < 1):
        print(f"psd: status: --watch needs seconds > 0 and --count at least 1, got {interval:g} and {count}",
              file=sys.stderr)
        return 2
    tty = out.isatty()
    with CtrlC() as ctrl_c:
        try:
            code = _watch(scheduler, as_json, interval, count, out, config, tty, ctrl_c)
            if not ctrl_c.pressed:
                return code
        except KeyboardInterrupt:
            pass
    if tty:
        out.write("\n")
    return 0


def _watch(scheduler: str, as_json: bool, interval: float, count: int | None, out, config, tty: bool,
           ctrl_c: CtrlC) -> int:
    """The refreshes, until ``count`` of them (the code of the last one) or Ctrl-C: its
    KeyboardInterrupt, or, if an extension swallowed that, ``ctrl_c.pressed`` at the next
    check."""
    shown, code = 0, 0
    while not ctrl_c.pressed:
        started = time.monotonic()
        try:
            st = admin.call(scheduler, "status", timeout=max(1.0, min(5.0, 2 * interval)), config=config)
            text = json.dumps(st, sort_keys=True) if as_json else render(st)
            code = 0
        except PsdTimeoutError as e:
            down = {"state": "down", "reasons": [str(e)]}
            text = json.dumps({"scheduler": scheduler, "health": down}) if as_json else f"DOWN: {e}"
            code = 1
        if ctrl_c.pressed:
            break
        shown += 1
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        if as_json:
            out.write(text + "\n")
        elif tty:
            out.write(f"\x1b[H\x1b[2J{stamp}  psd status every {interval:g} s (Ctrl-C to stop)\n\n{text}\n")
        else:
            out.write(("\n" if shown > 1 else "") + f"=== {stamp} psd status ({shown}) ===\n{text}\n")
        out.flush()
        if count is not None and shown >= count:
            return code
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
    return 0
