"""Per-server numpy storage of key ranges and the server-side update functions.

Names are resolved on first use (PEP 562): ``psd.schema`` validates updater options
with ``psd.store.updaters`` while ``psd.store.table`` imports the schema, and importing
the package must not pull in both at once; and only a server needs the compiled store
(``warm`` compiles it, or loads it from numba's disk cache), not a client."""
from __future__ import annotations

__all__ = ["Table", "TableSpec", "UPDATERS", "Updater", "make_updater", "register_updater", "warm"]


def __getattr__(name: str):
    if name == "Table":
        from psd.store.table import Table
        return Table
    if name == "TableSpec":
        from psd.schema import TableSpec
        return TableSpec
    if name == "warm":
        from psd.store.kernels import warm
        return warm
    if name in ("UPDATERS", "Updater", "make_updater", "register_updater"):
        from psd.store import updaters
        return getattr(updaters, name)
    raise AttributeError(f"module 'psd.store' has no attribute {name!r}")
