#!/usr/bin/env python3
"""The longest single stall an evicting table's alignment (decision 153) puts on a
server's event loop, at a few table sizes.

    python scripts/bench_align.py                 # 1e5 and 1e6 rows
    python scripts/bench_align.py --rows 1e7      # the paper's scale per server (~3 GB RAM)

A primary (S1) comes to lead anew a range of N random uint64 keys (width 8, float32) that
its replica (S2) holds too, as after a failover. Both are ``ServerCore``s in this process,
answering each other directly: no sockets, so the figures are the cores' own work. Timed
apart: the ring change on S1 (which only plans the alignment), S1's largest tick (which
sends one part), and S2's largest handling of one ``align``. A stall longer than the
server's lease (0.7 s at the default heartbeats) would make it refuse requests for a
moment; one longer than the failure timeout would get it declared dead.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from psd.cluster.assignment import Assignment  # noqa: E402
from psd.cluster.ranges import KEY_SPACE_END, Range  # noqa: E402
from psd.codec import Message  # noqa: E402
from psd.config import ClusterConfig  # noqa: E402
from psd.core.effects import Ask, Reply  # noqa: E402
from psd.core.server import ServerCore  # noqa: E402
from psd.schema import TableSpec  # noqa: E402

A, B = Range(0, 1 << 40), Range(1 << 40, KEY_SPACE_END)
ADDRESSES = {s: f"tcp://{s}" for s in ("S0", "S1", "S2")}
TICK = 0.05  # virtual seconds between ticks


def _ring(version: int, owners_a: tuple[str, ...]) -> Assignment:
    return Assignment(version=version, ranges=(A, B), owners=(owners_a, ("S0",)), addresses=ADDRESSES)


def _server(node: str, spec: TableSpec, keys: np.ndarray, vals: np.ndarray) -> ServerCore:
    core = ServerCore(ClusterConfig(security="none", consistency="eventual"), secure=False)
    core.node_id, core.ring = node, _ring(1, ("S0", "S1", "S2"))
    core._create(spec)
    core.fence.confirmed(0.0)
    for i in range(0, keys.size, 1 << 20):
        core.tables[spec.name].push(keys[i:i + (1 << 20)], vals[i:i + (1 << 20)])
    return core


def _aligns(effects: list) -> list[Ask]:
    return [e for e in effects if isinstance(e, Ask) and e.msg.op == "align"]


def measure(n: int, deadline: float) -> dict:
    """One size: the stalls, and how many ticks and messages the alignment took."""
    spec = TableSpec("b", 8, "float32", "sum", {"max_rows": 2 * n})
    rng = np.random.default_rng(1)
    keys = np.unique(rng.integers(0, 1 << 40, int(n * 1.01), dtype=np.uint64))[:n]
    vals = rng.random((keys.size, 8), dtype=np.float32)
    s1, s2 = _server("S1", spec, keys, vals), _server("S2", spec, keys, vals)
    new_ring = Message("ring", meta={"ring": _ring(2, ("S1", "S2")).to_wire()})
    s2.control(new_ring, 0.0)
    s2._take()
    t = time.perf_counter()
    asks = _aligns(s1.control(new_ring, 0.0))
    out = {"rows": n, "ring": time.perf_counter() - t, "tick": 0.0, "replica": 0.0, "ticks": 0, "messages": 0,
           "largest_mb": 0.0}
    now = 0.0
    while True:
        for ask in asks:
            ask.msg.sender = "S1"
            out["messages"] += 1
            out["largest_mb"] = max(out["largest_mb"], sum(a.nbytes for a in ask.msg.arrays) / 1e6)
            t = time.perf_counter()
            replies = s2.handle(None, ask.msg, now)
            out["replica"] = max(out["replica"], time.perf_counter() - t)
            for e in replies:
                if isinstance(e, Reply):
                    s1.answered(ask.token, e.msg, None, now)
        s1._take()
        if not s1.bounds._aligns:
            return out
        if time.monotonic() > deadline:
            raise SystemExit(f"{n} rows: not aligned within the time bound ({out['ticks']} ticks)")
        now += TICK
        s1.fence.confirmed(now)
        t = time.perf_counter()
        s1.bounds.tick(now)
        out["tick"] = max(out["tick"], time.perf_counter() - t)
        out["ticks"] += 1
        asks = _aligns(s1._take())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=float, nargs="+", default=[1e5, 1e6], help="table sizes (default 1e5 1e6)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run (default 600)")
    args = ap.parse_args()
    deadline = time.monotonic() + args.timeout
    print(f"{'rows':>6} | {'ring change s':>13} | {'largest tick s':>14} | {'replica align s':>15} | "
          f"{'ticks':>5} | {'messages':>8} | {'largest MB':>10}")
    for rows in args.rows:
        print(f"  measuring {rows:.0e} rows ...", file=sys.stderr, flush=True)
        r = measure(int(rows), deadline)
        print(f"{r['rows']:>6.0e} | {r['ring']:>13.3f} | {r['tick']:>14.3f} | {r['replica']:>15.3f} | "
              f"{r['ticks']:>5} | {r['messages']:>8} | {r['largest_mb']:>10.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
