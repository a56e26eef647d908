"""Many concurrent worker processes against one cluster: the load test's clients and driver.

:func:`run_load` is shared by tests/test_load.py and scripts/bench_load.py. It starts a
LocalCluster and N client processes. Each client (``client_main``) connects with the
blocking API and opens ``TABLE``; when all have connected they start together and, for
the given time, loop: push KEYS random keys of ``POOL`` and wait for the ack (push
latency), pull KEYS other keys (pull latency), optionally sleep THINK_MS. Push ``i`` of
client ``seed`` is ``make_push(seed, i, KEYS)``, so the driver recomputes the exact
sums from the number of acked pushes alone.

Clients are forked from a forkserver that imported numpy and psd once: 32 interpreters
importing them side by side take most of a minute on 2 cores. They are separate
processes all the same (their own sockets, event loop and heartbeat thread each).

The driver samples every daemon's resident memory and open file descriptors (from
/proc) with the cluster idle, once the clients are connected, after a warm-up, every
second of the run, at its end and after the clients have left (until their connections
are closed, up to a deadline scaled by the machine's load: ``Sampler.settle``); checks the
final sums exactly; and returns a report (latency percentiles, throughput, the samples).
Every wait is bounded, and every process it starts is stopped when it returns or fails.
"""
from __future__ import annotations

import os
import time

import numpy as np

#: (name, dtype, width), updater "sum"
TABLE = ("load_i64_w4", "int64", 4)
TOP = 2**64 - 1
START_TIMEOUT = 60.0
#: open file descriptors a daemon may keep above its idle count once the clients left
FD_SLACK = 2
#: seconds the daemons get, on an idle machine, to close the connections of clients that
#: left: ZeroMQ closes them on its I/O thread, asynchronously (scaled: ``settle_timeout``)
SETTLE = 5.0


def key_pool() -> np.ndarray:
    rng = np.random.default_rng(2024)
    special = np.array([0, 1, 2**63 - 1, 2**63, TOP], dtype=np.uint64)
    return np.unique(np.concatenate([special, rng.integers(0, TOP, size=4096, dtype=np.uint64, endpoint=True)]))


POOL = key_pool()


def make_push(seed: int, i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, i])
    keys = np.sort(rng.choice(POOL, size=k, replace=False))
    return keys, rng.integers(1, 100, size=(k, TABLE[2]), dtype=np.int64)


def pull_keys(seed: int, i: int, k: int) -> np.ndarray:
    return np.sort(np.random.default_rng([seed, i, 1]).choice(POOL, size=k, replace=False))


def expected(counts: dict[int, int], k: int) -> np.ndarray:
    """Exact sums over POOL when worker ``seed`` had its first ``counts[seed]`` pushes acked."""
    out = np.zeros((POOL.size, TABLE[2]), dtype=np.int64)
    for seed, n in counts.items():
        for i in range(n):
            keys, values = make_push(seed, i, k)
            out[np.searchsorted(POOL, keys)] += values
    return out


# -- one client (a forked process) ------------------------------------------------------------
def client_main(scheduler: str, seed: int, k: int, think_ms: float, seconds: float, keys_env: str | None,
                go, results) -> None:
    """Body of one client process: connect, open the table, say ``ready`` on ``results``,
    wait for ``go``, then push/pull for ``seconds`` and put its record on ``results``."""
    import ctypes
    import signal
    import traceback

    try:  # die with the driver, and leave stopping to it
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if keys_env is None:  # the cluster's CurveZMQ keys, as the driver sees them now
        os.environ.pop("PSD_KEYS", None)
    else:
        os.environ["PSD_KEYS"] = keys_env
    try:
        import psd

        with psd.connect(scheduler) as kv:
            name, dtype, width = TABLE
            t = kv.table(name, width=width, dtype=dtype, updater="sum")
            results.put({"seed": seed, "ready": True})
            if not go.wait(START_TIMEOUT):
                raise RuntimeError("no go from the driver")
            push_us, pull_us, errors = [], [], []
            acked = 0
            clock = time.perf_counter_ns
            started = time.time()
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                keys, values = make_push(seed, acked, k)
                try:
                    a = clock()
                    kv.wait(t.push(keys, values))
                    b = clock()
                    t.pull(pull_keys(seed, acked, k))
                    c = clock()
                except Exception as e:  # recorded: the test allows none
                    errors.append(f"{type(e).__name__}: {e}")
                    break  # the push may or may not be applied: the sums can no longer be checked
                acked += 1
                push_us.append((b - a) / 1e3)
                pull_us.append((c - b) / 1e3)
                if think_ms:
                    time.sleep(think_ms / 1e3)
            record = {"seed": seed, "node": kv.node_id, "acked": acked, "started": started,
                      "finished": time.time(), "push_us": push_us, "pull_us": pull_us, "errors": errors}
        results.put(record)
    except BaseException:
        results.put({"seed": seed, "fatal": traceback.format_exc()})


# -- the driver ------------------------------------------------------------------------------
def sample(pid: int) -> dict:
    """Resident memory (bytes) and open file descriptors of one process, from /proc
    (zeros and ``gone`` when it has exited)."""
    rss = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return {"rss": 0, "fds": 0, "t": time.time(), "gone": True}
    return {"rss": rss, "fds": fds, "t": time.time()}


def daemons(cluster) -> dict[str, int]:
    out = {"scheduler": cluster.scheduler_proc.pid}
    out.update({f"server{i}": c.pid for i, c in enumerate(cluster.servers)})
    return out


def settle_timeout(base: float = SETTLE) -> float:
    """``base`` scaled by the runnable processes per core (the 1-minute load average),
    1x to 12x: on an overloaded machine a daemon's I/O thread may not run for seconds
    (9 descriptors were still open after 5 s with seven CPU-bound processes on 2 cores).
    Only a leak waits it out: the wait ends once the counts are back."""
    per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
    return base * min(12.0, max(1.0, per_core))


class Sampler:
    """Every daemon's memory and descriptors (``sample``), as labelled lists per daemon
    (``samples``: name -> [(label, sample), ...])."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.samples: dict[str, list[tuple[str, dict]]] = {name: [] for name in pids}

    def snap(self, label: str) -> None:
        for name, pid in self.pids.items():
            self.samples[name].append((label, sample(pid)))

    def fds_left(self) -> dict[str, int]:
        """Per daemon: descriptors open at the last ``left`` sample beyond the ``idle`` one."""
        return growth(self.samples, "fds", "idle", "left")

    def settle(self, timeout: float) -> dict[str, int]:
        """Sample ``left`` until every daemon is back within FD_SLACK of its idle count
        of descriptors, or ``timeout`` seconds have passed; return ``fds_left``."""
        deadline = time.monotonic() + timeout
        while True:
            self.snap("left")
            left = self.fds_left()
            if max(left.values()) <= FD_SLACK or time.monotonic() > deadline:
                return left
            time.sleep(0.2)


class Clients:
    """N client processes forked from a forkserver that imported psd and numpy once
    (32 interpreters importing them side by side would take most of a minute on 2
    cores). ``close`` stops whatever is left."""

    def __init__(self, scheduler: str, n: int, keys: int, think_ms: float, seconds: float):
        import multiprocessing as mp

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["numpy", "psd", "loadworker"])
        self.go = ctx.Event()
        self.results = ctx.Queue()
        self.n = n
        keys_env = os.environ.get("PSD_KEYS")
        self.procs = [ctx.Process(target=client_main, name=f"load-client-{s}", daemon=True,
                                  args=(scheduler, s, keys, think_ms, seconds, keys_env, self.go, self.results))
                      for s in range(n)]
        for p in self.procs:
            p.start()

    def _gather(self, what: str, timeout: float) -> list[dict]:
        """``n`` messages from the clients (fails fast if one dies or reports a failure)."""
        import queue

        out, deadline = [], time.monotonic() + timeout
        while len(out) < self.n:
            try:
                r = self.results.get(timeout=0.5)
            except queue.Empty:
                dead = [p.name for p in self.procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"only {len(out)} of {self.n} load clients {what} within {timeout} s"
                                       + (f"; {', '.join(dead)} died" if dead else "")) from None
                continue
            if "fatal" in r:
                raise RuntimeError(f"load client {r['seed']} failed:\n{r['fatal']}")
            out.append(r)
        return out

    def wait_ready(self, timeout: float) -> None:
        self._gather("connected", timeout)

    def start(self) -> None:
        self.go.set()

    def collect(self, timeout: float) -> list[dict]:
        out = self._gather("reported", timeout)
        for p in self.procs:
            p.join(timeout)
        return sorted(out, key=lambda r: r["seed"])

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(5)
        self.results.close()
        self.results.join_thread()


def percentiles(samples_us: list[float]) -> dict:
    a = np.asarray(samples_us, dtype=np.float64)
    if not a.size:
        return {"n": 0}
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"n": int(a.size), "p50_us": float(p50), "p95_us": float(p95), "p99_us": float(p99),
            "max_us": float(a.max()), "mean_us": float(a.mean())}


def run_load(clients: int = 32, seconds: float = 10.0, *, servers: int = 2, keys: int = 16, think_ms: float = 0.0,
             warmup: float = 2.0, every: float = 1.0, log=None, **settings) -> dict:
    """Run ``clients`` load clients for ``seconds`` against a fresh ``servers``-server
    cluster and return the report (see the module docstring). A client that cannot
    start or report raises; request errors and wrong sums are in the report
    (``errors``, ``wrong_keys``) for the caller to judge. ``settings`` go to the
    LocalCluster."""
    import psd

    log = log or (lambda msg: None)
    t_start = time.monotonic()
    report: dict = {"clients": clients, "seconds": seconds, "servers": servers, "keys_per_request": keys,
                    "think_ms": think_ms, "settings": settings}
    with psd.LocalCluster(servers=servers, **settings) as cluster:
        sampler = Sampler(daemons(cluster))
        snap = sampler.snap
        name, dtype, width = TABLE
        with psd.connect(cluster) as kv:
            kv.table(name, width=width, dtype=dtype, updater="sum")
            # one push over the whole key space first: each server opens its links to its
            # replicas (several connections each under striped CurveZMQ) before "idle"
            warm = kv.table("warmup", width=1, dtype="int64")
            spread = np.unique(np.linspace(0, 2**64 - 2**11, 256).astype(np.uint64))  # (2**64 - 1 is no float64)
            kv.wait(warm.push(spread, np.ones((spread.size, 1), np.int64)))
        report["ring_version_start"] = cluster.status()["ring_version"]
        snap("idle")
        log(f"cluster up in {time.monotonic() - t_start:.1f} s; starting {clients} clients")
        pool = Clients(cluster.scheduler, clients, keys, think_ms, seconds)
        try:
            pool.wait_ready(START_TIMEOUT)
            snap("connected")
            log(f"{clients} clients connected after {time.monotonic() - t_start:.1f} s; running {seconds:g} s")
            go = time.monotonic()
            pool.start()
            time.sleep(min(warmup, seconds))
            snap("warm")
            while time.monotonic() + every < go + seconds - 0.2:
                time.sleep(every)
                snap("run")
            time.sleep(max(0.0, go + seconds - 0.2 - time.monotonic()))
            snap("end")
            results = pool.collect(START_TIMEOUT)
        finally:
            pool.close()
        # the clients have left: their connections must be gone too (ZeroMQ closes them
        # asynchronously, so wait for the counts to settle)
        report["fds_left"] = sampler.settle(settle_timeout())
        errors = [(r["seed"], e) for r in results for e in r["errors"]]
        counts = {r["seed"]: r["acked"] for r in results}
        status = cluster.status()
        children = {"scheduler": cluster.scheduler_proc, **{f"server{i}": c for i, c in enumerate(cluster.servers)}}
        if errors or any(n["state"] != "active" for n in status["nodes"] if n["role"] == "server"):
            # what went wrong is in the daemons' logs, which go with the cluster's folder
            report["log_tails"] = {n: c.log_tail(40) for n, c in children.items()}
        try:
            with psd.connect(cluster) as kv:
                got = kv.table(name, width=width, dtype=dtype, updater="sum").pull(POOL)
        except psd.PsdError as e:
            tails = "\n".join(f"--- {n}:\n{c.log_tail(40)}" for n, c in children.items())
            raise RuntimeError(f"the final pull failed ({e}); client errors {errors[:3]}; logs:\n{tails}") from e
        want = expected(counts, keys)
        bad = np.flatnonzero((got != want).any(axis=1))
    span = max(r["finished"] for r in results) - min(r["started"] for r in results)
    report.update({
        "errors": errors,
        "wrong_keys": int(bad.size),
        "first_wrong": None if not bad.size else {"key": int(POOL[bad[0]]), "got": got[bad[0]].tolist(),
                                                  "want": want[bad[0]].tolist()},
        "acked": counts,
        "requests": 2 * sum(counts.values()),
        "throughput_rps": 2 * sum(counts.values()) / span,
        "push": percentiles([x for r in results for x in r["push_us"]]),
        "pull": percentiles([x for r in results for x in r["pull_us"]]),
        "per_client_min_ops": min(counts.values()),
        "samples": sampler.samples,
        "server_states": {n["id"]: n["state"] for n in status["nodes"] if n["role"] == "server"},
        "ring_version": status["ring_version"],
        "wall_s": time.monotonic() - t_start,
        "loadavg": os.getloadavg(),
    })
    return report


def growth(samples: dict, key: str, a: str = "warm", b: str = "end") -> dict[str, int]:
    """Per daemon: the change of ``key`` ("rss" or "fds") from the first sample labelled
    ``a`` to the last one labelled ``b`` (``samples``: a report's, or a Sampler's)."""
    out = {}
    for name, series in samples.items():
        first = next(s[key] for label, s in series if label == a)
        last = [s[key] for label, s in series if label == b][-1]
        out[name] = last - first
    return out


