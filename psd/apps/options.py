"""Checking the option sections of an app's job file, shared by the bundled apps.

An app describes its sections as a table ``section -> key -> (accepts, expected)``:
``accepts(value)`` says whether a value is good, ``expected`` says in words what was
expected. :func:`check_sections` reports every problem at once, each naming the file
and the key, including unknown keys (a misspelt option would otherwise silently fall
back to its default); the app then adds its own checks across keys.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from psd.apps.datasets import GENERATORS

#: accepts the value, what was expected
Check = tuple[Callable[[Any], bool], str]


def is_int(v) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_num(v) -> bool:
    """A number (Python or numpy), not a bool; infinities and NaN included."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def is_finite_num(v) -> bool:
    """A finite number (Python or numpy), not a bool."""
    return is_num(v) and math.isfinite(v)


def is_bool(v) -> bool:
    return isinstance(v, bool)


def check_sections(spec: dict, source: str, checks: Mapping[str, Mapping[str, Check]], *, app: str,
                   unused_sections: Iterable[str] = (), unused_note: str = "",
                   special: Mapping[tuple[str, str], Callable[[Any], list[str]]] | None = None,
                   ) -> list[str]:
    """Problems with the sections of ``spec`` that ``checks`` describes, each starting
    ``"{source}: "``: a section that is not a mapping, an unknown key, a value its
    check rejects. ``special[(section, key)]``, where given, checks that key's value
    instead and returns its problems (the key must still be listed in ``checks``).
    Then each of ``unused_sections`` present in ``spec`` (sections other apps read) is
    reported as not used by ``app``, with ``unused_note`` in brackets if given."""
    problems: list[str] = []
    special = special or {}
    for section, section_checks in checks.items():
        given = spec.get(section)
        if given is None:
            continue
        if not isinstance(given, dict):
            problems.append(f"{source}: {section}: expected a mapping, got {given!r}")
            continue
        for key, value in given.items():
            check = section_checks.get(key)
            if check is None:
                problems.append(f"{source}: {section}.{key}: unknown key; expected one of "
                                f"{', '.join(section_checks)}")
            elif (section, key) in special:
                problems.extend(special[(section, key)](value))
            elif not check[0](value):
                problems.append(f"{source}: {section}.{key}: expected {check[1]}, got {value!r}")
    note = f" ({unused_note})" if unused_note else ""
    for section in unused_sections:
        if section in spec:
            problems.append(f"{source}: {section}: not used by app {app!r}; its sections are "
                            f"{', '.join(checks)}{note}")
    return problems


def merge_defaults(defaults: dict, spec: dict) -> dict:
    """A deep copy of ``defaults`` with each section overlaid by the spec's section."""
    merged = copy.deepcopy(defaults)
    for section in merged:
        merged[section].update(spec.get(section) or {})
    return merged


# -- generated sparse logistic-regression data (logreg and logreg_sgd) -----------------
SPARSE_LOGREG_CHECKS: dict[str, Check] = {
    "generator": (lambda v: v in GENERATORS, "one of " + ", ".join(repr(g) for g in GENERATORS)),
    "seed": (lambda v: is_int(v) and v >= 0, "a non-negative integer"),
    "examples": (lambda v: is_int(v) and v >= 2, "an integer >= 2"),
    "features": (lambda v: is_int(v) and v >= 1, "a positive integer"),
    "nnz": (lambda v: is_int(v) and v >= 1, "a positive integer"),
    "noise": (lambda v: is_num(v) and 0 <= v <= 0.5, "a number in [0, 0.5]"),
    "test_fraction": (lambda v: is_num(v) and 0 < v < 1, "a number in (0, 1)"),
    "signal_fraction": (lambda v: is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
}


def check_sparse_logreg(data: dict, source: str) -> list[str]:
    """Problems across the keys of a (merged) ``data`` section for generated data: more
    non-zeros per row than features, or a test split that leaves test or train empty."""
    problems: list[str] = []
    if data["nnz"] > data["features"]:
        problems.append(f"{source}: data.nnz: expected at most data.features ({data['features']}), "
                        f"got {data['nnz']!r}")
    n_test = round(data["examples"] * data["test_fraction"])
    if not 1 <= n_test < data["examples"]:
        problems.append(f"{source}: data.test_fraction: leaves {n_test} of {data['examples']} examples "
                        f"for testing; expected at least one for each of test and train")
    return problems
