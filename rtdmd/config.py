"""Strict, frozen, typed configs.

A config is a tree of frozen dataclasses. It is loaded from a YAML file (a packaged one addressed by
name, e.g. ``sample/tiny``, or any path) plus ``key=value`` overrides from the command line:

* an unknown key fails and names the closest valid key;
* every value is checked against the field's declared type (``int``, ``float``, ``bool``, ``str``,
  ``Literal``, ``X | None``, ``tuple[X, ...]``, ``dict[str, X]``, nested dataclasses), and an
  override is parsed with that type, never guessed;
* nothing mutates a config after it is loaded; builders pass flat values to components.

A dataclass may define ``validate(self) -> None`` for checks across fields; it runs after loading.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rtdmd.errors import RtdmdError
from rtdmd.registry import UnknownNameError, did_you_mean

C = TypeVar("C")

PACKAGED_ROOT = "rtdmd.configs"


class ConfigError(RtdmdError, ValueError):
    """A config file or override that does not match its schema."""


# ---------------------------------------------------------------- type checking / coercion


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it in canonical form (lists -> tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(value, options[0], key)
        for arg in options:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(
            f"{key}: expected one of {list(args)}, got {value!r}{did_you_mean(str(value), [str(a) for a in args])}"
        )
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping ({_type_name(tp)}), got {value!r}")
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, f"{key}.<key>"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected str, got {value!r}")
    raise TypeError(f"{key}: unsupported config field type {tp!r}")


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _build(cls: type[C], data: dict[str, Any], prefix: str = "") -> C:
    fields = _fields(cls)
    for name in data:
        if name not in fields:
            where = f"{prefix}.{name}" if prefix else str(name)
            raise ConfigError(f"{where}: unknown key{did_you_mean(str(name), list(fields))}")
    kwargs = {
        name: _coerce(value, fields[name], f"{prefix}.{name}" if prefix else name) for name, value in data.items()
    }
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except (ValueError, AssertionError, UnknownNameError) as err:
            raise ConfigError(f"{prefix or cls.__name__}: {err}") from None
    return obj


# ---------------------------------------------------------------- overrides


def _field_type_at(cls: type, dotted: str) -> Any:
    """The declared type of ``dotted`` inside ``cls``; unknown keys fail with a suggestion."""
    tp: Any = cls
    walked: list[str] = []
    for part in dotted.split("."):
        inner = _dataclass_in(tp)
        if inner is None:
            raise ConfigError(f"{'.'.join(walked)}: is not a section, cannot set {dotted!r}")
        fields = _fields(inner)
        if part not in fields:
            where = ".".join([*walked, part])
            raise ConfigError(f"{where}: unknown key{did_you_mean(part, list(fields))}")
        tp = fields[part]
        walked.append(part)
    return tp


def _dataclass_in(tp: Any) -> type | None:
    """``tp`` itself if it is a dataclass, or the dataclass inside ``X | None``."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _parse_text(text: str, tp: Any) -> Any:
    """Parse an override's text by the field type: strings stay verbatim, the rest is YAML."""
    accepts_none = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
    if accepts_none and text.strip().lower() in ("none", "null", "~"):
        return None
    plain = tp
    if accepts_none:
        non_none = [a for a in typing.get_args(tp) if a is not type(None)]
        plain = non_none[0] if len(non_none) == 1 else tp
    if plain is str:
        return text
    if typing.get_origin(plain) is typing.Literal and all(isinstance(a, str) for a in typing.get_args(plain)):
        return text
    if plain is float:  # YAML 1.1 reads "1e-3" (no dot) as a string; every float spelling is meant
        try:
            return float(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse {text!r}: {err}") from None


def apply_overrides(cls: type, data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``data`` with every ``a.b.c=value`` override applied (typed by ``cls``)."""
    out = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        dotted, text = item.split("=", 1)
        dotted = dotted.strip()
        tp = _field_type_at(cls, dotted)
        value = _parse_text(text, tp)
        try:
            _coerce(value, tp, dotted)  # fail here, naming the key, before building anything
        except ConfigError as error:
            example = _current_value(cls, data, dotted)
            hint = f" (e.g. {dotted}={yaml.safe_dump(example, default_flow_style=True).strip().removesuffix('...').strip()})"
            raise ConfigError(f"{error}{hint if example is not None else ''}") from None
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def _current_value(cls: type, data: dict[str, Any], dotted: str) -> Any:
    """The value the file gives ``dotted``, else the schema's default (for error hints)."""
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is not None:
        return node
    try:
        obj: Any = cls()
    except TypeError:  # the schema has required fields
        return None
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return to_dict(obj)


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


# ---------------------------------------------------------------- loading and dumping


def packaged_names(group: str) -> list[str]:
    """Names of the packaged configs of one group, e.g. ``["sample/tiny"]`` for ``group="sample"``."""
    root = resources.files(PACKAGED_ROOT) / group
    if not root.is_dir():
        return []
    return sorted(f"{group}/{p.name[:-5]}" for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_source(name_or_path: str, group: str) -> tuple[str, str]:
    """Find a config: an existing file path, or a packaged name (``tiny`` or ``sample/tiny``).

    Returns ``(label, yaml_text)``.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {name_or_path!r} does not exist")
        return str(path), path.read_text()
    name = name_or_path if "/" in name_or_path else f"{group}/{name_or_path}"
    candidate = resources.files(PACKAGED_ROOT).joinpath(*f"{name}.yaml".split("/"))
    if not candidate.is_file():
        known = packaged_names(name.split("/")[0])
        short = [k.split("/", 1)[1] for k in known]
        hint = did_you_mean(name.split("/")[-1], short)
        raise ConfigError(f"no packaged config {name!r}{hint}; known: {', '.join(known) or 'none'}")
    return name, candidate.read_text()


def load(cls: type[C], name_or_path: str, overrides: list[str] | tuple[str, ...] = (), group: str = "") -> C:
    """Load a config of schema ``cls`` from a packaged name or a YAML path, then apply overrides."""
    label, text = resolve_source(name_or_path, group)
    return from_dict(cls, apply_overrides(cls, yaml_mapping(text, label, empty_ok=True), overrides))


def yaml_mapping(text: str, label: str, empty_ok: bool = False) -> dict[str, Any]:
    """The mapping a YAML file (config or card) holds; invalid YAML, an empty file or another top
    level is a :class:`ConfigError` naming ``label`` (the line YAML reports is in the message)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(err, "problem", None) or "not YAML"
        raise ConfigError(f"{label}: invalid YAML{line}: {problem}") from None
    if data is None and empty_ok:
        return {}
    if data is None:
        raise ConfigError(f"{label} is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: the top level must be a mapping of keys, not a {type(data).__name__}")
    return data


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    return _build(cls, data)


def to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
