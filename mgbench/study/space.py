"""A study's search space: the `space:` mapping parsed into `ParamSpec`s, the grid or corner points it spans, and
each point's trial config validated as the trainer will read it (errors name the spec file and field).
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mgbench.config import ConfigError, TrainConfig, from_dict, train_config_from_dict

if TYPE_CHECKING:
    from mgbench.study.spec import StudySpec

PARAM_TYPES = ("float", "int", "categorical")
MAX_CORNER_CHECKS = 256  # search spaces: validate at most this many corner configs up front


@dataclass
class ParamSpec:
    type: str = "float"            # float | int | categorical (a `grid:` list implies categorical)
    low: float | None = None       # float/int: lower bound (inclusive)
    high: float | None = None      # float/int: upper bound (inclusive)
    log: bool = False              # float/int: sample on a log scale
    step: float | None = None      # float/int: discretisation step
    choices: list[Any] | None = None  # categorical: the values
    grid: list[Any] | None = None  # ablation values (grid sampler; categorical for tpe/random)
    bundles: dict[str, dict[str, Any]] | None = None  # a grid of settings: label -> {dotted trainer key: value}

    @property
    def values(self) -> list[Any] | None:
        """The finite list of values, or None for a continuous range."""
        return self.grid if self.grid is not None else self.choices


def parse_space(space: Any, src: str) -> dict[str, ParamSpec]:
    if space is None:
        return {}
    if not isinstance(space, dict):
        raise ConfigError(f"{src}:space: expected a mapping of dotted trainer keys, got {type(space).__name__}")
    known = _flat_keys(TrainConfig().to_dict())
    out = {}
    for key, body in space.items():
        where = f"{src}:space.{key}"
        if isinstance(body, list):
            body = {"grid": body}
        if key not in known and isinstance(body, dict) and isinstance(body.get("grid"), list) and body["grid"] \
                and all(isinstance(v, dict) for v in body["grid"]):
            out[key] = _bundle_param(key, body, known, where)
            continue
        if key not in known:
            raise ConfigError(f"{where}: unknown trainer key (e.g. objective.w, objective.label_drop, train.seed); "
                              "or a named grid of settings: {grid: [{key: value, ...}, ...]}")
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: expected a list of grid values or a mapping (grid: [...], choices: [...], "
                              f"or type/low/high), got {body!r}")
        p = from_dict(ParamSpec, body, where)
        _check_param(p, where)
        out[key] = p
    return out


def _bundle_param(key: str, body: dict[str, Any], known: set[str], where: str) -> ParamSpec:
    """A named grid of settings (rows of an ablation that are not a product of single keys), e.g.
    `variant: {grid: [{model.w_input: false}, {model.w_input: true, objective.w_range: [1.0, 2.0]}]}`.
    Optuna sees one categorical parameter whose values are the settings' labels."""
    if set(body) - {"grid"}:
        raise ConfigError(f"{where}: a named grid of settings takes only `grid: [...]`, got {sorted(set(body) - {'grid'})}")
    bundles: dict[str, dict[str, Any]] = {}
    for i, setting in enumerate(body["grid"]):
        if not setting:
            raise ConfigError(f"{where}.grid[{i}]: empty setting (give at least one dotted trainer key)")
        for dotted in setting:
            if dotted not in known:
                raise ConfigError(f"{where}.grid[{i}].{dotted}: unknown trainer key "
                                  "(e.g. objective.w, model.w_input, objective.w_range)")
        label = " ".join(f"{k}={json.dumps(v)}" for k, v in setting.items())
        if label in bundles:
            raise ConfigError(f"{where}.grid[{i}]: repeats setting {label!r}")
        bundles[label] = dict(setting)
    return ParamSpec(type="categorical", grid=list(bundles), bundles=bundles)


def _flat_keys(d: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for k, v in d.items():
        if isinstance(v, dict):
            keys |= _flat_keys(v, f"{prefix}{k}.")
        else:
            keys.add(f"{prefix}{k}")
    return keys


def _check_param(p: ParamSpec, where: str) -> None:
    if p.grid is not None or p.choices is not None:
        vals = p.values
        if not vals:
            raise ConfigError(f"{where}.{'grid' if p.grid is not None else 'choices'}: empty list (give at least one value)")
        if p.grid is not None:
            p.type = "categorical"
        return
    if p.type not in PARAM_TYPES:
        raise ConfigError(f"{where}.type: {p.type!r} is not one of {', '.join(PARAM_TYPES)}")
    if p.type == "categorical":
        raise ConfigError(f"{where}.choices: required for type categorical")
    for b in ("low", "high"):
        if getattr(p, b) is None:
            raise ConfigError(f"{where}.{b}: required for type {p.type}")
    if p.low > p.high:
        raise ConfigError(f"{where}.low: {p.low} is above high {p.high}")
    if p.log and p.low <= 0:
        raise ConfigError(f"{where}.low: must be > 0 with log: true, got {p.low}")
    if p.log and p.step is not None:
        raise ConfigError(f"{where}.step: not allowed with log: true")
    if p.step is not None and p.step <= 0:
        raise ConfigError(f"{where}.step: must be > 0, got {p.step}")
    if p.type == "int" and any(v is not None and v != int(v) for v in (p.low, p.high, p.step)):
        raise ConfigError(f"{where}: int ranges need integer low/high/step")


def grid_points(spec: StudySpec) -> list[dict[str, Any]]:
    """Every point of a grid study, in a fixed order."""
    keys = list(spec.grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*spec.grid.values())]


def corner_points(spec: StudySpec) -> list[dict[str, Any]]:
    """Ends of every range and every finite value (the product, capped), for up-front validation."""
    axes = {}
    for key, p in spec.space.items():
        vals = p.values if p.values is not None else [p.low, p.high]
        if p.values is None and p.type == "int":
            vals = [int(v) for v in vals]
        axes[key] = list(dict.fromkeys(vals))
    keys = list(axes)
    combos = itertools.islice(itertools.product(*axes.values()), MAX_CORNER_CHECKS)
    return [dict(zip(keys, c)) for c in combos] or [{}]


def validate_trial(spec: StudySpec, params: dict[str, Any], number: int = 0) -> TrainConfig:
    """Validate one trial's resolved config; errors name the spec file and the space or base field."""
    data = spec.trial_config(params, number, str(Path(spec.out_dir) / "trials" / f"{number:04d}"))
    try:
        return train_config_from_dict(data, "trial")
    except ConfigError as e:
        msg = str(e)
        m = re.match(r"trial:([^:]+): (.*)", msg)
        if not m:
            raise ConfigError(f"{spec.path}:base: {msg}") from None
        fld, rest = m.groups()
        bundled = [k for k in params if spec.space.get(k) and spec.space[k].bundles
                   and fld in spec.space[k].bundles.get(params[k], {})]
        section = "space" if fld in params or bundled else "base"
        fld = f"{bundled[0]}.{fld}" if bundled and fld not in params else fld
        given = f" (trial {params})" if params else ""
        where = f"--set {fld}" if section == "base" and fld in spec.sets else f"{section}.{fld}"
        raise ConfigError(f"{spec.path}:{where}: {rest}{given}") from None


def validate_space(spec: StudySpec) -> None:
    """Validate the base config and every grid point (or the corners of the ranges); two grid points with one
    trial config would train the same thing twice, so they are an error naming the keys they differ in."""
    grid = spec.sampler.type == "grid"
    points = grid_points(spec) if grid else corner_points(spec)
    indices = list(itertools.product(*(range(len(v)) for v in spec.grid.values()))) if grid else []
    seen: dict[str, int] = {}
    for n, params in enumerate(points):
        config = json.dumps(validate_trial(spec, params).to_dict(), sort_keys=True, default=str)
        m = seen.setdefault(config, n)
        if grid and m != n:
            differ = [k for k, i, j in zip(spec.grid, indices[m], indices[n]) if i != j]
            raise ConfigError(f"{spec.path}:space.{differ[0]}: grid points {_point(points[m])} and {_point(params)} "
                              "give the same trial config (it would train twice; keep one value)")


def _point(params: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {json.dumps(v, default=str)}" for k, v in params.items()) + "}"
