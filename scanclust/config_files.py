"""Config files and overrides into the typed sections of ``config.py``: YAML, a file composed
from a ``base``, dotted ``section.key=value`` overrides, and type checks that name the key and
where it came from (an override or the file), because a silently ignored typo (``scan.epoch=10``)
would cost a user a day of GPU time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from scanclust.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"


def builtin_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def compose(path: Path, _chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """A config file's settings over those of its ``base`` (a built-in config name, or a file
    path relative to this file), recursively; and which file each setting came from.

    The built-in configs are one recipe per data set written as the changes to another
    (cifar20 and stl10 over cifar10, imagenet_100 over imagenet_50, ...), so a reader sees
    what differs, and ``scanclust config NAME`` prints the whole result.
    """
    data = read_yaml(path)
    base = data.pop("base", None)
    files = {key: str(path) for key in _leaves(data)}
    if base is None:
        return data, files
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' names a built-in config or a YAML file, got {base!r}")
    local = path.parent / base
    base_path = local if local.suffix in (".yaml", ".yml") and local.is_file() \
        else resolve_path(base)
    if base_path.resolve() in (p.resolve() for p in (*_chain, path)):
        raise ConfigError(f"{path}: 'base: {base}' leads back to itself")
    merged, base_files = compose(base_path, (*_chain, path))
    _merge(merged, data)
    return merged, {**base_files, **files}


def _merge(into: dict[str, Any], changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _leaves(data: dict[str, Any], prefix: str = "") -> list[str]:
    return [leaf for key, value in data.items()
            for leaf in (_leaves(value, f"{prefix}{key}.") if isinstance(value, dict)
                         else [f"{prefix}{key}"])]


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file's mapping. An empty file is an error, not the defaults: the defaults are
    CIFAR-10's and would start a download the user never asked for."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        # YAML is UTF-8; config.yaml holds a folder name that is not as "\uDCE9" (byte 0xE9)
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
                          f"offset {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({where}{problem})") from None
    if data is None:
        raise ConfigError(f"{path} is empty (or only comments); give a config's settings, or a "
                          f"built-in config name ({', '.join(builtin_configs())})")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of section: settings at the top level, "
                          f"got {type(data).__name__}")
    return data


def resolve_path(source: str | Path) -> Path:
    path = Path(source)
    if path.is_file():
        return path
    builtin = CONFIG_DIR / f"{source}.yaml"
    if not path.suffix and builtin.is_file():
        return builtin
    raise ConfigError(f"config {str(source)!r} is neither a file nor a built-in config "
                      f"({', '.join(builtin_configs())})")


def parse_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            parsed[key.strip()] = raw
    return parsed


def deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [deep_copy(v) for v in data]
    return data


def set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def dotted_keys(data: Any, prefix: str = "") -> set[str]:
    """Every key of a nested mapping, sections included, as dotted paths."""
    if not isinstance(data, dict):
        return set()
    return {k for key, value in data.items()
            for k in (f"{prefix}{key}", *dotted_keys(value, f"{prefix}{key}."))}


class Origin:
    """Where a key came from, for error messages: an override, or the config file (of a
    composed config, the file that set it).

    A key is typed when an override set it or a section above it, or when an override made it
    (``Scan.epochs=3`` makes an unknown section ``Scan`` that no file holds).
    """

    def __init__(self, source: str, overridden: set[str], given: set[str],
                 files: dict[str, str]) -> None:
        self.source = source
        self.overridden = overridden
        self.given = given  # the keys the source itself holds
        self.files = files  # of a composed file: the file that set each setting

    def typed(self, key: str) -> bool:
        return any(key == o or key.startswith(f"{o}.") for o in self.overridden) or (
            key not in self.given and any(o.startswith(f"{key}.") for o in self.overridden))

    def of(self, key: str) -> str:
        return "the overrides" if self.typed(key) else self.files.get(key, self.source)

    def clause(self, key: str) -> str:
        """`` in <origin>`` for a key the overrides or the source set; nothing for a default."""
        return f" in {self.of(key)}" if self.typed(key) or key in self.given else ""


def build(cls: type, data: Any, prefix: str, origin: Origin) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<root>'!r} in "
                          f"{origin.of(prefix.rstrip('.'))}: "
                          f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known: {', '.join(names)}"
        raise ConfigError(f"unknown config key '{prefix}{key}' in "
                          f"{origin.of(f'{prefix}{key}')}{hint}")
    return cls(**{name: _coerce(hints[name], data[name], f"{prefix}{name}", origin)
                  for name in names if name in data})


def _coerce(tp: Any, value: Any, key: str, origin: Origin) -> Any:
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=f"{key}.", origin=origin)
    origin_tp = typing.get_origin(tp)
    if origin_tp in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key, origin)
            except ConfigError:
                continue
        raise _type_error(key, tp, value, origin)
    if origin_tp is list and isinstance(value, (list, tuple)):
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item_tp, v, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (tp is bool and isinstance(value, bool)) or (tp is int and number and isinstance(value, int)):
        return value
    if tp is float and (number or isinstance(value, str)):  # YAML reads "1e-4" as a string
        with contextlib.suppress(ValueError):
            if math.isfinite(float(value)):  # an infinite lr is never meant
                return float(value)
    if tp is str and (number or isinstance(value, str)):
        return value if isinstance(value, str) else str(value)
    if origin_tp is list or tp in (bool, int, float, str):
        raise _type_error(key, tp, value, origin)
    return value


def _type_error(key: str, tp: Any, value: Any, origin: Origin) -> ConfigError:
    name = getattr(tp, "__name__", str(tp)).replace("typing.", "")
    name = "a finite float" if name == "float" else name
    return ConfigError(f"config key '{key}' in {origin.of(key.split('[')[0])}: expected {name}, "
                       f"got {value!r}")

