"""The filters, each a small class over numpy arrays with its per-key state.

``apply(keys, values)`` takes the rows a push would send (``values`` float64, one row
per key) and returns the rows to send instead, with the header fields a receiver needs.
A filter that holds back part of what it was given keeps it as a residual, sent later
(``residual()``: a flush). ``observe(keys, rows)``: rows a pull returned.

Error bounds (docs/jobs.md, "Filters", tested in tests/test_filters.py):

* ``significant``, absolute: for every key, what the server holds differs from what it
  would hold unfiltered by the key's residual, at most ``threshold`` in every column
  (plus float rounding); after a flush, by nothing but rounding. Relative: at most
  ``threshold * |w|``, ``w`` the key's last pulled row.
* ``quantize``: one message's entry is off by at most ``scale / 2`` (int8: ``scale =
  max |v| / 127`` of its column) or ``|v| * 2**-11 + scale * 2**-25`` (float16:
  ``scale = max |v|`` of the column); with feedback the error is carried into the next
  push, so the sum over pushes is off by at most one message's error.
* ``random_skip``: unbiased, ``E[sent] = v``; the variance grows by ``p / (1 - p) v^2``.
* ``keep_keys`` (significant, random_skip): rows held back go as zeros instead of being
  left out, so a cached key list stays valid; only for updaters where adding zero
  changes nothing (sum, sgd).
* ``kkt``: skips only rows of keys whose last pulled weight is exactly zero and whose
  gradient, global estimate, is within ``l1 - delta`` of zero: a proximal step there
  keeps the weight at zero.
"""
from __future__ import annotations

import numpy as np

from psd.filters.keystate import KeyState

F64 = np.dtype(np.float64)


class Significant:
    """Send a key's row only once its accumulated change passes the threshold."""

    name = "significant"
    drops_rows = True

    def __init__(self, opts: dict, width: int, send_dtype: np.dtype):
        self.threshold = float(opts["threshold"])
        self.relative = bool(opts["relative"])
        self.keep_keys = bool(opts["keep_keys"])
        self.dtype = send_dtype
        self.state = KeyState({"r": (F64, width), "w": (F64, width)})

    def apply(self, keys, values):
        pos = self.state.positions(keys)
        r = self.state.cols["r"]
        acc = r[pos] + values
        limit = self.threshold * np.abs(self.state.cols["w"][pos]) if self.relative else self.threshold
        send = (np.abs(acc) > limit).any(axis=1)
        out = acc[send].astype(self.dtype).astype(F64)  # what the receiver will hold
        left = acc.copy()
        left[send] -= out
        r[pos] = left
        if self.keep_keys:  # zeros for the rest: the same key list (key caching), zeros squeeze
            full = np.zeros_like(acc)
            full[send] = out
            return keys, full, {}
        return keys[send], out, {}

    def observe(self, keys, rows):
        if self.relative and keys.size:
            pos = self.state.positions(keys)  # (first: adding keys replaces the columns)
            self.state.cols["w"][pos] = rows

    def residual(self):
        r = self.state.cols["r"]
        some = (r != 0).any(axis=1)
        keys, vals = self.state.keys[some], r[some].copy()
        r[some] = 0.0
        return keys, vals


class Quantize:
    """float16 or int8 values with one scale per column per message; error feedback."""

    name = "quantize"
    drops_rows = False
    MAX_SCALES = 256  # wider tables share one scale (the header stays small)

    def __init__(self, opts: dict, width: int, send_dtype: np.dtype):
        self.to = opts["to"]
        self.feedback = bool(opts["feedback"])
        self.width = width
        self.dtype = send_dtype
        self.state = KeyState({"e": (F64, width)}) if self.feedback else None

    def apply(self, keys, values):
        pos = None
        if self.feedback:
            pos = self.state.positions(keys)
            values = values + self.state.cols["e"][pos]
        q, scale = quantize(values, self.to, self.width <= self.MAX_SCALES)
        if self.feedback:
            self.state.cols["e"][pos] = values - dequantize(q, scale, self.dtype)
        return keys, q, {"q": [self.to, [float(s) for s in scale]]}

    def observe(self, keys, rows):
        pass

    def residual(self):
        if not self.feedback:
            return np.empty(0, np.uint64), np.zeros((0, self.width))
        e = self.state.cols["e"]
        some = (e != 0).any(axis=1)
        keys, vals = self.state.keys[some], e[some].copy()
        e[some] = 0.0
        return keys, vals


def quantize(values: np.ndarray, to: str, per_column: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``values`` (n, width) as int8 or float16 and the scale(s) to multiply them by."""
    top = np.abs(values).max(axis=0) if values.shape[0] else np.zeros(values.shape[1])
    if not per_column:
        top = np.full(1, top.max() if top.size else 0.0)
    if to == "int8":
        scale = top / 127.0
        safe = np.where(scale > 0, scale, 1.0)
        q = np.rint(values / safe).clip(-127, 127).astype(np.int8)
    else:
        scale = top.copy()
        safe = np.where(scale > 0, scale, 1.0)
        q = (values / safe).astype(np.float16)
    return q, scale


def dequantize(q: np.ndarray, scale, dtype: np.dtype) -> np.ndarray:
    """What a receiver makes of ``q``: float64 products, cast to the table's dtype (and
    back to float64 here, so a sender's residual is exact)."""
    return (q.astype(F64) * np.asarray(scale, F64)).astype(dtype).astype(F64)


class RandomSkip:
    """Drop each row with probability p; scale the rest by 1 / (1 - p): unbiased."""

    name = "random_skip"
    drops_rows = True

    def __init__(self, opts: dict, width: int, send_dtype: np.dtype):
        self.p = float(opts["p"])
        self.rng = np.random.default_rng(int(opts["seed"]))
        self.width = width
        self.keep_keys = bool(opts["keep_keys"])

    def apply(self, keys, values):
        keep = self.rng.random(keys.size) >= self.p
        if self.keep_keys:
            return keys, np.where(keep[:, None], values / (1.0 - self.p), 0.0), {}
        return keys[keep], values[keep] / (1.0 - self.p), {}

    def observe(self, keys, rows):
        pass

    def residual(self):
        return np.empty(0, np.uint64), np.zeros((0, self.width))


class KKT:
    """For L1 problems: skip gradient rows that cannot move a zero weight.

    A key is skipped when its last pulled weight (column 0) is exactly zero and the
    global gradient's estimate is at most ``l1 - delta`` in size: then a proximal step,
    ``soft_threshold(-g, l1)``, leaves the weight at zero. The estimate is

    * ``pulled``: the aggregated gradient the server stored with the key's last step
      (column 1 of a ``prox_l1`` ``aggregate`` row, whose column 2, the curvature, is
      non-zero once a step happened). Every worker reads the same row, so all skip a key
      together, as the aggregate updater, which waits for every part, needs. A skipped
      key's row is not renewed, so a key is skipped at most ``recheck * (1 - |g| /
      (l1 - delta))`` times in a row (rounded down) and then sent: often near the
      margin, rarely far below it;
    * ``pushed``: this push's own column ``column`` times ``scale`` (a worker's part of
      a sum, scaled to the whole): for updaters where every push is a step.
    """

    name = "kkt"
    drops_rows = True

    def __init__(self, opts: dict, width: int, send_dtype: np.dtype):
        self.l1, self.delta = float(opts["l1"]), float(opts["delta"])
        self.pulled = opts["gradient"] == "pulled"
        self.column, self.scale, self.recheck = int(opts["column"]), float(opts["scale"]), int(opts["recheck"])
        self.width = width
        # zero: the last pulled weight was 0; g: the gradient to judge by; n: skips in a row
        self.state = KeyState({"zero": (np.dtype(bool), 1), "g": (F64, 1), "n": (np.dtype(np.int64), 1),
                               "skipped": (np.dtype(bool), 1)})
        self.skipped_rows = 0

    def apply(self, keys, values):
        s = self.state
        pos = s.positions(keys)
        g = s.cols["g"][pos, 0] if self.pulled else values[:, self.column] * self.scale
        margin = self.l1 - self.delta
        skip = s.cols["zero"][pos, 0] & (np.abs(g) <= margin)
        if self.pulled:  # (a pushed gradient is fresh every time: nothing to renew)
            # skips in a row allowed: ``recheck`` for a gradient of 0, fewer as |g| nears
            # the margin, where the next steps of other keys could carry it over
            streak = s.cols["n"][pos, 0]
            allowed = np.floor(self.recheck * (1.0 - np.abs(g) / margin)) if margin > 0 else 0
            skip &= streak < allowed
            s.cols["n"][pos, 0] = np.where(skip, streak + 1, 0)
        s.cols["skipped"][pos, 0] = skip
        self.skipped_rows += int(skip.sum())
        keep = ~skip
        return keys[keep], values[keep], {}

    def observe(self, keys, rows):
        if not keys.size:
            return
        pos = self.state.positions(keys)
        if self.pulled:
            stepped = rows[:, 2] != 0 if rows.shape[1] > 2 else np.ones(keys.size, bool)
            self.state.cols["zero"][pos, 0] = (rows[:, 0] == 0) & stepped
            self.state.cols["g"][pos, 0] = rows[:, 1]
        else:
            self.state.cols["zero"][pos, 0] = rows[:, 0] == 0

    def unchanged(self, keys: np.ndarray) -> np.ndarray:
        """Which of ``keys`` every worker skipped at their last push (pulled mode), so the
        server took no step on them and their rows are as last pulled."""
        if not self.pulled:
            return np.zeros(keys.size, bool)
        pos, held = self.state.find(keys)
        out = np.zeros(keys.size, bool)
        out[held] = self.state.cols["skipped"][pos[held], 0]
        return out

    def residual(self):
        return np.empty(0, np.uint64), np.zeros((0, self.width))


CLASSES = {c.name: c for c in (Significant, Quantize, RandomSkip, KKT)}
