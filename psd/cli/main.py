"""The ``psd`` command: one binary, a subcommand per role or tool."""
from __future__ import annotations

import argparse
import sys

from psd.config import DEFAULT_SCHEDULER, ClusterConfig, load_config
from psd.errors import ConfigError, PsdError

EXIT_CONFIG = 2


def _daemon_args(p: argparse.ArgumentParser, scheduler: bool = True) -> None:
    p.add_argument("--config", help="cluster YAML file")
    if scheduler:
        p.add_argument("--scheduler", help="scheduler address, e.g. tcp://10.0.0.1:9300")
    p.add_argument("--bind", help="address to bind; port 0 picks a free port")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--ready-file", help="write the bound address here once serving")
    p.add_argument("--parent-pid", type=int, help="exit when this process is gone")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psd", description="psd parameter server")
    sub = parser.add_subparsers(dest="command", required=True)
    _daemon_args(sub.add_parser("scheduler", help="run the scheduler daemon"), scheduler=False)
    _daemon_args(sub.add_parser("server", help="run a server daemon"))
    w = sub.add_parser("worker", help="run a worker daemon that executes jobs")
    _daemon_args(w)
    w.add_argument("--one-job", action="store_true", help="exit after finishing one job")
    s = sub.add_parser("status", help="show what the cluster is doing")
    s.add_argument("--scheduler", help=f"scheduler address (default {DEFAULT_SCHEDULER} or the config's)")
    s.add_argument("--config", help="cluster YAML file (for the scheduler address)")
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    d = sub.add_parser("drain", help="hand a server's ranges to the others, then stop it")
    d.add_argument("node", help="server id as `psd status` shows it, e.g. S2")
    d.add_argument("--scheduler", help="scheduler address")
    d.add_argument("--config", help="cluster YAML file (for the scheduler address)")
    c = sub.add_parser("checkpoint", help="write a consistent checkpoint of every table now")
    c.add_argument("--scheduler", help="scheduler address")
    c.add_argument("--config", help="cluster YAML file (for the scheduler address)")
    c.add_argument("--wait", type=float, default=30.0,
                   help="seconds to wait for every worker to reach the cut (default 30)")
    r = sub.add_parser("run", help="run a job on a local cluster started for it")
    r.add_argument("job", help="job YAML file")
    r.add_argument("--output", help="output folder (overrides the job's)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _config(args) -> ClusterConfig:
    config = load_config(args.config)
    changes = {}
    if getattr(args, "scheduler", None):
        changes["scheduler"] = args.scheduler
    if getattr(args, "log_level", None):
        changes["log_level"] = args.log_level
    if getattr(args, "bind", None) and args.command != "scheduler":
        changes["bind"] = args.bind
    return config.replace(**changes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as e:
        print(f"psd: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except PsdError as e:
        print(f"psd: {e}", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    from psd.roles.daemon import run_daemon, setup_logging

    if args.command in ("scheduler", "server", "worker"):
        config = _config(args)
        setup_logging(config.log_level)
        if args.command == "scheduler":
            from psd.roles.scheduler import Scheduler
            role = Scheduler(config, bind=args.bind or config.scheduler)
        elif args.command == "server":
            from psd.roles.server import Server
            role = Server(config)
        else:
            from psd.roles.worker import Worker
            role = Worker(config, one_job=args.one_job)
        return run_daemon(role.run, event_loop=config.event_loop, ready_file=args.ready_file,
                          parent_pid=args.parent_pid)
    if args.command == "status":
        from psd.cli.status import show_status
        config = _config(args)
        return show_status(config.scheduler, as_json=args.json)
    if args.command == "drain":
        from psd.client import admin
        config = _config(args)
        reply = admin.call(config.scheduler, "drain", timeout=config.request_timeout + 5, node=args.node)
        print(f"{args.node} drained; ring v{reply['ring']}")
        return 0
    if args.command == "checkpoint":
        from psd.client import admin
        config = _config(args)
        info = admin.call(config.scheduler, "checkpoint", timeout=args.wait + 15, wait=args.wait)
        print(f"checkpoint {info['id']} in {info['folder']}: cut at clock {info['cut']}, "
              f"{info['keys']} keys, {info['bytes']} bytes")
        return 0
    if args.command == "run":
        from psd.jobs.runner import run_job
        return run_job(args.job, output=args.output, quiet=args.quiet)
    raise AssertionError(args.command)
