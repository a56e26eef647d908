"""The job file: loaded with yaml.safe_load, checked once, every problem reported
together with the file, the key and what was expected."""
from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from psd.config import config_from_dict, load_yaml
from psd.errors import ConfigError, describe
from psd.filters import parse_filters
from psd.filters.spec import PULL_FILTERS, PULL_REQUIRED
from psd.jobs.registry import AppRegistry

#: top-level keys every job may have; the app checks its own sections (data, train, ...)
COMMON_KEYS = {"name", "app", "servers", "workers", "output", "cluster", "timeout",
               "consistency", "max_delay", "keep_tables"}
APP_SECTIONS = {"data", "train", "tables", "filters", "pull_filters", "model", "eval", "sketch"}
#: the most servers or workers (ranks) a job may ask for: ranks are handed out one by one
#: and ``psd run`` starts a process for each
MAX_NODES = 10_000
#: the longest job name (``psd status`` shows it)
MAX_NAME = 200


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


def check_count(value, label: str, problems: list[str]) -> bool:
    """Whether ``value`` is a number of servers or workers (an integer from 1 to
    ``MAX_NODES``); if not, a problem naming ``label`` is added."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        problems.append(f"{label}: expected a positive integer, got {describe(value)}")
    elif value > MAX_NODES:
        problems.append(f"{label}: expected at most {MAX_NODES}, got {value}")
    else:
        return True
    return False


def _positive_int(spec: dict, key: str, default: int, source: str, problems: list[str]) -> int:
    value = spec.get(key, default)
    return value if check_count(value, f"{source}: {key}", problems) else default


def _top_level(data: dict, source: str, problems: list[str], apps: Collection[str]) -> dict:
    """The keys every job has, checked without the app's code or the job's data files:
    what :func:`parse_job` and the scheduler's ``submit`` (:func:`check_submitted`) share.
    ``apps``: the known app names."""
    known = ", ".join(sorted(apps))
    for key in data:
        if key not in COMMON_KEYS | APP_SECTIONS:
            problems.append(f"{source}: unknown key {describe(key)}; known keys: "
                            f"{', '.join(sorted(COMMON_KEYS | APP_SECTIONS))}")
    if "filters" in data:  # names and options here; the app checks them against its tables
        try:
            parse_filters(data["filters"])
        except ConfigError as e:
            problems.extend(f"{source}: {p}" for p in e.data.get("problems", [e.message]))
    if "pull_filters" in data:
        try:
            parse_filters(data["pull_filters"], "pull_filters", PULL_FILTERS, PULL_REQUIRED)
        except ConfigError as e:
            problems.extend(f"{source}: {p}" for p in e.data.get("problems", [e.message]))
    app = data.get("app")
    if app is None:
        problems.append(f"{source}: app: missing; expected one of {known}")
    elif not isinstance(app, str) or app not in apps:
        problems.append(f"{source}: app: unknown app {describe(app)}; expected one of {known}")
    servers = _positive_int(data, "servers", 1, source, problems)
    workers = _positive_int(data, "workers", 1, source, problems)
    name = data.get("name", Path(source).stem)
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        problems.append(f"{source}: name: expected a non-empty string of at most {MAX_NAME} characters, "
                        f"got {describe(name)}")
    output = data.get("output", f"runs/{name}")
    if not isinstance(output, str) or not output:
        problems.append(f"{source}: output: expected a folder path, got {describe(output)}")
    keep_tables = data.get("keep_tables", False)
    if not isinstance(keep_tables, bool):
        problems.append(f"{source}: keep_tables: expected true (keep the job's tables when it ends) or false "
                        f"(drop them, the default), got {describe(keep_tables)}")
        keep_tables = False
    timeout = data.get("timeout", 3600)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or math.isnan(timeout) or timeout <= 0:
        problems.append(f"{source}: timeout: expected a positive number of seconds, got {describe(timeout)}")
    return {"app": app, "servers": servers, "workers": workers, "name": name, "output": output,
            "keep_tables": keep_tables, "timeout": timeout}


def check_submitted(job, workers, source: str = "submit", *, apps: Collection[str]) -> list[str]:
    """The problems of a job handed to the scheduler (``submit``: ``meta.job``, the
    job file's map, and ``meta.workers``), each naming the field: the top-level keys as
    :func:`parse_job` checks them, ``app`` against the names in ``apps``. Not the app's
    own sections, which need the job's data files: the workers check those when they run
    it. ``psd scheduler`` hands it to the scheduler with ``apps`` bound."""
    problems: list[str] = []
    check_count(workers, f"{source}: meta.workers", problems)
    if not isinstance(job, dict):
        problems.append(f"{source}: meta.job: expected a map (a job file's contents), got {describe(job)}")
    else:
        _top_level(job, f"{source}: meta.job", problems, apps)
    return problems


def parse_job(data, source: str, apps: AppRegistry) -> JobSpec:
    """The job file's map ``data`` (read from ``source``) checked whole: the keys every
    job has, the cluster settings, and the app's own sections by the app found in
    ``apps``. Every problem is raised together in one ``ConfigError``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a map at the top level (app:, data:, ...), "
                          f"got {type(data).__name__}")
    problems: list[str] = []
    top = _top_level(data, source, problems, apps)
    app, servers, workers, name, output, keep_tables, timeout = (
        top[k] for k in ("app", "servers", "workers", "name", "output", "keep_tables", "timeout"))
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
    if isinstance(app, str) and app in apps:
        # (the app checks its filters whole: their names and options again, once listed)
        problems.extend(p for p in apps.load(app).validate(data, source) if p not in problems)
    if problems:
        raise ConfigError("\n".join(problems))
    return JobSpec(source=source, spec=data, name=name, app=app, servers=servers, workers=workers,
                   output=output, cluster=cluster, timeout=float(timeout), keep_tables=keep_tables)


def load_job(path: str | Path, apps: AppRegistry) -> JobSpec:
    return parse_job(load_yaml(path), str(path), apps)
