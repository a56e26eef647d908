"""Server-side update functions, chosen by name.

An updater folds a pushed array into the stored values of the pushed keys. Keys in
one push are unique, so ``vals[sel] op= grad`` is exact for both slices and index
arrays. ``apply`` is the rule in numpy; ``fused`` names the compiled loop that applies
the same rule one key at a time inside the store (psd.store.kernels), which is what a
table runs. Updaters that need per-key state (AdaGrad's accumulator, FTRL's z and n)
declare ``state_fields``; the table keeps those arrays aligned with the values.

Updaters that take options check them all when the table is created (on the client,
the scheduler and every server alike), so a bad option is a ``BadRequestError`` that
names the option before anything is stored.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from psd.errors import BadRequestError, UnknownUpdaterError


class Updater:
    name: str = ""
    #: extra per-key arrays, same shape as the values, zero-initialised
    state_fields: tuple[str, ...] = ()
    #: whether integer tables may use this updater
    integer_ok: bool = True

    def __init__(self, options: dict):
        self.options = dict(options)

    def check_width(self, width: int) -> None:
        """Raise ``BadRequestError`` if the updater cannot serve a table of this width."""

    def apply(self, vals: np.ndarray, state: dict[str, np.ndarray], sel, grad: np.ndarray) -> None:
        raise NotImplementedError

    def fused(self) -> tuple[str, tuple, tuple] | None:
        """The compiled loop that does what ``apply`` does, one key at a time: (kind in
        psd.store.kernels, parameters in the table's dtype, parameters as float64). None:
        the table calls ``apply`` (an updater registered from outside psd)."""
        return None


UPDATERS: dict[str, type[Updater]] = {}


def register_updater(name: str) -> Callable[[type[Updater]], type[Updater]]:
    def deco(cls: type[Updater]) -> type[Updater]:
        cls.name = name
        UPDATERS[name] = cls
        return cls
    return deco


def make_updater(name: str, dtype: np.dtype, options: dict | None = None,
                 width: int | None = None) -> Updater:
    cls = UPDATERS.get(name) if isinstance(name, str) else None  # a list from the wire is no name
    if cls is None:
        raise UnknownUpdaterError(f"unknown updater {name!r}; known: {', '.join(sorted(UPDATERS))}")
    if not cls.integer_ok and np.dtype(dtype).kind != "f":
        raise BadRequestError(f"updater {name!r} needs a float table, not {np.dtype(dtype).name}")
    allow = (options or {}).get("allow_nonfinite", False)
    if not isinstance(allow, (bool, np.bool_)):
        raise BadRequestError(f"table option 'allow_nonfinite' must be true or false, got {allow!r}")
    updater = cls(options or {})
    if width is not None:
        updater.check_width(width)
    return updater


def _positive_float(options: dict, key: str, default: float) -> float:
    value = options.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise BadRequestError(f"table option {key!r} must be a positive number, got {value!r}")
    return float(value)


@register_updater("sum")
class Sum(Updater):
    """Aggregate: the stored value is the sum of everything pushed."""

    def apply(self, vals, state, sel, grad):
        vals[sel] += grad

    def fused(self):
        return "sum", (), ()


@register_updater("assign")
class Assign(Updater):
    """Overwrite: the stored value is the last pushed value."""

    def apply(self, vals, state, sel, grad):
        vals[sel] = grad

    def fused(self):
        return "assign", (), ()


@register_updater("sgd")
class SGD(Updater):
    """Plain gradient step ``w -= lr * g``; ``lr`` comes from the table options."""

    integer_ok = False

    def __init__(self, options):
        super().__init__(options)
        self.lr = _positive_float(options, "lr", 0.1)

    def apply(self, vals, state, sel, grad):
        vals[sel] -= (self.lr * grad).astype(vals.dtype, copy=False)

    def fused(self):
        return "sgd", (self.lr,), ()


# -- regularised updaters (sparse logistic regression and friends) ---------------------
#: table options that configure the table itself, not its updater
TABLE_OPTIONS = frozenset({"consistency", "max_delay", "num_workers", "allow_nonfinite", "admit_after",
                           "admit_sketch", "max_rows", "ttl_pushes", "ttl_seconds"})


def _number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)


_POSITIVE = (lambda v: _number(v) and v > 0, "a positive number")
_NON_NEGATIVE = (lambda v: _number(v) and v >= 0, "a number >= 0")
_BOOL = (lambda v: isinstance(v, (bool, np.bool_)), "true or false")


def _checked_options(name: str, options: dict, spec: dict[str, tuple]) -> dict:
    """``options`` checked against ``spec`` (option -> (default, (accepts, expected))),
    defaults filled in. Unknown options are refused too: a misspelt ``l1`` would
    otherwise silently train without regularisation."""
    out = {}
    for key, value in options.items():
        if key in TABLE_OPTIONS:
            continue
        if key not in spec:
            raise BadRequestError(f"updater {name!r}: unknown table option {key!r}; "
                                  f"expected one of {', '.join(spec)}")
    for key, (default, (accepts, expected)) in spec.items():
        value = options.get(key, default)
        if not accepts(value):
            raise BadRequestError(f"updater {name!r}: table option {key!r} must be {expected}, got {value!r}")
        out[key] = value if isinstance(value, (bool, np.bool_)) else float(value)
    return out


def soft_threshold(x: np.ndarray, t) -> np.ndarray:
    """``sign(x) * max(|x| - t, 0)``: the proximal operator of ``t * |x|``."""
    return np.sign(x) * np.maximum(np.abs(x) - t, 0.0)


@register_updater("prox_l1")
class ProxL1(Updater):
    """A proximal gradient step for ``loss + l1 * |w|_1 + l2 / 2 * |w|^2``.

    Plain (the default): every pushed value is a gradient ``g`` and the server steps

        w <- soft_threshold(w - lr * g, lr * l1) / (1 + lr * l2)

    ``aggregate: true`` is the server half of delayed block proximal gradient (Li et
    al., OSDI 2014, section 5.1) for a table of width 3. A pushed row is ``(g, h,
    parts)``: one worker's part of the gradient and of the diagonal curvature, and how
    many pushes make up this key's step. The server sums the parts (state ``acc``)
    and, when the last one arrives, takes one step with per-key step size
    ``lr / (h + eps)`` on the sums:

        a = (h + eps) / lr
        w <- soft_threshold(a * w - g, l1) / (a + l2)

    which is the minimiser of ``g (u - w) + a/2 (u - w)^2 + l1 |u| + l2/2 u^2``; with
    ``h = 1`` it is the plain step. The stored row is ``(w, g, h)`` of the key's last
    step, so a worker that pulls the weight also sees the aggregated gradient and
    curvature that produced it.
    """

    integer_ok = False
    OPTIONS = {"lr": (0.1, _POSITIVE), "l1": (0.0, _NON_NEGATIVE), "l2": (0.0, _NON_NEGATIVE),
               "aggregate": (False, _BOOL), "eps": (1e-6, _POSITIVE)}

    def __init__(self, options):
        super().__init__(options)
        o = _checked_options("prox_l1", options, self.OPTIONS)
        self.lr, self.l1, self.l2, self.eps = o["lr"], o["l1"], o["l2"], o["eps"]
        self.aggregate = bool(o["aggregate"])
        self.state_fields = ("acc",) if self.aggregate else ()

    def check_width(self, width):
        if self.aggregate and width != 3:
            raise BadRequestError(f"updater 'prox_l1' with aggregate: true needs a table of width 3 "
                                  f"(gradient, curvature, parts), not width {width}")

    def fused(self):
        if self.aggregate:
            return "prox_agg", (), (self.lr, self.l1, self.l2, self.eps)
        return "prox", (self.lr,), (self.lr, self.l1, self.l2)

    def apply(self, vals, state, sel, grad):
        if not self.aggregate:
            u = vals[sel].astype(np.float64) - self.lr * grad
            vals[sel] = soft_threshold(u, self.lr * self.l1) / (1.0 + self.lr * self.l2)
            return
        acc = state["acc"][sel].astype(np.float64)
        acc[:, :2] += grad[:, :2]
        acc[:, 2] += 1.0
        parts = grad[:, 2].astype(np.float64)
        parts = np.where(np.isfinite(parts) & (parts >= 1.0), np.rint(parts), 1.0)
        ready = acc[:, 2] >= parts
        if ready.any():
            rows = vals[sel]
            g, h = acc[ready, 0], acc[ready, 1]
            a = (np.maximum(h, 0.0) + self.eps) / self.lr
            w = rows[ready, 0].astype(np.float64)
            rows[ready, 0] = soft_threshold(a * w - g, self.l1) / (a + self.l2)
            rows[ready, 1] = g
            rows[ready, 2] = h
            vals[sel] = rows
            acc[ready] = 0.0
        state["acc"][sel] = acc


@register_updater("adagrad")
class AdaGrad(Updater):
    """AdaGrad (Duchi et al., 2011), diagonal, with an optional L1 proximal step.

    State ``g2`` accumulates squared gradients; per push, per entry:

        g2 += g^2;  s = lr / (sqrt(g2) + eps);  w <- soft_threshold(w - s * g, s * l1)
    """

    integer_ok = False
    state_fields = ("g2",)
    OPTIONS = {"lr": (0.1, _POSITIVE), "eps": (1e-8, _POSITIVE), "l1": (0.0, _NON_NEGATIVE)}

    def __init__(self, options):
        super().__init__(options)
        o = _checked_options("adagrad", options, self.OPTIONS)
        self.lr, self.eps, self.l1 = o["lr"], o["eps"], o["l1"]

    def fused(self):
        return "adagrad", (), (self.lr, self.eps, self.l1)

    def apply(self, vals, state, sel, grad):
        g = grad.astype(np.float64)
        g2 = state["g2"][sel] + g * g
        state["g2"][sel] = g2
        step = self.lr / (np.sqrt(g2.astype(np.float64)) + self.eps)
        u = vals[sel] - step * g
        vals[sel] = soft_threshold(u, step * self.l1) if self.l1 else u


@register_updater("ftrl")
class FTRL(Updater):
    """FTRL-proximal (McMahan et al., KDD 2013, algorithm 1), per coordinate.

    State ``z`` and ``n``; the stored value is the weight they define. Per push of
    gradient ``g`` (taken at the stored weight ``w``), per entry:

        sigma = (sqrt(n + g^2) - sqrt(n)) / alpha
        z += g - sigma * w;  n += g^2
        w = 0                                                   if |z| <= l1
            -(z - sign(z) * l1) / ((beta + sqrt(n)) / alpha + l2)   otherwise
    """

    integer_ok = False
    state_fields = ("z", "n")
    OPTIONS = {"alpha": (0.1, _POSITIVE), "beta": (1.0, _NON_NEGATIVE),
               "l1": (0.0, _NON_NEGATIVE), "l2": (0.0, _NON_NEGATIVE)}

    def __init__(self, options):
        super().__init__(options)
        o = _checked_options("ftrl", options, self.OPTIONS)
        self.alpha, self.beta, self.l1, self.l2 = o["alpha"], o["beta"], o["l1"], o["l2"]

    def fused(self):
        return "ftrl", (), (self.alpha, self.beta, self.l1, self.l2)

    def apply(self, vals, state, sel, grad):
        g = grad.astype(np.float64)
        w = vals[sel].astype(np.float64)
        n = state["n"][sel].astype(np.float64)
        n_new = n + g * g
        sigma = (np.sqrt(n_new) - np.sqrt(n)) / self.alpha
        z = state["z"][sel] + (g - sigma * w)
        state["z"][sel] = z
        state["n"][sel] = n_new
        shrunk = soft_threshold(z.astype(np.float64), self.l1)
        denom = (self.beta + np.sqrt(n_new)) / self.alpha + self.l2
        # denom is 0 only for beta = l2 = 0 before any gradient: then z = 0 and so is w
        vals[sel] = np.divide(-shrunk, denom, out=np.zeros_like(shrunk), where=denom > 0)
