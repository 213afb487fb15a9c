"""The Optuna side of a study: storage URIs, samplers, pruners, distributions."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from mgbench.study.spec import StudySpec

optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_storage(uri: str) -> Any:
    """An Optuna storage from a URI: `journal:///path` -> journal file, anything else -> RDB (sqlite, postgresql)."""
    if uri.startswith("journal://"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = Path(uri[len("journal://"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return uri


class AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler for ask/tell: the driver counts trials itself, so a finished grid must not call study.stop()."""

    def after_trial(self, study: optuna.Study, trial: Any, state: Any, values: Any) -> None:
        pass


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The study's sampler (grid sampler over the spec's grid, TPE or random)."""
    s = spec.sampler
    if s.type == "grid":
        return AskTellGridSampler(spec.grid, seed=s.seed)
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    return optuna.samplers.TPESampler(seed=s.seed)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The study's pruner, judged on the intermediate evaluations the trial job reports."""
    p = spec.pruning
    if p.type == "median":
        return optuna.pruners.MedianPruner(p.n_startup_trials, p.n_warmup_steps, p.interval_steps)
    if p.type == "percentile":
        return optuna.pruners.PercentilePruner(p.percentile, p.n_startup_trials, p.n_warmup_steps, p.interval_steps)
    if p.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def open_study(spec: StudySpec, create: bool = True) -> optuna.Study:
    """Create (or load) the spec's Optuna study with its sampler and pruner."""
    storage = make_storage(spec.storage)
    if create:
        return optuna.create_study(study_name=spec.name, storage=storage, sampler=make_sampler(spec),
                                   pruner=make_pruner(spec), direction=spec.optimize.direction,
                                   load_if_exists=True)
    return optuna.load_study(study_name=spec.name, storage=storage, sampler=make_sampler(spec),
                             pruner=make_pruner(spec))


def distributions(spec: StudySpec) -> dict[str, BaseDistribution]:
    """Optuna distributions of the search space (finite values -> categorical)."""
    out: dict[str, BaseDistribution] = {}
    for key, p in spec.space.items():
        if p.values is not None:
            out[key] = CategoricalDistribution(p.values)
        elif p.type == "int":
            out[key] = IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[key] = FloatDistribution(float(p.low), float(p.high), log=p.log, step=p.step)
    return out


def ask(study: optuna.Study, spec: StudySpec) -> tuple[optuna.Trial, dict[str, Any]]:
    """Ask the sampler for the next trial and its params (in the spec's key order)."""
    trial = study.ask(distributions(spec))
    return trial, {k: trial.params[k] for k in spec.space}
