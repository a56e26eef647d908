"""Apps by name: the registry the job machinery is handed, so it never imports an app.

An app is a module with ``validate(spec, source) -> list[str]`` (the problems of a job
file's app sections), ``async run(kv, ctx) -> dict`` (a rank's work; ``ctx`` is a
:class:`psd.jobs.context.JobContext`; returns the rank's summary) and optionally
``PLOTS`` (the PNGs drawn from its metric records). ``psd.apps.APPS`` registers the
bundled apps; whoever starts a job (``psd run``, ``psd submit``, ``psd.estimators``)
passes a registry down.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from types import ModuleType

from psd.errors import ConfigError


class AppRegistry(Mapping[str, str]):
    """App name (as a job file's ``app:`` gives it) -> the module that implements it.
    Modules are imported on first use, so a daemon does not pay for every app."""

    def __init__(self, modules: Mapping[str, str]):
        self._modules = dict(modules)

    def __getitem__(self, name: str) -> str:
        return self._modules[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def __repr__(self) -> str:
        return f"AppRegistry({self._modules!r})"

    def known(self) -> str:
        """The registered names, for messages: ``cms, lda, logreg``."""
        return ", ".join(sorted(self._modules)) or "(none)"

    def load(self, name: str) -> ModuleType:
        """Import the app registered as ``name``; an unknown name is a ``ConfigError``."""
        module = self._modules.get(name)
        if module is None:
            raise ConfigError(f"unknown app {name!r}; known apps: {self.known()}")
        return importlib.import_module(module)
