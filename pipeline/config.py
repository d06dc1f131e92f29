"""Typed configs from YAML and the command line, checked before anything starts.

Every stage has a dataclass config (``pipeline.stage_config``). :func:`load` reads a YAML file,
applies ``key.sub=value`` overrides, converts every value to its declared type, checks the bounds
declared with :func:`unclip.fields.param` and each config's own ``validate()``, and returns the typed
object. Any problem is one :class:`ConfigError` line that names the file (or the override) and the
dotted key, e.g. ``configs/prior/tiny.yaml: optim.lr: expected a number, got 'fast'``.

:func:`dumps` writes a config back as YAML (secrets redacted) so each run saves the config it used
next to its outputs.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

import yaml

from pipeline.storage import Secret
from unclip.fields import ConfigValueError

T = TypeVar("T")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the source and the key."""


class _Invalid(Exception):
    """Raised while converting: a message about one key (``key`` is the dotted path)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


# ----------------------------------------------------------------------------------------------
# Reading and overriding


def read_yaml(path: str) -> dict[str, Any]:
    """The mapping in a YAML file, or a ConfigError naming the file and the problem."""
    if not os.path.exists(path):
        raise ConfigError(f"{path}: config file not found")
    with open(path, encoding="utf-8") as handle:
        return read_yaml_text(handle.read(), source=path)


def read_yaml_text(text: str, source: str = "<text>") -> dict[str, Any]:
    """The mapping in YAML text; errors name ``source`` and the line."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top, got {_kind(data)}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` → ``("optim.lr", "3e-4")``; the value is read as YAML (lists, null…)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, str]:
    """Set each ``key.sub=value`` in ``data`` (in place). Returns dotted key → override text."""
    origin: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                prefix = ".".join(parts[: i + 1])
                raise ConfigError(f"override {text!r}: {prefix} is not a section")
            node = child
        node[parts[-1]] = value
        origin[key] = text
    return origin


# ----------------------------------------------------------------------------------------------
# Conversion


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return repr(value)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, Sequence):
        return "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    if tp is Secret:
        return "a string"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except _Invalid as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise _Invalid(key, f"expected {_type_name(tp)}, got {_kind(value)}")
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(a is value for a in args)):
            return value
        raise _Invalid(key, f"expected {_type_name(tp)}, got {_kind(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise _Invalid(key, f"expected true or false, got {_kind(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number(value)
        if number is not None and float(number).is_integer():
            return int(number)
        raise _Invalid(key, f"expected an integer, got {_kind(value)}")
    if tp is float:
        number = _number(value)
        if number is not None:
            return float(number)
        raise _Invalid(key, f"expected a number, got {_kind(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Invalid(key, f"expected a string, got {_kind(value)}")
    if tp is Secret:
        if isinstance(value, Secret):
            return value
        if isinstance(value, str):
            return Secret(value)
        raise _Invalid(key, "expected a string")  # never echo what may be a credential
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value in (member.value, member.name):
                return member
        raise _Invalid(key, f"expected {_type_name(tp)}, got {_kind(value)}")
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, list | tuple):
            raise _Invalid(key, f"expected a list, got {_kind(value)}")
        item = args[0] if args else Any
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _Invalid(key, f"expected a list, got {_kind(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _Invalid(key, f"expected a list of {len(args)} items, got {len(value)}")
        return tuple(
            _convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise _Invalid(key, f"expected a mapping, got {_kind(value)}")
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, key): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _Invalid(key, f"expected a mapping, got {_kind(value)}")
        return _build(tp, value, key)
    raise _Invalid(key, f"unsupported config type {_type_name(tp)}")


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip())  # YAML 1.1 reads 1e-4 as a string
        except ValueError:
            return None
    return None


def _within(key: str, section: str) -> bool:
    """Whether dotted ``key`` is ``section`` or lies inside it."""
    return key == section or key.startswith((section + ".", section + "["))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build(cls: type[T], data: Mapping[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean {_join(prefix, close[0])!r}?)" if close else ""
            known = "" if hint else f"; known keys: {', '.join(fields)}"
            raise _Invalid(_join(prefix, str(name)), f"unknown key{hint}{known}")
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in data:
            value = _convert(hints[name], data[name], key)
            _check_bounds(f, value, key)
            kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Invalid(key, "missing required key")
    obj = cls(**kwargs)
    _validate(obj, prefix)
    return obj


def _check_bounds(f: dataclasses.Field, value: Any, key: str) -> None:
    meta = f.metadata
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    for bound, test, words in (
        ("ge", lambda v, b: v >= b, "at least"),
        ("gt", lambda v, b: v > b, "greater than"),
        ("le", lambda v, b: v <= b, "at most"),
        ("lt", lambda v, b: v < b, "less than"),
    ):
        if bound in meta and not test(value, meta[bound]):
            raise _Invalid(key, f"must be {words} {meta[bound]}, got {value}")


def _validate(obj: Any, prefix: str) -> None:
    validate = getattr(obj, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except ConfigValueError as exc:
        raise _Invalid(_join(prefix, exc.key), exc.message) from None


# ----------------------------------------------------------------------------------------------
# Public API


def from_dict(
    cls: type[T], data: Mapping[str, Any], *, source: str, origin: Mapping[str, str] | None = None
) -> T:
    """Build and check a config of type ``cls`` from plain data; errors name ``source`` and the key.

    ``origin`` maps dotted keys to the command-line override that set them, so an error in an
    override names the override rather than the file.
    """
    try:
        return _build(cls, data, "")
    except _Invalid as exc:
        where = source
        for key, text in (origin or {}).items():
            if _within(exc.key, key) or _within(key, exc.key):
                where = f"override {text!r}"
        raise ConfigError(f"{where}: {exc.key}: {exc.message}") from None


def load(cls: type[T], path: str | None = None, overrides: Sequence[str] = ()) -> T:
    """Load a ``cls`` config from a YAML file (or the class defaults) with overrides applied."""
    data = read_yaml(path) if path else {}
    origin = apply_overrides(data, overrides)
    return from_dict(cls, data, source=path or "defaults", origin=origin)


def to_dict(cfg: Any) -> Any:
    """Plain data for YAML/JSON: enums as values, tuples as lists, secrets as null."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        out = {}
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            out[f.name] = None if f.metadata.get("secret") else to_dict(value)
        return out
    if isinstance(cfg, Secret):
        return None
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dumps(cfg: Any) -> str:
    """The config as YAML, in field order, with secrets redacted."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=100)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, doc) for every field of ``cls``, nested sections flattened."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        if f.metadata.get("secret"):
            default = None
        rows.append((key, _type_name(tp), to_dict(default), f.metadata.get("doc", "")))
    return rows
