"""Checkpoint files: one per server per checkpoint, zstd-compressed, written atomically.

Layout of a checkpoint folder::

    DIR/ckpt-000007/S0.psd      one file per server: the ranges it led at the cut
    DIR/ckpt-000007/MANIFEST.json   written last by the scheduler: tables, ring, files
    DIR/LATEST                  name of the newest complete checkpoint

A file is a zstd frame holding a msgpack map: format version, node, ring version,
clock cut, per table its spec and the raw bytes of keys, values and updater state, and
``ids``: the request ids of exactly the pushes the file holds, each for the key ranges
its rows count in (a restore installs them, so a push resent after it is applied once).
A file without ``ids`` (written before they were recorded) still loads. Nothing is
pickled; a file from another psd version is refused by name.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import zstandard

from psd.errors import ConfigError

FORMAT = 1


@dataclass(frozen=True)
class AppliedIds:
    """Request ids whose pushes a checkpoint file holds for the rows in ``ranges``
    ((begin, end) pairs): ``senders`` with ``counts`` ids each, then all ``rids`` (the
    frame form of ``psd.core.seen.Seen.to_arrays``)."""
    ranges: tuple[tuple[int, int], ...]
    senders: list[str]
    counts: np.ndarray
    rids: np.ndarray


@dataclass(frozen=True)
class ServerFile:
    """One server's file: name -> (spec, keys, vals, state), and the ids of the pushes
    it holds (None: a file written before ids were recorded)."""
    tables: dict
    ids: list[AppliedIds] | None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_server_file(path: Path, node: str, ring_version: int, cut: int | None, tables: dict,
                      ids: list[AppliedIds] = ()) -> int:
    """``tables``: name -> (spec wire dict, keys, vals, {state field: array}); ``ids``:
    of the pushes those rows hold. Returns bytes written."""
    body = {"format": FORMAT, "node": node, "ring": ring_version, "cut": cut, "tables": {},
            # (ranges' ends as last keys: msgpack cannot carry 2**64)
            "ids": [{"ranges": [[b, e - 1] for b, e in g.ranges], "senders": list(g.senders),
                     "counts": np.ascontiguousarray(g.counts, dtype="<u8").tobytes(),
                     "rids": np.ascontiguousarray(g.rids, dtype="<u8").tobytes()} for g in ids]}
    for name, (spec, keys, vals, state) in tables.items():
        body["tables"][name] = {
            "spec": spec, "n": int(keys.size), "dtype": vals.dtype.str, "width": int(vals.shape[1]),
            "keys": np.ascontiguousarray(keys, dtype="<u8").tobytes(),
            "vals": np.ascontiguousarray(vals).tobytes(),
            "state": {f: np.ascontiguousarray(a).tobytes() for f, a in state.items()},
        }
    data = zstandard.ZstdCompressor(level=3).compress(msgpack.packb(body, use_bin_type=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, data)
    return len(data)


def read_server_file(path: Path) -> dict:
    """name -> (spec, keys, vals, state) of one server file."""
    return load_server_file(path).tables


def load_server_file(path: Path) -> ServerFile:
    """One server file, its tables and the ids of the pushes they hold."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(Path(path).read_bytes())
        body = msgpack.unpackb(raw, raw=False)
    except (OSError, zstandard.ZstdError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable psd checkpoint file ({e})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ConfigError(f"{path}: checkpoint format {body.get('format') if isinstance(body, dict) else '?'} "
                          f"is not {FORMAT}")
    out = {}
    for name, t in body["tables"].items():
        dtype = np.dtype(t["dtype"])
        keys = np.frombuffer(t["keys"], dtype="<u8")
        vals = np.frombuffer(t["vals"], dtype=dtype).reshape(t["n"], t["width"])
        state = {f: np.frombuffer(b, dtype=dtype).reshape(t["n"], t["width"]) for f, b in t["state"].items()}
        out[name] = (t["spec"], keys, vals, state)
    return ServerFile(out, _ids_of(path, body["ids"]) if "ids" in body else None)


_GROUP_KEYS = {"ranges", "senders", "counts", "rids"}


def _ids_of(path: Path, groups) -> list[AppliedIds]:
    """The file's ids, checked whole here: a restore installs rows and then ids, so a
    malformed entry found while installing them would leave it half done."""
    if not isinstance(groups, list):
        raise ConfigError(f"{path}: ids must be a list of groups")
    return [_group_of(path, i, g) for i, g in enumerate(groups)]


def _group_of(path: Path, i: int, g) -> AppliedIds:
    def bad(what: str) -> ConfigError:
        return ConfigError(f"{path}: ids group {i}: {what}")
    if not isinstance(g, dict) or set(g) != _GROUP_KEYS:
        raise bad(f"must be a map of {sorted(_GROUP_KEYS)}")
    ranges, senders, counts, rids = g["ranges"], g["senders"], g["counts"], g["rids"]
    if not isinstance(ranges, list) or not all(_is_range(r) for r in ranges):
        raise bad("ranges must be [begin, last] pairs, 0 <= begin <= last < 2**64")
    if not isinstance(senders, list) or not all(isinstance(s, str) for s in senders):
        raise bad("senders must be a list of strings")
    if not isinstance(counts, bytes) or not isinstance(rids, bytes) or len(counts) % 8 or len(rids) % 8:
        raise bad("counts and rids must be bytes of uint64s")
    counts_a, rids_a = np.frombuffer(counts, dtype="<u8"), np.frombuffer(rids, dtype="<u8")
    if counts_a.size != len(senders) or (counts_a.size and int(counts_a.max()) > rids_a.size) \
            or int(counts_a.sum(dtype=np.uint64)) != rids_a.size:
        raise bad(f"{len(senders)} senders, {counts_a.size} counts and {rids_a.size} ids disagree")
    return AppliedIds(tuple((b, last + 1) for b, last in ranges), senders, counts_a, rids_a)


def _is_range(r) -> bool:
    return (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in r)
            and 0 <= r[0] <= r[1] < 1 << 64)


def checkpoint_dir(root: Path, ckpt_id: int) -> Path:
    return Path(root) / f"ckpt-{ckpt_id:06d}"


def write_manifest(root: Path, ckpt_id: int, manifest: dict) -> None:
    folder = checkpoint_dir(root, ckpt_id)
    _atomic_write(folder / "MANIFEST.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
    _atomic_write(Path(root) / "LATEST", folder.name.encode())


def latest(root: Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint under ``root`` and its manifest, if any."""
    pointer = Path(root) / "LATEST"
    if not pointer.exists():
        return None
    folder = Path(root) / pointer.read_text().strip()
    try:
        return folder, json.loads((folder / "MANIFEST.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{folder}: checkpoint manifest unreadable ({e}); remove {pointer} to start empty") from None
