"""Bundled apps, looked up by the name a job file gives in ``app:``.

Modules are imported on demand so starting a daemon does not pay for every app.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from psd.errors import ConfigError

APPS: dict[str, str] = {
    "logreg_sgd": "psd.apps.logreg_sgd",
    "logreg": "psd.apps.logreg",
    "cms": "psd.apps.cms",
    "lda": "psd.apps.lda",
}


def load_app(name: str) -> ModuleType:
    """Import the app module registered as ``name``."""
    module = APPS.get(name)
    if module is None:
        known = ", ".join(sorted(APPS)) or "(none)"
        raise ConfigError(f"unknown app {name!r}; known apps: {known}")
    return importlib.import_module(module)
