"""NeMo-style YAML loading into the typed config, strictly.

    defaults: [models/qwen3-4b.yaml]     # files merged first, in order, relative to this file
    denoise: {k_denoise: 4}               # then this file's own keys on top
    checkpoint: {dir: ${logging.output_dir}/checkpoints}    # ${...} interpolation (OmegaConf)

Command-line overrides `a.b.c=value` (value parsed as YAML) apply last. Unknown keys, wrong types,
bad interpolations and semantic/layout problems are collected and raised together as one
`ConfigError` that lists every problem, naming the key (and the nearest valid key for typos).
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import keyword
import os
import typing
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import yaml

from megatron_denoise.config.schema import Config


class ConfigError(ValueError):
    """Every problem found in a configuration, one per line."""

    def __init__(self, errors: list[str], source: str = "config"):
        self.errors = list(errors)
        head = f"{source}: {len(self.errors)} problem{'s' if len(self.errors) != 1 else ''}"
        super().__init__(head + "\n" + "\n".join(f"  - {e}" for e in self.errors))


# ----------------------------------------------------------------------------------------------
# YAML tree: defaults inheritance and overrides
# ----------------------------------------------------------------------------------------------

def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml_tree(path: Union[str, Path], errors: list[str], _stack: tuple = ()) -> dict:
    """The file's mapping with its `defaults:` merged underneath it (recursively)."""
    path = Path(path).resolve()
    if path in _stack:
        chain = " -> ".join(str(p.name) for p in (*_stack, path))
        errors.append(f"defaults: cycle {chain}")
        return {}
    try:
        text = path.read_text()
    except OSError as e:
        where = f" (in defaults of {_stack[-1]})" if _stack else ""
        errors.append(f"cannot read config file {path}{where}: {e.strerror}")
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        errors.append(f"{path}: invalid YAML: {e}")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        errors.append(f"{path}: top level must be a mapping, got {type(data).__name__}")
        return {}
    defaults = data.pop("defaults", None) or []
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        errors.append(f"{path}: defaults must be a list of file paths, got {defaults!r}")
        defaults = []
    merged: dict = {}
    for d in defaults:
        dp = Path(d) if os.path.isabs(d) else path.parent / d
        if dp.suffix not in (".yaml", ".yml"):
            dp = dp.with_suffix(".yaml")
        merged = _deep_merge(merged, load_yaml_tree(dp, errors, (*_stack, path)))
    return _deep_merge(merged, data)


def apply_overrides(tree: dict, overrides: Iterable[str], errors: list[str]) -> dict:
    """`a.b.c=value` (YAML-parsed value) on top of the tree. Key validity is checked later,
    together with the file's own keys."""
    tree = dict(tree)
    for ov in overrides:
        if "=" not in ov:
            errors.append(f"override {ov!r} must look like key=value (e.g. denoise.k_denoise=4)")
            continue
        key, raw = ov.split("=", 1)
        key = key.strip().lstrip("+")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        node = tree
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                if nxt is not None:
                    errors.append(f"override {key}: {'.'.join(parts[:i + 1])} is not a section")
                    break
                nxt = {}
            node[part] = nxt = dict(nxt)
            node = nxt
        else:
            node[parts[-1]] = value
    return tree


def resolve_interpolations(tree: dict, errors: list[str]) -> dict:
    """Resolve `${a.b}` and `${oc.env:VAR,default}` with OmegaConf."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        conf = OmegaConf.create(tree)
        return OmegaConf.to_container(conf, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        errors.append(f"interpolation error at {key}: {msg}" if key else f"interpolation error: {msg}")
        return tree


# ----------------------------------------------------------------------------------------------
# tree -> dataclasses, strictly
# ----------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str, errors: list[str], base: Any = None) -> Any:
    """`value` as type `tp`; a section (dataclass) is built over `base`, the default instance the
    parent gives it (a root may default a shared section differently, e.g. SFTConfig.optimizer)."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, errors) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a section (mapping), got {value!r}")
            return tp()
        return build_dataclass(tp, value, key + ".", errors, base=base)
    if tp is Any:
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):  # schema.Choice: the allowed values
        allowed = [m.value for m in tp]
        if isinstance(value, str) and value in allowed:
            return tp(value).value  # the plain string: configs stay YAML/JSON/pickle safe
        if isinstance(value, bool):  # YAML 1.1 reads off/no as false: a Choice may take it (its _missing_)
            try:
                return tp(value).value
            except ValueError:
                pass
        errors.append(f"{key} ({value!r}) must be one of {', '.join(allowed)}")
        return None
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-6` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is list or origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, (str, int, float)):
            return [value]
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    errors.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return None


def _default_of(fl: dataclasses.Field) -> Any:
    if fl.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return fl.default_factory()  # type: ignore[misc]
    return None if fl.default is dataclasses.MISSING else fl.default


def build_dataclass(cls: type, data: dict, prefix: str, errors: list[str], base: Any = None):
    """`cls` from a mapping, strictly; keys not given keep the values of `base` (default: the
    class defaults)."""
    hints = typing.get_type_hints(cls)
    by_name = {fl.name: fl for fl in dataclasses.fields(cls)}
    names = list(by_name)
    kwargs = {}
    for k, v in data.items():
        name = k
        if isinstance(k, str) and keyword.iskeyword(k) and f"{k}_" in by_name:
            name = f"{k}_"  # a YAML key that is a Python keyword (rollout.async) names the field async_
        if name not in names:
            key = f"{prefix}{k}"
            shown = [n[:-1] if n.endswith("_") and keyword.iskeyword(n[:-1]) else n for n in names]
            near = difflib.get_close_matches(str(k), shown, n=1, cutoff=0.6)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else f" (valid keys under '{prefix.rstrip('.') or 'top level'}': {', '.join(shown)})"
            errors.append(f"unknown key '{key}'{hint}")
            continue
        default = _default_of(by_name[name])
        coerced = _coerce(v, hints[name], f"{prefix}{k}", errors,
                          base=default if dataclasses.is_dataclass(default) else None)
        if coerced is not None or v is None:
            kwargs[name] = coerced
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except TypeError as e:  # pragma: no cover - kwargs are filtered to known fields
        errors.append(f"{prefix.rstrip('.')}: {e}")
        return cls()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def load_config(path: Optional[Union[str, Path]] = None, overrides: Iterable[str] = (),
                world_size: Optional[int] = None, validate: bool = True, root: type = Config) -> Any:
    """Load a YAML file (or only defaults when path is None), apply overrides, resolve
    interpolations, build the typed tree and validate it (with the layout for `world_size`, or the
    cluster section's world size). Raises ConfigError with every problem at once.

    root: the configuration class: Config (a training run) or SFTConfig (the warm-start stage);
    its validator comes from config.validate.validator_for(root)."""
    from megatron_denoise.config.validate import validator_for

    validate_config = validator_for(root)
    errors: list[str] = []
    tree = load_yaml_tree(path, errors) if path is not None else {}
    tree = apply_overrides(tree, overrides, errors)
    tree = resolve_interpolations(tree, errors)
    cfg = build_dataclass(root, tree, "", errors)
    if validate and not errors:
        errors.extend(validate_config(cfg, world_size))
    elif validate:
        # still report semantic problems of the keys that did parse, so nothing hides behind a typo
        errors.extend(e for e in validate_config(cfg, world_size) if e not in errors)
    if errors:
        raise ConfigError(errors, source=str(path) if path else "config")
    return cfg
