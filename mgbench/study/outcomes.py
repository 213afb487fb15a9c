"""How a trial ends other than by its own result: cancelled (`mgbench study cancel`, an outside scancel) or
refused by sbatch; and `study run --retry-cancelled`.

A cancelled trial is CANCELLED everywhere: result.json status "cancelled", its MLflow run KILLED with tag
mgbench.status = cancelled, Optuna FAIL with the user attr mgbench.cancelled (why). It is never resubmitted;
`--retry-cancelled` enqueues a new trial with its params that takes its place in n_trials and resumes from
its latest checkpoint (copied into the new trial's folder). A refused trial is FAIL in Optuna with the user
attr mgbench.submit_error (sbatch's message) and FAILED in MLflow with that message as mgbench.error.
"""
from __future__ import annotations

import contextlib
import fcntl
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from optuna.trial import TrialState

from mgbench.study import runs
from mgbench.study.spec import StudySpec
from mgbench.study.trial import RESULT_FILE, TRIAL_FILE, read_json, trial_dir, write_json
from mgbench.tracking import RunStore

UA_CANCELLED = "mgbench.cancelled"        # Optuna user attr of a cancelled trial (state FAIL): why
UA_RETRY_OF = "mgbench.retry_of"          # Optuna user attr of a trial that retries a cancelled one: its number
UA_SUBMIT_ERROR = "mgbench.submit_error"  # Optuna user attr of a trial sbatch refused (state FAIL): its message
CANCEL_WAIT_S = 60.0                      # `study cancel` waits this long for each job to end
CANCEL_REASON = "cancelled by mgbench study cancel"  # the reason recorded, whoever (command or driver) ends it
LOCK_FILE = ".driver.lock"    # in out_dir: drivers of one study ask, claim and set up one at a time (flock)
ENDED = ("finished", "failed", "pruned", "cancelled")  # result.json statuses that end a trial


@contextlib.contextmanager
def study_lock(spec: StudySpec) -> Iterator[None]:
    """The drivers' lock on out_dir/.driver.lock (flock), for commands beside them (`study cancel`)."""
    Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(spec.out_dir) / LOCK_FILE, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a file system without flock: as the driver does, go on unlocked
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def trial_id_of(study: Any, number: int) -> int:
    """The Optuna trial id of a trial number."""
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)


def mark_cancelled(spec: StudySpec, study: Any, store: RunStore, number: int, reason: str) -> bool:
    """End a trial as CANCELLED (Optuna, MLflow, result.json); False when it had ended otherwise first. Idempotent;
    the caller holds the study lock."""
    folder = trial_dir(spec, number)
    result = read_json(folder / RESULT_FILE) or {}
    if result.get("status") in ("finished", "failed", "pruned"):
        return False
    tid = trial_id_of(study, number)
    if not study._storage.get_trial(tid).state.is_finished():
        study._storage.set_trial_user_attr(tid, UA_CANCELLED, reason)
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    elif UA_CANCELLED not in study._storage.get_trial(tid).user_attrs:
        return False
    rec = read_json(folder / TRIAL_FILE) or {}
    if rec.get("run_id"):
        store.set_status(rec["run_id"], "cancelled")
    progress = read_json(folder / "progress.json") or {}
    write_json(folder / RESULT_FILE, {"status": "cancelled", "value": None, "metrics": {}, "error": reason,
                                      "step": progress.get("step"), "finished_at": time.time()})
    return True


def mark_refused(spec: StudySpec, study: Any, store: RunStore, number: int, message: str) -> None:
    """End a trial sbatch refused as FAIL: the message in Optuna (user attr), MLflow (FAILED, mgbench.error) and
    trial.json / result.json."""
    folder = trial_dir(spec, number)
    rec = read_json(folder / TRIAL_FILE) or {}
    rec.pop("submitting", None)
    rec["submit_error"] = message
    write_json(folder / TRIAL_FILE, rec)
    tid = trial_id_of(study, number)
    if not study._storage.get_trial(tid).state.is_finished():
        study._storage.set_trial_user_attr(tid, UA_SUBMIT_ERROR, message)
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    error = f"sbatch refused the job: {message}"
    if rec.get("run_id"):
        store.set_status(rec["run_id"], "failed", error)
    write_json(folder / RESULT_FILE, {"status": "failed", "value": None, "metrics": {}, "step": None,
                                      "error": error, "finished_at": time.time()})


def refusal_message(error: BaseException) -> str:
    """sbatch's complaint on one line (`sbatch: error: ...; sbatch: error: ...`), or the error's first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = [line for line in lines if "error" in line.lower()] or lines or [type(error).__name__]
    return "; ".join(said)[:2000]


def is_cancelled(trial: Any) -> bool:
    """Whether an Optuna trial ended as CANCELLED (FAIL with the cancel attr)."""
    return trial.state == TrialState.FAIL and UA_CANCELLED in trial.user_attrs


def n_budget(trials: list[Any]) -> int:
    """Trials that count against n_trials: a cancelled trial retried by another counts once, as its retry."""
    retried = {t.user_attrs.get(UA_RETRY_OF) for t in trials} - {None}
    return sum(t.number not in retried for t in trials)


def enqueue_retries(study: Any, spec: StudySpec) -> list[int]:
    """Enqueue a new trial with the params of every cancelled trial not retried yet; their numbers."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(UA_RETRY_OF) for t in trials}
    out = []
    for t in trials:
        if is_cancelled(t) and t.number not in retried:
            study.enqueue_trial({k: t.params[k] for k in spec.space if k in t.params},
                                user_attrs={UA_RETRY_OF: t.number})
            out.append(t.number)
    return out


def carry_checkpoints(spec: StudySpec, old: int, new: int) -> bool:
    """Copy a cancelled trial's checkpoints into the folder of the trial that retries it (it resumes there)."""
    from mgbench.trainer.checkpoint import checkpoint_dir

    src, dst = checkpoint_dir(trial_dir(spec, old)), checkpoint_dir(trial_dir(spec, new))
    if not src.is_dir() or dst.exists():
        return False
    shutil.copytree(src, dst)
    return True


def cancel_trials(spec: StudySpec, number: int | None = None, echo: Callable[[str], None] = print) -> int:
    """`mgbench study cancel`: record the intent, stop each running trial's job, end the trial as CANCELLED once
    the job is gone (a job that outlives CANCEL_WAIT_S is left to the driver, which sees the intent). Returns the
    exit status: 1 when the trial named is not running."""
    from mgbench.study.jobstate import ALIVE, UNREACHABLE, cancel_job, wait_gone
    from mgbench.study.optuna_io import open_study

    study = open_study(spec, create=False)
    running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if number is None or t.number == number]
    if number is not None and not running:
        echo(f"[{spec.name}] trial {number}: not running, nothing to cancel")
        return 1
    store = runs.open_store(spec)
    jobs: dict[int, dict[str, str] | None] = {}
    with study_lock(spec):  # the intent first: a driver that sees the job end now knows it was cancelled
        for t in running:
            path = trial_dir(spec, t.number) / TRIAL_FILE
            rec = read_json(path) or {}
            rec["cancel"] = {"requested_at": time.time(), "by": "mgbench study cancel"}
            write_json(path, rec)
            jobs[t.number] = (rec.get("jobs") or [None])[-1]
    for n, ref in jobs.items():
        error = cancel_job(ref) if ref else None
        if error:
            echo(f"[{spec.name}] trial {n}: cancelling job {ref['job_id']}: {error}")
    for n, ref in jobs.items():
        state = wait_gone(ref, CANCEL_WAIT_S) if ref else None
        if state is not None and state.kind in (ALIVE, UNREACHABLE):
            echo(f"[{spec.name}] trial {n}: job {ref['job_id']} still {state.label()}; the driver ends the trial "
                 "as cancelled when it stops")
            continue
        with study_lock(spec):
            done = mark_cancelled(spec, study, store, n, CANCEL_REASON)
        job = f" (job {ref['job_id']})" if ref else ""
        echo(f"[{spec.name}] trial {n}: " + (f"cancelled{job}" if done else "had already ended, left as it was"))
    if not running:
        echo(f"[{spec.name}] no running trial to cancel")
    return 0
