"""The study driver: ask Optuna for trials, keep `parallelism` jobs in flight, tell results, reconcile on rerun.

No batch blocking: a slot is refilled as soon as its trial ends. Every trial's identity is on disk
(`trials/<n>/trial.json`) before its job starts, so a killed driver loses nothing: rerunning (or
`resume`) re-attaches to live jobs, tells Optuna about results written meanwhile, and resubmits
trials whose job died on the same trial, MLflow run and checkpoint folder.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from mgbench.config import ConfigError
from mgbench.study import runs
from mgbench.study.executors import check_executor, job_alive, job_ref, make_executor
from mgbench.study.optuna_io import ask, open_study
from mgbench.study.spec import StudySpec, validate_trial
from mgbench.study.trial import RESULT_FILE, TRIAL_FILE, TrialJob, read_json, trial_dir, write_json

EVENTS_FILE = "events.jsonl"  # driver timeline: one JSON line per submit / end / resubmit


@dataclass
class InFlight:
    number: int
    job: Any | None                # the live submitit job (None: re-attached after a driver restart)
    ref: dict[str, str]            # the persistent job reference (executor, job_id, folder)


@dataclass
class StudySummary:
    n_complete: int = 0
    n_pruned: int = 0
    n_failed: int = 0
    n_running: int = 0
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)


class Driver:
    """Runs one study from its spec; rerunning it on the same spec resumes."""

    def __init__(self, spec: StudySpec, echo: Callable[[str], None] = print) -> None:
        self.spec = spec
        self.echo = echo
        check_executor(spec)
        Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
        self.study = open_study(spec)
        self.mlflow = runs.client(spec)
        self.exp_id = runs.experiment_id(self.mlflow, spec)
        self.parent_id = runs.parent_run(self.mlflow, self.exp_id, spec)
        self.inflight: dict[int, InFlight] = {}
        self._executor: Any = None

    # ------------------------------------------------------------------ the loop

    def run(self, wait: bool = True) -> StudySummary:
        """Reconcile, then keep slots full until every trial has ended (wait=False: fill once and detach)."""
        self.reconcile()
        self.fill()
        while wait and self.inflight:
            time.sleep(self.spec.poll_s)
            self.poll()
            self.fill()
        summary = self.summary()
        if wait:
            runs.finish_parent(self.mlflow, self.parent_id, summary.n_complete, summary.best_value)
        return summary

    def fill(self) -> None:
        """Ask for new trials while a slot is free and the budget allows; submit them together."""
        new = []
        while len(self.inflight) + len(new) < self._slots() and self._n_asked() < self.spec.n_trials:
            trial, params = ask(self.study, self.spec)
            try:
                self.prepare(trial.number, trial._trial_id, params)
            except ConfigError as e:
                self.echo(f"trial {trial.number}: invalid config, not run: {e}")
                self.study.tell(trial.number, state=TrialState.FAIL)
                continue
            new.append(trial.number)
        if new:
            self.submit(new)

    def poll(self) -> None:
        """Handle every in-flight trial whose job has ended."""
        for number, f in list(self.inflight.items()):
            path = trial_dir(self.spec, number) / RESULT_FILE
            result = read_json(path)  # a final result frees the slot before the job's process exits
            if result is None or result.get("status") == "paused":
                if job_alive(f.ref, f.job):
                    continue
                result = read_json(path)  # written while the job ended (debug jobs run inside job_alive)
            if result is None:
                self._died(number)
            else:
                self._ended(number, result)

    # ------------------------------------------------------------------ trials

    def prepare(self, number: int, trial_id: int, params: dict[str, Any]) -> dict[str, Any]:
        """Validate the trial's config, open its MLflow run and write `trial.json` (before any training)."""
        cfg = validate_trial(self.spec, params, number)
        run_id = runs.trial_run(self.mlflow, self.exp_id, self.parent_id, self.spec, number, params, cfg)
        rec = {"study": self.spec.name, "number": number, "trial_id": trial_id, "run_id": run_id,
               "parent_run_id": self.parent_id, "tracking_uri": self.spec.tracking_uri, "storage": self.spec.storage,
               "out_dir": cfg.out_dir, "params": params, "config": cfg.to_dict(), "jobs": [], "deaths": 0,
               "created_at": time.time()}
        write_json(trial_dir(self.spec, number) / TRIAL_FILE, rec)
        return rec

    def submit(self, numbers: list[int]) -> None:
        """Submit trials (SLURM: several at once go out as one job array)."""
        for n in numbers:  # a stale result (a paused run) must not be read as this job's outcome
            (trial_dir(self.spec, n) / RESULT_FILE).unlink(missing_ok=True)
        ex = self._get_executor()
        fns = [TrialJob(self.spec, n) for n in numbers]
        if self.spec.executor.type == "slurm" and len(fns) > 1:
            jobs = ex.submit_array(fns)
        else:
            jobs = [ex.submit(fn) for fn in fns]
        for n, job in zip(numbers, jobs):
            ref = job_ref(self.spec, job).to_dict()
            path = trial_dir(self.spec, n) / TRIAL_FILE
            rec = read_json(path) or {}
            rec.setdefault("jobs", []).append({**ref, "submitted_at": time.time()})
            write_json(path, rec)
            self.inflight[n] = InFlight(n, job, ref)
            self._event("submit", n, job_id=ref["job_id"])

    def reconcile(self) -> None:
        """Re-attach to every RUNNING trial: live jobs are watched, dead ones handled by the next poll."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number in self.inflight:
                continue
            rec = read_json(trial_dir(self.spec, t.number) / TRIAL_FILE)
            if rec is None:  # the driver died between ask and trial.json: write it now
                params = {k: t.params[k] for k in self.spec.space if k in t.params}
                rec = self.prepare(t.number, t._trial_id, params)
            jobs = rec.get("jobs") or []
            if not jobs:
                self.submit([t.number])
                continue
            self.inflight[t.number] = InFlight(t.number, None, jobs[-1])
            self._event("attach", t.number, job_id=jobs[-1]["job_id"])
        self.poll()

    def _ended(self, number: int, result: dict[str, Any]) -> None:
        status = result.get("status")
        if status == "paused":
            self._event("paused", number, step=result.get("step"))
            self.inflight.pop(number)
            self.submit([number])
            return
        if status == "finished":
            self.study.tell(number, result["value"], skip_if_finished=True)
        elif status == "pruned":
            self.study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
        else:
            self.echo(f"trial {number} failed: {result.get('error')}")
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        self.inflight.pop(number)
        self._event("end", number, status=status, value=result.get("value"))

    def _died(self, number: int) -> None:
        path = trial_dir(self.spec, number) / TRIAL_FILE
        rec = read_json(path) or {}
        rec["deaths"] = rec.get("deaths", 0) + 1
        write_json(path, rec)
        self.inflight.pop(number)
        if rec["deaths"] > self.spec.max_retries:
            self.echo(f"trial {number}: its job died {rec['deaths']} times without a result; marked failed")
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
            runs.set_status(self.mlflow, rec["run_id"], "failed")
            self._event("end", number, status="failed", value=None)
            return
        self._event("resubmit", number, deaths=rec["deaths"])
        self.submit([number])

    # ------------------------------------------------------------------ helpers

    def _get_executor(self) -> Any:
        if self._executor is None:
            self._executor = make_executor(self.spec)
        return self._executor

    def _slots(self) -> int:
        """Trials in flight at once: SLURM grids go out whole as one array (SLURM throttles it to %parallelism)."""
        if self.spec.executor.type == "slurm" and self.spec.sampler.type == "grid":
            return self.spec.n_trials
        return self.spec.parallelism

    def _n_asked(self) -> int:
        return len(self.study.get_trials(deepcopy=False))

    def _event(self, kind: str, number: int, **data: Any) -> None:
        line = {"t": time.time(), "event": kind, "trial": number, **data}
        with open(Path(self.spec.out_dir) / EVENTS_FILE, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")
        self.echo(f"[{self.spec.name}] trial {number}: {kind} " + " ".join(f"{k}={v}" for k, v in data.items()))

    def summary(self) -> StudySummary:
        """Counts by state and the best trial so far."""
        return summarize(self.study)


def summarize(study: optuna.Study) -> StudySummary:
    """Counts by Optuna state and the best trial."""
    trials = study.get_trials(deepcopy=False)
    s = StudySummary()
    s.n_complete = sum(t.state == TrialState.COMPLETE for t in trials)
    s.n_pruned = sum(t.state == TrialState.PRUNED for t in trials)
    s.n_failed = sum(t.state == TrialState.FAIL for t in trials)
    s.n_running = sum(t.state == TrialState.RUNNING for t in trials)
    if s.n_complete:
        best = study.best_trial
        s.best_value, s.best_params = best.value, dict(best.params)
    return s


def run_study(spec: StudySpec, wait: bool = True, echo: Callable[[str], None] = print) -> StudySummary:
    """Run (or resume) a study to the end; wait=False submits what fits and returns."""
    return Driver(spec, echo).run(wait=wait)
