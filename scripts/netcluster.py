"""An emulated multi-host psd cluster on this machine (root; Linux network namespaces).

    sudo python scripts/netcluster.py up --servers 3 --clients 2 --rate 1gbit   # returns once up
    sudo python scripts/netcluster.py status                   # `psd status --json` from the operator host
    sudo python scripts/netcluster.py links                    # hosts, addresses, rates, cuts
    sudo python scripts/netcluster.py exec client0 -- python my_client.py tcp://10.213.0.2:9300
    sudo python scripts/netcluster.py partition server1        # cut server1's link
    sudo python scripts/netcluster.py block server0 server1 --one-way
    sudo python scripts/netcluster.py heal
    sudo python scripts/netcluster.py rate server0 100mbit
    sudo python scripts/netcluster.py kill server2 [--signal KILL]   # its supervisor restarts it
    sudo python scripts/netcluster.py down                     # everything goes, also after a crash

Every command takes ``--run DIR`` (default /tmp/psd-netcluster): the run folder with the
record of what was made (state.json), the cluster YAML, each host's files
(hosts/NAME/etc/psd/) and the daemons' logs (logs/). ``up`` starts a background process
that holds the cluster and supervises its daemons as the systemd units would;
``up --foreground`` stays in the terminal instead, and Ctrl-C takes it all down.
What it does and why: psd/testing/netcluster.py, docs/operations.md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from psd.testing.netcluster import NetCluster, on_signals, teardown  # noqa: E402
from psd.testing.netns import NetError, unsupported  # noqa: E402

DEFAULT_RUN = "/tmp/psd-netcluster"


def _up(args) -> int:
    reason = unsupported()
    if reason:
        print(f"netcluster: cannot emulate hosts here: {reason}", file=sys.stderr)
        return 1
    settings = dict(kv.split("=", 1) for kv in args.set or [])
    settings = {k: _yaml_value(v) for k, v in settings.items()}
    make = lambda: NetCluster(  # noqa: E731
        servers=args.servers, clients=args.clients, hosts=args.hosts, rate=args.rate, replication=args.replication,
        security=args.security, run_dir=args.run, advertise=args.advertise, names=args.names,
        worker_daemons=args.workers, settings=settings)
    if args.foreground:
        return _hold(make, None)
    read, write = os.pipe()
    if os.fork() > 0:  # the caller: wait for the holder to say it is up (or why not)
        os.close(write)
        with os.fdopen(read) as said:
            word = said.read()
        print(word.strip() or f"netcluster: the cluster process died; see {args.run}/netcluster.log",
              file=sys.stdout if word.startswith("up") else sys.stderr)
        return 0 if word.startswith("up") else 1
    os.close(read)
    os.setsid()  # the holder outlives this terminal command, not a Ctrl-C in it
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    log = os.open(run / "netcluster.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    try:
        code = _hold(make, write)
    except SystemExit as e:  # a signal took it down
        code = e.code if isinstance(e.code, int) else 1
    os._exit(code)


def _hold(make, report_fd: int | None) -> int:
    """Make the cluster, say so, and hold it (its daemons die with this process) until
    a signal or `down`."""
    net = make()
    on_signals(net.down)
    try:
        net.up()
    except Exception as e:
        _say(report_fd, f"netcluster: up failed: {e}")
        return 1
    _say(report_fd, _summary(net))
    while True:
        signal.pause()


def _say(fd: int | None, text: str) -> None:
    if fd is None:
        print(text, flush=True)
    else:
        os.write(fd, text.encode())
        os.close(fd)


def _summary(net: NetCluster) -> str:
    lines = [f"up: {len(net.hosts)} hosts on bridge {net.bridge}, run folder {net.run_dir}",
             f"scheduler {net.scheduler}; cluster YAML {net.config_path}"]
    for h in net.hosts.values():
        lines.append(f"  {h.name:<10} {h.role:<9} {h.ip:<15} netns {h.ns}")
    lines.append(f"try: python scripts/netcluster.py --run {net.run_dir} status")
    return "\n".join(lines)


def _yaml_value(text: str):
    import yaml
    return yaml.safe_load(text)


def _attach(args) -> NetCluster:
    return NetCluster.attach(args.run)


def _status(args) -> int:
    print(json.dumps(_attach(args).status(), indent=1))
    return 0


def _links(args) -> int:
    for name, link in _attach(args).links().items():
        cut = "" if link["up"] else "  CUT"
        blocked = f"  drops from {', '.join(link['blocked_from'])}" if link["blocked_from"] else ""
        print(f"{name:<10} {link['role']:<9} {link['ip']:<15} {link['rate'] or 'unshaped':<9}{cut}{blocked}")
    return 0


def _exec(args) -> int:
    net = _attach(args)
    host = net.host(args.host)
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("netcluster exec: give a command after the host, e.g. exec client0 -- python x.py", file=sys.stderr)
        return 2
    env = net.exec_env(host)
    os.execve(net_ip(), [net_ip(), "netns", "exec", host.ns, *argv], env)


def net_ip() -> str:
    from psd.testing.netns import tool
    return tool("ip")


def _kill(args) -> int:
    net = _attach(args)
    entry = next((e for name, e in net.record.read()["processes"].items() if name.startswith(f"{args.host}/psd-")),
                 None)
    if entry is None:
        print(f"netcluster: no daemon recorded on {args.host}", file=sys.stderr)
        return 1
    os.kill(entry["pid"], getattr(signal, "SIG" + args.signal.upper().removeprefix("SIG")))
    return 0


def _down(args) -> int:
    if not (Path(args.run) / "state.json").exists():
        print(f"netcluster: nothing recorded in {args.run}", file=sys.stderr)
        return 0
    for what in teardown(args.run):
        print(f"removed {what}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--run", default=DEFAULT_RUN, help=f"run folder (default {DEFAULT_RUN})")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="make the hosts, deploy psd, start it")
    up.add_argument("--servers", type=int, default=3)
    up.add_argument("--clients", type=int, default=2)
    up.add_argument("--hosts", type=int, help="hosts in all instead: a scheduler, an operator, servers and clients")
    up.add_argument("--rate", default="1gbit", help="every link's rate, as tc takes it (default 1gbit; 'none': unshaped)")
    up.add_argument("--replication", type=int, default=2)
    up.add_argument("--security", default="curve", choices=["curve", "none"])
    up.add_argument("--advertise", action="store_true", help="servers bind 0.0.0.0 and advertise their address")
    up.add_argument("--names", action="store_true", help="hosts know each other by name (NAME.psd.test)")
    up.add_argument("--workers", action="store_true", help="a psd worker daemon on each client host")
    up.add_argument("--set", action="append", metavar="KEY=VALUE", help="a cluster YAML setting (repeatable)")
    up.add_argument("--foreground", action="store_true", help="stay in the terminal; Ctrl-C takes it down")
    sub.add_parser("status", help="psd status --json from the operator host")
    sub.add_parser("links", help="hosts, addresses, rates and cuts")
    ex = sub.add_parser("exec", help="run a command on a host (with its keys in PSD_KEYS)")
    ex.add_argument("host")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    p = sub.add_parser("partition", help="cut these hosts' links")
    p.add_argument("hosts", nargs="+")
    b = sub.add_parser("block", help="drop packets between two hosts (or groups: comma-separated)")
    b.add_argument("src")
    b.add_argument("dst")
    b.add_argument("--one-way", action="store_true", help="only from src to dst")
    sub.add_parser("heal", help="every link up, every block gone")
    r = sub.add_parser("rate", help="shape a host's link")
    r.add_argument("host")
    r.add_argument("rate", help="e.g. 100mbit; 'none': unshaped")
    k = sub.add_parser("kill", help="signal the daemon on a host (its supervisor restarts it on failure)")
    k.add_argument("host")
    k.add_argument("--signal", default="KILL")
    sub.add_parser("down", help="remove everything the run folder records")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "rate", None) == "none":
        args.rate = None
    try:
        if args.command == "up":
            return _up(args)
        if args.command in ("status", "links", "exec", "kill", "down"):
            command = {"status": _status, "links": _links, "exec": _exec, "kill": _kill, "down": _down}
            return command[args.command](args)
        net = _attach(args)
        if args.command == "partition":
            net.partition(*args.hosts)
        elif args.command == "block":
            net.block(args.src.split(","), args.dst.split(","), both=not args.one_way)
        elif args.command == "heal":
            net.heal()
        elif args.command == "rate":
            net.rate(args.host, args.rate)
        _links(args)
        return 0
    except NetError as e:
        print(f"netcluster: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
