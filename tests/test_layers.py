"""The layer rules of docs/architecture.md ("Layers"), checked on the import graph.

Every module under psd/ is parsed with ``ast`` (not imported); every ``import`` and
``from ... import`` counts, also inside functions and under ``TYPE_CHECKING``: a lazy
import is still a dependency. Three kinds of rule, each failure naming the file and the
import:

- ``LAYERS``: bottom to top; a module may import its own layer and the ones below.
- ``ONLY``: a package that may import nothing of psd but the listed packages.
- ``NEVER``: what a package may not import although the order would let it, and the
  modules that mean I/O or the clock, which the deterministic layers never import.

``KNOWN_EXCEPTIONS`` lists the imports that break a rule today, each with its reason;
whoever removes one deletes its line (a stale line fails the test too).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PSD = ROOT / "psd"

#: bottom to top: (name, packages or modules, why it sits there). A module belongs to the
#: entry naming the longest prefix of its dotted name; a module in none fails the test.
LAYERS: list[tuple[str, tuple[str, ...], str]] = [
    ("base", ("psd.errors", "psd.keyroles", "psd.refusals", "psd.keysets"),
     "the PsdError family, key roles and the refusal log: shared by every layer"),
    ("codec", ("psd.codec",), "Message <-> frames: bytes only, no sockets, no meaning"),
    ("filters", ("psd.filters",), "what a push leaves out or shrinks, and its undoing: pure numpy"),
    ("config", ("psd.config",), "one validated ClusterConfig, passed down; needs codec.Limits"),
    ("cluster", ("psd.cluster",), "pure key space, ring, clocks, liveness, job book"),
    ("updaters", ("psd.store.updaters",), "the update math by name; a TableSpec names one"),
    ("schema", ("psd.schema",), "table specs and the checks of keys and values (uses the key space)"),
    ("store", ("psd.store",), "per-table numpy storage and checkpoint files"),
    ("core", ("psd.core",), "the server's and client's decisions: messages in, effects out"),
    ("transport", ("psd.transport",), "sockets, CurveZMQ, request ids: moves bytes, knows no decisions"),
    ("roles", ("psd.roles", "psd.client"), "the daemons and the client API: drive the cores over transport"),
    ("sim", ("psd.sim",), "a deterministic simulation of the cores, no sockets"),
    ("jobs", ("psd.jobs",), "job files and the runner; apps come in as a registry"),
    ("apps", ("psd.apps",), "the bundled apps, written against the client API"),
    ("entry", ("psd", "psd.__main__", "psd.aio", "psd.local", "psd.forkserver", "psd.estimators", "psd.cli", "psd.testing"),
     "what users and tests run: the package facade, LocalCluster, fit_*, the psd command"),
]

#: modules that mean I/O, threads or the clock: never in the deterministic layers
IO = ("zmq", "asyncio", "uvloop", "time", "threading", "socket")
DETERMINISTIC = ("psd.codec", "psd.filters", "psd.store.updaters", "psd.schema", "psd.cluster", "psd.store", "psd.core",
                 "psd.sim")

#: package -> (the only psd packages it may import besides itself, why)
ONLY: dict[str, tuple[tuple[str, ...], str]] = {
    "psd.errors": ((), "the root of the error family imports nothing of psd"),
    "psd.keyroles": (("psd.errors",), "a table of who may send what"),
    "psd.refusals": (("psd.errors",), "pure: the caller passes the time"),
    "psd.keysets": ((), "numpy only: distinct keys by sorting"),
    "psd.config": (("psd.errors", "psd.codec"), "sits beside the bottom layers"),
    "psd.filters": (("psd.errors", "psd.keysets"), "pure numpy over keys and values; the client and Rows call it"),
    "psd.transport": (("psd.codec", "psd.errors", "psd.keyroles", "psd.refusals", "psd.cluster"),
                      "moves bytes; what a message means is decided above it"),
}

#: package -> (what it never imports, why); the entry of the longest prefix applies
NEVER: dict[str, tuple[tuple[str, ...], str]] = {
    **{p: (IO, "deterministic: time comes in as an argument, messages as values") for p in DETERMINISTIC},
    "psd.core": ((*IO, "psd.transport", "psd.roles", "psd.client"),
                 "pure decision logic: the roles and the client drive it over transport"),
    "psd.sim": ((*IO, "psd.transport", "psd.roles", "psd.client"),
                "runs the cores on virtual time and in-memory links"),
    "psd.client": (("psd.roles",), "the client API knows no daemon internals"),
    "psd.jobs": (("zmq", "psd.codec", "psd.transport", "psd.core", "psd.roles", "psd.sim"),
                 "jobs reach the cluster through psd.client only"),
    "psd.apps": (("zmq", "psd.codec", "psd.transport", "psd.core", "psd.roles", "psd.sim"),
                 "apps are written against the client API"),
}

#: (file, imported module) pairs that break a rule today; the owners remove them
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PSD.rglob("*.py"))}


def _imports(module: str, source: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) for every import in ``source``, the text of ``module``;
    ``from X import name`` counts as ``X.name`` when that is a psd module, else as ``X``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join([*package[:len(package) - node.level + 1], *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((node.lineno, full if full in known else base))
    return found


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _owner(module: str, table) -> str | None:
    """The longest key of ``table`` that ``module`` is (in); the bare ``psd`` matches only
    itself, so a new module must be placed on purpose."""
    hits = [k for k in table if module == k or (k != "psd" and _under(module, k))]
    return max(hits, key=len, default=None)


_LAYER_OF = {name: (i, layer) for i, (layer, names, _) in enumerate(LAYERS) for name in names}


def _layer(module: str) -> tuple[int, str] | None:
    owner = _owner(module, _LAYER_OF)
    return None if owner is None else _LAYER_OF[owner]


def _problems(module: str, rel: str, imports: list[tuple[int, str]]) -> list[tuple[str, str, str]]:
    """(file, imported module, what is wrong) for each of the ``imports`` of ``module``
    (in the file ``rel``) that breaks a rule."""
    mine = _layer(module)
    only, never = _owner(module, ONLY), _owner(module, NEVER)
    out = []
    for line, target in imports:
        where = f"{rel}:{line} imports {target}"
        if _under(target, "psd"):
            theirs = _layer(target)
            if theirs is None:
                out.append((rel, target, f"{where}, which is in no layer of LAYERS"))
            elif mine is not None and theirs[0] > mine[0]:
                rule = f"layer {mine[0]} {mine[1]} may not import layer {theirs[0]} {theirs[1]}"
                out.append((rel, target, f"{where} ({rule})"))
            if only and not _under(target, only):
                allowed, why = ONLY[only]
                if not any(_under(target, a) for a in allowed):
                    rule = f"{only} may import only {', '.join(allowed) or 'nothing of psd'}: {why}"
                    out.append((rel, target, f"{where} ({rule})"))
        if never:
            banned, why = NEVER[never]
            hit = next((b for b in banned if _under(target, b)), None)
            if hit:
                out.append((rel, target, f"{where} ({never} never imports {hit}: {why})"))
    return out


def _graph() -> dict[str, tuple[str, list[tuple[int, str]]]]:
    """module -> (its file relative to the repository, its imports)."""
    modules = _modules()
    known = set(modules)
    return {m: (path.relative_to(ROOT).as_posix(), _imports(m, path.read_text(), path.name == "__init__.py", known))
            for m, path in modules.items()}


def _all_problems() -> list[tuple[str, str, str]]:
    return [p for m, (rel, imports) in _graph().items() for p in _problems(m, rel, imports)]


def test_every_module_is_in_a_layer():
    missing = [f"{rel} ({m})" for m, (rel, _) in _graph().items() if _layer(m) is None]
    assert not missing, "modules in no layer; add them to LAYERS in tests/test_layers.py:\n" + "\n".join(missing)


def test_imports_follow_the_layers():
    bad = sorted({text for file, target, text in _all_problems() if (file, target) not in KNOWN_EXCEPTIONS})
    assert not bad, "imports against the layer rules:\n" + "\n".join(bad)


def test_known_exceptions_are_still_needed():
    seen = {(file, target) for file, target, _ in _all_problems()}
    stale = sorted(KNOWN_EXCEPTIONS - seen)
    assert not stale, "no longer needed; delete from KNOWN_EXCEPTIONS:\n" + "\n".join(map(str, stale))


def test_core_and_sim_do_no_io():
    """Checked on its own, so that no KNOWN_EXCEPTIONS line can hide it."""
    banned = (*IO, "psd.transport", "psd.roles", "psd.client")
    bad = [f"{rel}:{line} imports {target}" for m, (rel, imports) in _graph().items()
           if _under(m, "psd.core") or _under(m, "psd.sim")
           for line, target in imports if any(_under(target, b) for b in banned)]
    assert not bad, "psd.core and psd.sim do no I/O and read no clock:\n" + "\n".join(bad)


def test_the_checker_sees_lazy_relative_and_type_checking_imports():
    source = ("from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    from psd.roles import worker\n"
              "def f():\n    import time\n    from ..transport import rpc\n    from . import acks\n")
    known = {"psd.roles.worker", "psd.transport.rpc", "psd.core.acks"}
    imports = _imports("psd.core.probe", source, False, known)
    assert sorted(t for _, t in imports) == ["__future__", "psd.core.acks", "psd.roles.worker",
                                              "psd.transport.rpc", "time", "typing"]
    problems = [text for _, _, text in _problems("psd.core.probe", "psd/core/probe.py", imports)]
    assert "psd/core/probe.py:4 imports psd.roles.worker (layer 8 core may not import layer 10 roles)" in problems
    assert any(p.startswith("psd/core/probe.py:6 imports time (psd.core never imports time") for p in problems)
    assert any(p.startswith("psd/core/probe.py:7 imports psd.transport.rpc (psd.core never imports psd.transport")
               for p in problems)
    assert not any("psd.core.acks" in p for p in problems)
