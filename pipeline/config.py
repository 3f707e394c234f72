"""Typed configs: YAML (safe_load) -> nested dataclasses, with `base:` inheritance and overrides.

- Any mapping may carry `base: other.yaml` (or a list of files): the named files, relative to the
  file that names them, are loaded first and this mapping is deep-merged over them.
- `--set a.b=c` overrides are parsed as YAML scalars and applied last.
- Every key is checked against the dataclass it lands in: an unknown or mistyped key is an error
  naming the key, the file it came from and the nearest valid key; values are type-checked.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from deco.data.errors import ExpectedError

T = TypeVar("T")
OVERRIDE_SOURCE = "--set"


class ConfigError(ExpectedError, ValueError):
    pass


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict, over: dict, base_prov: dict, over_prov: dict, prefix: str) -> None:
    """Deep-merge `over` into `base` in place, keeping for each dotted key the file it came from."""
    for key, value in over.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, base_prov, over_prov, dotted + ".")
        else:
            base[key] = value
            for k in [k for k in base_prov if k == dotted or k.startswith(dotted + ".")]:
                del base_prov[k]
        base_prov.update({k: v for k, v in over_prov.items() if k == dotted or k.startswith(dotted + ".")})


def _resolve(node: dict, source: Path, prefix: str, chain: tuple[Path, ...]) -> tuple[dict, dict]:
    """Expand `base:` keys under `node` (read from `source`); returns (tree, provenance)."""
    tree: dict = {}
    prov: dict = {}
    bases = node.get("base", [])
    for base in [bases] if isinstance(bases, str) else bases:
        base_path = (source.parent / base).resolve()
        if base_path in chain:
            raise ConfigError(f"{source}: `base` cycle through {base_path}")
        base_tree, base_prov = _resolve(_read_yaml(base_path), base_path, prefix, chain + (base_path,))
        _merge(tree, base_tree, prov, base_prov, prefix)
    own: dict = {}
    own_prov: dict = {}
    for key, value in node.items():
        if key == "base":
            continue
        dotted = f"{prefix}{key}"
        own_prov[dotted] = str(source)
        if isinstance(value, dict):
            value, sub_prov = _resolve(value, source, dotted + ".", chain)
            own_prov.update(sub_prov)
        own[key] = value
    _merge(tree, own, prov, own_prov, prefix)
    return tree, prov


def load_tree(path: str | Path) -> tuple[dict, dict]:
    path = Path(path).resolve()
    return _resolve(_read_yaml(path), path, "", (path,))


def apply_overrides(tree: dict, prov: dict, overrides: typing.Iterable[str]) -> None:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like a.b.c=value")
        parts = key.strip().split(".")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        prov[key.strip()] = OVERRIDE_SOURCE


def _where(prov: dict, dotted: str) -> str:
    return prov.get(dotted, "defaults")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(hint: Any, value: Any, dotted: str, prov: dict) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    fail = ConfigError(f"{dotted} = {value!r} in {_where(prov, dotted)}: expected {_type_name(hint)}")
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, dotted, prov)
            except ConfigError:
                continue
        raise fail
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{dotted} = {value!r} in {_where(prov, dotted)}: must be one of {list(args)}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise fail
        return _build(hint, value, prov, dotted + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise fail
            return tuple(_coerce(a, v, f"{dotted}[{i}]", prov) for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{dotted}[{i}]", prov) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise fail
        key_hint, value_hint = args or (Any, Any)
        return {k: _coerce(value_hint, v, f"{dotted}.{k}", prov) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise fail
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise fail
        return value
    raise ConfigError(f"{dotted}: unsupported field type {hint!r}")


def _build(cls: type[T], data: dict, prov: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            nearest = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{nearest[0]}'?" if nearest else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{dotted}' in {_where(prov, dotted)}{hint}")
        kwargs[key] = _coerce(hints[key], value, dotted, prov)
    try:
        instance = cls(**kwargs)
    except TypeError as err:  # a required field left unset
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from None
    validate = getattr(instance, "validate", None)
    if callable(validate) and not prefix:
        try:
            validate()
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return instance


def from_dict(cls: type[T], data: dict, source: str = "<dict>") -> T:
    prov = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            prov[f"{prefix}{key}"] = source
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")

    walk(data, "")
    return _build(cls, data, prov)


def load_config(cls: type[T], path: str | Path, overrides: typing.Iterable[str] = ()) -> T:
    """Load `path` into dataclass `cls`, applying `a.b=c` overrides; raises ConfigError."""
    tree, prov = load_tree(path)
    apply_overrides(tree, prov, overrides)
    return _build(cls, tree, prov)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
