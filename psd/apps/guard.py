"""Watching an objective for divergence, shared by the optimising apps.

A run that diverges must not end quietly: the issue that asked for this saw an L1
logistic regression go from 0.693 to 46 and return normally. :class:`Watch` keeps the
objective's history as every worker sees it (the same numbers, read from the same
``sum`` table, in the same order), so all workers take the same decisions at the same
iteration without talking to each other: shrink the step after ``patience`` rises in a
row, stop once a pass improves by less than ``tol``, fail on a non-finite value.
:func:`check_end` fails a run that ends above where it started.
"""
from __future__ import annotations

import logging
import math

from psd.errors import PsdError

log = logging.getLogger("psd.apps")


class DivergedError(PsdError):
    """An optimising app's objective became non-finite or ended above its start; the
    message names the options to change."""


class Watch:
    """An objective's history and the decisions taken from it."""

    def __init__(self, app: str, patience: int = 3, advice: str = "", adapt: bool = True):
        self.app, self.patience, self.advice, self.adapt = app, int(patience), advice, adapt
        self.history: list[tuple[int, float]] = []   # (iteration, objective), in order
        self.rises = 0
        self.shrinks = 0                               # the step is divided by 2**shrinks
        self.events: list[dict] = []                   # metric records of the shrinks

    @property
    def scale(self) -> float:
        """The factor the curvature (the inverse step) is multiplied by."""
        return float(2 ** self.shrinks)

    def add(self, iteration: int, value: float) -> None:
        """One more evaluated objective; non-finite raises :class:`DivergedError`."""
        if not math.isfinite(value):
            raise DivergedError(f"{self.app}: the objective is {value} at iteration {iteration}; "
                                f"the step is too large for this data: {self.advice}")
        if self.history and value > self.history[-1][1] * (1 + 1e-7):
            self.rises += 1
        else:
            self.rises = 0
        self.history.append((iteration, value))
        if self.adapt and self.rises >= self.patience:
            self.shrinks += 1
            self.rises = 0
            log.warning("%s: the objective rose %d evaluations in a row (to %.6g at iteration %d); "
                        "halving the step (now 1/%d of the first)", self.app, self.patience, value, iteration,
                        2 ** self.shrinks)
            self.events.append({"series": "step", "iteration": iteration, "objective": value,
                                "step_scale": 1.0 / self.scale})

    def at(self, iteration: int) -> float | None:
        for it, value in reversed(self.history):
            if it == iteration:
                return value
            if it < iteration:
                return None
        return None

    def converged(self, end: int, start: int, tol: float) -> bool:
        """Whether the objective at ``end`` is less than ``tol`` (relative) below the one at
        ``start`` (both evaluated, else False)."""
        a, b = self.at(start), self.at(end)
        if a is None or b is None:
            return False
        return a - b < tol * max(abs(b), 1e-12)


def check_end(app: str, start: float, end: float, iterations: int, advice: str) -> None:
    """Fail a run whose final objective is not finite or above its first one."""
    if not math.isfinite(end) or end > start * (1 + 1e-9) + 1e-12:
        raise DivergedError(f"{app}: the objective ended at {end:.6g} after {iterations} iterations, "
                            f"above its start ({start:.6g}): the run diverged; {advice}")
