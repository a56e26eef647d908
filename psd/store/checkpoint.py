"""Checkpoint files: one per server per checkpoint, zstd-compressed, written atomically.

Layout of a checkpoint folder::

    DIR/ckpt-000007/S0.psd      one file per server: the ranges it led at the cut
    DIR/ckpt-000007/MANIFEST.json   written last by the scheduler: tables, ring, files
    DIR/LATEST                  name of the newest complete checkpoint

A file is a zstd frame holding a msgpack map: format version, node, ring version,
clock cut, and per table its spec and the raw bytes of keys, values and updater
state. Nothing is pickled; a file from another psd version is refused by name.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import msgpack
import numpy as np
import zstandard

from psd.errors import ConfigError

FORMAT = 1


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_server_file(path: Path, node: str, ring_version: int, cut: int | None, tables: dict) -> int:
    """``tables``: name -> (spec wire dict, keys, vals, {state field: array}); returns bytes written."""
    body = {"format": FORMAT, "node": node, "ring": ring_version, "cut": cut, "tables": {}}
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
    return out


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
