"""Observability: the Prometheus endpoint of every daemon, health at a glance in
``psd status`` (and ``--watch``), and what log records name.

Pure tests of the registry, the exposition format (checked by a small strict parser
written here), the health rules and the HTTP endpoint come first; then real daemons on
127.0.0.1 (one module-scoped LocalCluster with metrics on, 3 servers, replication 2)
scraped with urllib before and after pushes and pulls. The SIGKILL test runs last in
the module and leaves a server dead.
"""
from __future__ import annotations

import _thread
import asyncio
import collections
import io
import json
import logging
import math
import operator
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import zmq

import psd
from psd.client import admin
from psd.cluster.health import assess, unreplaced_dead
from psd.cli.status import health_line, render, show_status
from psd.codec import Message
from psd.config import ClusterConfig
from psd.errors import StartupError
from psd.roles.daemon import HUMAN_FORMAT, IdentityFilter, JsonFormatter, LogIdentity
from psd.transport.metrics import CONTENT_TYPE, Registry, Timings, counter, gauge, histogram
from psd.transport.metrics_http import MAX_CONNECTIONS, MAX_HEAD, MetricsEndpoint

from conftest import server_ranges

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
#: bound on any one wait for the cluster to reach a state
SETTLE = 20.0


# -- a strict parser of the text exposition format 0.0.4 -----------------------------
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def _float(text: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    assert re.fullmatch(r"[-+]?(\d+\.?\d*([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?)", text), f"bad value {text!r}"
    return float(text)


def _unescape(v: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], v)


def parse(text: str) -> dict:
    """``{(sample name, frozenset(labels)): value}``, plus ``"types"``; fails on anything
    the format does not allow: samples before their TYPE, a family split in two,
    duplicate series, histograms whose buckets are not cumulative or miss +Inf."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    types: dict[str, str] = {}
    helps: set[str] = set()
    out: dict = {}
    done: set[str] = set()
    current = None
    for line in text.splitlines():
        assert line, "no blank lines"
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helps, f"two HELP lines for {name}"
            helps.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name not in types, f"two TYPE lines for {name}"
            assert name in helps, f"TYPE before HELP for {name}"
            if current is not None:
                done.add(current)
            types[name], current = kind, name
            continue
        assert not line.startswith("#"), line
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name = m["name"]
        family = name
        if types.get(current) == "histogram":
            family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert family == current and family not in done, f"{name} outside its family's block"
        labels = {}
        rest = m["labels"] or ""
        while rest:
            lm = _LABEL.match(rest)
            assert lm, f"bad labels in {line!r}"
            assert lm[1] not in labels, f"label {lm[1]} twice in {line!r}"
            labels[lm[1]] = _unescape(lm[2])
            rest = rest[lm.end():]
        key = (name, frozenset(labels.items()))
        assert key not in out, f"duplicate series {line!r}"
        out[key] = _float(m["value"])
    for name, kind in types.items():
        if kind == "counter":
            assert name.endswith("_total"), name
        if kind == "histogram":
            _check_histogram(out, name)
    out["types"] = types
    return out


def _check_histogram(samples: dict, name: str) -> None:
    series: dict[frozenset, list] = {}
    for (n, labels), v in samples.items():
        if n == name + "_bucket":
            le = dict(labels)["le"]
            series.setdefault(frozenset(kv for kv in labels if kv[0] != "le"), []).append((_float(le), v))
    for base, buckets in series.items():
        buckets.sort()
        assert buckets[-1][0] == math.inf, f"{name}{dict(base)} has no +Inf bucket"
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), f"{name}{dict(base)} buckets are not cumulative"
        assert samples[(name + "_count", base)] == counts[-1]
        assert (name + "_sum", base) in samples


def value(samples: dict, name: str, **labels) -> float:
    """One series' value (0 when absent: counters start at zero)."""
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())), 0.0)


def total(samples: dict, name: str, **labels) -> float:
    """Sum over every series of ``name`` whose labels include ``labels``."""
    want = {(k, str(v)) for k, v in labels.items()}
    return sum(v for key, v in samples.items() if key != "types" and key[0] == name and want <= key[1])


def scrape(address: str) -> dict:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == CONTENT_TYPE
        return parse(r.read().decode())


# -- the registry and the format -----------------------------------------------------
def test_families_render_in_the_text_format_and_parse_back():
    t = Timings(("op", "outcome"), bounds=(0.001, 0.01, 0.1))
    for seconds in (0.0005, 0.001, 0.002, 0.05, 3.0):
        t.observe(("push", "ok"), seconds)
    t.observe(("push", "not_owner"), 0.02)
    t.observe(("pull", "ok"), 0.0001)
    reg = Registry()
    reg.add(lambda: [counter("x_requests_total", "requests").add(3, op="push").add(1, op='we"ird\\\nop'),
                     gauge("x_depth", "with\nnewline help").add(0.25).add(math.inf, kind="inf"),
                     t.histogram(histogram("x_seconds", "latency"), ("op",))])
    text = reg.render()
    s = parse(text)
    assert s["types"] == {"x_requests_total": "counter", "x_depth": "gauge", "x_seconds": "histogram"}
    assert value(s, "x_requests_total", op='we"ird\\\nop') == 1
    assert value(s, "x_depth") == 0.25 and value(s, "x_depth", kind="inf") == math.inf
    # le is inclusive: 0.001 lands in the 0.001 bucket; the outcomes are merged per op
    assert [value(s, "x_seconds_bucket", op="push", le=le) for le in ("0.001", "0.01", "0.1", "+Inf")] == [2, 3, 5, 6]
    assert value(s, "x_seconds_count", op="push") == 6
    assert value(s, "x_seconds_sum", op="push") == pytest.approx(3.0735)
    assert t.counts() == {("push", "ok"): 5, ("push", "not_owner"): 1, ("pull", "ok"): 1}
    assert "# HELP x_depth with\\nnewline help\n" in text


def test_registry_refuses_what_the_format_forbids():
    with pytest.raises(ValueError, match="must end in _total"):
        counter("requests", "no suffix")
    with pytest.raises(ValueError, match="bad metric"):
        gauge("9lives", "starts with a digit")
    with pytest.raises(ValueError, match="bad label name"):
        gauge("g", "").add(1, le="1")
    with pytest.raises(ValueError, match="need 3 counts"):
        histogram("h", "").add_histogram([1, 2], [1, 2], 3.0)
    reg = Registry()
    reg.add(lambda: [gauge("g", "one")])
    reg.add(lambda: [gauge("g", "two")])
    with pytest.raises(ValueError, match="exported twice"):
        reg.render()


def test_the_parser_catches_broken_text():
    good = "# HELP a_total x\n# TYPE a_total counter\na_total 1\n"
    assert parse(good)[("a_total", frozenset())] == 1
    for bad in ["a_total 1\n",                                                    # no TYPE
                good + "a_total 2\n",                                             # a duplicate
                good.replace("a_total", "a"),                                     # counter without _total
                good.rstrip("\n"),                                                # no final newline
                good + "# HELP b x\n# TYPE b gauge\nb 1\na_total{x=\"1\"} 1\n",     # family split
                "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n"
                "h_count 1\nh_sum 0\n"]:                                           # not cumulative
        with pytest.raises(AssertionError):
            parse(bad)


# -- health rules ------------------------------------------------------------------------
def _status(states: dict[str, str], owners: list[list[str]], replication: int = 2, **extra) -> dict:
    """A status dict; a state "dead/replaced" marks a dead server a later one made up for."""
    nodes = []
    for n, s in states.items():
        state, _, replaced = s.partition("/")
        nodes.append({"id": n, "role": "server" if n.startswith("S") else "worker", "state": state,
                      "last_heartbeat": 0.1, "replaced": bool(replaced)})
    ranges = [{"begin": i, "last": i, "owners": o} for i, o in enumerate(owners)]
    return {"nodes": nodes, "ranges": ranges, "replication": replication, "ring_version": 4,
            "ring_changing": False, "clocks": {"stragglers": []}, **extra}


def test_health_rules():
    ok = _status({"S0": "active", "S1": "active", "W0": "active"}, [["S0", "S1"], ["S1", "S0"]])
    assert assess(ok) == {"state": "ok", "reasons": []}
    assert health_line(ok).startswith("OK: 2 servers and 1 worker active, every key range has 2 live copies")

    dead = _status({"S0": "active", "S1": "dead", "S2": "active"}, [["S0", "S2"], ["S2", "S0"]])
    assert assess(dead) == {"state": "degraded", "reasons": ["server S1 dead and not replaced"]}
    replaced = _status({"S0": "active", "S1": "dead/replaced", "S2": "active", "S3": "active"}, [["S0", "S2"]])
    assert assess(replaced)["state"] == "ok"
    assert unreplaced_dead(replaced["nodes"]) == []
    # an older scheduler's status (no "replaced"): each live server with a larger id stands in for one
    old = [{"id": "S1", "role": "server", "state": "dead"}, {"id": "S3", "role": "server", "state": "active"},
           {"id": "S4", "role": "server", "state": "dead"}]
    assert unreplaced_dead(old) == ["S4"] and unreplaced_dead(old[:2]) == []

    short = _status({"S0": "active", "S1": "suspect"}, [["S0", "S1"], ["S0", "S2"]], ring_changing=True,
                    clocks={"stragglers": ["W3"]})
    assert assess(short) == {"state": "degraded", "reasons": [
        "1 of 2 key ranges have fewer than 2 live copies", "server S1 suspect (missed heartbeats)",
        "ring change under way (ranges moving)", "straggler W3"]}
    assert health_line(short).startswith("DEGRADED: 1 of 2 key ranges have fewer than 2 live copies; ")
    stuck = _status({"S0": "active", "S1": "active"}, [["S0", "S1"]], ring_unfinished="S2 died")
    assert assess(stuck) == {"state": "degraded", "reasons": [
        "ring change (S2 died) left unfinished: a copy failed, ranges stay in its joint ring until it is tried "
        "again"]}

    lost = _status({"S0": "active", "S1": "dead", "S2": "dead"}, [["S1", "S2"], ["S0", "S1"]])
    verdict = assess(lost)
    assert verdict["state"] == "down" and verdict["reasons"][0] == "1 of 2 key ranges have no live copy"
    assert assess(_status({"S0": "dead"}, [["S0"]]))["reasons"][0] == "no live server (1 known, none active)"
    assert assess(_status({}, []))["state"] == "down"
    assert health_line(_status({}, [])) == "DOWN: no live server"

    full = _status({"S0": "active", "S1": "active", "S2": "dead/replaced"}, [["S0", "S1"]])
    memory = {"S0": {"bytes": 100, "limit": 100}, "S1": {"bytes": 99, "limit": 100}, "S2": {"bytes": 9, "limit": 1}}
    for n in full["nodes"]:
        n["memory"] = memory[n["id"]]
    assert assess(full) == {"state": "degraded", "reasons": [
        "server S0 at its memory limit (100 of 100 bytes, limits.max_memory_bytes): pushes that add keys "
        "are refused"]}  # S1 is below its limit; S2 is dead
    full["nodes"][1]["memory"] = {"bytes": 150, "limit": 100}
    assert assess(full)["reasons"] == ["servers S0, S1 at their memory limit (limits.max_memory_bytes): "
                                       "pushes that add keys are refused"]
    for junk in ({"bytes": 100, "limit": None}, {"bytes": 100, "limit": 0}, {"bytes": float("nan"), "limit": 1},
                 {"bytes": "100", "limit": 1}, {"bytes": True, "limit": 1}, [], None):
        for n in full["nodes"][:2]:
            n["memory"] = junk
        assert assess(full)["state"] == "ok", junk


# -- the HTTP endpoint, in process ---------------------------------------------------------
async def _http(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


def test_endpoint_answers_get_head_and_refuses_the_rest():
    async def main():
        renders = []

        def render():
            renders.append(1)
            return "# HELP up_total x\n# TYPE up_total counter\nup_total 1\n"

        seen = []
        ep = MetricsEndpoint("127.0.0.1:0", render, on_started=seen.append)
        address = await ep.start()
        assert seen == [address] and address.startswith("127.0.0.1:") and not address.endswith(":0")
        port = int(address.rsplit(":", 1)[1])
        try:
            got = await _http(port, b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body = got.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200 OK") and b"version=0.0.4" in head
            assert b"Connection: close" in head and body.endswith(b"up_total 1\n")
            got = await _http(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
            assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"\r\n\r\n")
            assert (await _http(port, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
            got = await _http(port, b"POST /metrics HTTP/1.1\r\n\r\n")
            assert got.startswith(b"HTTP/1.1 405") and b"Allow: GET, HEAD" in got
            assert (await _http(port, b"nonsense\r\n\r\n")).startswith(b"HTTP/1.1 400")
            assert (await _http(port, b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * MAX_HEAD)).startswith(
                b"HTTP/1.1 431")
            assert (await _http(port, b"GET /metrics\n")).startswith(b"HTTP/1.1 200")  # nc-style, ends at EOF
            assert ep.scrapes == len(renders) == 3
            # idle connections hold at most MAX_CONNECTIONS slots; one more is turned away at once
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CONNECTIONS)]
            await asyncio.sleep(0.1)
            assert (await _http(port, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 503")
            for _, w in idle:
                w.close()
            await asyncio.sleep(0.1)
            assert (await _http(port, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200")
            # a second endpoint on the same port is a start-up failure naming the setting
            with pytest.raises(StartupError, match=r"^metrics: cannot listen on 127\.0\.0\.1:\d+: "):
                await MetricsEndpoint(address, render).start()
        finally:
            await ep.close()

    asyncio.run(main())


def test_endpoint_survives_a_failing_render():
    async def main():
        ep = MetricsEndpoint("127.0.0.1:0", lambda: 1 / 0)
        port = int((await ep.start()).rsplit(":", 1)[1])
        try:
            assert (await _http(port, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 500")
            assert (await _http(port, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 500")
        finally:
            await ep.close()

    asyncio.run(main())


# -- log records ---------------------------------------------------------------------------
class _Role:
    node_id = "W7"

    class ring:
        version = 12

    def __init__(self, clock):
        self.clock = clock

    def log_clock(self):
        if self.clock == "boom":
            raise RuntimeError("dict changed size")
        return self.clock


def _records(source, fmt) -> list[str]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(IdentityFilter(LogIdentity("worker", source=source)))
    handler.setFormatter(fmt)
    logger = logging.getLogger("psd.test_metrics")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("pulled %s", np.zeros(1000, np.float32))
    finally:
        logger.removeHandler(handler)
    return stream.getvalue().splitlines()


def test_log_records_name_node_role_ring_and_clock():
    record = json.loads(_records(_Role(5), JsonFormatter())[0])
    assert (record["node"], record["role"], record["ring"], record["clock"]) == ("W7", "worker", 12, 5)
    assert record["msg"] == "pulled <float32[1000] 4 KiB>"
    line = _records(_Role(5), logging.Formatter(HUMAN_FORMAT))[0]
    assert re.search(r" W W7/worker v12 c5 psd\.test_metrics: pulled <float32\[1000\] 4 KiB>$", line), line
    # unknown clock (or one that cannot be read from this thread): left out, never an error
    assert "clock" not in json.loads(_records(_Role("boom"), JsonFormatter())[0])
    assert re.search(r" W W7/worker v12 psd", _records(_Role(None), logging.Formatter(HUMAN_FORMAT))[0])


# -- real daemons ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mcluster(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    with psd.LocalCluster(servers=3, replication=2, metrics="127.0.0.1:0", checkpoint_dir=str(ckpt)) as c:
        yield c


def endpoints(cluster, workers: int = 0) -> dict[str, str]:
    """{node id or "H": metrics address}, once every server (and ``workers`` workers)
    announced one."""
    deadline = time.monotonic() + SETTLE
    while True:
        st = cluster.status()
        found = {n["id"]: n["metrics"] for n in st["nodes"] if n.get("metrics") and n["state"] == "active"}
        servers = sum(n["role"] == "server" and n["state"] == "active" for n in st["nodes"])
        if st["metrics"] and sum(k.startswith("S") for k in found) == servers and \
                sum(k.startswith("W") for k in found) >= workers:
            return {"H": st["metrics"], **found}
        assert time.monotonic() < deadline, f"metrics addresses not announced: {st['nodes']}"
        time.sleep(0.05)


def test_every_daemon_announces_its_endpoint(mcluster):
    eps = endpoints(mcluster)
    assert set(eps) == {"H", "S0", "S1", "S2"}
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", a) and not a.endswith(":0") for a in eps.values())
    assert len(set(eps.values())) == 4
    logs = (mcluster.workdir / "server0.log").read_text()
    assert re.search(r"psd\.metrics: metrics at http://127\.0\.0\.1:\d+/metrics", logs), logs
    for node, address in eps.items():
        s = scrape(address)
        assert value(s, "psd_node_info", node=node, role="scheduler" if node == "H" else "server") == 1
        assert value(s, "process_resident_memory_bytes") > 0 and value(s, "process_open_fds") > 0
    text = render(mcluster.status())
    assert f"metrics {eps['H']}" in text.splitlines()[2] and eps["S1"] in text


def test_server_metrics_count_pushes_pulls_bytes_and_table_sizes(mcluster):
    eps = endpoints(mcluster)
    first = server_ranges(mcluster)[0]  # keys inside one range: one primary, one replica
    primary = first.node
    replica = next(r["owners"][1] for r in mcluster.status()["ranges"] if r["begin"] == first.begin)
    n, width = 500, 4
    keys = np.arange(first.begin, first.begin + n, dtype=np.uint64)
    assert keys[-1] <= first.last
    before = {node: scrape(eps[node]) for node in (primary, replica)}
    kv = psd.connect(mcluster)
    try:
        t = kv.table("m", width=width, dtype="float32", updater="sum")
        values = np.ones((n, width), np.float32)
        for _ in range(3):
            kv.wait(t.push(keys, values))
        for _ in range(2):
            assert t.pull(keys).shape == (n, width)
    finally:
        kv.close()
    after = {node: scrape(eps[node]) for node in (primary, replica)}
    b, a = before[primary], after[primary]
    assert value(a, "psd_server_requests_total", op="push", outcome="ok") - \
        value(b, "psd_server_requests_total", op="push", outcome="ok") == 3
    assert value(a, "psd_server_requests_total", op="pull", outcome="ok") - \
        value(b, "psd_server_requests_total", op="pull", outcome="ok") == 2
    for op, k in (("push", 3), ("pull", 2)):
        assert value(a, "psd_server_request_duration_seconds_count", op=op) - \
            value(b, "psd_server_request_duration_seconds_count", op=op) == k
    assert value(a, "psd_server_request_duration_seconds_sum", op="push") > \
        value(b, "psd_server_request_duration_seconds_sum", op="push")
    assert value(a, "psd_server_keys_pushed_total") - value(b, "psd_server_keys_pushed_total") == 3 * n
    assert value(a, "psd_server_keys_pulled_total") - value(b, "psd_server_keys_pulled_total") == 2 * n
    assert value(a, "psd_server_forwards_total") - value(b, "psd_server_forwards_total") == 3
    # key caching: the first push sends the 500 keys whole, the later pushes and the pulls
    # name them by signature (the worker waited for each answer)
    raw = 3 * n * (8 + 4 * width) + 2 * n * 8
    payload = 3 * n * 4 * width + n * 8
    assert value(a, "psd_server_received_bytes_total", channel="data") - \
        value(b, "psd_server_received_bytes_total", channel="data") >= payload

    def stage(scrape_, direction, stage_):
        return value(scrape_, "psd_server_traffic_bytes_total", direction=direction, stage=stage_)
    assert stage(a, "received", "raw") - stage(b, "received", "raw") == raw
    assert stage(a, "received", "after_kc") - stage(b, "received", "after_kc") == payload
    assert stage(a, "received", "wire") - stage(b, "received", "wire") > payload
    assert 0 < value(a, "psd_server_traffic_saved_ratio", direction="received") < 1
    assert value(a, "psd_server_sent_bytes_total", channel="data") - \
        value(b, "psd_server_sent_bytes_total", channel="data") >= 2 * n * 4 * width
    assert value(a, "psd_server_sent_bytes_total", channel="peers") - \
        value(b, "psd_server_sent_bytes_total", channel="peers") >= 3 * n * (8 + 4 * width)
    # the replica applied the three forwards
    rb, ra = before[replica], after[replica]
    assert value(ra, "psd_server_requests_total", op="replicate", outcome="ok") - \
        value(rb, "psd_server_requests_total", op="replicate", outcome="ok") == 3
    assert value(ra, "psd_server_keys_pushed_total") - value(rb, "psd_server_keys_pushed_total") == 3 * n
    # table sizes: the same numbers as `psd status` (once the servers' next heartbeats
    # brought them to the scheduler), which counts every copy
    deadline = time.monotonic() + SETTLE
    while True:
        st = mcluster.status()
        name = next(k for k in st["tables"] if k == "m" or k.endswith("/m") or k.endswith(".m"))
        if all(st["tables"][name]["per_server"].get(node, {}).get("keys") == n for node in (primary, replica)):
            break
        assert time.monotonic() < deadline, st["tables"][name]
        time.sleep(0.05)
    for node in (primary, replica):
        s = scrape(eps[node])
        assert value(s, "psd_server_table_keys", table=name) == st["tables"][name]["per_server"][node]["keys"] == n
        assert value(s, "psd_server_table_bytes", table=name) == st["tables"][name]["per_server"][node]["bytes"] > 0
        assert value(s, "psd_server_ring_version") == st["ring_version"]
        assert value(s, "psd_server_pending_acks") == 0
        assert value(s, "psd_server_gate_held_pulls", policy="eventual/2") == 0
    s = scrape(eps["H"])
    assert value(s, "psd_cluster_table_keys", table=name) == st["tables"][name]["keys"] == 2 * n
    assert value(s, "psd_cluster_table_bytes", table=name) == st["tables"][name]["bytes"]
    assert total(s, "psd_server_pull_wait_seconds_count") == 0  # a server's metric, not the scheduler's
    assert total(after[primary], "psd_server_pull_wait_seconds_count") >= 2


def test_errors_are_counted_by_outcome(mcluster, raw_dealer):
    eps = endpoints(mcluster)
    node = next(n for n in mcluster.status()["nodes"] if n["id"] == "S0")
    before = scrape(eps["S0"])
    dealer = raw_dealer(node["address"])
    for _ in range(2):
        reply = dealer.request(Message("pull", table="no-such-table", arrays=[np.arange(3, dtype=np.uint64)]))
        assert reply.op == "error" and reply.meta["code"] == "unknown_table"
    after = scrape(eps["S0"])
    assert value(after, "psd_server_requests_total", op="pull", outcome="unknown_table") - \
        value(before, "psd_server_requests_total", op="pull", outcome="unknown_table") == 2
    assert value(after, "psd_server_request_errors_total") - value(before, "psd_server_request_errors_total") == 2


def test_scheduler_metrics_nodes_ring_staleness_and_checkpoints(mcluster):
    eps = endpoints(mcluster)
    before = scrape(eps["H"])
    statuses = 3
    for _ in range(statuses):
        mcluster.status()
    kv = psd.connect(mcluster)
    try:
        t = kv.table("clocked", width=1)
        kv.wait(t.push(np.arange(10, dtype=np.uint64), np.ones((10, 1), np.float32)))
        for _ in range(4):
            kv.clock()
        deadline = time.monotonic() + SETTLE
        while True:  # the sync client's heartbeat thread carries the clock
            s = scrape(eps["H"])
            if value(s, "psd_cluster_worker_clock", worker=kv.node_id) == 4:
                break
            assert time.monotonic() < deadline, "the worker's clock never reached the scheduler"
            time.sleep(0.05)
        assert value(s, "psd_cluster_worker_clock_lag", worker=kv.node_id) == 0
        assert value(s, "psd_cluster_workers_clock", stat="min") == 4 == value(s, "psd_cluster_workers_clock",
                                                                                  stat="max")
        assert value(s, "psd_cluster_stragglers") == 0
        assert value(s, "psd_cluster_nodes", role="worker", state="active") >= 1
    finally:
        kv.close()
    st = mcluster.status()
    s = scrape(eps["H"])
    assert value(s, "psd_scheduler_requests_total", op="status", outcome="ok") - \
        value(before, "psd_scheduler_requests_total", op="status", outcome="ok") >= statuses
    assert value(s, "psd_scheduler_request_duration_seconds_count", op="status") >= statuses
    assert value(s, "psd_cluster_nodes", role="server", state="active") == 3
    assert value(s, "psd_cluster_nodes", role="server", state="dead") == 0
    assert value(s, "psd_cluster_ring_version") == st["ring_version"] > 0
    assert value(s, "psd_cluster_key_ranges") == len(st["ranges"])
    assert value(s, "psd_cluster_key_ranges_under_replicated") == 0
    assert value(s, "psd_cluster_health") == 0 and st["health"]["state"] == "ok"
    assert value(s, "psd_cluster_ring_changing") == 0
    assert value(s, "psd_scheduler_received_messages_total", channel="cluster") > 0
    # no live worker now: a checkpoint needs no clock and is counted
    taken = value(s, "psd_scheduler_checkpoints_total")
    info = admin.call(mcluster.scheduler, "checkpoint", timeout=30, wait=20)
    s = scrape(eps["H"])
    assert value(s, "psd_scheduler_checkpoints_total") == taken + 1
    assert value(s, "psd_scheduler_last_checkpoint_id") == info["id"]
    assert value(s, "psd_scheduler_last_checkpoint_keys") == info["keys"]


def test_worker_daemon_exports_and_announces(mcluster):
    child = mcluster.spawn("metrics-worker", [sys.executable, "-m", "psd", "worker", "--config",
                                              str(mcluster.config_path), "--scheduler", mcluster.scheduler])
    try:
        eps = endpoints(mcluster, workers=1)
        worker = next(k for k in eps if k.startswith("W") and
                      next(n for n in mcluster.status()["nodes"] if n["id"] == k)["state"] == "active")
        s = scrape(eps[worker])
        assert value(s, "psd_node_info", node=worker, role="worker") == 1
        assert value(s, "psd_worker_clock") == 0 and value(s, "psd_worker_inflight_requests") == 0
        assert value(s, "psd_worker_ring_version") > 0
        assert value(s, "psd_worker_shards_total") == 0
        assert value(s, "psd_worker_sent_messages_total", channel="scheduler") > 0
    finally:
        child.proc.send_signal(signal.SIGTERM)
        assert child.proc.wait(SETTLE) == 0, child.log_tail()


def _listening_ports(pid: int) -> set[int]:
    return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


def test_metrics_are_off_by_default():
    with psd.LocalCluster(servers=1) as cluster:
        st = cluster.status()
        assert st["metrics"] is None and all(n.get("metrics") is None for n in st["nodes"])
        for child in [cluster.scheduler_proc, *cluster.servers]:
            zmq_port = int(child.address.rsplit(":", 1)[1])
            assert _listening_ports(child.pid) == {zmq_port}, child.name


def test_a_busy_metrics_port_is_a_start_up_failure(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "psd", "scheduler", "--bind", "tcp://127.0.0.1:0",
                               "--metrics", f"127.0.0.1:{port}", "--security", "none"], capture_output=True, text=True, timeout=SETTLE,
                              env={k: v for k, v in os.environ.items() if not k.startswith("PSD_")})
    assert proc.returncode == 3, proc.stderr
    assert f"start-up failed: metrics: cannot listen on 127.0.0.1:{port}: " in proc.stderr


# -- psd status: health and --watch ---------------------------------------------------------
def _psd_status(scheduler: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "psd", "status", "--scheduler", scheduler, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, **kw)


def test_status_watch_prints_count_snapshots_and_exits_0(mcluster):
    proc = _psd_status(mcluster.scheduler, "--watch", "0.2", "--count", "3")
    out, err = proc.communicate(timeout=SETTLE)
    assert proc.returncode == 0, err
    heads = re.findall(r"^=== \d{4}-\d\d-\d\d \d\d:\d\d:\d\d psd status \((\d)\) ===$", out, re.M)
    assert heads == ["1", "2", "3"], out
    snapshots = re.split(r"^=== .* ===\n", out, flags=re.M)[1:]
    assert all(s.startswith("OK: 3 servers") and "key ranges" in s for s in snapshots), out

    proc = _psd_status(mcluster.scheduler, "--json", "--watch", "0.1", "--count", "2")
    out, err = proc.communicate(timeout=SETTLE)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and all(json.loads(x)["health"]["state"] == "ok" for x in lines)


def test_status_watch_stops_on_ctrl_c_with_0(mcluster):
    proc = _psd_status(mcluster.scheduler, "--watch", "0.2")
    try:
        first = proc.stdout.readline()
        assert first.startswith("=== "), first
        proc.send_signal(signal.SIGINT)
        assert proc.wait(SETTLE) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def _lose_a_ctrl_c_as_pyzmq_does() -> None:
    """Press Ctrl-C where pyzmq loses it: the signal is pending when a received zmq.Frame
    is freed, and Frame.__dealloc__ runs the SIGINT handler, whose KeyboardInterrupt it
    can only print ("Exception ignored in ..."). All in C calls, so the interpreter does
    not run the handler earlier, between them."""
    frames = [zmq.Frame(b"reply")]
    collections.deque(map(operator.call, [_thread.interrupt_main, frames.clear]), maxlen=0)


def test_status_watch_stops_on_a_ctrl_c_that_pyzmq_swallowed(mcluster, monkeypatch):
    """The flaky Ctrl-C of the test above: a press landing while a reply was being read
    was lost, and the watch went on."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        monkeypatch.setattr(signal, "getsignal", lambda s: signal.default_int_handler)  # (xdist)
    real, calls = admin.call, []

    def call(*args, **kw):
        reply = real(*args, **kw)
        calls.append(1)
        if len(calls) == 2:
            _lose_a_ctrl_c_as_pyzmq_does()
        return reply

    monkeypatch.setattr("psd.cli.status.admin.call", call)
    lost = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: lost.append(u.exc_type))
    out = io.StringIO()
    assert show_status(mcluster.scheduler, watch=0.01, count=4, out=out) == 0
    assert lost == [KeyboardInterrupt]
    assert len(calls) == 2 and out.getvalue().count("=== ") == 1, out.getvalue()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_status_watch_redraws_in_place_on_a_terminal_and_says_down_when_unreachable(mcluster):
    screen = _Terminal()
    assert show_status(mcluster.scheduler, watch=0.05, count=2, out=screen) == 0
    frames = screen.getvalue().split("\x1b[H\x1b[2J")
    assert frames[0] == "" and len(frames) == 3
    assert all("psd status every 0.05 s (Ctrl-C to stop)\n\nOK: " in f for f in frames[1:])
    with socket.socket() as s:  # a port nobody answers on
        s.bind(("127.0.0.1", 0))
        nobody = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    out = io.StringIO()
    plaintext = ClusterConfig().replace(security="none")  # no handshake: nothing answers at all
    assert show_status(nobody, watch=0.5, count=1, out=out, config=plaintext) == 1
    assert re.search(r"^DOWN: no answer from the scheduler at tcp://127\.0\.0\.1:\d+", out.getvalue(), re.M)


def test_server_logs_name_ring_version(mcluster):
    text = (mcluster.workdir / "server0.log").read_text()
    assert re.search(r"^\S+ \S+ I S\d/server v\d+ psd\.server: S\d at ring v\d+", text, re.M), text[:2000]


def test_health_degraded_after_sigkill_then_ok_once_replaced(mcluster):
    """Last in the module: it kills a server."""
    eps = endpoints(mcluster)
    victim = mcluster.node_id(1)
    mcluster.kill_server(1)
    deadline = time.monotonic() + SETTLE
    while True:
        st = mcluster.status()
        if any(n["id"] == victim and n["state"] == "dead" for n in st["nodes"]):
            break
        assert time.monotonic() < deadline, "the killed server was never declared dead"
        time.sleep(0.05)
    out = subprocess.run([sys.executable, "-m", "psd", "status", "--scheduler", mcluster.scheduler],
                         capture_output=True, text=True, timeout=SETTLE, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert first.startswith("DEGRADED: ") and f"server {victim} dead and not replaced" in first, out.stdout
    s = scrape(eps["H"])
    assert value(s, "psd_cluster_health") == 1
    assert value(s, "psd_cluster_nodes", role="server", state="dead") == 1
    # a new server stands in for the dead one: OK again once the ring has settled
    mcluster.add_server()
    deadline = time.monotonic() + SETTLE
    while mcluster.status()["health"]["state"] != "ok":
        assert time.monotonic() < deadline, mcluster.status()["health"]
        time.sleep(0.1)
    assert health_line(mcluster.status()).startswith("OK: 3 servers")
