"""What happens to a trial's job once the driver has it: submit (with its intent recorded first), refusal,
adoption after a killed driver, death, loss, resubmission for a free slot, cancel. A mixin of the Driver
(mgbench.study.runner), which owns the study, the run store, the lock and the event log.
"""
from __future__ import annotations

import contextlib
import io
import subprocess
import time
import uuid
from dataclasses import dataclass
from typing import Any

import submitit
from optuna.trial import TrialState

from mgbench.study.crashpoints import crash_point
from mgbench.study.executors import JobRef, job_ref, submitit_folder
from mgbench.study.jobstate import cancel_job, find_submitted
from mgbench.study.outcomes import CANCEL_REASON, mark_cancelled, mark_refused, refusal_message
from mgbench.study.trial import RESULT_FILE, TRIAL_FILE, TrialJob, read_json, trial_dir, write_json


@dataclass
class InFlight:
    number: int
    job: Any | None                # the live submitit job (None: re-attached after a driver restart)
    ref: dict[str, str]            # the persistent job reference (executor, job_id, folder)
    unknown_since: float | None = None  # when SLURM first said UNKNOWN or forgot the job (the lost clock)


class SubmitRefused(RuntimeError):
    """sbatch refused a submit and no submit of this driver was accepted: the study stops (exit 2)."""


class JobLifecycle:
    """The Driver's handling of jobs (see the module docstring); expects spec, study, store, inflight, waiting,
    n_accepted, echo, warn, _lock, _event, _log_event, _get_executor, reuse from the Driver."""

    def submit(self, numbers: list[int]) -> None:
        """Submit trials (SLURM: several at once go out as one job array) after recording a submission token in
        each trial.json; a refusal fails them (and stops a driver none of whose submits was accepted)."""
        for n in [n for n in numbers if self._cancel_asked(n)]:  # cancelled while waiting for a slot
            self._cancelled(n, CANCEL_REASON)
        numbers = [n for n in numbers if not self._cancel_asked(n)]
        if not numbers:
            return
        token = uuid.uuid4().hex
        for n in numbers:  # a stale result (a paused run) must not be read as this job's outcome
            (trial_dir(self.spec, n) / RESULT_FILE).unlink(missing_ok=True)
            self._update(n, submitting={"token": token, "at": time.time()}, waiting_since=None)
        crash_point("submit_intent")
        try:
            jobs = self._submit_jobs([TrialJob(self.spec, n, token) for n in numbers])
        except (submitit.core.utils.FailedJobError, subprocess.SubprocessError, OSError) as e:
            self._refused(numbers, refusal_message(e))
            return
        crash_point("submitted")
        self.n_accepted += len(numbers)
        for n, job in zip(numbers, jobs):
            self._record_job(n, job_ref(self.spec, job).to_dict(), job, "submit")

    def _submit_jobs(self, fns: list[TrialJob]) -> list[Any]:
        """Hand the jobs to submitit (its echo of sbatch's stderr is kept back: a refusal is told in one line)."""
        ex = self._get_executor()
        with contextlib.redirect_stderr(io.StringIO()):
            if self.spec.executor.type == "slurm" and len(fns) > 1:
                return ex.submit_array(fns)
            return [ex.submit(fn) for fn in fns]

    def _record_job(self, number: int, ref: dict[str, str], job: Any | None, event: str) -> None:
        """Name the trial's new job in trial.json (the submission token done with) and watch it."""
        rec = read_json(trial_dir(self.spec, number) / TRIAL_FILE) or {}
        self._update(number, jobs=[*(rec.get("jobs") or []), {**ref, "submitted_at": time.time()}], submitting=None)
        self.inflight[number] = InFlight(number, job, ref)
        self._event(event, number, job_id=ref["job_id"])

    def _refused(self, numbers: list[int], message: str) -> None:
        """sbatch refused: each trial FAILs with its message; with nothing of this driver accepted or in flight,
        the study stops."""
        for n in numbers:
            mark_refused(self.spec, self.study, self.store, n, message)
            self._log_event("refused", n, error=message)
        stop = self.n_accepted == 0 and not self.inflight
        if stop:
            raise SubmitRefused(f"trial {', '.join(map(str, numbers))}: sbatch refused the job ({message}); no "
                                "submit of this study was accepted: study stopped")
        self.warn(f"[{self.spec.name}] trial {', '.join(map(str, numbers))}: sbatch refused the job, trial failed: "
                  f"{message}")

    def _adopt(self, number: int, submitting: dict[str, Any]) -> bool:
        """A driver killed between submit and trial.json: adopt the job its submission token names, if any."""
        if self.spec.executor.type == "debug":  # debug jobs died with that driver
            return False
        found = find_submitted(str(submitit_folder(self.spec)), number, submitting["token"], submitting["at"])
        if not found:
            return False
        ref = JobRef(self.spec.executor.type, found[-1], str(submitit_folder(self.spec))).to_dict()
        self._record_job(number, ref, None, "adopt")
        if self._cancel_asked(number):  # `study cancel` could not see this job: stop it now
            cancel_job(ref)
        return True

    def _adopt_orphan(self, t: Any) -> None:
        """Take over a RUNNING trial of a dead driver: finish preparing it, adopt the job it was submitting, watch
        its last job, or queue it (no job yet, or waiting for a resubmission when that driver died)."""
        rec = read_json(trial_dir(self.spec, t.number) / TRIAL_FILE)
        if rec is None or not rec.get("run_id"):  # the driver died between ask and naming the MLflow run
            params = {k: t.params[k] for k in self.spec.space if k in t.params}
            rec = self.prepare(t.number, t._trial_id, params)
        if rec.get("submitting") and self._adopt(t.number, rec["submitting"]):
            return
        jobs = rec.get("jobs") or []
        if self._cancel_asked(t.number) and (not jobs or rec.get("submitting") or rec.get("waiting_since")):
            self._cancelled(t.number, CANCEL_REASON)
        elif not jobs and self.reuse(t.number):
            return
        elif not jobs or rec.get("submitting") or rec.get("waiting_since"):
            if t.number not in self.waiting:
                self.waiting.append(t.number)
        else:
            self.inflight[t.number] = InFlight(t.number, None, jobs[-1])
            self._event("attach", t.number, job_id=jobs[-1]["job_id"])

    def _died(self, number: int, lost: str | None = None, stopped: str | None = None) -> None:
        """Its job ended without a result, was lost, or `stopped` (result.json "resumable": a checkpoint it could
        not write): resubmit from its checkpoint, up to max_retries times."""
        rec = read_json(trial_dir(self.spec, number) / TRIAL_FILE) or {}
        deaths = rec.get("deaths", 0) + 1
        self._update(number, deaths=deaths)
        self.inflight.pop(number)
        how = f"lost ({lost})" if lost else f"stopped ({stopped})" if stopped else "died without a result"
        if deaths > self.spec.max_retries:
            error = f"its job {how}; {deaths} deaths, max_retries {self.spec.max_retries}"
            self.echo(f"trial {number}: {error}; marked failed")
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
            self.store.set_status(rec["run_id"], "failed", error)
            self._event("end", number, status="failed", value=None)
            return
        say = f"job {how}: resubmitting from its checkpoint (retry {deaths} of {self.spec.max_retries})"
        self._event("resubmit", number, say=say, deaths=deaths, **({"lost": lost} if lost else {}),
                    **({"stopped": stopped} if stopped else {}))
        self._queue(number)

    def _lost(self, f: InFlight, said: str) -> None:
        """SLURM said UNKNOWN, or knew the job no more, for lost_after_s: scancel it (never two copies in one
        folder) and resubmit."""
        cancel_job(f.ref)
        self._died(f.number, lost=f"job {f.ref['job_id']}: {said} for {time.time() - f.unknown_since:.0f} s")

    def _queue(self, number: int) -> None:
        """Resubmit once a slot is free (recorded in trial.json: a rerun driver queues it again, no death counted)."""
        self.inflight.pop(number, None)
        self._update(number, waiting_since=time.time())
        if number not in self.waiting:
            self.waiting.append(number)

    def _cancelled(self, number: int, reason: str) -> None:
        """End the trial as CANCELLED (never resubmitted, unless --retry-cancelled)."""
        with self._lock():
            done = mark_cancelled(self.spec, self.study, self.store, number, reason)
        self.inflight.pop(number, None)
        self.waiting = [n for n in self.waiting if n != number]
        if done:
            self._event("cancelled", number, say=f"{reason}; not resubmitted", reason=reason)

    def _cancel_asked(self, number: int) -> bool:
        """Whether `mgbench study cancel` recorded its intent for this trial."""
        return bool((read_json(trial_dir(self.spec, number) / TRIAL_FILE) or {}).get("cancel"))

    def _update(self, number: int, **fields: Any) -> None:
        """Set fields of the trial's trial.json (None removes one), under the study lock (`study cancel` writes
        its intent there too)."""
        path = trial_dir(self.spec, number) / TRIAL_FILE
        with self._lock():
            rec = read_json(path) or {}
            for key, value in fields.items():
                if value is None:
                    rec.pop(key, None)
                else:
                    rec[key] = value
            write_json(path, rec)

