"""What each daemon exports at ``GET /metrics`` (docs/operations.md, "Metrics").

Collectors run at scrape time on the daemon's loop and read the same numbers ``psd
status`` shows (``Server.stats()``, ``Scheduler.status()``), so the two never disagree.
The only instruments updated on the request path are the ``timings`` of the server and
the scheduler: one ``Timings.observe`` per request, which gives both the request count
by op and outcome and the latency histogram by op.
"""
from __future__ import annotations

import os
import statistics
import time

from psd.cluster.health import LEVEL, assess
from psd.codec.traffic import STAGES, saved
from psd.transport.metrics import Family, Registry, counter, gauge, histogram
from psd.transport.metrics_http import MetricsEndpoint

STATES = ("active", "suspect", "dead", "left")
_STARTED = time.time()


def attach(role, address: str) -> MetricsEndpoint:
    """The endpoint for a role object (Scheduler, Server or Worker) at ``address``; once
    started, its bound address is also ``role.metrics_address`` (announced in status)."""
    registry = Registry()
    kind = type(role).__name__.lower()
    registry.add(lambda: process_families(role, kind))
    registry.add({"scheduler": lambda: scheduler_families(role), "server": lambda: server_families(role),
                  "worker": lambda: worker_families(role)}[kind])

    def started(bound: str) -> None:
        role.metrics_address = bound

    return MetricsEndpoint(address, registry.render, on_started=started)


# -- every daemon -------------------------------------------------------------------
def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def process_families(role, kind: str) -> list[Family]:
    node = getattr(role, "node_id", None) or "-"
    out = [gauge("psd_node_info", "This daemon: its node id and role (always 1)").add(1, node=node, role=kind)]
    t = os.times()
    out.append(counter("process_cpu_seconds_total", "User and system CPU time of this process")
               .add(t.user + t.system))
    out.append(gauge("process_start_time_seconds", "When this process started, in Unix seconds").add(_STARTED))
    rss = _rss_bytes()
    if rss is not None:
        out.append(gauge("process_resident_memory_bytes", "Resident memory of this process").add(rss))
    fds = _open_fds()
    if fds is not None:
        out.append(gauge("process_open_fds", "Open file descriptors of this process").add(fds))
    return out


def _traffic(prefix: str, sockets: dict) -> list[Family]:
    """Bytes and messages per channel, from RpcSocket counters (or lists of them)."""
    fams = {
        "bytes_in": counter(f"{prefix}_received_bytes_total", "Bytes received (ZeroMQ frames), by channel"),
        "bytes_out": counter(f"{prefix}_sent_bytes_total", "Bytes sent (ZeroMQ frames), by channel"),
        "messages_in": counter(f"{prefix}_received_messages_total", "Messages received, by channel"),
        "messages_out": counter(f"{prefix}_sent_messages_total", "Messages sent, by channel"),
    }
    for channel, socks in sockets.items():
        socks = [s for s in (socks if isinstance(socks, list) else [socks]) if s is not None]
        for attr, fam in fams.items():
            fam.add(sum(getattr(s, attr, 0) for s in socks), channel=channel)
    return list(fams.values())


def _stages(prefix: str, traffic: dict) -> list[Family]:
    """Bytes after each stage (raw, after key caching, after zstd, wire) by direction,
    and the fraction of raw payload bytes saved (psd.codec.traffic)."""
    stages = counter(f"{prefix}_traffic_bytes_total", "Bytes by direction and stage: raw (keys and values as "
                                                      "meant), after_kc (key caching), after_zstd, wire (with headers)")
    ratio = gauge(f"{prefix}_traffic_saved_ratio", "1 - payload bytes after zstd / raw bytes, by direction")
    for side in ("sent", "received"):
        t = traffic.get(side) or {}
        for stage in STAGES:
            stages.add(t.get(stage, 0), direction=side, stage=stage)
        ratio.add(saved(t), direction=side)
    return [stages, ratio]


def _requests(prefix: str, timings, what: str, latency_help: str) -> list[Family]:
    total = counter(f"{prefix}_requests_total", f"Requests {what} handled, by op and outcome "
                                                 f"(ok, or the error code of the reply)")
    for (op, outcome), n in sorted(timings.counts().items()):
        total.add(n, op=op, outcome=outcome)
    latency = histogram(f"{prefix}_request_duration_seconds", latency_help)
    return [total, timings.histogram(latency, ("op",))]


# -- server ------------------------------------------------------------------------
def server_families(server) -> list[Family]:
    st = server.stats()
    c = st["counters"]
    out = _requests("psd_server", server.timings, "this server",
                    "Time this server spent handling a request on its event loop, by op (not counting time "
                    "a pull is held at the consistency gate or a push waits for its replicas)")
    out += [
        counter("psd_server_request_errors_total", "Requests answered with an error, unknown ops included")
        .add(c.get("errors", 0)),
        counter("psd_server_keys_pushed_total", "Rows applied from pushes and forwards").add(c.get("keys_pushed", 0)),
        counter("psd_server_keys_pulled_total", "Rows answered to pulls").add(c.get("keys_pulled", 0)),
        counter("psd_server_forwards_total", "Forwards sent to replicas (one per replica per push)")
        .add(c.get("replicated", 0)),
        counter("psd_server_duplicate_pushes_total", "Resent pushes recognised and not applied again")
        .add(c.get("duplicates", 0)),
    ]
    peers = list(getattr(getattr(server, "peers", None), "_rpc", {}).items())
    out += _traffic("psd_server", {"data": getattr(server, "data", None), "peers": [p for _, p in peers],
                                   "scheduler": getattr(server, "link", None)})
    out += _stages("psd_server", st.get("traffic") or {})
    kc = st.get("key_cache") or {}
    if kc:
        out += [counter("psd_server_key_cache_total", "Key-list signatures answered from the key cache (hit), "
                                                      "refused keys_unknown (miss), lists kept, evicted, poisoned")
                .add(kc["hits"], outcome="hit").add(kc["misses"], outcome="miss").add(kc["stored"], outcome="stored")
                .add(kc["evicted"], outcome="evicted").add(kc["collisions"], outcome="collision"),
                gauge("psd_server_key_cache_bytes", "Bytes of key lists the key cache holds").add(kc["bytes"])]
    pf = st.get("pull_filters") or {}
    if pf.get("replies"):
        out += [counter("psd_server_pull_filter_rows_total", "Rows of filtered pulls: asked for, and sent "
                                                             "(the rest the worker had, or were zeros)")
                .add(pf["rows"], kind="asked").add(pf["rows_sent"], kind="sent"),
                counter("psd_server_pull_filter_answers_total", "Filtered pull answers: deltas against the "
                                                                "worker's copy, or full")
                .add(pf["deltas"], kind="delta").add(pf["full"], kind="full"),
                gauge("psd_server_pull_filter_bytes", "Bytes of pull-filter state (published rows, what each "
                                                      "worker was sent)").add(pf["bytes"])]
    keys = gauge("psd_server_table_keys", "Keys stored in this server's copy of a table (led and replicated)")
    size = gauge("psd_server_table_bytes", "Bytes of keys, values and updater state of a table on this server")
    for name, t in sorted(st["tables"].items()):
        keys.add(t["keys"], table=name)
        size.add(t["bytes"], table=name)
    out += _bounded("psd_server", st["tables"])
    out += [keys, size,
            gauge("psd_server_ring_version", "The ring version this server serves").add(st["ring"]),
            gauge("psd_server_ranges", "Key ranges this server leads (primary), holds (primary or replica) "
                                       "and is copying in").add(st["leads"], kind="leads")
            .add(st["holds"], kind="holds").add(st["copying_in"], kind="copying_in"),
            gauge("psd_server_pending_acks", "Pushes applied here still waiting for a replica's answer")
            .add(st["pending_acks"])]
    pending = gauge("psd_server_replica_pending_forwards", "Forwards and copies sent to a replica and not yet "
                                                           "answered, by replica")
    for node, rpc in sorted(peers):
        pending.add(len(rpc.pending), replica=node)
    out.append(pending)
    out.append(gauge("psd_server_stalled", "1 while the server refuses requests after an event-loop stall, "
                                           "until the scheduler confirms it is a member")
               .add(1 if getattr(server, "stalled_at", None) is not None else 0))
    memory = st.get("memory") or {}
    if memory:
        out.append(gauge("psd_server_memory_bytes", "Bytes of table storage held here (replicas included), and "
                                                    "bytes held pushes may still add")
                   .add(memory.get("bytes", 0), kind="held").add(memory.get("reserved", 0), kind="reserved"))
        if memory.get("limit") is not None:
            out.append(gauge("psd_server_memory_limit_bytes", "limits.max_memory_bytes").add(memory["limit"]))
    if "limit_refusals" in c:
        out.append(counter("psd_server_limit_refusals_total", "Requests refused by a limit (memory per server)")
                   .add(c["limit_refusals"]))
    if "not_replicated" in c:
        out.append(counter("psd_server_not_replicated_total", "Pushes applied here but refused by a replica, "
                                                              "answered not_replicated (not durable)")
                   .add(c["not_replicated"]))
    out += _gate(st["consistency"])
    return out


def _gate(policies: dict) -> list[Family]:
    held = gauge("psd_server_gate_held_pulls", "Pulls held at the consistency gate, waiting for slower workers "
                                                  "or a checkpoint cut")
    buffered = gauge("psd_server_gate_buffered_pushes", "Pushes kept for the clock boundary (sequential) or "
                                                        "past a checkpoint cut")
    tau = gauge("psd_server_gate_tau", "The staleness bound in force (bounded/sequential; auto may move it)")
    clock = gauge("psd_server_gate_clock", "Slowest and fastest worker clock the gate has seen")
    workers = gauge("psd_server_gate_workers", "Workers the gate counts (live or expected)")
    waits = histogram("psd_server_pull_wait_seconds", "How long pulls were held at the consistency gate "
                                                      "(0 for pulls that ran at once)")
    for name, p in sorted(policies.items()):
        held.add(p.get("held_pulls", 0), policy=name)
        buffered.add(p.get("buffered_pushes", 0), policy=name)
        if p.get("tau") is not None:
            tau.add(p["tau"], policy=name)
        for stat in ("min", "max"):
            if p.get(f"{stat}_clock") is not None:
                clock.add(p[f"{stat}_clock"], policy=name, stat=stat)
        workers.add(len(p.get("clocks") or {}), policy=name)
        w = p.get("waits") or {}
        buckets = w.get("buckets") or {}
        if buckets:
            bounds = [float(k) for k in buckets if k != "+inf"]
            waits.add_histogram(bounds, list(buckets.values()), w.get("sum", 0.0), policy=name)
    return [held, buffered, tau, clock, workers, waits]


# -- scheduler ---------------------------------------------------------------------
def scheduler_families(scheduler) -> list[Family]:
    if getattr(scheduler, "core", True) is None:
        return []  # a standby: it serves nothing until it leads
    st = scheduler.status()
    out = _requests("psd_scheduler", scheduler.timings, "the scheduler",
                    "Time from a request's arrival at the scheduler to its answer, by op (a ring change, "
                    "drain or checkpoint takes as long as the servers do)")
    out += _traffic("psd_scheduler", {"cluster": getattr(scheduler, "rpc", None)})
    nodes = gauge("psd_cluster_nodes", "Nodes by role and liveness state")
    counts = {(r, s): 0 for r in ("server", "worker") for s in STATES}
    for n in st["nodes"]:
        counts[(n["role"], n["state"])] = counts.get((n["role"], n["state"]), 0) + 1
    for (role, state), k in sorted(counts.items()):
        nodes.add(k, role=role, state=state)
    age = gauge("psd_cluster_heartbeat_age_seconds", "Seconds since a live node's last heartbeat")
    for n in st["nodes"]:
        if n["state"] in ("active", "suspect"):
            age.add(n["last_heartbeat"], node=n["id"], role=n["role"])
    health = st.get("health") or assess(st)
    replication = int(st.get("replication") or 1)
    live = {n["id"] for n in st["nodes"] if n["role"] == "server" and n["state"] in ("active", "suspect")}
    short = sum(sum(o in live for o in r["owners"]) < replication for r in st["ranges"])
    out += [nodes, age,
            gauge("psd_cluster_health", "0 OK, 1 DEGRADED, 2 DOWN (psd status says why)")
            .add(LEVEL[health["state"]]),
            gauge("psd_cluster_ring_version", "The current ring version").add(st["ring_version"]),
            gauge("psd_cluster_ring_changing", "1 while key ranges move between servers")
            .add(1 if st["ring_changing"] else 0),
            gauge("psd_cluster_key_ranges", "Key ranges in the ring").add(len(st["ranges"])),
            gauge("psd_cluster_key_ranges_under_replicated", "Key ranges with fewer live copies than "
                                                             "replication").add(short),
            gauge("psd_cluster_replication", "Configured copies of every key range").add(replication)]
    keys = gauge("psd_cluster_table_keys", "Keys of a table over every server, each copy counted")
    size = gauge("psd_cluster_table_bytes", "Bytes of a table over every server, each copy counted")
    for name, t in sorted(st["tables"].items()):
        keys.add(t["keys"], table=name)
        size.add(t["bytes"], table=name)
    out += [keys, size]
    out += _bounded("psd_cluster", st["tables"])
    out += _staleness(st.get("clocks") or {})
    jobs = gauge("psd_cluster_jobs", "Jobs by state")
    by_state = {s: 0 for s in ("waiting", "running", "done", "failed")}
    for j in st.get("jobs") or []:
        by_state[j["state"]] = by_state.get(j["state"], 0) + 1
    for state, k in by_state.items():
        jobs.add(k, state=state)
    out.append(jobs)
    ck = scheduler.checkpoints
    out += [counter("psd_scheduler_checkpoints_total", "Checkpoints written by this scheduler process")
            .add(getattr(ck, "taken", 0)),
            counter("psd_scheduler_checkpoint_failures_total", "Checkpoints that failed in this scheduler process")
            .add(getattr(ck, "failed", 0))]
    last = (st.get("checkpoints") or {}).get("last")
    if last:
        out += [gauge("psd_scheduler_last_checkpoint_id", "Number of the last checkpoint written").add(last["id"]),
                gauge("psd_scheduler_last_checkpoint_timestamp_seconds", "When the last checkpoint was written")
                .add(last["time"]),
                gauge("psd_scheduler_last_checkpoint_keys", "Keys in the last checkpoint").add(last["keys"]),
                gauge("psd_scheduler_last_checkpoint_bytes", "Bytes of the last checkpoint's files")
                .add(last["bytes"])]
    return out


def _staleness(clocks: dict) -> list[Family]:
    live = clocks.get("workers") or {}
    clock = gauge("psd_cluster_worker_clock", "A live worker's clock (its iteration count)")
    lag = gauge("psd_cluster_worker_clock_lag", "How far a live worker's clock is behind the median "
                                                "(negative: ahead); stragglers lag by more than straggler_lag")
    spread = gauge("psd_cluster_workers_clock", "Slowest, median and fastest live worker clock")
    if live:
        median = statistics.median(live.values())
        for w, c in sorted(live.items()):
            clock.add(c, worker=w)
            lag.add(median - c, worker=w)
        spread.add(min(live.values()), stat="min").add(median, stat="median").add(max(live.values()), stat="max")
    stragglers = gauge("psd_cluster_stragglers", "Live workers flagged as stragglers")
    stragglers.add(len(clocks.get("stragglers") or []))
    return [clock, lag, spread, stragglers]


# -- worker daemon -----------------------------------------------------------------
def worker_families(worker) -> list[Family]:
    kv = getattr(worker, "kv", None)
    out = [counter("psd_worker_shards_total", "Job shards (ranks) this worker daemon has run")
           .add(getattr(worker, "shards_run", 0))]
    job = gauge("psd_worker_job", "1 for the job and rank this worker daemon runs now")
    current = getattr(worker, "current", None)
    if current is not None:
        job.add(1, job=current[0], rank=current[1])
    out.append(job)
    if kv is None:
        return out
    servers = list(getattr(kv, "_servers", {}).values())
    out += [gauge("psd_worker_clock", "This worker's clock (its iteration count)").add(kv.clock_value),
            gauge("psd_worker_ring_version", "The ring version this worker routes by").add(kv.ring.version),
            gauge("psd_worker_inflight_requests", "Requests issued and not yet done (pushes, pulls)")
            .add(len(getattr(kv, "_inflight", {}))),
            gauge("psd_worker_pending_replies", "Request parts sent to servers and not yet answered")
            .add(sum(len(r.pending) for r in servers))]
    out += _traffic("psd_worker", {"servers": servers, "scheduler": getattr(kv, "_link", None)})
    if hasattr(kv, "traffic"):
        t = kv.traffic()
        out += _stages("psd_worker", t)
        out += _filters((t.get("filters") or {}).get("tables") or {})
    return out


def _bounded(prefix: str, tables: dict) -> list:
    """Bounded tables' counts (table options admit_after, max_rows, ttl_*): keys refused
    admission and rows evicted, by table; nothing when no table is bounded."""
    bounded = sorted((name, t) for name, t in tables.items() if "evicted" in t)
    if not bounded:
        return []
    refused = counter(f"{prefix}_table_refused_keys_total", "Pushed keys not stored: not admitted yet (admit_after)")
    evicted = counter(f"{prefix}_table_evicted_rows_total", "Rows evicted by decisions of the primary (max_rows, ttl)")
    followed = counter(f"{prefix}_table_evicted_by_primary_rows_total",
                       "Rows a replica deleted because their primary evicted them")
    for name, t in bounded:
        refused.add(t.get("refused", 0), table=name)
        evicted.add(t.get("evicted", 0), table=name)
        followed.add(t.get("evicted_by_primary", 0), table=name)
    return [refused, evicted, followed]


def _filters(tables: dict) -> list[Family]:
    """Per table with filters: bytes given to them and left after each, and rows."""
    stages = counter("psd_worker_filter_bytes_total", "Bytes of keys and values of pushes through a table's "
                                                      "filters: raw (given), after_NAME (left after filter NAME)")
    rows = counter("psd_worker_filter_rows_total", "Rows of pushes through a table's filters: in (given), "
                                                   "out (sent)")
    for table, c in sorted(tables.items()):
        for stage, v in c.items():
            if stage == "raw" or stage.startswith("after_"):
                stages.add(v, table=table, stage=stage)
        rows.add(c.get("rows_in", 0), table=table, kept="in").add(c.get("rows_out", 0), table=table, kept="out")
    return [stages, rows]
