"""CurveZMQ, on by default: keys, refusals by real daemons, AuthError for clients, and
what the wire carries (a TCP relay between a client and a server captures the bytes).

Every daemon here is real (LocalCluster children on 127.0.0.1); every wait is bounded."""
from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import psd
from psd.client import admin
from psd.codec import Message, encode
from psd.config import ClusterConfig
from psd.transport import security

from conftest import RawDealer, server_addresses

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
PSD = [sys.executable, "-m", "psd"]
#: how long a refused client waits for the reply that must not come
SILENCE = 1.5


def psd_cli(*args: str, env_extra: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSD_")} | (env_extra or {})
    return subprocess.run([*PSD, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def u64(*keys) -> np.ndarray:
    return np.array(keys, dtype=np.uint64)


# -- psd keygen ---------------------------------------------------------------------------------
def test_keygen_writes_a_key_set_with_private_secrets(tmp_path):
    folder = tmp_path / "keys"
    written = security.keygen(folder, ["alice", "bob"])
    names = sorted(p.relative_to(folder).as_posix() for p in written)
    assert names == sorted(["server.key", "server.key_secret", "authorized/server.key",
                            "alice.key", "alice.key_secret", "authorized/alice.key",
                            "bob.key", "bob.key_secret", "authorized/bob.key"])
    for p in written:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o600 if p.name.endswith(".key_secret") else 0o644), (p, oct(mode))
        if p.name.endswith(".key"):
            assert "secret-key" not in p.read_text()
    import zmq.auth
    public, secret = zmq.auth.load_certificate(folder / "alice.key_secret")
    assert len(public) == len(secret) == 40
    assert zmq.auth.load_certificate(folder / "authorized" / "alice.key") == (public, None)
    daemon = security.load_daemon(folder)
    assert daemon.public == daemon.server_public and daemon.name == "server"
    # a folder with several clients: a client there uses the server pair (a daemon host)
    assert security.load_client(folder).name == "server"


def test_keygen_refuses_to_overwrite_and_adds_clients(tmp_path):
    folder = tmp_path / "keys"
    security.keygen(folder)
    server = (folder / "server.key").read_text()
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(psd.PsdError, match="refusing to overwrite"):
        security.keygen(folder)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    security.keygen(folder, ["w1"], add=True)          # the set gains a client, the server pair stays
    assert (folder / "server.key").read_text() == server
    assert (folder / "authorized" / "w1.key").exists()
    assert security.load_client(folder).name == "client"
    with pytest.raises(psd.PsdError, match="refusing to overwrite"):
        security.keygen(folder, ["w1"], add=True)
    with pytest.raises(psd.PsdError, match="client name"):
        security.keygen(folder, ["server"], add=True)
    security.keygen(folder, force=True)                # a new set: only its keys are listed
    assert (folder / "server.key").read_text() != server
    assert sorted(p.name for p in (folder / "authorized").iterdir()) == ["client.key", "server.key"]


def test_keygen_cli(tmp_path):
    folder = tmp_path / "k"
    first = psd_cli("keygen", str(folder), "--client", "w1", "--client", "w2")
    assert first.returncode == 0, first.stderr
    assert str(folder / "w2.key_secret") in first.stdout
    again = psd_cli("keygen", str(folder))
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr and "--force" in again.stderr
    added = psd_cli("keygen", str(folder), "--add", "--client", "w3")
    assert added.returncode == 0, added.stderr
    assert (folder / "authorized" / "w3.key").exists()
    worker = psd_cli("keygen", str(folder), "--add", "--worker", "w4")  # a worker key, and nothing else
    assert worker.returncode == 0, worker.stderr
    assert (folder / "authorized" / "workers" / "w4.key").exists() and not (folder / "authorized" / "w4.key").exists()
    assert str(folder / "w4.key_secret") in worker.stdout and "client.key" not in worker.stdout
    moved = psd_cli("keygen", str(folder), "--add", "--force", "--client", "w4")  # listed anew as a client
    assert moved.returncode == 0, moved.stderr
    assert (folder / "authorized" / "w4.key").exists() and not (folder / "authorized" / "workers" / "w4.key").exists()
    assert psd_cli("keygen", str(folder), "--force").returncode == 0
    assert not list((folder / "authorized" / "workers").glob("*.key"))  # a new set lists only its keys


def test_refusal_log_is_rate_limited():
    log = security.RefusalLog(window=60, size=2)
    assert log.note("key A", 0.0) == 0
    assert log.note("key A", 1.0) is None and log.note("key A", 59.0) is None
    assert log.note("key B", 2.0) == 0
    assert log.note("key A", 61.0) == 2                # a line again, counting the repeats
    log.note("key C", 62.0)                            # forgets the oldest (B): memory is bounded
    assert log.note("key B", 63.0) == 0


# -- configuration: daemons need keys -----------------------------------------------------------
def test_a_daemon_refuses_a_secret_key_others_can_read(tmp_path):
    folder = tmp_path / "keys"
    security.keygen(folder)
    secret = folder / "server.key_secret"
    security.load_daemon(folder)  # 0600 as written
    secret.chmod(0o640)
    security.load_daemon(folder)  # a service group may read it
    for mode in (0o644, 0o660, 0o604):
        secret.chmod(mode)
        with pytest.raises(psd.AuthError, match=f"mode {mode:04o}.*chmod 600"):
            security.load_daemon(folder)
    out = psd_cli("scheduler", "--bind", "tcp://127.0.0.1:0", "--keys", str(folder))
    assert out.returncode == 2 and "chmod 600" in out.stderr, out.stderr


def test_daemons_without_usable_keys_exit_2_naming_the_key(tmp_path):
    nobody = "tcp://127.0.0.1:1"
    missing = psd_cli("scheduler", "--bind", "tcp://127.0.0.1:0")
    assert missing.returncode == 2
    assert "psd: config error: keys: expected the key folder `psd keygen DIR` writes" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = psd_cli("server", "--scheduler", nobody, "--keys", str(tmp_path / "empty"))
    assert empty.returncode == 2
    assert "flag --keys: expected a usable key folder" in empty.stderr and "server.key_secret" in empty.stderr
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(f"keys: {tmp_path / 'nowhere'}\n")
    worker = psd_cli("worker", "--config", str(cfg), "--scheduler", nobody)
    assert worker.returncode == 2 and f"{cfg}: keys: expected a usable key folder" in worker.stderr
    env = psd_cli("scheduler", "--security", "curve", env_extra={"PSD_KEYS": str(tmp_path / "empty")})
    assert env.returncode == 2 and "environment variable PSD_KEYS: expected a usable key folder" in env.stderr
    bad = psd_cli("config", "check", str(cfg), "--security", "plain")
    assert bad.returncode == 2 and "flag --security: expected one of curve, none, got 'plain'" in bad.stderr
    nokeys = tmp_path / "nokeys.yaml"
    nokeys.write_text("replication: 1\n")
    check = psd_cli("config", "check", str(nokeys))
    assert check.returncode == 2 and f"{nokeys}: keys: expected the key folder" in check.stderr
    ok = psd_cli("config", "check", str(nokeys), "--security", "none")
    assert ok.returncode == 0 and "security none" in ok.stdout


# -- refusals by real daemons ------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    with psd.LocalCluster(servers=1) as c:
        yield c


@pytest.fixture(scope="module")
def seeded(cluster):
    """Table ``guarded`` with known values, and the keys of the server's data socket."""
    kv = psd.connect(cluster.scheduler)
    t = kv.table("guarded", dtype="int64")
    keys = u64(1, 2, 3, 2**40)
    kv.wait(t.push(keys, np.array([[5], [6], [7], [8]], np.int64)))
    try:
        yield kv, t, keys
    finally:
        kv.close()


def stranger_keys(tmp_path: Path, cluster, case: str):
    """The identity of a refused client: none (plaintext), another cluster's server key,
    or a valid key pair that is not listed."""
    if case == "no key":
        return None
    other = tmp_path / f"other-{case.replace(' ', '-')}"
    security.keygen(other)
    if case == "wrong server key":
        return security.load_client(other)
    folder = tmp_path / f"unlisted-{time.monotonic_ns()}"
    folder.mkdir()
    shutil.copy(cluster.keys / "server.key", folder)          # the right server key ...
    shutil.copy(other / "client.key_secret", folder)          # ... and a key nobody listed
    return security.load_client(folder)


LOG_LINE = {
    # a plaintext client may hang up before the daemon reads its greeting: either line
    "no key": r"refused a connection to {address}: the peer does not use CurveZMQ|"
              r"a peer hung up during the handshake on {address} \(a client without CurveZMQ keys",
    "wrong server key": r"refused a connection to {address}: the peer encrypted for another server key",
    "unlisted key": r"refused client key {key}\.\.\. from 127\.0\.0\.1: not in ",
}


def log_lines(path: Path, pattern: str) -> list[str]:
    return [line for line in path.read_text(errors="replace").splitlines() if re.search(pattern, line)]


def wait_for_lines(path: Path, pattern: str, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = log_lines(path, pattern)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.mark.parametrize("case", ["no key", "wrong server key", "unlisted key"])
def test_refused_clients_get_nothing_change_nothing_and_cost_one_log_line(cluster, seeded, tmp_path, case):
    kv, t, keys = seeded
    curve = stranger_keys(tmp_path, cluster, case)
    server = server_addresses(cluster)[0]
    targets = [("scheduler", cluster.scheduler, cluster.workdir / "scheduler.log",
                Message("create_table", meta={"spec": {"name": "intruder", "width": 1, "dtype": "float32",
                                                       "updater": "sum", "options": {}}})),
               ("server", server, cluster.workdir / "server0.log",
                Message("push", table="guarded", meta={"rid": 1}, arrays=[keys, np.full((4, 1), 1000, np.int64)]))]
    for name, address, log_path, msg in targets:
        dealers = [RawDealer(address, curve=curve) for _ in range(3)]  # three connections, each retrying
        try:
            for i, d in enumerate(dealers):
                msg.id, msg.sender = 500 + i, "intruder"
                d.send_frames(encode(msg))
            assert dealers[0].recv_frames(timeout=SILENCE) is None, f"the {name} answered a refused client"
            assert all(d.recv_frames(timeout=0.05) is None for d in dealers[1:])
        finally:
            for d in dealers:
                d.close()
        pattern = LOG_LINE[case].format(address=re.escape(address), key=re.escape(curve.public.decode()[:12])
                                        if curve else "")
        lines = wait_for_lines(log_path, pattern)
        kinds = {"hung up" in line for line in lines}        # one line per kind of refusal
        assert lines and len(lines) == len(kinds), (name, lines, log_path.read_text()[-3000:])
    # nothing changed: the values, the table list
    np.testing.assert_array_equal(t.pull(keys).ravel(), [5, 6, 7, 8])
    tables = cluster.status()["tables"]
    assert "guarded" in tables and "intruder" not in tables


def test_a_listed_key_works_and_is_picked_up_without_a_restart(cluster, seeded, tmp_path):
    _, t, keys = seeded
    security.keygen(cluster.keys, ["late"], add=True)       # the daemons re-read authorized/
    folder = tmp_path / "late"
    folder.mkdir()
    shutil.copy(cluster.keys / "server.key", folder)
    shutil.copy(cluster.keys / "late.key_secret", folder)
    with psd.connect(cluster.scheduler, ClusterConfig(keys=str(folder))) as kv:
        np.testing.assert_array_equal(kv.table("guarded", dtype="int64").pull(keys).ravel(), [5, 6, 7, 8])
    d = RawDealer(server_addresses(cluster)[0], curve=security.load_client(folder))
    try:
        d.ping()
    finally:
        d.close()


@pytest.mark.parametrize("case,words", [
    ("no key", ["requires CurveZMQ", "PSD_KEYS"]),
    ("wrong server key", ["hung up during the CurveZMQ handshake", "server key"]),
    ("unlisted key", ["refused this client's key", "authorized/", "psd keygen"]),
])
def test_connect_raises_auth_error_saying_what_to_do(cluster, tmp_path, case, words):
    curve = stranger_keys(tmp_path, cluster, case)
    config = ClusterConfig(security="none") if curve is None else ClusterConfig(keys=str(curve.folder))
    started = time.monotonic()
    with pytest.raises(psd.AuthError) as err:
        psd.connect(cluster.scheduler, config)
    assert time.monotonic() - started < 5, "a refusal must not wait for the request timeout"
    assert all(w in str(err.value) for w in words), str(err.value)
    cli = psd_cli("status", "--scheduler", cluster.scheduler,
                  *(["--security", "none"] if curve is None else ["--keys", str(curve.folder)]))
    assert cli.returncode == 1 and words[0] in cli.stderr, cli.stderr


def test_connect_without_any_keys_says_where_they_go(cluster, monkeypatch):
    monkeypatch.delenv("PSD_KEYS", raising=False)
    with pytest.raises(psd.AuthError, match="no CurveZMQ keys for the cluster at tcp://127.0.0.1:1: set PSD_KEYS"):
        psd.connect("tcp://127.0.0.1:1")


def test_keys_reach_subprocesses_and_the_cli(cluster, seeded):
    """LocalCluster exports PSD_KEYS while open: worker processes and `psd` commands a
    test starts find the keys without being told."""
    assert os.environ["PSD_KEYS"] == str(cluster.keys)
    code = ("import sys, psd, numpy as np\n"
            "with psd.connect(sys.argv[1]) as kv:\n"
            "    print(int(kv.table('guarded', dtype='int64').pull(np.array([3], np.uint64))[0, 0]))\n")
    out = subprocess.run([sys.executable, "-c", code, cluster.scheduler], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "7", out.stderr
    status = subprocess.run([*PSD, "status", "--scheduler", cluster.scheduler, "--json"], capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0, status.stderr


# -- authorization by key role -------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    """Two servers that both hold every range (replication 2), a client connected with the
    cluster's client key, and a table with known values."""
    with psd.LocalCluster(servers=2, replication=2) as c:
        kv = psd.connect(c.scheduler)
        t = kv.table("roles", dtype="int64")
        keys = u64(1, 2, 3, 2**40, 2**63)
        kv.wait(t.push(keys, np.arange(1, 6, dtype=np.int64).reshape(-1, 1)))
        try:
            yield c, kv, t, keys
        finally:
            kv.close()


def cluster_view(c) -> dict:
    """What a refused request must not change: the ring, the members, the tables."""
    st = c.status()
    return {"ring": st["ring_version"], "ranges": st["ranges"], "tables": sorted(st["tables"]),
            "nodes": sorted((n["id"], n["role"], n["state"], n["address"]) for n in st["nodes"])}


def addresses_by_id(c) -> dict[str, str]:
    return {n["id"]: n["address"] for n in c.status()["nodes"] if n["role"] == "server"}


def server_tables(address: str, curve) -> dict:
    d = RawDealer(address, curve=curve)
    try:
        return d.request(Message("status")).meta["tables"]
    finally:
        d.close()


def forbidden_reply(reply: Message, op: str, needs: str, *words: str) -> None:
    assert reply.op == "error" and reply.meta["code"] == "forbidden", (op, reply.meta)
    assert reply.meta["data"] == {"op": op, "needs": needs}, reply.meta
    message = reply.meta["message"]
    assert all(w in message for w in words) and "Nothing was changed" in message, message
    err = psd.errors.error_from_wire("forbidden", message, "H", reply.meta["data"])
    assert isinstance(err, psd.ForbiddenError) and err.data["op"] == op


#: stats no real server sends: if the scheduler kept them, status would show them
FORGED_STATS = {"counters": {"push": 10**15}, "memory": {"bytes": 10**15, "limit": 1, "full_replicas": ["S0"]}}


def test_a_client_key_cannot_do_what_only_the_daemons_do(pair):
    c, kv, t, keys = pair
    client = security.load_client(c.keys)
    assert client.name == "client"                     # the key tests, the CLI and LocalCluster use
    servers = addresses_by_id(c)
    before = cluster_view(c)
    held_before = {node: server_tables(a, client)["roles"]["keys"] for node, a in servers.items()}
    assert held_before == {"S0": 5, "S1": 5}
    rejected = {p: len(log_lines(p, "rejected: ")) for p in c.workdir.glob("*.log")}
    worth = np.full((len(keys), 1), 1000, np.int64)
    cases = [  # (where, request, words of the refusal)
        (c.scheduler, Message("leave", sender="S0"), "leave in the name of server S0"),
        (c.scheduler, Message("register", sender="S?", meta={"role": "server", "address": "tcp://127.0.0.1:9"}),
         "register as a server"),
        (c.scheduler, Message("heartbeat", sender="S1", meta={"link": False, "stats": FORGED_STATS}),
         "a heartbeat carrying server stats"),
        (c.scheduler, Message("heartbeat", sender="W77", meta={"stats": FORGED_STATS}),
         "a heartbeat carrying server stats"),
        # a plain heartbeat in a server's name would take over the route the scheduler uses to reach it
        (c.scheduler, Message("heartbeat", sender="S1"), "heartbeat in the name of server S1"),
        (servers["S0"], Message("replicate", table="roles", sender="S1", meta={"origin": "W9", "rid": 1},
                                arrays=[keys, worth]), "replicate (a primary's copy of a push"),
        (servers["S1"], Message("install", table="roles", sender="S0",
                                meta={"range": [0, 2**64 - 1], "state_fields": []}, arrays=[keys, worth]),
         "install (a range copy"),
    ]
    for address, msg, words in cases:
        d = RawDealer(address, curve=client)
        try:
            reply = d.request(msg)
        finally:
            d.close()
        forbidden_reply(reply, msg.op, "server", words, "needs the server key", "client key 'client'")
    # nothing changed: ring, members, values on both copies, the stats status shows
    time.sleep(0.5)                                    # a leave or a join would have moved the ring by now
    assert cluster_view(c) == before
    np.testing.assert_array_equal(t.pull(keys).ravel(), [1, 2, 3, 4, 5])
    assert {node: server_tables(a, client)["roles"]["keys"] for node, a in servers.items()} == held_before
    for n in c.status()["nodes"]:
        assert n["counters"].get("push", 0) < 10**15 and n["memory"].get("limit") != 1, n
    kv.table("roles-later", dtype="int64")             # told to every server over its route: not taken over
    assert "roles-later" in c.status()["tables"]
    # one log line per refusal here, on the daemon that refused it: each case came on its
    # own connection (repeats are counted per connection, op and error)
    grown = {p.name: len(log_lines(p, "rejected: ")) - n for p, n in rejected.items()}
    assert grown["scheduler.log"] == 5 and sum(grown.values()) == 7, grown


def test_the_server_key_still_may(pair):
    c, kv, t, keys = pair
    daemon = security.load_daemon(c.keys)              # the pair the scheduler and the servers hold
    servers = addresses_by_id(c)
    kv.table("roles-scratch", dtype="int64")
    d = RawDealer(c.scheduler, curve=daemon)
    try:
        reply = d.request(Message("heartbeat", sender="S0", meta={"link": False, "stats": {"counters": {"push": 1}}}))
    finally:
        d.close()
    assert reply.op == "ok" and reply.meta["known"] and reply.meta["state"] == "active", reply.meta
    for node, msg in (("S1", Message("replicate", table="roles-scratch", sender="S0", meta={"origin": "W9", "rid": 1},
                                     arrays=[u64(10), np.array([[4]], np.int64)])),
                      ("S0", Message("install", table="roles-scratch", sender="S1", ring=c.status()["ring_version"],
                                     meta={"range": [100, 200], "state_fields": []},
                                     arrays=[u64(150), np.array([[9]], np.int64)]))):
        d = RawDealer(servers[node], curve=daemon)
        try:
            reply = d.request(msg)
        finally:
            d.close()
        assert reply.op == "ok", (msg.op, reply.meta)
        assert server_tables(servers[node], daemon)["roles-scratch"]["keys"] == 1


def test_a_workers_name_belongs_to_the_key_that_registered_it(pair, tmp_path):
    c, kv, t, keys = pair
    security.keygen(c.keys, ["mallory"], add=True)
    folder = tmp_path / "mallory"
    folder.mkdir()
    shutil.copy(c.keys / "server.key", folder)
    shutil.copy(c.keys / "mallory.key_secret", folder)
    mallory, client = security.load_client(folder), security.load_client(c.keys)
    worker = kv.node_id
    clock = c.status()["clocks"]["workers"][worker]
    for msg in (Message("heartbeat", sender=worker, clock=10**9, meta={"link": False}),
                Message("leave", sender=worker),
                Message("job_poll", sender=worker),
                Message("job_report", sender=worker, meta={"job": "J1", "rank": 0, "done": True})):
        d = RawDealer(c.scheduler, curve=mallory)
        try:
            reply = d.request(msg)
        finally:
            d.close()
        forbidden_reply(reply, msg.op, "registrant", f"{msg.op} in the name of worker {worker}",
                        f"needs the key that registered {worker}", "client key 'mallory'")
    st = c.status()
    assert {n["id"]: n["state"] for n in st["nodes"]}[worker] == "active"
    assert st["clocks"]["workers"][worker] == clock
    d = RawDealer(c.scheduler, curve=client)           # the key that registered it may
    try:
        reply = d.request(Message("heartbeat", sender=worker, clock=clock, meta={"link": False}))
    finally:
        d.close()
    assert reply.op == "ok" and reply.meta["state"] == "active", reply.meta
    np.testing.assert_array_equal(t.pull(keys).ravel(), [1, 2, 3, 4, 5])


def test_who_registered_a_node_survives_a_scheduler_restart(tmp_path):
    """scheduler.json keeps the key role per member, so a resumed scheduler still knows
    whose name is whose."""
    from psd.roles.scheduler import Scheduler

    config = ClusterConfig(security="none", state_dir=str(tmp_path / "state"))
    first = Scheduler(config, curve=None)
    for node, role, by in (("S0", "server", "server"), ("W0", "worker", "client:alice")):
        first.core.state.liveness.join(node, role, 0.0)
        first.core.state.registered_by[node] = by
    first.save()
    again = Scheduler(config, curve=None)
    assert again.resumed and again.core.state.registered_by == {"S0": "server", "W0": "client:alice"}


def test_without_security_every_op_stays_open():
    """security: none has no key roles: a trusted network, as before."""
    with psd.LocalCluster(servers=1, security="none") as c:
        with psd.connect(c.scheduler) as kv:
            t = kv.table("open", dtype="int64")
            d = RawDealer(server_addresses(c)[0], curve=None)
            h = RawDealer(c.scheduler, curve=None)
            try:
                ring = c.status()["ring_version"]  # (a forward from an older ring is a deposed primary's)
                reply = d.request(Message("replicate", table="open", sender="S9", ring=ring,
                                          meta={"origin": "W9", "rid": 1},
                                          arrays=[u64(5), np.array([[3]], np.int64)]))
                assert reply.op == "ok", reply.meta
                reply = h.request(Message("heartbeat", sender="S0", meta={"link": False, "stats": {}}))
                assert reply.op == "ok" and reply.meta["known"], reply.meta
            finally:
                d.close()
                h.close()
            np.testing.assert_array_equal(t.pull(u64(5)).ravel(), [3])


def test_a_reply_counts_only_from_the_connection_its_request_went_to():
    """The scheduler matches replies to its requests by id; a listed client that guesses
    an id must not answer in a server's stead (a checkpoint's ckpt_cut, say)."""
    import asyncio

    import zmq
    import zmq.asyncio

    from psd.codec import decode
    from psd.transport import RpcSocket, bind_router

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        sock, address = bind_router(ctx, "tcp://127.0.0.1:0", security=None)
        routes: list[bytes] = []

        async def handler(route, msg):
            routes.append(route)
            return msg.reply()

        rpc = RpcSocket(sock, "H", handler=handler, router=True, concurrent=True)
        serving = asyncio.create_task(rpc.serve())
        server, intruder = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        try:
            for s in (server, intruder):
                s.setsockopt(zmq.LINGER, 0)
                s.connect(address)
            await server.send_multipart(encode(Message("ping", id=1, sender="S0")))
            await asyncio.wait_for(server.recv_multipart(), 5)
            fut = rpc.request(Message("ckpt_cut"), routes[0])
            asked = decode(await asyncio.wait_for(server.recv_multipart(), 5))
            await intruder.send_multipart(encode(Message("ok", id=asked.id, sender="S0", meta={"file": "forged"})))
            await asyncio.sleep(0.3)
            assert not fut.done(), "a reply from another connection resolved the request"
            await server.send_multipart(encode(asked.reply(sender="S0", meta={"file": "real"})))
            reply = await asyncio.wait_for(fut, 5)
            assert reply.meta == {"file": "real"}
            assert rpc.pending == {} and rpc._asked == {}
        finally:
            serving.cancel()
            rpc.close()
            server.close(0)
            intruder.close(0)
            ctx.term()

    asyncio.run(main())


# -- the wire ------------------------------------------------------------------------------------
class Relay:
    """A TCP relay on 127.0.0.1 that forwards to ``target`` and keeps every byte it
    forwarded, both directions."""

    def __init__(self, target: str):
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.captured = bytearray()
        self.lock = threading.Lock()
        self.socks: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
            self.socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                th = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                th.start()
                self.threads.append(th)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    self.captured += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
        for s in self.socks:
            s.close()
        for th in self.threads:
            th.join(timeout=2)


CANARY_TABLE = "canary-table-7f3a"
CANARY_VALUES = np.frombuffer(b"PSDCANARY0123456" * 8, dtype="<i8").reshape(-1, 1).copy()


@pytest.mark.parametrize("mode", ["curve", "none"])
def test_the_wire_carries_no_plaintext(mode):
    """A push and a pull through a relay: with curve neither the table name nor the value
    bytes appear in the stream; with security none (the control) both do."""
    with psd.LocalCluster(servers=1, security=mode) as c:
        with psd.connect(c.scheduler) as kv:
            kv.table(CANARY_TABLE, dtype="int64")
        relay = Relay(server_addresses(c)[0])
        d = RawDealer(relay.address, curve=None if mode == "none" else security.load_client(c.keys))
        try:
            keys = np.arange(100, 100 + len(CANARY_VALUES), dtype=np.uint64)
            push = d.request(Message("push", table=CANARY_TABLE, meta={"rid": 1}, arrays=[keys, CANARY_VALUES]))
            assert push.op == "ok", push
            pull = d.request(Message("pull", table=CANARY_TABLE, meta={"rid": 2}, arrays=[keys]))
            assert pull.op == "ok", pull
            np.testing.assert_array_equal(pull.arrays[0], CANARY_VALUES)   # the bytes went both ways
        finally:
            d.close()
            relay.close()
        wire = bytes(relay.captured)
        assert len(wire) > CANARY_VALUES.nbytes * 2
        found = {"table": CANARY_TABLE.encode() in wire, "values": b"PSDCANARY0123456" in wire}
        if mode == "curve":
            assert found == {"table": False, "values": False}, "plaintext on a CurveZMQ connection"
            assert b"CURVE" in wire[:200]                    # the ZMTP greeting names the mechanism
        else:
            assert found == {"table": True, "values": True}, "the capture missed the traffic"
            assert "security: none" in (c.workdir / "scheduler.log").read_text()


def test_a_worker_key_works_as_a_worker_but_may_not_do_what_operators_do(pair, tmp_path):
    """A key listed in authorized/workers/ pushes, pulls, creates tables, registers and
    runs job ranks, but drain, drop_tables, checkpoint and submit are refused, naming
    the key they need; nothing changes. The cluster's client key still may."""
    c, kv, t, keys = pair
    security.keygen(c.keys, workers=["w1"], add=True)
    assert (c.keys / "authorized" / "workers" / "w1.key").exists()
    folder = tmp_path / "w1"
    folder.mkdir()
    shutil.copy(c.keys / "server.key", folder)
    shutil.copy(c.keys / "w1.key_secret", folder)
    with psd.connect(c.scheduler, ClusterConfig(keys=str(folder))) as worker:
        mine = worker.table("worker_made", dtype="int64")
        worker.wait(mine.push(keys, np.ones((keys.size, 1), np.int64)))
        np.testing.assert_array_equal(worker.table("roles", dtype="int64").pull(keys).ravel(), [1, 2, 3, 4, 5])
    before = cluster_view(c)
    w1 = security.load_client(folder)
    server = sorted(addresses_by_id(c))[0]
    for msg, what in ((Message("drain", meta={"node": server}), "drain"),
                      (Message("drop_tables", meta={"tables": ["roles"]}), "drop_tables"),
                      (Message("checkpoint", meta={"wait": 5}), "checkpoint"),
                      (Message("submit", meta={"job": {"name": "x", "app": "logreg_sgd"}, "workers": 1}), "submit")):
        d = RawDealer(c.scheduler, curve=w1)
        try:
            reply = d.request(msg)
        finally:
            d.close()
        forbidden_reply(reply, msg.op, "operator", what, "an operator key", "worker key 'w1'", "authorized/workers/")
    assert cluster_view(c) == before
    np.testing.assert_array_equal(t.pull(keys).ravel(), [1, 2, 3, 4, 5])
    # nor by failing a job it holds no rank of (ending a job drops its tables)
    job = admin.call(c.scheduler, "submit", job={"name": "x", "app": "logreg_sgd"}, workers=1)["job"]
    kv.table(f"{job}/w", dtype="int64")
    d = RawDealer(c.scheduler, curve=w1)
    try:
        node = d.request(Message("register", meta={"role": "worker"})).meta["node"]
        reply = d.request(Message("job_report", sender=node, meta={"job": job, "rank": 0, "error": "no"}))
    finally:
        d.close()
    assert reply.op == "error" and "held by no worker" in reply.meta["message"], reply.meta
    assert f"{job}/w" in c.status()["tables"]
    d = RawDealer(c.scheduler, curve=security.load_client(c.keys))  # the client key may
    try:
        reply = d.request(Message("drop_tables", meta={"tables": ["worker_made"]}))
    finally:
        d.close()
    assert reply.op == "ok", reply.meta
    assert "worker_made" not in c.status()["tables"]
