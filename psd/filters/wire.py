"""The receiving side of filters: which names a receiver knows, and undoing quantization.

A push that went through filters says so in ``meta.flt`` (the names, in order); a
quantized one also carries ``meta.q = [to, scales, dtype]``: int8 or float16 values,
one scale per column (or one for all), and the table's dtype to restore. A name this
receiver does not know, or fields that do not fit the frames, raise UnknownFilterError
before anything is applied. Pure numpy; docs/protocol.md, "Filters".
"""
from __future__ import annotations

import math

import numpy as np

from psd.errors import UnknownFilterError
from psd.filters.spec import FILTERS

#: the filter names a receiver accepts in ``meta.flt`` (zstd travels as a frame codec)
KNOWN = frozenset(n for n in FILTERS if n != "zstd")
_QUANTIZED = {"int8": np.dtype(np.int8), "float16": np.dtype(np.float16)}
_RESTORED = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}


def decode_values(meta: dict, values: np.ndarray) -> np.ndarray:
    """The values a push meant, from the frame that carried them and its ``meta``."""
    flt = meta.get("flt")
    if not isinstance(flt, list) or not 1 <= len(flt) <= 8 or not all(isinstance(n, str) for n in flt):
        raise UnknownFilterError("meta.flt must be a list of 1 to 8 filter names")
    unknown = [n for n in flt if n not in KNOWN]
    if unknown:
        raise UnknownFilterError(f"filter {unknown[0][:40]!r} named in meta.flt is not known here; expected "
                                 f"names among {', '.join(sorted(KNOWN))}; nothing was applied",
                                 filter=unknown[0][:40])
    q = meta.get("q")
    if "quantize" not in flt:
        if q is not None:
            raise UnknownFilterError("meta.q without quantize in meta.flt")
        return values
    if (not isinstance(q, list) or len(q) != 3 or q[0] not in _QUANTIZED or q[2] not in _RESTORED
            or not isinstance(q[1], list)):
        raise UnknownFilterError("meta.q must be [int8 | float16, [scale, ...], float32 | float64]")
    to, scales, restore = q
    width = values.shape[1] if values.ndim == 2 else 1
    if values.dtype != _QUANTIZED[to]:
        raise UnknownFilterError(f"meta.q says {to} values, the frame holds {values.dtype.name}")
    if len(scales) not in (1, width) or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s >= 0 for s in scales):
        raise UnknownFilterError(f"meta.q scales must be 1 or {width} finite numbers >= 0")
    vals = values.reshape(-1, width).astype(np.float64) * np.asarray(scales, np.float64)
    with np.errstate(over="ignore"):
        return vals.astype(_RESTORED[restore])
