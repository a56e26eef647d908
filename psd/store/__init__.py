"""Per-server numpy storage of key ranges and the server-side update functions."""
from psd.store.table import Table, TableSpec
from psd.store.updaters import UPDATERS, Updater, make_updater, register_updater

__all__ = ["Table", "TableSpec", "UPDATERS", "Updater", "make_updater", "register_updater"]
