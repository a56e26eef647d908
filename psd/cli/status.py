"""``psd status``: the scheduler's view of the cluster, as a table or as JSON."""
from __future__ import annotations

import json

from psd.client import admin


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


def render(st: dict) -> str:
    out = [f"scheduler {st['scheduler']}  up {st['uptime']:.0f} s  ring v{st['ring_version']}", ""]
    nodes = st["nodes"]
    health = sum(n["state"] == "active" for n in nodes)
    out.append(f"nodes ({health}/{len(nodes)} active)")
    out.append(_table(["id", "role", "state", "address", "heartbeat", "requests", "in", "out"], [
        [n["id"], n["role"], n["state"], n["address"] or "-", f"{n['last_heartbeat']:.1f}s ago",
         sum(v for k, v in n["counters"].items() if k in ("push", "pull", "pushpull")),
         _size(n["bytes_in"]), _size(n["bytes_out"])] for n in nodes]))
    out += ["", "key ranges"]
    out.append(_table(["begin", "last", "owners"], [
        [f"{r['begin']:#018x}", f"{r['last']:#018x}", ",".join(r["owners"])] for r in st["ranges"]]))
    out += ["", "tables"]
    out.append(_table(["name", "width", "dtype", "updater", "keys", "memory"], [
        [name, t["width"], t["dtype"], t["updater"], t["keys"], _size(t["bytes"])]
        for name, t in st["tables"].items()]))
    out += _workers(st)
    if st.get("jobs"):
        out += ["", "jobs"]
        out.append(_table(["id", "app", "state", "progress", "workers"], [
            [j["id"], j["app"], j["state"], f"{100 * j['progress']:.0f}%", j["num_workers"]]
            for j in st["jobs"]]))
    return "\n".join(out)


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


def show_status(scheduler: str, as_json: bool = False) -> int:
    st = admin.call(scheduler, "status")
    print(json.dumps(st, indent=2, sort_keys=True) if as_json else render(st))
    return 0
