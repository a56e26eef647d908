"""psd: a parameter server for distributed machine learning.

    import psd
    with psd.LocalCluster(servers=2) as cluster:
        kv = psd.connect(cluster.scheduler)
        w = kv.table("w", width=1, dtype="float32", updater="sum")
        kv.wait(w.push(keys, values))
        values = w.pull(keys)
"""
from psd import aio
from psd.client.sync import KVWorker, Table, connect
from psd.config import ClusterConfig, load_config
from psd.errors import (AuthError, BadRequestError, BusyError, ConfigError, ForbiddenError, KeysError, LimitError,
                        MessageTooLargeError, NotOwnerError, NotReplicatedError, OutOfOrderError, ProtocolError, PsdError, PsdTimeoutError, RemoteError,
                        StartupError, TableMismatchError, UnavailableError, UnknownTableError, UnknownUpdaterError,
                        ValuesError)
from psd.local import LocalCluster

__version__ = "0.1.0"

__all__ = [
    "aio", "connect", "KVWorker", "Table", "LocalCluster", "ClusterConfig", "load_config",
    "PsdError", "ConfigError", "StartupError", "ProtocolError", "MessageTooLargeError", "AuthError",
    "ForbiddenError", "BadRequestError", "KeysError", "ValuesError", "UnknownTableError", "UnknownUpdaterError",
    "TableMismatchError", "NotOwnerError", "NotReplicatedError", "PsdTimeoutError", "RemoteError", "LimitError", "OutOfOrderError", "UnavailableError", "BusyError",
]
