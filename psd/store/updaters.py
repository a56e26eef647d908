"""Server-side update functions, chosen by name.

An updater folds a pushed array into the stored values of the pushed keys. Keys in
one push are unique, so ``vals[sel] op= grad`` is exact for both slices and index
arrays. Updaters that need per-key state (AdaGrad's accumulator, FTRL's z and n)
declare ``state_fields``; the table keeps those arrays aligned with the values.
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

    def apply(self, vals: np.ndarray, state: dict[str, np.ndarray], sel, grad: np.ndarray) -> None:
        raise NotImplementedError


UPDATERS: dict[str, type[Updater]] = {}


def register_updater(name: str) -> Callable[[type[Updater]], type[Updater]]:
    def deco(cls: type[Updater]) -> type[Updater]:
        cls.name = name
        UPDATERS[name] = cls
        return cls
    return deco


def make_updater(name: str, dtype: np.dtype, options: dict | None = None) -> Updater:
    cls = UPDATERS.get(name)
    if cls is None:
        raise UnknownUpdaterError(f"unknown updater {name!r}; known: {', '.join(sorted(UPDATERS))}")
    if not cls.integer_ok and np.dtype(dtype).kind != "f":
        raise BadRequestError(f"updater {name!r} needs a float table, not {np.dtype(dtype).name}")
    return cls(options or {})


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


@register_updater("assign")
class Assign(Updater):
    """Overwrite: the stored value is the last pushed value."""

    def apply(self, vals, state, sel, grad):
        vals[sel] = grad


@register_updater("sgd")
class SGD(Updater):
    """Plain gradient step ``w -= lr * g``; ``lr`` comes from the table options."""

    integer_ok = False

    def __init__(self, options):
        super().__init__(options)
        self.lr = _positive_float(options, "lr", 0.1)

    def apply(self, vals, state, sel, grad):
        vals[sel] -= (self.lr * grad).astype(vals.dtype, copy=False)
