"""Health at a glance, judged from the scheduler's status: OK, DEGRADED or DOWN, and why.

Pure: it reads a status dict (``psd status --json``) and returns a verdict, so the
scheduler (for ``status`` and its metrics) and the CLI (for an older scheduler) agree.

* DOWN: no live server, or some key range has no live copy (its keys cannot be served;
  when its only copies are on servers declared dead, it waits for them: ``unavailable``).
* DEGRADED: a suspect server; a dead server no newer server has replaced; key ranges with
  fewer live copies than ``replication``; a live server at or over its
  ``limits.max_memory_bytes`` (it refuses pushes that add keys, and so do the primaries
  of the ranges it replicates); a scheduler that hears too few servers (``isolated``); a
  ring change under way; stragglers; suspect workers.
  Each reason is one short sentence.
* OK otherwise.

A dead server stays listed (node ids are never reused) until the scheduler restarts. Each
server that registers while one is dead makes up for one (the scheduler marks it
``replaced``), so a crashed server that systemd restarts, under a new id, brings the
cluster back to OK. A drained server has *left*, which is not a problem.
"""
from __future__ import annotations

import re

OK, DEGRADED, DOWN = "ok", "degraded", "down"
LEVEL = {OK: 0, DEGRADED: 1, DOWN: 2}
LIVE = ("active", "suspect")


def _number(node_id: str) -> int:
    m = re.search(r"(\d+)$", node_id)
    return int(m.group(1)) if m else -1


def _names(ids: list[str], limit: int = 4) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def unreplaced_dead(servers: list[dict]) -> list[str]:
    """Dead servers no later registration made up for (the status's ``replaced``; from an
    older scheduler without it, each live server with a larger id number makes up for one)."""
    dead = sorted((n for n in servers if n["state"] == "dead"), key=lambda n: _number(n["id"]))
    if all("replaced" in n for n in dead):
        return [n["id"] for n in dead if not n["replaced"]]
    newer = sorted(_number(n["id"]) for n in servers if n["state"] in LIVE)
    left = []
    for node in reversed(dead):  # the latest deaths take the latest joiners first
        later = [x for x in newer if x > _number(node["id"])]
        if later:
            newer.remove(later[0])
        else:
            left.append(node["id"])
    return sorted(left, key=_number)


def _number_or_none(v) -> float | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def at_memory_limit(node: dict) -> tuple[float, float] | None:
    """``(bytes held, limit)`` of a server holding at least its ``limits.max_memory_bytes``
    of table storage (its status ``memory`` map), else None."""
    memory = node.get("memory")
    if not isinstance(memory, dict):
        return None
    held, limit = _number_or_none(memory.get("bytes")), _number_or_none(memory.get("limit"))
    if held is None or limit is None or limit <= 0 or not held >= limit:
        return None
    return held, limit


def assess(st: dict) -> dict:
    """``{"state": "ok" | "degraded" | "down", "reasons": [...]}`` for a status dict."""
    nodes = st.get("nodes") or []
    servers = [n for n in nodes if n.get("role") == "server"]
    live = {n["id"] for n in servers if n["state"] in LIVE}
    down: list[str] = []
    degraded: list[str] = []
    if not live:
        down.append("no live server" + (f" ({len(servers)} known, none active)" if servers else ""))
    ranges = st.get("ranges") or []
    replication = int(st.get("replication") or 1)
    if live and not ranges:
        degraded.append(f"no key ranges assigned yet (ring v{st.get('ring_version', 0)})")
    copies = [sum(o in live for o in r["owners"]) for r in ranges]
    lost = sum(c == 0 for c in copies)
    waiting = sorted({o for r in st.get("unavailable") or [] for o in r.get("waiting_for", [])}, key=_number)
    if lost and live and waiting:
        down.append(f"{lost} of {len(ranges)} key ranges unavailable: their only copies are on "
                    f"{_names(waiting)}, declared dead; waiting for {'them' if len(waiting) > 1 else 'it'} "
                    f"to come back (requests for those keys fail as 'unavailable' meanwhile)")
    elif lost and live:
        down.append(f"{lost} of {len(ranges)} key ranges have no live copy")
    short = sum(0 < c < replication for c in copies)
    if short:
        degraded.append(f"{short} of {len(ranges)} key ranges have fewer than {replication} live copies")
    suspect = [n["id"] for n in servers if n["state"] == "suspect"]
    if suspect:
        degraded.append(f"server{'s' if len(suspect) > 1 else ''} {_names(suspect)} suspect (missed heartbeats)")
    gone = unreplaced_dead(servers)
    if gone:
        degraded.append(f"server{'s' if len(gone) > 1 else ''} {_names(gone)} dead and not replaced")
    full = [(n["id"], *at) for n in servers if n["state"] in LIVE and (at := at_memory_limit(n))]
    if len(full) == 1:
        node, held, limit = full[0]
        degraded.append(f"server {node} at its memory limit ({held:.0f} of {limit:.0f} bytes, "
                        f"limits.max_memory_bytes): pushes that add keys are refused")
    elif full:
        degraded.append(f"servers {_names([node for node, _, _ in full])} at their memory limit "
                        f"(limits.max_memory_bytes): pushes that add keys are refused")
    if st.get("isolated"):
        degraded.append("the scheduler hears from too few servers to tell a dead one from its own isolation: "
                        "it changes no ring until it hears from a majority again")
    if st.get("ring_changing"):
        degraded.append("ring change under way (ranges moving)")
    elif st.get("ring_unfinished"):
        degraded.append(f"ring change ({st['ring_unfinished']}) left unfinished: a copy failed, ranges stay "
                        f"in its joint ring until it is tried again")
    stragglers = list((st.get("clocks") or {}).get("stragglers") or [])
    if stragglers:
        degraded.append(f"straggler{'s' if len(stragglers) > 1 else ''} {_names(stragglers)}")
    slow = [n["id"] for n in nodes if n.get("role") == "worker" and n["state"] == "suspect"]
    if slow:
        degraded.append(f"worker{'s' if len(slow) > 1 else ''} {_names(slow)} suspect (missed heartbeats)")
    if down:
        return {"state": DOWN, "reasons": down + degraded}
    if degraded:
        return {"state": DEGRADED, "reasons": degraded}
    return {"state": OK, "reasons": []}
