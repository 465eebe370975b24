"""Name -> factory registries for sources and sinks, filled by the packages that own them.

A source or sink is named on the command line as ``NAME`` or ``NAME:ARG``
(``camera:SERIAL``, ``zmq:tcp://0.0.0.0:5556``, ``overlay:out.mp4``).  Sources also
accept bare forms that a user would type: a path to an ``.aedat4`` file, a directory
or a glob, and ``tcp://HOST:PORT`` / ``unix:PATH`` for DV network streams; each
registered entry may supply a ``matches`` predicate for those.

Factories take ``(arg, cfg)`` -- ``arg`` is the text after the colon, or None -- and
return an unopened node.  They validate and raise :class:`UsageError`; they must not
open anything.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from .node import UsageError

#: Packages that register sections, sources and sinks when imported.
PLUGIN_PACKAGES = ("stream.binner", "stream.engine", "sources", "model", "sinks")


@dataclass(frozen=True)
class Entry:
    name: str
    summary: str
    example: str
    factory: Callable[[str | None, Any], Any]
    matches: Callable[[str], bool] | None = None


SOURCES: dict[str, Entry] = {}
SINKS: dict[str, Entry] = {}


def _register(table: dict[str, Entry], name: str, summary: str, example: str, matches=None):
    def deco(factory):
        table[name] = Entry(name, summary, example, factory, matches)
        return factory

    return deco


def register_source(name: str, summary: str, example: str, matches: Callable[[str], bool] | None = None):
    return _register(SOURCES, name, summary, example, matches)


def register_sink(name: str, summary: str, example: str):
    return _register(SINKS, name, summary, example)


_loaded = False


def load_plugins() -> None:
    """Import every plugin package once, so their registrations run."""
    global _loaded
    if _loaded:
        return
    for mod in PLUGIN_PACKAGES:
        importlib.import_module(mod)
    _loaded = True


def _split(spec: str) -> tuple[str, str | None]:
    name, sep, arg = spec.partition(":")
    return name, (arg if sep else None)


def resolve(table: dict[str, Entry], spec: str, kind: str) -> tuple[Entry, str | None]:
    """Find the entry for ``spec``: an explicit ``NAME[:ARG]``, else the first ``matches``."""
    load_plugins()
    name, arg = _split(spec)
    if name in table:
        return table[name], arg
    for entry in table.values():
        if entry.matches is not None and entry.matches(spec):
            return entry, spec
    valid = ", ".join(f"{e.name} (e.g. {e.example})" for e in table.values())
    raise UsageError(f"unknown {kind} {spec!r}; valid {kind}s: {valid}")


def build_source(spec: str, cfg: Any) -> Any:
    entry, arg = resolve(SOURCES, spec, "source")
    return entry.factory(arg, cfg)


def build_sink(spec: str, cfg: Any) -> Any:
    entry, arg = resolve(SINKS, spec, "sink")
    return entry.factory(arg, cfg)
