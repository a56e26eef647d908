"""Bundled apps, looked up by the name a job file gives in ``app:``.

``APPS`` is the registry ``psd run``, ``psd submit`` and the worker daemons hand to the
job machinery (:mod:`psd.jobs.registry`); modules are imported on demand so starting a
daemon does not pay for every app.
"""
from __future__ import annotations

from types import ModuleType

from psd.jobs.registry import AppRegistry

APPS = AppRegistry({
    "logreg_sgd": "psd.apps.logreg_sgd",
    "logreg": "psd.apps.logreg",
    "cms": "psd.apps.cms",
    "lda": "psd.apps.lda",
})


def load_app(name: str) -> ModuleType:
    """Import the bundled app registered as ``name``."""
    return APPS.load(name)
