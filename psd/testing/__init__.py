"""Test harnesses that need more than loopback: an emulated multi-host cluster on one
Linux machine (network namespaces, a bridge, tc), psd deployed on it as an operator
would, and a client that logs what the cluster acknowledged. Root only; see
docs/operations.md, "Several machines, step by step", and ``scripts/netcluster.py``."""
from psd.testing.netcluster import NetCluster, Pusher, teardown
from psd.testing.netns import NetError, unsupported
from psd.testing.pushlog import PushLog, expected, read_log

__all__ = ["NetCluster", "NetError", "PushLog", "Pusher", "expected", "read_log", "teardown", "unsupported"]
