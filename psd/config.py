"""The cluster configuration: one YAML file, read once into a frozen, validated object.

Every problem is reported together, each naming where the value came from (file and
line, environment variable or flag), the key and what was expected. Settings are
layered one to one: the file, then ``PSD_`` environment variables
(``PSD_HEARTBEAT_INTERVAL=0.2``, ``PSD_LIMITS_MAX_MESSAGE_BYTES=...``), then
command-line flags (``--heartbeat-interval 0.2``). Only the command-line layer reads
the environment, once, and passes it here as a plain mapping.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from psd.codec import Limits
from psd.errors import ConfigError

DEFAULT_SCHEDULER = "tcp://127.0.0.1:9300"
#: the replica placements of the ring (psd.cluster.ring); the first is the default
PLACEMENTS = ("spread", "chained")
ENV_PREFIX = "PSD_"


@dataclass(frozen=True, slots=True)
class ClusterLimits(Limits):
    """The ``limits:`` section: the codec's per-message bounds, plus the cluster's."""

    #: tables in the cluster, every namespace together (the scheduler enforces it)
    max_tables: int = 1024
    #: bytes of table storage one server may hold, replicas included (each server
    #: enforces its own); None: no limit
    max_memory_bytes: int | None = None
    #: bytes of requests (and the replies they ask for) a client keeps unanswered on one
    #: server at most: beyond it, what it issues waits in its own queue (the server
    #: refuses a sender over it with `busy`)
    max_inflight_bytes: int = 64 << 20


@dataclass(frozen=True)
class ClusterConfig:
    scheduler: str = DEFAULT_SCHEDULER
    #: address servers bind to; port 0 picks a free one
    bind: str = "tcp://127.0.0.1:0"
    #: the address a server tells the scheduler, and so every peer and client, to reach it
    #: at, when others must not use the one it binds: bind tcp://0.0.0.0:9401 and advertise
    #: tcp://10.0.0.2:9401, advertise a name (peers resolve it again on every reconnect), or
    #: an address forwarded to this host. Port 0: the port it bound. None: the bound address
    advertise: str | None = None
    heartbeat_interval: float = 0.1
    #: missed heartbeats before a node is suspect; twice as many and it is dead
    heartbeat_misses: int = 4
    #: seconds of silence before a worker is dead (its clocks and shards are released)
    worker_timeout: float = 5.0
    #: copies of every key range (a primary and replication - 1 replicas)
    replication: int = 1
    #: points per server on the consistent-hashing ring
    vnodes: int = 16
    #: where a range's replicas go: "spread" (the next distinct servers clockwise on the
    #: ring: a dead server's load spreads over many) or "chained" (the servers after its
    #: primary in sorted id order: a primary forwards to replication - 1 servers, whatever
    #: ranges a push touches; docs/operations.md, "Replica placement")
    placement: str = PLACEMENTS[0]
    request_timeout: float = 30.0
    #: microseconds a server keeps checking for the next request after answering one, and
    #: a blocking client call checks for its reply, before sleeping (0: sleep at once; at
    #: most heartbeat_interval / 4). Waking a sleeping thread costs tens of microseconds,
    #: a good part of a small pull's round trip; spinning costs a core meanwhile, so leave
    #: it 0 when workers share cores with servers (docs/operations.md, "Latency")
    busy_poll_us: int = 0
    #: microseconds a server keeps checking for the next request after answering one,
    #: only while its requests come within that long of each other (a client in a
    #: request-reply loop): an idle server, or one whose clients compute between
    #: requests, sleeps at once (0: never; at most heartbeat_interval / 4)
    adaptive_poll_us: int = 300
    #: seconds a daemon may take to bind and join the cluster before it exits with code 3
    startup_timeout: float = 60.0
    compression: str = "none"
    #: payload frames of shm_min_bytes or more between two processes of one host go through
    #: shared memory (segments under shm_dir) instead of TCP, after the connection's
    #: authenticated handshake; off: always TCP (docs/operations.md, "Shared memory")
    shm: bool = True
    shm_min_bytes: int = 1 << 20
    #: bytes of segments one daemon or client holds at most; past it frames go by TCP
    shm_max_bytes: int = 2 << 30
    shm_dir: str = "/dev/shm"
    #: workers send a key list they sent before by its signature, not whole (key caching;
    #: docs/protocol.md, "Key caching"): off, every request carries its keys
    key_caching: bool = True
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
    #: seconds a key range whose only copies are on servers declared dead waits for them
    #: before the scheduler gives it to live servers and restores it from the newest
    #: checkpoint (pushes to it since that checkpoint are lost); 0: wait for ever
    restore_unavailable_after: float = 300.0
    #: addresses of standby schedulers (each binds its own, PSD_BIND): they copy the
    #: leader's state and one takes over, with a majority of the servers' votes, when the
    #: leader is lost (docs/fault-tolerance.md, "Standby scheduler")
    standby: tuple = ()
    event_loop: str = "uvloop"
    log_level: str = "info"
    #: "human" (one line per record) or "json" (one JSON object per line)
    log_format: str = "human"
    #: HOST:PORT of the Prometheus endpoint (GET /metrics); port 0 picks a free one; None: off
    metrics: str | None = None
    #: "curve": CurveZMQ encryption and key allow-lists on every socket; "none": plaintext
    #: (trusted test networks only; daemons warn at start)
    security: str = "curve"
    #: the key folder `psd keygen` wrote (PSD_KEYS); daemons need it under security: curve
    keys: str | None = None
    #: connections a client opens to each server under security: curve, each its own
    #: CurveZMQ session on its own ZeroMQ I/O thread: messages of 1 MiB or more are
    #: striped over them, so encryption uses several cores (1: one connection; "auto":
    #: the cores this process may use, at most 8). A server runs as many I/O threads,
    #: and stripes to other servers likewise (docs/operations.md, "Striped connections")
    stripes: int | str = "auto"
    limits: ClusterLimits = field(default_factory=ClusterLimits)

    def advertised(self, bound: str) -> str:
        """The address a server bound at ``bound`` (``tcp://HOST:PORT`` as ZeroMQ reports
        it) tells the scheduler: ``advertise`` with its port 0 replaced by the bound
        port, or ``bound`` itself when nothing is advertised. Kept here, beside the
        setting, so the server needs one expression and no parsing of its own."""
        if self.advertise is None:
            return bound
        m = _ADDRESS.match(self.advertise)
        if m is None or m["port"] != "0":
            return self.advertise
        return f"tcp://{m['host']}:{bound.rsplit(':', 1)[1]}"

    def replace(self, **changes) -> "ClusterConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain YAML/msgpack-friendly values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# -- the rules: one per setting ---------------------------------------------------------
_ADDRESS = re.compile(r"^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.*-]+):(?P<port>\d+|\*)$")
_WILDCARD_HOSTS = {"*", "0.0.0.0", "[::]"}


def _address(v: str) -> bool:
    m = _ADDRESS.match(v)
    return bool(m) and (m["port"] == "*" or int(m["port"]) <= 65535)


_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")


def _host_port(v: str) -> bool:
    """``HOST:PORT`` without a scheme (the metrics endpoint: plain HTTP, not ZeroMQ)."""
    m = _HOST_PORT.match(v)
    return bool(m) and int(m["port"]) <= 65535


def _reachable_address(v: str) -> bool:
    """An address others connect to: a concrete host (servers announce what they bind)."""
    return _address(v) and _ADDRESS.match(v)["host"] not in _WILDCARD_HOSTS


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _text_number(s: str) -> float:
    return float(s)


def _text_int(s: str) -> int:
    return int(s, 10)


def _text_bool(s: str) -> bool:
    low = s.strip().lower()
    if low in ("true", "yes", "on", "1"):
        return True
    if low in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"not true or false: {s!r}")


def _text_int_or_word(s: str) -> int | str:
    s = s.strip()
    return int(s, 10) if re.fullmatch(r"[+-]?\d+", s) else s


def _text_pair(s: str) -> list:
    """``0,8`` or ``[0, 8]``."""
    parts = [p.strip() for p in s.strip().strip("[]()").split(",")]
    return [int(p, 10) for p in parts if p != ""]


def _text_list(s: str) -> list:
    """``tcp://a:1,tcp://b:2`` or ``[tcp://a:1, tcp://b:2]``; empty: none."""
    return [p.strip() for p in s.strip().strip("[]").split(",") if p.strip()]


def _text_optional(s: str) -> str | None:
    """An empty value turns an optional folder off."""
    return s or None


def _text_optional_int(s: str) -> int | None:
    """An empty value (or ``null``) turns an optional limit off."""
    return None if s.strip() in ("", "null", "none") else _text_int(s)


@dataclass(frozen=True)
class Rule:
    ok: Callable[[Any], bool]
    expected: str
    parse: Callable[[str], Any]  # from the text of an environment variable or flag
    optional: bool = False       # None (the default) turns the feature off
    choices: tuple = ()


def _positive_seconds() -> Rule:
    return Rule(lambda v: _number(v) and v > 0, "a positive number of seconds", _text_number)


def _positive_int() -> Rule:
    return Rule(lambda v: _integer(v) and v > 0, "a positive integer", _text_int)


def _choice(*names: str) -> Rule:
    return Rule(lambda v: v in names, "one of " + ", ".join(names), str, choices=names)


def _folder() -> Rule:
    return Rule(lambda v: isinstance(v, str) and bool(v), "a folder path (or null for none)",
                _text_optional, optional=True)


BIND_EXPECTED = ("a tcp://HOST:PORT address (port 0 picks a free one) other hosts can reach: servers "
                 "announce the address they bind, so not a wildcard host unless advertise is set")

RULES: dict[str, Rule] = {
    "scheduler": Rule(lambda v: isinstance(v, str) and _reachable_address(v),
                      "a tcp://HOST:PORT address other hosts can reach (not a wildcard host)", str),
    # a wildcard bind is refused by _cross_checks unless advertise is set
    "bind": Rule(lambda v: isinstance(v, str) and _address(v), BIND_EXPECTED, str),
    "advertise": Rule(lambda v: isinstance(v, str) and _reachable_address(v) and not v.endswith(":*"),
                      "a tcp://HOST:PORT address other hosts reach this server at (port 0: the port it "
                      "binds), not a wildcard host, or null to announce the bound address",
                      _text_optional, optional=True),
    "heartbeat_interval": _positive_seconds(),
    "heartbeat_misses": _positive_int(),
    "worker_timeout": _positive_seconds(),
    "replication": _positive_int(),
    "vnodes": _positive_int(),
    "placement": _choice(*PLACEMENTS),
    "request_timeout": _positive_seconds(),
    "busy_poll_us": Rule(lambda v: _integer(v) and 0 <= v <= 1_000_000, "an integer number of microseconds "
                         "from 0 (sleep at once) to 1000000", _text_int),
    "adaptive_poll_us": Rule(lambda v: _integer(v) and 0 <= v <= 1_000_000, "an integer number of "
                             "microseconds from 0 (never spin) to 1000000", _text_int),
    "startup_timeout": _positive_seconds(),
    "compression": _choice("none", "zstd"),
    "key_caching": Rule(lambda v: isinstance(v, bool), "true or false", _text_bool),
    "shm": Rule(lambda v: isinstance(v, bool), "true or false", _text_bool),
    "shm_min_bytes": Rule(lambda v: _integer(v) and 4096 <= v <= 1 << 40, "an integer number of bytes "
                          "from 4096 to 2**40", _text_int),
    "shm_max_bytes": Rule(lambda v: _integer(v) and v >= 1 << 20, "an integer number of bytes, at least "
                          "1048576 (one segment)", _text_int),
    "shm_dir": Rule(lambda v: isinstance(v, str) and v.startswith("/") and len(v) <= 4096,
                    "an absolute folder path (a tmpfs shared by the host's processes, e.g. /dev/shm)", str),
    "consistency": _choice("sequential", "bounded", "eventual"),
    "max_delay": Rule(lambda v: v == "auto" or (_integer(v) and v >= 0), "an integer >= 0 or 'auto'",
                      _text_int_or_word),
    "auto_delay_bounds": Rule(lambda v: (isinstance(v, (list, tuple)) and len(v) == 2 and all(_integer(x) for x in v)
                                         and 0 <= v[0] <= v[1]),
                              "[min, max] integers with 0 <= min <= max", _text_pair),
    "num_workers": Rule(lambda v: _integer(v) and v >= 0, "an integer >= 0", _text_int),
    "straggler_lag": _positive_int(),
    "checkpoint_dir": _folder(),
    "checkpoint_interval": Rule(lambda v: _number(v) and v >= 0, "a number of seconds >= 0", _text_number),
    "state_dir": _folder(),
    "restore_unavailable_after": Rule(lambda v: _number(v) and v >= 0, "a number of seconds >= 0 (0: never)",
                                      _text_number),
    "standby": Rule(lambda v: isinstance(v, (list, tuple)) and all(isinstance(a, str) and _reachable_address(a)
                                                                   and not a.endswith(":0") for a in v)
                    and len(set(v)) == len(v),
                    "a list of distinct tcp://HOST:PORT addresses of standby schedulers (fixed ports, "
                    "not wildcard hosts)", _text_list),
    "security": _choice("curve", "none"),
    "keys": _folder(),
    "stripes": Rule(lambda v: v == "auto" or (_integer(v) and 1 <= v <= 16),
                    "an integer from 1 (one connection) to 16, or 'auto' (one per core, at most 8)",
                    _text_int_or_word),
    "event_loop": _choice("uvloop", "asyncio"),
    "log_level": _choice("debug", "info", "warning", "error"),
    "log_format": _choice("human", "json"),
    "metrics": Rule(lambda v: isinstance(v, str) and _host_port(v),
                    "HOST:PORT to serve Prometheus metrics on, e.g. 127.0.0.1:9400 (port 0 picks a free "
                    "one), or null for none", _text_optional, optional=True),
}
LIMIT_RULE = _positive_int()
LIMIT_KEYS = tuple(f.name for f in dataclasses.fields(ClusterLimits))
LIMIT_RULES: dict[str, Rule] = {key: LIMIT_RULE for key in LIMIT_KEYS} | {
    "max_memory_bytes": Rule(lambda v: v is None or (_integer(v) and v > 0),
                             "a positive integer (bytes), or null for no limit", _text_optional_int,
                             optional=True),
}

assert set(RULES) | {"limits"} == {f.name for f in dataclasses.fields(ClusterConfig)}, "every setting needs a rule"


def setting_keys() -> list[str]:
    """Every overridable setting, limits as ``limits.NAME``."""
    return [*RULES, *(f"limits.{k}" for k in LIMIT_KEYS)]


def env_var(key: str) -> str:
    """``limits.max_keys`` -> ``PSD_LIMITS_MAX_KEYS``."""
    return ENV_PREFIX + key.replace(".", "_").upper()


def flag(key: str) -> str:
    """``limits.max_keys`` -> ``--limits-max-keys``."""
    return "--" + key.replace(".", "-").replace("_", "-")


def rule(key: str) -> Rule:
    return LIMIT_RULES[key.split(".", 1)[1]] if key.startswith("limits.") else RULES[key]


# -- validation -----------------------------------------------------------------------------
def config_from_dict(data: dict[str, Any], source: str = "<dict>", *,
                     origins: Mapping[str, str] | None = None,
                     earlier_problems: list[str] | None = None) -> ClusterConfig:
    """Validate ``data`` and build the config, or raise one ConfigError listing every
    problem, ``earlier_problems`` (found while reading overrides) last. ``origins``
    names where a key's value came from (``file:3``, an environment variable, a flag);
    keys without one are named as ``source: key``."""
    origins = origins or {}
    problems: list[str] = []

    def where(key: str) -> str:
        return origins.get(key) or f"{source}: {key}"

    values: dict[str, Any] = {}
    for key, raw in data.items():
        if key == "limits":
            values["limits"] = _limits(raw, where, problems)
            continue
        if key not in RULES:
            problems.append(f"{where(key)}: unknown key; {_known(str(key), [*RULES, 'limits'])}")
            continue
        r = RULES[key]
        if raw is None and r.optional:
            values[key] = None
            continue
        if not r.ok(raw):
            problems.append(f"{where(key)}: expected {r.expected}, got {raw!r}")
            continue
        values[key] = tuple(raw) if isinstance(raw, list) else raw
    _cross_checks(values, where, problems)
    problems += earlier_problems or []
    if problems:
        raise ConfigError("\n".join(problems), problems=problems)
    return ClusterConfig(**values)


def _known(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"known: {', '.join(sorted(known))}"


def _cross_checks(values: dict, where, problems: list[str]) -> None:
    """Rules between settings (only between values that passed their own rule)."""
    get = lambda k: values.get(k, getattr(ClusterConfig, k, None))  # noqa: E731
    if "bind" in values and not _reachable_address(values["bind"]) and not get("advertise"):
        problems.append(f"{where('bind')}: expected {BIND_EXPECTED}, got {values['bind']!r}")
    if values.get("standby") and get("scheduler") in values["standby"]:
        problems.append(f"{where('standby')}: expected addresses other than the scheduler's "
                        f"({get('scheduler')}), got {list(values['standby'])!r}")
    if (values.get("checkpoint_interval") or 0) > 0 and not get("checkpoint_dir"):
        problems.append(f"{where('checkpoint_interval')}: expected 0 unless checkpoint_dir is set "
                        f"(automatic checkpoints need a folder), got {values['checkpoint_interval']!r}")
    if ("worker_timeout" in values or "heartbeat_interval" in values) and \
            get("worker_timeout") <= get("heartbeat_interval"):
        key = "worker_timeout" if "worker_timeout" in values else "heartbeat_interval"
        problems.append(f"{where(key)}: expected worker_timeout ({get('worker_timeout')!r} s) above "
                        f"heartbeat_interval ({get('heartbeat_interval')!r} s), or every worker looks dead "
                        f"between two heartbeats")
    for spin in ("busy_poll_us", "adaptive_poll_us"):
        if (spin in values or "heartbeat_interval" in values) and \
                get(spin) * 1e-6 > get("heartbeat_interval") / 4:
            key = spin if spin in values else "heartbeat_interval"
            problems.append(f"{where(key)}: expected {spin} ({get(spin)!r}) at most a quarter of "
                            f"heartbeat_interval ({get('heartbeat_interval')!r} s), or a spinning server "
                            f"holds back its own heartbeats")


def _limits(raw, where, problems: list[str]) -> ClusterLimits:
    if not isinstance(raw, dict):
        problems.append(f"{where('limits')}: expected a map of limits ({', '.join(LIMIT_KEYS)}), "
                        f"got {type(raw).__name__}")
        return ClusterLimits()
    values = {}
    for key, v in raw.items():
        dotted = f"limits.{key}"
        if key not in LIMIT_KEYS:
            problems.append(f"{where(dotted)}: unknown limit; {_known(str(key), LIMIT_KEYS)}")
        elif not LIMIT_RULES[key].ok(v):
            problems.append(f"{where(dotted)}: expected {LIMIT_RULES[key].expected}, got {v!r}")
        else:
            values[key] = v
    return ClusterLimits(**values)


# -- what a server tells others ---------------------------------------------------------
def address_host(address: str) -> str | None:
    """The host part of ``tcp://HOST:PORT`` (IPv6 without brackets), or None."""
    m = _ADDRESS.match(address)
    return m["host"].strip("[]") if m else None


def _loopback(host: str, resolve: Callable[[str], list[str]] | None) -> str | None:
    """The loopback address ``host`` is or resolves to (every address it resolves to
    must be loopback), else None. A name that does not resolve is not judged here."""
    import ipaddress

    def is_loopback(text: str) -> bool:
        try:
            return ipaddress.ip_address(text.split("%", 1)[0]).is_loopback
        except ValueError:
            return False

    if is_loopback(host):
        return host
    if host == "localhost":
        return "127.0.0.1"
    found = resolve(host) if resolve is not None else []
    return found[0] if found and all(is_loopback(a) for a in found) else None


def advertised_address_problems(config: ClusterConfig, origin: Callable[[str], str],
                                resolve: Callable[[str], list[str]] | None = None) -> list[str]:
    """Why other hosts could not reach the address a server would advertise, checked
    before it starts (so the unit fails once with exit 2 instead of joining the ring at
    an address nobody else can use, where peers and workers would time out on it).

    Today that is one case, found on an emulated multi-host cluster (psd/testing): the
    address is loopback (the default bind ``tcp://127.0.0.1:0``, ``localhost``, or a
    host name that resolves only to 127.0.1.1, as Debian maps the machine's own name)
    while the scheduler is not. ``origin(key)`` names where a setting came from;
    ``resolve(name)`` lists the addresses of a host name (none: names are not judged)."""
    key = "advertise" if config.advertise else "bind"
    address = getattr(config, key)
    scheduler_host = address_host(config.scheduler)
    host = address_host(address)
    if host is None or scheduler_host is None or _loopback(scheduler_host, resolve):
        return []
    loop = _loopback(host, resolve)
    if loop is None:
        return []
    seen = host if loop == host else f"{host}, which resolves to {loop},"
    problem = (f"{origin(key)}: expected an address other hosts can reach this server at, got {address!r}: "
               f"{seen} is a loopback address, but the scheduler is at {config.scheduler}, so other hosts "
               f"could not reach this server at the address it would announce. Set {env_var('bind')}=tcp://"
               f"THIS_HOST_ADDRESS:0 on this host (e.g. in /etc/psd/psd.env), or bind a wildcard and set "
               f"{env_var('advertise')}=tcp://THIS_HOST_ADDRESS:0")
    return [problem]


# -- files ------------------------------------------------------------------------------
def load_yaml(path: str | Path) -> Any:
    """Read a YAML file safely, turning every failure into a ConfigError naming it."""
    return _read_yaml(path)[0]


def _read_yaml(path: str | Path) -> tuple[Any, str]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a text file: {e.reason} at byte {e.start}") from None
    try:
        return yaml.safe_load(text), text
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None


def _key_lines(text: str) -> dict[str, int]:
    """Line of every top-level key and every ``limits.*`` key (for messages)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    lines: dict[str, int] = {}
    if isinstance(root, yaml.MappingNode):
        for k, v in root.value:
            if isinstance(k, yaml.ScalarNode):
                lines[k.value] = k.start_mark.line + 1
                if k.value == "limits" and isinstance(v, yaml.MappingNode):
                    for lk, _ in v.value:
                        if isinstance(lk, yaml.ScalarNode):
                            lines[f"limits.{lk.value}"] = lk.start_mark.line + 1
    return lines


def _file_settings(path: str | Path) -> tuple[dict, dict[str, str]]:
    data, text = _read_yaml(path)
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a map of settings at the top level, got {type(data).__name__}")
    origins = {key: f"{path}:{line}: {key}" for key, line in _key_lines(text).items()}
    return data, origins


def load_config(path: str | Path | None) -> ClusterConfig:
    if path is None:
        return ClusterConfig()
    data, origins = _file_settings(path)
    return config_from_dict(data, str(path), origins=origins)


# -- layering: file, environment, flags ---------------------------------------------------
def env_overrides(env: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The ``PSD_`` variables of ``env`` as {setting key: text}, and problems for
    ``PSD_`` variables that name no setting."""
    by_name = {env_var(k): k for k in setting_keys()}
    found, problems = {}, []
    for name, text in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        if name in by_name:
            found[by_name[name]] = text
        else:
            problems.append(f"environment variable {name}: not a psd setting; {_known(name, by_name)}")
    return found, problems


def resolve_config(path: str | Path | None, env: Mapping[str, str] | None = None,
                   flags: Mapping[str, str] | None = None) -> ClusterConfig:
    """The config a daemon runs with: ``path`` (or the defaults), then ``PSD_`` variables
    from ``env``, then ``flags`` ({setting key: text}); every problem in one ConfigError."""
    data, origins = _file_settings(path) if path is not None else ({}, {})
    source = str(path) if path is not None else "<defaults>"
    data = dict(data)
    if isinstance(data.get("limits"), dict):
        data["limits"] = dict(data["limits"])
    found, problems = env_overrides(env or {})
    layers = [(found, lambda k: f"environment variable {env_var(k)}"),
              ({k: v for k, v in (flags or {}).items() if v is not None}, lambda k: f"flag {flag(k)}")]
    for texts, name in layers:
        for key, text in texts.items():
            try:
                value = rule(key).parse(text)
            except ValueError:
                problems.append(f"{name(key)}: expected {rule(key).expected}, got {text!r}")
                continue
            if key.startswith("limits."):
                limits = data.setdefault("limits", {})
                if isinstance(limits, dict):
                    limits[key.split(".", 1)[1]] = value
            else:
                data[key] = value
            origins[key] = name(key)
    return config_from_dict(data, source, origins=origins, earlier_problems=problems)
