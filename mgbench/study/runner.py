"""The study driver: ask Optuna for trials, keep `parallelism` jobs in flight, tell results, reconcile on rerun.

No batch blocking: a slot is refilled as soon as its trial ends. Every trial's identity is on disk
(`trials/<n>/trial.json`) before its job starts, so a killed driver loses nothing: rerunning (or
`resume`) re-attaches to live jobs, tells Optuna about results written meanwhile, and resubmits
trials whose job died on the same trial, MLflow run and checkpoint folder.

Several drivers may work on one study at once (run the same command twice, on one storage and out_dir):
asking is serialised by a lock file in out_dir (so the study never gets more than n_trials trials, and a
grid point is never asked twice), each trial records the driver that owns it, and a driver re-attaches
only to trials whose owner is gone (same host: its process has ended; another host: its heartbeat file
in out_dir/drivers/ is stale).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from mgbench.config import ConfigError
from mgbench.study import runs
from mgbench.study.executors import _pid_alive, check_executor, job_alive, job_ref, make_executor
from mgbench.study.optuna_io import ask, open_study
from mgbench.study.overrides import record_sets
from mgbench.study.reuse import (UA_CONFIG_HASH, UA_METRICS, UA_REUSED_FROM, UA_RUN_ID, UA_STEP, UA_TRACKING_URI,
                                 config_hash, copy_run, find_source, tell_reused)
from mgbench.study.spec import StudySpec, validate_trial
from mgbench.study.trial import RESULT_FILE, TRIAL_FILE, TrialJob, read_json, trial_dir, write_json
from mgbench.study.versions import record_spec

EVENTS_FILE = "events.jsonl"  # driver timeline: one JSON line per submit / end / resubmit
LOCK_FILE = ".driver.lock"    # in out_dir: drivers of one study ask, claim and set up one at a time
DRIVERS_DIR = "drivers"       # in out_dir: one heartbeat file per running driver (<host>-<pid>)
OWNER_ATTR = "mgbench:driver"  # Optuna trial system attr: the driver that owns the trial (host, pid, start, token)
HEARTBEAT_STALE_S = 120.0     # a driver on another host counts as gone when its heartbeat is older (or 10 polls)
PROGRESS_EVERY_S = 30.0       # the driver echoes each running trial's step/total and latest metric this often


@dataclass
class InFlight:
    number: int
    job: Any | None                # the live submitit job (None: re-attached after a driver restart)
    ref: dict[str, str]            # the persistent job reference (executor, job_id, folder)


@dataclass
class StudySummary:
    n_complete: int = 0
    n_reused: int = 0              # of n_complete: copied from an equal trial of another study (not trained)
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
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_ticks(os.getpid()),
                   "token": uuid.uuid4().hex}
        self._locked = 0
        self._lock_warned = False
        with self._lock():  # another driver may be creating the same study, experiment and parent run
            record_sets(spec)  # --set values: written by the first run, the same ones required of every rerun
            record_spec(spec)  # the spec the study first ran with: a changed one is refused (--new-version)
            self.study = open_study(spec)
            self.mlflow = runs.client(spec)
            self.exp_id = runs.experiment_id(self.mlflow, spec)
            self.parent_id = runs.parent_run(self.mlflow, self.exp_id, spec)
        self.inflight: dict[int, InFlight] = {}
        self._executor: Any = None
        self._progress_shown: dict[int, Any] = {}   # trial -> the step last echoed
        self._progress_at = time.monotonic()
        self._heartbeat()

    # ------------------------------------------------------------------ the loop

    def run(self, wait: bool = True) -> StudySummary:
        """Reconcile, then keep slots full until every trial has ended (wait=False: fill once and detach)."""
        self.reconcile()
        self.fill()
        while wait:
            if not self.inflight:
                self.reconcile()  # a driver beside this one may have died with trials in flight: adopt them
                self.fill()
                if not self.inflight:
                    break
            time.sleep(self.spec.poll_s)
            self._heartbeat()
            self.poll()
            self.fill()
            self.show_progress()
        summary = self.summary()
        if wait and summary.n_running == 0:  # the last driver of the study closes the parent run
            runs.finish_parent(self.mlflow, self.parent_id, summary.n_complete, summary.best_value)
        return summary

    def fill(self) -> None:
        """Ask for new trials while a slot is free and the budget allows; submit them together."""
        new = []
        while len(self.inflight) + len(new) < self._slots():
            with self._lock():  # count + ask + claim at once: other drivers of the study wait
                if self._n_asked() >= self.spec.n_trials:
                    break
                trial, params = ask(self.study, self.spec)
                self._claim(trial._trial_id)
            try:
                self.prepare(trial.number, trial._trial_id, params)
            except ConfigError as e:
                self.echo(f"trial {trial.number}: invalid config, not run: {e}")
                self.study.tell(trial.number, state=TrialState.FAIL)
                continue
            if not self.reuse(trial.number):
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
        digest = config_hash(cfg.to_dict(), self.spec.entry, self.spec.eval_hook)
        run_id = runs.trial_run(self.mlflow, self.exp_id, self.parent_id, self.spec, number, params, cfg, digest)
        rec = {"study": self.spec.name, "number": number, "trial_id": trial_id, "run_id": run_id,
               "parent_run_id": self.parent_id, "tracking_uri": self.spec.tracking_uri, "storage": self.spec.storage,
               "out_dir": cfg.out_dir, "params": params, "config": cfg.to_dict(), "config_hash": digest, "jobs": [],
               "deaths": 0, "created_at": time.time()}
        write_json(trial_dir(self.spec, number) / TRIAL_FILE, rec)
        storage = self.study._storage  # the cache finds the trial, its run and its store by these
        for key, value in ((UA_CONFIG_HASH, digest), (UA_RUN_ID, run_id), (UA_TRACKING_URI, self.spec.tracking_uri)):
            storage.set_trial_user_attr(trial_id, key, value)
        return rec

    def reuse(self, number: int) -> bool:
        """Finish a prepared trial by copying an equal COMPLETE trial of another study (spec.reuse); False: train it."""
        if not self.spec.reuse:
            return False
        folder = trial_dir(self.spec, number)
        rec = read_json(folder / TRIAL_FILE) or {}
        digest = rec.get("config_hash")
        src = find_source(self.study._storage, self.spec.name, digest, self.spec.objective.metric) if digest else None
        if src is None:
            return False
        try:
            copy_run(self.mlflow, rec["run_id"], src, self.spec.tracking_uri)
        except Exception as e:  # noqa: BLE001 - a source run that cannot be read is trained instead
            self.echo(f"[{self.spec.name}] trial {number}: cannot copy {src.label} ({e}); training it")
            return False
        tell_reused(self.study, rec["trial_id"], number, src)
        runs.set_status(self.mlflow, rec["run_id"], "finished")
        write_json(folder / RESULT_FILE, {"status": "finished", "value": src.value, "step": src.user_attrs.get(UA_STEP),
                                          "metrics": src.user_attrs.get(UA_METRICS), "error": None,
                                          "reused_from": src.label, "finished_at": time.time()})
        self._event("reused", number, say=f"reused {src.study} #{src.number}", source=src.label, value=src.value)
        return True

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
        """Re-attach to every RUNNING trial that no running driver owns (live jobs are watched, dead ones
        handled by the next poll); trials of drivers that still run are theirs."""
        with self._lock():  # claim orphans under the lock: two drivers never adopt the same trial
            orphans = []
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if t.number in self.inflight or self._owner_running(t.system_attrs.get(OWNER_ATTR)):
                    continue
                self._claim(t._trial_id)
                orphans.append(t)
        for t in orphans:
            rec = read_json(trial_dir(self.spec, t.number) / TRIAL_FILE)
            if rec is None:  # the driver died between ask and trial.json: write it now
                params = {k: t.params[k] for k in self.spec.space if k in t.params}
                rec = self.prepare(t.number, t._trial_id, params)
            jobs = rec.get("jobs") or []
            if not jobs:
                if not self.reuse(t.number):
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
            self._record_metrics(number, result)
            self.study.tell(number, result["value"], skip_if_finished=True)
        elif status == "pruned":
            self.study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
        else:
            self.echo(f"trial {number} failed: {result.get('error')}")
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        self.inflight.pop(number)
        self._event("end", number, status=status, value=result.get("value"))

    def _record_metrics(self, number: int, result: dict[str, Any]) -> None:
        """Keep a finished trial's final metrics and step in Optuna (where other studies' caches look)."""
        rec = read_json(trial_dir(self.spec, number) / TRIAL_FILE) or {}
        storage = self.study._storage
        if "trial_id" not in rec or storage.get_trial(rec["trial_id"]).state.is_finished():
            return  # another driver told it first
        storage.set_trial_user_attr(rec["trial_id"], UA_METRICS, result.get("metrics") or {})
        storage.set_trial_user_attr(rec["trial_id"], UA_STEP, result.get("step"))

    def _died(self, number: int) -> None:
        path = trial_dir(self.spec, number) / TRIAL_FILE
        rec = read_json(path) or {}
        rec["deaths"] = rec.get("deaths", 0) + 1
        write_json(path, rec)
        self.inflight.pop(number)
        if rec["deaths"] > self.spec.max_retries:
            error = f"its job died {rec['deaths']} times without a result"
            self.echo(f"trial {number}: {error}; marked failed")
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
            runs.set_status(self.mlflow, rec["run_id"], "failed", error)
            self._event("end", number, status="failed", value=None)
            return
        self._event("resubmit", number, deaths=rec["deaths"])
        self.submit([number])

    # ------------------------------------------------------------------ drivers side by side

    @contextlib.contextmanager
    def _lock(self) -> Any:
        """An exclusive lock on out_dir/.driver.lock (flock), shared by every driver of the study."""
        if self._locked:
            self._locked += 1
            try:
                yield
            finally:
                self._locked -= 1
            return
        with open(Path(self.spec.out_dir) / LOCK_FILE, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError as e:  # a file system without flock (some Lustre mounts): one driver per study then
                if not self._lock_warned:
                    self._lock_warned = True
                    self.echo(f"[{self.spec.name}] cannot lock {f.name} ({e}): run only one driver of this study")
                yield
                return
            self._locked = 1
            try:
                yield
            finally:
                self._locked = 0
                fcntl.flock(f, fcntl.LOCK_UN)

    def _claim(self, trial_id: int) -> None:
        """Record this driver as the trial's owner (in the Optuna storage, where every driver sees it)."""
        self.study._storage.set_trial_system_attr(trial_id, OWNER_ATTR, self.me)

    def _owner_running(self, owner: dict[str, Any] | None) -> bool:
        """Whether the driver that owns a trial still runs (so this one must leave the trial alone)."""
        if not owner:
            return False  # asked by a driver that recorded no owner
        if owner.get("token") == self.me["token"]:
            return True
        if owner.get("host") == self.me["host"]:
            if owner.get("pid") == self.me["pid"]:
                return False  # an earlier driver in this process: it is not running now
            start = owner.get("start")
            return _pid_alive(int(owner["pid"])) and (start is None or _start_ticks(int(owner["pid"])) == start)
        beat = Path(self.spec.out_dir) / DRIVERS_DIR / f"{owner.get('host')}-{owner.get('pid')}"
        try:
            age = time.time() - beat.stat().st_mtime
        except FileNotFoundError:
            return False
        return age < max(HEARTBEAT_STALE_S, 10 * self.spec.poll_s)

    def _heartbeat(self) -> None:
        """Touch this driver's heartbeat file (drivers on other hosts judge by its age)."""
        beat = Path(self.spec.out_dir) / DRIVERS_DIR / f"{self.me['host']}-{self.me['pid']}"
        beat.parent.mkdir(parents=True, exist_ok=True)
        beat.touch()

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

    def show_progress(self, force: bool = False) -> None:
        """Every PROGRESS_EVERY_S, echo each running trial's step/total, rate, ETA and latest metric (from the
        `progress.json` its trainer writes), when it moved since the last echo."""
        if not force and time.monotonic() - self._progress_at < max(PROGRESS_EVERY_S, self.spec.poll_s):
            return
        from mgbench.study.status import progress_text
        from mgbench.study.trial import PROGRESS_FILE

        self._progress_at = time.monotonic()
        for number in sorted(self.inflight):
            progress = read_json(trial_dir(self.spec, number) / PROGRESS_FILE)
            if progress and progress.get("step") != self._progress_shown.get(number):
                self._progress_shown[number] = progress.get("step")
                self.echo(f"[{self.spec.name}] trial {number}: {progress_text(progress, self.spec.objective.metric)}")

    def _event(self, kind: str, number: int, say: str | None = None, **data: Any) -> None:
        """Append to the events file and echo (`say`: the echoed text instead of the event and its data)."""
        line = {"t": time.time(), "event": kind, "trial": number, "driver": self.me["pid"], **data}
        with open(Path(self.spec.out_dir) / EVENTS_FILE, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")
        say = say or f"{kind} " + " ".join(f"{k}={v}" for k, v in data.items())
        self.echo(f"[{self.spec.name}] trial {number}: {say}")

    def summary(self) -> StudySummary:
        """Counts by state and the best trial so far."""
        return summarize(self.study)


def _start_ticks(pid: int) -> str | None:
    """A process's start time (clock ticks after boot, /proc/<pid>/stat field 22): tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def summarize(study: optuna.Study) -> StudySummary:
    """Counts by Optuna state and the best trial."""
    trials = study.get_trials(deepcopy=False)
    s = StudySummary()
    s.n_complete = sum(t.state == TrialState.COMPLETE for t in trials)
    s.n_reused = sum(t.state == TrialState.COMPLETE and UA_REUSED_FROM in t.user_attrs for t in trials)
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
