"""Watching an objective for divergence, shared by the optimising apps.

A run that diverges must not end quietly: the issue that asked for this saw an L1
logistic regression go from 0.693 to 46 and return normally. :class:`Watch` keeps the
objective's history as every worker sees it (the same numbers, read from the same
``sum`` table, in the same order), so all workers take the same decisions at the same
iteration without talking to each other: shrink the step after ``patience`` rises in a
row, stop once a pass improves by less than ``tol``, fail on a non-finite value.

A rise is measured against the objective one ``period`` earlier (for block methods, one
pass over the blocks: the same block stepped last time), not against the previous
evaluation: under a bounded delay the objective between consecutive blocks wobbles by a
few parts in a million near the optimum while every pass still gains, and halving the
step on those wobbles (eight times on the SpamAssassin mails) left the run 2.2% above
the optimum after 50 passes instead of 0.26%. A diverging run rises pass over pass.
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

    def __init__(self, app: str, patience: int = 3, advice: str = "", adapt: bool = True, period: int = 1):
        self.app, self.patience, self.advice, self.adapt = app, int(patience), advice, adapt
        self.period = max(int(period), 1)              # iterations between comparable evaluations
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
        ref = self.before(iteration - self.period + 1)
        if ref is not None and value > ref * (1 + 1e-7):
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

    def before(self, iteration: int) -> float | None:
        """The latest objective evaluated before ``iteration``, else the last one (the
        first period compares with the previous evaluation), None at the start."""
        for it, value in reversed(self.history):
            if it < iteration:
                return value
        return self.history[-1][1] if self.history else None

    def at(self, iteration: int) -> float | None:
        for it, value in reversed(self.history):
            if it == iteration:
                return value
            if it < iteration:
                return None
        return None

    def mean(self, lo: int, hi: int) -> float | None:
        """The mean objective of the evaluations at iterations in ``(lo, hi]``."""
        vals = [v for it, v in self.history if lo < it <= hi]
        return sum(vals) / len(vals) if vals else None

    def converged(self, end: int, start: int, tol: float) -> bool:
        """Whether the objective over the period ending at ``end`` (the mean of its
        evaluations, iterations ``(start, end]``) is less than ``tol`` (relative) below
        that over the period before it (both evaluated, else False). Means and not two
        single evaluations: under a bounded delay one evaluation wobbles by more than a
        pass gains late in a run (0.2% against 0.1% on the SpamAssassin mails), and
        single values stopped a run at 2.6% above the optimum."""
        span = end - start
        a, b = self.mean(start - span, start), self.mean(start, end)
        if a is None or b is None:
            return False
        return a - b < tol * max(abs(b), 1e-12)


def check_end(app: str, start: float, end: float, iterations: int, advice: str) -> None:
    """Fail a run whose final objective is not finite or above its first one."""
    if not math.isfinite(end) or end > start * (1 + 1e-9) + 1e-12:
        raise DivergedError(f"{app}: the objective ended at {end:.6g} after {iterations} iterations, "
                            f"above its start ({start:.6g}): the run diverged; {advice}")
