#!/usr/bin/env python
"""What a membership change costs under each replica placement (spread, chained):
computed from the ring module alone, no daemons, exact (the ring is deterministic).

    .venv/bin/python scripts/ring_placement.py [--servers 3,5,8,16] [--replication 2,3] [--vnodes 16]

For each cluster size and replication, over every member dying in turn (and one
server joining): the share of the key space copied to restore the copies, the servers
copies are read from (for the death of S0, and the most any one server sends, as a
share of the key space), the share of the dead server's ranges the joint ring puts on
one server (its successor under chained), and the owner tuples of the ring. A primary
forwards a push to as many servers as the owner tuples of its ranges name besides it:
``forward servers`` is that count for S0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from psd.cluster.ring import consistent_hash, joint, on_server_death, on_server_join  # noqa: E402
from psd.config import PLACEMENTS  # noqa: E402

SPACE = 2**64


def row(placement: str, n: int, replication: int, vnodes: int) -> dict:
    servers = {f"S{i}" for i in range(n)}
    cur = consistent_hash(servers, 1, vnodes=vnodes, replication=replication, placement=placement)
    copied = most_sent = 0.0
    sources: set[str] = set()
    takeover = 0.0
    for dead in sorted(servers):
        ring, transfers, _lost = on_server_death(cur, dead, servers, vnodes=vnodes, replication=replication,
                                                 placement=placement)
        copied += sum(t.range.size for t in transfers) / SPACE
        sent: dict[str, int] = {}
        for t in transfers:
            sent[t.src] = sent.get(t.src, 0) + t.range.size
        most_sent = max(most_sent, max(sent.values(), default=0) / SPACE)
        if dead == "S0":
            sources = {t.src for t in transfers}
        # who leads the dead server's ranges while the copies run, and how much of them
        mid = joint(cur, ring, servers - {dead}, 2)
        led = cur.led_by(dead)
        by: dict[str, int] = {}
        for r in led:
            owner = mid.owners_at(r.begin)[0]
            by[owner] = by.get(owner, 0) + r.size
        takeover = max(takeover, max(by.values(), default=0) / max(1, sum(r.size for r in led)))
    join = on_server_join(cur, f"S{n}", servers, vnodes=vnodes, replication=replication, placement=placement)
    forward = {s for o in cur.owners if o[0] == "S0" for s in o[1:]}
    return {"copied": copied / n, "sources": len(sources), "most_sent": most_sent, "takeover": takeover,
            "join": sum(t.range.size for t in join.transfers) / SPACE, "tuples": len(set(cur.owners)),
            "forward": len(forward)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", default="3,5,8,16", help="cluster sizes, comma-separated")
    ap.add_argument("--replication", default="2,3", help="replication factors, comma-separated")
    ap.add_argument("--vnodes", type=int, default=16)
    args = ap.parse_args(argv)
    head = (f"{'servers':>7} {'r':>2} {'placement':<9} {'owner tuples':>12} {'forward servers':>15} "
            f"{'copied/death':>12} {'copy sources':>12} {'most one sends':>14} {'one leads':>9} {'copied/join':>11}")
    print(head)
    print("-" * len(head))
    for n in (int(x) for x in args.servers.split(",")):
        for r in (int(x) for x in args.replication.split(",")):
            for placement in PLACEMENTS:
                c = row(placement, n, r, args.vnodes)
                print(f"{n:>7} {r:>2} {placement:<9} {c['tuples']:>12} {c['forward']:>15} {c['copied']:>12.3f} "
                      f"{c['sources']:>12} {c['most_sent']:>14.3f} {c['takeover']:>9.2f} {c['join']:>11.3f}")
    print("\ncopied/death: key-space share copied after one death (mean over members); copy sources: servers "
          "copies come from when S0 dies; most one sends: the largest share one server sends after a death; "
          "one leads: the largest share of a dead server's ranges one survivor leads while copies run; "
          "copied/join: share copied when one server joins.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
