"""Study specs: YAML -> a typed `StudySpec`, validated at the edge with `file:field: ...` errors.

This module reads the file and its fields; the search space and the trial configs it resolves to are
`mgbench.study.space`, the checks against what lies outside the spec (importable entries, store URIs, the
metrics the evaluation reports) `mgbench.study.spec_checks`.

A spec names a base trainer config (inline `base:` or `extends: other.yaml`, relative to the spec
file, with `base:` on top), a search space keyed by dotted trainer keys, the Optuna sampler, the
metric to optimise, pruning, storages and the executor. Every resolved trial config is validated with
`train_config_from_dict` before anything is submitted.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mgbench.config import ConfigError, TrainConfig, from_dict, load_yaml, set_dotted
from mgbench.metric_registry import METRICS
from mgbench.redact import mask_uri, redact, stash_uri, unstash_uri
from mgbench.study.guards import check_option_keys, check_text
from mgbench.study.space import (ParamSpec, corner_points, grid_points, parse_space,  # noqa: F401 (re-exported)
                                 validate_space, validate_trial)
from mgbench.study.spec_checks import (DEFAULT_ENTRY, DEFAULT_EVAL_HOOK, check_import, check_metric,  # noqa: F401
                                       check_uris, evaluation_metrics)

OPTUNA_SAMPLERS = ("grid", "tpe", "random")   # `sampler:` (Optuna's; the diffusion samplers are trainer.sampling's)
PRUNERS = ("none", "median", "percentile", "successive_halving", "hyperband")
EXECUTORS = ("local", "debug", "slurm")


@dataclass
class SamplerSpec:
    type: str = "tpe"              # grid | tpe | random
    seed: int | None = None        # sampler seed (reproducible suggestions)


@dataclass
class OptimizeSpec:
    metric: str = "fid"            # final evaluation metric (name without "eval/") that Optuna optimises
    direction: str | None = None   # minimize | maximize (default: the metric registry's better direction)


@dataclass
class PruningSpec:
    type: str = "none"             # none | median | percentile | successive_halving | hyperband
    n_startup_trials: int = 2      # median/percentile: no pruning until this many trials finished
    n_warmup_steps: int = 0        # median/percentile: no pruning before this trainer step
    interval_steps: int = 1        # median/percentile: check every this many reported steps
    percentile: float = 25.0       # percentile: keep trials in the best this-many percent


@dataclass
class ExecutorSpec:
    type: str = "local"            # local (subprocesses) | debug (in-process) | slurm
    profile: str | None = None     # slurm: site profile name (slurm/profiles/<name>.yaml) or path
    options: dict[str, Any] = field(default_factory=dict)  # per-study submitit/sbatch overrides (partition, mem_gb, ...)


@dataclass
class StudySpec:
    name: str                      # study name: Optuna study, MLflow experiment, default out_dir
    path: str                      # the spec file (errors name it)
    base: dict[str, Any]           # the base trainer config (extends + inline base merged)
    space: dict[str, ParamSpec]    # dotted trainer key -> how it is searched
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    n_trials: int = 0              # trials in the study (grid: the grid size by default)
    optimize: OptimizeSpec = field(default_factory=OptimizeSpec)  # what Optuna optimises (not the trainer objective.*)
    pruning: PruningSpec = field(default_factory=PruningSpec)
    storage: str = ""              # Optuna URI: sqlite:///..., journal:///path, postgresql://... (default: sqlite in out_dir)
    tracking_uri: str = ""         # MLflow URI (default: sqlite:///<out_dir>/mlflow.db)
    out_dir: str = ""              # study folder (default: runs/<name>)
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)
    parallelism: int = 1           # trials in flight at once
    max_retries: int = 3           # resubmissions of a trial whose job died without a result
    poll_s: float = 2.0            # driver: seconds between polls of running jobs
    lost_after_s: float = 600.0    # driver: a job SLURM reports UNKNOWN or no longer knows this long is lost (resubmitted)
    entry: str = DEFAULT_ENTRY     # the train function as module:attr (custom trainers, tests)
    eval_hook: str = DEFAULT_EVAL_HOOK  # evaluation-hook factory (cfg -> hook) as module:attr
    report: list[str] = field(default_factory=list)  # `mgbench report` items rendered when the study ends (toy, fig2, table3, ...)
    reuse: bool = True             # a trial whose config another study of the same storage already trained copies its result
    sets: dict[str, Any] = field(default_factory=dict)  # `--set` dotted trainer keys applied to base (recorded in out_dir)
    raw: dict[str, Any] = field(default_factory=dict)  # the spec as read, passwords masked (an MLflow artifact)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (submitit's job pickles): URIs masked, the real ones parked in the environment (stash_uri)."""
        return {**self.__dict__, "storage": stash_uri(self.storage), "tracking_uri": stash_uri(self.tracking_uri)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        uris = {"storage": unstash_uri(state["storage"]), "tracking_uri": unstash_uri(state["tracking_uri"])}
        self.__dict__.update(state, **uris)

    @property
    def grid(self) -> dict[str, list[Any]]:
        """The grid of a grid study (every param has finite values)."""
        return {k: p.values for k, p in self.space.items()}  # type: ignore[misc]

    def settings(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial's params as dotted trainer keys (a named grid of settings expanded into its keys)."""
        out: dict[str, Any] = {}
        for key, value in params.items():
            bundles = self.space[key].bundles if key in self.space else None
            out.update(bundles[value] if bundles and value in bundles else {key: value})
        return out

    def trial_config(self, params: dict[str, Any], number: int, out_dir: str) -> dict[str, Any]:
        """The trainer config mapping of one trial (base + params + its folder)."""
        data = copy.deepcopy(self.base)
        for dotted, value in self.settings(params).items():
            set_dotted(data, dotted, copy.deepcopy(value))
        data["name"] = f"{self.name}-{number:04d}"
        data["out_dir"] = out_dir
        return data


_TOP_KEYS = {"name", "extends", "base", "space", "sampler", "n_trials", "optimize", "pruning", "storage",
             "tracking_uri", "out_dir", "executor", "parallelism", "max_retries", "poll_s", "entry", "eval_hook",
             "report", "reuse", "lost_after_s"}


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None,
              sets: dict[str, Any] | None = None) -> StudySpec:
    """Read, resolve and validate a study spec; `overrides` replace top-level keys (e.g. out_dir), `sets`
    dotted keys of the base trainer config (`--set train.steps=100`)."""
    path = Path(path)
    raw = load_yaml(path)
    raw.update(overrides or {})
    src = str(path)
    check_text(raw, f"{src}:")  # a newline in a value that reaches sbatch would run as shell code
    if "objective" in raw:   # the study-level key was renamed: `objective.*` are the trainer's MG-loss keys
        raise ConfigError(f"{src}:objective: renamed `optimize` in study specs (optimize: {{metric: fid, direction: "
                          "minimize}); `objective.*` keys belong to the trainer config (base: or space:)")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{src}:{unknown[0]}: unknown key (allowed: {', '.join(sorted(_TOP_KEYS))})")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", name):
        raise ConfigError(f"{src}:name: expected a name of letters, digits, '_', '-', '.', got {name!r}")
    spec = StudySpec(name=name, path=src, base=_resolve_base(raw, path), space=parse_space(raw.get("space"), src),
                     raw=redact(copy.deepcopy(raw)))
    _apply_sets(spec, sets or {})
    spec.sampler = _parse_sampler(raw.get("sampler", "tpe"), src)
    spec.optimize = _parse_optimize(raw.get("optimize"), src)
    spec.pruning = _parse_pruning(raw.get("pruning", "none"), src)
    spec.executor = _parse_executor(raw.get("executor", "local"), src)
    for key, low in (("parallelism", 1), ("max_retries", 0), ("n_trials", 1)):
        _int_field(raw, key, src, low=low)
    spec.parallelism = raw.get("parallelism", 1)
    spec.max_retries = raw.get("max_retries", 3)
    spec.poll_s = float(_num_field(raw, "poll_s", src, 2.0))
    spec.lost_after_s = float(_num_field(raw, "lost_after_s", src, StudySpec.lost_after_s))
    for key in ("entry", "eval_hook"):
        setattr(spec, key, _str_field(raw, key, src, getattr(spec, key)))
        check_import(getattr(spec, key), key, src)
    out = Path(_out_dir(raw, src))
    spec.out_dir = str(out)
    default_cache_dir(spec.base, spec.out_dir)  # imagefolder: one latent cache for every trial and rerun
    spec.storage = _str_field(raw, "storage", src, f"sqlite:///{out / 'optuna.db'}")
    spec.tracking_uri = _str_field(raw, "tracking_uri", src, f"sqlite:///{out / 'mlflow.db'}")
    spec.report = _parse_report(raw.get("report", []), src)
    spec.reuse = _bool_field(raw, "reuse", src, True)
    _check_choices(spec, src)
    check_uris(spec, src)
    spec.n_trials = _n_trials(spec, raw.get("n_trials"), src)
    validate_space(spec)
    check_metric(spec, src)
    return spec


def spec_out_dir(path: str | Path, overrides: dict[str, Any] | None = None) -> str:
    """The study folder a spec resolves to, read before validation (where the study's records are)."""
    raw = {**load_yaml(path), **(overrides or {})}
    return _out_dir(raw, str(path))


def _out_dir(raw: dict[str, Any], src: str) -> str:
    return str(Path(_str_field(raw, "out_dir", src, f"runs/{raw.get('name')}")).expanduser().resolve())


def _apply_sets(spec: StudySpec, sets: dict[str, Any]) -> None:
    """Set `--set` dotted keys in the base config; a key the space searches would be overridden, so it is refused."""
    searched = set(spec.space) | {k for p in spec.space.values() for b in (p.bundles or {}).values() for k in b}
    for key, value in sets.items():
        check_text(value, f"{spec.path}:--set {key}")
        if key in searched:
            raise ConfigError(f"{spec.path}:space.{key}: --set {key} is searched by the study's space, so it would "
                              "be overridden (set keys of the base config only)")
        try:
            set_dotted(spec.base, key, copy.deepcopy(value))
        except ConfigError as e:
            raise ConfigError(f"{spec.path}:--set {e}") from None
    spec.sets = copy.deepcopy(sets)


def needs_latents(base: dict[str, Any]) -> bool:
    """Whether a study's base config trains on an imagefolder (SD-VAE latents)."""
    return (base.get("data") or {}).get("name") == "imagefolder"


def default_cache_dir(base: dict[str, Any], out_dir: str) -> None:
    """Point `data.cache_dir` of an imagefolder study at `<out_dir>/latents` unless it names one."""
    if needs_latents(base) and not base["data"].get("cache_dir"):
        base["data"]["cache_dir"] = str(Path(out_dir) / "latents")


def _parse_report(items: Any, src: str) -> list[str]:
    items = [items] if isinstance(items, str) else items
    if items == []:
        return []
    from mgbench.report.items import CHOICES

    if not isinstance(items, list):
        raise ConfigError(f"{src}:report: expected a list of report items, got {items!r}")
    for item in items:
        if item not in CHOICES:
            raise ConfigError(f"{src}:report: {item!r} is not one of {', '.join(CHOICES)}")
    return list(items)


def _resolve_base(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    base: dict[str, Any] = {}
    ext = raw.get("extends")
    if ext is not None:
        if not isinstance(ext, str):
            raise ConfigError(f"{path}:extends: expected a file name, got {ext!r}")
        target = (path.parent / ext).resolve()
        if not target.is_file():
            raise ConfigError(f"{path}:extends: no such file {str(target)!r} (a trainer config, relative to the spec)")
        if target == path.resolve():
            raise ConfigError(f"{path}:extends: the spec extends itself; extends takes a trainer config "
                              "(e.g. base/grid2d.yaml)")
        base = load_yaml(target)
        check_text(base, f"{target}:")
        study_keys = sorted(set(base) & (_TOP_KEYS - set(TrainConfig.__dataclass_fields__)))
        if study_keys:
            raise ConfigError(f"{path}:extends: {str(target)!r} is a study spec (it has `{study_keys[0]}`), not a "
                              "trainer config; extends does not chain (a trainer config like base/grid2d.yaml)")
    inline = raw.get("base") or {}
    if not isinstance(inline, dict):
        raise ConfigError(f"{path}:base: expected a mapping of trainer config, got {type(inline).__name__}")
    _deep_update(base, inline)
    return base


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def _parse_optimize(value: Any, src: str) -> OptimizeSpec:
    """The metric Optuna optimises and its direction; a registry metric's direction defaults from the registry and
    may not contradict it (`sweep/cfg_scale_1.00/fid` reads as fid); another metric (a custom hook's) needs one."""
    o = from_dict(OptimizeSpec, value, f"{src}:optimize")
    if o.direction is not None and o.direction not in ("minimize", "maximize"):
        raise ConfigError(f"{src}:optimize.direction: {o.direction!r} is not one of minimize, maximize")
    base = o.metric.rsplit("/", 1)[-1]
    if base in METRICS:
        better = "maximize" if METRICS[base].higher_is_better else "minimize"
        if o.direction not in (None, better):
            raise ConfigError(f"{src}:optimize.direction: {o.metric} is better {'higher' if better == 'maximize' else 'lower'}"
                              f" (the metric registry), so {o.direction} would search for the worst trials "
                              f"(allowed: {better}, or leave it out)")
        o.direction = better
    elif o.direction is None:
        raise ConfigError(f"{src}:optimize.direction: required for {o.metric!r}, which is not in the metric registry "
                          "(allowed: minimize, maximize)")
    return o


def _parse_sampler(value: Any, src: str) -> SamplerSpec:
    s = SamplerSpec(type=value) if isinstance(value, str) else from_dict(SamplerSpec, value, f"{src}:sampler")
    if s.type not in OPTUNA_SAMPLERS:
        raise ConfigError(f"{src}:sampler: {s.type!r} is not one of {', '.join(OPTUNA_SAMPLERS)}")
    return s


def _parse_pruning(value: Any, src: str) -> PruningSpec:
    p = PruningSpec(type=value) if isinstance(value, str) else from_dict(PruningSpec, value, f"{src}:pruning")
    if p.type not in PRUNERS:
        raise ConfigError(f"{src}:pruning.type: {p.type!r} is not one of {', '.join(PRUNERS)}")
    for key, low in (("n_startup_trials", 0), ("n_warmup_steps", 0), ("interval_steps", 1)):
        if getattr(p, key) < low:
            raise ConfigError(f"{src}:pruning.{key}: expected an integer >= {low}, got {getattr(p, key)!r}")
    if not 0 < p.percentile < 100:
        raise ConfigError(f"{src}:pruning.percentile: {p.percentile!r} is outside (0, 100)")
    return p


def _parse_executor(value: Any, src: str) -> ExecutorSpec:
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{src}:executor: expected local | debug | slurm or a mapping, got {value!r}")
    opts = dict(value)
    check_option_keys(opts, f"{src}:executor")  # option names reach the sbatch script unquoted
    kind = opts.pop("type", "local")
    if kind not in EXECUTORS:
        raise ConfigError(f"{src}:executor.type: {kind!r} is not one of {', '.join(EXECUTORS)}")
    profile = opts.pop("profile", None)
    if profile is not None and not isinstance(profile, str):
        raise ConfigError(f"{src}:executor.profile: expected a profile name, got {profile!r}")
    return ExecutorSpec(type=kind, profile=profile, options=opts)


def _check_choices(spec: StudySpec, src: str) -> None:
    if spec.sampler.type == "grid":
        for key, p in spec.space.items():
            if p.values is None:
                raise ConfigError(f"{src}:space.{key}: the grid sampler needs `grid: [...]` or choices, not a range")
        if not spec.space:
            raise ConfigError(f"{src}:space: the grid sampler needs at least one `grid: [...]` entry")
    scheme = spec.storage.split("://", 1)[0]
    if "://" not in spec.storage:
        raise ConfigError(f"{src}:storage: expected a URI (sqlite:///..., journal:///path, postgresql://...), "
                          f"got {mask_uri(spec.storage)!r}")
    if scheme == "journal" and not spec.storage[len("journal://"):].startswith("/"):
        raise ConfigError(f"{src}:storage: journal needs an absolute path (journal:///abs/path.log)")


def _n_trials(spec: StudySpec, value: Any, src: str) -> int:
    if spec.sampler.type == "grid":
        size = 1
        for vals in spec.grid.values():
            size *= len(vals)
        if value is not None and value > size:
            raise ConfigError(f"{src}:n_trials: {value} is more than the grid size {size}")
        return value or size
    if not value:
        raise ConfigError(f"{src}:n_trials: required (> 0) for sampler {spec.sampler.type}")
    return value


def _int_field(raw: dict[str, Any], key: str, src: str, low: int) -> None:
    v = raw.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
        raise ConfigError(f"{src}:{key}: expected an integer >= {low}, got {v!r}")


def _bool_field(raw: dict[str, Any], key: str, src: str, default: bool) -> bool:
    v = raw.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{src}:{key}: expected true or false, got {v!r}")
    return v


def _num_field(raw: dict[str, Any], key: str, src: str, default: float) -> float:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise ConfigError(f"{src}:{key}: expected a number > 0, got {v!r}")
    return v


def _str_field(raw: dict[str, Any], key: str, src: str, default: str) -> str:
    v = raw.get(key)
    if v is None:
        return default
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{src}:{key}: expected a non-empty string, got {v!r}")
    return v
