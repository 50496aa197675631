"""One config model for every command: a frozen dataclass, loaded from YAML, overridden by CLI flags.

Precedence: dataclass defaults < YAML file < flags given on the command line. Unknown keys and wrong types fail
on the driver before Ray starts, naming the key and the valid ones.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    pass


# Settings that are counts (>= 1 when given), and resources (CPUs > 0, GPUs >= 0), checked by name for every job
# config (``check_ranges``), so a 0 is refused rather than taken as "unset" by an ``or default``.
COUNTS = ("batch_size", "max_tokens", "max_rows", "rows_per_file", "tokenizer_replicas", "search_batch", "miners",
          "pool", "nprobe", "shard_rows", "text_store_shards", "storage_retries", "max_length", "teacher_max_length",
          "report_max_queries")  # fmt: skip


def check_ranges(cfg) -> None:
    """Raise ValueError naming the first setting out of its range (see ``COUNTS``)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None or isinstance(value, (bool, str)) or not isinstance(value, (int, float)):
            continue
        if f.name in COUNTS and value < 1:
            raise ValueError(f"{f.name} must be >= 1, got {value}")
        if f.name.endswith("num_cpus") and not value > 0:
            raise ValueError(f"{f.name} must be > 0, got {value}")
        if f.name.endswith("num_gpus") and not value >= 0:
            raise ValueError(f"{f.name} must be >= 0, got {value}")
        if f.name.endswith("_mb") and not value > 0:
            raise ValueError(f"{f.name} must be > 0, got {value}")


# A model stage's pool size: a number, or "auto" (the default) to follow the cluster's GPUs (runtime.replicas_for).
Replicas = int | Literal["auto"] | None


def _coerce(name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args or hint is Any:
            return None
        raise ConfigError(f"{name} must not be null")
    if origin in (typing.Union, types.UnionType):
        non_null = [a for a in args if a is not type(None)]
        errors = []
        for a in non_null:
            try:
                return _coerce(name, value, a)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        # "replicas must be an integer or one of ['auto'], got 'many'"
        head, tail = f"{name} must be ", f", got {value!r}"
        wants = [e[len(head) : -len(tail)] for e in errors if e.startswith(head) and e.endswith(tail)]
        raise ConfigError(f"{head}{' or '.join(wants)}{tail}" if len(wants) == len(errors) else errors[0])
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        item = args[0]
        if item in (int, float):  # "896,256" from a flag
            value = [_number(name, v, item) if isinstance(v, str) else v for v in value]
        return tuple(_coerce(name, v, item) for v in value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {list(args)}, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value


def _number(name: str, text: str, kind):
    try:
        return kind(text)
    except ValueError as e:
        raise ConfigError(f"{name} must hold {kind.__name__}s, got {text!r}") from e


def build(cls, values: dict[str, Any]):
    """Make a ``cls`` from a flat mapping, checking keys and types; ``__post_init__`` checks ranges."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {sorted(fields)}")
    kwargs = {k: _coerce(k, v, hints[k]) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e


def load(cls, path: str | None, overrides: dict[str, Any]):
    """Defaults < YAML at ``path`` < overrides (flags the user actually gave)."""
    values: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of keys to values")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update(overrides)
    return build(cls, values)


def to_dict(cfg) -> dict[str, Any]:
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


@dataclasses.dataclass(frozen=True, kw_only=True)
class StorageSettings:
    """Object-storage settings every job takes. Credentials come from the standard AWS variables and profiles,
    never from here."""

    storage_endpoint: str | None = None  # S3-compatible endpoint URL; default AWS_ENDPOINT_URL(_S3), else AWS
    storage_region: str | None = None  # default AWS_REGION / AWS_DEFAULT_REGION
    storage_retries: int = 10  # attempts per storage request (backoff with jitter)

    def storage(self):
        from operators.storage import StorageConfig

        return StorageConfig(endpoint=self.storage_endpoint, region=self.storage_region, retries=self.storage_retries)
