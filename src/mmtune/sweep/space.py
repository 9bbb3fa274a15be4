"""Search spaces: a YAML file of config keys, each a fixed value or a distribution to sample.

```yaml
options.method: lora                          # a plain value: fixed in every trial
train.lr: {loguniform: [1.0e-4, 1.0e-2]}      # log-uniform float in [low, high]
train.weight_decay: {uniform: [0.0, 0.3]}     # uniform float in [low, high]
options.lora_r: {choice: [4, 8, 16]}          # one of a list
model.unfreeze_top_k: {int: [0, 4]}           # integer in [low, high], both included
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mmtune.config import Config, all_keys, load_config, read_yaml_mapping, unknown_key_error
from mmtune.errors import ConfigError

KINDS = ("choice", "int", "uniform", "loguniform")
GRID_POINTS = 3  # a continuous range on the grid sampler: its two ends and its middle


@dataclass(frozen=True)
class Param:
    """One searched key: its distribution kind and arguments (a [low, high] range or choices)."""

    key: str
    kind: str
    args: tuple

    def candidates(self) -> list[Any]:
        """Values that bound the range (or every choice): what validation tries in the config."""
        return list(self.args)

    def grid(self) -> list[Any]:
        """The values the grid sampler visits."""
        if self.kind == "choice":
            return list(self.args)
        lo, hi = self.args
        if self.kind == "int":
            return list(range(lo, hi + 1))
        if self.kind == "loguniform":
            ratio = (hi / lo) ** (1 / (GRID_POINTS - 1))
            return [lo * ratio**i for i in range(GRID_POINTS)]
        return [lo + (hi - lo) * i / (GRID_POINTS - 1) for i in range(GRID_POINTS)]

    def suggest(self, trial) -> Any:
        """Ask an Optuna trial for this key's value."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.args))
        lo, hi = self.args
        if self.kind == "int":
            return trial.suggest_int(self.key, lo, hi)
        return trial.suggest_float(self.key, lo, hi, log=self.kind == "loguniform")


@dataclass(frozen=True)
class Space:
    """A parsed space file: searched keys and fixed overrides."""

    params: tuple[Param, ...]
    fixed: dict

    def grid(self) -> dict[str, list]:
        return {p.key: p.grid() for p in self.params}


@dataclass(frozen=True)
class Base:
    """The sweep's base config: a YAML file (or None for defaults) plus command-line overrides."""

    path: str | None
    overrides: dict

    def load(self, extra: dict | None = None) -> Config:
        """The base config with `extra` overrides applied, task options validated."""
        from mmtune.config import validate_options

        cfg = load_config(self.path, {**self.overrides, **(extra or {})})
        model = options_model(cfg.task)
        if model is not None:
            validate_options(cfg, model)
        return cfg


def load_space(path: str | Path, base: Base) -> Space:
    """Read and check a space file against the base config; ConfigError naming the bad key."""
    tree = read_yaml_mapping(path)
    try:
        space = parse_space(tree)
        check_space(space, base)
    except ConfigError as e:
        raise ConfigError(f"space file {path}: {e}") from None
    return space


def parse_space(tree: dict) -> Space:
    """Split a mapping of dotted keys into distributions and fixed values."""
    params, fixed = [], {}
    for key, value in tree.items():
        key = str(key)
        if isinstance(value, dict):
            params.append(_param(key, value))
        else:
            fixed[key] = value
    if not params:
        raise ConfigError(f"no key to search: give one a distribution ({', '.join(KINDS)})")
    return Space(tuple(params), fixed)


def _param(key: str, spec: dict) -> Param:
    if len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"'{key}': {spec} is not a distribution (one of {', '.join(KINDS)})")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"'{key}': {kind} needs a non-empty list, got {args!r}")
    if kind == "choice":
        return Param(key, kind, tuple(args))
    if len(args) != 2 or not all(_is_number(a) for a in args):
        raise ConfigError(f"'{key}': {kind} needs [low, high] numbers, got {args}")
    lo, hi = args
    if kind == "int" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"'{key}': int needs integer bounds, got {args}")
    if hi < lo or (kind != "int" and hi == lo):
        raise ConfigError(f"'{key}': empty range {args} (low must be below high)")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"'{key}': loguniform needs a positive low bound, got {lo}")
    if kind != "int":
        lo, hi = float(lo), float(hi)
    return Param(key, kind, (lo, hi))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_space(space: Space, base: Base) -> None:
    """Every key exists (config or task options) and every bound is a value the config accepts."""
    known = set(all_keys(Config))
    options = options_model(base.load().task)
    for key in [p.key for p in space.params] + list(space.fixed):
        if key.startswith("options."):
            name = key.split(".", 1)[1]
            if options is not None and name not in options.model_fields:
                names = ", ".join(options.model_fields)
                raise ConfigError(f"unknown config key '{key}' (task options: {names})")
        elif key not in known:
            raise unknown_key_error(key)
    for p in space.params:
        for value in p.candidates():
            base.load({**space.fixed, p.key: value})


def options_model(task: str) -> type[BaseModel] | None:
    """The task's declared options model (None for a task without options)."""
    from mmtune.tasks import NoOptions, get_task

    options = get_task(task).Options  # an unknown task fails here, naming it
    return None if options is NoOptions else options
