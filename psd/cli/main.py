"""The ``psd`` command: one binary, a subcommand per role or tool."""
from __future__ import annotations

import argparse
import math
import os
import sys

from psd.config import (DEFAULT_SCHEDULER, ClusterConfig, address_host, advertised_address_problems, env_overrides,
                        env_var, flag, resolve_config, rule, setting_keys)
from psd.errors import ConfigError, PsdError

EXIT_CONFIG = 2

_FLAG_HELP = {
    "scheduler": "scheduler address, e.g. tcp://10.0.0.1:9300",
    "bind": "address to bind (port 0 picks a free port); for the scheduler, its own address",
    "advertise": "address a server tells others to reach it at, when not the one it binds (port 0: the bound port)",
}


def _dest(key: str) -> str:
    return key.replace(".", "_")


def _setting_flags(p: argparse.ArgumentParser) -> None:
    """One flag per cluster setting (``--heartbeat-interval``, ``--limits-max-keys``...),
    parsed and validated with the config so a bad value names the flag."""
    g = p.add_argument_group("cluster settings", "each overrides the config file and its PSD_ variable "
                                                 "(e.g. --heartbeat-interval and PSD_HEARTBEAT_INTERVAL)")
    for key in setting_keys():
        g.add_argument(flag(key), dest=_dest(key), metavar="VALUE",
                       help=_FLAG_HELP.get(key, rule(key).expected))


def _daemon_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="cluster YAML file")
    p.add_argument("--ready-file", help="write the bound address here once serving")
    p.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    _setting_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psd", description="psd parameter server")
    sub = parser.add_subparsers(dest="command", required=True)
    _daemon_args(sub.add_parser("scheduler", help="run the scheduler daemon"))
    _daemon_args(sub.add_parser("server", help="run a server daemon"))
    w = sub.add_parser("worker", help="run a worker daemon that executes jobs")
    _daemon_args(w)
    w.add_argument("--one-job", action="store_true", help="exit after finishing one job")
    s = sub.add_parser("status", help="show what the cluster is doing")
    s.add_argument("--scheduler", help=f"scheduler address (default {DEFAULT_SCHEDULER} or the config's)")
    s.add_argument("--config", help="cluster YAML file (for the scheduler address)")
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    s.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C; with --json, one JSON line each")
    s.add_argument("--count", type=int, metavar="N", help="stop after N refreshes (implies --watch)")
    d = sub.add_parser("drain", help="hand a server's ranges to the others, then stop it")
    d.add_argument("node", help="server id as `psd status` shows it, e.g. S2")
    d.add_argument("--scheduler", help="scheduler address")
    d.add_argument("--config", help="cluster YAML file (for the scheduler address)")
    dr = sub.add_parser("drop", help="drop tables on every server: a namespace (a job's id) or named tables")
    dr.add_argument("tables", nargs="*", metavar="TABLE", help="full table names, e.g. w or J3/w")
    dr.add_argument("--namespace", help="drop every table of this namespace, e.g. J3")
    dr.add_argument("--scheduler", help="scheduler address")
    dr.add_argument("--config", help="cluster YAML file (for the scheduler address)")
    sb = sub.add_parser("submit", help="hand a job to a running cluster's worker daemons")
    sb.add_argument("job", help="job YAML file")
    sb.add_argument("--scheduler", help="scheduler address")
    sb.add_argument("--config", help="cluster YAML file (for the scheduler address)")
    sb.add_argument("--follow", action="store_true",
                    help="show progress and write metrics and plots, as `psd run` does")
    sb.add_argument("--output", help="output folder for --follow (overrides the job's)")
    sb.add_argument("--quiet", action="store_true", help="no progress bar")
    c = sub.add_parser("checkpoint", help="write a consistent checkpoint of every table now")
    c.add_argument("--scheduler", help="scheduler address")
    c.add_argument("--config", help="cluster YAML file (for the scheduler address)")
    c.add_argument("--wait", type=float, default=30.0,
                   help="seconds to wait for every worker to reach the cut (default 30)")
    cfg = sub.add_parser("config", help="work with cluster config files")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    chk = cfg_sub.add_parser("check", help="validate a cluster YAML (with PSD_ variables and flags) "
                                           "without starting anything; exit 0 if valid, 2 if not")
    chk.add_argument("config", metavar="FILE", help="cluster YAML file")
    _setting_flags(chk)
    r = sub.add_parser("run", help="run a job on a local cluster started for it")
    r.add_argument("job", help="job YAML file")
    r.add_argument("--output", help="output folder (overrides the job's)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    k = sub.add_parser("keygen", help="write CurveZMQ key pairs and the allow-list for a cluster")
    k.add_argument("dir", metavar="DIR", help="key folder (created if missing)")
    k.add_argument("--client", action="append", metavar="NAME",
                   help="a client key pair to create and list (repeatable; default: one named 'client')")
    k.add_argument("--worker", action="append", metavar="NAME",
                   help="a worker key pair to create and list in authorized/workers/ (repeatable): it may do "
                        "what workers do, not drain, drop, checkpoint or submit")
    k.add_argument("--namespace", action="append", metavar="PATTERN",
                   help="limit the --worker keys to the tables and jobs of these namespaces (repeatable; "
                        "fnmatch patterns, e.g. J7 or team-a-*)")
    k.add_argument("--add", action="store_true",
                   help="add the --client/--worker pairs to the existing set in DIR (its server pair stays)")
    k.add_argument("--force", action="store_true", help="replace keys that exist")
    for name in ("status", "drain", "drop", "submit", "checkpoint"):
        if name in sub.choices:
            sub.choices[name].add_argument(
                "--keys", metavar="DIR", help="the cluster's key folder (`psd keygen`; or PSD_KEYS, or keys: in "
                                              "--config)")
            sub.choices[name].add_argument("--security", metavar="MODE",
                                           help="curve (default) or none, for a plaintext cluster")
    return parser


def _flags(args) -> dict[str, str]:
    """The setting flags given on the command line, as {setting key: text}."""
    return {key: getattr(args, _dest(key)) for key in setting_keys()
            if getattr(args, _dest(key), None) is not None}


def _config(args, env: dict[str, str]) -> ClusterConfig:
    """The config file, then PSD_ variables from ``env``, then flags."""
    return resolve_config(getattr(args, "config", None), env, _flags(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = dict(os.environ)  # the only place psd reads the environment
    try:
        return _dispatch(args, env)
    except ConfigError as e:
        problems = e.data.get("problems") or [str(e)]
        if len(problems) == 1:
            print(f"psd: config error: {problems[0]}", file=sys.stderr)
        else:
            print(f"psd: config error: {len(problems)} problems:", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
        return EXIT_CONFIG
    except PsdError as e:
        print(f"psd: {e}", file=sys.stderr)
        return 1


def _check_config(args, env: dict[str, str]) -> int:
    config = _config(args, env)
    if config.security == "curve" and not config.keys:  # the folder itself may live on another host
        raise ConfigError(f"{_origin(args, env, 'keys')}: expected the key folder `psd keygen DIR` writes "
                          f"(security: curve needs it; security: none turns CurveZMQ off), got None")
    overrides = [env_var(k) for k in env_overrides(env)[0]] + [flag(k) for k in _flags(args)]
    print(f"OK {args.config}: scheduler {config.scheduler}, replication {config.replication}, "
          f"consistency {config.consistency}, checkpoint_dir {config.checkpoint_dir or '-'}, "
          f"state_dir {config.state_dir or '-'}, security {config.security}"
          + (f" (keys {config.keys})" if config.security == "curve" else "")
          + (f" (with {', '.join(overrides)})" if overrides else ""))
    return 0


def _origin(args, env: dict[str, str], key: str) -> str:
    """Where the value of setting ``key`` came from, as config errors name it."""
    if _flags(args).get(key) is not None:
        return f"flag {flag(key)}"
    if env_var(key) in env:
        return f"environment variable {env_var(key)}"
    return f"{args.config}: {key}" if getattr(args, "config", None) else key


def _daemon_keys(args, env: dict[str, str], config: ClusterConfig):
    """The daemon's CurveZMQ keys (None under security: none); an unusable key folder is
    a config error (exit 2) naming the ``keys`` setting."""
    from psd.errors import AuthError
    from psd.transport import security

    if config.security == "none":
        return None
    where = _origin(args, env, "keys")
    if not config.keys:
        raise ConfigError(f"{where}: expected the key folder `psd keygen DIR` writes (security: curve needs it; "
                          f"security: none turns CurveZMQ off), got None")
    try:
        if args.command in ("scheduler", "server"):
            return security.load_daemon(config.keys)
        return security.load_client(config.keys)
    except AuthError as e:
        raise ConfigError(f"{where}: expected a usable key folder, got {config.keys!r}: {e.message}") from None


def _resolve(host: str) -> list[str]:
    """The addresses a host name resolves to here (none when it does not resolve)."""
    import socket
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)})
    except (OSError, UnicodeError):
        return []


def _is_local(host: str) -> bool:
    """Whether ``host`` (an address or a name) is an address of this machine: a socket
    can bind it only then."""
    import socket
    for address in _resolve(host) or [host]:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind((address, 0))
            return True
        except OSError:
            continue
    return False


def _check_server_address(args, env: dict[str, str], config: ClusterConfig) -> None:
    """Refuse (exit 2) to start a server others could not reach at the address it would
    announce: loopback while the scheduler is on another host (found on an emulated
    multi-host cluster: the default bind made every such server join the ring at
    127.0.0.1, and workers elsewhere timed out on it)."""
    def origin(key: str) -> str:
        given = key in _flags(args) or env_var(key) in env
        if not given and getattr(config, key) == getattr(ClusterConfig(), key):
            return f"{key} (the default, {getattr(config, key)})"
        return _origin(args, env, key)

    problems = advertised_address_problems(config, origin, resolve=_resolve)
    if problems:
        raise ConfigError("\n".join(problems), problems=problems)


def _warn_if_not_local(config: ClusterConfig) -> None:
    """``advertise`` may rightly name an address of another machine (a NAT or a port
    forward), so it is not refused; but a typo there makes the server unreachable while
    it looks healthy to itself, so say it once at start."""
    import logging
    host = address_host(config.advertise) if config.advertise else None
    if host is not None and not _is_local(host):
        logging.getLogger("psd.daemon").warning(
            "advertise %s: %s is not an address of this host; right behind a NAT or a port forward to this "
            "server, otherwise peers and workers will time out on it (check PSD_ADVERTISE)", config.advertise, host)


def _keygen(args) -> int:
    from psd.transport import security

    written = security.keygen(args.dir, args.client or (), add=args.add, force=args.force,
                              workers=args.worker or (), namespaces=args.namespace or ())
    for path in written:
        print(path)
    clients = [p.name[:-len(security.SECRET)] for p in written
               if p.name.endswith(security.SECRET) and p.name != security.SERVER + security.SECRET]
    print(f"psd keygen: {'added' if args.add else 'wrote'} {len(written)} files. Daemon hosts need "
          f"{security.SERVER}.key_secret and authorized/; a client host needs {security.SERVER}.key and its "
          f"own pair ({', '.join(c + '.key_secret' for c in clients)}). Point keys: (or PSD_KEYS, --keys) "
          f"at the folder.", file=sys.stderr)
    return 0


def _run_role(args, env: dict[str, str]) -> int:
    import logging

    from psd.roles.daemon import LogIdentity, Notifier, run_daemon, setup_logging

    config = _config(args, env)
    if args.command == "server":
        _check_server_address(args, env, config)
    curve = _daemon_keys(args, env, config)
    identity = setup_logging(config.log_level, fmt=config.log_format, identity=LogIdentity(args.command))
    if curve is None:
        logging.getLogger("psd.security").warning(
            "security: none: CurveZMQ is off. Traffic is plaintext and anyone who can reach this %s can "
            "read and change every table; use it only on a trusted test network", args.command)
    notify = Notifier.from_env(env)
    prepare = None
    if args.command == "scheduler":
        from functools import partial

        from psd.apps import APPS
        from psd.jobs.spec import check_submitted
        from psd.roles.scheduler import Scheduler
        # --bind (or a PSD_BIND that is one of the standby addresses) names the scheduler's
        # own address; otherwise it binds the configured one
        own = config.bind if args.bind or config.bind in config.standby else config.scheduler
        role = Scheduler(config, bind=own, curve=curve,
                         check_job=partial(check_submitted, apps=APPS))
        hint = ""
    else:
        hint = f"is the scheduler at {config.scheduler} running and reachable?"
        if args.command == "server":
            from psd.roles.server import Server, prepare_store
            role = Server(config, curve=curve)
            prepare = prepare_store
        else:
            from psd.apps import APPS
            from psd.jobs.worker import Worker
            role = Worker(config, APPS, one_job=args.one_job)
    identity.source = role
    endpoint = None
    if config.metrics:
        from psd.roles.metrics import attach
        endpoint = attach(role, config.metrics)
    logging.getLogger("psd.daemon").info(
        "starting %s (config %s%s)", args.command, args.config or "defaults",
        "".join(f", {n}" for n in [*(env_var(k) for k in env_overrides(env)[0]),
                                   *(flag(k) for k in _flags(args))]))
    if args.command == "server":
        _warn_if_not_local(config)
    return run_daemon(role.run, event_loop=config.event_loop, ready_file=args.ready_file,
                      parent_pid=args.parent_pid, notify=notify, startup_timeout=config.startup_timeout,
                      startup_hint=hint, identity=identity, metrics=endpoint, prepare=prepare)


def _dispatch(args, env: dict[str, str]) -> int:
    if args.command in ("scheduler", "server", "worker"):
        return _run_role(args, env)
    if args.command == "config":
        return _check_config(args, env)
    if args.command == "status":
        from psd.cli.status import show_status
        config = _config(args, env)
        return show_status(config.scheduler, as_json=args.json, watch=args.watch, count=args.count, config=config)
    if args.command == "drain":
        from psd.client import admin
        config = _config(args, env)
        reply = admin.call(config.scheduler, "drain", timeout=config.request_timeout + 5, config=config,
                           node=args.node)
        print(f"{args.node} drained; ring v{reply['ring']}")
        return 0
    if args.command == "drop":
        from psd.client import admin
        from psd.errors import BadRequestError
        if bool(args.namespace) == bool(args.tables):
            raise BadRequestError("psd drop: name tables, or give --namespace NS; not both")
        config = _config(args, env)
        which = {"namespace": args.namespace} if args.namespace else {"tables": args.tables}
        reply = admin.call(config.scheduler, "drop_tables", timeout=config.request_timeout + 5, config=config,
                           **which)
        print(f"dropped {len(reply['dropped'])} table(s)" + (f": {', '.join(reply['dropped'])}"
                                                               if reply["dropped"] else ""))
        return 0
    if args.command == "checkpoint":
        from psd.client import admin
        if not (math.isfinite(args.wait) and args.wait > 0):
            print(f"psd: checkpoint: --wait needs a number of seconds above 0, got {args.wait:g}", file=sys.stderr)
            return 2
        config = _config(args, env)
        info = admin.call(config.scheduler, "checkpoint", timeout=args.wait + 15, config=config, wait=args.wait)
        print(f"checkpoint {info['id']} in {info['folder']}: cut at clock {info['cut']}, "
              f"{info['keys']} keys, {info['bytes']} bytes")
        return 0
    if args.command == "submit":
        from psd.apps import APPS
        from psd.jobs.runner import submit_job
        config = _config(args, env)
        return submit_job(args.job, config.scheduler, APPS, output=args.output, follow=args.follow,
                          quiet=args.quiet, config=config)
    if args.command == "keygen":
        return _keygen(args)
    if args.command == "run":
        from psd.apps import APPS
        from psd.jobs.runner import run_job
        from psd.local import LocalCluster
        return run_job(args.job, APPS, LocalCluster.for_job, output=args.output, quiet=args.quiet)
    raise AssertionError(args.command)
