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

Every job state has an outcome (mgbench.study.jobstate): a job SLURM reports UNKNOWN or no longer knows for
`lost_after_s` is lost (resubmitted from its checkpoint, counted against max_retries); a cancelled job
(`mgbench study cancel`, an outside scancel) ends its trial as CANCELLED (mgbench.study.outcomes); a job
sbatch refuses fails its trial with sbatch's message, and stops the driver (exit 2) when no submit of it was
accepted. Resubmissions wait for a free slot, as new trials do (never outside the array's parallelism).
Each side effect is preceded by its intent in trial.json (the MLflow run, the submission token), so a rerun
after a driver killed in between adopts the run or job instead of repeating it (kill points:
mgbench.study.crashpoints).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from mgbench.config import ConfigError
from mgbench.redact import mask_uri
from mgbench.study import runs
from mgbench.study.crashpoints import crash_point
from mgbench.study.executors import check_executor, make_executor, pause, release
from mgbench.study.jobstate import (
    ALIVE,
    CANCELLED,
    LOST_AFTER_S,
    UNKNOWN,
    UNREACHABLE,
    job_states,
    pid_alive,
)
from mgbench.study.lifecycle import InFlight, JobLifecycle
from mgbench.study.optuna_io import ask, open_study
from mgbench.study.outcomes import (
    CANCEL_REASON,
    LOCK_FILE,
    UA_RETRY_OF,
    carry_checkpoints,
    enqueue_retries,
    is_cancelled,
    n_budget,
)
from mgbench.study.overrides import record_sets
from mgbench.study.reuse import (
    UA_CONFIG_HASH,
    UA_METRICS,
    UA_REUSED_FROM,
    UA_RUN_ID,
    UA_STEP,
    UA_TRACKING_URI,
    config_hash,
    copy_run,
    find_source,
    tell_reused,
)
from mgbench.study.space import validate_trial
from mgbench.study.spec import StudySpec
from mgbench.study.trial import (
    RESULT_FILE,
    RESUMABLE,
    TRIAL_FILE,
    read_json,
    trial_dir,
    write_json,
)
from mgbench.study.versions import record_spec

EVENTS_FILE = "events.jsonl"  # driver timeline: one JSON line per submit / end / resubmit
DRIVERS_DIR = "drivers"       # in out_dir: one heartbeat file per running driver (<host>-<pid>)
OWNER_ATTR = "mgbench:driver"  # Optuna trial system attr: the driver that owns the trial (host, pid, start, token)
HEARTBEAT_STALE_S = 120.0     # a driver on another host counts as gone when its heartbeat is older (or 10 polls)
PROGRESS_EVERY_S = 30.0       # the driver echoes each running trial's step/total and latest metric this often


@dataclass
class StudySummary:
    n_complete: int = 0
    n_reused: int = 0              # of n_complete: copied from an equal trial of another study (not trained)
    n_pruned: int = 0
    n_failed: int = 0              # cancelled trials not included
    n_cancelled: int = 0
    n_running: int = 0
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)


class Driver(JobLifecycle):
    """Runs one study from its spec; rerunning it on the same spec resumes."""

    lost_after_s = LOST_AFTER_S    # a job SLURM says UNKNOWN or forgot this long is lost (the spec's lost_after_s)

    def __init__(self, spec: StudySpec, echo: Callable[[str], None] = print, retry_cancelled: bool = False,
                 warn: Callable[[str], None] | None = None) -> None:
        self.spec = spec
        self.lost_after_s = spec.lost_after_s
        self.echo = echo
        self.warn = warn or (lambda line: print(mask_uri(line), file=sys.stderr))  # refusals: one line on stderr
        self.retry_cancelled = retry_cancelled  # `study run --retry-cancelled`: run cancelled trials again
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
            self.store = runs.open_store(spec)
            self.exp_id = runs.experiment_id(self.store, spec)
            self.parent_id = runs.parent_run(self.store, self.exp_id, spec)
        self.inflight: dict[int, InFlight] = {}
        self.waiting: list[int] = []  # trials to resubmit (their job died or paused) once a slot is free
        self.n_accepted = 0           # submits of this driver that the executor accepted
        self._executor: Any = None
        self._progress_shown: dict[int, Any] = {}   # trial -> the step last echoed
        self._progress_at = time.monotonic()
        self._heartbeat()

    # ------------------------------------------------------------------ the loop

    def run(self, wait: bool = True) -> StudySummary:
        """Reconcile, then keep slots full until every trial has ended (wait=False: fill once and detach)."""
        if self.retry_cancelled:
            with self._lock():
                for n in enqueue_retries(self.study, self.spec):
                    self._event("retry", n, say="cancelled: enqueued again (--retry-cancelled)")
        self.reconcile()
        self.fill()
        while wait:
            if not self.inflight and not self.waiting:
                self.reconcile()  # a driver beside this one may have died with trials in flight: adopt them
                self.fill()
                if not self.inflight and not self.waiting:
                    break
            pause(self._executor, self.spec.poll_s)  # a warm local job that ends cuts it short
            self._heartbeat()
            self.poll()
            self.fill()
            self.show_progress()
        release(self._executor)  # a warm executor's zygote; its jobs run on
        summary = self.summary()
        if wait and summary.n_running == 0:  # the last driver of the study closes the parent run
            runs.finish_parent(self.store, self.parent_id, summary.n_complete, summary.best_value)
        return summary

    def fill(self) -> None:
        """Resubmit waiting trials while fewer than `parallelism` are in flight (a SLURM grid's array included), then
        ask for new trials while a slot is free and the budget allows; submit them together."""
        again = self.waiting[:max(0, self.spec.parallelism - len(self.inflight))]
        if again:
            self.waiting = self.waiting[len(again):]
            self.submit(again)
        new = []
        while not self.waiting and len(self.inflight) + len(new) < self._slots():
            with self._lock():  # count + ask + claim at once: other drivers of the study wait
                if not self._may_ask():
                    break
                trial, params = ask(self.study, self.spec)
                self._claim(trial._trial_id)
            crash_point("asked")
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
        """Handle every in-flight trial whose job has ended (or been cancelled, or lost)."""
        asking = []
        for number, f in list(self.inflight.items()):
            result = read_json(trial_dir(self.spec, number) / RESULT_FILE)  # a final result frees the slot at once
            if result is not None and result.get("status") != "paused":
                self._ended(number, result)
            else:
                asking.append(f)
        for f, state in zip(asking, job_states([f.ref for f in asking], [f.job for f in asking])):
            if state.kind in (ALIVE, UNREACHABLE):  # a controller that does not answer decides nothing
                f.unknown_since = None if state.kind == ALIVE else f.unknown_since
                continue
            result = read_json(trial_dir(self.spec, f.number) / RESULT_FILE)  # written while the job ended
            if result is not None:
                self._ended(f.number, result)
            elif self._cancel_asked(f.number):
                self._cancelled(f.number, CANCEL_REASON)
            elif state.kind == CANCELLED:
                self._cancelled(f.number, f"cancelled outside mgbench: job {f.ref['job_id']} {state.raw} (scancel)")
            elif state.kind == UNKNOWN:
                f.unknown_since = f.unknown_since or time.time()
                if time.time() - f.unknown_since >= self.lost_after_s:
                    self._lost(f, state.raw)
            else:
                self._died(f.number)

    # ------------------------------------------------------------------ trials

    def prepare(self, number: int, trial_id: int, params: dict[str, Any]) -> dict[str, Any]:
        """Validate the trial's config, write `trial.json` (the intent), open its MLflow run (or adopt the one a
        killed driver opened after that intent) and name it in `trial.json`, all before any training."""
        cfg = validate_trial(self.spec, params, number)
        digest = config_hash(cfg.to_dict(), self.spec.entry, self.spec.eval_hook)
        path = trial_dir(self.spec, number) / TRIAL_FILE
        before = read_json(path) or {}
        rec = {"study": self.spec.name, "number": number, "trial_id": trial_id, "run_id": None,
               "parent_run_id": self.parent_id, "tracking_uri": self.spec.tracking_uri, "storage": self.spec.storage,
               "out_dir": cfg.out_dir, "params": params, "config": cfg.to_dict(), "config_hash": digest, "jobs": [],
               "deaths": 0, "created_at": time.time(), "run_intent_at": time.time(), **before}
        if not rec.get("run_id"):
            write_json(path, rec)
            crash_point("run_intent")
            rec["run_id"] = runs.trial_run(self.store, self.exp_id, self.parent_id, self.spec, number, params, cfg,
                                           digest, adopt_since=before.get("run_intent_at"))
            write_json(path, rec)
        retry_of = self.study._storage.get_trial(trial_id).user_attrs.get(UA_RETRY_OF)
        if retry_of is not None and carry_checkpoints(self.spec, retry_of, number):
            self._event("resume", number, say=f"retries cancelled trial {retry_of} from its checkpoint")
        storage = self.study._storage  # the cache finds the trial, its run and its store by these
        for key, value in ((UA_CONFIG_HASH, digest), (UA_RUN_ID, rec["run_id"]),
                           (UA_TRACKING_URI, self.spec.tracking_uri)):
            storage.set_trial_user_attr(trial_id, key, value)
        return rec

    def reuse(self, number: int) -> bool:
        """Finish a prepared trial by copying an equal COMPLETE trial of another study (spec.reuse); False: train it."""
        if not self.spec.reuse:
            return False
        folder = trial_dir(self.spec, number)
        rec = read_json(folder / TRIAL_FILE) or {}
        digest = rec.get("config_hash")
        src = find_source(self.study._storage, self.spec.name, digest, self.spec.optimize.metric) if digest else None
        if src is None:
            return False
        try:
            copy_run(self.store, rec["run_id"], src, self.spec.tracking_uri)
        except Exception as e:  # noqa: BLE001 - a source run that cannot be read is trained instead
            self.echo(f"[{self.spec.name}] trial {number}: cannot copy {src.label} ({e}); training it")
            return False
        tell_reused(self.study, rec["trial_id"], number, src)
        self.store.set_status(rec["run_id"], "finished")
        write_json(folder / RESULT_FILE, {"status": "finished", "value": src.value, "step": src.user_attrs.get(UA_STEP),
                                          "metrics": src.user_attrs.get(UA_METRICS), "error": None,
                                          "reused_from": src.label, "finished_at": time.time()})
        self._event("reused", number, say=f"reused {src.study} #{src.number}", source=src.label, value=src.value)
        return True

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
            self._adopt_orphan(t)
        self.poll()

    def _ended(self, number: int, result: dict[str, Any]) -> None:
        status = result.get("status")
        if status == "paused":
            self._event("paused", number, step=result.get("step"))
            self._queue(number)
            return
        if status == "cancelled":  # `study cancel` ended it (idempotent here: it may have died half-way)
            self._cancelled(number, result.get("error") or "cancelled")
            return
        if status == RESUMABLE:  # e.g. a full disk: not the trial's fault, so a retry from its checkpoint
            self._died(number, stopped=result.get("error") or "resumable")
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
            return pid_alive(int(owner["pid"])) and (start is None or _start_ticks(int(owner["pid"])) == start)
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

    def _may_ask(self) -> bool:
        """Whether to ask another trial: the budget is not spent, or a retry of a cancelled trial waits."""
        trials = self.study.get_trials(deepcopy=False)
        return n_budget(trials) < self.spec.n_trials or any(t.state == TrialState.WAITING for t in trials)

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
                self.echo(f"[{self.spec.name}] trial {number}: {progress_text(progress, self.spec.optimize.metric)}")

    def _event(self, kind: str, number: int, say: str | None = None, **data: Any) -> None:
        """Append to the events file and echo (`say`: the echoed text instead of the event and its data)."""
        self._log_event(kind, number, **data)
        say = say or f"{kind} " + " ".join(f"{k}={v}" for k, v in data.items())
        self.echo(f"[{self.spec.name}] trial {number}: {say}")

    def _log_event(self, kind: str, number: int, **data: Any) -> None:
        """Append one line to the events file."""
        line = {"t": time.time(), "event": kind, "trial": number, "driver": self.me["pid"], **data}
        with open(Path(self.spec.out_dir) / EVENTS_FILE, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")

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
    s.n_cancelled = sum(is_cancelled(t) for t in trials)
    s.n_failed = sum(t.state == TrialState.FAIL for t in trials) - s.n_cancelled
    s.n_running = sum(t.state == TrialState.RUNNING for t in trials)
    if s.n_complete:
        best = study.best_trial
        s.best_value, s.best_params = best.value, dict(best.params)
    return s


def run_study(spec: StudySpec, wait: bool = True, echo: Callable[[str], None] = print,
              retry_cancelled: bool = False) -> StudySummary:
    """Run (or resume) a study to the end; wait=False submits what fits and returns."""
    return Driver(spec, echo, retry_cancelled=retry_cancelled).run(wait=wait)
