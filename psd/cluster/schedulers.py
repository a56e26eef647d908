"""Which scheduler to ask, for a node that knows every scheduler's address (the leader's
and the standbys'; docs/fault-tolerance.md, "Standby scheduler"). The client, the server
daemon, heartbeat threads and one-shot admin calls all follow the same two rules: go to
the leader a standby's ``not_leader`` refusal names, or, after silence as long as a dead
node's, to the next address."""
from __future__ import annotations

from collections.abc import Sequence


def lost_after(interval: float, misses: int) -> float:
    """Seconds of silence after which a scheduler counts as lost: the time after which the
    failure detector declares a node dead (``heartbeat_misses`` suspect, twice that dead)."""
    return 2 * misses * interval


def after(schedulers: Sequence[str], current: str) -> str:
    """The address after ``current`` (the first one if ``current`` is not listed)."""
    i = schedulers.index(current) if current in schedulers else -1
    return schedulers[(i + 1) % len(schedulers)]


def named_leader(data: dict | None, schedulers: Sequence[str]) -> str | None:
    """The leader a ``not_leader`` refusal's ``data`` names, if it is one of ``schedulers``
    (a standby that knows none names ``""``)."""
    leader = (data or {}).get("leader")
    return leader if isinstance(leader, str) and leader in schedulers else None
