"""The cluster config: every rule, every layer (file, PSD_ variables, flags), every
problem reported together with where it came from. Pure: no daemons."""
from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest

from psd.cli.main import build_parser
from psd.codec import Limits
from psd.config import (LIMIT_KEYS, RULES, ClusterConfig, ClusterLimits, config_from_dict, env_var, flag,
                        load_config, load_yaml, resolve_config, setting_keys)
from psd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

#: values each rule must refuse (YAML-typed), one row per setting
BAD = {
    "scheduler": ["10.0.0.1:9300", "tcp://*:9300", "tcp://0.0.0.0:9300", "tcp://h:99999", "tcp://h", 9300],
    "bind": ["udp://h:1", "tcp://[::]:0", "tcp://0.0.0.0:0", "tcp://h:port", None],
    "advertise": ["10.0.0.2:9401", "tcp://0.0.0.0:0", "tcp://*:0", "tcp://h:*", "tcp://h:70000", "", 9401],
    "heartbeat_interval": [0, -1, "fast", True, math.nan, math.inf],
    "heartbeat_misses": [0, 1.5, True, "4"],
    "worker_timeout": [0, -5, "5s"],
    "replication": [0, 2.0, -1],
    "vnodes": [-3, 0, [16]],
    "placement": ["chain", "Chained", "random", 2, None],
    "request_timeout": ["30s", 0, None],
    "busy_poll_us": [-1, 1.5, True, 2_000_000, "100"],
    "adaptive_poll_us": [-1, 0.5, False, 1_000_001, "300"],
    "startup_timeout": [0, -1, False],
    "compression": ["gzip", 1],
    "key_caching": ["yes", 1],
    "shm": ["on", 0],
    "shm_min_bytes": [100, 2**41, 1.5, True],
    "shm_max_bytes": [1000, -1, "1G"],
    "shm_dir": ["dev/shm", "", 3],
    "consistency": ["strong", "BSP"],
    "max_delay": [-1, "soon", 1.5, True],
    "auto_delay_bounds": [[3, 1], [1], "0,8", [0, 1.5], [-1, 2], [0, 1, 2]],
    "num_workers": [-1, 0.5],
    "straggler_lag": [0, 2.5],
    "checkpoint_dir": ["", 5],
    "checkpoint_interval": [-1, "hourly", math.nan],
    "state_dir": ["", []],
    "restore_unavailable_after": [-1, "soon", True],
    "standby": ["tcp://10.0.0.2:9300", ["tcp://*:9300"], ["tcp://10.0.0.2:0"],
                ["tcp://10.0.0.2:9300", "tcp://10.0.0.2:9300"], [7]],
    "event_loop": ["trio"],
    "log_level": ["verbose", "INFO"],
    "log_format": ["xml", "text"],
    "metrics": ["tcp://127.0.0.1:9400", "http://h:9400/metrics", "127.0.0.1", ":9400", "h:99999", "h:port",
                "", 9400, ["h", 1]],
    "security": ["off", "CURVE", "plain", True, None],
    "keys": ["", 5, ["/etc/psd/keys"]],
    "stripes": [0, 17, "many", 2.5, True, None],
    **{f"limits.{k}": [0, -1, "1M", True, 1.5] for k in LIMIT_KEYS},
}

#: values each rule accepts, with what the config then holds
GOOD = {
    "scheduler": [("tcp://10.0.0.1:9300", "tcp://10.0.0.1:9300"), ("tcp://[::1]:9300", "tcp://[::1]:9300")],
    "bind": [("tcp://127.0.0.1:0", "tcp://127.0.0.1:0"), ("tcp://node-3.cluster:9401", "tcp://node-3.cluster:9401")],
    "advertise": [("tcp://10.0.0.2:0", "tcp://10.0.0.2:0"), ("tcp://node-3.cluster:9401", "tcp://node-3.cluster:9401"),
                  (None, None)],
    "heartbeat_interval": [(0.2, 0.2), (1, 1)],
    "heartbeat_misses": [(1, 1)],
    "worker_timeout": [(2.5, 2.5)],
    "replication": [(3, 3)],
    "vnodes": [(64, 64)],
    "placement": [("chained", "chained"), ("spread", "spread")],
    "request_timeout": [(5, 5)],
    "busy_poll_us": [(0, 0), (500, 500)],
    "adaptive_poll_us": [(0, 0), (1000, 1000)],
    "startup_timeout": [(0.5, 0.5)],
    "compression": [("zstd", "zstd"), ("none", "none")],
    "key_caching": [(True, True), (False, False)],
    "shm": [(True, True), (False, False)],
    "shm_min_bytes": [(4096, 4096), (1 << 20, 1 << 20)],
    "shm_max_bytes": [(1 << 20, 1 << 20), (8 << 30, 8 << 30)],
    "shm_dir": [("/dev/shm", "/dev/shm"), ("/run/psd", "/run/psd")],
    "consistency": [("sequential", "sequential"), ("bounded", "bounded")],
    "max_delay": [(0, 0), ("auto", "auto")],
    "auto_delay_bounds": [([1, 4], (1, 4)), ([0, 0], (0, 0))],
    "num_workers": [(0, 0), (8, 8)],
    "straggler_lag": [(1, 1)],
    "checkpoint_dir": [("/srv/ckpt", "/srv/ckpt"), (None, None)],
    "checkpoint_interval": [(0, 0), (0.0, 0.0)],   # > 0 needs checkpoint_dir: test_cross_rules
    "state_dir": [("/var/lib/psd", "/var/lib/psd"), (None, None)],
    "standby": [(["tcp://10.0.0.2:9300"], ("tcp://10.0.0.2:9300",)), ([], ())],
    "restore_unavailable_after": [(0, 0), (600, 600)],
    "event_loop": [("asyncio", "asyncio")],
    "log_level": [("debug", "debug")],
    "log_format": [("json", "json"), ("human", "human")],
    "metrics": [("127.0.0.1:9400", "127.0.0.1:9400"), ("127.0.0.1:0", "127.0.0.1:0"),
                ("0.0.0.0:9400", "0.0.0.0:9400"), ("[::1]:9400", "[::1]:9400"),
                ("node-3.cluster:9401", "node-3.cluster:9401"), (None, None)],
    "security": [("curve", "curve"), ("none", "none")],
    "keys": [("/etc/psd/keys", "/etc/psd/keys"), (None, None)],
    "stripes": [(1, 1), (16, 16), ("auto", "auto")],
    **{f"limits.{k}": [(1024, 1024)] for k in LIMIT_KEYS},
}

#: the text of an environment variable or flag, and the value it parses to
TEXT = {
    "scheduler": ("tcp://10.1.2.3:9300", "tcp://10.1.2.3:9300"),
    "bind": ("tcp://10.1.2.4:0", "tcp://10.1.2.4:0"),
    "advertise": ("tcp://node-4.cluster:0", "tcp://node-4.cluster:0"),
    "heartbeat_interval": ("0.2", 0.2),
    "heartbeat_misses": ("6", 6),
    "worker_timeout": ("7.5", 7.5),
    "replication": ("2", 2),
    "vnodes": ("32", 32),
    "placement": ("chained", "chained"),
    "request_timeout": ("12", 12.0),
    "busy_poll_us": ("250", 250),
    "adaptive_poll_us": ("0", 0),
    "startup_timeout": ("3", 3.0),
    "compression": ("zstd", "zstd"),
    "key_caching": ("false", False),
    "shm": ("off", False),
    "shm_min_bytes": ("65536", 65536),
    "shm_max_bytes": ("1048576", 1048576),
    "shm_dir": ("/run/psd", "/run/psd"),
    "consistency": ("bounded", "bounded"),
    "max_delay": ("3", 3),
    "auto_delay_bounds": ("1,5", (1, 5)),
    "num_workers": ("4", 4),
    "straggler_lag": ("5", 5),
    "checkpoint_dir": ("/srv/psd/ckpt", "/srv/psd/ckpt"),
    "checkpoint_interval": ("0", 0.0),
    "state_dir": ("/var/lib/psd/s", "/var/lib/psd/s"),
    "restore_unavailable_after": ("120", 120.0),
    "standby": ("tcp://10.0.0.2:9300,tcp://10.0.0.3:9300", ("tcp://10.0.0.2:9300", "tcp://10.0.0.3:9300")),
    "event_loop": ("asyncio", "asyncio"),
    "log_level": ("warning", "warning"),
    "log_format": ("json", "json"),
    "metrics": ("10.0.0.2:9400", "10.0.0.2:9400"),
    "security": ("none", "none"),
    "keys": ("/etc/psd/keys", "/etc/psd/keys"),
    "stripes": ("4", 4),
    **{f"limits.{k}": ("4096", 4096) for k in LIMIT_KEYS},
}

#: text an environment variable or flag of that setting cannot hold
#: (any text is a valid folder path, and an empty one turns the folder off: tested below)
BAD_TEXT = {key: "x1" for key in setting_keys() if key not in ("checkpoint_dir", "state_dir", "keys")} | {
    "shm_dir": "relative/path",
    "scheduler": "10.0.0.1:9300", "bind": "tcp://*:0", "advertise": "tcp://0.0.0.0:0", "compression": "gzip",
    "max_delay": "-2", "auto_delay_bounds": "3,1", "metrics": "tcp://10.0.0.2:9400",
    "standby": "10.0.0.2:9300",
}


def get(config: ClusterConfig, key: str):
    if key.startswith("limits."):
        return getattr(config.limits, key.split(".", 1)[1])
    return getattr(config, key)


def as_data(key: str, value) -> dict:
    if key.startswith("limits."):
        return {"limits": {key.split(".", 1)[1]: value}}
    return {key: value}


def test_every_setting_has_a_rule_and_tests():
    fields = {f.name for f in dataclasses.fields(ClusterConfig)} - {"limits"}
    assert set(RULES) == fields
    keys = set(setting_keys())
    assert keys == fields | {f"limits.{f.name}" for f in dataclasses.fields(ClusterLimits)}
    assert {f.name for f in dataclasses.fields(Limits)} < set(LIMIT_KEYS)  # the codec's, and the cluster's
    for table in (BAD, GOOD, TEXT):
        assert set(table) == keys, sorted(keys ^ set(table))


@pytest.mark.parametrize("key", sorted(BAD))
def test_every_rule_refuses_bad_values_naming_key_and_expectation(key):
    expected = (RULES[key].expected if key in RULES else "a positive integer")
    for bad in BAD[key]:
        with pytest.raises(ConfigError) as err:
            config_from_dict(as_data(key, bad), "cluster.yaml")
        message = str(err.value)
        assert message.startswith(f"cluster.yaml: {key}: expected {expected}"), message
        assert repr(bad) in message


@pytest.mark.parametrize("key", sorted(GOOD))
def test_every_rule_accepts_good_values(key):
    for value, held in GOOD[key]:
        assert get(config_from_dict(as_data(key, value)), key) == held


def test_cross_rules():
    with pytest.raises(ConfigError, match=r"checkpoint_interval: expected 0 unless checkpoint_dir is set"):
        config_from_dict({"checkpoint_interval": 60})
    assert config_from_dict({"checkpoint_interval": 60, "checkpoint_dir": "/c"}).checkpoint_interval == 60
    with pytest.raises(ConfigError, match=r"worker_timeout: expected worker_timeout \(0.5 s\) above heartbeat_interval"):
        config_from_dict({"worker_timeout": 0.5, "heartbeat_interval": 1})
    with pytest.raises(ConfigError, match=r"heartbeat_interval: expected worker_timeout \(5.0 s\) above"):
        config_from_dict({"heartbeat_interval": 5})
    with pytest.raises(ConfigError, match=r"busy_poll_us: expected busy_poll_us \(30000\) at most a quarter of "
                                          r"heartbeat_interval \(0.1 s\)"):
        config_from_dict({"busy_poll_us": 30000})
    assert config_from_dict({"busy_poll_us": 30000, "heartbeat_interval": 0.2}).busy_poll_us == 30000
    with pytest.raises(ConfigError, match=r"adaptive_poll_us: expected adaptive_poll_us \(30000\) at most a quarter"):
        config_from_dict({"adaptive_poll_us": 30000})
    # the default (300 us) holds a heartbeat_interval down to 1.2 ms, and names it below that
    assert config_from_dict({"heartbeat_interval": 0.0012}).adaptive_poll_us == 300
    with pytest.raises(ConfigError, match=r"heartbeat_interval: expected adaptive_poll_us \(300\) at most a quarter"):
        config_from_dict({"heartbeat_interval": 0.001})


def test_a_wildcard_bind_needs_an_advertised_address():
    """A server announces its address; bound to a wildcard it must be told what to announce."""
    with pytest.raises(ConfigError, match=r"bind: expected .* not a wildcard host unless advertise is set, "
                                          r"got 'tcp://0.0.0.0:0'"):
        config_from_dict({"bind": "tcp://0.0.0.0:0"})
    c = config_from_dict({"bind": "tcp://0.0.0.0:0", "advertise": "tcp://10.0.0.2:0"})
    assert c.advertised("tcp://0.0.0.0:41235") == "tcp://10.0.0.2:41235"  # port 0: the bound port
    assert c.replace(advertise="tcp://[fd00::2]:0").advertised("tcp://[::]:7") == "tcp://[fd00::2]:7"
    assert c.replace(advertise="tcp://gw.example:9401").advertised("tcp://0.0.0.0:41235") == "tcp://gw.example:9401"
    assert ClusterConfig().advertised("tcp://127.0.0.1:5") == "tcp://127.0.0.1:5"  # unset: what it bound
    c = resolve_config(None, {"PSD_BIND": "tcp://*:0", "PSD_ADVERTISE": "tcp://s1.cluster:0"})
    assert (c.bind, c.advertise) == ("tcp://*:0", "tcp://s1.cluster:0")
    assert resolve_config(None, {"PSD_ADVERTISE": ""}).advertise is None


def test_a_loopback_server_address_is_refused_when_the_scheduler_is_elsewhere():
    """Found on an emulated multi-host cluster (psd/testing/netcluster.py): a server host
    without PSD_BIND joined the ring at 127.0.0.1, where no other host reaches it."""
    from psd.config import advertised_address_problems
    origin = lambda key: f"origin of {key}"  # noqa: E731
    remote = ClusterConfig(scheduler="tcp://10.0.0.1:9300")
    [problem] = advertised_address_problems(remote, origin)
    assert problem.startswith("origin of bind: expected an address other hosts can reach this server at, got "
                              "'tcp://127.0.0.1:0': 127.0.0.1 is a loopback address, but the scheduler is at "
                              "tcp://10.0.0.1:9300"), problem
    assert "PSD_BIND=tcp://THIS_HOST_ADDRESS:0" in problem and "PSD_ADVERTISE" in problem
    assert advertised_address_problems(remote.replace(bind="tcp://10.0.0.2:0"), origin) == []
    assert advertised_address_problems(ClusterConfig(), origin) == []  # everything on one host
    assert advertised_address_problems(remote.replace(bind="tcp://[::1]:0"), origin)
    # a name resolving only to loopback (Debian maps the host's own name to 127.0.1.1)
    hosts = {"node-2": ["127.0.1.1"], "node-3": ["10.0.0.3"], "sched": ["10.0.0.1"]}
    resolve = lambda name: hosts.get(name, [])  # noqa: E731
    [problem] = advertised_address_problems(remote.replace(bind="tcp://node-2:0"), origin, resolve)
    assert "node-2, which resolves to 127.0.1.1, is a loopback address" in problem
    assert advertised_address_problems(remote.replace(bind="tcp://node-3:0"), origin, resolve) == []
    assert advertised_address_problems(remote.replace(bind="tcp://unknown:0"), origin, resolve) == []
    # the advertised address is the one judged, not the bind
    wild = remote.replace(bind="tcp://0.0.0.0:0", advertise="tcp://localhost:0")
    [problem] = advertised_address_problems(wild, origin, resolve)
    assert problem.startswith("origin of advertise: ")
    assert advertised_address_problems(wild.replace(advertise="tcp://node-3:0"), origin, resolve) == []


def test_every_problem_of_a_file_reported_together_with_line_and_key(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("# a comment\n"
                    "heartbeat_interval: -1\n"
                    "replication: two\n"
                    "heartbeat_intervall: 1\n"
                    "limits:\n"
                    "  max_keys: 0\n"
                    "  max_key: 5\n"
                    "log_format: xml\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    problems = err.value.data["problems"]
    assert problems == [
        f"{path}:2: heartbeat_interval: expected a positive number of seconds, got -1",
        f"{path}:3: replication: expected a positive integer, got 'two'",
        f"{path}:4: heartbeat_intervall: unknown key; did you mean 'heartbeat_interval'?",
        f"{path}:6: limits.max_keys: expected a positive integer, got 0",
        f"{path}:7: limits.max_key: unknown limit; did you mean 'max_keys'?",
        f"{path}:8: log_format: expected one of human, json, got 'xml'",
    ]
    assert str(err.value) == "\n".join(problems)


def test_unknown_key_without_a_near_match_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"<dict>: zzz: unknown key; known: adaptive_poll_us, advertise, auto_delay_bounds, bind, "):
        config_from_dict({"zzz": 1})
    with pytest.raises(ConfigError, match=r"limits.zzz: unknown limit; known: max_frames"):
        config_from_dict({"limits": {"zzz": 1}})
    with pytest.raises(ConfigError, match=r"<dict>: 7: unknown key"):
        config_from_dict({7: 1})


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"missing.yaml: cannot read: No such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheduler: tcp://h:1\nreplication: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line 3, column 1"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- scheduler\n")
    with pytest.raises(ConfigError, match=r"list.yaml: expected a map of settings at the top level, got list"):
        load_config(top)
    limits = tmp_path / "limits.yaml"
    limits.write_text("limits: 5\n")
    with pytest.raises(ConfigError, match=r"limits.yaml:1: limits: expected a map of limits"):
        load_config(limits)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"binary.yaml: not a text file"):
        load_yaml(binary)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert load_config(empty) == ClusterConfig() == load_config(None)


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("scheduler: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_defaults_round_trip_through_to_dict():
    c = ClusterConfig()
    assert config_from_dict(c.to_dict()) == c


# -- PSD_ environment variables and flags ------------------------------------------------
def test_names_are_one_to_one():
    assert env_var("heartbeat_interval") == "PSD_HEARTBEAT_INTERVAL"
    assert env_var("limits.max_message_bytes") == "PSD_LIMITS_MAX_MESSAGE_BYTES"
    assert flag("limits.max_message_bytes") == "--limits-max-message-bytes"
    keys = setting_keys()
    assert len({env_var(k) for k in keys}) == len({flag(k) for k in keys}) == len(keys)


@pytest.mark.parametrize("key", sorted(TEXT))
def test_env_and_flag_parse_by_the_fields_type(key):
    text, value = TEXT[key]
    from_env = resolve_config(None, {env_var(key): text})
    from_flag = resolve_config(None, {}, {key: text})
    assert get(from_env, key) == get(from_flag, key) == value
    assert type(get(from_env, key)) is type(value)


@pytest.mark.parametrize("key", sorted(BAD_TEXT))
def test_bad_env_value_names_the_variable(key):
    with pytest.raises(ConfigError) as err:
        resolve_config(None, {env_var(key): BAD_TEXT[key]})
    assert str(err.value).startswith(f"environment variable {env_var(key)}: expected "), str(err.value)
    with pytest.raises(ConfigError) as err:
        resolve_config(None, {}, {key: BAD_TEXT[key]})
    assert str(err.value).startswith(f"flag {flag(key)}: expected "), str(err.value)


def test_layers_file_then_env_then_flags(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("heartbeat_interval: 1.0\nvnodes: 8\nreplication: 2\nlimits:\n  max_keys: 100\n")
    env = {"PSD_HEARTBEAT_INTERVAL": "0.2", "PSD_VNODES": "9", "PSD_LIMITS_MAX_MESSAGE_BYTES": "5000",
           "HOME": "/root", "PSDX": "not ours"}
    c = resolve_config(path, env, {"vnodes": "10"})
    assert (c.heartbeat_interval, c.vnodes, c.replication) == (0.2, 10, 2)
    assert (c.limits.max_keys, c.limits.max_message_bytes) == (100, 5000)
    assert c.limits.max_frames == Limits().max_frames


def test_metrics_are_off_by_default_and_an_empty_value_turns_them_off(tmp_path):
    assert ClusterConfig().metrics is None
    path = tmp_path / "cluster.yaml"
    path.write_text("metrics: 127.0.0.1:9400\n")
    assert resolve_config(path).metrics == "127.0.0.1:9400"
    assert resolve_config(path, {"PSD_METRICS": ""}).metrics is None
    assert resolve_config(path, {"PSD_METRICS": "127.0.0.1:9500"}, {"metrics": "127.0.0.1:0"}).metrics == "127.0.0.1:0"


def test_security_is_on_by_default_and_keys_come_from_psd_keys(tmp_path):
    assert (ClusterConfig().security, ClusterConfig().keys) == ("curve", None)
    path = tmp_path / "cluster.yaml"
    path.write_text("keys: /etc/psd/keys\n")
    assert resolve_config(path).keys == "/etc/psd/keys"
    assert resolve_config(path, {"PSD_KEYS": "/srv/keys"}).keys == "/srv/keys"
    assert resolve_config(path, {"PSD_KEYS": "/srv/keys"}, {"keys": "/k"}).keys == "/k"
    assert resolve_config(path, {"PSD_KEYS": ""}).keys is None
    assert resolve_config(path, {"PSD_SECURITY": "none"}).security == "none"


def test_empty_env_value_turns_an_optional_folder_off(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("checkpoint_dir: /srv/c\nstate_dir: /srv/s\n")
    c = resolve_config(path, {"PSD_CHECKPOINT_DIR": "", "PSD_STATE_DIR": ""})
    assert c.checkpoint_dir is None and c.state_dir is None


def test_unknown_psd_variable_is_an_error():
    with pytest.raises(ConfigError, match=r"environment variable PSD_HEARTBEAT_INTERVALL: not a psd setting; "
                                          r"did you mean 'PSD_HEARTBEAT_INTERVAL'\?"):
        resolve_config(None, {"PSD_HEARTBEAT_INTERVALL": "1"})


def test_problems_from_every_layer_together(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("vnodes: 0\n")
    with pytest.raises(ConfigError) as err:
        resolve_config(path, {"PSD_REPLICATION": "-1", "PSD_VNODE": "3", "PSD_LIMITS_MAX_KEYS": "lots"},
                       {"heartbeat_misses": "0"})
    assert sorted(err.value.data["problems"]) == sorted([
        f"{path}:1: vnodes: expected a positive integer, got 0",
        "environment variable PSD_REPLICATION: expected a positive integer, got -1",
        "environment variable PSD_VNODE: not a psd setting; did you mean 'PSD_VNODES'?",
        "environment variable PSD_LIMITS_MAX_KEYS: expected a positive integer, got 'lots'",
        "flag --heartbeat-misses: expected a positive integer, got 0",
    ])


def test_the_cli_has_a_flag_per_setting_on_every_daemon():
    parser = build_parser()
    for command in ("scheduler", "server", "worker"):
        args = parser.parse_args([command, "--heartbeat-interval", "0.3", "--limits-max-keys", "7",
                                  "--log-format", "json", "--bind", "tcp://127.0.0.1:0"])
        assert (args.heartbeat_interval, args.limits_max_keys, args.log_format) == ("0.3", "7", "json")
    sub = next(a for a in parser._actions if a.dest == "command").choices["server"]
    flags = {o for a in sub._actions for o in a.option_strings}
    assert {flag(k) for k in setting_keys()} <= flags


def test_only_the_cli_reads_the_environment():
    """STYLE.md 9: configuration comes in once, at the command line, and is passed down."""
    readers = []
    for path in sorted((ROOT / "psd").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            name = (node.attr if isinstance(node, ast.Attribute) else
                    node.id if isinstance(node, ast.Name) else None)
            if name in ("environ", "getenv", "environb"):
                readers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    # LocalCluster also touches it, to hand its children the caller's environment minus
    # PSD_ variables (their settings come from the cluster file alone), and to export its
    # PSD_KEYS while open: not a read of config. The Python API's connect is an entry point
    # like the command line: it reads PSD_KEYS, once (docs/operations.md, "Security"). The
    # emulated cluster of the tests passes its caller's PYTHONPATH to the hosts: not config.
    # The fork server sets a forked daemon's environment before that daemon's main reads it.
    allowed = ("psd/cli/main.py:", "psd/local.py:", "psd/client/aio.py:", "psd/testing/netcluster.py:",
               "psd/forkserver.py:")
    assert readers and all(r.startswith(allowed) for r in readers), readers
    assert sum(r.startswith("psd/local.py:") for r in readers) == 2, readers
    assert sum(r.startswith("psd/client/aio.py:") for r in readers) == 1, readers
    assert sum(r.startswith("psd/forkserver.py:") for r in readers) == 2, readers  # clear, update


@pytest.mark.parametrize("name", ["cluster.yaml", "local.yaml"])
def test_example_configs_are_valid(name):
    config = resolve_config(ROOT / "configs" / name)
    assert config.scheduler.startswith("tcp://")


def test_cluster_limits_max_tables_and_max_memory_bytes(tmp_path):
    """The cluster's limits beside the codec's: max_tables (default 1024, enforced by the
    scheduler) and max_memory_bytes (default none; null or an empty override turns it off)."""
    c = ClusterConfig()
    assert (c.limits.max_tables, c.limits.max_memory_bytes) == (1024, None)
    assert isinstance(c.limits, Limits)  # the codec reads the same object
    assert config_from_dict({"limits": {"max_memory_bytes": None}}).limits.max_memory_bytes is None
    assert config_from_dict({"limits": {"max_memory_bytes": 1 << 34}}).limits.max_memory_bytes == 1 << 34
    path = tmp_path / "cluster.yaml"
    path.write_text("limits:\n  max_tables: 0\n  max_memory_bytes: -5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.data["problems"] == [
        f"{path}:2: limits.max_tables: expected a positive integer, got 0",
        f"{path}:3: limits.max_memory_bytes: expected a positive integer (bytes), or null for no limit, got -5",
    ]
    path.write_text("limits:\n  max_memory_bytes: 4096\n")
    assert resolve_config(path, {"PSD_LIMITS_MAX_MEMORY_BYTES": ""}).limits.max_memory_bytes is None
    assert resolve_config(path, {}, {"limits.max_memory_bytes": "null"}).limits.max_memory_bytes is None
    assert resolve_config(path, {"PSD_LIMITS_MAX_TABLES": "7"}).limits.max_tables == 7
    with pytest.raises(ConfigError, match=r"flag --limits-max-memory-bytes: expected a positive integer \(bytes\)"):
        resolve_config(path, {}, {"limits.max_memory_bytes": "0"})


def test_a_standby_cannot_be_the_scheduler_itself():
    with pytest.raises(ConfigError, match="standby: expected addresses other than the scheduler's"):
        config_from_dict({"scheduler": "tcp://10.0.0.1:9300", "standby": ["tcp://10.0.0.1:9300"]}, "c.yaml")
    config = config_from_dict({"scheduler": "tcp://10.0.0.1:9300", "standby": ["tcp://10.0.0.9:9300"]}, "c.yaml")
    assert config.standby == ("tcp://10.0.0.9:9300",)
