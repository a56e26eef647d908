"""The cluster configuration: one YAML file, read once into a frozen, validated object.

Every problem in a file is reported together, each naming the file, the key and what
was expected. Command-line flags override fields one to one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from psd.codec import Limits
from psd.errors import ConfigError

DEFAULT_SCHEDULER = "tcp://127.0.0.1:9300"


@dataclass(frozen=True)
class ClusterConfig:
    scheduler: str = DEFAULT_SCHEDULER
    #: address servers bind to; port 0 picks a free one
    bind: str = "tcp://127.0.0.1:0"
    heartbeat_interval: float = 0.1
    #: missed heartbeats before a node is suspect; twice as many and it is dead
    heartbeat_misses: int = 4
    #: seconds of silence before a worker is dead (its clocks and shards are released)
    worker_timeout: float = 5.0
    #: copies of every key range (a primary and replication - 1 replicas)
    replication: int = 1
    #: points per server on the consistent-hashing ring
    vnodes: int = 16
    request_timeout: float = 30.0
    compression: str = "none"
    #: consistency model of every table unless a table overrides it (docs/consistency.md)
    consistency: str = "eventual"
    #: tau for bounded consistency: an integer >= 0, or "auto" (adapted within auto_delay_bounds)
    max_delay: int | str = 2
    auto_delay_bounds: tuple = (0, 8)
    #: workers a sequential/bounded group waits for before they have all joined (0: whoever joined)
    num_workers: int = 0
    #: a worker whose clock lags the median by more than this is flagged as a straggler
    straggler_lag: int = 3
    #: folder for checkpoints (shared by the servers); restarting on it restores the newest
    checkpoint_dir: str | None = None
    #: seconds between automatic checkpoints; 0 takes them only on `psd checkpoint`
    checkpoint_interval: float = 0
    #: where the scheduler keeps its state; a scheduler restarted on it resumes the cluster
    state_dir: str | None = None
    event_loop: str = "uvloop"
    log_level: str = "info"
    limits: Limits = field(default_factory=Limits)

    def replace(self, **changes) -> "ClusterConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain YAML/msgpack-friendly values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


_SCALARS = {
    "scheduler": (str, "a tcp:// address"),
    "bind": (str, "a tcp:// address"),
    "heartbeat_interval": ((int, float), "a positive number of seconds"),
    "heartbeat_misses": (int, "a positive integer"),
    "replication": (int, "a positive integer"),
    "worker_timeout": ((int, float), "a positive number of seconds"),
    "vnodes": (int, "a positive integer"),
    "request_timeout": ((int, float), "a positive number of seconds"),
    "compression": (str, "'none' or 'zstd'"),
    "consistency": (str, "one of sequential, bounded, eventual"),
    "max_delay": ((int, str), "an integer >= 0 or 'auto'"),
    "auto_delay_bounds": ((list, tuple), "[min, max] integers with 0 <= min <= max"),
    "num_workers": (int, "an integer >= 0"),
    "straggler_lag": (int, "a positive integer"),
    "checkpoint_dir": (str, "a folder path"),
    "state_dir": (str, "a folder path"),
    "checkpoint_interval": ((int, float), "a number of seconds >= 0"),
    "event_loop": (str, "'uvloop' or 'asyncio'"),
    "log_level": (str, "one of debug, info, warning, error"),
}
_CHOICES = {"compression": ("none", "zstd"), "consistency": ("sequential", "bounded", "eventual"), "event_loop": ("uvloop", "asyncio"),
            "log_level": ("debug", "info", "warning", "error")}


_OPTIONAL = {"checkpoint_dir", "state_dir"}  # None (the default) turns the feature off
_SPECIAL = {  # fields whose valid values are not simply "positive"
    "max_delay": lambda v: v == "auto" or (isinstance(v, int) and v >= 0),
    "num_workers": lambda v: v >= 0,
    "checkpoint_interval": lambda v: v >= 0,
    "checkpoint_dir": lambda v: bool(v),
    "state_dir": lambda v: bool(v),
    "auto_delay_bounds": lambda v: (len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                         for x in v) and 0 <= v[0] <= v[1]),
}


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> ClusterConfig:
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, raw in data.items():
        if key == "limits":
            values["limits"] = _limits(raw, source, problems)
            continue
        if key not in _SCALARS:
            problems.append(f"{source}: unknown key {key!r}; known keys: {', '.join(sorted([*_SCALARS, 'limits']))}")
            continue
        if raw is None and key in _OPTIONAL:
            continue
        types, what = _SCALARS[key]
        bad_type = not isinstance(raw, types) or isinstance(raw, bool)
        if not bad_type and key in _SPECIAL:
            bad_type = not _SPECIAL[key](raw)
        elif not bad_type and isinstance(raw, (int, float)) and raw <= 0:
            bad_type = True
        if bad_type or (key in _CHOICES and raw not in _CHOICES[key]):
            problems.append(f"{source}: {key}: expected {what}, got {raw!r}")
            continue
        if key in ("scheduler", "bind") and not raw.startswith("tcp://"):
            problems.append(f"{source}: {key}: expected a tcp:// address, got {raw!r}")
            continue
        values[key] = tuple(raw) if isinstance(raw, list) else raw
    if problems:
        raise ConfigError("\n".join(problems))
    return ClusterConfig(**values)


def _limits(raw, source: str, problems: list[str]) -> Limits:
    if not isinstance(raw, dict):
        problems.append(f"{source}: limits: expected a map, got {type(raw).__name__}")
        return Limits()
    known = {f.name for f in dataclasses.fields(Limits)}
    values = {}
    for key, v in raw.items():
        if key not in known:
            problems.append(f"{source}: limits.{key}: unknown limit; known: {', '.join(sorted(known))}")
        elif not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            problems.append(f"{source}: limits.{key}: expected a positive integer, got {v!r}")
        else:
            values[key] = v
    return Limits(**values)


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file safely, turning every failure into a ConfigError naming it."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None


def load_config(path: str | Path | None) -> ClusterConfig:
    if path is None:
        return ClusterConfig()
    data = load_yaml(path)
    if data is None:
        return ClusterConfig()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a map of settings at the top level")
    return config_from_dict(data, str(path))
