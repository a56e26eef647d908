"""Emulated hosts on one Linux machine: network namespaces on a bridge, links shaped by tc.

Each host is a network namespace with one interface (``eth0``, its own address on a
private subnet), the far end of a veth pair whose root-side end is a port of a bridge.
What a real network does to a link is done to that pair:

* **rate**: a ``tbf`` (token bucket) qdisc on both ends: on the root-side end for
  traffic towards the host, inside the namespace for traffic from it;
* **partition**: the root-side end is set down, so the host neither sends nor receives;
* **block** (pairwise, optionally one way): packets from one host to another are
  dropped on their way into the receiver's link. This VM has neither nft nor iptables
  and its tc has no drop action (``act_gact``), so the towards-host qdisc becomes an
  ``htb`` whose default class keeps the ``tbf`` and whose second class ends in a
  ``blackhole`` qdisc, with a ``u32`` filter per blocked source address. Packets are
  dropped silently, as by a real partition: a connect times out, it is not refused.

Every command goes through :func:`run`, so a failure names the command, what the
kernel said and what to do. Nothing here keeps state; ``netcluster.py`` records what it
made before making it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from psd.errors import PsdError

#: the MTU-sized minimum a token bucket must hold (a full frame), and how long a packet
#: may wait in it before it is dropped (the queue a real switch port would have)
MIN_BURST_BYTES = 16 * 1024
TBF_LATENCY = "100ms"
#: ``ip netns exec NS`` bind-mounts the files of this folder over /etc (hosts, resolv.conf)
NETNS_ETC = Path("/etc/netns")


class NetError(PsdError):
    """A namespace, link or qdisc command failed; the message names it and what to do."""

    code = "netcluster"


def tool(name: str) -> str:
    """The full path of ``ip`` or ``tc`` (root's PATH may lack /usr/sbin in a venv)."""
    found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}")
                                        if os.access(p, os.X_OK)), None)
    if found is None:
        raise NetError(f"{name} not found: install iproute2 (apt-get install iproute2)")
    return found


def run(argv: list[str], *, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    """Run one command; with ``check``, a failure raises NetError quoting it."""
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetError(f"`{' '.join(argv)}` failed with exit {proc.returncode}: {proc.stderr.strip()}"
                       f"{_hint(proc.stderr)}")
    return proc


def _hint(stderr: str) -> str:
    if "Operation not permitted" in stderr:
        return " (run as root: namespaces, bridges and qdiscs need CAP_NET_ADMIN)"
    if "File exists" in stderr:
        return " (left over from an earlier run? `python scripts/netcluster.py down --run DIR` removes it)"
    return ""


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run([tool("ip"), *(["-n", ns] if ns else []), *args], check=check)


def tc(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run([tool("tc"), *(["-n", ns] if ns else []), *args], check=check)


# -- can we? -------------------------------------------------------------------------------
def unsupported() -> str | None:
    """Why namespaces cannot be made here (not root, no ``ip netns``), or None."""
    if os.geteuid() != 0:
        return "needs root: network namespaces, bridges and tc qdiscs need CAP_NET_ADMIN"
    try:
        probe = f"psdnet-probe-{os.getpid()}"
        made = ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"`ip netns add` failed: {made.stderr.strip()}"
        ip("netns", "del", probe, check=False)
    except (NetError, OSError, subprocess.SubprocessError) as e:
        return f"cannot run ip: {e}"
    return None


# -- making and removing ----------------------------------------------------------------------
def make_bridge(name: str) -> None:
    """A bridge with spanning tree off and no forwarding delay, so ports forward at once."""
    ip("link", "add", name, "type", "bridge", "stp_state", "0", "forward_delay", "0")
    ip("link", "set", name, "up")


def make_host(ns: str, veth: str, bridge: str, cidr: str) -> None:
    """Namespace ``ns`` with ``eth0`` at ``cidr`` (e.g. 10.213.0.5/24), its veth peer
    ``veth`` a port of ``bridge``, and loopback up (daemons talk to themselves there)."""
    ip("netns", "add", ns)
    ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
    ip("link", "set", veth, "master", bridge, "up")
    ip("addr", "add", cidr, "dev", "eth0", ns=ns)
    ip("link", "set", "eth0", "up", ns=ns)
    ip("link", "set", "lo", "up", ns=ns)


def namespaces() -> set[str]:
    out = ip("netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def links() -> set[str]:
    out = ip("-o", "link", "show", check=False).stdout
    return {m.group(1) for m in re.finditer(r"^\d+: ([^:@\s]+)[@:]", out, re.M)}


def pids_in(ns: str) -> list[int]:
    """Every process whose network namespace is ``ns`` (``ip netns pids``): whatever
    ran in an emulated host, whoever started it."""
    out = ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def remove_namespace(ns: str) -> None:
    """Delete ``ns`` (its eth0, and so the veth pair, goes with it) and its /etc files."""
    if ns in namespaces() and ip("netns", "del", ns, check=False).returncode != 0 and ns in namespaces():
        ip("netns", "del", ns)  # it failed and the namespace is still there: say why
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
    try:
        NETNS_ETC.rmdir()  # only if no other namespace has files there
    except OSError:
        pass


def remove_link(name: str) -> None:
    """Delete link ``name`` if it is there. The root end of a veth pair goes away by
    itself, a moment after its namespace was deleted: gone by then is fine too."""
    if name in links() and ip("link", "del", name, check=False).returncode != 0 and name in links():
        ip("link", "del", name)


def write_hosts_file(ns: str, names: dict[str, str]) -> Path:
    """/etc/hosts as processes in ``ns`` see it (``ip netns exec`` bind-mounts it):
    loopback plus ``names`` (name -> address). Rewritten in place, not replaced, so a
    process already running sees the change (a bind mount pins the inode)."""
    folder = NETNS_ETC / ns
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "hosts"
    text = "127.0.0.1 localhost\n::1 localhost\n" + "".join(f"{a} {n}\n" for n, a in names.items())
    with open(path, "a+") as f:
        f.seek(0)
        f.truncate()
        f.write(text)
    return path


# -- the link's behaviour -----------------------------------------------------------------------
_RATE = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>[kmgt]?)(?P<kind>bit|bps)$", re.I)
_SCALE = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def rate_bits(rate: str) -> float:
    """``1gbit`` -> 1e9; ``100mbit``, ``512kbit``, ``10mbps`` (bytes) as tc reads them."""
    m = _RATE.match(rate.strip())
    if m is None:
        raise NetError(f"rate {rate!r}: expected a number and a unit as tc takes it, e.g. 1gbit, 100mbit, 512kbit")
    bits = float(m["n"]) * _SCALE[m["unit"].lower()] * (8 if m["kind"].lower() == "bps" else 1)
    if bits <= 0:
        raise NetError(f"rate {rate!r}: expected more than 0")
    return bits


def _tbf(rate: str) -> list[str]:
    """tbf parameters: the bucket holds 4 ms of traffic (at least a full frame), so the
    rate holds over short windows too; packets wait at most TBF_LATENCY."""
    burst = max(MIN_BURST_BYTES, int(rate_bits(rate) / 8 * 0.004))
    return ["tbf", "rate", rate, "burst", str(burst), "latency", TBF_LATENCY]


def shape(dev: str, rate: str | None, *, ns: str | None = None, blocked: tuple[str, ...] = ()) -> None:
    """The root qdisc of ``dev``: a tbf at ``rate`` (None: unshaped), and with
    ``blocked`` source addresses, the htb tree that drops their packets (module doc)."""
    tc("qdisc", "del", "dev", dev, "root", ns=ns, check=False)
    if not blocked:
        if rate is not None:
            tc("qdisc", "add", "dev", dev, "root", "handle", "1:", *_tbf(rate), ns=ns)
        return
    tc("qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1", ns=ns)
    # htb only sorts; the tbf below its default class shapes (100gbit: no limit of its own)
    tc("class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", "100gbit",
       "quantum", "60000", ns=ns)
    if rate is not None:
        tc("qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", *_tbf(rate), ns=ns)
    tc("class", "add", "dev", dev, "parent", "1:", "classid", "1:2", "htb", "rate", "1mbit", ns=ns)
    tc("qdisc", "add", "dev", dev, "parent", "1:2", "handle", "20:", "blackhole", ns=ns)
    for source in blocked:
        tc("filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
           "match", "ip", "src", f"{source}/32", "classid", "1:2", ns=ns)


def set_up(dev: str, up: bool) -> None:
    ip("link", "set", dev, "up" if up else "down")


def qdiscs(dev: str, ns: str | None = None) -> str:
    """``tc qdisc show dev DEV``, for tests and for `status`."""
    return tc("qdisc", "show", "dev", dev, ns=ns, check=False).stdout
