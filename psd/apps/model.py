"""The models the apps write: ``model.npz`` beside a small ``model.json`` header.

A run's model is two files in one folder (the job's ``model.save``, ``sketch.save``
for count-min: by default the run folder, see :func:`save_folder`; what
``psd.apps.<app>.fit`` returns is read from them):

- ``model.npz``: the arrays, as ``numpy.savez`` writes them (no pickled objects:
  strings are fixed-width unicode arrays), loadable with ``numpy.load`` alone.
- ``model.json``: ``{"format": "psd-model", "version": 1, "app": ..., "arrays":
  {name: {"dtype": ..., "shape": [...]}}, ...}`` plus what the app adds: how items
  become keys (the hash scheme), the options the model was trained with, final figures.

The header is written last, under a temporary name and renamed, so a folder with a
``model.json`` holds a complete model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from psd.errors import ConfigError

FORMAT, VERSION = "psd-model", 1
ARRAYS, HEADER = "model.npz", "model.json"


def _plain(v):
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


#: the check of a ``model.save`` / ``sketch.save`` option
SAVE_CHECK = (lambda v: v is None or isinstance(v, bool) or (isinstance(v, str) and bool(v)),
              "a folder path, true (the run folder) or false (no model)")


def save_folder(value, spec: dict) -> str | None:
    """Where a run writes its model: ``value`` (the job's ``model.save``) when it names a
    folder; the run folder when it is true or unset; nowhere when false. The run folder
    is the job's ``output``, which ``psd run`` sets to the folder it writes the run's
    outputs to (``--output`` or the file's ``output``, made absolute) before it submits
    the job, so the model lands beside ``summary.json``. ``psd submit`` passes the job
    file's ``output`` on as written: a folder on the workers' machines."""
    if isinstance(value, str):
        return value
    if value is False:
        return None
    out = spec.get("output")
    return out if isinstance(out, str) and out else None


def write_model(folder: str | Path, app: str, arrays: dict[str, np.ndarray], header: dict) -> Path:
    """Write ``arrays`` and the header into ``folder``; returns the header's path."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{ARRAYS}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path / ARRAYS)
    head = {"format": FORMAT, "version": VERSION, "app": app,
            "arrays": {k: {"dtype": str(np.asarray(v).dtype), "shape": list(np.shape(v))} for k, v in arrays.items()},
            **_plain(header)}
    tmp = path / f".{HEADER}.tmp"
    tmp.write_text(json.dumps(head, indent=2, sort_keys=True))
    os.replace(tmp, path / HEADER)
    return path / HEADER


def read_model(folder: str | Path, app: str) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and header of the ``app`` model in ``folder``; a missing or foreign
    model raises ``ConfigError`` naming the folder."""
    path = Path(folder)
    try:
        head = json.loads((path / HEADER).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: no readable {HEADER} ({exc}); expected a folder an app wrote its "
                          f"model into (the job's model.save)") from None
    if head.get("format") != FORMAT or head.get("app") != app:
        raise ConfigError(f"{path / HEADER}: a {head.get('app')!r} model (format {head.get('format')!r}), "
                          f"expected an {app!r} model of format {FORMAT!r}")
    if head.get("version", 0) > VERSION:
        raise ConfigError(f"{path / HEADER}: model version {head['version']} is newer than this psd reads "
                          f"({VERSION}); upgrade psd")
    with np.load(path / ARRAYS, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, head
