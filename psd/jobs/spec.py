"""The job file: loaded with yaml.safe_load, checked once, every problem reported
together with the file, the key and what was expected."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from psd.config import config_from_dict, load_yaml
from psd.errors import ConfigError

#: top-level keys every job may have; the app checks its own sections (data, train, ...)
COMMON_KEYS = {"name", "app", "servers", "workers", "output", "cluster", "timeout",
               "consistency", "max_delay", "keep_tables"}
APP_SECTIONS = {"data", "train", "tables", "filters", "model", "eval", "sketch"}


@dataclass(frozen=True)
class JobSpec:
    source: str
    spec: dict
    name: str
    app: str
    servers: int
    workers: int
    output: str
    cluster: dict
    timeout: float
    #: keep the job's tables (its namespace) when it ends; by default they are dropped
    keep_tables: bool = False


def _positive_int(spec: dict, key: str, default: int, source: str, problems: list[str]) -> int:
    value = spec.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        problems.append(f"{source}: {key}: expected a positive integer, got {value!r}")
        return default
    return value


def parse_job(data, source: str) -> JobSpec:
    from psd.apps import APPS, load_app

    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a map at the top level (app:, data:, ...), "
                          f"got {type(data).__name__}")
    problems: list[str] = []
    for key in data:
        if key not in COMMON_KEYS | APP_SECTIONS:
            problems.append(f"{source}: unknown key {key!r}; known keys: "
                            f"{', '.join(sorted(COMMON_KEYS | APP_SECTIONS))}")
    app = data.get("app")
    if app is None:
        problems.append(f"{source}: app: missing; expected one of {', '.join(sorted(APPS))}")
    elif app not in APPS:
        problems.append(f"{source}: app: unknown app {app!r}; expected one of {', '.join(sorted(APPS))}")
    servers = _positive_int(data, "servers", 1, source, problems)
    workers = _positive_int(data, "workers", 1, source, problems)
    name = data.get("name", Path(source).stem)
    if not isinstance(name, str) or not name:
        problems.append(f"{source}: name: expected a non-empty string, got {name!r}")
    output = data.get("output", f"runs/{name}")
    if not isinstance(output, str) or not output:
        problems.append(f"{source}: output: expected a folder path, got {output!r}")
    keep_tables = data.get("keep_tables", False)
    if not isinstance(keep_tables, bool):
        problems.append(f"{source}: keep_tables: expected true (keep the job's tables when it ends) or false "
                        f"(drop them, the default), got {keep_tables!r}")
        keep_tables = False
    timeout = data.get("timeout", 3600)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        problems.append(f"{source}: timeout: expected a positive number of seconds, got {timeout!r}")
    cluster = data.get("cluster", {}) or {}
    if isinstance(cluster, dict):
        # the job's consistency is a cluster setting; the group is the job's workers
        cluster = {**cluster, **{k: data[k] for k in ("consistency", "max_delay") if k in data}}
        cluster.setdefault("num_workers", workers)
    if not isinstance(cluster, dict):
        problems.append(f"{source}: cluster: expected a map of cluster settings, got {type(cluster).__name__}")
        cluster = {}
    else:
        try:
            config_from_dict(cluster, f"{source}: cluster")
        except ConfigError as e:
            problems.extend(str(e).splitlines())
    if app in APPS:
        problems.extend(load_app(app).validate(data, source))
    if problems:
        raise ConfigError("\n".join(problems))
    return JobSpec(source=source, spec=data, name=name, app=app, servers=servers, workers=workers,
                   output=output, cluster=cluster, timeout=float(timeout), keep_tables=keep_tables)


def load_job(path: str | Path) -> JobSpec:
    return parse_job(load_yaml(path), str(path))
