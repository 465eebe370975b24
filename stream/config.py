"""One config home: a frozen dataclass per node, one YAML section per node, strict loading.

Decisions:

* The dataclass defaults *are* the defaults.  ``configs/default.yaml`` is the same
  values written out by ``python run.py --print-config`` and a test keeps the two
  equal, so they cannot drift (the research code defined its config twice with
  different defaults; we refuse that).
* Presets (``configs/presets/NAME.yaml``) are partial YAML overlays applied on top of
  the defaults, then the user's ``--config FILE``, then CLI flags.
* Unknown keys are errors that name the key and list the allowed ones.  YAML is parsed
  with ``yaml.safe_load`` only.
* Sections are registered by the packages that own them with ``@section("name")``;
  :func:`stream.registry.load_plugins` imports those packages.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from .node import UsageError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
#: The preset name of the plain dataclass defaults (no overlay).
DEFAULT_PRESET = "default"
PRESET_DIR = CONFIG_DIR / "presets"

_SECTIONS: dict[str, type] = {}


def section(name: str):
    """Class decorator: register a frozen dataclass as config section ``name``."""

    def deco(cls: type) -> type:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"config section {name}: {cls.__name__} is not a dataclass")
        if name in _SECTIONS and _SECTIONS[name] is not cls:
            raise TypeError(f"config section {name!r} registered twice ({_SECTIONS[name].__name__}, {cls.__name__})")
        _SECTIONS[name] = cls
        cls.SECTION = name  # type: ignore[attr-defined]
        return cls

    return deco


def sections() -> dict[str, type]:
    return dict(_SECTIONS)


def _describe(tp: Any) -> str:
    """How a config value of type ``tp`` is written in YAML (for error messages)."""
    if get_origin(tp) is Literal:
        return ", ".join(map(repr, get_args(tp)))
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    if get_origin(tp) in (tuple, list):
        return "a list"
    return "a mapping" if dataclasses.is_dataclass(tp) else str(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value against a type hint; raise UsageError naming ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except UsageError as e:
                errors.append(str(e))
        if len(errors) > 1 and not isinstance(value, (list, tuple, dict)):
            # a scalar that fits no form: name every accepted form, not only the first one tried
            forms = " or ".join(_describe(a) for a in args if a is not type(None))
            raise UsageError(f"{where}: {value!r} is not allowed; use {forms}")
        raise UsageError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise UsageError(f"{where}: {value!r} is not allowed; use one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UsageError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        seq = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(seq) if origin is tuple else seq
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UsageError(f"{where}: expected a mapping, got {value!r}")
        return build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UsageError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UsageError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise UsageError(f"{where}: cannot use {value!r} as {tp}")


def build(cls: type, data: dict[str, Any] | None, where: str | None = None) -> Any:
    """Build dataclass ``cls`` from a mapping, strictly (unknown keys are errors).

    Values are type-checked against the annotations; the dataclass's own
    ``__post_init__`` then validates ranges.
    """
    where = where or getattr(cls, "SECTION", cls.__name__)
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UsageError(
            f"unknown config key {where}.{unknown[0]}; allowed keys in '{where}': {', '.join(sorted(fields))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise UsageError(f"config '{where}': {e}") from None


def to_dict(obj: Any) -> Any:
    """Plain YAML-able form of a dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML mapping safely; clear one-line errors for missing or malformed files."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {p} not found; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.constructor.ConstructorError:
        raise UsageError(
            f"config file {p} uses a YAML tag that safe loading refuses (e.g. !!python/...); "
            "use plain mappings, lists, numbers and strings"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"config file {p} is not valid YAML{at}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


class Config(dict):
    """Resolved config: section name -> frozen dataclass instance."""

    preset: str = ""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, **{k: to_dict(v) for k, v in sorted(self.items())}}

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, section_name: str, **changes: Any) -> "Config":
        out = Config(self)
        out.preset = self.preset
        out[section_name] = dataclasses.replace(self[section_name], **changes)
        return out


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Config:
    """Resolve defaults <- preset <- file <- overrides into a :class:`Config`.

    ``preset`` defaults to the file's top-level ``preset:`` key, else ``default``: the
    dataclass defaults, i.e. the IGARSS 2023 network calibrated for event bins (see
    README, "Presets and calibration").  A named preset overlays its paper-exact values.
    """
    from .registry import load_plugins

    load_plugins()
    raw: dict[str, Any] = {}
    file_data = read_yaml(path) if path is not None else {}
    preset = preset or file_data.pop("preset", None) or DEFAULT_PRESET
    file_data.pop("preset", None)
    if preset != DEFAULT_PRESET:
        pfile = PRESET_DIR / f"{preset}.yaml"
        if not pfile.is_file():
            names = ", ".join([DEFAULT_PRESET, *preset_names()])
            raise UsageError(f"unknown preset {preset!r}; available presets: {names}")
        raw = deep_merge(raw, read_yaml(pfile))
        raw.pop("preset", None)
    raw = deep_merge(raw, file_data)
    raw = deep_merge(raw, overrides or {})
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise UsageError(f"unknown config section {unknown[0]!r}; allowed sections: {', '.join(sorted(_SECTIONS))}")
    cfg = Config()
    cfg.preset = preset
    for name, cls in sorted(_SECTIONS.items()):
        sec = raw.get(name) or {}
        if not isinstance(sec, dict):
            raise UsageError(f"config section {name!r} must be a mapping, got {sec!r}")
        cfg[name] = build(cls, sec, name)
    return cfg
