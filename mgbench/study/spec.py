"""Study specs: YAML -> a typed `StudySpec`, validated at the edge with `file:field: ...` errors.

A spec names a base trainer config (inline `base:` or `extends: other.yaml`, relative to the spec
file, with `base:` on top), a search space keyed by dotted trainer keys, the Optuna sampler, the
objective, pruning, storages and the executor. Every resolved trial config is validated with
`train_config_from_dict` before anything is submitted.
"""
from __future__ import annotations

import copy
import importlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mgbench.config import ConfigError, TrainConfig, from_dict, load_yaml, set_dotted, train_config_from_dict
from mgbench.metric_registry import family_metrics
from mgbench.redact import mask_uri, redact, stash_uri, unstash_uri
from mgbench.study.guards import check_option_keys, check_text

SAMPLERS = ("grid", "tpe", "random")
PRUNERS = ("none", "median", "percentile", "successive_halving", "hyperband")
EXECUTORS = ("local", "debug", "slurm")
PARAM_TYPES = ("float", "int", "categorical")
MAX_CORNER_CHECKS = 256  # search spaces: validate at most this many corner configs up front
STORAGE_SCHEMES = ("sqlite", "journal", "postgresql", "mysql")  # Optuna storages (RDB schemes may add +driver)
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")  # MLflow
DEFAULT_EVAL_HOOK = "mgbench.evaluation:make_eval_hook"
GRID2D_METRICS = tuple(family_metrics("grid2d"))  # the registry, in mgbench.evaluation.grid2d.grid_metrics order
IMAGE_METRICS = ("fid", "sfid", "is", "kid", "precision", "recall")  # mgbench.evaluation.metrics.IMAGE_METRICS


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


@dataclass
class SamplerSpec:
    type: str = "tpe"              # grid | tpe | random
    seed: int | None = None        # sampler seed (reproducible suggestions)


@dataclass
class ObjectiveSpec:
    metric: str = "fid"            # final evaluation metric (name without "eval/") that Optuna optimises
    direction: str = "minimize"    # minimize | maximize


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
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    pruning: PruningSpec = field(default_factory=PruningSpec)
    storage: str = ""              # Optuna URI: sqlite:///..., journal:///path, postgresql://... (default: sqlite in out_dir)
    tracking_uri: str = ""         # MLflow URI (default: sqlite:///<out_dir>/mlflow.db)
    out_dir: str = ""              # study folder (default: runs/<name>)
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)
    parallelism: int = 1           # trials in flight at once
    max_retries: int = 3           # resubmissions of a trial whose job died without a result
    poll_s: float = 2.0            # driver: seconds between polls of running jobs
    lost_after_s: float = 600.0    # driver: a job SLURM reports UNKNOWN or no longer knows this long is lost (resubmitted)
    entry: str = "mgbench.trainer.loop:train"  # the train function as module:attr (custom trainers, tests)
    eval_hook: str = "mgbench.evaluation:make_eval_hook"  # evaluation-hook factory (cfg -> hook) as module:attr
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


_TOP_KEYS = {"name", "extends", "base", "space", "sampler", "n_trials", "objective", "pruning", "storage",
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
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{src}:{unknown[0]}: unknown key (allowed: {', '.join(sorted(_TOP_KEYS))})")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", name):
        raise ConfigError(f"{src}:name: expected a name of letters, digits, '_', '-', '.', got {name!r}")
    spec = StudySpec(name=name, path=src, base=_resolve_base(raw, path), space=_parse_space(raw.get("space"), src),
                     raw=redact(copy.deepcopy(raw)))
    _apply_sets(spec, sets or {})
    spec.sampler = _parse_sampler(raw.get("sampler", "tpe"), src)
    spec.objective = from_dict(ObjectiveSpec, raw.get("objective"), f"{src}:objective")
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
        _check_import(getattr(spec, key), key, src)
    out = Path(_out_dir(raw, src))
    spec.out_dir = str(out)
    from mgbench.study.prepare import default_cache_dir

    default_cache_dir(spec.base, spec.out_dir)  # imagefolder: one latent cache for every trial and rerun
    spec.storage = _str_field(raw, "storage", src, f"sqlite:///{out / 'optuna.db'}")
    spec.tracking_uri = _str_field(raw, "tracking_uri", src, f"sqlite:///{out / 'mlflow.db'}")
    spec.report = _parse_report(raw.get("report", []), src)
    spec.reuse = _bool_field(raw, "reuse", src, True)
    _check_choices(spec, src)
    _check_uris(spec, src)
    spec.n_trials = _n_trials(spec, raw.get("n_trials"), src)
    validate_space(spec)
    _check_metric(spec, src)
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


def _check_import(value: str, key: str, src: str) -> None:
    """`module:function` must import here, before any job would fail on it (mgbench's own defaults always do)."""
    if value in (StudySpec.entry, DEFAULT_EVAL_HOOK):
        return  # importing the trainer loads torch: seconds that a one-line spec error should not wait for
    module, _, attr = value.partition(":")
    if not module or not attr:
        raise ConfigError(f"{src}:{key}: expected module:function, got {value!r}")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - one line for the user
        raise ConfigError(f"{src}:{key}: cannot import {module!r} ({type(e).__name__}: {_first_line(e)}); "
                          "expected an importable module:function") from None
    if not callable(getattr(mod, attr, None)):
        raise ConfigError(f"{src}:{key}: module {module!r} has no function {attr!r} (expected module:function)")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _check_uris(spec: StudySpec, src: str) -> None:
    """Storage and tracking URIs: a known scheme, and a local database file in a folder that exists (or in out_dir)."""
    scheme = spec.storage.split("://", 1)[0]
    if scheme.split("+", 1)[0] not in STORAGE_SCHEMES:
        raise ConfigError(f"{src}:storage: scheme {scheme!r} is not one of sqlite:///, journal:///, postgresql://, "
                          f"mysql:// (got {mask_uri(spec.storage)!r})")
    if scheme == "sqlite":
        _check_db_file(spec.storage, "sqlite:///", spec.out_dir, f"{src}:storage")
    elif scheme == "journal":
        _check_db_file(spec.storage, "journal://", spec.out_dir, f"{src}:storage")
    uri = spec.tracking_uri
    m = re.match(r"([A-Za-z][A-Za-z0-9+.\-]*):", uri)
    if m is None or len(m.group(1)) == 1:  # a plain path (or a Windows drive letter): MLflow's file store
        _check_folder(Path(uri).expanduser().resolve().parent, spec.out_dir, f"{src}:tracking_uri", uri)
        return
    scheme = m.group(1)
    if scheme.split("+", 1)[0] not in TRACKING_SCHEMES:
        raise ConfigError(f"{src}:tracking_uri: scheme {scheme!r} is not one of {', '.join(TRACKING_SCHEMES)} "
                          f"(got {mask_uri(uri)!r})")
    if scheme == "sqlite":
        _check_db_file(uri, "sqlite:///", spec.out_dir, f"{src}:tracking_uri")
    elif scheme in ("http", "https") and not re.match(r"https?://[^/:]+", uri):
        raise ConfigError(f"{src}:tracking_uri: expected http(s)://host[:port], got {mask_uri(uri)!r}")


def _check_db_file(uri: str, prefix: str, out_dir: str, where: str) -> None:
    if not uri.startswith(prefix) or len(uri) == len(prefix) or uri.endswith(":memory:"):
        raise ConfigError(f"{where}: expected {prefix}<file> (a file shared by the driver and every job), got {uri!r}")
    path = Path(uri[len(prefix):]).expanduser().resolve()
    if path.is_dir():
        raise ConfigError(f"{where}: {str(path)!r} is a folder; expected a file in it, "
                          f"e.g. {prefix}{path / 'study.db'}")
    _check_folder(path.parent, out_dir, where, uri)


def _check_folder(folder: Path, out_dir: str, where: str, uri: str) -> None:
    """A local store's folder must exist, or be out_dir, inside it or above it (the driver creates out_dir with its
    parents): a typo makes no new study."""
    out = Path(out_dir).expanduser().resolve()
    if folder.is_dir() or folder.is_relative_to(out) or out.is_relative_to(folder):
        return
    raise ConfigError(f"{where}: folder {str(folder)!r} does not exist (create it, or keep the file under "
                      f"out_dir {out_dir!r}); got {uri!r}")


def evaluation_metrics(cfg: TrainConfig) -> list[str]:
    """The final metrics mgbench's evaluation hook (mgbench.evaluation.hook) reports for a trial config."""
    ev = cfg.eval
    if cfg.data.name == "grid2d":
        names = list(GRID2D_METRICS)
    else:
        wanted = set()
        for m in ev.metrics:
            wanted.update(("precision", "recall") if m in ("prc", "precision", "recall") else (m,))
        names = [m for m in IMAGE_METRICS if m in wanted]
        if ev.extractor == "classifier" or (ev.extractor == "auto" and cfg.data.name in ("digits", "mnist")):
            names.append("extractor_acc")
    names.append("nfe")
    sweep = [f"sweep/cfg_scale_{float(s):.2f}/{m}" for s in ev.cfg_sweep for m in names]
    if "img_per_s" in ev.metrics:
        names.append("img_per_s")
    return names + sweep


def _check_metric(spec: StudySpec, src: str) -> None:
    """With mgbench's own evaluation, the objective must be a metric it reports (else every trial fails at the end)."""
    if spec.eval_hook != DEFAULT_EVAL_HOOK:
        return  # a custom hook reports what it likes
    points = grid_points(spec) if spec.sampler.type == "grid" else corner_points(spec)
    names = evaluation_metrics(validate_trial(spec, points[0]))
    metric = spec.objective.metric
    if metric not in names:
        raise ConfigError(f"{src}:objective.metric: {metric!r} is not reported by the evaluation of this study "
                          f"(allowed: {', '.join(names)})")


def _parse_report(items: Any, src: str) -> list[str]:
    items = [items] if isinstance(items, str) else items
    if items == []:
        return []
    from mgbench.report.cli import CHOICES  # pandas: loaded only for specs that render reports

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


def _parse_space(space: Any, src: str) -> dict[str, ParamSpec]:
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


def _parse_sampler(value: Any, src: str) -> SamplerSpec:
    s = SamplerSpec(type=value) if isinstance(value, str) else from_dict(SamplerSpec, value, f"{src}:sampler")
    if s.type not in SAMPLERS:
        raise ConfigError(f"{src}:sampler: {s.type!r} is not one of {', '.join(SAMPLERS)}")
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
    if spec.objective.direction not in ("minimize", "maximize"):
        raise ConfigError(f"{src}:objective.direction: {spec.objective.direction!r} is not one of minimize, maximize")
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


# ----------------------------------------------------------------------------- trial configs


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
